//! Bodies in transit: request bodies on their way upstream (buffered, and so replayable, up to
//! a limit, streamed beyond it) and the upstream's response bodies under a silence timeout.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::activity::Open;
use crate::error::GatewayError;

/// A client's request body as hyper delivers it, holding its request open on the connection
/// (`activity`) until dropped: a connection is parked only when no request body is still
/// being read, here or by a streaming upstream request.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    _open: Option<Open>,
}

impl ClientBody {
    pub fn new(inner: Incoming, open: Option<Open>) -> ClientBody {
        ClientBody { inner, _open: open }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of an upstream request.
#[derive(Debug)]
pub enum ProxyBody {
    /// Fully buffered: cheap to clone for a replay.
    Full(Option<Bytes>),
    /// Too large to buffer: what was read already, then the rest of the client's stream,
    /// cut off with [`TooLarge`] past `max` bytes in all.
    Stream {
        prefix: Option<Bytes>,
        rest: ClientBody,
        seen: u64,
        max: u64,
        /// Set when `max` was passed, for callers that only see a protocol error.
        exceeded: Arc<AtomicBool>,
    },
}

/// The client's body went past `limits.max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct TooLarge(pub u64);

impl ProxyBody {
    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// The flag a streamed body raises when it passes its cap (a buffered one cannot).
    pub fn exceeded(&self) -> Option<Arc<AtomicBool>> {
        match self {
            ProxyBody::Full(_) => None,
            ProxyBody::Stream { exceeded, .. } => Some(exceeded.clone()),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream {
                prefix,
                rest,
                seen,
                max,
                exceeded,
            } => {
                if let Some(p) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                match Pin::new(rest).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        *seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                        if *seen > *max {
                            exceeded.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(TooLarge(*max)))));
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Stream { prefix, rest, .. } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream { prefix, rest, .. } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

/// The upstream's response body, cut off with [`BodyStalled`] after `timeout` without a
/// frame. The body is polled first and the timer armed only when it has nothing ready, so a
/// response that is already here (nearly all of them) never touches the timer wheel;
/// tower-http's `TimeoutBody` arms and disarms a timer on every poll.
#[derive(Debug)]
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Allocated the first time the body has to wait, then reset.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The timer runs for the current silence.
    armed: bool,
}

/// No frame from the upstream within `upstream.body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for longer than {0:?}")]
pub struct BodyStalled(pub Duration);

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, timeout: Duration) -> IdleTimeout<B> {
        IdleTimeout {
            inner,
            timeout,
            sleep: None,
            armed: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if !this.armed {
            this.armed = true;
            let deadline = tokio::time::Instant::now() + this.timeout;
            match &mut this.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let expired = this
            .sleep
            .as_mut()
            .is_some_and(|sleep| std::future::Future::poll(sleep.as_mut(), cx).is_ready());
        if expired {
            return Poll::Ready(Some(Err(Box::new(BodyStalled(this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads the client's body into memory when it fits `replay_limit`, so the request can be
/// replayed; a larger (or larger-announced) body streams instead.
pub async fn prepare(
    mut body: ClientBody,
    replay_limit: usize,
    max: usize,
) -> Result<ProxyBody, GatewayError> {
    if body.is_end_stream() {
        return Ok(ProxyBody::empty());
    }
    // A declared length over the maximum is refused before anything goes upstream.
    if body.size_hint().lower() > max as u64 {
        return Err(GatewayError::BodyTooLarge { limit: max });
    }
    if body.size_hint().lower() > replay_limit as u64 {
        return Ok(ProxyBody::Stream {
            prefix: None,
            rest: body,
            seen: 0,
            max: max as u64,
            exceeded: Arc::default(),
        });
    }
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    loop {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|_| GatewayError::ClientBody)?;
        let Ok(data) = frame.into_data() else {
            // Trailers: the upstream API has no use for them.
            continue;
        };
        // The common single-frame body is kept without a copy.
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(f) => {
                buf.extend_from_slice(&f);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
        let held = first.as_ref().map_or(buf.len(), Bytes::len);
        if held > max {
            return Err(GatewayError::BodyTooLarge { limit: max });
        }
        if held > replay_limit {
            let prefix = first.take().unwrap_or_else(|| buf.split().freeze());
            return Ok(ProxyBody::Stream {
                seen: prefix.len() as u64,
                prefix: Some(prefix),
                rest: body,
                max: max as u64,
                exceeded: Arc::default(),
            });
        }
    }
    let all = first.unwrap_or_else(|| buf.freeze());
    Ok(ProxyBody::Full((!all.is_empty()).then_some(all)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body fed frame by frame from a channel; ends when the sender is dropped.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    /// Silence is measured from the last frame: a body slower in total than the timeout, but
    /// never silent that long, arrives whole; a longer silence ends it with `BodyStalled`.
    #[tokio::test(start_paused = true)]
    async fn only_silence_longer_than_the_timeout_cuts_the_body() {
        let timeout = Duration::from_secs(1);
        let (tx, rx) = mpsc::channel(4);
        let feeder = tokio::spawn(async move {
            for _ in 0..3 {
                tx.send(Bytes::from_static(b"x")).await.unwrap();
                tokio::time::sleep(timeout * 8 / 10).await;
            }
        });
        let body = IdleTimeout::new(Fed(rx), timeout).collect().await;
        assert_eq!(body.unwrap().to_bytes().as_ref(), b"xxx");
        feeder.await.unwrap();

        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        let mut body = IdleTimeout::new(Fed(rx), timeout);
        assert!(body.frame().await.unwrap().is_ok());
        let started = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyStalled>(), "{err}");
        assert_eq!(started.elapsed(), timeout);
        drop(tx);
    }
}
