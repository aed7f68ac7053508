use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_consul-proxy"));
    cmd.args(args).env_remove("CONSUL_HTTP_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn bad_flags_are_usage_errors_with_exit_code_2() {
    for args in [
        &["-proxy-id", "a", "-no-such-flag"][..],
        &[][..],
        &["-proxy-id", "a", "-sidecar-for", "b"][..],
    ] {
        let out = run(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Usage"),
            "{args:?}"
        );
    }
    let out = run(&["-proxy-id", "a", "-no-such-flag"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'-no-such-flag'") && stderr.contains("'-help'"),
        "flags named as they are typed: {stderr}"
    );
}

#[test]
fn invalid_values_exit_2_with_the_flag_named() {
    let out = run(&["-proxy-id", "a", "-http-addr", "ftp://x:1"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown protocol scheme"));
    let out = run(&["-proxy-id", "a"], &[("CONSUL_HTTP_SSL", "perhaps")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONSUL_HTTP_SSL"));
}

#[test]
fn help_lists_consul_style_flags_and_never_a_token() {
    // A token from the environment and one from the command line: help must show neither
    // (clap's `env` attribute, for one, would print the variable's value next to the flag).
    let (env_token, flag_token) = ("s3cr3t-env-token", "s3cr3t-flag-token");
    let out = run(
        &["-token", flag_token, "-help"],
        &[("CONSUL_HTTP_TOKEN", env_token)],
    );
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in [
        " -proxy-id",
        " -sidecar-for",
        " -http-addr",
        " -token",
        " -token-file",
        " -ca-file",
        " -ca-path",
        " -client-cert",
        " -client-key",
        " -tls-server-name",
        " -log-level",
        " -log-json",
        " -drain-timeout",
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_SSL_VERIFY",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    assert!(
        !help.contains("--proxy-id"),
        "help spells flags Consul's way: {help}"
    );
    for secret in [env_token, flag_token] {
        assert!(
            !help.contains(secret) && !stderr.contains(secret),
            "help shows the token {secret:?}:\n{help}{stderr}"
        );
    }
}

#[test]
fn version_single_dash() {
    let out = run(&["-version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn files_named_by_flags_or_environment_that_cannot_be_read_exit_2() {
    let missing = "/nonexistent/consul-proxy-test/file";
    for (args, env) in [
        (vec!["-proxy-id", "a", "-token-file", missing], vec![]),
        (
            vec!["-proxy-id", "a", "-http-addr", "https://127.0.0.1:1"],
            vec![("CONSUL_CACERT", missing)],
        ),
        (
            vec![
                "-proxy-id",
                "a",
                "-http-addr",
                "https://127.0.0.1:1",
                "-client-cert",
                missing,
                "-client-key",
                missing,
            ],
            vec![],
        ),
    ] {
        let out = run(&args, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(missing),
            "{args:?}: names the file: {stderr}"
        );
    }
}

/// How the running proxy started (after any re-exec), from its debug log line: whether it was
/// re-executed, and the `GLIBC_TUNABLES` it sees. (Not from /proc/PID/environ: glibc rewrites
/// that copy of the variable while parsing it.)
async fn tuning_after_start(env: &[(&str, &str)]) -> (bool, String) {
    // No agent at this address: the proxy stays up, waiting for it.
    let p =
        crate::support::ProxyProcess::spawn(&["-http-addr", "127.0.0.1:1", "-proxy-id", "x"], env);
    p.wait_log("memcpy tuning").await;
    let logs = p.logs();
    assert_eq!(logs.matches("memcpy tuning").count(), 1, "{logs}");
    let line = logs.lines().find(|l| l.contains("memcpy tuning")).unwrap();
    let tunables = line
        .split("glibc_tunables=")
        .nth(1)
        .unwrap()
        .trim()
        .trim_matches('"')
        .to_owned();
    (line.contains("reexecuted=true"), tunables)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_amd_cpus_the_proxy_runs_with_the_rep_movsb_threshold_raised_unless_set_already() {
    let amd = consul_proxy::memcpy_tune::is_amd(&std::fs::read_to_string("/proc/cpuinfo").unwrap());
    let ours = "glibc.cpu.x86_rep_movsb_threshold=0x1000000";
    let expect = |base: &str| match (amd, base.is_empty()) {
        (false, _) => (false, base.to_owned()),
        (true, true) => (true, ours.to_owned()),
        (true, false) => (true, format!("{base}:{ours}")),
    };
    assert_eq!(tuning_after_start(&[]).await, expect(""), "AMD: {amd}");
    // Other tunables are kept.
    let other = "glibc.malloc.arena_max=2";
    assert_eq!(
        tuning_after_start(&[("GLIBC_TUNABLES", other)]).await,
        expect(other)
    );
    // An operator's own threshold wins: no re-exec.
    let own = "glibc.cpu.x86_rep_movsb_threshold=0x840";
    assert_eq!(
        tuning_after_start(&[("GLIBC_TUNABLES", own)]).await,
        (false, own.to_owned())
    );
    // A process that was re-executed already never is again, whatever its environment says
    // (glibc erases the tunable in secure mode, e.g. with file capabilities).
    assert_eq!(
        tuning_after_start(&[(consul_proxy::memcpy_tune::MARKER, "1")]).await,
        (true, String::new())
    );
}

/// `-log-json` writes one JSON object per line, with the message and the event's fields as
/// top-level keys, for log shippers; nothing else reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_json_writes_one_json_object_per_line() {
    let mesh = crate::support::mesh::Mesh::new().await;
    let db = mesh
        .start_db_with(&["-log-json", "-log-level", "debug"])
        .await;
    db.wait_log("proxy ready").await;
    let logs = db.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let ready = lines
        .iter()
        .find(|l| l["message"] == "proxy ready")
        .unwrap_or_else(|| panic!("no \"proxy ready\" record:\n{logs}"));
    assert_eq!(ready["level"], "INFO", "{ready}");
    let loaded = lines
        .iter()
        .find(|l| l["message"] == "proxy registration loaded")
        .unwrap_or_else(|| panic!("no registration record:\n{logs}"));
    assert_eq!(
        loaded["proxy_id"], "db-sidecar-proxy",
        "fields are JSON fields: {loaded}"
    );
}

/// The example systemd unit passes `systemd-analyze verify` with nothing to say (an unknown or
/// misspelt key is only a warning there, exit 0, so any output fails the test), run as an
/// instance (`consul-proxy@web.service`) with `ExecStart` pointing at the built binary.
#[test]
fn the_example_systemd_unit_verifies_cleanly() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // CI (which sets this) installs systemd-analyze; elsewhere say what was not checked.
        assert!(
            std::env::var("CONSUL_PROXY_REQUIRE_CONSUL").as_deref() != Ok("1"),
            "systemd-analyze is missing"
        );
        eprintln!("systemd-analyze not found: the example unit was not verified");
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/consul-proxy@.service"
    ))
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/consul-proxy "));
    let unit = unit.replace(
        "/usr/local/bin/consul-proxy",
        env!("CARGO_BIN_EXE_consul-proxy"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consul-proxy@web.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{said}",
        out.status
    );
}
