//! `sixmesh demo`: a whole sixmesh network on this machine. As root, a
//! registry and N nodes in network namespaces, real processes, real
//! WireGuard tunnels and Babel; without root, the in-process simulator.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use sixmesh_mesh_node::manager::ManagerConfig;
use sixmesh_netsim::mesh::MeshSim;
use sixmesh_netsim::ns::mesh::{Mesh, wait_until};

/// Start a registry and nodes in network namespaces, watch the mesh form,
/// cut a path and watch it route around the cut. Everything is removed on
/// exit or Ctrl-C. Without root, the same story runs in the in-process
/// simulator.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Where to write the HTML report.
    #[arg(long, default_value = "sixmesh-demo.html")]
    report: PathBuf,
}

fn stopping() -> Result<()> {
    if super::INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Runs `sixmesh demo`.
pub fn run_demo(a: DemoArgs) -> Result<ExitCode> {
    if !(2..=30).contains(&a.nodes) {
        bail!("--nodes must be between 2 and 30");
    }
    if !nix::unistd::geteuid().is_root() {
        return simulated(a.nodes);
    }
    // Ctrl-C and SIGTERM set a flag; the demo then returns and every
    // namespace and process is removed by the harness's destructors.
    super::catch_interrupts()?;
    let bin = std::env::current_exe().context("cannot find the sixmesh binary")?;
    for tool in ["ip", "nft", "ping"] {
        if std::process::Command::new("which")
            .arg(tool)
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!("`{tool}` is missing: apt-get install -y iproute2 nftables iputils-ping");
        }
    }
    real(&bin, a)
}

fn real(bin: &std::path::Path, a: DemoArgs) -> Result<ExitCode> {
    let n = a.nodes;
    let t0 = Instant::now();
    println!(
        "sixmesh demo: a registry and {n} nodes in network namespaces, joined through an \"internet\" bridge"
    );
    let mut mesh = Mesh::with_latency(bin, "demo", n);
    println!(
        "  registry up and {n} nodes enrolled in {:.1} s (CA {})",
        t0.elapsed().as_secs_f64(),
        mesh.fingerprint
    );
    let result = watch(&mut mesh, a);
    if result.is_err() && !super::INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        // Whatever went wrong, the daemons' logs say more: keep them.
        mesh.keep_logs = true;
        return result.map_err(|e| anyhow::anyhow!("{e:#}; the nodes' logs are in {}", mesh.dir.display()));
    }
    result
}

/// Starts the nodes, watches them converge, cuts a path and reports.
fn watch(mesh: &mut Mesh, a: DemoArgs) -> Result<ExitCode> {
    let n = a.nodes;
    let impaired = impair(mesh);
    println!("  underlay: {impaired}");
    for k in 0..n {
        mesh.start_node(k, "");
    }
    let started = Instant::now();
    let mut timeline = Vec::new();
    let mut converged = None;
    while started.elapsed() < Duration::from_secs(60) {
        stopping()?;
        let matrix = ping_matrix(mesh);
        let ok = matrix.iter().flatten().filter(|c| **c == Some(true)).count();
        let total = n * (n - 1);
        timeline.push((started.elapsed().as_secs_f64(), ok, total));
        print_table(mesh, &matrix, started.elapsed());
        if ok == total {
            converged = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let Some(converged) = converged else {
        bail!("the mesh did not converge in 60 s");
    };
    println!("\nevery node reaches every other node {:.1} s after start\n", converged.as_secs_f64());

    // Cut the underlay path of a tunnel whose loss the mesh can route around: one that is not
    // the only link between two parts of the tunnel graph (cutting such a bridge would leave
    // nothing to reroute through until the tunnel managers open new tunnels, which takes longer
    // than the demo waits).
    let tunnel_edges = || -> Vec<(usize, usize)> {
        (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .filter(|&(i, j)| {
                i < j
                    && mesh
                        .peers(i)
                        .as_array()
                        .into_iter()
                        .flatten()
                        // Tunnels being tried (over a broken path, say) are listed too: only
                        // the ones up carry traffic.
                        .any(|t| t["up"] == true && t["peer"] == mesh.nodes[j].prefix.as_str())
            })
            .collect()
    };
    // Right after convergence the tunnel graph may still be a tree (the managers keep opening
    // tunnels): give them up to 20 s to close a loop.
    let waited = Instant::now();
    let mut edges = tunnel_edges();
    let mut cut = edges.iter().copied().find(|&e| connected_without(n, &edges, e));
    if cut.is_none() {
        println!("waiting for the tunnels to form a loop, so that a cut can be routed around...");
    }
    while cut.is_none() && waited.elapsed() < Duration::from_secs(20) {
        stopping()?;
        std::thread::sleep(Duration::from_millis(500));
        edges = tunnel_edges();
        cut = edges.iter().copied().find(|&e| connected_without(n, &edges, e));
    }
    let (x, y) = cut.or_else(|| edges.first().copied()).context("no tunnel to cut")?;
    println!(
        "cutting the Internet path n{x} <-> n{y} (a tunnel runs over it) while n{x} pings n{y} every 50 ms..."
    );
    let gap = ping_gap(mesh, x, y, || mesh.cut(x, y))?;
    println!("traffic n{x} -> n{y} came back through other nodes after {:.2} s\n", gap.as_secs_f64());
    stopping()?;
    let reach = wait_until(Duration::from_secs(15), || mesh.unreachable().is_empty());
    print_table(mesh, &ping_matrix(mesh), started.elapsed());

    std::fs::write(&a.report, html(mesh, &impaired, &timeline, converged, (x, y, gap)))
        .with_context(|| format!("cannot write {}", a.report.display()))?;
    println!("\nreport: {}", a.report.display());
    println!("cleaning up: stopping {n} nodes and the registry, deleting the namespaces");
    if reach.is_none() {
        bail!("some pairs stayed unreachable after the cut");
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes the underlay look like the Internet: two "continents" (the first
/// half of the nodes and the rest) 5–12 ms apart inside and 60–75 ms
/// across, 3 % loss on a few paths and a few paths broken from the start.
/// Returns what it did, in words.
fn impair(mesh: &Mesh) -> String {
    let n = mesh.nodes.len();
    let half = n.div_ceil(2);
    for a in 0..n {
        for b in a + 1..n {
            let spread = ((a * 7 + b * 13) % 8) as u64;
            let ms = if (a < half) == (b < half) { 5 + spread } else { 60 + 2 * spread };
            mesh.set_latency(a, b, Duration::from_millis(ms), Duration::from_millis(2));
        }
    }
    let lossy: Vec<(usize, usize)> = [(0, 1), (2, n - 1)].into_iter().filter(|&(a, b)| a < b).collect();
    // Two broken paths, one in a small mesh: with four nodes, two would leave a single
    // possible loop of tunnels, and nothing to reroute through until every path has one.
    let broken_count = if n >= 6 { 2 } else { 1 };
    let broken: Vec<(usize, usize)> = [(0, n / 2), (1, n - 1)]
        .into_iter()
        .take(broken_count)
        .filter(|&(a, b)| a < b && !lossy.contains(&(a, b)))
        .collect();
    let mut paths: Vec<(usize, usize, f64)> = lossy.iter().map(|&(a, b)| (a, b, 0.03)).collect();
    paths.extend(broken.iter().map(|&(a, b)| (a, b, 1.0)));
    mesh.impair_paths(&paths);
    let list =
        |v: &[(usize, usize)]| v.iter().map(|(x, y)| format!("n{x}-n{y}")).collect::<Vec<_>>().join(", ");
    format!(
        "n0..n{} and n{half}..n{} are two continents (5-12 ms inside, 60-75 ms across, 2 ms jitter); \
         3 % loss on {}; broken: {}",
        half - 1,
        n - 1,
        list(&lossy),
        list(&broken)
    )
}

/// `matrix[a][b]`: whether node a gets an answer from b (None on the diagonal).
fn ping_matrix(mesh: &Mesh) -> Vec<Vec<Option<bool>>> {
    let n = mesh.nodes.len();
    let mut children = Vec::new();
    for a in 0..n {
        for b in 0..n {
            if a != b {
                let c = mesh
                    .command(a, "ping")
                    .args(["-6", "-c", "1", "-W", "1", &mesh.nodes[b].mesh_address])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                children.push((a, b, c));
            }
        }
    }
    let mut m = vec![vec![None; n]; n];
    for (a, b, c) in children {
        m[a][b] = Some(c.ok().and_then(|mut c| c.wait().ok()).is_some_and(|s| s.success()));
    }
    m
}

fn print_table(mesh: &Mesh, matrix: &[Vec<Option<bool>>], t: Duration) {
    let n = mesh.nodes.len();
    if std::io::stdout().is_terminal() {
        print!("\x1b[2J\x1b[H");
    }
    println!("t = {:>5.1} s", t.as_secs_f64());
    println!("{:<5} {:<20} {:>7} {:>6}   pings to n0..n{}", "node", "prefix", "tunnels", "routes", n - 1);
    for (k, row) in matrix.iter().enumerate() {
        let st = mesh.status(k);
        let up = st["tunnels"].as_array().map_or(0, |t| t.iter().filter(|t| t["up"] == true).count());
        let cells: String = row
            .iter()
            .map(|c| match c {
                None => '.',
                Some(true) => '#',
                Some(false) => '-',
            })
            .collect();
        println!("n{k:<4} {:<20} {up:>7} {:>6}   {cells}", mesh.nodes[k].prefix, st["routes"]);
    }
}

/// Pings `b` from `a` every 50 ms for 8 s, running `cut` after 2 s, and
/// returns the longest gap between answers.
fn ping_gap(mesh: &Mesh, a: usize, b: usize, cut: impl FnOnce()) -> Result<Duration> {
    let child = mesh
        .command(a, "ping")
        .args(["-6", "-D", "-i", "0.05", "-W", "1", "-c", "160", &mesh.nodes[b].mesh_address])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    // `ping -D` stamps replies with the Unix time.
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let cut_at = unix_now().as_secs_f64();
    cut();
    let out = child.wait_with_output()?;
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    gap_after(&times, cut_at)
        .context("pings did not get through after the cut: the mesh did not reroute within the 8 s of pings")
}

/// The longest silence in a run of reply times around a cut at `cut_at`,
/// or `None` if no reply came after the cut (replies before it alone say
/// nothing about the reroute).
fn gap_after(times: &[f64], cut_at: f64) -> Option<Duration> {
    if !times.iter().any(|&t| t > cut_at) {
        return None;
    }
    Some(Duration::from_secs_f64(times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max)))
}

/// Whether the graph of `n` nodes with `edges`, less `without`, is connected.
fn connected_without(n: usize, edges: &[(usize, usize)], without: (usize, usize)) -> bool {
    let mut seen = vec![false; n];
    let mut stack = vec![0];
    seen[0] = true;
    while let Some(u) = stack.pop() {
        for &(a, b) in edges {
            if (a, b) == without {
                continue;
            }
            for (p, q) in [(a, b), (b, a)] {
                if p == u && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            }
        }
    }
    seen.iter().all(|&s| s)
}

fn html(
    mesh: &Mesh,
    underlay: &str,
    timeline: &[(f64, usize, usize)],
    converged: Duration,
    cut: (usize, usize, Duration),
) -> String {
    let rows: String = mesh
        .nodes
        .iter()
        .enumerate()
        .map(|(k, node)| {
            let st = mesh.status(k);
            let up = st["tunnels"].as_array().map_or(0, |t| t.iter().filter(|t| t["up"] == true).count());
            format!(
                "<tr><td>n{k}</td><td>{}</td><td>{}</td><td>{up}</td><td>{}</td></tr>",
                node.prefix, node.mesh_address, st["routes"]
            )
        })
        .collect();
    let (w, h) = (600.0, 200.0);
    let tmax = timeline.last().map_or(1.0, |t| t.0.max(1.0));
    let pts: String = timeline
        .iter()
        .map(|(t, ok, total)| {
            format!(
                "{:.1},{:.1} ",
                40.0 + t / tmax * (w - 60.0),
                h - 20.0 - (*ok as f64 / *total as f64) * (h - 40.0)
            )
        })
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=utf-8><title>sixmesh demo</title>\
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}</style></head><body>\
<h1>sixmesh demo</h1><p>A registry and {n} nodes in network namespaces. Underlay: {underlay}. Every pair answered pings \
<b>{conv:.1} s</b> after the nodes started. After the Internet path n{a}&ndash;n{b} was cut, traffic \
between them came back through other nodes after <b>{gap:.2} s</b>.</p>\
<h2>Reachable pairs over time</h2><svg width={w} height={h} style='border:1px solid #ccc'>\
<line x1=40 y1={yb} x2={xr} y2={yb} stroke=#888 /><line x1=40 y1=20 x2=40 y2={yb} stroke=#888 />\
<text x=2 y=24 font-size=11>100%</text><text x=10 y={yb} font-size=11>0%</text>\
<text x={xr} y={yt} font-size=11 text-anchor=end>{tmax:.1} s</text>\
<polyline fill=none stroke=#2a7 stroke-width=2 points='{pts}'/></svg>\
<h2>Nodes</h2><table><tr><th>node</th><th>prefix</th><th>mesh address</th><th>tunnels up</th><th>routes</th></tr>{rows}</table>\
</body></html>",
        n = mesh.nodes.len(),
        conv = converged.as_secs_f64(),
        a = cut.0,
        b = cut.1,
        gap = cut.2.as_secs_f64(),
        yb = h - 20.0,
        xr = w - 20.0,
        yt = h - 4.0,
    )
}

/// Without root: the same story in the in-process simulator.
fn simulated(n: usize) -> Result<ExitCode> {
    println!(
        "sixmesh demo (simulated): not root, so no network namespaces; running {n} nodes in the in-process"
    );
    println!("simulator instead: the same tunnel manager, Babel and forwarding code, on virtual time.\n");
    let cfg = ManagerConfig { client_count: 3, max_clients: 6, ..Default::default() };
    let mut sim = MeshSim::new(n, cfg, |a, b| Duration::from_millis(5 + ((a * 7 + b * 13) % 40) as u64), 1);
    sim.break_random_paths(0.1);
    let mut t = None;
    for _ in 0..60 {
        sim.run_for(Duration::from_secs(1));
        if sim.unreachable_pairs(Duration::from_millis(500)).is_empty() {
            t = Some(sim.elapsed());
            break;
        }
    }
    let t = t.context("the simulated mesh did not converge")?;
    println!("every node reaches every other node {:.1} s (virtual) after start", t.as_secs_f64());
    let (x, y) = sim.tunnel_graph()[0];
    sim.set_path(x, y, false);
    let cut = sim.elapsed();
    let mut back = None;
    for _ in 0..100 {
        let missing = sim.unreachable_pairs(Duration::from_millis(100));
        if !missing.contains(&(x, y)) && !missing.contains(&(y, x)) {
            back = Some(sim.elapsed() - cut);
            break;
        }
    }
    let back = back.context("no reroute in the simulation")?;
    println!(
        "cut the path under tunnel n{x}-n{y}: traffic came back after {:.1} s (virtual)",
        back.as_secs_f64()
    );
    println!(
        "\nfor the real thing (registry, nodes, WireGuard tunnels in network namespaces): sudo sixmesh demo"
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cut_must_leave_a_way_round_and_pings_must_come_back_after_it() {
        // A square with one diagonal: no edge is a bridge; a path: every edge is.
        let square = [(0, 1), (1, 2), (2, 3), (0, 3), (0, 2)];
        assert!(square.iter().all(|&e| connected_without(4, &square, e)));
        let path = [(0, 1), (1, 2), (2, 3)];
        assert!(path.iter().all(|&e| !connected_without(4, &path, e)));
        // Replies only before the cut: no reroute, whatever their spacing.
        assert_eq!(gap_after(&[1.0, 1.05, 1.10], 1.2), None);
        // Replies resume 0.9 s after the last one before the cut.
        let gap = gap_after(&[1.0, 1.05, 1.10, 2.0, 2.05], 1.2).unwrap();
        assert!((gap.as_secs_f64() - 0.9).abs() < 1e-9);
    }
}
