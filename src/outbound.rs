//! The upstream side: a local client connects, we pick a healthy endpoint, dial it with mTLS
//! presenting our leaf, check that the server is the service we meant to reach, and splice.
//! Every established connection is listed in the upstream registry, so that a removed root
//! closes the connections whose server chain ended in it.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::pki_types::{ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::conns::{NewConn, Registry, Side};
use crate::consul::watch::Subscriber;
use crate::endpoints::{self, Endpoint, Endpoints};
use crate::forward::{self, ReadAhead};
use crate::metrics::Metrics;
use crate::net::Stream;
use crate::proxy_config::UpstreamSpec;
use crate::spiffe::TrustDomainPolicy;
use crate::tls::{MESH_ALPN, PeerIdentity, TlsConfigs, check_validity_periods, peer};

/// What an upstream listener currently points at; replaced as a whole on reconfiguration.
pub struct UpstreamTarget {
    /// The upstream.
    pub spec: UpstreamSpec,
    /// Its endpoints (`None` until the first answer).
    pub endpoints: Subscriber<Endpoints>,
}

/// What every connection of one upstream listener shares.
pub struct UpstreamContext {
    /// The current target; new connections use the newest.
    pub target: watch::Receiver<Arc<UpstreamTarget>>,
    /// The current TLS configs.
    pub tls: Subscriber<TlsConfigs>,
    /// Trust-domain policy for servers.
    pub trust_domain: TrustDomainPolicy,
    /// Live upstream connections.
    pub registry: Arc<Registry>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("server identity: {0}")]
    Identity(peer::IdentityError),
    #[error("server presented {got}, expected {want}")]
    Mismatch { got: String, want: String },
}

/// Handles one local connection; `kill` cuts it (shutdown after the drain deadline).
pub async fn serve_conn(mut local: Stream, ctx: Arc<UpstreamContext>, kill: CancellationToken) {
    let target = ctx.target.borrow().clone();
    let spec = &target.spec;
    let mut endpoints_rx = target.endpoints.clone();
    // The first discovery answer may still be on its way: wait for it within the budget.
    let wait = timeout(spec.connect_timeout, endpoints_rx.wait_for(Option::is_some));
    let endpoints = tokio::select! {
        _ = kill.cancelled() => return local.abort_on_close(),
        r = wait => match r {
            Ok(Ok(e)) => e.clone(),
            _ => None,
        },
    };
    // Every failure below closes the local connection with a reset: the client sees that the
    // upstream could not be reached, not an empty answer.
    let Some(endpoints) = endpoints else {
        tracing::warn!(upstream = %spec.destination, "no endpoints known yet; closing");
        ctx.metrics.upstream_failed.inc();
        return local.abort_on_close();
    };
    let Some(tls) = ctx.tls.borrow().clone() else {
        tracing::warn!("no TLS configuration yet; closing");
        return local.abort_on_close();
    };
    if endpoints.list.is_empty() {
        tracing::warn!(upstream = %spec.destination, "no healthy endpoint; closing");
        ctx.metrics.upstream_failed.inc();
        return local.abort_on_close();
    }
    let order = endpoints::attempt_order(endpoints.list.len(), &mut rand::rng());
    let mut remote = None;
    for i in order {
        let ep = &endpoints.list[i];
        let attempt = tokio::select! {
            _ = kill.cancelled() => return local.abort_on_close(),
            r = attempt(ep, &tls, spec, ctx.trust_domain) => r,
        };
        match attempt {
            Ok(connected) => {
                remote = Some((connected, ep));
                break;
            }
            Err(error @ (AttemptError::Identity(_) | AttemptError::Mismatch { .. })) => {
                tracing::warn!(upstream = %spec.destination, endpoint = %ep.authority(), %error, "upstream identity check failed");
                ctx.metrics.upstream_identity_mismatch.inc();
            }
            Err(error) => {
                tracing::info!(upstream = %spec.destination, endpoint = %ep.authority(), %error, "upstream attempt failed");
            }
        }
    }
    let Some(((mut remote, server), ep)) = remote else {
        tracing::warn!(upstream = %spec.destination, "every attempt failed; closing");
        ctx.metrics.upstream_failed.inc();
        return local.abort_on_close();
    };
    let verified_at = UnixTime::now();
    let resumed = remote.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed {
        ctx.metrics.outbound_tls_resumed.inc();
    } else {
        ctx.metrics.outbound_tls_full.inc();
    }
    let chain = peer::owned_chain(remote.get_ref().1);
    let registration = ctx.registry.register(NewConn {
        side: Side::Upstream,
        peer: server.id,
        serial: server.serial,
        chain,
        verified_at,
    });
    let conn = registration.conn().clone();
    // The handshake verified the server against the roots of its time; if they changed since,
    // check it against the current ones (the enforcer may have run before we registered).
    let current = ctx.tls.borrow().as_ref().map(|t| t.bundle.clone());
    if let Err(error) = conn.recheck_if_roots_changed(&tls.bundle, current) {
        tracing::warn!(upstream = %spec.destination, endpoint = %ep.authority(), %error, "server certificate chain no longer trusted; closing");
        if !conn.is_closed() {
            // (else the enforcer closed and counted it already)
            ctx.metrics.upstream_failed.inc();
        }
        local.abort_on_close();
        return crate::net::abort_on_close(remote.get_ref().0.get_ref());
    }
    ctx.metrics.upstream_connected.inc();
    tracing::debug!(endpoint = %ep.authority(), resumed, "upstream connected");
    let orderly = tokio::select! {
        // Closes first: a connection closed between the checks above and here must not
        // pass a single byte (a TLS 1.3 client's first data may already be buffered).
        biased;
        _ = kill.cancelled() => {
            tracing::debug!("connection cut by shutdown");
            false
        }
        _ = conn.closed() => {
            tracing::info!(upstream = %spec.destination, endpoint = %ep.authority(), reason = conn.close_reason().unwrap_or("closed"), "upstream connection closed by the proxy");
            false
        }
        r = forward::splice(&mut local, &mut remote, &conn.bytes) => ctx.metrics.upstream_ended.count(forward::ending(r, false)),
    };
    if !orderly {
        // A cut, a close by the enforcer or an error (e.g. the server's side ended without
        // TLS close_notify) reaches both sides as an abort.
        local.abort_on_close();
        crate::net::abort_on_close(remote.get_ref().0.get_ref());
    }
}

/// One attempt: TCP connect, TLS handshake and identity check, all within the timeout.
async fn attempt(
    ep: &Endpoint,
    tls: &TlsConfigs,
    spec: &UpstreamSpec,
    policy: TrustDomainPolicy,
) -> Result<(TlsStream<ReadAhead<TcpStream>>, PeerIdentity), AttemptError> {
    let budget = spec.connect_timeout;
    let work = async {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(AttemptError::Connect)?;
        crate::net::tune_tcp(&tcp);
        // No SNI: Connect sidecars do not need it. rustls sends none for an IP server name.
        let name = match ep.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(ep.host.clone())
                .map_err(|e| AttemptError::Connect(std::io::Error::other(e)))?,
        };
        let (config, tickets) = tls.clients.for_endpoint(&ep.authority());
        let connected = TlsConnector::from(config)
            .connect(name, ReadAhead::new(tcp))
            .await
            .map_err(AttemptError::Handshake)
            .and_then(|stream| check_server(&stream, ep, tls, policy).map(|id| (stream, id)));
        // Tickets are kept for this endpoint only while its latest handshake was with a
        // consul-proxy (our ALPN) that passed the identity check; anything else drops them.
        // (A ticket arrives after the handshake, so this runs before any can be stored.)
        if let Some(tickets) = tickets {
            let mesh_peer = matches!(&connected, Ok((s, _)) if s.get_ref().1.alpn_protocol() == Some(MESH_ALPN));
            tickets.record_handshake(mesh_peer);
        }
        connected
    };
    timeout(budget, work)
        .await
        .map_err(|_| AttemptError::Timeout(budget))?
}

/// The server's identity, once it has proved to be the one `ep` names.
fn check_server(
    stream: &TlsStream<ReadAhead<TcpStream>>,
    ep: &Endpoint,
    tls: &TlsConfigs,
    policy: TrustDomainPolicy,
) -> Result<PeerIdentity, AttemptError> {
    let (_, conn) = stream.get_ref();
    let chain = conn.peer_certificates().unwrap_or_default();
    let Some(cert) = chain.first() else {
        return Err(AttemptError::Identity(peer::IdentityError::NoCertificate));
    };
    // A resumed session carries the server certificates of the handshake that issued its
    // ticket, verified then against these same roots (session stores start empty whenever the
    // roots change); check that they have not expired since.
    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        let refused = |why: String| {
            AttemptError::Handshake(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("resumed session: {why}"),
            ))
        };
        // Tickets are kept per endpoint while its latest handshake selected our ALPN, but a
        // ticket can arrive on one connection while another sets that flag: a session resumed
        // without our ALPN is with a server that may skip authorization when resuming.
        if conn.alpn_protocol() != Some(MESH_ALPN) {
            return Err(refused(
                "the server is not consul-proxy (it did not select the mesh ALPN protocol)"
                    .to_owned(),
            ));
        }
        check_validity_periods(chain, UnixTime::now()).map_err(|e| refused(e.to_string()))?;
    }
    let got = peer::identity(cert).map_err(AttemptError::Identity)?;
    peer::check_trust_domain(&got.id, &tls.bundle, policy).map_err(AttemptError::Identity)?;
    let want = ep.expected_id(tls.bundle.trust_domain());
    if !got.id.same_service(&want) {
        return Err(AttemptError::Mismatch {
            got: got.id.to_string(),
            want: want.to_string(),
        });
    }
    Ok(got)
}
