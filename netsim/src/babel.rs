//! A discrete-event simulation of Babel routers on virtual time: the real
//! sans-IO [`Router`] of `sixmesh-routing`, linked by simulated
//! point-to-point links with latency, loss and up/down state. No sockets,
//! no sleeping; the same seed gives the same run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use sixmesh_routing::core::{Destination, IfaceId, InterfaceConfig, LinkKind, RouteKey, Router};
use sixmesh_routing::wire::RouterId;

use crate::rng::Rng;

/// Index of a simulated router.
pub type NodeId = usize;
/// Index of a simulated link.
pub type LinkId = usize;

/// Properties of a simulated link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way latency.
    pub latency: Duration,
    /// Probability that a datagram is lost, in each direction.
    pub loss: f64,
}

impl LinkParams {
    /// A lossless link with this latency.
    pub fn latency(latency: Duration) -> Self {
        LinkParams { latency, loss: 0.0 }
    }
}

#[derive(Clone, Debug)]
struct Link {
    a: (NodeId, IfaceId),
    b: (NodeId, IfaceId),
    params: LinkParams,
    up: bool,
}

/// Per-node traffic counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

struct Node {
    router: Router,
    ifaces: u32,
    traffic: Traffic,
    scheduled: Option<Instant>,
    /// The prefix this node originates, if any.
    prefix: Option<Ipv6Net>,
}

/// A datagram in flight: (arrival, order, node, iface, source, payload).
type InFlight = Reverse<(Instant, u64, NodeId, IfaceId, Ipv6Addr, Vec<u8>)>;

/// How a router's interfaces are set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterParams {
    pub kind: LinkKind,
    pub hello: Duration,
    pub update: Duration,
}

impl RouterParams {
    /// babeld's defaults for this kind of link: Hello 4 s, updates 16 s.
    pub fn babeld_defaults(kind: LinkKind) -> Self {
        RouterParams { kind, hello: Duration::from_secs(4), update: Duration::from_secs(16) }
    }

    /// A Hello interval, with updates every 4 Hellos.
    pub fn with_hello(kind: LinkKind, hello: Duration) -> Self {
        RouterParams { kind, hello, update: hello * 4 }
    }
}

/// The simulation. See the module documentation.
pub struct BabelSim {
    start: Instant,
    now: Instant,
    rng: Rng,
    params: RouterParams,
    nodes: Vec<Node>,
    links: Vec<Link>,
    ends: HashMap<(NodeId, IfaceId), LinkId>,
    owner: HashMap<Ipv6Addr, NodeId>,
    queue: BinaryHeap<InFlight>,
    timers: BinaryHeap<Reverse<(Instant, NodeId)>>,
    seq: u64,
    /// When set, every step walks the changed node's next hops to every
    /// destination and records any forwarding loop (costly at scale).
    pub check_loops: bool,
    loops: Vec<String>,
}

/// The link-local address of a node's interface.
pub fn link_local(node: NodeId, iface: IfaceId) -> Ipv6Addr {
    let n = node as u32;
    Ipv6Addr::new(0xfe80, 0, 0, 0, 0, (n >> 16) as u16, n as u16, iface as u16 + 1)
}

/// The /64 a node originates in the simulations: fd00:<node>::/64.
pub fn node_prefix(node: NodeId) -> Ipv6Net {
    let n = node as u32;
    Ipv6Net::new(Ipv6Addr::new(0xfd00, (n >> 16) as u16, n as u16, 0, 0, 0, 0, 0), 64).expect("valid prefix")
}

/// A router-id derived from the node index.
pub fn router_id(node: NodeId) -> RouterId {
    let mut id = [0u8; 8];
    id[0] = 2;
    id[4..].copy_from_slice(&(node as u32 + 1).to_be_bytes());
    RouterId(id)
}

impl BabelSim {
    /// `n` routers with no links yet, all with `params`.
    pub fn new(n: usize, params: RouterParams, seed: u64) -> Self {
        let start = Instant::now();
        let mut sim = BabelSim {
            start,
            now: start,
            rng: Rng::new(seed),
            params,
            nodes: Vec::with_capacity(n),
            links: Vec::new(),
            ends: HashMap::new(),
            owner: HashMap::new(),
            queue: BinaryHeap::new(),
            timers: BinaryHeap::new(),
            seq: 0,
            check_loops: false,
            loops: Vec::new(),
        };
        for i in 0..n {
            let router = Router::new(router_id(i), (sim.rng.next_u64() & 0xffff) as u16, start);
            sim.nodes.push(Node {
                router,
                ifaces: 0,
                traffic: Traffic::default(),
                scheduled: None,
                prefix: None,
            });
        }
        sim
    }

    /// Number of routers.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no routers.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Virtual time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The router of a node.
    pub fn router(&self, node: NodeId) -> &Router {
        &self.nodes[node].router
    }

    /// Traffic counters of a node.
    pub fn traffic(&self, node: NodeId) -> Traffic {
        self.nodes[node].traffic
    }

    /// Resets every node's traffic counters.
    pub fn reset_traffic(&mut self) {
        for n in &mut self.nodes {
            n.traffic = Traffic::default();
        }
    }

    /// Forwarding loops seen so far (with `check_loops`).
    pub fn loops(&self) -> &[String] {
        &self.loops
    }

    /// All links as (a, b, up).
    pub fn links(&self) -> impl Iterator<Item = (NodeId, NodeId, bool)> + '_ {
        self.links.iter().map(|l| (l.a.0, l.b.0, l.up))
    }

    fn iface_config(&self, node: NodeId, iface: IfaceId) -> InterfaceConfig {
        let mut c = InterfaceConfig::new(self.params.kind, link_local(node, iface));
        c.hello_interval = self.params.hello;
        c.update_interval = self.params.update;
        c
    }

    /// Links two nodes with a new interface on each.
    pub fn link(&mut self, a: NodeId, b: NodeId, params: LinkParams) -> LinkId {
        let ia = self.nodes[a].ifaces;
        let ib = self.nodes[b].ifaces;
        self.nodes[a].ifaces += 1;
        self.nodes[b].ifaces += 1;
        let id = self.links.len();
        self.links.push(Link { a: (a, ia), b: (b, ib), params, up: true });
        self.ends.insert((a, ia), id);
        self.ends.insert((b, ib), id);
        self.owner.insert(link_local(a, ia), a);
        self.owner.insert(link_local(b, ib), b);
        let now = self.now;
        for (n, i) in [(a, ia), (b, ib)] {
            let cfg = self.iface_config(n, i);
            self.nodes[n].router.add_interface(now, i, cfg);
            self.after(n);
        }
        id
    }

    /// Makes every node originate its own /64 ([`node_prefix`]).
    pub fn announce_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.announce(i, node_prefix(i));
        }
    }

    /// Makes `node` originate `prefix`.
    pub fn announce(&mut self, node: NodeId, prefix: Ipv6Net) {
        let now = self.now;
        self.nodes[node].prefix = Some(prefix);
        self.nodes[node].router.announce(now, prefix, None);
        self.after(node);
    }

    /// Makes `node` originate a source-specific route (RFC 9079).
    pub fn announce_source_specific(&mut self, node: NodeId, prefix: Ipv6Net, src: Ipv6Net) {
        let now = self.now;
        self.nodes[node].router.announce(now, prefix, Some(src));
        self.after(node);
    }

    /// Makes `node` stop originating `prefix`.
    pub fn withdraw(&mut self, node: NodeId, prefix: Ipv6Net) {
        let now = self.now;
        self.nodes[node].router.withdraw(now, prefix, None);
        self.after(node);
    }

    /// Brings a link up or down (datagrams in flight still arrive).
    pub fn set_link(&mut self, link: LinkId, up: bool) {
        self.links[link].up = up;
    }

    /// Replaces a node's router by a fresh one starting at `seqno`: a
    /// restart, with or without a persisted seqno.
    pub fn restart(&mut self, node: NodeId, seqno: u16) {
        let now = self.now;
        let mut r = Router::new(router_id(node), seqno, now);
        for i in 0..self.nodes[node].ifaces {
            r.add_interface(now, i, self.iface_config(node, i));
        }
        if let Some(p) = self.nodes[node].prefix {
            r.announce(now, p, None);
        }
        self.nodes[node].router = r;
        self.nodes[node].scheduled = None;
        self.after(node);
    }

    /// Moves a node's output onto the links and keeps its timer scheduled.
    fn after(&mut self, node: NodeId) {
        while let Some(t) = self.nodes[node].router.poll_transmit() {
            let len = t.payload.len() as u64;
            let tr = &mut self.nodes[node].traffic;
            tr.tx_bytes += len;
            tr.tx_packets += 1;
            let Some(&li) = self.ends.get(&(node, t.iface)) else { continue };
            let link = &self.links[li];
            if !link.up {
                continue;
            }
            let peer = if link.a == (node, t.iface) { link.b } else { link.a };
            if let Destination::Unicast(d) = t.dst
                && d != link_local(peer.0, peer.1)
            {
                continue;
            }
            let params = link.params;
            if params.loss > 0.0 && self.rng.next_f64() < params.loss {
                continue;
            }
            self.seq += 1;
            self.queue.push(Reverse((
                self.now + params.latency,
                self.seq,
                peer.0,
                peer.1,
                link_local(node, t.iface),
                t.payload.into_vec(),
            )));
        }
        while self.nodes[node].router.poll_event().is_some() {}
        let next = self.nodes[node].router.poll_timeout();
        if let Some(t) = next
            && next != self.nodes[node].scheduled
        {
            self.nodes[node].scheduled = next;
            self.timers.push(Reverse((t, node)));
        }
    }

    /// Runs until `d` of virtual time has passed.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            // Drop stale timer entries.
            while let Some(Reverse((t, n))) = self.timers.peek().copied() {
                if self.nodes[n].scheduled == Some(t) {
                    break;
                }
                self.timers.pop();
            }
            let next_pkt = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let next = match (next_pkt, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            self.now = next;
            let node = if next_pkt == Some(next) {
                let Reverse((_, _, node, iface, src, payload)) = self.queue.pop().expect("packet");
                let tr = &mut self.nodes[node].traffic;
                tr.rx_bytes += payload.len() as u64;
                tr.rx_packets += 1;
                self.nodes[node].router.handle_packet(next, iface, src, &payload);
                node
            } else {
                let Reverse((_, node)) = self.timers.pop().expect("timer");
                self.nodes[node].scheduled = None;
                self.nodes[node].router.handle_timeout(next);
                node
            };
            self.after(node);
            if self.check_loops {
                self.check_loops_through(node);
            }
        }
        self.now = until;
    }

    /// The node a link-local address belongs to.
    pub fn owner(&self, addr: Ipv6Addr) -> Option<NodeId> {
        self.owner.get(&addr).copied()
    }

    /// Follows selected next hops from `from` towards `dest`'s prefix:
    /// `Ok(Some(hops))` when it arrives, `Ok(None)` when a router on the way
    /// has no route or routes over a link that is down, `Err` on a
    /// forwarding loop.
    pub fn walk(&self, from: NodeId, dest: NodeId) -> Result<Option<usize>, String> {
        let Some(prefix) = self.nodes[dest].prefix else { return Ok(None) };
        let key: RouteKey = (prefix, None);
        let mut at = from;
        let mut path = Vec::new();
        for hops in 0..=self.nodes.len() {
            if at == dest {
                return Ok(Some(hops));
            }
            if path.contains(&at) {
                path.push(at);
                return Err(format!("loop from {from} to {dest}: {path:?}"));
            }
            path.push(at);
            match self.nodes[at].router.selected(&key) {
                None => return Ok(None),
                Some((iface, nh, _)) => {
                    // A route over a link that is down carries nothing.
                    let up = self.ends.get(&(at, iface)).is_some_and(|&l| self.links[l].up);
                    match self.owner(nh) {
                        Some(n) if up => at = n,
                        _ => return Ok(None),
                    }
                }
            }
        }
        Err(format!("path from {from} to {dest} too long"))
    }

    fn check_loops_through(&mut self, node: NodeId) {
        for dest in 0..self.nodes.len() {
            if let Err(e) = self.walk(node, dest) {
                let t = self.elapsed();
                self.loops.push(format!("{e} at {t:?}"));
            }
        }
    }

    /// Pairs (from, to) of nodes that originate a prefix where `from` has no
    /// working path to `to`.
    pub fn unreachable_pairs(&self) -> Vec<(NodeId, NodeId)> {
        let dests: Vec<NodeId> = (0..self.nodes.len()).filter(|&d| self.nodes[d].prefix.is_some()).collect();
        let mut v = Vec::new();
        for a in 0..self.nodes.len() {
            for &b in &dests {
                if a != b && !matches!(self.walk(a, b), Ok(Some(_))) {
                    v.push((a, b));
                }
            }
        }
        v
    }

    /// Whether every node has selected a route to every other node's prefix
    /// (cheap: counts, does not walk paths).
    pub fn fully_converged(&self) -> bool {
        let origins = self.nodes.iter().filter(|n| n.prefix.is_some()).count();
        self.nodes.iter().all(|n| n.router.selected_count() + usize::from(n.prefix.is_some()) >= origins)
    }

    /// Whether every node reaches `dest` (used to time reconvergence of
    /// one destination without checking all pairs).
    pub fn all_reach(&self, dest: NodeId) -> bool {
        (0..self.nodes.len()).all(|a| matches!(self.walk(a, dest), Ok(Some(_))))
    }

    /// Runs in steps of `step` until `done` holds, at most `max`; returns the
    /// virtual time it took.
    pub fn run_until(
        &mut self,
        step: Duration,
        max: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Option<Duration> {
        let t0 = self.now;
        loop {
            if done(self) {
                return Some(self.now - t0);
            }
            if self.now - t0 >= max {
                return None;
            }
            self.run_for(step);
        }
    }

    /// The selected metric from `from` to `dest`'s prefix.
    pub fn metric(&self, from: NodeId, dest: NodeId) -> Option<u16> {
        let prefix = self.nodes[dest].prefix?;
        self.nodes[from].router.selected(&(prefix, None)).map(|(_, _, m)| m)
    }
}
