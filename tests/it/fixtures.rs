//! Responses recorded from a real Consul 1.14.11 agent (`tests/fixtures/consul-1.14.11/`):
//! the product decodes and interprets them as the real agent meant, and the fake agent's
//! JSON uses no field the real agent does not send.

use std::collections::{BTreeMap, BTreeSet};

use consul_proxy::authz::{self, Intentions, Verdict};
use consul_proxy::consul::api;
use consul_proxy::endpoints::Endpoints;
use consul_proxy::proxy_config::{BindAddr, Defaults, Destination, LocalApp, ProxyConfig};
use consul_proxy::spiffe::SpiffeId;
use consul_proxy::tls::{TrustBundle, first_cert, peer};
use serde_json::Value;

use crate::support::mesh::Mesh;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/consul-1.14.11/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn decode<T: serde::de::DeserializeOwned>(name: &str) -> T {
    serde_json::from_value(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn real_registration_maps_to_listeners() {
    let svc: api::AgentService = decode("agent-service.json");
    let cfg = ProxyConfig::from_api(&svc, &Defaults::default())
        .unwrap()
        .config;
    assert_eq!(cfg.service, "web");
    let public = cfg.public.unwrap();
    assert_eq!(public.bind.port(), 21000);
    assert_eq!(
        public.local_app,
        LocalApp::Tcp {
            host: "127.0.0.1".into(),
            port: 8080
        }
    );
    assert_eq!(public.handshake_timeout.as_millis(), 5000);
    assert_eq!(
        cfg.upstreams[0].destination,
        Destination::Service("db".into())
    );
    assert_eq!(
        cfg.upstreams[0].bind,
        BindAddr::Tcp("127.0.0.1:9191".parse().unwrap())
    );
    assert_eq!(
        cfg.upstreams[1].destination,
        Destination::PreparedQuery("db-query".into())
    );
}

#[test]
fn real_roots_and_leaf_parse() {
    let roots: api::CaRoots = decode("roots.json");
    let (bundle, warnings) = TrustBundle::from_api(&roots).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        bundle.anchors_at(rustls::pki_types::UnixTime::now()).len(),
        1
    );
    let leaf: api::LeafCert = decode("leaf.json");
    let cert = first_cert(&leaf.cert_pem).unwrap();
    let id = peer::identity(&cert).unwrap();
    assert_eq!(id.id.to_string(), leaf.service_uri);
    assert_eq!(
        id.serial, leaf.serial_number,
        "serial encoding matches Consul's"
    );
    assert!(bundle.is_own_trust_domain(id.id.trust_domain()));
}

#[test]
fn local_authorization_agrees_with_the_real_agent() {
    let m: api::IntentionMatch = decode("intentions-match.json");
    let ixns = Intentions::from_api("db", m["db"].clone().unwrap());
    let td = "587c3a8b-3fde-5e91-bffb-a5cdf9d9c77b.consul";
    for (source, recorded) in [
        ("web", "authorize-allow.json"),
        ("api", "authorize-deny.json"),
    ] {
        let answer: api::AuthorizeResponse = decode(recorded);
        let d = authz::authorize(&ixns, &SpiffeId::new(td, "", "", "dc1", source), None);
        assert_eq!(d.verdict == Verdict::Allow, answer.authorized, "{source}");
        // The agent's reason names the same intention.
        let authz::Reason::Intention(label) = d.reason else {
            panic!("{source}: {:?}", d.reason)
        };
        let agent_rule = answer
            .reason
            .split(": ")
            .nth(1)
            .unwrap()
            .split(" (")
            .next()
            .unwrap();
        assert!(label.starts_with(agent_rule), "{label} vs {agent_rule}");
    }
    let empty: api::IntentionMatch = decode("intentions-match-empty.json");
    assert_eq!(empty["web"], None, "null decodes as no intentions");
}

#[test]
fn real_health_and_query_results_become_endpoints() {
    let entries: Vec<api::CheckServiceNode> = decode("health-connect.json");
    let eps = Endpoints::from_health(&entries);
    assert_eq!(eps.list.len(), 1);
    assert_eq!(
        (
            eps.list[0].service.as_str(),
            eps.list[0].datacenter.as_str()
        ),
        ("db", "dc1")
    );
    assert_eq!(eps.list[0].port, 21001);
    let q: api::PreparedQueryResponse = decode("query-execute.json");
    assert_eq!(Endpoints::from_health(&q.nodes).list.len(), 1);
}

/// The JSON types (`string`, `number`, `bool`) found at each key path of a value, as
/// [`shape`] names the paths; `null` is left out (the agent sends it for empty lists and
/// objects alike), so a path seen only as `null` has no type.
fn scalar_types(v: &Value, dynamic_root: bool) -> BTreeMap<String, BTreeSet<&'static str>> {
    fn walk(
        v: &Value,
        path: String,
        out: &mut BTreeMap<String, BTreeSet<&'static str>>,
        dynamic: bool,
    ) {
        let kind = match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let key = if dynamic { "*" } else { k.as_str() };
                    let p = format!("{path}.{key}");
                    out.entry(p.clone()).or_default();
                    walk(child, p, out, false);
                }
                return;
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, format!("{path}[]"), out, false);
                }
                return;
            }
            Value::Null => return,
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Bool(_) => "bool",
        };
        out.entry(path).or_default().insert(kind);
    }
    let mut out = BTreeMap::new();
    walk(v, String::new(), &mut out, dynamic_root);
    out
}

/// Every key path of a JSON value; `dynamic_root` treats the top-level keys as data (IDs).
fn shape(v: &Value, dynamic_root: bool) -> BTreeSet<String> {
    fn walk(v: &Value, path: String, out: &mut BTreeSet<String>, dynamic: bool) {
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    let key = if dynamic { "*" } else { k.as_str() };
                    let p = format!("{path}.{key}");
                    out.insert(p.clone());
                    walk(child, p, out, false);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, format!("{path}[]"), out, false);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, String::new(), &mut out, dynamic_root);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_shapes_match_real_ones() {
    consul_proxy::tls::install_crypto_provider();
    let mesh = Mesh::new().await;
    // Populate what the real recording had: a prepared query and intentions with a wildcard.
    mesh.agent.set_query(
        "db-query",
        "db",
        vec![crate::support::fake_agent::health_entry("db", 21001, "dc1")],
    );
    let http = reqwest::Client::new();
    let base = format!("http://{}", mesh.agent.addr());
    let get = |path: String| {
        let http = http.clone();
        async move {
            http.get(path)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let cases = [
        (
            "/v1/agent/service/web-sidecar-proxy",
            &["agent-service.json", "agent-service-bind-address.json"][..],
            false,
        ),
        (
            "/v1/agent/services",
            &["agent-services.json", "agent-services-bind-address.json"],
            true,
        ),
        ("/v1/agent/connect/ca/roots", &["roots.json"], false),
        ("/v1/agent/connect/ca/leaf/web", &["leaf.json"], false),
        (
            "/v1/connect/intentions/match?by=destination&name=db",
            &["intentions-match.json"],
            true,
        ),
        (
            "/v1/health/connect/db?passing",
            &["health-connect.json"],
            false,
        ),
        (
            "/v1/query/db-query/execute?connect=true",
            &["query-execute.json"],
            false,
        ),
    ];
    for (path, reals, dynamic) in cases {
        let fake = shape(&get(format!("{base}{path}")).await, dynamic);
        let real_shape: BTreeSet<String> = reals
            .iter()
            .flat_map(|r| shape(&fixture(r), dynamic))
            .collect();
        let extra: Vec<&String> = fake.difference(&real_shape).collect();
        assert!(
            extra.is_empty(),
            "{path}: the fake sends fields the real agent does not: {extra:?}"
        );
        assert!(!fake.is_empty(), "{path}: empty fake response");
        // And with the same JSON types (a number where the agent sends a string would decode
        // in the fake's tests and fail against the agent, or the reverse).
        let fake_types = scalar_types(&get(format!("{base}{path}")).await, dynamic);
        let mut real_types: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for r in reals {
            for (p, t) in scalar_types(&fixture(r), dynamic) {
                real_types.entry(p).or_default().extend(t);
            }
        }
        for (field, types) in &fake_types {
            // A path the recording has only as null or an empty list says nothing of its type.
            let Some(real) = real_types.get(field).filter(|t| !t.is_empty()) else {
                continue;
            };
            assert!(
                types.is_subset(real),
                "{path}: {field} is {types:?} in the fake, {real:?} from the real agent"
            );
        }
    }
    let fake_auth = http
        .post(format!("{base}/v1/agent/connect/authorize"))
        .json(&serde_json::json!({"Target": "db", "ClientCertURI": "spiffe://x.consul/ns/default/dc/dc1/svc/web", "ClientCertSerial": "01"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        shape(&fake_auth, false),
        shape(&fixture("authorize-allow.json"), false)
    );
    assert_eq!(
        fake_auth["Reason"],
        fixture("authorize-allow.json")["Reason"],
        "same reason text as the real agent"
    );
}
