//! `sixmesh bridge run`: the stunnel-like TLS bridge.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sixmesh_frontend::bridge::{Bridge, BridgeError};
use sixmesh_mesh_node::daemon::Reporter;

#[derive(Debug, Args)]
pub struct BridgeArgs {
    #[command(subcommand)]
    command: BridgeCommand,
}

#[derive(Debug, Subcommand)]
enum BridgeCommand {
    /// Run the tunnels of a bridge.toml (SIGHUP, or a changed bridge.toml or certificate, reloads them
    /// without dropping open connections)
    Run(RunArgs),
    /// Print each tunnel's counters (connections, refusals, bytes) from a running bridge, or from a
    /// node that runs one (`--control /run/sixmesh/node.sock`)
    Status(StatusArgs),
}

/// Default control socket of `sixmesh bridge run`.
const DEFAULT_CONTROL: &str = "/run/sixmesh/bridge.sock";

#[derive(Debug, Args)]
struct StatusArgs {
    /// Control socket of the bridge, or of a node that runs one (`sixmesh node run --bridge`).
    #[arg(long, value_name = "SOCK", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs TLS tunnels: `client` ones take plain TCP locally and connect with
/// mutual TLS to a remote (mesh) address; `server` ones take mutual TLS and
/// connect to a local plain service.
#[derive(Debug, Args)]
#[command(after_help = "bridge.toml:
  [tls]                         # default: the node's certificate from /var/lib/sixmesh
  state_dir = \"/var/lib/sixmesh\"   # or cert/key/ca/crl = \"FILE.pem\" (any PEM CA works)
  idle_timeout_secs = 3600      # top level: close idle connections
  max_connections = 1024        # top level: per tunnel
  session_resumption = true     # top level: TLS session tickets / IDs (a reload forgets them)
  workers = 0                   # top level: connection threads, 0 = one per core

  [[tunnel]]
  name = \"mariadb\"
  mode = \"client\"               # plain in, TLS out
  listen = \"127.0.0.1:3306\"
  connect = \"[fd5e:77:0:3::2]:3307\"
  allow = [\"prefix:fd5e:77:0:3::/64\"]   # any | prefix:P | cn:NAME | san:NAME

  [[tunnel]]
  name = \"mariadb-in\"
  mode = \"server\"               # TLS in, plain out
  listen = \"[fd5e:77:0:3::2]:3307\"
  connect = \"127.0.0.1:3306\"
  allow = [\"any\"]")]
struct RunArgs {
    /// The bridge's TOML configuration.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Control socket for `sixmesh bridge status`.
    #[arg(long, value_name = "SOCK", default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9186 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

/// Runs `sixmesh bridge …`.
pub fn run_bridge(a: BridgeArgs) -> Result<ExitCode> {
    match a.command {
        BridgeCommand::Run(r) => {
            let bridge = load(&r.config)?;
            let rt = super::runtime()?;
            rt.block_on(async move {
                let control = sixmesh_routing::driver::bind_control_socket(&r.control)
                    .with_context(|| format!("control socket {}", r.control.display()))?;
                tokio::spawn(bridge.clone().serve_control(control));
                if let Some(addr) = r.metrics {
                    let l = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot serve metrics on {addr}"))?;
                    tokio::spawn(bridge.clone().serve_metrics(l));
                }
                bridge.run(super::shutdown_signal()).await?;
                let _ = std::fs::remove_file(&r.control);
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        BridgeCommand::Status(s) => {
            // A bridge answers any request with its status; a node answers
            // `bridge` with its bridge's.
            let answer = super::runtime()?
                .block_on(sixmesh_routing::driver::control_request(&s.control, r#"{"cmd":"bridge"}"#))
                .with_context(|| {
                    format!(
                        "cannot reach the bridge at {} (is `sixmesh bridge run` running?)",
                        s.control.display()
                    )
                })?;
            if s.json {
                println!("{answer}");
                return Ok(ExitCode::SUCCESS);
            }
            let v: serde_json::Value =
                serde_json::from_str(&answer).context("the bridge answered something that is not JSON")?;
            if let Some(e) = v["error"].as_str() {
                anyhow::bail!(
                    "{}: {e} (does this node run a bridge? `sixmesh node run --bridge FILE`)",
                    s.control.display()
                );
            }
            print_tunnels(&v);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints the tunnels of a bridge status document as a table.
pub fn print_tunnels(v: &serde_json::Value) {
    println!(
        "{:<16} {:<7} {:<28} {:>9} {:>8} {:>8} {:>7} {:>12} {:>12}",
        "TUNNEL", "MODE", "LISTEN", "ACCEPTED", "RESUMED", "REFUSED", "ACTIVE", "IN", "OUT"
    );
    for t in v["tunnels"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<7} {:<28} {:>9} {:>8} {:>8} {:>7} {:>12} {:>12}",
            t["name"].as_str().unwrap_or("?"),
            t["mode"].as_str().unwrap_or("?"),
            t["listen"].as_str().unwrap_or("?"),
            t["accepted"],
            t["resumed"],
            t["refused"],
            t["active"],
            t["bytes_in"],
            t["bytes_out"]
        );
    }
}

/// Reads a bridge.toml and loads its certificates.
pub fn load(path: &Path) -> Result<Arc<Bridge>> {
    Ok(Bridge::from_file(path)?)
}

/// How a bridge run by `sixmesh node run --bridge` reports through the
/// node's control socket (`bridge` request, `bridge` key of `status`) and
/// metrics.
pub fn reporter(b: Arc<Bridge>) -> Reporter {
    let m = b.clone();
    Reporter {
        name: "bridge".into(),
        status: Arc::new(move || b.status_json()),
        metrics: Arc::new(move || m.metrics()),
    }
}

/// Runs a bridge's tunnels inside the node's process, on a runtime of
/// their own (the node's data path keeps its single thread). A tunnel may
/// listen on the node's mesh address, which exists only once the node has
/// set its TUN device up: binding is retried for a minute while the
/// address is not there yet.
pub fn spawn_in_node(bridge: Arc<Bridge>) -> Result<()> {
    let rt = super::runtime()?;
    std::thread::Builder::new()
        .name("bridge".into())
        .spawn(move || {
            rt.block_on(async move {
                let start = Instant::now();
                loop {
                    match bridge.clone().run(std::future::pending()).await {
                        Err(BridgeError::Listen { source, .. })
                            if source.kind() == std::io::ErrorKind::AddrNotAvailable
                                && start.elapsed() < Duration::from_secs(60) =>
                        {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => {
                            tracing::error!("bridge tunnels stopped: {e}");
                            return;
                        }
                        Ok(()) => return,
                    }
                }
            })
        })
        .context("cannot start the bridge thread")?;
    Ok(())
}
