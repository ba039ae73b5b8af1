//! `sixmesh node run --bridge`: the TLS bridge inside the node, with the
//! certificates the registry issued, carrying an IPv4-only client's
//! traffic to a server on another node across the mesh; its per-tunnel
//! counters on the node's control socket (`sixmesh status`, `sixmesh
//! bridge status --control NODE.sock`) and in the node's Prometheus
//! metrics. Needs root (namespaces).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use sixmesh_tests::mesh::{Mesh, wait_until};
use sixmesh_tests::netns::require_root_netns;

#[test]
fn bridge_in_node_carries_ipv4_across_the_mesh_and_reports_on_the_node() {
    if !require_root_netns() {
        return;
    }
    let bin = sixmesh_tests::sixmesh_bin();
    let mut mesh = Mesh::new(&bin, "bridge", 2);
    // Node 0: a line echo on 127.0.0.1:7000, reachable from the mesh
    // through a server tunnel on its mesh address.
    let echo = mesh.nodes[0].ns.run(|| TcpListener::bind("127.0.0.1:7000").unwrap()).unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if writeln!(w, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (n0, n1) = (&mesh.nodes[0], &mesh.nodes[1]);
    let server = mesh.dir.join("bridge-n0.toml");
    std::fs::write(
        &server,
        format!(
            "[tls]\nstate_dir = \"{}\"\n\n[[tunnel]]\nname = \"echo-in\"\nmode = \"server\"\n\
             listen = \"[{}]:7001\"\nconnect = \"127.0.0.1:7000\"\nallow = [\"prefix:{}\"]\n",
            n0.dir.display(),
            n0.mesh_address,
            n1.prefix
        ),
    )
    .unwrap();
    // Node 1: an IPv4-only client's port, tunnelled to node 0.
    let client = mesh.dir.join("bridge-n1.toml");
    std::fs::write(
        &client,
        format!(
            "[tls]\nstate_dir = \"{}\"\n\n[[tunnel]]\nname = \"echo\"\nmode = \"client\"\n\
             listen = \"127.0.0.1:3306\"\nconnect = \"[{}]:7001\"\nallow = [\"prefix:{}\"]\n",
            n1.dir.display(),
            n0.mesh_address,
            n0.prefix
        ),
    )
    .unwrap();
    mesh.start_node(0, &format!("bridge = \"{}\"\nmetrics = \"127.0.0.1:9185\"", server.display()));
    mesh.start_node(1, &format!("bridge = \"{}\"", client.display()));
    assert!(
        wait_until(Duration::from_secs(30), || mesh.ping(1, 0)).is_some(),
        "node 1 does not reach node 0\n{}",
        mesh.nodes[0].proc.as_ref().unwrap().log()
    );

    // Two connections through the tunnel: the second resumes the session.
    let ask = |line: &str| -> Option<String> {
        let s = mesh.nodes[1].ns.run(|| TcpStream::connect("127.0.0.1:3306")).unwrap().ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut w = s.try_clone().ok()?;
        writeln!(w, "{line}").ok()?;
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).ok()?;
        Some(out.trim_end().to_string())
    };
    let mut first = None;
    wait_until(Duration::from_secs(10), || {
        first = ask("over the mesh");
        first.is_some()
    });
    assert_eq!(
        first.as_deref(),
        Some("over the mesh"),
        "{}\n{}",
        mesh.nodes[0].proc.as_ref().unwrap().log(),
        mesh.nodes[1].proc.as_ref().unwrap().log()
    );
    assert_eq!(ask("again").as_deref(), Some("again"));

    // The node's status carries the bridge's tunnels.
    let st = mesh.status(0);
    let t = &st["bridge"]["tunnels"][0];
    assert_eq!(t["name"], "echo-in", "{st}");
    assert!(t["accepted"].as_u64() >= Some(2), "{st}");
    assert!(t["resumed"].as_u64() >= Some(1), "the second connection did not resume: {st}");
    assert!(t["bytes_in"].as_u64() > Some(0), "{st}");
    // `sixmesh bridge status` on the node's socket.
    let out = mesh.nodes[1]
        .ns
        .command(&bin)
        .args(["bridge", "status", "--control", mesh.nodes[1].control.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("echo") && text.contains("client"), "{text}");
    // The node's metrics include the bridge's.
    let metrics = mesh.nodes[0]
        .ns
        .run(|| {
            let mut m = TcpStream::connect("127.0.0.1:9185").unwrap();
            m.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut body = String::new();
            m.read_to_string(&mut body).unwrap();
            body
        })
        .unwrap();
    assert!(metrics.contains("sixmesh_routes "), "{metrics}");
    assert!(metrics.contains("sixmesh_bridge_connections_total{tunnel=\"echo-in\"} 2"), "{metrics}");
}
