//! The generic blocking-query loop: long-poll the agent, publish each *changed* value into a
//! `watch` channel, keep the last good value when the agent fails ("fail static").
//!
//! Rules (Consul's blocking-query docs, and the API reference section 2):
//! - `index` and `wait` are always sent; the request timeout exceeds `wait + wait/16`;
//! - an index that goes backwards resets to 0 (one non-blocking read), 0 becomes 1;
//! - requests are rate-limited by a small token bucket, so a churning value cannot spin
//!   (endpoint watches degrade to one poll per 15 s under churn, see `watchers.rs`);
//! - errors back off exponentially with jitter up to a cap, and forget the index;
//! - a returned call is not a change: values are compared before publishing;
//! - state changes (failing, recovered) are logged once, not on every retry, and every
//!   watch's state is kept in [`WatchHealth`] for the admin endpoint.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::error::ConsulError;

/// Timing of the loop.
#[derive(Clone, Debug)]
pub struct WatchSettings {
    /// The `wait` sent with each blocking request.
    pub wait: Duration,
    /// First retry delay after an error.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// Requests allowed back to back.
    pub burst: u32,
    /// One request token is refilled per this interval.
    pub refill: Duration,
    /// Where each watch reports its state (shared by every clone of these settings).
    pub health: Arc<WatchHealth>,
    /// Slots for upstream endpoint long-polls (shared by every clone): an endpoint watch that
    /// gets none polls instead (see `watchers::spawn_endpoints`). Unlimited by default.
    pub endpoint_long_polls: Arc<tokio::sync::Semaphore>,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            wait: Duration::from_secs(300),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(10),
            burst: 3,
            refill: Duration::from_millis(250),
            health: Arc::default(),
            endpoint_long_polls: Arc::new(tokio::sync::Semaphore::new(
                tokio::sync::Semaphore::MAX_PERMITS,
            )),
        }
    }
}

/// The state of every running watch, for operators: a proxy serving from its last good
/// values ("fail static") looks healthy from the outside, so this is where it shows.
#[derive(Debug)]
pub struct WatchHealth {
    /// Each watch's state, and how many loops with that name run (a replaced watch may
    /// overlap its successor briefly).
    by_name: Mutex<BTreeMap<String, (u32, WatchState)>>,
    /// Bumped on every failure, so that start-up can react to one without polling.
    failures: watch::Sender<u64>,
    /// Bumped whenever a failing watch is answered again (the agent may have restarted with
    /// other settings).
    recoveries: watch::Sender<u64>,
}

impl Default for WatchHealth {
    fn default() -> Self {
        WatchHealth {
            by_name: Mutex::default(),
            failures: watch::channel(0).0,
            recoveries: watch::channel(0).0,
        }
    }
}

/// One watch's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchState {
    /// The last request failed (the watch serves its last good value meanwhile).
    pub failing: bool,
    /// Failed requests since the watch started.
    pub errors: u64,
    /// Responses rejected as invalid since the watch started (the last good value stays).
    pub rejected: u64,
    /// When the agent last answered, in seconds since the Unix epoch.
    pub last_success_unix: Option<u64>,
    /// What the current failure is (`ConsulError::kind`), while failing.
    pub failure: Option<&'static str>,
    /// The current failure's message, while failing.
    pub error: Option<String>,
}

impl WatchHealth {
    /// Every watch by name.
    pub fn snapshot(&self) -> BTreeMap<String, WatchState> {
        self.lock()
            .iter()
            .map(|(name, (_, state))| (name.clone(), state.clone()))
            .collect()
    }

    /// Resolves with `(watch, error)` as soon as one of the watches named `among` is refused
    /// by the agent's ACLs (403), now or later.
    pub async fn first_forbidden(&self, among: &[&str]) -> (String, String) {
        let mut failures = self.failures.subscribe();
        loop {
            let forbidden = self.snapshot().into_iter().find_map(|(name, s)| {
                (s.failure == Some("forbidden") && among.contains(&name.as_str()))
                    .then(|| (name, s.error.unwrap_or_default()))
            });
            if let Some(found) = forbidden {
                return found;
            }
            // The sender lives as long as `self`: this cannot fail while we borrow it.
            let _ = failures.changed().await;
        }
    }

    /// Changes whenever a failing watch recovers.
    pub fn recoveries(&self) -> watch::Receiver<u64> {
        self.recoveries.subscribe()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut WatchState)) {
        if let Some((_, state)) = self.lock().get_mut(name) {
            f(state);
        }
    }

    fn started(&self, name: &str) {
        self.lock().entry(name.to_owned()).or_default().0 += 1;
    }

    fn stopped(&self, name: &str) {
        let mut map = self.lock();
        if let Some((loops, _)) = map.get_mut(name) {
            *loops = loops.saturating_sub(1);
            if *loops == 0 {
                map.remove(name);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u32, WatchState)>> {
        // Invariant: updates are plain field writes; nothing panics under the lock.
        self.by_name.lock().expect("watch health lock")
    }
}

/// Takes a watch out of [`WatchHealth`] when its loop ends, however it ends.
struct Reporting<'a> {
    health: &'a WatchHealth,
    name: &'a str,
}

impl<'a> Reporting<'a> {
    fn start(health: &'a WatchHealth, name: &'a str) -> Self {
        health.started(name);
        Reporting { health, name }
    }

    fn answered(&self, rejected: bool) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut recovered = false;
        self.health.update(self.name, |s| {
            recovered = s.failing;
            s.failing = false;
            s.failure = None;
            s.error = None;
            s.last_success_unix = Some(now);
            s.rejected += u64::from(rejected);
        });
        if recovered {
            self.health.recoveries.send_modify(|n| *n += 1);
        }
    }

    fn failed(&self, err: &ConsulError) {
        self.health.update(self.name, |s| {
            s.failing = true;
            s.failure = Some(err.kind());
            s.error = Some(err.to_string());
            s.errors += 1;
        });
        self.health.failures.send_modify(|n| *n += 1);
    }
}

impl Drop for Reporting<'_> {
    fn drop(&mut self) {
        self.health.stopped(self.name);
    }
}

/// Where a blocking query resumes from.
pub trait Cursor: Clone + Default + Send + 'static {
    /// The cursor to use after a successful response that returned `returned`.
    fn advance(&self, returned: Self) -> Self;
}

/// An `X-Consul-Index` cursor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Index(pub u64);

impl Cursor for Index {
    fn advance(&self, returned: Self) -> Self {
        if returned.0 < self.0 {
            // Snapshot restore or similar: read once without blocking, then carry on.
            Index(0)
        } else if returned.0 == 0 {
            Index(1)
        } else {
            returned
        }
    }
}

/// An `X-Consul-ContentHash` cursor (hash-based blocking on `/v1/agent/service/:id`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hash(pub Option<String>);

impl Cursor for Hash {
    fn advance(&self, returned: Self) -> Self {
        returned
    }
}

/// The sending half of a watched value: `None` until the first good value.
pub type Publisher<T> = watch::Sender<Option<Arc<T>>>;
/// The receiving half of a watched value.
pub type Subscriber<T> = watch::Receiver<Option<Arc<T>>>;

/// A fetch either yields a value to publish or a reason it was rejected (the cursor still
/// advances, so a bad value is not re-read in a tight loop).
pub type FetchResult<C, T> = Result<(C, Result<T, String>), ConsulError>;

/// Runs the loop until `cancel` fires or every receiver is gone.
pub async fn run<T, C, F, Fut>(
    name: &str,
    settings: &WatchSettings,
    tx: Publisher<T>,
    cancel: CancellationToken,
    fetch: F,
) where
    T: PartialEq + Send + Sync,
    C: Cursor,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = FetchResult<C, T>>,
{
    run_from(name, settings, tx, cancel, None, fetch).await;
}

/// As [`run`]; with `read`, the value in `tx` was read at that cursor before the loop (at
/// start-up): it counts as an answer and the first query blocks from there instead of
/// fetching it again. After an error the loop starts over from the default cursor as usual.
pub async fn run_from<T, C, F, Fut>(
    name: &str,
    settings: &WatchSettings,
    tx: Publisher<T>,
    cancel: CancellationToken,
    read: Option<C>,
    mut fetch: F,
) where
    T: PartialEq + Send + Sync,
    C: Cursor,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = FetchResult<C, T>>,
{
    let mut bucket = TokenBucket::new(settings.burst, settings.refill, Instant::now());
    let mut failures: u32 = 0;
    // Failures in a row that were 403, 404 or 429 (see `retry_backoff`).
    let mut slow_streak: u32 = 0;
    let mut last_failure: Option<&'static str> = None;
    let mut last_rejection: Option<String> = None;
    let report = Reporting::start(&settings.health, name);
    if read.is_some() {
        report.answered(false);
    }
    let mut cursor = read.unwrap_or_default();
    loop {
        let delay = bucket.take(Instant::now());
        if !delay.is_zero() && !sleep_or_cancel(delay, &cancel).await {
            return;
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tx.closed() => return,
            r = fetch(cursor.clone()) => r,
        };
        match result {
            Ok((returned, value)) => {
                if failures > 0 {
                    tracing::info!(watch = name, failures, "agent watch recovered");
                }
                failures = 0;
                slow_streak = 0;
                last_failure = None;
                cursor = cursor.advance(returned);
                report.answered(value.is_err());
                match value {
                    Ok(v) => {
                        last_rejection = None;
                        publish(&tx, v, name);
                    }
                    Err(reason) => {
                        if last_rejection.as_deref() != Some(reason.as_str()) {
                            tracing::error!(
                                watch = name,
                                %reason,
                                "rejected an update from the agent; keeping the last good value"
                            );
                            last_rejection = Some(reason);
                        }
                    }
                }
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                slow_streak = if is_slow_to_change(&err) {
                    slow_streak.saturating_add(1)
                } else {
                    0
                };
                report.failed(&err);
                if last_failure != Some(err.kind()) {
                    tracing::warn!(
                        watch = name,
                        error = %err,
                        "agent watch failing; serving the last good value and retrying"
                    );
                    last_failure = Some(err.kind());
                } else {
                    tracing::debug!(watch = name, error = %err, failures, "agent watch still failing");
                }
                cursor = C::default();
                let (count, cap) = retry_backoff(failures, slow_streak, settings.backoff_cap);
                let delay = backoff(count, settings.backoff_base, cap, rand::random());
                if !sleep_or_cancel(delay, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Publishes `value` only if it differs from the current one.
fn publish<T: PartialEq>(tx: &Publisher<T>, value: T, name: &str) {
    let changed = tx.send_if_modified(|current| {
        if current.as_deref() == Some(&value) {
            return false;
        }
        *current = Some(Arc::new(value));
        true
    });
    if changed {
        tracing::debug!(watch = name, "agent watch published a new value");
    }
}

/// Sleeps unless cancelled first; false when cancelled.
pub async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The longest retry delay after an answer that retrying soon will not change (403, 404)
/// or that asks us to slow down (429). An agent that is down, restarting or answering 5xx
/// is retried within `backoff_cap`, so that recovery is quick; these are retried less
/// often, as the agent is up and every proxy on the host would otherwise keep asking it.
pub const SLOW_RETRY_CAP: Duration = Duration::from_secs(60);

/// 403, 404 and 429: answers from a working agent that a quick retry will not change, or
/// that ask us to slow down.
fn is_slow_to_change(err: &ConsulError) -> bool {
    matches!(
        err,
        ConsulError::Forbidden { .. }
            | ConsulError::NotFound { .. }
            | ConsulError::TooManyRequests { .. }
    )
}

/// The failure count the next retry delay grows from, and its cap. During a streak of 403,
/// 404 or 429 (`slow_streak` > 0) the delay grows from that streak alone up to
/// [`SLOW_RETRY_CAP`], so that the first of them after an outage is retried soon (the agent
/// may have just come back); other failures grow from all `failures` in a row up to `cap`.
fn retry_backoff(failures: u32, slow_streak: u32, cap: Duration) -> (u32, Duration) {
    if slow_streak > 0 {
        (slow_streak, cap.max(SLOW_RETRY_CAP))
    } else {
        (failures, cap)
    }
}

/// Delay before retry number `failures` (1-based): exponential from `base`, capped, with the
/// upper half jittered by `jitter` in [0, 1) so that many proxies do not retry in step.
pub fn backoff(failures: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let full = base.saturating_mul(1u32 << exp).min(cap);
    full / 2 + (full / 2).mul_f64(jitter.clamp(0.0, 1.0))
}

/// A token bucket: `burst` requests back to back, then one per `refill`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    refill: Duration,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, refill: Duration, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            tokens: burst,
            burst,
            refill,
            last: now,
        }
    }

    /// Takes one token; returns how long to wait before using it.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        if !self.refill.is_zero() {
            self.tokens =
                (self.tokens + elapsed.as_secs_f64() / self.refill.as_secs_f64()).min(self.burst);
        } else {
            self.tokens = self.burst;
        }
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            self.refill.mul_f64(-self.tokens)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(Index(10).advance(Index(12)), Index(12));
        assert_eq!(Index(10).advance(Index(10)), Index(10));
        assert_eq!(
            Index(10).advance(Index(3)),
            Index(0),
            "backwards resets to 0"
        );
        assert_eq!(
            Index(0).advance(Index(3)),
            Index(3),
            "after a reset the lower index is taken"
        );
        assert_eq!(Index(0).advance(Index(0)), Index(1), "0 becomes 1");
        assert_eq!(
            Index(5).advance(Index(0)),
            Index(0),
            "0 after 5 is backwards: reset first"
        );
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(1, base, cap, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(1, base, cap, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(3, base, cap, 0.0), Duration::from_millis(1000));
        assert_eq!(backoff(30, base, cap, 1.0), cap);
        assert_eq!(backoff(30, base, cap, 0.0), cap / 2);
        assert_eq!(backoff(u32::MAX, base, cap, 0.5), cap.mul_f64(0.75));
    }

    #[test]
    fn answers_that_will_not_change_soon_are_retried_less_often() {
        let cap = Duration::from_secs(10);
        let forbidden = ConsulError::Forbidden {
            endpoint: "e".into(),
            permission: "service:read".into(),
            body: "denied".into(),
        };
        let too_many = ConsulError::TooManyRequests {
            endpoint: "e".into(),
            body: "slow down".into(),
        };
        let not_found = ConsulError::NotFound {
            endpoint: "e".into(),
            body: "unknown".into(),
        };
        for err in [forbidden, too_many, not_found] {
            assert!(is_slow_to_change(&err), "{err}");
        }
        assert!(!is_slow_to_change(&status_error()), "5xx: quick recovery");
        // A 403 right after nine other failures starts its own, slower climb from the start.
        assert_eq!(retry_backoff(10, 1, cap), (1, SLOW_RETRY_CAP));
        assert_eq!(retry_backoff(14, 5, cap), (5, SLOW_RETRY_CAP));
        assert_eq!(retry_backoff(9, 0, cap), (9, cap));
    }

    #[test]
    fn token_bucket_allows_burst_then_spaces_requests() {
        let t0 = Instant::now();
        let refill = Duration::from_millis(250);
        let mut b = TokenBucket::new(3, refill, t0);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), refill);
        // After waiting that long, the next one costs another full interval.
        assert_eq!(b.take(t0 + refill), refill);
        // A long quiet period refills up to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(b.take(later), Duration::ZERO);
        }
        assert_eq!(b.take(later), refill);
    }

    /// A scripted fetch: each call pops the next answer and records the cursor it was given.
    struct Script {
        answers: Mutex<Vec<FetchResult<Index, u32>>>,
        seen: Mutex<Vec<Index>>,
        exhausted: tokio::sync::Notify,
    }

    impl Script {
        fn new(mut answers: Vec<FetchResult<Index, u32>>) -> Arc<Self> {
            answers.reverse();
            Arc::new(Script {
                answers: Mutex::new(answers),
                seen: Mutex::new(Vec::new()),
                exhausted: tokio::sync::Notify::new(),
            })
        }

        async fn fetch(&self, cursor: Index) -> FetchResult<Index, u32> {
            self.seen.lock().unwrap().push(cursor);
            let next = self.answers.lock().unwrap().pop();
            match next {
                Some(a) => a,
                None => {
                    self.exhausted.notify_one();
                    std::future::pending().await
                }
            }
        }
    }

    fn status_error() -> ConsulError {
        ConsulError::Status {
            endpoint: "test".into(),
            status: 500,
            body: "boom".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_changes_only_and_keeps_last_good_value_on_error() {
        let script = Script::new(vec![
            Ok((Index(5), Ok(1))),
            Ok((Index(6), Ok(1))), // same value, new index: not published
            Err(status_error()),   // fail static: value stays 1, index forgotten
            Ok((Index(3), Ok(2))), // after an error the cursor was 0, so 3 is accepted
            Ok((Index(2), Ok(2))), // backwards: reset to 0
            Ok((Index(9), Err("bad".into()))),
        ]);
        let (tx, mut rx) = watch::channel(None);
        let cancel = CancellationToken::new();
        let s = script.clone();
        let settings = WatchSettings::default();
        let health = settings.health.clone();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run("test", &settings, tx, cancel, |c| s.fetch(c)).await }
        });
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_deref(), Some(&1));
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_deref(), Some(&2));
        // Wait until the script is exhausted (the loop is then parked in a pending fetch).
        script.exhausted.notified().await;
        assert!(
            !rx.has_changed().unwrap(),
            "the rejected value was not published"
        );
        assert_eq!(rx.borrow().as_deref(), Some(&2));
        let seen = script.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                Index(0),
                Index(5),
                Index(6),
                Index(0),
                Index(3),
                Index(0),
                Index(9)
            ]
        );
        let state = health.snapshot().remove("test").unwrap();
        assert!(!state.failing, "the last request was answered");
        assert_eq!((state.errors, state.rejected), (1, 1));
        assert!(state.last_success_unix.is_some());
        cancel.cancel();
        task.await.unwrap();
        assert!(
            health.snapshot().is_empty(),
            "a stopped watch is no longer listed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_watch_is_reported_until_it_recovers() {
        let script = Script::new(vec![Err(status_error()), Err(status_error())]);
        let (tx, _rx) = watch::channel::<Option<Arc<u32>>>(None);
        let settings = WatchSettings::default();
        let health = settings.health.clone();
        let s = script.clone();
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { run("roots", &settings, tx, cancel, |c| s.fetch(c)).await }
        });
        script.exhausted.notified().await;
        let state = health.snapshot().remove("roots").unwrap();
        assert!(state.failing);
        assert_eq!(state.failure, Some("status"));
        assert_eq!(state.errors, 2);
        assert_eq!(state.last_success_unix, None, "never answered");
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_resuming_from_a_start_up_read_counts_it_as_answered() {
        let script = Script::new(vec![Err(status_error())]);
        let (tx, _rx) = watch::channel(Some(Arc::new(1u32)));
        let settings = WatchSettings::default();
        let health = settings.health.clone();
        let s = script.clone();
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let read = Some(Index(7));
                run_from("config", &settings, tx, cancel, read, |c| s.fetch(c)).await
            }
        });
        script.exhausted.notified().await;
        assert_eq!(
            script.seen.lock().unwrap().clone(),
            vec![Index(7), Index(0)],
            "blocks from the start-up read; after an error starts over"
        );
        let state = health.snapshot().remove("config").unwrap();
        assert!(
            state.last_success_unix.is_some(),
            "the start-up read is an answer"
        );
        assert!(state.failing, "the later error still shows");
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_every_receiver_is_gone() {
        let script = Script::new(vec![]);
        let (tx, rx) = watch::channel::<Option<Arc<u32>>>(None);
        let s = script.clone();
        let task = tokio::spawn(async move {
            run(
                "test",
                &WatchSettings::default(),
                tx,
                CancellationToken::new(),
                |c| s.fetch(c),
            )
            .await
        });
        drop(rx);
        task.await.unwrap();
    }
}
