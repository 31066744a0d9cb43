//! The `supersynk` binary: settings, logging, signals. Everything else is in the library.
//!
//! Errors are printed as one plain line (`supersynk: ...`, never a backtrace, whatever
//! `RUST_BACKTRACE` says). Exit codes: 0 after a clean stop (or a valid `--check-config`),
//! 2 for a configuration error (as clap's own for a bad flag), 1 when the server cannot
//! start or run.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use supersynk::Server;
use supersynk::config::{Config, LogFormat};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("supersynk: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if config.check_config {
        return check(&config);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("supersynk: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}`: the whole chain of causes on one line, no backtrace.
            eprintln!("supersynk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-config`: the settings were read and checked by [`Config::load`]; what is left
/// to check without starting is the TLS files. Like `nginx -t`.
fn check(config: &Config) -> ExitCode {
    if let Some((cert, key)) = &config.tls
        && let Err(e) = supersynk::server::tls_acceptor(cert, key)
    {
        eprintln!("supersynk: configuration error: --tls-cert/--tls-key: {e}");
        return ExitCode::from(2);
    }
    println!(
        "supersynk: configuration ok: listens on {}:{}{}, store: {}, {}",
        config.bind,
        config.port,
        if config.tls.is_some() { " (TLS)" } else { "" },
        config.store.describe(),
        match &config.cluster {
            Some(_) => "cluster node (Redis)",
            None => "single node",
        }
    );
    ExitCode::SUCCESS
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Both were checked by `Config::load`.
    let filter = EnvFilter::try_new(&config.log).context("invalid --log")?;
    // The server's own events also go to the log stream (user "server"), at their own level.
    let forward_level: LevelFilter = config
        .logs
        .server_level
        .parse()
        .context("invalid --logs-server-level")?;
    let forward = supersynk::logs::forward::forward_layer().with_filter(forward_level);
    let registry = tracing_subscriber::registry().with(forward);
    match config.log_format {
        LogFormat::Text => {
            // Colours for a terminal only: a file or a pipe gets plain text (and NO_COLOR
            // turns them off on a terminal too).
            let ansi = std::io::stdout().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            registry
                .with(fmt::layer().with_ansi(ansi).with_filter(filter))
                .init()
        }
        LogFormat::Json => registry
            .with(fmt::layer().json().with_filter(filter))
            .init(),
    }
    // The handlers are in place before the server says it is listening: a SIGTERM that
    // comes at once is a graceful shutdown, not the default kill.
    let signals = Signals::install().context("cannot install signal handlers")?;
    let server = Server::start(config.clone())
        .await
        .with_context(|| format!("cannot start on {}:{}", config.bind, config.port))?;
    let shutdown = server.app.shutdown.clone();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("signal received: shutting down");
        shutdown.cancel();
    });
    server.wait().await;
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), registered as soon as this is made.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
