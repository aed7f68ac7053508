use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::fake_agent::{Fault, intention_json};
use crate::support::mesh::Mesh;
use crate::support::open_echoing;
use crate::support::{DEADLINE, ProxyProcess, refused, round_trip};

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
    open.read_exact(&mut buf).await.unwrap();
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
    for fault in [
        Fault::Status(500, "No cluster leader".into()),
        Fault::Garbage,
    ] {
        mesh.agent.set_fault(Some(fault));
        db.wait_log("agent watch failing").await;
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
        refused(mesh.web_upstream).await.then_some(())
    })
    .await;
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
    assert_eq!(
        p.logs().matches("waiting for the Consul agent").count(),
        1,
        "logged once, not per retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_proxy_id_exits_1_with_a_clear_message() {
    let mesh = Mesh::new().await;
    let mut p = ProxyProcess::spawn(
        &["-http-addr", &mesh.agent.addr(), "-proxy-id", "nope"],
        &[],
    );
    assert_eq!(p.wait_exit(DEADLINE).await.code(), Some(1));
    assert!(
        p.logs()
            .contains("no service with ID \"nope\" is registered"),
        "{}",
        p.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_403_exits_1_naming_the_missing_permission() {
    let mesh = Mesh::new().await;
    mesh.agent.set_fault(Some(Fault::Status(
        403,
        "Permission denied: token with AccessorID 'x' lacks permission 'service:read' on \"db-sidecar-proxy\"".into(),
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
    assert_eq!(p.wait_exit(DEADLINE).await.code(), Some(1));
    let logs = p.logs();
    assert!(
        logs.contains("the token likely lacks service:read"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_that_cannot_be_honoured_exits_1() {
    let mesh = Mesh::with_db_config(json!({"handshake_timeout_ms": "soon"})).await;
    let mut p = ProxyProcess::spawn(
        &[
            "-http-addr",
            &mesh.agent.addr(),
            "-proxy-id",
            "db-sidecar-proxy",
        ],
        &[],
    );
    assert_eq!(p.wait_exit(DEADLINE).await.code(), Some(1));
    assert!(
        p.logs()
            .contains("handshake_timeout_ms must be a non-negative integer"),
        "{}",
        p.logs()
    );
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
    assert!(!p.logs().contains("file-token-0123456789"));
}
