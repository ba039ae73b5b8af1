//! Whole mesh nodes on virtual time: the real [`NodeCore`] of every node
//! (tunnel manager, Babel in every tunnel, user-space forwarding), over an
//! underlay where every pair of nodes can reach each other with some
//! latency, jitter and loss, unless that path is broken. A tunnel comes up
//! one round trip after the manager asks for it, if the path works and the
//! other side accepts (a node behind NAT accepts nothing); its packets then
//! cross the path (encryption is the driver's business and is not
//! simulated, but its bytes are counted: see [`WIRE_OVERHEAD`]).
//!
//! Everything is deterministic: the same seed and the same calls give the
//! same run. Reachability can be checked two ways that agree: real probe
//! packets through the forwarding path ([`MeshSim::probe`],
//! [`MeshSim::unreachable_pairs`]), or, much cheaper at scale, a walk of
//! the forwarding tables hop by hop ([`MeshSim::walk`]) that also finds
//! forwarding loops and measures the path's underlay latency.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use sixmesh_mesh_node::manager::{Action, Announcing, ManagerConfig};
use sixmesh_mesh_node::node::{NodeConfig, NodeCore, NodeEvent, Output, TunnelId, TunnelIds};
use sixmesh_mesh_node::packet;
use sixmesh_routing::core::{FxMap, Payload, prefetch};
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

/// The node whose /64 `p` is (the inverse of [`node_prefix`]).
pub fn node_id(p: &Ipv6Net) -> Option<NodeId> {
    let s = p.network().segments();
    (p.prefix_len() == 64 && s[0] == 0xfd5e && s[3] == 0).then(|| ((s[1] as usize) << 16) | s[2] as usize)
}

/// The node of a mesh of `n` whose /64 `p` is.
fn node_in(p: &Ipv6Net, n: usize) -> Option<NodeId> {
    node_id(p).filter(|&i| i < n)
}

/// Node `i`'s mesh address (`prefix::1`).
pub fn mesh_address(i: NodeId) -> Ipv6Addr {
    let p = node_prefix(i).network().segments();
    Ipv6Addr::new(p[0], p[1], p[2], p[3], 0, 0, 0, 1)
}

/// Bytes the underlay carries per tunnel packet on top of the inner packet:
/// outer IPv6 (40) + UDP (8) + WireGuard data header (16) + AEAD tag (16).
pub const WIRE_OVERHEAD: u64 = 80;
/// Size of a WireGuard handshake initiation and response on the underlay
/// (148 and 92 bytes of WireGuard, plus outer IPv6 and UDP headers).
pub const HANDSHAKE_BYTES: (u64, u64) = (148 + 48, 92 + 48);

/// One underlay path between two nodes, the same in both directions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PathParams {
    /// One-way latency.
    pub latency: Duration,
    /// Extra delay drawn uniformly in [0, jitter) for every packet.
    pub jitter: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Whether the path is broken from the start (until healed).
    pub broken: bool,
}

impl PathParams {
    /// A working, lossless path with this latency.
    pub fn latency(latency: Duration) -> Self {
        PathParams { latency, jitter: Duration::ZERO, loss: 0.0, broken: false }
    }
}

/// How the simulated mesh is built. [`MeshConfig::new`] gives defaults.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// Number of nodes (all of them, including those not started yet).
    pub nodes: usize,
    /// Tunnel-manager parameters of every node.
    pub manager: ManagerConfig,
    /// Babel Hello interval in tunnels (the node's default: 0.5 s).
    pub hello_interval: Duration,
    /// Babel full-update interval in tunnels (the node's default: 30 s).
    pub update_interval: Duration,
    /// Nodes behind NAT: they accept no incoming tunnel. Empty: none.
    pub nat: Vec<bool>,
    /// Nodes that are not running at the start (they join later with
    /// [`MeshSim::restart`]). Empty: all run.
    pub initially_down: Vec<bool>,
    /// Upstream bandwidth of each node's access link in bytes per second
    /// (packets queue behind each other). Empty or `None`: unlimited.
    pub uplink: Vec<Option<u64>>,
    /// Nodes that do not announce their prefix in Babel (they run their
    /// tunnels and Babel all the same, and route to the others). Empty: all
    /// announce. Route tables grow as nodes × announced prefixes ×
    /// tunnels: announcing a sample lets very large meshes fit in memory.
    pub silent: Vec<bool>,
    /// How many peers each node starts knowing, drawn at random (like a
    /// registry's bootstrap list); 0: every other node.
    pub bootstrap: usize,
    /// Threads to run on (0: one per core, at most one per 100 nodes). The
    /// result is the same whatever the number.
    pub threads: usize,
}

impl MeshConfig {
    /// `nodes` nodes with the node's default timers and these manager
    /// parameters, none behind NAT, all running, unlimited bandwidth.
    pub fn new(nodes: usize, manager: ManagerConfig) -> Self {
        let d = NodeConfig::new(node_prefix(0), network(), RouterId([0; 8]), 0);
        MeshConfig {
            nodes,
            manager,
            hello_interval: d.hello_interval,
            update_interval: d.update_interval,
            nat: Vec::new(),
            initially_down: Vec::new(),
            uplink: Vec::new(),
            silent: Vec::new(),
            bootstrap: 0,
            threads: 0,
        }
    }
}

enum Ev {
    /// An inner packet arrives at `to` from `from`'s tunnel; `broken`:
    /// the path's [`PathParams::broken`] (the sender looked it up: the
    /// receiver need not look it up again); `ids`: the tunnel's, as the
    /// sender gave them (WireGuard's indices: the receiver finds its tunnel
    /// by them).
    Packet { from: NodeId, to: NodeId, broken: bool, ids: TunnelIds, packet: Payload },
    /// A handshake from `from` reaches `to`.
    Handshake { from: NodeId, to: NodeId },
    /// The handshake answer reaches `from`.
    HandshakeDone { from: NodeId, to: NodeId },
}

impl Ev {
    /// The node the event happens at.
    fn at_node(&self) -> NodeId {
        match self {
            Ev::Packet { to, .. } | Ev::Handshake { to, .. } => *to,
            Ev::HandshakeDone { from, .. } => *from,
        }
    }
}

/// Counters of the underlay.
#[derive(Clone, Copy, Debug, Default)]
pub struct MeshStats {
    /// Tunnel packets sent (data and control).
    pub packets: u64,
    /// Their inner bytes.
    pub bytes: u64,
    /// Packets lost (broken path, random loss, dead node).
    pub lost: u64,
}

/// Per-node traffic counters, in bytes on the underlay (inner packet plus
/// [`WIRE_OVERHEAD`]; handshakes count as control).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeTraffic {
    /// Control bytes sent: Babel and other link-local messages in tunnels,
    /// and handshakes.
    pub control_tx_bytes: u64,
    /// Control bytes received.
    pub control_rx_bytes: u64,
    /// Control packets sent.
    pub control_tx_packets: u64,
    /// Data bytes sent (forwarded or originated).
    pub data_tx_bytes: u64,
}

/// What a walk of the forwarding tables from one node to another found.
#[derive(Clone, Debug, PartialEq)]
pub enum Walk {
    /// The destination was reached in `hops` tunnel hops whose underlay
    /// latencies add up to `latency`.
    Reached { hops: usize, latency: Duration },
    /// Node `at` has no route to the destination.
    NoRoute { at: NodeId },
    /// Node `at` forwards into a tunnel whose underlay path (or far node)
    /// is down.
    PathDown { at: NodeId, next: NodeId },
    /// The packet would come back to a node it already crossed: the nodes
    /// of the loop, in order.
    Loop { path: Vec<NodeId> },
}

/// What a node is, beside its core: the state only the thread that runs
/// the node touches.
struct Node {
    core: NodeCore,
    /// The timer in the node's part's heap, if any.
    scheduled: Option<Instant>,
    /// When its uplink is free again (bandwidth-limited nodes).
    busy_until: Instant,
    traffic: NodeTraffic,
    /// Last seqno the node persisted (a restart resumes from it).
    seqno: u16,
    /// Loss and jitter of what the node sends: one generator per node, so
    /// that a run does not depend on how nodes are shared out to threads.
    rng: Rng,
    /// Events the node has sent: with its id, the tie-break between
    /// events due at the same nanosecond.
    sent: u64,
    /// The underlay paths to the peers it has exchanged packets with (the
    /// path function hashes and converts on every call: three calls per
    /// packet were a few per cent of a Hello's cost).
    paths: FxMap<NodeId, PathParams>,
    /// The same by the node's tunnel id (what it sends says which tunnel:
    /// an index, not a hash lookup per packet), with the peer it was for
    /// (ids are reused).
    by_tunnel: Vec<Option<(NodeId, PathParams)>>,
}

/// A share of the nodes (a contiguous range) and their pending events,
/// run by one thread within a window of virtual time.
#[derive(Default)]
struct Part {
    /// In-flight events due at this part's nodes: (arrival in ns since the
    /// start, sender, sender's count, slot in `pending`).
    queue: BinaryHeap<Reverse<(u64, u32, u64, u32)>>,
    /// The events themselves, in reusable slots.
    pending: Vec<Option<Ev>>,
    free: Vec<u32>,
    /// The nodes' next timers (stale entries are skipped).
    timers: BinaryHeap<Reverse<(Instant, NodeId)>>,
    /// Events for other parts' nodes, handed over at the end of a window.
    outbox: Vec<(u64, u32, u64, Ev)>,
    stats: MeshStats,
    /// Probes delivered: (from, to, sent at).
    delivered: Vec<(NodeId, NodeId, Instant)>,
}

impl Node {
    /// Starts loading what handling an event at this node reads first.
    fn prefetch(&self) {
        prefetch(&self.scheduled);
        prefetch(&self.by_tunnel);
        self.core.prefetch();
    }
}

impl Part {
    /// Starts loading the slot of the next event (nearly always a cache
    /// miss: it was filled when the packet was sent, many events ago), to be
    /// read by [`Part::warm_next_packet`] after this event is handled.
    fn warm_next_slot(&self) {
        if let Some(Reverse((.., slot))) = self.queue.peek() {
            prefetch(self.pending.as_ptr().wrapping_add(*slot as usize));
        }
    }

    /// Starts loading the first bytes of the next event's packet (its
    /// headers, read first), overlapping that miss with the work between.
    /// Also the state of the nodes the next event and the next timer are
    /// for (whichever comes first), read field after field otherwise.
    fn warm_next_packet(&self, nodes: &[Node], lo: usize) {
        if let Some(Reverse((.., slot))) = self.queue.peek()
            && let Some(Some(ev)) = self.pending.get(*slot as usize)
        {
            if let Ev::Packet { packet, .. } = ev {
                prefetch(packet.as_ptr());
            }
            if let Some(node) = nodes.get(ev.at_node().wrapping_sub(lo)) {
                node.prefetch();
            }
        }
        if let Some(Reverse((_, i))) = self.timers.peek()
            && let Some(node) = nodes.get(i.wrapping_sub(lo))
        {
            node.prefetch();
        }
    }

    fn insert(&mut self, key: (u64, u32, u64), ev: Ev) {
        let slot = match self.free.pop() {
            Some(k) => {
                self.pending[k as usize] = Some(ev);
                k
            }
            None => {
                self.pending.push(Some(ev));
                (self.pending.len() - 1) as u32
            }
        };
        self.queue.push(Reverse((key.0, key.1, key.2, slot)));
    }

    /// When its next event or timer is due (stale timers dropped).
    fn next_due(&mut self, start: Instant, nodes: &[Node], lo: usize, alive: &[bool]) -> Option<Instant> {
        while let Some(Reverse((t, n))) = self.timers.peek().copied() {
            if nodes[n - lo].scheduled == Some(t) && alive[n] {
                break;
            }
            self.timers.pop();
        }
        let ev = self.queue.peek().map(|Reverse((t, ..))| start + Duration::from_nanos(*t));
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        match (ev, timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What every thread reads and none changes during a window.
struct Ctx<'a> {
    start: Instant,
    cfg: &'a MeshConfig,
    alive: &'a [bool],
    island: &'a [u32],
    overrides: &'a FxMap<(NodeId, NodeId), bool>,
    paths: &'a (dyn Fn(NodeId, NodeId) -> PathParams + Send + Sync),
    /// Nodes per part (the last part may have fewer).
    chunk: usize,
}

impl Ctx<'_> {
    fn path(&self, a: NodeId, b: NodeId) -> PathParams {
        let (a, b) = pair(a, b);
        (self.paths)(a, b)
    }

    fn link_up(&self, a: NodeId, b: NodeId) -> bool {
        if a == b {
            return true;
        }
        if self.island[a] != self.island[b] {
            return false;
        }
        let k = pair(a, b);
        match self.overrides.get(&k) {
            Some(up) => *up,
            None => !(self.paths)(k.0, k.1).broken,
        }
    }

    fn path_up(&self, a: NodeId, b: NodeId) -> bool {
        self.alive[a] && self.alive[b] && self.link_up(a, b)
    }

    /// The path between `node` (number `me`) and `peer`, from the node's
    /// cache.
    fn cached_path(&self, node: &mut Node, me: NodeId, peer: NodeId) -> PathParams {
        *node.paths.entry(peer).or_insert_with(|| self.path(me, peer))
    }

    /// [`Ctx::cached_path`] for what the node sends into its tunnel `id`.
    fn tunnel_path(&self, node: &mut Node, me: NodeId, peer: NodeId, id: TunnelId) -> PathParams {
        let k = id as usize;
        if let Some(Some((q, p))) = node.by_tunnel.get(k)
            && *q == peer
        {
            return *p;
        }
        let p = self.cached_path(node, me, peer);
        // Ids are small (the lowest free one is taken).
        if k < 1024 {
            if node.by_tunnel.len() <= k {
                node.by_tunnel.resize(k + 1, None);
            }
            node.by_tunnel[k] = Some((peer, p));
        }
        p
    }

    /// [`Ctx::path_up`] for a path whose parameters say `broken`.
    fn up_with(&self, a: NodeId, b: NodeId, broken: bool) -> bool {
        if !(self.alive[a] && self.alive[b]) {
            return false;
        }
        if a == b {
            return true;
        }
        if self.island[a] != self.island[b] {
            return false;
        }
        match self.overrides.get(&pair(a, b)) {
            Some(up) => *up,
            None => !broken,
        }
    }

    fn is_nat(&self, i: NodeId) -> bool {
        self.cfg.nat.get(i).copied().unwrap_or(false)
    }

    /// Sends `ev` from `from`, due at `at`: into this part's queue, or the
    /// outbox if another part runs the node it happens at.
    fn push(&self, part: &mut Part, me: usize, from: &mut Node, from_id: NodeId, at: Instant, ev: Ev) {
        from.sent += 1;
        let key = ((at - self.start).as_nanos() as u64, from_id as u32, from.sent);
        if ev.at_node() / self.chunk == me {
            part.insert(key, ev);
        } else {
            part.outbox.push((key.0, key.1, key.2, ev));
        }
    }

    /// When a packet of `bytes` sent at `now` by `i` to `j` arrives, or
    /// `None` if the underlay loses it.
    fn transit(&self, node: &mut Node, i: NodeId, j: NodeId, bytes: u64, now: Instant) -> Option<Instant> {
        let p = self.cached_path(node, i, j);
        self.transit_on(node, i, j, &p, bytes, now)
    }

    /// [`Ctx::transit`] over path `p` (the path from `i` to `j`).
    fn transit_on(
        &self,
        node: &mut Node,
        i: NodeId,
        j: NodeId,
        p: &PathParams,
        bytes: u64,
        now: Instant,
    ) -> Option<Instant> {
        if !self.up_with(i, j, p.broken) {
            return None;
        }
        if p.loss > 0.0 && node.rng.next_f64() < p.loss {
            return None;
        }
        let mut depart = now;
        if let Some(Some(bw)) = self.cfg.uplink.get(i)
            && *bw > 0
        {
            depart = depart.max(node.busy_until) + Duration::from_secs_f64(bytes as f64 / *bw as f64);
            node.busy_until = depart;
        }
        let jitter = if p.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(node.rng.next_u64() % p.jitter.as_nanos().max(1) as u64)
        };
        Some(depart + p.latency + jitter)
    }

    /// Moves node `i`'s outputs onto the underlay and keeps its timer.
    /// `nodes` are part `me`'s, starting at node `lo`.
    fn after(&self, nodes: &mut [Node], lo: usize, me: usize, part: &mut Part, i: NodeId, now: Instant) {
        let node = &mut nodes[i - lo];
        while let Some(o) = node.core.poll_output() {
            match o {
                Output::ToTunnel { peer, packet, ids } => {
                    let Some(j) = node_in(&peer, self.alive.len()) else { continue };
                    part.stats.packets += 1;
                    part.stats.bytes += packet.len() as u64;
                    let wire = packet.len() as u64 + WIRE_OVERHEAD;
                    if is_control(&packet) {
                        node.traffic.control_tx_bytes += wire;
                        node.traffic.control_tx_packets += 1;
                    } else {
                        node.traffic.data_tx_bytes += wire;
                    }
                    let p = self.tunnel_path(node, i, j, ids.local);
                    match self.transit_on(node, i, j, &p, wire, now) {
                        Some(at) => {
                            let ev = Ev::Packet { from: i, to: j, broken: p.broken, ids, packet };
                            self.push(part, me, node, i, at, ev)
                        }
                        None => part.stats.lost += 1,
                    }
                }
                Output::ToTun(packet) => {
                    if let Ok(h) = packet::parse_ipv6(&packet)
                        && let Some(payload) = packet::udp_payload(&packet, &h, PROBE_PORT)
                        && payload.len() == 16
                    {
                        let from = u64::from_be_bytes(payload[..8].try_into().expect("8")) as usize;
                        let sent = u64::from_be_bytes(payload[8..].try_into().expect("8"));
                        part.delivered.push((from, i, self.start + Duration::from_micros(sent)));
                    }
                }
            }
        }
        while let Some(e) = node.core.poll_event() {
            match e {
                NodeEvent::Manager(Action::Connect { peer, .. }) => {
                    let Some(j) = node_in(&peer, self.alive.len()) else { continue };
                    node.traffic.control_tx_bytes += HANDSHAKE_BYTES.0;
                    node.traffic.control_tx_packets += 1;
                    if let Some(at) = self.transit(node, i, j, HANDSHAKE_BYTES.0, now) {
                        self.push(part, me, node, i, at, Ev::Handshake { from: i, to: j });
                    }
                }
                NodeEvent::SeqnoChanged(s) => node.seqno = s,
                _ => {}
            }
        }
        if !self.alive[i] {
            return;
        }
        let next = node.core.poll_timeout();
        if Some(next) != node.scheduled {
            node.scheduled = Some(next);
            part.timers.push(Reverse((next, i)));
        }
    }

    fn deliver(&self, nodes: &mut [Node], lo: usize, me: usize, part: &mut Part, ev: Ev, now: Instant) {
        match ev {
            Ev::Packet { from, to, broken, ids, packet } => {
                let node = &mut nodes[to - lo];
                if !self.up_with(from, to, broken) {
                    part.stats.lost += 1;
                    return;
                }
                if is_control(&packet) {
                    node.traffic.control_rx_bytes += packet.len() as u64 + WIRE_OVERHEAD;
                }
                node.core.from_tunnel_with(now, node_prefix(from), ids, packet);
                self.after(nodes, lo, me, part, to, now);
            }
            Ev::Handshake { from, to } => {
                if !self.path_up(from, to) || self.is_nat(to) {
                    return;
                }
                let node = &mut nodes[to - lo];
                node.traffic.control_rx_bytes += HANDSHAKE_BYTES.0;
                if node.core.accept_incoming(now, node_prefix(from)) {
                    node.core.tunnel_up(now, node_prefix(from));
                    node.traffic.control_tx_bytes += HANDSHAKE_BYTES.1;
                    node.traffic.control_tx_packets += 1;
                    self.after(nodes, lo, me, part, to, now);
                    let node = &mut nodes[to - lo];
                    if let Some(at) = self.transit(node, to, from, HANDSHAKE_BYTES.1, now) {
                        self.push(part, me, node, to, at, Ev::HandshakeDone { from, to });
                    }
                } else {
                    self.after(nodes, lo, me, part, to, now);
                }
            }
            Ev::HandshakeDone { from, to } => {
                if self.path_up(from, to) {
                    let node = &mut nodes[from - lo];
                    node.traffic.control_rx_bytes += HANDSHAKE_BYTES.1;
                    node.core.tunnel_up(now, node_prefix(to));
                    self.after(nodes, lo, me, part, from, now);
                }
            }
        }
    }

    /// Runs part `me`'s events and timers due at or before `until`, in
    /// order.
    fn run_part(
        &self,
        nodes: &mut [Node],
        lo: usize,
        me: usize,
        part: &mut Part,
        mut now: Instant,
        until: Instant,
    ) {
        while let Some(next) = part.next_due(self.start, nodes, lo, self.alive) {
            if next > until {
                break;
            }
            now = now.max(next);
            let ev_due = part.queue.peek().map(|Reverse((t, ..))| self.start + Duration::from_nanos(*t));
            if ev_due == Some(next) {
                let Reverse((_, _, _, slot)) = part.queue.pop().expect("event");
                let ev = part.pending[slot as usize].take().expect("pending event");
                part.free.push(slot);
                part.warm_next_slot();
                self.deliver(nodes, lo, me, part, ev, now);
            } else {
                let Reverse((_, i)) = part.timers.pop().expect("timer");
                let node = &mut nodes[i - lo];
                node.scheduled = None;
                node.core.handle_timeout(now);
                self.after(nodes, lo, me, part, i, now);
            }
            part.warm_next_packet(nodes, lo);
        }
    }
}

/// Moves every part's outbox into the queues of the parts the events are
/// for, and gathers counters and probes.
fn hand_over<P: std::borrow::BorrowMut<Part>>(
    parts: &mut [P],
    chunk: usize,
    stats: &mut MeshStats,
    delivered: &mut Vec<(NodeId, NodeId, Instant)>,
) {
    for p in 0..parts.len() {
        let part = parts[p].borrow_mut();
        let out = std::mem::take(&mut part.outbox);
        let s = std::mem::take(&mut part.stats);
        delivered.append(&mut part.delivered);
        stats.packets += s.packets;
        stats.bytes += s.bytes;
        stats.lost += s.lost;
        for (t, from, seq, ev) in out {
            let to = ev.at_node() / chunk;
            parts[to].borrow_mut().insert((t, from, seq), ev);
        }
    }
}

/// A part to run for a window, on whichever thread takes it.
struct Job<'a> {
    k: usize,
    nodes: &'a mut [Node],
    part: Part,
    now: Instant,
    end: Instant,
}

/// The parts of a window, waiting for threads.
#[derive(Default)]
struct WorkQueue<'a> {
    jobs: std::sync::Mutex<(Vec<Job<'a>>, bool)>,
    ready: std::sync::Condvar,
    /// Bumped whenever jobs come or the queue closes: an idle thread
    /// watches it for a moment before it sleeps on `ready`.
    signal: std::sync::atomic::AtomicU64,
}

/// How long an idle simulation thread keeps watching for work before it
/// sleeps, and the coordinating thread for finished parts. A window lasts
/// a few hundred microseconds in a steady mesh, and waking a sleeping
/// thread (a futex, an interrupt between virtual CPUs) cost a good part of
/// one: the threads sat idle a sixth of the time.
const SPIN: Duration = Duration::from_micros(200);

/// Calls `ready` until it gives something or [`SPIN`] has passed.
fn spin_for<T>(mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(x) = ready() {
            return Some(x);
        }
        if start.elapsed() > SPIN {
            return None;
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
    }
}

impl<'a> WorkQueue<'a> {
    fn give(&self, jobs: Vec<Job<'a>>) {
        let mut q = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        q.0.extend(jobs);
        self.signal.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.ready.notify_all();
    }

    /// The next job; `wait`: until there is one or the queue is closed.
    fn take(&self, wait: bool) -> Option<Job<'a>> {
        use std::sync::atomic::Ordering;
        let mut q = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut spun = false;
        loop {
            if let Some(j) = q.0.pop() {
                return Some(j);
            }
            if q.1 || !wait {
                return None;
            }
            if spun {
                q = self.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            } else {
                // Watch for the next window's jobs before sleeping.
                let seen = self.signal.load(Ordering::Acquire);
                drop(q);
                spin_for(|| (self.signal.load(Ordering::Acquire) != seen).then_some(()));
                spun = true;
                q = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn close(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.signal.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.ready.notify_all();
    }
}

/// Closes the queue if the thread holding it panics.
struct CloseOnPanic<'q, 'a>(&'q WorkQueue<'a>);

impl Drop for CloseOnPanic<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close();
        }
    }
}

/// Fewer walks than this per thread are not worth a thread.
const WALKS_PER_THREAD: usize = 500;

/// Parts of the nodes per simulation thread (see [`MeshSim`]).
const PARTS_PER_THREAD: usize = 8;

/// The simulation. See the module documentation.
///
/// Parallel: the nodes are shared out to parts (eight per thread of
/// [`MeshConfig::threads`]), each run by whichever thread is free, in windows of virtual time no longer than the
/// shortest underlay latency (the *lookahead*): nothing a node sends within
/// a window can reach another node before the window ends, so parts run a
/// window independently and hand each other their packets in between.
/// Events are ordered by (time, sender, sender's count) and every node
/// draws loss and jitter from its own generator, so a run gives the same
/// result whatever the number of threads.
pub struct MeshSim {
    start: Instant,
    now: Instant,
    cfg: MeshConfig,
    nodes: Vec<Node>,
    alive: Vec<bool>,
    parts: Vec<Part>,
    /// Threads that run the parts.
    threads: usize,
    /// Nodes per part.
    chunk: usize,
    /// The shortest underlay latency of any path (zero: one part only).
    lookahead: Duration,
    paths: Box<dyn Fn(NodeId, NodeId) -> PathParams + Send + Sync>,
    /// Paths set up or down by hand, overriding [`PathParams::broken`].
    overrides: FxMap<(NodeId, NodeId), bool>,
    /// Partition island of each node: paths between islands are down.
    island: Vec<u32>,
    /// [`MeshConfig::silent`], shared by the nodes' tunnel managers.
    silent_set: Option<Arc<Vec<bool>>>,
    /// Probes delivered: (from, to, sent at).
    delivered: Vec<(NodeId, NodeId, Instant)>,
    /// Counters of the underlay.
    pub stats: MeshStats,
    rng: Rng,
    /// The last walk of each pair [`MeshSim::check_walks`] was asked for.
    walk_cache: FxMap<(NodeId, NodeId), CachedWalk>,
    /// Bumped by whatever changes the underlay or replaces a node's core:
    /// every cached walk is then stale.
    walk_epoch: u64,
    /// Walks [`MeshSim::check_walks`] took from the cache, not redone.
    pub walks_reused: u64,
}

/// A walk, and what it depended on: the simulation's `walk_epoch` then,
/// and the forwarding-table generation of each node it looked up.
struct CachedWalk {
    walk: Walk,
    epoch: u64,
    tables: Vec<(NodeId, u64)>,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

/// Builds the read-only context from the simulation's fields (a macro, so
/// that the borrows stay field by field).
macro_rules! ctx {
    ($s:expr) => {
        Ctx {
            start: $s.start,
            cfg: &$s.cfg,
            alive: &$s.alive,
            island: &$s.island,
            overrides: &$s.overrides,
            paths: &*$s.paths,
            chunk: $s.chunk,
        }
    };
}

impl MeshSim {
    /// `n` nodes with `manager` parameters; `latency(a, b)` gives the
    /// one-way latency of the underlay path between two nodes. Every node
    /// starts knowing every other one (as if the registry's bootstrap list
    /// held them all).
    pub fn new(
        n: usize,
        manager: ManagerConfig,
        latency: impl Fn(NodeId, NodeId) -> Duration + Send + Sync + 'static,
        seed: u64,
    ) -> Self {
        Self::with_config(MeshConfig::new(n, manager), move |a, b| PathParams::latency(latency(a, b)), seed)
    }

    /// A mesh built as `cfg` says, over an underlay whose path between `a`
    /// and `b` is `paths(a, b)` (called with `a < b`; it must be a pure
    /// function of its arguments for the run to be deterministic).
    pub fn with_config(
        cfg: MeshConfig,
        paths: impl Fn(NodeId, NodeId) -> PathParams + Send + Sync + 'static,
        seed: u64,
    ) -> Self {
        let n = cfg.nodes;
        let start = Instant::now();
        let mut rng = Rng::new(seed);
        let seqnos: Vec<u16> = (0..n).map(|_| (rng.next_u64() & 0xffff) as u16).collect();
        let threads = match cfg.threads {
            0 => std::thread::available_parallelism().map_or(1, |t| t.get()).min(n / 100).max(1),
            t => t.min(n.max(1)),
        };
        // The lookahead: the shortest latency of any path (O(n²) calls, so
        // only when there is more than one thread to share the work).
        let mut lookahead = Duration::MAX;
        if threads > 1 {
            for a in 0..n {
                for b in a + 1..n {
                    lookahead = lookahead.min(paths(a, b).latency);
                }
            }
        }
        // Windows of a nanosecond or two would cost more than they give.
        let threads = if lookahead < Duration::from_micros(100) { 1 } else { threads };
        // Eight parts per thread, taken in turn by whichever thread is free:
        // a window's work comes in bursts (a node's full update lands on its
        // twenty neighbours at once), and fixed halves waited on each other.
        let parts = if threads > 1 { (threads * PARTS_PER_THREAD).min(n) } else { 1 };
        let chunk = n.div_ceil(parts).max(1);
        let mut sim = MeshSim {
            start,
            now: start,
            alive: (0..n).map(|i| !cfg.initially_down.get(i).copied().unwrap_or(false)).collect(),
            nodes: Vec::with_capacity(n),
            parts: (0..n.div_ceil(chunk).max(1)).map(|_| Part::default()).collect(),
            threads,
            chunk,
            lookahead: if parts > 1 { lookahead } else { Duration::ZERO },
            paths: Box::new(paths),
            overrides: FxMap::default(),
            island: vec![0; n],
            silent_set: None,
            delivered: Vec::new(),
            stats: MeshStats::default(),
            walk_cache: FxMap::default(),
            walk_epoch: 0,
            walks_reused: 0,
            rng,
            cfg,
        };
        for (i, seqno) in seqnos.into_iter().enumerate() {
            let core = sim.make_core(i, seqno);
            let rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            sim.nodes.push(Node {
                core,
                scheduled: None,
                busy_until: start,
                traffic: NodeTraffic::default(),
                seqno,
                rng,
                sent: 0,
                paths: FxMap::default(),
                by_tunnel: Vec::new(),
            });
        }
        for i in 0..n {
            if sim.alive[i] {
                sim.after(i);
            }
        }
        sim
    }

    /// Threads the simulation runs on (1 when the underlay has paths of
    /// (almost) no latency, or few nodes).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// A fresh core for node `i` (its seed depends on the node and on how
    /// often it started, so that a restarted node chooses anew).
    fn make_core(&mut self, i: NodeId, seqno: u16) -> NodeCore {
        let n = self.cfg.nodes;
        let mut id = [0u8; 8];
        id[0] = 2;
        id[4..].copy_from_slice(&(i as u32 + 1).to_be_bytes());
        let mut cfg = NodeConfig::new(node_prefix(i), network(), RouterId(id), seqno);
        cfg.manager = self.cfg.manager.clone();
        cfg.hello_interval = self.cfg.hello_interval;
        cfg.update_interval = self.cfg.update_interval;
        cfg.seed = self.rng.next_u64();
        cfg.announce = !self.cfg.silent.get(i).copied().unwrap_or(false);
        let mut core = NodeCore::new(cfg, self.now);
        if self.cfg.silent.iter().any(|s| *s) {
            let silent = self.silent_set.get_or_insert_with(|| Arc::new(self.cfg.silent.clone())).clone();
            core.manager().set_announcing(Announcing(Arc::new(move |p: &Ipv6Net| {
                node_id(p).is_none_or(|i| !silent.get(i).copied().unwrap_or(false))
            })));
        }
        let endpoint =
            |j: NodeId| (node_prefix(j), vec![std::net::SocketAddr::from(([192, 0, 2, 1], j as u16))]);
        if self.cfg.bootstrap == 0 || self.cfg.bootstrap >= n - 1 {
            core.manager().add_candidates((0..n).filter(|&j| j != i).map(endpoint));
        } else {
            // A bootstrap list: distinct random peers, from the node's own
            // generator (restarts draw another list, as from a registry).
            let mut rng = Rng::new(self.rng.next_u64());
            let mut picked = std::collections::BTreeSet::new();
            while picked.len() < self.cfg.bootstrap {
                let j = rng.below(n);
                if j != i {
                    picked.insert(j);
                }
            }
            core.manager().add_candidates(picked.into_iter().map(endpoint));
        }
        core
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// A node's core.
    pub fn node(&self, i: NodeId) -> &NodeCore {
        &self.nodes[i].core
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether node `i` is running.
    pub fn is_alive(&self, i: NodeId) -> bool {
        self.alive[i]
    }

    /// Whether node `i` is behind NAT (accepts no incoming tunnel).
    pub fn is_nat(&self, i: NodeId) -> bool {
        self.cfg.nat.get(i).copied().unwrap_or(false)
    }

    /// Whether node `i` announces its prefix (see [`MeshConfig::silent`]).
    pub fn announces(&self, i: NodeId) -> bool {
        !self.cfg.silent.get(i).copied().unwrap_or(false)
    }

    /// Node `i`'s traffic counters.
    pub fn traffic(&self, i: NodeId) -> NodeTraffic {
        self.nodes[i].traffic
    }

    /// The underlay path between two nodes, as configured (whatever its
    /// current up/down state).
    pub fn path(&self, a: NodeId, b: NodeId) -> PathParams {
        ctx!(self).path(a, b)
    }

    /// Breaks or heals the underlay path between two nodes.
    pub fn set_path(&mut self, a: NodeId, b: NodeId, up: bool) {
        self.walk_epoch += 1;
        self.overrides.insert(pair(a, b), up);
    }

    /// Forgets every [`MeshSim::set_path`]: paths are back to their
    /// configured state.
    pub fn reset_paths(&mut self) {
        self.walk_epoch += 1;
        self.overrides.clear();
    }

    /// Puts nodes in partition islands: paths between nodes of different
    /// islands are down. All zeros: no partition.
    pub fn set_islands(&mut self, island: Vec<u32>) {
        assert_eq!(island.len(), self.nodes.len(), "one island per node");
        self.walk_epoch += 1;
        self.island = island;
    }

    /// Whether the underlay path between two nodes works, ignoring whether
    /// the nodes run.
    pub fn link_up(&self, a: NodeId, b: NodeId) -> bool {
        ctx!(self).link_up(a, b)
    }

    /// Whether the underlay path between two nodes works (and both run).
    pub fn path_up(&self, a: NodeId, b: NodeId) -> bool {
        ctx!(self).path_up(a, b)
    }

    /// Breaks each path with probability `p` (seeded).
    pub fn break_random_paths(&mut self, p: f64) -> usize {
        self.walk_epoch += 1;
        let n = self.nodes.len();
        let mut k = 0;
        for a in 0..n {
            for b in a + 1..n {
                if self.rng.next_f64() < p {
                    self.overrides.insert((a, b), false);
                    k += 1;
                }
            }
        }
        k
    }

    /// Stops or resumes a node. A stopped node drops everything and its
    /// timers stop; resumed, it carries on with its old state (see
    /// [`MeshSim::restart`] for a node that starts afresh).
    pub fn set_alive(&mut self, i: NodeId, alive: bool) {
        let was = self.alive[i];
        self.walk_epoch += 1;
        self.alive[i] = alive;
        if alive && !was {
            self.nodes[i].scheduled = None;
            self.after(i);
        }
    }

    /// Starts node `i` afresh (a reboot, or a node joining): a new core that
    /// resumes the Babel seqno it last persisted and knows every other node.
    pub fn restart(&mut self, i: NodeId) {
        self.walk_epoch += 1;
        self.nodes[i].core = self.make_core(i, self.nodes[i].seqno);
        self.nodes[i].busy_until = self.now;
        self.alive[i] = false;
        self.set_alive(i, true);
    }

    /// Node `i` leaves the mesh gracefully: it closes its tunnels (the
    /// peers hear it at once) and stops.
    pub fn leave(&mut self, i: NodeId) {
        self.walk_epoch += 1;
        let now = self.now;
        let peers: Vec<Ipv6Net> = self.nodes[i].core.manager().tunnels().map(|(p, _, _)| p).collect();
        for p in peers {
            if let Some(j) = node_in(&p, self.nodes.len())
                && self.alive[j]
                && self.nodes[j].core.manager().tunnels().any(|(q, _, _)| q == node_prefix(i))
            {
                self.nodes[j].core.tunnel_down(now, node_prefix(i));
                self.after(j);
            }
        }
        self.alive[i] = false;
    }

    /// [`Ctx::after`] for one node, between windows.
    fn after(&mut self, i: NodeId) {
        let me = i / self.chunk;
        let lo = me * self.chunk;
        let hi = (lo + self.chunk).min(self.nodes.len());
        let ctx = ctx!(self);
        ctx.after(&mut self.nodes[lo..hi], lo, me, &mut self.parts[me], i, self.now);
        self.hand_over();
    }

    /// Moves every part's outbox into the queues of the parts the events
    /// are for, and gathers counters and probes.
    fn hand_over(&mut self) {
        hand_over(&mut self.parts, self.chunk, &mut self.stats, &mut self.delivered);
    }

    /// Runs `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        if self.threads > 1 && self.parts.len() > 1 {
            self.run_parallel(until);
        } else if let Some(next) = self.parts[0].next_due(self.start, &self.nodes, 0, &self.alive)
            && next <= until
        {
            // One part: no windows, everything due up to `until` at once.
            let ctx = ctx!(self);
            ctx.run_part(&mut self.nodes, 0, 0, &mut self.parts[0], self.now.max(next), until);
            self.hand_over();
        }
        self.now = until;
    }

    /// [`MeshSim::run_for`] on several threads, until `until`: window after
    /// window, every part runs on whichever thread is free. The threads
    /// live as long as the call (a thread started per window cost about a
    /// twentieth of a large run: its start, and its allocator's clean-up at
    /// exit); the parts and their nodes move to them and back each window.
    fn run_parallel(&mut self, until: Instant) {
        let (start, chunk, lookahead) = (self.start, self.chunk, self.lookahead);
        // Each part's nodes, borrowed in place (split off and put back, they
        // were copied twice per call: a few megabytes, on one thread).
        let mut chunks: Vec<&mut [Node]> = self.nodes.chunks_mut(chunk).collect();
        chunks.resize_with(self.parts.len(), || &mut []);
        let parts = std::mem::take(&mut self.parts);
        let mut slots: Vec<Option<(&mut [Node], Part)>> = chunks.into_iter().zip(parts).map(Some).collect();
        let queue = WorkQueue::default();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Job>();
        let ctx = ctx!(self);
        let (stats, delivered, sim_now) = (&mut self.stats, &mut self.delivered, &mut self.now);
        // The threads log where the caller's thread does (e.g. nowhere:
        // `sixmesh sim` silences the nodes).
        let logs = tracing::dispatcher::get_default(|d| d.clone());
        std::thread::scope(|s| {
            for _ in 1..self.threads {
                let (queue, ctx, logs, done) = (&queue, &ctx, &logs, done_tx.clone());
                s.spawn(move || {
                    // A panicking thread closes the queue: the others stop,
                    // and the caller, short of a part, panics too.
                    let _guard = CloseOnPanic(queue);
                    tracing::dispatcher::with_default(logs, || {
                        while let Some(mut job) = queue.take(true) {
                            ctx.run_part(job.nodes, job.k * chunk, job.k, &mut job.part, job.now, job.end);
                            if done.send(job).is_err() {
                                return;
                            }
                        }
                    })
                });
            }
            drop(done_tx);
            let _guard = CloseOnPanic(&queue);
            loop {
                // Start the window at the next thing due anywhere.
                let next = slots
                    .iter_mut()
                    .enumerate()
                    .filter_map(|(k, slot)| {
                        let (nodes, part) = slot.as_mut().expect("every part is back");
                        part.next_due(start, nodes, k * chunk, ctx.alive)
                    })
                    .min();
                let Some(next) = next.filter(|t| *t <= until) else { break };
                let now = (*sim_now).max(next);
                // Anything sent at `now` or later arrives after `end`.
                let end = (now + lookahead - Duration::from_nanos(1)).min(until);
                let mut jobs: Vec<Job> = slots
                    .iter_mut()
                    .enumerate()
                    .map(|(k, slot)| {
                        let (nodes, part) = slot.take().expect("every part is back");
                        Job { k, nodes, part, now, end }
                    })
                    .collect();
                // Largest first (threads take from the end): the events in
                // flight to a part are a fair guess at its work, and a big
                // part taken last kept the other thread waiting.
                jobs.sort_by_key(|j| j.part.queue.len());
                let mut missing = jobs.len();
                queue.give(jobs);
                // This thread works too, then waits for the rest.
                while let Some(mut job) = queue.take(false) {
                    ctx.run_part(job.nodes, job.k * chunk, job.k, &mut job.part, job.now, job.end);
                    slots[job.k] = Some((job.nodes, job.part));
                    missing -= 1;
                }
                while missing > 0 {
                    let job = match spin_for(|| done_rx.try_recv().ok()) {
                        Some(job) => job,
                        None => done_rx.recv().expect("a simulation thread panicked"),
                    };
                    slots[job.k] = Some((job.nodes, job.part));
                    missing -= 1;
                }
                let mut parts: Vec<&mut Part> =
                    slots.iter_mut().map(|s| &mut s.as_mut().expect("back").1).collect();
                hand_over(&mut parts, chunk, stats, delivered);
                *sim_now = end;
                if end >= until {
                    break;
                }
            }
            queue.close();
        });
        self.parts.extend(slots.into_iter().map(|s| s.expect("every part is back").1));
    }

    /// Sends a probe from node `a`'s machine to node `b`'s mesh address.
    pub fn probe(&mut self, a: NodeId, b: NodeId) {
        let mut payload = (a as u64).to_be_bytes().to_vec();
        payload.extend((self.elapsed().as_micros() as u64).to_be_bytes());
        let p = packet::build_udp(mesh_address(a), mesh_address(b), PROBE_PORT, 64, &payload);
        self.nodes[a].core.from_tun(self.now, p);
        self.after(a);
    }

    /// Probes every ordered pair of running nodes, waits `wait`, and returns
    /// the pairs whose probe did not arrive.
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

    /// Follows the forwarding tables from node `a` towards node `b`'s mesh
    /// address, as a packet would (the same longest-prefix match), checking
    /// at each hop that the underlay path works. No packet is sent and
    /// nothing changes.
    pub fn walk(&self, a: NodeId, b: NodeId) -> Walk {
        self.walk_traced(a, b).0
    }

    /// [`MeshSim::walk`], and the nodes whose forwarding tables it read.
    fn walk_traced(&self, a: NodeId, b: NodeId) -> (Walk, Vec<NodeId>) {
        let dst = mesh_address(b);
        let mut path = vec![a];
        let mut cur = a;
        let mut latency = Duration::ZERO;
        while cur != b {
            let Some(peer) = self.nodes[cur].core.route(dst) else {
                return (Walk::NoRoute { at: cur }, path);
            };
            let Some(next) = node_in(&peer, self.nodes.len()) else {
                return (Walk::NoRoute { at: cur }, path);
            };
            // One call of the path function per hop (it hashes and converts:
            // the walks of a large run's samples showed it in profiles).
            let p = self.path(cur, next);
            if !ctx!(self).up_with(cur, next, p.broken) {
                return (Walk::PathDown { at: cur, next }, path);
            }
            if let Some(k) = path.iter().position(|&x| x == next) {
                return (Walk::Loop { path: path[k..].to_vec() }, path);
            }
            latency += p.latency;
            path.push(next);
            cur = next;
            if path.len() > 64 {
                // The hop limit would drop it: count it as a loop.
                return (Walk::Loop { path: path.clone() }, path);
            }
        }
        (Walk::Reached { hops: path.len() - 1, latency }, path)
    }

    /// [`MeshSim::walks`] for the samples of a run, which ask for the same
    /// pairs again and again: a pair's last walk is given again while
    /// nothing it depended on changed (the underlay, and the forwarding
    /// table of every node it went through), the others are walked anew.
    /// The same walks as [`MeshSim::walks`], without a cold table lookup
    /// per hop for the paths that did not change (most, between events).
    pub fn check_walks(&mut self, pairs: &[(NodeId, NodeId)]) -> Vec<Walk> {
        let generation: Vec<u64> = self.nodes.iter().map(|n| n.core.fib_generation()).collect();
        let epoch = self.walk_epoch;
        let mut out: Vec<Option<Walk>> = pairs
            .iter()
            .map(|k| {
                self.walk_cache
                    .get(k)
                    .filter(|c| c.epoch == epoch && c.tables.iter().all(|&(i, g)| generation[i] == g))
                    .map(|c| c.walk.clone())
            })
            .collect();
        let todo: Vec<(NodeId, NodeId)> =
            pairs.iter().zip(&out).filter(|(_, w)| w.is_none()).map(|(k, _)| *k).collect();
        self.walks_reused += (pairs.len() - todo.len()) as u64;
        let done = self.share_out(&todo, WALKS_PER_THREAD, |&(a, b)| self.walk_traced(a, b));
        let mut done = todo.into_iter().zip(done);
        for w in out.iter_mut().filter(|w| w.is_none()) {
            let Some((k, (walk, path))) = done.next() else { break };
            let tables = path.into_iter().map(|i| (i, generation[i])).collect();
            self.walk_cache.insert(k, CachedWalk { walk: walk.clone(), epoch, tables });
            *w = Some(walk);
        }
        out.into_iter().map(|w| w.expect("walked")).collect()
    }

    /// [`MeshSim::walk`] for each pair, shared out to the simulation's
    /// threads when there are many (a run samples thousands of pairs every
    /// virtual second, while the other threads would wait).
    pub fn walks(&self, pairs: &[(NodeId, NodeId)]) -> Vec<Walk> {
        self.share_out(pairs, WALKS_PER_THREAD, |&(a, b)| self.walk(a, b))
    }

    /// `f` of each item, in order, shared out to the simulation's threads
    /// when each would get at least `min_each` items.
    fn share_out<T: Sync, R: Send>(
        &self,
        items: &[T],
        min_each: usize,
        f: impl Fn(&T) -> R + Sync,
    ) -> Vec<R> {
        if self.threads < 2 || items.len() < min_each.max(1) * 2 {
            return items.iter().map(f).collect();
        }
        let per = items.len().div_ceil(self.threads);
        let f = &f;
        std::thread::scope(|s| {
            let parts: Vec<_> =
                items.chunks(per).map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<_>>())).collect();
            parts.into_iter().flat_map(|p| p.join().expect("a simulation thread panicked")).collect()
        })
    }

    /// The connected components of the underlay among running nodes (a
    /// component id per node; `u32::MAX` for nodes that do not run). Two
    /// nodes in the same component can reach each other, possibly through
    /// others, whatever the tunnels.
    pub fn underlay_components(&self) -> Vec<u32> {
        components(self.nodes.len(), |i| self.alive[i], |a, b| self.link_up(a, b))
    }

    /// The lowest underlay latency from `a` to every node, over working
    /// paths and through any running nodes (`None`: unreachable). Costs
    /// O(n²) calls of the path function.
    pub fn underlay_distances(&self, a: NodeId) -> Vec<Option<Duration>> {
        distances(
            self.nodes.len(),
            a,
            |i| self.alive[i],
            |u, v| self.link_up(u, v).then(|| self.path(u, v).latency),
        )
    }

    /// [`MeshSim::underlay_distances`] from each of `sources`, sharing the
    /// work: the latency of every working path computed once (for several
    /// sources in a mesh of up to 2,048 nodes: each search asked the path
    /// function for every pair, twice), the searches shared out to the
    /// simulation's threads.
    pub fn underlay_distances_from(&self, sources: &[NodeId]) -> Vec<Vec<Option<Duration>>> {
        let n = self.nodes.len();
        let matrix: Option<Vec<u64>> = (sources.len() > 1 && n <= 2048).then(|| {
            let mut m = vec![u64::MAX; n * n];
            for u in 0..n {
                for v in u + 1..n {
                    if self.link_up(u, v) {
                        let d = u64::try_from(self.path(u, v).latency.as_nanos()).unwrap_or(u64::MAX - 1);
                        m[u * n + v] = d;
                        m[v * n + u] = d;
                    }
                }
            }
            m
        });
        let one = |a: NodeId| match &matrix {
            Some(m) => distances(
                n,
                a,
                |i| self.alive[i],
                |u, v| (m[u * n + v] != u64::MAX).then(|| Duration::from_nanos(m[u * n + v])),
            ),
            None => self.underlay_distances(a),
        };
        self.share_out(sources, 1, |&a| one(a))
    }

    /// Tunnels that are up at both ends, as (a, b) with a < b.
    pub fn tunnel_graph(&mut self) -> Vec<(NodeId, NodeId)> {
        let mut edges = HashSet::new();
        for i in 0..self.nodes.len() {
            if !self.alive[i] {
                continue;
            }
            let peers: Vec<Ipv6Net> =
                self.nodes[i].core.manager().tunnels().filter(|(_, _, up)| *up).map(|(p, _, _)| p).collect();
            for p in peers {
                if let Some(j) = node_in(&p, self.nodes.len())
                    && self.alive[j]
                {
                    edges.insert(pair(i, j));
                }
            }
        }
        let mut v: Vec<_> = edges.into_iter().collect();
        v.sort();
        v
    }
}

/// The connected components of an underlay of `n` nodes among the ones
/// `alive` (a component id per node; `u32::MAX` for the others), given
/// which direct paths are up.
pub fn components(
    n: usize,
    alive: impl Fn(NodeId) -> bool,
    link_up: impl Fn(NodeId, NodeId) -> bool,
) -> Vec<u32> {
    let mut comp = vec![u32::MAX; n];
    let mut unvisited: Vec<NodeId> = (0..n).filter(|&i| alive(i)).collect();
    let mut next_id = 0;
    while let Some(root) = unvisited.pop() {
        comp[root] = next_id;
        let mut queue = VecDeque::from([root]);
        while let Some(u) = queue.pop_front() {
            let mut rest = Vec::with_capacity(unvisited.len());
            for v in unvisited.drain(..) {
                if link_up(u, v) {
                    comp[v] = next_id;
                    queue.push_back(v);
                } else {
                    rest.push(v);
                }
            }
            unvisited = rest;
        }
        next_id += 1;
    }
    comp
}

/// The lowest latency from `a` to every node of an underlay of `n` nodes,
/// through the ones `alive`; `latency(u, v)` is `None` for a path that is
/// down. Dijkstra in O(n²).
pub fn distances(
    n: usize,
    a: NodeId,
    alive: impl Fn(NodeId) -> bool,
    latency: impl Fn(NodeId, NodeId) -> Option<Duration>,
) -> Vec<Option<Duration>> {
    let mut dist: Vec<Option<Duration>> = vec![None; n];
    let mut done = vec![false; n];
    dist[a] = Some(Duration::ZERO);
    loop {
        let mut best: Option<(Duration, NodeId)> = None;
        for v in 0..n {
            if !done[v]
                && let Some(d) = dist[v]
                && best.is_none_or(|(bd, _)| d < bd)
            {
                best = Some((d, v));
            }
        }
        let Some((d, u)) = best else { break };
        done[u] = true;
        if !alive(u) {
            continue;
        }
        for v in 0..n {
            if done[v] || !alive(v) {
                continue;
            }
            let Some(l) = latency(u, v) else { continue };
            let nd = d + l;
            if dist[v].is_none_or(|old| nd < old) {
                dist[v] = Some(nd);
            }
        }
    }
    dist
}

/// Whether an inner packet is control traffic: link-local or multicast
/// destination (Babel, gossip), as opposed to data between mesh addresses.
fn is_control(p: &[u8]) -> bool {
    p.len() >= 40 && (p[24] == 0xff || (p[24] == 0xfe && p[25] & 0xc0 == 0x80))
}

/// UDP port of the simulator's reachability probes.
pub const PROBE_PORT: u16 = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_packets_are_told_from_data() {
        let babel =
            packet::build_udp("fe80::1".parse().unwrap(), "ff02::1:6".parse().unwrap(), 6696, 1, b"x");
        let data = packet::build_udp(mesh_address(1), mesh_address(2), 7, 64, b"x");
        assert!(is_control(&babel));
        assert!(!is_control(&data));
    }

    /// The path of what a node sends into a tunnel, cached by the tunnel's
    /// id, is that peer's path, also once the id is another peer's.
    #[test]
    fn paths_by_tunnel_id_follow_the_peer() {
        let paths =
            |a: NodeId, b: NodeId| PathParams::latency(Duration::from_micros(100 * (a * 10 + b) as u64 + 1));
        let mut sim = MeshSim::with_config(MeshConfig::new(4, ManagerConfig::default()), paths, 1);
        let expected: Vec<PathParams> = (1..4).map(|j| sim.path(0, j)).collect();
        let ctx = ctx!(sim);
        let node = &mut sim.nodes[0];
        assert_eq!(ctx.tunnel_path(node, 0, 1, 1), expected[0]);
        assert_eq!(ctx.tunnel_path(node, 0, 1, 1), expected[0], "cached");
        // Tunnel 1 now goes to node 2; tunnel 3 to node 1; a huge id too.
        assert_eq!(ctx.tunnel_path(node, 0, 2, 1), expected[1]);
        assert_eq!(ctx.tunnel_path(node, 0, 1, 3), expected[0]);
        assert_eq!(ctx.tunnel_path(node, 0, 3, u32::MAX), expected[2]);
        assert_eq!(ctx.tunnel_path(node, 0, 2, 1), expected[1]);
        assert!(node.by_tunnel.len() <= 4);
    }

    /// The shared searches give what one search per source gives: with
    /// broken paths, a path set down by hand, a node down, on one thread
    /// and on two.
    #[test]
    fn distances_from_many_sources_match_one_by_one() {
        for threads in [1, 2] {
            let mut cfg = MeshConfig::new(70, ManagerConfig::default());
            cfg.threads = threads;
            let paths = |a: NodeId, b: NodeId| {
                let h = (a as u64 * 7919 + b as u64 * 104_729) % 97;
                PathParams { broken: h < 9, ..PathParams::latency(Duration::from_micros(500 + 37 * h)) }
            };
            let mut sim = MeshSim::with_config(cfg, paths, 3);
            sim.set_path(1, 2, false);
            sim.set_path(3, 4, true);
            sim.set_alive(5, false);
            let sources = [0, 1, 5, 9, 33, 69];
            let many = sim.underlay_distances_from(&sources);
            for (&a, d) in sources.iter().zip(&many) {
                assert_eq!(*d, sim.underlay_distances(a), "from {a}, {threads} threads");
            }
            assert!(many[0].iter().filter(|d| d.is_some()).count() > 60);
            assert!(many[2].iter().all(Option::is_none) || many[2][5] == Some(Duration::ZERO));
        }
    }
}
