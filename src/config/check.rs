//! Validation's vocabulary: a [`Problem`] names its key and bad value, the [`Checker`] collects
//! every problem of a file (not only the first), and its helpers parse typed values.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub value: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}: {}", self.key, self.message)
        } else {
            write!(f, "{} = {}: {}", self.key, self.value, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a value had the wrong type.
    #[error("{0}")]
    Load(String),
    /// Every problem validation found, in file order.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Load(msg) => vec![msg.clone()],
            ConfigError::Invalid(p) => p.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The longest duration any setting takes.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Collects problems instead of stopping at the first, each with its key and value.
#[derive(Default)]
pub(super) struct Checker {
    pub(super) problems: Vec<Problem>,
}

impl Checker {
    pub(super) fn problem(
        &mut self,
        key: impl Into<String>,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            value: value.to_string(),
            message: message.into(),
        });
    }

    pub(super) fn duration(&mut self, key: &str, raw: Option<&str>, default: &str) -> Duration {
        let text = raw.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.problem(key, quoted(text), "must be longer than zero");
                Duration::from_secs(1)
            }
            // No setting needs more, and instants a year or more ahead can overflow.
            Ok(d) if d > MAX_DURATION => {
                self.problem(key, quoted(text), "must be at most a year");
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.problem(
                    key,
                    quoted(text),
                    format!("not a duration ({e}); e.g. \"3s\", \"500ms\""),
                );
                Duration::from_secs(1)
            }
        }
    }

    pub(super) fn addr(&mut self, key: &str, raw: Option<&str>, default: &str) -> SocketAddr {
        let text = raw.unwrap_or(default);
        text.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                quoted(text),
                "not an IP address and port, e.g. \"127.0.0.1:8080\"",
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    pub(super) fn fraction(
        &mut self,
        key: &str,
        raw: Option<f64>,
        default: f64,
        lo: f64,
        hi: f64,
    ) -> f64 {
        let v = raw.unwrap_or(default);
        if !(lo..=hi).contains(&v) || v.is_nan() {
            self.problem(key, v, format!("must be between {lo} and {hi}"));
            return default;
        }
        v
    }
}

/// App and client names appear in logs, metrics labels and Redis keys: keep them plain.
pub(super) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
}

pub(super) fn quoted(s: &str) -> String {
    format!("{s:?}")
}
