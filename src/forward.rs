//! The byte splice between two streams: both directions at once, a FIN in one direction is
//! passed on while the other keeps flowing, and the byte counts come back when both are done.
//!
//! Built for many mostly idle connections: a connection holds no data buffer while it waits.
//! Each read goes into one per-thread scratch buffer and is written out in the same poll; only
//! bytes the writer cannot take at once are copied into a buffer owned by the connection, which
//! is freed as soon as they are written. Reads are batched (several ready reads before a write,
//! up to the scratch size) so that bulk transfers make fewer, larger writes.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of the per-thread scratch buffer: the most one direction moves per write.
const SCRATCH: usize = 256 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the first stream to the second.
    pub a_to_b: u64,
    /// From the second stream to the first.
    pub b_to_a: u64,
}

/// Live byte counts of a splice, readable while it runs (relaxed atomics: one add per batch).
#[derive(Debug, Default)]
pub struct Counters {
    /// From the first stream to the second so far.
    pub a_to_b: AtomicU64,
    /// From the second stream to the first so far.
    pub b_to_a: AtomicU64,
}

/// Copies both ways until both directions have seen EOF (each EOF is forwarded as a
/// shutdown of the other side's write half) or an error occurs, adding the bytes moved to
/// `counters` as it goes.
pub async fn splice<A, B>(a: &mut A, b: &mut B, counters: &Counters) -> io::Result<Transferred>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Pump::default();
    let mut b_to_a = Pump::default();
    poll_fn(|cx| {
        let ab = a_to_b.poll(cx, &mut *a, &mut *b, &counters.a_to_b)?;
        let ba = b_to_a.poll(cx, &mut *b, &mut *a, &counters.b_to_a)?;
        match (ab, ba) {
            (Poll::Ready(a_to_b), Poll::Ready(b_to_a)) => {
                Poll::Ready(Ok(Transferred { a_to_b, b_to_a }))
            }
            _ => Poll::Pending,
        }
    })
    .await
}

/// How a splice ended, when neither side was closed by the proxy itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both directions reached EOF (TLS with `close_notify`).
    Orderly,
    /// The TLS peer's TCP connection ended without `close_notify`: its stream may have been
    /// cut short, so the other side gets a reset.
    Truncated,
    /// A read or write failed (a reset, most often); the other side gets a reset.
    Failed,
}

/// Logs how a splice ended and classifies it. `a_is_peer` says whether the splice's first
/// stream is the remote mTLS peer (inbound) or the local client (upstream), which decides
/// which count is "in" (from the peer) and which "out".
pub fn ending(result: io::Result<Transferred>, a_is_peer: bool) -> Ending {
    match result {
        Ok(t) => {
            let (from_peer, to_peer) = if a_is_peer {
                (t.a_to_b, t.b_to_a)
            } else {
                (t.b_to_a, t.a_to_b)
            };
            tracing::debug!(bytes.in = from_peer, bytes.out = to_peer, "connection closed");
            Ending::Orderly
        }
        // tokio-rustls reports a TCP EOF without close_notify this way; plain sockets never
        // do (their EOF is a read of 0).
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%error, "the TLS peer closed without close_notify; passing it on as a reset");
            Ending::Truncated
        }
        Err(error) => {
            tracing::debug!(%error, "connection ended with an error");
            Ending::Failed
        }
    }
}

/// One direction of a splice.
#[derive(Debug, Default)]
struct Pump {
    /// Bytes read but not yet accepted by the writer (only while the writer is slow).
    backlog: Vec<u8>,
    /// How much of `backlog` was written already.
    written: usize,
    /// The writer buffered data (TLS) and must be flushed before we wait for the reader.
    needs_flush: bool,
    read_done: bool,
    done: bool,
    total: u64,
    /// A read error: reported once everything read before it is written and flushed, so
    /// that bytes the peer sent before failing are not lost.
    deferred: Option<io::Error>,
}

impl Pump {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &AtomicU64,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.total));
        }
        loop {
            // Finish what the writer could not take last time.
            while self.written < self.backlog.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.backlog[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.count(n, counter);
                self.needs_flush = true;
            }
            if !self.backlog.is_empty() {
                // Release the memory: an idle connection keeps no buffer.
                self.backlog = Vec::new();
                self.written = 0;
            }
            if self.deferred.is_some() {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                if let Some(e) = self.deferred.take() {
                    return Poll::Ready(Err(e));
                }
            }
            if self.read_done {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.total));
            }
            match self.read_and_write(cx, r, w, counter)? {
                Progress::Moved => continue,
                Progress::Eof => {
                    self.read_done = true;
                    continue;
                }
                Progress::Blocked => {
                    if self.needs_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Counts bytes the writer accepted (not bytes merely read): the totals, `/status` and
    /// the idle timer see what was passed on.
    fn count(&mut self, n: usize, counter: &AtomicU64) {
        self.total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Reads what is ready (into the scratch buffer) and writes as much as the writer takes;
    /// the rest goes to the backlog.
    fn read_and_write<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        counter: &AtomicU64,
    ) -> io::Result<Progress>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            let mut eof = false;
            // Batch: keep reading while data is ready and there is room.
            while buf.remaining() > 0 {
                let before = buf.filled().len();
                match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) if buf.filled().len() == before => {
                        eof = true;
                        break;
                    }
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        self.deferred = Some(e);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                // A read error is reported only after what earlier reads handed the writer
                // is flushed (`poll` does that for a deferred error): a TLS writer may still
                // hold the previous batch when the next read fails.
                if self.deferred.is_some() {
                    return Ok(Progress::Moved);
                }
                return Ok(if eof {
                    Progress::Eof
                } else {
                    Progress::Blocked
                });
            }
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => {
                        off += n;
                        self.count(n, counter);
                        self.needs_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => {
                        self.backlog = data[off..].to_vec();
                        self.written = 0;
                        break;
                    }
                }
            }
            if eof {
                self.read_done = true;
            }
            Ok(Progress::Moved)
        })
    }
}

enum Progress {
    /// Data was read (and written or queued).
    Moved,
    /// The reader reached EOF with nothing left to move.
    Eof,
    /// Nothing to read right now.
    Blocked,
}

/// A stream that can wait until it is readable without being read, so that a reader can
/// allocate its buffer only once there is something to put in it.
pub trait PollReadReady {
    /// Ready when a read would not block (it may still, rarely: readiness can be spurious).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl PollReadReady for tokio::net::TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, cx)
    }
}

/// A reader adapter that reads from the socket in large chunks and serves smaller reads from
/// memory. rustls reads ciphertext 4 KiB at a time; under it, this turns four or more read
/// syscalls per 16 KiB record into a fraction of one. The chunk size adapts: it doubles while
/// reads fill it (bulk transfer) and halves while they do not (request/response), between
/// 16 KiB and 256 KiB. The buffer is allocated only once the socket is readable and freed as
/// soon as it has been consumed, so an idle connection holds none.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: bytes::BytesMut,
    chunk: usize,
}

/// Smallest and largest read from the socket.
const READ_AHEAD_MIN: usize = 16 * 1024;
const READ_AHEAD_MAX: usize = 256 * 1024;

impl<S> ReadAhead<S> {
    /// Wraps a stream.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: bytes::BytesMut::new(),
            chunk: READ_AHEAD_MIN,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The next chunk size after a read of `n` bytes into a chunk of `chunk` bytes.
fn next_chunk(chunk: usize, n: usize) -> usize {
    if n >= chunk {
        (chunk * 2).min(READ_AHEAD_MAX)
    } else if n < chunk / 4 {
        (chunk / 2).max(READ_AHEAD_MIN)
    } else {
        chunk
    }
}

impl<S: AsyncRead + PollReadReady + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= this.chunk {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Waiting for data holds no buffer: allocate only once the socket is readable.
            ready!(this.inner.poll_read_ready(cx))?;
            if this.buf.capacity() < this.chunk {
                this.buf = bytes::BytesMut::with_capacity(this.chunk);
            }
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf);
            let n = match read {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // Spurious readiness: give the buffer back while waiting again.
                    this.buf = bytes::BytesMut::new();
                    return Poll::Pending;
                }
            };
            this.chunk = next_chunk(this.chunk, n);
            if n == 0 {
                this.buf = bytes::BytesMut::new();
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        bytes::Buf::advance(&mut this.buf, n);
        if this.buf.is_empty() {
            this.buf = bytes::BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn half_close_is_forwarded_and_the_other_direction_keeps_flowing() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let task =
            tokio::spawn(
                async move { splice(&mut proxy_a, &mut proxy_b, &Counters::default()).await },
            );

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "server sees the data, then EOF");

        server
            .write_all(b"response after client FIN")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after client FIN");

        let t = task.await.unwrap().unwrap();
        assert_eq!(
            t,
            Transferred {
                a_to_b: 7,
                b_to_a: 25
            }
        );
    }

    #[tokio::test]
    async fn a_slow_writer_loses_nothing() {
        // Tiny pipes force partial writes and the backlog path; 1 MiB must arrive intact.
        let (mut client, mut proxy_a) = tokio::io::duplex(100);
        let (mut proxy_b, mut server) = tokio::io::duplex(100);
        let counters = std::sync::Arc::new(Counters::default());
        let live = counters.clone();
        let task = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b, &live).await });
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "1 MiB through 100-byte pipes arrived intact");
        drop(server);
        let _client = writer.await.unwrap();
        let t = task.await.unwrap().unwrap();
        assert_eq!(t.a_to_b, 1 << 20);
        assert_eq!(
            counters.a_to_b.load(Ordering::Relaxed),
            1 << 20,
            "live counter agrees"
        );
        assert_eq!(counters.b_to_a.load(Ordering::Relaxed), 0);
    }

    /// Yields its scripted reads in order (`None`: not ready once, then woken at once),
    /// accepts and drops writes; pending for ever after the script.
    struct Scripted(std::collections::VecDeque<Option<io::Result<Vec<u8>>>>);

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.0.pop_front() {
                Some(Some(Ok(data))) => {
                    buf.put_slice(&data);
                    Poll::Ready(Ok(()))
                }
                Some(Some(Err(e))) => Poll::Ready(Err(e)),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_read_just_before_an_error_are_delivered_then_the_error_reported() {
        // What tokio-rustls does when the peer sends data and then closes without
        // close_notify: the data, then UnexpectedEof on the next read of the same batch.
        let mut peer = Scripted(
            [
                Some(Ok(b"last words".to_vec())),
                Some(Err(io::ErrorKind::UnexpectedEof.into())),
            ]
            .into(),
        );
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let counters = Counters::default();
        let r = splice(&mut peer, &mut proxy_b, &counters).await;
        assert_eq!(
            r.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "the error is still reported"
        );
        drop(proxy_b);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words", "the bytes before it were delivered");
    }

    /// A writer that, like a TLS stream, takes writes into its own buffer and passes them on
    /// only when flushed; its first flush cannot finish (the socket under it is full).
    #[derive(Default)]
    struct Buffering {
        held: Vec<u8>,
        delivered: Vec<u8>,
        flushes: usize,
    }

    impl AsyncRead for Buffering {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Buffering {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(b);
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            if self.flushes == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let held = std::mem::take(&mut self.held);
            self.delivered.extend_from_slice(&held);
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_held_by_the_writer_are_flushed_before_a_later_read_error() {
        let mut peer = Scripted(
            [
                Some(Ok(b"held by TLS".to_vec())),
                None,
                Some(Err(io::ErrorKind::ConnectionReset.into())),
            ]
            .into(),
        );
        let mut app = Buffering::default();
        let r = splice(&mut peer, &mut app, &Counters::default()).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(
            app.delivered, b"held by TLS",
            "the earlier batch was flushed before the error ended the splice"
        );
    }

    #[tokio::test]
    async fn bytes_are_counted_when_the_writer_takes_them_not_when_read() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        // The far side holds at most 10 bytes and nobody reads them.
        let (mut proxy_b, _server) = tokio::io::duplex(10);
        let counters = std::sync::Arc::new(Counters::default());
        let live = counters.clone();
        let task = tokio::spawn(async move {
            let _ = splice(&mut proxy_a, &mut proxy_b, &live).await;
        });
        client.write_all(&[1u8; 100]).await.unwrap();
        let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while counters.a_to_b.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < end, "nothing counted");
            tokio::task::yield_now().await;
        }
        assert_eq!(
            counters.a_to_b.load(Ordering::Relaxed),
            10,
            "only what the writer accepted"
        );
        task.abort();
    }

    #[test]
    fn read_ahead_chunk_adapts_between_bounds() {
        assert_eq!(
            next_chunk(READ_AHEAD_MIN, READ_AHEAD_MIN),
            2 * READ_AHEAD_MIN,
            "full read: grow"
        );
        assert_eq!(
            next_chunk(READ_AHEAD_MAX, READ_AHEAD_MAX),
            READ_AHEAD_MAX,
            "capped"
        );
        assert_eq!(next_chunk(64 * 1024, 100), 32 * 1024, "small read: shrink");
        assert_eq!(next_chunk(READ_AHEAD_MIN, 100), READ_AHEAD_MIN, "floored");
        assert_eq!(
            next_chunk(64 * 1024, 20 * 1024),
            64 * 1024,
            "in between: keep"
        );
    }

    /// A connected loopback TCP pair.
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn read_ahead_holds_no_buffer_while_waiting_for_data() {
        let (mut w, r) = tcp_pair().await;
        let mut ra = ReadAhead::new(r);
        let mut small = [0u8; 100];
        // After a transfer that grew the chunk size, and while no data is available:
        w.write_all(&[1u8; 100_000]).await.unwrap();
        let mut got = 0;
        while got < 100_000 {
            got += ra.read(&mut small).await.unwrap();
        }
        let waiting = futures_poll_once(&mut ra, &mut small).await;
        assert!(waiting, "nothing to read: the read is pending");
        assert_eq!(ra.buf.capacity(), 0, "an idle connection holds no buffer");
        w.write_all(b"more").await.unwrap();
        let n = ra.read(&mut small).await.unwrap();
        assert_eq!(&small[..n], b"more");
    }

    /// Polls one read once; true if it was pending.
    async fn futures_poll_once(ra: &mut ReadAhead<tokio::net::TcpStream>, out: &mut [u8]) -> bool {
        std::future::poll_fn(|cx| {
            let mut buf = ReadBuf::new(out);
            Poll::Ready(Pin::new(&mut *ra).poll_read(cx, &mut buf).is_pending())
        })
        .await
    }

    #[tokio::test]
    async fn read_ahead_serves_small_reads_from_one_large_read() {
        let (mut w, r) = tcp_pair().await;
        w.write_all(&[7u8; 10_000]).await.unwrap();
        drop(w);
        let mut ra = ReadAhead::new(r);
        let mut total = 0;
        let mut small = [0u8; 100];
        loop {
            let n = ra.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(small[..n].iter().all(|b| *b == 7));
            total += n;
        }
        assert_eq!(total, 10_000);
        assert_eq!(ra.buf.capacity(), 0, "no buffer kept once drained");
    }
}
