use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::mesh::Mesh;
use crate::support::pki::TestCa;
use crate::support::tls_client::{self, serial_of, server_cert};
use crate::support::{DEADLINE, admin_get, eventually, free_port, open_echoing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leaf_is_used_by_new_handshakes_and_open_connections_survive() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let web_leaf = mesh.ca.leaf("web", "dc1");

    let mut long_lived = tls_client::connect(mesh.db_public, Some(&web_leaf))
        .await
        .unwrap();
    let old_serial = serial_of(&server_cert(&long_lived));
    long_lived.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    crate::support::within("an echo", long_lived.read_exact(&mut buf))
        .await
        .unwrap();

    let new_leaf = mesh.ca.leaf("db", "dc1");
    assert_ne!(new_leaf.serial, old_serial);
    mesh.agent.set_leaf("db", &new_leaf);
    eventually(
        "a new handshake presents the new leaf",
        DEADLINE,
        || async {
            let serial = tls_client::presented_serial(mesh.db_public, Some(&web_leaf)).await?;
            (serial == new_leaf.serial).then_some(())
        },
    )
    .await;

    long_lived.write_all(b"after!").await.unwrap();
    crate::support::within("an echo", long_lived.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        &buf, b"after!",
        "the connection opened before rotation still carries data"
    );
}

/// The agent's background renewal stalls (blocking queries keep returning the old leaf):
/// the proxy notices renewal is overdue, reads the leaf without blocking, and so gets the
/// leaf the agent re-issues once the old one expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leaf_renewal_is_caught_by_revalidating_after_expiry() {
    use std::time::{Duration, SystemTime};
    let mesh = Mesh::new().await;
    // Whole seconds, as the certificate's notAfter: the agent re-issues at the first
    // non-blocking read after it.
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(now + 6);
    // Issued an hour ago, so 90% of its lifetime has passed already.
    mesh.agent
        .set_leaf("db", &mesh.ca.leaf_expiring("db", "dc1", expiry));
    let renewed = mesh.ca.leaf("db", "dc1");
    mesh.agent
        .set_leaf_on_revalidation("db", &renewed, expiry + Duration::from_millis(1));
    let db = mesh.start_db().await;
    db.wait_log("the agent has not renewed our leaf certificate by 90% of its lifetime")
        .await;
    let web_leaf = mesh.ca.leaf("web", "dc1");
    eventually(
        "a new handshake presents the re-issued leaf",
        DEADLINE,
        || async {
            let serial = tls_client::presented_serial(mesh.db_public, Some(&web_leaf)).await?;
            (serial == renewed.serial).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_is_trusted_and_a_removed_one_is_not() {
    let mesh = Mesh::new().await;
    let _db = mesh.start_db().await;
    let ca2 = TestCa::new("11111111-2222-3333-4444-555555555555");
    let old_client = mesh.ca.leaf("web", "dc1");
    let new_client = ca2.leaf("web", "dc1");

    let echoes = |leaf: crate::support::pki::TestLeaf| async move {
        let mut s = tls_client::connect(mesh.db_public, Some(&leaf))
            .await
            .ok()?;
        s.write_all(b"x").await.ok()?;
        let mut b = [0u8; 1];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut b))
            .await
            .ok()?
            .ok()?;
        Some(())
    };
    assert!(
        echoes(new_client.clone()).await.is_none(),
        "unknown root not trusted yet"
    );

    // Rotation: both roots trusted, the new one active.
    mesh.agent.set_roots(TestCa::roots_json(&[&ca2, &mesh.ca]));
    eventually("new root trusted", DEADLINE, || echoes(new_client.clone())).await;
    assert!(
        echoes(old_client.clone()).await.is_some(),
        "old root still trusted during rotation"
    );

    // The old root is pruned: its leaves are refused for new connections.
    mesh.agent.set_roots(TestCa::roots_json(&[&ca2]));
    eventually("old root no longer trusted", DEADLINE, || {
        let c = old_client.clone();
        async move { echoes(c).await.is_none().then_some(()) }
    })
    .await;
}

/// The outbound side presents a rotated leaf too (and does not resume a session made with the
/// old one): after web's leaf changes, a new connection through web's upstream reaches db with
/// the new certificate, as db's admin endpoint shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_upstream_connections_present_the_rotated_leaf() {
    let mesh = Mesh::new().await;
    let admin = free_port();
    let _db = mesh
        .start_db_with(&["-admin-addr", &format!("127.0.0.1:{admin}")])
        .await;
    let _web = mesh.start_web().await;
    let caller_serials = || async {
        let status: serde_json::Value =
            serde_json::from_str(&admin_get(admin, "/status").await.1).unwrap();
        status["inbound"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["serial"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let before = open_echoing(mesh.web_upstream).await;
    let old_serials = caller_serials().await;
    assert_eq!(old_serials.len(), 1, "{old_serials:?}");

    let new_leaf = mesh.ca.leaf("web", "dc1");
    assert!(!old_serials.contains(&new_leaf.serial));
    mesh.agent.set_leaf("web", &new_leaf);
    eventually(
        "an upstream connection presents the new leaf",
        DEADLINE,
        || async {
            let _open = open_echoing(mesh.web_upstream).await;
            caller_serials()
                .await
                .contains(&new_leaf.serial)
                .then_some(())
        },
    )
    .await;
    drop(before);
}
