//! systemd readiness: `READY=1` once listeners are bound and certificates loaded, `STOPPING=1`
//! when draining. A no-op when `NOTIFY_SOCKET` is not set.

/// Tells systemd we are ready.
pub fn ready() {
    send(sd_notify::NotifyState::Ready, "READY=1");
}

/// Tells systemd we are stopping.
pub fn stopping() {
    send(sd_notify::NotifyState::Stopping, "STOPPING=1");
}

fn send(state: sd_notify::NotifyState<'_>, what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(&[state]) {
        tracing::warn!(%error, state = what, "cannot notify systemd");
    }
}
