//! Mutual TLS for the mesh: rustls configs built from the Connect roots and our leaf, rebuilt
//! off the connection path whenever either changes and swapped in one step, so every new
//! handshake uses the newest pair and open connections keep theirs.

mod bundle;
mod leaf;
pub mod peer;
mod resume;
mod verify;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::UnixTime;
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use bundle::{TrustBundle, first_cert};
pub use leaf::{Leaf, next_revalidation};
pub use peer::{IdentityError, PeerIdentity};
pub use resume::{ClientConfigs, EndpointTickets, MESH_ALPN};
pub use verify::{
    ConnectClientVerifier, ConnectServerVerifier, PeerRole, check_validity_periods,
    verify_peer_chain,
};

use crate::consul::watch::{Publisher, Subscriber};

/// The crypto provider used for the mesh and for HTTPS to the agent: *ring*, with the
/// AES-128-GCM suites preferred (see `prefer_aes128`).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            prefer_aes128(&mut p.cipher_suites);
            Arc::new(p)
        })
        .clone()
}

/// Moves the AES-128-GCM suites to the front, keeping the rest in order. *ring* lists
/// AES-256-GCM-SHA384 first; its SHA-384 key schedule has no hardware support on x86 and
/// showed as the largest single cost of a new connection (8% of proxy CPU), and AES-128 also
/// encrypts faster. Both are standard TLS 1.3 suites; which one is used is a preference.
fn prefer_aes128(suites: &mut [rustls::SupportedCipherSuite]) {
    use rustls::CipherSuite as C;
    suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
}

/// Makes our provider the process default (reqwest asks for the default). Idempotent.
pub fn install_crypto_provider() {
    // An Err only means a default is already installed, which is what we want.
    let _ = CryptoProvider::install_default((*provider()).clone());
}

/// One consistent set of TLS settings: both configs come from the same roots and leaf.
#[derive(Clone, Debug)]
pub struct TlsConfigs {
    /// Inbound, for any client: presents our leaf, requires a client cert chained to the
    /// roots; no ALPN, no session tickets.
    pub server: Arc<ServerConfig>,
    /// Inbound, for clients offering [`MESH_ALPN`] (other consul-proxy instances): the same,
    /// selecting that protocol and issuing session tickets when resumption is on.
    pub server_mesh: Arc<ServerConfig>,
    /// Outbound, per endpoint: presents our leaf, verifies the server chain against the
    /// roots, offers [`MESH_ALPN`] and resumes only with endpoints that selected it.
    pub clients: Arc<ClientConfigs>,
    /// The roots these configs trust.
    pub bundle: Arc<TrustBundle>,
    /// The leaf these configs present.
    pub leaf: Arc<Leaf>,
}

impl TlsConfigs {
    /// Builds the configs. With `resumption` off, no ticket is issued or used. Every rebuild
    /// (roots or leaf changed) starts with a new ticket key and an empty session store, so no
    /// session outlives the trust it was established under.
    pub fn build(
        bundle: Arc<TrustBundle>,
        leaf: Arc<Leaf>,
        resumption: bool,
    ) -> Result<Self, rustls::Error> {
        let provider = provider();
        let versions = &[&rustls::version::TLS13, &rustls::version::TLS12];
        let client_verifier =
            Arc::new(ConnectClientVerifier::new(bundle.clone(), provider.clone()));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(Arc::new(SingleCert(leaf.certified_key())));
        let mut server_mesh = server.clone();
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server_mesh.alpn_protocols = vec![MESH_ALPN.to_vec()];
        server_mesh.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        if resumption {
            server_mesh.ticketer = rustls::crypto::ring::Ticketer::new()?;
            // Two per handshake, one used per handshake: the client's stock grows until every
            // concurrent new connection finds one.
            server_mesh.send_tls13_tickets = 2;
        } else {
            server_mesh.send_tls13_tickets = 0;
        }

        let server_verifier =
            Arc::new(ConnectServerVerifier::new(bundle.clone(), provider.clone()));
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_cert_resolver(Arc::new(SingleCert(leaf.certified_key())));
        client.alpn_protocols = vec![MESH_ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        let clients = Arc::new(ClientConfigs::new(client, resumption));
        Ok(TlsConfigs {
            server: Arc::new(server),
            server_mesh: Arc::new(server_mesh),
            clients,
            bundle,
            leaf,
        })
    }
}

/// Always presents the same certified key.
#[derive(Debug)]
struct SingleCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for SingleCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for SingleCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Spawns the task that rebuilds [`TlsConfigs`] whenever the roots or the leaf change, and
/// when a root enters or leaves its validity period: the rebuild starts a new ticket key, so
/// that a session issued under a root that has since expired cannot resume.
pub fn spawn_builder(
    mut roots: Subscriber<TrustBundle>,
    mut leaf: Subscriber<Leaf>,
    resumption: bool,
    cancel: CancellationToken,
) -> Subscriber<TlsConfigs> {
    let (tx, rx): (Publisher<TlsConfigs>, _) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            let pair = (
                roots.borrow_and_update().clone(),
                leaf.borrow_and_update().clone(),
            );
            let period_change = pair
                .0
                .as_ref()
                .and_then(|b| b.next_period_change(UnixTime::now()));
            if let (Some(bundle), Some(leaf)) = pair {
                match TlsConfigs::build(bundle.clone(), leaf.clone(), resumption) {
                    Ok(configs) => {
                        tracing::info!(
                            leaf.serial = leaf.serial(),
                            leaf.valid_before = leaf.valid_before(),
                            roots = ?bundle.root_ids(),
                            "TLS configuration loaded"
                        );
                        tx.send_replace(Some(Arc::new(configs)));
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot build TLS configuration; keeping the previous one");
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                r = roots.changed() => if r.is_err() { return },
                r = leaf.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(period_change.unwrap_or_default()), if period_change.is_some() => {
                    tracing::info!("a CA root entered or left its validity period; rebuilding the TLS configuration");
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes128_suites_come_first_and_none_is_lost() {
        let p = provider();
        let all = rustls::crypto::ring::default_provider().cipher_suites;
        assert_eq!(p.cipher_suites.len(), all.len());
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            p.cipher_suites[1].suite(),
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
        assert_eq!(
            p.cipher_suites[3].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }
}
