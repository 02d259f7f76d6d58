//! Hot reload: on SIGHUP, and when the config file or a file it names (key files, CA file)
//! changes, load and validate the configuration again and apply it; an invalid one is refused
//! and the one in force stays. Files are compared by content, so Kubernetes' symlink swap of a
//! mounted secret is seen like any other change.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::{self, Config};
use crate::proxy::Gateway;
use crate::secret::KeySource;

/// Where the configuration comes from: the file and the environment it is layered with.
#[derive(Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Read at each reload: the process environment in production, a map in tests.
    pub env: Arc<dyn Fn() -> HashMap<String, String> + Send + Sync>,
}

/// The files a configuration depends on.
fn watched_files(source: &ConfigSource, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![source.path.clone()];
    files.extend(config.apps.iter().filter_map(|a| match &a.key_source {
        KeySource::File(p) => Some(p.clone()),
        _ => None,
    }));
    files.extend(config.clients.iter().filter_map(
        |c| match c.sdk.as_ref().map(|s| &s.key_source) {
            Some(KeySource::File(p)) => Some(p.clone()),
            _ => None,
        },
    ));
    files.extend(config.upstream.ca_file.clone());
    if let Some(tls) = &config.tls {
        files.push(tls.cert_file.clone());
        files.push(tls.key_file.clone());
    }
    files
}

/// A digest of the files' contents (following symlinks); a missing file counts as empty.
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        h.update([0]);
        match std::fs::read(f) {
            Ok(bytes) => h.update(&bytes),
            Err(e) => h.update(e.kind().to_string().as_bytes()),
        }
        h.update([0]);
    }
    h.finalize().into()
}

/// Loads the configuration again and applies it; logs what happened either way.
pub fn reload_now(gateway: &Gateway, source: &ConfigSource, why: &str) -> bool {
    match config::load(&source.path, &(source.env)()) {
        Ok(new) => {
            let summary = gateway.reload(new);
            tracing::info!(
                trigger = why,
                apps_changed = ?summary.apps_changed,
                clients_changed = summary.clients_changed,
                quota_changed = summary.quota_changed,
                needs_restart = ?summary.needs_restart,
                "Configuration reloaded"
            );
            true
        }
        Err(e) => {
            tracing::error!(
                trigger = why,
                problems = ?e.problems(),
                "Reload refused; the configuration in force stays"
            );
            false
        }
    }
}

/// Reloads on SIGHUP and on file changes (checked every `config.reload_interval`) until
/// `shutdown` resolves.
pub async fn watch(
    gateway: Arc<Gateway>,
    source: ConfigSource,
    shutdown: impl Future<Output = ()>,
) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut files = watched_files(&source, &gateway.config());
    let mut seen = fingerprint(&files);
    tokio::pin!(shutdown);
    loop {
        let interval = gateway.config().reload_interval;
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let why = tokio::select! {
            () = &mut shutdown => return,
            () = hangup => "SIGHUP",
            () = tokio::time::sleep(interval) => {
                if fingerprint(&files) == seen {
                    continue;
                }
                "file change"
            }
        };
        reload_now(&gateway, &source, why);
        // Whether or not it applied, wait for the next change before trying again.
        files = watched_files(&source, &gateway.config());
        seen = fingerprint(&files);
    }
}
