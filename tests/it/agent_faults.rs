use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::fake_agent::{Fault, intention_json};
use crate::support::mesh::Mesh;
use crate::support::{
    DEADLINE, ProxyProcess, admin_get, eventually, free_port, refused, round_trip,
};
use crate::support::{exits_1_saying, open_echoing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_down_after_start_keeps_existing_and_new_connections_working() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let web = mesh.start_web().await;
    let mut open = open_echoing(mesh.web_upstream).await;
    let mut buf = [0u8; 3];

    mesh.agent.stop();
    web.wait_log("agent watch failing").await;
    db.wait_log("agent watch failing").await;

    open.write_all(b"two").await.unwrap();
    crate::support::within("an echo", open.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"two", "the open connection kept flowing");
    for i in 0..10u8 {
        let back = round_trip(mesh.web_upstream, &[i; 100]).await.unwrap();
        assert_eq!(
            back,
            vec![i; 100],
            "new connection {i} served from the last good state"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_errors_and_garbage_keep_the_last_good_state_then_recover() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let _web = mesh.start_web().await;
    // Each fault is waited for by its own error text: "agent watch failing" is logged once per
    // change of failure kind, so it alone would not show that the second fault was seen.
    for (fault, seen) in [
        (
            Fault::Status(500, "No cluster leader".into()),
            "No cluster leader",
        ),
        (Fault::Garbage, "malformed response"),
    ] {
        mesh.agent.set_fault(Some(fault));
        db.wait_log(seen).await;
        let r = round_trip(mesh.web_upstream, b"still up").await;
        assert!(
            matches!(&r, Ok(b) if b == b"still up"),
            "{r:?}\nDB:\n{}\nWEB:\n{}",
            db.logs(),
            _web.logs()
        );
    }
    mesh.agent.set_fault(None);
    db.wait_log("agent watch recovered").await;
    // A change after recovery applies: deny web -> db.
    mesh.agent
        .set_intentions("db", vec![intention_json("web", "db", "deny", 9)]);
    crate::support::eventually("deny applies after recovery", DEADLINE, || async {
        (refused(mesh.web_upstream).await && db.logs().contains("connection denied")).then_some(())
    })
    .await;
    // Each watch logged its recovery once, however many retries it took.
    let logs = db.logs();
    let mut recovered: std::collections::HashMap<&str, usize> = Default::default();
    for line in logs.lines().filter(|l| l.contains("agent watch recovered")) {
        let watch = line.split("watch=").nth(1).unwrap_or(line);
        *recovered
            .entry(watch.split(' ').next().unwrap())
            .or_default() += 1;
    }
    assert!(!recovered.is_empty(), "{logs}");
    assert!(
        recovered.values().all(|n| *n == 1),
        "recoveries per watch: {recovered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_unreachable_at_start_waits_then_starts_when_it_appears() {
    let mesh = Mesh::new().await;
    let addr = mesh.agent.addr();
    mesh.agent.stop();
    let mut p = ProxyProcess::spawn(&["-http-addr", &addr, "-proxy-id", "db-sidecar-proxy"], &[]);
    p.wait_log("waiting for the Consul agent").await;
    assert!(p.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", mesh.db_public))
            .await
            .is_err(),
        "no listener before the agent answers"
    );
    mesh.agent.restart().await;
    p.wait_ready().await;
}

/// An agent answering 500 at start is waited for like an unreachable one (the same retry
/// loop), which lets the test count the retries: several, and one log line for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_failing_at_start_is_retried_and_logged_once() {
    let mesh = Mesh::new().await;
    mesh.agent.set_fault(Some(Fault::Status(
        500,
        "rpc error: No cluster leader".into(),
    )));
    let mut p = ProxyProcess::spawn(
        &[
            "-http-addr",
            &mesh.agent.addr(),
            "-proxy-id",
            "db-sidecar-proxy",
        ],
        &[],
    );
    p.wait_log("waiting for the Consul agent").await;
    eventually("three attempts", DEADLINE, || async {
        (mesh.agent.count("GET /v1/agent/service/db-sidecar-proxy") >= 3).then_some(())
    })
    .await;
    assert!(
        TcpStream::connect(("127.0.0.1", mesh.db_public))
            .await
            .is_err(),
        "no listener before the agent answers"
    );
    // Another kind of failure is logged too, once.
    mesh.agent
        .set_fault(Some(Fault::Status(429, "rate limited".into())));
    p.wait_log("rate limited").await;
    let attempts = mesh.agent.count("GET /v1/agent/service/db-sidecar-proxy");
    eventually("a retry after it", DEADLINE, || async {
        (mesh.agent.count("GET /v1/agent/service/db-sidecar-proxy") > attempts).then_some(())
    })
    .await;
    mesh.agent.set_fault(None);
    p.wait_ready().await;
    assert_eq!(
        p.logs().matches("waiting for the Consul agent").count(),
        2,
        "logged once per kind of failure, not per retry:\n{}",
        p.logs()
    );
    p.wait_log("the Consul agent is answering").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_proxy_id_exits_1_with_a_clear_message() {
    let mesh = Mesh::new().await;
    exits_1_saying(
        &["-http-addr", &mesh.agent.addr(), "-proxy-id", "nope"],
        &["no service with ID \"nope\" is registered"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_403_exits_1_naming_the_missing_permission() {
    let mesh = Mesh::new().await;
    mesh.agent.set_fault(Some(Fault::Status(
        403,
        "Permission denied: token with AccessorID 'x' lacks permission 'service:read' on \"db-sidecar-proxy\"".into(),
    )));
    let args = mesh.args("db-sidecar-proxy");
    exits_1_saying(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["the token likely lacks service:read"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_on_the_leaf_before_the_first_certificate_exits_1() {
    let mesh = Mesh::new().await;
    mesh.agent.set_path_fault(
        "GET /v1/agent/connect/ca/leaf/",
        Fault::Status(
            403,
            "Permission denied: token with AccessorID 'x' lacks permission 'service:write' on \"db\"".into(),
        ),
    );
    let args = mesh.args("db-sidecar-proxy");
    exits_1_saying(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "the agent refused the leaf watch",
            "the token likely lacks service:write",
        ],
    )
    .await;
}

/// A 403 on one upstream's endpoints is not fatal at start-up, unlike one on the roots, leaf,
/// intentions or registration: that upstream refuses connections and says why, the rest of
/// the proxy serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_on_an_upstreams_endpoints_does_not_stop_start_up() {
    let mesh = Mesh::new().await;
    mesh.agent.set_path_fault(
        "GET /v1/health/connect/db",
        Fault::Status(
            403,
            "Permission denied: token with AccessorID 'x' lacks permission 'service:read' on \"db\"".into(),
        ),
    );
    // Returns once the proxy reports ready (listeners bound, certificates loaded).
    let mut web = mesh.start_web().await;
    web.wait_log("the token likely lacks service:read").await;
    assert!(
        crate::support::closed_without_data(mesh.web_upstream).await,
        "the upstream without endpoints refuses"
    );
    assert!(web.is_running(), "{}", web.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_cannot_be_honoured_exits_1() {
    let mesh = Mesh::with_db_config(json!({"handshake_timeout_ms": "soon"})).await;
    let args = mesh.args("db-sidecar-proxy");
    exits_1_saying(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["handshake_timeout_ms must be a non-negative integer"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_as_a_header_and_never_logged() {
    let mesh = Mesh::new().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "file-token-0123456789\n").unwrap();
    let p = ProxyProcess::start(&[
        "-http-addr",
        &mesh.agent.addr(),
        "-proxy-id",
        "db-sidecar-proxy",
        "-token-file",
        token_file.to_str().unwrap(),
        "-log-level",
        "trace",
    ])
    .await;
    let tokens = mesh.agent.tokens();
    assert!(!tokens.is_empty());
    assert!(
        tokens
            .iter()
            .all(|t| t.as_deref() == Some("file-token-0123456789")),
        "every request carries the file's token (trimmed) in X-Consul-Token: {tokens:?}"
    );
    assert!(!p.logs().contains("file-token-0123456789"));
}

/// The leaf's `notAfter` as Unix seconds, read independently of the proxy.
fn not_after_unix(cert_pem: &str) -> i64 {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der.as_ref()).unwrap();
    cert.validity().not_after.timestamp()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_shows_a_failing_agent_while_serving_from_the_last_good_state() {
    let mesh = Mesh::new().await;
    let leaf = mesh.ca.leaf("db", "dc1");
    mesh.agent.set_leaf("db", &leaf);
    let admin = free_port();
    let _db = mesh
        .start_db_with(&["-admin-addr", &format!("127.0.0.1:{admin}")])
        .await;
    let m = admin_get(admin, "/metrics").await.1;
    for watch in ["roots", "leaf", "intentions"] {
        assert!(
            m.contains(&format!(
                "consul_proxy_agent_watch_failing{{watch=\"{watch}\"}} 0\n"
            )),
            "{m}"
        );
    }
    assert!(
        m.contains(&format!(
            "consul_proxy_leaf_expiry_timestamp_seconds {}\n",
            not_after_unix(&leaf.cert_pem)
        )),
        "{m}"
    );

    mesh.agent
        .set_fault(Some(Fault::Status(500, "No cluster leader".into())));
    eventually("the roots watch reported failing", DEADLINE, || async {
        let m = admin_get(admin, "/metrics").await.1;
        m.contains("consul_proxy_agent_watch_failing{watch=\"roots\"} 1\n")
            .then_some(())
    })
    .await;
    let (status, body) = admin_get(admin, "/status").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["watches"]["roots"]["failing"], true, "{json}");
    assert_eq!(json["watches"]["roots"]["failure"], "status", "{json}");
    assert!(json["watches"]["roots"]["errors"].as_u64().unwrap() >= 1);
    assert!(json["watches"]["roots"]["last_success_unix"].is_u64());
    assert_eq!(
        admin_get(admin, "/ready").await.0,
        200,
        "still ready: it serves from its last good state"
    );

    mesh.agent.set_fault(None);
    eventually("every watch recovered", DEADLINE, || async {
        let m = admin_get(admin, "/metrics").await.1;
        let failing = m
            .lines()
            .filter(|l| l.starts_with("consul_proxy_agent_watch_failing{"))
            .filter(|l| l.ends_with(" 1"))
            .count();
        (failing == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_says_not_ready_until_the_agent_answers() {
    let mesh = Mesh::new().await;
    let addr = mesh.agent.addr();
    mesh.agent.stop();
    let admin = free_port();
    let mut p = ProxyProcess::spawn(
        &[
            "-http-addr",
            &addr,
            "-proxy-id",
            "db-sidecar-proxy",
            "-admin-addr",
            &format!("127.0.0.1:{admin}"),
        ],
        &[],
    );
    p.wait_log("waiting for the Consul agent").await;
    let (status, body) = admin_get(admin, "/ready").await;
    assert_eq!((status, body.as_str()), (503, "not ready\n"));
    mesh.agent.restart().await;
    p.wait_ready().await;
    assert_eq!(admin_get(admin, "/ready").await.0, 200);
}

/// An agent that comes back with another ACL default (it restarted with other settings) while
/// the intentions stay the same: the new default applies without waiting for the periodic
/// re-probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_default_policy_after_an_agent_outage_is_learned_at_recovery() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    db.wait_log("learned the agent's default intention policy policy=Allow")
        .await;
    mesh.agent
        .set_fault(Some(Fault::Status(500, "No cluster leader".into())));
    db.wait_log("agent watch failing").await;
    mesh.agent.set_default_allow(false);
    mesh.agent.set_fault(None);
    db.wait_log("learned the agent's default intention policy policy=Deny")
        .await;
}

/// The proxy's registration is removed while it runs: it says so once, plainly, keeps
/// serving its last configuration (fail static), and says so again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_proxy_says_so_and_keeps_serving_its_last_configuration() {
    let mesh = Mesh::new().await;
    let db = mesh.start_db().await;
    let _web = mesh.start_web().await;
    mesh.agent.remove_service("db-sidecar-proxy");
    db.wait_log("our registration was removed from the agent (deregistered?)")
        .await;
    // Two more failed reads, so that "once" below means once over several retries.
    let asked = || mesh.agent.count("GET /v1/agent/service/db-sidecar-proxy");
    let after_removal = asked();
    crate::support::eventually("db asks twice more", DEADLINE, || async {
        (asked() >= after_removal + 2).then_some(())
    })
    .await;
    assert_eq!(
        round_trip(mesh.web_upstream, b"still served")
            .await
            .unwrap(),
        b"still served"
    );
    mesh.set_db_app(mesh.echo.port);
    db.wait_log("our registration is back").await;
    assert_eq!(
        db.logs().matches("our registration was removed").count(),
        1,
        "logged once, not per retry"
    );
}
