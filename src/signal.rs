//! Shutdown signals.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on SIGTERM (systemd, kill) or SIGINT (Ctrl-C).
pub async fn shutdown_requested() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; the proxy will not shut down gracefully");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
