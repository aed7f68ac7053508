use crate::support::mesh::Mesh;
use crate::support::{ProxyProcess, pattern, round_trip};
use crate::support::{open_echoing, wait_closed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_carry_1_mib_each_way_and_100_sequential_connections() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let _web = mesh.start_web().await;

    let big = pattern(1 << 20, 7);
    let back = round_trip(mesh.web_upstream, &big).await.unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "1 MiB came back altered");

    for i in 0..99u8 {
        let data = pattern(4096 + usize::from(i), i);
        let back = round_trip(mesh.web_upstream, &data).await.unwrap();
        assert_eq!(back, data, "connection {i}");
    }
    assert_eq!(
        mesh.echo.accepted(),
        100,
        "every connection reached the app exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_for_with_one_candidate_serves() {
    let mesh = Mesh::new().await;
    let addr = mesh.agent.addr();
    let db = ProxyProcess::start(&["-http-addr", &addr, "-sidecar-for", "db"]).await;
    let _web = ProxyProcess::start(&["-http-addr", &addr, "-sidecar-for", "web"]).await;
    assert!(db.logs().contains("db-sidecar-proxy"));
    let back = round_trip(mesh.web_upstream, b"via sidecar-for")
        .await
        .unwrap();
    assert_eq!(back, b"via sidecar-for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_for_with_no_candidate_exits_non_zero() {
    let mesh = Mesh::new().await;
    // Our own notify socket, to see everything the proxy announced before it exited.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
    let mut p = ProxyProcess::spawn(
        &["-http-addr", &mesh.agent.addr(), "-sidecar-for", "cache"],
        &[("NOTIFY_SOCKET", sock.to_str().unwrap())],
    );
    let status = p.wait_exit(crate::support::DEADLINE).await;
    assert_eq!(status.code(), Some(1));
    assert!(
        p.logs()
            .contains("no sidecar proxy is registered for service ID \"cache\""),
        "{}",
        p.logs()
    );
    // The process is gone: whatever it sent is queued on the socket already.
    notify.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !msg.lines().any(|l| l == "READY=1"),
            "announced ready before exiting: {msg:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_for_with_two_candidates_names_both() {
    let mesh = Mesh::new().await;
    let mut second = crate::support::fake_agent::sidecar_json(
        "db-sidecar-2",
        "db",
        1,
        1,
        vec![],
        serde_json::json!({}),
    );
    second["Proxy"]["DestinationServiceID"] = "db".into();
    mesh.agent.set_service(second);
    let mut p = ProxyProcess::spawn(
        &["-http-addr", &mesh.agent.addr(), "-sidecar-for", "db"],
        &[],
    );
    let status = p.wait_exit(crate::support::DEADLINE).await;
    assert_eq!(status.code(), Some(1));
    let logs = p.logs();
    assert!(logs.contains("more than one sidecar proxy"), "{logs}");
    assert!(logs.contains("db-sidecar-2, db-sidecar-proxy"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_carry_traffic_enforce_and_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::new().await;
    let trace = ["-log-level", "consul_proxy=trace"];
    let db = mesh
        .start_db_with(&[&["-threads", "2"][..], &trace].concat())
        .await;
    let mut web = mesh
        .start_web_with(&[&["-threads", "3"][..], &trace].concat())
        .await;

    let big = pattern(1 << 20, 5);
    assert!(round_trip(mesh.web_upstream, &big).await.unwrap() == big);
    for i in 0..20u8 {
        assert_eq!(
            round_trip(mesh.web_upstream, &[i; 64]).await.unwrap(),
            vec![i; 64]
        );
    }
    // Connections are handed out in turn, so 21 of them reach every worker on both sides.
    for worker in ["worker=0", "worker=1"] {
        db.wait_log(worker).await;
    }
    for worker in ["worker=0", "worker=1", "worker=2"] {
        web.wait_log(worker).await;
    }

    // A live connection on a worker thread is closed by an intention change.
    let mut live = open_echoing(mesh.web_upstream).await;
    let set = |action| {
        mesh.agent.set_intentions(
            "db",
            vec![crate::support::fake_agent::intention_json(
                "web", "db", action, 9,
            )],
        )
    };
    set("deny");
    wait_closed(&mut live).await;
    db.wait_log("closing a live connection that is no longer authorized")
        .await;

    // SIGTERM: a connection open on a worker thread is served through the drain, and the
    // process exits 0 once it ends.
    set("allow");
    crate::support::eventually("allowed again", crate::support::DEADLINE, || async {
        (round_trip(mesh.web_upstream, b"x").await.ok()? == b"x").then_some(())
    })
    .await;
    let mut held = open_echoing(mesh.web_upstream).await;
    web.signal("TERM");
    web.wait_notify("STOPPING=1").await;
    held.write_all(b"d").await.unwrap();
    let mut b = [0u8; 1];
    crate::support::within("an echo", held.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"d", "served while draining");
    assert!(web.is_running(), "the drain waits for the open connection");
    held.shutdown().await.unwrap();
    wait_closed(&mut held).await;
    assert_eq!(
        web.wait_exit(crate::support::DEADLINE).await.code(),
        Some(0)
    );
}

/// Every TCP connection the proxies accept or dial has keepalive armed, so a peer that
/// vanishes without a FIN or reset (crashed node, expired NAT entry) frees its connection.
/// Read from the kernel's own table: an idle established socket with keepalive has its
/// keepalive timer pending (`tr` 2 in `/proc/net/tcp`), one without has no timer (0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxied_socket_has_tcp_keepalive() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let _web = mesh.start_web().await;
    let mut open = open_echoing(mesh.web_upstream).await;
    open.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    crate::support::within("an echo", open.read_exact(&mut buf))
        .await
        .unwrap();

    // (which socket, local port, remote port): the proxies' ends of each hop.
    let sockets = [
        (
            "web, accepted from the local client",
            Some(mesh.web_upstream),
            None,
        ),
        ("web, dialled to db", None, Some(mesh.db_public)),
        ("db, accepted from web", Some(mesh.db_public), None),
        ("db, dialled to the app", None, Some(mesh.echo.port)),
    ];
    crate::support::eventually(
        "keepalive timers on every proxy socket",
        crate::support::DEADLINE,
        || async {
            let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
            let timers: Vec<_> = sockets
                .iter()
                .map(|(what, local, remote)| (*what, timer_of(&table, *local, *remote)))
                .collect();
            let armed = timers.iter().all(|(_, t)| *t == Some(2));
            if !armed {
                eprintln!("timers so far (2 = keepalive): {timers:?}");
            }
            armed.then_some(())
        },
    )
    .await;
}

/// The `tr` (active timer) of the one established loopback socket with the given local or
/// remote port in a `/proc/net/tcp` table; `None` if there is not exactly one.
fn timer_of(table: &str, local: Option<u16>, remote: Option<u16>) -> Option<u8> {
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    let matching: Vec<u8> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (l, r, state, timer) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(5)?);
            let wanted = (local.is_none() || port(l) == local)
                && (remote.is_none() || port(r) == remote)
                && *state == "01";
            wanted.then(|| u8::from_str_radix(timer.split(':').next()?, 16).ok())?
        })
        .collect();
    match matching.as_slice() {
        [t] => Some(*t),
        _ => None,
    }
}
