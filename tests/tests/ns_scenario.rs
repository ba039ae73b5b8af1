//! Scenario files on real processes: the relays give underlay paths their
//! latency, and `sixmesh sim --namespaces` runs a shipped scenario — a
//! registry and 8 nodes in namespaces, with latency, jitter, loss, broken
//! paths, a NAT node, a tunnel cut, a node crash and restart, a partition
//! and its heal — and its assertions hold.

use std::process::{Command, Stdio};
use std::time::Duration;

use sixmesh_tests::mesh::Mesh;
use sixmesh_tests::netns::require_root_netns;

/// Round-trip times (ms) of `count` pings from node `a` to node `b`'s underlay address.
fn underlay_rtts(mesh: &Mesh, a: usize, b: usize, count: u32) -> Vec<f64> {
    let out = mesh
        .command(a, "ping")
        .args(["-6", "-i", "0.1", "-W", "1", "-c", &count.to_string()])
        .arg(sixmesh_tests::mesh::underlay(mesh.nodes[b].index))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn relays_give_underlay_paths_their_latency() {
    if !require_root_netns() {
        return;
    }
    let mesh = Mesh::with_latency(&sixmesh_tests::sixmesh_bin(), "lat", 3);
    let before = underlay_rtts(&mesh, 0, 1, 5);
    assert_eq!(before.len(), 5, "no latency set: every ping answered");
    assert!(before.iter().all(|&t| t < 20.0), "no latency set, yet: {before:?} ms");

    // 40 ms each way: a round trip of 80 ms, on this path only.
    mesh.set_latency(0, 1, Duration::from_millis(40), Duration::ZERO);
    let slow = underlay_rtts(&mesh, 0, 1, 5);
    assert_eq!(slow.len(), 5);
    assert!(slow.iter().all(|&t| (79.0..130.0).contains(&t)), "40 ms each way: {slow:?} ms");
    let other = underlay_rtts(&mesh, 0, 2, 3);
    assert!(other.iter().all(|&t| t < 20.0), "another path kept its latency: {other:?} ms");

    // Jitter: 30 ms of it spreads the round trips over [80, 110) ms.
    mesh.set_latency(0, 1, Duration::from_millis(40), Duration::from_millis(30));
    let jittery = underlay_rtts(&mesh, 0, 1, 10);
    let (lo, hi) = jittery.iter().fold((f64::MAX, 0.0f64), |(l, h), &t| (l.min(t), h.max(t)));
    assert!(lo >= 79.0 && hi < 140.0 && hi - lo > 3.0, "40 ms + up to 30 ms of jitter each way: {jittery:?}");

    mesh.set_latency(0, 1, Duration::ZERO, Duration::ZERO);
    let back = underlay_rtts(&mesh, 0, 1, 3);
    assert!(back.iter().all(|&t| t < 20.0), "latency removed: {back:?} ms");
}

#[test]
fn shipped_scenario_runs_on_real_nodes_in_namespaces() {
    if !require_root_netns() {
        return;
    }
    let scenario =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../netsim/scenarios/namespaces.toml");
    let dir = std::env::temp_dir().join(format!("sixmesh-ns-scenario-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, html) = (dir.join("report.json"), dir.join("report.html"));
    let out = Command::new(sixmesh_tests::sixmesh_bin())
        .args(["sim", "--namespaces", "--json"])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .arg(&scenario)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sixmesh sim --namespaces failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["namespaces"], true);
    assert_eq!(r["passed"], true, "{stdout}");
    // The start and the five events all happened, on the wall clock, and converged.
    let events = r["events"].as_array().unwrap();
    let what: Vec<&str> = events.iter().map(|e| e["what"].as_str().unwrap()).collect();
    assert_eq!(
        what,
        ["start", "cut_tunnel", "fail_node", "restore_node", "partition", "heal_partition"],
        "{stdout}"
    );
    assert!(events.iter().all(|e| e["convergence_s"].is_number()), "{stdout}");
    assert!(events[1]["detail"].as_str().unwrap().contains(" - "), "a tunnel was cut: {stdout}");
    // While China was cut off, only pairs on the same side were expected to answer.
    let samples = r["reachability"].as_array().unwrap();
    let during = samples.iter().find(|s| (76.0..88.0).contains(&s["t_s"].as_f64().unwrap())).unwrap();
    assert!(during["eligible"].as_u64().unwrap() < 56, "partitioned: {during}");
    // Real measurements: pings went through, Babel spoke, tunnels formed.
    assert!(r["stretch"]["count"].as_u64().unwrap() > 0, "{stdout}");
    assert!(r["control"]["mean_bytes_per_s"].as_f64().unwrap() > 100.0, "{stdout}");
    assert!(r["tunnel_graph"]["tunnels"].as_u64().unwrap() >= 7, "{stdout}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("namespaces"), "HTML report");
    let _ = std::fs::remove_dir_all(&dir);
}
