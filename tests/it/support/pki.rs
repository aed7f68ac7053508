//! A test Connect CA made with rcgen: a root whose only SAN is `spiffe://<trust-domain>`, and
//! leaves shaped like Consul's (empty subject, one URI SAN, client+server auth).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use serde_json::{Value, json};

/// A CA and the trust domain it signs for.
pub struct TestCa {
    pub trust_domain: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The root, PEM: the issuer's own certificate, or its parent's for an intermediate.
    root_pem: String,
    /// The issuer's certificate when it is an intermediate, listed in `IntermediateCerts`.
    intermediate_pem: Option<String>,
    next_serial: std::sync::atomic::AtomicU64,
}

/// A leaf as the agent would return it.
#[derive(Clone, Debug)]
pub struct TestLeaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub uri: String,
    pub serial: String,
    pub service: String,
}

/// What to put in a leaf.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub expired: bool,
}

/// A CA certificate's parameters as Consul's CA writes them: the given common name and one
/// URI SAN naming the trust domain.
fn ca_params(common_name: &str, trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}").try_into().unwrap(),
    )];
    params
}

impl TestCa {
    /// A new root for `<cluster>.consul`.
    pub fn new(cluster: &str) -> Self {
        let trust_domain = format!("{cluster}.consul");
        let params = ca_params(&format!("pri-test.consul.ca.{trust_domain}"), &trust_domain);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestCa {
            trust_domain,
            root_pem: issuer.pem(),
            issuer,
            intermediate_pem: None,
            next_serial: std::sync::atomic::AtomicU64::new(2),
        }
    }

    /// An intermediate CA signed by this root, for the same trust domain: its leaves chain to
    /// this root through it, and its roots JSON lists it in `IntermediateCerts` (as Consul does
    /// for a secondary datacenter or an external CA). Its leaves carry only themselves.
    pub fn intermediate(&self) -> TestCa {
        let mut params = ca_params(
            &format!("int-test.consul.ca.{}", self.trust_domain),
            &self.trust_domain,
        );
        params.use_authority_key_identifier_extension = true;
        let issuer =
            CertifiedIssuer::signed_by(params, KeyPair::generate().unwrap(), &self.issuer).unwrap();
        TestCa {
            trust_domain: self.trust_domain.clone(),
            root_pem: self.root_pem.clone(),
            intermediate_pem: Some(issuer.pem()),
            issuer,
            next_serial: std::sync::atomic::AtomicU64::new(1_000),
        }
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The SPIFFE ID of a service in this CA's trust domain.
    pub fn service_uri(&self, service: &str, dc: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{dc}/svc/{service}",
            self.trust_domain
        )
    }

    /// A normal leaf for `service` in `dc`.
    pub fn leaf(&self, service: &str, dc: &str) -> TestLeaf {
        self.leaf_with(
            service,
            LeafSpec {
                uris: vec![self.service_uri(service, dc)],
                expired: false,
            },
        )
    }

    /// A leaf with arbitrary URI SANs and validity.
    pub fn leaf_with(&self, service: &str, spec: LeafSpec) -> TestLeaf {
        self.make_leaf(service, spec, None)
    }

    /// A normal leaf for `service` in `dc` that expires at `not_after` (whole seconds).
    pub fn leaf_expiring(
        &self,
        service: &str,
        dc: &str,
        not_after: std::time::SystemTime,
    ) -> TestLeaf {
        let spec = LeafSpec {
            uris: vec![self.service_uri(service, dc)],
            expired: false,
        };
        self.make_leaf(service, spec, Some(not_after))
    }

    fn make_leaf(
        &self,
        service: &str,
        spec: LeafSpec,
        not_after: Option<std::time::SystemTime>,
    ) -> TestLeaf {
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| SanType::URI(u.clone().try_into().unwrap()))
            .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        params.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        params.use_authority_key_identifier_extension = true;
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 4);
        }
        if let Some(t) = not_after {
            let since_epoch =
                |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap();
            let epoch = rcgen::date_time_ymd(1970, 1, 1);
            let hour = std::time::Duration::from_secs(3600);
            params.not_before = epoch + (since_epoch(std::time::SystemTime::now()) - hour);
            params.not_after = epoch + since_epoch(t);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let hex: Vec<String> = serial
            .to_be_bytes()
            .iter()
            .skip_while(|b| **b == 0)
            .map(|b| format!("{b:02x}"))
            .collect();
        TestLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            uri: spec.uris.first().cloned().unwrap_or_default(),
            serial: hex.join(":"),
            service: service.to_owned(),
        }
    }

    /// The `/v1/agent/connect/ca/roots` body for a set of CAs (the first one active).
    pub fn roots_json(cas: &[&TestCa]) -> Value {
        let roots: Vec<Value> = cas
            .iter()
            .enumerate()
            .map(|(i, ca)| {
                json!({
                    "ID": format!("root-{i}-{}", ca.trust_domain),
                    "Name": "Consul CA Primary Cert",
                    "SerialNumber": 7 + i,
                    "SigningKeyID": "1f:91:ca:41",
                    "ExternalTrustDomain": ca.trust_domain.trim_end_matches(".consul"),
                    "NotBefore": "2026-01-05T10:00:00Z",
                    "NotAfter": "2036-01-03T10:00:00Z",
                    "RootCert": ca.root_pem(),
                    "IntermediateCerts": ca.intermediate_pem.as_ref().map(|p| vec![p]),
                    "Active": i == 0,
                    "PrivateKeyType": "ec",
                    "PrivateKeyBits": 256,
                    "CreateIndex": 8,
                    "ModifyIndex": 8
                })
            })
            .collect();
        json!({
            "ActiveRootID": format!("root-0-{}", cas[0].trust_domain),
            "TrustDomain": cas[0].trust_domain,
            "Roots": roots,
        })
    }
}

impl TestLeaf {
    /// The `/v1/agent/connect/ca/leaf/:service` body.
    pub fn json(&self, modify_index: u64) -> Value {
        json!({
            "SerialNumber": self.serial,
            "CertPEM": self.cert_pem,
            "PrivateKeyPEM": self.key_pem,
            "Service": self.service,
            "ServiceURI": self.uri,
            "ValidAfter": "2026-04-10T09:59:00Z",
            "ValidBefore": "2036-04-13T09:59:00Z",
            "CreateIndex": modify_index,
            "ModifyIndex": modify_index
        })
    }
}
