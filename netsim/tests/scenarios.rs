//! Every scenario shipped in `netsim/scenarios/` runs (scaled down to fit
//! CI) and its assertions hold; the runner is deterministic; assertions can
//! fail; NAT and the forwarding walk behave as documented.

use std::path::PathBuf;
use std::time::Duration;

use sixmesh_netsim::mesh::Walk;
use sixmesh_netsim::run::{build, run};
use sixmesh_netsim::scenario::Scenario;

fn shipped(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios").join(name);
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a shipped scenario at CI size and checks its own assertions.
fn run_shipped(name: &str, max_nodes: usize, max_duration_s: f64, min_events: usize) {
    let s = shipped(name).scaled(max_nodes, max_duration_s);
    let r = run(&s, |_| {});
    let failed: Vec<String> =
        r.assertions.iter().filter(|a| !a.passed).map(|a| format!("{}: {}", a.name, a.detail)).collect();
    assert!(r.passed, "{name} at {} nodes: {failed:?}", r.nodes);
    assert!(!r.assertions.is_empty(), "{name} has no assertion");
    assert!(r.events.len() > min_events, "{name}: only {} events ran", r.events.len() - 1);
    assert!(r.loops.count == 0, "{name}: {:?}", r.loops.examples);
}

#[test]
fn shipped_scenarios_parse_and_all_have_assertions() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "churn.toml",
            "europe-china.toml",
            "namespaces.toml",
            "partition-heal.toml",
            "ten-thousand.toml",
            "thousand.toml"
        ]
    );
    for n in names {
        let s = shipped(&n);
        let a = &s.assertions;
        assert!(a.reachable_within_s.is_some() && a.no_loops, "{n} must assert reachability and no loops");
        assert!(!s.event.is_empty(), "{n} has no event");
    }
}

#[test]
fn europe_china_scenario_holds() {
    run_shipped("europe-china.toml", 24, 100.0, 2);
}

#[test]
fn partition_heal_scenario_holds() {
    run_shipped("partition-heal.toml", 16, 240.0, 4);
}

#[test]
fn churn_scenario_holds() {
    run_shipped("churn.toml", 20, 140.0, 6);
}

/// The scenario CI also runs on real nodes (tests/tests/ns_scenario.rs).
#[test]
fn namespaces_scenario_holds_in_the_simulator_too() {
    run_shipped("namespaces.toml", 8, 160.0, 5);
}

#[test]
fn thousand_scenario_holds_scaled_down() {
    run_shipped("thousand.toml", 30, 130.0, 1);
}

/// The 10,000-node scenario at CI size, its sampled destinations and
/// bootstrap lists scaled down with it (at 120 nodes, its own 500 and 200
/// would be every node).
#[test]
fn ten_thousand_scenario_holds_scaled_down() {
    let mut s = shipped("ten-thousand.toml").scaled(120, 110.0);
    assert_eq!((s.nodes.destinations, s.nodes.bootstrap), (Some(500), Some(200)));
    s.nodes.destinations = Some(12);
    s.nodes.bootstrap = Some(30);
    let r = run(&s, |_| {});
    let failed: Vec<String> =
        r.assertions.iter().filter(|a| !a.passed).map(|a| format!("{}: {}", a.name, a.detail)).collect();
    assert!(r.passed, "{failed:?}");
    assert_eq!((r.nodes, r.destinations), (120, 12));
    assert_eq!(r.events.len(), 4, "start, cut, crash, restore: {:?}", r.events);
    assert!(r.stretch.is_some_and(|st| st.count > 0));
}

/// Nodes that announce no prefix: nobody has a route to them, everybody
/// has one to the others, and the tunnel managers do not keep opening
/// tunnels to them to find out why Babel does not route there (they did:
/// a fifth more tunnels and twice the control traffic).
#[test]
fn silent_nodes_get_no_routes_and_no_exploring_tunnels() {
    let text = "name = \"silent\"\nduration_s = 60\n[nodes]\ncount = 40\ndestinations = 5\nbootstrap = 12\n\
                [manager]\nclient_count = 3\nmax_clients = 6\n[[event]]\nat_s = 30\ndo = \"cut_tunnel\"\n\
                [assert]\nreachable_within_s = 10\nno_loops = true\n";
    let s = Scenario::parse(text, "silent").unwrap();
    let (mut sim, _, _) = build(&s);
    let dests: Vec<usize> = (0..sim.len()).filter(|&i| sim.announces(i)).collect();
    assert_eq!(dests.len(), 5);
    // Long enough for many manager checks (every 5 s), each of which
    // explored before.
    sim.run_for(Duration::from_secs(60));
    for i in 0..sim.len() {
        let routed: Vec<usize> = sim
            .node(i)
            .router()
            .routes()
            .iter()
            .filter(|r| r.selected && r.next_hop.is_some())
            .map(|r| sixmesh_netsim::mesh::node_id(&r.prefix).unwrap())
            .collect();
        let mut want: Vec<usize> = dests.iter().copied().filter(|&d| d != i).collect();
        let mut got = routed.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "node {i} routes to {routed:?}");
    }
    let edges = sim.tunnel_graph();
    assert!(edges.len() <= 40 * 3, "{} tunnels: more than the 3 outgoing each", edges.len());
    let r = run(&s, |_| {});
    assert!(r.passed, "{:?}", r.assertions);
}

const SMALL: &str = r#"
name = "small"
duration_s = 40
[nodes]
count = 10
nat_fraction = 0.3
[manager]
client_count = 3
max_clients = 6
[[event]]
at_s = 25
do = "cut_tunnel"
[assert]
reachable_within_s = 5
no_loops = true
max_mean_hops = 0.5
"#;

#[test]
fn same_seed_same_report_and_a_failing_assertion_fails_the_run() {
    let s = Scenario::parse(SMALL, "small").unwrap();
    let a = serde_json::to_string(&run(&s, |_| {})).unwrap();
    let b = serde_json::to_string(&run(&s, |_| {})).unwrap();
    assert_eq!(a, b, "same seed, same report");
    let r: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert_eq!(r["passed"], false, "max_mean_hops = 0.5 cannot hold");
    let hops = r["assertions"].as_array().unwrap().iter().find(|x| x["name"] == "max_mean_hops").unwrap();
    assert_eq!(hops["passed"], false);
    let reach =
        r["assertions"].as_array().unwrap().iter().find(|x| x["name"] == "reachable_within_s").unwrap();
    assert_eq!(reach["passed"], true, "{reach}");
    let mut s2 = s.clone();
    s2.seed = 99;
    assert_ne!(serde_json::to_string(&run(&s2, |_| {})).unwrap(), a, "another seed, another run");
}

#[test]
fn nat_nodes_get_no_incoming_tunnels_and_walks_agree_with_probes() {
    let s = Scenario::parse(SMALL, "small").unwrap();
    let (mut sim, _, _) = build(&s);
    sim.run_for(Duration::from_secs(20));
    let nat: Vec<usize> = (0..sim.len()).filter(|&i| sim.is_nat(i)).collect();
    assert_eq!(nat.len(), 3);
    let edges = sim.tunnel_graph();
    for &i in &nat {
        let mine = edges.iter().filter(|(a, b)| *a == i || *b == i).count();
        assert!(mine >= 1, "NAT node {i} has no tunnel at all");
        assert!(mine <= 3, "NAT node {i} has {mine} tunnels: it accepted incoming ones");
    }
    for &(a, b) in &edges {
        assert!(!(sim.is_nat(a) && sim.is_nat(b)), "two NAT nodes cannot tunnel to each other: {a}-{b}");
    }
    // The walk of the forwarding tables and real probe packets agree.
    let walked: Vec<(usize, usize)> = (0..sim.len())
        .flat_map(|a| (0..sim.len()).map(move |b| (a, b)))
        .filter(|&(a, b)| a != b && !matches!(sim.walk(a, b), Walk::Reached { .. }))
        .collect();
    assert!(walked.is_empty(), "{walked:?}");
    assert!(sim.unreachable_pairs(Duration::from_secs(1)).is_empty());
    // Cut every path of node 0: walks to it stop, and probes too.
    for j in 1..sim.len() {
        sim.set_path(0, j, false);
    }
    assert!(matches!(sim.walk(1, 0), Walk::PathDown { .. } | Walk::NoRoute { .. }));
    let missing = sim.unreachable_pairs(Duration::from_millis(500));
    assert!(missing.contains(&(1, 0)) && missing.contains(&(0, 1)));
    assert_eq!(sim.underlay_components().iter().filter(|&&c| c == sim.underlay_components()[0]).count(), 1);
}

/// The parallel simulator gives the very same run whatever the number of
/// threads: joins, leaves, crashes, partitions, loss and jitter included.
#[test]
fn threads_do_not_change_the_run() {
    for (name, nodes, secs) in
        [("churn.toml", 20, 100.0), ("partition-heal.toml", 16, 120.0), ("europe-china.toml", 24, 60.0)]
    {
        let mut s = shipped(name).scaled(nodes, secs);
        let mut reports = Vec::new();
        for threads in [1, 2, 3] {
            s.threads = threads;
            reports.push(serde_json::to_string(&run(&s, |_| {})).unwrap());
        }
        assert_eq!(reports[0], reports[1], "{name}: 1 and 2 threads differ");
        assert_eq!(reports[0], reports[2], "{name}: 1 and 3 threads differ");
    }
    // Forced threads do share the nodes out (auto would keep one thread
    // below 200 nodes).
    let mut s = shipped("churn.toml").scaled(20, 10.0);
    s.threads = 2;
    assert_eq!(build(&s).0.threads(), 2);
}

/// Walks shared out to the threads find what walks one by one do.
#[test]
fn parallel_walks_match_walks_one_by_one() {
    let mut s = shipped("europe-china.toml").scaled(48, 30.0);
    s.threads = 2;
    let (mut sim, _, _) = build(&s);
    assert_eq!(sim.threads(), 2);
    sim.run_for(Duration::from_secs(30));
    let pairs: Vec<(usize, usize)> =
        (0..48).flat_map(|a| (0..48).filter(move |&b| b != a).map(move |b| (a, b))).collect();
    let one_by_one: Vec<Walk> = pairs.iter().map(|&(a, b)| sim.walk(a, b)).collect();
    assert!(one_by_one.iter().filter(|w| matches!(w, Walk::Reached { .. })).count() > pairs.len() / 2);
    assert_eq!(sim.walks(&pairs), one_by_one);
}

/// A tunnel closed on purpose (every node's refresh) is drained both ways
/// first, so that pairs do not lose their route when it goes: with the
/// peer's side left to notice the close, pairs were lost at every refresh
/// (149 of 4,000 checked at the thousand-node scenario's). Four seeds, three
/// refreshes of every node each, all 3,540 pairs checked every 0.25 s: a
/// pair lost for a sample remains possible (a neighbour's metric that grew
/// a little, learnt at its periodic update, can starve a node for a round
/// trip to the source, refresh or not: 3 such samples in these runs before
/// the nodes' full updates shared their timer, 1 after), many are not.
#[test]
fn refreshed_tunnels_lose_hardly_a_pair() {
    let mut lost: Vec<(u64, f64, usize)> = Vec::new();
    for seed in 1..=4 {
        let text = format!(
            "name = \"refresh\"\nseed = {seed}\nduration_s = 75\nsample_interval_s = 0.25\n\
             sample_pairs = 100000\n[nodes]\ncount = 60\n[manager]\nclient_count = 4\nmax_clients = 8\n\
             tunnel_refresh = 20\n[assert]\nno_loops = true\n"
        );
        let s = Scenario::parse(&text, "refresh").unwrap();
        let r = run(&s, |_| {});
        assert!(r.passed, "seed {seed}: {:?}", r.assertions);
        assert!(r.reachability.iter().all(|x| x.eligible == 60 * 59), "every running pair checked");
        lost.extend(
            r.reachability
                .iter()
                .filter(|x| x.t_s >= 10.0 && x.reachable < x.eligible)
                .map(|x| (seed, x.t_s, x.eligible - x.reachable)),
        );
    }
    let total: usize = lost.iter().map(|l| l.2).sum();
    assert!(total <= 6 && lost.iter().all(|l| l.2 <= 2), "pairs lost (seed, time, pairs): {lost:?}");
}
