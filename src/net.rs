//! Plain local sockets, TCP or unix: the listeners for upstreams and the dial to the local app.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::proxy_config::{BindAddr, LocalApp};

/// A local stream, TCP or unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Makes the coming close an abort (a TCP reset instead of an orderly FIN), so that the
    /// other side cannot take a stream the proxy cut off for a complete one. Unix sockets have
    /// no such signal; they just close.
    pub fn abort_on_close(&self) {
        if let Stream::Tcp(s) = self {
            abort_on_close(s);
        }
    }
}

impl crate::forward::PollReadReady for Stream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
        }
    }
}

/// As [`Stream::abort_on_close`], for a TCP stream (e.g. under TLS).
pub fn abort_on_close(s: &TcpStream) {
    // Zero linger does not block on close; failure only means an orderly close instead.
    let _ = s.set_zero_linger();
}

/// Keepalive: the first probe after this much silence ...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// ... then one probe per this interval ...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ... and the connection is dropped after this many unanswered probes: a peer that
/// vanished (crashed node, expired NAT entry, pulled cable) frees its connection within about
/// 90 s instead of holding a task, a descriptor and a registry entry forever.
const KEEPALIVE_RETRIES: u32 = 6;

/// Per-socket options for every TCP connection the proxy dials: no Nagle delay
/// (request/response latency) and keepalive (see `KEEPALIVE_RETRIES`). Failures are logged
/// and otherwise ignored: the connection still works without them.
pub fn tune_tcp(s: &TcpStream) {
    set_nodelay(s);
    set_keepalive(socket2::SockRef::from(s));
}

fn set_nodelay(s: &TcpStream) {
    if let Err(error) = s.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

/// Sets keepalive on a connection, or on a listener: Linux copies it (and its timing) to
/// every connection the listener accepts, which saves four system calls per connection.
fn set_keepalive(s: socket2::SockRef<'_>) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(error) = s.set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot set TCP keepalive");
    }
}

/// A local listener, TCP or unix.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket (the path is removed again when the listener is dropped).
    Unix(UnixListener, UnixPathGuard),
}

/// Removes a unix socket file when dropped.
#[derive(Debug)]
pub struct UnixPathGuard(std::path::PathBuf);

impl Drop for UnixPathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds. A stale unix socket file (nobody listening) is replaced; a live one is an error.
    /// A unix socket with `unix_mode` gets those permissions before it appears at `path`: it
    /// is bound under a temporary name in the same directory, chmod-ed, then renamed, so no
    /// one the mode excludes can connect in between.
    pub async fn bind(addr: &BindAddr, unix_mode: Option<u32>) -> io::Result<Self> {
        match addr {
            BindAddr::Tcp(a) => {
                let l = TcpListener::bind(a).await?;
                // Inherited by every accepted connection (see `set_keepalive`).
                set_keepalive(socket2::SockRef::from(&l));
                Ok(Listener::Tcp(l))
            }
            BindAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let l = match unix_mode {
                    None => UnixListener::bind(path)?,
                    Some(mode) => {
                        let mut name = path.as_os_str().to_owned();
                        name.push(format!(
                            ".tmp-{}-{:08x}",
                            std::process::id(),
                            rand::random::<u32>()
                        ));
                        let tmp = std::path::PathBuf::from(name);
                        let l = UnixListener::bind(&tmp)?;
                        let placed = std::fs::set_permissions(&tmp, Permissions::from_mode(mode))
                            .and_then(|()| std::fs::rename(&tmp, path));
                        if let Err(e) = placed {
                            let _ = std::fs::remove_file(&tmp);
                            return Err(e);
                        }
                        l
                    }
                };
                Ok(Listener::Unix(l, UnixPathGuard(path.clone())))
            }
        }
    }

    /// Accepts one connection; returns it with a printable peer address.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Keepalive came with the listener.
                set_nodelay(&s);
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), "unix".to_owned()))
            }
        }
    }

    /// The bound address, for logs (TCP port 0 resolves to the real port).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, guard) => format!("unix:{}", guard.0.display()),
        }
    }
}

/// Changes a running unix socket listener's permissions (`None`: left as they are).
pub fn set_socket_mode(addr: &BindAddr, mode: Option<u32>) -> io::Result<()> {
    match (addr, mode) {
        (BindAddr::Unix(path), Some(mode)) => {
            std::fs::set_permissions(path, Permissions::from_mode(mode))
        }
        _ => Ok(()),
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by another process", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Dials the local application.
pub async fn connect_local(app: &LocalApp) -> io::Result<Stream> {
    match app {
        LocalApp::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            tune_tcp(&s);
            Ok(Stream::Tcp(s))
        }
        LocalApp::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// A local stream detached from its runtime, to be handed to another one.
#[derive(Debug)]
pub enum StdStream {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix socket.
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    /// Detaches the socket from this runtime's reactor.
    pub fn into_std(self) -> io::Result<StdStream> {
        Ok(match self {
            Stream::Tcp(s) => StdStream::Tcp(s.into_std()?),
            Stream::Unix(s) => StdStream::Unix(s.into_std()?),
        })
    }
}

impl StdStream {
    /// Registers the socket with the current runtime (call it on the runtime that will use it).
    pub fn into_tokio(self) -> io::Result<Stream> {
        Ok(match self {
            StdStream::Tcp(s) => Stream::Tcp(TcpStream::from_std(s)?),
            StdStream::Unix(s) => Stream::Unix(UnixStream::from_std(s)?),
        })
    }
}

/// Accepts until `stop` fires, running `handle` for each connection on `tracker`, inside a
/// `conn` span: on the current runtime, or, with `workers`, on the next worker runtime.
/// Accept errors (EMFILE, ...) are logged and retried after a short pause; they never end the
/// loop. The listener is dropped (closed) when the loop ends.
pub async fn accept_loop<F, Fut>(
    listener: Listener,
    kind: &'static str,
    stop: tokio_util::sync::CancellationToken,
    tracker: tokio_util::task::TaskTracker,
    workers: Option<std::sync::Arc<crate::workers::Workers>>,
    handle: F,
) where
    F: Fn(Stream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let addr = listener.local_addr();
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                pause = std::time::Duration::from_millis(10);
                let span = tracing::info_span!(
                    "conn",
                    listener = kind,
                    peer.addr = %peer,
                    peer.id = tracing::field::Empty
                );
                match &workers {
                    None => {
                        tracker.spawn(handle(stream).instrument(span));
                    }
                    Some(workers) => {
                        let std = match stream.into_std() {
                            Ok(s) => s,
                            Err(error) => {
                                tracing::warn!(listener = kind, %error, "cannot hand a connection to a worker");
                                continue;
                            }
                        };
                        let handle = handle.clone();
                        let work = async move {
                            match std.into_tokio() {
                                Ok(s) => handle(s).await,
                                Err(error) => {
                                    tracing::warn!(%error, "cannot register a connection on a worker")
                                }
                            }
                        };
                        let (index, worker) = workers.pick();
                        span.in_scope(|| {
                            tracing::trace!(worker = index, "connection handed to a worker thread")
                        });
                        worker.spawn(tracker.track_future(work.instrument(span)));
                    }
                }
            }
            Err(error) => {
                tracing::warn!(listener = kind, %addr, %error, "accept failed; retrying");
                if !crate::consul::watch::sleep_or_cancel(pause, &stop).await {
                    break;
                }
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
    tracing::debug!(listener = kind, %addr, "listener closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unix_listener_gets_its_mode_before_it_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sock");
        let addr = BindAddr::Unix(path.clone());
        let listener = Listener::bind(&addr, Some(0o600)).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary name left behind: {names:?}");
        UnixStream::connect(&path).await.unwrap();
        set_socket_mode(&addr, Some(0o660)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(listener);
        assert!(!path.exists(), "removed with the listener");
    }
}
