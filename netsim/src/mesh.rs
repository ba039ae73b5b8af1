//! Whole mesh nodes on virtual time: the real [`NodeCore`] of every node
//! (tunnel manager, Babel in every tunnel, user-space forwarding), over an
//! underlay where every pair of nodes can reach each other with some
//! latency, unless that path is broken. A tunnel comes up one round trip
//! after the manager asks for it, if the path works and the other side
//! accepts; its packets then cross the path (encryption is the driver's
//! business and is not simulated).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use sixmesh_mesh_node::manager::{Action, ManagerConfig};
use sixmesh_mesh_node::node::{NodeConfig, NodeCore, NodeEvent, Output};
use sixmesh_mesh_node::packet;
use sixmesh_routing::wire::RouterId;

use crate::babel::NodeId;
use crate::rng::Rng;

/// The network all simulated nodes belong to.
pub fn network() -> Ipv6Net {
    "fd5e::/16".parse().expect("valid")
}

/// Node `i`'s /64.
pub fn node_prefix(i: NodeId) -> Ipv6Net {
    let n = i as u32;
    Ipv6Net::new(Ipv6Addr::new(0xfd5e, (n >> 16) as u16, n as u16, 0, 0, 0, 0, 0), 64).expect("valid")
}

/// Node `i`'s mesh address (`prefix::1`).
pub fn mesh_address(i: NodeId) -> Ipv6Addr {
    let p = node_prefix(i).network().segments();
    Ipv6Addr::new(p[0], p[1], p[2], p[3], 0, 0, 0, 1)
}

enum Ev {
    /// An inner packet arrives at `to` from `from`'s tunnel.
    Packet { from: NodeId, to: NodeId, packet: Vec<u8> },
    /// A handshake from `from` reaches `to`.
    Handshake { from: NodeId, to: NodeId },
    /// The handshake answer reaches `from`.
    HandshakeDone { from: NodeId, to: NodeId },
}

/// Counters of the underlay.
#[derive(Clone, Copy, Debug, Default)]
pub struct MeshStats {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
}

/// The simulation. See the module documentation.
pub struct MeshSim {
    start: Instant,
    now: Instant,
    nodes: Vec<NodeCore>,
    alive: Vec<bool>,
    scheduled: Vec<Option<Instant>>,
    timers: BinaryHeap<Reverse<(Instant, NodeId)>>,
    queue: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    pending: HashMap<usize, Ev>,
    seq: u64,
    latency: Box<dyn Fn(NodeId, NodeId) -> Duration>,
    broken: HashSet<(NodeId, NodeId)>,
    by_prefix: HashMap<Ipv6Net, NodeId>,
    /// Probes delivered: (from, to, sent at).
    delivered: Vec<(NodeId, NodeId, Instant)>,
    pub stats: MeshStats,
    rng: Rng,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl MeshSim {
    /// `n` nodes with `manager` parameters; `latency(a, b)` gives the
    /// one-way latency of the underlay path between two nodes. Every node
    /// starts knowing every other one (as if the registry's bootstrap list
    /// held them all).
    pub fn new(
        n: usize,
        manager: ManagerConfig,
        latency: impl Fn(NodeId, NodeId) -> Duration + 'static,
        seed: u64,
    ) -> Self {
        let start = Instant::now();
        let mut rng = Rng::new(seed);
        let mut nodes = Vec::with_capacity(n);
        let mut by_prefix = HashMap::new();
        for i in 0..n {
            let mut id = [0u8; 8];
            id[0] = 2;
            id[4..].copy_from_slice(&(i as u32 + 1).to_be_bytes());
            let mut cfg =
                NodeConfig::new(node_prefix(i), network(), RouterId(id), (rng.next_u64() & 0xffff) as u16);
            cfg.manager = manager.clone();
            cfg.seed = rng.next_u64();
            let mut core = NodeCore::new(cfg, start);
            core.manager().add_candidates(
                (0..n)
                    .filter(|&j| j != i)
                    .map(|j| (node_prefix(j), vec![std::net::SocketAddr::from(([192, 0, 2, 1], j as u16))])),
            );
            nodes.push(core);
            by_prefix.insert(node_prefix(i), i);
        }
        let mut sim = MeshSim {
            start,
            now: start,
            alive: vec![true; n],
            scheduled: vec![None; n],
            nodes,
            timers: BinaryHeap::new(),
            queue: BinaryHeap::new(),
            pending: HashMap::new(),
            seq: 0,
            latency: Box::new(latency),
            broken: HashSet::new(),
            by_prefix,
            delivered: Vec::new(),
            stats: MeshStats::default(),
            rng,
        };
        for i in 0..n {
            sim.after(i);
        }
        sim
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// A node's core.
    pub fn node(&self, i: NodeId) -> &NodeCore {
        &self.nodes[i]
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Breaks or heals the underlay path between two nodes.
    pub fn set_path(&mut self, a: NodeId, b: NodeId, up: bool) {
        if up {
            self.broken.remove(&pair(a, b));
        } else {
            self.broken.insert(pair(a, b));
        }
    }

    /// Whether the underlay path between two nodes works.
    pub fn path_up(&self, a: NodeId, b: NodeId) -> bool {
        self.alive[a] && self.alive[b] && !self.broken.contains(&pair(a, b))
    }

    /// Breaks each path with probability `p` (seeded).
    pub fn break_random_paths(&mut self, p: f64) -> usize {
        let n = self.nodes.len();
        let mut k = 0;
        for a in 0..n {
            for b in a + 1..n {
                if self.rng.next_f64() < p {
                    self.broken.insert((a, b));
                    k += 1;
                }
            }
        }
        k
    }

    /// Stops or restarts a node (a failed node drops everything).
    pub fn set_alive(&mut self, i: NodeId, alive: bool) {
        self.alive[i] = alive;
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        let key = self.seq as usize;
        self.pending.insert(key, ev);
        self.queue.push(Reverse((at, self.seq, key)));
    }

    /// Moves a node's outputs onto the underlay and keeps its timer.
    fn after(&mut self, i: NodeId) {
        while let Some(o) = self.nodes[i].poll_output() {
            match o {
                Output::ToTunnel { peer, packet } => {
                    let Some(&j) = self.by_prefix.get(&peer) else { continue };
                    self.stats.packets += 1;
                    self.stats.bytes += packet.len() as u64;
                    if !self.path_up(i, j) {
                        self.stats.lost += 1;
                        continue;
                    }
                    let at = self.now + (self.latency)(i, j);
                    self.push(at, Ev::Packet { from: i, to: j, packet });
                }
                Output::ToTun(packet) => {
                    if let Ok(h) = packet::parse_ipv6(&packet)
                        && let Some(payload) = packet::udp_payload(&packet, &h, PROBE_PORT)
                        && payload.len() == 16
                    {
                        let from = u64::from_be_bytes(payload[..8].try_into().expect("8")) as usize;
                        let sent = u64::from_be_bytes(payload[8..].try_into().expect("8"));
                        self.delivered.push((from, i, self.start + Duration::from_micros(sent)));
                    }
                }
            }
        }
        while let Some(e) = self.nodes[i].poll_event() {
            if let NodeEvent::Manager(Action::Connect { peer, .. }) = e
                && let Some(&j) = self.by_prefix.get(&peer)
                && self.path_up(i, j)
            {
                let at = self.now + (self.latency)(i, j);
                self.push(at, Ev::Handshake { from: i, to: j });
            }
        }
        let next = self.nodes[i].poll_timeout();
        if Some(next) != self.scheduled[i] {
            self.scheduled[i] = Some(next);
            self.timers.push(Reverse((next, i)));
        }
    }

    /// Runs `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            while let Some(Reverse((t, n))) = self.timers.peek().copied() {
                if self.scheduled[n] == Some(t) {
                    break;
                }
                self.timers.pop();
            }
            let next_ev = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let next = match (next_ev, next_timer) {
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
            if next_ev == Some(next) {
                let Reverse((_, _, key)) = self.queue.pop().expect("event");
                let ev = self.pending.remove(&key).expect("pending event");
                self.deliver(ev);
            } else {
                let Reverse((_, i)) = self.timers.pop().expect("timer");
                self.scheduled[i] = None;
                if self.alive[i] {
                    self.nodes[i].handle_timeout(next);
                }
                self.after(i);
            }
        }
        self.now = until;
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Packet { from, to, packet } => {
                if !self.path_up(from, to) {
                    self.stats.lost += 1;
                    return;
                }
                self.nodes[to].from_tunnel(now, node_prefix(from), packet);
                self.after(to);
            }
            Ev::Handshake { from, to } => {
                if !self.path_up(from, to) {
                    return;
                }
                if self.nodes[to].accept_incoming(now, node_prefix(from)) {
                    self.nodes[to].tunnel_up(now, node_prefix(from));
                    self.after(to);
                    let at = now + (self.latency)(to, from);
                    self.push(at, Ev::HandshakeDone { from, to });
                }
            }
            Ev::HandshakeDone { from, to } => {
                if self.path_up(from, to) {
                    self.nodes[from].tunnel_up(now, node_prefix(to));
                    self.after(from);
                }
            }
        }
    }

    /// Sends a probe from node `a`'s machine to node `b`'s mesh address.
    pub fn probe(&mut self, a: NodeId, b: NodeId) {
        let mut payload = (a as u64).to_be_bytes().to_vec();
        payload.extend((self.elapsed().as_micros() as u64).to_be_bytes());
        let p = packet::build_udp(mesh_address(a), mesh_address(b), PROBE_PORT, 64, &payload);
        self.nodes[a].from_tun(self.now, p);
        self.after(a);
    }

    /// Probes every ordered pair, waits `wait`, and returns the pairs whose
    /// probe did not arrive.
    pub fn unreachable_pairs(&mut self, wait: Duration) -> Vec<(NodeId, NodeId)> {
        self.delivered.clear();
        let n = self.nodes.len();
        for a in 0..n {
            for b in 0..n {
                if a != b && self.alive[a] && self.alive[b] {
                    self.probe(a, b);
                }
            }
        }
        self.run_for(wait);
        let got: HashSet<(NodeId, NodeId)> = self.delivered.iter().map(|(a, b, _)| (*a, *b)).collect();
        let mut missing = Vec::new();
        for a in 0..n {
            for b in 0..n {
                if a != b && self.alive[a] && self.alive[b] && !got.contains(&(a, b)) {
                    missing.push((a, b));
                }
            }
        }
        missing
    }

    /// Tunnels that are up at both ends, as (a, b) with a < b.
    pub fn tunnel_graph(&mut self) -> Vec<(NodeId, NodeId)> {
        let mut edges = HashSet::new();
        for i in 0..self.nodes.len() {
            let peers: Vec<Ipv6Net> =
                self.nodes[i].manager().tunnels().filter(|(_, _, up)| *up).map(|(p, _, _)| p).collect();
            for p in peers {
                if let Some(&j) = self.by_prefix.get(&p) {
                    edges.insert(pair(i, j));
                }
            }
        }
        let mut v: Vec<_> = edges.into_iter().collect();
        v.sort();
        v
    }
}

/// UDP port of the simulator's reachability probes.
pub const PROBE_PORT: u16 = 7;
