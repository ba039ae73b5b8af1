//! Our Babel router against real babeld 1.12 (Debian), in network
//! namespaces: routes both ways into the kernel, 96 per wired hop,
//! retraction, loss of the link, a three-router line, and babeld's RTT cost
//! over a link slowed in user space.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sixmesh_tests::mesh::wait_until;
use sixmesh_tests::netns::{Netns, require_root_netns, veth};
use sixmesh_tests::sixmesh_bin;
use sixmesh_tests::tunlink::TunLink;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sixmesh-babel-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `proto babel` routes of a namespace that point somewhere (babeld also
/// keeps `unreachable` placeholders for retracted routes: left out).
fn kernel_routes(ns: &Netns) -> Vec<String> {
    let out = ns.ip(&["-6", "route", "show", "proto", "babel"]).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("unreachable"))
        .map(String::from)
        .collect()
}

fn has_route(ns: &Netns, prefix: &str) -> bool {
    kernel_routes(ns).iter().any(|l| l.starts_with(&format!("{prefix} ")))
}

/// Makes a namespace ready for Babel: forwarding on, no DAD delays.
fn router_ns(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    ns.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )
    .unwrap();
    ns
}

/// A real babeld in a namespace.
struct Babeld {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl Babeld {
    fn start(ns: &Netns, dir: &Path, id: u8, ifaces: &[(&str, &str)], redistribute: &[&str]) -> Babeld {
        let sock = dir.join(format!("babeld-{id}.sock"));
        let log = dir.join(format!("babeld-{id}.log"));
        let mut cmd = ns.command("babeld");
        cmd.args(["-I", "", "-d", "1", "-h", "1", "-H", "1"])
            .arg("-S")
            .arg(dir.join(format!("babeld-{id}.state")))
            .arg("-L")
            .arg(&log)
            .arg("-G")
            .arg(&sock)
            .args(["-C", &format!("router-id 02:00:00:00:00:00:00:{id:02x}")]);
        for (ifname, kind) in ifaces {
            cmd.args(["-C", &format!("interface {ifname} type {kind}")]);
        }
        for p in redistribute {
            cmd.args(["-C", &format!("redistribute ip {p} eq {}", p.split('/').nth(1).unwrap())]);
        }
        cmd.args(["-C", "redistribute local deny"]);
        cmd.args(ifaces.iter().map(|(i, _)| *i));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start babeld (apt-get install babeld)");
        let b = Babeld { child, sock, log };
        assert!(
            wait_until(Duration::from_secs(5), || b.sock.exists()).is_some(),
            "babeld did not start: {}",
            b.log()
        );
        b
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// babeld's `dump` lines.
    fn dump(&self) -> Vec<String> {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"dump\n").unwrap();
        let mut lines = Vec::new();
        let mut r = BufReader::new(s);
        let mut seen_ok = 0;
        for line in r.by_ref().lines() {
            let Ok(line) = line else { break };
            // The greeting ends with "ok", then the dump ends with "ok".
            if line == "ok" {
                seen_ok += 1;
                if seen_ok == 2 {
                    break;
                }
                continue;
            }
            lines.push(line);
        }
        lines
    }

    /// babeld's installed, reachable route to `prefix`, if any.
    fn route(&self, prefix: &str) -> Option<String> {
        self.dump().into_iter().find(|l| {
            l.starts_with("add route")
                && l.contains(&format!("prefix {prefix} "))
                && l.contains("installed yes")
                && field(l, "metric").is_some_and(|m| m < 65535)
        })
    }

    fn neighbour(&self) -> Option<String> {
        self.dump().into_iter().find(|l| l.starts_with("add neighbour"))
    }
}

impl Drop for Babeld {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value after `key` in a babeld dump line.
fn field(line: &str, key: &str) -> Option<u32> {
    let mut it = line.split_whitespace();
    while let Some(w) = it.next() {
        if w == key {
            return it.next()?.parse().ok();
        }
    }
    None
}

/// Our router (`sixmesh node babel`) in a namespace.
struct Ours {
    child: Child,
    control: PathBuf,
}

impl Ours {
    fn start(ns: &Netns, dir: &Path, tag: &str, ifaces: &[&str], announce: &[&str]) -> Ours {
        let control = dir.join(format!("{tag}.sock"));
        let mut cmd = ns.command(sixmesh_bin());
        cmd.args(["node", "babel", "--hello-interval", "1"])
            .arg("--state-file")
            .arg(dir.join(format!("{tag}.state")))
            .arg("--control")
            .arg(&control);
        for i in ifaces {
            cmd.args(["--interface", i]);
        }
        for a in announce {
            cmd.args(["--announce", a]);
        }
        let log = std::fs::File::create(dir.join(format!("{tag}.log"))).unwrap();
        let child = cmd.env("RUST_LOG", "debug").stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let o = Ours { child, control };
        assert!(
            wait_until(Duration::from_secs(10), || o.control.exists()).is_some(),
            "our router did not start"
        );
        o
    }

    fn request(&self, req: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.control).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// (metric, selected) of our route to `prefix`, from the control socket.
    fn route(&self, prefix: &str) -> Option<u64> {
        let d = self.request(r#"{"cmd":"dump"}"#);
        d["routes"]
            .as_array()?
            .iter()
            .find(|r| r["prefix"] == prefix && r["selected"] == true && !r["next_hop"].is_null())
            .and_then(|r| r["metric"].as_u64())
    }

    /// Stops with SIGTERM and checks that the exit is clean.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "router did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drop_babel(ns: &Netns) {
    for cmd in [
        "add table inet impair",
        "add chain inet impair in { type filter hook input priority 0; policy accept; }",
        "add chain inet impair out { type filter hook output priority 0; policy accept; }",
        "add rule inet impair in udp dport 6696 drop",
        "add rule inet impair out udp dport 6696 drop",
    ] {
        ns.exec("nft", &[cmd]).unwrap();
    }
}

#[test]
fn ours_and_babeld_on_a_veth_exchange_retract_and_detect_a_cut() {
    if !require_root_netns() {
        return;
    }
    let dir = tempdir("veth");
    let us = router_ns("us");
    let bd = router_ns("bd");
    veth(&us, "u0", &bd, "b0").unwrap();
    bd.ip(&["-6", "route", "add", "fd00:b::/64", "dev", "lo", "proto", "static"]).unwrap();
    // A source-specific route (RFC 9079) each way too.
    bd.ip(&["-6", "route", "add", "fd00:c::/48", "from", "fd00:b::/48", "dev", "lo", "proto", "static"])
        .unwrap();
    let babeld = Babeld::start(&bd, &dir, 0xbd, &[("b0", "wired")], &["fd00:b::/64", "fd00:c::/48"]);
    let ours = Ours::start(&us, &dir, "us", &["u0:wired"], &["fd00:a::/64", "fd00:d::/48,from=fd00:a::/48"]);

    // Routes flow both ways and land in both kernels.
    let t = wait_until(Duration::from_secs(15), || {
        has_route(&us, "fd00:b::/64")
            && has_route(&bd, "fd00:a::/64")
            && has_route(&us, "fd00:c::/48 from fd00:b::/48")
            && has_route(&bd, "fd00:d::/48 from fd00:a::/48")
    });
    assert!(
        t.is_some(),
        "no convergence; ours: {:?}, babeld: {:?}\n{}",
        kernel_routes(&us),
        kernel_routes(&bd),
        babeld.log()
    );
    // 96 per wired hop, both ways.
    assert_eq!(ours.route("fd00:b::/64"), Some(96));
    let r = babeld.route("fd00:a::/64").expect("babeld has our route");
    assert_eq!(field(&r, "metric"), Some(96), "{r}");
    assert_eq!(field(&r, "refmetric"), Some(0), "{r}");
    let n = babeld.neighbour().expect("babeld sees us");
    assert_eq!((field(&n, "rxcost"), field(&n, "txcost")), (Some(96), Some(96)), "{n}");
    assert!(
        us.ip(&["-6", "route", "show", "fd00:b::/64"])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("proto babel"))
            .unwrap()
    );

    // A withdrawn prefix is retracted on babeld.
    assert_eq!(ours.request(r#"{"cmd":"withdraw","prefix":"fd00:a::/64"}"#)["ok"], true);
    let t = wait_until(Duration::from_secs(3), || {
        !has_route(&bd, "fd00:a::/64") && babeld.route("fd00:a::/64").is_none()
    });
    assert!(t.is_some(), "babeld kept the withdrawn route: {:?}", kernel_routes(&bd));
    ours.request(r#"{"cmd":"announce","prefix":"fd00:a::/64"}"#);
    assert!(wait_until(Duration::from_secs(5), || has_route(&bd, "fd00:a::/64")).is_some());

    // Cut the link for Babel only (the veth stays up): each side drops the
    // other's routes within a few Hello intervals (H = 1 s).
    drop_babel(&us);
    let cut = Instant::now();
    let mut ours_gone = None;
    let mut babeld_gone = None;
    while cut.elapsed() < Duration::from_secs(12) && (ours_gone.is_none() || babeld_gone.is_none()) {
        if ours_gone.is_none() && !has_route(&us, "fd00:b::/64") {
            ours_gone = Some(cut.elapsed());
        }
        if babeld_gone.is_none() && !has_route(&bd, "fd00:a::/64") {
            babeld_gone = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ours_gone = ours_gone.expect("we kept babeld's route after the cut");
    let babeld_gone = babeld_gone.expect("babeld kept our route after the cut");
    eprintln!(
        "after the cut: we dropped babeld's route in {ours_gone:?}, babeld dropped ours in {babeld_gone:?}"
    );
    // 2-out-of-3: ours 1.5-2.5 H; babeld ~2.7-4.2 H plus its check period.
    assert!(ours_gone <= Duration::from_millis(3500), "{ours_gone:?}");
    assert!(babeld_gone <= Duration::from_millis(6500), "{babeld_gone:?}");

    // A clean exit removes our kernel routes.
    us.exec("nft", &["flush ruleset"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || has_route(&us, "fd00:b::/64")).is_some(),
        "no recovery after heal"
    );
    assert!(ours.stop().success());
    assert!(kernel_routes(&us).is_empty(), "routes left after exit: {:?}", kernel_routes(&us));
}

#[test]
fn three_router_line_ours_babeld_ours() {
    if !require_root_netns() {
        return;
    }
    let dir = tempdir("line");
    let a = router_ns("la");
    let m = router_ns("lm");
    let c = router_ns("lc");
    veth(&a, "a0", &m, "m0").unwrap();
    veth(&m, "m1", &c, "c0").unwrap();
    m.ip(&["-6", "route", "add", "fd00:b::/64", "dev", "lo", "proto", "static"]).unwrap();
    let babeld = Babeld::start(&m, &dir, 0x0b, &[("m0", "wired"), ("m1", "wired")], &["fd00:b::/64"]);
    let oa = Ours::start(&a, &dir, "a", &["a0"], &["fd00:a::/64"]);
    let oc = Ours::start(&c, &dir, "c", &["c0"], &["fd00:c::/64"]);

    let t = wait_until(Duration::from_secs(20), || {
        has_route(&a, "fd00:c::/64") && has_route(&c, "fd00:a::/64") && has_route(&a, "fd00:b::/64")
    });
    assert!(t.is_some(), "a: {:?} c: {:?} m: {:?}", kernel_routes(&a), kernel_routes(&c), kernel_routes(&m));
    // Two wired hops through babeld: 192.
    assert_eq!(oa.route("fd00:c::/64"), Some(192));
    assert_eq!(oc.route("fd00:a::/64"), Some(192));
    assert_eq!(oa.route("fd00:b::/64"), Some(96));
    for p in ["fd00:a::/64", "fd00:c::/64"] {
        let r = babeld.route(p).unwrap_or_else(|| panic!("babeld has no route to {p}"));
        assert_eq!(field(&r, "metric"), Some(96), "{r}");
    }
    // Data really flows a -> babeld -> c across the kernel routes.
    a.ip(&["-6", "addr", "add", "fd00:a::1/64", "dev", "lo"]).unwrap();
    c.ip(&["-6", "addr", "add", "fd00:c::1/64", "dev", "lo"]).unwrap();
    let ping = a
        .command("ping")
        .args(["-6", "-c", "1", "-W", "2", "-I", "fd00:a::1", "fd00:c::1"])
        .output()
        .unwrap();
    assert!(ping.status.success(), "ping a -> c: {}", String::from_utf8_lossy(&ping.stdout));

    // c leaves: a loses c's prefix (retracted by us, relayed by babeld).
    assert!(oc.stop().success());
    let t = wait_until(Duration::from_secs(5), || !has_route(&a, "fd00:c::/64"));
    assert!(t.is_some(), "a still routes to c after it left: {:?}", kernel_routes(&a));
}

#[test]
fn babeld_rtt_cost_rises_on_a_slowed_tunnel() {
    if !require_root_netns() {
        return;
    }
    let dir = tempdir("rtt");
    let us = router_ns("ru");
    let bd = router_ns("rb");
    let link =
        TunLink::new(&us, "t0", "fe80::1".parse().unwrap(), &bd, "t1", "fe80::2".parse().unwrap()).unwrap();
    bd.ip(&["-6", "route", "add", "fd00:b::/64", "dev", "lo", "proto", "static"]).unwrap();
    let babeld = Babeld::start(&bd, &dir, 0xbd, &[("t1", "tunnel")], &["fd00:b::/64"]);
    let ours = Ours::start(&us, &dir, "ru", &["t0:tunnel"], &["fd00:a::/64"]);
    let t = wait_until(Duration::from_secs(15), || {
        has_route(&bd, "fd00:a::/64") && has_route(&us, "fd00:b::/64")
    });
    assert!(t.is_some(), "no convergence over TUN: {}", babeld.log());
    let rttcost = || babeld.neighbour().and_then(|n| field(&n, "rttcost"));
    // Unimpaired: RTT well under rtt-min (10 ms), no penalty.
    assert!(
        wait_until(Duration::from_secs(10), || rttcost() == Some(0)).is_some(),
        "{:?}",
        babeld.neighbour()
    );
    assert_eq!(babeld.route("fd00:a::/64").map(|r| field(&r, "metric")), Some(Some(96)));

    // 60 ms each way: RTT 120 ms = rtt-max, so the penalty climbs to 96
    // (smoothed: it takes a number of Hello/IHU exchanges).
    link.impair.set_delay(Duration::from_millis(60));
    let t = wait_until(Duration::from_secs(40), || rttcost().is_some_and(|c| c >= 60));
    assert!(t.is_some(), "babeld's rttcost did not rise: {:?}", babeld.neighbour());
    let metric = babeld.route("fd00:a::/64").and_then(|r| field(&r, "metric")).unwrap();
    assert!(metric >= 96 + 60, "babeld's metric did not include the RTT cost: {metric}");
    // We measure it too, from babeld's timestamps.
    let d = ours.request(r#"{"cmd":"dump"}"#);
    let rtt = d["neighbours"][0]["rtt_ms"].as_f64().expect("we measured an RTT");
    assert!(rtt > 60.0, "our RTT estimate {rtt} ms");

    // Back to no delay: the cost falls again.
    link.impair.set_delay(Duration::ZERO);
    assert!(
        wait_until(Duration::from_secs(40), || rttcost().is_some_and(|c| c < 30)).is_some(),
        "{:?}",
        babeld.neighbour()
    );
}
