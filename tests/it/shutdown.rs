use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::mesh::Mesh;
use crate::support::{DEADLINE, ProxyProcess, eventually};
use crate::support::{open_echoing, wait_closed, wait_reset};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_drains_open_connections_and_exits_0() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let mut web = mesh.start_web().await;
    let mut open = open_echoing(mesh.web_upstream).await;
    let mut b = [0u8; 1];

    web.signal("TERM");
    web.wait_notify("STOPPING=1").await;
    crate::support::wait_not_accepting(mesh.web_upstream, "listener closed").await;
    assert!(
        web.is_running(),
        "still draining while a connection is open"
    );
    open.write_all(b"b").await.unwrap();
    crate::support::within("an echo", open.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"b", "the open connection is served during the drain");

    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    crate::support::within(
        "the end of the drained connection",
        open.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert_eq!(web.wait_exit(DEADLINE).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_connections_and_still_exits_0() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let mut web = mesh.start_web_with(&["-drain-timeout", "500ms"]).await;
    let mut open = open_echoing(mesh.web_upstream).await;

    web.signal("TERM");
    assert_eq!(web.wait_exit(DEADLINE).await.code(), Some(0));
    assert!(web.logs().contains("drain deadline reached"));
    wait_reset(&mut open).await;
}

/// An operator who does not want to wait for the drain (Ctrl-C twice, or a second SIGTERM)
/// gets the remaining connections cut at once, as aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_while_draining_cuts_at_once_and_exits_0() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let mut web = mesh.start_web_with(&["-drain-timeout", "1h"]).await;
    let mut open = open_echoing(mesh.web_upstream).await;

    web.signal("TERM");
    web.wait_notify("STOPPING=1").await;
    assert!(web.is_running(), "draining the open connection");
    web.signal("INT");
    assert_eq!(web.wait_exit(DEADLINE).await.code(), Some(0));
    assert!(
        web.logs()
            .contains("second shutdown signal: cutting the remaining connections now"),
        "{}",
        web.logs()
    );
    wait_reset(&mut open).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_before_ready_exits_0() {
    let mesh = Mesh::new().await;
    let addr = mesh.agent.addr();
    mesh.agent.stop();
    let mut p = ProxyProcess::spawn(&["-http-addr", &addr, "-proxy-id", "db-sidecar-proxy"], &[]);
    p.wait_log("waiting for the Consul agent").await;
    p.signal("TERM");
    assert_eq!(p.wait_exit(DEADLINE).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_change_during_the_drain_does_not_stop_the_exit() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    // The held connection keeps the drain going (no deadline to race) until the change has
    // been seen; then letting it go must end the drain and the process.
    let mut web = mesh.start_web_with(&["-drain-timeout", "1h"]).await;
    let mut held = open_echoing(mesh.web_upstream).await;
    web.signal("TERM");
    web.wait_notify("STOPPING=1").await;
    mesh.agent.set_service(mesh.web_with(vec![
        crate::support::fake_agent::upstream_json("db", mesh.web_upstream),
        crate::support::fake_agent::upstream_json("db", crate::support::free_port()),
    ]));
    web.wait_log("shutting down; ignoring a registration change")
        .await;
    assert!(web.is_running(), "still draining the held connection");
    held.shutdown().await.unwrap();
    wait_closed(&mut held).await;
    assert_eq!(web.wait_exit(DEADLINE).await.code(), Some(0));
}

/// The drain deadline also cuts a connection that is still waiting for its authorization (here
/// the agent takes a minute to answer), and the app never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_cuts_a_connection_still_being_authorized() {
    use crate::support::fake_agent::Fault;
    use crate::support::tls_client;

    let mesh = Mesh::new().await;
    // Every authorize call hangs, including the start-up probe of the default policy: so the
    // default is unknown and the caller's decision needs the agent.
    mesh.agent.set_path_fault(
        "POST /v1/agent/connect/authorize",
        Fault::Delay(std::time::Duration::from_secs(60)),
    );
    let mut db = mesh.start_db_with(&["-drain-timeout", "200ms"]).await;
    let leaf = mesh.ca.leaf("api", "dc1");
    let port = mesh.db_public;
    let caller = tokio::spawn(async move {
        let mut s = tls_client::connect(port, Some(&leaf)).await.unwrap();
        let _ = s.write_all(b"x").await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    eventually(
        "the caller's decision waits on the agent",
        DEADLINE,
        || async { (mesh.agent.count("POST /v1/agent/connect/authorize") >= 2).then_some(()) },
    )
    .await;

    db.signal("TERM");
    // Well past the 200 ms drain deadline, well short of the agent client's 15 s request
    // timeout that would otherwise end the wait.
    let bound = std::time::Duration::from_secs(5);
    assert_eq!(
        db.wait_exit(bound).await.code(),
        Some(0),
        "exited at the drain deadline, long before the agent answers: {}",
        db.logs()
    );
    tokio::time::timeout(DEADLINE, caller)
        .await
        .expect("the caller's connection was closed")
        .unwrap();
    assert_eq!(mesh.echo.accepted(), 0, "the app never got the caller");
}
