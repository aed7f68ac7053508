//! The proxy's lifecycle: find our registration, start the watches, wait for certificates,
//! intentions and endpoints, bind every listener (or fail), report ready, serve while
//! following configuration changes and enforcing intentions on live connections, and drain on
//! shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::authorizer::Authorizer;
use crate::config::{Config, Target};
use crate::consul::watch::{Subscriber, WatchSettings, backoff};
use crate::consul::{ConsulClient, ConsulError};
use crate::discovery::{SidecarError, select_sidecar};
use crate::enforce::Enforcer;
use crate::metrics::Metrics;
use crate::proxy_config::{self, BindAddr, ProxyConfig};
use crate::reconcile::{Listeners, Outcome, Shared};
use crate::signal::Signals;
use crate::{notify, watchers};

/// Why the proxy stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The agent client cannot be set up from the flags and environment (a token, CA or
    /// client-certificate file that cannot be read or used, an agent address that does not
    /// resolve): a usage error.
    #[error(transparent)]
    Setup(ConsulError),
    /// The agent refused or failed in a way retrying will not fix.
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// `-proxy-id` names no registration.
    #[error("no service with ID {0:?} is registered on this agent (is -proxy-id right?)")]
    UnknownProxy(String),
    /// `-sidecar-for` found none or several.
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    /// The agent's ACLs refused a watch the proxy cannot start without.
    #[error("the agent refused the {watch} watch: {error}")]
    WatchForbidden {
        /// The watch's name.
        watch: String,
        /// The agent's error, naming the permission.
        error: String,
    },
    /// The registration cannot be honoured.
    #[error("cannot use the proxy registration: {0}")]
    Registration(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Tuning that is not exposed as flags (tests shorten it), and the worker runtimes.
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    /// Blocking-query timing.
    pub watch: WatchSettings,
    /// Worker runtimes for connections (`-threads` > 1); `None` runs them on this runtime.
    pub workers: Option<Arc<crate::workers::Workers>>,
}

/// Runs the proxy until the first shutdown signal, then drains and returns; a second signal
/// while draining cuts the remaining connections at once.
pub async fn run(config: Config, tuning: Tuning, mut signals: Signals) -> Result<(), AppError> {
    let client = ConsulClient::new(&config.agent)
        .await
        .map_err(AppError::Setup)?;
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();

    // The process's shared state, served by the admin endpoint when one is configured.
    let admin = Arc::new(AdminState::new(
        Arc::new(Metrics::default()),
        tuning.watch.health.clone(),
    ));
    if let Some(addr) = config.admin_addr {
        let local = admin::spawn(addr, admin.clone(), background.clone())
            .await
            .map_err(|source| AppError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(addr = %local, "admin endpoint ready");
        if !local.ip().is_loopback() {
            tracing::warn!(
                addr = %local,
                "the admin endpoint is not on loopback: anyone who can reach it sees callers' identities, certificate serials and agent errors (it has no authentication)"
            );
        }
    }

    let started = tokio::select! {
        r = start(&config, &tuning, &client, &background, admin) => r?,
        () = signals.recv() => {
            tracing::info!("shutdown requested before the proxy was ready");
            return Ok(());
        }
    };
    signals.recv().await;
    started.drain(&mut signals).await;
    Ok(())
}

/// A started proxy: listeners bound and serving.
struct Started {
    listeners: Arc<tokio::sync::Mutex<Listeners>>,
    shared: Arc<Shared>,
    admin: Arc<AdminState>,
}

async fn start(
    config: &Config,
    tuning: &Tuning,
    client: &ConsulClient,
    background: &CancellationToken,
    admin: Arc<AdminState>,
) -> Result<Started, AppError> {
    let proxy_id = match &config.target {
        Target::ProxyId(id) => id.clone(),
        Target::SidecarFor(service) => {
            let (services, filtered) =
                retry_while_unavailable(client, || client.agent_services()).await?;
            let id = select_sidecar(&services, filtered, service)?;
            tracing::info!(proxy_id = %id, service = %service, "found the sidecar registration");
            id
        }
    };
    let wait = tuning.watch.wait;
    let (mut svc, hash) =
        retry_while_unavailable(client, || client.agent_service(&proxy_id, None, wait))
            .await
            .map_err(|e| match e {
                ConsulError::NotFound { .. } => AppError::UnknownProxy(proxy_id.clone()),
                other => AppError::Consul(other),
            })?;
    let host_names = Arc::new(proxy_config::HostNames::default());
    let resolved = host_names
        .resolve(&mut svc)
        .await
        .map_err(AppError::Registration)?;
    for note in &resolved {
        tracing::info!(%note, "proxy configuration");
    }
    let converted =
        ProxyConfig::from_api(&svc, &config.defaults).map_err(AppError::Registration)?;
    let _ = admin.service.set(converted.config.service.clone());
    for note in &converted.notes {
        tracing::info!(%note, "proxy configuration");
    }
    let proxy = converted.config;
    tracing::info!(
        proxy_id = %proxy.proxy_id,
        service = %proxy.service,
        upstreams = proxy.upstreams.len(),
        agent = client.addr(),
        "proxy registration loaded"
    );

    let mut settings = tuning.watch.clone();
    if !client.shares_connections() {
        settings.endpoint_long_polls = Arc::new(tokio::sync::Semaphore::new(
            watchers::ENDPOINT_LONG_POLLS_HTTP1,
        ));
    }
    let roots = watchers::spawn_roots(client.clone(), settings.clone(), background.clone());
    let leaf = watchers::spawn_leaf(
        client.clone(),
        proxy.service.clone(),
        settings.clone(),
        background.clone(),
    );
    let intentions = watchers::spawn_intentions(
        client.clone(),
        proxy.service.clone(),
        settings.clone(),
        background.clone(),
    );
    let config_rx = watchers::spawn_proxy_config(
        client.clone(),
        proxy_id.clone(),
        (proxy.clone(), hash),
        host_names,
        config.defaults,
        settings.clone(),
        background.clone(),
    );
    let tls = crate::tls::spawn_builder(
        roots.clone(),
        leaf,
        config.tls_resumption,
        background.clone(),
    );
    let authorizer = Authorizer::new(
        client.clone(),
        proxy.service.clone(),
        proxy.datacenter.clone(),
        intentions.clone(),
        roots.clone(),
    );
    authorizer.spawn_default_prober(settings.health.recoveries(), background.clone());
    // Discovery for every upstream starts now, so that listeners open with endpoints known.
    // Each watch has its own token, so that stopping its upstream later stops it.
    let endpoints: Vec<_> = proxy
        .upstreams
        .iter()
        .map(|spec| {
            let cancel = background.child_token();
            let watch =
                watchers::spawn_endpoints(client.clone(), spec, settings.clone(), cancel.clone());
            (watch, cancel)
        })
        .collect();

    let _ = admin.tls.set(tls.clone());
    tracing::info!("waiting for certificates, intentions and upstream endpoints from the agent");
    let inputs = async {
        wait_ready(&tls).await;
        wait_ready(&intentions).await;
        // Endpoints are waited for only so long: an upstream the agent cannot answer for (an
        // unknown datacenter, a missing prepared query) must not keep the rest from serving.
        // Its listener opens anyway and refuses connections until endpoints are known.
        let all = async {
            for (e, _) in &endpoints {
                wait_ready(e).await;
            }
        };
        if tokio::time::timeout(ENDPOINTS_WAIT, all).await.is_err() {
            for (spec, (e, _)) in proxy.upstreams.iter().zip(&endpoints) {
                if e.borrow().is_none() {
                    tracing::warn!(
                        upstream = %spec.destination,
                        waited = ?ENDPOINTS_WAIT,
                        "no endpoints from the agent yet; the upstream listener opens anyway and refuses connections until they arrive"
                    );
                }
            }
        }
    };
    // Without a first value there is nothing to serve "fail static" from: an ACL refusal
    // before then is fatal, as it is for the registration itself (retrying cannot fix it).
    // Except for an upstream's endpoints: its listener refuses connections (logged, and shown
    // on the admin endpoint) while the rest serves, and it recovers when the policy is fixed.
    tokio::select! {
        () = inputs => {}
        (watch, error) = settings.health.first_forbidden(&watchers::ESSENTIAL) => {
            return Err(AppError::WatchForbidden { watch, error });
        }
    }

    let metrics = admin.metrics.clone();
    let shared = Arc::new(Shared {
        client: client.clone(),
        watch: settings,
        tls,
        authorizer: authorizer.clone(),
        inbound: admin.inbound.clone(),
        upstream: admin.upstream.clone(),
        metrics: metrics.clone(),
        trust_domain: config.trust_domain,
        drain_timeout: config.drain_timeout,
        tracker: TaskTracker::new(),
        cut: CancellationToken::new(),
        background: background.clone(),
        workers: tuning.workers.clone(),
        inbound_active: Default::default(),
        inbound_rate: Default::default(),
        inbound_refusals: Default::default(),
    });
    // The enforcer subscribes before the first connection is accepted, so that no change
    // published in between is taken as already seen.
    let (interval_tx, interval_rx) = watch::channel(proxy.reauthorize_interval);
    Enforcer {
        inbound: admin.inbound.clone(),
        upstream: admin.upstream.clone(),
        authorizer,
        service: proxy.service.clone(),
        tls: shared.tls.clone(),
        interval: interval_rx,
        metrics: metrics.clone(),
    }
    .spawn(background.clone());
    let mut listeners = Listeners::new(shared.clone());
    listeners.start(&proxy, endpoints).await?;
    let listeners = Arc::new(tokio::sync::Mutex::new(listeners));

    spawn_reconciler(
        config_rx,
        listeners.clone(),
        interval_tx,
        background.clone(),
    );

    admin.ready.store(true, Ordering::Relaxed);
    notify::ready();
    tracing::info!("proxy ready");
    Ok(Started {
        listeners,
        shared,
        admin,
    })
}

impl Started {
    /// Stops accepting, lets open connections finish for up to the drain timeout (or until
    /// another signal), then cuts the rest.
    async fn drain(self, signals: &mut Signals) {
        let deadline = self.shared.drain_timeout;
        // Not ready first: once systemd hears STOPPING=1, /ready must already say 503.
        self.admin.ready.store(false, Ordering::Relaxed);
        notify::stopping();
        self.listeners.lock().await.stop_accepting();
        // Each listener drains its own connections for `deadline`, then cuts the rest.
        let tracker = &self.shared.tracker;
        tracker.close();
        tracing::info!(deadline = ?deadline, inbound = self.shared.inbound.len(), upstream = self.shared.upstream.len(), "draining open connections");
        tokio::select! {
            () = tracker.wait() => {}
            () = signals.recv() => {
                tracing::warn!("second shutdown signal: cutting the remaining connections now");
                self.shared.cut.cancel();
                tracker.wait().await;
            }
        }
        tracing::info!("proxy stopped");
    }
}

/// Applies every change of the registration to the running listeners and limits.
fn spawn_reconciler(
    mut config: Subscriber<ProxyConfig>,
    listeners: Arc<tokio::sync::Mutex<Listeners>>,
    interval: watch::Sender<Option<Duration>>,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        // The first pass applies the registration as it is now (not marked seen beforehand): a
        // change published while the proxy was starting is applied, and an unchanged one is a
        // no-op. A pass that could not reach the desired state is tried again with backoff.
        let mut retry: Option<Duration> = None;
        let mut fresh = true;
        loop {
            let desired = config.borrow_and_update().clone();
            if let Some(desired) = desired {
                let outcome = listeners.lock().await.apply(&desired, fresh).await;
                interval.send_if_modified(|current| {
                    let changed = *current != desired.reauthorize_interval;
                    *current = desired.reauthorize_interval;
                    changed
                });
                retry = match outcome {
                    Outcome::Converged => None,
                    Outcome::Retry => {
                        let after = next_retry(retry);
                        tracing::warn!(?after, "the registration is not fully applied; retrying");
                        Some(after)
                    }
                    Outcome::Stuck => {
                        tracing::error!(
                            "the registration is not fully applied: a listener could not move on its port (see above); waiting for a registration change"
                        );
                        None
                    }
                };
            }
            fresh = false;
            let later = async {
                match retry {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = config.changed() => {
                    if r.is_err() { return }
                    retry = None;
                    fresh = true;
                    tracing::info!("the proxy registration changed; reconciling");
                }
                _ = later => {}
            }
        }
    });
}

/// How long start-up waits for every upstream's first endpoints before serving anyway.
const ENDPOINTS_WAIT: Duration = Duration::from_secs(10);

/// The wait before the next reconciliation attempt: 1 s, doubling, at most 30 s.
fn next_retry(previous: Option<Duration>) -> Duration {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    previous.map_or(FIRST, |d| (d * 2).min(MAX))
}

async fn wait_ready<T>(rx: &Subscriber<T>) {
    let mut rx = rx.clone();
    // Err only when the sender is gone, i.e. we are shutting down.
    let _ = rx.wait_for(Option::is_some).await;
}

/// Calls `f` until the agent answers something other than "unavailable": unreachable, 5xx,
/// 429 or a protocol hiccup. Each new kind of failure is logged once; retries back off.
async fn retry_while_unavailable<T, F, Fut>(
    client: &ConsulClient,
    mut f: F,
) -> Result<T, ConsulError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ConsulError>>,
{
    let settings = WatchSettings::default();
    let mut failures = 0u32;
    // Logged once per kind of failure (unreachable, 500, 429...), not once per retry.
    let mut last_kind = None;
    loop {
        match f().await {
            Ok(v) => {
                if failures > 0 {
                    tracing::info!(agent = client.addr(), "the Consul agent is answering");
                }
                return Ok(v);
            }
            Err(e) if is_unavailable(&e) => {
                failures += 1;
                if last_kind.replace(e.kind()) != Some(e.kind()) {
                    tracing::warn!(error = %e, "waiting for the Consul agent; retrying");
                }
                let delay = backoff(
                    failures,
                    settings.backoff_base,
                    settings.backoff_cap,
                    rand::random(),
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_unavailable(e: &ConsulError) -> bool {
    match e {
        ConsulError::Unreachable { .. } | ConsulError::Busy { .. } => true,
        ConsulError::Protocol { .. } => true,
        ConsulError::TooManyRequests { .. } => true,
        ConsulError::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

/// The address a bind error names.
impl AppError {
    /// The process exit code: 2 for usage errors (as for bad flags), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Setup(_) => 2,
            _ => 1,
        }
    }
}

impl From<(BindAddr, std::io::Error)> for AppError {
    fn from((addr, source): (BindAddr, std::io::Error)) -> Self {
        AppError::Bind {
            addr: addr.to_string(),
            source,
        }
    }
}
