//! The nodedns binary: parse flags, start logging, run [`nodedns::app::run`] until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::error::ErrorKind;

use nodedns::config::Cli;
use nodedns::logging::init_logging;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("check-config") {
        return check_config(args.split_off(2));
    }
    let cli = match Cli::parse_args(args) {
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
    if let Err(e) = nodedns::config::check_log_level(&cli.log_level) {
        eprintln!("nodedns: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = init_logging(&cli.log_level, cli.log_format) {
        eprintln!("nodedns: {e}");
        return ExitCode::from(2);
    }
    let flags = cli.clone();
    let rebuild: nodedns::reload::Rebuild = Box::new(move || {
        flags
            .clone()
            .into_config(|k| std::env::var(k).ok())
            .map_err(|e| e.to_string())
    });
    let config = match cli.into_config(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodedns: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        // The control runtime: TCP, upstream TCP pools, HTTP, probes, reconcile. UDP runs on its own
        // threads (one per worker), so one thread per CPU here would mostly idle.
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodedns: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The stop signals are caught from here on, before any node setup: a SIGTERM while the link
    // and rules are being set up must still lead to their teardown (a handler installed only
    // when `app::run` first polled it let such a SIGTERM kill the process and leave them).
    let stop = {
        let _in_runtime = rt.enter();
        stop_signal()
    };
    match rt.block_on(nodedns::app::run(config, Some(rebuild), stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors carry their cause in their message already.
            eprintln!("nodedns: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the SIGTERM, SIGINT and SIGQUIT handlers now (inside the runtime) and returns the
/// future that completes at the first of them.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::quit()),
    );
    async move {
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = handlers else {
            // Without signal handlers, run until killed.
            std::future::pending::<()>().await;
            return;
        };
        // QUIT too: its default action would kill nodedns without its teardown, leaving the link
        // and rules on the node.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {}
        }
    }
}

/// `nodedns check-config FILE [FLAGS...]`: reads FILE (a Corefile, the addon's template when it has
/// `__PILLAR__` placeholders, or TOML) with the same environment rules as a start, and prints the
/// effective configuration as TOML; exit 0, or 2 with one `file:line: reason` line.
fn check_config(rest: Vec<String>) -> ExitCode {
    let Some(file) = rest.first().cloned() else {
        eprintln!("nodedns: usage: nodedns check-config FILE [FLAGS...]");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nodedns: {file}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut args = vec!["nodedns".to_string()];
    if text.contains("__PILLAR__") {
        args.extend(["--basecorefile".into(), file.clone()]);
    }
    args.extend(["--conf".into(), file]);
    args.extend(rest.into_iter().skip(1));
    let cli = match Cli::parse_args(args) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid arguments");
            eprintln!("nodedns: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cli.into_config(|k| std::env::var(k).ok()) {
        Ok(c) => {
            print!(
                "{}",
                nodedns::config::toml_file::to_toml(&c.effective_model())
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodedns: {e}");
            ExitCode::from(2)
        }
    }
}
