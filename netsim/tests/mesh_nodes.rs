//! Whole nodes (tunnel manager + Babel in tunnels + forwarding) on virtual
//! time: the mesh forms, every node reaches every other one with real
//! packets, broken underlay paths are routed around, and a cut tunnel is
//! rerouted within seconds.

use std::time::Duration;

use sixmesh_mesh_node::manager::ManagerConfig;
use sixmesh_netsim::mesh::MeshSim;

fn small_mesh(n: usize, seed: u64) -> MeshSim {
    let cfg = ManagerConfig { client_count: 3, max_clients: 6, ..Default::default() };
    MeshSim::new(n, cfg, |a, b| Duration::from_millis(5 + ((a * 7 + b * 13) % 20) as u64), seed)
}

/// Probes every pair and fails with a sample of the ones that do not answer.
fn assert_all_reachable(sim: &mut MeshSim) {
    let missing = sim.unreachable_pairs(Duration::from_secs(1));
    assert!(
        missing.is_empty(),
        "{} pairs unreachable, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn mesh_forms_and_every_node_reaches_every_other() {
    let mut sim = small_mesh(12, 1);
    sim.run_for(Duration::from_secs(20));
    assert_all_reachable(&mut sim);
    let edges = sim.tunnel_graph();
    assert!(edges.len() >= 12 * 3 / 2, "only {} tunnels", edges.len());
    for i in 0..12 {
        let d = sim.node(i).drops();
        assert_eq!((d.bad_source, d.hop_limit), (0, 0), "node {i}: {d:?}");
    }
}

#[test]
fn broken_underlay_paths_are_routed_around() {
    let mut sim = small_mesh(16, 2);
    // 20 % of the Internet paths are broken from the start (China-like).
    let broken = sim.break_random_paths(0.2);
    assert!(broken > 0);
    sim.run_for(Duration::from_secs(40));
    assert_all_reachable(&mut sim);
}

#[test]
fn cutting_a_tunnel_reroutes_within_3_seconds() {
    let mut sim = small_mesh(12, 3);
    sim.run_for(Duration::from_secs(20));
    assert!(sim.unreachable_pairs(Duration::from_secs(1)).is_empty());
    let (a, b) = sim.tunnel_graph()[0];
    sim.set_path(a, b, false);
    let cut = sim.elapsed();
    let mut rerouted = None;
    for _ in 0..100 {
        let missing = sim.unreachable_pairs(Duration::from_millis(100));
        if !missing.contains(&(a, b)) && !missing.contains(&(b, a)) {
            rerouted = Some(sim.elapsed() - cut);
            break;
        }
    }
    let t = rerouted.expect("traffic between the two ends never came back");
    eprintln!("reroute after cutting tunnel {a}-{b}: {t:?}");
    assert!(t <= Duration::from_secs(3), "reroute took {t:?}");
    // Later the whole mesh is whole again, with the dead tunnel replaced.
    sim.run_for(Duration::from_secs(15));
    assert!(sim.unreachable_pairs(Duration::from_secs(1)).is_empty());
    assert!(!sim.tunnel_graph().contains(&(a, b)), "the dead tunnel was not closed");
}

/// The samples' walks, re-done only through nodes whose forwarding tables
/// changed (and all after an underlay change), are the walks done afresh:
/// while the mesh forms, through a cut path, a failed node, a restart and
/// a partition. Most of the later ones come from the cache.
#[test]
fn cached_walks_are_the_walks_done_afresh() {
    let n = 14;
    let mut sim = small_mesh(n, 5);
    let pairs: Vec<(usize, usize)> =
        (0..n).flat_map(|a| (0..n).filter(move |&b| b != a).map(move |b| (a, b))).collect();
    let check = |sim: &mut MeshSim, when: &str| {
        let fresh = sim.walks(&pairs);
        let cached = sim.check_walks(&pairs);
        assert_eq!(cached, fresh, "{when}");
    };
    for step in 0..60 {
        sim.run_for(Duration::from_millis(500));
        match step {
            20 => {
                let (a, b) = sim.tunnel_graph()[0];
                sim.set_path(a, b, false);
            }
            30 => sim.set_alive(3, false),
            36 => sim.set_alive(3, true),
            40 => sim.restart(5),
            48 => sim.set_islands((0..n).map(|i| u32::from(i < 4)).collect()),
            54 => sim.set_islands(vec![0; n]),
            _ => {}
        }
        check(&mut sim, &format!("step {step}"));
        // Asked twice with nothing run between: all from the cache.
        let before = sim.walks_reused;
        check(&mut sim, &format!("step {step}, again"));
        assert_eq!(sim.walks_reused - before, pairs.len() as u64, "step {step}");
    }
    // Far more reused than walked: the quiet steps' tables did not change.
    assert!(sim.walks_reused > 60 * pairs.len() as u64 * 3 / 2, "{} reused", sim.walks_reused);
}
