//! An HTTP/1.x stream's client once its head is out: the bare connection, with the
//! body framed here.
//!
//! After the head, an event stream's response is body bytes only: chunks, or bytes
//! until the close. pingora's HTTP/1 session would go on holding the request it parsed
//! (its raw bytes and header map), the response head it wrote and its own state for the
//! stream's whole life, several KiB of every idle stream; none of it is needed to
//! write chunks. So the stream keeps the connection alone ([`H1Stream`]), and hands
//! it back to pingora for the next request when the stream ends. (Bytes a client
//! pipelined behind its stream request, which pingora does not serve either with
//! pipelining off, are not carried over: that request is never answered, and the
//! connection closes at the next request's header deadline. An `EventSource` never
//! pipelines.)

use bytes::Bytes;
use http::header;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::ErrorType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stream::Client;
use super::Exchange;

/// An HTTP/1.x event stream's connection after its response head.
pub struct H1Stream {
    stream: Stream,
    /// The head said chunked (an HTTP/1.1 client); else the body ends with the
    /// connection.
    chunked: bool,
    write_timeout: Option<std::time::Duration>,
    /// The connection may carry another request once the stream has ended properly.
    keepalive: bool,
    finished: bool,
    pub exchange: Exchange,
}

impl H1Stream {
    /// Takes the connection out of an HTTP/1.x session whose response head is written;
    /// gives the session back otherwise (HTTP/2, or nothing written yet).
    pub fn take(session: Box<ServerSession>) -> Result<H1Stream, Box<ServerSession>> {
        let ServerSession::H1(mut s) = *session else {
            return Err(session);
        };
        let Some(resp) = s.response_written() else {
            return Err(Box::new(ServerSession::H1(s)));
        };
        let chunked = resp
            .headers
            .get(header::TRANSFER_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        let exchange = Exchange::of(s.req_header(), resp.status.as_u16(), s.body_bytes_sent());
        // A body left unread would be read as the next request's header: such a
        // connection is not reused.
        let keepalive = chunked && s.will_keepalive() && s.is_body_done();
        let write_timeout = s.get_write_timeout();
        Ok(H1Stream {
            stream: s.into_inner(),
            chunked,
            write_timeout,
            keepalive,
            finished: false,
            exchange,
        })
    }

    /// Writes `parts` and flushes, within the write timeout.
    async fn send(&mut self, parts: &[&[u8]]) -> Result<()> {
        let stream = &mut self.stream;
        let io = async {
            for p in parts {
                stream.write_all(p).await?;
            }
            stream.flush().await
        };
        // pingora's timeout, as its own session uses: a write that completes at once
        // (the common case) never registers a timer.
        let r = match self.write_timeout {
            Some(t) => match pingora::prelude::timeout(t, io).await {
                Ok(r) => r,
                Err(_) => {
                    return Error::e_explain(ErrorType::WriteTimedout, "writing to the client")
                }
            },
            None => io.await,
        };
        r.map_err(|e| Error::because(ErrorType::WriteError, "writing to the client", e))
    }

    /// The connection, for the next request, when the stream ended properly and the
    /// client may send another one (`shutting_down`: it may not).
    pub fn reusable(self, shutting_down: bool) -> Option<Stream> {
        (self.finished && self.keepalive && !shutting_down).then_some(self.stream)
    }
}

/// Writes a chunk's size line (`<hex>\r\n`) into `buf`; its length.
fn chunk_size(buf: &mut [u8; 18], len: usize) -> usize {
    use std::io::Write;
    let mut w = &mut buf[..];
    // 16 hex digits and CRLF always fit.
    let _ = write!(w, "{len:X}\r\n");
    18 - w.len()
}

impl Client for H1Stream {
    async fn write(&mut self, bytes: Bytes) -> Result<()> {
        if bytes.is_empty() {
            return Ok(()); // an empty chunk would end the body
        }
        if self.chunked {
            let mut size = [0u8; 18];
            let n = chunk_size(&mut size, bytes.len());
            self.send(&[&size[..n], &bytes, b"\r\n"]).await?;
        } else {
            self.send(&[&bytes]).await?;
        }
        self.exchange.bytes += bytes.len();
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        if self.chunked && !self.finished {
            self.send(&[b"0\r\n\r\n"]).await?;
        }
        self.finished = true;
        Ok(())
    }

    async fn closed(&mut self) -> Result<()> {
        // A stream client has nothing more to send: whatever this reads is its close.
        let mut byte = [0u8; 1];
        let r = self.stream.read(&mut byte).await;
        self.keepalive = false;
        Error::e_explain(
            ErrorType::ConnectionClosed,
            match r {
                Ok(0) | Err(_) => "client closed",
                Ok(_) => "client sent data during a stream",
            },
        )
    }

    fn session(&mut self) -> Option<&mut Session> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_size;

    #[test]
    fn chunk_size_lines() {
        let mut buf = [0u8; 18];
        for (len, line) in [(1, "1\r\n"), (200, "C8\r\n"), (0x1000, "1000\r\n")] {
            let n = chunk_size(&mut buf, len);
            assert_eq!(&buf[..n], line.as_bytes());
        }
        let n = chunk_size(&mut buf, usize::MAX);
        assert_eq!(&buf[..n], b"FFFFFFFFFFFFFFFF\r\n");
    }
}
