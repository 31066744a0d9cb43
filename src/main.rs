//! The `supersynk` binary: settings, logging, signals. Everything else is in the library.

use anyhow::Context;
use supersynk::Server;
use supersynk::config::{Config, LogFormat};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load()?;
    let filter = EnvFilter::try_new(&config.log).context("invalid --log filter")?;
    // The server's own events also go to the log stream (user "server"), at their own level.
    let forward_level: LevelFilter = config
        .logs
        .server_level
        .parse()
        .context("invalid --logs-server-level")?;
    let forward = supersynk::logs::forward::forward_layer().with_filter(forward_level);
    let registry = tracing_subscriber::registry().with(forward);
    match config.log_format {
        LogFormat::Text => registry.with(fmt::layer().with_filter(filter)).init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_filter(filter))
            .init(),
    }
    // The handlers are in place before the server says it is listening: a SIGTERM that
    // comes at once is a graceful shutdown, not the default kill.
    let signals = Signals::install().context("cannot install signal handlers")?;
    let server = Server::start(config.clone())
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.bind, config.port))?;
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
