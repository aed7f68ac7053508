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
    /// Installs the handlers (inside a tokio runtime). One that cannot be installed is
    /// logged, and that signal keeps its default action.
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

    /// Resolves on the next SIGTERM or SIGINT (of those whose handler was installed).
    pub async fn recv(&mut self) {
        async fn next(signal: &mut Option<Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = next(&mut self.term) => tracing::info!("SIGTERM received"),
            () = next(&mut self.int) => tracing::info!("SIGINT received"),
        }
    }
}
