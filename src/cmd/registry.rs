//! `sixmesh registry …` and `sixmesh join`: the command line over
//! `sixmesh-registry`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use sixmesh_registry::ca::KeyType;
use sixmesh_registry::client::{self, JoinOptions, NodeIdentity};
use sixmesh_registry::registry::{self as reg, InitOptions, Registry, TokenOptions, now};
use sixmesh_registry::server::{ServeOptions, Server, default_server_names};

use super::{runtime, shutdown_signal};

/// `println!` that does not panic when stdout is closed (e.g. `| head -1`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that does not panic when stdout is closed.
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// `sixmesh registry`.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Directory of the registry's state (database with the CA key inside).
    #[arg(long, global = true, default_value = sixmesh_registry::DEFAULT_STATE_DIR, env = "SIXMESH_REGISTRY_STATE_DIR")]
    pub state_dir: PathBuf,

    /// Run `list`, `show`, `revoke` and `token …` through the admin API of this
    /// registry (https://HOST:PORT) instead of the local database; needs --admin-dir
    #[arg(long, global = true, requires = "admin_dir", env = "SIXMESH_REGISTRY_REMOTE")]
    pub remote: Option<String>,

    /// Directory with admin.pem, admin.key and ca.pem from `registry admin add`
    #[arg(long, global = true, env = "SIXMESH_REGISTRY_ADMIN_DIR")]
    pub admin_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: RegistryCommand,
}

/// The registry's subcommands.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Create the CA, the database and the first network config
    Init {
        /// Network prefix, /16 to /56 (default: a random unique-local /48)
        #[arg(long)]
        network: Option<String>,
        /// Length of the prefix each node gets
        #[arg(long, default_value_t = 64)]
        node_prefix_len: u8,
        /// CA key type (rsa2048 is needed for re6st-conf clients)
        #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "rsa2048"])]
        key: String,
        /// Validity of node certificates, days (nodes renew from 2/3 of it)
        #[arg(long, default_value_t = reg::DEFAULT_CERT_VALIDITY_DAYS)]
        cert_days: u32,
        /// Days an expired node may still renew and keeps its prefix
        #[arg(long, default_value_t = reg::DEFAULT_GRACE_DAYS)]
        grace_days: u32,
    },
    /// Serve the HTTPS API (and optionally re6st's plain-HTTP endpoints)
    Serve {
        /// HTTPS listen address
        #[arg(long, default_value = "[::]:8443")]
        listen: SocketAddr,
        /// Plain-HTTP listener for re6st-conf (getCa, requestToken, requestCertificate)
        #[arg(long)]
        legacy_listen: Option<SocketAddr>,
        /// Extra DNS name or IP address for the server certificate (repeatable);
        /// localhost, 127.0.0.1, ::1, the host name and this machine's addresses are always included
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Make, list or delete enrollment tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// List nodes: prefix, CN, serial, expiry, status
    List {
        /// One JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one node, its certificates and endpoints
    Show {
        /// Node prefix (fd..::/64), re6st CN (N/L) or certificate serial (hex)
        target: String,
        /// JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Revoke a node: its certificates go to the CRL and its prefix is freed
    Revoke {
        /// Node prefix (fd..::/64), re6st CN (N/L) or certificate serial (hex)
        target: String,
    },
    /// Write a consistent copy of the database (it holds the CA key: keep it private)
    Backup {
        /// Destination file (must not exist)
        file: PathBuf,
    },
    /// Replace the database by a backup (stop `registry serve` first)
    Restore {
        /// Backup file made by `registry backup`
        file: PathBuf,
    },
    /// Print the CA certificate's fingerprint and PEM
    Ca,
    /// Show the signed network config, or change tunnel parameters (signs a new version)
    Config {
        /// NAME=VALUE tunnel parameters to set (port, client_count, max_clients,
        /// refresh_secs, keepalive_secs, mtu, protocol); none: show the config
        set: Vec<String>,
    },
    /// Issue, list or revoke administrators' client certificates (admin API)
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// `sixmesh registry admin`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Make a key and client certificate for the admin API, written to --out
    Add {
        /// Administrator's name (letters, digits, - _ . @)
        name: String,
        /// Directory to write admin.pem, admin.key (0600) and ca.pem into
        #[arg(long)]
        out: PathBuf,
        /// Validity in days
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// List administrators' certificates
    List,
    /// Revoke an administrator's certificates (by name or serial)
    Revoke {
        /// Name or serial
        name: String,
    },
}

/// `sixmesh registry token`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make tokens (printed once, one per line; only their hashes are stored)
    Add {
        /// Email recorded with the node
        #[arg(long)]
        email: Option<String>,
        /// Node prefix length the token grants (default: the network's)
        #[arg(long)]
        prefix_len: Option<u8>,
        /// Lifetime, e.g. 30m, 12h, 7d, 2w
        #[arg(long, default_value = "7d")]
        expires: String,
        /// How many tokens to make
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// List tokens (id, email, prefix length, expiry, used)
    List {
        /// One JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Delete a token, given in clear or by its id from `token list`
    Delete {
        /// The token, or its id
        token: String,
    },
}

/// `sixmesh join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Registry URL, e.g. https://registry.example:8443
    #[arg(long, required_unless_present = "renew")]
    pub registry: Option<String>,
    /// Enrollment token from `sixmesh registry token add`
    #[arg(long, required_unless_present = "renew", env = "SIXMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The registry CA's fingerprint, sha256:HEX (printed by `registry init`)
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// Accept the registry's CA without a fingerprint (insecure on untrusted networks)
    #[arg(long)]
    pub trust_on_first_use: bool,
    /// The node's state directory
    #[arg(long, default_value = client::DEFAULT_NODE_STATE_DIR, env = "SIXMESH_STATE_DIR")]
    pub state_dir: PathBuf,
    /// Renew the certificate (new TLS key, same prefix) instead of enrolling
    #[arg(long, conflicts_with_all = ["token", "ca_fingerprint", "trust_on_first_use"])]
    pub renew: bool,
    /// With --renew: only renew if 2/3 of the lifetime has passed
    #[arg(long, requires = "renew")]
    pub if_due: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// Parses `30s`, `15m`, `12h`, `7d`, `2w` into seconds.
fn parse_duration(s: &str) -> Result<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().with_context(|| format!("{s:?} is not a duration like 7d, 12h or 30m"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "" | "d" => 86400,
        "w" => 7 * 86400,
        _ => bail!("{s:?}: unknown unit {unit:?} (use s, m, h, d or w)"),
    };
    n.checked_mul(mult).filter(|v| *v > 0).with_context(|| format!("{s:?} is not a positive duration"))
}

fn when(t: i64) -> String {
    // UTC date without pulling a date crate into the binary.
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}Z", secs / 3600, secs % 3600 / 60)
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Runs `sixmesh registry …`.
pub fn run_registry(args: RegistryArgs) -> Result<ExitCode> {
    if let Some(url) = &args.remote {
        let admin_dir = args.admin_dir.as_deref().context("--remote needs --admin-dir")?;
        return remote(url, admin_dir, args.command);
    }
    let dir = args.state_dir;
    match args.command {
        RegistryCommand::Init { network, node_prefix_len, key, cert_days, grace_days } => {
            let opts = InitOptions {
                network: network.as_deref().map(str::parse).transpose()?,
                node_prefix_len,
                key_type: KeyType::parse(&key)?,
                cert_validity_days: cert_days,
                grace_days,
            };
            let s = Registry::init(&dir, &opts, now())?;
            out!("registry initialised in {}", dir.display());
            out!("network:        {} (node prefixes /{})", s.network, s.node_prefix_len);
            out!("CA fingerprint: {}", s.ca_fingerprint);
            out!("CA certificate: {}", s.ca_file.display());
            out!(
                "next: `sixmesh registry serve --state-dir {0}`, then `sixmesh registry token add --state-dir {0}`",
                dir.display()
            );
            out!(
                "nodes join with: sixmesh join --registry https://HOST:8443 --token TOKEN --ca-fingerprint {}",
                s.ca_fingerprint
            );
        }
        RegistryCommand::Serve { listen, legacy_listen, names } => {
            let registry = Registry::open(&dir)?;
            let _serve_lock = registry.serve_lock()?;
            let mut server_names = default_server_names();
            server_names.extend(names);
            let opts = ServeOptions { listen, legacy_listen, server_names };
            let rt = runtime()?;
            rt.block_on(async move {
                // The registry (and its lock) live as long as the server.
                let (conn, ctx, _lock) = registry.into_parts();
                let server = Server::bind(conn, ctx.clone(), &opts).await?;
                out!(
                    "registry serving https://{} (CA fingerprint {})",
                    server.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                    ctx.ca.fingerprint()
                );
                if let Some(a) = server.legacy_addr() {
                    out!("re6st-compatible plain HTTP on http://{a}/");
                }
                server.run(shutdown_signal()).await?;
                anyhow::Ok(())
            })?;
        }
        RegistryCommand::Token(t) => token(&dir, t)?,
        RegistryCommand::List { json } => {
            let r = Registry::open(&dir)?;
            let rows = reg::list_nodes(&r.conn)?;
            if json {
                out!("{}", serde_json::to_string(&rows)?);
            } else {
                out!("{:<28} {:<28} {:<34} {:<18} STATUS", "PREFIX", "CN", "SERIAL", "EXPIRES");
                for n in rows {
                    out!(
                        "{:<28} {:<28} {:<34} {:<18} {}",
                        n.prefix,
                        n.cn,
                        n.serial,
                        when(n.not_after),
                        n.status
                    );
                }
            }
        }
        RegistryCommand::Show { target, json } => {
            let r = Registry::open(&dir)?;
            let d = reg::show_node(&r.conn, &r.ctx, &target)?;
            if json {
                out!("{}", serde_json::to_string(&d)?);
            } else {
                out!("prefix:       {}", d.node.prefix);
                out!("mesh address: {}", d.mesh_address);
                out!("status:       {} ({})", d.node.status, d.node.kind);
                out!("CN:           {}", d.node.cn);
                out!("email:        {}", d.node.email.as_deref().unwrap_or("-"));
                out!("tunnel key:   {}", d.tunnel_key.as_deref().unwrap_or("-"));
                out!(
                    "endpoints:    {}",
                    if d.endpoints.is_empty() { "-".into() } else { d.endpoints.join(" ") }
                );
                out!("certificates:");
                for c in &d.certificates {
                    let revoked = c.revoked_at.map(|t| format!(" REVOKED {}", when(t))).unwrap_or_default();
                    out!(
                        "  {} {:<6} issued {} expires {}{revoked}",
                        c.serial,
                        c.reason,
                        when(c.issued_at),
                        when(c.not_after)
                    );
                }
            }
        }
        RegistryCommand::Revoke { target } => {
            let mut r = Registry::open(&dir)?;
            let rv = r.write(|c, ctx| reg::revoke(c, ctx, now(), &target, "operator"))?;
            out!(
                "revoked {}: serial(s) {} are in the CRL and in network config version {}",
                rv.prefix,
                if rv.serials.is_empty() { "-".into() } else { rv.serials.join(", ") },
                rv.config_version
            );
        }
        RegistryCommand::Backup { file } => {
            let r = Registry::open(&dir)?;
            r.backup(&file)?;
            out!("backup written to {} (it holds the CA key: keep it private)", file.display());
        }
        RegistryCommand::Restore { file } => {
            let s = Registry::restore(&dir, &file)?;
            out!("restored {} into {}", file.display(), dir.display());
            out!("network:        {}", s.network);
            out!("CA fingerprint: {}", s.ca_fingerprint);
        }
        RegistryCommand::Admin(a) => admin(&dir, a)?,
        RegistryCommand::Config { set } => {
            let mut r = Registry::open(&dir)?;
            if !set.is_empty() {
                let (v, _) = r.write(|c, ctx| reg::set_tunnel_params(c, ctx, now(), &set, "operator"))?;
                eprintln!("signed network config version {v}");
            }
            let (_, doc) = reg::current_config(&r.conn)?;
            let cfg = doc.verify(r.ctx.ca.cert_der())?;
            out!("{}", serde_json::to_string_pretty(&cfg)?);
        }
        RegistryCommand::Ca => {
            let r = Registry::open(&dir)?;
            out!("{}", r.ctx.ca.fingerprint());
            out_raw!("{}", r.ctx.ca.cert_pem());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn admin(dir: &std::path::Path, a: AdminCommand) -> Result<()> {
    match a {
        AdminCommand::Add { name, out, days } => {
            let mut r = Registry::open(dir)?;
            let c = r.write(|c, ctx| reg::add_admin(c, ctx, now(), &name, days))?;
            let ca_pem = r.ctx.ca.cert_pem().to_string();
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            reg::write_atomic(&out.join("admin.key"), c.key.as_bytes(), 0o600)?;
            reg::write_atomic(&out.join("admin.pem"), c.certificate.as_bytes(), 0o644)?;
            reg::write_atomic(&out.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
            out!("admin certificate for {name} (serial {}) written to {}", c.serial, out.display());
            out!(
                "use it with: sixmesh registry --remote https://HOST:8443 --admin-dir {} list",
                out.display()
            );
        }
        AdminCommand::List => {
            let r = Registry::open(dir)?;
            out!("{:<20} {:<34} {:<18} REVOKED", "NAME", "SERIAL", "EXPIRES");
            for a in reg::list_admins(&r.conn)? {
                out!(
                    "{:<20} {:<34} {:<18} {}",
                    a.name,
                    a.serial,
                    when(a.not_after),
                    a.revoked_at.map(when).unwrap_or_else(|| "-".into())
                );
            }
        }
        AdminCommand::Revoke { name } => {
            let mut r = Registry::open(dir)?;
            let serials = r.write(|c, ctx| reg::revoke_admin(c, ctx, now(), &name, "operator"))?;
            out!("revoked admin certificate(s) {}", serials.join(", "));
        }
    }
    Ok(())
}

/// Runs an operator command through the admin API.
fn remote(url: &str, admin_dir: &std::path::Path, command: RegistryCommand) -> Result<ExitCode> {
    use sixmesh_registry::client::Method;
    let read = |f: &str| {
        std::fs::read_to_string(admin_dir.join(f)).with_context(|| {
            format!(
                "cannot read {}: make it with `sixmesh registry admin add NAME --out DIR`",
                admin_dir.join(f).display()
            )
        })
    };
    let (ca, cert, key) = (read("ca.pem")?, read("admin.pem")?, read("admin.key")?);
    let (method, path, body): (Method, String, Option<serde_json::Value>) = match &command {
        RegistryCommand::List { .. } => (Method::GET, "/v1/admin/nodes".into(), None),
        RegistryCommand::Show { target, .. } => {
            (Method::GET, format!("/v1/admin/node?target={}", encode(target)), None)
        }
        RegistryCommand::Revoke { target } => {
            (Method::POST, "/v1/admin/revoke".into(), Some(serde_json::json!({ "target": target })))
        }
        RegistryCommand::Token(TokenCommand::Add { email, prefix_len, expires, count }) => (
            Method::POST,
            "/v1/admin/tokens".into(),
            Some(serde_json::json!({
                "email": email, "prefix_len": prefix_len,
                "expires_secs": parse_duration(expires)?, "count": count,
            })),
        ),
        RegistryCommand::Token(TokenCommand::List { .. }) => (Method::GET, "/v1/admin/tokens".into(), None),
        RegistryCommand::Token(TokenCommand::Delete { token }) => {
            (Method::DELETE, format!("/v1/admin/tokens?id={}", encode(token)), None)
        }
        _ => bail!(
            "only list, show, revoke and token commands work with --remote; run the others on the registry host"
        ),
    };
    let body = body.map(|b| b.to_string().into_bytes());
    let (status, resp) =
        runtime()?.block_on(client::call(url, &ca, Some((&cert, &key)), method, &path, body))?;
    let v: serde_json::Value = serde_json::from_slice(&resp).context("the registry's answer is not JSON")?;
    if !(200..300).contains(&status) {
        bail!("the registry refused ({status}): {}", v["message"].as_str().unwrap_or("no message"));
    }
    match command {
        RegistryCommand::Token(TokenCommand::Add { .. }) => {
            for t in v["tokens"].as_array().into_iter().flatten() {
                out!("{}", t.as_str().unwrap_or_default());
            }
        }
        _ => out!("{v}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn token(dir: &std::path::Path, t: TokenCommand) -> Result<()> {
    match t {
        TokenCommand::Add { email, prefix_len, expires, count } => {
            if count == 0 || count > 10_000 {
                bail!("--count must be from 1 to 10000");
            }
            let opts = TokenOptions { email, prefix_len, expires_secs: parse_duration(&expires)?, count };
            let mut r = Registry::open(dir)?;
            let tokens = r.write(|c, ctx| reg::add_tokens(c, ctx, now(), &opts))?;
            for t in tokens {
                out!("{t}");
            }
        }
        TokenCommand::List { json } => {
            let r = Registry::open(dir)?;
            let rows = reg::list_tokens(&r.conn)?;
            if json {
                out!("{}", serde_json::to_string(&rows)?);
            } else {
                out!("{:<13} {:<30} {:<5} {:<18} USED", "ID", "EMAIL", "LEN", "EXPIRES");
                let t = now();
                for k in rows {
                    let used = match k.used_at {
                        Some(u) => when(u),
                        None if k.expires_at <= t => "expired".into(),
                        None => "-".into(),
                    };
                    out!(
                        "{:<13} {:<30} /{:<4} {:<18} {used}",
                        k.id,
                        k.email.as_deref().unwrap_or("-"),
                        k.prefix_len,
                        when(k.expires_at)
                    );
                }
            }
        }
        TokenCommand::Delete { token } => {
            let mut r = Registry::open(dir)?;
            let n = r.write(|c, _| reg::delete_token(c, now(), &token))?;
            out!("deleted {n} token(s)");
        }
    }
    Ok(())
}

fn print_identity(id: &NodeIdentity, json: bool, what: &str) -> Result<()> {
    if json {
        out!("{}", serde_json::to_string(id)?);
    } else {
        out!("{what}");
        out!("prefix:         {}", id.prefix);
        out!("mesh address:   {}", id.mesh_address);
        out!("serial:         {}", id.serial);
        out!("expires:        {} (renewal from {})", when(id.not_after), when(id.renew_after));
        out!("CA fingerprint: {}", id.ca_fingerprint);
    }
    Ok(())
}

/// Runs `sixmesh join`.
pub fn run_join(args: JoinArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    if args.renew {
        match rt.block_on(client::renew(&args.state_dir, !args.if_due))? {
            Some(id) => print_identity(&id, args.json, "certificate renewed")?,
            None => {
                let id = client::load_identity(&args.state_dir)?.context("no enrolment found")?;
                print_identity(&id, args.json, "renewal not due yet; nothing done")?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(registry), Some(token)) = (args.registry, args.token) else {
        bail!("--registry and --token are needed to join (or use --renew)");
    };
    if args.ca_fingerprint.is_none() && args.trust_on_first_use {
        eprintln!(
            "sixmesh join: WARNING: no --ca-fingerprint: trusting whatever CA the registry presents (trust on first use)"
        );
    }
    let opts = JoinOptions {
        registry,
        token,
        ca_fingerprint: args.ca_fingerprint,
        trust_on_first_use: args.trust_on_first_use,
        state_dir: args.state_dir,
    };
    let id = rt.block_on(client::join(&opts))?;
    let what = if id.already_enrolled { "already enrolled; nothing requested" } else { "enrolled" };
    print_identity(&id, args.json, what)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("7d").unwrap(), 7 * 86400);
        assert_eq!(parse_duration("30m").unwrap(), 1800);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86400);
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(when(0), "1970-01-01 00:00Z");
        assert_eq!(when(1_763_779_200), "2025-11-22 02:40Z");
    }
}
