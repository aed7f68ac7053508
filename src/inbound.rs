//! The public (mTLS) side: handshake under a timeout, the caller's identity from its verified
//! certificate, authorization, and only then a dial to the local app and the splice. Every
//! forwarded connection is listed in the registry so that it can be re-checked and closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::UnixTime;
use rustls::server::Acceptor;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::authorizer::Authorizer;
use crate::conns::{NewConn, Registry, Side};
use crate::consul::watch::Subscriber;
use crate::forward::{self, ReadAhead};
use crate::metrics::Metrics;
use crate::net::{self, Stream};
use crate::proxy_config::PublicListener;
use crate::spiffe::TrustDomainPolicy;
use crate::telemetry::LogGate;
use crate::tls::{MESH_ALPN, TlsConfigs, check_validity_periods, peer};

/// What every inbound connection shares.
pub struct InboundContext {
    /// The listener's current settings (local app, timeouts); may change without a rebind.
    pub settings: watch::Receiver<Arc<PublicListener>>,
    /// The current TLS configs.
    pub tls: Subscriber<TlsConfigs>,
    /// The authorization service.
    pub authorizer: Authorizer,
    /// Trust-domain policy for callers.
    pub trust_domain: TrustDomainPolicy,
    /// Live connections.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Inbound connections open right now, handshakes included, shared by every public
    /// listener (a moved listener's draining connections still count).
    pub active: Arc<AtomicUsize>,
    /// New inbound connections per second, shared by every public listener.
    pub rate: Arc<RateLimit>,
    /// Refusals by the two limits above are logged at most this often.
    pub refusals: Arc<Refusals>,
}

/// How often a refusal by a connection limit is logged: the first at once, then one line per
/// interval saying how many were refused meanwhile (the metrics count every one).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The log gates of the inbound limits, shared by every public listener.
#[derive(Debug)]
pub struct Refusals {
    rate: LogGate,
    over_limit: LogGate,
}

impl Default for Refusals {
    fn default() -> Self {
        Refusals {
            rate: LogGate::new(REFUSAL_LOG_INTERVAL),
            over_limit: LogGate::new(REFUSAL_LOG_INTERVAL),
        }
    }
}

/// Handles one accepted connection; `kill` cuts it (shutdown after the drain deadline).
pub async fn serve_conn(stream: Stream, ctx: Arc<InboundContext>, kill: CancellationToken) {
    let settings = ctx.settings.borrow().clone();
    if !ctx
        .rate
        .allow(settings.max_connection_rate, std::time::Instant::now())
    {
        // A flood must not become a flood of log lines: one per interval (the metric counts
        // every refusal).
        if let Some(unlogged) = ctx.refusals.rate.check(std::time::Instant::now()) {
            tracing::warn!(
                rate = settings.max_connection_rate,
                refused_unlogged = unlogged,
                "inbound connection rate limit reached; refusing"
            );
        }
        ctx.metrics.inbound_rate_limited.inc();
        return;
    }
    let Some(_slot) = Slot::take(&ctx.active, settings.max_connections) else {
        if let Some(unlogged) = ctx.refusals.over_limit.check(std::time::Instant::now()) {
            tracing::warn!(
                limit = settings.max_connections,
                refused_unlogged = unlogged,
                "inbound connection limit reached; refusing"
            );
        }
        ctx.metrics.inbound_over_limit.inc();
        return;
    };
    let Some(tls) = ctx.tls.borrow().clone() else {
        tracing::warn!("no TLS configuration yet; closing");
        return;
    };
    let handshake = async {
        // Look at the ClientHello first: consul-proxy peers (offering our ALPN protocol) get
        // the configuration that may resume sessions; everyone else gets the plain one.
        let start = LazyConfigAcceptor::new(Acceptor::default(), ReadAhead::new(stream)).await?;
        let mesh_peer = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == MESH_ALPN));
        let config = if mesh_peer {
            &tls.server_mesh
        } else {
            &tls.server
        };
        start.into_stream(config.clone()).await
    };
    let handshake = tokio::select! {
        _ = kill.cancelled() => return,
        r = timeout(settings.handshake_timeout, handshake) => r,
    };
    let mut tls_stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            // Closed before finishing a handshake: typically a TCP health check.
            tracing::debug!(%error, "peer closed during the TLS handshake");
            return;
        }
        Ok(Err(error)) => {
            tracing::info!(%error, "TLS handshake failed");
            ctx.metrics.inbound_handshake_failed.inc();
            return;
        }
        Err(_) => {
            tracing::info!(timeout = ?settings.handshake_timeout, "TLS handshake timed out");
            ctx.metrics.inbound_handshake_failed.inc();
            return;
        }
    };
    let verified_at = UnixTime::now();
    let resumed = tls_stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed {
        ctx.metrics.inbound_tls_resumed.inc();
    } else {
        ctx.metrics.inbound_tls_full.inc();
    }

    let chain = peer::owned_chain(tls_stream.get_ref().1);
    // A resumed session carries the certificates of the handshake that issued its ticket,
    // verified then against these same roots (a change of roots changes the ticket key);
    // rustls does not look at them again. Check that they are still within their validity
    // periods, so that a certificate that has expired since cannot come back through a ticket.
    if resumed {
        if let Err(error) = check_validity_periods(&chain, verified_at) {
            tracing::info!(%error, "resumed session refused: its certificate is no longer valid");
            ctx.metrics.inbound_handshake_failed.inc();
            return;
        }
    }
    let identity = match chain.first() {
        Some(cert) => peer::identity(cert).and_then(|p| {
            peer::check_trust_domain(&p.id, &tls.bundle, ctx.trust_domain).map(|()| p)
        }),
        None => Err(peer::IdentityError::NoCertificate),
    };
    let peer = match identity {
        Ok(p) => p,
        Err(error) => {
            tracing::info!(%error, "caller identity rejected");
            ctx.metrics.inbound_identity_rejected.inc();
            return;
        }
    };
    tracing::Span::current().record("peer.id", tracing::field::display(&peer.id));

    // Register before deciding: an intention or roots change published from now on reaches
    // this connection through the enforcer, and one published earlier is already in the
    // snapshots read below. (Registering after the decision would leave a window, as long as
    // the agent call and the app dial, in which a change is missed.)
    let registration = ctx.registry.register(NewConn {
        side: Side::Inbound,
        peer: peer.id.clone(),
        serial: peer.serial.clone(),
        chain,
        verified_at,
    });
    let conn = registration.conn().clone();

    // The drain deadline also cuts a connection still waiting for a decision.
    let decision = tokio::select! {
        _ = kill.cancelled() => return,
        d = ctx.authorizer.authorize(&peer) => d,
    };
    if !decision.is_allow() {
        tracing::info!(source = %peer.id, reason = %decision.reason, resumed, "connection denied");
        ctx.metrics.inbound_denied.inc();
        return;
    }
    // The handshake verified the chain against the roots of its time; if they changed since,
    // check it against the current ones (the enforcer may have run before we registered).
    let current = ctx.tls.borrow().as_ref().map(|t| t.bundle.clone());
    if let Err(error) = conn.recheck_if_roots_changed(&tls.bundle, current) {
        tracing::info!(source = %peer.id, %error, "certificate chain no longer trusted");
        if !conn.is_closed() {
            // (else the enforcer closed and counted it already)
            ctx.metrics.inbound_handshake_failed.inc();
        }
        return;
    }
    tracing::debug!(source = %peer.id, reason = %decision.reason, resumed, "connection authorized");

    let dial = timeout(
        settings.local_connect_timeout,
        net::connect_local(&settings.local_app),
    );
    let mut app = tokio::select! {
        biased;
        // Closed by the enforcer while deciding or dialling, or cut by the drain deadline:
        // the app must not get this caller.
        _ = conn.closed() => {
            tracing::info!(reason = conn.close_reason().unwrap_or("closed"), "connection closed by the proxy");
            return;
        }
        _ = kill.cancelled() => return,
        r = dial => match r {
            Ok(Ok(s)) => s,
            Ok(Err(error)) => {
                tracing::warn!(app = %settings.local_app, %error, "cannot reach the local app");
                ctx.metrics.inbound_app_unreachable.inc();
                return;
            }
            Err(_) => {
                tracing::warn!(app = %settings.local_app, timeout = ?settings.local_connect_timeout, "local app dial timed out");
                ctx.metrics.inbound_app_unreachable.inc();
                return;
            }
        },
    };
    ctx.metrics.inbound_authorized.inc();

    let lifetime = settings.max_conn_lifetime.map(jittered);
    let expire = async {
        match lifetime {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let idle = async {
        match settings.idle_timeout {
            Some(d) => idle_for(&conn.bytes, d).await,
            None => std::future::pending().await,
        }
    };
    // Every close the proxy starts while both peers are still connected (denied, untrusted,
    // drain deadline, lifetime, idle), and an error on either side, is passed on as an abort:
    // the select drops the splice with whatever it had read but not yet written, and a FIN
    // would let the app take a stream cut short for a complete one.
    let orderly = tokio::select! {
        // Closes first: a connection closed between the checks above and here must not
        // pass a single byte (a TLS 1.3 client's first data may already be buffered).
        biased;
        _ = kill.cancelled() => {
            tracing::debug!("connection cut by shutdown");
            false
        }
        _ = conn.closed() => {
            tracing::info!(reason = conn.close_reason().unwrap_or("closed"), "connection closed by the proxy");
            false
        }
        _ = expire => {
            tracing::info!(lifetime = ?lifetime, "connection reached its maximum lifetime; closing");
            ctx.metrics.closed_lifetime.inc();
            false
        }
        _ = idle => {
            tracing::info!(idle_timeout = ?settings.idle_timeout, "connection idle too long; closing");
            ctx.metrics.closed_idle.inc();
            false
        }
        r = forward::splice(&mut tls_stream, &mut app, &conn.bytes) => ctx.metrics.inbound_ended.count(forward::ending(r, true)),
    };
    if !orderly {
        app.abort_on_close();
        tls_stream.get_ref().0.get_ref().abort_on_close();
    }
}

/// One place under the listener's connection limit, given back when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    /// Takes a place unless `limit` connections are already open.
    fn take(active: &'a AtomicUsize, limit: Option<usize>) -> Option<Self> {
        let before = active.fetch_add(1, Ordering::AcqRel);
        if limit.is_some_and(|max| before >= max) {
            active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(active))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket for new inbound connections: up to `rate` per second, in bursts of up to
/// `rate`. One short lock per accepted connection, and only when a rate is set.
#[derive(Debug, Default)]
pub struct RateLimit(std::sync::Mutex<Option<Bucket>>);

/// The bucket's state.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    /// Refills for the time since the last call (up to `rate` tokens), then takes one if
    /// there is one.
    fn take(&mut self, rate: usize, now: std::time::Instant) -> bool {
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl RateLimit {
    /// Whether one more connection fits under `rate` per second (`None`: no limit).
    pub fn allow(&self, rate: Option<usize>, now: std::time::Instant) -> bool {
        let Some(rate) = rate else {
            return true;
        };
        // Invariant: nothing panics while holding this lock.
        let mut bucket = self.0.lock().expect("rate limit lock");
        bucket
            .get_or_insert(Bucket {
                tokens: rate as f64,
                last: now,
            })
            .take(rate, now)
    }
}

/// Resolves once no byte moved either way for `timeout` (checked every half timeout, so the
/// close comes after between one and one and a half timeouts of silence).
async fn idle_for(bytes: &forward::Counters, timeout: Duration) {
    let moved = || bytes.a_to_b.load(Ordering::Relaxed) + bytes.b_to_a.load(Ordering::Relaxed);
    let step = timeout / 2;
    let mut last = moved();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = moved();
        if now == last {
            quiet += step;
            if quiet >= timeout {
                return;
            }
        } else {
            quiet = Duration::ZERO;
            last = now;
        }
    }
}

/// A lifetime shortened by a random 0-10%, so that a pool opened at once does not reconnect at
/// once.
pub fn jittered(lifetime: Duration) -> Duration {
    lifetime.mul_f64(1.0 - 0.1 * rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_limit_and_come_back() {
        let active = AtomicUsize::new(0);
        let a = Slot::take(&active, Some(2)).unwrap();
        let _b = Slot::take(&active, Some(2)).unwrap();
        assert!(Slot::take(&active, Some(2)).is_none());
        assert_eq!(
            active.load(Ordering::Relaxed),
            2,
            "a refused take gives its place back"
        );
        drop(a);
        assert!(Slot::take(&active, Some(2)).is_some());
        assert!(Slot::take(&active, None).is_some(), "no limit");
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let limit = RateLimit::default();
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // A burst of 4 at once, then nothing until tokens come back at 4 per second.
        assert!((0..4).all(|_| limit.allow(Some(4), at(0))));
        assert!(!limit.allow(Some(4), at(0)));
        assert!(!limit.allow(Some(4), at(200)), "0.8 of a token");
        assert!(limit.allow(Some(4), at(250)));
        assert!(!limit.allow(Some(4), at(250)));
        // A long pause refills to the burst size, not beyond.
        assert_eq!(
            (0..10).filter(|_| limit.allow(Some(4), at(60_000))).count(),
            4
        );
        // No limit.
        assert!((0..1000).all(|_| limit.allow(None, at(60_000))));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_means_no_byte_either_way_for_the_whole_timeout() {
        let bytes = forward::Counters::default();
        let timeout = Duration::from_secs(10);
        let start = tokio::time::Instant::now();
        let traffic = async {
            // Activity every 7 s for 21 s keeps it alive.
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(7)).await;
                bytes.b_to_a.fetch_add(1, Ordering::Relaxed);
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = idle_for(&bytes, timeout) => {}
            _ = traffic => unreachable!(),
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(21) + timeout,
            "closed after {waited:?}"
        );
        assert!(
            waited <= Duration::from_secs(21) + timeout + timeout / 2,
            "closed after {waited:?}"
        );
    }

    #[test]
    fn lifetime_jitter_stays_within_ten_percent_below() {
        let base = Duration::from_secs(3600);
        let samples: Vec<Duration> = (0..1000).map(|_| jittered(base)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d <= base && *d >= base.mul_f64(0.9))
        );
        let distinct: std::collections::BTreeSet<_> = samples.iter().collect();
        assert!(distinct.len() > 900, "jitter spreads the deadlines");
    }
}
