//! Short text answers the gateway writes itself (400, 404, 502, 504), and which one
//! a failed request gets.

use bytes::Bytes;
use http::header;
use pingora::prelude::*;
use pingora::{ErrorSource, ErrorType};

/// The status for a request that failed before its response began; `None` when the
/// client is gone (there is no one to answer).
pub fn status_for(e: &Error) -> Option<u16> {
    let upstream = e.esource() == &ErrorSource::Upstream;
    Some(match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if upstream =>
        {
            504
        }
        ErrorType::InternalError => 500,
        _ => match e.esource() {
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                    return None
                }
                _ => 400,
            },
            ErrorSource::Internal => 500,
            // The upstream failed, or the relay found its response unusable.
            ErrorSource::Upstream | ErrorSource::Unset => 502,
        },
    })
}

/// Whether a failure answered with `code` is the upstream's own: it connected but gave
/// no usable response (timeout, reset, garbage). A failed connect is counted when it
/// fails, once per server tried, so it is not counted again here.
pub fn upstream_failed(e: &Error, code: u16) -> bool {
    let connect = matches!(
        e.etype(),
        ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectProxyFailure
    );
    matches!(code, 502 | 504) && !connect
}

/// Answers a request that failed before its response began (see [`status_for`]);
/// returns the status written, 0 for none.
pub async fn error(session: &mut Session, e: &Error) -> u16 {
    let Some(code) = status_for(e) else {
        return 0;
    };
    // A client's bytes that failed to parse, or a body left unread: what follows on the
    // connection cannot be trusted to start a request, so it closes after this answer.
    if e.esource() == &ErrorSource::Downstream || !session.is_body_done() {
        session.set_keepalive(None);
    }
    let body = match code {
        502 => "502 Bad Gateway: the upstream failed\n",
        504 => "504 Gateway Timeout: the upstream did not answer in time\n",
        400 => "400 Bad Request\n",
        _ => "the gateway could not complete this request\n",
    };
    if let Err(err) = respond_text(session, code, body).await {
        tracing::debug!("could not send the error response: {err}");
    }
    code
}

/// A request whose framing or host cannot be trusted: 400, and the connection closes
/// (what follows on it may be a body we never read).
pub async fn refuse_malformed(session: &mut Session, body: &'static str) -> Result<bool> {
    session.set_keepalive(None);
    respond_text(session, 400, body).await?;
    Ok(true)
}

/// Writes a whole short text response.
pub async fn respond_text(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from_static(body.as_bytes())), true)
        .await
}
