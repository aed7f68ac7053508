//! Reading a peer's identity from its (already chain-verified) leaf certificate.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TrustBundle;
use crate::spiffe::{SpiffeError, SpiffeId, TrustDomainPolicy};

/// Who the peer is, as its certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The service identity from the single `spiffe://` URI SAN.
    pub id: SpiffeId,
    /// Colon-hex serial (Consul's `connect.HexString` form).
    pub serial: String,
}

/// Why a certificate does not carry a usable identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The peer sent no certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// Not a parseable X.509 certificate.
    #[error("unparseable certificate: {0}")]
    Unparseable(String),
    /// No `spiffe://` URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// More than one `spiffe://` URI SAN: ambiguous, refused.
    #[error("certificate has {0} spiffe:// URI SANs; exactly one is required")]
    SeveralSpiffeIds(usize),
    /// The SPIFFE URI is not a service identity.
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// The identity is in another trust domain.
    #[error("{id} is not in our trust domain {ours}")]
    ForeignTrustDomain {
        /// The peer's identity.
        id: Box<SpiffeId>,
        /// Our trust domain.
        ours: String,
    },
}

/// Extracts the identity from a leaf certificate: exactly one `spiffe://` URI SAN, which must
/// be a Connect service identity. Other URI SANs are ignored.
pub fn identity(cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if is_spiffe_uri(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(IdentityError::NoSpiffeId)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(IdentityError::SeveralSpiffeIds(extra + 1));
    }
    Ok(PeerIdentity {
        id: SpiffeId::parse(first)?,
        serial: colon_hex(x509.raw_serial()),
    })
}

/// Checks the identity's trust domain against the bundle, unless the policy is `Ignore`.
pub fn check_trust_domain(
    id: &SpiffeId,
    bundle: &TrustBundle,
    policy: TrustDomainPolicy,
) -> Result<(), IdentityError> {
    if policy == TrustDomainPolicy::Ignore || bundle.is_own_trust_domain(id.trust_domain()) {
        return Ok(());
    }
    Err(IdentityError::ForeignTrustDomain {
        id: Box::new(id.clone()),
        ours: bundle.trust_domain().to_owned(),
    })
}

/// The peer's certificate chain as presented, leaf first, owned (empty when none was
/// presented), for keeping past the handshake.
pub fn owned_chain(conn: &rustls::CommonState) -> Vec<CertificateDer<'static>> {
    conn.peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

/// Lowercase colon-hex of the minimal big-endian serial bytes, e.g. `1e:4c:07`.
fn colon_hex(bytes: &[u8]) -> String {
    let trimmed = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => &bytes[bytes.len().saturating_sub(1)..],
    };
    trimmed
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether a URI SAN uses the `spiffe` scheme (any case). URI SANs may carry non-ASCII bytes
/// that x509-parser passes through as UTF-8, so this must not slice inside a character.
fn is_spiffe_uri(uri: &str) -> bool {
    uri.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_scheme_check_is_case_insensitive_and_safe_on_any_utf8() {
        assert!(is_spiffe_uri(
            "spiffe://td.consul/ns/default/dc/dc1/svc/web"
        ));
        assert!(is_spiffe_uri(
            "SPIFFE://td.consul/ns/default/dc/dc1/svc/web"
        ));
        assert!(!is_spiffe_uri("https://example.com/"));
        assert!(!is_spiffe_uri("spiffe:/"));
        // Byte 9 falls inside the two-byte 'é': slicing there would panic.
        assert!(!is_spiffe_uri("https://\u{e9}x.example"));
        assert!(!is_spiffe_uri("spiffe:/\u{e9}"));
    }

    #[test]
    fn colon_hex_is_minimal_lowercase() {
        assert_eq!(colon_hex(&[0x00, 0x1e, 0x4c, 0x07]), "1e:4c:07");
        assert_eq!(colon_hex(&[0x08]), "08");
        assert_eq!(colon_hex(&[0x00]), "00");
    }
}
