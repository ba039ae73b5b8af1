//! The stunnel-like TLS bridge (`sixmesh bridge run`): many tunnels in one
//! daemon, each either
//! - `client`: listens in plain TCP (e.g. `127.0.0.1:3306` for an
//!   IPv4-only program) and connects with TLS to a remote `[ipv6]:port`;
//! - `server`: listens with TLS (e.g. on a mesh address) and connects in
//!   plain TCP to a local service.
//!
//! Mutual TLS (rustls, TLS 1.3 and 1.2) with the node's registry
//! certificate or any PEM certificate, key and CA; the CRL is enforced;
//! each tunnel says which peers it allows. Certificates, keys, CA and CRL
//! are reloaded on SIGHUP and when their files change, without touching
//! established connections.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What went wrong setting the bridge up.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("bridge config: {0}")]
    Config(String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("tunnel {tunnel}: cannot listen on {addr}: {source}")]
    Listen {
        tunnel: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `bridge.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Certificate material (default: the node's, from `/var/lib/sixmesh`).
    #[serde(default)]
    pub tls: TlsFiles,
    /// A connection with no traffic either way for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// Most connections open at once, per tunnel.
    #[serde(default = "default_max")]
    pub max_connections: usize,
    /// TLS session resumption (TLS 1.3 tickets naming a server-side
    /// session cache, TLS 1.2 session IDs): a resumed handshake skips the
    /// certificate signatures and checks. Reloading the certificates
    /// empties both caches, so a peer revoked by a new CRL cannot resume.
    #[serde(default = "yes")]
    pub session_resumption: bool,
    /// Threads that carry connections (0: one per core). Each connection
    /// lives on one of them, both directions together, as with stunnel's
    /// thread per connection: handing a connection's wake-ups between
    /// threads cost more than the second core gave (see BENCHMARKS.md).
    #[serde(default)]
    pub workers: usize,
    #[serde(rename = "tunnel")]
    pub tunnels: Vec<TunnelConfig>,
}

impl BridgeConfig {
    /// Checks what serde cannot: at least one tunnel, readable `allow`
    /// rules, no two tunnels with the same name or listening address.
    pub fn validate(&self) -> Result<(), BridgeError> {
        if self.tunnels.is_empty() {
            return Err(BridgeError::Config("no [[tunnel]]: nothing to do".into()));
        }
        for (i, t) in self.tunnels.iter().enumerate() {
            for a in &t.allow {
                a.parse::<Allow>()
                    .map_err(|e| BridgeError::Config(format!("tunnel {}: allow {e}", t.name)))?;
            }
            for u in &self.tunnels[..i] {
                if u.name == t.name {
                    return Err(BridgeError::Config(format!("two tunnels are named {:?}", t.name)));
                }
                if u.listen == t.listen {
                    return Err(BridgeError::Config(format!(
                        "tunnels {} and {} both listen on {}",
                        u.name, t.name, t.listen
                    )));
                }
            }
        }
        Ok(())
    }
}

fn default_idle() -> u64 {
    3600
}
fn default_max() -> usize {
    1024
}
fn yes() -> bool {
    true
}

/// Sessions a server tunnel remembers for resumption (about 1 KiB each).
const SERVER_SESSIONS: usize = 4096;
/// Servers a client tunnel keeps tickets for.
const CLIENT_SESSIONS: usize = 256;

/// PEM files, or a node state directory (`node.pem`, `node.key`, `ca.pem`,
/// `crl.pem` written by `sixmesh join`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub state_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub crl: Option<PathBuf>,
}

/// A tunnel's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plain in, TLS out.
    Client,
    /// TLS in, plain out.
    Server,
}

/// One tunnel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    pub name: String,
    pub mode: Mode,
    pub listen: SocketAddr,
    pub connect: SocketAddr,
    /// Which peers may connect (server) or be connected to (client):
    /// `"any"` (any certificate of the CA), `"prefix:fd00:1::/64"` (its
    /// SAN IP or CN prefix lies inside), `"cn:NAME"`, `"san:NAME"` (a DNS or
    /// URI SAN). Empty: any.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Client mode: the name the server's certificate must carry (default:
    /// the IP address of `connect`).
    pub server_name: Option<String>,
}

/// A peer-allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    Any,
    Prefix(IpNet),
    Cn(String),
    San(String),
}

impl std::str::FromStr for Allow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            _ if s == "any" => Ok(Allow::Any),
            Some(("prefix", p)) => p.parse().map(Allow::Prefix).map_err(|e| format!("{s:?}: {e}")),
            Some(("cn", n)) => Ok(Allow::Cn(n.to_string())),
            Some(("san", n)) => Ok(Allow::San(n.to_string())),
            _ => Err(format!("{s:?}: use any, prefix:P, cn:NAME or san:NAME")),
        }
    }
}

/// What a peer certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub cn: String,
    pub ips: Vec<IpAddr>,
    pub names: Vec<String>,
    pub serial: String,
}

impl PeerIdentity {
    /// Reads the identity out of a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::*;
        let (_, c) = X509Certificate::from_der(der).ok()?;
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut id = PeerIdentity { cn, serial: c.raw_serial_as_string(), ..Default::default() };
        if let Ok(Some(san)) = c.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => id.ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?)),
                        16 => id.ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?)),
                        _ => {}
                    },
                    GeneralName::DNSName(d) => id.names.push(d.to_string()),
                    GeneralName::URI(u) => id.names.push(u.to_string()),
                    _ => {}
                }
            }
        }
        Some(id)
    }

    /// Whether any rule lets this peer through (no rule: yes).
    pub fn allowed_by(&self, rules: &[Allow]) -> bool {
        if rules.is_empty() {
            return true;
        }
        rules.iter().any(|r| match r {
            Allow::Any => true,
            Allow::Cn(n) => &self.cn == n,
            Allow::San(n) => self.names.iter().any(|x| x == n),
            Allow::Prefix(p) => {
                self.ips.iter().any(|ip| p.contains(ip))
                    || self
                        .cn
                        .parse::<IpNet>()
                        .is_ok_and(|c| p.contains(&c.network()) && c.prefix_len() >= p.prefix_len())
            }
        })
    }
}

/// Certificates loaded from disk, rebuilt on reload.
#[derive(Clone)]
struct Material {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    stamp: Vec<Option<SystemTime>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    /// The four paths in effect (CRL optional).
    pub fn resolve(&self) -> Result<(PathBuf, PathBuf, PathBuf, Option<PathBuf>), BridgeError> {
        let dir = self.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/sixmesh"));
        let pick = |p: &Option<PathBuf>, name: &str| p.clone().unwrap_or_else(|| dir.join(name));
        let crl = self.crl.clone().or_else(|| Some(dir.join("crl.pem")).filter(|p| p.exists()));
        Ok((pick(&self.cert, "node.pem"), pick(&self.key, "node.key"), pick(&self.ca, "ca.pem"), crl))
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        let Ok((c, k, a, r)) = self.resolve() else { return vec![] };
        [Some(c), Some(k), Some(a), r]
            .into_iter()
            .map(|p| p.and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()))
            .collect()
    }

    fn load(&self, resumption: bool) -> Result<Material, BridgeError> {
        let (cert, key, ca, crl) = self.resolve()?;
        let file_err = |p: &Path, e: &dyn std::fmt::Display| BridgeError::File {
            path: p.to_owned(),
            msg: e.to_string(),
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| file_err(&cert, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(&cert, &e))?;
        if chain.is_empty() {
            return Err(file_err(&cert, &"no certificate in it"));
        }
        let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| file_err(&key, &e))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).map_err(|e| file_err(&ca, &e))? {
            roots.add(c.map_err(|e| file_err(&ca, &e))?).map_err(|e| file_err(&ca, &e))?;
        }
        if roots.is_empty() {
            return Err(file_err(&ca, &"no CA certificate in it"));
        }
        let roots = Arc::new(roots);
        let crls: Vec<CertificateRevocationListDer<'static>> = match &crl {
            Some(p) => CertificateRevocationListDer::pem_file_iter(p)
                .map_err(|e| file_err(p, &e))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(p, &e))?,
            None => Vec::new(),
        };
        let tls = |e: &dyn std::fmt::Display| BridgeError::Tls(e.to_string());
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls.clone())
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| tls(&e))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| tls(&e))?;
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .with_crls(crls)
            .allow_unknown_revocation_status()
            .build()
            .map_err(|e| tls(&e))?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls(&e))?;
        // A new cache with every load: sessions of the old material (which a
        // new CRL may now revoke) are not resumed.
        if resumption {
            server.session_storage = rustls::server::ServerSessionMemoryCache::new(SERVER_SESSIONS);
            client.resumption = rustls::client::Resumption::in_memory_sessions(CLIENT_SESSIONS);
        } else {
            server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
            client.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Material {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            stamp: self.stamps(),
        })
    }
}

/// A metric: name, Prometheus type, help text, and how to read it.
type Series = (&'static str, &'static str, &'static str, fn(&Counters) -> u64);

/// Per-tunnel counters.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    /// Accepted connections whose handshake resumed a session.
    pub resumed: AtomicU64,
    pub refused: AtomicU64,
    pub active: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// A running bridge.
pub struct Bridge {
    /// The config file, read again by [`Bridge::reload`] (`None`: built
    /// from a config in code; a reload then reloads the certificates only).
    source: Option<PathBuf>,
    /// The config file's modification time when last read.
    source_stamp: Mutex<Option<SystemTime>>,
    cfg: RwLock<Arc<BridgeConfig>>,
    material: RwLock<Arc<Material>>,
    /// The listening tunnels, in config order.
    tunnels: RwLock<Vec<Arc<Live>>>,
    /// One reload at a time (SIGHUP and the file poll).
    reloading: tokio::sync::Mutex<()>,
    /// Connection threads, started by the first [`Bridge::run`].
    workers: OnceLock<Vec<Worker>>,
}

/// A listening tunnel. A reload that keeps its `listen` address keeps the
/// listener and the counters and swaps the rest of its configuration (new
/// connections see it; open ones go on as they started).
struct Live {
    listen: SocketAddr,
    cfg: RwLock<Arc<TunnelConfig>>,
    counters: Arc<Counters>,
    /// Bounds open connections (`max_connections`).
    limit: RwLock<Arc<Semaphore>>,
    /// Stops the accept loop (the tunnel was removed by a reload).
    accept: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Live {
    fn config(&self) -> Arc<TunnelConfig> {
        self.cfg.read().expect("not poisoned").clone()
    }

    fn stop(&self) {
        if let Some(a) = self.accept.lock().expect("not poisoned").take() {
            a.abort();
        }
    }
}

/// A connection's whole life, from the accepted socket to the close.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A thread running a single-threaded runtime that carries connections.
struct Worker {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    /// Connections on it now.
    load: Arc<AtomicUsize>,
}

impl Worker {
    fn start(n: usize) -> std::io::Result<Worker> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new().name(format!("bridge-{n}")).spawn(move || {
            rt.block_on(async move {
                while let Some(job) = rx.recv().await {
                    tokio::spawn(job);
                }
            })
        })?;
        Ok(Worker { jobs, load: Arc::new(AtomicUsize::new(0)) })
    }
}

impl Bridge {
    /// Checks the configuration and loads the certificates.
    pub fn new(cfg: BridgeConfig) -> Result<Arc<Self>, BridgeError> {
        Self::build(cfg, None, None)
    }

    /// Reads a `bridge.toml` and loads its certificates; [`Bridge::reload`]
    /// reads the file again.
    pub fn from_file(path: &Path) -> Result<Arc<Self>, BridgeError> {
        let (cfg, stamp) = read_config(path)?;
        Self::build(cfg, Some(path.to_owned()), stamp)
    }

    fn build(
        cfg: BridgeConfig,
        source: Option<PathBuf>,
        stamp: Option<SystemTime>,
    ) -> Result<Arc<Self>, BridgeError> {
        cfg.validate()?;
        let material = cfg.tls.load(cfg.session_resumption)?;
        Ok(Arc::new(Bridge {
            source,
            source_stamp: Mutex::new(stamp),
            material: RwLock::new(Arc::new(material)),
            cfg: RwLock::new(Arc::new(cfg)),
            tunnels: RwLock::new(Vec::new()),
            reloading: tokio::sync::Mutex::new(()),
            workers: OnceLock::new(),
        }))
    }

    /// Starts the connection threads (once).
    fn start_workers(&self) -> Result<(), BridgeError> {
        if self.workers.get().is_some() {
            return Ok(());
        }
        let n = match self.config().workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let workers = (0..n)
            .map(Worker::start)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| BridgeError::Config(format!("cannot start {n} connection threads: {e}")))?;
        let _ = self.workers.set(workers);
        Ok(())
    }

    /// Runs `job` on the least loaded connection thread (or here, if
    /// there are none).
    fn dispatch(&self, job: impl Future<Output = ()> + Send + 'static) {
        let Some(w) =
            self.workers.get().and_then(|ws| ws.iter().min_by_key(|w| w.load.load(Ordering::Relaxed)))
        else {
            tokio::spawn(job);
            return;
        };
        let load = w.load.clone();
        load.fetch_add(1, Ordering::Relaxed);
        let job: Job = Box::pin(async move {
            job.await;
            load.fetch_sub(1, Ordering::Relaxed);
        });
        // Fails only when the thread is gone (the process is ending).
        let _ = w.jobs.send(job);
    }

    fn current(&self) -> Arc<Material> {
        self.material.read().expect("not poisoned").clone()
    }

    fn config(&self) -> Arc<BridgeConfig> {
        self.cfg.read().expect("not poisoned").clone()
    }

    fn live(&self) -> Vec<Arc<Live>> {
        self.tunnels.read().expect("not poisoned").clone()
    }

    /// Reloads the certificates, key, CA and CRL of the current config.
    fn reload_material(&self) -> Result<(), BridgeError> {
        let cfg = self.config();
        let m = cfg.tls.load(cfg.session_resumption)?;
        *self.material.write().expect("not poisoned") = Arc::new(m);
        tracing::info!("bridge certificates reloaded");
        Ok(())
    }

    /// Reads the config file again (if the bridge came from one) and
    /// reloads certificates, key, CA and CRL. Tunnels whose `listen`
    /// address stays keep their listener and counters and take their new
    /// settings; new ones start listening; removed ones stop accepting.
    /// Open connections are never touched: they keep the settings and
    /// certificates they started with. All or nothing: if the new file is
    /// invalid, a certificate cannot be loaded or a new address cannot be
    /// bound, everything stays as it was and the error says why.
    pub async fn reload(self: &Arc<Self>) -> Result<(), BridgeError> {
        let _one = self.reloading.lock().await;
        let Some(path) = &self.source else { return self.reload_material() };
        let (cfg, stamp) = read_config(path)?;
        *self.source_stamp.lock().expect("not poisoned") = stamp;
        cfg.validate()?;
        let material = cfg.tls.load(cfg.session_resumption)?;
        if cfg.workers != self.config().workers {
            tracing::warn!("bridge config: a new `workers` takes effect at the next start");
        }
        let current = self.live();
        // Bind the new addresses before changing anything.
        let mut fresh = Vec::new();
        for t in &cfg.tunnels {
            if !current.iter().any(|l| l.listen == t.listen) {
                fresh.push((t.listen, bind(t).await?));
            }
        }
        *self.material.write().expect("not poisoned") = Arc::new(material);
        let max = cfg.max_connections.max(1);
        let max_changed = max != self.config().max_connections.max(1);
        let mut next = Vec::new();
        let (mut added, mut kept) = (0, 0);
        for t in &cfg.tunnels {
            if let Some(l) = current.iter().find(|l| l.listen == t.listen) {
                *l.cfg.write().expect("not poisoned") = Arc::new(t.clone());
                if max_changed {
                    *l.limit.write().expect("not poisoned") = Arc::new(Semaphore::new(max));
                }
                next.push(l.clone());
                kept += 1;
            } else if let Some(i) = fresh.iter().position(|(a, _)| *a == t.listen) {
                let (_, listener) = fresh.swap_remove(i);
                next.push(self.start_tunnel(t, listener, max));
                added += 1;
            }
        }
        let mut removed = 0;
        for l in &current {
            if !next.iter().any(|n| Arc::ptr_eq(n, l)) {
                l.stop();
                removed += 1;
                tracing::info!(tunnel = %l.config().name, listen = %l.listen,
                    "tunnel removed: no new connections, open ones go on");
            }
        }
        *self.cfg.write().expect("not poisoned") = Arc::new(cfg);
        *self.tunnels.write().expect("not poisoned") = next;
        tracing::info!(kept, added, removed, "bridge configuration and certificates reloaded");
        Ok(())
    }

    /// Reloads if the config file or any certificate file changed since it
    /// was last read. A file that fails to load is reported once, not
    /// every poll: the bridge goes on with what it has until the file
    /// changes again (or SIGHUP).
    pub async fn reload_if_changed(self: &Arc<Self>) {
        if let Some(path) = &self.source {
            let stamp = mtime(path);
            if stamp != *self.source_stamp.lock().expect("not poisoned") {
                if let Err(e) = self.reload().await {
                    *self.source_stamp.lock().expect("not poisoned") = stamp;
                    tracing::warn!(
                        "{} changed but cannot be used (keeping the running config): {e}",
                        path.display()
                    );
                }
                return;
            }
        }
        let cfg = self.config();
        if cfg.tls.stamps() != self.current().stamp {
            let _one = self.reloading.lock().await;
            if let Err(e) = self.reload_material() {
                // Remember the stamps, so that the warning is not repeated every poll.
                let mut m = (*self.current()).clone();
                m.stamp = cfg.tls.stamps();
                *self.material.write().expect("not poisoned") = Arc::new(m);
                tracing::warn!("certificate files changed but cannot be loaded (keeping the old ones): {e}");
            }
        }
    }

    /// Per-tunnel counters as JSON (for `sixmesh bridge status`).
    pub fn status_json(&self) -> String {
        let tunnels: Vec<String> = self
            .live()
            .iter()
            .map(|l| {
                let (t, c) = (l.config(), &l.counters);
                let name = &t.name;
                format!(
                    "{{\"name\":{name:?},\"mode\":\"{}\",\"listen\":\"{}\",\"connect\":\"{}\",\"accepted\":{},\"resumed\":{},\"refused\":{},\"active\":{},\"bytes_in\":{},\"bytes_out\":{}}}",
                    if t.mode == Mode::Client { "client" } else { "server" },
                    t.listen,
                    t.connect,
                    c.accepted.load(Ordering::Relaxed),
                    c.resumed.load(Ordering::Relaxed),
                    c.refused.load(Ordering::Relaxed),
                    c.active.load(Ordering::Relaxed),
                    c.bytes_in.load(Ordering::Relaxed),
                    c.bytes_out.load(Ordering::Relaxed),
                )
            })
            .collect();
        format!("{{\"tunnels\":[{}]}}", tunnels.join(","))
    }

    /// Per-tunnel counters in Prometheus's text format.
    pub fn metrics(&self) -> String {
        let mut m = String::new();
        let live = self.live();
        let series: [Series; 6] = [
            ("connections_total", "counter", "Connections accepted.", |c| c.accepted.load(Ordering::Relaxed)),
            ("resumed_total", "counter", "Accepted connections that resumed a TLS session.", |c| {
                c.resumed.load(Ordering::Relaxed)
            }),
            ("refused_total", "counter", "Connections refused (the log says why).", |c| {
                c.refused.load(Ordering::Relaxed)
            }),
            ("active_connections", "gauge", "Connections open now.", |c| c.active.load(Ordering::Relaxed)),
            ("received_bytes_total", "counter", "Bytes from the listening side.", |c| {
                c.bytes_in.load(Ordering::Relaxed)
            }),
            ("sent_bytes_total", "counter", "Bytes to the listening side.", |c| {
                c.bytes_out.load(Ordering::Relaxed)
            }),
        ];
        for (name, kind, help, get) in series {
            m.push_str(&format!(
                "# HELP sixmesh_bridge_{name} {help}\n# TYPE sixmesh_bridge_{name} {kind}\n"
            ));
            for l in &live {
                let (tunnel, c) = (&l.config().name, &l.counters);
                m.push_str(&format!("sixmesh_bridge_{name}{{tunnel={tunnel:?}}} {}\n", get(c)));
            }
        }
        m
    }

    /// Serves `status` on a Unix control socket (one JSON line per request line).
    pub async fn serve_control(self: Arc<Self>, listener: tokio::net::UnixListener) {
        use tokio::io::AsyncBufReadExt;
        while let Ok((stream, _)) = listener.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(_req)) = lines.next_line().await {
                    if w.write_all(format!("{}\n", me.status_json()).as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// Serves the Prometheus metrics over HTTP (any path).
    pub async fn serve_metrics(self: Arc<Self>, listener: TcpListener) {
        while let Ok((mut stream, _)) = listener.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let body = me.metrics();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
            });
        }
    }

    /// Binds every tunnel's listener and serves until the future ends
    /// (SIGHUP, or a changed config or certificate file, reloads).
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), BridgeError> {
        self.start_workers()?;
        let cfg = self.config();
        let mut listeners = Vec::new();
        for t in &cfg.tunnels {
            listeners.push(bind(t).await?);
        }
        let max = cfg.max_connections.max(1);
        let live = cfg.tunnels.iter().zip(listeners).map(|(t, l)| self.start_tunnel(t, l, max)).collect();
        *self.tunnels.write().expect("not poisoned") = live;
        let me = self.clone();
        let watcher = tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                        if let Err(e) = me.reload().await {
                            tracing::warn!("SIGHUP: cannot reload (keeping the running config and certificates): {e}");
                        }
                    }
                    _ = tick.tick() => me.reload_if_changed().await,
                }
            }
        });
        shutdown.await;
        watcher.abort();
        for l in self.live() {
            l.stop();
        }
        Ok(())
    }

    /// Starts accepting on a bound listener.
    fn start_tunnel(self: &Arc<Self>, t: &TunnelConfig, l: TcpListener, max: usize) -> Arc<Live> {
        tracing::info!(tunnel = %t.name, mode = ?t.mode, listen = %t.listen, connect = %t.connect, "tunnel ready");
        let live = Arc::new(Live {
            listen: t.listen,
            cfg: RwLock::new(Arc::new(t.clone())),
            counters: Arc::new(Counters::default()),
            limit: RwLock::new(Arc::new(Semaphore::new(max))),
            accept: Mutex::new(None),
        });
        let task = tokio::spawn(self.clone().accept_loop(live.clone(), l));
        *live.accept.lock().expect("not poisoned") = Some(task.abort_handle());
        live
    }

    async fn accept_loop(self: Arc<Self>, live: Arc<Live>, l: TcpListener) {
        loop {
            let (stream, from) = match l.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // E.g. out of file descriptors: wait instead of spinning.
                    tracing::warn!(listen = %live.listen, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let t = live.config();
            let limit = live.limit.read().expect("not poisoned").clone();
            let Ok(permit) = limit.try_acquire_owned() else {
                live.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(tunnel = %t.name, %from, "refused: too many connections");
                continue;
            };
            // Moved to a connection thread's own reactor there.
            let Ok(stream) = stream.into_std() else { continue };
            let me = self.clone();
            let c = live.counters.clone();
            self.dispatch(async move {
                let _permit = permit;
                let stream = match TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(tunnel = %t.name, %from, "refused: {e}");
                        return;
                    }
                };
                if let Err(reason) = me.handle(&t, &c, stream, from).await {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(tunnel = %t.name, %from, "refused: {reason}");
                }
            });
        }
    }

    async fn handle(
        &self,
        t: &TunnelConfig,
        counters: &Arc<Counters>,
        plain_or_tls: TcpStream,
        from: SocketAddr,
    ) -> Result<(), String> {
        let rules: Vec<Allow> = t.allow.iter().filter_map(|a| a.parse().ok()).collect();
        let m = self.current();
        let handshake = Duration::from_secs(10);
        let idle = Duration::from_secs(self.config().idle_timeout_secs.max(1));
        let _ = plain_or_tls.set_nodelay(true);
        match t.mode {
            Mode::Server => {
                let tls = tokio::time::timeout(handshake, m.acceptor.accept(tls_io(plain_or_tls)))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_string())?
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                let der = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .ok_or("no client certificate")?;
                let id = PeerIdentity::from_der(der).ok_or("unreadable client certificate")?;
                if !id.allowed_by(&rules) {
                    return Err(format!(
                        "client {} (serial {}) is not allowed on this tunnel",
                        id.cn, id.serial
                    ));
                }
                let backend = TcpStream::connect(t.connect)
                    .await
                    .map_err(|e| format!("cannot reach {}: {e}", t.connect))?;
                let _ = backend.set_nodelay(true);
                tracing::debug!(tunnel = %t.name, %from, cn = %id.cn, "connection accepted");
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    counters.resumed.fetch_add(1, Ordering::Relaxed);
                }
                let mut tls = tls;
                tls.get_mut().1.set_buffer_limit(Some(BATCH));
                pipe(tls, backend, idle, counters.clone()).await;
            }
            Mode::Client => {
                let remote = TcpStream::connect(t.connect)
                    .await
                    .map_err(|e| format!("cannot reach {}: {e}", t.connect))?;
                let _ = remote.set_nodelay(true);
                let name = match &t.server_name {
                    Some(n) => {
                        ServerName::try_from(n.clone()).map_err(|e| format!("server_name {n:?}: {e}"))?
                    }
                    None => ServerName::IpAddress(t.connect.ip().into()),
                };
                let tls = tokio::time::timeout(handshake, m.connector.connect(name, tls_io(remote)))
                    .await
                    .map_err(|_| "TLS handshake timed out".to_string())?
                    .map_err(|e| format!("TLS handshake with {}: {e}", t.connect))?;
                let der = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .ok_or("no server certificate")?;
                let id = PeerIdentity::from_der(der).ok_or("unreadable server certificate")?;
                if !id.allowed_by(&rules) {
                    return Err(format!(
                        "server {} (serial {}) is not allowed on this tunnel",
                        id.cn, id.serial
                    ));
                }
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    counters.resumed.fetch_add(1, Ordering::Relaxed);
                }
                let mut tls = tls;
                tls.get_mut().1.set_buffer_limit(Some(BATCH));
                pipe(plain_or_tls, tls, idle, counters.clone()).await;
            }
        }
        Ok(())
    }
}

/// Binds a tunnel's listener.
async fn bind(t: &TunnelConfig) -> Result<TcpListener, BridgeError> {
    TcpListener::bind(t.listen).await.map_err(|source| BridgeError::Listen {
        tunnel: t.name.clone(),
        addr: t.listen,
        source,
    })
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reads and parses a `bridge.toml`, with its modification time.
fn read_config(path: &Path) -> Result<(BridgeConfig, Option<SystemTime>), BridgeError> {
    let stamp = mtime(path);
    let file_err = |msg: String| BridgeError::File { path: path.to_owned(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(format!("cannot read it: {e}")))?;
    let cfg = toml::from_str(&text).map_err(|e| file_err(format!("not a valid bridge config: {e}")))?;
    Ok((cfg, stamp))
}

/// Most bytes moved per write: what is ready on the reading side is read
/// (without waiting) up to this much before it is written in one go, so
/// that several TLS records leave in one `writev` and several decrypted
/// records reach the plain side in one `write`. A connection's copy
/// buffers start at [`FIRST_READ`] and grow to this only once a read fills
/// them (bulk traffic), so that idle and interactive connections stay small.
/// 256 KiB measured no faster than 64 KiB on loopback (iperf3 through a
/// pair, alternating runs), for four times the memory per connection.
const BATCH: usize = 64 * 1024;
const FIRST_READ: usize = 16 * 1024;

/// Read buffer of the TLS side's socket.
const TLS_READ: usize = 64 * 1024;

/// The TLS side's socket, read through a buffer: rustls asks for at most
/// 4 KiB at a time, so without it a 16 KiB record costs four `recv` calls
/// (and as many ACKs on loopback); with it one `recv` brings in several
/// records. Writes go straight through.
fn tls_io(s: TcpStream) -> tokio::io::BufReader<TcpStream> {
    tokio::io::BufReader::with_capacity(TLS_READ, s)
}

/// Reads what `r` has ready now without waiting: `Some(n)` read (0 at
/// EOF), `None` if nothing is ready.
async fn read_ready<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    std::future::poll_fn(|cx| {
        let mut rb = tokio::io::ReadBuf::new(buf);
        match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(Ok(Some(rb.filled().len()))),
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Pending => std::task::Poll::Ready(Ok(None)),
        }
    })
    .await
}

/// Copies both ways until both sides are done, propagating half-closes
/// (EOF on one side shuts down writing on the other), closing everything
/// after `idle` without traffic either way. Each direction is its own task,
/// so that the two can use both cores.
async fn pipe<A, B>(a: A, b: B, idle: Duration, counters: Arc<Counters>)
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    counters.active.fetch_add(1, Ordering::Relaxed);
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let start = tokio::time::Instant::now();
    // Milliseconds since `start` of the last byte seen either way.
    let last = Arc::new(AtomicU64::new(0));
    let ab = tokio::spawn(one_way(ar, bw, counters.clone(), true, last.clone(), start));
    let ba = tokio::spawn(one_way(br, aw, counters.clone(), false, last.clone(), start));
    let aborts = (ab.abort_handle(), ba.abort_handle());
    let watchdog = async {
        loop {
            let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    };
    tokio::select! {
        _ = async { let _ = tokio::join!(ab, ba); } => {}
        _ = watchdog => {
            aborts.0.abort();
            aborts.1.abort();
            tracing::debug!("connection idle: closed");
        }
    }
    counters.active.fetch_sub(1, Ordering::Relaxed);
}

/// Copies `r` to `w` until EOF or an error, then shuts `w` down.
async fn one_way<R, W>(
    mut r: R,
    mut w: W,
    counters: Arc<Counters>,
    inbound: bool,
    last: Arc<AtomicU64>,
    start: tokio::time::Instant,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let bytes = if inbound { &counters.bytes_in } else { &counters.bytes_out };
    let mut buf = vec![0u8; FIRST_READ];
    let mut done = false;
    while !done {
        let mut n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Take whatever else is ready (a TLS stream yields one record per
        // read), so that it leaves in one write.
        while n < buf.len() {
            match read_ready(&mut r, &mut buf[n..]).await {
                Ok(Some(0)) | Err(_) => {
                    done = true;
                    break;
                }
                Ok(Some(m)) => n += m,
                Ok(None) => break,
            }
        }
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        // The flush matters for TLS: rustls may keep records it could not
        // write yet, and nothing else would push them out.
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            return;
        }
        if n == buf.len() && n < BATCH {
            buf.resize(BATCH, 0);
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_rules_parse_and_match() {
        let id = PeerIdentity {
            cn: "fd5e:77:0:3::/64".into(),
            ips: vec!["fd5e:77:0:3::1".parse().unwrap()],
            names: vec!["sixmesh:wg:abc".into(), "db.example".into()],
            serial: "01".into(),
        };
        let r = |s: &str| s.parse::<Allow>().unwrap();
        assert!(id.allowed_by(&[]));
        assert!(id.allowed_by(&[r("any")]));
        assert!(id.allowed_by(&[r("prefix:fd5e:77::/48")]));
        assert!(id.allowed_by(&[r("prefix:fd5e:77:0:3::/64")]));
        assert!(!id.allowed_by(&[r("prefix:fd5e:77:0:4::/64")]));
        assert!(id.allowed_by(&[r("cn:fd5e:77:0:3::/64")]));
        assert!(!id.allowed_by(&[r("cn:other")]));
        assert!(id.allowed_by(&[r("san:db.example")]));
        assert!(!id.allowed_by(&[r("san:other.example"), r("cn:x")]));
        assert!("prefix:nonsense".parse::<Allow>().is_err());
        assert!("whatever".parse::<Allow>().is_err());
    }

    #[test]
    fn config_parses_and_reports_bad_keys() {
        let ok: BridgeConfig = toml::from_str(
            r#"
            [tls]
            state_dir = "/var/lib/sixmesh"
            [[tunnel]]
            name = "db"
            mode = "server"
            listen = "[::]:3307"
            connect = "127.0.0.1:3306"
            allow = ["prefix:fd5e::/16"]
            "#,
        )
        .unwrap();
        assert_eq!(ok.tunnels[0].mode, Mode::Server);
        assert_eq!(ok.idle_timeout_secs, 3600);
        assert!(ok.session_resumption);
        let bad = toml::from_str::<BridgeConfig>(
            "[[tunnel]]\nname='x'\nmode='sideways'\nlisten='[::]:1'\nconnect='[::1]:2'\n",
        );
        assert!(bad.unwrap_err().to_string().contains("sideways"));
        let bad = toml::from_str::<BridgeConfig>("colour = 1\ntunnel = []\n");
        assert!(bad.unwrap_err().to_string().contains("colour"));
        ok.validate().unwrap();
        let mut twice = ok.clone();
        twice.tunnels.push(ok.tunnels[0].clone());
        assert!(twice.validate().unwrap_err().to_string().contains("two tunnels are named \"db\""));
        twice.tunnels[1].name = "db2".into();
        assert!(twice.validate().unwrap_err().to_string().contains("both listen on [::]:3307"));
        twice.tunnels.clear();
        assert!(twice.validate().unwrap_err().to_string().contains("no [[tunnel]]"));
        let mut rule = ok.clone();
        rule.tunnels[0].allow = vec!["colour:blue".into()];
        assert!(rule.validate().unwrap_err().to_string().contains("tunnel db: allow"));
    }
}
