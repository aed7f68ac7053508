//! The `consul-proxy` binary: parse flags, set up logging, run until a signal, map the outcome
//! to an exit code (0 after a clean shutdown, 1 on a runtime failure, 2 on bad usage).

use std::process::ExitCode;

use consul_proxy::app::{self, Tuning};
use consul_proxy::cli::Args;
use consul_proxy::config::Config;
use consul_proxy::{signal, telemetry};

fn main() -> ExitCode {
    let args = Args::parse_env();
    let config = match Config::from_args(args, &|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("consul-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init(&config.log) {
        eprintln!("consul-proxy: {e}");
        return ExitCode::from(2);
    }
    let runtime = match runtime(config.threads) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("consul-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(app::run(
        config,
        Tuning::default(),
        signal::shutdown_requested(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "consul-proxy stopped");
            eprintln!("consul-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// One thread (the default) or a multi-threaded runtime with `threads` workers.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
