//! Multi-router tests of the Babel core on virtual time: chain, ring,
//! square, 50-node random graph, partitions, restarts, RTT costs and
//! source-specific routes. Every step checks that no forwarding loop exists.

use std::time::Duration;

use sixmesh_netsim::babel::{BabelSim, LinkParams, RouterParams, node_prefix};
use sixmesh_netsim::rng::Rng;
use sixmesh_netsim::topology::Graph;
use sixmesh_routing::core::LinkKind;

const MS: Duration = Duration::from_millis(1);

fn build(g: &Graph, params: RouterParams, latency: impl Fn(usize) -> Duration) -> BabelSim {
    let mut sim = BabelSim::new(g.nodes, params, 1);
    sim.check_loops = true;
    for (i, &(a, b)) in g.edges.iter().enumerate() {
        sim.link(a, b, LinkParams::latency(latency(i)));
    }
    sim.announce_all();
    sim
}

fn converge(sim: &mut BabelSim, max: Duration) -> Duration {
    match sim.run_until(Duration::from_millis(100), max, |s| s.unreachable_pairs().is_empty()) {
        Some(t) => t,
        None => {
            let un = sim.unreachable_pairs();
            panic!("no convergence in {max:?}: {} pairs, e.g. {:?}", un.len(), &un[..un.len().min(5)])
        }
    }
}

fn assert_no_loops(sim: &BabelSim) {
    assert!(sim.loops().is_empty(), "forwarding loops: {:?}", &sim.loops()[..sim.loops().len().min(5)]);
}

#[test]
fn two_routers_become_neighbours_and_exchange_routes() {
    let mut sim = build(&Graph::chain(2), RouterParams::babeld_defaults(LinkKind::Wired), |_| MS);
    let t = converge(&mut sim, Duration::from_secs(30));
    assert!(t <= Duration::from_secs(12), "took {t:?}");
    assert_eq!((sim.metric(0, 1), sim.metric(1, 0)), (Some(96), Some(96)));
    let nbrs = sim.router(0).neighbours(std::time::Instant::now());
    assert_eq!(nbrs.len(), 1);
    assert_eq!((nbrs[0].rxcost, nbrs[0].txcost), (96, 96));
    assert_no_loops(&sim);
}

#[test]
fn chain_converges_with_96_per_hop() {
    let mut sim = build(&Graph::chain(6), RouterParams::babeld_defaults(LinkKind::Wired), |_| MS);
    let t = converge(&mut sim, Duration::from_secs(60));
    assert!(t < Duration::from_secs(20), "took {t:?}");
    for a in 0..6 {
        for b in (0..6).filter(|&b| b != a) {
            assert_eq!(sim.metric(a, b), Some(96 * a.abs_diff(b) as u16), "{a}->{b}");
        }
    }
    assert_no_loops(&sim);
}

#[test]
fn withdrawn_prefix_is_retracted_everywhere() {
    let mut sim = build(&Graph::chain(5), RouterParams::babeld_defaults(LinkKind::Wired), |_| MS);
    converge(&mut sim, Duration::from_secs(60));
    sim.withdraw(4, node_prefix(4));
    sim.run_for(Duration::from_secs(1));
    for a in 0..4 {
        assert_eq!(sim.metric(a, 4), None, "node {a} still routes to the withdrawn prefix");
    }
    assert_no_loops(&sim);
}

#[test]
fn ring_reroutes_around_a_failed_link() {
    let params = RouterParams::with_hello(LinkKind::Tunnel, Duration::from_millis(500));
    let mut sim = build(&Graph::ring(6), params, |_| MS);
    converge(&mut sim, Duration::from_secs(30));
    assert_eq!(sim.walk(0, 1).unwrap(), Some(1));
    sim.set_link(0, false); // 0-1
    sim.run_for(Duration::from_secs(5));
    assert!(sim.unreachable_pairs().is_empty(), "{:?}", sim.unreachable_pairs());
    assert_eq!(sim.walk(0, 1).unwrap(), Some(5));
    assert_eq!(sim.walk(1, 0).unwrap(), Some(5));
    assert_no_loops(&sim);
}

#[test]
fn dead_link_detected_within_a_few_hello_intervals() {
    let hello = Duration::from_millis(500);
    // A square 0-1-2-3-0: 0 reaches 1 directly, or through 3 and 2.
    let mut sim = build(&Graph::ring(4), RouterParams::with_hello(LinkKind::Tunnel, hello), |_| MS);
    converge(&mut sim, Duration::from_secs(20));
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.walk(0, 1).unwrap(), Some(1));
    sim.set_link(0, false);
    let t = sim
        .run_until(Duration::from_millis(10), Duration::from_secs(10), |s| {
            s.walk(0, 1) == Ok(Some(3)) && s.walk(1, 0) == Ok(Some(3))
        })
        .expect("rerouted");
    // 2-out-of-3: the second missed Hello is seen 1.5-2.5 intervals after
    // the cut, and the feasible alternate is taken at once.
    assert!(t >= hello && t <= hello * 3, "reroute took {t:?}");
    assert_no_loops(&sim);
}

#[test]
fn fifty_node_random_graph_converges_and_survives_failures() {
    let g = Graph::random_connected(50, 40, &mut Rng::new(0x5eed));
    let mut rng = Rng::new(9);
    let lat: Vec<Duration> =
        (0..g.edges.len()).map(|_| Duration::from_millis(1 + rng.below(20) as u64)).collect();
    let mut sim = build(&g, RouterParams::with_hello(LinkKind::Tunnel, Duration::from_secs(1)), |i| lat[i]);
    let t = converge(&mut sim, Duration::from_secs(60));
    assert!(t < Duration::from_secs(30), "took {t:?}");
    // Fail a third of the links that are not tree edges: still connected.
    let failed: Vec<usize> = (49..g.edges.len()).filter(|i| i % 3 == 0).collect();
    assert!(g.connected_with(|i| !failed.contains(&i)));
    for &l in &failed {
        sim.set_link(l, false);
    }
    sim.run_for(Duration::from_secs(15));
    let un = sim.unreachable_pairs();
    assert!(un.is_empty(), "{} unreachable pairs, e.g. {:?}", un.len(), &un[..un.len().min(5)]);
    for &l in &failed {
        sim.set_link(l, true);
    }
    sim.run_for(Duration::from_secs(15));
    assert!(sim.unreachable_pairs().is_empty());
    assert_no_loops(&sim);
}

#[test]
fn lossy_links_still_converge_without_loops() {
    let g = Graph::random_connected(30, 30, &mut Rng::new(11));
    let mut sim =
        BabelSim::new(g.nodes, RouterParams::with_hello(LinkKind::Tunnel, Duration::from_secs(1)), 5);
    sim.check_loops = true;
    for &(a, b) in &g.edges {
        sim.link(a, b, LinkParams { latency: Duration::from_millis(5), loss: 0.1 });
    }
    sim.announce_all();
    converge(&mut sim, Duration::from_secs(60));
    sim.run_for(Duration::from_secs(30));
    assert_no_loops(&sim);
}

#[test]
fn partitioned_node_is_retracted_then_rejoins() {
    let g = Graph::random_connected(20, 10, &mut Rng::new(7));
    let mut sim = build(&g, RouterParams::with_hello(LinkKind::Tunnel, Duration::from_millis(500)), |_| MS);
    converge(&mut sim, Duration::from_secs(30));
    let cut: Vec<usize> = (0..g.edges.len()).filter(|&i| g.edges[i].0 == 5 || g.edges[i].1 == 5).collect();
    for &l in &cut {
        sim.set_link(l, false);
    }
    sim.run_for(Duration::from_secs(40));
    for a in (0..20).filter(|&a| a != 5) {
        assert_eq!(sim.walk(a, 5).unwrap(), None, "{a} still has a route to the isolated node");
    }
    for &l in &cut {
        sim.set_link(l, true);
    }
    let t = converge(&mut sim, Duration::from_secs(30));
    assert!(t < Duration::from_secs(10), "rejoin took {t:?}");
    assert_no_loops(&sim);
}

#[test]
fn restart_without_persisted_seqno_recovers_through_seqno_requests() {
    let mut sim = build(
        &Graph::chain(4),
        RouterParams::with_hello(LinkKind::Tunnel, Duration::from_millis(500)),
        |_| MS,
    );
    // Node 3 runs with a high seqno, as after a long life.
    sim.restart(3, 40_000);
    converge(&mut sim, Duration::from_secs(20));
    sim.run_for(Duration::from_secs(3));
    let old = sim.router(3).seqno();
    // Restarted from scratch at seqno 0, its updates are unfeasible for the
    // others (their feasibility distances hold seqno 40000) until a seqno
    // request makes it jump past them.
    sim.restart(3, 0);
    let t = converge(&mut sim, Duration::from_secs(30));
    assert!(t < Duration::from_secs(5), "recovery took {t:?}");
    let new = sim.router(3).seqno();
    assert!(sixmesh_routing::core::seqno_newer(new, old), "seqno {new} not past {old}");
    assert_no_loops(&sim);
}

#[test]
fn restart_with_persisted_seqno_is_accepted_without_requests() {
    let mut sim = build(
        &Graph::chain(3),
        RouterParams::with_hello(LinkKind::Tunnel, Duration::from_millis(500)),
        |_| MS,
    );
    converge(&mut sim, Duration::from_secs(20));
    let seqno = sim.router(2).seqno();
    sim.restart(2, seqno.wrapping_add(1));
    let t = converge(&mut sim, Duration::from_secs(20));
    assert!(t < Duration::from_secs(3), "took {t:?}");
    assert_eq!(sim.router(2).seqno(), seqno.wrapping_add(1), "no seqno request should have been needed");
}

#[test]
fn rtt_penalty_is_measured_and_applied() {
    let hello = Duration::from_millis(500);
    // 0-3 directly over a slow link (100 ms one way), or 0-1-2-3 over fast ones.
    let g = Graph { nodes: 4, edges: vec![(0, 3), (0, 1), (1, 2), (2, 3)] };
    let mut sim = build(&g, RouterParams::with_hello(LinkKind::Tunnel, hello), |i| {
        if i == 0 { Duration::from_millis(100) } else { MS }
    });
    converge(&mut sim, Duration::from_secs(20));
    sim.run_for(Duration::from_secs(30));
    let nb = sim.router(0).neighbours(std::time::Instant::now());
    let slow = nb.iter().find(|n| n.iface == 0).unwrap();
    let rtt = slow.rtt_ms.expect("RTT measured");
    assert!((195.0..=210.0).contains(&rtt), "rtt {rtt} ms");
    assert_eq!(slow.rtt_cost, 96, "an RTT over rtt-max costs the whole penalty");
    assert_eq!(nb.iter().find(|n| n.iface == 1).unwrap().rtt_cost, 0);
    // Direct: 96 + 96 = 192 < 3 × 96 = 288 around: still direct.
    assert_eq!(sim.metric(0, 3), Some(192));
}

#[test]
fn source_specific_routes_propagate() {
    let mut sim =
        build(&Graph::chain(3), RouterParams::with_hello(LinkKind::Wired, Duration::from_secs(1)), |_| MS);
    converge(&mut sim, Duration::from_secs(20));
    sim.announce_source_specific(0, "::/0".parse().unwrap(), "fd00::/16".parse().unwrap());
    sim.run_for(Duration::from_secs(2));
    let key = ("::/0".parse().unwrap(), Some("fd00::/16".parse().unwrap()));
    let (_, nh, metric) = sim.router(2).selected(&key).expect("source-specific route");
    assert_eq!(metric, 192);
    assert_eq!(sim.owner(nh), Some(1));
    assert!(sim.router(2).selected(&(key.0, None)).is_none(), "not a plain default route");
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let g = Graph::random_connected(15, 10, &mut Rng::new(2));
        let mut sim =
            BabelSim::new(g.nodes, RouterParams::with_hello(LinkKind::Tunnel, Duration::from_secs(1)), 42);
        for &(a, b) in &g.edges {
            sim.link(a, b, LinkParams { latency: Duration::from_millis(3), loss: 0.05 });
        }
        sim.announce_all();
        sim.run_for(Duration::from_secs(20));
        (0..g.nodes).map(|n| sim.traffic(n)).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}
