//! Certificate verifiers that trust only the Connect CA roots and check no host name: Connect
//! certificates carry a SPIFFE URI SAN, not a DNS name. Identity is checked after the
//! handshake (see [`super::peer`]); these verifiers prove only that the chain is ours.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use webpki::KeyUsage;

use super::TrustBundle;
use super::bundle::Period;

/// Verifies a peer chain against the bundle for the given usage.
fn verify_chain(
    bundle: &TrustBundle,
    provider: &CryptoProvider,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: KeyUsage,
) -> Result<(), rustls::Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    let extra = bundle.intermediates();
    let owned;
    let intermediates: &[CertificateDer<'_>] = if extra.is_empty() {
        intermediates
    } else {
        owned = intermediates
            .iter()
            .cloned()
            .chain(extra.iter().cloned())
            .collect::<Vec<_>>();
        &owned
    };
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &bundle.anchors_at(now),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(pki_error)
}

/// The role a peer's certificate is checked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// A caller (client authentication).
    Client,
    /// A server we dialled (server authentication).
    Server,
}

/// Verifies a peer chain (leaf, then intermediates) against the bundle at `time`, for the
/// key usage of its role.
pub fn verify_peer_chain(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    time: UnixTime,
    role: PeerRole,
) -> Result<(), rustls::Error> {
    let usage = match role {
        PeerRole::Client => KeyUsage::client_auth(),
        PeerRole::Server => KeyUsage::server_auth(),
    };
    verify_chain(
        bundle,
        &super::provider(),
        end_entity,
        intermediates,
        time,
        usage,
    )
}

/// Checks that every certificate of a chain is within its validity period at `now`.
///
/// This is what a resumed session needs re-checked: its chain was verified against the roots
/// when the ticket was issued, and every change of roots (or of our leaf) starts a new ticket
/// key and an empty client session store, so a session that resumes was verified against the
/// bundle in use; only time has moved since. It costs an X.509 parse per certificate instead
/// of the signature checks of a full verification.
pub fn check_validity_periods(
    chain: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    for der in chain {
        Period::of(der)
            .map_err(|_| CertificateError::BadEncoding)?
            .check(now)?;
    }
    if chain.is_empty() {
        return Err(rustls::Error::NoCertificatesPresented);
    }
    Ok(())
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { time, not_after } => CertificateError::ExpiredContext { time, not_after },
        E::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        E::InvalidCertValidity => CertificateError::Expired,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(ce)
}

/// What both verifiers share: the roots, and the provider's signature algorithms.
#[derive(Debug)]
struct ConnectChain {
    bundle: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
}

impl ConnectChain {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<(), rustls::Error> {
        verify_chain(
            &self.bundle,
            &self.provider,
            end_entity,
            intermediates,
            now,
            usage,
        )
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Inbound: requires a client certificate chained to the Connect roots (client-auth usage).
#[derive(Debug)]
pub struct ConnectClientVerifier(ConnectChain);

impl ConnectClientVerifier {
    /// A verifier over this bundle.
    pub fn new(bundle: Arc<TrustBundle>, provider: Arc<CryptoProvider>) -> Self {
        ConnectClientVerifier(ConnectChain { bundle, provider })
    }
}

impl ClientCertVerifier for ConnectClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

/// Outbound: requires the server's chain to end in a Connect root (server-auth usage). The
/// server name is ignored; the expected SPIFFE ID is checked after the handshake.
#[derive(Debug)]
pub struct ConnectServerVerifier(ConnectChain);

impl ConnectServerVerifier {
    /// A verifier over this bundle.
    pub fn new(bundle: Arc<TrustBundle>, provider: Arc<CryptoProvider>) -> Self {
        ConnectServerVerifier(ConnectChain { bundle, provider })
    }
}

impl ServerCertVerifier for ConnectServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    /// A CA valid over the given years and a current leaf it signed, as a bundle and a leaf.
    fn root_and_leaf(years: (i32, i32)) -> (TrustBundle, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        ca.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2999, 1, 1);
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = leaf.signed_by(&KeyPair::generate().unwrap(), &ca).unwrap();
        let roots = crate::consul::api::CaRoots {
            trust_domain: "td.consul".into(),
            roots: vec![crate::consul::api::CaRoot {
                id: "r".into(),
                root_cert: ca.pem(),
                active: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        (TrustBundle::from_api(&roots).unwrap().0, leaf.der().clone())
    }

    #[test]
    fn a_root_outside_its_validity_period_anchors_nothing() {
        let now = UnixTime::now();
        for (years, ok) in [
            ((2020, 2999), true),
            ((2020, 2021), false),
            ((2998, 2999), false),
        ] {
            let (bundle, leaf) = root_and_leaf(years);
            let result = verify_peer_chain(&bundle, &leaf, &[], now, PeerRole::Client);
            assert_eq!(result.is_ok(), ok, "root valid {years:?}: {result:?}");
        }
    }

    #[test]
    fn the_next_root_period_change_is_the_nearest_boundary_ahead() {
        let now = UnixTime::now();
        let year_secs = |y: u64| (y - 1970) * 31_556_952;
        let (current, _) = root_and_leaf((2020, 2999));
        let until_2999 = current.next_period_change(now).unwrap().as_secs() + now.as_secs();
        assert!(
            until_2999.abs_diff(year_secs(2999)) < 3 * 86_400,
            "{until_2999}"
        );
        let (future, _) = root_and_leaf((2998, 2999));
        let until_2998 = future.next_period_change(now).unwrap().as_secs() + now.as_secs();
        assert!(
            until_2998.abs_diff(year_secs(2998)) < 3 * 86_400,
            "{until_2998}"
        );
        let (expired, _) = root_and_leaf((2020, 2021));
        assert_eq!(expired.next_period_change(now), None);
    }

    #[test]
    fn a_listed_intermediate_expiring_first_is_the_next_boundary() {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let now = UnixTime::now();
        let year_secs = |y: u64| (y - 1970) * 31_556_952;
        let ca_params = |until: i32| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(until, 1, 1);
            p
        };
        let root =
            CertifiedIssuer::self_signed(ca_params(2999), KeyPair::generate().unwrap()).unwrap();
        let intermediate = ca_params(2998)
            .signed_by(&KeyPair::generate().unwrap(), &root)
            .unwrap();
        let roots = crate::consul::api::CaRoots {
            trust_domain: "td.consul".into(),
            roots: vec![crate::consul::api::CaRoot {
                id: "r".into(),
                root_cert: root.pem(),
                intermediate_certs: vec![intermediate.pem()],
                active: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let bundle = TrustBundle::from_api(&roots).unwrap().0;
        let next = bundle.next_period_change(now).unwrap().as_secs() + now.as_secs();
        assert!(next.abs_diff(year_secs(2998)) < 3 * 86_400, "{next}");
    }

    #[test]
    fn validity_periods_are_checked_for_every_certificate() {
        let now = UnixTime::now();
        let current = cert((2020, 1, 1), (2999, 1, 1));
        let expired = cert((2020, 1, 1), (2020, 1, 4));
        let future = cert((2998, 1, 1), (2999, 1, 1));
        assert!(check_validity_periods(std::slice::from_ref(&current), now).is_ok());
        assert_eq!(
            check_validity_periods(&[current.clone(), expired], now),
            Err(rustls::Error::InvalidCertificate(CertificateError::Expired)),
            "an expired intermediate counts too"
        );
        assert_eq!(
            check_validity_periods(&[future, current], now),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet
            ))
        );
        assert_eq!(
            check_validity_periods(&[], now),
            Err(rustls::Error::NoCertificatesPresented)
        );
    }
}
