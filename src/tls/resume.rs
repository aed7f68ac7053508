//! TLS session resumption between consul-proxy peers only.
//!
//! A resumed TLS 1.3 session skips the certificate exchange. Our inbound side authorizes every
//! connection after the handshake from the certificates of the original session, so resuming
//! costs it nothing in security. Consul's built-in proxy, however, authorizes in Go's
//! certificate-verification callback, which Go skips on resumption: resuming towards it would
//! bypass intentions. So the client offers the ALPN protocol [`MESH_ALPN`]; only our inbound
//! side selects it; and the client keeps and offers tickets only for servers that did.

use std::collections::HashSet;
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

/// A client session store that only resumes with servers marked as consul-proxy peers.
#[derive(Debug)]
pub struct MeshSessions {
    peers: Mutex<HashSet<ServerName<'static>>>,
    cache: ClientSessionMemoryCache,
}

impl MeshSessions {
    /// An empty store holding up to `sessions` tickets.
    pub fn new(sessions: usize) -> Self {
        MeshSessions {
            peers: Mutex::new(HashSet::new()),
            cache: ClientSessionMemoryCache::new(sessions),
        }
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
}

impl ClientSessionStore for MeshSessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.cache.set_kx_hint(server_name, group)
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.cache.kx_hint(server_name)
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
        if self.is_peer(&server_name) {
            self.cache.insert_tls13_ticket(server_name, value)
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if self.is_peer(server_name) {
            self.cache.take_tls13_ticket(server_name)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_marked_servers_are_peers() {
        let s = MeshSessions::new(16);
        let ours = ServerName::try_from("127.0.0.1").unwrap();
        let theirs = ServerName::try_from("127.0.0.2").unwrap();
        s.mark_peer(&ours);
        assert!(s.is_peer(&ours));
        assert!(!s.is_peer(&theirs));
        assert!(s.take_tls13_ticket(&theirs).is_none());
    }
}
