//! Upstream endpoints: the healthy mesh instances of a destination and the identity each must
//! present, converted from the agent's `CheckServiceNode` entries; and the order in which a
//! new connection tries them.

use crate::consul::api;
use crate::spiffe::SpiffeId;

/// Attempts per outbound connection before giving up.
pub const MAX_ATTEMPTS: usize = 3;

/// One dialable instance.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    /// Host (IP or name) to dial.
    pub host: String,
    /// Port to dial.
    pub port: u16,
    /// The service its certificate must name.
    pub service: String,
    /// The datacenter its certificate must name (the node's datacenter).
    pub datacenter: String,
}

/// The current endpoint set of one upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Dialable endpoints.
    pub list: Vec<Endpoint>,
}

impl Endpoint {
    /// The identity this endpoint must present, in the given trust domain.
    pub fn expected_id(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId::new(trust_domain, "", "", &self.datacenter, &self.service)
    }

    /// `host:port`, with brackets for IPv6 literals.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Endpoints {
    /// Converts health entries. Entries that cannot be dialled or whose identity is unknown
    /// (terminating gateways, which need SNI) are left out.
    ///
    /// Check status is not looked at: the agent has already chosen (`?passing` for a service,
    /// the query's own `OnlyPassing` and `IgnoreCheckIDs` for a prepared query, which keeps
    /// `warning` instances by default).
    ///
    /// The list is sorted: a prepared query shuffles its results on every execution, and an
    /// unchanged set must compare equal so that it is not republished.
    pub fn from_health(entries: &[api::CheckServiceNode]) -> Self {
        let mut list: Vec<Endpoint> = entries.iter().filter_map(endpoint).collect();
        list.sort();
        Endpoints { list }
    }
}

fn endpoint(entry: &api::CheckServiceNode) -> Option<Endpoint> {
    let svc = &entry.service;
    let service = if svc.connect.native {
        svc.service.clone()
    } else if svc.kind == "connect-proxy" && !svc.proxy.destination_service_name.is_empty() {
        svc.proxy.destination_service_name.clone()
    } else {
        tracing::debug!(instance = %svc.id, kind = %svc.kind, "skipping endpoint with no Connect identity");
        return None;
    };
    let host = if svc.address.is_empty() {
        entry.node.address.clone()
    } else {
        svc.address.clone()
    };
    if host.is_empty() || svc.port == 0 {
        return None;
    }
    Some(Endpoint {
        host,
        port: svc.port,
        service,
        datacenter: entry.node.datacenter.clone(),
    })
}

/// Up to [`MAX_ATTEMPTS`] distinct endpoint indices in a random order (uniform choice for the
/// first, as Consul's own proxy does; distinct ones for the retries).
pub fn attempt_order(len: usize, rng: &mut impl rand::Rng) -> Vec<usize> {
    use rand::RngExt;
    let mut order: Vec<usize> = (0..len).collect();
    let take = len.min(MAX_ATTEMPTS);
    for i in 0..take {
        let j = rng.random_range(i..len);
        order.swap(i, j);
    }
    order.truncate(take);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        kind: &str,
        dest: &str,
        native: bool,
        addr: &str,
        node_addr: &str,
        port: u16,
    ) -> api::CheckServiceNode {
        serde_json::from_value(serde_json::json!({
            "Node": {"Node": "n1", "Address": node_addr, "Datacenter": "dc2"},
            "Service": {"Kind": kind, "ID": "x", "Service": "db", "Address": addr, "Port": port,
                        "Proxy": {"DestinationServiceName": dest}, "Connect": {"Native": native}},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}]
        }))
        .unwrap()
    }

    #[test]
    fn proxies_and_natives_become_endpoints() {
        let eps = Endpoints::from_health(&[
            entry("connect-proxy", "db", false, "", "10.0.0.1", 21000),
            entry("", "", true, "10.0.0.2", "10.0.0.9", 5432),
        ]);
        assert_eq!(eps.list.len(), 2);
        assert_eq!(
            eps.list[0].authority(),
            "10.0.0.1:21000",
            "node address when service has none"
        );
        assert_eq!(eps.list[0].service, "db");
        assert_eq!(eps.list[0].datacenter, "dc2");
        assert_eq!(eps.list[1].authority(), "10.0.0.2:5432");
        assert_eq!(
            eps.list[0].expected_id("td.consul").to_string(),
            "spiffe://td.consul/ns/default/dc/dc2/svc/db"
        );
    }

    #[test]
    fn gateways_and_portless_entries_are_skipped() {
        let eps = Endpoints::from_health(&[
            entry("terminating-gateway", "", false, "", "10.0.0.1", 8443),
            entry("connect-proxy", "db", false, "", "10.0.0.1", 0),
        ]);
        assert!(eps.list.is_empty());
    }

    #[test]
    fn check_status_is_left_to_the_agent() {
        // A prepared query without OnlyPassing returns `warning` instances, and may ignore
        // failing checks by ID: what it returns is what it chose.
        let mut warning = entry("connect-proxy", "db", false, "", "10.0.0.1", 21000);
        warning.checks[0].status = "warning".into();
        let mut ignored = entry("connect-proxy", "db", false, "", "10.0.0.2", 21000);
        ignored.checks[0].status = "critical".into();
        let eps = Endpoints::from_health(&[warning, ignored]);
        assert_eq!(eps.list.len(), 2);
    }

    #[test]
    fn the_same_set_in_another_order_is_equal() {
        let a = entry("connect-proxy", "db", false, "10.0.0.1", "", 21000);
        let b = entry("connect-proxy", "db", false, "10.0.0.2", "", 21000);
        assert_eq!(
            Endpoints::from_health(&[a.clone(), b.clone()]),
            Endpoints::from_health(&[b, a]),
            "a shuffled prepared-query answer is not a change"
        );
    }

    #[test]
    fn ipv6_authority_is_bracketed() {
        let eps = Endpoints::from_health(&[entry("connect-proxy", "db", false, "::1", "", 21000)]);
        assert_eq!(eps.list[0].authority(), "[::1]:21000");
    }

    #[test]
    fn attempt_order_is_distinct_and_bounded() {
        let mut rng = rand::rng();
        for len in 0..8 {
            let order = attempt_order(len, &mut rng);
            assert_eq!(order.len(), len.min(MAX_ATTEMPTS));
            let mut sorted = order.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), order.len());
            assert!(order.iter().all(|i| *i < len));
        }
    }

    #[test]
    fn attempt_order_reaches_every_endpoint_first() {
        let mut rng = rand::rng();
        let mut firsts = [0usize; 4];
        for _ in 0..2000 {
            firsts[attempt_order(4, &mut rng)[0]] += 1;
        }
        assert!(
            firsts.iter().all(|n| *n > 300),
            "roughly uniform: {firsts:?}"
        );
    }
}
