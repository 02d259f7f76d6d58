//! Certificates for the simulator: a generated CA and leaf (rcgen), PEM loading, the rustls server config.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use super::{SimError, SimTls};

/// A generated certificate chain. `Debug` does not show the private key.
#[derive(Clone)]
pub struct GeneratedCert {
    /// The leaf followed by the CA certificate: what the server presents.
    pub cert_pem: String,
    /// The leaf's private key (PKCS#8).
    pub key_pem: String,
    /// The CA certificate alone: what a client must trust.
    pub ca_pem: String,
}

impl std::fmt::Debug for GeneratedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

/// Creates a fresh CA and a leaf certificate for `names` (DNS names or IP addresses) signed by
/// it, both valid from `not_before` to `not_after`. Tests use odd validity periods or names to
/// make expired or wrong-name certificates and serve them with [`SimTls::Files`].
pub fn generate_cert(
    names: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<GeneratedCert, SimError> {
    let tls_err = |e: rcgen::Error| SimError::Tls(format!("certificate generation: {e}"));

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meetgate simulator CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(tls_err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls_err)?;

    let mut leaf_params = CertificateParams::new(names.to_vec()).map_err(tls_err)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "meetgate simulator");
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.use_authority_key_identifier_extension = true;
    leaf_params.not_before = not_before;
    leaf_params.not_after = not_after;
    let leaf_key = KeyPair::generate().map_err(tls_err)?;
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .map_err(tls_err)?;

    let ca_pem = ca_cert.pem();
    Ok(GeneratedCert {
        cert_pem: format!("{}{}", leaf_cert.pem(), ca_pem),
        key_pem: leaf_key.serialize_pem(),
        ca_pem,
    })
}

/// [`generate_cert`] valid from a day ago for ten years.
pub fn generate_default_cert(names: &[String]) -> Result<GeneratedCert, SimError> {
    let now = OffsetDateTime::now_utc();
    generate_cert(
        names,
        now - time::Duration::days(1),
        now + time::Duration::days(3650),
    )
}

/// The server config and the PEM a client must trust.
pub(crate) fn server_config(tls: &SimTls) -> Result<(Arc<rustls::ServerConfig>, String), SimError> {
    let (cert_pem, key_pem, trust_pem) = match tls {
        SimTls::Generated { names } => {
            if names.is_empty() {
                return Err(SimError::Config(
                    "tls.names must name at least one host".to_owned(),
                ));
            }
            let g = generate_default_cert(names)?;
            (g.cert_pem, g.key_pem, g.ca_pem)
        }
        SimTls::Files {
            cert_file,
            key_file,
        } => {
            let cert = read_pem(cert_file)?;
            let key = read_pem(key_file)?;
            // The served chain is what a client of a file-based setup has to trust (or its root).
            (cert.clone(), key, cert)
        }
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SimError::Tls(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(SimError::Tls("no certificate in the PEM".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| SimError::Tls(format!("private key PEM: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SimError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| SimError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), trust_pem))
}

fn read_pem(path: &Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_chain_loads_and_debug_hides_the_key() {
        let g = generate_default_cert(&["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        assert_eq!(g.cert_pem.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(g.cert_pem.ends_with(&g.ca_pem));
        assert!(!format!("{g:?}").contains("PRIVATE KEY"));

        let dir = tempfile::tempdir().unwrap();
        let cert_file = dir.path().join("cert.pem");
        let key_file = dir.path().join("key.pem");
        std::fs::write(&cert_file, &g.cert_pem).unwrap();
        std::fs::write(&key_file, &g.key_pem).unwrap();
        let (cfg, trust) = server_config(&SimTls::Files {
            cert_file,
            key_file,
        })
        .unwrap();
        assert_eq!(trust, g.cert_pem);
        assert_eq!(cfg.alpn_protocols.len(), 2);
    }

    #[test]
    fn missing_files_and_empty_names_are_errors() {
        assert!(matches!(
            server_config(&SimTls::Files {
                cert_file: "/nonexistent/c.pem".into(),
                key_file: "/nonexistent/k.pem".into(),
            }),
            Err(SimError::Io { .. })
        ));
        assert!(matches!(
            server_config(&SimTls::Generated { names: vec![] }),
            Err(SimError::Config(_))
        ));
    }
}
