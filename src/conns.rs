//! Registries of live connections: who is at the other end, since when, how many bytes, and a
//! handle to close each one. The proxy keeps one for inbound connections (re-checked when
//! intentions or roots change) and one for upstream connections (re-checked when roots change).
//!
//! The data path never takes a lock: byte counts are relaxed atomics on the connection's own
//! entry, updated by the splice. The registry's sharded map is touched twice per connection (insert, remove) and when
//! the enforcer takes a snapshot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;

use crate::forward::Counters;
use crate::spiffe::SpiffeId;
use crate::tls::{PeerRole, TrustBundle, verify_peer_chain};

const SHARDS: usize = 16;

/// Which side of the proxy a connection is on; it decides how its peer's chain is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A caller on the public listener; the peer presented a client certificate.
    Inbound,
    /// An upstream server we dialled; the peer presented a server certificate.
    Upstream,
}

/// All live connections of one side.
#[derive(Debug)]
pub struct Registry {
    shards: Vec<Mutex<HashMap<u64, Arc<Conn>>>>,
    next_id: AtomicU64,
}

/// One live connection.
#[derive(Debug)]
pub struct Conn {
    /// Registry key.
    pub id: u64,
    /// Which side the connection is on.
    pub side: Side,
    /// The peer's identity: the caller inbound, the server upstream.
    pub peer: SpiffeId,
    /// The peer's certificate serial (colon hex).
    pub serial: String,
    /// The peer's chain as presented, leaf first (re-verified when roots change).
    pub chain: Vec<CertificateDer<'static>>,
    /// When the handshake completed (the time the chain was verified at).
    pub verified_at: UnixTime,
    /// Wall-clock start, for status output.
    pub started: SystemTime,
    /// Bytes moved so far: `a_to_b` from the connection's initiator (the caller inbound, the
    /// local client upstream), `b_to_a` back.
    pub bytes: Counters,
    cancel: CancellationToken,
    close_reason: OnceLock<String>,
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
}

/// What is known about a connection when it is registered.
#[derive(Debug)]
pub struct NewConn {
    /// Which side the connection is on.
    pub side: Side,
    /// The peer's identity.
    pub peer: SpiffeId,
    /// The peer's certificate serial.
    pub serial: String,
    /// The peer's chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// When it was verified.
    pub verified_at: UnixTime,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    /// Adds a connection; it stays listed until the returned guard is dropped.
    pub fn register(self: &Arc<Self>, new: NewConn) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            side: new.side,
            peer: new.peer,
            serial: new.serial,
            chain: new.chain,
            verified_at: new.verified_at,
            started: SystemTime::now(),
            bytes: Counters::default(),
            cancel: CancellationToken::new(),
            close_reason: OnceLock::new(),
        });
        self.shard(id).insert(id, conn.clone());
        Registration {
            registry: self.clone(),
            conn,
        }
    }

    /// Every live connection at this moment.
    pub fn snapshot(&self) -> Vec<Arc<Conn>> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(lock(shard).values().cloned());
        }
        all
    }

    /// How many connections are live.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        lock(&self.shards[(id as usize) % SHARDS])
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: no code panics while holding a shard lock (insert, remove, clone only).
    m.lock().expect("connection registry lock")
}

impl Conn {
    /// Verifies the peer's chain against `bundle` at the time of the handshake, for the usage
    /// its side requires: a removed root fails it, the leaf's own expiry since does not (that
    /// is what the maximum lifetime is for).
    pub fn verify_chain(&self, bundle: &TrustBundle) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = self.chain.split_first() else {
            return Err(rustls::Error::NoCertificatesPresented);
        };
        let role = match self.side {
            Side::Inbound => PeerRole::Client,
            Side::Upstream => PeerRole::Server,
        };
        verify_peer_chain(bundle, leaf, intermediates, self.verified_at, role)
    }

    /// Checks the chain again if the roots changed since the handshake verified it:
    /// `handshake` is the bundle the handshake used, `current` the one in use now. Registered
    /// first, then checked, a connection cannot miss a change: one published after this read
    /// finds it in the registry.
    pub fn recheck_if_roots_changed(
        &self,
        handshake: &Arc<TrustBundle>,
        current: Option<Arc<TrustBundle>>,
    ) -> Result<(), rustls::Error> {
        match current {
            Some(current) if !Arc::ptr_eq(&current, handshake) => self.verify_chain(&current),
            _ => Ok(()),
        }
    }

    /// Asks the connection to close, with a reason for its log line. The first reason wins;
    /// returns whether this call was the first (so that a closure is counted once).
    pub fn close(&self, reason: String) -> bool {
        let first = self.close_reason.set(reason).is_ok();
        self.cancel.cancel();
        first
    }

    /// Whether [`Conn::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.close_reason.get().is_some()
    }

    /// Resolves when [`Conn::close`] was called.
    pub async fn closed(&self) {
        self.cancel.cancelled().await
    }

    /// Why the connection was asked to close.
    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.get().map(String::as_str)
    }
}

impl Registration {
    /// The registered connection.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.shard(self.conn.id).remove(&self.conn.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_conn(svc: &str) -> NewConn {
        NewConn {
            side: Side::Inbound,
            peer: SpiffeId::new("td.consul", "", "", "dc1", svc),
            serial: "01".into(),
            chain: Vec::new(),
            verified_at: UnixTime::now(),
        }
    }

    #[test]
    fn registration_lists_until_dropped() {
        let r = Registry::new();
        let a = r.register(new_conn("a"));
        let b = r.register(new_conn("b"));
        assert_eq!(r.len(), 2);
        assert_ne!(a.conn().id, b.conn().id);
        drop(a);
        let left = r.snapshot();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].peer.service(), "b");
    }

    #[tokio::test]
    async fn close_records_the_first_reason_and_wakes_the_connection() {
        let r = Registry::new();
        let reg = r.register(new_conn("a"));
        let conn = reg.conn().clone();
        let waiter = tokio::spawn(async move { conn.closed().await });
        assert!(reg.conn().close("denied by intention".into()));
        assert!(
            !reg.conn().close("second".into()),
            "only the first close counts"
        );
        assert!(reg.conn().is_closed());
        waiter.await.unwrap();
        assert_eq!(reg.conn().close_reason(), Some("denied by intention"));
    }
}
