//! Go-style durations (`500ms`, `30s`, `1m30s`, `2h`), the form Consul users already write.

use std::time::Duration;

/// Parses a Go duration string. A bare `0` is allowed; other numbers need a unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: missing unit (use ms, s, m or h)"))?;
        if num_len == 0 {
            return Err(format!("{s:?}: expected a number"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("{s:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)")),
        };
        rest = &rest[unit_len..];
        total = Duration::try_from_secs_f64(value * seconds_per_unit)
            .ok()
            .and_then(|d| total.checked_add(d))
            .ok_or_else(|| format!("{s:?}: out of range"))?;
    }
    // Go stores durations as i64 nanoseconds (about 292 years); longer ones are errors there,
    // and here they would overflow the clock arithmetic of timers.
    if total.as_nanos() > i64::MAX as u128 {
        return Err(format!("{s:?}: out of range (at most about 292 years)"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("2562000h").unwrap(),
            Duration::from_secs(2_562_000 * 3600),
            "just under Go's limit"
        );
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        let huge = "10000000000000000000s".repeat(2); // each part fits, the sum does not
        for bad in [
            "30",
            "",
            "s",
            "10x",
            "-1s",
            "1..2s",
            "2563000h",
            huge.as_str(),
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }
}
