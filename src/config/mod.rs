//! The validated process configuration, built once from [`crate::cli::Args`] and the
//! environment. Flags win over environment variables. Secrets are wrapped so they never print.

mod agent;
mod duration;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use agent::{AgentAddr, AgentConfig, AgentTls, Scheme, Secret, TokenSource, Transport};
pub use duration::parse_duration;

use crate::cli::Args;
use crate::proxy_config::Defaults;
use crate::spiffe::TrustDomainPolicy;

/// Which registration to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `-proxy-id`: the connect-proxy registration ID.
    ProxyId(String),
    /// `-sidecar-for`: the ID of the service whose sidecar this is.
    SidecarFor(String),
}

/// Logging settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter directive.
    pub filter: String,
    /// JSON lines instead of text.
    pub json: bool,
}

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which registration to run as.
    pub target: Target,
    /// How to reach the agent.
    pub agent: AgentConfig,
    /// Logging.
    pub log: LogConfig,
    /// Whether peers must be in our trust domain.
    pub trust_domain: TrustDomainPolicy,
    /// How long connections may drain on shutdown.
    pub drain_timeout: Duration,
    /// Limits that `Proxy.Config` keys may override.
    pub defaults: Defaults,
    /// Where to serve the admin endpoint, if anywhere.
    pub admin_addr: Option<SocketAddr>,
    /// TLS session resumption between consul-proxy peers.
    pub tls_resumption: bool,
    /// Runtime worker threads (1 = single-threaded).
    pub threads: usize,
}

/// A configuration error: printed to the user as is, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad agent address.
    #[error("invalid agent address {0}")]
    AgentAddr(String),
    /// A bad environment variable.
    #[error("invalid environment variable {name}: {reason}")]
    Env {
        /// The variable.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Neither `-proxy-id` nor `-sidecar-for`, and neither `CONNECT_PROXY_ID` nor
    /// `CONNECT_SIDECAR_FOR`.
    #[error(
        "nothing to run as: give -proxy-id ID or -sidecar-for SERVICE_ID (or set CONNECT_PROXY_ID or CONNECT_SIDECAR_FOR)"
    )]
    MissingTarget,
    /// A bad flag value or combination.
    #[error("invalid flag -{flag}: {reason}")]
    Flag {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Builds the configuration from flags and an environment lookup (`std::env::var` in the
    /// binary, a map in tests). An empty environment variable counts as unset, as in Consul.
    pub fn from_args(
        args: Args,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        // A flag of either kind first (flags beat the environment; Consul's built-in proxy
        // instead lets CONNECT_PROXY_ID beat a -sidecar-for flag), else CONNECT_PROXY_ID, else
        // CONNECT_SIDECAR_FOR (as in Consul when both are set).
        let target = match (args.proxy_id, args.sidecar_for) {
            (Some(id), None) => Target::ProxyId(non_empty("proxy-id", id)?),
            (None, Some(id)) => Target::SidecarFor(non_empty("sidecar-for", id)?),
            (None, None) => match (env("CONNECT_PROXY_ID"), env("CONNECT_SIDECAR_FOR")) {
                (Some(id), _) => Target::ProxyId(id),
                (None, Some(id)) => Target::SidecarFor(id),
                (None, None) => return Err(ConfigError::MissingTarget),
            },
            (Some(_), Some(_)) => {
                return Err(ConfigError::Flag {
                    flag: "proxy-id",
                    reason: "give -proxy-id or -sidecar-for, not both".into(),
                });
            }
        };

        let force_https = match env("CONSUL_HTTP_SSL") {
            Some(v) => agent::parse_go_bool("CONSUL_HTTP_SSL", &v)?,
            None => false,
        };
        let addr_raw = args
            .http_addr
            .or_else(|| env("CONSUL_HTTP_ADDR"))
            .unwrap_or_else(|| "127.0.0.1:8500".to_owned());
        let addr = AgentAddr::parse(&addr_raw, force_https)?;

        let insecure_skip_verify = match env("CONSUL_HTTP_SSL_VERIFY") {
            Some(v) => !agent::parse_go_bool("CONSUL_HTTP_SSL_VERIFY", &v)?,
            None => false,
        };
        let path = |flag: Option<PathBuf>, var: &str| flag.or_else(|| env(var).map(PathBuf::from));
        let client_cert = match (
            path(args.client_cert, "CONSUL_CLIENT_CERT"),
            path(args.client_key, "CONSUL_CLIENT_KEY"),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Flag {
                    flag: "client-cert",
                    reason: "a client certificate and a client key must be given together".into(),
                });
            }
        };
        let server_name = args
            .tls_server_name
            .or_else(|| env("CONSUL_TLS_SERVER_NAME"))
            .map(|n| strip_port(&n).to_owned());
        let tls = AgentTls {
            ca_file: path(args.ca_file, "CONSUL_CACERT"),
            ca_path: path(args.ca_path, "CONSUL_CAPATH"),
            client_cert,
            server_name,
            insecure_skip_verify,
        };

        // Consul's precedence: -token-file > -token > CONSUL_HTTP_TOKEN_FILE > CONSUL_HTTP_TOKEN.
        let token = if let Some(f) = args.token_file {
            TokenSource::File(f)
        } else if let Some(t) = args.token {
            TokenSource::Inline(Secret::new(t))
        } else if let Some(f) = env("CONSUL_HTTP_TOKEN_FILE") {
            TokenSource::File(PathBuf::from(f))
        } else if let Some(t) = env("CONSUL_HTTP_TOKEN") {
            TokenSource::Inline(Secret::new(t))
        } else {
            TokenSource::None
        };

        let trust_domain = match args.spiffe_validation.to_ascii_lowercase().as_str() {
            "on" | "true" | "strict" => TrustDomainPolicy::Enforce,
            "off" | "false" => TrustDomainPolicy::Ignore,
            other => {
                return Err(ConfigError::Flag {
                    flag: "spiffe-validation",
                    reason: format!("{other:?}: expected on or off"),
                });
            }
        };
        let duration = |flag: &'static str, raw: &str| {
            parse_duration(raw).map_err(|reason| ConfigError::Flag { flag, reason })
        };
        let optional = |flag, raw: &str| duration(flag, raw).map(|d| (!d.is_zero()).then_some(d));
        // A count where 0 means "no limit".
        let limit = |flag: &'static str, raw: &str| match raw.parse::<usize>() {
            Ok(n) => Ok((n > 0).then_some(n)),
            Err(_) => Err(ConfigError::Flag {
                flag,
                reason: format!("{raw:?}: expected a number"),
            }),
        };
        let drain_timeout = duration("drain-timeout", &args.drain_timeout)?;
        let defaults = Defaults {
            reauthorize_interval: optional("reauthorize-interval", &args.reauthorize_interval)?,
            max_conn_lifetime: optional("max-conn-lifetime", &args.max_conn_lifetime)?,
            idle_timeout: optional("idle-timeout", &args.idle_timeout)?,
            max_inbound_connections: limit("max-inbound-conns", &args.max_inbound_conns)?,
            max_inbound_connection_rate: limit(
                "max-inbound-conn-rate",
                &args.max_inbound_conn_rate,
            )?,
        };
        let tls_resumption = on_off("tls-resumption", &args.tls_resumption)?;
        let threads = match args.threads.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => n,
            _ => {
                return Err(ConfigError::Flag {
                    flag: "threads",
                    reason: format!("{:?}: expected a number from 1 to 256", args.threads),
                });
            }
        };
        let admin_addr = match &args.admin_addr {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| ConfigError::Flag {
                flag: "admin-addr",
                reason: format!("{a:?} is not an IP:port address"),
            })?),
        };

        Ok(Config {
            target,
            agent: AgentConfig { addr, tls, token },
            log: LogConfig {
                filter: log_filter(&args.log_level).map_err(|reason| ConfigError::Flag {
                    flag: "log-level",
                    reason,
                })?,
                json: args.log_json,
            },
            trust_domain,
            drain_timeout,
            defaults,
            admin_addr,
            tls_resumption,
            threads,
        })
    }
}

fn on_off(flag: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(ConfigError::Flag {
            flag,
            reason: format!("{other:?}: expected on or off"),
        }),
    }
}

fn non_empty(flag: &'static str, value: String) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::Flag {
            flag,
            reason: "must not be empty".into(),
        });
    }
    Ok(value)
}

fn strip_port(name: &str) -> &str {
    match name.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => name,
    }
}

/// A Consul log level becomes "that level for us, warnings for our dependencies"; anything
/// with `=` or `,` is taken as a raw tracing filter.
fn log_filter(level: &str) -> Result<String, String> {
    if level.contains('=') || level.contains(',') {
        return Ok(level.to_owned());
    }
    let level = match level.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "err" | "error" => "error",
        other => {
            return Err(format!(
                "{other:?}: expected trace, debug, info, warn or error"
            ));
        }
    };
    let deps = if level == "error" { "error" } else { "warn" };
    Ok(format!("{deps},consul_proxy={level}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn build(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let args =
            Args::try_parse_args(std::iter::once("consul-proxy").chain(args.iter().copied()))
                .expect("args parse");
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_args(args, &|k| env.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let c = build(&["-proxy-id", "web-sidecar-proxy"], &[]).unwrap();
        assert_eq!(c.target, Target::ProxyId("web-sidecar-proxy".into()));
        assert_eq!(
            c.agent.addr,
            AgentAddr::parse("127.0.0.1:8500", false).unwrap()
        );
        assert_eq!(c.agent.token, TokenSource::None);
        assert_eq!(c.trust_domain, TrustDomainPolicy::Enforce);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(
            c.defaults,
            Defaults::default(),
            "re-authorization timer and lifetime off"
        );
        assert_eq!(c.admin_addr, None);
        assert!(c.tls_resumption);
        assert_eq!(c.threads, 1);
        assert_eq!(c.log.filter, "warn,consul_proxy=info");
    }

    #[test]
    fn flags_beat_env() {
        let c = build(
            &[
                "-sidecar-for",
                "web",
                "-http-addr",
                "10.0.0.1:8500",
                "-ca-file",
                "/flag.pem",
            ],
            &[
                ("CONSUL_HTTP_ADDR", "10.9.9.9:8500"),
                ("CONSUL_CACERT", "/env.pem"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.agent.addr.transport,
            Transport::Tcp("10.0.0.1:8500".into())
        );
        assert_eq!(c.agent.tls.ca_file, Some(PathBuf::from("/flag.pem")));
        let c = build(
            &["-sidecar-for", "web"],
            &[("CONSUL_HTTP_ADDR", "unix:///s.sock")],
        )
        .unwrap();
        assert_eq!(c.agent.addr.transport, Transport::Unix("/s.sock".into()));
    }

    #[test]
    fn token_precedence_follows_consul() {
        let both_env = [
            ("CONSUL_HTTP_TOKEN", "env-token"),
            ("CONSUL_HTTP_TOKEN_FILE", "/env-file"),
        ];
        let c = build(
            &["-proxy-id", "p", "-token-file", "/f", "-token", "t"],
            &both_env,
        )
        .unwrap();
        assert_eq!(c.agent.token, TokenSource::File("/f".into()));
        let c = build(&["-proxy-id", "p", "-token", "t"], &both_env).unwrap();
        assert_eq!(c.agent.token, TokenSource::Inline(Secret::new("t")));
        let c = build(&["-proxy-id", "p"], &both_env).unwrap();
        assert_eq!(c.agent.token, TokenSource::File("/env-file".into()));
        let c = build(&["-proxy-id", "p"], &both_env[..1]).unwrap();
        assert_eq!(c.agent.token, TokenSource::Inline(Secret::new("env-token")));
    }

    #[test]
    fn tls_env_and_ssl_switches() {
        let c = build(
            &["-proxy-id", "p", "-tls-server-name", "consul.local:8501"],
            &[
                ("CONSUL_HTTP_SSL", "true"),
                ("CONSUL_HTTP_SSL_VERIFY", "false"),
                ("CONSUL_CLIENT_CERT", "/c.pem"),
                ("CONSUL_CLIENT_KEY", "/k.pem"),
            ],
        )
        .unwrap();
        assert_eq!(c.agent.addr.scheme, Scheme::Https);
        assert!(c.agent.tls.insecure_skip_verify);
        assert_eq!(c.agent.tls.server_name.as_deref(), Some("consul.local"));
        assert_eq!(
            c.agent.tls.client_cert,
            Some(("/c.pem".into(), "/k.pem".into()))
        );
    }

    #[test]
    fn the_target_comes_from_a_flag_else_from_connects_variables() {
        let both = [("CONNECT_PROXY_ID", "p"), ("CONNECT_SIDECAR_FOR", "s")];
        let target = |args: &[&str], env: &[(&str, &str)]| build(args, env).unwrap().target;
        assert_eq!(target(&[], &both), Target::ProxyId("p".into()));
        assert_eq!(target(&[], &both[1..]), Target::SidecarFor("s".into()));
        assert_eq!(
            target(&["-sidecar-for", "web"], &both),
            Target::SidecarFor("web".into()),
            "a flag beats both variables"
        );
        assert_eq!(
            target(&["-proxy-id", "x"], &both[1..]),
            Target::ProxyId("x".into())
        );
        let err = build(&[], &[("CONNECT_PROXY_ID", "")]).unwrap_err();
        assert!(err.to_string().contains("CONNECT_PROXY_ID"), "{err}");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case<'_>] = &[
            (&["-proxy-id", ""], &[], "-proxy-id"),
            (&["-proxy-id", "p", "-client-cert", "/c"], &[], "together"),
            (
                &["-proxy-id", "p"],
                &[("CONSUL_HTTP_SSL", "maybe")],
                "CONSUL_HTTP_SSL",
            ),
            (&["-proxy-id", "p", "-http-addr", "ftp://x"], &[], "scheme"),
            (
                &["-proxy-id", "p", "-spiffe-validation", "loose"],
                &[],
                "on or off",
            ),
            (&["-proxy-id", "p", "-drain-timeout", "10"], &[], "unit"),
            (
                &["-proxy-id", "p", "-log-level", "loud"],
                &[],
                "expected trace",
            ),
            (&["-proxy-id", "p", "-threads", "0"], &[], "-threads"),
        ];
        for (args, env, needle) in cases {
            let err = build(args, env).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn limits_and_admin_address() {
        let c = build(
            &[
                "-proxy-id",
                "p",
                "-reauthorize-interval",
                "1m",
                "-max-conn-lifetime=2h",
                "-admin-addr",
                "127.0.0.1:19000",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            c.defaults.reauthorize_interval,
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            c.defaults.max_conn_lifetime,
            Some(Duration::from_secs(7200))
        );
        assert_eq!(c.admin_addr, Some("127.0.0.1:19000".parse().unwrap()));
        let c = build(
            &[
                "-proxy-id",
                "p",
                "-idle-timeout",
                "5m",
                "-max-inbound-conns",
                "100",
                "-max-inbound-conn-rate",
                "20",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.defaults.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.defaults.max_inbound_connections, Some(100));
        assert_eq!(c.defaults.max_inbound_connection_rate, Some(20));
        let err = build(&["-proxy-id", "p", "-max-inbound-conn-rate", "fast"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-max-inbound-conn-rate"), "{err}");
        let err = build(&["-proxy-id", "p", "-max-inbound-conns", "lots"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-max-inbound-conns"), "{err}");
        let err = build(&["-proxy-id", "p", "-admin-addr", "localhost"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-admin-addr"), "{err}");
    }

    #[test]
    fn tls_resumption_off() {
        assert!(
            !build(&["-proxy-id", "p", "-tls-resumption", "off"], &[])
                .unwrap()
                .tls_resumption
        );
        let err = build(&["-proxy-id", "p", "-tls-resumption", "maybe"], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("-tls-resumption"), "{err}");
    }

    #[test]
    fn spiffe_validation_off() {
        let c = build(&["-proxy-id", "p", "-spiffe-validation=off"], &[]).unwrap();
        assert_eq!(c.trust_domain, TrustDomainPolicy::Ignore);
    }
}
