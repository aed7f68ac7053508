//! The typed agent client: one method per endpoint the proxy uses, the ACL token in the
//! `X-Consul-Token` header, HTTPS and unix sockets as configured.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::api;
use super::error::ConsulError;
use crate::config::{AgentConfig, Scheme, Secret, TokenSource, Transport};

/// Time allowed for a request that does not block.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed to open a connection to the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an HTTP/2 connection to the agent is pinged while requests are open on it.
const H2_PING_INTERVAL: Duration = Duration::from_secs(15);
/// How long a ping may go unanswered before the connection (and its requests) is dropped.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept open to the agent.
const MAX_IDLE_CONNECTIONS: usize = 2;
/// The `wait` sent with index-0 reads, which do not block (bar an agent fault).
const NON_BLOCKING_WAIT: Duration = Duration::from_secs(10);
/// Short requests in flight at once over HTTP/1.1 (see [`Hold::Short`]).
const SHORT_REQUESTS_HTTP1: usize = 2;

/// A value with the blocking index it was read at (`X-Consul-Index`).
#[derive(Clone, Debug, PartialEq)]
pub struct Indexed<T> {
    /// The decoded body.
    pub value: T,
    /// The `X-Consul-Index` header.
    pub index: u64,
}

/// Blocking-query parameters; `index` 0 does not block. Both are always sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// The last index seen.
    pub index: u64,
    /// How long the agent may hold the request.
    pub wait: Duration,
}

/// A cheaply clonable handle on the agent API.
#[derive(Clone)]
pub struct ConsulClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    display: String,
    token: Mutex<Option<Secret>>,
    token_file: Option<std::path::PathBuf>,
    /// Requests other than long-polls allowed in flight at once (see [`Hold`]).
    short: tokio::sync::Semaphore,
}

/// How long a request holds its connection to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    /// A blocking query: up to its `wait`. Their number is bounded by the watches.
    LongPoll,
    /// Anything else: a moment. Over HTTP/1.1 at most [`SHORT_REQUESTS_HTTP1`] at once, so
    /// that a burst (every watch's first read at start-up, polled upstreams) does not open a
    /// connection each: the agent counts connections per client address for all proxies on
    /// the host.
    Short,
}

/// One endpoint, for error messages: what was asked and which ACL permission it needs.
struct Endpoint {
    what: String,
    permission: String,
}

impl ConsulClient {
    /// Builds the client. Reads the token file and TLS files now, so that a bad path is an
    /// error at start-up; resolves the agent's host name when a TLS server name overrides it.
    pub async fn new(config: &AgentConfig) -> Result<Self, ConsulError> {
        crate::tls::install_crypto_provider();
        let token_file = match &config.token {
            TokenSource::File(p) => Some(p.clone()),
            _ => None,
        };
        let token = match &config.token {
            TokenSource::None => None,
            TokenSource::Inline(s) => Some(s.clone()),
            TokenSource::File(p) => read_token_file(p)?,
        };
        let scheme = match config.addr.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        let mut builder = reqwest::Client::builder()
            // Never follow a redirect: the ACL token header would go along to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            // Idle HTTP/1.1 connections count against the agent's per-client limit as much
            // as busy ones: keep few (short reads between long-polls reuse them).
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            // Over HTTPS the agent negotiates HTTP/2 and every watch shares one connection:
            // ping it, so that a connection that died silently fails all of them within
            // seconds rather than at the end of their long-polls.
            .http2_keep_alive_interval(H2_PING_INTERVAL)
            .http2_keep_alive_timeout(H2_PING_TIMEOUT)
            .no_proxy();
        let host = match &config.addr.transport {
            Transport::Unix(path) => {
                builder = builder.unix_socket(path.as_path());
                config
                    .tls
                    .server_name
                    .clone()
                    .unwrap_or_else(|| "localhost".to_owned())
            }
            Transport::Tcp(authority) => match &config.tls.server_name {
                Some(name) => {
                    // The URL names the server name (for SNI and verification) and the
                    // connection goes to the address given: resolved per connection, so a
                    // name that does not resolve yet (DNS not up at boot) is retried like an
                    // unreachable agent instead of failing start-up.
                    builder = builder.dns_resolver(AgentAuthority(authority.clone()));
                    // Invariant: `AgentAddr::parse` always gives a TCP authority a port.
                    let (_, port) = authority.rsplit_once(':').expect("agent port");
                    format!("{name}:{port}")
                }
                None => authority.clone(),
            },
        };
        if config.addr.scheme == Scheme::Https {
            builder = configure_tls(builder, &config.tls)?;
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        let base = Url::parse(&format!("{scheme}://{host}{}/", config.addr.path_prefix))
            .map_err(|e| ConsulError::Setup(format!("bad agent address: {e}")))?;
        // Over HTTP/2 short requests share the one connection: no bound needed.
        let short = tokio::sync::Semaphore::new(if multiplexed(&base) {
            tokio::sync::Semaphore::MAX_PERMITS
        } else {
            SHORT_REQUESTS_HTTP1
        });
        Ok(ConsulClient {
            inner: Arc::new(Inner {
                http,
                base,
                display: config.addr.to_string(),
                token: Mutex::new(token),
                token_file,
                short,
            }),
        })
    }

    /// `GET /v1/agent/service/:id`, hash-blocking. Returns the service and its content hash.
    pub async fn agent_service(
        &self,
        id: &str,
        hash: Option<&str>,
        wait: Duration,
    ) -> Result<(api::AgentService, String), ConsulError> {
        let mut url = self.url(&["v1", "agent", "service", id]);
        url.query_pairs_mut().append_pair("wait", &wait_param(wait));
        if let Some(h) = hash {
            url.query_pairs_mut().append_pair("hash", h);
        }
        let ep = Endpoint {
            what: format!("proxy registration {id:?}"),
            permission: format!("service:read on the proxy service (registration {id:?})"),
        };
        let timeout = match hash {
            Some(_) => (blocking_timeout(wait), Hold::LongPoll),
            None => (REQUEST_TIMEOUT, Hold::Short),
        };
        let (svc, headers): (api::AgentService, _) =
            self.call(Method::GET, url, &ep, timeout, None).await?;
        let hash = header_str(&headers, "X-Consul-ContentHash")
            .map(str::to_owned)
            .unwrap_or_else(|| svc.content_hash.clone());
        if hash.is_empty() {
            return Err(ConsulError::Protocol {
                endpoint: ep.what,
                what: "response carries no X-Consul-ContentHash".into(),
            });
        }
        Ok((svc, hash))
    }

    /// `GET /v1/agent/services`; also says whether the agent left out services this token may not read
    /// (`X-Consul-Results-Filtered-By-Acls: true`).
    pub async fn agent_services(
        &self,
    ) -> Result<(HashMap<String, api::AgentService>, bool), ConsulError> {
        let url = self.url(&["v1", "agent", "services"]);
        let ep = Endpoint {
            what: "service list".into(),
            permission: "service:read on the service and its sidecar".into(),
        };
        let (services, headers) = self
            .call(Method::GET, url, &ep, (REQUEST_TIMEOUT, Hold::Short), None)
            .await?;
        let filtered = headers
            .get("X-Consul-Results-Filtered-By-Acls")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        Ok((services, filtered))
    }

    /// `GET /v1/agent/connect/ca/roots`, blocking.
    pub async fn ca_roots(&self, q: Blocking) -> Result<Indexed<api::CaRoots>, ConsulError> {
        let url = self.url(&["v1", "agent", "connect", "ca", "roots"]);
        let ep = Endpoint {
            what: "Connect CA roots".into(),
            permission: "no ACL permission (is Connect enabled on the agent?)".into(),
        };
        self.blocking(url, &ep, q).await
    }

    /// `GET /v1/agent/connect/ca/leaf/:service`, blocking.
    pub async fn ca_leaf(
        &self,
        service: &str,
        q: Blocking,
    ) -> Result<Indexed<api::LeafCert>, ConsulError> {
        let url = self.url(&["v1", "agent", "connect", "ca", "leaf", service]);
        let ep = Endpoint {
            what: format!("leaf certificate for {service:?}"),
            permission: format!("service:write on {service:?}"),
        };
        self.blocking(url, &ep, q).await
    }

    /// `GET /v1/connect/intentions/match?by=destination&name=:service`, blocking, agent-cached.
    pub async fn intentions_match(
        &self,
        service: &str,
        q: Blocking,
    ) -> Result<Indexed<Vec<api::Intention>>, ConsulError> {
        let mut url = self.url(&["v1", "connect", "intentions", "match"]);
        url.query_pairs_mut()
            .append_pair("by", "destination")
            .append_pair("name", service)
            .append_key_only("cached");
        let ep = Endpoint {
            what: format!("intentions for {service:?}"),
            permission: format!(
                "intention:read on {service:?} (implied by service:read or write on it)"
            ),
        };
        let Indexed { value, index }: Indexed<api::IntentionMatch> =
            self.blocking(url, &ep, q).await?;
        let mut value = value;
        let list = value.remove(service).ok_or_else(|| ConsulError::Protocol {
            endpoint: ep.what,
            what: format!("match response has no entry for {service:?}"),
        })?;
        Ok(Indexed {
            value: list.unwrap_or_default(),
            index,
        })
    }

    /// `GET /v1/health/connect/:service?passing`, blocking, agent-cached.
    pub async fn health_connect(
        &self,
        service: &str,
        datacenter: Option<&str>,
        q: Blocking,
    ) -> Result<Indexed<Vec<api::CheckServiceNode>>, ConsulError> {
        let mut url = self.url(&["v1", "health", "connect", service]);
        url.query_pairs_mut()
            .append_key_only("passing")
            .append_key_only("cached");
        if let Some(dc) = datacenter {
            url.query_pairs_mut().append_pair("dc", dc);
        }
        let ep = Endpoint {
            what: format!("Connect endpoints of {service:?}"),
            permission: format!("service:read on {service:?} and on its proxies, and node:read"),
        };
        self.blocking(url, &ep, q).await
    }

    /// `GET /v1/query/:name/execute?connect=true` (never blocks).
    pub async fn prepared_query(
        &self,
        name: &str,
        datacenter: Option<&str>,
    ) -> Result<api::PreparedQueryResponse, ConsulError> {
        let mut url = self.url(&["v1", "query", name, "execute"]);
        // `stale`, as Consul's own proxy asks: any server may answer, so polling every
        // upstream of every proxy does not all land on the leader.
        url.query_pairs_mut()
            .append_pair("connect", "true")
            .append_key_only("stale");
        if let Some(dc) = datacenter {
            url.query_pairs_mut().append_pair("dc", dc);
        }
        let ep = Endpoint {
            what: format!("prepared query {name:?}"),
            permission: "query:read on the query and service:read on its service".into(),
        };
        Ok(self
            .call(Method::GET, url, &ep, (REQUEST_TIMEOUT, Hold::Short), None)
            .await?
            .0)
    }

    /// `POST /v1/agent/connect/authorize`.
    pub async fn authorize(
        &self,
        req: &api::AuthorizeRequest,
    ) -> Result<api::AuthorizeResponse, ConsulError> {
        let url = self.url(&["v1", "agent", "connect", "authorize"]);
        let ep = Endpoint {
            what: format!("authorize for {:?}", req.target),
            permission: format!("service:write on {:?}", req.target),
        };
        let body = serde_json::to_vec(req).map_err(|e| ConsulError::Setup(e.to_string()))?;
        Ok(self
            .call(
                Method::POST,
                url,
                &ep,
                (REQUEST_TIMEOUT, Hold::Short),
                Some(body),
            )
            .await?
            .0)
    }

    /// Whether concurrent requests share one connection to the agent: over HTTPS the agent
    /// negotiates HTTP/2. Over plain HTTP and unix sockets (HTTP/1.1) every request in
    /// flight, a long-poll included, holds a connection of its own.
    pub fn shares_connections(&self) -> bool {
        multiplexed(&self.inner.base)
    }

    /// The agent address, for messages.
    pub fn addr(&self) -> &str {
        &self.inner.display
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base.clone();
        // Invariant: the base is an http(s) URL, which always has path segments.
        url.path_segments_mut()
            .expect("http URLs can have path segments")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn blocking<T: DeserializeOwned>(
        &self,
        mut url: Url,
        ep: &Endpoint,
        q: Blocking,
    ) -> Result<Indexed<T>, ConsulError> {
        // Index 0 does not block, except through an agent fault where a non-blocking leaf
        // read after a cancelled blocking one blocked (consul#12048): a short wait keeps
        // such a read, and its timeout, short.
        let (wait, hold) = if q.index > 0 {
            (q.wait, Hold::LongPoll)
        } else {
            (q.wait.min(NON_BLOCKING_WAIT), Hold::Short)
        };
        url.query_pairs_mut()
            .append_pair("index", &q.index.to_string())
            .append_pair("wait", &wait_param(wait));
        let (value, headers) = self
            .call(Method::GET, url, ep, (blocking_timeout(wait), hold), None)
            .await?;
        let index = parse_index(header_str(&headers, "X-Consul-Index")).map_err(|what| {
            ConsulError::Protocol {
                endpoint: ep.what.clone(),
                what,
            }
        })?;
        Ok(Indexed { value, index })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        ep: &Endpoint,
        (timeout, hold): (Duration, Hold),
        body: Option<Vec<u8>>,
    ) -> Result<(T, reqwest::header::HeaderMap), ConsulError> {
        // One deadline for waiting for a slot and for the request itself.
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        let _permit = match hold {
            Hold::LongPoll => None,
            Hold::Short => Some(
                tokio::time::timeout_at(deadline, self.inner.short.acquire())
                    .await
                    .map_err(|_| ConsulError::Busy {
                        addr: self.inner.display.clone(),
                        waited: timeout,
                    })?
                    // Invariant: the semaphore is never closed.
                    .expect("never closed"),
            ),
        };
        let slot_wait = started.elapsed();
        let transport = |source: reqwest::Error| {
            if slot_starved(source.is_timeout(), slot_wait, timeout) {
                ConsulError::Busy {
                    addr: self.inner.display.clone(),
                    waited: timeout,
                }
            } else {
                ConsulError::Unreachable {
                    addr: self.inner.display.clone(),
                    source,
                }
            }
        };
        let mut retried_token = false;
        loop {
            let mut req = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
            if let Some(token) = self.token() {
                req = req.header("X-Consul-Token", token.expose());
            }
            if let Some(b) = &body {
                req = req
                    .header("Content-Type", "application/json")
                    .body(b.clone());
            }
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await.map_err(transport)?;
            if status.is_success() {
                let value =
                    serde_json::from_slice(&bytes).map_err(|source| ConsulError::Decode {
                        endpoint: ep.what.clone(),
                        source,
                    })?;
                return Ok((value, headers));
            }
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            if status == StatusCode::FORBIDDEN
                && text.contains("ACL not found")
                && !retried_token
                && self.reload_token_file()?
            {
                // The token file changed since we read it (token rotation): retry once.
                retried_token = true;
                continue;
            }
            return Err(match status {
                StatusCode::FORBIDDEN => ConsulError::Forbidden {
                    endpoint: ep.what.clone(),
                    permission: ep.permission.clone(),
                    body: text,
                },
                StatusCode::NOT_FOUND => ConsulError::NotFound {
                    endpoint: ep.what.clone(),
                    body: text,
                },
                StatusCode::TOO_MANY_REQUESTS => ConsulError::TooManyRequests {
                    endpoint: ep.what.clone(),
                    body: text,
                },
                other => ConsulError::Status {
                    endpoint: ep.what.clone(),
                    status: other.as_u16(),
                    body: text,
                },
            });
        }
    }

    fn token(&self) -> Option<Secret> {
        // Invariant: the lock is only held to clone or replace the value; it cannot be poisoned
        // by a panic in between.
        self.inner.token.lock().expect("token lock").clone()
    }

    /// Re-reads the token file; true when it holds a different token than the one in use.
    fn reload_token_file(&self) -> Result<bool, ConsulError> {
        let Some(path) = &self.inner.token_file else {
            return Ok(false);
        };
        let fresh = read_token_file(path)?;
        let mut current = self.inner.token.lock().expect("token lock");
        if *current == fresh {
            return Ok(false);
        }
        tracing::info!(path = %path.display(), "ACL token file changed; using the new token");
        *current = fresh;
        Ok(true)
    }
}

impl std::fmt::Debug for ConsulClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulClient")
            .field("addr", &self.inner.display)
            .finish()
    }
}

fn read_token_file(path: &Path) -> Result<Option<Secret>, ConsulError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConsulError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.trim();
    Ok((!token.is_empty()).then(|| Secret::new(token)))
}

fn configure_tls(
    mut builder: reqwest::ClientBuilder,
    tls: &crate::config::AgentTls,
) -> Result<reqwest::ClientBuilder, ConsulError> {
    let setup = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        ConsulError::Setup(format!("{what} {}: {e}", path.display()))
    };
    let mut roots = Vec::new();
    if let Some(file) = &tls.ca_file {
        let pem = std::fs::read(file).map_err(|e| setup("cannot read CA file", file, &e))?;
        roots.extend(
            reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| setup("bad CA file", file, &e))?,
        );
    }
    if let Some(dir) = &tls.ca_path {
        let entries = std::fs::read_dir(dir).map_err(|e| setup("cannot read CA path", dir, &e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_file() {
                continue;
            }
            let pem = std::fs::read(&path).map_err(|e| setup("cannot read CA file", &path, &e))?;
            if let Ok(certs) = reqwest::Certificate::from_pem_bundle(&pem) {
                roots.extend(certs);
            }
        }
        if roots.is_empty() {
            return Err(setup("no CA certificate found in", dir, &"empty directory"));
        }
    }
    if !roots.is_empty() {
        builder = builder.tls_certs_only(roots);
    }
    if let Some((cert, key)) = &tls.client_cert {
        let mut pem =
            std::fs::read(cert).map_err(|e| setup("cannot read client cert", cert, &e))?;
        pem.push(b'\n');
        pem.extend(std::fs::read(key).map_err(|e| setup("cannot read client key", key, &e))?);
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| setup("bad client cert/key", cert, &e))?;
        builder = builder.identity(identity);
    }
    if tls.insecure_skip_verify {
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    Ok(builder)
}

/// Consul takes Go durations; milliseconds are exact and what the Go client sends.
fn wait_param(wait: Duration) -> String {
    format!("{}ms", wait.as_millis())
}

/// A blocking call may be held for `wait` plus up to `wait/16` of server jitter, plus queueing.
pub fn blocking_timeout(wait: Duration) -> Duration {
    wait + wait / 16 + Duration::from_secs(10)
}

fn header_str<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether requests to the agent at `base` share one connection (HTTPS: the agent
/// negotiates HTTP/2).
fn multiplexed(base: &Url) -> bool {
    base.scheme() == "https"
}

/// Resolves every name the HTTP client asks for (only ever the `-tls-server-name`) to the
/// agent's own `host:port`.
struct AgentAuthority(String);

impl reqwest::dns::Resolve for AgentAuthority {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let authority = self.0.clone();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host(authority.as_str())
                .await
                .map_err(|e| format!("cannot resolve {authority}: {e}"))?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.collect::<Vec<_>>().into_iter());
            Ok(addrs)
        })
    }
}

/// The blocking index from an `X-Consul-Index` header. The agent sends it on every blocking
/// endpoint: without it the cursor would fall back to 0 and the watch would spin on
/// non-blocking reads, so a missing header is a protocol fault like a malformed one.
fn parse_index(header: Option<&str>) -> Result<u64, String> {
    match header {
        Some(v) => v
            .parse()
            .map_err(|_| format!("malformed X-Consul-Index {v:?}")),
        None => Err("response without X-Consul-Index".into()),
    }
}

/// Whether a request that failed on the transport failed for want of a prompt request slot
/// rather than for an unreachable agent: it timed out after waiting for its slot for at least
/// half its budget (the agent answers the requests ahead of it slowly; it is reachable).
fn slot_starved(timed_out: bool, slot_wait: Duration, budget: Duration) -> bool {
    timed_out && slot_wait >= budget / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_timeout_exceeds_wait_plus_jitter() {
        let wait = Duration::from_secs(300);
        assert!(blocking_timeout(wait) > wait + wait / 16);
    }

    #[test]
    fn a_timeout_after_a_long_wait_for_a_slot_is_a_busy_agent() {
        let budget = Duration::from_secs(10);
        assert!(slot_starved(true, Duration::from_secs(6), budget));
        assert!(slot_starved(true, Duration::from_secs(5), budget));
        assert!(
            !slot_starved(true, Duration::from_millis(1), budget),
            "a prompt slot, then a timeout: the agent did not answer"
        );
        assert!(
            !slot_starved(false, Duration::from_secs(9), budget),
            "a refused connection is unreachable however long the wait"
        );
    }

    #[test]
    fn index_header_is_required_and_numeric() {
        assert_eq!(parse_index(Some("42")), Ok(42));
        assert!(parse_index(Some("4x")).unwrap_err().contains("malformed"));
        assert!(
            parse_index(None)
                .unwrap_err()
                .contains("without X-Consul-Index")
        );
    }

    #[test]
    fn wait_is_sent_in_milliseconds() {
        assert_eq!(wait_param(Duration::from_secs(300)), "300000ms");
    }
}
