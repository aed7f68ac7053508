//! An in-process fake Consul agent for the faults a real agent cannot be made to show on demand
//! (down, 500s, garbage, index going backwards, hanging). Its JSON follows the shapes recorded
//! from a real agent (`tests/fixtures/consul-1.14.11/`); `fixtures::fake_shapes_match_real_ones`
//! checks that.
//!
//! Blocking follows Consul: a request with `index=N` returns when the resource's index is
//! greater than N or when `wait` elapses; `/v1/agent/service/:id` blocks on `hash=`.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A fault injected into every request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and body.
    Status(u16, String),
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer normally, after this delay (a slow agent).
    Delay(Duration),
}

#[derive(Default)]
struct Data {
    index: u64,
    services: BTreeMap<String, Value>,
    roots: Option<(Value, u64)>,
    leaves: HashMap<String, (Value, u64)>,
    /// A leaf the agent issues only when asked without blocking after the given time (its
    /// background renewal stalled; a non-blocking read revalidates an expired leaf).
    renewals: HashMap<String, (super::pki::TestLeaf, std::time::SystemTime)>,
    intentions: HashMap<String, (Vec<Value>, u64)>,
    health: HashMap<String, (Vec<Value>, u64)>,
    queries: HashMap<String, Value>,
    default_allow: bool,
    fault: Option<Fault>,
    path_faults: Vec<(String, Fault)>,
    requests: Vec<String>,
    /// Blocking health requests in flight now, the most there ever were, and the services
    /// they were for.
    health_long_polls: usize,
    max_health_long_polls: usize,
    long_polled: std::collections::BTreeSet<String>,
    /// The `X-Consul-Token` header of every request, `None` where there was none.
    tokens: Vec<Option<String>>,
}

struct Shared {
    data: Mutex<Data>,
    changed: watch::Sender<u64>,
}

/// The fake agent. Dropping it stops the server.
pub struct FakeAgent {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinSet<()>>>,
}

impl FakeAgent {
    /// Starts on a free loopback port. ACL default policy: allow.
    pub async fn start() -> Self {
        // Outside the ephemeral range (see `free_port`): `restart` binds this port again, and
        // an ephemeral one could meanwhile become the local port of some outgoing connection.
        let mut listener = None;
        for _ in 0..10 {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", super::free_port())).await {
                listener = Some(l);
                break;
            }
        }
        let listener = listener.expect("a free port for the fake agent");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            data: Mutex::new(Data {
                index: 10,
                default_allow: true,
                ..Default::default()
            }),
            changed: watch::channel(10).0,
        });
        let agent = FakeAgent {
            shared,
            addr,
            server: Mutex::new(None),
        };
        agent.serve(listener);
        agent
    }

    /// `host:port` for `-http-addr`.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Stops answering: the listener closes and open requests are cut (connection refused).
    pub fn stop(&self) {
        if let Some(mut set) = self.server.lock().unwrap().take() {
            set.abort_all();
        }
    }

    /// Starts answering again on the same port with the same data.
    pub async fn restart(&self) {
        self.stop();
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn serve(&self, listener: TcpListener) {
        let router = router(self.shared.clone());
        let mut set = JoinSet::new();
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let conns_in_accept = conns.clone();
        set.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                conns_in_accept.lock().unwrap().spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        // Aborting `set` ends the accept loop; this guard then aborts every connection too.
        set.spawn(async move {
            struct AbortOnDrop(Arc<Mutex<JoinSet<()>>>);
            impl Drop for AbortOnDrop {
                fn drop(&mut self) {
                    self.0.lock().unwrap().abort_all();
                }
            }
            let _guard = AbortOnDrop(conns);
            std::future::pending::<()>().await
        });
        *self.server.lock().unwrap() = Some(set);
    }

    fn update(&self, f: impl FnOnce(&mut Data, u64)) {
        let mut d = self.shared.data.lock().unwrap();
        d.index += 1;
        let index = d.index;
        f(&mut d, index);
        drop(d);
        self.shared.changed.send_replace(index);
    }

    /// Registers (or replaces) an agent service; `json` is the `/v1/agent/service/:id` body
    /// without `ContentHash`.
    pub fn set_service(&self, json: Value) {
        let id = json["ID"].as_str().unwrap().to_owned();
        self.update(|d, _| {
            d.services.insert(id, json);
        });
    }

    /// Deregisters a service.
    pub fn remove_service(&self, id: &str) {
        self.update(|d, _| {
            d.services.remove(id);
        });
    }

    /// Sets the roots body.
    pub fn set_roots(&self, json: Value) {
        self.update(|d, i| d.roots = Some((json, i)));
    }

    /// Sets the leaf for a service; the body's `ModifyIndex` is set to the new index.
    pub fn set_leaf(&self, service: &str, leaf: &super::pki::TestLeaf) {
        let service = service.to_owned();
        self.update(|d, i| {
            d.leaves.insert(service, (leaf.json(i), i));
        });
    }

    /// Models an agent whose leaf renewal for `service` stalled: blocking queries keep the
    /// current leaf, and `leaf` is issued by the first non-blocking read at or after `from`
    /// (when the real agent finds its cached leaf expired and re-issues it).
    pub fn set_leaf_on_revalidation(
        &self,
        service: &str,
        leaf: &super::pki::TestLeaf,
        from: std::time::SystemTime,
    ) {
        let mut d = self.shared.data.lock().unwrap();
        d.renewals.insert(service.to_owned(), (leaf.clone(), from));
    }

    /// Sets the intentions whose destination is `service` (already in precedence order).
    pub fn set_intentions(&self, service: &str, list: Vec<Value>) {
        let service = service.to_owned();
        self.update(|d, i| {
            d.intentions.insert(service, (list, i));
        });
    }

    /// Sets the passing Connect endpoints of a service.
    pub fn set_health(&self, service: &str, entries: Vec<Value>) {
        let service = service.to_owned();
        self.update(|d, i| {
            d.health.insert(service, (entries, i));
        });
    }

    /// Sets a prepared query's result nodes.
    pub fn set_query(&self, name: &str, service: &str, nodes: Vec<Value>) {
        let body = json!({
            "Service": service, "Nodes": nodes, "DNS": {"TTL": ""}, "Datacenter": "dc1",
            "PeerName": "", "Failovers": 0, "Index": 1, "LastContact": 0, "KnownLeader": true,
            "ConsistencyLevel": "leader", "NotModified": false, "Backend": 0, "ResultsFilteredByACLs": false
        });
        let name = name.to_owned();
        self.update(|d, _| {
            d.queries.insert(name, body);
        });
    }

    /// The default decision when no intention matches (ACL default policy).
    pub fn set_default_allow(&self, allow: bool) {
        self.update(|d, _| d.default_allow = allow);
    }

    /// Injects a fault into every request, or clears it.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.update(|d, _| d.fault = fault);
    }

    /// Injects a fault into requests whose method and path start with `prefix`
    /// (e.g. `POST /v1/agent/connect/authorize`).
    pub fn set_path_fault(&self, prefix: &str, fault: Fault) {
        let prefix = prefix.to_owned();
        self.update(|d, _| d.path_faults.push((prefix, fault)));
    }

    /// Removes every fault injected with [`FakeAgent::set_path_fault`].
    pub fn clear_path_faults(&self) {
        self.update(|d, _| d.path_faults.clear());
    }

    /// Moves the global index backwards (snapshot restore) and bumps every resource to it.
    pub fn reset_index(&self, to: u64) {
        let mut d = self.shared.data.lock().unwrap();
        d.index = to;
        if let Some(r) = d.roots.as_mut() {
            r.1 = to;
        }
        for v in d.leaves.values_mut() {
            v.1 = to;
        }
        for v in d.intentions.values_mut() {
            v.1 = to;
        }
        for v in d.health.values_mut() {
            v.1 = to;
        }
        drop(d);
        self.shared.changed.send_replace(to);
    }

    /// The most blocking (`index` > 0) health requests that were in flight at once, and the
    /// services that had one.
    pub fn health_long_polls(&self) -> (usize, Vec<String>) {
        let d = self.shared.data.lock().unwrap();
        (
            d.max_health_long_polls,
            d.long_polled.iter().cloned().collect(),
        )
    }

    /// Paths requested so far (method and path, no query).
    pub fn requests(&self) -> Vec<String> {
        self.shared.data.lock().unwrap().requests.clone()
    }

    /// The `X-Consul-Token` header of every request so far (`None`: no header).
    pub fn tokens(&self) -> Vec<Option<String>> {
        self.shared.data.lock().unwrap().tokens.clone()
    }

    /// Count of requests whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sidecar registration body for `/v1/agent/service/:id`.
pub fn sidecar_json(
    proxy_id: &str,
    service: &str,
    public_port: u16,
    app_port: u16,
    upstreams: Vec<Value>,
    config: Value,
) -> Value {
    json!({
        "Kind": "connect-proxy",
        "ID": proxy_id,
        "Service": proxy_id,
        "Tags": [],
        "Meta": {},
        "Port": public_port,
        "Address": "",
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": false,
        "Proxy": {
            "DestinationServiceName": service,
            "DestinationServiceID": service,
            "LocalServiceAddress": "127.0.0.1",
            "LocalServicePort": app_port,
            "Config": config,
            "Upstreams": upstreams,
            "MeshGateway": {},
            "Expose": {}
        },
        "Datacenter": "dc1"
    })
}

/// An upstream entry of a registration.
pub fn upstream_json(name: &str, port: u16) -> Value {
    json!({"DestinationType": "service", "DestinationName": name, "LocalBindAddress": "127.0.0.1",
           "LocalBindPort": port, "MeshGateway": {}})
}

/// A `/v1/health/connect` entry for a sidecar of `service` listening on `port`.
pub fn health_entry(service: &str, port: u16, dc: &str) -> Value {
    json!({
        "Node": {"ID": "5d1d", "Node": "node-1", "Address": "127.0.0.1", "Datacenter": dc,
                 "TaggedAddresses": {"lan": "127.0.0.1", "lan_ipv4": "127.0.0.1", "wan": "127.0.0.1", "wan_ipv4": "127.0.0.1"},
                 "Meta": {"consul-network-segment": ""}, "CreateIndex": 12, "ModifyIndex": 14},
        "Service": {"Kind": "connect-proxy", "ID": format!("{service}-sidecar-proxy-{port}"),
                    "Service": format!("{service}-sidecar-proxy"), "Tags": [], "Address": "", "Meta": null,
                    "Port": port, "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
                    "Proxy": {"DestinationServiceName": service, "DestinationServiceID": service,
                              "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 1,
                              "Mode": "", "MeshGateway": {}, "Expose": {}},
                    "Connect": {}, "PeerName": "", "CreateIndex": 20, "ModifyIndex": 20},
        "Checks": [{"Node": "node-1", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing",
                    "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "", "ServiceName": "",
                    "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "", "ExposedPort": 0,
                    "Definition": {}, "CreateIndex": 12, "ModifyIndex": 12}]
    })
}

/// A new-style intention (as `/v1/connect/intentions/match` returns it).
pub fn intention_json(source: &str, destination: &str, action: &str, precedence: u32) -> Value {
    json!({"SourceNS": "default", "SourceName": source, "DestinationNS": "default",
           "DestinationName": destination, "SourceType": "consul", "Action": action,
           "Precedence": precedence, "CreateIndex": 52, "ModifyIndex": 60})
}

// === handlers ===

type Shared_ = Arc<Shared>;

fn router(shared: Shared_) -> Router {
    Router::new()
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/connect/ca/roots", get(roots))
        .route("/v1/agent/connect/ca/leaf/{service}", get(leaf))
        .route("/v1/connect/intentions/match", get(intentions_match))
        .route("/v1/health/connect/{service}", get(health_connect))
        .route("/v1/query/{name}/execute", get(query_execute))
        .route("/v1/agent/connect/authorize", post(authorize))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            record_token,
        ))
        .with_state(shared)
}

async fn record_token(
    State(s): State<Shared_>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = request
        .headers()
        .get("X-Consul-Token")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    s.data.lock().unwrap().tokens.push(token);
    next.run(request).await
}

/// The request's `wait` (sent in milliseconds). Stricter than a real agent: a blocking request
/// (`index` or `hash` given) without one is refused with 400, because the proxy must always
/// send it (without it the agent waits 5 minutes, and a cache-served read can block forever);
/// a real agent would take it and every test would pass without noticing.
fn parse_wait(q: &HashMap<String, String>) -> Result<Duration, (StatusCode, &'static str)> {
    let wait = q
        .get("wait")
        .and_then(|w| w.strip_suffix("ms"))
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    match wait {
        Some(w) => Ok(w),
        None if q.contains_key("index") || q.contains_key("hash") => Err((
            StatusCode::BAD_REQUEST,
            "fake agent: a blocking query without a wait in milliseconds",
        )),
        None => Ok(Duration::from_secs(300)),
    }
}

/// Records the request and applies any fault. `Some(response)` short-circuits the handler.
async fn enter(shared: &Shared, what: String) -> Option<Response> {
    let fault = {
        let mut d = shared.data.lock().unwrap();
        let path_fault = d
            .path_faults
            .iter()
            .find(|(p, _)| what.starts_with(p.as_str()))
            .map(|(_, f)| f.clone());
        d.requests.push(what);
        d.fault.clone().or(path_fault)
    };
    match fault {
        None => None,
        Some(Fault::Status(code, body)) => {
            Some((StatusCode::from_u16(code).unwrap(), body).into_response())
        }
        Some(Fault::Garbage) => Some((StatusCode::OK, "{\"this is\": not json").into_response()),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            None
        }
    }
}

/// Waits until `current` exceeds `index` (or the wait ends, or a fault appears); returns the
/// value and its index.
async fn block<T>(
    shared: &Shared,
    index: u64,
    wait: Duration,
    current: impl Fn(&Data) -> Option<(T, u64)>,
) -> Option<(T, u64)> {
    let mut rx = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        {
            let d = shared.data.lock().unwrap();
            let cur = current(&d);
            match &cur {
                // Consul wakes blocked queries when its index goes backwards (snapshot restore
                // abandons the state store), so a lower index answers at once too.
                Some((_, i)) if index == 0 || *i != index || d.fault.is_some() => return cur,
                None => return None,
                _ => {}
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return current(&shared.data.lock().unwrap()),
            r = rx.changed() => if r.is_err() { return None },
        }
    }
}

fn indexed(body: Value, index: u64) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        "X-Consul-Index",
        HeaderValue::from_str(&index.to_string()).unwrap(),
    );
    headers.insert(
        "X-Consul-Default-Acl-Policy",
        HeaderValue::from_static("allow"),
    );
    (headers, axum::Json(body)).into_response()
}

fn content_hash(v: &Value) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    format!("{:x}", h.finish())
}

async fn agent_service(
    State(s): State<Shared_>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = enter(&s, format!("GET /v1/agent/service/{id}")).await {
        return r;
    }
    let wait = match parse_wait(&q) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let wanted = q.get("hash").cloned();
    let mut rx = s.changed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let current = s.data.lock().unwrap().services.get(&id).cloned();
        let Some(svc) = current else {
            return (StatusCode::NOT_FOUND, format!("unknown service ID: {id}")).into_response();
        };
        let hash = content_hash(&svc);
        if wanted.as_deref() != Some(hash.as_str()) || tokio::time::Instant::now() >= deadline {
            let mut body = svc;
            body["ContentHash"] = Value::String(hash.clone());
            let mut headers = HeaderMap::new();
            headers.insert(
                "X-Consul-ContentHash",
                HeaderValue::from_str(&hash).unwrap(),
            );
            return (headers, axum::Json(body)).into_response();
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            r = rx.changed() => if r.is_err() { return StatusCode::SERVICE_UNAVAILABLE.into_response() },
        }
    }
}

async fn agent_services(State(s): State<Shared_>) -> Response {
    if let Some(r) = enter(&s, "GET /v1/agent/services".into()).await {
        return r;
    }
    let d = s.data.lock().unwrap();
    let map: serde_json::Map<String, Value> = d
        .services
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    axum::Json(Value::Object(map)).into_response()
}

fn index_of(q: &HashMap<String, String>) -> u64 {
    q.get("index").and_then(|i| i.parse().ok()).unwrap_or(0)
}

async fn roots(State(s): State<Shared_>, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(r) = enter(&s, "GET /v1/agent/connect/ca/roots".into()).await {
        return r;
    }
    let wait = match parse_wait(&q) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    match block(&s, index_of(&q), wait, |d| d.roots.clone()).await {
        Some((body, i)) => indexed(body, i),
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "CA has not finished initializing",
        )
            .into_response(),
    }
}

async fn leaf(
    State(s): State<Shared_>,
    Path(service): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = enter(&s, format!("GET /v1/agent/connect/ca/leaf/{service}")).await {
        return r;
    }
    let wait = match parse_wait(&q) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    if index_of(&q) == 0 {
        let mut d = s.data.lock().unwrap();
        let due = d
            .renewals
            .get(&service)
            .is_some_and(|(_, from)| std::time::SystemTime::now() >= *from);
        if due {
            let (new, _) = d.renewals.remove(&service).unwrap();
            d.index += 1;
            let i = d.index;
            d.leaves.insert(service.clone(), (new.json(i), i));
            drop(d);
            s.changed.send_replace(i);
        }
    }
    match block(&s, index_of(&q), wait, |d| d.leaves.get(&service).cloned()).await {
        Some((body, i)) => indexed(body, i),
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no leaf configured in the fake agent",
        )
            .into_response(),
    }
}

async fn intentions_match(
    State(s): State<Shared_>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = enter(&s, "GET /v1/connect/intentions/match".into()).await {
        return r;
    }
    let wait = match parse_wait(&q) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let Some(name) = q.get("name").cloned() else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "required query parameter 'name' not set",
        )
            .into_response();
    };
    let current = |d: &Data| Some(d.intentions.get(&name).cloned().unwrap_or((Vec::new(), 1)));
    let (list, i) = block(&s, index_of(&q), wait, current).await.unwrap();
    // Consul 1.14 sends null, not [], when nothing matches.
    let value = if list.is_empty() {
        Value::Null
    } else {
        Value::Array(list)
    };
    indexed(json!({ name: value }), i)
}

async fn health_connect(
    State(s): State<Shared_>,
    Path(service): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = enter(&s, format!("GET /v1/health/connect/{service}")).await {
        return r;
    }
    let wait = match parse_wait(&q) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let current = |d: &Data| Some(d.health.get(&service).cloned().unwrap_or((Vec::new(), 1)));
    let _long_poll = (index_of(&q) > 0).then(|| LongPoll::start(&s, &service));
    let (list, i) = block(&s, index_of(&q), wait, current).await.unwrap();
    indexed(Value::Array(list), i)
}

/// Counts a blocking health request while it is in flight (also when the client goes away).
struct LongPoll<'a>(&'a Shared);

impl<'a> LongPoll<'a> {
    fn start(shared: &'a Shared, service: &str) -> Self {
        let mut d = shared.data.lock().unwrap();
        d.health_long_polls += 1;
        d.max_health_long_polls = d.max_health_long_polls.max(d.health_long_polls);
        d.long_polled.insert(service.to_owned());
        LongPoll(shared)
    }
}

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        self.0.data.lock().unwrap().health_long_polls -= 1;
    }
}

async fn query_execute(State(s): State<Shared_>, Path(name): Path<String>) -> Response {
    if let Some(r) = enter(&s, format!("GET /v1/query/{name}/execute")).await {
        return r;
    }
    match s.data.lock().unwrap().queries.get(&name).cloned() {
        Some(body) => indexed(body, 1),
        None => (StatusCode::NOT_FOUND, "Query not found").into_response(),
    }
}

async fn authorize(State(s): State<Shared_>, body: axum::Json<Value>) -> Response {
    // The answer reflects the intentions when the request arrives; a Delay fault then holds it
    // back, like an agent answering from a cache that is about to change.
    let answer = authorize_answer(&s, &body);
    if let Some(r) = enter(&s, "POST /v1/agent/connect/authorize".into()).await {
        return r;
    }
    answer
}

fn authorize_answer(s: &Shared, body: &Value) -> Response {
    let target = body["Target"].as_str().unwrap_or_default().to_owned();
    let uri = body["ClientCertURI"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let Some(source) = uri.rsplit("/svc/").next().filter(|_| uri.contains("/svc/")) else {
        return (
            StatusCode::BAD_REQUEST,
            "ClientCertURI not a valid Connect identifier",
        )
            .into_response();
    };
    let d = s.data.lock().unwrap();
    let list = d
        .intentions
        .get(&target)
        .map(|v| v.0.clone())
        .unwrap_or_default();
    for i in list {
        let name = i["SourceName"].as_str().unwrap_or_default();
        if name == "*" || name == source {
            let action = i["Action"].as_str().unwrap_or_default();
            let reason = format!(
                "Matched L4 intention: default/{name} => default/{target} (Precedence: {}, Action: {})",
                i["Precedence"],
                action.to_uppercase()
            );
            return axum::Json(json!({"Authorized": action == "allow", "Reason": reason}))
                .into_response();
        }
    }
    axum::Json(
        json!({"Authorized": d.default_allow, "Reason": "Default behavior configured by ACLs"}),
    )
    .into_response()
}
