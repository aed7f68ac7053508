//! A raw mTLS client and server for probing the proxy's TLS sides directly. Neither checks the
//! peer (the proxy is what is under test); both expose what the peer presented.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::pki::TestLeaf;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_and_key(leaf: &TestLeaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut leaf.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    (chain, key)
}

#[derive(Debug)]
struct AcceptAny;

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for AcceptAny {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects to `port` with TLS, presenting `leaf` as client cert if given.
pub async fn connect(
    port: u16,
    leaf: Option<&TestLeaf>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    connect_with(port, Arc::new(client_config(leaf))).await
}

/// A client config presenting `leaf` (if given) that accepts any server certificate.
/// Opens an mTLS connection presenting `leaf` (or no certificate) and checks that one exchange
/// echoes.
pub async fn echoes(port: u16, leaf: Option<&TestLeaf>) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = connect(port, leaf).await else {
        return false;
    };
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(super::DEADLINE, s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"ping"
}

pub fn client_config(leaf: Option<&TestLeaf>) -> rustls::ClientConfig {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny));
    match leaf {
        Some(l) => {
            let (chain, key) = chain_and_key(l);
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

/// The first flight a client presenting `leaf` sends: its ClientHello record(s).
pub fn client_hello_bytes(leaf: &TestLeaf) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(
        Arc::new(client_config(Some(leaf))),
        ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    )
    .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Connects to `port` with TLS using `config` (keep the config to resume its sessions).
pub async fn connect_with(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    TlsConnector::from(config)
        .connect(
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            tcp,
        )
        .await
}

/// A TLS server side presenting `leaf` that asks for, and accepts, any client certificate.
pub fn acceptor(leaf: &TestLeaf) -> TlsAcceptor {
    let (chain, key) = chain_and_key(leaf);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(Arc::new(AcceptAny))
        .with_single_cert(chain, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// The server's leaf certificate as seen by a client connection.
pub fn server_cert(s: &tokio_rustls::client::TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// The serial of the certificate the server at `port` presents to a client showing `leaf`,
/// or `None` if the handshake fails.
pub async fn presented_serial(port: u16, leaf: Option<&TestLeaf>) -> Option<String> {
    let s = connect(port, leaf).await.ok()?;
    Some(serial_of(&server_cert(&s)))
}

/// Serial (colon hex) of a DER certificate.
pub fn serial_of(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der.as_ref()).unwrap();
    cert.raw_serial()
        .iter()
        .skip_while(|b| **b == 0)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A TLS server presenting `leaf`, requesting (not verifying) a client cert. Echoes what it
/// reads and counts the application bytes it received.
pub struct TlsEchoServer {
    pub port: u16,
    pub handshakes: Arc<std::sync::atomic::AtomicUsize>,
    /// Handshakes that resumed a session (this server issues tickets like any rustls server).
    pub resumed: Arc<std::sync::atomic::AtomicUsize>,
    /// ClientHellos that offered a session ticket (a pre-shared key), whether or not this
    /// server could use it.
    pub psk_offers: Arc<std::sync::atomic::AtomicUsize>,
    pub bytes_received: Arc<std::sync::atomic::AtomicUsize>,
    /// The part of `bytes_received` that came over resumed sessions.
    pub resumed_bytes: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections accepted, and those whose handling has ended (closed either way).
    conns: Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
    task: tokio::task::JoinHandle<()>,
}

/// Counts a connection as ended when its task finishes, however it finishes.
struct Ended(
    Arc<(
        std::sync::atomic::AtomicUsize,
        std::sync::atomic::AtomicUsize,
    )>,
);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TlsEchoServer {
    /// Starts on a free port.
    pub async fn start(leaf: &TestLeaf) -> Self {
        Self::start_on(leaf, 0).await
    }

    /// Starts on a given port (0: a free one).
    pub async fn start_on(leaf: &TestLeaf, port: u16) -> Self {
        let acceptor = acceptor(leaf);
        Self::serve(port, move |_| acceptor.clone()).await
    }

    /// Starts on a free port as a server that selects consul-proxy's ALPN protocol on its
    /// first handshake only: later handshakes, resumed ones included (the session cache is
    /// shared), select none. It models a ticket from a consul-proxy reaching a server that
    /// is not one.
    pub async fn start_mesh_then_plain(leaf: &TestLeaf) -> Self {
        let (chain, key) = chain_and_key(leaf);
        let mut mesh = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::new(AcceptAny))
            .with_single_cert(chain, key)
            .unwrap();
        mesh.alpn_protocols = vec![consul_proxy::tls::MESH_ALPN.to_vec()];
        let mut plain = mesh.clone();
        plain.alpn_protocols.clear();
        let (mesh, plain) = (
            TlsAcceptor::from(Arc::new(mesh)),
            TlsAcceptor::from(Arc::new(plain)),
        );
        Self::serve(
            0,
            move |n| if n == 0 { mesh.clone() } else { plain.clone() },
        )
        .await
    }

    /// Serves on `port` (0: a free one), the `n`th connection accepted (from 0) with
    /// `acceptor(n)`.
    async fn serve(port: u16, acceptor: impl Fn(usize) -> TlsAcceptor + Send + 'static) -> Self {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let resumed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let psk_offers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let bytes_received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let resumed_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, b, res) = (handshakes.clone(), bytes_received.clone(), resumed.clone());
        let rb = resumed_bytes.clone();
        let offers = psk_offers.clone();
        let conns: Arc<(
            std::sync::atomic::AtomicUsize,
            std::sync::atomic::AtomicUsize,
        )> = Arc::default();
        let counted = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (h, b, res) = (h.clone(), b.clone(), res.clone());
                let (offers, resumed_b) = (offers.clone(), rb.clone());
                let acceptor = acceptor(counted.0.fetch_add(1, Ordering::SeqCst));
                let ended = Ended(counted.clone());
                tokio::spawn(async move {
                    let _ended = ended;
                    let hello = peek_client_hello(&tcp).await;
                    if hello.as_deref().and_then(offers_psk) == Some(true) {
                        offers.fetch_add(1, Ordering::SeqCst);
                    }
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let was_resumed =
                        s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    if was_resumed {
                        res.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                b.fetch_add(n, Ordering::SeqCst);
                                if was_resumed {
                                    resumed_b.fetch_add(n, Ordering::SeqCst);
                                }
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        TlsEchoServer {
            port,
            handshakes,
            resumed,
            resumed_bytes,
            psk_offers,
            conns,
            bytes_received,
            task,
        }
    }
}

impl TlsEchoServer {
    /// The bytes received from clients, once every connection accepted so far (at least one)
    /// has ended: none can still be on its way.
    pub async fn bytes_received_once_closed(&self) -> usize {
        use std::sync::atomic::Ordering;
        super::eventually(
            "every connection to the TLS server ended",
            super::DEADLINE,
            || async {
                let (accepted, ended) = (
                    self.conns.0.load(Ordering::SeqCst),
                    self.conns.1.load(Ordering::SeqCst),
                );
                (accepted >= 1 && ended == accepted).then_some(())
            },
        )
        .await;
        self.bytes_received.load(Ordering::SeqCst)
    }
}

/// The first TLS record a client sent (its ClientHello), read without consuming it; `None`
/// if the client closed or sent no complete record within a few seconds.
async fn peek_client_hello(tcp: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let n = tcp.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if n >= 5 {
            let need = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if n >= need {
                buf.truncate(need);
                return Some(buf);
            }
        }
        // Part of the record is still on its way: peek again shortly (bounded above).
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    None
}

/// Whether a TLS record holding a ClientHello offers a pre-shared key (extension 41, how a
/// TLS 1.3 client offers a session ticket); `None` if it is not a well-formed ClientHello.
pub fn offers_psk(record: &[u8]) -> Option<bool> {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const PRE_SHARED_KEY: u16 = 41;
    let u16_at = |b: &[u8], i: usize| Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]));
    if *record.first()? != HANDSHAKE {
        return None;
    }
    let body = record.get(5..)?;
    if *body.first()? != CLIENT_HELLO {
        return None;
    }
    // Handshake header (4), legacy version (2), random (32), then three length-prefixed
    // fields: session id (1-byte length), cipher suites (2), compression methods (1).
    let mut at = 4 + 2 + 32;
    at += 1 + usize::from(*body.get(at)?);
    at += 2 + usize::from(u16_at(body, at)?);
    at += 1 + usize::from(*body.get(at)?);
    let end = at + 2 + usize::from(u16_at(body, at)?);
    if end > body.len() {
        return None;
    }
    at += 2;
    while at + 4 <= end {
        if u16_at(body, at)? == PRE_SHARED_KEY {
            return Some(true);
        }
        at += 4 + usize::from(u16_at(body, at + 2)?);
    }
    Some(false)
}

impl Drop for TlsEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
