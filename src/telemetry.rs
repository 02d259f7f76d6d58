//! Logging setup and the log sink: text or JSON lines on stdout, filtered by the configured
//! level, written in batches by a background thread.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::trace::{self, TraceGuard, TracingConfig};

use serde::Serialize;

/// `[log]`: how lines are written and which are kept.
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `"info"` or `"info,meetgate::access=warn"`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// How long the writer waits after the first pending line before writing, so that one wake-up
/// and one `write(2)` serve every line of the window rather than one each. Lines therefore
/// reach stdout at most this late (plus the write itself).
const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// Pending bytes beyond which the writer skips the batching window.
const FLUSH_AT: usize = 256 * 1024;
/// Pending bytes beyond which loggers wait for the writer: lines are never dropped, and
/// memory stays bounded when stdout is slow.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// A batch buffer that grew past this is given back after use.
const KEEP_CAPACITY: usize = 1024 * 1024;

/// The installed sink, for the access log's own fast path (the `accesslog` module).
static SINK: OnceLock<Sink> = OnceLock::new();

/// Installs the global subscriber and the batching sink, and with `tracing` the OpenTelemetry
/// layer that exports the request path's spans. Fails if a subscriber is already installed,
/// the level is invalid or the exporter cannot be built. Keep the returned guard until exit:
/// dropping it sends the spans still queued, writes what is pending and stops the writer.
pub fn init(log: &LogConfig, tracing: Option<&TracingConfig>) -> Result<LogGuard, String> {
    // The request path's spans are the exporter's alone: the log never formats them.
    let filter = EnvFilter::builder()
        .parse(&log.level)
        .map_err(|e| format!("log.level = {:?}: {e}", log.level))?
        .add_directive(
            format!("{}=off", trace::TARGET)
                .parse()
                .map_err(|e| format!("{e}"))?,
        );
    let (sink, mut guard) = Sink::start(std::io::stdout(), log.format == LogFormat::Json)
        .map_err(|e| format!("cannot start the log writer: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(sink.clone());
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![match log.format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    }];
    if let Some(cfg) = tracing {
        let (otel, trace_guard) = trace::layer::<Registry>(cfg)?;
        layers.push(
            otel.with_filter(Targets::new().with_target(trace::TARGET, Level::INFO))
                .boxed(),
        );
        guard.trace = Some(trace_guard);
    }
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| e.to_string())?;
    // Only the process-wide subscriber's sink takes the access log's fast path.
    let _ = SINK.set(sink);
    Ok(guard)
}

/// The sink the access log writes to directly, when [`init`] installed one.
pub fn sink() -> Option<&'static Sink> {
    SINK.get()
}

/// Lines waiting for the writer thread. Each `write` appends whole under the lock, so lines
/// never interleave; the writer swaps the buffer out and writes it with one call.
#[derive(Clone)]
pub struct Sink {
    shared: Arc<Shared>,
    json: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when lines arrive for an idle writer, or on close.
    wake_writer: Condvar,
    /// Signalled when the writer took the pending lines.
    drained: Condvar,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer waits for lines: the next logger must wake it (and only that one, so that
    /// a busy process pays one wake-up per batch rather than one per line).
    writer_idle: bool,
    /// Loggers waiting for room.
    blocked: usize,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A logger that panicked mid-append left at worst a partial line; keep logging.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Stops the writer after it wrote everything pending.
pub struct LogGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// Dropped first: the exporter's last batch, and what it logs, before the writer stops.
    trace: Option<TraceGuard>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        drop(self.trace.take());
        self.shared.lock().closing = true;
        self.shared.wake_writer.notify_one();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Sink {
    /// Starts the writer thread over `out`; `json` selects the access log's line format.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        json: bool,
    ) -> std::io::Result<(Sink, LogGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake_writer: Condvar::new(),
            drained: Condvar::new(),
        });
        let for_writer = shared.clone();
        let writer = std::thread::Builder::new()
            .name("meetgate-log".into())
            .spawn(move || write_loop(&for_writer, out))?;
        Ok((
            Sink {
                shared: shared.clone(),
                json,
            },
            LogGuard {
                trace: None,
                shared,
                writer: Some(writer),
            },
        ))
    }

    /// Whether access-log lines are JSON.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Queues whole lines for the writer, waiting only while too much is pending.
    pub fn append(&self, lines: &[u8]) {
        let mut state = self.shared.lock();
        while state.pending.len() >= MAX_PENDING && !state.closing {
            state.blocked += 1;
            state = self
                .shared
                .drained
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.blocked -= 1;
        }
        state.pending.extend_from_slice(lines);
        if state.writer_idle {
            state.writer_idle = false;
            drop(state);
            self.shared.wake_writer.notify_one();
        }
    }
}

fn write_loop(shared: &Shared, mut out: impl Write) {
    let mut batch: Vec<u8> = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() {
            if state.closing {
                let _ = out.flush();
                return;
            }
            state.writer_idle = true;
            state = shared
                .wake_writer
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.writer_idle = false;
        if !state.closing && state.pending.len() < FLUSH_AT {
            drop(state);
            std::thread::sleep(BATCH_WINDOW);
            state = shared.lock();
        }
        std::mem::swap(&mut state.pending, &mut batch);
        let wake_blocked = state.blocked > 0;
        drop(state);
        if wake_blocked {
            shared.drained.notify_all();
        }
        // Nowhere to report a failed write (stdout closed): the lines are dropped, the
        // gateway keeps serving.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
    }
}

/// What tracing's formatter writes to: one `write` per event, appended whole.
pub struct SinkWriter<'a>(&'a Sink);

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter<'a>;

    fn make_writer(&'a self) -> SinkWriter<'a> {
        SinkWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what the writer wrote.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<Vec<u8>>>);

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_whole_and_in_order_by_the_time_the_guard_drops() {
        let out = Out::default();
        let (sink, guard) = Sink::start(out.clone(), false).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        sink.append(format!("thread={t} line={i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread={t} ")))
                .collect();
            let expected: Vec<String> = (0..5000).map(|i| format!("thread={t} line={i}")).collect();
            assert_eq!(mine, expected);
        }
    }

    /// Stdout that accepts nothing until released.
    struct Stuck {
        released: Arc<(Mutex<bool>, Condvar)>,
        out: Out,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, cv) = &*self.released;
            let mut released = lock.lock().unwrap();
            while !*released {
                released = cv.wait(released).unwrap();
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_stdout_makes_loggers_wait_and_loses_nothing() {
        let released = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Out::default();
        let (sink, guard) = Sink::start(
            Stuck {
                released: released.clone(),
                out: out.clone(),
            },
            false,
        )
        .unwrap();
        let line = vec![b'x'; 1023];
        let lines = 3 * MAX_PENDING / 1024;
        let logger = {
            let sink = sink.clone();
            let mut line = line.clone();
            line.push(b'\n');
            std::thread::spawn(move || {
                for _ in 0..lines {
                    sink.append(&line);
                }
            })
        };
        // The logger fills the pending buffer, then waits for room.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.shared.lock().blocked == 0 {
            assert!(std::time::Instant::now() < deadline, "logger never blocked");
            std::thread::yield_now();
        }
        assert!(sink.shared.lock().pending.len() <= MAX_PENDING + line.len() + 1);
        *released.0.lock().unwrap() = true;
        released.1.notify_all();
        logger.join().unwrap();
        drop(guard);
        assert_eq!(out.0.lock().unwrap().len(), lines * 1024);
    }

    #[test]
    fn lines_arrive_without_the_guard_dropping() {
        let out = Out::default();
        let (sink, _guard) = Sink::start(out.clone(), false).unwrap();
        sink.append(b"one\n");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().as_slice() != b"one\n" {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::yield_now();
        }
        sink.append(b"two\n");
        while out.0.lock().unwrap().as_slice() != b"one\ntwo\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "second line never written"
            );
            std::thread::yield_now();
        }
    }
}
