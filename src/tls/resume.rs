//! TLS session resumption between consul-proxy peers only.
//!
//! A resumed TLS 1.3 session skips the certificate exchange. Our inbound side authorizes every
//! connection after the handshake from the certificates of the original session, so resuming
//! costs it nothing in security. Consul's built-in proxy, however, authorizes in Go's
//! certificate-verification callback, which Go skips on resumption: resuming towards it would
//! bypass intentions. So the client offers the ALPN protocol [`MESH_ALPN`]; only our inbound
//! side selects it; and the client keeps and offers tickets only for servers that did.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use rustls::NamedGroup;
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue,
};
use rustls::pki_types::ServerName;

/// The ALPN protocol consul-proxy peers select between themselves.
pub const MESH_ALPN: &[u8] = b"consul-proxy/1";

/// Servers remembered as consul-proxy peers before the set is reset.
const MAX_PEERS: usize = 4096;
/// Servers tickets are kept for before the store is reset.
const MAX_SERVERS: usize = 256;
/// Tickets kept per server. A TLS 1.3 ticket is used once; our servers send two per
/// handshake, so with this many in stock every one of that many concurrent new connections
/// can resume (rustls's own cache keeps 8, which let only about half of 32 concurrent new
/// connections resume in the benchmark).
const TICKETS_PER_SERVER: usize = 32;

/// A client session store that only resumes with servers marked as consul-proxy peers.
#[derive(Debug)]
pub struct MeshSessions {
    peers: Mutex<HashSet<ServerName<'static>>>,
    tickets: Mutex<HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>>,
    kx_hints: ClientSessionMemoryCache,
}

impl Default for MeshSessions {
    fn default() -> Self {
        MeshSessions {
            peers: Mutex::new(HashSet::new()),
            tickets: Mutex::new(HashMap::new()),
            kx_hints: ClientSessionMemoryCache::new(MAX_SERVERS),
        }
    }
}

impl MeshSessions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `name` completed a handshake selecting [`MESH_ALPN`].
    pub fn mark_peer(&self, name: &ServerName<'static>) {
        let mut peers = self.lock();
        if peers.len() >= MAX_PEERS && !peers.contains(name) {
            peers.clear();
        }
        peers.insert(name.clone());
    }

    /// Whether `name` is a known consul-proxy peer.
    pub fn is_peer(&self, name: &ServerName<'_>) -> bool {
        self.lock().contains(&name.to_owned())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<ServerName<'static>>> {
        // Invariant: the set is only read or updated under the lock, never across a panic.
        self.peers.lock().expect("mesh peers lock")
    }

    fn tickets(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>>
    {
        // Invariant: as above.
        self.tickets.lock().expect("mesh tickets lock")
    }
}

impl ClientSessionStore for MeshSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.kx_hints.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.kx_hints.kx_hint(server_name)
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
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        if !self.is_peer(&server_name) {
            return;
        }
        let mut tickets = self.tickets();
        if tickets.len() >= MAX_SERVERS && !tickets.contains_key(&server_name) {
            tickets.clear();
        }
        let queue = tickets.entry(server_name).or_default();
        if queue.len() >= TICKETS_PER_SERVER {
            queue.pop_front();
        }
        queue.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if !self.is_peer(server_name) {
            return None;
        }
        // Newest first: it is the least likely to have expired.
        self.tickets().get_mut(server_name)?.pop_back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_servers_are_peers() {
        let s = MeshSessions::new();
        let ours = ServerName::try_from("127.0.0.1").unwrap();
        let theirs = ServerName::try_from("127.0.0.2").unwrap();
        s.mark_peer(&ours);
        assert!(s.is_peer(&ours));
        assert!(!s.is_peer(&theirs));
        assert!(s.take_tls13_ticket(&theirs).is_none());
    }
}
