//! `sixmesh node …` and `sixmesh routes`: the Babel router on real
//! interfaces, and its routing table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ipnet::Ipv6Net;
use sixmesh_routing::driver::{self, InterfaceSpec};

use crate::cli::Pending;

/// Default control socket of `sixmesh node babel`.
pub const DEFAULT_BABEL_CONTROL: &str = "/run/sixmesh/babel.sock";

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Run only the Babel router on real interfaces (joins a LAN of Babel routers, e.g. babeld)
    Babel(BabelArgs),
    /// Run the full mesh daemon: TUN, encrypted tunnels, Babel inside them
    Run(Pending),
}

/// Runs the Babel router (RFC 8966) on real interfaces until SIGINT/SIGTERM.
///
/// Example: sixmesh node babel --interface eth0 --interface wg0:tunnel --announce fd00:1:2:3::/64
#[derive(Debug, Args)]
#[command(after_help = "Routes it selects are installed in the kernel as `proto babel` \
(see `ip -6 route show proto babel`) and removed on exit. `sixmesh routes` prints the table.")]
struct BabelArgs {
    /// Interface to speak Babel on, as NAME, NAME:wired or NAME:tunnel
    /// (tunnel: RTT-based cost and timestamps, like babeld's `type tunnel`). Repeat for several.
    #[arg(long = "interface", short = 'i', required = true, value_name = "IF[:wired|tunnel]")]
    interfaces: Vec<InterfaceSpec>,
    /// Prefix to originate, optionally source-specific as `PREFIX,from=SRC`. Repeat for several.
    #[arg(long = "announce", short = 'a', value_name = "PREFIX[,from=SRC]", value_parser = parse_announce)]
    announce: Vec<(Ipv6Net, Option<Ipv6Net>)>,
    /// File that keeps the router-id and seqno across restarts, so that
    /// neighbours do not ignore a restarted router.
    #[arg(long, value_name = "FILE", default_value = "/var/lib/sixmesh/babel.state")]
    state_file: PathBuf,
    /// Unix socket for `sixmesh routes` and other local clients.
    #[arg(long, value_name = "SOCK", default_value = DEFAULT_BABEL_CONTROL)]
    control: PathBuf,
    /// Hello interval of every interface, in seconds (updates go every 4 Hellos).
    #[arg(long, value_name = "SECONDS", default_value_t = 4.0)]
    hello_interval: f64,
    /// Do not install routes in the kernel (watch only).
    #[arg(long)]
    no_kernel: bool,
}

fn parse_announce(s: &str) -> Result<(Ipv6Net, Option<Ipv6Net>), String> {
    let (p, src) = match s.split_once(",from=") {
        Some((p, s)) => (p, Some(s)),
        None => (s, None),
    };
    let p: Ipv6Net = p.parse().map_err(|e| format!("{p:?}: {e} (expected e.g. fd00:1:2:3::/64)"))?;
    let src = src.map(|s| s.parse::<Ipv6Net>().map_err(|e| format!("{s:?}: {e}"))).transpose()?;
    Ok((p.trunc(), src.map(|s| s.trunc())))
}

/// Runs `sixmesh node …`.
pub fn run_node(args: NodeArgs) -> Result<ExitCode> {
    match args.command {
        NodeCommand::Babel(a) => run_babel(a),
        NodeCommand::Run(_) => {
            eprintln!(
                "sixmesh node run: not implemented yet; it arrives with issue #5 (The mesh node). \
                 `sixmesh node babel` runs the Babel router alone today. Nothing was done."
            );
            Ok(ExitCode::from(crate::EXIT_NOT_IMPLEMENTED))
        }
    }
}

fn run_babel(a: BabelArgs) -> Result<ExitCode> {
    if !(0.05..=600.0).contains(&a.hello_interval) {
        bail!("--hello-interval must be between 0.05 and 600 seconds");
    }
    if let Some(dir) = a.state_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let cfg = driver::Config {
        interfaces: a.interfaces,
        announce: a.announce,
        state_file: Some(a.state_file),
        control: Some(a.control),
        hello_interval: Some(Duration::from_secs_f64(a.hello_interval)),
        install_routes: !a.no_kernel,
    };
    super::runtime()?.block_on(driver::run(cfg, super::shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the routing table of a running router.
#[derive(Debug, Args)]
pub struct RoutesArgs {
    /// Control socket of the router.
    #[arg(long, value_name = "SOCK", default_value = DEFAULT_BABEL_CONTROL)]
    control: PathBuf,
    /// Print the router's whole state (neighbours, routes, counters) as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `sixmesh routes`.
pub fn run_routes(a: RoutesArgs) -> Result<ExitCode> {
    let answer = super::runtime()?
        .block_on(driver::control_request(&a.control, r#"{"cmd":"dump"}"#))
        .with_context(|| {
            format!(
                "cannot reach the router at {} (is `sixmesh node babel` running? pass --control SOCK)",
                a.control.display()
            )
        })?;
    if a.json {
        println!("{answer}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value =
        serde_json::from_str(&answer).context("the router answered something that is not JSON")?;
    println!("router-id {}  seqno {}", v["router_id"].as_str().unwrap_or("?"), v["seqno"]);
    let names: std::collections::HashMap<u64, String> = v["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["ifindex"].as_u64()?, i["name"].as_str()?.to_string())))
        .collect();
    let iface =
        |x: &serde_json::Value| x.as_u64().and_then(|i| names.get(&i).cloned()).unwrap_or_else(|| "-".into());
    println!(
        "{:<3}{:<26} {:<20} {:>6} {:<26} {:<10} ROUTER-ID",
        "", "PREFIX", "FROM", "METRIC", "VIA", "IFACE"
    );
    for r in v["routes"].as_array().into_iter().flatten() {
        let mark = match (r["selected"].as_bool(), r["feasible"].as_bool()) {
            (Some(true), _) => "*",
            (_, Some(false)) => "u",
            _ => "",
        };
        println!(
            "{:<3}{:<26} {:<20} {:>6} {:<26} {:<10} {}",
            mark,
            r["prefix"].as_str().unwrap_or("?"),
            r["src"].as_str().unwrap_or("-"),
            r["metric"],
            r["next_hop"].as_str().unwrap_or("(local)"),
            iface(&r["iface"]),
            r["router_id"].as_str().unwrap_or("?"),
        );
    }
    println!("(* selected, u unfeasible)");
    Ok(ExitCode::SUCCESS)
}
