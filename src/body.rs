//! Request bodies on their way upstream: buffered (and so replayable) up to a limit, streamed
//! beyond it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::error::GatewayError;

/// The body of an upstream request.
#[derive(Debug)]
pub enum ProxyBody {
    /// Fully buffered: cheap to clone for a replay.
    Full(Option<Bytes>),
    /// Too large to buffer: what was read already, then the rest of the client's stream,
    /// cut off with [`TooLarge`] past `max` bytes in all.
    Stream {
        prefix: Option<Bytes>,
        rest: Incoming,
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

    /// A copy for a replay, when this body is buffered.
    pub fn replayable(&self) -> Option<Bytes> {
        match self {
            ProxyBody::Full(b) => Some(b.clone().unwrap_or_default()),
            ProxyBody::Stream { .. } => None,
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

/// Reads the client's body into memory when it fits `replay_limit`, so the request can be
/// replayed; a larger (or larger-announced) body streams instead.
pub async fn prepare(
    exceeded: Arc<AtomicBool>,
    mut body: Incoming,
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
            exceeded,
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
                exceeded,
            });
        }
    }
    let all = first.unwrap_or_else(|| buf.freeze());
    Ok(ProxyBody::Full((!all.is_empty()).then_some(all)))
}
