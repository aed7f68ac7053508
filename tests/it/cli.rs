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
    let out = run(&["-help"], &[("CONSUL_HTTP_TOKEN", "s3cr3t-token-value")]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--proxy-id",
        "--sidecar-for",
        "--http-addr",
        "--token",
        "--token-file",
        "--ca-file",
        "--ca-path",
        "--client-cert",
        "--client-key",
        "--tls-server-name",
        "--log-level",
        "--log-json",
        "--drain-timeout",
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_SSL_VERIFY",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
    assert!(!help.contains("s3cr3t-token-value"));
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
