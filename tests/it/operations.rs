//! What operators rely on: unix sockets on both local sides (against a real agent), exit 1 on
//! a port that cannot be bound, `/ready` while draining, and the TLS handshake counters.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::support::consul::{ConsulAgent, Mode, service_with_sidecar};
use crate::support::mesh::Mesh;
use crate::support::tls_client;
use crate::support::{
    DEADLINE, EchoServer, ProxyProcess, admin_get, eventually, exits_1_saying, free_port,
    open_echoing, round_trip,
};

/// A unix-socket echo server that counts the connections it accepted.
struct UnixEcho {
    path: PathBuf,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl UnixEcho {
    fn start(path: &Path) -> Self {
        let listener = UnixListener::bind(path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(crate::support::echo_until_eof(s));
            }
        });
        UnixEcho {
            path: path.to_owned(),
            accepted,
            task,
        }
    }
}

impl Drop for UnixEcho {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `data` over a unix socket, half-closes, and returns everything read back.
async fn unix_round_trip(path: &Path, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    match tokio::time::timeout(DEADLINE, s.read_to_end(&mut back)).await {
        Ok(r) => r.map(|_| back),
        Err(_) => Err(std::io::Error::other("unix round trip timed out")),
    }
}

/// db's sidecar registered on a real agent with `Proxy.LocalServiceSocketPath`: an mTLS caller
/// on the public port is echoed by the app listening on that unix socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_app_on_a_unix_socket_serves_mtls_callers() {
    let Some(agent) = ConsulAgent::start(Mode::Dev).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let app = UnixEcho::start(&dir.path().join("db.sock"));
    let db_public = free_port();
    let mut db = service_with_sidecar("db", 0, db_public, vec![]);
    db["Connect"]["SidecarService"]["Proxy"]["LocalServiceSocketPath"] =
        app.path.to_str().unwrap().into();
    agent.register(db).await;
    agent.intention("web", "db", "allow").await;
    let proxy = ProxyProcess::start(&["-http-addr", &agent.addr(), "-sidecar-for", "db"]).await;

    let leaf = agent.leaf("web").await;
    let mut s = tls_client::connect(db_public, Some(&leaf))
        .await
        .unwrap_or_else(|e| panic!("{e}; the proxy's log:\n{}", proxy.logs()));
    s.write_all(b"over the mesh to a unix socket")
        .await
        .unwrap();
    let mut back = [0u8; 30];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| panic!("no echo; the proxy's log:\n{}", proxy.logs()))
        .unwrap_or_else(|e| panic!("no echo ({e}); the proxy's log:\n{}", proxy.logs()));
    assert_eq!(&back, b"over the mesh to a unix socket");
    assert_eq!(
        app.accepted.load(Ordering::SeqCst),
        1,
        "the unix-socket app took the caller"
    );
}

/// web's upstream `db` registered on a real agent with `LocalBindSocketPath` and
/// `LocalBindSocketMode` "0600": the socket has that mode, and a local client connecting to it
/// reaches db's app through the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_on_a_unix_socket_has_the_requested_mode_and_reaches_the_destination() {
    let Some(agent) = ConsulAgent::start(Mode::Dev).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("db-upstream.sock");
    let echo = EchoServer::start().await;
    let db_public = free_port();
    agent
        .register(service_with_sidecar("db", echo.port, db_public, vec![]))
        .await;
    let upstream = json!({
        "DestinationName": "db",
        "LocalBindSocketPath": socket.to_str().unwrap(),
        "LocalBindSocketMode": "0600",
    });
    agent
        .register(service_with_sidecar(
            "web",
            free_port(),
            free_port(),
            vec![upstream],
        ))
        .await;
    agent.intention("web", "db", "allow").await;
    let _db = ProxyProcess::start(&["-http-addr", &agent.addr(), "-sidecar-for", "db"]).await;
    agent.wait_passing("db", 1).await;
    let web = ProxyProcess::start(&["-http-addr", &agent.addr(), "-sidecar-for", "web"]).await;

    let meta = std::fs::symlink_metadata(&socket)
        .unwrap_or_else(|e| panic!("no socket at {socket:?} ({e}):\n{}", web.logs()));
    assert!(meta.file_type().is_socket(), "{socket:?} is a unix socket");
    assert_eq!(
        format!("{:04o}", meta.permissions().mode() & 0o777),
        "0600",
        "the socket has LocalBindSocketMode"
    );
    // The agent's cached health view (which the proxy reads) may still lag behind the passing
    // check seen above: the first connections can find no endpoint.
    let data = b"from a unix-socket client to db";
    eventually(
        "a unix-socket client is echoed through the mesh",
        DEADLINE,
        || async {
            let back = unix_round_trip(&socket, data).await.ok()?;
            (back == data).then_some(())
        },
    )
    .await;
    assert!(echo.accepted() >= 1, "db's app took the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_public_port_exits_1_naming_the_address() {
    let mesh = Mesh::new().await;
    // The public listener binds all interfaces (the registration's Address is empty).
    let _taken = std::net::TcpListener::bind(("0.0.0.0", mesh.db_public)).unwrap();
    let args = mesh.args("db-sidecar-proxy");
    exits_1_saying(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[&format!("cannot listen on 0.0.0.0:{}", mesh.db_public)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_upstream_port_exits_1_naming_the_address() {
    let mesh = Mesh::new().await;
    let _taken = std::net::TcpListener::bind(("127.0.0.1", mesh.web_upstream)).unwrap();
    let args = mesh.args("web-sidecar-proxy");
    exits_1_saying(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[&format!("cannot listen on 127.0.0.1:{}", mesh.web_upstream)],
    )
    .await;
}

/// After SIGTERM, while an open connection keeps the proxy draining, `/ready` answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_503_while_draining() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let admin = free_port();
    let mut web = mesh
        .start_web_with(&["-admin-addr", &format!("127.0.0.1:{admin}")])
        .await;
    let mut open = open_echoing(mesh.web_upstream).await;
    assert_eq!(
        admin_get(admin, "/ready").await,
        (200, "ready\n".to_owned()),
        "ready before the signal"
    );

    web.signal("TERM");
    web.wait_notify("STOPPING=1").await;
    let body = eventually("/ready says 503 after SIGTERM", DEADLINE, || async {
        let (status, body) = admin_get(admin, "/ready").await;
        (status == 503).then_some(body)
    })
    .await;
    assert_eq!(body, "not ready\n");
    // It said so during the drain: the proxy is still up and the open connection still served.
    assert!(web.is_running(), "still draining:\n{}", web.logs());
    let mut b = [0u8; 1];
    open.write_all(b"d").await.unwrap();
    tokio::time::timeout(DEADLINE, open.read_exact(&mut b))
        .await
        .expect("echo during the drain")
        .unwrap();
    assert_eq!(&b, b"d");
    assert_eq!(admin_get(admin, "/ready").await.0, 503, "still 503");

    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ =
        crate::support::within("the drained connection's end", open.read_to_end(&mut rest)).await;
    assert_eq!(web.wait_exit(DEADLINE).await.code(), Some(0));
}

/// `consul_proxy_tls_handshakes_total{side,kind}` from a proxy's admin endpoint.
async fn handshakes(admin: u16, side: &str, kind: &str) -> u64 {
    let metrics = admin_get(admin, "/metrics").await.1;
    let prefix = format!("consul_proxy_tls_handshakes_total{{side=\"{side}\",kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{metrics}"))
        .parse()
        .unwrap()
}

/// The handshake counters of web (outbound) and db (inbound): full, then resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_counters_count_full_and_resumed_handshakes_between_proxies() {
    let mesh = Mesh::new().await;
    let (db_admin, web_admin) = (free_port(), free_port());
    let _db = mesh
        .start_db_with(&["-admin-addr", &format!("127.0.0.1:{db_admin}")])
        .await;
    let _web = mesh
        .start_web_with(&["-admin-addr", &format!("127.0.0.1:{web_admin}")])
        .await;
    let counts = || async {
        [
            handshakes(web_admin, "outbound", "full").await,
            handshakes(web_admin, "outbound", "resumed").await,
            handshakes(db_admin, "inbound", "full").await,
            handshakes(db_admin, "inbound", "resumed").await,
        ]
    };
    assert_eq!(
        counts().await,
        [0, 0, 0, 0],
        "nothing before any connection"
    );

    // The first connection has no session to resume.
    assert_eq!(round_trip(mesh.web_upstream, b"1").await.unwrap(), b"1");
    assert_eq!(
        counts().await,
        [1, 0, 1, 0],
        "one full handshake on each side"
    );

    let connections = AtomicU64::new(1);
    let [out_full, out_resumed, in_full, in_resumed] =
        eventually("web resumed a session with db", DEADLINE, || async {
            assert_eq!(round_trip(mesh.web_upstream, b"r").await.unwrap(), b"r");
            connections.fetch_add(1, Ordering::SeqCst);
            let c = counts().await;
            (c[1] >= 1).then_some(c)
        })
        .await;
    let connections = connections.load(Ordering::SeqCst);
    assert!(in_resumed >= 1, "db counted the resumed handshake");
    assert!(out_full >= 1 && in_full >= 1);
    assert_eq!(
        out_full + out_resumed,
        connections,
        "web counted one handshake per connection"
    );
    assert_eq!(
        in_full + in_resumed,
        connections,
        "db counted one handshake per connection"
    );
    assert_eq!(
        (out_full, out_resumed),
        (in_full, in_resumed),
        "both sides agree on each handshake's kind"
    );
}

/// The admin endpoint has no authentication: bound beyond loopback, the proxy says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_endpoint_beyond_loopback_is_warned_about() {
    let mesh = Mesh::new().await;
    let (wide, narrow) = (free_port(), free_port());
    let warning = "the admin endpoint is not on loopback";
    let db = mesh
        .start_db_with(&["-admin-addr", &format!("0.0.0.0:{wide}")])
        .await;
    assert_eq!(admin_get(wide, "/ready").await.0, 200);
    assert!(db.logs().contains(warning), "{}", db.logs());
    let web = mesh
        .start_web_with(&["-admin-addr", &format!("127.0.0.1:{narrow}")])
        .await;
    assert_eq!(admin_get(narrow, "/ready").await.0, 200);
    assert!(!web.logs().contains(warning), "{}", web.logs());
}
