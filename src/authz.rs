//! Authorization: may this caller reach our service? A pure decision over a cached snapshot of
//! the intentions that name our service as destination, plus the agent's default policy.
//!
//! The rules reproduce Consul's `/v1/agent/connect/authorize` (see the API reference, section
//! 5): the match list arrives sorted by precedence; the first intention whose *source* matches
//! the caller decides; an intention carrying L7 `Permissions` denies at L4; with no match the
//! agent's default applies, and when that default is not known the answer is deny.

use std::collections::HashMap;
use std::sync::Arc;

use crate::consul::api;
use crate::spiffe::{DEFAULT, SpiffeId};

/// What the agent does when no intention matches a caller (`default_intention_policy`, else
/// the ACL default policy, else allow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Unmatched callers are let in.
    Allow,
    /// Unmatched callers are refused.
    Deny,
}

/// The intentions whose destination is our service, in precedence order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intentions {
    rules: Vec<Rule>,
    /// Positions (ascending) of the rules naming an exact source service, by that name.
    by_name: HashMap<String, Vec<usize>>,
    /// Positions (ascending) of the rules whose source name is `*`.
    wildcards: Vec<usize>,
}

/// One intention, reduced to what an L4 decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    source_partition: String,
    source_ns: String,
    source_name: String,
    action: RuleAction,
    /// Human-readable description for logs, e.g. `default/api => default/web (Precedence: 9, allow)`.
    label: Arc<str>,
}

/// What a matching intention says at L4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// `Action: allow`.
    Allow,
    /// `Action: deny`, or an action this proxy does not know (fail closed).
    Deny,
    /// An L7 intention (`Permissions`); an L4 proxy cannot evaluate it and denies.
    L7,
}

/// The outcome of [`authorize`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Why, for logs and metrics.
    pub reason: Reason,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The caller may reach the local service.
    Allow,
    /// The caller is refused.
    Deny,
}

/// Why a decision came out as it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An intention matched; the label names it.
    Intention(Arc<str>),
    /// An L7 intention matched; L4 denies.
    L7Intention(Arc<str>),
    /// No intention matched; the agent's default policy applied.
    Default(DefaultPolicy),
    /// No intention matched and the default policy is not known: fail closed.
    DefaultUnknown,
    /// The agent decided (the default was not known locally); its reason text.
    Agent(Arc<str>),
    /// The intentions were never loaded: fail closed.
    IntentionsUnknown,
    /// The caller is in another admin partition (its name): Consul refuses such a caller
    /// whatever the intentions say, and this proxy serves the default partition only.
    OtherPartition(Arc<str>),
}

impl Decision {
    /// Whether the caller may connect.
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Intention(label) => write!(f, "intention {label}"),
            Reason::L7Intention(label) => write!(f, "L7 intention {label} (denied at L4)"),
            Reason::Default(DefaultPolicy::Allow) => f.write_str("default policy allow"),
            Reason::Default(DefaultPolicy::Deny) => f.write_str("default policy deny"),
            Reason::DefaultUnknown => {
                f.write_str("no intention matched and default policy unknown")
            }
            Reason::Agent(text) => write!(f, "agent: {text}"),
            Reason::IntentionsUnknown => f.write_str("intentions not loaded"),
            Reason::OtherPartition(p) => write!(
                f,
                "caller in partition {p:?}, not {:?} (never allowed)",
                DEFAULT
            ),
        }
    }
}

/// Decides whether `source` may connect, given the destination's intentions and the agent's
/// default policy (if known). Pure: no I/O, no clock.
///
/// A caller from another admin partition is denied before any intention is read, as the
/// agent's own authorization refuses it ("Mismatched partitions"); the destination is always
/// in the default partition here (partitions are not supported). Partition names compare
/// without regard to case: the agent lowercases the one in a URI.
pub fn authorize(
    intentions: &Intentions,
    source: &SpiffeId,
    default: Option<DefaultPolicy>,
) -> Decision {
    if !source.partition().eq_ignore_ascii_case(DEFAULT) {
        return Decision {
            verdict: Verdict::Deny,
            reason: Reason::OtherPartition(source.partition().into()),
        };
    }
    match intentions.first_match(source) {
        Some(rule) => {
            let (verdict, reason) = match rule.action {
                RuleAction::Allow => (Verdict::Allow, Reason::Intention(rule.label.clone())),
                RuleAction::Deny => (Verdict::Deny, Reason::Intention(rule.label.clone())),
                RuleAction::L7 => (Verdict::Deny, Reason::L7Intention(rule.label.clone())),
            };
            Decision { verdict, reason }
        }
        None => match default {
            Some(policy) => Decision {
                verdict: match policy {
                    DefaultPolicy::Allow => Verdict::Allow,
                    DefaultPolicy::Deny => Verdict::Deny,
                },
                reason: Reason::Default(policy),
            },
            None => Decision {
                verdict: Verdict::Deny,
                reason: Reason::DefaultUnknown,
            },
        },
    }
}

impl Intentions {
    /// Builds the snapshot from the agent's match list for `destination`.
    ///
    /// Entries that cannot apply to a local caller (a `SourcePeer`, a source type other than
    /// `consul`) or that name another destination are dropped. Destination names compare
    /// without regard to case, as the agent's match does (an intention written for `DB`
    /// applies to `db`); source names compare exactly, as the agent's authorization does
    /// (an intention from `WEB` does not apply to a caller `web`; both checked against a real
    /// Consul 1.14 agent). The list is stably sorted by
    /// precedence, highest first, which leaves the agent's own order (and tie-break) intact.
    pub fn from_api(destination: &str, list: Vec<api::Intention>) -> Self {
        let mut list: Vec<api::Intention> = list
            .into_iter()
            .filter(|i| i.source_peer.is_empty())
            .filter(|i| i.source_type.is_empty() || i.source_type == "consul")
            .filter(|i| {
                i.destination_name == "*" || i.destination_name.eq_ignore_ascii_case(destination)
            })
            .collect();
        list.sort_by_key(|i| std::cmp::Reverse(i.precedence));
        let rules: Vec<Rule> = list.into_iter().map(Rule::from_api).collect();
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcards = Vec::new();
        for (pos, rule) in rules.iter().enumerate() {
            if rule.source_name == "*" {
                wildcards.push(pos);
            } else {
                by_name
                    .entry(rule.source_name.clone())
                    .or_default()
                    .push(pos);
            }
        }
        Intentions {
            rules,
            by_name,
            wildcards,
        }
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule (in precedence order) whose source matches the caller. Equivalent to
    /// scanning the rules in order, without visiting the rules that name other services: the
    /// answer is the earlier of the first matching rule naming the caller's service and the
    /// first matching wildcard rule.
    pub fn first_match(&self, source: &SpiffeId) -> Option<&Rule> {
        let first_in = |positions: &[usize]| {
            positions
                .iter()
                .copied()
                .find(|&p| self.rules[p].matches_source(source))
        };
        let named = self.by_name.get(source.service()).and_then(|p| first_in(p));
        let wildcard = first_in(&self.wildcards);
        let pos = match (named, wildcard) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(&self.rules[pos])
    }
}

impl Rule {
    fn from_api(i: api::Intention) -> Self {
        let action = if !i.permissions.is_empty() {
            RuleAction::L7
        } else if i.action.eq_ignore_ascii_case("allow") {
            RuleAction::Allow
        } else {
            RuleAction::Deny
        };
        let or_default = |s: String| if s.is_empty() { DEFAULT.to_owned() } else { s };
        let source_ns = or_default(i.source_ns);
        let what = match action {
            RuleAction::L7 => format!("Permissions: {}", i.permissions.len()),
            _ => format!("Action: {}", i.action),
        };
        let id = if i.id.is_empty() {
            String::new()
        } else {
            format!("ID: {}, ", i.id)
        };
        let label = format!(
            "{}/{} => {}/{} ({}Precedence: {}, {})",
            source_ns,
            i.source_name,
            or_default(i.destination_ns),
            i.destination_name,
            id,
            i.precedence,
            what
        );
        Rule {
            source_partition: or_default(i.source_partition),
            source_ns,
            source_name: i.source_name,
            action,
            label: label.into(),
        }
    }

    /// Whether this rule's source pattern covers the caller.
    fn matches_source(&self, source: &SpiffeId) -> bool {
        self.source_partition
            .eq_ignore_ascii_case(source.partition())
            && (self.source_ns == "*" || self.source_ns == source.namespace())
            && (self.source_name == "*" || self.source_name == source.service())
    }

    /// The rule's description for logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// What the rule says at L4.
    pub fn action(&self) -> RuleAction {
        self.action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intention(src: &str, dst: &str, action: &str, precedence: u32) -> api::Intention {
        api::Intention {
            source_ns: "default".into(),
            source_name: src.into(),
            destination_ns: "default".into(),
            destination_name: dst.into(),
            source_type: "consul".into(),
            action: action.into(),
            precedence,
            ..Default::default()
        }
    }

    fn caller(svc: &str) -> SpiffeId {
        SpiffeId::new("td.consul", "", "", "dc1", svc)
    }

    #[test]
    fn exact_allow_matches() {
        let ixns = Intentions::from_api("db", vec![intention("web", "db", "allow", 9)]);
        let d = authorize(&ixns, &caller("web"), Some(DefaultPolicy::Deny));
        assert!(d.is_allow());
        assert!(
            matches!(d.reason, Reason::Intention(ref l) if l.contains("default/web => default/db"))
        );
    }

    #[test]
    fn first_match_in_precedence_order_wins() {
        // A wildcard deny (precedence 8) after an exact allow (9): web allowed, others denied.
        let ixns = Intentions::from_api(
            "db",
            vec![
                intention("*", "db", "deny", 8),
                intention("web", "db", "allow", 9),
            ],
        );
        assert!(authorize(&ixns, &caller("web"), Some(DefaultPolicy::Allow)).is_allow());
        let d = authorize(&ixns, &caller("api"), Some(DefaultPolicy::Allow));
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(matches!(d.reason, Reason::Intention(ref l) if l.contains("default/* =>")));
    }

    #[test]
    fn destination_names_ignore_case_source_names_do_not() {
        // Both as a real Consul 1.14 agent decides: `web => DB deny` denies web calling db;
        // `WEB => db deny` does not apply to a caller named web.
        let ixns = Intentions::from_api("db", vec![intention("web", "DB", "deny", 9)]);
        let d = authorize(&ixns, &caller("web"), Some(DefaultPolicy::Allow));
        assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
        let ixns = Intentions::from_api("db", vec![intention("WEB", "db", "deny", 9)]);
        let d = authorize(&ixns, &caller("web"), Some(DefaultPolicy::Allow));
        assert_eq!(d.reason, Reason::Default(DefaultPolicy::Allow));
    }

    #[test]
    fn wildcard_destination_applies() {
        let ixns = Intentions::from_api("db", vec![intention("web", "*", "allow", 6)]);
        assert!(authorize(&ixns, &caller("web"), Some(DefaultPolicy::Deny)).is_allow());
    }

    #[test]
    fn l7_intention_denies_at_l4() {
        let mut i = intention("web", "db", "", 9);
        i.permissions = vec![serde_json::json!({"Action": "allow", "HTTP": {"PathPrefix": "/"}})];
        let ixns = Intentions::from_api("db", vec![i]);
        let d = authorize(&ixns, &caller("web"), Some(DefaultPolicy::Allow));
        assert_eq!(d.verdict, Verdict::Deny);
        assert!(matches!(d.reason, Reason::L7Intention(_)));
    }

    #[test]
    fn no_match_uses_default_and_unknown_default_denies() {
        let ixns = Intentions::from_api("db", vec![intention("web", "db", "allow", 9)]);
        let allow = authorize(&ixns, &caller("api"), Some(DefaultPolicy::Allow));
        assert_eq!(allow.reason, Reason::Default(DefaultPolicy::Allow));
        assert!(allow.is_allow());
        let deny = authorize(&ixns, &caller("api"), Some(DefaultPolicy::Deny));
        assert_eq!(deny.verdict, Verdict::Deny);
        let unknown = authorize(&ixns, &caller("api"), None);
        assert_eq!(unknown.verdict, Verdict::Deny);
        assert_eq!(unknown.reason, Reason::DefaultUnknown);
    }

    #[test]
    fn peer_sources_and_foreign_destinations_are_ignored() {
        let mut peered = intention("web", "db", "allow", 9);
        peered.source_peer = "other-cluster".into();
        let foreign = intention("web", "cache", "allow", 9);
        let ixns = Intentions::from_api("db", vec![peered, foreign]);
        assert!(ixns.is_empty());
        assert_eq!(
            authorize(&ixns, &caller("web"), None).verdict,
            Verdict::Deny
        );
    }

    #[test]
    fn partition_and_namespace_must_match() {
        let mut i = intention("web", "db", "allow", 9);
        i.source_partition = "finance".into();
        let ixns = Intentions::from_api("db", vec![i]);
        assert!(ixns.first_match(&caller("web")).is_none());
        let in_finance = SpiffeId::new("td.consul", "finance", "default", "dc1", "web");
        assert!(ixns.first_match(&in_finance).is_some());

        let mut other_ns = intention("web", "db", "allow", 9);
        other_ns.source_ns = "team-a".into();
        let ixns = Intentions::from_api("db", vec![other_ns]);
        assert!(ixns.first_match(&caller("web")).is_none());
    }

    #[test]
    fn a_caller_from_another_partition_is_denied_whatever_the_intentions_say() {
        let in_finance = SpiffeId::new("td.consul", "finance", "default", "dc1", "web");
        let none = Intentions::from_api("db", vec![]);
        let d = authorize(&none, &in_finance, Some(DefaultPolicy::Allow));
        assert_eq!(d.verdict, Verdict::Deny, "default allow does not reach it");
        assert_eq!(d.reason, Reason::OtherPartition("finance".into()));
        let mut i = intention("web", "db", "allow", 9);
        i.source_partition = "finance".into();
        let naming_it = Intentions::from_api("db", vec![i]);
        let d = authorize(&naming_it, &in_finance, Some(DefaultPolicy::Allow));
        assert_eq!(
            d.verdict,
            Verdict::Deny,
            "nor an intention naming its partition"
        );
        assert!(authorize(&none, &caller("web"), Some(DefaultPolicy::Allow)).is_allow());
        // The agent lowercases the partition of a URI (checked against a real Consul 1.14:
        // `/ap/Default/` is the default partition, `/ap/Finance/` is refused as "finance").
        let capitalised = SpiffeId::new("td.consul", "Default", "default", "dc1", "web");
        assert!(authorize(&none, &capitalised, Some(DefaultPolicy::Allow)).is_allow());
        let deny = Intentions::from_api("db", vec![intention("web", "db", "deny", 9)]);
        let d = authorize(&deny, &capitalised, Some(DefaultPolicy::Allow));
        assert!(matches!(d.reason, Reason::Intention(_)), "{d:?}");
    }

    #[test]
    fn unknown_action_fails_closed() {
        let ixns = Intentions::from_api("db", vec![intention("web", "db", "maybe", 9)]);
        assert_eq!(
            authorize(&ixns, &caller("web"), Some(DefaultPolicy::Allow)).verdict,
            Verdict::Deny
        );
    }

    #[test]
    fn indexed_lookup_agrees_with_a_linear_scan() {
        // Every mix of exact and wildcard rules, namespaces and actions, in agent order.
        let names = ["web", "api", "*", "db", "web"];
        let mut list = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let mut it = intention(
                name,
                "db",
                if i % 2 == 0 { "allow" } else { "deny" },
                9 - i as u32,
            );
            if i == 1 {
                it.source_ns = "other".into();
            }
            list.push(it);
        }
        let ixns = Intentions::from_api("db", list);
        for svc in ["web", "api", "db", "cache", "*"] {
            for ns in ["default", "other"] {
                let id = SpiffeId::new("td.consul", "", ns, "dc1", svc);
                let linear = ixns.rules.iter().find(|r| r.matches_source(&id));
                assert_eq!(ixns.first_match(&id), linear, "{svc} in {ns}");
            }
        }
    }

    #[test]
    fn source_name_match_is_exact() {
        let ixns = Intentions::from_api("db", vec![intention("web", "db", "allow", 9)]);
        assert!(ixns.first_match(&caller("Web")).is_none());
        assert!(ixns.first_match(&caller("web2")).is_none());
    }
}
