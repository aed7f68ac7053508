//! The `consul-proxy` binary: parse flags, set up logging, run until a signal, map the outcome
//! to an exit code (0 after a clean shutdown, 1 on a runtime failure, 2 on bad usage).

use std::process::ExitCode;

use consul_proxy::app::{self, Tuning};
use consul_proxy::cli::Args;
use consul_proxy::config::Config;
use consul_proxy::workers::Workers;
use consul_proxy::{memcpy_tune, signal, telemetry};

fn main() -> ExitCode {
    // Before anything else (no thread, no socket yet): on AMD CPUs this may re-execute the
    // process once with a glibc tunable set (see memcpy_tune.rs).
    let reexec = memcpy_tune::reexec_if_needed();
    let args = Args::parse_env();
    let config = match Config::from_args(args, &|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "consul-proxy: {e}\n\nUsage: consul-proxy -proxy-id ID | -sidecar-for SERVICE_ID [flags] (see -help)"
            );
            return ExitCode::from(2);
        }
    };
    if let Err(e) = telemetry::init(&config.log) {
        eprintln!("consul-proxy: {e}");
        return ExitCode::from(2);
    }
    match reexec {
        Ok(()) => tracing::debug!(
            reexecuted = std::env::var_os(memcpy_tune::MARKER).is_some(),
            glibc_tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default(),
            "memcpy tuning"
        ),
        Err(error) => tracing::warn!(
            %error,
            "running without raising glibc's rep movsb threshold; bulk transfers may be slower on this CPU"
        ),
    }
    // The control plane runs on this thread; with -threads N > 1, connections run on N
    // worker threads of their own (see workers.rs).
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| {
            let workers = if config.threads > 1 {
                Some(Workers::start(config.threads)?)
            } else {
                None
            };
            Ok((rt, workers))
        });
    let (runtime, workers) = match started {
        Ok(r) => r,
        Err(e) => {
            eprintln!("consul-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let tuning = Tuning {
        workers,
        ..Tuning::default()
    };
    let run = async {
        // First thing on the runtime: a signal during start-up is then a clean shutdown.
        let signals = signal::Signals::install();
        app::run(config, tuning, signals).await
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "consul-proxy stopped");
            eprintln!("consul-proxy: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
