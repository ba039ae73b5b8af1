//! `sixmesh sim SCENARIO.toml`: runs a scenario on the in-process simulator
//! (`sixmesh_netsim`), or with `--namespaces` on real nodes in network
//! namespaces, prints a summary, writes the JSON and HTML reports, and
//! exits with status 3 when an assertion fails (CI gates on it).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sixmesh_netsim::run::Report;
use sixmesh_netsim::scenario::Scenario;

/// Exit status when the run completed but an assertion failed.
pub const EXIT_ASSERTION_FAILED: u8 = 3;

/// Simulates a whole mesh — the real tunnel manager, Babel and forwarding of
/// every node — on virtual time, from a scenario file (format:
/// docs/netsim.md; examples: netsim/scenarios/). With --namespaces, runs the
/// same scenario for real: a registry and `sixmesh node run` processes in
/// network namespaces, on the wall clock.
#[derive(Debug, Args)]
#[command(after_help = "Exit status: 0 when every assertion holds, 3 when one fails, 1 on an error \
(e.g. a bad scenario file), 2 on a usage error, 130 when interrupted.\n\
Examples:\n  sixmesh sim netsim/scenarios/europe-china.toml --html report.html\n  \
sixmesh sim netsim/scenarios/ten-thousand.toml    # 10,000 nodes routing to 500 of them: ~11 min, ~11 GB\n  \
sudo sixmesh sim netsim/scenarios/partition-heal.toml --namespaces --nodes 8 --duration 60")]
pub struct SimArgs {
    /// The scenario file (TOML).
    scenario: PathBuf,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    /// Write the HTML report (self-contained, with SVG plots) here.
    #[arg(long, value_name = "OUT")]
    html: Option<PathBuf>,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override the scenario's `[nodes] count` (joining nodes scale alike).
    #[arg(long, value_name = "N")]
    nodes: Option<usize>,
    /// Override the scenario's duration, in virtual seconds (events too late to be judged are dropped).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Threads to simulate on (default: one per core, at most one per 100 nodes). The result is
    /// the same whatever the number: nodes are shared out, and run in windows of virtual time no
    /// longer than the shortest underlay latency.
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
    /// Run even if the scenario looks too large for this machine's memory.
    #[arg(long)]
    force: bool,
    /// Run on real processes instead of the simulator (root): a registry and one `sixmesh node
    /// run` per node, each in its own network namespace, joined through an "internet" bridge with
    /// the scenario's latency, jitter, loss, broken paths and uplinks (user-space relays,
    /// nftables, tc tbf). Events happen on the wall clock: a 300 s scenario takes 300 s.
    /// Reachability is measured with pings, loops with ICMPv6 Time Exceeded. The nodes' logs stay
    /// in the directory the report names. At most 40 nodes (use --nodes).
    #[arg(long)]
    namespaces: bool,
}

/// Peak memory per Babel route entry, measured (everything the simulator
/// holds, divided by the entries): 1,000 nodes with 20 neighbours each
/// (2 × 10⁷ entries) peak at 2.55 GB, ten-thousand.toml (10⁸) at 11.3 GB
/// (with the groups of repeated updates, about one per 8 entries).
const BYTES_PER_ROUTE_ENTRY: f64 = 125.0;

/// What a scenario's route tables will take at their fullest: every node
/// keeps a route to every announced prefix from each of its neighbours
/// (about twice `client_count` of them: its own tunnels and as many
/// incoming).
fn estimated_bytes(s: &Scenario) -> f64 {
    total_nodes(s) as f64 * destinations(s) as f64 * neighbours(s) as f64 * BYTES_PER_ROUTE_ENTRY
}

fn total_nodes(s: &Scenario) -> usize {
    s.nodes.count + s.nodes.list.len()
}

/// Nodes that announce a prefix (`[nodes] destinations`, default all).
fn destinations(s: &Scenario) -> usize {
    s.nodes.destinations.map_or(s.nodes.count, |d| d.min(s.nodes.count)) + s.nodes.list.len()
}

/// Neighbours per node, about: its own tunnels and as many incoming.
fn neighbours(s: &Scenario) -> usize {
    (2 * s.manager.client_count).min(s.manager.client_count + s.manager.max_clients).max(1)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// Runs `sixmesh sim`.
pub fn run_sim(args: SimArgs) -> Result<ExitCode> {
    crate::keep_freed_memory();
    let mut s = Scenario::load(&args.scenario)?;
    if let Some(seed) = args.seed {
        s.seed = seed;
    }
    s.threads = args.threads;
    if let Some(n) = args.nodes {
        anyhow::ensure!(n >= 2, "--nodes must be at least 2");
        let joining = (s.nodes.joining * n).checked_div(s.nodes.count).unwrap_or(0);
        s.nodes.count = n;
        s.nodes.joining = joining;
    }
    if let Some(d) = args.duration {
        anyhow::ensure!(d.is_finite() && d > 0.0, "--duration must be a positive number of seconds");
        // Shorter: drop the events that could not be judged any more.
        s = s.scaled(usize::MAX, d);
        s.duration_s = d;
    }
    let need = estimated_bytes(&s);
    if !args.namespaces
        && let Some(have) = available_memory()
        && need > have
        && !args.force
    {
        let gb = |b: f64| format!("{:.1} GB", b / 1e9);
        anyhow::bail!(
            "this scenario needs about {} of memory and this machine has {} available: it would be \
             killed. Every node keeps a Babel route to every announced prefix from each neighbour ({} nodes \
             × {} prefixes × about {} neighbours × ~{} bytes). Simulate fewer nodes (--nodes N), announce \
             fewer prefixes (`[nodes] destinations`), or use --force to try anyway.",
            gb(need),
            gb(have),
            total_nodes(&s),
            destinations(&s),
            neighbours(&s),
            BYTES_PER_ROUTE_ENTRY
        );
    }
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new((s.duration_s * 10.0).ceil() as u64);
        let clock = if args.namespaces { "real" } else { "virtual" };
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {clock} {{msg}} [{{bar:40}}] {{percent}}% elapsed {{elapsed}}, eta {{eta}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let progress = |t: f64| {
        bar.set_position((t * 10.0) as u64);
        bar.set_message(format!("{t:.0}/{:.0} s", s.duration_s));
    };
    let mut report = if args.namespaces {
        sixmesh_netsim::ns::scenario::check(&s)?;
        let bin = std::env::current_exe().context("cannot find the sixmesh binary")?;
        super::catch_interrupts()?;
        eprintln!(
            "setting up {} nodes in network namespaces (a registry, then each node enrolls)...",
            s.node_count()
        );
        let r = sixmesh_netsim::ns::scenario::run(&s, &bin, &super::INTERRUPTED, progress)?;
        if super::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            bar.finish_and_clear();
            eprintln!("interrupted: every namespace and process was removed; no report written");
            return Ok(ExitCode::from(130));
        }
        r
    } else {
        let go = || sixmesh_netsim::run::run(&s, progress);
        // The simulated nodes log like real ones; only show that when asked.
        if std::env::var_os("RUST_LOG").is_some() {
            go()
        } else {
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), go)
        }
    };
    bar.finish_and_clear();
    report.wall_s = Some(started.elapsed().as_secs_f64());
    print!("{}", summary(&report));
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("cannot serialize the report")?;
        std::fs::write(p, text + "\n")
            .with_context(|| format!("cannot write the JSON report to {}", p.display()))?;
        println!("JSON report: {}", p.display());
    }
    if let Some(p) = &args.html {
        std::fs::write(p, sixmesh_netsim::report::html(&report))
            .with_context(|| format!("cannot write the HTML report to {}", p.display()))?;
        println!("HTML report: {}", p.display());
    }
    Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::from(EXIT_ASSERTION_FAILED) })
}

/// The text printed after a run.
fn summary(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let name = if r.scenario.is_empty() { "scenario" } else { r.scenario.as_str() };
    let _ = writeln!(
        o,
        "{name}: {} nodes{}, {} {} s, seed {}{}",
        r.nodes,
        if r.destinations < r.nodes {
            format!(" ({} announce a prefix)", r.destinations)
        } else {
            String::new()
        },
        r.duration_s,
        if r.namespaces { "real" } else { "virtual" },
        r.seed,
        r.wall_s.map_or(String::new(), |w| format!(", {w:.1} s wall"))
    );
    let g = &r.tunnel_graph;
    let _ = writeln!(
        o,
        "  tunnels: {} (mean degree {:.1}), tunnel-graph mean hops {:.2} (max {})",
        g.tunnels, g.mean_degree, g.mean_hops, g.max_hops
    );
    let _ = writeln!(
        o,
        "  control traffic sent per node: mean {:.0} B/s, p99 {:.0}, max {:.0} ({})",
        r.control.mean_bytes_per_s, r.control.p99_bytes_per_s, r.control.max_bytes_per_s, r.control.max_node
    );
    if let Some(st) = &r.stretch {
        let _ = writeln!(
            o,
            "  path stretch: mean {:.2}, p90 {:.2}, max {:.2} ({} pairs)",
            st.mean, st.p90, st.max, st.count
        );
    }
    if let Some(last) = r.reachability.last() {
        let _ = writeln!(
            o,
            "  reachable at the end: {}/{} checked pairs; forwarding loops seen: {}",
            last.reachable, last.eligible, r.loops.count
        );
    }
    let _ = writeln!(o, "  events:");
    for e in &r.events {
        let conv = e.convergence_s.map_or("never".to_string(), |c| format!("{c:.2} s"));
        let mut detail = e.detail.clone();
        if detail.len() > 60 {
            let cut = (0..=57).rev().find(|&k| detail.is_char_boundary(k)).unwrap_or(0);
            detail.truncate(cut);
            detail.push('…');
        }
        let _ =
            writeln!(o, "    {:>8.1} s  {:<14} {:<62} all reachable after {conv}", e.at_s, e.what, detail);
    }
    let _ = writeln!(o, "  assertions:");
    if r.assertions.is_empty() {
        let _ = writeln!(o, "    (none)");
    }
    for a in &r.assertions {
        let _ = writeln!(o, "    {} {}: {}", if a.passed { "ok  " } else { "FAIL" }, a.name, a.detail);
    }
    if let Some(dir) = &r.logs {
        let _ = writeln!(o, "  logs of the registry and nodes: {dir}");
    }
    let _ = writeln!(o, "{}", if r.passed { "PASSED" } else { "FAILED: an assertion does not hold" });
    o
}
