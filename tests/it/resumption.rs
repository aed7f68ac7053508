//! TLS session resumption: between consul-proxy peers only, and never a way around
//! authorization.

use std::sync::atomic::Ordering;

use crate::support::fake_agent::{health_entry, intention_json};
use crate::support::mesh::Mesh;
use crate::support::tls_client::{self, TlsEchoServer};
use crate::support::{DEADLINE, ProxyProcess, eventually, refused, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_proxy_peers_resume_sessions() {
    let mesh = Mesh::new().await;
    let (db, web) = resuming_mesh(&mesh).await;
    web.wait_log("resumed=true").await;
    db.wait_log("resumed=true").await;
}

/// Starts both proxies, sends a few connections through, and waits until web resumed one.
async fn resuming_mesh(mesh: &Mesh) -> (ProxyProcess, ProxyProcess) {
    let db = mesh.start_db().await;
    let web = mesh.start_web().await;
    for i in 0..5u8 {
        assert_eq!(
            round_trip(mesh.web_upstream, &[i; 10]).await.unwrap(),
            vec![i; 10]
        );
    }
    web.wait_log("resumed=true").await;
    (db, web)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumption_can_be_turned_off() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let web = mesh.start_web_with(&["-tls-resumption", "off"]).await;
    for i in 0..5u8 {
        assert_eq!(
            round_trip(mesh.web_upstream, &[i; 10]).await.unwrap(),
            vec![i; 10]
        );
    }
    web.wait_log("upstream connected").await;
    assert!(
        !web.logs().contains("resumed=true"),
        "no session was resumed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_is_still_authorized() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let web = mesh.start_web().await;
    for _ in 0..3 {
        assert_eq!(round_trip(mesh.web_upstream, b"ok").await.unwrap(), b"ok");
    }
    web.wait_log("resumed=true").await;
    mesh.agent
        .set_intentions("db", vec![intention_json("web", "db", "deny", 9)]);
    eventually("a resumed connection is denied too", DEADLINE, || async {
        let denied_resumed = || {
            db.logs()
                .lines()
                .any(|l| l.contains("connection denied") && l.contains("resumed=true"))
        };
        (refused(mesh.web_upstream).await && denied_resumed()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_resumption_with_servers_that_are_not_consul_proxy() {
    // A rustls server that issues tickets but does not speak consul-proxy's ALPN protocol
    // (like Consul's built-in proxy, which would skip authorization on a resumed session).
    let mesh = Mesh::new().await;
    let other = TlsEchoServer::start(&mesh.ca.leaf("db", "dc1")).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", other.port, "dc1")]);
    let _web = mesh.start_web().await;
    for i in 0..5u8 {
        assert_eq!(
            round_trip(mesh.web_upstream, &[i; 10]).await.unwrap(),
            vec![i; 10]
        );
    }
    assert_eq!(other.handshakes.load(Ordering::SeqCst), 5);
    assert_eq!(
        other.resumed.load(Ordering::SeqCst),
        0,
        "every handshake was a full one"
    );
    assert_eq!(
        other.psk_offers.load(Ordering::SeqCst),
        0,
        "its tickets were never kept and offered back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_never_offered_to_a_non_mesh_server_on_the_same_host() {
    let mesh = Mesh::new().await;
    let (mut db, _web) = resuming_mesh(&mesh).await;

    // A ticket-issuing server without our ALPN on another port of the same IP, next to db.
    let neighbour = TlsEchoServer::start(&mesh.ca.leaf("db", "dc1")).await;
    mesh.agent.set_health(
        "db",
        vec![
            health_entry("db", mesh.db_public, "dc1"),
            health_entry("db", neighbour.port, "dc1"),
        ],
    );
    eventually("both endpoints in use", DEADLINE, || async {
        assert_eq!(round_trip(mesh.web_upstream, b"n").await.unwrap(), b"n");
        (neighbour.handshakes.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    assert_eq!(
        neighbour.psk_offers.load(Ordering::SeqCst),
        0,
        "no ticket was offered to the neighbour port"
    );

    // db's own address taken over by such a server: the tickets kept for it are not offered
    // again once a handshake there shows it is not consul-proxy.
    db.signal("TERM");
    db.wait_exit(DEADLINE).await;
    let successor = TlsEchoServer::start_on(&mesh.ca.leaf("db", "dc1"), mesh.db_public).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", mesh.db_public, "dc1")]);
    eventually("the successor serves", DEADLINE, || async {
        let ok = round_trip(mesh.web_upstream, b"s").await.ok()? == b"s";
        (ok && successor.handshakes.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    // The first handshake there still offers one of db's tickets (nothing said the server had
    // changed); it shows the server is not consul-proxy, and none is offered after it. (The one
    // offer also shows that the count sees offers.)
    assert_eq!(
        successor.psk_offers.load(Ordering::SeqCst),
        1,
        "db's tickets offered to its successor once, on the handshake that showed the change"
    );
    assert_eq!(successor.resumed.load(Ordering::SeqCst), 0);
}

/// A resumed session carries the certificate of the handshake that issued its ticket; once
/// that certificate has expired, resuming must not get the caller in (a full handshake would
/// not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_whose_certificate_expired_cannot_come_back_by_resuming() {
    use std::time::{Duration, SystemTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    // Whole seconds: the certificate's notAfter has no finer resolution.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Room for the first connection on a loaded machine; the test then waits out the rest.
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(now + 10);
    let leaf = mesh.ca.leaf_expiring("web", "dc1", expiry);
    let mut config = tls_client::client_config(Some(&leaf));
    config.alpn_protocols = vec![consul_proxy::tls::MESH_ALPN.to_vec()];
    let config = std::sync::Arc::new(config);
    let echoes = |mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
        let mut back = [0u8; 4];
        s.write_all(b"ping").await.is_ok()
            && matches!(
                tokio::time::timeout(DEADLINE, s.read_exact(&mut back)).await,
                Ok(Ok(_))
            )
            && &back == b"ping"
    };

    let first = tls_client::connect_with(mesh.db_public, config.clone())
        .await
        .unwrap();
    assert!(echoes(first).await, "served while the certificate is valid");
    eventually("the caller's certificate has expired", DEADLINE, || async {
        (SystemTime::now() > expiry + Duration::from_secs(1)).then_some(())
    })
    .await;

    let again = tls_client::connect_with(mesh.db_public, config.clone()).await;
    if let Ok(s) = again {
        assert_eq!(
            s.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "the test must exercise resumption"
        );
        assert!(!echoes(s).await, "an expired caller got in by resuming");
    }
    db.wait_log("resumed session refused: its certificate is no longer valid")
        .await;
}

/// The same on the outbound side: a session resumed with a server whose certificate has
/// expired since is refused (the retry's full handshake is refused too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_certificate_expired_is_not_trusted_through_a_resumed_session() {
    use std::time::{Duration, SystemTime};

    let mesh = Mesh::new().await;
    // Both proxies up first, with no connection through web yet (so it holds no ticket):
    // the clock starts only once db presents its short-lived certificate.
    let _db = mesh.start_db().await;
    let web = mesh.start_web().await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Whole seconds: the certificate's notAfter has no finer resolution.
    // Room for db to pick the leaf up and for web to resume on a loaded machine; the test
    // then waits out the rest.
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(now + 12);
    let short = mesh.ca.leaf_expiring("db", "dc1", expiry);
    mesh.agent.set_leaf("db", &short);
    let web_leaf = mesh.ca.leaf("web", "dc1");
    eventually("db presents its short-lived leaf", DEADLINE, || async {
        let serial = tls_client::presented_serial(mesh.db_public, Some(&web_leaf)).await?;
        (serial == short.serial).then_some(())
    })
    .await;
    // web's tickets for db now come from handshakes with the short-lived certificate.
    eventually("web resumes a session with db", DEADLINE, || async {
        assert_eq!(round_trip(mesh.web_upstream, b"ok").await.unwrap(), b"ok");
        web.logs().contains("resumed=true").then_some(())
    })
    .await;
    assert!(
        SystemTime::now() < expiry,
        "the certificate expired before the session was resumed: the test proves nothing"
    );

    eventually("db's certificate has expired", DEADLINE, || async {
        (SystemTime::now() > expiry + Duration::from_secs(1)).then_some(())
    })
    .await;
    assert!(
        !matches!(round_trip(mesh.web_upstream, b"late").await, Ok(b) if b == b"late"),
        "served through an expired server certificate"
    );
    web.wait_log("resumed session: ").await;
}

/// Tickets are kept per endpoint while its latest handshake selected our ALPN; one can still
/// reach a server that is not consul-proxy (a balancer in front of both kinds, or a ticket
/// arriving while another connection set that flag). A session resumed without our ALPN is
/// refused: such a server may skip authorization when resuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_by_a_server_that_is_not_consul_proxy_carries_no_bytes() {
    let mesh = Mesh::new().await;
    let server = TlsEchoServer::start_mesh_then_plain(&mesh.ca.leaf("db", "dc1")).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", server.port, "dc1")]);
    let web = mesh.start_web().await;
    // The first handshake selects our ALPN: web keeps the server's tickets.
    assert_eq!(round_trip(mesh.web_upstream, b"one").await.unwrap(), b"one");
    // The next offers one, and the server resumes without our ALPN.
    let _ = round_trip(mesh.web_upstream, b"two").await;
    eventually("the server resumed a session", DEADLINE, || async {
        (server.resumed.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    server.bytes_received_once_closed().await;
    assert_eq!(
        server.resumed_bytes.load(Ordering::SeqCst),
        0,
        "bytes went over a session the server resumed without our ALPN"
    );
    web.wait_log("resumed session: the server is not consul-proxy")
        .await;
}
