//! `[limits]`: what one client, connection or request may take of the gateway (bodies, headers,
//! connections, concurrent requests). The listener, the body reader and the request path read it.

use std::time::Duration;

use serde::Serialize;

use crate::secret::print;

/// `[limits]`: what one client, connection or request may take of the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsConfig {
    /// Request bodies up to this size are buffered so a request can be replayed.
    pub replay_body_bytes: usize,
    /// Larger request bodies get 413.
    pub max_body_bytes: usize,
    /// Longest wait for a request's headers, and so for an idle keep-alive connection.
    #[serde(serialize_with = "print::duration")]
    pub header_read_timeout: Duration,
    /// Most bytes of request headers (431 beyond).
    pub max_header_bytes: usize,
    /// Most request header fields (431 beyond).
    pub max_headers: usize,
    /// Most open client connections; more get 503 and are closed.
    pub max_connections: usize,
    /// Most requests handled at once; more get 503 at once.
    pub max_concurrent_requests: usize,
}
