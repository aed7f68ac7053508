//! The public (mTLS) side: handshake under a timeout, the caller's identity from its verified
//! certificate, authorization, and only then a dial to the local app and the splice.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::authorizer::Authorizer;
use crate::consul::watch::Subscriber;
use crate::forward;
use crate::net::{self, Stream};
use crate::proxy_config::PublicListener;
use crate::spiffe::TrustDomainPolicy;
use crate::tls::{TlsConfigs, peer};

/// What every inbound connection shares.
pub struct InboundContext {
    /// The listener's current settings (local app, timeouts); may change without a rebind.
    pub settings: watch::Receiver<Arc<PublicListener>>,
    /// The current TLS configs.
    pub tls: Subscriber<TlsConfigs>,
    /// The authorization service.
    pub authorizer: Authorizer,
    /// Trust-domain policy for callers.
    pub trust_domain: TrustDomainPolicy,
}

/// Handles one accepted connection; `kill` cuts it (shutdown after the drain deadline).
pub async fn serve_conn(stream: Stream, ctx: Arc<InboundContext>, kill: CancellationToken) {
    let settings = ctx.settings.borrow().clone();
    let Some(tls) = ctx.tls.borrow().clone() else {
        tracing::warn!("no TLS configuration yet; closing");
        return;
    };
    let acceptor = TlsAcceptor::from(tls.server.clone());
    let handshake = tokio::select! {
        _ = kill.cancelled() => return,
        r = timeout(settings.handshake_timeout, acceptor.accept(stream)) => r,
    };
    let mut tls_stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            // Closed before finishing a handshake: typically a TCP health check.
            tracing::debug!(%error, "peer closed during the TLS handshake");
            return;
        }
        Ok(Err(error)) => {
            tracing::info!(%error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(timeout = ?settings.handshake_timeout, "TLS handshake timed out");
            return;
        }
    };

    let identity = {
        let (_, conn) = tls_stream.get_ref();
        match conn.peer_certificates().and_then(|c| c.first()) {
            Some(cert) => peer::identity(cert).and_then(|p| {
                peer::check_trust_domain(&p.id, &tls.bundle, ctx.trust_domain).map(|()| p)
            }),
            None => Err(peer::IdentityError::NoCertificate),
        }
    };
    let peer = match identity {
        Ok(p) => p,
        Err(error) => {
            tracing::info!(%error, "caller identity rejected");
            return;
        }
    };
    tracing::Span::current().record("peer.id", tracing::field::display(&peer.id));

    let decision = ctx.authorizer.authorize(&peer).await;
    if !decision.is_allow() {
        tracing::info!(source = %peer.id, reason = %decision.reason, "connection denied");
        return;
    }
    tracing::debug!(source = %peer.id, reason = %decision.reason, "connection authorized");

    let dial = timeout(
        settings.local_connect_timeout,
        net::connect_local(&settings.local_app),
    );
    let mut app = match dial.await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            tracing::warn!(app = %settings.local_app, %error, "cannot reach the local app");
            return;
        }
        Err(_) => {
            tracing::warn!(app = %settings.local_app, timeout = ?settings.local_connect_timeout, "local app dial timed out");
            return;
        }
    };

    tokio::select! {
        _ = kill.cancelled() => tracing::debug!("connection cut by shutdown"),
        r = forward::splice(&mut tls_stream, &mut app) => match r {
            Ok(t) => tracing::debug!(bytes.in = t.a_to_b, bytes.out = t.b_to_a, "connection closed"),
            Err(error) => tracing::debug!(%error, "connection ended with an error"),
        },
    }
}
