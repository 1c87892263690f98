//! Writes held until the flush on a plaintext client connection.
//!
//! pingora's own write buffer is off on plaintext listeners (`server::client_buffers`):
//! it is allocated at accept and kept for the connection's life, 4 KiB of every open
//! stream. Holding small writes here instead keeps a small response's header and body in
//! one send, as pingora's buffer did, with a buffer allocated at the first write and
//! given back at each flush: a stream between events, or a kept-alive connection
//! between requests, holds none.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pingora::protocols::Stream;
use tokio::io::AsyncWrite;

/// Most bytes held for the next flush; a larger write goes out directly.
pub(super) const HELD_MAX: usize = 4096;

/// What a connection holds for its next flush, over the stream it writes to.
#[derive(Default)]
pub(super) struct Held {
    /// Holding at all (plaintext); else every call passes straight through.
    pub(super) on: bool,
    pub(super) bytes: Vec<u8>,
    /// How much of `bytes` has gone out.
    sent: usize,
}

impl Held {
    /// Holding writes for `inner` when `on`.
    pub(super) fn new(on: bool) -> Held {
        Held {
            on,
            ..Held::default()
        }
    }

    /// Something is held that has not gone out.
    pub(super) fn unsent(&self) -> bool {
        self.sent < self.bytes.len()
    }

    /// Writes out what is held. The buffer is kept for the writes that follow.
    pub(super) fn poll_send(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.sent < self.bytes.len() {
            match ready!(Pin::new(&mut *inner).poll_write(cx, &self.bytes[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.bytes.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// `AsyncWrite::poll_write` through the hold.
    pub(super) fn poll_write(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.on {
            true => self.poll_hold(inner, cx, &[IoSlice::new(buf)], buf.len()),
            false => Pin::new(inner).poll_write(cx, buf),
        }
    }

    /// `AsyncWrite::poll_write_vectored` through the hold.
    pub(super) fn poll_write_vectored(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.on {
            true => {
                let len = bufs.iter().map(|b| b.len()).sum();
                self.poll_hold(inner, cx, bufs, len)
            }
            false => Pin::new(inner).poll_write_vectored(cx, bufs),
        }
    }

    /// `AsyncWrite::poll_flush`: what is held goes out, and the buffer is given back
    /// (the next write may be an event minutes away).
    pub(super) fn poll_flush(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send(inner, cx))?;
        self.bytes = Vec::new();
        Pin::new(inner).poll_flush(cx)
    }

    /// `AsyncWrite::poll_shutdown`, after what is held.
    pub(super) fn poll_shutdown(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_send(inner, cx))?;
        Pin::new(inner).poll_shutdown(cx)
    }

    /// `AsyncWrite::is_write_vectored`: held writes take slices as cheaply as one.
    pub(super) fn is_write_vectored(&self, inner: &Stream) -> bool {
        self.on || inner.is_write_vectored()
    }

    /// Holds `bufs` (together `len` bytes) for the next flush, or writes them when they
    /// are too many to hold.
    fn poll_hold(
        &mut self,
        inner: &mut Stream,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
        len: usize,
    ) -> Poll<std::io::Result<usize>> {
        if self.bytes.len() + len > HELD_MAX {
            ready!(self.poll_send(inner, cx))?;
        }
        if len >= HELD_MAX {
            return Pin::new(inner).poll_write_vectored(cx, bufs);
        }
        if self.bytes.capacity() == 0 {
            self.bytes.reserve_exact(HELD_MAX);
        }
        for b in bufs {
            self.bytes.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }
}
