//! The trust bundle: every Connect CA root (active or not) as a trust anchor, plus the
//! intermediates Consul lists, parsed once per roots change.

use std::borrow::Cow;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::consul::api;

/// Parsed `/v1/agent/connect/ca/roots`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    trust_domain: String,
    /// Trust domains of roots kept after a trust-domain change.
    previous_trust_domains: Vec<String>,
    anchors: Vec<TrustAnchor<'static>>,
    /// Each anchor's root validity period (webpki does not check an anchor's dates).
    periods: Vec<Period>,
    intermediates: Vec<CertificateDer<'static>>,
    /// Validity periods of the anchors and of the listed intermediates: what a full
    /// verification accepts changes at each of their boundaries.
    boundaries: Vec<Period>,
    root_ids: Vec<String>,
}

impl TrustBundle {
    /// Parses the roots. A root whose PEM does not parse is left out (never trusted) and named
    /// in the returned warnings; an update with no usable root at all is rejected.
    pub fn from_api(roots: &api::CaRoots) -> Result<(Self, Vec<String>), String> {
        if roots.trust_domain.is_empty() {
            return Err("roots carry no TrustDomain".into());
        }
        let mut warnings = Vec::new();
        let mut anchors = Vec::new();
        let mut periods = Vec::new();
        let mut intermediates = Vec::new();
        let mut boundaries = Vec::new();
        let mut root_ids = Vec::new();
        let mut previous_trust_domains = Vec::new();
        for root in &roots.roots {
            let anchor = first_cert(&root.root_cert).and_then(|der| {
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("not a usable trust anchor: {e}"))?;
                Ok((anchor, Period::of(&der)?))
            });
            match anchor {
                Ok((a, period)) => {
                    anchors.push(a);
                    periods.push(period);
                    root_ids.push(root.id.clone());
                }
                Err(e) => {
                    warnings.push(format!(
                        "CA root {:?} ({}) ignored: {e}",
                        root.id, root.name
                    ));
                    continue;
                }
            }
            for pem in &root.intermediate_certs {
                match first_cert(pem).and_then(|der| Ok((Period::of(&der)?, der))) {
                    Ok((period, der)) => {
                        intermediates.push(der);
                        boundaries.push(period);
                    }
                    Err(e) => {
                        warnings.push(format!("intermediate of root {:?} ignored: {e}", root.id))
                    }
                }
            }
            // Consul 1.14 fills ExternalTrustDomain with the bare cluster ID (no `.consul`).
            let mut external = root.external_trust_domain.to_ascii_lowercase();
            if !external.is_empty() && !external.contains('.') {
                external.push_str(".consul");
            }
            if !external.is_empty()
                && external != roots.trust_domain.to_ascii_lowercase()
                && !previous_trust_domains.contains(&external)
            {
                previous_trust_domains.push(external);
            }
        }
        if anchors.is_empty() {
            return Err(format!("no usable CA root ({} listed)", roots.roots.len()));
        }
        boundaries.extend(periods.iter().copied());
        Ok((
            TrustBundle {
                trust_domain: roots.trust_domain.to_ascii_lowercase(),
                previous_trust_domains,
                anchors,
                periods,
                boundaries,
                intermediates,
                root_ids,
            },
            warnings,
        ))
    }

    /// The cluster's current trust domain (lowercase).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether `domain` is ours: the current one or one the cluster migrated from.
    pub fn is_own_trust_domain(&self, domain: &str) -> bool {
        domain.eq_ignore_ascii_case(&self.trust_domain)
            || self
                .previous_trust_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The trust anchors whose root certificate is within its validity period at `now`: a
    /// root that has expired (or is not valid yet) anchors nothing, as in Go's and Envoy's
    /// verifiers.
    pub fn anchors_at(&self, now: UnixTime) -> Cow<'_, [TrustAnchor<'static>]> {
        if self.periods.iter().all(|p| p.check(now).is_ok()) {
            return Cow::Borrowed(&self.anchors);
        }
        Cow::Owned(
            self.anchors
                .iter()
                .zip(&self.periods)
                .filter(|(_, p)| p.check(now).is_ok())
                .map(|(a, _)| a.clone())
                .collect(),
        )
    }

    /// How long from `now` until some root or listed intermediate enters or leaves its
    /// validity period (so [`TrustBundle::anchors_at`], or which chains verify, next changes);
    /// `None` if none will. The TLS configuration is rebuilt then, with a new ticket key: a
    /// session verified before must not resume past such a boundary, since resumption
    /// re-checks only the certificates the peer itself presented.
    pub fn next_period_change(&self, now: UnixTime) -> Option<std::time::Duration> {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        self.boundaries
            .iter()
            .flat_map(|p| [p.not_before, p.not_after.saturating_add(1)])
            .filter(|&t| t > now)
            .min()
            .map(|t| std::time::Duration::from_secs(t.abs_diff(now)))
    }

    /// Extra intermediates offered to chain building.
    pub fn intermediates(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// Whether `new` withdraws something a chain verified here could rest on: a root, or an
    /// intermediate the roots listed (a peer that did not send it could not be verified
    /// again). Only then can a connection trusted under `self` fail under `new`.
    pub fn withdraws_trust_of(&self, new: &TrustBundle) -> bool {
        self.anchors.iter().any(|a| !new.anchors.contains(a))
            || self
                .intermediates
                .iter()
                .any(|i| !new.intermediates.contains(i))
    }

    /// The IDs of the roots in use, for logs.
    pub fn root_ids(&self) -> &[String] {
        &self.root_ids
    }
}

/// A certificate's validity period, in Unix seconds (inclusive at both ends, as RFC 5280).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Period {
    not_before: i64,
    not_after: i64,
}

impl Period {
    /// Reads the period from a certificate.
    pub(super) fn of(der: &CertificateDer<'_>) -> Result<Self, String> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| format!("cannot read its validity period: {e}"))?;
        let validity = cert.validity();
        Ok(Period {
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// Whether `now` is within the period, and if not, on which side.
    pub(super) fn check(&self, now: UnixTime) -> Result<(), rustls::CertificateError> {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if now < self.not_before {
            Err(rustls::CertificateError::NotValidYet)
        } else if now > self.not_after {
            Err(rustls::CertificateError::Expired)
        } else {
            Ok(())
        }
    }
}

/// The first certificate in a PEM string.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    let mut reader = pem.as_bytes();
    match rustls_pemfile::certs(&mut reader).next() {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(format!("bad PEM: {e}")),
        None => Err("no certificate in PEM".into()),
    }
}
