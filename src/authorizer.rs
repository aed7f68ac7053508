//! Connection-time authorization: [`crate::authz::authorize`] over the cached intentions and
//! the agent's default policy. No agent round trip when the cache can answer.
//!
//! The default policy (what the agent does when no intention matches) is learned by asking
//! `/v1/agent/connect/authorize` about a made-up caller that no local intention matches: the
//! answer is then the default, which depends on agent settings and our token, not on the
//! caller. It is re-learned when intentions change and every few minutes. When it is unknown,
//! an unmatched caller is referred to the agent once; if that fails too, the answer is deny.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::authz::{self, Decision, DefaultPolicy, Intentions, Reason, Verdict};
use crate::consul::watch::{Subscriber, sleep_or_cancel};
use crate::consul::{ConsulClient, api};
use crate::spiffe::SpiffeId;
use crate::tls::{PeerIdentity, TrustBundle};

/// How often the default policy is re-learned even when nothing changed.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// A clonable handle shared by all inbound connections.
#[derive(Clone)]
pub struct Authorizer {
    inner: Arc<Inner>,
}

struct Inner {
    service: String,
    datacenter: String,
    intentions: Subscriber<Intentions>,
    bundle: Subscriber<TrustBundle>,
    default: watch::Sender<Option<DefaultPolicy>>,
    client: ConsulClient,
}

impl Authorizer {
    /// An authorizer for `service`, reading the given snapshots.
    pub fn new(
        client: ConsulClient,
        service: String,
        datacenter: String,
        intentions: Subscriber<Intentions>,
        bundle: Subscriber<TrustBundle>,
    ) -> Self {
        Authorizer {
            inner: Arc::new(Inner {
                service,
                datacenter,
                intentions,
                bundle,
                default: watch::channel(None).0,
                client,
            }),
        }
    }

    /// Decides from the cache alone (no I/O).
    pub fn decide_cached(&self, id: &SpiffeId) -> Decision {
        let intentions = self.inner.intentions.borrow().clone();
        let Some(intentions) = intentions else {
            return Decision {
                verdict: Verdict::Deny,
                reason: Reason::IntentionsUnknown,
            };
        };
        let default = *self.inner.default.borrow();
        authz::authorize(&intentions, id, default)
    }

    /// Decides for a new connection: the cache, or the agent when only it knows the default.
    pub async fn authorize(&self, peer: &PeerIdentity) -> Decision {
        let decision = self.decide_cached(&peer.id);
        if decision.reason != Reason::DefaultUnknown {
            return decision;
        }
        match self.ask_agent(&peer.id, &peer.serial).await {
            Ok(resp) => {
                self.learn_default(&resp);
                Decision {
                    verdict: if resp.authorized {
                        Verdict::Allow
                    } else {
                        Verdict::Deny
                    },
                    reason: Reason::Agent(resp.reason.into()),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot ask the agent for the default intention policy; denying");
                decision
            }
        }
    }

    /// The learned default policy, if any.
    pub fn default_policy(&self) -> Option<DefaultPolicy> {
        *self.inner.default.borrow()
    }

    /// Subscribes to changes of the intentions snapshot.
    pub fn subscribe_intentions(&self) -> Subscriber<Intentions> {
        self.inner.intentions.clone()
    }

    /// Subscribes to changes of the learned default policy.
    pub fn subscribe_default(&self) -> watch::Receiver<Option<DefaultPolicy>> {
        self.inner.default.subscribe()
    }

    /// Spawns the task that learns the default policy now, on every intentions change, when
    /// an agent watch recovers (a restarted agent may have another ACL default while the
    /// intentions, and so their snapshot, stay the same) and periodically.
    pub fn spawn_default_prober(
        &self,
        mut recoveries: watch::Receiver<u64>,
        cancel: CancellationToken,
    ) {
        let this = self.clone();
        let mut intentions = self.inner.intentions.clone();
        let probe_name = format!("consul-proxy-default-probe-{:016x}", rand::random::<u64>());
        tokio::spawn(async move {
            // The probe needs the local verdict, so it starts once intentions are known.
            if intentions.wait_for(Option::is_some).await.is_err() {
                return;
            }
            loop {
                intentions.borrow_and_update();
                this.probe_default(&probe_name).await;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = intentions.changed() => if r.is_err() { return },
                    r = recoveries.changed() => if r.is_err() { return },
                    ok = sleep_or_cancel(DEFAULT_REFRESH, &cancel) => if !ok { return },
                }
            }
        });
    }

    async fn probe_default(&self, probe_name: &str) {
        let trust_domain = self
            .inner
            .bundle
            .borrow()
            .as_ref()
            .map(|b| b.trust_domain().to_owned())
            .unwrap_or_else(|| "consul".to_owned());
        let probe = SpiffeId::new(&trust_domain, "", "", &self.inner.datacenter, probe_name);
        let local = self.decide_cached(&probe);
        if matches!(local.reason, Reason::Intention(_) | Reason::L7Intention(_)) {
            // A wildcard intention covers every caller: the default cannot matter right now,
            // and cannot be re-learned while the wildcard hides it. Forget it, so that when
            // the wildcard goes, unmatched callers are referred to the agent rather than
            // decided by a default that may have changed meanwhile.
            if self
                .inner
                .default
                .send_if_modified(|current| current.take().is_some())
            {
                tracing::info!(
                    rule = %local.reason,
                    "a wildcard intention hides the agent's default policy; forgotten until it goes"
                );
            }
            return;
        }
        match self.ask_agent(&probe, "00").await {
            Ok(resp) if resp.reason.starts_with("Matched") => {
                // Locally no rule covers this made-up caller, yet the agent matched one: our
                // snapshot and the agent disagree, which a test should have caught.
                tracing::warn!(
                    agent_reason = %resp.reason,
                    local = %local.reason,
                    "the agent matched an intention for a caller no local rule covers; report this"
                );
            }
            Ok(resp) => self.learn_default(&resp),
            Err(error) => tracing::debug!(%error, "default policy probe failed"),
        }
    }

    fn learn_default(&self, resp: &api::AuthorizeResponse) {
        // The agent says which rule decided; only a default answer teaches the default.
        if !is_default_reason(&resp.reason) {
            tracing::debug!(reason = %resp.reason, "not a default-policy answer; default not learned");
            return;
        }
        let policy = if resp.authorized {
            DefaultPolicy::Allow
        } else {
            DefaultPolicy::Deny
        };
        let changed = self.inner.default.send_if_modified(|current| {
            let changed = *current != Some(policy);
            *current = Some(policy);
            changed
        });
        if changed {
            tracing::info!(policy = ?policy, reason = %resp.reason, "learned the agent's default intention policy");
        }
    }

    async fn ask_agent(
        &self,
        id: &SpiffeId,
        serial: &str,
    ) -> Result<api::AuthorizeResponse, crate::consul::ConsulError> {
        self.inner
            .client
            .authorize(&api::AuthorizeRequest {
                target: self.inner.service.clone(),
                client_cert_uri: id.to_string(),
                client_cert_serial: serial.to_owned(),
            })
            .await
    }
}

/// Whether an `authorize` answer's `Reason` says the agent's default decided (Consul 1.14:
/// "Default behavior configured by ACLs"; later versions also "Default intention policy").
/// `Reason` is free text, so only these known openings teach the default: an answer worded in
/// a way this does not know is never taken as the default for every unmatched caller.
fn is_default_reason(reason: &str) -> bool {
    reason.starts_with("Default behavior") || reason.starts_with("Default intention policy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_default_wordings_teach_the_default() {
        assert!(is_default_reason("Default behavior configured by ACLs"));
        assert!(is_default_reason("Default intention policy"));
        for other in [
            "Matched L4 intention: default/web => default/db (Precedence: 9, Action: ALLOW)",
            "matches intention XXX",
            "Intention matched: web => db",
            "",
        ] {
            assert!(!is_default_reason(other), "{other:?}");
        }
    }
}
