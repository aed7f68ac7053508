//! Command-line flags as the user typed them, Consul style: single-dash long flags
//! (`-proxy-id web`), with the double-dash form accepted too. Validation and environment
//! variables are [`crate::config`]'s job.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};

const ENV_HELP: &str = "\
Environment variables (flags win over them):
  CONSUL_HTTP_ADDR         agent address (default 127.0.0.1:8500)
  CONSUL_HTTP_TOKEN        ACL token
  CONSUL_HTTP_TOKEN_FILE   file holding the ACL token
  CONSUL_CACERT            CA file to verify the agent's HTTPS certificate
  CONSUL_CAPATH            directory of CA files
  CONSUL_CLIENT_CERT       client certificate for HTTPS to the agent
  CONSUL_CLIENT_KEY        client key for HTTPS to the agent
  CONSUL_TLS_SERVER_NAME   server name to verify the agent's certificate against
  CONSUL_HTTP_SSL          true: use HTTPS to the agent
  CONSUL_HTTP_SSL_VERIFY   false: do not verify the agent's certificate (tests only)
  CONNECT_PROXY_ID         -proxy-id, when neither -proxy-id nor -sidecar-for is given
  CONNECT_SIDECAR_FOR      -sidecar-for, likewise (CONNECT_PROXY_ID wins if both are set)

Token precedence: -token-file, -token, CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN.";

/// Raw command-line arguments.
#[derive(Clone, Debug, Default, Parser)]
#[command(
    name = "consul-proxy",
    version,
    about = "L4 sidecar proxy for the Consul service mesh (Connect)",
    after_help = ENV_HELP,
    // One of the two is required, from a flag or else from CONNECT_PROXY_ID /
    // CONNECT_SIDECAR_FOR: checked in `Config`, where flags beat the environment.
    group(clap::ArgGroup::new("target").args(["proxy_id", "sidecar_for"])),
)]
pub struct Args {
    /// ID of the connect-proxy service registration to run as.
    #[arg(long = "proxy-id", value_name = "ID")]
    pub proxy_id: Option<String>,

    /// ID of the service whose (single) sidecar proxy registration to run as.
    #[arg(long = "sidecar-for", value_name = "SERVICE_ID")]
    pub sidecar_for: Option<String>,

    /// Address of the Consul agent: host:port, http(s)://host:port or unix:///path.
    #[arg(long = "http-addr", value_name = "ADDR")]
    pub http_addr: Option<String>,

    /// ACL token to use (prefer -token-file: command lines are visible to other users).
    #[arg(
        long = "token",
        value_name = "TOKEN",
        hide_default_value = true,
        allow_hyphen_values = true
    )]
    pub token: Option<String>,

    /// File holding the ACL token; re-read when the agent reports the token unknown.
    #[arg(long = "token-file", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// CA certificate file to verify the agent's HTTPS certificate.
    #[arg(long = "ca-file", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Directory of CA certificates to verify the agent's HTTPS certificate.
    #[arg(long = "ca-path", value_name = "PATH")]
    pub ca_path: Option<PathBuf>,

    /// Client certificate for HTTPS to the agent (with -client-key).
    #[arg(long = "client-cert", value_name = "PATH")]
    pub client_cert: Option<PathBuf>,

    /// Client key for HTTPS to the agent (with -client-cert).
    #[arg(long = "client-key", value_name = "PATH")]
    pub client_key: Option<PathBuf>,

    /// Server name to use for SNI and to verify the agent's certificate.
    #[arg(long = "tls-server-name", value_name = "NAME")]
    pub tls_server_name: Option<String>,

    /// Log level: trace, debug, info, warn or error (or a tracing filter such as
    /// `consul_proxy=debug,rustls=warn`).
    #[arg(long = "log-level", value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log as JSON lines. Takes an optional value as Go's boolean flags do
    /// (`-log-json=false`), so units written for Consul's own proxy keep working.
    #[arg(
        long = "log-json",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_name = "BOOL",
        value_parser = go_bool
    )]
    pub log_json: bool,

    /// `off` relaxes the check that a peer's SPIFFE ID is in our trust domain, for CA
    /// providers that do not follow SPIFFE. Chain verification is never relaxed.
    #[arg(
        long = "spiffe-validation",
        value_name = "on|off",
        default_value = "on"
    )]
    pub spiffe_validation: String,

    /// On SIGTERM/SIGINT (and for a listener removed from the registration), how long open
    /// connections may drain before they are cut.
    #[arg(long = "drain-timeout", value_name = "DURATION", default_value = "30s")]
    pub drain_timeout: String,

    /// Also re-check every live inbound connection on this interval (0 = only when
    /// intentions, the default policy or the roots change). `Proxy.Config.reauthorize_interval_ms`
    /// overrides it.
    #[arg(
        long = "reauthorize-interval",
        value_name = "DURATION",
        default_value = "0"
    )]
    pub reauthorize_interval: String,

    /// Close inbound connections after this long, minus up to 10% jitter (0 = never).
    /// `Proxy.Config.max_conn_lifetime_ms` overrides it.
    #[arg(
        long = "max-conn-lifetime",
        value_name = "DURATION",
        default_value = "0"
    )]
    pub max_conn_lifetime: String,

    /// Threads for connections. 1 (the default) runs everything on one thread, which measured
    /// best for request/response traffic next to a busy app; N > 1 gives connections N threads
    /// of their own (each connection stays on one), for bulk transfers on idle cores.
    #[arg(long = "threads", value_name = "N", default_value = "1")]
    pub threads: String,

    /// TLS session resumption between consul-proxy instances (`on` or `off`). Only peers that
    /// negotiate consul-proxy's ALPN protocol resume; others always do a full handshake.
    #[arg(long = "tls-resumption", value_name = "on|off", default_value = "on")]
    pub tls_resumption: String,

    /// Close inbound connections that moved no byte either way for this long (0 = never).
    /// `Proxy.Config.idle_timeout_ms` overrides it.
    #[arg(long = "idle-timeout", value_name = "DURATION", default_value = "0")]
    pub idle_timeout: String,

    /// Refuse new inbound connections while this many are open (0 = no limit).
    /// `Proxy.Config.max_inbound_connections` overrides it.
    #[arg(long = "max-inbound-conns", value_name = "N", default_value = "0")]
    pub max_inbound_conns: String,

    /// Refuse new inbound connections beyond N per second, in bursts of up to N (0 = no
    /// limit). `Proxy.Config.max_inbound_connection_rate` overrides it.
    #[arg(long = "max-inbound-conn-rate", value_name = "N", default_value = "0")]
    pub max_inbound_conn_rate: String,

    /// Serve /ready, /metrics and /status on this address (plain HTTP; keep it on loopback).
    #[arg(long = "admin-addr", value_name = "HOST:PORT")]
    pub admin_addr: Option<String>,
}

impl Args {
    /// Parses the process arguments; exits with a usage error (code 2) on bad flags. Help,
    /// version and errors name flags the way they are written here, Consul's way (`-token`).
    pub fn parse_env() -> Self {
        match Args::try_parse_args(std::env::args_os()) {
            Ok(args) => args,
            Err(e) => {
                let text = consul_style(&e.render().to_string());
                if e.use_stderr() {
                    eprint!("{text}");
                } else {
                    print!("{text}");
                }
                std::process::exit(e.exit_code());
            }
        }
    }

    /// Parses the given arguments (the first is the program name).
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Args::try_parse_from(normalize(args))
    }
}

/// Rewrites clap's `--flag` into Consul's `-flag` in a help or error text. A bare `--` (the end
/// of flags) and `-h` are left alone.
pub fn consul_style(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("--") {
        let (before, after) = rest.split_at(at);
        out.push_str(before);
        let starts_flag = after[2..].starts_with(|c: char| c.is_ascii_lowercase());
        let after_word = before.is_empty() || before.ends_with([' ', '\'', '[', '(', '`', '\n']);
        out.push_str(if starts_flag && after_word { "-" } else { "--" });
        rest = &after[2..];
    }
    out.push_str(rest);
    out
}

/// A boolean as Go's `strconv.ParseBool` (and so Consul's flags) accepts it.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// Rewrites Consul-style `-flag` / `-flag=value` into clap's `--flag` form.
///
/// Only names of real long flags are rewritten, and never an argument that is the value of the
/// previous flag, so `-token -abc` keeps `-abc` as the token. Everything after `--` is left as is.
pub fn normalize<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let cmd = Args::command();
    let long_takes_value = |name: &str| -> Option<bool> {
        match name {
            "help" | "version" => Some(false),
            _ => cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                // A flag whose value must follow `=` never takes the next argument.
                .map(|a| a.get_action().takes_values() && !a.is_require_equals_set()),
        }
    };
    let mut out = Vec::new();
    let mut expecting_value = false;
    let mut passthrough = false;
    for (i, arg) in args.into_iter().map(Into::into).enumerate() {
        if i == 0 || passthrough || expecting_value {
            expecting_value = false;
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if s == "--" {
            passthrough = true;
            out.push(arg);
            continue;
        }
        let name = s.trim_start_matches('-');
        let (name, has_inline_value) = match name.split_once('=') {
            Some((n, _)) => (n, true),
            None => (name, false),
        };
        let dashes = s.len() - s.trim_start_matches('-').len();
        match long_takes_value(name) {
            Some(takes) if dashes == 1 || dashes == 2 => {
                expecting_value = takes && !has_inline_value;
                let rewritten = if dashes == 1 {
                    format!("-{s}")
                } else {
                    s.to_owned()
                };
                out.push(rewritten.into());
            }
            // An unknown Consul-style flag: spelled as a long one, so that the usage error
            // names it (`-bogus` would otherwise read as the short flags `-b -o ...`).
            None if dashes == 1 && name.len() > 1 => out.push(format!("-{s}").into()),
            _ => out.push(arg),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_args(std::iter::once("consul-proxy").chain(args.iter().copied()))
    }

    #[test]
    fn an_unknown_single_dash_flag_is_named_in_the_error() {
        let err = Args::try_parse_args(["consul-proxy", "-bogus", "1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(err.to_string().contains("'--bogus'"), "{err}");
        // Short help stays a short flag.
        let help = Args::try_parse_args(["consul-proxy", "-h"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn single_and_double_dash_flags_are_equivalent() {
        let a = parse(&["-proxy-id", "web-sidecar-proxy", "-http-addr=127.0.0.1:1"]).unwrap();
        let b = parse(&[
            "--proxy-id",
            "web-sidecar-proxy",
            "--http-addr",
            "127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(a.proxy_id.as_deref(), Some("web-sidecar-proxy"));
        assert_eq!(a.proxy_id, b.proxy_id);
        assert_eq!(a.http_addr, b.http_addr);
    }

    #[test]
    fn a_value_that_looks_like_a_flag_stays_a_value() {
        let a = parse(&["-sidecar-for", "web", "-token", "-log-json"]).unwrap();
        assert_eq!(a.token.as_deref(), Some("-log-json"));
        assert!(!a.log_json);
    }

    #[test]
    fn log_json_takes_an_optional_go_boolean() {
        assert!(parse(&["-log-json", "-proxy-id", "a"]).unwrap().log_json);
        let a = parse(&["-log-json", "-proxy-id", "a"]).unwrap();
        assert_eq!(
            a.proxy_id.as_deref(),
            Some("a"),
            "the next flag is not its value"
        );
        assert!(parse(&["-log-json=true"]).unwrap().log_json);
        assert!(parse(&["--log-json=T"]).unwrap().log_json);
        assert!(!parse(&["-log-json=false"]).unwrap().log_json);
        assert!(!parse(&["-proxy-id", "a"]).unwrap().log_json);
        assert_eq!(parse(&["-log-json=yes"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn both_targets_are_a_usage_error() {
        // Neither is decided in `Config`, which may find one in the environment.
        let both = parse(&["-proxy-id", "a", "-sidecar-for", "b"]).unwrap_err();
        assert_eq!(both.exit_code(), 2);
        assert!(parse(&["-http-addr", "x:1"]).is_ok());
    }

    #[test]
    fn unknown_flags_are_usage_errors() {
        let err = parse(&["-proxy-id", "a", "-bogus"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn help_and_errors_name_flags_with_one_dash() {
        assert_eq!(
            consul_style("      --proxy-id <ID>\n  [--log-json[=<BOOL>]] '--bogus' `--x`"),
            "      -proxy-id <ID>\n  [-log-json[=<BOOL>]] '-bogus' `-x`"
        );
        // A bare `--` (the end of flags) and dashes inside words stay as they are.
        assert_eq!(consul_style("a--b -- x"), "a--b -- x");
        let help = Args::command().render_long_help().to_string();
        let ours = consul_style(&help);
        assert!(ours.contains("  -proxy-id <ID>"), "{ours}");
        assert!(!ours.contains("--proxy-id"), "{ours}");
    }

    #[test]
    fn help_and_version_work_single_dash() {
        assert_eq!(
            parse(&["-help"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayHelp
        );
        assert_eq!(
            parse(&["-version"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion
        );
    }
}
