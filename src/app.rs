//! The proxy's lifecycle: find our registration, start the watches, wait for certificates and
//! intentions, bind every listener (or fail), report ready, serve, and drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authorizer::Authorizer;
use crate::config::{Config, Target};
use crate::consul::watch::{Subscriber, WatchSettings, backoff};
use crate::consul::{ConsulClient, ConsulError};
use crate::discovery::{SidecarError, select_sidecar};
use crate::inbound::{self, InboundContext};
use crate::net::{self, Listener};
use crate::outbound::{self, UpstreamContext};
use crate::proxy_config::{BindAddr, ProxyConfig};
use crate::{notify, watchers};

/// Why the proxy stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The agent refused or failed in a way retrying will not fix.
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// `-proxy-id` names no registration.
    #[error("no service with ID {0:?} is registered on this agent (is -proxy-id right?)")]
    UnknownProxy(String),
    /// `-sidecar-for` found none or several.
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
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

/// Tuning that is not exposed as flags (tests shorten it).
#[derive(Clone, Debug, Default)]
pub struct Tuning {
    /// Blocking-query timing.
    pub watch: WatchSettings,
}

/// Runs the proxy until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: Config,
    tuning: Tuning,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let client = ConsulClient::new(&config.agent).await?;
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    tokio::pin!(shutdown);

    let started = tokio::select! {
        r = start(&config, &tuning, &client, &background) => r?,
        _ = &mut shutdown => {
            tracing::info!("shutdown requested before the proxy was ready");
            return Ok(());
        }
    };
    shutdown.await;
    started.drain(config.drain_timeout).await;
    Ok(())
}

/// A started proxy: listeners bound and serving.
struct Started {
    stop_accepting: CancellationToken,
    kill_connections: CancellationToken,
    tracker: TaskTracker,
}

async fn start(
    config: &Config,
    tuning: &Tuning,
    client: &ConsulClient,
    background: &CancellationToken,
) -> Result<Started, AppError> {
    let proxy_id = match &config.target {
        Target::ProxyId(id) => id.clone(),
        Target::SidecarFor(service) => {
            let services = retry_while_unavailable(client, || client.agent_services()).await?;
            let id = select_sidecar(&services, service)?;
            tracing::info!(proxy_id = %id, service = %service, "found the sidecar registration");
            id
        }
    };
    let wait = tuning.watch.wait;
    let (svc, hash) =
        retry_while_unavailable(client, || client.agent_service(&proxy_id, None, wait))
            .await
            .map_err(|e| match e {
                ConsulError::NotFound { .. } => AppError::UnknownProxy(proxy_id.clone()),
                other => AppError::Consul(other),
            })?;
    let converted = ProxyConfig::from_api(&svc).map_err(AppError::Registration)?;
    for note in &converted.notes {
        tracing::info!(%note, "proxy configuration");
    }
    let proxy = converted.config;
    tracing::info!(
        proxy_id = %proxy.proxy_id,
        service = %proxy.service,
        upstreams = proxy.upstreams.len(),
        "proxy registration loaded"
    );

    let settings = tuning.watch.clone();
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
        settings.clone(),
        background.clone(),
    );
    let tls = crate::tls::spawn_builder(roots.clone(), leaf, background.clone());
    let authorizer = Authorizer::new(
        client.clone(),
        proxy.service.clone(),
        proxy.datacenter.clone(),
        intentions.clone(),
        roots,
    );
    authorizer.spawn_default_prober(background.clone());

    // Discovery for every upstream starts now, so that listeners open with endpoints known.
    let endpoints: Vec<_> = proxy
        .upstreams
        .iter()
        .map(|spec| {
            watchers::spawn_endpoints(client.clone(), spec, settings.clone(), background.clone())
        })
        .collect();

    tracing::info!("waiting for certificates, intentions and upstream endpoints from the agent");
    wait_ready(&tls).await;
    wait_ready(&intentions).await;
    for e in &endpoints {
        wait_ready(e).await;
    }

    // Bind everything before serving anything: a partly bound proxy is not started.
    let mut bound = Vec::new();
    if let Some(public) = &proxy.public {
        let addr = BindAddr::Tcp(public.bind);
        bound.push((None, bind(&addr).await?));
    }
    for (i, up) in proxy.upstreams.iter().enumerate() {
        bound.push((Some(i), bind(&up.bind).await?));
    }

    let stop_accepting = CancellationToken::new();
    let kill_connections = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (which, listener) in bound {
        let addr = listener.local_addr();
        match which {
            None => {
                // Invariant: a `None` entry is only pushed when `proxy.public` is set.
                let public = proxy.public.clone().expect("public listener config");
                tracing::info!(%addr, app = %public.local_app, "public listener ready");
                let ctx = Arc::new(InboundContext {
                    settings: watch::channel(Arc::new(public)).1,
                    tls: tls.clone(),
                    authorizer: authorizer.clone(),
                    trust_domain: config.trust_domain,
                });
                spawn_listener(
                    listener,
                    "inbound",
                    &stop_accepting,
                    &tracker,
                    &kill_connections,
                    move |s, kill| inbound::serve_conn(s, ctx.clone(), kill),
                );
            }
            Some(i) => {
                let spec = proxy.upstreams[i].clone();
                tracing::info!(%addr, upstream = %spec.destination, "upstream listener ready");
                let ctx = Arc::new(UpstreamContext {
                    spec,
                    endpoints: endpoints[i].clone(),
                    tls: tls.clone(),
                    trust_domain: config.trust_domain,
                });
                spawn_listener(
                    listener,
                    "upstream",
                    &stop_accepting,
                    &tracker,
                    &kill_connections,
                    move |s, kill| outbound::serve_conn(s, ctx.clone(), kill),
                );
            }
        }
    }
    spawn_config_change_notice(config_rx, proxy, background.clone());
    notify::ready();
    tracing::info!("proxy ready");
    Ok(Started {
        stop_accepting,
        kill_connections,
        tracker,
    })
}

impl Started {
    /// Stops accepting, lets open connections finish for up to `deadline`, then cuts the rest.
    async fn drain(self, deadline: Duration) {
        notify::stopping();
        self.stop_accepting.cancel();
        self.tracker.close();
        // The accept loops are tracked too; subtract them from the count of open connections.
        tracing::info!(deadline = ?deadline, "draining open connections");
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.tracker.len(),
                "drain deadline reached; closing the remaining connections"
            );
            self.kill_connections.cancel();
            self.tracker.wait().await;
        }
        tracing::info!("proxy stopped");
    }
}

fn spawn_listener<F, Fut>(
    listener: Listener,
    kind: &'static str,
    stop: &CancellationToken,
    tracker: &TaskTracker,
    kill: &CancellationToken,
    handle: F,
) where
    F: Fn(net::Stream, CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let kill = kill.clone();
    tracker.spawn(net::accept_loop(
        listener,
        kind,
        stop.clone(),
        tracker.clone(),
        move |s| handle(s, kill.clone()),
    ));
}

async fn bind(addr: &BindAddr) -> Result<Listener, AppError> {
    Listener::bind(addr).await.map_err(|source| AppError::Bind {
        addr: addr.to_string(),
        source,
    })
}

async fn wait_ready<T>(rx: &Subscriber<T>) {
    let mut rx = rx.clone();
    // Err only when the sender is gone, i.e. we are shutting down.
    let _ = rx.wait_for(Option::is_some).await;
}

/// Until live reconfiguration lands, say clearly that a changed registration needs a restart.
fn spawn_config_change_notice(
    mut rx: Subscriber<ProxyConfig>,
    running: ProxyConfig,
    cancel: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let latest = rx.borrow_and_update().clone();
            if latest.as_deref().is_some_and(|c| *c != running) {
                tracing::warn!("the proxy registration changed; restart consul-proxy to apply it");
            }
        }
    });
}

/// Calls `f` until the agent answers something other than "unavailable": unreachable, 5xx,
/// 429 or a protocol hiccup. The first failure is logged once; retries back off.
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
                if failures == 1 {
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
        ConsulError::Unreachable { .. } | ConsulError::Protocol { .. } => true,
        ConsulError::Status { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}
