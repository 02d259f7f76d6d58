//! The admin listener: `/healthz` (the process is up), `/readyz` (every app's default identity
//! holds a valid token) and `/metrics` (Prometheus text). Never on the proxy port, never calls
//! the upstream.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::proxy::Gateway;

const JSON: &str = "application/json";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Answers one admin request.
pub fn handle<B>(gateway: &Gateway, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            JSON,
            r#"{"error":"GET only"}"#,
        );
    }
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, JSON, r#"{"status":"ok"}"#),
        "/readyz" => match gateway.readiness() {
            // Degraded (Redis unreachable) still serves, on local fallbacks: ready, and says so.
            Ok(()) => match gateway.degraded() {
                None => respond(StatusCode::OK, JSON, r#"{"ready":true}"#),
                Some(why) => respond(
                    StatusCode::OK,
                    JSON,
                    serde_json::json!({ "ready": true, "degraded": why }).to_string(),
                ),
            },
            Err(reasons) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                JSON,
                serde_json::json!({ "ready": false, "reasons": reasons }).to_string(),
            ),
        },
        "/metrics" => {
            gateway.update_gauges();
            respond(StatusCode::OK, PROMETHEUS_TEXT, gateway.metrics().encode())
        }
        _ => respond(StatusCode::NOT_FOUND, JSON, r#"{"error":"not found"}"#),
    }
}

/// Serves the admin endpoints until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let gw = gateway.clone();
                let service = service_fn(move |req| {
                    let resp = handle(&gw, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        }
    }
}
