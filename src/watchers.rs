//! The background watches: one blocking-query loop per piece of agent state, each publishing
//! a typed snapshot (`None` until the first good value).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::watch::channel;
use tokio_util::sync::CancellationToken;

use crate::authz::Intentions;
use crate::consul::watch::{self, Hash, Index, Subscriber, WatchSettings};
use crate::consul::{Blocking, ConsulClient};
use crate::endpoints::Endpoints;
use crate::proxy_config::{Defaults, Destination, HostNames, ProxyConfig, UpstreamSpec};
use crate::tls::{Leaf, TrustBundle, next_revalidation};

/// Watch names, as logs and the admin endpoint show them.
const ROOTS: &str = "roots";
const LEAF: &str = "leaf";
const INTENTIONS: &str = "intentions";
const PROXY_CONFIG: &str = "proxy-config";

/// The watches the proxy cannot serve without: a 403 on one of them before its first value
/// stops start-up. (An upstream's endpoints are not among them: the other upstreams and the
/// public listener serve meanwhile.)
pub const ESSENTIAL: [&str; 4] = [ROOTS, LEAF, INTENTIONS, PROXY_CONFIG];

/// How often prepared queries (which cannot block) are re-executed.
pub const PREPARED_QUERY_INTERVAL: Duration = Duration::from_secs(10);

/// The pause after a first empty answer of a polled endpoint read; see [`poll_pause`].
const EMPTY_ANSWER_RETRY: Duration = Duration::from_secs(1);

/// How long a polled endpoint read (a prepared query, or a service upstream without a
/// long-poll slot) waits before the next one, after `empty_answers` empty answers in a row.
/// An empty answer most often means the destination is not up yet, and until the next read
/// the upstream refuses every connection; so the next read comes sooner: 1 s after the first
/// empty answer, doubling up to the usual `interval`. (A service watch's token bucket still
/// bounds how often it reads.)
fn poll_pause(empty_answers: u32, interval: Duration) -> Duration {
    match empty_answers {
        0 => interval,
        n => EMPTY_ANSWER_RETRY
            .saturating_mul(1 << (n - 1).min(16))
            .min(interval),
    }
}

/// Empty answers in a row of one endpoint watch (reset by any non-empty one), shared between
/// the watch's query builder and the reads it makes.
#[derive(Clone, Default)]
struct EmptyAnswers(Arc<AtomicU32>);

impl EmptyAnswers {
    /// The pause before the next polled read; see [`poll_pause`].
    fn pause(&self, interval: Duration) -> Duration {
        poll_pause(self.0.load(Ordering::Relaxed), interval)
    }

    /// Counts an answer.
    fn note(&self, endpoints: &Endpoints) {
        if endpoints.list.is_empty() {
            self.0.fetch_add(1, Ordering::Relaxed);
        } else {
            self.0.store(0, Ordering::Relaxed);
        }
    }
}

/// Endpoint watches may poll this many times back to back ...
const ENDPOINTS_BURST: u32 = 3;
/// ... and then once per this interval while the health results keep changing: the rate the
/// blocking-query docs ask for when results churn (flapping checks on a large service would
/// otherwise have every proxy on every node re-query the servers several times a second).
/// A stale endpoint list only costs a retry; the security-relevant watches (roots, leaf,
/// intentions, our registration) keep the quick default so changes apply at once.
const ENDPOINTS_REFILL: Duration = Duration::from_secs(15);

fn blocking(index: Index, settings: &WatchSettings) -> Blocking {
    Blocking {
        index: index.0,
        wait: settings.wait,
    }
}

/// Watches the CA roots.
pub fn spawn_roots(
    client: ConsulClient,
    settings: WatchSettings,
    cancel: CancellationToken,
) -> Subscriber<TrustBundle> {
    let (tx, rx) = channel(None);
    tokio::spawn(async move {
        watch::run(ROOTS, &settings, tx, cancel, |index: Index| {
            let client = client.clone();
            let q = blocking(index, &settings);
            async move {
                let r = client.ca_roots(q).await?;
                let bundle = TrustBundle::from_api(&r.value).map(|(bundle, warnings)| {
                    for w in warnings {
                        tracing::error!(warning = %w, "CA roots");
                    }
                    bundle
                });
                Ok((Index(r.index), bundle))
            }
        })
        .await
    });
    rx
}

/// Watches our leaf certificate (issued for the service name we front).
///
/// Besides the blocking query, a safety net: once the agent is overdue renewing the current
/// leaf, it is also read without blocking now and then, which makes the agent re-issue it
/// once expired (see [`next_revalidation`]).
pub fn spawn_leaf(
    client: ConsulClient,
    service: String,
    settings: WatchSettings,
    cancel: CancellationToken,
) -> Subscriber<Leaf> {
    let (tx, rx) = channel(None);
    // The last leaf read (not a receiver of `tx`: the watch must still see when nobody
    // subscribes any more).
    let current: Arc<std::sync::Mutex<Option<LeafTiming>>> = Arc::default();
    // (serial, when) of the last non-blocking read for the current leaf.
    let mut revalidated: Option<(String, i64)> = None;
    // Whether the last read was answered with an error by the agent itself (5xx, 429): for an
    // expired leaf, a signing request that failed.
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(async move {
        watch::run(LEAF, &settings, tx, cancel, |index: Index| {
            let client = client.clone();
            let service = service.clone();
            let current = current.clone();
            let leaf = current.lock().unwrap().clone();
            let (q, pause) = leaf_query(
                index,
                &settings,
                leaf.as_ref(),
                &mut revalidated,
                LeafRead {
                    now: unix_now(),
                    after_refusal: refused.load(Ordering::Relaxed),
                },
            );
            let refused = refused.clone();
            async move {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let r = client.ca_leaf(&service, q).await;
                let answered_with_error = matches!(
                    &r,
                    Err(crate::consul::ConsulError::Status { .. }
                        | crate::consul::ConsulError::TooManyRequests { .. })
                );
                refused.store(answered_with_error, Ordering::Relaxed);
                let r = r?;
                let leaf = Leaf::from_api(&r.value, &service);
                if let Ok(leaf) = &leaf {
                    *current.lock().unwrap() = Some(LeafTiming::of(leaf));
                }
                Ok((Index(r.index), leaf))
            }
        })
        .await
    });
    rx
}

/// What the leaf watch needs to know of the current leaf to schedule revalidations.
#[derive(Clone, Debug)]
struct LeafTiming {
    serial: String,
    valid_before: String,
    overdue_at: i64,
    not_after: i64,
}

impl LeafTiming {
    fn of(leaf: &Leaf) -> Self {
        LeafTiming {
            serial: leaf.serial().to_owned(),
            valid_before: leaf.valid_before().to_owned(),
            overdue_at: leaf.renewal_overdue_at(),
            not_after: leaf.not_after_unix(),
        }
    }
}

/// When a leaf query is made, as [`leaf_query`] needs to know.
#[derive(Clone, Copy, Debug)]
struct LeafRead {
    /// Unix seconds.
    now: i64,
    /// The previous read was answered with an error by the agent (5xx, 429), not lost on
    /// the way (agent down or busy).
    after_refusal: bool,
}

/// The next leaf query: blocking from `index`, but not past the next revalidation of the
/// current leaf, which is a non-blocking read; and how long to wait before sending it. The
/// wait is zero except when retrying after the agent refused to read a leaf that has expired:
/// every such read asks the servers to sign a new certificate, so while they cannot, retries
/// keep to the revalidation pace (one per `REVALIDATE_EVERY_SECS`, 30 s) instead of the
/// watch's quicker error backoff, and a fleet of proxies stays under the servers' signing rate
/// limit. After an agent that was unreachable there was no signing to pace: the retry goes
/// at once, so a restarted agent is asked for the leaf without delay.
fn leaf_query(
    index: Index,
    settings: &WatchSettings,
    leaf: Option<&LeafTiming>,
    revalidated: &mut Option<(String, i64)>,
    read: LeafRead,
) -> (Blocking, Duration) {
    let now = read.now;
    let mut q = blocking(index, settings);
    let mut pause = Duration::ZERO;
    if let Some(leaf) = leaf {
        let last = revalidated
            .as_ref()
            .filter(|(serial, _)| *serial == leaf.serial)
            .map(|(_, at)| *at);
        let due = next_revalidation(leaf.overdue_at, leaf.not_after, last);
        if read.after_refusal && index.0 == 0 && now > leaf.not_after && now < due {
            // A retry of a refused read of an expired leaf: wait for its turn.
            pause = Duration::from_secs(u64::try_from(due - now).unwrap_or(0));
            *revalidated = Some((leaf.serial.clone(), due));
        } else if now >= due {
            if last.is_none() {
                tracing::warn!(
                    serial = %leaf.serial,
                    valid_before = %leaf.valid_before,
                    "the agent has not renewed our leaf certificate by 90% of its lifetime; reading it without blocking until it does"
                );
            }
            *revalidated = Some((leaf.serial.clone(), now));
            q.index = 0;
        } else {
            let until_due = u64::try_from(due - now).unwrap_or(1).max(1);
            q.wait = q.wait.min(Duration::from_secs(until_due));
        }
    }
    (q, pause)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Watches the intentions whose destination is `service`.
pub fn spawn_intentions(
    client: ConsulClient,
    service: String,
    settings: WatchSettings,
    cancel: CancellationToken,
) -> Subscriber<Intentions> {
    let (tx, rx) = channel(None);
    tokio::spawn(async move {
        watch::run(INTENTIONS, &settings, tx, cancel, |index: Index| {
            let client = client.clone();
            let service = service.clone();
            let q = blocking(index, &settings);
            async move {
                let r = client.intentions_match(&service, q).await?;
                Ok((Index(r.index), Ok(Intentions::from_api(&service, r.value))))
            }
        })
        .await
    });
    rx
}

/// Watches the proxy's own registration (hash-based blocking), starting from `initial`.
pub fn spawn_proxy_config(
    client: ConsulClient,
    proxy_id: String,
    initial: (ProxyConfig, String),
    host_names: Arc<HostNames>,
    defaults: Defaults,
    settings: WatchSettings,
    cancel: CancellationToken,
) -> Subscriber<ProxyConfig> {
    let (config, hash) = initial;
    let running = config.clone();
    let (tx, rx) = channel(Some(Arc::new(config)));
    // Whether the agent last said our registration does not exist (deregistered).
    let gone = std::sync::atomic::AtomicBool::new(false);
    tokio::spawn(async move {
        let read = Some(Hash(Some(hash)));
        watch::run_from(PROXY_CONFIG, &settings, tx, cancel, read, |cursor: Hash| {
            let client = client.clone();
            let proxy_id = proxy_id.clone();
            let hash = cursor.0;
            let wait = settings.wait;
            let running = &running;
            let host_names = &host_names;
            let gone = &gone;
            async move {
                let answer = client.agent_service(&proxy_id, hash.as_deref(), wait).await;
                note_registration_presence(gone, &proxy_id, &answer);
                let (mut svc, hash) = answer?;
                let resolved = host_names.resolve(&mut svc).await;
                let converted = resolved
                    .and_then(|resolved| {
                        let mut c = ProxyConfig::from_api(&svc, &defaults)?;
                        c.notes.splice(0..0, resolved);
                        Ok(c)
                    })
                    .and_then(|c| running.can_become(&c.config).map(|()| c))
                    .map(|c| {
                        for note in c.notes {
                            tracing::info!(%note, "proxy configuration");
                        }
                        c.config
                    });
                Ok((Hash(Some(hash)), converted))
            }
        })
        .await
    });
    rx
}

/// Logs once when our registration disappears from the agent (the generic "watch failing"
/// warning would not say that the service was deregistered) and once when it is back.
fn note_registration_presence<T>(
    gone: &std::sync::atomic::AtomicBool,
    proxy_id: &str,
    answer: &Result<T, crate::consul::ConsulError>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    match answer {
        Err(e) if e.is_not_found() && !gone.swap(true, Relaxed) => {
            tracing::error!(
                %proxy_id,
                "our registration was removed from the agent (deregistered?); serving the last configuration until it is registered again"
            );
        }
        Ok(_) if gone.swap(false, Relaxed) => {
            tracing::info!(%proxy_id, "our registration is back");
        }
        _ => {}
    }
}

/// Upstream endpoint watches that long-poll the agent at once when it speaks HTTP/1.1 (plain
/// HTTP, unix socket), where each long-poll holds a connection and the agent allows
/// `limits.http_max_conns_per_client` (200) per client address for all proxies on the host.
/// With the four essential watches, two short requests and two idle connections, a proxy
/// then holds at most about this + 8 connections to the agent.
pub const ENDPOINT_LONG_POLLS_HTTP1: usize = 4;

/// How often an upstream without a long-poll slot reads its endpoints (from the agent's
/// cache: a local read, no server round trip): the rate endpoint watches are held to anyway
/// when results churn. A stale list costs at most a retry.
const ENDPOINTS_POLL_INTERVAL: Duration = ENDPOINTS_REFILL;

/// One endpoint watch's hold on a long-poll slot: taken for a blocking read when one is free
/// (or later, when another upstream's watch ends or fails), kept while its reads succeed.
#[derive(Default)]
struct LongPollSlot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Whether this watch has said it polls (said once, until it gets a slot).
    said: bool,
}

impl LongPollSlot {
    /// Gives the slot back, if held.
    fn release(&mut self) {
        self.permit = None;
    }

    /// Whether this watch may long-poll now; takes a free slot if it has none.
    fn take(&mut self, slots: &Arc<tokio::sync::Semaphore>, service: &str) -> bool {
        if self.permit.is_none() {
            self.permit = slots.clone().try_acquire_owned().ok();
            match (&self.permit, self.said) {
                (None, false) => {
                    tracing::info!(
                        upstream = service,
                        interval = ?ENDPOINTS_POLL_INTERVAL,
                        "every agent long-poll slot is in use (over HTTP/1.1 each holds a connection); polling this upstream's endpoints instead (the agent's HTTPS port lifts the limit)"
                    );
                    self.said = true;
                }
                (Some(_), true) => {
                    tracing::info!(
                        upstream = service,
                        "a long-poll slot is free; long-polling this upstream's endpoints again"
                    );
                    self.said = false;
                }
                _ => {}
            }
        }
        self.permit.is_some()
    }
}

/// Watches the endpoints of one upstream: blocking health queries for services, periodic
/// execution for prepared queries (they cannot block).
pub fn spawn_endpoints(
    client: ConsulClient,
    spec: &UpstreamSpec,
    settings: WatchSettings,
    cancel: CancellationToken,
) -> Subscriber<Endpoints> {
    let (tx, rx) = channel(None);
    let datacenter = spec.datacenter.clone();
    // Named for logs and the admin endpoint; two upstreams to one service in different
    // datacenters are different watches.
    let name = match &datacenter {
        Some(dc) => format!("endpoints {} in {dc}", spec.destination),
        None => format!("endpoints {}", spec.destination),
    };
    match spec.destination.clone() {
        Destination::Service(service) => {
            let settings = WatchSettings {
                burst: ENDPOINTS_BURST,
                refill: ENDPOINTS_REFILL,
                ..settings
            };
            tokio::spawn(async move {
                let slots = settings.endpoint_long_polls.clone();
                let mut slot = LongPollSlot::default();
                let empty_answers = EmptyAnswers::default();
                watch::run(&name, &settings, tx, cancel, |index: Index| {
                    let client = client.clone();
                    let (service, dc) = (service.clone(), datacenter.clone());
                    let empty = empty_answers.clone();
                    let mut q = blocking(index, &settings);
                    let pause = if q.index == 0 {
                        // A first read (at start, after an error) does not block: it needs
                        // no slot, and a watch that keeps failing holds none.
                        slot.release();
                        None
                    } else if slot.take(&slots, &service) {
                        None
                    } else {
                        // Polled: a non-blocking read of the agent's cache, one per interval.
                        q.index = 0;
                        Some(empty.pause(ENDPOINTS_POLL_INTERVAL))
                    };
                    async move {
                        if let Some(pause) = pause {
                            tokio::time::sleep(pause).await;
                        }
                        let r = client.health_connect(&service, dc.as_deref(), q).await?;
                        let endpoints = Endpoints::from_health(&r.value);
                        empty.note(&endpoints);
                        Ok((Index(r.index), Ok(endpoints)))
                    }
                })
                .await
            });
        }
        Destination::PreparedQuery(query) => {
            tokio::spawn(async move {
                let empty_answers = EmptyAnswers::default();
                // The cursor counts successful polls: 0 (start, or after an error) polls at once.
                watch::run(&name, &settings, tx, cancel, |polls: Index| {
                    let client = client.clone();
                    let (query, dc) = (query.clone(), datacenter.clone());
                    let empty = empty_answers.clone();
                    async move {
                        if polls.0 > 0 {
                            tokio::time::sleep(empty.pause(PREPARED_QUERY_INTERVAL)).await;
                        }
                        let r = client.prepared_query(&query, dc.as_deref()).await?;
                        let endpoints = Endpoints::from_health(&r.nodes);
                        empty.note(&endpoints);
                        Ok((Index(polls.0 + 1), Ok(endpoints)))
                    }
                })
                .await
            });
        }
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polled_reads_come_sooner_while_the_answer_is_empty() {
        let interval = Duration::from_secs(10);
        assert_eq!(poll_pause(0, interval), interval);
        let pauses: Vec<u64> = (1..=6).map(|n| poll_pause(n, interval).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 10, 10]);
        assert_eq!(poll_pause(u32::MAX, interval), interval);
    }

    fn timing(overdue_at: i64, not_after: i64) -> LeafTiming {
        LeafTiming {
            serial: "01".into(),
            valid_before: "then".into(),
            overdue_at,
            not_after,
        }
    }

    #[test]
    fn a_young_leaf_is_watched_blocking_until_its_revalidation() {
        let settings = WatchSettings::default();
        let leaf = timing(1_000, 1_100);
        let mut revalidated = None;
        let (q, pause) = leaf_query(Index(7), &settings, Some(&leaf), &mut revalidated, at(900));
        assert_eq!(
            (q.index, q.wait, pause),
            (7, Duration::from_secs(100), Duration::ZERO)
        );
        // A retry after an error (index 0) of a valid leaf goes at once: a cheap cache read.
        let read = refused(900);
        let (q, pause) = leaf_query(Index(0), &settings, Some(&leaf), &mut revalidated, read);
        assert_eq!((q.index, pause), (0, Duration::ZERO));
        assert_eq!(revalidated, None);
    }

    fn at(now: i64) -> LeafRead {
        LeafRead {
            now,
            after_refusal: false,
        }
    }

    fn refused(now: i64) -> LeafRead {
        LeafRead {
            now,
            after_refusal: true,
        }
    }

    #[test]
    fn retries_for_an_expired_leaf_keep_to_the_revalidation_pace() {
        let settings = WatchSettings::default();
        let leaf = timing(1_000, 1_100);
        // The read one second after expiry (asks the agent to re-issue it) ...
        let mut revalidated = Some(("01".to_owned(), 1_090));
        let read = at(1_101);
        let (q, pause) = leaf_query(Index(7), &settings, Some(&leaf), &mut revalidated, read);
        assert_eq!((q.index, pause), (0, Duration::ZERO));
        assert_eq!(revalidated, Some(("01".to_owned(), 1_101)));
        // ... was refused: the retry waits for the next turn, 30 s later, not the error backoff.
        let read = refused(1_102);
        let (q, pause) = leaf_query(Index(0), &settings, Some(&leaf), &mut revalidated, read);
        assert_eq!((q.index, pause), (0, Duration::from_secs(29)));
        assert_eq!(revalidated, Some(("01".to_owned(), 1_131)));
        // And the one after that 30 s later again.
        let read = refused(1_132);
        let (_, pause) = leaf_query(Index(0), &settings, Some(&leaf), &mut revalidated, read);
        assert_eq!(pause, Duration::from_secs(29));
        // An agent that was unreachable signed nothing: its retry goes at once.
        let read = at(1_170);
        let (q, pause) = leaf_query(Index(0), &settings, Some(&leaf), &mut revalidated, read);
        assert_eq!((q.index, pause), (0, Duration::ZERO));
    }

    #[test]
    fn an_answer_with_endpoints_resets_the_count_of_empty_ones() {
        let interval = Duration::from_secs(10);
        let count = EmptyAnswers::default();
        count.note(&Endpoints::default());
        count.note(&Endpoints::default());
        assert_eq!(count.pause(interval), Duration::from_secs(2));
        let one = Endpoints {
            list: vec![crate::endpoints::Endpoint {
                host: "127.0.0.1".into(),
                port: 21000,
                service: "db".into(),
                datacenter: "dc1".into(),
            }],
        };
        count.note(&one);
        assert_eq!(count.pause(interval), interval);
    }
}
