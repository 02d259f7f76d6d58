//! The `meetgate` command line: parses arguments and wires the library together.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use meetgate::config;
use meetgate::reload::ConfigSource;
use meetgate::telemetry::{LogConfig, LogFormat};
use meetgate::{server, simulator, telemetry};

/// EX_USAGE from sysexits.h: the configuration or the command line is wrong.
const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    version,
    about = "Authenticating gateway for the Huawei Cloud Meeting REST API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print it with secrets redacted.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the gateway against the embedded simulator, both in this process.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run the Meeting API simulator alone.
    Simulate(simulator::SimulateArgs),
}

/// The first SIGTERM or Ctrl-C starts a graceful shutdown; a second one exits at once.
async fn shutdown() {
    server::shutdown_signal().await;
    tokio::spawn(async {
        server::shutdown_signal().await;
        eprintln!("meetgate: second signal, exiting without draining");
        std::process::exit(130);
    });
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match &cli.command {
        Command::Run { config: path } | Command::CheckConfig { config: path } => {
            match config::load(path, &env) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("meetgate: invalid configuration {}:", path.display());
                    for problem in e.problems() {
                        eprintln!("  {problem}");
                    }
                    return ExitCode::from(EX_USAGE);
                }
            }
        }
        _ => None,
    };
    if let (Command::CheckConfig { .. }, Some(c)) = (&cli.command, &config) {
        for warning in &c.warnings {
            eprintln!("warning: {warning}");
        }
        print!("{}", c.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let log = config.as_ref().map_or_else(
        || LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        },
        |c| c.log.clone(),
    );
    let tracing = config.as_ref().and_then(|c| c.tracing.clone());
    let _log_guard = match telemetry::init(&log, tracing.as_ref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("meetgate: logging: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // `run` serves requests on its own worker threads (see `workers`); this runtime only
    // accepts, answers the admin port and keeps tokens fresh. The simulator has no workers of
    // its own, so it gets a multi-threaded one.
    let mut builder = match cli.command {
        Command::Simulate(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meetgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async move {
        match (cli.command, config) {
            (Command::Run { config: path }, Some(config)) => {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .map_err(|e| format!("cannot listen on {} (listen): {e}", config.listen))?;
                let source = ConfigSource {
                    path,
                    env: Arc::new(|| std::env::vars().collect()),
                };
                meetgate::run(Arc::new(config), listener, Some(source), shutdown())
                    .await
                    .map_err(|e| e.to_string())
            }
            (Command::Demo { listen }, _) => meetgate::demo::run(listen, shutdown())
                .await
                .map_err(|e| e.to_string()),
            (Command::Simulate(args), _) => simulator::run_cli(args, shutdown())
                .await
                .map_err(|e| e.to_string()),
            _ => Err("unreachable command".into()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meetgate: {e}");
            ExitCode::FAILURE
        }
    }
}
