//! Where a scenario's wall time goes, by virtual time: runs the scenario's
//! mesh (its nodes, regions, underlay and timers, but none of its events
//! or samples) and prints, for each step of virtual time, the wall time it
//! took, the packets sent, the Babel updates the nodes received (changed:
//! they changed a table; repeated: refreshed in bulk), the seqno requests
//! (originated by a node left without a feasible route, and passed on) and
//! the seqno bumps (a node raising its own seqno, as asked: it changes that
//! node's route everywhere); then, at the step's end, the tunnel ends
//! (Babel interfaces) and selected routes of all nodes.
//!
//! `cargo run --release -p sixmesh-netsim --example timeline -- netsim/scenarios/thousand.toml [STEP_S [THREADS]]`

use std::path::Path;
use std::time::{Duration, Instant};

use sixmesh_netsim::run::build;
use sixmesh_netsim::scenario::Scenario;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: timeline SCENARIO.toml [STEP_S [THREADS]]");
        std::process::exit(2);
    };
    let step: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let mut s = match Scenario::load(Path::new(&path)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    s.threads = threads;
    let (mut sim, _, _) = build(&s);
    println!(
        "virtual_s\twall_s\tpackets\tupdates_in\tchanged\trepeated\trequests\tforwarded\tbumps\ttunnel_ends\tselected"
    );
    // Totals over the nodes of what each step prints the increase of.
    let totals = |sim: &sixmesh_netsim::mesh::MeshSim| {
        let mut v = [0u64; 6];
        for i in 0..sim.len() {
            let st = sim.node(i).router().stats();
            let now = [
                st.updates_in,
                st.updates_changed,
                st.updates_repeated,
                st.seqno_requests_sent,
                st.seqno_requests_forwarded,
                st.seqno_bumps,
            ];
            v.iter_mut().zip(now).for_each(|(a, b)| *a += b);
        }
        v
    };
    let (mut packets, mut last) = (0, totals(&sim));
    let mut t = 0.0;
    while t < s.duration_s {
        let w = Instant::now();
        sim.run_for(Duration::from_secs_f64(step));
        let wall = w.elapsed().as_secs_f64();
        t += step;
        let (mut tunnel_ends, mut selected) = (0, 0);
        for i in 0..sim.len() {
            let router = sim.node(i).router();
            tunnel_ends += router.interfaces().count();
            selected += router.selected_count();
        }
        let now = totals(&sim);
        let d: Vec<String> = now.iter().zip(last).map(|(n, l)| (n - l).to_string()).collect();
        println!(
            "{t:.0}\t{wall:.2}\t{}\t{}\t{tunnel_ends}\t{selected}",
            sim.stats.packets - packets,
            d.join("\t")
        );
        (packets, last) = (sim.stats.packets, now);
    }
}
