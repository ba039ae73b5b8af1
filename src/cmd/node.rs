//! `sixmesh node …` and `sixmesh routes`: the Babel router on real
//! interfaces, and its routing table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ipnet::Ipv6Net;
use sixmesh_routing::driver::{self, InterfaceSpec};

use sixmesh_mesh_node::daemon::{self, DaemonConfig, StaticPeer};
use sixmesh_mesh_node::identity::Identity;
use sixmesh_mesh_node::manager::ManagerConfig;
use sixmesh_mesh_node::node::NodeConfig;

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
    /// Run the mesh daemon: TUN, encrypted tunnels, Babel inside them
    Run(RunArgs),
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
        NodeCommand::Run(a) => run_daemon(a),
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

/// Prints the routing table of a running node (or `node babel` router).
#[derive(Debug, Args)]
pub struct RoutesArgs {
    /// Control socket of the node or router [default: /run/sixmesh/node.sock
    /// if it exists, else /run/sixmesh/babel.sock].
    #[arg(long, value_name = "SOCK")]
    control: Option<PathBuf>,
    /// Print the router's whole state (neighbours, routes, counters) as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `sixmesh routes`.
pub fn run_routes(a: RoutesArgs) -> Result<ExitCode> {
    let control = a.control.unwrap_or_else(|| {
        let node = PathBuf::from(DEFAULT_NODE_CONTROL);
        if node.exists() { node } else { PathBuf::from(DEFAULT_BABEL_CONTROL) }
    });
    let answer = super::runtime()?
        .block_on(driver::control_request(&control, r#"{"cmd":"dump"}"#))
        .with_context(|| {
            format!(
                "cannot reach the router at {} (is `sixmesh node babel` running? pass --control SOCK)",
                control.display()
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

/// Default control socket of `sixmesh node run`.
pub const DEFAULT_NODE_CONTROL: &str = "/run/sixmesh/node.sock";

/// Runs the mesh daemon with the identity `sixmesh join` wrote.
///
/// It creates the TUN device, opens the tunnel socket, gets peers from its
/// cache or the registry, keeps tunnels to a reshuffled random set of them,
/// and runs Babel inside every tunnel. Stop it with SIGINT/SIGTERM: it
/// removes what it set up.
#[derive(Debug, Args)]
#[command(after_help = "Settings come from the signed network config; --config FILE (TOML) overrides: \
listen_port, tun, control, endpoints = [\"ip:port\"], hello_interval_ms, update_interval_ms, config_refresh_secs, \
client_count, max_clients, tunnel_refresh_secs, metrics = \"127.0.0.1:9185\", bridge = \"bridge.toml\", [[peer]] tables \
(prefix, public_key, endpoint, babel) for fixed peers such as plain WireGuard ones, and a [manager] table for any other \
tunnel-manager setting (check_interval, connect_timeout, retry_after, unreachable_client_count, unreachable_after: \
seconds; max_candidates).")]
pub struct RunArgs {
    /// The state directory `sixmesh join` filled.
    #[arg(long, value_name = "DIR", default_value = sixmesh_registry::client::DEFAULT_NODE_STATE_DIR)]
    state_dir: PathBuf,
    /// A TOML file of settings (see below).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP port of the tunnels (default: the network config's).
    #[arg(long)]
    listen_port: Option<u16>,
    /// Underlay endpoint to advertise (ip:port); repeat. Default: this machine's addresses.
    #[arg(long = "endpoint", value_name = "IP:PORT")]
    endpoints: Vec<std::net::SocketAddr>,
    /// Control socket for `sixmesh status`, `peers` and `routes`.
    #[arg(long, value_name = "SOCK")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9185 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Also run the TLS bridge tunnels of this bridge.toml (see `sixmesh bridge run --help`), with
    /// their counters in `sixmesh status`, the node's metrics and `sixmesh bridge status --control`
    /// on the node's socket.
    #[arg(long, value_name = "FILE")]
    bridge: Option<PathBuf>,
}

/// `node.toml`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    listen_port: Option<u16>,
    tun: Option<String>,
    control: Option<PathBuf>,
    #[serde(default)]
    endpoints: Vec<std::net::SocketAddr>,
    hello_interval_ms: Option<u64>,
    update_interval_ms: Option<u64>,
    config_refresh_secs: Option<u64>,
    client_count: Option<usize>,
    max_clients: Option<usize>,
    tunnel_refresh_secs: Option<u64>,
    metrics: Option<std::net::SocketAddr>,
    bridge: Option<PathBuf>,
    #[serde(default, rename = "peer")]
    peers: Vec<StaticPeer>,
    /// Tunnel-manager settings (`ManagerConfig` keys), over the others.
    manager: Option<toml::Table>,
}

fn run_daemon(a: RunArgs) -> Result<ExitCode> {
    let file: NodeFile = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("{} is not a valid node config", p.display()))?
        }
        None => NodeFile::default(),
    };
    // The bridge's configuration and certificates are checked before the
    // node starts; its tunnels start in their own thread (below).
    let bridge = match a.bridge.as_ref().or(file.bridge.as_ref()) {
        Some(p) => Some(super::bridge::load(p)?),
        None => None,
    };
    let id = Identity::load(&a.state_dir)?;
    let babel_state = a.state_dir.join("babel.state");
    let st = sixmesh_routing::driver::PersistentState::load_or_create(&babel_state)?;
    let mut node = NodeConfig::new(id.prefix, id.network, st.router_id, st.seqno);
    if let Some(ms) = file.hello_interval_ms {
        node.hello_interval = Duration::from_millis(ms.clamp(50, 60_000));
    }
    if let Some(ms) = file.update_interval_ms {
        node.update_interval = Duration::from_millis(ms.clamp(50, 3_600_000)).max(node.hello_interval);
    }
    let t = &id.config.tunnel;
    node.manager = ManagerConfig {
        client_count: file.client_count.unwrap_or(t.client_count as usize),
        max_clients: file.max_clients.unwrap_or(t.max_clients as usize),
        tunnel_refresh: Duration::from_secs(
            file.tunnel_refresh_secs.unwrap_or(u64::from(t.refresh_secs)).max(1),
        ),
        ..ManagerConfig::default()
    };
    if let Some(over) = &file.manager {
        // The keys given replace those of the config built so far.
        let mut t = toml::Table::try_from(&node.manager).context("cannot serialize the manager config")?;
        t.extend(over.clone());
        node.manager = t.try_into().context("invalid [manager] table in the node config")?;
    }
    let port = a.listen_port.or(file.listen_port).unwrap_or(t.port);
    let tun_name = file.tun.unwrap_or_else(|| sixmesh_mesh_node::DEFAULT_TUN_NAME.to_string());
    let mut endpoints = if a.endpoints.is_empty() { file.endpoints } else { a.endpoints };
    if endpoints.is_empty() {
        endpoints = daemon::local_endpoints(port, &id.network, &tun_name);
    }
    let cfg = DaemonConfig {
        trust: Some(daemon::Trust {
            ca_der: id.ca_der,
            cert_der: id.cert_der,
            revoked: id.config.revoked_serials.clone(),
        }),
        state_dir: Some(a.state_dir.clone()),
        endpoints,
        config_refresh: Duration::from_secs(file.config_refresh_secs.unwrap_or(30).max(1)),
        babel_state: Some(babel_state),
        metrics: a.metrics.or(file.metrics),
        node,
        tunnel_secret: id.tunnel_secret,
        listen_port: port,
        tun_name,
        control: Some(a.control.or(file.control).unwrap_or_else(|| PathBuf::from(DEFAULT_NODE_CONTROL))),
        static_peers: file.peers,
        known_peers: Vec::new(),
        reporters: bridge.iter().map(|b| super::bridge::reporter(b.clone())).collect(),
    };
    if let Some(b) = bridge {
        super::bridge::spawn_in_node(b)?;
    }
    // One thread: the data path is one loop, and a single-threaded runtime
    // drives its sockets itself instead of waking it from another thread
    // for every packet.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(daemon::run(cfg, super::shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

/// `sixmesh status` and `sixmesh peers`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Control socket of the node.
    #[arg(long, value_name = "SOCK", default_value = DEFAULT_NODE_CONTROL)]
    control: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn node_status(a: &StatusArgs) -> Result<serde_json::Value> {
    let answer = super::runtime()?
        .block_on(driver::control_request(&a.control, r#"{"cmd":"status"}"#))
        .with_context(|| {
            format!(
                "cannot reach the node at {} (is `sixmesh node run` running? pass --control SOCK)",
                a.control.display()
            )
        })?;
    serde_json::from_str(&answer).context("the node answered something that is not JSON")
}

/// Runs `sixmesh status`.
pub fn run_status(a: StatusArgs) -> Result<ExitCode> {
    let v = node_status(&a)?;
    if a.json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let tunnels = v["tunnels"].as_array().cloned().unwrap_or_default();
    let up = tunnels.iter().filter(|t| t["up"] == true).count();
    println!("prefix        {}", v["prefix"].as_str().unwrap_or("?"));
    println!("mesh address  {}", v["mesh_address"].as_str().unwrap_or("?"));
    println!("tunnel key    {}", v["public_key"].as_str().unwrap_or("?"));
    println!("listen port   {}", v["listen_port"]);
    println!("uptime        {:.0} s", v["uptime_s"].as_f64().unwrap_or(0.0));
    println!("tunnels       {up} up of {}", tunnels.len());
    println!("routes        {}", v["routes"]);
    if v["bridge"].is_object() {
        println!();
        super::bridge::print_tunnels(&v["bridge"]);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `sixmesh peers`.
pub fn run_peers(a: StatusArgs) -> Result<ExitCode> {
    let v = node_status(&a)?;
    if a.json {
        println!("{}", v["tunnels"]);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<26} {:<30} {:<5} {:>9} {:>12} {:>12}", "PEER", "ENDPOINT", "UP", "RTT", "TX", "RX");
    for t in v["tunnels"].as_array().into_iter().flatten() {
        let rtt = t["rtt_ms"].as_f64().map(|r| format!("{r:.1} ms")).unwrap_or_else(|| "-".into());
        println!(
            "{:<26} {:<30} {:<5} {:>9} {:>12} {:>12}",
            t["peer"].as_str().unwrap_or("?"),
            t["endpoint"].as_str().unwrap_or("-"),
            if t["up"] == true { "yes" } else { "no" },
            rtt,
            t["tx_bytes"],
            t["rx_bytes"],
        );
    }
    Ok(ExitCode::SUCCESS)
}
