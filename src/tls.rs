//! TLS on the proxy listener: `[tls]` (certificate, key, handshake timeout) and the rustls
//! acceptor built from it (ALPN h2 and http/1.1).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::secret::print;

/// `[tls]`: the proxy listener's certificate (the SDKs sign in only over HTTPS).
#[derive(Clone, Serialize)]
pub struct TlsConfig {
    #[serde(serialize_with = "print::path")]
    pub cert_file: std::path::PathBuf,
    #[serde(serialize_with = "print::path")]
    pub key_file: std::path::PathBuf,
    #[serde(skip)]
    pub certs: Vec<rustls_pki_types::CertificateDer<'static>>,
    #[serde(skip)]
    pub key: Arc<rustls_pki_types::PrivateKeyDer<'static>>,
    #[serde(serialize_with = "print::duration")]
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("key", &crate::secret::REDACTED)
            .finish()
    }
}

/// TLS on the proxy listener.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub handshake_timeout: Duration,
}

impl Tls {
    /// rustls (ring) with ALPN h2 and http/1.1, and session tickets.
    pub fn new(cfg: &TlsConfig) -> Result<Tls, rustls::Error> {
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(cfg.certs.clone(), cfg.key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Stateless resumption: a returning client's session comes back in its ticket
        // (encrypted with a key rotated every 6 hours), so a central gateway's clients resume
        // however many there are, where rustls' default stateful cache keeps only 256.
        server.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            handshake_timeout: cfg.handshake_timeout,
        })
    }
}
