//! Logging setup: text or JSON lines on stdout, filtered by the configured level.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Fails if one is already installed or the level is invalid.
/// Lines are written by a background thread, so a request never waits on a `write(2)`; the
/// returned guard flushes them when dropped (keep it until exit). The writer blocks rather
/// than drop lines when its buffer is full: an access log that loses lines is worse than a
/// slower one.
pub fn init(log: &LogConfig) -> Result<WorkerGuard, String> {
    let filter = EnvFilter::builder()
        .parse(&log.level)
        .map_err(|e| format!("log.level = {:?}: {e}", log.level))?;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("meetgate-log")
        .finish(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(writer);
    let result = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map(|()| guard).map_err(|e| e.to_string())
}
