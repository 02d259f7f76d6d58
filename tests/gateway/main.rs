//! Integration tests: the gateway in-process against the embedded simulator over real TLS on
//! ephemeral loopback ports.

mod access;
mod cli;
mod cluster;
mod connections;
mod control;
mod deploy;
mod docs;
mod fair;
mod forwarding;
mod hardening;
mod logs;
mod netfault;
mod observe;
mod operate;
mod quota;
mod secrets;
mod shape;
mod soak;
mod support;
mod tokens;
mod trace;
