//! `meetgate simulate`: the simulator's command-line arguments and its run-until-shutdown loop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{start, SimApp, SimConfig, SimError, SimTls};

/// Arguments of `meetgate simulate`. Flags override the config file.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SimulateArgs {
    /// TOML file with the simulator configuration (same fields as `SimConfig`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:0, a free port).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain to serve instead of a generated one.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// An app whose sign-in succeeds: APP_ID:KEY_ENV_VAR, or APP_ID:KEY_ENV_VAR:SP_ID for an SP
    /// (multi-tenant) app. The key is read from the environment variable. Repeatable.
    #[arg(long = "app", value_name = "APP_ID:KEY_ENV_VAR")]
    pub apps: Vec<String>,
    /// Lifetime of issued access tokens, e.g. "12h" or "30s".
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub token_lifetime: Option<Duration>,
    /// Lifetime of meeting-control tokens, e.g. "30m" or "5s".
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub conf_token_lifetime: Option<Duration>,
    /// Write the PEM that clients must trust to this file.
    #[arg(long, value_name = "FILE")]
    pub write_ca: Option<PathBuf>,
}

/// Starts the simulator, prints its URL and where the CA PEM is, and runs until `shutdown`.
pub async fn run_cli(
    args: SimulateArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SimError> {
    let config = build_config(&args, |name| std::env::var(name).ok())?;
    let tls = config.tls.clone();
    let handle = start(config).await?;
    let ca_path = match (&args.write_ca, &tls) {
        (Some(path), _) => {
            write_ca(path, handle.ca_pem()).await?;
            path.clone()
        }
        (None, SimTls::Files { cert_file, .. }) => cert_file.clone(),
        (None, SimTls::Generated { .. }) => {
            let path = std::env::temp_dir().join(format!(
                "meetgate-simulator-{}-ca.pem",
                handle.addr().port()
            ));
            write_ca(&path, handle.ca_pem()).await?;
            path
        }
    };
    println!(
        "meetgate simulator listening on {} (CA certificate: {})",
        handle.url(),
        ca_path.display()
    );
    shutdown.await;
    handle.shutdown().await;
    Ok(())
}

async fn write_ca(path: &Path, pem: &str) -> Result<(), SimError> {
    tokio::fs::write(path, pem)
        .await
        .map_err(|source| SimError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The effective configuration; `env` looks up environment variables (a parameter so tests
/// need not touch the process environment).
fn build_config(
    args: &SimulateArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<SimConfig, SimError> {
    let mut config = match &args.config {
        Some(path) => config::Config::builder()
            .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize::<SimConfig>())
            .map_err(|e| SimError::Config(format!("{}: {e}", path.display())))?,
        None => SimConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let (Some(cert_file), Some(key_file)) = (&args.cert, &args.key) {
        config.tls = SimTls::Files {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        };
    }
    if let Some(d) = args.token_lifetime {
        config.token_lifetime = d;
    }
    if let Some(d) = args.conf_token_lifetime {
        config.conf_token_lifetime = d;
    }
    for spec in &args.apps {
        config.apps.push(parse_app(spec, &env)?);
    }
    Ok(config)
}

fn parse_app(spec: &str, env: &impl Fn(&str) -> Option<String>) -> Result<SimApp, SimError> {
    let mut parts = spec.splitn(3, ':');
    let (Some(app_id), Some(var)) = (parts.next(), parts.next()) else {
        return Err(SimError::Config(format!(
            "--app {spec:?}: expected APP_ID:KEY_ENV_VAR[:SP_ID]"
        )));
    };
    if app_id.is_empty() || var.is_empty() {
        return Err(SimError::Config(format!(
            "--app {spec:?}: expected APP_ID:KEY_ENV_VAR[:SP_ID]"
        )));
    }
    let Some(key) = env(var).filter(|k| !k.is_empty()) else {
        return Err(SimError::Config(format!(
            "--app {app_id}: environment variable {var} is not set"
        )));
    };
    Ok(match parts.next() {
        Some(sp) => SimApp::sp(app_id, key, sp),
        None => SimApp::new(app_id, key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use secrecy::ExposeSecret;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn env(name: &str) -> Option<String> {
        (name == "SIM_KEY").then(|| "k3y".to_owned())
    }

    #[test]
    fn flags_build_the_config() {
        let cli = Cli::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:9443",
            "--app",
            "app1:SIM_KEY",
            "--app",
            "app2:SIM_KEY:sp9",
            "--token-lifetime",
            "30s",
        ])
        .unwrap();
        let c = build_config(&cli.args, env).unwrap();
        assert_eq!(c.listen.port(), 9443);
        assert_eq!(c.token_lifetime, Duration::from_secs(30));
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.apps[0].app_key.expose_secret(), "k3y");
        assert_eq!(c.apps[1].corp_id.as_deref(), Some("sp9"));
        assert!(Cli::try_parse_from(["x", "--cert", "c.pem"]).is_err());
    }

    #[test]
    fn missing_key_variable_and_bad_file_are_config_errors() {
        let args = SimulateArgs {
            apps: vec!["app1:NOPE".to_owned()],
            ..SimulateArgs::default()
        };
        assert!(matches!(build_config(&args, env), Err(SimError::Config(_))));
        let args = SimulateArgs {
            apps: vec!["app1".to_owned()],
            ..SimulateArgs::default()
        };
        assert!(matches!(build_config(&args, env), Err(SimError::Config(_))));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sim.toml");
        std::fs::write(&file, "bogus = 1\n").unwrap();
        let args = SimulateArgs {
            config: Some(file.clone()),
            ..SimulateArgs::default()
        };
        assert!(matches!(build_config(&args, env), Err(SimError::Config(_))));
        std::fs::write(&file, "token_lifetime = \"5s\"\n").unwrap();
        let c = build_config(&args, env).unwrap();
        assert_eq!(c.token_lifetime, Duration::from_secs(5));
    }

    #[tokio::test]
    async fn run_cli_writes_the_ca_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let args = SimulateArgs {
            write_ca: Some(ca.clone()),
            ..SimulateArgs::default()
        };
        run_cli(args, async {}).await.unwrap();
        let pem = std::fs::read_to_string(ca).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
    }
}
