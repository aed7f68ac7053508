//! A real Consul agent for the tests, started per test on free loopback ports with its data in
//! a temporary folder, stopped by PID.
//!
//! The binary comes from `CONSUL_BIN`, else `PATH`, else the cache of
//! `scripts/install-consul.sh`. When it is missing the test prints one line saying how to get
//! it and returns, unless `CONSUL_PROXY_REQUIRE_CONSUL=1` (set by `.ci/run`), which makes it a
//! failure: in CI these tests never skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Child;

use super::{DEADLINE, dying_with_test, eventually, free_port};

/// The version `scripts/install-consul.sh` builds.
pub const CONSUL_VERSION: &str = "v1.14.11";

/// How the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `-dev`: in-memory state, fastest start.
    Dev,
    /// `-dev` with ACLs on, default deny.
    DevAcl,
    /// A single persistent server: state survives a restart.
    Server,
}

/// Management token used when ACLs are on.
pub const MANAGEMENT_TOKEN: &str = "5d0e0f3c-8d56-4b7e-9a3c-2f9e6c1b7a01";

/// Real agents running at once: each is a Raft server plus proxies on a small machine, so
/// running them all in parallel only trades speed for timeouts.
const MAX_AGENTS: usize = 2;

fn agent_slots() -> &'static std::sync::Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Semaphore>> =
        std::sync::OnceLock::new();
    SLOTS.get_or_init(|| std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_AGENTS)))
}

/// Agent settings beyond the mode, for the tests that need them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// Also serve the HTTP API over TLS, requiring a client certificate (see [`AgentHttps`]).
    pub https: bool,
    /// `limits { http_max_conns_per_client }`: concurrent connections per client address.
    pub max_conns_per_client: Option<u32>,
    /// Also serve the HTTP API on a unix socket (see [`ConsulAgent::unix_socket`]).
    pub unix_socket: bool,
}

/// The agent's HTTPS API: its port, and the files a client needs (a test CA, not Connect's).
pub struct AgentHttps {
    pub port: u16,
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub struct ConsulAgent {
    _slot: tokio::sync::OwnedSemaphorePermit,
    child: Option<Child>,
    bin: PathBuf,
    mode: Mode,
    extras: Extras,
    pub https: Option<AgentHttps>,
    pub http_port: u16,
    ports: [u16; 3],
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// Finds the consul binary, or explains how to get it.
pub fn consul_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONSUL_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("consul");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let home = std::env::var_os("HOME")?;
    let cache = std::env::var_os("CONSUL_PROXY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".cache/consul-proxy"));
    let cached = cache.join(format!("consul-{CONSUL_VERSION}/consul"));
    cached.is_file().then_some(cached)
}

impl ConsulAgent {
    /// Starts an agent, or returns `None` (after one explanatory line) when Consul is missing
    /// and not required.
    pub async fn start(mode: Mode) -> Option<Self> {
        Self::start_with(mode, Extras::default()).await
    }

    /// As [`ConsulAgent::start`], with extra settings.
    pub async fn start_with(mode: Mode, extras: Extras) -> Option<Self> {
        let Some(bin) = consul_bin() else {
            let required = std::env::var("CONSUL_PROXY_REQUIRE_CONSUL").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "CONSUL_PROXY_REQUIRE_CONSUL=1 but no consul binary (CONSUL_BIN, PATH, or scripts/install-consul.sh)"
            );
            eprintln!(
                "skipping real-Consul test: no consul binary; run scripts/install-consul.sh (or set CONSUL_BIN)"
            );
            return None;
        };
        consul_proxy::tls::install_crypto_provider();
        let slot = agent_slots().clone().acquire_owned().await.unwrap();
        let mut agent = ConsulAgent {
            _slot: slot,
            child: None,
            bin,
            mode,
            extras,
            https: None,
            http_port: free_port(),
            ports: [free_port(), free_port(), free_port()],
            dir: tempfile::tempdir().unwrap(),
            http: reqwest::Client::new(),
        };
        if extras.https {
            agent.https = Some(write_https_files(agent.dir.path()));
        }
        agent.write_config();
        agent.launch().await;
        Some(agent)
    }

    fn write_config(&self) {
        let [serf_lan, serf_wan, server] = self.ports;
        let acl = if self.mode == Mode::DevAcl {
            format!(
                r#"acl {{ enabled = true
                         default_policy = "deny"
                         tokens {{ initial_management = "{MANAGEMENT_TOKEN}"
                                   agent = "{MANAGEMENT_TOKEN}" }} }}"#
            )
        } else {
            String::new()
        };
        let server_mode = if self.mode == Mode::Server {
            "server = true\nbootstrap_expect = 1\nconnect { enabled = true }\nui_config { enabled = false }\n"
        } else {
            ""
        };
        let https_port = match &self.https {
            Some(h) => format!(" https = {}", h.port),
            None => String::new(),
        };
        let https = match &self.https {
            Some(h) => format!(
                r#"tls {{ https {{ ca_file = "{ca}" cert_file = "{cert}" key_file = "{key}" verify_incoming = true }} }}"#,
                ca = h.ca_file.display(),
                cert = self.dir.path().join("agent-https.pem").display(),
                key = self.dir.path().join("agent-https-key.pem").display(),
            ),
            None => String::new(),
        };
        let limits = match self.extras.max_conns_per_client {
            Some(n) => format!("limits {{ http_max_conns_per_client = {n} }}"),
            None => String::new(),
        };
        let addresses = if self.extras.unix_socket {
            format!(
                r#"addresses {{ http = "127.0.0.1 unix://{}" }}"#,
                self.unix_socket().display()
            )
        } else {
            String::new()
        };
        let hcl = format!(
            r#"
{addresses}
bind_addr = "127.0.0.1"
client_addr = "127.0.0.1"
advertise_addr = "127.0.0.1"
data_dir = "{data}"
node_name = "node-1"
log_level = "debug"
ports {{ http = {http} dns = -1 grpc = -1 grpc_tls = -1 serf_lan = {serf_lan} serf_wan = {serf_wan} server = {server}{https_port} }}
{server_mode}
{acl}
{https}
{limits}
"#,
            data = self.dir.path().join("data").display(),
            http = self.http_port,
        );
        std::fs::write(self.dir.path().join("agent.hcl"), hcl).unwrap();
    }

    async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("consul.log"))
            .unwrap();
        let mut cmd = dying_with_test(&self.bin);
        cmd.arg("agent");
        if self.mode != Mode::Server {
            cmd.arg("-dev");
        }
        cmd.arg("-config-file")
            .arg(self.dir.path().join("agent.hcl"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(cmd.spawn().expect("start consul"));
        // Ready = a leader and an initialised CA.
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.is_ready().await {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("consul exited ({status}) before ready:\n{}", self.logs());
            }
            if tokio::time::Instant::now() >= end {
                panic!("consul not ready after 60s:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn is_ready(&self) -> bool {
        let leader = self.get_raw("/v1/status/leader").await;
        if !leader.is_ok_and(|l| !l.as_str().unwrap_or_default().is_empty()) {
            return false;
        }
        self.get_raw("/v1/agent/connect/ca/roots").await.is_ok()
    }

    /// Kills the agent (SIGKILL) and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts the agent again with the same data dir and ports.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    /// The unix socket the HTTP API is also served on with [`Extras::unix_socket`].
    pub fn unix_socket(&self) -> PathBuf {
        self.dir.path().join("http.sock")
    }

    /// `127.0.0.1:<http port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// The agent's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("consul.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// GET with the management token, within 5 s.
    async fn get_response(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .get(self.url(path))
            .header("X-Consul-Token", MANAGEMENT_TOKEN)
            .timeout(Duration::from_secs(5))
            .send()
            .await
    }

    /// GET with the management token; the error says what went wrong.
    pub async fn get_raw(&self, path: &str) -> Result<Value, String> {
        let resp = self.get_response(path).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!(
                "{}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            ));
        }
        resp.json().await.map_err(|e| e.to_string())
    }

    /// GET with the management token; panics on failure.
    pub async fn get(&self, path: &str) -> Value {
        self.get_raw(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The `X-Consul-Index` the agent answers a read of `path` with.
    pub async fn index(&self, path: &str) -> u64 {
        let resp = self.get_response(path).await.unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.headers()["X-Consul-Index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A request with the management token; returns the body as JSON (or `null`).
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), self.url(path))
            .header("X-Consul-Token", MANAGEMENT_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A leaf for `service` issued by the agent, usable as a test client certificate.
    pub async fn leaf(&self, service: &str) -> super::pki::TestLeaf {
        let leaf = self
            .get(&format!("/v1/agent/connect/ca/leaf/{service}"))
            .await;
        let field = |f: &str| leaf[f].as_str().unwrap().to_owned();
        super::pki::TestLeaf {
            cert_pem: field("CertPEM"),
            key_pem: field("PrivateKeyPEM"),
            uri: field("ServiceURI"),
            serial: field("SerialNumber"),
            service: service.to_owned(),
        }
    }

    /// Registers a service through the agent API.
    pub async fn register(&self, service: Value) {
        self.send(
            reqwest::Method::PUT,
            "/v1/agent/service/register",
            Some(service),
        )
        .await;
    }

    /// Sets the intention `source -> destination` (`allow` or `deny`).
    pub async fn intention(&self, source: &str, destination: &str, action: &str) {
        let path =
            format!("/v1/connect/intentions/exact?source={source}&destination={destination}");
        self.send(reqwest::Method::PUT, &path, Some(json!({"Action": action})))
            .await;
    }

    /// Removes the intention `source -> destination`.
    pub async fn delete_intention(&self, source: &str, destination: &str) {
        let path =
            format!("/v1/connect/intentions/exact?source={source}&destination={destination}");
        self.send(reqwest::Method::DELETE, &path, None).await;
    }

    /// Waits until `service` has `count` passing Connect endpoints. On timeout the panic shows
    /// every check the agent runs, with its status and last output, so that a failure says
    /// which check kept the endpoint out.
    pub async fn wait_passing(&self, service: &str, count: usize) {
        self.wait_passing_within(service, count, DEADLINE).await;
    }

    /// As [`ConsulAgent::wait_passing`], within `deadline`.
    pub async fn wait_passing_within(&self, service: &str, count: usize, deadline: Duration) {
        let path = format!("/v1/health/connect/{service}?passing");
        let passing = tokio::time::timeout(deadline, async {
            loop {
                if let Ok(v) = self.get_raw(&path).await {
                    if v.as_array().map(Vec::len) == Some(count) {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if passing.is_err() {
            panic!(
                "timed out after {deadline:?} waiting for: {count} passing endpoint(s) of {service}\nthe agent's checks: {:?}\nthe agent's answer: {:?}",
                self.get_raw("/v1/agent/checks").await,
                self.get_raw(&format!("/v1/health/connect/{service}")).await
            );
        }
    }

    /// Creates an ACL policy and a token holding it; returns the token's secret.
    pub async fn token_with_rules(&self, name: &str, rules: &str) -> String {
        self.send(
            reqwest::Method::PUT,
            "/v1/acl/policy",
            Some(json!({"Name": name, "Rules": rules})),
        )
        .await;
        self.token_for(name).await.1
    }

    /// Creates another token holding the existing policy `name`: `(accessor, secret)`.
    pub async fn token_for(&self, name: &str) -> (String, String) {
        let token = self
            .send(
                reqwest::Method::PUT,
                "/v1/acl/token",
                Some(json!({"Policies": [{"Name": name}]})),
            )
            .await;
        let field = |f: &str| token[f].as_str().unwrap().to_owned();
        (field("AccessorID"), field("SecretID"))
    }

    /// Deletes a token by its accessor ID.
    pub async fn delete_token(&self, accessor: &str) {
        let path = format!("/v1/acl/token/{accessor}");
        self.send(reqwest::Method::DELETE, &path, None).await;
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all written into `dir`.
fn write_https_files(dir: &Path) -> AgentHttps {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let issue = |names: &[&str], file: &str| -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let (cert_file, key_file) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    };
    issue(&["127.0.0.1", "localhost"], "agent-https");
    let (client_cert, client_key) = issue(&["consul-proxy-test-client"], "client");
    let ca_file = dir.join("https-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    AgentHttps {
        port: free_port(),
        ca_file,
        client_cert,
        client_key,
    }
}

/// A service registration with a sidecar whose public port is `proxy_port` and whose only check
/// is a 1 s TCP check on it (the default check runs every 10 s).
pub fn service_with_sidecar(
    name: &str,
    app_port: u16,
    proxy_port: u16,
    upstreams: Vec<Value>,
) -> Value {
    json!({
        "ID": name,
        "Name": name,
        "Port": app_port,
        "Connect": {"SidecarService": {
            "Port": proxy_port,
            "Checks": [{"Name": "listening", "TCP": format!("127.0.0.1:{proxy_port}"), "Interval": "1s"}],
            "Proxy": {"Upstreams": upstreams}
        }}
    })
}

/// An upstream entry for a registration.
pub fn upstream(name: &str, port: u16) -> Value {
    json!({"DestinationName": name, "LocalBindAddress": "127.0.0.1", "LocalBindPort": port})
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// `consul connect proxy`, Consul's built-in proxy, as a child process.
pub struct BuiltinProxy {
    child: Child,
    log: PathBuf,
}

impl BuiltinProxy {
    /// Runs `consul connect proxy -sidecar-for <id>` and waits until `port` accepts TCP.
    pub async fn start(
        agent: &ConsulAgent,
        sidecar_for: &str,
        token: Option<&str>,
        port: u16,
    ) -> Self {
        let log = agent.dir.path().join(format!("builtin-{sidecar_for}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = dying_with_test(&agent.bin);
        cmd.args([
            "connect",
            "proxy",
            "-sidecar-for",
            sidecar_for,
            "-http-addr",
            &agent.addr(),
            "-log-level",
            "debug",
        ])
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .kill_on_drop(true);
        if let Some(t) = token {
            cmd.args(["-token", t]);
        }
        let proxy = BuiltinProxy {
            child: cmd.spawn().unwrap(),
            log,
        };
        eventually(
            &format!("consul connect proxy listening on {port}"),
            DEADLINE,
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        proxy
    }

    /// Its log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BuiltinProxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
