//! Mean hop count of re6st's tunnel graph (10 outgoing tunnels per node, at
//! most 20 incoming) at sizes too large to simulate whole nodes, to compare
//! with re6st's published simulation. `BENCHMARKS.md` has the results.
//!
//! `cargo run --release -p sixmesh-netsim --example tunnel_graph -- 100 1600 102400`

use std::time::Instant;

use sixmesh_netsim::rng::Rng;
use sixmesh_netsim::topology::Graph;

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![100, 1600, 102_400] } else { sizes };
    println!("nodes\ttunnels\tmean_hops\tmax_hops\twall_s");
    for n in sizes {
        let t = Instant::now();
        let g = Graph::re6st(n, 10, 20, &mut Rng::new(1));
        let (mean, max) = g.hop_counts(200);
        println!("{n}\t{}\t{mean:.2}\t{max}\t{:.1}", g.edges.len(), t.elapsed().as_secs_f64());
    }
}
