//! The mesh node for real: a registry and 6 nodes, each in its own
//! namespace, joined through an "internet" namespace. Everyone reaches
//! everyone; a cut path is routed around within 3 s; a revoked node is cut
//! off within 30 s; with the registry down, a restarted node rejoins from
//! its peer cache.

use std::process::Stdio;
use std::time::{Duration, Instant};

use sixmesh_tests::mesh::{Mesh, wait_until};
use sixmesh_tests::netns::require_root_netns;

/// Sends pings every 50 ms from `a` to `b` for `secs` and returns the
/// longest gap between two answers.
fn longest_gap(mesh: &Mesh, a: usize, b: usize, secs: u32, during: impl FnOnce()) -> Duration {
    let count = (secs * 20).to_string();
    let child = mesh
        .command(a, "ping")
        .args(["-6", "-D", "-i", "0.05", "-W", "1", "-c", &count, &mesh.nodes[b].mesh_address])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    during();
    let out = child.wait_with_output().unwrap();
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    assert!(times.len() > 20, "too few answers: {}", String::from_utf8_lossy(&out.stdout));
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    Duration::from_secs_f64(gap)
}

#[test]
fn six_nodes_mesh_reroute_revoke_and_rejoin_from_cache() {
    if !require_root_netns() {
        return;
    }
    let mut mesh = Mesh::new(&sixmesh_tests::sixmesh_bin(), "six", 6);
    let start = Instant::now();
    for k in 0..6 {
        mesh.start_node(k, "");
    }
    // Within 30 s of start, every node reaches every other node's mesh address.
    let t = wait_until(Duration::from_secs(30), || mesh.unreachable().is_empty());
    assert!(
        t.is_some(),
        "unreachable after 30 s: {:?}\n{}",
        mesh.unreachable(),
        mesh.nodes[0].proc.as_ref().unwrap().log()
    );
    eprintln!("all 30 pairs reachable {:?} after start", start.elapsed());

    // Cut the direct path between two nodes: traffic flows again through
    // others within 3 s.
    let gap = longest_gap(&mesh, 0, 1, 10, || mesh.cut(0, 1));
    eprintln!("longest ping gap across the cut: {gap:?}");
    assert!(gap <= Duration::from_secs(3), "traffic stopped for {gap:?} after the cut");

    // Revoke node 5 at the registry: all its tunnels close within 30 s, and
    // its prefix becomes unreachable.
    let regdir = mesh.dir.join("registry");
    let out = mesh
        .reg
        .command(&mesh.bin)
        .args(["registry", "revoke", &mesh.nodes[5].prefix, "--state-dir", regdir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "revoke: {}", String::from_utf8_lossy(&out.stderr));
    let revoked_prefix = mesh.nodes[5].prefix.clone();
    let closed = wait_until(Duration::from_secs(30), || {
        (0..5).all(|k| {
            !mesh
                .peers(k)
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["peer"] == revoked_prefix.as_str() && t["up"] == true)
        })
    });
    assert!(closed.is_some(), "peers kept tunnels to the revoked node: {:?}", mesh.peers(0));
    eprintln!("revoked node's tunnels closed {:?} after the revocation", closed.unwrap());
    std::thread::sleep(Duration::from_secs(3));
    for k in 0..5 {
        assert!(!mesh.ping(k, 5), "node {k} still reaches the revoked node");
    }

    // Stop the registry and restart node 2: it rejoins from its peer cache.
    mesh.registry.take().map(|mut p| p.stop());
    let mut p = mesh.nodes[2].proc.take().unwrap();
    assert!(p.stop(), "node did not exit cleanly");
    mesh.start_node(2, "");
    let t = wait_until(Duration::from_secs(20), || (0..5).filter(|&k| k != 2).all(|k| mesh.ping(2, k)));
    assert!(
        t.is_some(),
        "restarted node did not rejoin without the registry:\n{}",
        mesh.nodes[2].proc.as_ref().unwrap().log()
    );
    eprintln!("restarted node back {:?} after its restart (registry down)", t.unwrap());
}

/// A plain WireGuard peer (wireguard-go, configured by hand with a node's
/// tunnel key) exchanges traffic with a sixmesh node, and through it with
/// the rest of the mesh: the tunnels are real WireGuard.
#[test]
fn wireguard_go_peer_talks_to_the_mesh() {
    if !require_root_netns() {
        return;
    }
    let mut mesh = Mesh::new(&sixmesh_tests::sixmesh_bin(), "wg", 2);
    // The WireGuard peer's host, on the same "internet".
    let wg = mesh.add_host(9, "wg");
    let wg_prefix = "fd5e:77:0:ffff::/64";
    let key_file = mesh.dir.join("wg.key");
    let privkey = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg genkey (apt-get install wireguard-tools)");
    std::fs::write(&key_file, &privkey.stdout).unwrap();
    let mut pubkey_cmd = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    pubkey_cmd.stdin.take().unwrap().write_all(&privkey.stdout).unwrap();
    let wg_pub = String::from_utf8(pubkey_cmd.wait_with_output().unwrap().stdout).unwrap().trim().to_string();

    mesh.start_node(
        0,
        &format!(
            "[[peer]]\nprefix = \"{wg_prefix}\"\npublic_key = \"{wg_pub}\"\nendpoint = \"[fd99::9]:51820\"\n"
        ),
    );
    mesh.start_node(1, "");
    assert!(
        wait_until(Duration::from_secs(20), || mesh.unreachable().is_empty()).is_some(),
        "mesh did not form"
    );
    let status = mesh.status(0);
    let node_pub = status["public_key"].as_str().unwrap().to_string();

    // wireguard-go in its namespace, configured with wg(8). Its UAPI socket
    // (/var/run/wireguard/IF.sock) is not per namespace: a unique name.
    let ifname = format!("wgt{}", std::process::id() % 100_000);
    let ifname = ifname.as_str();
    let wg_log = mesh.dir.join("wireguard-go.log");
    let mut wg_go = wg
        .command("wireguard-go")
        .args(["-f", ifname])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .env("LOG_LEVEL", "verbose")
        .stdout(std::fs::File::create(&wg_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("wireguard-go (apt-get install wireguard-go)");
    assert!(
        wait_until(Duration::from_secs(10), || wg.ip(&["link", "show", ifname]).is_ok()).is_some(),
        "wireguard-go did not create {ifname}: {}",
        std::fs::read_to_string(&wg_log).unwrap_or_default()
    );
    wg.exec(
        "wg",
        &[
            "set",
            ifname,
            "private-key",
            key_file.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &node_pub,
            "allowed-ips",
            "fd5e:77::/48",
            "endpoint",
            "[fd99::2]:51820",
            "persistent-keepalive",
            "5",
        ],
    )
    .unwrap();
    wg.ip(&["-6", "addr", "add", "fd5e:77:0:ffff::1/64", "dev", ifname]).unwrap();
    wg.ip(&["link", "set", ifname, "up"]).unwrap();
    wg.ip(&["-6", "route", "add", "fd5e:77::/48", "dev", ifname]).unwrap();

    let ping = |ns: &sixmesh_tests::netns::Netns, dst: &str| {
        ns.command("ping")
            .args(["-6", "-c", "1", "-W", "1", dst])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let n0 = mesh.nodes[0].mesh_address.clone();
    let n1 = mesh.nodes[1].mesh_address.clone();
    let t = wait_until(Duration::from_secs(20), || ping(&wg, &n0));
    assert!(
        t.is_some(),
        "wireguard-go cannot reach the node: {}\n{}",
        mesh.status(0),
        mesh.nodes[0].proc.as_ref().unwrap().log()
    );
    assert!(ping(&mesh.nodes[0].ns, "fd5e:77:0:ffff::1"), "the node cannot reach wireguard-go");
    // Through node 0, which announces the WireGuard peer's prefix in Babel.
    assert!(wait_until(Duration::from_secs(10), || ping(&mesh.nodes[1].ns, "fd5e:77:0:ffff::1")).is_some());
    assert!(ping(&wg, &n1), "wireguard-go cannot reach the other node through the mesh");
    let _ = wg_go.kill();
    let _ = wg_go.wait();
}

/// Garbage on the tunnel port (random bytes, fake handshakes, data for
/// unknown sessions, oversized datagrams, bad certificates) is dropped and
/// counted; the node keeps working, and its Prometheus metrics say so.
#[test]
fn garbage_on_the_tunnel_port_is_counted_and_harmless() {
    if !require_root_netns() {
        return;
    }
    let mut mesh = Mesh::new(&sixmesh_tests::sixmesh_bin(), "garbage", 2);
    mesh.start_node(0, "metrics = \"[::1]:9185\"");
    mesh.start_node(1, "");
    assert!(
        wait_until(Duration::from_secs(20), || mesh.unreachable().is_empty()).is_some(),
        "mesh did not form"
    );
    let target: std::net::SocketAddr = "[fd99::2]:51820".parse().unwrap();
    let sent = mesh.nodes[1]
        .ns
        .run(move || {
            let sock = std::net::UdpSocket::bind("[::]:0").unwrap();
            let mut x: u64 = 0x1234_5678;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let mut n = 0;
            for i in 0..2000usize {
                let len = match i % 5 {
                    0 => 148, // handshake-initiation sized
                    1 => 92,  // handshake-response sized
                    2 => 32 + (rnd() % 200) as usize,
                    3 => 1 + (rnd() % 8) as usize,
                    _ => (rnd() % 1500) as usize,
                };
                let mut p: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
                match i % 5 {
                    0 => p[..4].copy_from_slice(&[1, 0, 0, 0]),
                    1 => p[..4].copy_from_slice(&[2, 0, 0, 0]),
                    2 => p[..4].copy_from_slice(&[4, 0, 0, 0]),
                    _ => {}
                }
                if sock.send_to(&p, target).is_ok() {
                    n += 1;
                }
                if i % 200 == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // Let the node drain its socket buffer, then: oversized, and
            // certificates that are not certificates.
            std::thread::sleep(Duration::from_millis(500));
            let _ = sock.send_to(&vec![4u8; 65000], target);
            for body in
                [&b"SXM\x01"[..], b"SXM\x01\x01", b"SXM\x01\x01\x30\x82\x01\x00garbage", b"SXM\x01\x09x"]
            {
                let _ = sock.send_to(body, target);
            }
            n
        })
        .unwrap();
    assert!(sent > 1900);
    std::thread::sleep(Duration::from_secs(1));
    let st = mesh.status(0);
    let bad = st["stats"]["udp_bad"].as_u64().unwrap();
    let refused = st["stats"]["certs_refused"].as_u64().unwrap();
    assert!(bad >= 1000, "only {bad} bad datagrams counted: {st}");
    assert!(refused >= 1, "bad certificates not counted: {st}");
    assert!(mesh.unreachable().is_empty(), "the mesh broke after the garbage");
    let metrics = mesh.nodes[0]
        .ns
        .run(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("[::1]:9185").unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("sixmesh_tunnels{state=\"up\"} 1"), "{metrics}");
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sixmesh_udp_datagrams_total{kind=\"bad\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("bad-datagram counter in the metrics");
    assert!(counted >= bad, "metrics say {counted} bad datagrams, status said {bad}");
    // Babel's counters: the peer's routes arrived, and only some updates changed the table.
    let (updates, changed) =
        (st["babel"]["updates_in"].as_u64().unwrap(), st["babel"]["updates_changed"].as_u64().unwrap());
    assert!(updates >= 1 && changed >= 1 && changed <= updates, "{st}");
    assert!(metrics.contains("sixmesh_babel_updates_received_total "), "{metrics}");
    let repeated = st["babel"]["updates_repeated"].as_u64().expect("updates_repeated in the status");
    assert!(repeated <= updates, "{st}");
    assert!(metrics.contains("sixmesh_babel_updates_repeated_total "), "{metrics}");
    assert!(metrics.contains("sixmesh_babel_packets_total{dir=\"in\"} "), "{metrics}");
    assert!(metrics.contains("sixmesh_babel_seqno_requests_total{kind=\"ours\"} "), "{metrics}");
    assert!(metrics.contains("sixmesh_babel_seqno_bumps_total "), "{metrics}");
    assert!(st["babel"]["seqno_bumps"].as_u64().is_some(), "{st}");
}

/// With the registry down, a new node that knows a single peer finds the
/// others through the mesh: it asks its neighbour for their endpoints, and
/// the answers carry CA-signed certificates.
#[test]
fn with_the_registry_down_a_node_finds_peers_through_the_mesh() {
    if !require_root_netns() {
        return;
    }
    let mut mesh = Mesh::new(&sixmesh_tests::sixmesh_bin(), "gossip", 4);
    for k in 0..3 {
        mesh.start_node(k, "");
    }
    assert!(
        wait_until(Duration::from_secs(30), || mesh.unreachable().is_empty()).is_some(),
        "mesh did not form"
    );
    mesh.registry.take().map(|mut p| p.stop());
    let key0 = mesh.status(0)["public_key"].as_str().unwrap().to_string();
    let peer0 = format!(
        "[[peer]]\nprefix = \"{}\"\npublic_key = \"{key0}\"\nendpoint = \"[{}]:51820\"\nbabel = true\n",
        mesh.nodes[0].prefix,
        sixmesh_tests::mesh::underlay(mesh.nodes[0].index)
    );
    mesh.start_node(3, &peer0);
    let others = [mesh.nodes[1].prefix.clone(), mesh.nodes[2].prefix.clone()];
    let t = wait_until(Duration::from_secs(30), || {
        let peers = mesh.peers(3);
        others.iter().all(|o| {
            peers.as_array().into_iter().flatten().any(|t| t["peer"] == o.as_str() && t["up"] == true)
        })
    });
    assert!(
        t.is_some(),
        "the new node did not find the others through the mesh: {}\n{}",
        mesh.peers(3),
        mesh.nodes[3].proc.as_ref().unwrap().log()
    );
    eprintln!("tunnels to peers learned through the mesh after {:?}", t.unwrap());
    assert!(mesh.unreachable().is_empty());
}

/// The namespace harness impairs underlay paths as scenarios describe them:
/// random loss on one path (nftables `numgen random`), a cut, and healing.
#[test]
fn harness_impairs_and_heals_underlay_paths() {
    if !require_root_netns() {
        return;
    }
    let mesh = Mesh::new(&sixmesh_tests::sixmesh_bin(), "impair", 3);
    let loss = |to: usize| -> f64 {
        let out = mesh
            .command(0, "ping")
            .args(["-6", "-q", "-c", "300", "-i", "0.005", "-W", "1"])
            .arg(sixmesh_tests::mesh::underlay(mesh.nodes[to].index))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.split_whitespace()
            .find_map(|w| w.strip_suffix('%').and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("no loss figure in {text}"))
            / 100.0
    };
    assert_eq!(loss(1), 0.0, "a fresh path loses nothing");
    // 30 % each way: a ping and its answer both survive 49 % of the time.
    mesh.impair(0, 1, 0.3);
    let l = loss(1);
    assert!((0.35..0.68).contains(&l), "30 % per way should lose about 51 % of round trips, lost {l}");
    assert_eq!(loss(2), 0.0, "another path is not touched");
    mesh.cut(0, 1);
    assert_eq!(loss(1), 1.0, "a cut path loses everything");
    mesh.heal(0, 1);
    assert_eq!(loss(1), 0.0, "a healed path loses nothing");
}
