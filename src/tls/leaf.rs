//! Our own leaf certificate: the chain we present and the key we sign with.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::peer;
use crate::consul::api;
use crate::spiffe::SpiffeId;

/// Parsed `/v1/agent/connect/ca/leaf/:service`.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// Leaf first, then intermediates, as Consul sent them.
    chain: Vec<CertificateDer<'static>>,
    /// Chain plus loaded signing key.
    certified: Arc<CertifiedKey>,
    id: SpiffeId,
    serial: String,
    valid_before: String,
    not_before_unix: i64,
    not_after_unix: i64,
    /// Kept to compare updates.
    pem: String,
}

impl PartialEq for Leaf {
    fn eq(&self, other: &Self) -> bool {
        self.pem == other.pem && self.chain == other.chain
    }
}

impl Leaf {
    /// Parses the chain and key and checks that the leaf names `service`.
    pub fn from_api(leaf: &api::LeafCert, service: &str) -> Result<Self, String> {
        let mut reader = leaf.cert_pem.as_bytes();
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut reader)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("bad CertPEM: {e}"))?;
        let Some(first) = chain.first() else {
            return Err("CertPEM holds no certificate".into());
        };
        let id = peer::identity(first)
            .map_err(|e| format!("our leaf certificate: {e}"))?
            .id;
        if !id.service().eq_ignore_ascii_case(service) {
            return Err(format!(
                "the agent issued a leaf for {id}, not for service {service:?}"
            ));
        }
        let (not_before_unix, not_after_unix) = {
            let (_, cert) = X509Certificate::from_der(first.as_ref())
                .map_err(|e| format!("our leaf certificate: {e}"))?;
            let validity = cert.validity();
            (
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
            )
        };
        let key = parse_key(&leaf.private_key_pem)?;
        let signing_key = super::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("unusable private key: {e}"))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified
            .keys_match()
            .map_err(|e| format!("private key does not match the certificate: {e}"))?;
        let mut pem = leaf.cert_pem.clone();
        pem.push_str(&leaf.private_key_pem);
        Ok(Leaf {
            chain,
            certified: Arc::new(certified),
            id,
            serial: leaf.serial_number.clone(),
            valid_before: leaf.valid_before.clone(),
            not_before_unix,
            not_after_unix,
            pem,
        })
    }

    /// The chain we present.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Chain plus signing key, for rustls.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// Our SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Colon-hex serial, for logs.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Expiry as the agent reported it, for logs.
    pub fn valid_before(&self) -> &str {
        &self.valid_before
    }

    /// The certificate's own `notAfter`, in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }

    /// When the agent should have renewed this leaf at the latest, in seconds since the Unix
    /// epoch: it renews at a random point between 60 % and 90 % of the lifetime.
    pub fn renewal_overdue_at(&self) -> i64 {
        self.not_before_unix + (self.not_after_unix - self.not_before_unix) / 10 * 9
    }
}

/// Seconds between non-blocking reads of a leaf whose renewal is overdue.
pub const REVALIDATE_EVERY_SECS: i64 = 30;

/// When to next read the leaf without blocking, in seconds since the Unix epoch.
///
/// A blocking leaf query returns only when the agent has a new certificate; if the agent's
/// own renewal stalls, it keeps answering with the old one until that expires. A
/// non-blocking read makes the agent revalidate its cached leaf and issue a new one if it has
/// expired. So, as a safety net, once renewal is overdue (`overdue_at`) the leaf is read
/// without blocking at once, then every `REVALIDATE_EVERY_SECS` (30 s), and one second after
/// `not_after` (the first read that can make the agent re-issue it). `last` is when this was
/// last done for the same certificate.
pub fn next_revalidation(overdue_at: i64, not_after: i64, last: Option<i64>) -> i64 {
    match last {
        None => overdue_at,
        Some(t) if t <= not_after => (t + REVALIDATE_EVERY_SECS).min(not_after + 1),
        Some(t) => t + REVALIDATE_EVERY_SECS,
    }
}

/// Consul sends SEC1 `EC PRIVATE KEY`; PKCS#8 and RSA are accepted too.
fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    let mut reader = pem.as_bytes();
    match rustls_pemfile::private_key(&mut reader) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err("PrivateKeyPEM holds no private key".into()),
        Err(e) => Err(format!("bad PrivateKeyPEM: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revalidation_starts_when_renewal_is_overdue_then_paces_and_hits_expiry() {
        let (overdue, not_after) = (1_000, 1_100);
        assert_eq!(next_revalidation(overdue, not_after, None), 1_000);
        assert_eq!(next_revalidation(overdue, not_after, Some(1_000)), 1_030);
        assert_eq!(
            next_revalidation(overdue, not_after, Some(1_090)),
            1_101,
            "one second after expiry, when a read can make the agent re-issue it"
        );
        assert_eq!(next_revalidation(overdue, not_after, Some(1_101)), 1_131);
    }
}
