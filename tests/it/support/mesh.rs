//! The standard two-service topology on the fake agent: `web` with an upstream `db`, and `db`
//! in front of an echo server; intentions allow web -> db.

use serde_json::{Value, json};

use super::fake_agent::{FakeAgent, health_entry, intention_json, sidecar_json, upstream_json};
use super::pki::TestCa;
use super::{EchoServer, ProxyProcess, free_port};

pub struct Mesh {
    pub agent: FakeAgent,
    pub ca: TestCa,
    pub echo: EchoServer,
    /// db's public (mTLS) port.
    pub db_public: u16,
    /// web's local port for its `db` upstream.
    pub web_upstream: u16,
    /// web's public port (nothing behind it in these tests).
    pub web_public: u16,
}

impl Mesh {
    /// Sets up the fake agent; no proxy is started yet.
    pub async fn new() -> Self {
        Self::with_db_config(json!({})).await
    }

    /// As [`Mesh::new`], with `Proxy.Config` for db's sidecar.
    pub async fn with_db_config(db_config: Value) -> Self {
        let agent = FakeAgent::start().await;
        let ca = TestCa::new("11111111-2222-3333-4444-555555555555");
        let echo = EchoServer::start().await;
        let (db_public, web_upstream, web_public) = (free_port(), free_port(), free_port());
        agent.set_roots(TestCa::roots_json(&[&ca]));
        agent.set_leaf("web", &ca.leaf("web", "dc1"));
        agent.set_leaf("db", &ca.leaf("db", "dc1"));
        agent.set_service(json!({"ID": "web", "Service": "web", "Port": 1, "Address": "", "Tags": [], "Meta": {}, "Datacenter": "dc1"}));
        agent.set_service(json!({"ID": "db", "Service": "db", "Port": echo.port, "Address": "", "Tags": [], "Meta": {}, "Datacenter": "dc1"}));
        agent.set_service(web_sidecar(
            web_public,
            vec![upstream_json("db", web_upstream)],
        ));
        agent.set_service(sidecar_json(
            "db-sidecar-proxy",
            "db",
            db_public,
            echo.port,
            vec![],
            db_config,
        ));
        agent.set_intentions("db", vec![intention_json("web", "db", "allow", 9)]);
        agent.set_health("db", vec![health_entry("db", db_public, "dc1")]);
        Mesh {
            agent,
            ca,
            echo,
            db_public,
            web_upstream,
            web_public,
        }
    }

    /// web's sidecar registration with its public listener on `public_port` and these
    /// upstreams (no local app: web's public listener only shows where it listens).
    pub fn web_at(&self, public_port: u16, upstreams: Vec<Value>) -> Value {
        web_sidecar(public_port, upstreams)
    }

    /// web's sidecar registration with these upstreams (its public port as in the mesh).
    pub fn web_with(&self, upstreams: Vec<Value>) -> Value {
        web_sidecar(self.web_public, upstreams)
    }

    /// Registers db's sidecar in front of another local app (before db starts).
    pub fn set_db_app(&self, app_port: u16) {
        self.agent.set_service(sidecar_json(
            "db-sidecar-proxy",
            "db",
            self.db_public,
            app_port,
            vec![],
            json!({}),
        ));
    }

    /// `-http-addr` plus `-proxy-id <id>`.
    pub fn args(&self, proxy_id: &str) -> Vec<String> {
        vec![
            "-http-addr".into(),
            self.agent.addr(),
            "-proxy-id".into(),
            proxy_id.into(),
        ]
    }

    pub async fn start_web(&self) -> ProxyProcess {
        self.start_web_with(&[]).await
    }

    pub async fn start_web_with(&self, extra: &[&str]) -> ProxyProcess {
        self.start("web-sidecar-proxy", extra).await
    }

    pub async fn start_db(&self) -> ProxyProcess {
        self.start_db_with(&[]).await
    }

    pub async fn start_db_with(&self, extra: &[&str]) -> ProxyProcess {
        self.start("db-sidecar-proxy", extra).await
    }

    async fn start(&self, proxy_id: &str, extra: &[&str]) -> ProxyProcess {
        let mut args = self.args(proxy_id);
        args.extend(extra.iter().map(|s| s.to_string()));
        ProxyProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    }
}

/// web's sidecar registration (see [`Mesh::web_at`]).
fn web_sidecar(public_port: u16, upstreams: Vec<Value>) -> Value {
    sidecar_json(
        "web-sidecar-proxy",
        "web",
        public_port,
        1,
        upstreams,
        json!({}),
    )
}
