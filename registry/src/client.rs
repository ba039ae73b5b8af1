//! The node side: `sixmesh join` (enroll), renewal, endpoint reports and
//! bootstrap peers. The node daemon reuses these functions.
//!
//! # Files in the node's state directory
//! | file | mode | what |
//! | --- | --- | --- |
//! | `node.key` | 0600 | the node's TLS private key (PKCS#8 PEM, ECDSA P-256) |
//! | `tunnel.key` | 0600 | the X25519 tunnel private key, standard base64 of 32 bytes |
//! | `node.pem` | 0644 | the node certificate |
//! | `ca.pem` | 0644 | the registry CA certificate (pinned) |
//! | `prefix` | 0644 | the node prefix, e.g. `fd12:3456:789a:1::/64` |
//! | `network.json` | 0644 | the signed network config (see [`crate::netconfig`]) |
//! | `registry.json` | 0644 | `{"url": ..., "ca_fingerprint": ...}` for renewals |
//! | `crl.pem` | 0644 | the CA's CRL, signature checked (`refresh_crl`) |
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of
//! the directory). A renewal makes a new TLS key in `node.key.next` first and
//! moves it over `node.key` only after the new `node.pem` is in place; a
//! crash in between is repaired at the next start, and a renewal whose
//! answer was lost is retried with the same key, which the registry answers
//! with the same certificate.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use rcgen::{KeyPair, PublicKeyData as _};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ca::{self, CertInfo, KeyType, fingerprint, hex, pem_to_der};
use crate::error::{Error, Result};
use crate::netconfig::{NetworkConfig, SignedConfig};
use crate::registry::{Enrolled, Peer, create_private_dir, now, sync_dir, write_atomic};
use crate::server::{BootstrapResponse, CaResponse, EndpointsRequest, EnrollRequest, RenewRequest};

pub use hyper::Method;

/// Default state directory of a node.
pub const DEFAULT_NODE_STATE_DIR: &str = "/var/lib/sixmesh";
/// File names in the node's state directory.
pub mod files {
    /// TLS private key.
    pub const KEY: &str = "node.key";
    /// New TLS key during a renewal.
    pub const KEY_NEXT: &str = "node.key.next";
    /// Tunnel private key.
    pub const TUNNEL_KEY: &str = "tunnel.key";
    /// Node certificate.
    pub const CERT: &str = "node.pem";
    /// CA certificate.
    pub const CA: &str = "ca.pem";
    /// Node prefix.
    pub const PREFIX: &str = "prefix";
    /// Signed network config.
    pub const NETWORK: &str = "network.json";
    /// Registry URL and CA fingerprint.
    pub const REGISTRY: &str = "registry.json";
    /// The CA's CRL, PEM (written by `refresh_crl`).
    pub const CRL: &str = "crl.pem";
}

const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_RESPONSE: usize = 1024 * 1024;

/// Options of `sixmesh join`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// `https://HOST:PORT`.
    pub registry: String,
    /// The enrollment token.
    pub token: String,
    /// Expected `sha256:<hex>` of the CA certificate.
    pub ca_fingerprint: Option<String>,
    /// Accept whatever CA the registry presents (warned about).
    pub trust_on_first_use: bool,
    /// The node's state directory.
    pub state_dir: PathBuf,
}

/// What a join or renewal left in the state directory.
#[derive(Debug, Clone, Serialize)]
pub struct NodeIdentity {
    /// The node prefix.
    pub prefix: String,
    /// The node's mesh address.
    pub mesh_address: Ipv6Addr,
    /// Serial of the current certificate.
    pub serial: String,
    /// Expiry of the current certificate, unix time.
    pub not_after: i64,
    /// When renewal is due (2/3 of the lifetime), unix time.
    pub renew_after: i64,
    /// `sha256:<hex>` of the pinned CA.
    pub ca_fingerprint: String,
    /// Whether the node was already enrolled (nothing was requested).
    pub already_enrolled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RegistryFile {
    url: String,
    ca_fingerprint: String,
}

/// `https://host:port` split up.
#[derive(Debug, Clone)]
struct Url {
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Url> {
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        Error::BadRequest(format!(
            "{url:?}: the registry URL must start with https:// (e.g. https://registry:8443)"
        ))
    })?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or_else(|| Error::BadRequest(format!("{url:?}: unclosed '['")))?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.to_string(), "443"),
        }
    };
    let port = port.parse().map_err(|_| Error::BadRequest(format!("{url:?}: bad port {port:?}")))?;
    if host.is_empty() {
        return Err(Error::BadRequest(format!("{url:?}: no host")));
    }
    Ok(Url { host, port })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server certificate: only used to fetch the CA certificate,
/// whose fingerprint is then checked; no secret travels on it.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Certificate(format!("TLS set-up: {e}"))
}

/// A TLS client configuration that trusts only `ca_pem`, optionally
/// presenting the node's certificate.
fn pinned_config(ca_pem: &str, client: Option<(&str, &str)>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pem_to_der(ca_pem)?)).map_err(tls_err)?;
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls_err)?;
            b.with_client_auth_cert(vec![CertificateDer::from(pem_to_der(cert_pem)?)], key)
                .map_err(tls_err)?
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

fn insecure_config() -> Result<rustls::ClientConfig> {
    let p = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(p)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// One HTTPS request; returns `(status, body)`.
async fn request(
    cfg: rustls::ClientConfig,
    url: &Url,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Bytes)> {
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| Error::Remote(format!("cannot connect to {}:{}: {e}", url.host, url.port)))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(url.host.clone())
            .map_err(|_| Error::BadRequest(format!("{:?} is not a valid host name", url.host)))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| Error::Remote(format!("TLS with {}:{} failed: {e}", url.host, url.port)))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| Error::Remote(format!("HTTP: {e}")))?;
        tokio::spawn(conn);
        let host = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", host);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| Error::Remote(format!("HTTP: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| Error::Remote(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .map_err(|_| Error::Remote(format!("{}:{} did not answer in time", url.host, url.port)))?
}

/// Decodes a JSON answer, or turns an error answer into [`Error::Refused`].
fn decode<T: for<'de> Deserialize<'de>>(status: u16, body: &[u8]) -> Result<T> {
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect());
        return Err(Error::Refused { status, message });
    }
    serde_json::from_slice(body)
        .map_err(|e| Error::Remote(format!("the registry's answer is not what sixmesh expects: {e}")))
}

fn normalize_fingerprint(f: &str) -> Result<String> {
    let hexpart = f.trim().strip_prefix("sha256:").unwrap_or(f.trim()).replace(':', "").to_ascii_lowercase();
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::BadRequest(format!(
            "{f:?} is not a CA fingerprint: give sha256:<64 hex digits> as printed by `sixmesh registry init`"
        )));
    }
    Ok(format!("sha256:{hexpart}"))
}

fn read(dir: &Path, name: &str) -> Result<Option<String>> {
    match std::fs::read_to_string(dir.join(name)) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}", dir.join(name).display()), e)),
    }
}

fn spki_hash(key: &KeyPair) -> String {
    hex(&Sha256::digest(key.subject_public_key_info()))
}

/// Finishes an interrupted renewal: moves `node.key.next` over `node.key`
/// if `node.pem` was already renewed for it, or drops it.
fn recover(dir: &Path) -> Result<()> {
    let Some(next) = read(dir, files::KEY_NEXT)? else { return Ok(()) };
    let matches = match (KeyPair::from_pem(&next), read(dir, files::CERT)?) {
        (Ok(k), Some(cert)) => {
            CertInfo::from_pem(&cert).map(|c| c.spki_sha256 == spki_hash(&k)).unwrap_or(false)
        }
        _ => false,
    };
    if matches {
        std::fs::rename(dir.join(files::KEY_NEXT), dir.join(files::KEY))
            .map_err(|e| Error::io("cannot finish the interrupted renewal", e))?;
        tracing::info!("finished an interrupted renewal (new key moved in place)");
        sync_dir(dir)?;
    }
    // Otherwise the renewal is pending: the next `renew` reuses that key, so
    // that the registry can answer it again if its answer was lost.
    Ok(())
}

fn load_or_make_tunnel_key(dir: &Path) -> Result<[u8; 32]> {
    if let Some(s) = read(dir, files::TUNNEL_KEY)? {
        let secret = ca::parse_tunnel_key(&s).map_err(|_| {
            Error::BadRequest(format!(
                "{} is damaged: move it away to make a new one",
                dir.join(files::TUNNEL_KEY).display()
            ))
        })?;
        return Ok(x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes());
    }
    let mut b = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    let secret = x25519_dalek::StaticSecret::from(b);
    write_atomic(
        &dir.join(files::TUNNEL_KEY),
        format!("{}\n", B64.encode(secret.to_bytes())).as_bytes(),
        0o600,
    )?;
    Ok(x25519_dalek::PublicKey::from(&secret).to_bytes())
}

/// The identity in `dir`, if the node has enrolled.
pub fn load_identity(dir: &Path) -> Result<Option<NodeIdentity>> {
    let (Some(cert), Some(ca_pem), Some(key)) =
        (read(dir, files::CERT)?, read(dir, files::CA)?, read(dir, files::KEY)?)
    else {
        return Ok(None);
    };
    let info = CertInfo::from_pem(&cert)?;
    let key = KeyPair::from_pem(&key)
        .map_err(|e| Error::Certificate(format!("{}: {e}", dir.join(files::KEY).display())))?;
    if info.spki_sha256 != spki_hash(&key) {
        return Err(Error::Certificate(format!(
            "{} does not match {}: the state directory is damaged; move it away and join again",
            dir.join(files::CERT).display(),
            dir.join(files::KEY).display()
        )));
    }
    let prefix = read(dir, files::PREFIX)?.unwrap_or_default().trim().to_string();
    let mesh_address = info
        .mesh_address
        .or_else(|| prefix.parse::<crate::prefix::Ipv6Prefix>().ok().map(|p| p.first_host()))
        .unwrap_or(Ipv6Addr::UNSPECIFIED);
    Ok(Some(NodeIdentity {
        prefix,
        mesh_address,
        serial: info.serial.clone(),
        not_after: info.not_after,
        renew_after: renew_after(&info),
        ca_fingerprint: fingerprint(&pem_to_der(&ca_pem)?),
        already_enrolled: true,
    }))
}

/// When a certificate should be renewed: at 2/3 of its lifetime.
pub fn renew_after(info: &CertInfo) -> i64 {
    info.not_before + (info.not_after - info.not_before) * 2 / 3
}

/// Checks a fresh certificate against our key and the CA, then writes every
/// file. Returns the identity.
fn store(
    dir: &Path,
    e: &Enrolled,
    key: &KeyPair,
    url: &str,
    fp: &str,
    key_file: &str,
) -> Result<NodeIdentity> {
    let info = CertInfo::from_pem(&e.certificate)?;
    if info.spki_sha256 != spki_hash(key) {
        return Err(Error::Verification("the registry returned a certificate for another key".into()));
    }
    let ca_der = pem_to_der(&e.ca)?;
    if fingerprint(&ca_der) != fp {
        return Err(Error::Verification("the registry returned a different CA certificate".into()));
    }
    verify_chain(&ca_der, &pem_to_der(&e.certificate)?)?;
    let cfg = e.network_config.verify(&ca_der)?;
    let prefix: crate::prefix::Ipv6Prefix = e.prefix.parse()?;
    if !cfg.network.parse::<crate::prefix::Ipv6Prefix>()?.overlaps(&prefix)
        || info.mesh_address != Some(prefix.first_host())
    {
        return Err(Error::Verification(
            "the certificate's address is not the prefix's first address in the network".into(),
        ));
    }
    write_atomic(&dir.join(files::CA), e.ca.as_bytes(), 0o644)?;
    write_atomic(&dir.join(files::CERT), e.certificate.as_bytes(), 0o644)?;
    if key_file == files::KEY_NEXT {
        std::fs::rename(dir.join(files::KEY_NEXT), dir.join(files::KEY))
            .map_err(|e| Error::io("cannot move the new key in place", e))?;
        sync_dir(dir)?;
    }
    write_atomic(&dir.join(files::PREFIX), format!("{}\n", e.prefix).as_bytes(), 0o644)?;
    write_atomic(&dir.join(files::NETWORK), format!("{}\n", e.network_config.to_json()).as_bytes(), 0o644)?;
    let reg = RegistryFile { url: url.to_string(), ca_fingerprint: fp.to_string() };
    write_atomic(
        &dir.join(files::REGISTRY),
        format!("{}\n", serde_json::to_string(&reg).unwrap_or_default()).as_bytes(),
        0o644,
    )?;
    Ok(NodeIdentity {
        prefix: e.prefix.clone(),
        mesh_address: e.mesh_address,
        serial: info.serial.clone(),
        not_after: info.not_after,
        renew_after: renew_after(&info),
        ca_fingerprint: fp.to_string(),
        already_enrolled: false,
    })
}

/// Checks that `cert_der` is signed by the CA `ca_der`.
fn verify_chain(ca_der: &[u8], cert_der: &[u8]) -> Result<()> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| Error::Certificate(e.to_string()))?;
    let (_, c) = X509Certificate::from_der(cert_der).map_err(|e| Error::Certificate(e.to_string()))?;
    c.verify_signature(Some(ca.public_key()))
        .map_err(|_| Error::Verification("the certificate is not signed by the registry's CA".into()))
}

/// Fetches the registry's CA certificate and checks its fingerprint.
/// Returns `(PEM, fingerprint)`.
pub async fn fetch_ca(
    registry: &str,
    expected: Option<&str>,
    trust_on_first_use: bool,
) -> Result<(String, String)> {
    let url = parse_url(registry)?;
    let expected = expected.map(normalize_fingerprint).transpose()?;
    if expected.is_none() && !trust_on_first_use {
        return Err(Error::BadRequest(
            "no --ca-fingerprint given: ask the registry operator for it (`sixmesh registry init` prints it), or accept the risk with --trust-on-first-use".into(),
        ));
    }
    let (status, body) = request(insecure_config()?, &url, hyper::Method::GET, "/v1/ca", None).await?;
    let ca: CaResponse = decode(status, &body)?;
    let der = pem_to_der(&ca.ca)?;
    let got = fingerprint(&der);
    match expected {
        Some(want) if want != got => Err(Error::Verification(format!(
            "the registry's CA is {got}, not the expected {want}: wrong registry, or someone in the middle; nothing was sent"
        ))),
        Some(_) => Ok((ca.ca, got)),
        None => {
            tracing::warn!(fingerprint = %got, "trusting the registry's CA on first use: check this fingerprint with the operator");
            Ok((ca.ca, got))
        }
    }
}

/// `sixmesh join`: enrolls the node, or does nothing if it already is.
pub async fn join(opts: &JoinOptions) -> Result<NodeIdentity> {
    let dir = &opts.state_dir;
    create_private_dir(dir)?;
    recover(dir)?;
    if let Some(id) = load_identity(dir)? {
        if let Some(want) = opts.ca_fingerprint.as_deref() {
            let want = normalize_fingerprint(want)?;
            if want != id.ca_fingerprint {
                return Err(Error::Conflict(format!(
                    "{} is enrolled with another registry (CA {}): use another --state-dir",
                    dir.display(),
                    id.ca_fingerprint
                )));
            }
        }
        if id.not_after > now() {
            // Still valid, unless the registry revoked it.
            match refresh_network_config(dir).await {
                Ok(cfg) if cfg.revoked_serials.contains(&id.serial) => {
                    tracing::warn!(serial = %id.serial, "this node's certificate was revoked: enrolling again with new keys");
                    retire_identity(dir)?;
                }
                Ok(_) => {
                    tracing::info!(prefix = %id.prefix, "already enrolled; nothing to do");
                    return Ok(id);
                }
                Err(e) => {
                    tracing::warn!("already enrolled; could not check for revocation: {e}");
                    return Ok(id);
                }
            }
        } else {
            // Expired: renewing keeps the prefix if the grace period is not over.
            match renew(dir, true).await {
                Ok(Some(id)) => {
                    tracing::info!(prefix = %id.prefix, "the certificate had expired; renewed within the grace period");
                    return Ok(id);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    "the certificate in {} has expired and cannot be renewed ({e}): enrolling again",
                    dir.display()
                ),
            }
        }
    }
    let (ca_pem, fp) =
        fetch_ca(&opts.registry, opts.ca_fingerprint.as_deref(), opts.trust_on_first_use).await?;
    let tunnel_pub = load_or_make_tunnel_key(dir)?;
    let key = match read(dir, files::KEY)? {
        Some(pem) => KeyPair::from_pem(&pem)
            .map_err(|e| Error::Certificate(format!("{}: {e}", dir.join(files::KEY).display())))?,
        None => {
            let k = ca::generate_key(KeyType::EcdsaP256)?;
            write_atomic(&dir.join(files::KEY), k.serialize_pem().as_bytes(), 0o600)?;
            k
        }
    };
    let csr = ca::make_csr(&key, Some(&tunnel_pub))?;
    let body = serde_json::to_vec(&EnrollRequest { token: opts.token.trim().to_string(), csr })
        .map_err(|e| Error::Internal(e.to_string()))?;
    let url = parse_url(&opts.registry)?;
    let (status, resp) =
        request(pinned_config(&ca_pem, None)?, &url, hyper::Method::POST, "/v1/enroll", Some(body)).await?;
    let e: Enrolled = decode(status, &resp)?;
    let id = store(dir, &e, &key, &opts.registry, &fp, files::KEY)?;
    tracing::info!(prefix = %id.prefix, serial = %id.serial, "enrolled");
    if let Err(e) = refresh_crl(dir).await {
        tracing::warn!("enrolled, but could not fetch the CRL: {e}");
    }
    Ok(id)
}

/// Moves a revoked identity's files aside (`*.revoked`): its keys are not
/// reused.
fn retire_identity(dir: &Path) -> Result<()> {
    for f in [files::KEY, files::TUNNEL_KEY, files::CERT, files::KEY_NEXT] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::rename(&p, dir.join(format!("{f}.revoked")))
                .map_err(|e| Error::io(format!("cannot move {} aside", p.display()), e))?;
        }
    }
    sync_dir(dir)
}

struct Enrolment {
    url: String,
    fingerprint: String,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn load_enrolment(dir: &Path) -> Result<Enrolment> {
    recover(dir)?;
    let missing =
        || Error::NotFound(format!("{} holds no enrolment: run `sixmesh join` first", dir.display()));
    let reg: RegistryFile = serde_json::from_str(&read(dir, files::REGISTRY)?.ok_or_else(missing)?)
        .map_err(|e| Error::BadRequest(format!("{}: {e}", dir.join(files::REGISTRY).display())))?;
    Ok(Enrolment {
        url: reg.url,
        fingerprint: reg.ca_fingerprint,
        ca_pem: read(dir, files::CA)?.ok_or_else(missing)?,
        cert_pem: read(dir, files::CERT)?.ok_or_else(missing)?,
        key_pem: read(dir, files::KEY)?.ok_or_else(missing)?,
    })
}

/// Renews the node's certificate with a new TLS key (mTLS with the current
/// certificate). With `force == false`, does nothing before 2/3 of the
/// lifetime and returns `None`.
pub async fn renew(dir: &Path, force: bool) -> Result<Option<NodeIdentity>> {
    let en = load_enrolment(dir)?;
    let info = CertInfo::from_pem(&en.cert_pem)?;
    if !force && now() < renew_after(&info) {
        return Ok(None);
    }
    let tunnel_pub = load_or_make_tunnel_key(dir)?;
    // A pending renewal's key is reused (see `recover`).
    let key = match read(dir, files::KEY_NEXT)?.map(|p| KeyPair::from_pem(&p)) {
        Some(Ok(k)) => k,
        _ => {
            let k = ca::generate_key(KeyType::EcdsaP256)?;
            write_atomic(&dir.join(files::KEY_NEXT), k.serialize_pem().as_bytes(), 0o600)?;
            k
        }
    };
    let csr = ca::make_csr(&key, Some(&tunnel_pub))?;
    let body = serde_json::to_vec(&RenewRequest { csr }).map_err(|e| Error::Internal(e.to_string()))?;
    let cfg = pinned_config(&en.ca_pem, Some((&en.cert_pem, &en.key_pem)))?;
    let url = parse_url(&en.url)?;
    let result = async {
        let (status, resp) = request(cfg, &url, hyper::Method::POST, "/v1/renew", Some(body)).await?;
        let e: Enrolled = decode(status, &resp)?;
        store(dir, &e, &key, &en.url, &en.fingerprint, files::KEY_NEXT)
    }
    .await;
    if let Err(Error::Refused { status: 401 | 403, .. }) = &result {
        // The registry will not renew this certificate: the pending key is useless.
        let _ = std::fs::remove_file(dir.join(files::KEY_NEXT));
    }
    let id = result?;
    tracing::info!(prefix = %id.prefix, serial = %id.serial, "certificate renewed");
    Ok(Some(id))
}

/// Fetches, verifies and stores the network config if it is newer.
pub async fn refresh_network_config(dir: &Path) -> Result<NetworkConfig> {
    let en = load_enrolment(dir)?;
    let url = parse_url(&en.url)?;
    let (status, body) =
        request(pinned_config(&en.ca_pem, None)?, &url, hyper::Method::GET, "/v1/network-config", None)
            .await?;
    let doc: SignedConfig = decode(status, &body)?;
    let ca_der = pem_to_der(&en.ca_pem)?;
    let cfg = doc.verify(&ca_der)?;
    let held = read(dir, files::NETWORK)?
        .and_then(|s| SignedConfig::from_json(s.trim()).ok())
        .and_then(|d| d.verify(&ca_der).ok());
    if held.as_ref().is_none_or(|h| h.version < cfg.version) {
        write_atomic(&dir.join(files::NETWORK), format!("{}\n", doc.to_json()).as_bytes(), 0o644)?;
    } else if let Some(h) = held
        && h.version > cfg.version
    {
        return Err(Error::Verification(format!(
            "the registry sent config version {} but this node holds {}: refusing to go back",
            cfg.version, h.version
        )));
    }
    Ok(cfg)
}

/// Fetches the registry's CRL, checks its signature with the pinned CA,
/// and writes it to `crl.pem` (for TLS peers that take a CRL file). Returns
/// the revoked serials (lowercase hex).
pub async fn refresh_crl(dir: &Path) -> Result<Vec<String>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    use x509_parser::revocation_list::CertificateRevocationList;
    let en = load_enrolment(dir)?;
    let url = parse_url(&en.url)?;
    let (status, body) =
        request(pinned_config(&en.ca_pem, None)?, &url, hyper::Method::GET, "/v1/crl", None).await?;
    if status != 200 {
        decode::<serde_json::Value>(status, &body)?;
        return Err(Error::Remote(format!("the registry answered {status} for its CRL")));
    }
    let ca_der = pem_to_der(&en.ca_pem)?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| Error::Certificate(e.to_string()))?;
    let (_, crl) = CertificateRevocationList::from_der(&body)
        .map_err(|e| Error::Verification(format!("the registry's CRL cannot be parsed: {e}")))?;
    crl.verify_signature(ca.public_key())
        .map_err(|_| Error::Verification("the registry's CRL is not signed by the pinned CA".into()))?;
    let serials = crl.iter_revoked_certificates().map(|r| r.user_certificate.to_str_radix(16)).collect();
    let pem = crate::ca::der_to_pem("X509 CRL", &body);
    write_atomic(&dir.join(files::CRL), pem.as_bytes(), 0o644)?;
    Ok(serials)
}

/// Reports the node's tunnel endpoints (`ip:port`) to the registry.
pub async fn report_endpoints(dir: &Path, endpoints: Vec<String>) -> Result<()> {
    let en = load_enrolment(dir)?;
    let url = parse_url(&en.url)?;
    let body =
        serde_json::to_vec(&EndpointsRequest { endpoints }).map_err(|e| Error::Internal(e.to_string()))?;
    let cfg = pinned_config(&en.ca_pem, Some((&en.cert_pem, &en.key_pem)))?;
    let (status, resp) = request(cfg, &url, hyper::Method::PUT, "/v1/endpoints", Some(body)).await?;
    if status != 204 {
        decode::<serde_json::Value>(status, &resp)?;
    }
    Ok(())
}

/// Asks the registry for up to `count` bootstrap peers.
pub async fn bootstrap_peers(dir: &Path, count: usize) -> Result<Vec<Peer>> {
    let en = load_enrolment(dir)?;
    let url = parse_url(&en.url)?;
    let cfg = pinned_config(&en.ca_pem, Some((&en.cert_pem, &en.key_pem)))?;
    let (status, resp) =
        request(cfg, &url, hyper::Method::GET, &format!("/v1/bootstrap?count={count}"), None).await?;
    Ok(decode::<BootstrapResponse>(status, &resp)?.peers)
}

/// A raw API call with the CA pinned (tests, benchmarks, tools): returns
/// `(status, body)`.
pub async fn call(
    registry: &str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(u16, Vec<u8>)> {
    let url = parse_url(registry)?;
    let (s, b) = request(pinned_config(ca_pem, client)?, &url, method, path, body).await?;
    Ok((s, b.to_vec()))
}

/// Enrolls with a fresh key without touching any file (benchmarks, tests):
/// returns the answer and the key PEM.
pub async fn enroll_ephemeral(registry: &str, ca_pem: &str, token: &str) -> Result<(Enrolled, String)> {
    let key = ca::generate_key(KeyType::EcdsaP256)?;
    let csr = ca::make_csr(&key, None)?;
    let body = serde_json::to_vec(&EnrollRequest { token: token.to_string(), csr })
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (status, resp) = call(registry, ca_pem, None, hyper::Method::POST, "/v1/enroll", Some(body)).await?;
    Ok((decode(status, &resp)?, key.serialize_pem()))
}

/// Parses a PKCS#8 key PEM (helper for callers building TLS configs).
pub fn pkcs8_from_pem(pem: &str) -> Result<PrivatePkcs8KeyDer<'static>> {
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(tls_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_fingerprints() {
        let u = parse_url("https://[::1]:8443/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8443));
        let u = parse_url("https://reg.example:9000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("reg.example", 9000));
        assert_eq!(parse_url("https://reg").unwrap().port, 443);
        assert!(parse_url("http://reg:80").is_err());
        assert!(parse_url("https://[::1:80").is_err());
        let f = "AB".repeat(32);
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{f}")).unwrap(),
            format!("sha256:{}", "ab".repeat(32))
        );
        assert!(normalize_fingerprint("sha256:abcd").is_err());
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        let info = CertInfo {
            serial: "1".into(),
            cn: String::new(),
            mesh_address: None,
            tunnel_key: None,
            not_before: 0,
            not_after: 300,
            spki_sha256: String::new(),
        };
        assert_eq!(renew_after(&info), 200);
    }
}
