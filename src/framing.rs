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
            content_length: false,
            transfer_encoding: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    // Lines are scanned everywhere (bodies too): a body line that looks like a framing header
    // is as unlikely in the upstream's JSON as it is harmless (it only refuses the request).
    // Line ends are found with memchr and only a line's first bytes are looked at: a
    // byte-at-a-time loop over every byte read cost 3,700 instructions per small request.
    fn scan(&mut self, mut bytes: &[u8]) {
        while let Some(end) = memchr::memchr(b'\n', bytes) {
            self.take(&bytes[..end]);
            self.end_line();
            bytes = &bytes[end + 1..];
        }
        self.take(bytes);
    }

    /// Part of a line, without its `\n`: its first bytes, lowercased, are kept.
    fn take(&mut self, part: &[u8]) {
        let room = &mut self.line[self.line_len..];
        let n = room.len().min(part.len());
        for (kept, b) in room.iter_mut().zip(&part[..n]) {
            *kept = b.to_ascii_lowercase();
        }
        self.line_len += n;
    }

    /// A line ended: an empty one (`\r` alone) ends the header block.
    fn end_line(&mut self) {
        if matches!(self.line[..self.line_len], [] | [b'\r']) {
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

    /// The definition the scan implements, line by line: a header block (lines up to an
    /// empty one; a line's `\r` before its `\n` is not part of it) whose lines include both
    /// framing headers, any case.
    fn reference(input: &[u8]) -> bool {
        let mut block = (false, false);
        let mut lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        lines.pop(); // what follows the last `\n` is not a whole line yet
        for line in lines {
            let line = line
                .strip_suffix(b"\r")
                .unwrap_or(line)
                .to_ascii_lowercase();
            if line.is_empty() {
                if block.0 && block.1 {
                    return true;
                }
                block = (false, false);
            }
            block.0 |= line.starts_with(b"content-length:");
            block.1 |= line.starts_with(b"transfer-encoding:");
        }
        false
    }

    proptest::proptest! {
        #[test]
        fn the_scan_agrees_with_a_line_by_line_reading(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b"Content-Length: 5".to_vec()),
                    proptest::strategy::Just(b"TRANSFER-ENCODING: chunked".to_vec()),
                    proptest::strategy::Just(b"transfer-\rencoding:x".to_vec()),
                    proptest::strategy::Just(Vec::new()),
                    proptest::strategy::Just(b"\r".to_vec()),
                    proptest::collection::vec(proptest::sample::select(b"ab:\r -Tc".to_vec()), 0..40),
                ],
                0..12,
            ),
            ends in proptest::collection::vec(proptest::bool::ANY, 12),
            chunk in 1usize..64,
        ) {
            let mut input = Vec::new();
            for (line, crlf) in lines.iter().zip(&ends) {
                input.extend_from_slice(line);
                input.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
            }
            proptest::prop_assert_eq!(flagged(&input, chunk), reference(&input));
        }
    }
}
