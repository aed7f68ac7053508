//! Live enforcement: when the inputs of an authorization decision change (intentions, the
//! default policy, the trusted roots), every live inbound connection is checked again with the
//! same functions used at accept, and those that would now be refused are closed. Optionally
//! also on a timer (`-reauthorize-interval`). A removed root also closes the upstream
//! connections whose server chain ended in it: we could not open them again either.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::authorizer::Authorizer;
use crate::authz::Reason;
use crate::conns::{Registry, Side};
use crate::consul::watch::Subscriber;
use crate::metrics::Metrics;
use crate::tls::{PeerIdentity, TlsConfigs, TrustBundle};

/// What the enforcer watches and acts on.
pub struct Enforcer {
    /// Live inbound connections.
    pub inbound: Arc<Registry>,
    /// Live upstream connections.
    pub upstream: Arc<Registry>,
    /// Decisions.
    pub authorizer: Authorizer,
    /// Our service name, for logs.
    pub service: String,
    /// The TLS configurations handshakes use: their roots are the trusted ones. Following
    /// these (not the raw roots watch) is what makes a connection's own re-check and the
    /// enforcer see the same publication: a connection registers, then compares the bundle of
    /// its handshake with the current one; a change published after that read finds the
    /// connection registered.
    pub tls: Subscriber<TlsConfigs>,
    /// Periodic re-check interval; `None` is off.
    pub interval: watch::Receiver<Option<Duration>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// The enforcer's subscriptions, each marked seen when taken.
struct Inputs {
    intentions: Subscriber<crate::authz::Intentions>,
    default: watch::Receiver<Option<crate::authz::DefaultPolicy>>,
    tls: Subscriber<TlsConfigs>,
}

impl Enforcer {
    /// Subscribes to every input now, then runs until cancelled. Call it before the first
    /// connection is accepted: a change published after this call reaches the enforcer, and
    /// one published before it is in the values the first connections read.
    pub fn spawn(mut self, cancel: CancellationToken) {
        let mut inputs = Inputs {
            intentions: self.authorizer.subscribe_intentions(),
            default: self.authorizer.subscribe_default(),
            tls: self.tls.clone(),
        };
        inputs.intentions.borrow_and_update();
        inputs.default.borrow_and_update();
        let trusted = inputs
            .tls
            .borrow_and_update()
            .as_ref()
            .map(|t| t.bundle.clone());
        let period = *self.interval.borrow_and_update();
        tokio::spawn(async move { self.run(inputs, trusted, period, cancel).await });
    }

    async fn run(
        mut self,
        inputs: Inputs,
        mut trusted: Option<Arc<TrustBundle>>,
        mut period: Option<Duration>,
        cancel: CancellationToken,
    ) {
        let Inputs {
            mut intentions,
            mut default,
            mut tls,
        } = inputs;
        // The periodic timer is kept across events (re-created only when its period changes),
        // so that frequent intention changes cannot keep postponing it.
        let mut timer = period.map(periodic);
        loop {
            let tick = async {
                match timer.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = intentions.changed() => {
                    if r.is_err() { return }
                    self.reauthorize("intentions changed").await;
                }
                r = default.changed() => {
                    if r.is_err() { return }
                    self.reauthorize("default policy changed").await;
                }
                r = tls.changed() => {
                    if r.is_err() { return }
                    let new = tls.borrow_and_update().as_ref().map(|t| t.bundle.clone());
                    if let (Some(old), Some(new)) = (&trusted, &new) {
                        if old.withdraws_trust_of(new) {
                            self.reverify(new).await;
                        }
                    }
                    trusted = new;
                }
                r = self.interval.changed() => {
                    if r.is_err() { return }
                    let new = *self.interval.borrow_and_update();
                    if new != period {
                        period = new;
                        timer = period.map(periodic);
                    }
                }
                _ = tick => self.reauthorize("periodic re-authorization").await,
            }
        }
    }

    /// Closes every live connection the current intentions and default would refuse.
    ///
    /// When only the agent knows the default, it is asked for the first connection that needs
    /// it; an answer teaches the default to the rest. If it cannot answer, the rest are decided
    /// from the cache (denied, as nothing is known) rather than each waiting on the agent in
    /// turn, which would hold up every other event of this loop.
    async fn reauthorize(&self, why: &str) {
        let conns = self.inbound.snapshot();
        let mut closed = 0usize;
        let mut agent_failed = false;
        for conn in &conns {
            let peer = PeerIdentity {
                id: conn.peer.clone(),
                serial: conn.serial.clone(),
            };
            let decision = if agent_failed {
                self.authorizer.decide_cached(&peer.id)
            } else {
                self.authorizer.authorize(&peer).await
            };
            // `authorize` hands back the cached "default unknown" only when the agent failed.
            agent_failed |= decision.reason == Reason::DefaultUnknown;
            if decision.is_allow() {
                continue;
            }
            if !conn.close(format!("no longer authorized: {}", decision.reason)) {
                continue; // closed already, for another reason
            }
            tracing::warn!(
                conn.id = conn.id,
                source = %conn.peer,
                destination = %self.service,
                reason = %decision.reason,
                trigger = why,
                "closing a live connection that is no longer authorized"
            );
            self.metrics.closed_reauthorization.inc();
            closed += 1;
        }
        tracing::debug!(
            trigger = why,
            checked = conns.len(),
            closed,
            "re-authorized live connections"
        );
    }

    /// Closes every live connection, inbound and upstream, whose peer's chain no longer ends
    /// in a trusted root. Each check is a signature verification or more: the pass yields to
    /// the runtime every [`VERIFY_BATCH`] connections, so that thousands of them do not hold
    /// up the connections' own tasks on a single-threaded runtime.
    async fn reverify(&self, bundle: &TrustBundle) {
        let all = self.inbound.snapshot().into_iter();
        for (n, conn) in all.chain(self.upstream.snapshot()).enumerate() {
            if n > 0 && n % VERIFY_BATCH == 0 {
                tokio::task::yield_now().await;
            }
            let Err(error) = conn.verify_chain(bundle) else {
                continue;
            };
            if !conn.close(format!("certificate chain no longer trusted: {error}")) {
                continue; // closed already, for another reason
            }
            // Inbound, the peer is the caller; upstream, the server we dialled.
            let (side, source, destination, closed) = match conn.side {
                Side::Inbound => (
                    "inbound",
                    conn.peer.to_string(),
                    self.service.clone(),
                    &self.metrics.closed_trust,
                ),
                Side::Upstream => (
                    "upstream",
                    self.service.clone(),
                    conn.peer.to_string(),
                    &self.metrics.upstream_closed_trust,
                ),
            };
            tracing::warn!(
                conn.id = conn.id,
                side,
                %source,
                %destination,
                %error,
                "closing a live connection whose peer's certificate chain is no longer trusted"
            );
            closed.inc();
        }
    }
}

/// Connections whose chains are verified again between two yields to the runtime.
const VERIFY_BATCH: usize = 64;

/// A timer firing every `period`, the first time one period from now.
fn periodic(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}
