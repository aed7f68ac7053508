use serde_json::json;

use crate::support::fake_agent::health_entry;
use crate::support::mesh::Mesh;
use crate::support::pki::TestCa;
use crate::support::tls_client::TlsEchoServer;
use crate::support::{DEADLINE, closed_without_data, eventually, free_port, round_trip};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_presenting_another_service_is_refused_before_any_data() {
    let mesh = Mesh::new().await;
    let impostor = TlsEchoServer::start(&mesh.ca.leaf("cache", "dc1")).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", impostor.port, "dc1")]);
    let web = mesh.start_web().await;
    assert!(closed_without_data(mesh.web_upstream).await);
    web.wait_log("server presented spiffe://").await;
    web.wait_log(
        "expected spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/db",
    )
    .await;
    // (The log above shows the handshake reached the impostor. Its own handshake count is not
    // waited for: web aborts right after its side of the handshake, and the server may see
    // the reset before it has counted the handshake.)
    assert_eq!(
        impostor.bytes_received_once_closed().await,
        0,
        "no client byte reached the impostor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_in_the_wrong_datacenter_is_refused() {
    let mesh = Mesh::new().await;
    let other_dc = TlsEchoServer::start(&mesh.ca.leaf("db", "dc2")).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", other_dc.port, "dc1")]);
    let web = mesh.start_web().await;
    assert!(closed_without_data(mesh.web_upstream).await);
    web.wait_log("upstream identity check failed").await;
    assert_eq!(other_dc.bytes_received_once_closed().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_in_another_trust_domain_is_refused() {
    let mesh = Mesh::new().await;
    let foreign = mesh.ca.leaf_with(
        "db",
        crate::support::pki::LeafSpec {
            uris: vec!["spiffe://other-cluster.consul/ns/default/dc/dc1/svc/db".into()],
            expired: false,
        },
    );
    let server = TlsEchoServer::start(&foreign).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", server.port, "dc1")]);
    let web = mesh.start_web().await;
    assert!(closed_without_data(mesh.web_upstream).await);
    web.wait_log("not in our trust domain").await;
    assert_eq!(server.bytes_received_once_closed().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_from_another_ca_is_refused() {
    let mesh = Mesh::new().await;
    let rogue = TestCa::new("99999999-2222-3333-4444-555555555555");
    let fake_db = TlsEchoServer::start(&rogue.leaf("db", "dc1")).await;
    mesh.agent
        .set_health("db", vec![health_entry("db", fake_db.port, "dc1")]);
    let web = mesh.start_web().await;
    assert!(closed_without_data(mesh.web_upstream).await);
    web.wait_log("UnknownIssuer").await;
    assert_eq!(fake_db.bytes_received_once_closed().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_skipped_for_a_live_one() {
    let mesh = Mesh::new().await;
    let dead = free_port();
    mesh.agent.set_health(
        "db",
        vec![
            health_entry("db", dead, "dc1"),
            health_entry("db", mesh.db_public, "dc1"),
        ],
    );
    let _db = mesh.start_db().await;
    let _web = mesh.start_web().await;
    for i in 0..20u8 {
        let back = round_trip(mesh.web_upstream, &[i; 32]).await.unwrap();
        assert_eq!(
            back,
            vec![i; 32],
            "connection {i} retried onto the live endpoint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_endpoint_closes_the_local_connection() {
    let mesh = Mesh::new().await;
    mesh.agent.set_health("db", vec![]);
    let web = mesh.start_web().await;
    assert!(closed_without_data(mesh.web_upstream).await);
    web.wait_log("no healthy endpoint").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_query_upstream_reaches_the_query_result() {
    let mesh = Mesh::new().await;
    let port = free_port();
    let mut web = mesh.web_with(vec![
        json!({"DestinationType": "prepared_query", "DestinationName": "db-query", "LocalBindPort": port}),
    ]);
    web["Proxy"]["Upstreams"][0]["MeshGateway"] = json!({});
    mesh.agent.set_service(web);
    let mut node = health_entry("db", mesh.db_public, "dc1");
    node["Service"]["Tags"] = serde_json::Value::Null;
    mesh.agent.set_query("db-query", "db", vec![node]);
    let _db = mesh.start_db().await;
    let _web = mesh.start_web().await;
    let back = tokio::time::timeout(DEADLINE, round_trip(port, b"via query"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"via query");
    assert!(mesh.agent.count("GET /v1/query/db-query/execute") >= 1);
}

/// A prepared query that answers nothing (its destination not up yet) is executed again
/// after 1 s, then 2 s, ... rather than the usual 10 s, so the upstream serves soon after the
/// destination appears. Three executions take about 3 s this way and 20 s at the usual pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_prepared_query_answer_is_asked_again_sooner() {
    let mesh = Mesh::new().await;
    let port = free_port();
    mesh.agent.set_service(mesh.web_with(vec![
        json!({"DestinationType": "prepared_query", "DestinationName": "db-query", "LocalBindPort": port}),
    ]));
    mesh.agent.set_query("db-query", "db", vec![]);
    let _db = mesh.start_db().await;
    let web = mesh.start_web().await;
    assert!(closed_without_data(port).await);
    web.wait_log("no healthy endpoint").await;
    const ATTEMPT: std::time::Duration = std::time::Duration::from_secs(3);
    let executions = || mesh.agent.count("GET /v1/query/db-query/execute");
    eventually(
        "three executions while the answer is empty",
        std::time::Duration::from_secs(12),
        || async { (executions() >= 3).then_some(()) },
    )
    .await;
    mesh.agent.set_query(
        "db-query",
        "db",
        vec![health_entry("db", mesh.db_public, "dc1")],
    );
    eventually("bytes through the query's answer", DEADLINE, || async {
        let back = tokio::time::timeout(ATTEMPT, round_trip(port, b"via query")).await;
        (back.ok()?.ok()? == b"via query").then_some(())
    })
    .await;
}

/// An upstream whose TLS stream ends without close_notify in the middle of a response: the
/// local client gets the bytes that came, then a reset, never a clean end of stream it could
/// take for a complete response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cut_mid_response_reaches_the_local_client_as_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mesh = Mesh::new().await;
    let acceptor = crate::support::tls_client::acceptor(&mesh.ca.leaf("db", "dc1"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut request = [0u8; 3];
        s.read_exact(&mut request).await.unwrap();
        s.write_all(b"first half").await.unwrap();
        s.flush().await.unwrap();
        let (mut tcp, _) = s.into_inner();
        tcp.shutdown().await.unwrap(); // FIN, no close_notify
        tcp
    });
    mesh.agent
        .set_health("db", vec![health_entry("db", port, "dc1")]);
    let _web = mesh.start_web().await;

    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", mesh.web_upstream))
        .await
        .unwrap();
    client.write_all(b"GET").await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(DEADLINE, client.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"first half");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the cut reaches the client as an abort"
    );
    drop(server.await.unwrap());
}

/// Over plain HTTP each long-poll holds a connection to the agent, which limits connections
/// per client address for every proxy on the host: at most four upstreams long-poll, the rest
/// poll the agent's cache, still serve and still see changes; a slot freed by a removed
/// upstream goes to a polling one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http1_at_most_four_upstreams_long_poll_and_the_rest_still_follow_changes() {
    use crate::support::fake_agent::upstream_json;
    let mesh = Mesh::new().await;
    let names = ["db", "u1", "u2", "u3", "u4", "u5"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    for name in names {
        // Every upstream leads to db's proxy (the entries name db as the destination).
        mesh.agent
            .set_health(name, vec![health_entry("db", mesh.db_public, "dc1")]);
    }
    mesh.agent.set_service(
        mesh.web_with(
            names
                .iter()
                .zip(&ports)
                .map(|(n, p)| upstream_json(n, *p))
                .collect(),
        ),
    );
    let _db = mesh.start_db().await;
    let web = mesh.start_web().await;

    for (name, port) in names.iter().zip(&ports) {
        assert_eq!(
            round_trip(*port, name.as_bytes()).await.unwrap(),
            name.as_bytes(),
            "through upstream {name}"
        );
    }
    let (max, long_polled) = eventually("four upstreams long-poll", DEADLINE, || async {
        let (max, services) = mesh.agent.health_long_polls();
        (services.len() >= 4).then_some((max, services))
    })
    .await;
    assert_eq!(max, 4, "never more than four at once: {long_polled:?}");
    assert_eq!(long_polled.len(), 4, "{long_polled:?}");
    assert_eq!(
        web.logs()
            .matches("polling this upstream's endpoints instead")
            .count(),
        2,
        "{}",
        web.logs()
    );

    // A polled upstream still sees a change (within its 15 s interval).
    let polled = names
        .iter()
        .find(|n| !long_polled.iter().any(|l| l == *n))
        .unwrap();
    let published = || {
        web.logs()
            .matches(&format!(
                "agent watch published a new value watch=\"endpoints service {polled}\""
            ))
            .count()
    };
    let before = published();
    assert!(
        before > 0,
        "the log line this test waits on:\n{}",
        web.logs()
    );
    mesh.agent.set_health(
        polled,
        vec![
            health_entry("db", mesh.db_public, "dc1"),
            health_entry("db", free_port(), "dc1"),
        ],
    );
    crate::support::eventually(
        "the polled upstream sees the change",
        DEADLINE * 2,
        || async { (published() > before).then_some(()) },
    )
    .await;

    // Removing an upstream that long-polls frees its slot for one that polls.
    let removed = &long_polled[0];
    mesh.agent.set_service(
        mesh.web_with(
            names
                .iter()
                .zip(&ports)
                .filter(|(n, _)| *n != removed)
                .map(|(n, p)| upstream_json(n, *p))
                .collect(),
        ),
    );
    // A polled upstream looks for a free slot after each read, one per 15 s.
    web.wait_log_within(
        "a long-poll slot is free; long-polling this upstream's endpoints again",
        DEADLINE * 2,
    )
    .await;
}
