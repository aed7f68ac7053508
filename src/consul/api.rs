//! Serde mirror of the agent's JSON (PascalCase field names). Nothing outside `consul` and the
//! conversion functions that turn these into domain types should touch them.
//!
//! Decoding is lenient, as the reference asks: unknown fields are ignored, missing fields take
//! their default, and `null` is accepted wherever the agent is known to send it.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize};

/// `null` or missing decodes as the type's default.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `GET /v1/agent/service/:id` and the values of `GET /v1/agent/services`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    /// `connect-proxy` for sidecars; empty for a typical service.
    #[serde(deserialize_with = "nullable")]
    pub kind: String,
    /// The service instance ID.
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    /// The service name.
    #[serde(deserialize_with = "nullable")]
    pub service: String,
    /// The public (mTLS) port.
    pub port: u16,
    /// The public address; empty means all interfaces.
    #[serde(deserialize_with = "nullable")]
    pub address: String,
    /// Present for connect proxies.
    pub proxy: Option<AgentProxy>,
    /// Only on the single-service endpoint: the hash to block on.
    #[serde(deserialize_with = "nullable")]
    pub content_hash: String,
    /// The agent's datacenter.
    #[serde(deserialize_with = "nullable")]
    pub datacenter: String,
}

/// `Proxy` of an agent service registration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentProxy {
    /// The identity the proxy serves (leaf certificate, authorize target).
    #[serde(deserialize_with = "nullable")]
    pub destination_service_name: String,
    /// The instance the proxy fronts (used by `-sidecar-for`).
    #[serde(rename = "DestinationServiceID", deserialize_with = "nullable")]
    pub destination_service_id: String,
    /// Where inbound traffic goes.
    #[serde(deserialize_with = "nullable")]
    pub local_service_address: String,
    /// Where inbound traffic goes.
    pub local_service_port: u16,
    /// Alternatively, a unix socket for the local app.
    #[serde(deserialize_with = "nullable")]
    pub local_service_socket_path: String,
    /// The opaque `Proxy.Config` map (snake_case keys).
    #[serde(deserialize_with = "nullable")]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// The upstreams.
    #[serde(deserialize_with = "nullable")]
    pub upstreams: Vec<Upstream>,
}

/// One entry of `Proxy.Upstreams`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Upstream {
    /// `service` (default) or `prepared_query`.
    #[serde(deserialize_with = "nullable")]
    pub destination_type: String,
    /// The service or prepared query name.
    #[serde(deserialize_with = "nullable")]
    pub destination_name: String,
    /// Target datacenter; empty is the local one.
    #[serde(deserialize_with = "nullable")]
    pub datacenter: String,
    /// Listener address; default `127.0.0.1`.
    #[serde(deserialize_with = "nullable")]
    pub local_bind_address: String,
    /// Listener port; 0 means no listener.
    pub local_bind_port: u16,
    /// Alternatively, a unix socket listener.
    #[serde(deserialize_with = "nullable")]
    pub local_bind_socket_path: String,
    /// The unix socket's permissions, octal (`"0600"`).
    #[serde(deserialize_with = "nullable")]
    pub local_bind_socket_mode: String,
    /// Enterprise namespace of the destination (omitted on CE).
    #[serde(deserialize_with = "nullable")]
    pub destination_namespace: String,
    /// Enterprise partition of the destination (omitted on CE).
    #[serde(deserialize_with = "nullable")]
    pub destination_partition: String,
    /// A cluster peer the destination lives in.
    #[serde(deserialize_with = "nullable")]
    pub destination_peer: String,
    /// Opaque per-upstream config (`connect_timeout_ms`, ...).
    #[serde(deserialize_with = "nullable")]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Synthetic entries from `service-defaults`; never listeners.
    pub centrally_configured: bool,
}

/// `GET /v1/agent/connect/ca/roots`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CaRoots {
    /// The `ID` of the active root.
    #[serde(rename = "ActiveRootID", deserialize_with = "nullable")]
    pub active_root_id: String,
    /// `<cluster-id>.consul`.
    #[serde(deserialize_with = "nullable")]
    pub trust_domain: String,
    /// Every root still trusted, active or not.
    #[serde(deserialize_with = "nullable")]
    pub roots: Vec<CaRoot>,
}

/// One CA root.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CaRoot {
    /// SHA-1 fingerprint of the root, colon-hex.
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    /// Free text.
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    /// The root certificate, PEM.
    #[serde(deserialize_with = "nullable")]
    pub root_cert: String,
    /// Intermediates Consul appends to leaves signed under this root.
    #[serde(deserialize_with = "nullable")]
    pub intermediate_certs: Vec<String>,
    /// Whether this root currently signs.
    pub active: bool,
    /// Set on roots kept after a trust-domain change.
    #[serde(deserialize_with = "nullable")]
    pub external_trust_domain: String,
}

/// `GET /v1/agent/connect/ca/leaf/:service`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct LeafCert {
    /// Colon-hex serial.
    #[serde(deserialize_with = "nullable")]
    pub serial_number: String,
    /// Leaf PEM followed by any intermediates.
    #[serde(rename = "CertPEM", deserialize_with = "nullable")]
    pub cert_pem: String,
    /// SEC1 `EC PRIVATE KEY` PEM (PKCS#8 accepted too).
    #[serde(rename = "PrivateKeyPEM", deserialize_with = "nullable")]
    pub private_key_pem: String,
    /// The requested service name.
    #[serde(deserialize_with = "nullable")]
    pub service: String,
    /// The leaf's SPIFFE ID.
    #[serde(rename = "ServiceURI", deserialize_with = "nullable")]
    pub service_uri: String,
    /// RFC 3339.
    #[serde(deserialize_with = "nullable")]
    pub valid_after: String,
    /// RFC 3339.
    #[serde(deserialize_with = "nullable")]
    pub valid_before: String,
    /// The blocking index of this cert.
    pub modify_index: u64,
}

/// One intention in a match list.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Intention {
    /// Legacy intentions only.
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    /// Source namespace; `*` or a name.
    #[serde(rename = "SourceNS", deserialize_with = "nullable")]
    pub source_ns: String,
    /// Source name; `*` or a name.
    #[serde(deserialize_with = "nullable")]
    pub source_name: String,
    /// Source partition (Enterprise).
    #[serde(deserialize_with = "nullable")]
    pub source_partition: String,
    /// Non-empty for sources in a peered cluster.
    #[serde(deserialize_with = "nullable")]
    pub source_peer: String,
    /// `consul`.
    #[serde(deserialize_with = "nullable")]
    pub source_type: String,
    /// Destination namespace.
    #[serde(rename = "DestinationNS", deserialize_with = "nullable")]
    pub destination_ns: String,
    /// Destination name; `*` or a name.
    #[serde(deserialize_with = "nullable")]
    pub destination_name: String,
    /// `allow` or `deny`; empty for L7 intentions.
    #[serde(deserialize_with = "nullable")]
    pub action: String,
    /// L7 permissions; non-empty means deny at L4.
    #[serde(deserialize_with = "nullable")]
    pub permissions: Vec<serde_json::Value>,
    /// 1 to 9.
    pub precedence: u32,
}

/// `GET /v1/connect/intentions/match`: keyed by each `name` passed. A name with no matching
/// intention maps to `null` (seen on Consul 1.14), not `[]`.
pub type IntentionMatch = HashMap<String, Option<Vec<Intention>>>;

/// One entry of `GET /v1/health/connect/:service` (and of prepared-query results).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckServiceNode {
    /// The node.
    pub node: Node,
    /// The service instance.
    pub service: NodeService,
    /// Its checks.
    #[serde(deserialize_with = "nullable")]
    pub checks: Vec<HealthCheck>,
}

/// A catalog node.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    /// Node name.
    #[serde(deserialize_with = "nullable")]
    pub node: String,
    /// Node address.
    #[serde(deserialize_with = "nullable")]
    pub address: String,
    /// The node's datacenter: part of the identity expected from its services.
    #[serde(deserialize_with = "nullable")]
    pub datacenter: String,
}

/// A catalog service instance (`structs.NodeService`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeService {
    /// `connect-proxy`, `terminating-gateway`, or empty.
    #[serde(deserialize_with = "nullable")]
    pub kind: String,
    /// Instance ID.
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    /// Service name.
    #[serde(deserialize_with = "nullable")]
    pub service: String,
    /// Address; empty means the node's.
    #[serde(deserialize_with = "nullable")]
    pub address: String,
    /// Port.
    pub port: u16,
    /// Proxy block (always present here, possibly empty).
    #[serde(deserialize_with = "nullable")]
    pub proxy: NodeServiceProxy,
    /// `{"Native": true}` for Connect-native services.
    #[serde(deserialize_with = "nullable")]
    pub connect: NodeServiceConnect,
}

/// `Proxy` of a catalog service.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeServiceProxy {
    /// The service this proxy fronts.
    #[serde(deserialize_with = "nullable")]
    pub destination_service_name: String,
}

/// `Connect` of a catalog service.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeServiceConnect {
    /// Connect-native service.
    pub native: bool,
}

/// One health check.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheck {
    /// Check ID.
    #[serde(rename = "CheckID", deserialize_with = "nullable")]
    pub check_id: String,
    /// `passing`, `warning`, `critical` or `maintenance`.
    #[serde(deserialize_with = "nullable")]
    pub status: String,
}

/// `GET /v1/query/:name/execute`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct PreparedQueryResponse {
    /// The service the query resolved to.
    #[serde(deserialize_with = "nullable")]
    pub service: String,
    /// The endpoints.
    #[serde(deserialize_with = "nullable")]
    pub nodes: Vec<CheckServiceNode>,
    /// The datacenter that answered.
    #[serde(deserialize_with = "nullable")]
    pub datacenter: String,
}

/// `POST /v1/agent/connect/authorize` body. Decoded strictly by the agent: no other fields.
#[derive(Clone, Debug, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AuthorizeRequest {
    /// Destination service name.
    pub target: String,
    /// The caller's URI SAN.
    #[serde(rename = "ClientCertURI")]
    pub client_cert_uri: String,
    /// Colon-hex serial (unused by the agent, sent for completeness).
    pub client_cert_serial: String,
}

/// `POST /v1/agent/connect/authorize` answer.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AuthorizeResponse {
    /// Allowed or not.
    pub authorized: bool,
    /// Free text; starts with `Default` when no intention matched.
    #[serde(deserialize_with = "nullable")]
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_service_tolerates_nulls_and_unknown_fields() {
        let svc: AgentService = serde_json::from_str(
            r#"{"Kind":"connect-proxy","ID":"web-sidecar-proxy","Service":"web-sidecar-proxy",
                "Tags":null,"Meta":null,"Port":21000,"Address":"","Weights":null,
                "NewField":{"x":1},
                "Proxy":{"DestinationServiceName":"web","DestinationServiceID":"web",
                         "LocalServiceAddress":"127.0.0.1","LocalServicePort":8080,
                         "Config":null,"Upstreams":null,"MeshGateway":{},"Expose":{}},
                "ContentHash":"abc","Datacenter":"dc1"}"#,
        )
        .unwrap();
        let proxy = svc.proxy.unwrap();
        assert_eq!(proxy.destination_service_name, "web");
        assert!(proxy.upstreams.is_empty());
        assert!(proxy.config.is_empty());
        assert_eq!(svc.content_hash, "abc");
    }

    #[test]
    fn roots_accept_null_intermediates() {
        let roots: CaRoots = serde_json::from_str(
            r#"{"ActiveRootID":"aa","TrustDomain":"td.consul","Roots":[
                {"ID":"aa","Name":"r","SerialNumber":7,"RootCert":"PEM","IntermediateCerts":null,
                 "Active":true}]}"#,
        )
        .unwrap();
        assert_eq!(roots.roots[0].intermediate_certs.len(), 0);
        assert!(roots.roots[0].active);
    }

    #[test]
    fn authorize_request_serializes_exact_field_names() {
        let body = serde_json::to_value(AuthorizeRequest {
            target: "db".into(),
            client_cert_uri: "spiffe://x/ns/default/dc/dc1/svc/web".into(),
            client_cert_serial: "01".into(),
        })
        .unwrap();
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ClientCertSerial", "ClientCertURI", "Target"]);
    }
}
