//! Scenario files on real processes: the relays give underlay paths their
//! latency, a token bucket limits a node's uplink, and `sixmesh sim --namespaces` runs a shipped scenario — a
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

/// Seconds to send `bytes` over TCP from node `a` to node `b` on the underlay.
fn tcp_transfer_secs(mesh: &Mesh, a: usize, b: usize, bytes: usize) -> f64 {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr =
        format!("[{}]:5201", sixmesh_tests::mesh::underlay(mesh.nodes[b].index)).parse().unwrap();
    let listener = mesh.nodes[b].ns.run(|| std::net::TcpListener::bind(addr)).unwrap().unwrap();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < bytes {
            match s.read(&mut buf).unwrap() {
                0 => break,
                n => got += n,
            }
        }
        got
    });
    let start = std::time::Instant::now();
    let mut s = mesh.nodes[a].ns.run(|| std::net::TcpStream::connect(addr)).unwrap().unwrap();
    s.write_all(&vec![7u8; bytes]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(receiver.join().unwrap(), bytes, "every byte arrived");
    start.elapsed().as_secs_f64()
}

#[test]
fn uplink_limits_throttle_what_a_node_sends() {
    if !require_root_netns() {
        return;
    }
    let mesh = Mesh::with_latency(&sixmesh_tests::sixmesh_bin(), "up", 2);
    let bytes = 250_000;
    let free = tcp_transfer_secs(&mesh, 0, 1, bytes);
    assert!(free < 1.0, "no limit: 250 kB took {free:.2} s");
    // 1,000 kbit/s is 125 kB/s: 250 kB take two seconds.
    mesh.set_uplink(0, Some(1000.0));
    let limited = tcp_transfer_secs(&mesh, 0, 1, bytes);
    assert!((1.6..6.0).contains(&limited), "1,000 kbit/s uplink: 250 kB took {limited:.2} s");
    // Only what node 0 sends is limited: the other way runs free.
    let back = tcp_transfer_secs(&mesh, 1, 0, bytes);
    assert!(back < 1.0, "node 1's uplink is free: 250 kB took {back:.2} s");
    mesh.set_uplink(0, None);
    eprintln!("250 kB: {free:.2} s free, {limited:.2} s at 1,000 kbit/s, {back:.2} s the other way");
    let lifted = tcp_transfer_secs(&mesh, 0, 1, bytes);
    assert!(lifted < 1.0, "limit lifted: 250 kB took {lifted:.2} s");
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
    // The nodes' logs stay where the report says.
    let logs = std::path::PathBuf::from(r["logs"].as_str().expect("the report names the logs"));
    assert!(logs.join("n0.log").is_file() && logs.join("registry.log").is_file(), "{}", logs.display());
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::remove_dir_all(&dir);
}
