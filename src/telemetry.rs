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

/// A log line that could otherwise repeat once per connection under a flood (refusals by a
/// limit): said at once, then at most once per interval, with how many were not said since.
#[derive(Debug)]
pub struct LogGate {
    interval: std::time::Duration,
    /// When it was last said, and how many have been held back since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogGate {
    /// A gate letting one line through per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        LogGate {
            interval,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(held back since the last one)` if the line is to be said now, else `None`.
    pub fn check(&self, now: std::time::Instant) -> Option<u64> {
        // Invariant: nothing panics while holding this lock.
        let mut state = self.state.lock().expect("log gate lock");
        let (last, held) = &mut *state;
        match last {
            Some(at) if now.saturating_duration_since(*at) < self.interval => {
                *held += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_gate_says_the_first_line_then_one_per_interval_with_the_count_held_back() {
        let gate = LogGate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(gate.check(t0), Some(0));
        assert_eq!(gate.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(gate.check(t0 + Duration::from_secs(9)), None);
        assert_eq!(gate.check(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(gate.check(t0 + Duration::from_secs(11)), None);
        assert_eq!(gate.check(t0 + Duration::from_secs(30)), Some(1));
    }
}
