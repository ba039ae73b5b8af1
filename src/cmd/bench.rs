//! `sixmesh bench …`: measurements against published or real peers.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use sixmesh_netsim::babel::{BabelSim, LinkParams, RouterParams};
use sixmesh_netsim::topology::Graph;
use sixmesh_routing::core::LinkKind;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Babel control traffic per node and reconvergence after a link cut, on virtual time
    Babel(BabelBench),
    /// Durable enrollments per second over HTTPS with 16 concurrent clients, with p50/p99
    Registry(RegistryBench),
}

/// Starts a throw-away registry on loopback and enrolls nodes into it as
/// fast as 16 concurrent clients can, each enrollment committed (WAL,
/// synchronous=FULL) before its answer. Target: 500 enrollments/s.
#[derive(Debug, Args)]
struct RegistryBench {
    /// Enrollments to make.
    #[arg(long, default_value_t = 4000)]
    enrollments: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

/// Simulates grids of Babel routers (each with at most 4 neighbours, like
/// meshnet-lab's "grid4") on virtual time, with babeld's default timers, and
/// reports the control traffic each node receives once converged and how
/// long the mesh takes to route around a cut link.
#[derive(Debug, Args)]
#[command(after_help = "Published reference (babeld 1.13.1, meshnet-lab 2024, grid4): \
0.47 kB/s received per node at 49 nodes, 1.44 at 169, 3.0 at 361, 5.2 at 625.")]
struct BabelBench {
    /// Network sizes to simulate (each rounded to a grid).
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 1000])]
    nodes: Vec<usize>,
    /// Hello interval in seconds (updates every 4 Hellos, like babeld's defaults).
    #[arg(long, default_value_t = 4.0)]
    hello: f64,
    /// Virtual seconds over which steady-state traffic is measured.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object per size instead of a table.
    #[arg(long)]
    json: bool,
}

/// What one size measured.
#[derive(Debug, serde::Serialize)]
struct BabelResult {
    nodes: usize,
    links: usize,
    hello_s: f64,
    cold_convergence_s: f64,
    rx_bytes_per_node_per_s: f64,
    tx_bytes_per_node_per_s: f64,
    rx_packets_per_node_per_s: f64,
    reconvergence_after_cut_s: f64,
    wall_s: f64,
}

/// Runs `sixmesh bench …`.
pub fn run_bench(args: BenchArgs) -> Result<ExitCode> {
    match args.command {
        BenchCommand::Babel(b) => bench_babel(b),
        BenchCommand::Registry(r) => {
            let dir = std::env::temp_dir().join(format!("sixmesh-bench-registry-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let report = super::runtime()?.block_on(sixmesh_registry::bench::enroll_benchmark(
                &dir,
                r.enrollments,
                r.clients.max(1),
            ));
            let _ = std::fs::remove_dir_all(&dir);
            println!("{}", report?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn bench_babel(b: BabelBench) -> Result<ExitCode> {
    if !(0.1..=60.0).contains(&b.hello) {
        bail!("--hello must be between 0.1 and 60 seconds");
    }
    if !b.json {
        println!(
            "{:>6} {:>6} {:>7} {:>12} {:>14} {:>14} {:>12} {:>14} {:>8}",
            "nodes",
            "links",
            "hello",
            "cold conv.",
            "rx B/s/node",
            "tx B/s/node",
            "rx pkt/s",
            "reroute cut",
            "wall"
        );
    }
    for &n in &b.nodes {
        let r = babel_one(n, &b)?;
        if b.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:>6} {:>6} {:>6.1}s {:>11.1}s {:>14.0} {:>14.0} {:>12.1} {:>13.2}s {:>7.1}s",
                r.nodes,
                r.links,
                r.hello_s,
                r.cold_convergence_s,
                r.rx_bytes_per_node_per_s,
                r.tx_bytes_per_node_per_s,
                r.rx_packets_per_node_per_s,
                r.reconvergence_after_cut_s,
                r.wall_s
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn babel_one(n: usize, b: &BabelBench) -> Result<BabelResult> {
    let wall = Instant::now();
    let w = (n as f64).sqrt().ceil() as usize;
    let h = n.div_ceil(w);
    let g = Graph::grid(w, h);
    let hello = Duration::from_secs_f64(b.hello);
    let mut sim = BabelSim::new(g.nodes, RouterParams::with_hello(LinkKind::Wired, hello), b.seed);
    for &(x, y) in &g.edges {
        sim.link(x, y, LinkParams::latency(Duration::from_millis(1)));
    }
    sim.announce_all();
    let step = Duration::from_millis(250);
    let max = Duration::from_secs(600);
    let Some(cold) = sim.run_until(step, max, |s| s.fully_converged()) else {
        bail!("{} nodes did not converge in {max:?} of virtual time", g.nodes);
    };
    // Let triggered traffic settle, then measure a steady window.
    sim.run_for(hello * 8);
    sim.reset_traffic();
    let window = Duration::from_secs(b.window);
    sim.run_for(window);
    let secs = window.as_secs_f64();
    let nodes = g.nodes as f64;
    let (mut rx, mut tx, mut rxp) = (0u64, 0u64, 0u64);
    for i in 0..g.nodes {
        let t = sim.traffic(i);
        rx += t.rx_bytes;
        tx += t.tx_bytes;
        rxp += t.rx_packets;
    }
    // Cut the link next to the centre of the grid, then time until every
    // node routes to both of its ends again.
    let centre = (h / 2) * w + w / 2;
    let cut = g.edges.iter().position(|&(x, y)| x == centre || y == centre).expect("centre has a link");
    let (ea, eb) = g.edges[cut];
    sim.set_link(cut, false);
    let Some(reroute) = sim.run_until(Duration::from_millis(50), Duration::from_secs(300), |s| {
        s.all_reach(ea) && s.all_reach(eb)
    }) else {
        bail!("{} nodes did not route around the cut in 300 s", g.nodes);
    };
    Ok(BabelResult {
        nodes: g.nodes,
        links: g.edges.len(),
        hello_s: b.hello,
        cold_convergence_s: cold.as_secs_f64(),
        rx_bytes_per_node_per_s: rx as f64 / nodes / secs,
        tx_bytes_per_node_per_s: tx as f64 / nodes / secs,
        rx_packets_per_node_per_s: rxp as f64 / nodes / secs,
        reconvergence_after_cut_s: reroute.as_secs_f64(),
        wall_s: wall.elapsed().as_secs_f64(),
    })
}
