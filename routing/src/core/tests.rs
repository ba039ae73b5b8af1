//! Multi-router tests on virtual time: the cores alone, linked by simulated
//! links, no sockets. Every step checks that no forwarding loop exists.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;

use super::*;

/// A simulated network of routers connected by point-to-point links.
/// A datagram in flight: (arrival, order, node, iface, source, payload).
type InFlight = Reverse<(Instant, u64, usize, IfaceId, Ipv6Addr, Vec<u8>)>;

struct Net {
    start: Instant,
    now: Instant,
    routers: Vec<Router>,
    /// (node, iface) -> link index
    ends: HashMap<(usize, IfaceId), usize>,
    links: Vec<Link>,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    kind: LinkKind,
    hello: Duration,
    /// Set when a forwarding loop was ever seen.
    loops: Vec<String>,
    bytes: u64,
}

struct Link {
    a: (usize, IfaceId),
    b: (usize, IfaceId),
    latency: Duration,
    up: bool,
}

fn ll(node: usize, iface: IfaceId) -> Ipv6Addr {
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, node as u16 + 1, iface as u16 + 1)
}

fn node_prefix(node: usize) -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0xfd00, 0, 0, node as u16, 0, 0, 0, 0), 64).unwrap()
}

fn rid(node: usize) -> RouterId {
    let mut id = [0u8; 8];
    id[0] = 2;
    id[6..].copy_from_slice(&(node as u16 + 1).to_be_bytes());
    RouterId(id)
}

impl Net {
    fn new(n: usize, kind: LinkKind, hello: Duration) -> Self {
        let start = Instant::now();
        let routers = (0..n).map(|i| Router::new(rid(i), 0, start)).collect();
        Net {
            start,
            now: start,
            routers,
            ends: HashMap::new(),
            links: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            kind,
            hello,
            loops: Vec::new(),
            bytes: 0,
        }
    }

    fn cfg(&self, node: usize, iface: IfaceId) -> InterfaceConfig {
        InterfaceConfig::new(self.kind, ll(node, iface)).with_hello_interval(self.hello)
    }

    fn link(&mut self, a: usize, b: usize, latency: Duration) -> usize {
        let ia = self.ends.keys().filter(|(n, _)| *n == a).count() as IfaceId;
        let ib = self.ends.keys().filter(|(n, _)| *n == b).count() as IfaceId;
        let idx = self.links.len();
        self.links.push(Link { a: (a, ia), b: (b, ib), latency, up: true });
        self.ends.insert((a, ia), idx);
        self.ends.insert((b, ib), idx);
        let now = self.now;
        let (ca, cb) = (self.cfg(a, ia), self.cfg(b, ib));
        self.routers[a].add_interface(now, ia, ca);
        self.routers[b].add_interface(now, ib, cb);
        self.drain(a);
        self.drain(b);
        idx
    }

    fn announce_all(&mut self) {
        for i in 0..self.routers.len() {
            let now = self.now;
            self.routers[i].announce(now, node_prefix(i), None);
            self.drain(i);
        }
    }

    fn drain(&mut self, node: usize) {
        while let Some(t) = self.routers[node].poll_transmit() {
            self.bytes += t.payload.len() as u64;
            let Some(&li) = self.ends.get(&(node, t.iface)) else { continue };
            let link = &self.links[li];
            if !link.up {
                continue;
            }
            let peer = if link.a == (node, t.iface) { link.b } else { link.a };
            if let Destination::Unicast(d) = t.dst
                && d != ll(peer.0, peer.1)
            {
                continue;
            }
            self.seq += 1;
            let at = self.now + link.latency;
            self.queue.push(Reverse((at, self.seq, peer.0, peer.1, ll(node, t.iface), t.payload)));
        }
        while self.routers[node].poll_event().is_some() {}
    }

    /// Runs until `until` (virtual), checking for loops after every step.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next_pkt = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next_timer = self.routers.iter().filter_map(|r| r.poll_timeout()).min();
            let next = match (next_pkt, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap(),
            };
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            if next_pkt == Some(next) {
                let Reverse((_, _, node, iface, src, payload)) = self.queue.pop().unwrap();
                self.routers[node].handle_packet(next, iface, src, &payload);
                self.drain(node);
                self.check_loops_through(node);
            } else {
                for i in 0..self.routers.len() {
                    if self.routers[i].poll_timeout().is_some_and(|t| t <= next) {
                        self.routers[i].handle_timeout(next);
                        self.drain(i);
                        self.check_loops_through(i);
                    }
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn set_link(&mut self, idx: usize, up: bool) {
        self.links[idx].up = up;
    }

    /// Which node owns a link-local address.
    fn owner(&self, addr: Ipv6Addr) -> usize {
        addr.segments()[6] as usize - 1
    }

    /// Follows next hops from `from` towards `dest`'s prefix. Returns the
    /// hop count if it arrives, None if a node has no route.
    fn walk(&self, from: usize, dest: usize) -> Result<Option<usize>, String> {
        let key = (node_prefix(dest), None);
        let mut at = from;
        let mut seen = vec![false; self.routers.len()];
        for hops in 0..=self.routers.len() {
            if at == dest {
                return Ok(Some(hops));
            }
            if seen[at] {
                return Err(format!("loop from {from} to {dest} through {at}"));
            }
            seen[at] = true;
            match self.routers[at].selected(&key) {
                None => return Ok(None),
                Some((_, nh, _)) => at = self.owner(nh),
            }
        }
        Err(format!("path from {from} to {dest} too long"))
    }

    /// Only `node`'s table changed in a step, so a new loop must go through
    /// it: walking from it to every destination finds any.
    fn check_loops_through(&mut self, node: usize) {
        for dest in 0..self.routers.len() {
            {
                if let Err(e) = self.walk(node, dest) {
                    let t = self.now - self.start;
                    self.loops.push(format!("{e} at {t:?}"));
                }
            }
        }
    }

    /// Pairs that cannot reach each other.
    fn unreachable(&self) -> Vec<(usize, usize)> {
        let n = self.routers.len();
        let mut v = Vec::new();
        for a in 0..n {
            for b in 0..n {
                if a != b && !matches!(self.walk(a, b), Ok(Some(_))) {
                    v.push((a, b));
                }
            }
        }
        v
    }

    /// Virtual time until every pair is reachable, checked every 100 ms.
    fn time_to_converge(&mut self, max: Duration) -> Option<Duration> {
        let t0 = self.now;
        while self.now - t0 < max {
            if self.unreachable().is_empty() {
                return Some(self.now - t0);
            }
            self.run_for(Duration::from_millis(100));
        }
        None
    }

    fn metric(&self, from: usize, dest: usize) -> Option<u16> {
        self.routers[from].selected(&(node_prefix(dest), None)).map(|(_, _, m)| m)
    }
}

const MS: Duration = Duration::from_millis(1);

fn chain(n: usize, kind: LinkKind, hello: Duration) -> Net {
    let mut net = Net::new(n, kind, hello);
    for i in 0..n - 1 {
        net.link(i, i + 1, MS);
    }
    net.announce_all();
    net
}

#[test]
fn two_routers_become_neighbours_and_exchange_routes() {
    let mut net = chain(2, LinkKind::Wired, Duration::from_secs(4));
    let t = net.time_to_converge(Duration::from_secs(30)).expect("converges");
    assert!(t <= Duration::from_secs(12), "took {t:?}");
    assert_eq!(net.metric(0, 1), Some(96));
    assert_eq!(net.metric(1, 0), Some(96));
    let nbrs = net.routers[0].neighbours(net.now);
    assert_eq!(nbrs.len(), 1);
    assert_eq!((nbrs[0].rxcost, nbrs[0].txcost, nbrs[0].reach & 0xC000), (96, 96, 0xC000));
    assert!(net.loops.is_empty(), "{:?}", net.loops);
}

#[test]
fn chain_converges_with_96_per_hop_and_no_loops() {
    let mut net = chain(6, LinkKind::Wired, Duration::from_secs(4));
    let t = net.time_to_converge(Duration::from_secs(60)).expect("converges");
    assert!(t < Duration::from_secs(20), "took {t:?}");
    for a in 0..6 {
        for b in 0..6 {
            if a != b {
                assert_eq!(net.metric(a, b), Some(96 * a.abs_diff(b) as u16), "{a}->{b}");
            }
        }
    }
    assert!(net.loops.is_empty(), "{:?}", net.loops);
}

#[test]
fn withdrawn_prefix_is_retracted_everywhere() {
    let mut net = chain(5, LinkKind::Wired, Duration::from_secs(4));
    net.time_to_converge(Duration::from_secs(60)).expect("converges");
    let now = net.now;
    net.routers[4].withdraw(now, node_prefix(4), None);
    net.drain(4);
    net.run_for(Duration::from_secs(2));
    for a in 0..4 {
        assert_eq!(net.metric(a, 4), None, "node {a} still routes to the withdrawn prefix");
    }
    assert!(net.loops.is_empty(), "{:?}", net.loops);
}

#[test]
fn ring_reroutes_around_a_failed_link() {
    let n = 6;
    let mut net = Net::new(n, LinkKind::Tunnel, Duration::from_millis(500));
    let links: Vec<usize> = (0..n).map(|i| net.link(i, (i + 1) % n, MS)).collect();
    net.announce_all();
    net.time_to_converge(Duration::from_secs(30)).expect("converges");
    assert_eq!(net.walk(0, 1).unwrap(), Some(1));
    // Cut 0-1: traffic 0 -> 1 must go the long way round (5 hops).
    net.set_link(links[0], false);
    let t = net.time_to_converge(Duration::from_secs(30));
    // The cut itself is not seen until Hellos go missing.
    let t0 = net.now;
    net.run_for(Duration::from_secs(5));
    let after = net.unreachable();
    assert!(after.is_empty(), "unreachable after the cut: {after:?}");
    assert_eq!(net.walk(0, 1).unwrap(), Some(5));
    assert_eq!(net.walk(1, 0).unwrap(), Some(5));
    assert!(t.is_some());
    assert!(net.loops.is_empty(), "{:?}", net.loops);
    let _ = t0;
}

#[test]
fn dead_link_detected_within_a_few_hello_intervals() {
    let hello = Duration::from_millis(500);
    let n = 4;
    let mut net = Net::new(n, LinkKind::Tunnel, hello);
    // A square: 0-1-2-3-0; 0 reaches 1 directly, or through 3 and 2.
    let l01 = net.link(0, 1, MS);
    net.link(1, 2, MS);
    net.link(2, 3, MS);
    net.link(3, 0, MS);
    net.announce_all();
    net.time_to_converge(Duration::from_secs(20)).expect("converges");
    net.run_for(Duration::from_secs(10));
    assert_eq!(net.walk(0, 1).unwrap(), Some(1));
    net.set_link(l01, false);
    let cut = net.now;
    let mut rerouted = None;
    while net.now - cut < Duration::from_secs(10) {
        net.run_for(Duration::from_millis(10));
        if net.walk(0, 1).unwrap() == Some(3) && net.walk(1, 0).unwrap() == Some(3) {
            rerouted = Some(net.now - cut);
            break;
        }
    }
    let t = rerouted.expect("rerouted");
    // 2-out-of-3: about 2.7-4.2 hello intervals, then the switch is immediate.
    assert!(t <= hello * 9 / 2, "reroute took {t:?}");
    assert!(t >= hello, "reroute before the loss could be seen: {t:?}");
    assert!(net.loops.is_empty(), "{:?}", net.loops);
}

/// A deterministic random graph: a random spanning tree plus extra edges.
fn random_graph(n: usize, extra: usize, seed: u64, kind: LinkKind, hello: Duration) -> (Net, Vec<usize>) {
    let mut x = seed | 1;
    let mut rnd = move |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    let mut net = Net::new(n, kind, hello);
    let mut links = Vec::new();
    let mut edges = std::collections::HashSet::new();
    for i in 1..n {
        let j = rnd(i);
        edges.insert((j, i));
        links.push(net.link(j, i, Duration::from_millis(1 + rnd(20) as u64)));
    }
    while edges.len() < n - 1 + extra {
        let (a, b) = (rnd(n), rnd(n));
        if a != b && edges.insert((a.min(b), a.max(b))) {
            links.push(net.link(a.min(b), a.max(b), Duration::from_millis(1 + rnd(20) as u64)));
        }
    }
    net.announce_all();
    (net, links)
}

#[test]
fn fifty_node_random_graph_converges_and_survives_failures_without_loops() {
    let (mut net, links) = random_graph(50, 40, 0x5eed, LinkKind::Tunnel, Duration::from_secs(1));
    let t = net.time_to_converge(Duration::from_secs(60)).expect("converges");
    assert!(t < Duration::from_secs(30), "took {t:?}");
    // Fail every 7th link that keeps the graph connected (extra links only,
    // i.e. not tree edges), then check everyone still reaches everyone.
    for (i, &l) in links.iter().enumerate().skip(49) {
        if i % 3 == 0 {
            net.set_link(l, false);
        }
    }
    net.run_for(Duration::from_secs(15));
    let un = net.unreachable();
    assert!(un.is_empty(), "{} unreachable pairs, e.g. {:?}", un.len(), &un[..un.len().min(5)]);
    // Heal.
    for &l in &links {
        net.set_link(l, true);
    }
    net.run_for(Duration::from_secs(15));
    assert!(net.unreachable().is_empty());
    assert!(net.loops.is_empty(), "{:?}", &net.loops[..net.loops.len().min(5)]);
}

#[test]
fn partitioned_node_is_retracted_then_rejoins() {
    let (mut net, _) = random_graph(20, 10, 7, LinkKind::Tunnel, Duration::from_millis(500));
    net.time_to_converge(Duration::from_secs(30)).expect("converges");
    // Isolate node 5 by cutting all its links.
    let cut: Vec<usize> =
        (0..net.links.len()).filter(|&i| net.links[i].a.0 == 5 || net.links[i].b.0 == 5).collect();
    for &l in &cut {
        net.set_link(l, false);
    }
    net.run_for(Duration::from_secs(40));
    for a in 0..20 {
        if a != 5 {
            assert_eq!(net.walk(a, 5).unwrap(), None, "{a} still has a route to the isolated node");
        }
    }
    for &l in &cut {
        net.set_link(l, true);
    }
    let t = net.time_to_converge(Duration::from_secs(30)).expect("rejoins");
    assert!(t < Duration::from_secs(10), "rejoin took {t:?}");
    assert!(net.loops.is_empty(), "{:?}", net.loops);
}

/// Replaces node `i` by a fresh router (a restart) starting at `seqno`.
fn restart(net: &mut Net, i: usize, seqno: u16) {
    let now = net.now;
    let mut r = Router::new(rid(i), seqno, now);
    let ifaces: Vec<IfaceId> = net.ends.keys().filter(|(n, _)| *n == i).map(|(_, f)| *f).collect();
    for f in ifaces {
        r.add_interface(now, f, net.cfg(i, f));
    }
    r.announce(now, node_prefix(i), None);
    net.routers[i] = r;
    net.drain(i);
}

#[test]
fn restart_without_persisted_seqno_recovers_through_seqno_requests() {
    let mut net = chain(4, LinkKind::Tunnel, Duration::from_millis(500));
    net.time_to_converge(Duration::from_secs(20)).expect("converges");
    // Bump node 3's seqno well above 0 so that a restart at 0 is "older".
    for _ in 0..5 {
        let now = net.now;
        net.routers[3].withdraw(now, node_prefix(3), None);
        net.run_for(Duration::from_secs(1));
        let now = net.now;
        let r = &mut net.routers[3];
        r.seqno = r.seqno.wrapping_add(100);
        r.announce(now, node_prefix(3), None);
        net.drain(3);
        net.run_for(Duration::from_secs(2));
    }
    assert!(net.routers[3].seqno() >= 500);
    assert_eq!(net.walk(0, 3).unwrap(), Some(3));
    // Restart node 3 from seqno 0: its updates are unfeasible for the
    // others until a seqno request makes it jump past their FDs.
    let old = net.routers[3].seqno();
    restart(&mut net, 3, 0);
    let t = net.time_to_converge(Duration::from_secs(30)).expect("recovers");
    assert!(t < Duration::from_secs(10), "recovery took {t:?}");
    assert!(seqno_newer(net.routers[3].seqno(), old), "seqno was not bumped past {old}");
    assert!(net.loops.is_empty(), "{:?}", net.loops);
}

#[test]
fn restart_with_persisted_seqno_is_accepted_at_once() {
    let mut net = chain(3, LinkKind::Tunnel, Duration::from_millis(500));
    net.time_to_converge(Duration::from_secs(20)).expect("converges");
    let seqno = net.routers[2].seqno();
    restart(&mut net, 2, seqno.wrapping_add(1));
    let t = net.time_to_converge(Duration::from_secs(20)).expect("recovers");
    assert!(t < Duration::from_secs(3), "took {t:?}");
    assert_eq!(net.routers[2].seqno(), seqno.wrapping_add(1), "no seqno request should be needed");
}

#[test]
fn rtt_penalty_steers_traffic_to_the_faster_path() {
    let hello = Duration::from_millis(500);
    let mut net = Net::new(4, LinkKind::Tunnel, hello);
    // 0 -> 3 directly over a slow link (100 ms), or 0-1-2-3 over fast ones.
    net.link(0, 3, Duration::from_millis(100));
    net.link(0, 1, MS);
    net.link(1, 2, MS);
    net.link(2, 3, MS);
    net.announce_all();
    net.time_to_converge(Duration::from_secs(20)).expect("converges");
    net.run_for(Duration::from_secs(30));
    let nb = net.routers[0].neighbours(net.now);
    let slow = nb.iter().find(|n| n.iface == 0).unwrap();
    let rtt = slow.rtt_ms.expect("RTT measured");
    assert!((190.0..=215.0).contains(&rtt), "rtt {rtt} ms");
    assert_eq!(slow.rtt_cost, 96, "rtt over rtt-max costs the full penalty");
    // Direct: 96 + 96 = 192; around: 3 * 96 = 288 → direct still wins.
    assert_eq!(net.metric(0, 3), Some(192));
    let fast = nb.iter().find(|n| n.iface == 1).unwrap();
    assert_eq!(fast.rtt_cost, 0);
}

#[test]
fn ack_requests_are_answered() {
    let now = Instant::now();
    let mut r = Router::new(rid(0), 0, now);
    r.add_interface(now, 0, InterfaceConfig::new(LinkKind::Wired, ll(0, 0)));
    while r.poll_transmit().is_some() {}
    let req = wire::encode(&[Message::AckReq { opaque: 0xbeef, interval: 100 }], 1400);
    r.handle_packet(now, 0, ll(1, 0), &req[0]);
    let mut acked = false;
    while let Some(t) = r.poll_transmit() {
        let d = wire::decode(&t.payload).unwrap();
        if d.messages.contains(&Message::Ack { opaque: 0xbeef }) {
            assert_eq!(t.dst, Destination::Unicast(ll(1, 0)));
            acked = true;
        }
    }
    assert!(acked);
}

#[test]
fn garbage_and_non_link_local_sources_are_counted_not_fatal() {
    let now = Instant::now();
    let mut r = Router::new(rid(0), 0, now);
    r.add_interface(now, 0, InterfaceConfig::new(LinkKind::Wired, ll(0, 0)));
    r.handle_packet(now, 0, ll(1, 0), &[1, 2, 3]);
    r.handle_packet(
        now,
        0,
        "2001:db8::1".parse().unwrap(),
        &wire::encode(&[Message::Ack { opaque: 1 }], 1400)[0],
    );
    r.handle_packet(now, 9, ll(1, 0), &wire::encode(&[Message::Ack { opaque: 1 }], 1400)[0]);
    assert_eq!(r.stats().packets_dropped, 3);
    assert!(r.neighbours(now).is_empty());
}

#[test]
fn source_specific_routes_propagate() {
    let mut net = chain(3, LinkKind::Wired, Duration::from_secs(1));
    let default: Ipv6Net = "::/0".parse().unwrap();
    let src: Ipv6Net = "fd00::/16".parse().unwrap();
    let now = net.now;
    net.routers[0].announce(now, default, Some(src));
    net.drain(0);
    net.time_to_converge(Duration::from_secs(20)).expect("converges");
    net.run_for(Duration::from_secs(2));
    let (_, nh, metric) = net.routers[2].selected(&(default, Some(src))).expect("source-specific route");
    assert_eq!(metric, 192);
    assert_eq!(net.owner(nh), 1);
    assert!(net.routers[2].selected(&(default, None)).is_none());
}

#[test]
fn control_traffic_is_bounded() {
    let (mut net, _) = random_graph(30, 15, 3, LinkKind::Tunnel, Duration::from_secs(1));
    net.time_to_converge(Duration::from_secs(30)).expect("converges");
    net.bytes = 0;
    net.run_for(Duration::from_secs(60));
    let per_node = net.bytes as f64 / 30.0 / 60.0;
    // 30 routes, ~3 neighbours, full dump every 4 s, Hellos every second.
    assert!(per_node < 2000.0, "{per_node} B/s per node");
    assert!(per_node > 100.0, "suspiciously quiet: {per_node} B/s per node");
}
