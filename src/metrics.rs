//! Process-wide counters, rendered in the Prometheus text format by the admin endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::consul::watch::WatchState;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter the proxy keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Inbound connections authorized and forwarded to the app.
    pub inbound_authorized: Counter,
    /// Inbound connections refused by authorization.
    pub inbound_denied: Counter,
    /// Inbound TLS handshakes that failed (bad or missing certificate, a chain whose root was
    /// removed while the handshake ran, garbage, timeout).
    pub inbound_handshake_failed: Counter,
    /// Inbound callers whose certificate carried no usable identity.
    pub inbound_identity_rejected: Counter,
    /// Inbound connections whose local app could not be reached.
    pub inbound_app_unreachable: Counter,
    /// Live connections closed because an intention change now denies them.
    pub closed_reauthorization: Counter,
    /// Live connections closed because the root their chain ends in was removed.
    pub closed_trust: Counter,
    /// Live connections closed at their maximum lifetime.
    pub closed_lifetime: Counter,
    /// Live connections closed after the idle timeout.
    pub closed_idle: Counter,
    /// Inbound connections refused because the connection limit was reached.
    pub inbound_over_limit: Counter,
    /// Inbound connections refused because the new-connection rate limit was reached.
    pub inbound_rate_limited: Counter,
    /// Upstream connections established.
    pub upstream_connected: Counter,
    /// Upstream connections that found no endpoint or exhausted their attempts.
    pub upstream_failed: Counter,
    /// Upstream servers that presented the wrong identity.
    pub upstream_identity_mismatch: Counter,
    /// Live upstream connections closed because the root the server's chain ends in was
    /// removed.
    pub upstream_closed_trust: Counter,
    /// Inbound TLS handshakes completed in full.
    pub inbound_tls_full: Counter,
    /// Inbound TLS handshakes that resumed a session.
    pub inbound_tls_resumed: Counter,
    /// Outbound TLS handshakes completed in full.
    pub outbound_tls_full: Counter,
    /// Outbound TLS handshakes that resumed a session.
    pub outbound_tls_resumed: Counter,
    /// How inbound connections ended when the proxy did not close them itself.
    pub inbound_ended: Endings,
    /// How upstream connections ended when the proxy did not close them itself.
    pub upstream_ended: Endings,
}

/// Counts of [`crate::forward::Ending`]s.
#[derive(Debug, Default)]
pub struct Endings {
    /// Both sides ended in order.
    pub orderly: Counter,
    /// The TLS peer ended without `close_notify`.
    pub truncated: Counter,
    /// A read or write failed.
    pub failed: Counter,
}

impl Endings {
    /// Counts `ending`; returns whether it was orderly.
    pub fn count(&self, ending: crate::forward::Ending) -> bool {
        use crate::forward::Ending;
        match ending {
            Ending::Orderly => self.orderly.inc(),
            Ending::Truncated => self.truncated.inc(),
            Ending::Failed => self.failed.inc(),
        }
        ending == Ending::Orderly
    }
}

impl Metrics {
    /// The Prometheus text exposition, with the live connection gauges.
    pub fn render(&self, inbound_active: usize, upstream_active: usize) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP consul_proxy_{name} {help}");
            let _ = writeln!(out, "# TYPE consul_proxy_{name} counter");
            for (labels, v) in samples {
                let _ = writeln!(out, "consul_proxy_{name}{labels} {v}");
            }
        };
        counter(
            "inbound_connections_total",
            "Inbound connections by outcome.",
            &[
                ("{result=\"authorized\"}", self.inbound_authorized.get()),
                ("{result=\"denied\"}", self.inbound_denied.get()),
                (
                    "{result=\"handshake_failed\"}",
                    self.inbound_handshake_failed.get(),
                ),
                (
                    "{result=\"identity_rejected\"}",
                    self.inbound_identity_rejected.get(),
                ),
                (
                    "{result=\"app_unreachable\"}",
                    self.inbound_app_unreachable.get(),
                ),
                ("{result=\"over_limit\"}", self.inbound_over_limit.get()),
                ("{result=\"rate_limited\"}", self.inbound_rate_limited.get()),
            ],
        );
        counter(
            "inbound_closed_total",
            "Live inbound connections closed by the proxy, by reason.",
            &[
                (
                    "{reason=\"reauthorization\"}",
                    self.closed_reauthorization.get(),
                ),
                ("{reason=\"trust\"}", self.closed_trust.get()),
                ("{reason=\"lifetime\"}", self.closed_lifetime.get()),
                ("{reason=\"idle\"}", self.closed_idle.get()),
            ],
        );
        counter(
            "upstream_connections_total",
            "Upstream connections by outcome.",
            &[
                ("{result=\"connected\"}", self.upstream_connected.get()),
                ("{result=\"failed\"}", self.upstream_failed.get()),
                (
                    "{result=\"identity_mismatch\"}",
                    self.upstream_identity_mismatch.get(),
                ),
            ],
        );
        counter(
            "upstream_closed_total",
            "Live upstream connections closed by the proxy, by reason.",
            &[("{reason=\"trust\"}", self.upstream_closed_trust.get())],
        );
        counter(
            "tls_handshakes_total",
            "Completed TLS handshakes by side and kind (resumption happens only between consul-proxy peers).",
            &[
                (
                    "{side=\"inbound\",kind=\"full\"}",
                    self.inbound_tls_full.get(),
                ),
                (
                    "{side=\"inbound\",kind=\"resumed\"}",
                    self.inbound_tls_resumed.get(),
                ),
                (
                    "{side=\"outbound\",kind=\"full\"}",
                    self.outbound_tls_full.get(),
                ),
                (
                    "{side=\"outbound\",kind=\"resumed\"}",
                    self.outbound_tls_resumed.get(),
                ),
            ],
        );
        let ended = |side: &'static str, e: &Endings| {
            [
                ("orderly", e.orderly.get()),
                ("truncated", e.truncated.get()),
                ("failed", e.failed.get()),
            ]
            .map(|(how, v)| (format!("{{side=\"{side}\",how=\"{how}\"}}"), v))
        };
        let samples: Vec<(String, u64)> = ended("inbound", &self.inbound_ended)
            .into_iter()
            .chain(ended("upstream", &self.upstream_ended))
            .collect();
        counter(
            "connections_ended_total",
            "Connections that ended without the proxy closing them: in order, cut by a TLS peer that sent no close_notify (truncated), or by an error such as a reset (failed); the last two are passed on as resets.",
            &samples
                .iter()
                .map(|(l, v)| (l.as_str(), *v))
                .collect::<Vec<_>>(),
        );
        let _ = writeln!(
            out,
            "# HELP consul_proxy_inbound_active Live inbound connections."
        );
        let _ = writeln!(out, "# TYPE consul_proxy_inbound_active gauge");
        let _ = writeln!(out, "consul_proxy_inbound_active {inbound_active}");
        let _ = writeln!(
            out,
            "# HELP consul_proxy_upstream_active Live upstream connections."
        );
        let _ = writeln!(out, "# TYPE consul_proxy_upstream_active gauge");
        let _ = writeln!(out, "consul_proxy_upstream_active {upstream_active}");
        out
    }
}

/// Appends the agent watches' states and our leaf's expiry to a Prometheus text exposition.
pub fn render_health(
    out: &mut String,
    watches: &BTreeMap<String, WatchState>,
    leaf_not_after_unix: Option<i64>,
) {
    let mut family =
        |name: &str, kind: &str, help: &str, value: &dyn Fn(&WatchState) -> Option<u64>| {
            let _ = writeln!(out, "# HELP consul_proxy_{name} {help}");
            let _ = writeln!(out, "# TYPE consul_proxy_{name} {kind}");
            for (watch, state) in watches {
                if let Some(v) = value(state) {
                    let _ = writeln!(out, "consul_proxy_{name}{{watch=\"{}\"}} {v}", label(watch));
                }
            }
        };
    family(
        "agent_watch_failing",
        "gauge",
        "1 while an agent watch's requests fail (the proxy serves its last good value).",
        &|s| Some(u64::from(s.failing)),
    );
    family(
        "agent_watch_errors_total",
        "counter",
        "Failed requests per agent watch.",
        &|s| Some(s.errors),
    );
    family(
        "agent_watch_rejected_total",
        "counter",
        "Agent responses rejected as invalid, per watch.",
        &|s| Some(s.rejected),
    );
    family(
        "agent_watch_last_success_timestamp_seconds",
        "gauge",
        "When the agent last answered each watch.",
        &|s| s.last_success_unix,
    );
    if let Some(t) = leaf_not_after_unix {
        let _ = writeln!(
            out,
            "# HELP consul_proxy_leaf_expiry_timestamp_seconds When our current leaf certificate expires."
        );
        let _ = writeln!(
            out,
            "# TYPE consul_proxy_leaf_expiry_timestamp_seconds gauge"
        );
        let _ = writeln!(out, "consul_proxy_leaf_expiry_timestamp_seconds {t}");
    }
}

/// A Prometheus label value, escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.inbound_denied.inc();
        m.closed_reauthorization.inc();
        m.closed_reauthorization.inc();
        m.upstream_closed_trust.inc();
        let text = m.render(3, 2);
        assert!(text.contains("consul_proxy_inbound_connections_total{result=\"denied\"} 1\n"));
        assert!(text.contains("consul_proxy_upstream_closed_total{reason=\"trust\"} 1\n"));
        assert!(text.contains("consul_proxy_upstream_active 2\n"));
        assert!(text.contains("consul_proxy_inbound_closed_total{reason=\"reauthorization\"} 2\n"));
        assert!(text.contains("consul_proxy_inbound_active 3\n"));
        m.outbound_tls_resumed.inc();
        let text = m.render(0, 0);
        assert!(
            text.contains(
                "consul_proxy_tls_handshakes_total{side=\"outbound\",kind=\"resumed\"} 1\n"
            )
        );
        assert!(text.contains("# TYPE consul_proxy_inbound_active gauge\n"));
    }

    #[test]
    fn renders_watch_health_with_escaped_labels() {
        let mut watches = BTreeMap::new();
        let failing = WatchState {
            failing: true,
            errors: 4,
            ..WatchState::default()
        };
        let fine = WatchState {
            last_success_unix: Some(1_700_000_000),
            rejected: 1,
            ..WatchState::default()
        };
        watches.insert("query \"a\\b\"".to_owned(), failing);
        watches.insert("leaf".to_owned(), fine);
        let mut text = String::new();
        render_health(&mut text, &watches, Some(1_800_000_000));
        for line in [
            "consul_proxy_agent_watch_failing{watch=\"query \\\"a\\\\b\\\"\"} 1\n",
            "consul_proxy_agent_watch_errors_total{watch=\"query \\\"a\\\\b\\\"\"} 4\n",
            "consul_proxy_agent_watch_failing{watch=\"leaf\"} 0\n",
            "consul_proxy_agent_watch_rejected_total{watch=\"leaf\"} 1\n",
            "consul_proxy_agent_watch_last_success_timestamp_seconds{watch=\"leaf\"} 1700000000\n",
            "consul_proxy_leaf_expiry_timestamp_seconds 1800000000\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(
            !text.contains("last_success_timestamp_seconds{watch=\"query"),
            "no sample for a watch that never succeeded"
        );
    }
}
