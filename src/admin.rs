//! The admin endpoint (`-admin-addr`, plain HTTP, meant for loopback): `/ready`, `/metrics`
//! (Prometheus text) and `/status` (JSON: the live inbound and upstream connections, the agent
//! watches and our leaf). Deliberately tiny: GET only, one request per connection. It is up from the
//! start, before the agent answers, so that `/ready` says 503 and `/status` says why.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::conns::{Registry, Side};
use crate::consul::watch::{Subscriber, WatchHealth};
use crate::metrics::{self, Metrics};
use crate::tls::TlsConfigs;

/// What the admin endpoint reports on.
pub struct AdminState {
    /// Live inbound connections.
    pub inbound: Arc<Registry>,
    /// Live upstream connections.
    pub upstream: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// True between readiness and the start of shutdown.
    pub ready: AtomicBool,
    /// Our service, for `/status`, once the registration is read.
    pub service: OnceLock<String>,
    /// The agent watches' states.
    pub watches: Arc<WatchHealth>,
    /// The TLS configurations in use, once the builder runs (for the leaf's expiry).
    pub tls: OnceLock<Subscriber<TlsConfigs>>,
}

impl AdminState {
    /// Not ready, nothing known yet, no connection.
    pub fn new(metrics: Arc<Metrics>, watches: Arc<WatchHealth>) -> Self {
        AdminState {
            inbound: Registry::new(),
            upstream: Registry::new(),
            metrics,
            ready: AtomicBool::new(false),
            service: OnceLock::new(),
            watches,
            tls: OnceLock::new(),
        }
    }

    /// Our leaf's `notAfter` (Unix seconds), once a leaf is loaded.
    fn leaf_not_after(&self) -> Option<i64> {
        let tls = self.tls.get()?.borrow();
        tls.as_ref().map(|t| t.leaf.not_after_unix())
    }
}

/// Binds the admin listener (an error if the address is taken) and serves until cancelled.
pub async fn spawn(
    addr: SocketAddr,
    state: Arc<AdminState>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => r,
            };
            if let Ok((stream, _)) = accepted {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve(stream, &state).await {
                        tracing::debug!(%error, "admin request failed");
                    }
                });
            }
        }
    });
    Ok(local)
}

async fn serve(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    let read = async {
        while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::other("request timed out"))??;
    let request = String::from_utf8_lossy(&buf[..len]);
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = respond(method, path, state);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn respond(method: &str, path: &str, state: &AdminState) -> (&'static str, &'static str, String) {
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "GET only\n".into());
    }
    match path {
        "/ready" if state.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ready\n".into())
        }
        "/ready" => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".into(),
        ),
        "/metrics" => {
            let mut text = state
                .metrics
                .render(state.inbound.len(), state.upstream.len());
            metrics::render_health(&mut text, &state.watches.snapshot(), state.leaf_not_after());
            ("200 OK", "text/plain; version=0.0.4", text)
        }
        "/status" => ("200 OK", "application/json", status_json(state)),
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

fn status_json(state: &AdminState) -> String {
    let list = |registry: &Registry, peer: &str| -> Vec<serde_json::Value> {
        registry
            .snapshot()
            .iter()
            .map(|c| {
                // `bytes_in` is what came from the peer, `bytes_out` what went to it.
                let (to_b, to_a) = (&c.bytes.a_to_b, &c.bytes.b_to_a);
                let (from_peer, to_peer) = match c.side {
                    Side::Inbound => (to_b, to_a),
                    Side::Upstream => (to_a, to_b),
                };
                serde_json::json!({
                    "id": c.id,
                    peer: c.peer.to_string(),
                    "serial": c.serial,
                    "started_unix": c.started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                    "bytes_in": from_peer.load(Ordering::Relaxed),
                    "bytes_out": to_peer.load(Ordering::Relaxed),
                })
            })
            .collect()
    };
    let watches: serde_json::Map<String, serde_json::Value> = state
        .watches
        .snapshot()
        .into_iter()
        .map(|(name, w)| {
            let v = serde_json::json!({
                "failing": w.failing,
                "failure": w.failure,
                "error": w.error,
                "errors": w.errors,
                "rejected": w.rejected,
                "last_success_unix": w.last_success_unix,
            });
            (name, v)
        })
        .collect();
    serde_json::json!({
        "service": state.service.get(),
        "ready": state.ready.load(Ordering::Relaxed),
        "leaf_not_after_unix": state.leaf_not_after(),
        "watches": watches,
        "inbound": list(&state.inbound, "source"),
        "upstream": list(&state.upstream, "destination"),
    })
    .to_string()
}
