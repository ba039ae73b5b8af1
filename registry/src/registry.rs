//! Registry operations on the database: init, tokens, enrollment, renewal,
//! revocation, expiry, network config, CRL, endpoints and bootstrap peers.
//!
//! The functions taking a `&Connection` expect to run inside a transaction
//! that the caller commits *before* answering (see [`Registry::write`] for
//! the local commands and `server`'s batching writer for the API).

use std::fs::{File, OpenOptions};
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::ca::{Ca, CertInfo, Csr, KeyType, NodeCertSpec, hex};
use crate::db;
use crate::error::{Error, Result};
use crate::netconfig::{FORMAT, NetworkConfig, SignedConfig, TunnelParams};
use crate::prefix::{Ipv6Prefix, Network};

/// Name of the database file in the state directory.
pub const DB_FILE: &str = "registry.db";
/// Name of the lock file in the state directory.
pub const LOCK_FILE: &str = "registry.lock";
/// Copy of the CA certificate written at init, for operators.
pub const CA_FILE: &str = "ca.pem";
/// Default node certificate validity.
pub const DEFAULT_CERT_VALIDITY_DAYS: u32 = 365;
/// Default grace period after expiry before a prefix is freed.
pub const DEFAULT_GRACE_DAYS: u32 = 100;
/// Default token lifetime.
pub const DEFAULT_TOKEN_EXPIRY_SECS: i64 = 7 * 86400;
/// Most endpoints a node may report.
pub const MAX_ENDPOINTS: usize = 8;

/// Current unix time, seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// SHA-256 (hex) of a token: what the database stores.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.trim().as_bytes()))
}

/// A new random token: 128 bits from the OS CSPRNG, as 32 hex digits.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    hex(&b)
}

/// Settings of a registry, stored in its `config` table.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The network prefix.
    pub network: Network,
    /// Default node prefix length.
    pub node_prefix_len: u8,
    /// Node certificate validity, days.
    pub cert_validity_days: u32,
    /// Days a prefix is kept after its certificate expired.
    pub grace_days: u32,
    /// Tunnel parameters at load time (the network config reads the
    /// database, which `registry config` may change meanwhile).
    pub tunnel: TunnelParams,
}

/// The CA and the settings: what the operations need besides the database.
#[derive(Debug)]
pub struct Ctx {
    /// The CA.
    pub ca: Ca,
    /// The settings.
    pub settings: Settings,
}

impl Ctx {
    /// Loads the CA and settings from the database.
    pub fn load(conn: &Connection) -> Result<Self> {
        let get = |k: &str| {
            db::get_config(conn, k)?
                .ok_or_else(|| Error::Internal(format!("the database has no {k:?} setting")))
        };
        let network = Network::new(get("network")?.parse()?)?;
        let ca = Ca::load(&get("ca_cert")?, &get("ca_key")?)?;
        let num = |k: &str| -> Result<u32> {
            get(k)?.parse().map_err(|_| Error::Internal(format!("the {k:?} setting is not a number")))
        };
        let tunnel = serde_json::from_str(&get("tunnel")?)
            .map_err(|e| Error::Internal(format!("tunnel setting: {e}")))?;
        Ok(Ctx {
            ca,
            settings: Settings {
                network,
                node_prefix_len: num("node_prefix_len")? as u8,
                cert_validity_days: num("cert_validity_days")?,
                grace_days: num("grace_days")?,
                tunnel,
            },
        })
    }
}

/// Options of `registry init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Network prefix; a random ULA /48 when `None`.
    pub network: Option<Ipv6Prefix>,
    /// Default node prefix length.
    pub node_prefix_len: u8,
    /// CA key type.
    pub key_type: KeyType,
    /// Node certificate validity, days.
    pub cert_validity_days: u32,
    /// Days a prefix is kept after its certificate expired.
    pub grace_days: u32,
}

impl InitOptions {
    /// Defaults: random ULA /48, /64 nodes, ECDSA P-256, 365 days, 100 days of grace.
    pub fn new(network: Option<Ipv6Prefix>) -> Self {
        InitOptions {
            network,
            node_prefix_len: 64,
            key_type: KeyType::EcdsaP256,
            cert_validity_days: DEFAULT_CERT_VALIDITY_DAYS,
            grace_days: DEFAULT_GRACE_DAYS,
        }
    }
}

/// What `init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitSummary {
    /// The network prefix.
    pub network: String,
    /// Default node prefix length.
    pub node_prefix_len: u8,
    /// `sha256:<hex>` of the CA certificate.
    pub ca_fingerprint: String,
    /// Where the CA certificate was written.
    pub ca_file: PathBuf,
}

/// How a node enrolled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// `sixmesh join` over the HTTPS API.
    Sixmesh,
    /// re6st-conf over the legacy listener.
    Re6st,
}

/// The result of an enrollment or renewal.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Enrolled {
    /// The node's certificate, PEM.
    pub certificate: String,
    /// Its serial, hex.
    pub serial: String,
    /// The node prefix.
    pub prefix: String,
    /// The mesh address (`prefix::1`).
    pub mesh_address: Ipv6Addr,
    /// Certificate expiry, unix time.
    pub not_after: i64,
    /// The CA certificate, PEM.
    pub ca: String,
    /// The current signed network config.
    pub network_config: SignedConfig,
}

/// A row of `registry list`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeRow {
    /// Database id.
    pub id: i64,
    /// Node prefix.
    pub prefix: String,
    /// Certificate CN.
    pub cn: String,
    /// Current certificate serial.
    pub serial: String,
    /// Expiry of the current certificate, unix time.
    pub not_after: i64,
    /// `active`, `revoked` or `expired` (prefix released).
    pub status: String,
    /// `sixmesh` or `re6st`.
    pub kind: String,
    /// Email given with the token.
    pub email: Option<String>,
}

/// A certificate row of `registry show`.
#[derive(Debug, Clone, Serialize)]
pub struct CertRow {
    /// Serial, hex.
    pub serial: String,
    /// `enroll` or `renew`.
    pub reason: String,
    /// Unix time.
    pub issued_at: i64,
    /// Unix time.
    pub not_after: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// `registry show`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDetail {
    /// The node.
    pub node: NodeRow,
    /// Mesh address.
    pub mesh_address: String,
    /// Tunnel public key, base64.
    pub tunnel_key: Option<String>,
    /// Every certificate issued to it.
    pub certificates: Vec<CertRow>,
    /// Endpoints it reported.
    pub endpoints: Vec<String>,
    /// The current certificate, PEM.
    pub certificate_pem: Option<String>,
}

/// A row of `registry token list`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenRow {
    /// First 12 hex digits of the token's hash (what `token delete` takes).
    pub id: String,
    /// Email.
    pub email: Option<String>,
    /// Node prefix length it grants.
    pub prefix_len: u8,
    /// Unix time.
    pub created_at: i64,
    /// Unix time.
    pub expires_at: i64,
    /// Unix time it was used, if used.
    pub used_at: Option<i64>,
}

/// A bootstrap peer.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Peer {
    /// Node prefix.
    pub prefix: String,
    /// Mesh address.
    pub mesh_address: Ipv6Addr,
    /// Tunnel public key, base64.
    pub tunnel_key: Option<String>,
    /// Reported `ip:port` endpoints.
    pub endpoints: Vec<String>,
}

// ---------------------------------------------------------------------------
// State directory and lock

/// Holds the state directory's lock until dropped.
#[derive(Debug)]
pub struct LockGuard(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// An opened registry state directory: the lock and a database connection.
pub struct Registry {
    /// The database.
    pub conn: Connection,
    /// CA and settings.
    pub ctx: Arc<Ctx>,
    state_dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("state_dir", &self.state_dir).finish()
    }
}

fn lock(state_dir: &Path, exclusive: bool) -> Result<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = state_dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    let arg = if exclusive { FlockArg::LockExclusiveNonblock } else { FlockArg::LockSharedNonblock };
    Flock::lock(f, arg).map_err(|(_, errno)| {
        if exclusive {
            Error::Conflict(format!(
                "the registry in {} is in use ({errno}): stop `sixmesh registry serve` and other registry commands first",
                state_dir.display()
            ))
        } else {
            Error::Conflict(format!(
                "the registry in {} is being initialised or restored ({errno}): try again when that is done",
                state_dir.display()
            ))
        }
    })
}

impl Registry {
    /// Creates a new registry in `state_dir`. Refuses if one exists.
    pub fn init(state_dir: &Path, opts: &InitOptions, now: i64) -> Result<InitSummary> {
        create_private_dir(state_dir)?;
        let _lock = lock(state_dir, true)?;
        let db_path = state_dir.join(DB_FILE);
        if db_path.exists() {
            return Err(Error::Conflict(format!(
                "{} already holds a registry: refusing to overwrite it (use another --state-dir, or `registry restore`)",
                state_dir.display()
            )));
        }
        let network = match opts.network {
            Some(p) => Network::new(p)?,
            None => Network::random_ula(),
        };
        network.check_node_len(opts.node_prefix_len)?;
        if opts.node_prefix_len > 127 {
            return Err(Error::BadRequest("the node prefix length must be at most /127".into()));
        }
        let (ca, key_pem) = Ca::create(&network, opts.key_type, now)?;
        let tmp_path = state_dir.join(format!("{DB_FILE}.init"));
        let _ = std::fs::remove_file(&tmp_path);
        {
            let conn = db::open(&tmp_path, true)?;
            restrict_mode(&tmp_path)?;
            let tx = conn.unchecked_transaction()?;
            init_db(&tx, &network, opts, &ca, &key_pem, now)?;
            tx.commit()?;
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        }
        std::fs::rename(&tmp_path, &db_path)
            .map_err(|e| Error::io("cannot move the new database in place", e))?;
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(state_dir.join(format!("{DB_FILE}.init{ext}")));
        }
        sync_dir(state_dir)?;
        let ca_file = state_dir.join(CA_FILE);
        write_atomic(&ca_file, ca.cert_pem().as_bytes(), 0o644)?;
        tracing::info!(network = %network, fingerprint = %ca.fingerprint(), "registry initialised");
        Ok(InitSummary {
            network: network.to_string(),
            node_prefix_len: opts.node_prefix_len,
            ca_fingerprint: ca.fingerprint(),
            ca_file,
        })
    }

    /// Opens an existing registry (shared lock: several commands and `serve`
    /// may run at once; SQLite serialises their writes).
    pub fn open(state_dir: &Path) -> Result<Self> {
        let db_path = state_dir.join(DB_FILE);
        if !db_path.exists() {
            return Err(Error::NotInitialized(state_dir.to_path_buf()));
        }
        let lock = lock(state_dir, false)?;
        let conn = db::open(&db_path, false)?;
        let ctx = Arc::new(Ctx::load(&conn)?);
        Ok(Registry { conn, ctx, state_dir: state_dir.to_path_buf(), _lock: lock })
    }

    /// Takes the exclusive serve lock (`serve.lock`): one `registry serve`
    /// per state directory.
    pub fn serve_lock(&self) -> Result<LockGuard> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.state_dir.join("serve.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
        Flock::lock(f, FlockArg::LockExclusiveNonblock).map(LockGuard).map_err(|_| {
            Error::Conflict(format!(
                "another `sixmesh registry serve` already runs on {}",
                self.state_dir.display()
            ))
        })
    }

    /// Splits into the connection, the context and the lock guard (keep
    /// the guard alive as long as the connection is used).
    pub fn into_parts(self) -> (Connection, Arc<Ctx>, LockGuard) {
        (self.conn, self.ctx, LockGuard(self._lock))
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Runs `f` in an immediate transaction and commits it.
    pub fn write<R>(&mut self, f: impl FnOnce(&Connection, &Ctx) -> Result<R>) -> Result<R> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let r = f(&tx, &self.ctx)?;
        tx.commit()?;
        Ok(r)
    }

    /// Writes a consistent online copy of the database to `dest` (it must
    /// not exist). The copy includes the CA key: keep it private.
    pub fn backup(&self, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(Error::Conflict(format!("{} exists: choose a new backup file name", dest.display())));
        }
        let d = dest.to_str().ok_or_else(|| Error::BadRequest("the backup path must be UTF-8".into()))?;
        // VACUUM INTO reads one consistent snapshot and writes a compact copy.
        self.conn.execute("VACUUM INTO ?1", [d])?;
        restrict_mode(dest)?;
        File::open(dest).and_then(|f| f.sync_all()).map_err(|e| Error::io("cannot sync the backup", e))?;
        db::audit(&self.conn, now(), "operator", "backup", d, "")?;
        Ok(())
    }

    /// Replaces the registry's database by the backup `src` (checked first).
    /// Needs the exclusive lock: `serve` must be stopped.
    pub fn restore(state_dir: &Path, src: &Path) -> Result<InitSummary> {
        create_private_dir(state_dir)?;
        let _lock = lock(state_dir, true)?;
        let tmp = state_dir.join(format!("{DB_FILE}.restore"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::copy(src, &tmp).map_err(|e| Error::io(format!("cannot read {}", src.display()), e))?;
        restrict_mode(&tmp)?;
        let check = || -> Result<InitSummary> {
            let not_backup = |e: Error| {
                Error::BadRequest(format!("{} is not a sixmesh registry backup: {e}", src.display()))
            };
            let conn = db::open(&tmp, false).map_err(not_backup)?;
            let ok: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .map_err(|e| not_backup(e.into()))?;
            if ok != "ok" {
                return Err(Error::BadRequest(format!("{} is damaged: {ok}", src.display())));
            }
            let ctx = Ctx::load(&conn).map_err(not_backup)?;
            check_consistency(&conn, &ctx).map_err(not_backup)?;
            db::audit(&conn, now(), "operator", "restore", &src.display().to_string(), "")?;
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
            Ok(InitSummary {
                network: ctx.settings.network.to_string(),
                node_prefix_len: ctx.settings.node_prefix_len,
                ca_fingerprint: ctx.ca.fingerprint(),
                ca_file: state_dir.join(CA_FILE),
            })
        };
        let summary = match check() {
            Ok(s) => s,
            Err(e) => {
                for ext in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(state_dir.join(format!("{DB_FILE}.restore{ext}")));
                }
                return Err(e);
            }
        };
        let db_path = state_dir.join(DB_FILE);
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(state_dir.join(format!("{DB_FILE}{ext}")));
        }
        std::fs::rename(&tmp, &db_path)
            .map_err(|e| Error::io("cannot move the restored database in place", e))?;
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(state_dir.join(format!("{DB_FILE}.restore{ext}")));
        }
        sync_dir(state_dir)?;
        let conn = db::open(&db_path, false)?;
        let ca_pem = db::get_config(&conn, "ca_cert")?.unwrap_or_default();
        write_atomic(&summary.ca_file, ca_pem.as_bytes(), 0o644)?;
        Ok(summary)
    }
}

/// Writes the settings, the CA and the first network config into a fresh
/// database (inside the caller's transaction).
fn init_db(
    conn: &Connection,
    network: &Network,
    opts: &InitOptions,
    ca: &Ca,
    key_pem: &str,
    now: i64,
) -> Result<()> {
    db::set_config(conn, "network", &network.to_string())?;
    db::set_config(conn, "node_prefix_len", &opts.node_prefix_len.to_string())?;
    db::set_config(conn, "ca_cert", ca.cert_pem())?;
    db::set_config(conn, "ca_key", key_pem)?;
    db::set_config(conn, "key_type", opts.key_type.as_str())?;
    if opts.cert_validity_days == 0 || opts.cert_validity_days > 3650 {
        return Err(Error::BadRequest("the certificate validity must be from 1 to 3650 days".into()));
    }
    if opts.grace_days > 3650 {
        return Err(Error::BadRequest("the grace period must be at most 3650 days".into()));
    }
    db::set_config(conn, "cert_validity_days", &opts.cert_validity_days.to_string())?;
    db::set_config(conn, "grace_days", &opts.grace_days.to_string())?;
    db::set_config(conn, "tunnel", &serde_json::to_string(&TunnelParams::default()).unwrap_or_default())?;
    db::set_config(conn, "created_at", &now.to_string())?;
    let ctx = Ctx::load(conn)?;
    bump_config(conn, &ctx, now)?;
    db::audit(conn, now, "operator", "init", &network.to_string(), &ca.fingerprint())?;
    Ok(())
}

/// An in-memory registry (tests and benchmarks): the database and its context.
pub fn in_memory(opts: &InitOptions, now: i64) -> Result<(Connection, Ctx)> {
    let network = Network::new(opts.network.ok_or_else(|| Error::BadRequest("give a network".into()))?)?;
    network.check_node_len(opts.node_prefix_len)?;
    let (ca, key_pem) = Ca::create(&network, opts.key_type, now)?;
    let conn = db::open_in_memory()?;
    init_db(&conn, &network, opts, &ca, &key_pem, now)?;
    let ctx = Ctx::load(&conn)?;
    Ok((conn, ctx))
}

// ---------------------------------------------------------------------------
// Files

/// Creates `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))
}

fn restrict_mode(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("cannot chmod {}", path.display()), e))
}

/// fsyncs a directory (after a rename in it).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("cannot sync {}", dir.display()), e))
}

/// Writes `data` to `path` atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("cannot write {}", path.display()), e)
    })?;
    sync_dir(dir)
}

// ---------------------------------------------------------------------------
// Network config and CRL

/// Serials and revocation times of revoked certificates (nodes' and
/// administrators') not yet expired.
pub fn revoked(conn: &Connection, now: i64) -> Result<Vec<(String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT serial, revoked_at FROM certs WHERE revoked_at IS NOT NULL AND not_after > ?1
         UNION ALL
         SELECT serial, revoked_at FROM admins WHERE revoked_at IS NOT NULL AND not_after > ?1
         ORDER BY serial",
    )?;
    let rows = st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Signs and stores a new network config version. Returns it.
pub fn bump_config(conn: &Connection, ctx: &Ctx, now: i64) -> Result<(u64, SignedConfig)> {
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM netconfig", [], |r| r.get(0))?;
    let version = last as u64 + 1;
    let s = &ctx.settings;
    let cfg = NetworkConfig {
        format: FORMAT,
        version,
        issued_at: now,
        network: s.network.to_string(),
        node_prefix_len: s.node_prefix_len,
        revoked_serials: revoked(conn, now)?.into_iter().map(|(s, _)| s).collect(),
        cert_validity_days: s.cert_validity_days,
        // Read from the database: `registry config set` may have changed it
        // while this process runs.
        tunnel: tunnel_params(conn)?,
    };
    let signed = SignedConfig::sign(&ctx.ca, &cfg)?;
    conn.execute(
        "INSERT INTO netconfig (version, created_at, document) VALUES (?1, ?2, ?3)",
        params![version as i64, now, signed.to_json()],
    )?;
    Ok((version, signed))
}

/// The tunnel parameters currently stored.
pub fn tunnel_params(conn: &Connection) -> Result<TunnelParams> {
    let raw = db::get_config(conn, "tunnel")?.ok_or_else(|| Error::Internal("no tunnel setting".into()))?;
    serde_json::from_str(&raw).map_err(|e| Error::Internal(format!("tunnel setting: {e}")))
}

/// Sets tunnel parameters from `name=value` pairs (`port=51820`,
/// `client_count=8`, …; the `tunnel.` prefix is optional) and signs a new
/// network config. Returns its version and the new parameters.
pub fn set_tunnel_params(
    conn: &Connection,
    ctx: &Ctx,
    now: i64,
    pairs: &[String],
    actor: &str,
) -> Result<(u64, TunnelParams)> {
    atomically(conn, || {
        let mut v = serde_json::to_value(tunnel_params(conn)?).map_err(|e| Error::Internal(e.to_string()))?;
        for pair in pairs {
            let (k, val) = pair
                .split_once('=')
                .ok_or_else(|| Error::BadRequest(format!("{pair:?}: give NAME=VALUE, e.g. port=51820")))?;
            let k = k.trim().strip_prefix("tunnel.").unwrap_or(k.trim());
            let slot = v.get_mut(k).ok_or_else(|| {
                Error::BadRequest(format!(
                    "unknown tunnel parameter {k:?}: use protocol, port, client_count, max_clients, refresh_secs, keepalive_secs or mtu"
                ))
            })?;
            *slot = match slot {
                serde_json::Value::Number(_) => serde_json::Value::Number(
                    val.trim()
                        .parse::<u64>()
                        .map_err(|_| Error::BadRequest(format!("{k} must be a whole number")))?
                        .into(),
                ),
                _ => serde_json::Value::String(val.to_string()),
            };
        }
        let params: TunnelParams = serde_json::from_value(v)
            .map_err(|e| Error::BadRequest(format!("invalid tunnel parameters: {e}")))?;
        if params.port == 0 || params.mtu < 1280 || params.client_count > params.max_clients {
            return Err(Error::BadRequest(
                "port must not be 0, mtu at least 1280 (IPv6), client_count at most max_clients".into(),
            ));
        }
        let json = serde_json::to_string(&params).map_err(|e| Error::Internal(e.to_string()))?;
        db::set_config(conn, "tunnel", &json)?;
        let (version, _) = bump_config(conn, ctx, now)?;
        db::audit(conn, now, actor, "config-set", "tunnel", &json)?;
        Ok((version, params))
    })
}

/// The latest network config: `(version, document)`.
pub fn current_config(conn: &Connection) -> Result<(u64, SignedConfig)> {
    let (v, doc): (i64, String) =
        conn.query_row("SELECT version, document FROM netconfig ORDER BY version DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok((v as u64, SignedConfig::from_json(&doc)?))
}

// ---------------------------------------------------------------------------
// Tokens

/// Options of `token add`.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    /// Email recorded with the node.
    pub email: Option<String>,
    /// Node prefix length granted; the network default when `None`.
    pub prefix_len: Option<u8>,
    /// Lifetime in seconds.
    pub expires_secs: i64,
    /// How many tokens to make.
    pub count: usize,
}

/// Makes tokens; returns them in clear (only their hashes are stored).
pub fn add_tokens(conn: &Connection, ctx: &Ctx, now: i64, opts: &TokenOptions) -> Result<Vec<String>> {
    let len = opts.prefix_len.unwrap_or(ctx.settings.node_prefix_len);
    ctx.settings.network.check_node_len(len)?;
    if len > 127 {
        return Err(Error::BadRequest("the node prefix length must be at most /127".into()));
    }
    if opts.expires_secs <= 0 {
        return Err(Error::BadRequest("the token lifetime must be positive".into()));
    }
    if let Some(e) = &opts.email
        && (e.len() > 254 || e.chars().any(char::is_control))
    {
        return Err(Error::BadRequest("the email is not a plausible address".into()));
    }
    let mut out = Vec::with_capacity(opts.count);
    for _ in 0..opts.count {
        let t = new_token();
        let h = token_hash(&t);
        conn.execute(
            "INSERT INTO tokens (hash, email, prefix_len, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![h, opts.email, len, now, now + opts.expires_secs],
        )?;
        db::audit(conn, now, "operator", "token-add", &h[..12], opts.email.as_deref().unwrap_or(""))?;
        out.push(t);
    }
    Ok(out)
}

/// Lists tokens, newest first.
pub fn list_tokens(conn: &Connection) -> Result<Vec<TokenRow>> {
    let mut st = conn.prepare(
        "SELECT hash, email, prefix_len, created_at, expires_at, used_at FROM tokens ORDER BY created_at DESC, hash",
    )?;
    let rows = st.query_map([], |r| {
        let h: String = r.get(0)?;
        Ok(TokenRow {
            id: h[..12].to_string(),
            email: r.get(1)?,
            prefix_len: r.get(2)?,
            created_at: r.get(3)?,
            expires_at: r.get(4)?,
            used_at: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes a token given in clear or by its id (a prefix of its hash, at
/// least 8 hex digits). Returns the number deleted.
pub fn delete_token(conn: &Connection, now: i64, token_or_id: &str) -> Result<usize> {
    let t = token_or_id.trim();
    let by_clear = conn.execute("DELETE FROM tokens WHERE hash = ?1", [token_hash(t)])?;
    let n = if by_clear > 0 {
        by_clear
    } else {
        if t.len() < 8 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::NotFound(format!(
                "no token {t:?}: give the token or its id from `token list`"
            )));
        }
        let matches: i64 = conn.query_row(
            "SELECT COUNT(*) FROM tokens WHERE substr(hash, 1, length(?1)) = lower(?1)",
            [t],
            |r| r.get(0),
        )?;
        if matches > 1 {
            return Err(Error::Conflict(format!("{t:?} matches {matches} tokens: give more digits")));
        }
        conn.execute("DELETE FROM tokens WHERE substr(hash, 1, length(?1)) = lower(?1)", [t])?
    };
    if n == 0 {
        return Err(Error::NotFound(format!("no token {t:?}: see `sixmesh registry token list`")));
    }
    // The audit names the token by its id, never by (part of) its clear text.
    let id = if by_clear > 0 { token_hash(t)[..12].to_string() } else { t.chars().take(12).collect() };
    db::audit(conn, now, "operator", "token-delete", &id, "")?;
    Ok(n)
}

/// Consumes a token: checks it is known, unused and not expired, marks it
/// used. Returns `(hash, email, prefix_len)`.
fn consume_token(conn: &Connection, now: i64, token: &str) -> Result<(String, Option<String>, u8)> {
    let h = token_hash(token);
    let row: Option<(Option<String>, u8, i64, Option<i64>)> = conn
        .query_row("SELECT email, prefix_len, expires_at, used_at FROM tokens WHERE hash = ?1", [&h], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    match row {
        Some((email, len, expires, None)) if expires > now => {
            conn.execute("UPDATE tokens SET used_at = ?1 WHERE hash = ?2", params![now, h])?;
            Ok((h, email, len))
        }
        _ => Err(Error::BadToken),
    }
}

// ---------------------------------------------------------------------------
// Enrollment, renewal, revocation, expiry

/// Enrolls a node: consumes the token, allocates a prefix, signs the
/// certificate, records everything. Runs inside the caller's transaction.
pub fn enroll(
    conn: &Connection,
    ctx: &Ctx,
    now: i64,
    token: &str,
    csr: &Csr,
    kind: NodeKind,
) -> Result<Enrolled> {
    atomically(conn, || enroll_inner(conn, ctx, now, token, csr, kind))
}

/// Runs `f` inside a savepoint: all of its writes, or none.
pub fn atomically<R>(conn: &Connection, f: impl FnOnce() -> Result<R>) -> Result<R> {
    conn.execute_batch("SAVEPOINT op")?;
    match f() {
        Ok(r) => {
            conn.execute_batch("RELEASE op")?;
            Ok(r)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO op; RELEASE op")?;
            Err(e)
        }
    }
}

/// A retried enrollment: the token was already used, by a node whose
/// current certificate is for the very key of `csr` (the answer was lost on
/// the way). Returns that enrollment again; writes nothing.
fn replay(conn: &Connection, ctx: &Ctx, now: i64, token: &str, csr: &Csr) -> Result<Option<Enrolled>> {
    let row: Option<(String, String, i64)> = conn
        .query_row(
            "SELECT c.pem, n.prefix, c.not_after FROM tokens t JOIN nodes n ON n.id = t.used_by_node
             JOIN certs c ON c.serial = n.current_serial
             WHERE t.hash = ?1 AND t.used_at IS NOT NULL AND n.status = 'active' AND c.revoked_at IS NULL
               AND c.not_after > ?2",
            params![token_hash(token), now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((pem, prefix, not_after)) = row else { return Ok(None) };
    let info = CertInfo::from_pem(&pem)?;
    if info.spki_sha256 != csr.spki_sha256() {
        return Ok(None);
    }
    tracing::info!(prefix = %prefix, serial = %info.serial, "enrollment retried with the same key: answering it again");
    Ok(Some(finish(conn, ctx, crate::ca::Issued { pem, serial: info.serial }, prefix.parse()?, not_after)?))
}

fn enroll_inner(
    conn: &Connection,
    ctx: &Ctx,
    now: i64,
    token: &str,
    csr: &Csr,
    kind: NodeKind,
) -> Result<Enrolled> {
    if let Some(again) = replay(conn, ctx, now, token, csr)? {
        return Ok(again);
    }
    let (token_h, email, len) = consume_token(conn, now, token)?;
    let net = &ctx.settings.network;
    let want = len
        .checked_sub(net.prefix.len)
        .filter(|w| *w > 0 && len <= 127)
        .map(usize::from)
        .ok_or_else(|| Error::Internal(format!("token for /{len} does not fit the network {net}")))?;
    let kind_s = match kind {
        NodeKind::Sixmesh => "sixmesh",
        NodeKind::Re6st => "re6st",
    };
    let not_after = now + i64::from(ctx.settings.cert_validity_days) * 86400;
    conn.execute(
        "INSERT INTO nodes (bits, prefix, kind, email, status, not_after, created_at)
         VALUES ('', '', ?1, ?2, 'active', ?3, ?4)",
        params![kind_s, email, not_after, now],
    )?;
    let node_id = conn.last_insert_rowid();
    let bits = db::allocate(conn, want, node_id).map_err(|e| match e {
        Error::Exhausted(_) => Error::Exhausted(len),
        e => e,
    })?;
    let prefix = net.prefix_of(&bits)?;
    let tunnel_key =
        csr.tunnel_key.map(|k| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k));
    conn.execute(
        "UPDATE nodes SET bits = ?1, prefix = ?2, tunnel_key = ?3 WHERE id = ?4",
        params![bits, prefix.to_string(), tunnel_key, node_id],
    )?;
    conn.execute("UPDATE tokens SET used_by_node = ?1 WHERE hash = ?2", params![node_id, token_h])?;
    let (cn, subject_serial) = match kind {
        NodeKind::Sixmesh => (prefix.to_string(), None),
        NodeKind::Re6st => {
            let cn = Network::re6st_cn(&bits);
            let int = cn.split('/').next().unwrap_or("0").to_string();
            (cn, Some(int))
        }
    };
    let spec = NodeCertSpec {
        cn,
        subject_serial,
        mesh_address: prefix.first_host(),
        tunnel_key: csr.tunnel_key,
        not_before: now - crate::ca::BACKDATE_SECS,
        not_after,
    };
    let issued = issue(conn, ctx, now, node_id, &spec, csr, "enroll")?;
    db::audit(
        conn,
        now,
        "token",
        "enroll",
        &issued.serial,
        &format!("{prefix} {kind_s} token={}", &token_h[..12]),
    )?;
    tracing::info!(prefix = %prefix, serial = %issued.serial, kind = kind_s, "node enrolled");
    finish(conn, ctx, issued, prefix, not_after)
}

fn issue(
    conn: &Connection,
    ctx: &Ctx,
    now: i64,
    node_id: i64,
    spec: &NodeCertSpec,
    csr: &Csr,
    reason: &str,
) -> Result<crate::ca::Issued> {
    let issued = ctx.ca.sign_node(csr, spec)?;
    conn.execute(
        "INSERT INTO certs (serial, node_id, cn, not_before, not_after, issued_at, reason, pem)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![issued.serial, node_id, spec.cn, spec.not_before, spec.not_after, now, reason, issued.pem],
    )?;
    conn.execute(
        "UPDATE nodes SET current_serial = ?1, not_after = ?2 WHERE id = ?3",
        params![issued.serial, spec.not_after, node_id],
    )?;
    Ok(issued)
}

fn finish(
    conn: &Connection,
    ctx: &Ctx,
    issued: crate::ca::Issued,
    prefix: Ipv6Prefix,
    not_after: i64,
) -> Result<Enrolled> {
    let (_, network_config) = current_config(conn)?;
    Ok(Enrolled {
        certificate: issued.pem,
        serial: issued.serial,
        prefix: prefix.to_string(),
        mesh_address: prefix.first_host(),
        not_after,
        ca: ctx.ca.cert_pem().to_string(),
        network_config,
    })
}

/// `(node id, prefix, status, current serial, revoked_at, not_after)`.
type AuthRow = (i64, String, String, Option<String>, Option<i64>, i64);

/// The live node that holds the current certificate `serial`: the check
/// behind every mTLS request. Returns `(node id, prefix)`.
pub fn authenticate(conn: &Connection, serial: &str, now: i64) -> Result<(i64, String)> {
    authenticate_at(conn, serial, now, 0)
}

/// [`authenticate`], but a certificate that expired less than
/// `grace_secs` ago still counts (renewal during the grace period).
fn authenticate_at(conn: &Connection, serial: &str, now: i64, grace_secs: i64) -> Result<(i64, String)> {
    let row: Option<AuthRow> = conn
        .query_row(
            "SELECT n.id, n.prefix, n.status, n.current_serial, c.revoked_at, c.not_after
             FROM certs c JOIN nodes n ON n.id = c.node_id WHERE c.serial = ?1",
            [serial],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?;
    match row {
        None => Err(Error::Unauthorized("this certificate was not issued by this registry".into())),
        Some((_, _, _, _, Some(_), _)) => Err(Error::Forbidden("this certificate is revoked".into())),
        Some((_, _, status, _, _, _)) if status != "active" => {
            Err(Error::Forbidden(format!("this node is {status}: enroll again with a new token")))
        }
        Some((_, _, _, _, _, na)) if na.saturating_add(grace_secs) <= now => {
            Err(Error::Forbidden("this certificate has expired: enroll again with a new token".into()))
        }
        Some((_, _, _, cur, _, _)) if cur.as_deref() != Some(serial) => {
            Err(Error::Forbidden("this certificate was superseded by a renewal: use the newest one".into()))
        }
        Some((id, prefix, ..)) => Ok((id, prefix)),
    }
}

/// Renews the certificate of the node holding `serial` (authenticated by
/// mTLS): same prefix, new serial, a full new validity, the key of `csr`.
pub fn renew(conn: &Connection, ctx: &Ctx, now: i64, serial: &str, csr: &Csr) -> Result<Enrolled> {
    atomically(conn, || renew_inner(conn, ctx, now, serial, csr))
}

/// A retried renewal: `serial` was superseded by the node's current
/// certificate, which is for the very key of `csr` (the answer was lost).
/// Returns the current certificate again; writes nothing.
fn renew_replay(conn: &Connection, ctx: &Ctx, now: i64, serial: &str, csr: &Csr) -> Result<Option<Enrolled>> {
    let row: Option<(String, String, String, i64)> = conn
        .query_row(
            "SELECT cur.serial, cur.pem, n.prefix, cur.not_after FROM certs old
             JOIN nodes n ON n.id = old.node_id JOIN certs cur ON cur.serial = n.current_serial
             WHERE old.serial = ?1 AND old.revoked_at IS NULL AND n.status = 'active'
               AND cur.serial != old.serial AND cur.revoked_at IS NULL AND cur.not_after > ?2",
            params![serial, now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((cur, pem, prefix, not_after)) = row else { return Ok(None) };
    if CertInfo::from_pem(&pem)?.spki_sha256 != csr.spki_sha256() {
        return Ok(None);
    }
    tracing::info!(prefix = %prefix, serial = %cur, "renewal retried with the same key: answering it again");
    Ok(Some(finish(conn, ctx, crate::ca::Issued { pem, serial: cur }, prefix.parse()?, not_after)?))
}

fn renew_inner(conn: &Connection, ctx: &Ctx, now: i64, serial: &str, csr: &Csr) -> Result<Enrolled> {
    if let Some(again) = renew_replay(conn, ctx, now, serial, csr)? {
        return Ok(again);
    }
    // An expired certificate may still renew during the grace period: its
    // node keeps its prefix.
    let grace = i64::from(ctx.settings.grace_days) * 86400;
    let (node_id, prefix_s) = authenticate_at(conn, serial, now, grace)?;
    let (kind, old_tk, cn): (String, Option<String>, String) = conn.query_row(
        "SELECT n.kind, n.tunnel_key, c.cn FROM nodes n JOIN certs c ON c.serial = n.current_serial WHERE n.id = ?1",
        [node_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let prefix: Ipv6Prefix = prefix_s.parse()?;
    let tunnel_key = match csr.tunnel_key {
        Some(k) => Some(k),
        None => old_tk.as_deref().map(crate::ca::parse_tunnel_key).transpose()?,
    };
    if let Some(k) = csr.tunnel_key {
        let b = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, k);
        conn.execute("UPDATE nodes SET tunnel_key = ?1 WHERE id = ?2", params![b, node_id])?;
    }
    let not_after = now + i64::from(ctx.settings.cert_validity_days) * 86400;
    let subject_serial = (kind == "re6st").then(|| cn.split('/').next().unwrap_or("0").to_string());
    let spec = NodeCertSpec {
        cn,
        subject_serial,
        mesh_address: prefix.first_host(),
        tunnel_key,
        not_before: now - crate::ca::BACKDATE_SECS,
        not_after,
    };
    let issued = issue(conn, ctx, now, node_id, &spec, csr, "renew")?;
    db::audit(conn, now, &format!("cert:{serial}"), "renew", &issued.serial, &prefix.to_string())?;
    tracing::info!(prefix = %prefix, old = serial, new = %issued.serial, "certificate renewed");
    finish(conn, ctx, issued, prefix, not_after)
}

/// Finds the node a `PREFIX|SERIAL` argument names: an IPv6 prefix, re6st's
/// `int/len` CN, or a certificate serial in hex (colons allowed).
pub fn find_node(conn: &Connection, ctx: &Ctx, target: &str) -> Result<i64> {
    let t = target.trim();
    let bits = if t.contains(':') && t.contains('/') {
        Some(ctx.settings.network.bits_of(&t.parse()?)?)
    } else if t.contains('/') {
        Some(
            Network::bits_from_re6st_cn(t)
                .ok_or_else(|| Error::BadRequest(format!("{t:?} is not a prefix")))?,
        )
    } else {
        None
    };
    let id: Option<i64> = if let Some(bits) = bits {
        conn.query_row(
            "SELECT id FROM nodes WHERE bits = ?1 ORDER BY status = 'active' DESC, id DESC LIMIT 1",
            [bits],
            |r| r.get(0),
        )
        .optional()?
    } else {
        let s = t.replace(':', "").to_ascii_lowercase();
        let s = s.trim_start_matches('0');
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadRequest(format!(
                "{t:?} is neither a prefix (fd..::/64) nor a serial (hex)"
            )));
        }
        conn.query_row("SELECT node_id FROM certs WHERE serial = ?1", [s], |r| r.get(0)).optional()?
    };
    id.ok_or_else(|| Error::NotFound(format!("no node {t:?}: see `sixmesh registry list`")))
}

/// What `revoke` did.
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    /// The node's prefix (now free).
    pub prefix: String,
    /// Serials added to the CRL.
    pub serials: Vec<String>,
    /// The network config version that lists them.
    pub config_version: u64,
}

/// Revokes a node: every unexpired certificate of it goes to the CRL, its
/// prefix is freed, and a new network config is signed.
pub fn revoke(conn: &Connection, ctx: &Ctx, now: i64, target: &str, actor: &str) -> Result<Revoked> {
    atomically(conn, || revoke_inner(conn, ctx, now, target, actor))
}

fn revoke_inner(conn: &Connection, ctx: &Ctx, now: i64, target: &str, actor: &str) -> Result<Revoked> {
    let node_id = find_node(conn, ctx, target)?;
    let (bits, prefix, status): (String, String, String) =
        conn.query_row("SELECT bits, prefix, status FROM nodes WHERE id = ?1", [node_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    if status == "revoked" {
        return Err(Error::Conflict(format!("{prefix} is already revoked")));
    }
    let mut st = conn
        .prepare("SELECT serial FROM certs WHERE node_id = ?1 AND revoked_at IS NULL AND not_after > ?2 ORDER BY serial")?;
    let serials: Vec<String> =
        st.query_map(params![node_id, now], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    conn.execute(
        "UPDATE certs SET revoked_at = ?1 WHERE node_id = ?2 AND revoked_at IS NULL AND not_after > ?1",
        params![now, node_id],
    )?;
    if status == "active" {
        db::release(conn, &bits)?;
    }
    conn.execute(
        "UPDATE nodes SET status = 'revoked', released_at = COALESCE(released_at, ?1) WHERE id = ?2",
        params![now, node_id],
    )?;
    conn.execute("DELETE FROM endpoints WHERE node_id = ?1", [node_id])?;
    let (version, _) = bump_config(conn, ctx, now)?;
    db::audit(conn, now, actor, "revoke", &prefix, &serials.join(","))?;
    tracing::info!(prefix = %prefix, serials = ?serials, config_version = version, "node revoked");
    Ok(Revoked { prefix, serials, config_version: version })
}

/// Frees the prefixes of nodes whose certificate expired more than the
/// grace period ago, and re-signs the network config when its revoked list
/// changed (revoked certificates that expired leave it). Returns how many
/// prefixes were freed.
pub fn sweep(conn: &Connection, ctx: &Ctx, now: i64) -> Result<usize> {
    let limit = now - i64::from(ctx.settings.grace_days) * 86400;
    let mut st =
        conn.prepare("SELECT id, bits, prefix FROM nodes WHERE status = 'active' AND not_after < ?1")?;
    let expired: Vec<(i64, String, String)> =
        st.query_map([limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<rusqlite::Result<_>>()?;
    for (id, bits, prefix) in &expired {
        db::release(conn, bits)?;
        conn.execute(
            "UPDATE nodes SET status = 'expired', released_at = ?1 WHERE id = ?2",
            params![now, id],
        )?;
        conn.execute("DELETE FROM endpoints WHERE node_id = ?1", [id])?;
        db::audit(conn, now, "registry", "expire", prefix, "grace period over: prefix freed")?;
        tracing::info!(prefix = %prefix, "prefix freed after the grace period");
    }
    let (_, doc) = current_config(conn)?;
    let cfg = doc.verify(ctx.ca.cert_der())?;
    let now_revoked: Vec<String> = revoked(conn, now)?.into_iter().map(|(s, _)| s).collect();
    if cfg.revoked_serials != now_revoked {
        bump_config(conn, ctx, now)?;
    }
    let purged = conn.execute("DELETE FROM tokens WHERE used_at IS NULL AND expires_at < ?1", [limit])?;
    if purged > 0 {
        tracing::info!(count = purged, "expired tokens purged");
    }
    Ok(expired.len())
}

// ---------------------------------------------------------------------------
// Listing

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRow> {
    Ok(NodeRow {
        id: r.get(0)?,
        prefix: r.get(1)?,
        cn: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
        serial: r.get::<_, Option<String>>(3)?.unwrap_or_default(),
        not_after: r.get(4)?,
        status: r.get(5)?,
        kind: r.get(6)?,
        email: r.get(7)?,
    })
}

const NODE_COLS: &str = "n.id, n.prefix, c.cn, n.current_serial, n.not_after, n.status, n.kind, n.email
     FROM nodes n LEFT JOIN certs c ON c.serial = n.current_serial";

/// All nodes, by prefix.
pub fn list_nodes(conn: &Connection) -> Result<Vec<NodeRow>> {
    let mut st =
        conn.prepare(&format!("SELECT {NODE_COLS} ORDER BY n.status = 'active' DESC, n.bits, n.id"))?;
    let rows = st.query_map([], node_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// One node with its certificates and endpoints.
pub fn show_node(conn: &Connection, ctx: &Ctx, target: &str) -> Result<NodeDetail> {
    let id = find_node(conn, ctx, target)?;
    let node = conn.query_row(&format!("SELECT {NODE_COLS} WHERE n.id = ?1"), [id], node_row)?;
    let (tunnel_key, pem): (Option<String>, Option<String>) = conn.query_row(
        "SELECT n.tunnel_key, c.pem FROM nodes n LEFT JOIN certs c ON c.serial = n.current_serial WHERE n.id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut st = conn
        .prepare("SELECT serial, reason, issued_at, not_after, revoked_at FROM certs WHERE node_id = ?1 ORDER BY issued_at")?;
    let certificates = st
        .query_map([id], |r| {
            Ok(CertRow {
                serial: r.get(0)?,
                reason: r.get(1)?,
                issued_at: r.get(2)?,
                not_after: r.get(3)?,
                revoked_at: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let endpoints: Option<String> = conn
        .query_row("SELECT endpoints FROM endpoints WHERE node_id = ?1", [id], |r| r.get(0))
        .optional()?;
    let mesh_address =
        node.prefix.parse::<Ipv6Prefix>().map(|p| p.first_host().to_string()).unwrap_or_default();
    Ok(NodeDetail {
        node,
        mesh_address,
        tunnel_key,
        certificates,
        endpoints: endpoints.and_then(|e| serde_json::from_str(&e).ok()).unwrap_or_default(),
        certificate_pem: pem,
    })
}

// ---------------------------------------------------------------------------
// Endpoints and bootstrap

/// Records the endpoints (`ip:port`) the node `node_id` reports.
pub fn report_endpoints(conn: &Connection, now: i64, node_id: i64, endpoints: &[String]) -> Result<()> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(Error::BadRequest(format!("at most {MAX_ENDPOINTS} endpoints")));
    }
    let mut clean = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let a: SocketAddr = e.parse().map_err(|_| {
            Error::BadRequest(format!("{e:?} is not an ip:port endpoint ([v6]:port for IPv6)"))
        })?;
        if a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast() {
            return Err(Error::BadRequest(format!("{e:?} is not a usable endpoint")));
        }
        clean.push(a.to_string());
    }
    conn.execute(
        "INSERT INTO endpoints (node_id, endpoints, reported_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(node_id) DO UPDATE SET endpoints = excluded.endpoints, reported_at = excluded.reported_at",
        params![node_id, serde_json::to_string(&clean).unwrap_or_default(), now],
    )?;
    Ok(())
}

/// A random sample of up to `count` live nodes other than `except` that
/// reported endpoints in the last `max_age` seconds.
pub fn bootstrap(conn: &Connection, now: i64, except: i64, count: usize, max_age: i64) -> Result<Vec<Peer>> {
    let mut st = conn.prepare(
        "SELECT n.prefix, n.tunnel_key, e.endpoints FROM endpoints e JOIN nodes n ON n.id = e.node_id
         WHERE n.status = 'active' AND n.id != ?1 AND e.reported_at >= ?2 ORDER BY random() LIMIT ?3",
    )?;
    let rows = st.query_map(params![except, now - max_age, count as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, String>(2)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (prefix, tunnel_key, eps) = row?;
        let mesh_address = prefix.parse::<Ipv6Prefix>()?.first_host();
        out.push(Peer {
            prefix,
            mesh_address,
            tunnel_key,
            endpoints: serde_json::from_str(&eps).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// The CA key type recorded at init.
pub fn key_type(conn: &Connection) -> Result<KeyType> {
    KeyType::parse(&db::get_config(conn, "key_type")?.unwrap_or_default())
}

/// A consistency check used by tests and `serve` at start: no two live
/// nodes overlap, every live node holds its prefix row, and the tree covers
/// the network exactly once.
pub fn check_consistency(conn: &Connection, ctx: &Ctx) -> Result<()> {
    let rows = db::tree_rows(conn)?;
    let mut total: u128 = 0;
    for (bits, _) in &rows {
        let depth = bits.len() as u32;
        total += if depth >= 127 { 1 } else { 1u128 << (127 - depth) };
    }
    if total != 1u128 << 127 {
        return Err(Error::Internal("the prefix tree does not cover the network exactly once".into()));
    }
    let mut st = conn.prepare("SELECT n.bits, p.state FROM nodes n LEFT JOIN prefixes p ON p.bits = n.bits WHERE n.status = 'active'")?;
    let live: Vec<(String, Option<String>)> =
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
    let mut prefixes = Vec::new();
    for (bits, state) in &live {
        if state.as_deref() != Some("used") {
            return Err(Error::Internal(format!("live node {bits} has no used prefix row")));
        }
        prefixes.push(ctx.settings.network.prefix_of(bits)?);
    }
    prefixes.sort_by_key(|p| (u128::from(p.addr), p.len));
    for w in prefixes.windows(2) {
        if w[0].overlaps(&w[1]) {
            return Err(Error::Internal(format!("live prefixes {} and {} overlap", w[0], w[1])));
        }
    }
    Ok(())
}

/// Parses a CertInfo serial from PEM (helper for callers holding a PEM).
pub fn serial_of(pem: &str) -> Result<String> {
    Ok(CertInfo::from_pem(pem)?.serial)
}

// ---------------------------------------------------------------------------
// Administrators (admin API over mTLS)

/// An administrator's client certificate, as made by [`add_admin`].
#[derive(Debug, Clone, Serialize)]
pub struct AdminCert {
    /// Name.
    pub name: String,
    /// Serial, hex.
    pub serial: String,
    /// Certificate PEM.
    pub certificate: String,
    /// Private key PEM (never stored by the registry).
    pub key: String,
    /// Expiry, unix time.
    pub not_after: i64,
}

/// A row of `registry admin list`.
#[derive(Debug, Clone, Serialize)]
pub struct AdminRow {
    /// Name.
    pub name: String,
    /// Serial, hex.
    pub serial: String,
    /// Unix time.
    pub issued_at: i64,
    /// Unix time.
    pub not_after: i64,
    /// Revocation time.
    pub revoked_at: Option<i64>,
}

fn check_admin_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    {
        return Err(Error::BadRequest(format!(
            "{name:?} is not an admin name: use 1 to 64 letters, digits, '-', '_', '.', '@'"
        )));
    }
    Ok(())
}

/// Issues a client certificate that authorises the admin API.
pub fn add_admin(conn: &Connection, ctx: &Ctx, now: i64, name: &str, days: u32) -> Result<AdminCert> {
    check_admin_name(name)?;
    if days == 0 || days > 3650 {
        return Err(Error::BadRequest("the validity must be from 1 to 3650 days".into()));
    }
    let not_after = now + i64::from(days) * 86400;
    let (issued, key) = ctx.ca.admin_cert(name, now - crate::ca::BACKDATE_SECS, not_after)?;
    conn.execute(
        "INSERT INTO admins (serial, name, pem, issued_at, not_after) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![issued.serial, name, issued.pem, now, not_after],
    )?;
    db::audit(conn, now, "operator", "admin-add", name, &issued.serial)?;
    Ok(AdminCert { name: name.to_string(), serial: issued.serial, certificate: issued.pem, key, not_after })
}

/// Lists administrators' certificates.
pub fn list_admins(conn: &Connection) -> Result<Vec<AdminRow>> {
    let mut st = conn.prepare(
        "SELECT name, serial, issued_at, not_after, revoked_at FROM admins ORDER BY name, issued_at",
    )?;
    let rows = st.query_map([], |r| {
        Ok(AdminRow {
            name: r.get(0)?,
            serial: r.get(1)?,
            issued_at: r.get(2)?,
            not_after: r.get(3)?,
            revoked_at: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Revokes every unexpired certificate of the administrator `name` (or the
/// one with serial `name`) and re-signs the network config. Returns the serials.
pub fn revoke_admin(conn: &Connection, ctx: &Ctx, now: i64, name: &str, actor: &str) -> Result<Vec<String>> {
    atomically(conn, || {
        let mut st = conn.prepare(
            "SELECT serial FROM admins WHERE (name = ?1 OR serial = lower(?1)) AND revoked_at IS NULL AND not_after > ?2",
        )?;
        let serials: Vec<String> =
            st.query_map(params![name, now], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        if serials.is_empty() {
            return Err(Error::NotFound(format!(
                "no valid admin certificate {name:?}: see `sixmesh registry admin list`"
            )));
        }
        for s in &serials {
            conn.execute("UPDATE admins SET revoked_at = ?1 WHERE serial = ?2", params![now, s])?;
        }
        bump_config(conn, ctx, now)?;
        db::audit(conn, now, actor, "admin-revoke", name, &serials.join(","))?;
        Ok(serials)
    })
}

/// The administrator holding the client certificate `serial`, if it is
/// valid and not revoked.
pub fn authenticate_admin(conn: &Connection, serial: &str, now: i64) -> Result<String> {
    let row: Option<(String, i64, Option<i64>)> = conn
        .query_row("SELECT name, not_after, revoked_at FROM admins WHERE serial = ?1", [serial], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    match row {
        Some((name, na, None)) if na > now => Ok(name),
        Some(_) => Err(Error::Forbidden("this admin certificate is revoked or expired".into())),
        None => Err(Error::Forbidden(
            "the admin API needs an administrator's certificate (`sixmesh registry admin add`)".into(),
        )),
    }
}

/// A row of the audit table.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    /// Sequence number.
    pub id: i64,
    /// Unix time.
    pub at: i64,
    /// Who: `operator`, `token`, `cert:<serial>`, `admin:<name>`, `registry`.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub subject: String,
    /// Details.
    pub detail: String,
}

/// The last `limit` audit records, oldest first.
pub fn audit_tail(conn: &Connection, limit: usize) -> Result<Vec<AuditRow>> {
    let mut st = conn.prepare(
        "SELECT id, at, actor, action, subject, detail FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    let rows = st.query_map([limit as i64], |r| {
        Ok(AuditRow {
            id: r.get(0)?,
            at: r.get(1)?,
            actor: r.get(2)?,
            action: r.get(3)?,
            subject: r.get(4)?,
            detail: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
