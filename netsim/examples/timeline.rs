//! Where a scenario's wall time goes, by virtual time: runs the scenario's
//! mesh (its nodes, regions, underlay and timers, but none of its events
//! or samples) and prints, for each step of virtual time, the wall time it
//! took, the packets sent, the Babel updates the nodes received (changed:
//! they changed a table; repeated: refreshed in bulk) and the seqno bumps
//! (a node raising its own seqno, as asked by a starving node: it changes
//! that node's route everywhere); then, at the step's end, the tunnel ends
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
    println!("virtual_s\twall_s\tpackets\tupdates_in\tchanged\trepeated\tbumps\ttunnel_ends\tselected");
    let mut seqnos: Vec<u16> = (0..sim.len()).map(|i| sim.node(i).router().seqno()).collect();
    let (mut packets, mut updates, mut changed, mut repeated) = (0, 0, 0, 0);
    let mut t = 0.0;
    while t < s.duration_s {
        let w = Instant::now();
        sim.run_for(Duration::from_secs_f64(step));
        let wall = w.elapsed().as_secs_f64();
        t += step;
        let (mut u, mut c, mut r, mut b) = (0, 0, 0, 0u64);
        let (mut tunnel_ends, mut selected) = (0, 0);
        for (i, seqno) in seqnos.iter_mut().enumerate() {
            let router = sim.node(i).router();
            b += u64::from(router.seqno().wrapping_sub(*seqno));
            *seqno = router.seqno();
            tunnel_ends += router.interfaces().count();
            selected += router.selected_count();
            let st = router.stats();
            u += st.updates_in;
            c += st.updates_changed;
            r += st.updates_repeated;
        }
        println!(
            "{t:.0}\t{wall:.2}\t{}\t{}\t{}\t{}\t{b}\t{tunnel_ends}\t{selected}",
            sim.stats.packets - packets,
            u - updates,
            c - changed,
            r - repeated
        );
        (packets, updates, changed, repeated) = (sim.stats.packets, u, c, r);
    }
}
