//! A read-side watch on a client connection for requests that carry both `Content-Length` and
//! `Transfer-Encoding`. hyper resolves that conflict itself (RFC 9112 §6.3: chunked wins, the
//! connection closes afterwards) and removes `Content-Length` before meetgate sees the request;
//! this watch lets the gateway refuse such a request instead of forwarding it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFIX: usize = 20;

/// Wraps a connection's byte stream and flags a header block with both framing headers.
pub struct FramingWatch<S> {
    inner: S,
    flag: Arc<AtomicBool>,
    line: [u8; PREFIX],
    line_len: usize,
    line_bytes: usize,
    content_length: bool,
    transfer_encoding: bool,
}

impl<S> FramingWatch<S> {
    /// Watches `inner`, raising `flag` when a conflicting header block goes by.
    pub fn new(inner: S, flag: Arc<AtomicBool>) -> FramingWatch<S> {
        FramingWatch {
            inner,
            flag,
            line: [0; PREFIX],
            line_len: 0,
            line_bytes: 0,
            content_length: false,
            transfer_encoding: false,
        }
    }

    // Lines are scanned everywhere (bodies too): a body line that looks like a framing header
    // is as unlikely in the upstream's JSON as it is harmless (it only refuses the request).
    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match b {
                b'\n' => {
                    if self.line_bytes == 0 {
                        if self.content_length && self.transfer_encoding {
                            self.flag.store(true, Ordering::Relaxed);
                        }
                        self.content_length = false;
                        self.transfer_encoding = false;
                    } else {
                        let line = &self.line[..self.line_len];
                        self.content_length |= line.starts_with(b"content-length:");
                        self.transfer_encoding |= line.starts_with(b"transfer-encoding:");
                    }
                    self.line_len = 0;
                    self.line_bytes = 0;
                }
                b'\r' => {}
                _ => {
                    if self.line_len < PREFIX {
                        self.line[self.line_len] = b.to_ascii_lowercase();
                        self.line_len += 1;
                    }
                    self.line_bytes += 1;
                }
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingWatch<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            this.scan(&buf.filled()[before..]);
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingWatch<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flagged(input: &[u8], chunk: usize) -> bool {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = FramingWatch::new((), flag.clone());
        for part in input.chunks(chunk) {
            w.scan(part);
        }
        flag.load(Ordering::Relaxed)
    }

    #[test]
    fn both_framing_headers_in_one_block_are_flagged_in_any_chunking() {
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let good = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for chunk in [1, 3, 7, 1000] {
            assert!(flagged(bad, chunk), "{chunk}");
            assert!(!flagged(good, chunk), "{chunk}");
        }
    }
}
