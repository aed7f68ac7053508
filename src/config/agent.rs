//! How to reach the local Consul agent: address forms, TLS settings and the ACL token, parsed
//! from flags and Consul's environment variables.

use std::fmt;
use std::path::PathBuf;

use super::ConfigError;

/// The agent's HTTP API endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAddr {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// TCP `host:port`, or a unix socket.
    pub transport: Transport,
    /// Reverse-proxy path prefix from `http(s)://host:port/prefix` (no trailing slash).
    pub path_prefix: String,
}

/// HTTP or HTTPS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
}

/// Where the HTTP connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `host:port` over TCP.
    Tcp(String),
    /// A unix socket path.
    Unix(PathBuf),
}

impl AgentAddr {
    /// Parses a `CONSUL_HTTP_ADDR` / `-http-addr` value: `host:port`, `http://host:port[/prefix]`,
    /// `https://host:port[/prefix]` or `unix:///path`. `force_https` (from `CONSUL_HTTP_SSL`)
    /// upgrades `http` to `https`; nothing downgrades.
    pub fn parse(raw: &str, force_https: bool) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::AgentAddr(format!("{raw:?}: {why}"));
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(bad("empty address"));
        }
        let (scheme, rest) = match raw.split_once("://") {
            Some((s, rest)) => match s.to_ascii_lowercase().as_str() {
                "http" => (Scheme::Http, rest),
                "https" => (Scheme::Https, rest),
                "unix" => {
                    if rest.is_empty() {
                        return Err(bad("unix:// needs a socket path"));
                    }
                    let scheme = if force_https {
                        Scheme::Https
                    } else {
                        Scheme::Http
                    };
                    return Ok(AgentAddr {
                        scheme,
                        transport: Transport::Unix(PathBuf::from(rest)),
                        path_prefix: String::new(),
                    });
                }
                other => return Err(bad(&format!("unknown protocol scheme {other:?}"))),
            },
            None => (Scheme::Http, raw),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(bad("missing host"));
        }
        let scheme = if force_https { Scheme::Https } else { scheme };
        // Without a port, the scheme's (80, 443), as Consul's own CLI and API client dial:
        // the same CONSUL_HTTP_ADDR reaches the same place.
        let authority = if has_port(authority) {
            authority.to_owned()
        } else {
            let default_port = match scheme {
                Scheme::Https => 443,
                Scheme::Http => 80,
            };
            format!("{authority}:{default_port}")
        };
        Ok(AgentAddr {
            scheme,
            transport: Transport::Tcp(authority),
            path_prefix: prefix.to_owned(),
        })
    }
}

impl fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        match &self.transport {
            Transport::Tcp(hp) => write!(f, "{scheme}://{hp}{}", self.path_prefix),
            Transport::Unix(p) => write!(f, "unix://{} ({scheme})", p.display()),
        }
    }
}

/// Whether `authority` already carries a port (`host:port`, `[v6]:port`).
fn has_port(authority: &str) -> bool {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.contains("]:");
    }
    authority.matches(':').count() == 1
}

/// TLS settings for HTTPS to the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentTls {
    /// CA bundle to verify the agent (`-ca-file`, `CONSUL_CACERT`).
    pub ca_file: Option<PathBuf>,
    /// Directory of CA certs (`-ca-path`, `CONSUL_CAPATH`).
    pub ca_path: Option<PathBuf>,
    /// Client cert and key, both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// SNI and verification name (`:port` stripped).
    pub server_name: Option<String>,
    /// `CONSUL_HTTP_SSL_VERIFY=false`: skip verification (tests only).
    pub insecure_skip_verify: bool,
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the ACL token comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: the agent's default token applies.
    None,
    /// A token given directly.
    Inline(Secret),
    /// A file holding the token; re-read when the agent says the token is not found.
    File(PathBuf),
}

/// Everything needed to talk to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Address.
    pub addr: AgentAddr,
    /// TLS settings.
    pub tls: AgentTls,
    /// ACL token.
    pub token: TokenSource,
}

/// Go's `strconv.ParseBool`, which Consul uses for its boolean environment variables.
pub fn parse_go_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(ConfigError::Env {
            name: name.to_owned(),
            reason: format!("{value:?} is not a boolean"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(s: &str) -> Transport {
        Transport::Tcp(s.to_owned())
    }

    #[test]
    fn parses_every_address_form() {
        let a = AgentAddr::parse("127.0.0.1:8500", false).unwrap();
        assert_eq!(
            (a.scheme, a.transport),
            (Scheme::Http, tcp("127.0.0.1:8500"))
        );

        let a = AgentAddr::parse("https://consul.local:8501/prefix/", false).unwrap();
        assert_eq!(a.scheme, Scheme::Https);
        assert_eq!(a.transport, tcp("consul.local:8501"));
        assert_eq!(a.path_prefix, "/prefix");

        let a = AgentAddr::parse("unix:///run/consul/http.sock", false).unwrap();
        assert_eq!(a.transport, Transport::Unix("/run/consul/http.sock".into()));

        let a = AgentAddr::parse("http://[::1]:8500", false).unwrap();
        assert_eq!(a.transport, tcp("[::1]:8500"));
    }

    #[test]
    fn without_a_port_the_schemes_port_is_dialled_as_by_consuls_cli() {
        for (raw, force_https, expected) in [
            ("http://localhost", false, "localhost:80"),
            ("127.0.0.1", false, "127.0.0.1:80"),
            ("https://127.0.0.1/prefix", false, "127.0.0.1:443"),
            ("127.0.0.1", true, "127.0.0.1:443"),
            ("[::1]", false, "[::1]:80"),
        ] {
            let a = AgentAddr::parse(raw, force_https).unwrap();
            assert_eq!(
                a.transport,
                tcp(expected),
                "{raw} (https forced: {force_https})"
            );
        }
    }

    #[test]
    fn ssl_env_upgrades_but_never_downgrades() {
        assert_eq!(
            AgentAddr::parse("http://h:1", true).unwrap().scheme,
            Scheme::Https
        );
        assert_eq!(AgentAddr::parse("h:1", true).unwrap().scheme, Scheme::Https);
        assert_eq!(
            AgentAddr::parse("https://h:1", false).unwrap().scheme,
            Scheme::Https
        );
    }

    #[test]
    fn rejects_unknown_schemes_and_empty_values() {
        for bad in ["ftp://h:1", "", "http://", "unix://"] {
            let err = AgentAddr::parse(bad, false).unwrap_err();
            assert!(matches!(err, ConfigError::AgentAddr(_)), "{bad}: {err}");
        }
        let err = AgentAddr::parse("ftp://h:1", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown protocol scheme"), "{err}");
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("s3cr3t");
        assert!(!format!("{s:?}").contains("s3cr3t"));
        let t = TokenSource::Inline(s);
        assert!(!format!("{t:?}").contains("s3cr3t"));
    }

    #[test]
    fn go_bools() {
        assert!(parse_go_bool("X", "True").unwrap());
        assert!(!parse_go_bool("X", "0").unwrap());
        assert!(parse_go_bool("X", "yes").is_err());
    }
}
