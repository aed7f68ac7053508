//! Test support: the proxy as a child process (readiness through `NOTIFY_SOCKET`), echo
//! servers, a raw mTLS client, deadlines. No sleeps: every wait is on a signal or a polled
//! condition with a deadline.

#![allow(dead_code)]

pub mod consul;
pub mod fake_agent;
pub mod mesh;
pub mod pki;
pub mod tls_client;

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixDatagram};
use tokio::process::{Child, Command};

/// Generous deadline for anything that should happen "soon" on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A port that was free a moment ago, for listeners whose port must be named up front (agent
/// registrations, agent flags).
///
/// Taken below Linux's ephemeral range (32768-60999), never twice in one test run: a port
/// from `bind(:0)` comes from that range, and once released it can be taken as the local
/// port of any outgoing connection (the agent's, another test's) before the proxy binds it.
/// Also above Consul's sidecar port range (21000-21255), which a real agent assigns from
/// without asking the OS (the quick-start test leaves the sidecar ports to the agent).
pub fn free_port() -> u16 {
    const FIRST: u16 = 21_256;
    const LAST: u16 = 32_000;
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU16> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        // Spread concurrent test processes apart.
        let span = u32::from(LAST - FIRST);
        std::sync::atomic::AtomicU16::new(FIRST + (std::process::id() * 37 % span) as u16)
    });
    for _ in FIRST..=LAST {
        let port = next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(if p >= LAST { FIRST } else { p + 1 })
            })
            .unwrap();
        // Public listeners bind all interfaces; check both forms.
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port in {FIRST}-{LAST}");
}

/// A command for `program` that the kernel kills (SIGKILL) if the thread that started it
/// ends, i.e. when the test ends however it ends: a test process killed by a CI timeout or by
/// hand runs no `Drop`, and its agents and proxies would otherwise live on (`setpriv` from
/// util-linux, essential in Debian, sets `PR_SET_PDEATHSIG` and execs, so the PID is the
/// program's own).
pub fn dying_with_test(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
    cmd
}

/// Prints a figure a test measured and appends it to `measurements.txt` in Cargo's test
/// scratch directory (`target/tmp`), which `.ci/run` prints after the tests pass: a
/// passing test's own output is not shown.
pub fn report_measurement(line: &str) {
    use std::io::Write;
    println!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("measurements.txt");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    writeln!(f, "{line}").unwrap();
}

/// `GET path` on a proxy's admin endpoint: the status code and the body.
pub async fn admin_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The consul-proxy binary under test, running as a child process.
pub struct ProxyProcess {
    child: Child,
    notify: UnixDatagram,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
    pub ready: bool,
}

impl ProxyProcess {
    /// Starts the proxy and waits for `READY=1`; panics with the log if it exits or times out.
    pub async fn start(args: &[&str]) -> Self {
        let mut p = Self::spawn(args, &[]);
        p.wait_ready().await;
        p
    }

    /// Starts the proxy without waiting.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock).unwrap();
        let log_path = dir.path().join("proxy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = dying_with_test(env!("CARGO_BIN_EXE_consul-proxy"));
        cmd.args(args)
            .env("NOTIFY_SOCKET", &sock)
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("CONSUL_HTTP_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        if !args.iter().any(|a| a.contains("log-level")) {
            cmd.args(["-log-level", "debug"]);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn consul-proxy");
        ProxyProcess {
            child,
            notify,
            log_path,
            _dir: dir,
            ready: false,
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the proxy is running")
    }

    /// Waits for `READY=1` on the notify socket.
    pub async fn wait_ready(&mut self) {
        let end = tokio::time::Instant::now() + DEADLINE;
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                r = self.notify.recv(&mut buf) => {
                    let n = r.unwrap();
                    if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                        self.ready = true;
                        return;
                    }
                }
                status = self.child.wait() => {
                    panic!("consul-proxy exited before ready ({:?}):\n{}", status, self.logs());
                }
                _ = tokio::time::sleep_until(end) => {
                    panic!("consul-proxy not ready after {DEADLINE:?}:\n{}", self.logs());
                }
            }
        }
    }

    /// Waits for a notify message (e.g. `STOPPING=1`).
    pub async fn wait_notify(&mut self, state: &str) {
        let mut buf = [0u8; 512];
        let wait = async {
            loop {
                let n = self.notify.recv(&mut buf).await.unwrap();
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == state)
                {
                    return;
                }
            }
        };
        if tokio::time::timeout(DEADLINE, wait).await.is_err() {
            panic!("no {state} from consul-proxy:\n{}", self.logs());
        }
    }

    /// Sends a signal by PID.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Waits for the process to exit; panics after the deadline.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "consul-proxy still running after {deadline:?}:\n{}",
                self.logs()
            ),
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        self.wait_log_within(needle, DEADLINE).await
    }

    /// Waits until the log contains `needle`, for up to `deadline`.
    pub async fn wait_log_within(&self, needle: &str, deadline: Duration) {
        let end = tokio::time::Instant::now() + deadline;
        let mut pause = Duration::from_millis(10);
        while !self.logs().contains(needle) {
            if tokio::time::Instant::now() >= end {
                panic!(
                    "no log line {needle:?} after {deadline:?}; the log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// Starts a proxy with `args`, expects exit code 1, and that its logs contain every one of
/// `needles`.
pub async fn exits_1_saying(args: &[&str], needles: &[&str]) {
    let mut p = ProxyProcess::spawn(args, &[]);
    assert_eq!(p.wait_exit(DEADLINE).await.code(), Some(1), "{}", p.logs());
    let logs = p.logs();
    for needle in needles {
        assert!(logs.contains(needle), "{needle:?} missing from:\n{logs}");
    }
}

/// Sends back everything read from `stream` until EOF, then half-closes it.
pub async fn echo_until_eof<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(stream: S) {
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// What a [`recording_app`] saw on one connection: the bytes it read, and how the stream
/// ended (`Ok` for an orderly EOF, the error for a reset).
pub type Recorded = (Vec<u8>, std::io::Result<()>);

/// A local app that reports, per connection, what it read and how the stream ended; with
/// `echo` it also sends back what it reads.
pub async fn recording_app(echo: bool) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Recorded>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                let end = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if echo {
                                if let Err(e) = s.write_all(&buf[..n]).await {
                                    break Err(e);
                                }
                            }
                        }
                        Err(e) => break Err(e),
                    }
                };
                let _ = tx.send((got, end));
            });
        }
    });
    (port, rx)
}

/// A TCP echo server that counts the connections it accepted.
pub struct EchoServer {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(echo_until_eof(s));
            }
        });
        EchoServer {
            port,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x & 0xff) as u8
        })
        .collect()
}

/// Awaits `fut`, failing the test if it takes longer than [`DEADLINE`] (a read that never
/// completes would otherwise hang the whole suite).
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {DEADLINE:?}"),
    }
}

/// Sends `data` through `port`, half-closes, and returns everything read back.
pub async fn round_trip(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    let read = tokio::time::timeout(DEADLINE, r.read_to_end(&mut back)).await;
    writer.await.unwrap()?;
    match read {
        Ok(r) => r.map(|_| back),
        Err(_) => Err(std::io::Error::other("round trip timed out")),
    }
}

/// Connects to a plain port and reports whether the other side closed without sending data.
pub async fn closed_without_data(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return true;
    };
    let _ = s.write_all(b"hello?").await;
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(DEADLINE, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Sends `data` through `port` and reads the same number of bytes back, without half-closing
/// (Consul's built-in proxy closes both directions on the first EOF).
pub async fn exchange(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut r, mut w) = s.into_split();
    let data_owned = data.to_vec();
    let writer = tokio::spawn(async move { w.write_all(&data_owned).await.map(|_| w) });
    let mut back = vec![0u8; data.len()];
    let read = tokio::time::timeout(DEADLINE, r.read_exact(&mut back)).await;
    let _w = writer.await.unwrap()?;
    match read {
        Ok(r) => r.map(|_| back),
        Err(_) => Err(std::io::Error::other("exchange timed out")),
    }
}

/// Whether a connection through `port` fails to echo a probe (closed, reset or refused).
pub async fn refused(port: u16) -> bool {
    !matches!(round_trip(port, b"probe").await, Ok(back) if back == b"probe")
}

/// Waits (within [`DEADLINE`]) until nothing accepts TCP connections on `127.0.0.1:port`:
/// a listener stopped or moved away.
pub async fn wait_not_accepting(port: u16, what: &str) {
    eventually(what, DEADLINE, || async {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}

/// A plain connection through `port` that has echoed one exchange.
pub async fn open_echoing(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"?").await.unwrap();
    let mut b = [0u8; 1];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut b))
        .await
        .expect("echo")
        .unwrap();
    assert_eq!(&b, b"?");
    s
}

/// Waits until the other side closes `s` (EOF or reset); panics after the deadline.
pub async fn wait_closed(s: &mut TcpStream) {
    let (r, rest) = read_until_closed(s).await;
    // A reset (Err) is a close too; an orderly close must not have delivered anything first.
    if r.is_ok() {
        assert!(
            rest.is_empty(),
            "unexpected data before the close: {rest:?}"
        );
    }
}

/// Waits until `s` is closed by a reset (an abort), not an orderly end of stream.
pub async fn wait_reset(s: &mut TcpStream) {
    let (r, rest) = read_until_closed(s).await;
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "closed by a reset, not in order (after {} bytes)",
        rest.len()
    );
}

/// Reads `s` until it is closed, within [`DEADLINE`]: how the read ended, and what came first.
async fn read_until_closed(s: &mut TcpStream) -> (std::io::Result<usize>, Vec<u8>) {
    let mut rest = Vec::new();
    let r = within("the connection's close", s.read_to_end(&mut rest)).await;
    (r, rest)
}
