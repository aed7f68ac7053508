//! Against a real Consul agent (see `support::consul`): registration through the agent API,
//! both ways of naming the proxy, intentions with and without ACLs, CA rotation under load,
//! interop with `consul connect proxy` in both directions, and an agent restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::consul::{
    BuiltinProxy, ConsulAgent, Extras, Mode, service_with_sidecar, upstream,
};
use crate::support::open_echoing;
use crate::support::{
    DEADLINE, EchoServer, ProxyProcess, admin_get, eventually, exchange, free_port, pattern,
    round_trip,
};

/// web (upstream db) and db (in front of an echo server), registered on a real agent.
struct RealMesh {
    agent: ConsulAgent,
    echo: EchoServer,
    web_upstream: u16,
    db_public: u16,
    web_public: u16,
    /// What was registered, web's first, to register again on an agent that lost it.
    registrations: Vec<serde_json::Value>,
}

impl RealMesh {
    async fn start(mode: Mode) -> Option<Self> {
        Self::start_with(mode, Extras::default(), &[]).await
    }

    /// As [`RealMesh::start`], with agent extras and more upstreams for web (services with no
    /// instances: their endpoint watches run, nothing answers).
    async fn start_with(mode: Mode, extras: Extras, more_upstreams: &[&str]) -> Option<Self> {
        let agent = ConsulAgent::start_with(mode, extras).await?;
        let echo = EchoServer::start().await;
        let (web_upstream, db_public, web_public) = (free_port(), free_port(), free_port());
        let mut upstreams = vec![upstream("db", web_upstream)];
        upstreams.extend(
            more_upstreams
                .iter()
                .map(|name| upstream(name, free_port())),
        );
        let registrations = vec![
            service_with_sidecar("web", free_port(), web_public, upstreams),
            service_with_sidecar("db", echo.port, db_public, vec![]),
        ];
        for r in &registrations {
            agent.register(r.clone()).await;
        }
        Some(RealMesh {
            agent,
            echo,
            web_upstream,
            db_public,
            web_public,
            registrations,
        })
    }

    /// Registers web and db again, as at the start.
    async fn register_again(&self) {
        for r in &self.registrations {
            self.agent.register(r.clone()).await;
        }
    }

    fn proxy_args<'a>(&'a self, how: &'a str, id: &'a str, token: Option<&'a str>) -> Vec<String> {
        let mut args = vec![
            "-http-addr".to_owned(),
            self.agent.addr(),
            how.to_owned(),
            id.to_owned(),
        ];
        if let Some(t) = token {
            args.extend(["-token".to_owned(), t.to_owned()]);
        }
        args
    }

    async fn proxy(&self, how: &str, id: &str, token: Option<&str>) -> ProxyProcess {
        let args = self.proxy_args(how, id, token);
        ProxyProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    }

    /// Starts db's and web's consul-proxies with `args(proxy_id)` plus an admin endpoint each
    /// (intentions already set), and waits until bytes go through; returns both (db first)
    /// and their admin ports.
    async fn up_with_admins(
        &self,
        args: impl Fn(&str) -> Vec<String>,
    ) -> (Vec<ProxyProcess>, Vec<u16>) {
        let mut proxies = Vec::new();
        let mut admins = Vec::new();
        for id in ["db-sidecar-proxy", "web-sidecar-proxy"] {
            let admin = free_port();
            let mut args = args(id);
            args.extend(["-admin-addr".to_owned(), format!("127.0.0.1:{admin}")]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            proxies.push(ProxyProcess::start(&args).await);
            admins.push(admin);
        }
        self.agent.wait_passing("db", 1).await;
        eventually("bytes through web's db upstream", DEADLINE, || async {
            echoes(self.web_upstream, b"through").await.then_some(())
        })
        .await;
        (proxies, admins)
    }

    /// Allows web -> db, starts both consul-proxies with -proxy-id, and waits until bytes go
    /// through.
    async fn up(&self) -> (ProxyProcess, ProxyProcess) {
        self.agent.intention("web", "db", "allow").await;
        let db = self.proxy("-proxy-id", "db-sidecar-proxy", None).await;
        let web = self.proxy("-proxy-id", "web-sidecar-proxy", None).await;
        self.agent.wait_passing("db", 1).await;
        eventually("mesh up", DEADLINE, || async {
            echoes(self.web_upstream, b"up").await.then_some(())
        })
        .await;
        (db, web)
    }
}

async fn echoes(port: u16, data: &[u8]) -> bool {
    matches!(round_trip(port, data).await, Ok(back) if back == data)
}

/// As [`echoes`], without a half-close: for paths through Consul's built-in proxy, which
/// closes both directions on the first EOF.
async fn exchanges(port: u16, data: &[u8]) -> bool {
    matches!(exchange(port, data).await, Ok(back) if back == data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_id_and_sidecar_for_carry_traffic_through_a_real_agent() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let _db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    let _web = mesh.proxy("-sidecar-for", "web", None).await;
    mesh.agent.wait_passing("db", 1).await;
    let data = pattern(256 * 1024, 3);
    eventually("round trip through both proxies", DEADLINE, || async {
        echoes(mesh.web_upstream, &data).await.then_some(())
    })
    .await;
    for i in 0..20u8 {
        assert!(
            echoes(mesh.web_upstream, &[i; 1000]).await,
            "connection {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intentions_deny_and_allow_on_a_real_agent() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("web", "db", "deny").await;
    let db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    let _web = mesh.proxy("-proxy-id", "web-sidecar-proxy", None).await;
    mesh.agent.wait_passing("db", 1).await;
    // Until web's endpoint watch has db, its connections close before reaching db's proxy:
    // try until one is denied there, and none ever echoes.
    eventually("a connection denied by db's proxy", DEADLINE, || async {
        assert!(
            !echoes(mesh.web_upstream, b"denied?").await,
            "a denied caller got through"
        );
        db.logs().contains("connection denied").then_some(())
    })
    .await;
    assert_eq!(
        mesh.echo.accepted(),
        0,
        "a denied caller never reaches the app"
    );

    mesh.agent.intention("web", "db", "allow").await;
    eventually("allow applies", DEADLINE, || async {
        echoes(mesh.web_upstream, b"allowed").await.then_some(())
    })
    .await;
    let denied_before = db.logs().matches("connection denied").count();
    mesh.agent.intention("web", "db", "deny").await;
    eventually("deny applies to new connections", DEADLINE, || async {
        let refused = !echoes(mesh.web_upstream, b"x").await;
        let denied = db.logs().matches("connection denied").count() > denied_before;
        (refused && denied).then_some(())
    })
    .await;
}

/// The least-privilege ACL policy for a sidecar of `service` with the given upstreams. Kept in
/// the README: change both together.
fn proxy_policy(service: &str, upstreams: &[&str]) -> String {
    let mut rules = format!(
        "service \"{service}\" {{ policy = \"write\" }}\nservice \"{service}-sidecar-proxy\" {{ policy = \"read\" }}\n"
    );
    for u in upstreams {
        rules.push_str(&format!(
            "service \"{u}\" {{ policy = \"read\" }}\nservice \"{u}-sidecar-proxy\" {{ policy = \"read\" }}\n"
        ));
    }
    rules.push_str("node_prefix \"\" { policy = \"read\" }\n");
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_default_deny_with_least_privilege_proxy_tokens() {
    let Some(mesh) = RealMesh::start(Mode::DevAcl).await else {
        return;
    };
    let db_token = mesh
        .agent
        .token_with_rules("db-proxy", &proxy_policy("db", &[]))
        .await;
    let web_token = mesh
        .agent
        .token_with_rules("web-proxy", &proxy_policy("web", &["db"]))
        .await;
    let db = mesh
        .proxy("-proxy-id", "db-sidecar-proxy", Some(&db_token))
        .await;
    let _web = mesh.proxy("-sidecar-for", "web", Some(&web_token)).await;
    mesh.agent.wait_passing("db", 1).await;
    db.wait_log("learned the agent's default intention policy policy=Deny")
        .await;

    eventually(
        "a connection denied by the default policy",
        DEADLINE,
        || async {
            assert!(
                !echoes(mesh.web_upstream, b"no intention").await,
                "ACL default deny applies"
            );
            db.logs().contains("default policy deny").then_some(())
        },
    )
    .await;
    assert_eq!(mesh.echo.accepted(), 0);

    mesh.agent.intention("web", "db", "allow").await;
    eventually("allow intention lets web in", DEADLINE, || async {
        echoes(mesh.web_upstream, b"allowed").await.then_some(())
    })
    .await;
    for log in [db.logs(), _web.logs()] {
        assert!(
            !log.contains(&db_token) && !log.contains(&web_token),
            "a token leaked into the logs"
        );
        assert!(
            !log.contains("permission denied"),
            "a least-privilege token was refused:\n{log}"
        );
    }

    // A token that may not read web's sidecar: the agent hides it from the service list and
    // says so in a header, which the error passes on.
    let narrow = mesh
        .agent
        .token_with_rules("narrow", "service \"web\" { policy = \"write\" }\n")
        .await;
    let args = mesh.proxy_args("-sidecar-for", "web", Some(&narrow));
    let mut p = ProxyProcess::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_eq!(p.wait_exit(DEADLINE).await.code(), Some(1), "{}", p.logs());
    assert!(
        p.logs()
            .contains("the token likely lacks service:read on the sidecar"),
        "{}",
        p.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_keeps_streams_and_new_connections_use_the_new_root() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    let (db, _web) = mesh.up().await;

    // A long-lived connection that keeps exchanging data for the whole rotation.
    let stream = TcpStream::connect(("127.0.0.1", mesh.web_upstream))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let streamer = tokio::spawn(stream_until(stream, stop.clone(), exchanges.clone()));

    let old_root = active_root(&mesh.agent).await;
    let mut ca = mesh.agent.get("/v1/connect/ca/configuration").await;
    ca["Config"]["PrivateKeyType"] = "ec".into();
    ca["Config"]["PrivateKeyBits"] = 384.into();
    mesh.agent
        .send(
            reqwest::Method::PUT,
            "/v1/connect/ca/configuration",
            Some(ca),
        )
        .await;
    let new_root = active_root(&mesh.agent).await;
    assert_ne!(new_root, old_root, "the CA rotated");

    // The agent re-issues leaves within 30 s of a root change (Consul's jitter window).
    let client = mesh.agent.leaf("web").await;
    eventually(
        "db presents a leaf from the new root",
        Duration::from_secs(90),
        || async {
            let s = crate::support::tls_client::connect(mesh.db_public, Some(&client))
                .await
                .ok()?;
            let chain: Vec<_> = s
                .get_ref()
                .1
                .peer_certificates()?
                .iter()
                .map(|c| c.clone().into_owned())
                .collect();
            chains_to(&chain, &new_root).then_some(())
        },
    )
    .await;
    eventually("new connections through the mesh", DEADLINE, || async {
        echoes(mesh.web_upstream, &pattern(64 * 1024, 9))
            .await
            .then_some(())
    })
    .await;

    let before = exchanges.load(Ordering::SeqCst);
    eventually(
        "the old stream still flows after rotation",
        DEADLINE,
        || async { (exchanges.load(Ordering::SeqCst) > before + 10).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let total = streamer
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("stream broke: {e}\n{}", db.logs()));
    assert!(total > 10);
}

/// Ping-pongs 4 KiB chunks until `stop`; any error or corruption ends it with an error.
async fn stream_until(
    mut s: TcpStream,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> Result<u64, String> {
    let mut buf = vec![0u8; 4096];
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let chunk = pattern(4096, (n % 251) as u8);
        s.write_all(&chunk)
            .await
            .map_err(|e| format!("write {n}: {e}"))?;
        tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
            .await
            .map_err(|_| format!("read {n}: timed out"))?
            .map_err(|e| format!("read {n}: {e}"))?;
        if buf != chunk {
            return Err(format!("chunk {n} corrupted"));
        }
        n += 1;
        count.store(n, Ordering::SeqCst);
    }
    Ok(n)
}

async fn active_root(agent: &ConsulAgent) -> String {
    let roots = agent.get("/v1/agent/connect/ca/roots").await;
    let active = roots["ActiveRootID"].as_str().unwrap().to_owned();
    roots["Roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ID"] == active.as_str())
        .unwrap()["RootCert"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Whether `chain` (leaf first) verifies against `root_pem` alone.
fn chains_to(chain: &[rustls::pki_types::CertificateDer<'static>], root_pem: &str) -> bool {
    let root = consul_proxy::tls::first_cert(root_pem).unwrap();
    let anchor = webpki::anchor_from_trusted_cert(&root).unwrap().to_owned();
    let Ok(leaf) = webpki::EndEntityCert::try_from(&chain[0]) else {
        return false;
    };
    let provider = rustls::crypto::ring::default_provider();
    leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &[anchor],
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_upstream_dials_the_builtin_proxy_inbound() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let builtin_db = BuiltinProxy::start(&mesh.agent, "db", None, mesh.db_public).await;
    let web = mesh.proxy("-proxy-id", "web-sidecar-proxy", None).await;
    mesh.agent.wait_passing("db", 1).await;
    eventually("consul-proxy -> consul connect proxy", DEADLINE, || async {
        exchanges(mesh.web_upstream, &pattern(100_000, 1))
            .await
            .then_some(())
    })
    .await;

    const ALERT: &str = "received fatal alert: BadCertificate";
    let alerts_before = web.logs().matches(ALERT).count();
    mesh.agent.intention("web", "db", "deny").await;
    eventually(
        "the built-in proxy refuses us once denied",
        DEADLINE,
        || async {
            // It authorizes while verifying our certificate and answers a deny with a
            // bad_certificate alert, which our side logs; a failure for another reason would
            // not show it.
            let refused = !exchanges(mesh.web_upstream, b"x").await;
            let alert = web.logs().matches(ALERT).count() > alerts_before;
            (refused && alert).then_some(())
        },
    )
    .await;
    drop(builtin_db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_proxy_upstream_dials_our_inbound() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    let _builtin_web = BuiltinProxy::start(&mesh.agent, "web", None, mesh.web_upstream).await;
    mesh.agent.wait_passing("db", 1).await;
    eventually("consul connect proxy -> consul-proxy", DEADLINE, || async {
        exchanges(mesh.web_upstream, &pattern(100_000, 2))
            .await
            .then_some(())
    })
    .await;
    assert!(
        db.logs().contains("connection authorized"),
        "we saw the built-in proxy's identity"
    );

    mesh.agent.intention("web", "db", "deny").await;
    eventually(
        "we refuse the built-in proxy once denied",
        DEADLINE,
        || async {
            let refused = !exchanges(mesh.web_upstream, b"x").await;
            (refused && db.logs().contains("connection denied")).then_some(())
        },
    )
    .await;
    let _ = mesh.web_public;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_serving_and_later_changes_apply() {
    let Some(mut mesh) = RealMesh::start(Mode::Server).await else {
        return;
    };
    let (db, web) = mesh.up().await;

    mesh.agent.kill().await;
    web.wait_log("agent watch failing").await;
    for i in 0..5u8 {
        assert!(
            echoes(mesh.web_upstream, &[i; 512]).await,
            "served from the last good state while the agent is down"
        );
    }

    mesh.agent.restart().await;
    // Retries back off up to 10 s (jittered) while the agent is unreachable, so allow for that.
    db.wait_log_within("agent watch recovered", Duration::from_secs(60))
        .await;
    web.wait_log_within("agent watch recovered", Duration::from_secs(60))
        .await;
    // The restarted agent re-runs the sidecar check before db is passing again.
    mesh.agent.wait_passing("db", 1).await;
    eventually("mesh up after the restart", DEADLINE, || async {
        echoes(mesh.web_upstream, b"again").await.then_some(())
    })
    .await;
    mesh.agent.intention("web", "db", "deny").await;
    // Refused *because* of the intention (not, say, a health check flapping after the
    // restart): keep trying until db has logged a denial.
    eventually(
        "a change made after the restart applies",
        Duration::from_secs(60),
        || async {
            let refused = !echoes(mesh.web_upstream, b"x").await;
            (refused && db.logs().contains("connection denied")).then_some(())
        },
    )
    .await;
}

/// The quick start's registrations (`examples/web.json`, `examples/db.json`) as a user
/// registers them, with free ports for the app and the upstream instead of 5432 and 9191: the
/// agent assigns the sidecars' public ports and default checks, and two proxies started with
/// `-sidecar-for` carry bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_registrations_work_as_written() {
    let Some(agent) = ConsulAgent::start(Mode::Dev).await else {
        return;
    };
    let example = |file: &str| -> serde_json::Value {
        let path = format!("{}/examples/{file}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    let echo = EchoServer::start().await;
    let upstream_port = free_port();
    let mut web = example("web.json");
    web["Port"] = free_port().into();
    web["Connect"]["SidecarService"]["Proxy"]["Upstreams"][0]["LocalBindPort"] =
        upstream_port.into();
    let mut db = example("db.json");
    db["Port"] = echo.port.into();
    agent.register(web).await;
    agent.register(db).await;
    agent.intention("web", "db", "allow").await;
    let addr = agent.addr();
    let _db = ProxyProcess::start(&["-http-addr", &addr, "-sidecar-for", "db"]).await;
    let _web = ProxyProcess::start(&["-http-addr", &addr, "-sidecar-for", "web"]).await;
    // Consul's default sidecar check runs every 10 s; the first may have run before the proxy
    // listened.
    agent
        .wait_passing_within("db", 1, Duration::from_secs(45))
        .await;
    eventually("bytes through web's db upstream", DEADLINE, || async {
        echoes(upstream_port, b"hello from db").await.then_some(())
    })
    .await;
}

/// A dev agent keeps everything in memory: restarted, it comes back with a new CA (and trust
/// domain), no registrations, no intentions, and every index starting low again. The proxies
/// serve from their last good state meanwhile; once the services are registered again they
/// follow the new agent: its CA, and a change written there at an index below the ones they
/// saw before. Each watch forgets its index after the failures while the agent was down, and
/// that is what this shows: one that kept it would block past this test's deadline (checked).
/// An index that goes backwards without a failure between is
/// `live::an_index_that_goes_backwards_is_followed` (fake agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_agent_restarted_empty_is_followed_through_its_index_reset() {
    let Some(mut mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    let (db, web) = mesh.up().await;
    let matches = "/v1/connect/intentions/match?by=destination&name=db";
    // Raise the agent's indexes well above where a fresh agent starts.
    for i in 0..40 {
        let path = format!("/v1/kv/bump-{i}");
        mesh.agent
            .send(reqwest::Method::PUT, &path, Some(serde_json::json!(i)))
            .await;
    }
    mesh.agent.intention("web", "db", "allow").await;
    let before = mesh.agent.index(matches).await;
    let old_roots = mesh
        .agent
        .get_raw("/v1/agent/connect/ca/roots")
        .await
        .unwrap();

    mesh.agent.kill().await;
    web.wait_log("agent watch failing").await;
    assert!(
        echoes(mesh.web_upstream, b"down").await,
        "served from the last good state while the agent is down"
    );
    mesh.agent.restart().await;
    let after = mesh.agent.index(matches).await;
    assert!(
        after < before,
        "the restarted agent's index ({after}) went back below {before}: the test needs that"
    );
    let new_roots = mesh
        .agent
        .get_raw("/v1/agent/connect/ca/roots")
        .await
        .unwrap();
    assert_ne!(
        old_roots["TrustDomain"], new_roots["TrustDomain"],
        "a new CA with a new trust domain"
    );

    mesh.register_again().await;
    // Retries back off up to 10 s (jittered) while the agent was unreachable; then the proxies
    // take the new CA's leaves and roots, and db's sidecar check passes again.
    mesh.agent.wait_passing("db", 1).await;
    eventually(
        "bytes through web's db upstream under the new CA",
        Duration::from_secs(60),
        || async { echoes(mesh.web_upstream, b"again").await.then_some(()) },
    )
    .await;
    // The proxies' intention watches follow the new agent's (lower) indexes.
    mesh.agent.intention("web", "db", "deny").await;
    assert!(
        mesh.agent.index(matches).await < before,
        "the deny was written below the index the proxies saw before the restart"
    );
    eventually(
        "a change written after the index reset applies",
        Duration::from_secs(60),
        || async {
            let refused = !echoes(mesh.web_upstream, b"x").await;
            (refused && db.logs().contains("connection denied")).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_intention_closes_a_live_connection_within_a_second() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    let (db, _web) = mesh.up().await;

    let mut live = open_echoing(mesh.web_upstream).await;

    // Time from sending the intention (and from the agent acknowledging it) to the close.
    let sent = tokio::time::Instant::now();
    mesh.agent.intention("web", "db", "deny").await;
    let acknowledged = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(DEADLINE, live.read_to_end(&mut rest)).await;
    let closed = tokio::time::Instant::now();
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the live connection was closed: {end:?}"
    );
    let elapsed = closed - sent;
    crate::support::report_measurement(&format!(
        "real agent: deny intention -> live connection closed: {} ms after the PUT was sent, {} ms after the agent acknowledged it (goal < 1000 ms)",
        elapsed.as_millis(),
        closed.saturating_duration_since(acknowledged).as_millis()
    ));
    db.wait_log("closing a live connection that is no longer authorized")
        .await;
    assert!(
        elapsed < Duration::from_secs(1),
        "closed {} ms after the intention was written (goal: < 1000 ms)",
        elapsed.as_millis()
    );
}

/// Consul looks intentions up by destination without regard to case: `web => DB deny`
/// denies web calling db. (Found in review: we used to drop it and let web in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intention_naming_the_destination_in_another_case_applies() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    // Dev agent, ACLs off: the default is allow and there is no intention yet.
    let db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    let _web = mesh.proxy("-proxy-id", "web-sidecar-proxy", None).await;
    mesh.agent.wait_passing("db", 1).await;
    eventually("mesh up", DEADLINE, || async {
        echoes(mesh.web_upstream, b"up").await.then_some(())
    })
    .await;
    let mut live = open_echoing(mesh.web_upstream).await;

    mesh.agent.intention("web", "DB", "deny").await;
    let trust_domain = mesh.agent.get("/v1/connect/ca/roots").await["TrustDomain"]
        .as_str()
        .unwrap()
        .to_owned();
    let verdict = mesh
        .agent
        .send(
            reqwest::Method::POST,
            "/v1/agent/connect/authorize",
            Some(serde_json::json!({
                "Target": "db",
                "ClientCertURI": format!("spiffe://{trust_domain}/ns/default/dc/dc1/svc/web"),
            })),
        )
        .await;
    assert_eq!(
        verdict["Authorized"], false,
        "the agent applies it: {verdict}"
    );

    let mut rest = Vec::new();
    let end = tokio::time::timeout(DEADLINE, live.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the live connection was closed: {end:?}"
    );
    db.wait_log("closing a live connection that is no longer authorized")
        .await;
    assert!(
        !echoes(mesh.web_upstream, b"denied").await,
        "new connections are refused too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_added_to_the_registration_becomes_reachable_without_a_restart() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let _db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    let web = mesh.proxy("-proxy-id", "web-sidecar-proxy", None).await;
    mesh.agent.wait_passing("db", 1).await;

    // Consul refuses two identical upstreams; the same service named with its datacenter is a
    // distinct upstream (and exercises the dc parameter).
    let added = free_port();
    let mut db_in_dc1 = upstream("db", added);
    db_in_dc1["Datacenter"] = "dc1".into();
    mesh.agent
        .register(service_with_sidecar(
            "web",
            free_port(),
            mesh.web_public,
            vec![upstream("db", mesh.web_upstream), db_in_dc1],
        ))
        .await;
    eventually("the added upstream listener serves", DEADLINE, || async {
        echoes(added, b"added").await.then_some(())
    })
    .await;
    assert!(
        echoes(mesh.web_upstream, b"old").await,
        "the existing upstream still serves"
    );
    web.wait_log("the proxy registration changed; reconciling")
        .await;
}

/// Over the agent's HTTPS port (client certificate required) all of a proxy's blocking queries
/// share one HTTP/2 connection, so proxies with more watches than the agent's per-client
/// connection limit get every one answered. Over HTTP/1.1 each long-poll holds a connection
/// and those over the limit get 429 for as long as the others poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_every_watch_is_answered_beyond_the_agents_connection_limit() {
    // web: roots, leaf, intentions, registration and 7 endpoint watches; db: 4 more.
    const LIMIT: u32 = 8;
    let extras = Extras {
        https: true,
        max_conns_per_client: Some(LIMIT),
        ..Extras::default()
    };
    let more = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let Some(mesh) = RealMesh::start_with(Mode::Dev, extras, &more).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let https = mesh.agent.https.as_ref().unwrap();
    let addr = format!("https://127.0.0.1:{}", https.port);
    let ca_dir = tempfile::tempdir().unwrap();
    std::fs::copy(&https.ca_file, ca_dir.path().join("agent-ca.pem")).unwrap();
    let ca_dir = ca_dir.path().to_owned();
    let tls = [
        ("-ca-file", &https.ca_file),
        ("-client-cert", &https.client_cert),
        ("-client-key", &https.client_key),
    ];
    let (proxies, admins) = mesh
        .up_with_admins(|id| {
            let mut args = vec![
                "-http-addr".to_owned(),
                addr.clone(),
                "-proxy-id".to_owned(),
                id.to_owned(),
            ];
            for (flag, path) in tls {
                args.extend([flag.to_owned(), path.display().to_string()]);
            }
            if id == "web-sidecar-proxy" {
                // web finds the agent's CA in a directory instead (`-ca-path`).
                let at = args.iter().position(|a| a == "-ca-file").unwrap();
                args[at] = "-ca-path".to_owned();
                args[at + 1] = ca_dir.display().to_string();
            }
            if id == "db-sidecar-proxy" {
                // The agent's certificate names localhost too: db verifies that name while
                // connecting to the address given (the server-name path of the client).
                args.extend(["-tls-server-name".to_owned(), "localhost".to_owned()]);
            }
            args
        })
        .await;

    let web_watches = 4 + 1 + more.len();
    assert!(
        web_watches + 4 > LIMIT as usize,
        "the test must exceed the limit"
    );
    every_watch_answered_without_a_429(&proxies, &admins, [4, web_watches]).await;
}

/// The agent reached over a unix socket (`-http-addr unix:///...`): both proxies watch and
/// serve through it alone (the agent's TCP port is given to nothing but the test's set-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_reaches_the_agent_over_a_unix_socket() {
    let extras = Extras {
        unix_socket: true,
        ..Extras::default()
    };
    let Some(mesh) = RealMesh::start_with(Mode::Dev, extras, &[]).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let unix = format!("unix://{}", mesh.agent.unix_socket().display());
    let (proxies, _) = mesh
        .up_with_admins(|id| {
            vec![
                "-http-addr".to_owned(),
                unix.clone(),
                "-proxy-id".to_owned(),
                id.to_owned(),
            ]
        })
        .await;
    // Past set-up, a change reaches db (which enforces intentions) through the socket too.
    mesh.agent.intention("web", "db", "deny").await;
    eventually("the deny applies", Duration::from_secs(30), || async {
        let refused = !echoes(mesh.web_upstream, b"x").await;
        (refused && proxies[0].logs().contains("connection denied")).then_some(())
    })
    .await;
    for p in &proxies {
        assert!(
            p.logs().contains(&format!("agent=\"{unix}")),
            "the proxy names the agent it uses:\n{}",
            p.logs()
        );
    }
}

/// Over plain HTTP (HTTP/1.1: a connection per request in flight) a proxy with many upstreams
/// long-polls at most four of them and polls the rest, so it stays within a few connections to
/// the agent: seventeen upstreams would otherwise take 21 of web's plus db's 4, well past a
/// limit of 18, and the agent would refuse some with 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_plain_http_a_proxy_with_many_upstreams_stays_within_the_connection_limit() {
    const LIMIT: u32 = 18;
    let extras = Extras {
        https: false,
        max_conns_per_client: Some(LIMIT),
        ..Extras::default()
    };
    let more = [
        "u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "u9", "u10", "u11", "u12", "u13", "u14",
        "u15", "u16",
    ];
    let Some(mesh) = RealMesh::start_with(Mode::Dev, extras, &more).await else {
        return;
    };
    let web_watches = 4 + 1 + more.len();
    assert!(
        web_watches + 4 > LIMIT as usize,
        "one long-poll per watch must exceed the limit for this test to mean anything"
    );
    mesh.agent.intention("web", "db", "allow").await;
    let (proxies, admins) = mesh
        .up_with_admins(|id| mesh.proxy_args("-proxy-id", id, None))
        .await;
    every_watch_answered_without_a_429(&proxies, &admins, [4, web_watches]).await;
    let web = &proxies[1];
    assert_eq!(
        web.logs()
            .matches("polling this upstream's endpoints instead")
            .count(),
        web_watches - 4 - 4,
        "{}",
        web.logs()
    );
}

/// Waits until every agent watch of db's and web's proxies (at least `expected` of each) has
/// been answered and none is failing, then checks that the agent refused none of their
/// queries with 429.
async fn every_watch_answered_without_a_429(
    proxies: &[ProxyProcess],
    admins: &[u16],
    expected: [usize; 2],
) {
    for (admin, expected) in admins.iter().zip(expected) {
        eventually(
            "every watch answered and none failing",
            DEADLINE,
            || async {
                let status: serde_json::Value =
                    serde_json::from_str(&admin_get(*admin, "/status").await.1).unwrap();
                let watches = status["watches"].as_object()?;
                let answered = watches
                    .values()
                    .filter(|w| w["failing"] == false && w["last_success_unix"].is_u64())
                    .count();
                (watches.len() >= expected && answered == watches.len()).then_some(())
            },
        )
        .await;
    }
    for p in proxies {
        assert!(
            !p.logs().contains("the agent refused the request (429)"),
            "no query was refused by the connection limit:\n{}",
            p.logs()
        );
    }
}

/// A prepared-query upstream against a real agent reaches what the query returns, including an
/// instance whose check is `warning` (queries keep those unless `OnlyPassing`), while a service
/// upstream to the same instance, asked with `?passing`, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_query_upstream_reaches_a_warning_instance_the_query_returns() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    let mut db = service_with_sidecar("db", mesh.echo.port, mesh.db_public, vec![]);
    db["Connect"]["SidecarService"]["Checks"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"Name": "degraded", "TTL": "10m", "Status": "warning"}));
    mesh.agent.register(db).await;
    mesh.agent
        .send(
            reqwest::Method::POST,
            "/v1/query",
            Some(serde_json::json!({"Name": "db-query", "Service": {"Service": "db"}})),
        )
        .await;
    let via_query = free_port();
    let mut by_query = upstream("db-query", via_query);
    by_query["DestinationType"] = "prepared_query".into();
    mesh.agent
        .register(service_with_sidecar(
            "web",
            free_port(),
            mesh.web_public,
            vec![upstream("db", mesh.web_upstream), by_query],
        ))
        .await;
    mesh.agent.intention("web", "db", "allow").await;
    let _db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    // Until db's sidecar listens its TCP check is critical, which every query leaves out.
    eventually("the query returns db's sidecar", DEADLINE, || async {
        let r = mesh
            .agent
            .get_raw("/v1/query/db-query/execute?connect=true")
            .await
            .ok()?;
        (r["Nodes"].as_array()?.len() == 1).then_some(())
    })
    .await;
    const ATTEMPT: Duration = Duration::from_secs(3);
    let admin = free_port();
    let admin_addr = format!("127.0.0.1:{admin}");
    let mut args = mesh.proxy_args("-proxy-id", "web-sidecar-proxy", None);
    args.extend(["-admin-addr".to_owned(), admin_addr]);
    let web = ProxyProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Each attempt has its own short bound, so one attempt stalled by a loaded machine does
    // not use up the whole deadline; a failure shows what web knew and what the query says.
    let through = tokio::time::timeout(DEADLINE, async {
        loop {
            let attempt = tokio::time::timeout(ATTEMPT, echoes(via_query, b"via query")).await;
            if attempt == Ok(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if through.is_err() {
        panic!(
            "no bytes through the prepared-query upstream in {DEADLINE:?}\nweb's /status: {}\nweb's log:\n{}\nthe query now: {:?}",
            admin_get(admin, "/status").await.1,
            web.logs(),
            mesh.agent
                .get_raw("/v1/query/db-query/execute?connect=true")
                .await
        );
    }
    assert!(
        !echoes(mesh.web_upstream, b"via health").await,
        "the service upstream asks for passing instances only"
    );
}

/// With the real agent's roots: a caller with an agent-issued leaf gets through, one with no
/// certificate or with a certificate from another CA (naming the same identity in the same
/// trust domain) does not, and none of those reach the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_inbound_admits_only_chains_to_the_real_agents_roots() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("*", "db", "allow").await;
    let db = mesh.proxy("-proxy-id", "db-sidecar-proxy", None).await;
    mesh.agent.wait_passing("db", 1).await;
    let issued = mesh.agent.leaf("web").await;
    eventually("an agent-issued caller gets through", DEADLINE, || async {
        crate::support::tls_client::echoes(mesh.db_public, Some(&issued))
            .await
            .then_some(())
    })
    .await;
    let served = mesh.echo.accepted();

    assert!(
        !crate::support::tls_client::echoes(mesh.db_public, None).await,
        "no certificate"
    );
    let roots = mesh.agent.get("/v1/agent/connect/ca/roots").await;
    let trust_domain = roots["TrustDomain"].as_str().unwrap();
    let cluster = trust_domain.strip_suffix(".consul").unwrap();
    let rogue = crate::support::pki::TestCa::new(cluster);
    let forged = rogue.leaf("web", "dc1");
    assert_eq!(forged.uri, issued.uri, "the same identity, from another CA");
    assert!(
        !crate::support::tls_client::echoes(mesh.db_public, Some(&forged)).await,
        "foreign CA"
    );
    db.wait_log("UnknownIssuer").await;
    assert_eq!(
        mesh.echo.accepted(),
        served,
        "refused callers never reach the app"
    );
}

/// An endpoint registered as db's sidecar that presents a certificate the real agent issued,
/// but for another service: our upstream finishes the handshake, sees the wrong identity and
/// closes before sending a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_upstream_refuses_a_server_with_another_services_real_certificate() {
    let Some(mesh) = RealMesh::start(Mode::Dev).await else {
        return;
    };
    mesh.agent.intention("web", "db", "allow").await;
    let impostor =
        crate::support::tls_client::TlsEchoServer::start(&mesh.agent.leaf("api").await).await;
    mesh.agent
        .register(service_with_sidecar(
            "db",
            mesh.echo.port,
            impostor.port,
            vec![],
        ))
        .await;
    let web = mesh.proxy("-proxy-id", "web-sidecar-proxy", None).await;
    mesh.agent.wait_passing("db", 1).await;
    eventually("web checks the impostor's identity", DEADLINE, || async {
        assert!(
            !echoes(mesh.web_upstream, b"secret").await,
            "bytes went through an impostor"
        );
        web.logs()
            .contains("upstream identity check failed")
            .then_some(())
    })
    .await;
    // (The impostor's own handshake count is not checked: web closes right after its side of
    // the handshake, and the server may see that close before it counts the handshake.)
    assert_eq!(
        impostor.bytes_received_once_closed().await,
        0,
        "nothing was sent to the impostor"
    );
    let log = web.logs();
    let line = log
        .lines()
        .find(|l| l.contains("upstream identity check failed"))
        .unwrap();
    assert!(
        line.contains("svc/api") && line.contains("svc/db"),
        "{line}"
    );
}

/// Token rotation through the token file: the proxy's token is deleted in Consul and the file
/// now holds a new one. The agent answers `ACL not found`; the proxy reads the file again and
/// carries on, so later intention changes still apply (a deny closing a live connection, then
/// an allow), with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_replaced_in_the_token_file_is_picked_up_on_acl_not_found() {
    let Some(mesh) = RealMesh::start(Mode::DevAcl).await else {
        return;
    };
    // The policy (with a token left unused), then the token the proxy starts with.
    mesh.agent
        .token_with_rules("db-proxy", &proxy_policy("db", &[]))
        .await;
    let (accessor, first) = mesh.agent.token_for("db-proxy").await;
    let web_token = mesh
        .agent
        .token_with_rules("web-proxy", &proxy_policy("web", &["db"]))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &first).unwrap();
    let mut args = mesh.proxy_args("-proxy-id", "db-sidecar-proxy", None);
    args.extend(["-token-file".to_owned(), token_file.display().to_string()]);
    let db = ProxyProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let _web = mesh
        .proxy("-proxy-id", "web-sidecar-proxy", Some(&web_token))
        .await;
    mesh.agent.intention("web", "db", "allow").await;
    mesh.agent.wait_passing("db", 1).await;
    eventually("web reaches db", DEADLINE, || async {
        echoes(mesh.web_upstream, b"up").await.then_some(())
    })
    .await;
    let mut live = open_echoing(mesh.web_upstream).await;

    let (_, second) = mesh.agent.token_for("db-proxy").await;
    std::fs::write(&token_file, &second).unwrap();
    mesh.agent.delete_token(&accessor).await;
    mesh.agent.intention("web", "db", "deny").await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(DEADLINE, live.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the deny applied after the token rotation: {end:?}\n{}",
        db.logs()
    );
    // That deny may have come back on a query already in flight, authorized when it began.
    // The next ones start with the deleted token: only a re-read file lets this allow through.
    mesh.agent.intention("web", "db", "allow").await;
    eventually("the allow applies with the new token", DEADLINE, || async {
        echoes(mesh.web_upstream, b"again").await.then_some(())
    })
    .await;
    let logs = db.logs();
    assert!(
        !logs.contains(&first) && !logs.contains(&second),
        "a token leaked"
    );
}
