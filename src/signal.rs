//! Shutdown signals.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM (systemd, kill) and SIGINT (Ctrl-C), caught from the moment [`Signals::install`]
/// runs: created first thing, so that a signal during start-up is a clean shutdown rather than
/// the default action (exit without a word).
pub struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime). If that fails, logs it; the proxy then
    /// cannot shut down gracefully, and [`Signals::recv`] never resolves.
    pub fn install() -> Self {
        let (term, int) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        if let (Err(error), _) | (_, Err(error)) = (&term, &int) {
            tracing::error!(%error, "cannot install signal handlers; the proxy will not shut down gracefully");
        }
        Signals {
            term: term.ok(),
            int: int.ok(),
        }
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        let (Some(term), Some(int)) = (&mut self.term, &mut self.int) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
