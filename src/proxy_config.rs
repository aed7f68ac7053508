//! The proxy's own configuration, read from its agent registration (`/v1/agent/service/:id`)
//! and turned into typed listeners. A registration we cannot honour exactly is rejected with
//! a reason, never half-applied.
//!
//! Address precedence (differs from Consul's built-in proxy on purpose; see the README):
//! - `Proxy.Config.bind_address` / `bind_port` override the registration's `Address` / `Port`
//!   (the registration's address is what *other* services dial, which may not be a local
//!   interface); an empty address means all IPv4 interfaces, port 0 means no public listener;
//! - `Proxy.Config.local_service_address` (`host` or `host:port`) overrides
//!   `LocalServiceAddress` / `LocalServicePort`; then `LocalServiceSocketPath`; then
//!   `LocalServiceAddress` (default `127.0.0.1`) with `LocalServicePort`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::consul::api;

/// Default TLS handshake timeout (`handshake_timeout_ms`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default local app dial timeout (`local_connect_timeout_ms`).
pub const DEFAULT_LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default upstream dial + handshake timeout per attempt (`connect_timeout_ms`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings that come from flags and that `Proxy.Config` keys may override.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Defaults {
    /// `-reauthorize-interval` (`reauthorize_interval_ms`); `None` is off.
    pub reauthorize_interval: Option<Duration>,
    /// `-max-conn-lifetime` (`max_conn_lifetime_ms`); `None` is off.
    pub max_conn_lifetime: Option<Duration>,
    /// `-idle-timeout` (`idle_timeout_ms`); `None` is off.
    pub idle_timeout: Option<Duration>,
    /// `-max-inbound-conns` (`max_inbound_connections`); `None` is unlimited.
    pub max_inbound_connections: Option<usize>,
    /// `-max-inbound-conn-rate` (`max_inbound_connection_rate`, per second); `None` is
    /// unlimited.
    pub max_inbound_connection_rate: Option<usize>,
}

/// The proxy configuration at one point in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The registration ID.
    pub proxy_id: String,
    /// The service we are a proxy for: our identity.
    pub service: String,
    /// The agent's datacenter.
    pub datacenter: String,
    /// The mTLS listener, if the registration has a port.
    pub public: Option<PublicListener>,
    /// One listener per upstream.
    pub upstreams: Vec<UpstreamSpec>,
    /// Re-check live inbound connections on this interval too (they are always re-checked
    /// when intentions, the default policy or the roots change).
    pub reauthorize_interval: Option<Duration>,
}

/// The inbound (mTLS) side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicListener {
    /// Where to listen.
    pub bind: SocketAddr,
    /// Where authorized traffic goes.
    pub local_app: LocalApp,
    /// Limit for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Limit for dialling the local app.
    pub local_connect_timeout: Duration,
    /// Close inbound connections after about this long (jittered down by up to 10%).
    pub max_conn_lifetime: Option<Duration>,
    /// Close inbound connections that moved no byte either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Refuse new inbound connections while this many are open (handshakes included).
    pub max_connections: Option<usize>,
    /// Refuse new inbound connections beyond this many per second (bursts up to as many).
    pub max_connection_rate: Option<usize>,
}

/// The local application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalApp {
    /// TCP `host:port`.
    Tcp {
        /// Host name or IP literal.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

/// An upstream listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// What to reach.
    pub destination: Destination,
    /// The datacenter to look in; `None` is the local one.
    pub datacenter: Option<String>,
    /// Where local clients connect.
    pub bind: BindAddr,
    /// Limit for one attempt (TCP connect and TLS handshake).
    pub connect_timeout: Duration,
    /// Permissions of a unix socket listener (`LocalBindSocketMode`); `None` leaves them to
    /// the umask.
    pub socket_mode: Option<u32>,
}

/// An upstream target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A service, discovered through `/v1/health/connect/:name`.
    Service(String),
    /// A prepared query, executed with `connect=true`.
    PreparedQuery(String),
}

/// A local listening address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BindAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for LocalApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalApp::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            LocalApp::Tcp { host, port } => write!(f, "{host}:{port}"),
            LocalApp::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Service(n) => write!(f, "service {n}"),
            Destination::PreparedQuery(n) => write!(f, "prepared query {n}"),
        }
    }
}

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A registration converted, with notes on anything skipped.
#[derive(Clone, Debug)]
pub struct Converted {
    /// The configuration.
    pub config: ProxyConfig,
    /// Things skipped on purpose (e.g. upstreams with no local port), for the log.
    pub notes: Vec<String>,
}

impl ProxyConfig {
    /// Whether `desired` can replace this running configuration live. Our identity (the
    /// destination service and datacenter) decides which leaf we present, whose intentions
    /// apply and what name the roots are checked for; those are chosen at start-up, so a
    /// registration that changes them is refused with the reason (the running configuration
    /// stays) until the proxy is restarted.
    pub fn can_become(&self, desired: &ProxyConfig) -> Result<(), String> {
        if !self.service.eq_ignore_ascii_case(&desired.service) {
            return Err(format!(
                "the registration now proxies for service {:?} instead of {:?}; restart the proxy to take on the new identity (until then it keeps serving {:?} as before)",
                desired.service, self.service, self.service
            ));
        }
        if self.datacenter != desired.datacenter {
            return Err(format!(
                "the agent's datacenter changed from {:?} to {:?}; restart the proxy",
                self.datacenter, desired.datacenter
            ));
        }
        Ok(())
    }

    /// Converts a registration; `Err` says why it cannot be honoured. `defaults` come from
    /// flags; `Proxy.Config` keys override them (0 turns a limit off).
    pub fn from_api(svc: &api::AgentService, defaults: &Defaults) -> Result<Converted, String> {
        if svc.kind != "connect-proxy" {
            let kind = if svc.kind.is_empty() {
                "typical service"
            } else {
                svc.kind.as_str()
            };
            return Err(format!(
                "registration {:?} is a {kind}, not a connect-proxy",
                svc.id
            ));
        }
        let proxy = svc
            .proxy
            .as_ref()
            .ok_or_else(|| format!("registration {:?} has no Proxy block", svc.id))?;
        if proxy.destination_service_name.is_empty() {
            return Err(format!(
                "registration {:?} has no Proxy.DestinationServiceName",
                svc.id
            ));
        }
        let cfg = &proxy.config;
        let mut notes = Vec::new();

        let bind_port = match opt_u16(cfg, "bind_port")? {
            Some(p) => p,
            None => svc.port,
        };
        let local = local_app(proxy)?;
        let public = if bind_port == 0 {
            notes.push("no public port: inbound listener disabled".to_owned());
            None
        } else if local.is_none() {
            // Consul requires a port on every connect-proxy, also for services that only call
            // others; with no local service there is nothing to forward inbound traffic to.
            notes.push(
                "no local service (LocalServicePort 0, no socket path): inbound listener disabled"
                    .to_owned(),
            );
            None
        } else {
            let bind_ip = match opt_str(cfg, "bind_address")? {
                Some(a) => parse_ip("Proxy.Config.bind_address", a)?,
                None if svc.address.is_empty() => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                None => parse_ip("Address", &svc.address)?,
            };
            Some(PublicListener {
                bind: SocketAddr::new(bind_ip, bind_port),
                // Invariant: the branch above handles `None`.
                local_app: local.expect("local app checked above"),
                handshake_timeout: duration_ms(
                    cfg,
                    "handshake_timeout_ms",
                    DEFAULT_HANDSHAKE_TIMEOUT,
                )?,
                local_connect_timeout: duration_ms(
                    cfg,
                    "local_connect_timeout_ms",
                    DEFAULT_LOCAL_CONNECT_TIMEOUT,
                )?,
                max_conn_lifetime: optional_ms(
                    cfg,
                    "max_conn_lifetime_ms",
                    defaults.max_conn_lifetime,
                )?,
                idle_timeout: optional_ms(cfg, "idle_timeout_ms", defaults.idle_timeout)?,
                max_connections: opt_limit(
                    cfg,
                    "max_inbound_connections",
                    defaults.max_inbound_connections,
                )?,
                max_connection_rate: opt_limit(
                    cfg,
                    "max_inbound_connection_rate",
                    defaults.max_inbound_connection_rate,
                )?,
            })
        };

        let mut upstreams = Vec::new();
        for u in &proxy.upstreams {
            if let Some(spec) = upstream(u, &mut notes)? {
                upstreams.push(spec);
            }
        }
        check_unique_binds(public.as_ref(), &upstreams)?;

        Ok(Converted {
            config: ProxyConfig {
                proxy_id: svc.id.clone(),
                service: proxy.destination_service_name.clone(),
                datacenter: svc.datacenter.clone(),
                public,
                upstreams,
                reauthorize_interval: optional_ms(
                    cfg,
                    "reauthorize_interval_ms",
                    defaults.reauthorize_interval,
                )?,
            },
            notes,
        })
    }
}

/// The local app, or `None` when the registration names none.
fn local_app(proxy: &api::AgentProxy) -> Result<Option<LocalApp>, String> {
    if let Some(raw) = opt_str(&proxy.config, "local_service_address")? {
        return match split_host_port(raw) {
            Some((host, port)) => Ok(Some(LocalApp::Tcp { host, port })),
            None if proxy.local_service_port != 0 => Ok(Some(LocalApp::Tcp {
                host: raw.trim_matches(|c| c == '[' || c == ']').to_owned(),
                port: proxy.local_service_port,
            })),
            None => Err(format!(
                "Proxy.Config.local_service_address {raw:?} has no port and LocalServicePort is unset"
            )),
        };
    }
    if !proxy.local_service_socket_path.is_empty() {
        return Ok(Some(LocalApp::Unix(PathBuf::from(
            &proxy.local_service_socket_path,
        ))));
    }
    if proxy.local_service_port == 0 {
        return Ok(None);
    }
    let host = if proxy.local_service_address.is_empty() {
        "127.0.0.1".to_owned()
    } else {
        proxy.local_service_address.clone()
    };
    Ok(Some(LocalApp::Tcp {
        host,
        port: proxy.local_service_port,
    }))
}

fn upstream(u: &api::Upstream, notes: &mut Vec<String>) -> Result<Option<UpstreamSpec>, String> {
    if u.centrally_configured {
        notes.push(format!(
            "upstream {:?} is centrally configured (no listener)",
            u.destination_name
        ));
        return Ok(None);
    }
    if u.destination_name.is_empty() {
        return Err("an upstream has no DestinationName".into());
    }
    // Serving these as the local `service <name>` would reach the wrong service.
    if !u.destination_peer.is_empty() {
        return Err(format!(
            "upstream {:?}: DestinationPeer {:?} (cluster peering) is not supported",
            u.destination_name, u.destination_peer
        ));
    }
    for (field, value) in [
        ("DestinationNamespace", &u.destination_namespace),
        ("DestinationPartition", &u.destination_partition),
    ] {
        if !value.is_empty() && value != "default" {
            return Err(format!(
                "upstream {:?}: {field} {value:?} is not supported (only the default one)",
                u.destination_name
            ));
        }
    }
    let destination = match u.destination_type.as_str() {
        "" | "service" => Destination::Service(u.destination_name.clone()),
        "prepared_query" => Destination::PreparedQuery(u.destination_name.clone()),
        other => {
            return Err(format!(
                "upstream {:?}: unknown DestinationType {other:?}",
                u.destination_name
            ));
        }
    };
    let bind = if !u.local_bind_socket_path.is_empty() {
        BindAddr::Unix(PathBuf::from(&u.local_bind_socket_path))
    } else if u.local_bind_port == 0 {
        notes.push(format!(
            "upstream {:?} has no LocalBindPort (no listener)",
            u.destination_name
        ));
        return Ok(None);
    } else {
        let ip = if u.local_bind_address.is_empty() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            parse_ip("LocalBindAddress", &u.local_bind_address)?
        };
        BindAddr::Tcp(SocketAddr::new(ip, u.local_bind_port))
    };
    Ok(Some(UpstreamSpec {
        destination,
        datacenter: (!u.datacenter.is_empty()).then(|| u.datacenter.clone()),
        bind,
        connect_timeout: duration_ms(&u.config, "connect_timeout_ms", DEFAULT_CONNECT_TIMEOUT)
            .map_err(|e| format!("upstream {:?}: {e}", u.destination_name))?,
        socket_mode: socket_mode(&u.local_bind_socket_mode)
            .map_err(|e| format!("upstream {:?}: {e}", u.destination_name))?,
    }))
}

/// `LocalBindSocketMode`: octal permission bits, at most `0777`.
fn socket_mode(s: &str) -> Result<Option<u32>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    match u32::from_str_radix(s, 8) {
        Ok(mode) if mode <= 0o777 => Ok(Some(mode)),
        _ => Err(format!(
            "LocalBindSocketMode {s:?} is not an octal file mode such as \"0600\""
        )),
    }
}

fn check_unique_binds(
    public: Option<&PublicListener>,
    upstreams: &[UpstreamSpec],
) -> Result<(), String> {
    let mut seen: Vec<BindAddr> = public.map(|p| BindAddr::Tcp(p.bind)).into_iter().collect();
    for u in upstreams {
        if let Some(other) = seen.iter().find(|s| binds_conflict(s, &u.bind)) {
            return Err(format!(
                "two listeners on {} and {other} ({})",
                u.bind, u.destination
            ));
        }
        seen.push(u.bind.clone());
    }
    Ok(())
}

/// Whether two listeners cannot both be bound: the same address, or the same TCP port where
/// one is a wildcard covering the other (`0.0.0.0` covers IPv4, `::` both families).
pub fn binds_conflict(a: &BindAddr, b: &BindAddr) -> bool {
    let covers = |w: IpAddr, other: IpAddr| w.is_unspecified() && (w.is_ipv6() || other.is_ipv4());
    match (a, b) {
        (BindAddr::Tcp(a), BindAddr::Tcp(b)) => {
            a.port() == b.port()
                && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
        }
        _ => a == b,
    }
}

/// Host names seen in the registration's listener addresses (`Address`,
/// `Proxy.Config.bind_address`, each upstream's `LocalBindAddress`) and the address each was
/// resolved to. A name is resolved the first time it appears (the first IPv4 address if any,
/// as Go's listen does; Consul's built-in proxy listens on `host:port`), and that answer is
/// kept: a name with several addresses does not move a listener on every registration read,
/// and a DNS hiccup does not reject an unchanged registration.
#[derive(Debug, Default)]
pub struct HostNames(std::sync::Mutex<std::collections::HashMap<String, IpAddr>>);

impl HostNames {
    /// Replaces host names in the listener addresses of `svc` with their addresses, before
    /// [`ProxyConfig::from_api`] (which takes IPs only). Returns a note per name resolved now;
    /// a name that does not resolve is an error naming the field.
    pub async fn resolve(&self, svc: &mut api::AgentService) -> Result<Vec<String>, String> {
        let mut notes = Vec::new();
        self.resolve_one("Address", &mut svc.address, &mut notes)
            .await?;
        if let Some(proxy) = svc.proxy.as_mut() {
            if let Some(Value::String(a)) = proxy.config.get_mut("bind_address") {
                self.resolve_one("Proxy.Config.bind_address", a, &mut notes)
                    .await?;
            }
            for u in &mut proxy.upstreams {
                self.resolve_one("LocalBindAddress", &mut u.local_bind_address, &mut notes)
                    .await?;
            }
        }
        Ok(notes)
    }

    async fn resolve_one(
        &self,
        field: &str,
        host: &mut String,
        notes: &mut Vec<String>,
    ) -> Result<(), String> {
        let bare = host.trim_matches(|c| c == '[' || c == ']');
        if bare.is_empty() || bare.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        let known = self.lock().get(bare).copied();
        let ip = match known {
            Some(ip) => ip,
            None => {
                let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, 0))
                    .await
                    .map_err(|e| {
                        format!("{field} {host:?} is neither an IP address nor a name that resolves: {e}")
                    })?
                    .collect();
                let ip = addrs
                    .iter()
                    .find(|a| a.is_ipv4())
                    .or_else(|| addrs.first())
                    .map(SocketAddr::ip)
                    .ok_or_else(|| format!("{field} {host:?} resolves to no address"))?;
                self.lock().insert(bare.to_owned(), ip);
                notes.push(format!("{field} {host:?} resolved to {ip}"));
                ip
            }
        };
        *host = ip.to_string();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, IpAddr>> {
        // Invariant: held only to read or insert one entry; nothing in between can panic.
        self.0.lock().expect("host names lock")
    }
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, String> {
    s.trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| format!("{field} {s:?} is not an IP address"))
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') && !host.starts_with('[') {
        return None; // a bare IPv6 address, no port
    }
    let port = port.parse().ok()?;
    Some((host.trim_matches(|c| c == '[' || c == ']').to_owned(), port))
}

/// A count key where 0 means "no limit"; absent, the flag's value.
fn opt_limit(
    cfg: &Map<String, Value>,
    key: &str,
    default: Option<usize>,
) -> Result<Option<usize>, String> {
    Ok(match opt_number(cfg, key)? {
        None => default,
        Some(0.0) => None,
        Some(n) => Some(n as usize),
    })
}

fn opt_str<'a>(cfg: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("Proxy.Config.{key} must be a string, got {other}")),
    }
}

/// A non-negative integer from a JSON number or numeric string (the agent sends either).
fn opt_number(cfg: &Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    let n = match cfg.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if n.is_finite() && n >= 0.0 && n.fract() == 0.0 => Ok(Some(n)),
        _ => Err(format!(
            "{key} must be a non-negative integer, got {}",
            cfg[key]
        )),
    }
}

fn opt_u16(cfg: &Map<String, Value>, key: &str) -> Result<Option<u16>, String> {
    match opt_number(cfg, key)? {
        None => Ok(None),
        Some(n) if n <= f64::from(u16::MAX) => Ok(Some(n as u16)),
        Some(n) => Err(format!("{key} {n} is not a port")),
    }
}

/// An optional limit in milliseconds: absent keeps `default`, 0 turns it off.
fn optional_ms(
    cfg: &Map<String, Value>,
    key: &str,
    default: Option<Duration>,
) -> Result<Option<Duration>, String> {
    match opt_number(cfg, key)? {
        None => Ok(default),
        Some(0.0) => Ok(None),
        Some(_) => duration_ms(cfg, key, Duration::ZERO).map(Some),
    }
}

fn duration_ms(cfg: &Map<String, Value>, key: &str, default: Duration) -> Result<Duration, String> {
    match opt_number(cfg, key)? {
        None => Ok(default),
        Some(0.0) => Err(format!("{key} must be greater than 0")),
        // `as` saturates: absurdly large values become the longest representable duration.
        Some(ms) => Ok(Duration::from_millis(ms as u64)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listener_host_names_resolve_once_before_parsing_and_ips_stay() {
        let mut j = sidecar();
        j["Address"] = "localhost".into();
        j["Proxy"]["Config"]["bind_address"] = "127.0.0.2".into();
        j["Proxy"]["Upstreams"][0]["LocalBindAddress"] = "localhost".into();
        let names = HostNames::default();
        let mut svc = registration(j.clone());
        let notes = names.resolve(&mut svc).await.unwrap();
        assert_eq!(svc.address, "127.0.0.1", "the IPv4 address of localhost");
        assert_eq!(
            svc.proxy.as_ref().unwrap().config["bind_address"],
            "127.0.0.2"
        );
        let upstream = &svc.proxy.as_ref().unwrap().upstreams[0];
        assert_eq!(upstream.local_bind_address, "127.0.0.1");
        assert_eq!(
            notes.len(),
            1,
            "one name, resolved once for both fields: {notes:?}"
        );
        assert!(notes[0].contains("Address \"localhost\" resolved to 127.0.0.1"));
        ProxyConfig::from_api(&svc, &Defaults::default()).unwrap();
        // Read again (the same registration): the names keep their addresses, no new notes.
        let mut again = registration(j);
        assert_eq!(
            names.resolve(&mut again).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(again.address, "127.0.0.1");
    }

    fn registration(json: serde_json::Value) -> api::AgentService {
        serde_json::from_value(json).unwrap()
    }

    fn sidecar() -> serde_json::Value {
        serde_json::json!({
            "Kind": "connect-proxy", "ID": "web-sidecar-proxy", "Service": "web-sidecar-proxy",
            "Port": 21000, "Address": "", "Datacenter": "dc1",
            "Proxy": {
                "DestinationServiceName": "web", "DestinationServiceID": "web",
                "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
                "Config": {"local_connect_timeout_ms": 2000, "handshake_timeout_ms": "5000"},
                "Upstreams": [
                    {"DestinationType": "service", "DestinationName": "db",
                     "LocalBindAddress": "127.0.0.1", "LocalBindPort": 9191,
                     "Config": {"connect_timeout_ms": 3000.0}},
                    {"DestinationType": "prepared_query", "DestinationName": "db-geo",
                     "LocalBindPort": 9192, "Datacenter": "dc2"},
                    {"DestinationName": "tp", "CentrallyConfigured": true}
                ]
            }
        })
    }

    #[test]
    fn maps_a_sidecar_registration() {
        let c = ProxyConfig::from_api(&registration(sidecar()), &Defaults::default()).unwrap();
        let cfg = c.config;
        assert_eq!(cfg.service, "web");
        assert_eq!(cfg.datacenter, "dc1");
        let public = cfg.public.unwrap();
        assert_eq!(public.bind, "0.0.0.0:21000".parse().unwrap());
        assert_eq!(
            public.local_app,
            LocalApp::Tcp {
                host: "127.0.0.1".into(),
                port: 8080
            }
        );
        assert_eq!(public.local_connect_timeout, Duration::from_millis(2000));
        assert_eq!(
            public.handshake_timeout,
            Duration::from_millis(5000),
            "numeric strings accepted"
        );
        assert_eq!(cfg.upstreams.len(), 2);
        assert_eq!(
            cfg.upstreams[0].destination,
            Destination::Service("db".into())
        );
        assert_eq!(
            cfg.upstreams[0].bind,
            BindAddr::Tcp("127.0.0.1:9191".parse().unwrap())
        );
        assert_eq!(
            cfg.upstreams[0].connect_timeout,
            Duration::from_millis(3000)
        );
        assert_eq!(
            cfg.upstreams[1].destination,
            Destination::PreparedQuery("db-geo".into())
        );
        assert_eq!(cfg.upstreams[1].datacenter.as_deref(), Some("dc2"));
        assert_eq!(cfg.upstreams[1].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(c.notes.iter().any(|n| n.contains("centrally configured")));
    }

    #[test]
    fn a_new_destination_service_cannot_be_taken_on_live() {
        let running = ProxyConfig::from_api(&registration(sidecar()), &Defaults::default())
            .unwrap()
            .config;
        let mut moved = running.clone();
        moved.public = None;
        assert_eq!(running.can_become(&moved), Ok(()), "listeners may change");
        let mut other = running.clone();
        other.service = "secret".into();
        let err = running.can_become(&other).unwrap_err();
        assert!(err.contains("restart the proxy"), "{err}");
        let mut same = running.clone();
        same.service = running.service.to_uppercase();
        assert_eq!(
            running.can_become(&same),
            Ok(()),
            "service names ignore case"
        );
        let mut elsewhere = running.clone();
        elsewhere.datacenter = "dc9".into();
        assert!(running.can_become(&elsewhere).is_err());
    }

    #[test]
    fn long_limits_are_accepted() {
        let mut j = sidecar();
        j["Proxy"]["Config"]["max_conn_lifetime_ms"] = 172_800_000u64.into();
        let cfg = ProxyConfig::from_api(&registration(j), &Defaults::default())
            .unwrap()
            .config;
        assert_eq!(
            cfg.public.unwrap().max_conn_lifetime,
            Some(Duration::from_secs(2 * 86_400))
        );
    }

    #[test]
    fn limit_keys_override_the_flag_defaults() {
        let defaults = Defaults {
            reauthorize_interval: Some(Duration::from_secs(60)),
            max_conn_lifetime: Some(Duration::from_secs(3600)),
            idle_timeout: Some(Duration::from_secs(300)),
            max_inbound_connections: Some(1000),
            max_inbound_connection_rate: Some(50),
        };
        let cfg = ProxyConfig::from_api(&registration(sidecar()), &defaults)
            .unwrap()
            .config;
        let public = cfg.public.clone().unwrap();
        assert_eq!(cfg.reauthorize_interval, defaults.reauthorize_interval);
        assert_eq!(public.max_conn_lifetime, defaults.max_conn_lifetime);
        assert_eq!(public.idle_timeout, defaults.idle_timeout);
        assert_eq!(public.max_connections, Some(1000));
        assert_eq!(public.max_connection_rate, Some(50));

        let mut j = sidecar();
        j["Proxy"]["Config"]["reauthorize_interval_ms"] = 0.into();
        j["Proxy"]["Config"]["max_conn_lifetime_ms"] = 5000.into();
        j["Proxy"]["Config"]["idle_timeout_ms"] = "0".into();
        j["Proxy"]["Config"]["max_inbound_connections"] = 10.into();
        j["Proxy"]["Config"]["max_inbound_connection_rate"] = 0.into();
        let cfg = ProxyConfig::from_api(&registration(j), &defaults)
            .unwrap()
            .config;
        let public = cfg.public.unwrap();
        assert_eq!(cfg.reauthorize_interval, None, "0 turns it off");
        assert_eq!(public.max_conn_lifetime, Some(Duration::from_secs(5)));
        assert_eq!(public.idle_timeout, None);
        assert_eq!(public.max_connections, Some(10));
        assert_eq!(public.max_connection_rate, None, "0 turns it off");
    }

    #[test]
    fn config_bind_keys_override_the_registration() {
        let mut j = sidecar();
        j["Address"] = "10.0.0.5".into();
        j["Proxy"]["Config"]["bind_address"] = "127.0.0.2".into();
        j["Proxy"]["Config"]["bind_port"] = 22000.into();
        j["Proxy"]["Config"]["local_service_address"] = "127.0.0.3:9000".into();
        let cfg = ProxyConfig::from_api(&registration(j), &Defaults::default())
            .unwrap()
            .config;
        let public = cfg.public.unwrap();
        assert_eq!(public.bind, "127.0.0.2:22000".parse().unwrap());
        assert_eq!(
            public.local_app,
            LocalApp::Tcp {
                host: "127.0.0.3".into(),
                port: 9000
            }
        );
    }

    #[test]
    fn registration_address_used_without_config_keys() {
        let mut j = sidecar();
        j["Address"] = "127.0.0.9".into();
        let cfg = ProxyConfig::from_api(&registration(j), &Defaults::default())
            .unwrap()
            .config;
        assert_eq!(cfg.public.unwrap().bind, "127.0.0.9:21000".parse().unwrap());
    }

    #[test]
    fn local_service_address_host_only_takes_the_registration_port() {
        let mut j = sidecar();
        j["Proxy"]["Config"]["local_service_address"] = "localhost".into();
        let cfg = ProxyConfig::from_api(&registration(j), &Defaults::default())
            .unwrap()
            .config;
        assert_eq!(
            cfg.public.unwrap().local_app,
            LocalApp::Tcp {
                host: "localhost".into(),
                port: 8080
            }
        );
    }

    #[test]
    fn upstreams_in_peers_or_other_namespaces_are_refused() {
        for (field, value, ok) in [
            ("DestinationPeer", "cluster-02", false),
            ("DestinationNamespace", "team", false),
            ("DestinationPartition", "eu", false),
            ("DestinationNamespace", "default", true),
            ("DestinationPartition", "default", true),
        ] {
            let mut j = sidecar();
            j["Proxy"]["Upstreams"][0][field] = value.into();
            let r = ProxyConfig::from_api(&registration(j), &Defaults::default());
            match r {
                Ok(_) => assert!(ok, "{field}={value} should be refused"),
                Err(e) => {
                    assert!(!ok, "{field}={value}: {e}");
                    assert!(e.contains(field) && e.contains("not supported"), "{e}");
                }
            }
        }
    }

    #[test]
    fn socket_modes_are_octal_permission_bits() {
        assert_eq!(socket_mode(""), Ok(None));
        assert_eq!(socket_mode("0600"), Ok(Some(0o600)));
        assert_eq!(socket_mode("660"), Ok(Some(0o660)));
        for bad in ["rw", "0800", "01777", "-1", "0x600"] {
            assert!(socket_mode(bad).is_err(), "{bad:?}");
        }
        let mut j = sidecar();
        j["Proxy"]["Upstreams"][0]["LocalBindSocketPath"] = "/run/db.sock".into();
        j["Proxy"]["Upstreams"][0]["LocalBindSocketMode"] = "0600".into();
        let cfg = ProxyConfig::from_api(&registration(j), &Defaults::default())
            .unwrap()
            .config;
        assert_eq!(cfg.upstreams[0].socket_mode, Some(0o600));
    }

    #[test]
    fn unix_socket_local_app_and_upstream() {
        let mut j = sidecar();
        j["Proxy"]["LocalServicePort"] = 0.into();
        j["Proxy"]["LocalServiceSocketPath"] = "/run/web.sock".into();
        j["Proxy"]["Upstreams"][0]["LocalBindSocketPath"] = "/run/db.sock".into();
        let cfg = ProxyConfig::from_api(&registration(j), &Defaults::default())
            .unwrap()
            .config;
        assert_eq!(
            cfg.public.unwrap().local_app,
            LocalApp::Unix("/run/web.sock".into())
        );
        assert_eq!(cfg.upstreams[0].bind, BindAddr::Unix("/run/db.sock".into()));
    }

    #[test]
    fn no_local_service_means_no_public_listener() {
        // Consul requires a port even on the sidecar of a service that only calls others.
        let mut j = sidecar();
        j["Proxy"]["LocalServicePort"] = 0.into();
        let c = ProxyConfig::from_api(&registration(j), &Defaults::default()).unwrap();
        assert!(c.config.public.is_none());
        assert_eq!(c.config.upstreams.len(), 2, "upstreams still served");
        assert!(
            c.notes.iter().any(|n| n.contains("no local service")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn port_zero_means_no_public_listener() {
        let mut j = sidecar();
        j["Port"] = 0.into();
        let c = ProxyConfig::from_api(&registration(j), &Defaults::default()).unwrap();
        assert!(c.config.public.is_none());
        assert!(c.notes.iter().any(|n| n.contains("no public port")));
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        type Mutation = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|j| j["Kind"] = "".into()), "not a connect-proxy"),
            (
                Box::new(|j| j["Proxy"]["DestinationServiceName"] = "".into()),
                "DestinationServiceName",
            ),
            (
                Box::new(|j| j["Address"] = "my-host".into()),
                "not an IP address",
            ),
            (
                Box::new(|j| j["Proxy"]["Config"]["handshake_timeout_ms"] = "soon".into()),
                "handshake_timeout_ms",
            ),
            (
                Box::new(|j| j["Proxy"]["Config"]["handshake_timeout_ms"] = (-5).into()),
                "non-negative",
            ),
            (
                Box::new(|j| j["Proxy"]["Config"]["local_connect_timeout_ms"] = 0.into()),
                "greater than 0",
            ),
            (
                Box::new(|j| j["Proxy"]["Config"]["bind_port"] = 70000.into()),
                "not a port",
            ),
            (
                Box::new(|j| j["Proxy"]["Upstreams"][0]["DestinationType"] = "mesh".into()),
                "DestinationType",
            ),
            (
                Box::new(|j| j["Proxy"]["Upstreams"][1]["LocalBindPort"] = 9191.into()),
                "two listeners",
            ),
        ];
        for (mutate, needle) in cases {
            let mut j = sidecar();
            mutate(&mut j);
            let err = ProxyConfig::from_api(&registration(j), &Defaults::default()).unwrap_err();
            assert!(err.contains(needle), "expected {needle:?} in {err:?}");
        }
    }

    #[test]
    fn listeners_conflict_on_one_address_or_under_a_wildcard_on_the_same_port() {
        let tcp = |s: &str| BindAddr::Tcp(s.parse().unwrap());
        assert!(binds_conflict(&tcp("127.0.0.1:80"), &tcp("127.0.0.1:80")));
        assert!(binds_conflict(&tcp("0.0.0.0:80"), &tcp("127.0.0.1:80")));
        assert!(binds_conflict(&tcp("127.0.0.1:80"), &tcp("[::]:80")));
        assert!(!binds_conflict(&tcp("127.0.0.1:80"), &tcp("127.0.0.2:80")));
        assert!(!binds_conflict(&tcp("0.0.0.0:80"), &tcp("0.0.0.0:81")));
        assert!(!binds_conflict(&tcp("0.0.0.0:80"), &tcp("[::1]:80")));
        let unix = |p: &str| BindAddr::Unix(p.into());
        assert!(binds_conflict(&unix("/a"), &unix("/a")));
        assert!(!binds_conflict(&unix("/a"), &tcp("0.0.0.0:80")));
    }
}
