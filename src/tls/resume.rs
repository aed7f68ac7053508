//! TLS session resumption between consul-proxy peers only.
//!
//! A resumed TLS 1.3 session skips the certificate exchange. Our inbound side authorizes every
//! connection after the handshake from the certificates of the original session, so resuming
//! costs it nothing in security. Consul's built-in proxy, however, authorizes in Go's
//! certificate-verification callback, which Go skips on resumption: resuming towards it would
//! bypass intentions. So:
//! - the client offers the ALPN protocol [`MESH_ALPN`], which only our inbound side selects;
//! - tickets are kept per endpoint (address *and* port: several sidecars often share one IP,
//!   and rustls keys its own cache by server name, which has no port), in a store that accepts
//!   and offers them only while the endpoint's latest handshake selected [`MESH_ALPN`] and
//!   passed the identity check; any other handshake result drops the endpoint's tickets;
//! - that flag is the endpoint's, not the connection's (a ticket arrives after its handshake,
//!   when another connection may have set it), so a session the server resumed without
//!   selecting [`MESH_ALPN`] is refused before any byte goes over it (`outbound::check_server`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustls::client::{
    ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, NamedGroup};

/// The ALPN protocol consul-proxy peers select between themselves.
pub const MESH_ALPN: &[u8] = b"consul-proxy/1";

/// Endpoints remembered before the map is reset.
const MAX_ENDPOINTS: usize = 1024;
/// Tickets kept per endpoint. A TLS 1.3 ticket is used once; our servers send two per
/// handshake, so with this many in stock every one of that many concurrent new connections
/// can resume (rustls's own cache keeps 8, which let only about half of 32 concurrent new
/// connections resume in the benchmark).
const TICKETS_PER_ENDPOINT: usize = 32;

/// An endpoint's client config and the ticket store it resumes from.
type EndpointEntry = (Arc<ClientConfig>, Arc<EndpointTickets>);

/// Outbound client configurations: one per endpoint, each with its own ticket store.
#[derive(Debug)]
pub struct ClientConfigs {
    base: Arc<ClientConfig>,
    resumption: bool,
    by_endpoint: Mutex<HashMap<String, EndpointEntry>>,
}

impl ClientConfigs {
    /// Per-endpoint configs derived from `base`; with `resumption` off, `base` for all.
    pub fn new(base: ClientConfig, resumption: bool) -> Self {
        ClientConfigs {
            base: Arc::new(base),
            resumption,
            by_endpoint: Mutex::new(HashMap::new()),
        }
    }

    /// The config to dial `endpoint` (`host:port`) with, and its ticket store (`None` when
    /// resumption is off).
    pub fn for_endpoint(
        &self,
        endpoint: &str,
    ) -> (Arc<ClientConfig>, Option<Arc<EndpointTickets>>) {
        if !self.resumption {
            return (self.base.clone(), None);
        }
        // Invariant: the map is only read or updated under the lock, never across a panic.
        let mut map = self.by_endpoint.lock().expect("client configs lock");
        if let Some((config, tickets)) = map.get(endpoint) {
            return (config.clone(), Some(tickets.clone()));
        }
        if map.len() >= MAX_ENDPOINTS {
            map.clear();
        }
        let tickets = Arc::new(EndpointTickets::default());
        let mut config = (*self.base).clone();
        config.resumption = Resumption::store(tickets.clone());
        let config = Arc::new(config);
        map.insert(endpoint.to_owned(), (config.clone(), tickets.clone()));
        (config, Some(tickets))
    }
}

/// One endpoint's tickets.
#[derive(Debug, Default)]
pub struct EndpointTickets {
    mesh_peer: AtomicBool,
    tickets: Mutex<VecDeque<Tls13ClientSessionValue>>,
    kx_hint: Mutex<Option<NamedGroup>>,
}

impl EndpointTickets {
    /// Records the outcome of a handshake with this endpoint: `true` only when it selected
    /// [`MESH_ALPN`] and the server passed the identity check. Anything else forgets the
    /// endpoint's tickets, so that a server that is not (or no longer) consul-proxy is never
    /// offered one.
    pub fn record_handshake(&self, trusted_mesh_peer: bool) {
        self.mesh_peer.store(trusted_mesh_peer, Ordering::SeqCst);
        if !trusted_mesh_peer {
            self.lock().clear();
        }
    }

    /// Whether tickets are kept and offered now.
    pub fn is_mesh_peer(&self) -> bool {
        self.mesh_peer.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Tls13ClientSessionValue>> {
        // Invariant: as above.
        self.tickets.lock().expect("endpoint tickets lock")
    }
}

impl ClientSessionStore for EndpointTickets {
    fn set_kx_hint(&self, _server_name: ServerName<'static>, group: NamedGroup) {
        *self.kx_hint.lock().expect("kx hint lock") = Some(group);
    }

    fn kx_hint(&self, _server_name: &ServerName<'_>) -> Option<NamedGroup> {
        *self.kx_hint.lock().expect("kx hint lock")
    }

    fn set_tls12_session(
        &self,
        _server_name: ServerName<'static>,
        _value: Tls12ClientSessionValue,
    ) {
    }

    fn tls12_session(&self, _server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        _server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        if !self.is_mesh_peer() {
            return;
        }
        let mut tickets = self.lock();
        if tickets.len() >= TICKETS_PER_ENDPOINT {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        _server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if !self.is_mesh_peer() {
            return None;
        }
        // Newest first: it is the least likely to have expired.
        self.lock().pop_back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ClientConfig {
        ClientConfig::builder_with_provider(super::super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }

    #[test]
    fn endpoints_differ_by_port_and_start_untrusted() {
        let configs = ClientConfigs::new(base(), true);
        let (a, ta) = configs.for_endpoint("127.0.0.1:21000");
        let (b, tb) = configs.for_endpoint("127.0.0.1:21001");
        let (a2, ta2) = configs.for_endpoint("127.0.0.1:21000");
        assert!(
            !Arc::ptr_eq(&a, &b),
            "same IP, different port: different stores"
        );
        assert!(Arc::ptr_eq(&a, &a2));
        let (ta, tb, ta2) = (ta.unwrap(), tb.unwrap(), ta2.unwrap());
        assert!(Arc::ptr_eq(&ta, &ta2));
        assert!(!ta.is_mesh_peer() && !tb.is_mesh_peer());
        ta.record_handshake(true);
        assert!(ta.is_mesh_peer());
        assert!(
            !tb.is_mesh_peer(),
            "marking one port does not mark its neighbour"
        );
        ta.record_handshake(false);
        assert!(!ta.is_mesh_peer(), "a later non-mesh handshake revokes it");
        let name = ServerName::try_from("127.0.0.1").unwrap();
        assert!(ta.take_tls13_ticket(&name).is_none());
    }

    #[test]
    fn resumption_off_shares_the_base_config() {
        let configs = ClientConfigs::new(base(), false);
        let (a, t) = configs.for_endpoint("127.0.0.1:1");
        let (b, _) = configs.for_endpoint("127.0.0.1:2");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(t.is_none());
    }
}
