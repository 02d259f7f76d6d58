//! How secrets print: never. Where a key comes from, the redaction marker, and the serde helpers
//! every settings type uses to print itself (durations, paths, URIs, redacted values).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// The redaction marker used wherever a secret would be shown.
pub const REDACTED: &str = "[redacted]";

/// Where a key was read from; printed as the key that names its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
    Inline,
}

/// Flattened into its owner: `app_key_env = "VAR"`, `app_key_file = "/path"`, or nothing for an
/// inline key (which prints only as `app_key = "[redacted]"`).
impl Serialize for KeySource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self {
            KeySource::Env(var) => map.serialize_entry("app_key_env", var)?,
            KeySource::File(path) => {
                map.serialize_entry("app_key_file", &path.display().to_string())?
            }
            KeySource::Inline => {}
        }
        map.end()
    }
}

/// `redis://user:password@host/0` -> `redis://[redacted]@host/0`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://{REDACTED}{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Serde helpers for `#[serde(serialize_with = ...)]` on settings types.
pub mod print {
    use super::*;

    /// Any secret: the marker, never the value.
    pub fn redacted<T, S: Serializer>(_: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }

    /// A present secret as the marker (use with `skip_serializing_if = "Option::is_none"`).
    pub fn redacted_some<T, S: Serializer>(
        _: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }

    /// A URL whose user-info may hold a password.
    pub fn redacted_url<S: Serializer>(
        url: &secrecy::SecretString,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        use secrecy::ExposeSecret;
        serializer.serialize_str(&redact_url(url.expose_secret()))
    }

    /// `"1m 30s"`, as the config accepts it.
    pub fn duration<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*d))
    }

    /// A path as text, even when it is not valid UTF-8.
    pub fn path<S: Serializer>(p: &Path, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&p.display())
    }

    pub fn opt_path<S: Serializer>(p: &Option<PathBuf>, serializer: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => path(p, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// `https://host[:port]`, without the trailing slash the parsed form carries.
    pub fn uri<S: Serializer>(uri: &http::Uri, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(uri.to_string().trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_user_info() {
        assert_eq!(
            redact_url("redis://user:hunter2@127.0.0.1:6379/0"),
            "redis://[redacted]@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://127.0.0.1"), "redis://127.0.0.1");
    }
}
