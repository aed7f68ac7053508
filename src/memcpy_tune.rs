//! Keeps glibc's `memcpy` off `rep movsb` for the copies on our data path, on AMD CPUs.
//!
//! glibc (2.36 on this project's machines) copies blocks above 2 KiB with `rep movsb` when the
//! CPU advertises ERMS/FSRM. On AMD EPYC that instruction is up to 25 times slower for some
//! relative alignments of source and destination: measured on this project's machine, a
//! 16 KiB copy ran at 3 GB/s when source and destination were 5 or 11 bytes apart modulo 16,
//! against 65-100 GB/s with the vector loop glibc uses below the threshold. rustls copies every
//! decrypted record (whose payload sits 5 bytes after its header) into a fresh 16-byte aligned
//! buffer, which is that case: that one copy was 29% of the receiving proxy's CPU in bulk
//! transfers (`BENCHMARKS.md`).
//!
//! glibc reads its tunables only when a process starts, so the fix is to start again: on an AMD
//! CPU, unless `GLIBC_TUNABLES` already sets the threshold (the operator's choice wins, which
//! is also how to opt out), the process re-executes itself once with the threshold raised. The
//! PID, arguments and the rest of the environment stay the same.

/// The glibc tunable that decides from which size `memcpy` uses `rep movsb`.
pub const TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// Our value: 16 MiB, above any copy the proxy makes.
pub const THRESHOLD: &str = "0x1000000";

/// The `GLIBC_TUNABLES` value to run with, given the current one, or `None` when it already
/// sets the threshold (to any value).
pub fn tunables_with_threshold(current: Option<&str>) -> Option<String> {
    let ours = format!("{TUNABLE}={THRESHOLD}");
    match current.map(str::trim) {
        None | Some("") => Some(ours),
        Some(cur)
            if cur
                .split(':')
                .any(|item| item.split('=').next() == Some(TUNABLE)) =>
        {
            None
        }
        Some(cur) => Some(format!("{cur}:{ours}")),
    }
}

/// Whether `/proc/cpuinfo` text describes an AMD CPU.
pub fn is_amd(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .and_then(|rest| rest.split(':').nth(1))
        .is_some_and(|v| v.trim() == "AuthenticAMD")
}

/// Set for the re-executed process, so that it never re-executes again whatever glibc leaves
/// of `GLIBC_TUNABLES` (in secure mode it erases this tunable). It stays in the environment
/// (removing it needs `unsafe`, which this crate forbids); the proxy starts no child process.
pub const MARKER: &str = "CONSUL_PROXY_REEXECUTED";

/// `AT_SECURE` in the auxiliary vector: set for setuid binaries, file capabilities and some
/// security-module transitions. glibc then ignores (and erases) this tunable.
const AT_SECURE: u64 = 23;

/// Whether the auxiliary vector (`/proc/self/auxv`: pairs of native-endian 64-bit words, type
/// then value) says the process runs in secure mode.
pub fn is_secure(auxv: &[u8]) -> bool {
    auxv.chunks_exact(16).any(|entry| {
        let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        word(&entry[..8]) == AT_SECURE && word(&entry[8..]) != 0
    })
}

/// Whether an executable path is glibc's dynamic loader (`ld-linux-x86-64.so.2`, `ld.so`).
pub fn is_dynamic_loader(path: &std::path::Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("ld-linux")
            || n.starts_with("ld.so")
            || (n.starts_with("ld-") && n.contains(".so"))
    })
}

/// Re-executes the process with the threshold raised when it should (an AMD CPU, the
/// threshold not set yet, not re-executed already, not in glibc's secure mode, where it
/// ignores tunables). Returns only when nothing was to be done (`Ok`) or the re-exec failed
/// (`Err`; the process then simply runs with glibc's defaults).
///
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
pub fn reexec_if_needed() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;

    if std::env::var_os(MARKER).is_some() {
        return Ok(());
    }
    let current = std::env::var_os("GLIBC_TUNABLES");
    let current = match current.as_deref().map(|v| v.to_str()) {
        None => None,
        Some(Some(v)) => Some(v),
        // Not UTF-8: not ours to rewrite.
        Some(None) => return Ok(()),
    };
    let Some(tunables) = tunables_with_threshold(current) else {
        return Ok(());
    };
    // Unreadable (a sandbox hiding it): treated as "not AMD", nothing to tune.
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return Ok(());
    };
    if !is_amd(&cpuinfo) {
        return Ok(());
    }
    // Started through the dynamic loader (`ld-linux-x86-64.so.2 consul-proxy ...`):
    // `/proc/self/exe` is the loader, which would take our first flag for the program.
    match std::fs::read_link("/proc/self/exe") {
        Ok(exe) if !is_dynamic_loader(&exe) => {}
        _ => return Ok(()),
    }
    // Unreadable (no /proc): the re-exec could not work either.
    match std::fs::read("/proc/self/auxv") {
        Ok(auxv) if !is_secure(&auxv) => {}
        _ => return Ok(()),
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "consul-proxy".into());
    // `/proc/self/exe` is this very binary, even if its file was replaced since it started.
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(MARKER, "1")
        .exec();
    Err(std::io::Error::new(
        error.kind(),
        format!("cannot re-execute /proc/self/exe: {error}"),
    ))
}

/// Elsewhere there is nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64")))]
pub fn reexec_if_needed() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_loader_is_recognised() {
        use std::path::Path;
        for loader in [
            "/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "/lib/ld-2.36.so",
            "/usr/bin/ld.so",
        ] {
            assert!(is_dynamic_loader(Path::new(loader)), "{loader}");
        }
        for program in [
            "/usr/bin/consul-proxy",
            "/opt/ld/consul-proxy",
            "/usr/bin/ldd",
        ] {
            assert!(!is_dynamic_loader(Path::new(program)), "{program}");
        }
    }

    #[test]
    fn the_threshold_is_added_once_and_an_operator_value_wins() {
        let ours = "glibc.cpu.x86_rep_movsb_threshold=0x1000000";
        assert_eq!(tunables_with_threshold(None).as_deref(), Some(ours));
        assert_eq!(tunables_with_threshold(Some(" ")).as_deref(), Some(ours));
        assert_eq!(
            tunables_with_threshold(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some(format!("glibc.malloc.arena_max=2:{ours}").as_str())
        );
        // Already ours (after the re-exec) or the operator's: left alone.
        assert_eq!(tunables_with_threshold(Some(ours)), None);
        assert_eq!(
            tunables_with_threshold(Some(
                "glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=0x840"
            )),
            None
        );
        // A tunable whose name merely starts the same is another one.
        assert!(tunables_with_threshold(Some("glibc.cpu.x86_rep_movsb_threshold_x=1")).is_some());
    }

    #[test]
    fn secure_mode_is_read_from_the_auxiliary_vector() {
        let entry = |t: u64, v: u64| [t.to_ne_bytes(), v.to_ne_bytes()].concat();
        let normal = [entry(6, 4096), entry(23, 0), entry(0, 0)].concat();
        let secure = [entry(6, 4096), entry(23, 1), entry(0, 0)].concat();
        assert!(!is_secure(&normal));
        assert!(is_secure(&secure));
        assert!(!is_secure(&[]));
    }

    #[test]
    fn amd_is_told_from_the_vendor_id() {
        let amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n";
        let intel = "processor\t: 0\nvendor_id\t: GenuineIntel\n";
        assert!(is_amd(amd));
        assert!(!is_amd(intel));
        assert!(!is_amd(""));
    }
}
