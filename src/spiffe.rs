//! SPIFFE identities as Consul Connect writes them, parsed at the edge into [`SpiffeId`].
//!
//! Only *service* identities are modelled: a sidecar's peers are services. Agent, server and
//! gateway URIs are recognised so that the error can say what the peer presented.

use std::fmt;

/// The partition and namespace every Consul CE identity uses.
pub const DEFAULT: &str = "default";

/// A Connect service identity:
/// `spiffe://<trust-domain>[/ap/<partition>]/ns/<namespace>/dc/<datacenter>/svc/<service>`.
///
/// The trust domain is kept lowercase (Consul compares hosts case-insensitively). The other
/// components keep their case; [`SpiffeId::same_service`] compares them case-insensitively, as
/// Consul's own client does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    partition: String,
    namespace: String,
    datacenter: String,
    service: String,
}

/// Whether a peer's trust domain must be one of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustDomainPolicy {
    /// The peer's trust domain must be the cluster's (or one it migrated from). The default.
    Enforce,
    /// `-spiffe-validation=off`: accept any trust domain; the certificate chain still has to
    /// verify against our roots.
    Ignore,
}

/// Why a URI is not a usable service identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    /// The URI does not start with `spiffe://`.
    #[error("not a spiffe:// URI: {0:?}")]
    NotSpiffe(String),
    /// The URI has no trust domain.
    #[error("spiffe URI without a trust domain: {0:?}")]
    NoTrustDomain(String),
    /// A valid Consul URI naming something other than a service (agent, gateway, CA, ...).
    #[error("{kind} identity, not a service: {uri:?}")]
    NotService {
        /// What the URI names.
        kind: &'static str,
        /// The URI as presented.
        uri: String,
    },
    /// The trust domain holds a character a DNS-style name cannot (a port, userinfo, ...).
    #[error("spiffe URI with a malformed trust domain: {0:?}")]
    BadTrustDomain(String),
    /// The path does not follow any Consul layout.
    #[error("unrecognised Consul SPIFFE path: {0:?}")]
    BadPath(String),
}

impl SpiffeId {
    /// Builds a service identity from its parts.
    pub fn new(
        trust_domain: &str,
        partition: &str,
        namespace: &str,
        datacenter: &str,
        service: &str,
    ) -> Self {
        let or_default = |s: &str| {
            if s.is_empty() {
                DEFAULT.to_owned()
            } else {
                s.to_owned()
            }
        };
        SpiffeId {
            trust_domain: trust_domain.to_ascii_lowercase(),
            partition: or_default(partition),
            namespace: or_default(namespace),
            datacenter: datacenter.to_owned(),
            service: service.to_owned(),
        }
    }

    /// Parses a URI SAN. Only service identities are accepted.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let rest = strip_prefix_ignore_case(uri, "spiffe://")
            .ok_or_else(|| SpiffeError::NotSpiffe(uri.to_owned()))?;
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(SpiffeError::NoTrustDomain(uri.to_owned()));
        }
        // Anything a URL parser would read as port, userinfo, query or fragment is refused
        // rather than folded into a name: Consul (Go's url.Parse) would read those URIs
        // differently, and an identity two readers disagree on must not be authorized.
        if !host.bytes().all(is_trust_domain_byte) {
            return Err(SpiffeError::BadTrustDomain(uri.to_owned()));
        }
        if !path.bytes().all(|b| b == b'/' || is_segment_byte(b)) {
            return Err(SpiffeError::BadPath(uri.to_owned()));
        }
        let not_service = |kind| SpiffeError::NotService {
            kind,
            uri: uri.to_owned(),
        };
        if path.is_empty() || path == "/" {
            return Err(not_service("CA signing"));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(SpiffeError::BadPath(uri.to_owned()));
        }
        // An optional `/ap/<partition>` prefix applies to services, agents and gateways.
        let (partition, tail) = match segments.as_slice() {
            ["ap", p, tail @ ..] => (Some(*p), tail),
            all => (None, all),
        };
        match tail {
            ["ns", ns, "dc", dc, "svc", svc] => {
                let decode =
                    |s: &str| percent_decode(s).ok_or_else(|| SpiffeError::BadPath(uri.to_owned()));
                Ok(SpiffeId::new(
                    host,
                    &decode(partition.unwrap_or(DEFAULT))?,
                    &decode(ns)?,
                    &decode(dc)?,
                    &decode(svc)?,
                ))
            }
            ["agent", "client", "dc", _, "id", _] => Err(not_service("client agent")),
            ["agent", "server", "dc", _] if partition.is_none() => Err(not_service("server agent")),
            ["gateway", "mesh", "dc", _] => Err(not_service("mesh gateway")),
            _ => Err(SpiffeError::BadPath(uri.to_owned())),
        }
    }

    /// The trust domain (lowercase), e.g. `1111-2222.consul`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The admin partition (`default` on Consul CE).
    pub fn partition(&self) -> &str {
        &self.partition
    }

    /// The namespace (`default` on Consul CE).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The datacenter the certificate was issued in.
    pub fn datacenter(&self) -> &str {
        &self.datacenter
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether `other` names the same service instance set: partition, namespace, datacenter
    /// and service equal, case-insensitively. The trust domain is not compared here; that is a
    /// separate policy decision (see [`TrustDomainPolicy`]).
    pub fn same_service(&self, other: &SpiffeId) -> bool {
        self.partition.eq_ignore_ascii_case(&other.partition)
            && self.namespace.eq_ignore_ascii_case(&other.namespace)
            && self.datacenter.eq_ignore_ascii_case(&other.datacenter)
            && self.service.eq_ignore_ascii_case(&other.service)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        if self.partition != DEFAULT {
            write!(f, "/ap/{}", percent_encode(&self.partition))?;
        }
        write!(
            f,
            "/ns/{}/dc/{}/svc/{}",
            percent_encode(&self.namespace),
            percent_encode(&self.datacenter),
            percent_encode(&self.service)
        )
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Letters, digits, `.`, `-` and `_`: what a trust domain is made of.
fn is_trust_domain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b".-_".contains(&b)
}

/// What may appear in a path segment (RFC 3986 `pchar`, with `%` for escapes).
fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@%".contains(&b)
}

/// Decodes `%XX` escapes in one path segment; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_owned());
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes the characters that cannot appear raw in a path segment.
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

    #[test]
    fn parses_ce_service_uri() {
        let id = SpiffeId::parse(&format!("spiffe://{TD}/ns/default/dc/dc1/svc/web")).unwrap();
        assert_eq!(id.trust_domain(), TD);
        assert_eq!(id.partition(), "default");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.datacenter(), "dc1");
        assert_eq!(id.service(), "web");
        assert_eq!(
            id.to_string(),
            format!("spiffe://{TD}/ns/default/dc/dc1/svc/web")
        );
    }

    #[test]
    fn parses_partitioned_uri_and_round_trips() {
        let uri = format!("spiffe://{TD}/ap/finance/ns/billing/dc/dc2/svc/ledger");
        let id = SpiffeId::parse(&uri).unwrap();
        assert_eq!(id.partition(), "finance");
        assert_eq!(id.namespace(), "billing");
        assert_eq!(id.to_string(), uri);
    }

    #[test]
    fn lowercases_trust_domain_and_scheme() {
        let id = SpiffeId::parse("SPIFFE://ABC.Consul/ns/default/dc/dc1/svc/Web").unwrap();
        assert_eq!(id.trust_domain(), "abc.consul");
        assert_eq!(id.service(), "Web");
    }

    #[test]
    fn decodes_percent_escapes() {
        let id = SpiffeId::parse("spiffe://td.consul/ns/default/dc/dc%201/svc/a%2Fb").unwrap();
        assert_eq!(id.datacenter(), "dc 1");
        assert_eq!(id.service(), "a/b");
        assert_eq!(
            id.to_string(),
            "spiffe://td.consul/ns/default/dc/dc%201/svc/a%2Fb"
        );
        assert!(matches!(
            SpiffeId::parse("spiffe://td.consul/ns/default/dc/dc1/svc/bad%zz"),
            Err(SpiffeError::BadPath(_))
        ));
    }

    #[test]
    fn rejects_non_service_identities() {
        for (uri, kind) in [
            ("spiffe://td.consul", "CA signing"),
            (
                "spiffe://td.consul/agent/client/dc/dc1/id/node-1",
                "client agent",
            ),
            ("spiffe://td.consul/agent/server/dc/dc1", "server agent"),
            ("spiffe://td.consul/gateway/mesh/dc/dc1", "mesh gateway"),
            (
                "spiffe://td.consul/ap/p1/gateway/mesh/dc/dc1",
                "mesh gateway",
            ),
        ] {
            match SpiffeId::parse(uri) {
                Err(SpiffeError::NotService { kind: k, .. }) => assert_eq!(k, kind, "{uri}"),
                other => panic!("{uri}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_malformed_uris() {
        for uri in [
            "https://td.consul/ns/default/dc/dc1/svc/web",
            "spiffe:///ns/default/dc/dc1/svc/web",
            "spiffe://td.consul/ns/default/dc/dc1/svc/web/extra",
            "spiffe://td.consul/ns//dc/dc1/svc/web",
            "spiffe://td.consul/ns/default/svc/web",
            "spiffe://td.consul/ap/x/agent/server/dc/dc1",
            "",
            // What Go's url.Parse would read as query, fragment, port or userinfo.
            "spiffe://td.consul/ns/default/dc/dc1/svc/web?x=1",
            "spiffe://td.consul/ns/default/dc/dc1/svc/web#f",
            "spiffe://td.consul:8500/ns/default/dc/dc1/svc/web",
            "spiffe://user@td.consul/ns/default/dc/dc1/svc/web",
            "spiffe://td.consul/ns/default/dc/dc1/svc/we b",
            "spiffe://td.consul/ns/default/dc/dc1/svc/wéb",
            // An escape needs two hex digits; a sign is not one.
            "spiffe://td.consul/ns/default/dc/dc1/svc/w%+5",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri} should not parse");
        }
    }

    #[test]
    fn same_service_ignores_case_and_trust_domain() {
        let a = SpiffeId::new("a.consul", "", "", "DC1", "Web");
        let b = SpiffeId::new("b.consul", "default", "default", "dc1", "web");
        assert!(a.same_service(&b));
        let c = SpiffeId::new("a.consul", "", "", "dc2", "web");
        assert!(!a.same_service(&c));
    }
}
