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
        let not_after_unix = X509Certificate::from_der(first.as_ref())
            .map_err(|e| format!("our leaf certificate: {e}"))?
            .1
            .validity()
            .not_after
            .timestamp();
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
