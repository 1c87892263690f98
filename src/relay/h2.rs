//! An HTTP/2 stream's client once its head is out: the stream's body writer alone.
//!
//! As for HTTP/1.x ([`super::H1Stream`]), an event stream's response after its head is
//! body bytes only. pingora's HTTP/2 session would go on holding the request it
//! received (its header map), the response head it wrote and the request body's
//! reader for the stream's whole life; writing DATA frames needs only the stream's
//! `SendStream`. The connection itself stays with pingora, which goes on serving its
//! other streams.

use ::h2::SendStream;
use bytes::Bytes;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::ErrorType;

use super::stream::Client;
use super::Exchange;

/// An HTTP/2 event stream after its response head.
pub struct H2Stream {
    /// Where the stream's DATA frames go; the stream lives as long as this does.
    body: SendStream<Bytes>,
    write_timeout: Option<std::time::Duration>,
    /// END_STREAM was sent.
    ended: bool,
    pub exchange: Exchange,
}

impl H2Stream {
    /// Takes the body writer out of an HTTP/2 session whose response head is written;
    /// gives the session back otherwise (HTTP/1.x, or nothing written yet).
    pub fn take(session: Box<ServerSession>) -> Result<H2Stream, Box<ServerSession>> {
        let ServerSession::H2(mut s) = *session else {
            return Err(session);
        };
        let Some(status) = s.response_written().map(|r| r.status.as_u16()) else {
            return Err(Box::new(ServerSession::H2(s)));
        };
        let Some(body) = s.take_response_body_writer() else {
            // The head ended the stream: there is no body to write.
            return Err(Box::new(ServerSession::H2(s)));
        };
        let exchange = Exchange::of(s.req_header(), status, s.body_bytes_sent());
        Ok(H2Stream {
            body,
            write_timeout: s.get_write_timeout(),
            ended: false,
            exchange,
        })
    }
}

impl Client for H2Stream {
    async fn write(&mut self, bytes: Bytes) -> Result<()> {
        if bytes.is_empty() || self.ended {
            return Ok(());
        }
        let n = bytes.len();
        // pingora's own body write: waits for flow-control capacity, within the timeout.
        pingora::protocols::http::v2::write_body(&mut self.body, bytes, false, self.write_timeout)
            .await
            .map_err(|e| e.into_down())?;
        self.exchange.bytes += n;
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        if !self.ended {
            self.ended = true;
            self.body
                .send_data(Bytes::new(), true)
                .or_err(ErrorType::WriteError, "ending the stream")?;
        }
        Ok(())
    }

    async fn closed(&mut self) -> Result<()> {
        // Resolves when the client resets the stream or the connection goes.
        let r = std::future::poll_fn(|cx| self.body.poll_reset(cx)).await;
        match r {
            Ok(reason) => Error::e_explain(
                ErrorType::ConnectionClosed,
                format!("client reset the stream: {reason}"),
            ),
            Err(e) => Err(Error::because(ErrorType::H2Error, "client closed", e)),
        }
    }

    fn session(&mut self) -> Option<&mut Session> {
        None
    }
}
