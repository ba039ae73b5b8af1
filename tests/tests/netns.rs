//! The namespace test support proves itself: two namespaces, one veth pair,
//! IPv6 reachability checked with a UDP echo, and clean teardown.

use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use sixmesh_tests::netns::{Netns, require_root_netns, veth};

const A: Ipv6Addr = Ipv6Addr::new(0xfd5e, 0x7e57, 0, 0, 0, 0, 0, 1);
const B: Ipv6Addr = Ipv6Addr::new(0xfd5e, 0x7e57, 0, 0, 0, 0, 0, 2);
const PORT: u16 = 7777;

/// Binds an echo server in the calling namespace and answers `count`
/// datagrams; returns how many it answered before its timeout.
fn udp_echo(addr: SocketAddr, count: usize) -> usize {
    let sock = UdpSocket::bind(addr).expect("bind echo server");
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1500];
    let mut answered = 0;
    while answered < count {
        let Ok((n, from)) = sock.recv_from(&mut buf) else { break };
        sock.send_to(&buf[..n], from).unwrap();
        answered += 1;
    }
    answered
}

/// Sends `payload` to `to` until an answer comes back or `deadline` passes.
fn udp_ask(to: SocketAddr, payload: &[u8], deadline: Duration) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    loop {
        let sent = sock.send_to(payload, to);
        if sent.is_ok()
            && let Ok((n, from)) = sock.recv_from(&mut buf)
            && from == to
        {
            return Ok(buf[..n].to_vec());
        }
        if start.elapsed() > deadline {
            return Err(sent.err().unwrap_or_else(|| std::io::ErrorKind::TimedOut.into()));
        }
    }
}

#[test]
fn two_namespaces_linked_by_veth_echo_udp_over_ipv6() {
    if !require_root_netns() {
        return;
    }
    let a = Netns::new("echo-a").expect("create namespace a");
    let b = Netns::new("echo-b").expect("create namespace b");
    let (a_name, b_name) = (a.name().to_string(), b.name().to_string());

    // Before they are linked, b's address is unreachable from a.
    let unlinked = a.run(|| udp_ask(SocketAddr::new(B.into(), PORT), b"x", Duration::ZERO)).unwrap();
    assert!(unlinked.is_err(), "b reachable before any link: {unlinked:?}");

    veth(&a, "eth0", &b, "eth0").expect("veth pair");
    a.ip(&["addr", "add", &format!("{A}/64"), "dev", "eth0", "nodad"]).unwrap();
    b.ip(&["addr", "add", &format!("{B}/64"), "dev", "eth0", "nodad"]).unwrap();

    let server = b.spawn(|| udp_echo(SocketAddr::new(B.into(), PORT), 1)).unwrap();
    // Give the server a moment to bind; udp_ask retries anyway.
    let reply = a
        .run(|| udp_ask(SocketAddr::new(B.into(), PORT), b"hello from a", Duration::from_secs(5)))
        .unwrap()
        .expect("echo over the veth");
    assert_eq!(reply, b"hello from a");
    assert_eq!(server.join().unwrap().unwrap(), 1);

    // The namespaces are really separate: the root namespace has no route
    // to B, and `ip netns exec` runs commands where we expect.
    let addrs =
        String::from_utf8(b.exec("ip", &["-6", "addr", "show", "dev", "eth0"]).unwrap().stdout).unwrap();
    assert!(addrs.contains(&B.to_string()), "{addrs}");

    drop(a);
    drop(b);
    assert!(!Path::new("/run/netns").join(&a_name).exists(), "{a_name} not deleted");
    assert!(!Path::new("/run/netns").join(&b_name).exists(), "{b_name} not deleted");
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    if !require_root_netns() {
        return;
    }
    let name = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(|| {
        let ns = Netns::new("panic").unwrap();
        *name.lock().unwrap() = ns.name().to_string();
        panic!("a failing test");
    });
    assert!(result.is_err());
    let name = name.into_inner().unwrap();
    assert!(!name.is_empty());
    assert!(!Path::new("/run/netns").join(&name).exists(), "{name} left behind after a panic");
}

#[test]
fn processes_inside_are_killed_on_drop() {
    if !require_root_netns() {
        return;
    }
    let ns = Netns::new("procs").unwrap();
    let mut child = ns.command("sleep").arg("600").spawn().unwrap();
    // Wait until the process shows up inside the namespace.
    let start = Instant::now();
    while String::from_utf8_lossy(
        &std::process::Command::new("ip").args(["netns", "pids", ns.name()]).output().unwrap().stdout,
    )
    .trim()
    .is_empty()
    {
        assert!(start.elapsed() < Duration::from_secs(5), "sleep never entered the namespace");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(ns);
    let status = child.wait().unwrap();
    assert!(!status.success(), "sleep should have been killed, got {status}");
}
