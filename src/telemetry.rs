//! Logging setup: a tracing filter and text or JSON lines on stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(log: &LogConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&log.filter).map_err(|e| format!("invalid -log-level: {e}"))?;
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = if log.json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| e.to_string())
}
