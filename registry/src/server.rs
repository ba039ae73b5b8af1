//! `sixmesh registry serve`: the HTTPS JSON API under `/v1` and the optional
//! plain-HTTP re6st-compatible listener. See `docs/registry-api.md`.
//!
//! Every database access goes through one writer thread ([`Writer`]) that
//! batches concurrent requests into one transaction (each in its own
//! savepoint) and answers them only after `COMMIT` returned: what the API
//! hands out is durable (WAL, `synchronous=FULL`) before the reply is sent,
//! and one fsync serves many enrollments.

// Request helpers return the ready error response as their `Err`.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot};

use crate::ca::{CertInfo, Csr};
use crate::error::{Error, Result};
use crate::registry::{self as reg, Ctx, NodeKind, now};

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// Most requests batched into one transaction.
const MAX_BATCH: usize = 256;
/// Most connections served at once (both listeners).
const MAX_CONNECTIONS: usize = 1024;
/// Time allowed for the TLS handshake and for each request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired prefixes are freed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);
/// Lifetime of a CRL (its nextUpdate).
const CRL_VALIDITY_SECS: i64 = 7 * 86400;
/// Endpoints older than this are not handed out as bootstrap peers.
const ENDPOINT_MAX_AGE_SECS: i64 = 86400;

type Reply = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection, &Ctx) -> Reply + Send>;

/// The database writer: one thread, batched transactions.
#[derive(Clone)]
pub struct Writer {
    tx: std::sync::mpsc::Sender<Job>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub fn start(conn: Connection, ctx: Arc<Ctx>) -> Result<Writer> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("registry-db".into())
            .spawn(move || writer_loop(conn, ctx, rx))
            .map_err(|e| Error::io("cannot start the database thread", e))?;
        Ok(Writer { tx })
    }

    /// Runs `f` in the next batch; returns its result once committed.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Ctx) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel::<Result<R>>();
        let job: Job = Box::new(move |conn, ctx| {
            let r = reg::atomically(conn, || f(conn, ctx));
            Box::new(move |commit| {
                let _ = tx.send(match commit {
                    Ok(()) => r,
                    Err(e) => Err(Error::Internal(format!("commit failed, nothing was issued: {e}"))),
                });
            })
        });
        self.tx.send(job).map_err(|_| Error::Internal("the database thread is gone".into()))?;
        rx.await.map_err(|_| Error::Internal("the database is unavailable".into()))?
    }
}

fn writer_loop(conn: Connection, ctx: Arc<Ctx>, rx: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::error!("cannot start a transaction: {e}; {} requests fail", batch.len());
            continue; // dropping the jobs fails their callers
        }
        // A panic in a job (a bug) must not take the registry down: the
        // whole batch is rolled back and its callers get an error.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            batch.into_iter().map(|j| j(&conn, &ctx)).collect::<Vec<Reply>>()
        }));
        let Ok(replies) = run else {
            tracing::error!("a request panicked in the database thread: batch rolled back");
            let _ = conn.execute_batch("ROLLBACK");
            continue;
        };
        let commit = conn.execute_batch("COMMIT").map_err(|e| e.to_string());
        if commit.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            tracing::error!("commit failed: {commit:?}");
        }
        for r in replies {
            r(commit.clone());
        }
    }
}

/// Options of `registry serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// HTTPS listen address.
    pub listen: SocketAddr,
    /// Plain-HTTP re6st listener, if any.
    pub legacy_listen: Option<SocketAddr>,
    /// Names (DNS or IP) in the server certificate.
    pub server_names: Vec<String>,
}

struct State {
    writer: Writer,
    ctx: Arc<Ctx>,
    crl: Mutex<Option<CrlCache>>,
    /// The TLS acceptor and when its server certificate was made; replaced
    /// well before the certificate expires.
    tls: std::sync::RwLock<(tokio_rustls::TlsAcceptor, i64)>,
    server_names: Vec<String>,
    /// One permit per open connection (both listeners).
    conns: Arc<Semaphore>,
}

/// How long a stopping server waits for requests in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The server certificate is replaced when older than this.
const SERVER_CERT_ROTATE_SECS: i64 = 30 * 86400;

impl State {
    fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.read().ok().map(|g| g.0.clone())
    }

    fn rotate_server_cert_if_old(&self) {
        let made = self.tls.read().map(|g| g.1).unwrap_or(0);
        if now() - made < SERVER_CERT_ROTATE_SECS {
            return;
        }
        match tls_config(&self.ctx, &self.server_names) {
            Ok(cfg) => {
                if let Ok(mut g) = self.tls.write() {
                    *g = (tokio_rustls::TlsAcceptor::from(Arc::new(cfg)), now());
                    tracing::info!("new HTTPS server certificate");
                }
            }
            Err(e) => tracing::error!("cannot renew the HTTPS server certificate: {e}"),
        }
    }
}

struct CrlCache {
    version: u64,
    made_at: i64,
    der: Vec<u8>,
    pem: String,
}

/// Listeners bound and ready to serve.
pub struct Server {
    state: Arc<State>,
    https: TcpListener,
    legacy: Option<TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("https", &self.https.local_addr().ok()).finish()
    }
}

/// Default names of the server certificate: localhost, the loopback
/// addresses, the host name, and this machine's other addresses (so that
/// `https://[ADDRESS]:8443` works without `--name`; link-local ones are
/// left out).
pub fn default_server_names() -> Vec<String> {
    let mut v = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            v.push(h.to_string());
        }
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address else { continue };
            let ip = if let Some(s6) = sa.as_sockaddr_in6() {
                let ip = s6.ip();
                if ip.is_loopback() || ip.segments()[0] & 0xffc0 == 0xfe80 {
                    continue;
                }
                ip.to_string()
            } else if let Some(s4) = sa.as_sockaddr_in() {
                let ip = s4.ip();
                if ip.is_loopback() || ip.is_link_local() {
                    continue;
                }
                ip.to_string()
            } else {
                continue;
            };
            if !v.contains(&ip) {
                v.push(ip);
            }
        }
    }
    v
}

/// Client-certificate check: the chain must lead to the CA (rustls/webpki);
/// a certificate that expired less than the grace period ago is accepted
/// at the TLS level so that its node can still renew (the handlers refuse
/// it for everything else).
#[derive(Debug)]
struct GraceVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    grace_secs: i64,
}

impl rustls::server::danger::ClientCertVerifier for GraceVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error as E};
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Err(E::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let info = CertInfo::from_der(end_entity)
                    .map_err(|_| E::InvalidCertificate(CertificateError::BadEncoding))?;
                if (now.as_secs() as i64) > info.not_after.saturating_add(self.grace_secs)
                    || info.not_after < 1
                {
                    return Err(E::InvalidCertificate(CertificateError::Expired));
                }
                // Check everything else as of the last second of validity.
                let at = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                    (info.not_after - 1) as u64,
                ));
                self.inner.verify_client_cert(end_entity, intermediates, at)
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn tls_config(ctx: &Ctx, names: &[String]) -> Result<rustls::ServerConfig> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (cert, key) = ctx.ca.server_cert(names, now())?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ctx.ca.cert_der().to_vec()))
        .map_err(|e| Error::Certificate(format!("CA certificate: {e}")))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::Certificate(format!("client verifier: {e}")))?;
    let chain = vec![CertificateDer::from(cert), CertificateDer::from(ctx.ca.cert_der().to_vec())];
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Certificate(e.to_string()))?
        .with_client_cert_verifier(Arc::new(GraceVerifier {
            inner: verifier,
            grace_secs: i64::from(ctx.settings.grace_days) * 86400,
        }))
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
        .map_err(|e| Error::Certificate(format!("server certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

impl Server {
    /// Binds the listeners. The registry must have been opened (and its
    /// lock taken) by the caller, which hands over the connection.
    pub async fn bind(conn: Connection, ctx: Arc<Ctx>, opts: &ServeOptions) -> Result<Server> {
        reg::check_consistency(&conn, &ctx)?;
        let tls = tls_config(&ctx, &opts.server_names)?;
        let https = TcpListener::bind(opts.listen).await.map_err(|e| {
            Error::io(format!("cannot listen on {} (is another registry running?)", opts.listen), e)
        })?;
        let legacy = match opts.legacy_listen {
            Some(a) => {
                if ctx.ca.key_type() != crate::ca::KeyType::Rsa2048 {
                    tracing::warn!(
                        "the legacy re6st listener is on but the CA key is not RSA: re6st-conf sizes its RSA key like the CA key and will fail; init the registry with --key rsa2048 for re6st clients"
                    );
                }
                Some(TcpListener::bind(a).await.map_err(|e| Error::io(format!("cannot listen on {a}"), e))?)
            }
            None => None,
        };
        let writer = Writer::start(conn, ctx.clone())?;
        let state = Arc::new(State {
            writer,
            ctx,
            crl: Mutex::new(None),
            tls: std::sync::RwLock::new((tokio_rustls::TlsAcceptor::from(Arc::new(tls)), now())),
            server_names: opts.server_names.clone(),
            conns: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        });
        Ok(Server { state, https, legacy })
    }

    /// The HTTPS address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.https.local_addr().ok()
    }

    /// The legacy address actually bound.
    pub fn legacy_addr(&self) -> Option<SocketAddr> {
        self.legacy.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let Server { state, https, legacy } = self;
        tracing::info!(
            https = ?https.local_addr().ok(),
            legacy = ?legacy.as_ref().and_then(|l| l.local_addr().ok()),
            network = %state.ctx.settings.network,
            fingerprint = %state.ctx.ca.fingerprint(),
            "registry serving"
        );
        let sweeper = {
            let state = state.clone();
            tokio::spawn(async move {
                loop {
                    match state.writer.call(|c, ctx| reg::sweep(c, ctx, now())).await {
                        Ok(n) if n > 0 => tracing::info!(freed = n, "expired prefixes freed"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!("expiry sweep failed: {e}"),
                    }
                    state.rotate_server_cert_if_old();
                    tokio::time::sleep(SWEEP_INTERVAL).await;
                }
            })
        };
        let https_task = tokio::spawn(accept_loop(https, state.clone(), true));
        let legacy_task = legacy.map(|l| tokio::spawn(accept_loop(l, state.clone(), false)));
        shutdown.await;
        tracing::info!("registry stopping: no new connections; finishing requests in flight");
        sweeper.abort();
        https_task.abort();
        if let Some(t) = legacy_task {
            t.abort();
        }
        // Wait (a bounded time) until every connection has ended.
        let all = MAX_CONNECTIONS as u32;
        if tokio::time::timeout(DRAIN_TIMEOUT, state.conns.acquire_many(all)).await.is_err() {
            tracing::info!("stopped with idle connections still open");
        }
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, tls: bool) {
    loop {
        let Ok(permit) = state.conns.clone().acquire_owned().await else { return };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        let tls = if tls {
            match state.acceptor() {
                Some(a) => Some(a),
                None => continue,
            }
        } else {
            None
        };
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            match tls {
                Some(tls) => serve_tls(stream, peer, state, tls).await,
                None => serve_plain(stream, state).await,
            }
        });
    }
}

async fn serve_tls(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    tls: tokio_rustls::TlsAcceptor,
) {
    // Something that is not a TLS handshake gets a plain-text 400 saying so.
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) => {
            let body = error_json("not_tls", "this port speaks HTTPS (TLS): use https://");
            let msg = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(msg.as_bytes()).await;
            let _ = stream.shutdown().await;
            return;
        }
        _ => return,
    }
    let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let client_serial = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| CertInfo::from_der(c).ok())
        .map(|i| i.serial);
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let serial = client_serial.clone();
        async move { Ok::<_, std::convert::Infallible>(handle_api(state, serial, req).await) }
    });
    let io = hyper_util::rt::TokioIo::new(tls_stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc)
        .await;
}

async fn serve_plain(stream: TcpStream, state: Arc<State>) {
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(handle_legacy(state, req).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc)
        .await;
}

// ---------------------------------------------------------------------------
// Responses

type Resp = Response<Full<Bytes>>;

fn error_json(code: &str, message: &str) -> String {
    let mut s = serde_json::json!({ "error": code, "message": message }).to_string();
    s.push('\n');
    s
}

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

fn json<T: Serialize>(status: u16, v: &T) -> Resp {
    let mut s = serde_json::to_string(v).unwrap_or_default();
    s.push('\n');
    respond(status, "application/json", s)
}

fn err(status: u16, code: &str, message: &str) -> Resp {
    respond(status, "application/json", error_json(code, message))
}

fn from_error(e: &Error) -> Resp {
    let status = e.http_status();
    if status >= 500 {
        tracing::error!("request failed: {e}");
    } else {
        tracing::debug!("request refused: {e}");
    }
    // Internal details stay in the log.
    let msg = if status >= 500 && !matches!(e, Error::Exhausted(_)) {
        "internal error: the registry logged the details".to_string()
    } else {
        e.to_string()
    };
    err(status, e.code(), &msg)
}

async fn read_body(req: Request<Incoming>) -> std::result::Result<Bytes, Resp> {
    if let Some(len) =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && len > MAX_BODY
    {
        return Err(err(413, "too_large", &format!("the body is larger than {MAX_BODY} bytes")));
    }
    let read =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Limited::new(req.into_body(), MAX_BODY).collect()).await;
    let Ok(read) = read else {
        return Err(err(408, "timeout", "the request body did not arrive in time"));
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(err(413, "too_large", &format!("the body is larger than {MAX_BODY} bytes")))
        }
        Err(_) => Err(err(400, "bad_request", "the request body could not be read")),
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> std::result::Result<T, Resp> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = format!("the body is not the expected JSON: {e}");
        err(400, "bad_request", &msg.replace('\n', " "))
    })
}

// ---------------------------------------------------------------------------
// The /v1 API

/// Body of `POST /v1/enroll`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The token from `registry token add`.
    pub token: String,
    /// PEM CSR; may carry the tunnel key as SAN URI `sixmesh:wg:<base64>`.
    pub csr: String,
}

/// Body of `POST /v1/renew`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PEM CSR for the (possibly new) key.
    pub csr: String,
}

/// Body of `PUT /v1/endpoints`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsRequest {
    /// `ip:port` endpoints where the node's tunnel socket is reachable.
    pub endpoints: Vec<String>,
}

/// Answer of `GET /v1/bootstrap`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BootstrapResponse {
    /// A random sample of live peers.
    pub peers: Vec<reg::Peer>,
}

/// Answer of `GET /v1/ca`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CaResponse {
    /// The CA certificate, PEM.
    pub ca: String,
    /// `sha256:<hex>` of its DER.
    pub fingerprint: String,
}

/// A handler's outcome: the answer, or an error answer (`?` works on both).
type Answer = std::result::Result<Resp, Resp>;

/// Reads and decodes a JSON body.
async fn json_body<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> std::result::Result<T, Resp> {
    parse_json(&read_body(req).await?)
}

/// A 200 JSON answer, or the error's answer.
fn reply<T: Serialize>(r: Result<T>) -> Answer {
    r.map(|v| json(200, &v)).map_err(|e| from_error(&e))
}

/// Parses and checks a CSR, as an answer.
fn csr_of(pem: &str) -> std::result::Result<Csr, Resp> {
    Csr::from_pem(pem).map_err(|e| from_error(&e))
}

async fn handle_api(state: Arc<State>, client_serial: Option<String>, req: Request<Incoming>) -> Resp {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = route_api(state, client_serial, req).await.unwrap_or_else(|r| r);
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    resp
}

async fn route_api(state: Arc<State>, client_serial: Option<String>, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err(if path.starts_with("/v") {
            err(404, "unknown_version", "this registry speaks API version 1: use /v1/...")
        } else {
            err(404, "not_found", "unknown path: the API lives under /v1/ (see docs/registry-api.md)")
        });
    };
    let need_cert = || -> std::result::Result<String, Resp> {
        client_serial.clone().ok_or_else(|| {
            err(401, "unauthorized", "this call needs the node's client certificate (mutual TLS)")
        })
    };
    if let Some(sub) = rest.strip_prefix("admin/") {
        return Ok(handle_admin(state, need_cert()?, sub.to_string(), req).await);
    }
    let w = &state.writer;
    match (method.clone(), rest) {
        (Method::GET, "health") => {
            let (version, _) = w.call(|c, _| reg::current_config(c)).await.map_err(|e| from_error(&e))?;
            Ok(json(
                200,
                &serde_json::json!({
                    "status": "ok",
                    "network": state.ctx.settings.network.to_string(),
                    "config_version": version,
                }),
            ))
        }
        (Method::GET, "ca") => Ok(json(
            200,
            &CaResponse { ca: state.ctx.ca.cert_pem().to_string(), fingerprint: state.ctx.ca.fingerprint() },
        )),
        (Method::GET, "ca.pem") => {
            Ok(respond(200, "application/x-pem-file", state.ctx.ca.cert_pem().to_string()))
        }
        (Method::GET, "crl" | "crl.pem") => {
            let (der, pem) = crl(&state).await.map_err(|e| from_error(&e))?;
            Ok(if rest == "crl" {
                respond(200, "application/pkix-crl", der)
            } else {
                respond(200, "application/x-pem-file", pem)
            })
        }
        (Method::GET, "network-config") => {
            reply(w.call(|c, _| reg::current_config(c)).await.map(|(_, doc)| doc))
        }
        (Method::POST, "enroll") => {
            let r: EnrollRequest = json_body(req).await?;
            let csr = csr_of(&r.csr)?;
            reply(w.call(move |c, ctx| reg::enroll(c, ctx, now(), &r.token, &csr, NodeKind::Sixmesh)).await)
        }
        (Method::POST, "renew") => {
            let serial = need_cert()?;
            let r: RenewRequest = json_body(req).await?;
            let csr = csr_of(&r.csr)?;
            reply(w.call(move |c, ctx| reg::renew(c, ctx, now(), &serial, &csr)).await)
        }
        (Method::PUT, "endpoints") => {
            let serial = need_cert()?;
            let r: EndpointsRequest = json_body(req).await?;
            w.call(move |c, _| {
                let t = now();
                let (id, _) = reg::authenticate(c, &serial, t)?;
                reg::report_endpoints(c, t, id, &r.endpoints)
            })
            .await
            .map_err(|e| from_error(&e))?;
            Ok(respond(204, "application/json", Bytes::new()))
        }
        (Method::GET, "bootstrap") => {
            let serial = need_cert()?;
            let count = match query_param(req.uri().query().unwrap_or(""), "count") {
                None => 8,
                Some(c) => match c.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => n,
                    _ => return Err(err(400, "bad_request", "count must be a number from 1 to 64")),
                },
            };
            let peers = w
                .call(move |c, _| {
                    let t = now();
                    let (id, _) = reg::authenticate(c, &serial, t)?;
                    reg::bootstrap(c, t, id, count, ENDPOINT_MAX_AGE_SECS)
                })
                .await;
            reply(peers.map(|peers| BootstrapResponse { peers }))
        }
        (
            _,
            "health" | "ca" | "ca.pem" | "crl" | "crl.pem" | "network-config" | "enroll" | "renew"
            | "endpoints" | "bootstrap",
        ) => Err(err(405, "method_not_allowed", &format!("{method} is not allowed on /v1/{rest}"))),
        _ => Err(err(404, "not_found", &format!("no such API call /v1/{rest} (see docs/registry-api.md)"))),
    }
}

/// Body of `POST /v1/admin/tokens`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokensRequest {
    /// Email recorded with the node.
    #[serde(default)]
    pub email: Option<String>,
    /// Node prefix length (default: the network's).
    #[serde(default)]
    pub prefix_len: Option<u8>,
    /// Lifetime, seconds (default 7 days).
    #[serde(default)]
    pub expires_secs: Option<i64>,
    /// How many (default 1, at most 1000).
    #[serde(default)]
    pub count: Option<usize>,
}

/// Body of `POST /v1/admin/revoke`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRevokeRequest {
    /// Node prefix, re6st CN or certificate serial.
    pub target: String,
}

/// The admin API: every call needs an administrator's client certificate
/// (`sixmesh registry admin add`), checked against the database.
async fn handle_admin(state: Arc<State>, serial: String, sub: String, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = if method == Method::POST {
        match read_body(req).await {
            Ok(b) => Some(b),
            Err(r) => return r,
        }
    } else {
        None
    };
    let auth = move |c: &Connection| reg::authenticate_admin(c, &serial, now()).map(|n| format!("admin:{n}"));
    macro_rules! run {
        ($f:expr) => {
            match state
                .writer
                .call(move |c, ctx| {
                    let actor = auth(c)?;
                    #[allow(clippy::redundant_closure_call)]
                    ($f)(c, ctx, actor)
                })
                .await
            {
                Ok(v) => json(200, &v),
                Err(e) => from_error(&e),
            }
        };
    }
    match (method, sub.as_str()) {
        (Method::GET, "nodes") => run!(|c: &Connection, _: &Ctx, _a: String| reg::list_nodes(c)),
        (Method::GET, "node") => {
            let Some(target) = query_param(&query, "target") else {
                return err(400, "bad_request", "give ?target=PREFIX|SERIAL");
            };
            run!(move |c: &Connection, ctx: &Ctx, _a: String| reg::show_node(c, ctx, &target))
        }
        (Method::GET, "tokens") => run!(|c: &Connection, _: &Ctx, _a: String| reg::list_tokens(c)),
        (Method::GET, "audit") => {
            let limit =
                query_param(&query, "limit").and_then(|l| l.parse().ok()).unwrap_or(100usize).min(10_000);
            run!(move |c: &Connection, _: &Ctx, _a: String| reg::audit_tail(c, limit))
        }
        (Method::POST, "tokens") => {
            let r: AdminTokensRequest = match parse_json(body.as_deref().unwrap_or_default()) {
                Ok(r) => r,
                Err(r) => return r,
            };
            let count = r.count.unwrap_or(1);
            if count == 0 || count > 1000 {
                return err(400, "bad_request", "count must be from 1 to 1000");
            }
            let opts = reg::TokenOptions {
                email: r.email,
                prefix_len: r.prefix_len,
                expires_secs: r.expires_secs.unwrap_or(reg::DEFAULT_TOKEN_EXPIRY_SECS),
                count,
            };
            run!(move |c: &Connection, ctx: &Ctx, actor: String| {
                let t = reg::add_tokens(c, ctx, now(), &opts)?;
                crate::db::audit(c, now(), &actor, "api-token-add", &t.len().to_string(), "")?;
                Ok(serde_json::json!({ "tokens": t }))
            })
        }
        (Method::DELETE, "tokens") => {
            let Some(id) = query_param(&query, "id") else {
                return err(400, "bad_request", "give ?id=TOKEN_ID");
            };
            run!(move |c: &Connection, _: &Ctx, _a: String| {
                reg::delete_token(c, now(), &id).map(|n| serde_json::json!({ "deleted": n }))
            })
        }
        (Method::POST, "revoke") => {
            let r: AdminRevokeRequest = match parse_json(body.as_deref().unwrap_or_default()) {
                Ok(r) => r,
                Err(r) => return r,
            };
            run!(move |c: &Connection, ctx: &Ctx, actor: String| reg::revoke(
                c,
                ctx,
                now(),
                &r.target,
                &actor
            ))
        }
        (_, "nodes" | "node" | "tokens" | "audit" | "revoke") => {
            err(405, "method_not_allowed", &format!("method not allowed on /v1/admin/{sub}"))
        }
        _ => err(404, "not_found", &format!("no such admin call /v1/admin/{sub}")),
    }
}

async fn crl(state: &Arc<State>) -> Result<(Vec<u8>, String)> {
    let t = now();
    let (version, revoked) =
        state.writer.call(move |c, _| Ok((reg::current_config(c)?.0, reg::revoked(c, t)?))).await?;
    {
        let cache = state.crl.lock().map_err(|_| Error::Internal("CRL cache poisoned".into()))?;
        if let Some(c) = cache.as_ref()
            && c.version == version
            && t - c.made_at < 3600
        {
            return Ok((c.der.clone(), c.pem.clone()));
        }
    }
    let (der, pem) = state.ctx.ca.crl(&revoked, version, t, CRL_VALIDITY_SECS)?;
    if let Ok(mut cache) = state.crl.lock() {
        *cache = Some(CrlCache { version, made_at: t, der: der.clone(), pem: pem.clone() });
    }
    Ok((der, pem))
}

// ---------------------------------------------------------------------------
// The re6st-compatible listener

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The value of `name` in a URL-encoded query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k)? == name).then(|| percent_decode(v)).flatten()
    })
}

async fn handle_legacy(state: Arc<State>, req: Request<Incoming>) -> Resp {
    if req.method() != Method::GET {
        return err(405, "method_not_allowed", "the re6st API is GET only");
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.uri().path().rsplit('/').next().unwrap_or("").to_string();
    match method.as_str() {
        "getCa" => respond(200, "application/x-pem-file", state.ctx.ca.cert_pem().to_string()),
        "requestToken" => err(
            403,
            "forbidden",
            "email registration is disabled: ask the registry operator for a token (`sixmesh registry token add`)",
        ),
        "requestCertificate" => {
            let token = query_param(&query, "token").unwrap_or_default();
            if token.is_empty() {
                return err(403, "forbidden", "anonymous registration is disabled: use a token");
            }
            let Some(req_pem) = query_param(&query, "req") else {
                return err(400, "bad_request", "missing req (the PEM certificate request)");
            };
            let csr = match Csr::from_pem(&req_pem) {
                Ok(c) => c,
                Err(e) => return from_error(&e),
            };
            match state
                .writer
                .call(move |c, ctx| reg::enroll(c, ctx, now(), &token, &csr, NodeKind::Re6st))
                .await
            {
                Ok(e) => respond(200, "application/x-pem-file", e.certificate),
                // re6st-conf reads an empty 204 as "invalid or expired token".
                Err(Error::BadToken) => respond(204, "text/plain", Bytes::new()),
                Err(e) => from_error(&e),
            }
        }
        "hello" | "getDh" | "getNetworkConfig" | "getBootstrapPeer" | "getCountry" | "renewCertificate" => {
            err(
                403,
                "forbidden",
                "this re6st call is not served by sixmesh: only getCa, requestToken and requestCertificate are",
            )
        }
        _ => err(404, "not_found", "unknown re6st method"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_client_certificates_pass_tls_only_within_the_grace_period() {
        use rustls::server::danger::ClientCertVerifier as _;
        use rustls_pki_types::{CertificateDer, UnixTime};
        let t = now();
        let net = crate::prefix::Network::new("fd00:5::/48".parse().unwrap()).unwrap();
        let (ca, _) = crate::ca::Ca::create(&net, crate::ca::KeyType::EcdsaP256, t - 10 * 86400).unwrap();
        let key = crate::ca::generate_key(crate::ca::KeyType::EcdsaP256).unwrap();
        let csr = Csr::from_pem(&crate::ca::make_csr(&key, None).unwrap()).unwrap();
        let spec = crate::ca::NodeCertSpec {
            cn: "fd00:5::/64".into(),
            subject_serial: None,
            mesh_address: "fd00:5::1".parse().unwrap(),
            tunnel_key: None,
            not_before: t - 3 * 86400,
            not_after: t - 86400,
        };
        let cert =
            CertificateDer::from(crate::ca::pem_to_der(&ca.sign_node(&csr, &spec).unwrap().pem).unwrap());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der().to_vec())).unwrap();
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .unwrap();
        let at = UnixTime::since_unix_epoch(Duration::from_secs(t as u64));
        let within = GraceVerifier { inner: inner.clone(), grace_secs: 2 * 86400 };
        assert!(within.verify_client_cert(&cert, &[], at).is_ok());
        let past = GraceVerifier { inner, grace_secs: 3600 };
        assert!(past.verify_client_cert(&cert, &[], at).is_err());
    }

    #[test]
    fn query_strings_decode_like_python_urlencode() {
        let q = "token=ab+c&req=-----BEGIN%0Ax%2By%3D&location=&ip=";
        assert_eq!(query_param(q, "token").as_deref(), Some("ab c"));
        assert_eq!(query_param(q, "req").as_deref(), Some("-----BEGIN\nx+y="));
        assert_eq!(query_param(q, "location").as_deref(), Some(""));
        assert_eq!(query_param(q, "nope"), None);
        assert_eq!(query_param("a=%zz", "a"), None, "bad escapes are refused, not panicked on");
        assert_eq!(query_param("a=%4", "a"), None);
    }
}
