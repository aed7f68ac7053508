use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::fake_agent::{Fault, intention_json};
use crate::support::mesh::Mesh;
use crate::support::pki::{LeafSpec, TestCa};
use crate::support::tls_client::{self, echoes};
use crate::support::{DEADLINE, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_caller_reaches_the_app() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    assert!(echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1"))).await);
    assert_eq!(mesh.echo.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_intention_refuses_before_dialing_the_app() {
    let mesh = Mesh::new().await;
    mesh.agent
        .set_intentions("db", vec![intention_json("web", "db", "deny", 9)]);
    let db = mesh.start_db().await;
    assert!(!echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1"))).await);
    db.wait_log("connection denied").await;
    assert_eq!(
        mesh.echo.accepted(),
        0,
        "a denied caller must never reach the local app"
    );

    // Flip to allow: new connections get through without a restart.
    mesh.agent
        .set_intentions("db", vec![intention_json("web", "db", "allow", 9)]);
    eventually("allow takes effect", DEADLINE, || async {
        echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1")))
            .await
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_intention_denies_at_l4() {
    let mesh = Mesh::new().await;
    let mut l7 = intention_json("web", "db", "", 9);
    l7["Permissions"] = json!([{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]);
    l7.as_object_mut().unwrap().remove("Action");
    mesh.agent.set_intentions("db", vec![l7]);
    let db = mesh.start_db().await;
    assert!(!echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1"))).await);
    db.wait_log("L7 intention").await;
    assert_eq!(mesh.echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_caller_gets_the_agent_default_without_a_round_trip_per_connection() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    db.wait_log("learned the agent's default intention policy")
        .await;
    let before = mesh.agent.count("POST /v1/agent/connect/authorize");
    for _ in 0..5 {
        assert!(
            echoes(mesh.db_public, Some(&mesh.ca.leaf("api", "dc1"))).await,
            "default allow"
        );
    }
    assert_eq!(
        mesh.agent.count("POST /v1/agent/connect/authorize"),
        before,
        "no agent call per connection once the default is known"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_caller_is_denied_when_the_default_is_deny() {
    let mesh = Mesh::new().await;
    mesh.agent.set_default_allow(false);
    let db = mesh.start_db().await;
    db.wait_log("learned the agent's default intention policy")
        .await;
    assert!(!echoes(mesh.db_public, Some(&mesh.ca.leaf("api", "dc1"))).await);
    assert!(
        echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1"))).await,
        "the allow intention still applies"
    );
    assert_eq!(mesh.echo.accepted(), 1);
}

/// While a wildcard intention covers every caller the default cannot be re-learned; if it
/// changes meanwhile, the old one must not decide once the wildcard goes. The agent's answers
/// are slowed so that a stale default, had it been kept, would decide before the re-probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_hidden_by_a_wildcard_is_not_reused_after_the_wildcard_goes() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    db.wait_log("learned the agent's default intention policy policy=Allow")
        .await;
    let web_allow = intention_json("web", "db", "allow", 9);
    mesh.agent.set_intentions(
        "db",
        vec![web_allow.clone(), intention_json("*", "db", "deny", 8)],
    );
    db.wait_log("a wildcard intention hides the agent's default policy")
        .await;
    mesh.agent.set_default_allow(false);
    mesh.agent.set_path_fault(
        "POST /v1/agent/connect/authorize",
        Fault::Delay(std::time::Duration::from_secs(2)),
    );
    let published = || {
        db.logs()
            .matches("agent watch published a new value watch=\"intentions\"")
            .count()
    };
    let before = published();
    assert!(
        before > 0,
        "the log line this test waits on:\n{}",
        db.logs()
    );
    mesh.agent.set_intentions("db", vec![web_allow]);
    eventually("the wildcard's removal reaches db", DEADLINE, || async {
        (published() > before).then_some(())
    })
    .await;
    assert!(
        !echoes(mesh.db_public, Some(&mesh.ca.leaf("api", "dc1"))).await,
        "an unmatched caller is decided by the agent's current default (deny)"
    );
    assert_eq!(mesh.echo.accepted(), 0);
    db.wait_log("learned the agent's default intention policy policy=Deny")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_caller_is_denied_when_nobody_knows_the_default() {
    let mesh = Mesh::new().await;
    mesh.agent.set_path_fault(
        "POST /v1/agent/connect/authorize",
        Fault::Status(500, "boom".into()),
    );
    let db = mesh.start_db().await;
    assert!(
        !echoes(mesh.db_public, Some(&mesh.ca.leaf("api", "dc1"))).await,
        "fail closed"
    );
    db.wait_log("cannot ask the agent for the default intention policy; denying")
        .await;
    assert_eq!(mesh.echo.accepted(), 0);
    assert!(
        echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1"))).await,
        "a matching allow needs no default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    assert!(!echoes(mesh.db_public, None).await);
    db.wait_log("TLS handshake failed").await;
    assert_eq!(mesh.echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    let mesh = Mesh::new().await;
    let rogue = TestCa::new("99999999-2222-3333-4444-555555555555");
    let db = mesh.start_db().await;
    // Same trust domain text, different key: only the chain can tell.
    let mut forged = rogue.leaf_with(
        "web",
        LeafSpec {
            uris: vec![mesh.ca.service_uri("web", "dc1")],
            expired: false,
        },
    );
    forged.service = "web".into();
    assert!(!echoes(mesh.db_public, Some(&forged)).await);
    db.wait_log("UnknownIssuer").await;
    assert_eq!(mesh.echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let expired = mesh.ca.leaf_with(
        "web",
        LeafSpec {
            uris: vec![mesh.ca.service_uri("web", "dc1")],
            expired: true,
        },
    );
    assert!(
        !echoes(mesh.db_public, Some(&expired)).await,
        "{}",
        db.logs()
    );
    db.wait_log("certificate expired").await;
    assert_eq!(mesh.echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_spiffe_ids_are_refused() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let td = mesh.ca.trust_domain.clone();
    let cases = [
        (
            vec![format!("spiffe://{td}/agent/client/dc/dc1/id/node-1")],
            "client agent identity",
        ),
        (vec![], "no spiffe:// URI SAN"),
        (
            vec![
                mesh.ca.service_uri("web", "dc1"),
                mesh.ca.service_uri("api", "dc1"),
            ],
            "2 spiffe:// URI SANs",
        ),
        (
            vec!["spiffe://other-cluster.consul/ns/default/dc/dc1/svc/web".to_owned()],
            "not in our trust domain",
        ),
    ];
    for (uris, log) in cases {
        let leaf = mesh.ca.leaf_with(
            "web",
            LeafSpec {
                uris,
                expired: false,
            },
        );
        assert!(!echoes(mesh.db_public, Some(&leaf)).await, "{log}");
        db.wait_log(log).await;
    }
    assert_eq!(mesh.echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_validation_off_relaxes_only_the_trust_domain() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db_with(&["-spiffe-validation=off"]).await;
    let foreign_td = mesh.ca.leaf_with(
        "web",
        LeafSpec {
            uris: vec!["spiffe://other-cluster.consul/ns/default/dc/dc1/svc/web".into()],
            expired: false,
        },
    );
    assert!(
        echoes(mesh.db_public, Some(&foreign_td)).await,
        "trust domain relaxed"
    );
    let rogue = TestCa::new("99999999-0000-0000-0000-000000000000").leaf("web", "dc1");
    assert!(
        !echoes(mesh.db_public, Some(&rogue)).await,
        "chain verification is never relaxed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_tls_port_is_dropped_and_service_continues() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let mut s = TcpStream::connect(("127.0.0.1", mesh.db_public))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("closed by the proxy");
    db.wait_log("TLS handshake failed").await;
    assert!(echoes(mesh.db_public, Some(&mesh.ca.leaf("web", "dc1"))).await);
}

/// The configured handshake timeout, and the most a close may take from the client's connect:
/// far below the 10 s default, so that a test fails if the configured value is ignored, with
/// seconds of slack for a loaded machine.
const HANDSHAKE_TIMEOUT_MS: u64 = 500;
const CUT_WITHIN: std::time::Duration = std::time::Duration::from_secs(4);

/// Asserts that the proxy cut the connection `cut_after` its start because of the configured
/// handshake timeout (well before the 10 s default), and said so.
async fn cut_by_the_handshake_timeout(
    cut_after: std::time::Duration,
    db: &crate::support::ProxyProcess,
) {
    assert!(
        cut_after < CUT_WITHIN,
        "closed {cut_after:?} after connecting: not at the configured {HANDSHAKE_TIMEOUT_MS} ms"
    );
    db.wait_log(&format!(
        "TLS handshake timed out timeout={HANDSHAKE_TIMEOUT_MS}ms"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshake_is_cut_at_the_handshake_timeout() {
    let mesh = Mesh::with_db_config(json!({"handshake_timeout_ms": HANDSHAKE_TIMEOUT_MS})).await;
    let db = mesh.start_db().await;
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", mesh.db_public))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("proxy closed the idle handshake");
    let cut_after = start.elapsed();
    assert!(matches!(n, Ok(0) | Err(_)), "nothing but a close: {n:?}");
    cut_by_the_handshake_timeout(cut_after, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_trickled_byte_by_byte_is_cut_at_the_handshake_timeout() {
    let mesh = Mesh::with_db_config(json!({"handshake_timeout_ms": HANDSHAKE_TIMEOUT_MS})).await;
    let db = mesh.start_db().await;
    // A real ClientHello, sent one byte every 50 ms: it would take seconds to complete, and
    // every byte resets no timer.
    let hello = tls_client::client_hello_bytes(&mesh.ca.leaf("web", "dc1"));
    assert!(hello.len() > 100, "a full ClientHello");
    let start = std::time::Instant::now();
    let (mut r, mut w) = TcpStream::connect(("127.0.0.1", mesh.db_public))
        .await
        .unwrap()
        .into_split();
    let trickle = async {
        for (sent, byte) in hello.iter().enumerate() {
            if w.write_all(std::slice::from_ref(byte)).await.is_err() {
                return sent;
            }
            // Pacing the client, not waiting for the proxy.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        hello.len()
    };
    let closed = async {
        let mut rest = Vec::new();
        let end = r.read_to_end(&mut rest).await;
        (end, rest, start.elapsed())
    };
    let ((end, rest, cut_after), sent) =
        tokio::time::timeout(DEADLINE, async { tokio::join!(closed, trickle) })
            .await
            .expect("the proxy closed the connection");
    assert!(
        end.is_err() || rest.is_empty(),
        "nothing but a close: {rest:?}"
    );
    assert!(
        sent < hello.len(),
        "cut while the ClientHello was still arriving ({sent} of {} bytes)",
        hello.len()
    );
    cut_by_the_handshake_timeout(cut_after, &db).await;
}

/// A caller whose TCP closes without a TLS close_notify (a crash, a cut cable): the bytes it
/// sent before reach the app, and the app sees an abort (reset), not a clean end of stream it
/// could take for a complete request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_ending_without_close_notify_reaches_the_app_as_data_then_a_reset() {
    let mesh = Mesh::new().await;
    let (app, mut ends) = crate::support::recording_app(false).await;
    mesh.set_db_app(app);
    let admin = crate::support::free_port();
    let db = mesh
        .start_db_with(&["-admin-addr", &format!("127.0.0.1:{admin}")])
        .await;
    let leaf = mesh.ca.leaf("web", "dc1");

    // Control: an orderly end (close_notify, then FIN) is a clean end of stream.
    let mut s = tls_client::connect(mesh.db_public, Some(&leaf))
        .await
        .unwrap();
    s.write_all(b"polite").await.unwrap();
    s.shutdown().await.unwrap();
    let (got, end) = tokio::time::timeout(DEADLINE, ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.as_slice(), end.is_ok()), (&b"polite"[..], true));

    // The same bytes, then the TCP stream ends with no close_notify.
    let mut s = tls_client::connect(mesh.db_public, Some(&leaf))
        .await
        .unwrap();
    s.write_all(b"abrupt").await.unwrap();
    s.flush().await.unwrap();
    let (mut tcp, _) = s.into_inner();
    tcp.shutdown().await.unwrap();
    let (got, end) = tokio::time::timeout(DEADLINE, ends.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"abrupt", "the bytes sent before the cut arrive");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the app sees an abort"
    );
    // ... and operators see it, counted apart from errors and logged.
    let truncated = "consul_proxy_connections_ended_total{side=\"inbound\",how=\"truncated\"} 1\n";
    eventually("the truncation is counted", DEADLINE, || async {
        crate::support::admin_get(admin, "/metrics")
            .await
            .1
            .contains(truncated)
            .then_some(())
    })
    .await;
    db.wait_log("the TLS peer closed without close_notify")
        .await;
}
