//! Live reconfiguration: the desired listeners (from the proxy registration) against the
//! running ones. [`plan`] is the pure diff; [`Listeners`] carries it out, touching only what
//! changed: a listener whose settings changed keeps its socket and its connections and serves
//! new connections with the new settings; a removed or moved listener stops accepting and its
//! connections drain for up to the drain timeout (unless a failed move on its own port put it
//! back, with its connections).

mod listener;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authorizer::Authorizer;
use crate::conns::Registry;
use crate::consul::ConsulClient;
use crate::consul::watch::{Subscriber, WatchSettings};
use crate::endpoints::Endpoints;
use crate::inbound::{self, InboundContext};
use crate::metrics::Metrics;
use crate::net::Listener;
use crate::outbound::{self, UpstreamContext, UpstreamTarget};
use crate::proxy_config::{BindAddr, ProxyConfig, PublicListener, UpstreamSpec, binds_conflict};
use crate::spiffe::TrustDomainPolicy;
use crate::tls::TlsConfigs;
use crate::watchers;
use listener::{Closing, Conns, ListenerHandle};

/// One step of a reconciliation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Bind and serve a new public listener (replacing any running one).
    StartPublic(PublicListener),
    /// Same address, new settings for new connections.
    UpdatePublic(PublicListener),
    /// Stop the public listener.
    StopPublic,
    /// Bind and serve a new upstream listener.
    StartUpstream(UpstreamSpec),
    /// Same address, new target or settings.
    UpdateUpstream(UpstreamSpec),
    /// Stop the upstream listener on this address.
    StopUpstream(BindAddr),
}

/// What is running, as far as reconciliation cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Running {
    /// The public listener's settings.
    pub public: Option<PublicListener>,
    /// Upstream listeners by address.
    pub upstreams: BTreeMap<BindAddr, UpstreamSpec>,
}

/// The steps that take `running` to `desired`; unchanged listeners get no step.
pub fn plan(running: &Running, desired: &ProxyConfig) -> Vec<Action> {
    let mut actions = Vec::new();
    match (&running.public, &desired.public) {
        (None, Some(d)) => actions.push(Action::StartPublic(d.clone())),
        (Some(_), None) => actions.push(Action::StopPublic),
        (Some(r), Some(d)) if r.bind != d.bind => actions.push(Action::StartPublic(d.clone())),
        (Some(r), Some(d)) if r != d => actions.push(Action::UpdatePublic(d.clone())),
        _ => {}
    }
    for addr in running.upstreams.keys() {
        if !desired.upstreams.iter().any(|u| &u.bind == addr) {
            actions.push(Action::StopUpstream(addr.clone()));
        }
    }
    for spec in &desired.upstreams {
        match running.upstreams.get(&spec.bind) {
            None => actions.push(Action::StartUpstream(spec.clone())),
            Some(r) if r != spec => actions.push(Action::UpdateUpstream(spec.clone())),
            Some(_) => {}
        }
    }
    actions
}

/// The public listener a plan starts (a new one, or the running one at a new address).
fn starting_public(actions: &[Action]) -> Option<&PublicListener> {
    actions.iter().find_map(|a| match a {
        Action::StartPublic(p) => Some(p),
        _ => None,
    })
}

/// The upstream listeners a plan starts.
fn starting_upstreams(actions: &[Action]) -> impl Iterator<Item = &UpstreamSpec> {
    actions.iter().filter_map(|a| match a {
        Action::StartUpstream(spec) => Some(spec),
        _ => None,
    })
}

/// The addresses of the upstream listeners a plan stops.
fn stopping_upstreams(actions: &[Action]) -> impl Iterator<Item = &BindAddr> {
    actions.iter().filter_map(|a| match a {
        Action::StopUpstream(addr) => Some(addr),
        _ => None,
    })
}

/// A public listener and an upstream listener trading ports in one change (public `A -> B`
/// while an upstream leaves `B` and another starts on `A`): neither new address can be bound
/// while the other old listener holds it. Returns the new public listener, the upstream
/// address given up and the upstream starting where the public listener was.
pub fn find_exchange(
    actions: &[Action],
    public_now: Option<SocketAddr>,
) -> Option<(PublicListener, BindAddr, UpstreamSpec)> {
    let public_now = BindAddr::Tcp(public_now?);
    let new_public = starting_public(actions)?;
    let new_public_addr = BindAddr::Tcp(new_public.bind);
    let old_upstream =
        stopping_upstreams(actions).find(|addr| binds_conflict(addr, &new_public_addr))?;
    let new_upstream =
        starting_upstreams(actions).find(|s| binds_conflict(&public_now, &s.bind))?;
    Some((
        new_public.clone(),
        old_upstream.clone(),
        new_upstream.clone(),
    ))
}

/// A rotation rather than an exchange: the public listener moves to an address that no
/// listener of ours holds while an upstream starts where the public listener is now (public
/// `A -> C`, an upstream `B -> A`). The upstream's new address cannot be bound until the public
/// listener has left it, so the public listener moves first. Returns its new settings; `None`
/// when no starting upstream needs its address, or when it moves on its own port (then the
/// two would conflict, which a registration cannot ask for).
pub fn public_first(actions: &[Action], public_now: Option<SocketAddr>) -> Option<PublicListener> {
    let public_now = BindAddr::Tcp(public_now?);
    let new_public = starting_public(actions)?;
    if binds_conflict(&public_now, &BindAddr::Tcp(new_public.bind)) {
        return None;
    }
    starting_upstreams(actions)
        .any(|s| binds_conflict(&public_now, &s.bind))
        .then(|| new_public.clone())
}

/// A listener's move: its old address and its new one.
type Move = (BindAddr, BindAddr);

/// Whether `action` is what remains of one of the `undone` moves (moves on their own port that
/// failed after stopping the old listener, which was then bound again).
fn is_undone(undone: &[Move], action: &Action) -> bool {
    match action {
        Action::StartUpstream(spec) => undone.iter().any(|(_, new)| new == &spec.bind),
        Action::StopUpstream(addr) => undone.iter().any(|(old, _)| old == addr),
        Action::StartPublic(p) => undone.iter().any(|(_, new)| new == &BindAddr::Tcp(p.bind)),
        _ => false,
    }
}

/// What a reconciliation achieved, from the steps [`plan`] still finds afterwards: `Stuck` only
/// when every one of them belongs to an `undone` move, whose old listener serves again.
fn outcome(remaining: &[Action], undone: &[Move]) -> Outcome {
    if remaining.is_empty() {
        Outcome::Converged
    } else if remaining.iter().all(|a| is_undone(undone, a)) {
        Outcome::Stuck
    } else {
        Outcome::Retry
    }
}

/// The moves of a failed exchange that wait for a registration change, from each move and
/// whether its old listener was bound again: both when both are back. If either old address
/// could not be bound again (another process took the port meanwhile), neither is recorded:
/// that listener is not running at all, and the retry must be free to move the other one too
/// (the missing listener's new port is the one the other still holds), so the reconciler
/// retries the whole change with backoff rather than wait.
fn undone_in_exchange(attempts: [(Move, bool); 2]) -> Vec<Move> {
    if attempts.iter().all(|(_, restored)| *restored) {
        attempts.into_iter().map(|(m, _)| m).collect()
    } else {
        Vec::new()
    }
}

/// The desired public listener's settings at the address the running one keeps (its move
/// failed): everything but the address applies at once.
fn at_address(desired: &PublicListener, bind: SocketAddr) -> PublicListener {
    PublicListener {
        bind,
        ..desired.clone()
    }
}

/// Everything listeners and their connections share.
pub struct Shared {
    /// Agent client (endpoint watches).
    pub client: ConsulClient,
    /// Blocking-query timing.
    pub watch: WatchSettings,
    /// Current TLS configs.
    pub tls: Subscriber<TlsConfigs>,
    /// Authorization.
    pub authorizer: Authorizer,
    /// Live inbound connections.
    pub inbound: Arc<Registry>,
    /// Live upstream connections.
    pub upstream: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Trust-domain policy.
    pub trust_domain: TrustDomainPolicy,
    /// How long a stopped listener's connections may drain before they are cut.
    pub drain_timeout: Duration,
    /// Tracks every listener's life (accepting, then draining its connections unless a
    /// listener bound again in its place took them over).
    pub tracker: TaskTracker,
    /// Cancelling it ends every draining listener's wait at once and cuts its connections
    /// (a second shutdown signal).
    pub cut: CancellationToken,
    /// Parent of every endpoint watch.
    pub background: CancellationToken,
    /// Worker runtimes for connections (`-threads` > 1), or `None` to run them here.
    pub workers: Option<Arc<crate::workers::Workers>>,
    /// Inbound connections open right now (for the connection limit).
    pub inbound_active: Arc<std::sync::atomic::AtomicUsize>,
    /// New inbound connections per second (for the rate limit).
    pub inbound_rate: Arc<crate::inbound::RateLimit>,
    /// How often refusals by those two limits are logged.
    pub inbound_refusals: Arc<crate::inbound::Refusals>,
}

struct RunningPublic {
    settings: watch::Sender<Arc<PublicListener>>,
    handle: ListenerHandle,
}

struct RunningUpstream {
    spec: UpstreamSpec,
    target: watch::Sender<Arc<UpstreamTarget>>,
    endpoints_cancel: CancellationToken,
    handle: ListenerHandle,
}

/// How long a replacement waits for the listener it replaces on the same port to let go.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Whether two upstream specs reach the same thing (a listener moving between them is a move).
fn same_target(a: &UpstreamSpec, b: &UpstreamSpec) -> bool {
    a.destination == b.destination && a.datacenter == b.datacenter
}

/// Whether two upstream specs differ in their address only.
fn same_but_address(a: &UpstreamSpec, b: &UpstreamSpec) -> bool {
    UpstreamSpec {
        bind: b.bind.clone(),
        ..a.clone()
    } == *b
}

/// Binds `addr`; if the port is taken and `previous` (a listener being replaced, already told
/// to stop) holds it, waits for it to close its socket and tries once more.
async fn bind_replacing(
    addr: &BindAddr,
    mode: Option<u32>,
    previous: Option<&CancellationToken>,
) -> std::io::Result<Listener> {
    match Listener::bind(addr, mode).await {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let Some(closed) = previous else {
                return Err(e);
            };
            if tokio::time::timeout(RELEASE_WAIT, closed.cancelled())
                .await
                .is_err()
            {
                return Err(e);
            }
            Listener::bind(addr, mode).await
        }
        r => r,
    }
}

/// The running listeners.
pub struct Listeners {
    shared: Arc<Shared>,
    public: Option<RunningPublic>,
    upstreams: BTreeMap<BindAddr, RunningUpstream>,
    /// Set by [`Listeners::stop_accepting`]: no listener is started any more.
    stopping: bool,
    /// Moves on the same port (old address, new address) that failed after the old listener
    /// was stopped and were undone; not tried again until the registration changes.
    failed_swaps: Vec<(BindAddr, BindAddr)>,
}

/// What a reconciliation achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// What runs is what the registration asks for.
    Converged,
    /// A step failed in a way a later attempt may fix (a port another process holds, an
    /// address not configured yet): try again.
    Retry,
    /// What remains are moves on their own port that failed after stopping a working
    /// listener and were undone: repeating them would close its socket each time (new
    /// connections refused meanwhile), so they wait for the next registration change.
    Stuck,
}

/// Upstream listeners prepared before a reconciliation stops anything.
#[derive(Default)]
struct Prepared {
    /// Bound already.
    bound: BTreeMap<BindAddr, Listener>,
    /// New addresses whose port our own stopping listener holds: bound after it closes.
    swaps: Vec<BindAddr>,
    /// Stopping listeners kept because their replacement could not be bound.
    kept: Vec<BindAddr>,
}

impl Listeners {
    /// No listener yet.
    pub fn new(shared: Arc<Shared>) -> Self {
        Listeners {
            shared,
            public: None,
            upstreams: BTreeMap::new(),
            stopping: false,
            failed_swaps: Vec::new(),
        }
    }

    /// What is running.
    pub fn running(&self) -> Running {
        Running {
            public: self
                .public
                .as_ref()
                .map(|p| (**p.settings.borrow()).clone()),
            upstreams: self
                .upstreams
                .iter()
                .map(|(a, u)| (a.clone(), u.spec.clone()))
                .collect(),
        }
    }

    /// Binds every listener of the first configuration, with already-started endpoint
    /// watches (one per upstream, in order, each with the token that stops it); any bind
    /// failure is returned (nothing is served until all are bound).
    pub async fn start(
        &mut self,
        config: &ProxyConfig,
        endpoints: Vec<(Subscriber<Endpoints>, CancellationToken)>,
    ) -> Result<(), (BindAddr, std::io::Error)> {
        let mut bound = Vec::new();
        if let Some(public) = &config.public {
            let addr = BindAddr::Tcp(public.bind);
            bound.push(Listener::bind(&addr, None).await.map_err(|e| (addr, e))?);
        }
        for spec in &config.upstreams {
            bound.push(
                Listener::bind(&spec.bind, spec.socket_mode)
                    .await
                    .map_err(|e| (spec.bind.clone(), e))?,
            );
        }
        let mut bound = bound.into_iter();
        if let Some(public) = &config.public {
            // Invariant: one listener was bound above for the public listener.
            self.serve_public(
                bound.next().expect("bound public listener"),
                public.clone(),
                Conns::new(),
            );
        }
        for (spec, (eps, cancel)) in config.upstreams.iter().zip(endpoints) {
            let listener = bound.next().expect("bound upstream listener");
            self.serve_upstream(listener, spec.clone(), eps, cancel, Conns::new());
        }
        Ok(())
    }

    /// Applies a configuration; failures are logged and leave that listener as it was.
    /// `fresh` is true for a new registration (false when retrying the same one): only then
    /// are moves that failed on their own port attempted again.
    pub async fn apply(&mut self, desired: &ProxyConfig, fresh: bool) -> Outcome {
        if self.stopping {
            tracing::info!("shutting down; ignoring a registration change");
            return Outcome::Converged;
        }
        if fresh {
            self.failed_swaps.clear();
        }
        let mut actions = plan(&self.running(), desired);
        let public_now = self.public.as_ref().map(|p| p.settings.borrow().bind);
        if let Some((public, old_upstream, new_upstream)) = find_exchange(&actions, public_now) {
            if !self.is_failed_swap(&Action::StartPublic(public.clone())) {
                tracing::info!(action = "exchange ports", public = %public.bind, upstream = %new_upstream.bind, "reconfiguring");
                self.exchange(public, old_upstream, new_upstream).await;
                actions = plan(&self.running(), desired);
            }
            // Undone (now or before): the rest of the change applies without it.
            actions.retain(|a| !self.is_failed_swap(a));
        }
        // Where the public listener is now (the exchange may have moved it, or failed to put
        // it back).
        let public_now = self.public.as_ref().map(|p| p.settings.borrow().bind);
        if let Some(public) = public_first(&actions, public_now) {
            tracing::info!(action = "move public before upstreams", addr = %public.bind, "reconfiguring");
            // No upstream is stopped for it: one holding its new address would make this an
            // exchange, handled above.
            if let Some(old) = self.start_public(public, &[]).await {
                // The upstream moving to the old address binds it next; its connections drain
                // (`old` is dropped).
                let _ = tokio::time::timeout(RELEASE_WAIT, old.closed().cancelled()).await;
            }
            // Done, or refused and logged: the retry sees what is left.
            actions.retain(|a| !matches!(a, Action::StartPublic(_)));
        }
        let mut prepared = self.prepare_upstreams(&actions).await;
        // Upstreams this plan stops (and no failed move keeps): the public listener may bind
        // one's port once it has let go.
        let stopping: Vec<BindAddr> = stopping_upstreams(&actions)
            .filter(|addr| !prepared.kept.contains(addr))
            .cloned()
            .collect();
        // Upstream listeners stopped by this reconciliation whose port a listener moving on it
        // needs: it waits for the old socket, and may have to put the old listener back.
        let mut retired: Vec<(UpstreamSpec, Closing)> = Vec::new();
        for action in actions {
            match action {
                Action::StartUpstream(spec) => {
                    if let Some(l) = prepared.bound.remove(&spec.bind) {
                        tracing::info!(action = "start upstream", addr = %spec.bind, "reconfiguring");
                        self.start_upstream(l, spec, Conns::new());
                    } else if prepared.swaps.contains(&spec.bind) {
                        tracing::info!(action = "move upstream on its port", addr = %spec.bind, "reconfiguring");
                        self.swap_upstream(spec, &mut retired).await;
                    }
                    // Otherwise refused while preparing, and logged there.
                }
                Action::StopUpstream(addr) if prepared.kept.contains(&addr) => {}
                Action::StopUpstream(addr) => {
                    tracing::info!(action = "stop upstream", %addr, "reconfiguring");
                    if let Some(old) = self.upstreams.remove(&addr) {
                        old.endpoints_cancel.cancel();
                        if prepared.swaps.iter().any(|new| binds_conflict(&addr, new)) {
                            retired.push((old.spec, self.close(old.handle, "upstream")));
                        } else {
                            self.retire(old.handle, "upstream");
                        }
                    }
                }
                Action::UpdateUpstream(spec) => {
                    tracing::info!(action = "update upstream", addr = %spec.bind, "reconfiguring");
                    self.update_upstream(spec);
                }
                Action::StartPublic(p) => {
                    tracing::info!(action = "start public", addr = %p.bind, "reconfiguring");
                    // The old listener's connections drain.
                    drop(self.start_public(p, &stopping).await);
                }
                Action::UpdatePublic(p) => {
                    tracing::info!(action = "update public", addr = %p.bind, "reconfiguring");
                    if let Some(running) = &self.public {
                        running.settings.send_replace(Arc::new(p));
                    }
                }
                Action::StopPublic => {
                    tracing::info!(action = "stop public", "reconfiguring");
                    if let Some(old) = self.public.take() {
                        self.retire(old.handle, "public");
                    }
                }
            }
        }
        // Stopped listeners that no move put back: their connections drain from now on.
        drop(retired);
        outcome(&plan(&self.running(), desired), &self.failed_swaps)
    }

    /// Binds every new upstream listener that can be bound before anything stops, so that a
    /// move whose new address cannot be bound keeps the old listener serving. A new address
    /// whose port one of our own stopping listeners holds (a move on the same port, e.g.
    /// `127.0.0.1` to `0.0.0.0`) is left to [`Listeners::swap_upstream`].
    async fn prepare_upstreams(&self, actions: &[Action]) -> Prepared {
        let stopping: Vec<&BindAddr> = stopping_upstreams(actions).collect();
        let starting: Vec<&UpstreamSpec> = starting_upstreams(actions).collect();
        let new_public = starting_public(actions).map(|p| BindAddr::Tcp(p.bind));
        let mut prepared = Prepared::default();
        for spec in &starting {
            let holder = stopping
                .iter()
                .find(|old| binds_conflict(old, &spec.bind))
                .copied();
            if let Some(old) = holder {
                if self
                    .failed_swaps
                    .contains(&(old.clone(), spec.bind.clone()))
                {
                    // Tried and undone already: doing it again would close the old listener's
                    // socket each time. It waits for a new registration.
                    prepared.kept.push(old.clone());
                    continue;
                }
            }
            match Listener::bind(&spec.bind, spec.socket_mode).await {
                Ok(l) => {
                    prepared.bound.insert(spec.bind.clone(), l);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && holder.is_some() => {
                    prepared.swaps.push(spec.bind.clone());
                }
                Err(error) => {
                    tracing::error!(addr = %spec.bind, %error, "cannot bind a new upstream listener");
                    // The listener it moves from, if any, keeps serving: the one with the same
                    // settings apart from its address, else one with the same target; never one
                    // whose port another new listener (an upstream, or the public one) needs.
                    let candidates: Vec<&RunningUpstream> = stopping
                        .iter()
                        .filter(|old| !prepared.kept.contains(old))
                        .filter(|old| {
                            !starting
                                .iter()
                                .any(|s| s.bind != spec.bind && binds_conflict(old, &s.bind))
                        })
                        .filter(|old| !new_public.as_ref().is_some_and(|p| binds_conflict(old, p)))
                        .filter_map(|old| self.upstreams.get(*old))
                        .filter(|old| same_target(&old.spec, spec))
                        .collect();
                    let moved_from = candidates
                        .iter()
                        .find(|old| same_but_address(&old.spec, spec))
                        .or_else(|| candidates.first());
                    if let Some(old) = moved_from {
                        tracing::warn!(addr = %old.spec.bind, "upstream listener kept at its previous address");
                        prepared.kept.push(old.spec.bind.clone());
                    }
                }
            }
        }
        prepared
    }

    /// Moves an upstream listener to another address on the same port: the old listener
    /// (stopped just before) must let go of its socket first. If the new bind still fails, the
    /// old address is bound again and the move is not retried until the registration changes.
    async fn swap_upstream(
        &mut self,
        spec: UpstreamSpec,
        retired: &mut Vec<(UpstreamSpec, Closing)>,
    ) {
        let previous = retired
            .iter()
            .position(|(old, _)| binds_conflict(&old.bind, &spec.bind))
            .map(|i| retired.swap_remove(i));
        let closed = previous.as_ref().map(|(_, old)| old.closed());
        let bound = bind_replacing(&spec.bind, spec.socket_mode, closed).await;
        let error = match bound {
            // The old listener's connections drain (`previous` is dropped).
            Ok(l) => return self.start_upstream(l, spec, Conns::new()),
            Err(error) => error,
        };
        tracing::error!(addr = %spec.bind, %error, "cannot bind a new upstream listener");
        let Some((old, closing)) = previous else {
            return;
        };
        let bound = bind_replacing(&old.bind, old.socket_mode, Some(closing.closed())).await;
        match bound {
            Ok(l) => {
                // Not retried on the timer: it would stop this listener again every time.
                // (A failed restore is retried: then nothing serves this upstream.)
                self.failed_swaps
                    .push((old.bind.clone(), spec.bind.clone()));
                tracing::warn!(addr = %old.bind, "upstream listener kept at its previous address; the move waits for a registration change");
                self.start_upstream(l, old, closing.hand_over());
            }
            Err(error) => {
                // Its connections drain (`closing` is dropped).
                tracing::error!(addr = %old.bind, %error, "cannot restore the previous upstream listener")
            }
        }
    }

    /// Same address, new target or settings: new connections use them.
    fn update_upstream(&mut self, spec: UpstreamSpec) {
        let Some(running) = self.upstreams.get(&spec.bind) else {
            return;
        };
        if running.spec.socket_mode != spec.socket_mode {
            if let Err(error) = crate::net::set_socket_mode(&spec.bind, spec.socket_mode) {
                tracing::error!(addr = %spec.bind, %error, "cannot change the upstream socket's mode");
            }
        }
        let (endpoints, endpoints_cancel) = if same_target(&running.spec, &spec) {
            (
                running.target.borrow().endpoints.clone(),
                running.endpoints_cancel.clone(),
            )
        } else {
            running.endpoints_cancel.cancel();
            let cancel = self.shared.background.child_token();
            (self.spawn_endpoints(&spec, &cancel), cancel)
        };
        if let Some(running) = self.upstreams.get_mut(&spec.bind) {
            running.target.send_replace(Arc::new(UpstreamTarget {
                spec: spec.clone(),
                endpoints,
            }));
            running.endpoints_cancel = endpoints_cancel;
            running.spec = spec;
        }
    }

    /// See [`find_exchange`]: stops both old listeners, waits for their sockets, binds both
    /// new ones. If either bind fails, both old addresses are bound again, each with the
    /// connections it had, and the exchange waits for a registration change (as a failed move
    /// on one port does).
    async fn exchange(
        &mut self,
        public: PublicListener,
        old_upstream: BindAddr,
        new_upstream: UpstreamSpec,
    ) {
        // `find_exchange` found both in the plan of what runs; check before taking either.
        if self.public.is_none() || !self.upstreams.contains_key(&old_upstream) {
            return;
        }
        let old_public = self.public.take().expect("checked above");
        let old_up = self.upstreams.remove(&old_upstream).expect("checked above");
        let previous_public = (**old_public.settings.borrow()).clone();
        old_up.endpoints_cancel.cancel();
        let public_closing = self.close(old_public.handle, "public");
        let upstream_closing = self.close(old_up.handle, "upstream");
        let new_public_addr = BindAddr::Tcp(public.bind);
        let bound_upstream = bind_replacing(
            &new_upstream.bind,
            new_upstream.socket_mode,
            Some(public_closing.closed()),
        )
        .await;
        let bound_public =
            bind_replacing(&new_public_addr, None, Some(upstream_closing.closed())).await;
        match (bound_public, bound_upstream) {
            (Ok(p), Ok(u)) => {
                self.serve_public(p, public, Conns::new());
                self.start_upstream(u, new_upstream, Conns::new());
                // The old listeners' connections drain (both `Closing`s are dropped).
                return;
            }
            (p, u) => {
                for (addr, e) in [(&new_public_addr, p.err()), (&new_upstream.bind, u.err())] {
                    if let Some(error) = e {
                        tracing::error!(%addr, %error, "cannot bind a listener while exchanging ports");
                    }
                }
                // Whatever was bound is dropped here, freeing the old addresses' ports.
            }
        }
        let old_public_addr = BindAddr::Tcp(previous_public.bind);
        let bound = bind_replacing(&old_public_addr, None, Some(public_closing.closed())).await;
        let public_back = match bound {
            Ok(l) => {
                let kept = at_address(&public, previous_public.bind);
                self.serve_public(l, kept, public_closing.hand_over());
                true
            }
            Err(error) => {
                tracing::error!(addr = %old_public_addr, %error, "cannot restore the previous public listener");
                false
            }
        };
        let bound = bind_replacing(
            &old_up.spec.bind,
            old_up.spec.socket_mode,
            Some(upstream_closing.closed()),
        )
        .await;
        let upstream_back = match bound {
            Ok(l) => {
                self.start_upstream(l, old_up.spec.clone(), upstream_closing.hand_over());
                true
            }
            Err(error) => {
                tracing::error!(addr = %old_up.spec.bind, %error, "cannot restore the previous upstream listener");
                false
            }
        };
        let undone = undone_in_exchange([
            ((old_public_addr, new_public_addr), public_back),
            (
                (old_up.spec.bind.clone(), new_upstream.bind.clone()),
                upstream_back,
            ),
        ]);
        if public_back && upstream_back {
            tracing::warn!(
                "listeners kept at their previous ports; the exchange waits for a registration change"
            );
        } else {
            tracing::warn!("a listener is missing after a failed exchange; it is retried");
        }
        self.failed_swaps.extend(undone);
    }

    /// A new public listener address: bound first, then the old one stops; on the same port
    /// with another address, see [`Listeners::move_public_on_its_port`]. If the new address is
    /// held by one of the `stopping` upstreams (stopped by this plan anyway), that one stops
    /// first and the bind waits for its socket; its connections drain whether or not the bind
    /// then succeeds. Returns the old public listener, stopped: its connections drain once it
    /// is dropped, and its `closed` token tells when its port is free.
    async fn start_public(&mut self, p: PublicListener, stopping: &[BindAddr]) -> Option<Closing> {
        let addr = BindAddr::Tcp(p.bind);
        let holder = stopping
            .iter()
            .find(|old| binds_conflict(old, &addr))
            .and_then(|old| self.upstreams.remove(old));
        let freed = holder.map(|old| {
            old.endpoints_cancel.cancel();
            self.close(old.handle, "upstream")
        });
        let bound = bind_replacing(&addr, None, freed.as_ref().map(Closing::closed)).await;
        // The plan removes that upstream: not put back, its connections drain.
        drop(freed);
        match bound {
            Ok(l) => {
                let old = self
                    .public
                    .take()
                    .map(|old| self.close(old.handle, "public"));
                self.serve_public(l, p, Conns::new());
                old
            }
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                self.move_public_on_its_port(p, error).await;
                None
            }
            Err(error) => {
                self.public_bind_failed(&p, &error);
                None
            }
        }
    }

    /// A new public address that cannot be bound: logs it, saying whether an old listener
    /// stays, and gives the old listener the rest of the new settings (the move is retried;
    /// meanwhile new connections go to the new local app, with the new timeouts and limits).
    fn public_bind_failed(&self, desired: &PublicListener, error: &std::io::Error) {
        let addr = BindAddr::Tcp(desired.bind);
        match &self.public {
            Some(running) => {
                tracing::error!(%addr, %error, "cannot bind the public listener; keeping the old one");
                let bind = running.settings.borrow().bind;
                running
                    .settings
                    .send_replace(Arc::new(at_address(desired, bind)));
            }
            None => tracing::error!(%addr, %error, "cannot bind the public listener"),
        }
    }

    /// Whether `action` is what remains of a move on its own port that was undone.
    fn is_failed_swap(&self, action: &Action) -> bool {
        is_undone(&self.failed_swaps, action)
    }

    /// Serves a freshly bound upstream listener with its own endpoint watch; `conns` are new,
    /// or those of the listener it was bound again in place of.
    fn start_upstream(&mut self, listener: Listener, spec: UpstreamSpec, conns: Conns) {
        let cancel = self.shared.background.child_token();
        let eps = self.spawn_endpoints(&spec, &cancel);
        self.serve_upstream(listener, spec, eps, cancel, conns);
    }

    /// The public listener moves to another address on the same port (e.g. `127.0.0.1` to
    /// `0.0.0.0`), which cannot be bound while the old one listens: stop the old one, wait for
    /// its socket, bind the new one; if that fails, bind the old address again, with the
    /// connections the old listener had.
    async fn move_public_on_its_port(&mut self, desired: PublicListener, error: std::io::Error) {
        let swap = |old: &RunningPublic| {
            let old = old.settings.borrow().bind;
            (BindAddr::Tcp(old), BindAddr::Tcp(desired.bind))
        };
        let Some(old) = self.public.take_if(|old| {
            let (old_addr, new_addr) = swap(old);
            binds_conflict(&old_addr, &new_addr) && !self.failed_swaps.contains(&swap(old))
        }) else {
            self.public_bind_failed(&desired, &error);
            return;
        };
        let attempted = swap(&old);
        let previous = (**old.settings.borrow()).clone();
        let closing = self.close(old.handle, "public");
        let bound =
            bind_replacing(&BindAddr::Tcp(desired.bind), None, Some(closing.closed())).await;
        let error = match bound {
            // The old listener's connections drain (`closing` is dropped).
            Ok(l) => return self.serve_public(l, desired, Conns::new()),
            Err(error) => error,
        };
        tracing::error!(addr = %desired.bind, %error, "cannot bind the public listener");
        let previous_addr = BindAddr::Tcp(previous.bind);
        let bound = bind_replacing(&previous_addr, None, Some(closing.closed())).await;
        match bound {
            Ok(l) => {
                self.failed_swaps.push(attempted);
                tracing::warn!(addr = %previous.bind, "public listener kept at its previous address; the move waits for a registration change");
                self.serve_public(l, at_address(&desired, previous.bind), closing.hand_over());
            }
            Err(error) => {
                // Its connections drain (`closing` is dropped).
                tracing::error!(addr = %previous.bind, %error, "cannot restore the previous public listener")
            }
        }
    }

    /// Stops every listener from accepting (shutdown); their connections drain.
    pub fn stop_accepting(&mut self) {
        self.stopping = true;
        if let Some(p) = self.public.take() {
            p.handle.retire();
        }
        for (_, u) in std::mem::take(&mut self.upstreams) {
            u.handle.retire();
        }
    }

    fn spawn_endpoints(
        &self,
        spec: &UpstreamSpec,
        cancel: &CancellationToken,
    ) -> Subscriber<Endpoints> {
        watchers::spawn_endpoints(
            self.shared.client.clone(),
            spec,
            self.shared.watch.clone(),
            cancel.clone(),
        )
    }

    /// Serves the public listener; `conns` are new, or those of the listener it was bound
    /// again in place of.
    fn serve_public(&mut self, listener: Listener, settings: PublicListener, conns: Conns) {
        tracing::info!(addr = %listener.local_addr(), app = %settings.local_app, "public listener ready");
        let (tx, rx) = watch::channel(Arc::new(settings));
        let s = &self.shared;
        let ctx = Arc::new(InboundContext {
            settings: rx,
            tls: s.tls.clone(),
            authorizer: s.authorizer.clone(),
            trust_domain: s.trust_domain,
            registry: s.inbound.clone(),
            metrics: s.metrics.clone(),
            active: s.inbound_active.clone(),
            rate: s.inbound_rate.clone(),
            refusals: s.inbound_refusals.clone(),
        });
        let handle = listener::spawn(s, listener, "inbound", conns, move |stream, kill| {
            inbound::serve_conn(stream, ctx.clone(), kill)
        });
        self.public = Some(RunningPublic {
            settings: tx,
            handle,
        });
    }

    /// Serves an upstream listener with the endpoint watch given; `conns` as for
    /// [`Listeners::serve_public`].
    fn serve_upstream(
        &mut self,
        listener: Listener,
        spec: UpstreamSpec,
        endpoints: Subscriber<Endpoints>,
        endpoints_cancel: CancellationToken,
        conns: Conns,
    ) {
        tracing::info!(addr = %listener.local_addr(), upstream = %spec.destination, "upstream listener ready");
        let (tx, rx) = watch::channel(Arc::new(UpstreamTarget {
            spec: spec.clone(),
            endpoints,
        }));
        let s = &self.shared;
        let ctx = Arc::new(UpstreamContext {
            target: rx,
            tls: s.tls.clone(),
            trust_domain: s.trust_domain,
            registry: s.upstream.clone(),
            metrics: s.metrics.clone(),
        });
        let handle = listener::spawn(s, listener, "upstream", conns, move |stream, kill| {
            outbound::serve_conn(stream, ctx.clone(), kill)
        });
        self.upstreams.insert(
            spec.bind.clone(),
            RunningUpstream {
                spec,
                target: tx,
                endpoints_cancel,
                handle,
            },
        );
    }

    /// Stops a listener; its open connections drain for the drain timeout, then are cut.
    fn retire(&self, handle: ListenerHandle, kind: &'static str) {
        // Dropped at once: nothing will take its connections over.
        drop(self.close(handle, kind));
    }

    /// Stops a listener and closes its socket; its open connections wait for what the
    /// returned [`Closing`] decides (they drain once it is dropped).
    fn close(&self, handle: ListenerHandle, kind: &'static str) -> Closing {
        tracing::info!(
            listener = kind,
            "stopping a listener removed from the registration"
        );
        handle.close()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy_config::{Destination, LocalApp};

    fn public(port: u16, app_port: u16) -> PublicListener {
        PublicListener {
            bind: format!("0.0.0.0:{port}").parse().unwrap(),
            local_app: LocalApp::Tcp {
                host: "127.0.0.1".into(),
                port: app_port,
            },
            handshake_timeout: Duration::from_secs(10),
            local_connect_timeout: Duration::from_secs(1),
            max_conn_lifetime: None,
            idle_timeout: None,
            max_connections: None,
            max_connection_rate: None,
        }
    }

    fn upstream(name: &str, port: u16) -> UpstreamSpec {
        UpstreamSpec {
            destination: Destination::Service(name.into()),
            datacenter: None,
            bind: BindAddr::Tcp(format!("127.0.0.1:{port}").parse().unwrap()),
            connect_timeout: Duration::from_secs(5),
            socket_mode: None,
        }
    }

    fn config(public: Option<PublicListener>, upstreams: Vec<UpstreamSpec>) -> ProxyConfig {
        ProxyConfig {
            proxy_id: "p".into(),
            service: "web".into(),
            datacenter: "dc1".into(),
            public,
            upstreams,
            reauthorize_interval: None,
        }
    }

    fn running(cfg: &ProxyConfig) -> Running {
        Running {
            public: cfg.public.clone(),
            upstreams: cfg
                .upstreams
                .iter()
                .map(|u| (u.bind.clone(), u.clone()))
                .collect(),
        }
    }

    #[test]
    fn nothing_changes_when_nothing_changed() {
        let cfg = config(Some(public(21000, 8080)), vec![upstream("db", 9191)]);
        assert!(plan(&running(&cfg), &cfg).is_empty());
    }

    #[test]
    fn first_configuration_starts_everything() {
        let cfg = config(Some(public(21000, 8080)), vec![upstream("db", 9191)]);
        assert_eq!(
            plan(&Running::default(), &cfg),
            vec![
                Action::StartPublic(public(21000, 8080)),
                Action::StartUpstream(upstream("db", 9191))
            ]
        );
    }

    #[test]
    fn added_removed_and_retargeted_upstreams_touch_only_themselves() {
        let before = config(
            None,
            vec![
                upstream("db", 9191),
                upstream("cache", 9192),
                upstream("api", 9193),
            ],
        );
        let after = config(
            None,
            vec![
                upstream("db", 9191),
                upstream("queue", 9192),
                upstream("search", 9194),
            ],
        );
        assert_eq!(
            plan(&running(&before), &after),
            vec![
                Action::StopUpstream(upstream("api", 9193).bind),
                Action::UpdateUpstream(upstream("queue", 9192)),
                Action::StartUpstream(upstream("search", 9194)),
            ]
        );
    }

    #[test]
    fn moved_upstream_is_stopped_and_started() {
        let before = config(None, vec![upstream("db", 9191)]);
        let after = config(None, vec![upstream("db", 9999)]);
        assert_eq!(
            plan(&running(&before), &after),
            vec![
                Action::StopUpstream(upstream("db", 9191).bind),
                Action::StartUpstream(upstream("db", 9999))
            ]
        );
    }

    #[test]
    fn public_listener_moves_or_updates_in_place() {
        let before = config(Some(public(21000, 8080)), vec![]);
        let app_moved = config(Some(public(21000, 9090)), vec![]);
        assert_eq!(
            plan(&running(&before), &app_moved),
            vec![Action::UpdatePublic(public(21000, 9090))]
        );
        let port_moved = config(Some(public(22000, 8080)), vec![]);
        assert_eq!(
            plan(&running(&before), &port_moved),
            vec![Action::StartPublic(public(22000, 8080))]
        );
        let gone = config(None, vec![]);
        assert_eq!(plan(&running(&before), &gone), vec![Action::StopPublic]);
    }

    #[test]
    fn a_public_listener_and_an_upstream_trading_ports_is_an_exchange() {
        let before = config(Some(public(21000, 8080)), vec![upstream("db", 9191)]);
        let traded = config(Some(public(9191, 8080)), vec![upstream("db", 21000)]);
        let actions = plan(&running(&before), &traded);
        let now = before.public.as_ref().map(|p| p.bind);
        assert_eq!(
            find_exchange(&actions, now),
            Some((
                public(9191, 8080),
                upstream("db", 9191).bind,
                upstream("db", 21000)
            ))
        );
        // Moving to free ports is no exchange, nor is a public listener that is not moving.
        let apart = config(Some(public(22000, 8080)), vec![upstream("db", 9292)]);
        assert_eq!(find_exchange(&plan(&running(&before), &apart), now), None);
        let stays = config(Some(public(21000, 8080)), vec![upstream("db", 9292)]);
        assert_eq!(find_exchange(&plan(&running(&before), &stays), now), None);
        assert_eq!(
            find_exchange(&actions, None),
            None,
            "no public listener running"
        );
    }

    /// public `A -> C` while an upstream moves `B -> A`: the public listener must move first.
    #[test]
    fn a_public_listener_leaving_the_port_an_upstream_moves_to_moves_first() {
        let before = config(Some(public(21000, 8080)), vec![upstream("db", 9191)]);
        let rotated = config(Some(public(22000, 8080)), vec![upstream("db", 21000)]);
        let actions = plan(&running(&before), &rotated);
        let now = before.public.as_ref().map(|p| p.bind);
        assert_eq!(public_first(&actions, now), Some(public(22000, 8080)));
        assert_eq!(find_exchange(&actions, now), None, "not an exchange");
        // No upstream wants its address, or the public listener is not moving: nothing first.
        let apart = config(Some(public(22000, 8080)), vec![upstream("db", 9292)]);
        assert_eq!(public_first(&plan(&running(&before), &apart), now), None);
        let stays = config(Some(public(21000, 8080)), vec![upstream("db", 9292)]);
        assert_eq!(public_first(&plan(&running(&before), &stays), now), None);
        assert_eq!(
            public_first(&actions, None),
            None,
            "no public listener running"
        );
        // A move on its own port (to a loopback address) is not one the upstream can follow.
        let mut same_port = public(21000, 8080);
        same_port.bind = "127.0.0.1:21000".parse().unwrap();
        let own_port = config(Some(same_port), vec![upstream("db", 21000)]);
        assert_eq!(public_first(&plan(&running(&before), &own_port), now), None);
    }

    /// After an exchange that failed, the listeners that are back at their old addresses wait
    /// for a registration change; one that could not be bound again (nothing serves there) is
    /// retried, however the rest of the plan looks.
    #[test]
    fn an_exchange_whose_old_listener_is_not_back_is_retried_not_stuck() {
        let before = config(Some(public(21000, 8080)), vec![upstream("db", 9191)]);
        let traded = config(Some(public(9191, 8080)), vec![upstream("db", 21000)]);
        let public_move = (
            BindAddr::Tcp(public(21000, 8080).bind),
            BindAddr::Tcp(public(9191, 8080).bind),
        );
        let upstream_move = (upstream("db", 9191).bind, upstream("db", 21000).bind);
        let after = |public_back: bool, upstream_back: bool| {
            let mut now = running(&before);
            if !public_back {
                now.public = None;
            }
            if !upstream_back {
                now.upstreams.clear();
            }
            let undone = undone_in_exchange([
                (public_move.clone(), public_back),
                (upstream_move.clone(), upstream_back),
            ]);
            let remaining = plan(&now, &traded);
            if !(public_back && upstream_back) {
                // Nothing of a half-restored exchange may be skipped by the retry: the public
                // listener's new port is held by the upstream, which must move too.
                assert!(
                    !remaining.iter().any(|a| is_undone(&undone, a)),
                    "{remaining:?} {undone:?}"
                );
            }
            outcome(&remaining, &undone)
        };
        assert_eq!(after(true, true), Outcome::Stuck, "both back: wait");
        assert_eq!(after(false, true), Outcome::Retry, "no public listener");
        assert_eq!(after(true, false), Outcome::Retry, "no upstream listener");
        assert_eq!(after(false, false), Outcome::Retry, "neither");
    }
}
