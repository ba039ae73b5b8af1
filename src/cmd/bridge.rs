//! `sixmesh bridge run`: the stunnel-like TLS bridge.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use sixmesh_frontend::bridge::{Bridge, BridgeConfig};

#[derive(Debug, Args)]
pub struct BridgeArgs {
    #[command(subcommand)]
    command: BridgeCommand,
}

#[derive(Debug, Subcommand)]
enum BridgeCommand {
    /// Run the tunnels of a bridge.toml (SIGHUP or a changed file reloads the certificates)
    Run(RunArgs),
    /// Print each tunnel's counters (connections, refusals, bytes) from a running bridge
    Status(StatusArgs),
}

/// Default control socket of `sixmesh bridge run`.
const DEFAULT_CONTROL: &str = "/run/sixmesh/bridge.sock";

#[derive(Debug, Args)]
struct StatusArgs {
    /// Control socket of the bridge.
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
            let text = std::fs::read_to_string(&r.config)
                .with_context(|| format!("cannot read {}", r.config.display()))?;
            let cfg: BridgeConfig = toml::from_str(&text)
                .with_context(|| format!("{} is not a valid bridge config", r.config.display()))?;
            let rt = super::runtime()?;
            rt.block_on(async move {
                let bridge = Bridge::new(cfg)?;
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
            let answer = super::runtime()?
                .block_on(sixmesh_routing::driver::control_request(&s.control, r#"{"cmd":"status"}"#))
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
            Ok(ExitCode::SUCCESS)
        }
    }
}
