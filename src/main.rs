//! The nodedns binary: flags → config → listeners → signals → shutdown.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use clap::error::ErrorKind;

use nodedns::cache::Cache;
use nodedns::config::{Cli, Config, LogFormat};
use nodedns::handler::Handler;
use nodedns::server::{Ctx, Listeners, NoRecorder};
use nodedns::upstream::{NoObserver, Upstreams};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One clear line, not clap's usage block.
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("nodedns: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logging(&cli.log_level, cli.log_format);
    let config = match cli.into_config(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodedns: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.server.workers.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodedns: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodedns: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let upstreams = Upstreams::new(&config.zones, config.upstream, Arc::new(NoObserver))
        .map_err(anyhow::Error::msg)?;
    for z in &config.zones {
        tracing::info!(zone = %z.zone, servers = ?z.servers, "forwarding");
    }
    let handler = Handler::new(Cache::new(config.limits), config.policy);
    let ctx = Arc::new(Ctx::new(
        handler,
        upstreams,
        Arc::new(NoRecorder),
        config.server.max_concurrent,
    ));
    let listeners = Listeners::start(ctx, &config.server)?;
    tracing::info!(listen = ?listeners.bound, "serving DNS");
    wait_for_signal().await;
    tracing::info!("shutting down");
    listeners.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
