//! The node's sans-IO core: Babel inside every tunnel, the tunnel manager,
//! and user-space forwarding by longest-prefix match over the routes Babel
//! selected. Encryption is not its business: it hands inner IPv6 packets to
//! the driver per peer ([`Output::ToTunnel`]), and the driver runs one
//! WireGuard session per peer. netsim drives this same core with simulated
//! tunnels.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use sixmesh_routing::BABEL_PORT;
use sixmesh_routing::core::{
    Destination, Event, FxMap, InterfaceConfig, LinkKind, Payload, Router, RttConfig, prefetch,
};
use sixmesh_routing::wire::RouterId;

use crate::fib::Fib;
use crate::manager::{Action, ManagerConfig, PeerId, TunnelManager};
use crate::packet::{self, Ipv6Header};

/// ff02::1:6.
const BABEL_GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 6);

/// UDP port of sixmesh's own messages between tunnel neighbours (peer
/// records, network-config versions), link-local inside the tunnel.
pub const GOSSIP_PORT: u16 = 6697;

/// Babel's id of a tunnel (its interface number in the router).
pub type TunnelId = u32;

/// A tunnel's ids at both ends, like WireGuard's sender and receiver
/// indices: the sending node's own and the one the far end gave last
/// ([`TunnelIds::UNKNOWN`] until it did). A driver that carries them with
/// each packet (the simulator does) lets the far end find its tunnel by
/// index instead of hashing the peer's prefix; a wrong or unknown index
/// only costs that lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelIds {
    /// The sender's id of the tunnel.
    pub local: TunnelId,
    /// The receiver's id of the tunnel, as the sender last heard it.
    pub remote: TunnelId,
}

impl TunnelIds {
    /// Nothing known (a packet from a driver that does not carry ids).
    pub const UNKNOWN: TunnelIds = TunnelIds { local: TunnelId::MAX, remote: TunnelId::MAX };
}

/// Settings of the node core.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's prefix (from its certificate).
    pub prefix: Ipv6Net,
    /// The whole network's prefix: nothing outside it is routed.
    pub network: Ipv6Net,
    pub router_id: RouterId,
    /// Where Babel's seqno resumes (persisted across restarts).
    pub seqno: u16,
    /// Babel Hello interval on tunnels: a dead tunnel is noticed after
    /// 1.5–2.5 of them.
    pub hello_interval: Duration,
    /// Babel full-update interval on tunnels.
    pub update_interval: Duration,
    /// RTT-based cost on tunnels (babeld's `type tunnel` parameters by default).
    pub rtt: Option<RttConfig>,
    pub manager: ManagerConfig,
    /// Seed of the tunnel manager's random choices.
    pub seed: u64,
    /// Whether the node announces its prefix in Babel (always, in a real
    /// mesh; a simulation of a very large mesh may route to a sample of
    /// the nodes only, see netsim's `[nodes] destinations`).
    pub announce: bool,
}

impl NodeConfig {
    /// Defaults for a node with this prefix in this network: Hellos every
    /// 0.5 s (so a dead tunnel is noticed in at most ~1.25 s), full updates
    /// every 30 s.
    pub fn new(prefix: Ipv6Net, network: Ipv6Net, router_id: RouterId, seqno: u16) -> Self {
        NodeConfig {
            prefix,
            network,
            router_id,
            seqno,
            hello_interval: Duration::from_millis(500),
            update_interval: Duration::from_secs(30),
            rtt: Some(RttConfig::default()),
            manager: ManagerConfig::default(),
            seed: u64::from_be_bytes(router_id.0),
            announce: true,
        }
    }
}

/// The link-local address a node uses inside all its tunnels: fe80:: plus
/// the top 64 bits of its prefix (unique per node).
pub fn tunnel_link_local(prefix: &Ipv6Net) -> Ipv6Addr {
    let hi = (u128::from(prefix.network()) >> 64) as u64;
    Ipv6Addr::from((0xfe80u128 << 112) | u128::from(hi))
}

/// What the core wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// An inner IPv6 packet for the tunnel to `peer`, whose ids are `ids`.
    /// Its bytes may be shared with the same packet for other tunnels (a
    /// Babel full update goes out alike on every tunnel).
    ToTunnel { peer: PeerId, packet: Payload, ids: TunnelIds },
    /// A packet for this machine (write it to the TUN device).
    ToTun(Vec<u8>),
}

/// Where a data packet goes (see [`NodeCore::route_from_tunnel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Into the tunnel to this peer.
    Tunnel(PeerId),
    /// To this machine (the TUN device).
    Tun,
    /// Dropped (and counted).
    Dropped,
    /// A control packet (Babel, gossip) the core consumed.
    Taken,
}

/// Something the driver should know or act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// The tunnel manager's decisions.
    Manager(Action),
    /// Babel's seqno changed: persist it.
    SeqnoChanged(u16),
    /// The route to `prefix` now goes through `peer` (or nowhere).
    Route { prefix: Ipv6Net, via: Option<PeerId>, metric: u16 },
    /// A gossip message from a tunnel neighbour (see [`GOSSIP_PORT`]).
    Gossip { peer: PeerId, payload: Vec<u8> },
}

/// Why packets were dropped (counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Drops {
    pub not_ipv6: u64,
    pub no_route: u64,
    pub bad_source: u64,
    pub hop_limit: u64,
    pub no_tunnel: u64,
}

/// Traffic counters of one tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TunnelCounters {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

#[derive(Debug)]
struct Tunnel {
    id: TunnelId,
    /// The far end's id of this tunnel, as it last said ([`TunnelIds`]).
    remote: TunnelId,
    /// The router's [`Router::link_hint`] for this tunnel.
    link_hint: u32,
    /// A peer that does not speak Babel (e.g. a plain WireGuard peer): a
    /// fixed route to its prefix, no Babel, never closed for silence.
    fixed: bool,
    counters: TunnelCounters,
    /// Last time anything came out of this tunnel.
    last_rx: Instant,
}

impl Tunnel {
    fn ids(&self) -> TunnelIds {
        TunnelIds { local: self.id, remote: self.remote }
    }
}

/// The tunnels, in slots by id (the router's interface number; 0 is never
/// used; a new tunnel takes the lowest free id, so ids stay small and the
/// router finds its interfaces without hashing), found by peer through an
/// index. Every packet looks its tunnel up: by the id it carries, one
/// cache miss; by peer, the index's two more.
#[derive(Debug)]
struct Tunnels {
    slots: Vec<Option<(PeerId, Tunnel)>>,
    index: FxMap<PeerId, TunnelId>,
}

impl Tunnels {
    fn new() -> Self {
        Tunnels { slots: vec![None], index: FxMap::default() }
    }

    fn contains(&self, peer: &PeerId) -> bool {
        self.index.contains_key(peer)
    }

    fn id(&self, peer: &PeerId) -> Option<TunnelId> {
        self.index.get(peer).copied()
    }

    fn get(&self, peer: &PeerId) -> Option<&Tunnel> {
        let id = self.id(peer)?;
        self.slots[id as usize].as_ref().map(|(_, t)| t)
    }

    /// The tunnel to `peer`: at `id` if it is there, else looked up.
    fn find_mut(&mut self, peer: &PeerId, id: TunnelId) -> Option<&mut Tunnel> {
        let at = match self.slots.get(id as usize) {
            Some(Some((p, _))) if p == peer => id,
            _ => self.id(peer)?,
        };
        self.slots[at as usize].as_mut().map(|(_, t)| t)
    }

    /// Tunnel `id` and its peer.
    fn at(&self, id: TunnelId) -> Option<(PeerId, &Tunnel)> {
        self.slots.get(id as usize)?.as_ref().map(|(p, t)| (*p, t))
    }

    fn at_mut(&mut self, id: TunnelId) -> Option<(PeerId, &mut Tunnel)> {
        self.slots.get_mut(id as usize)?.as_mut().map(|(p, t)| (*p, t))
    }

    /// Adds a tunnel to `peer` (not there yet) at the lowest free id.
    fn insert(&mut self, now: Instant, peer: PeerId, fixed: bool) -> TunnelId {
        let id = self.slots.iter().skip(1).position(Option::is_none).map_or(self.slots.len(), |i| i + 1);
        if id == self.slots.len() {
            self.slots.push(None);
        }
        let id = id as TunnelId;
        let t = Tunnel {
            id,
            remote: TunnelId::MAX,
            link_hint: u32::MAX,
            fixed,
            counters: TunnelCounters::default(),
            last_rx: now,
        };
        self.slots[id as usize] = Some((peer, t));
        self.index.insert(peer, id);
        id
    }

    fn remove(&mut self, peer: &PeerId) -> Option<Tunnel> {
        let id = self.index.remove(peer)?;
        let t = self.slots[id as usize].take().map(|(_, t)| t);
        while self.slots.len() > 1 && self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        t
    }

    /// In id order.
    fn iter(&self) -> impl Iterator<Item = (PeerId, &Tunnel)> {
        self.slots.iter().flatten().map(|(p, t)| (*p, t))
    }
}

/// The node core. See the module documentation.
#[derive(Debug)]
pub struct NodeCore {
    cfg: NodeConfig,
    ll: Ipv6Addr,
    router: Router,
    manager: TunnelManager,
    /// Whether the manager may have changed since [`NodeCore::pump`] last
    /// took its actions and noted when it is due: every call that can
    /// change it goes through [`NodeCore::mgr`], which sets this. A Hello
    /// timer or packet then costs no look at the manager (a cache miss of
    /// its own: a few per cent of a large simulation).
    manager_touched: bool,
    /// When the manager is due, as of the last pump (only while untouched).
    manager_due: Instant,
    /// Whether the route counts or the manager's tunnels changed since they
    /// were last handed to the manager.
    counts_stale: bool,
    fib: Fib<PeerId>,
    /// Bumped whenever an entry of `fib` changes (see
    /// [`NodeCore::fib_generation`]).
    fib_generation: u64,
    /// How many destinations Babel routes through each peer (kept with the
    /// FIB; the tunnel manager's refresh drops the tunnel carrying fewest).
    route_counts: BTreeMap<PeerId, usize>,
    /// Looked up for every packet (iterated in peer order where the order
    /// shows).
    tunnels: Tunnels,
    outputs: VecDeque<Output>,
    events: VecDeque<NodeEvent>,
    next_housekeeping: Instant,
    drops: Drops,
    /// Tunnels being closed once traffic moved away: (when, peer, why).
    draining: Vec<(Instant, PeerId, &'static str)>,
}

/// Manager decisions that close a working tunnel on purpose: those drain
/// first (soft lock) so that traffic is not lost while routes move.
const DRAINED: [&str; 2] = ["refresh: fewest routes", "over the target"];
/// Babel cost of a draining tunnel.
const DRAIN_COST: u16 = 4096;

/// How often silent tunnels are looked for and route counts handed to the
/// tunnel manager.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

impl NodeCore {
    /// A node that announces its own prefix (unless `cfg.announce` is
    /// false) and has no tunnel yet.
    pub fn new(cfg: NodeConfig, now: Instant) -> Self {
        let mut router = Router::new(cfg.router_id, cfg.seqno, now);
        if cfg.announce {
            router.announce(now, cfg.prefix, None);
        }
        let manager = TunnelManager::new(cfg.prefix, cfg.manager.clone(), cfg.seed, now);
        NodeCore {
            ll: tunnel_link_local(&cfg.prefix),
            cfg,
            router,
            manager_due: manager.poll_timeout(),
            manager,
            manager_touched: true,
            counts_stale: true,
            fib: Fib::new(),
            fib_generation: 0,
            route_counts: BTreeMap::new(),
            tunnels: Tunnels::new(),
            outputs: VecDeque::new(),
            events: VecDeque::new(),
            next_housekeeping: now,
            drops: Drops::default(),
            draining: Vec::new(),
        }
    }

    /// This node's prefix.
    pub fn prefix(&self) -> Ipv6Net {
        self.cfg.prefix
    }

    /// The Babel router (for status and route dumps).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Starts loading the node's own state that every packet and timer
    /// reads (the router's fields, the tunnel slots' handle, the queues),
    /// for a driver that knows which node comes next: in a simulation of
    /// many nodes each one's state is cold, and its fields are read one
    /// after the other. Changes nothing.
    pub fn prefetch(&self) {
        self.router.prefetch();
        prefetch(&self.tunnels);
        prefetch(&self.outputs);
        prefetch(&self.events);
        prefetch(&self.draining);
        prefetch(&self.next_housekeeping);
        prefetch(&self.manager_touched);
    }

    /// The tunnel manager (to feed it candidates, read its tunnels).
    pub fn manager(&mut self) -> &mut TunnelManager {
        self.mgr()
    }

    /// The manager, to call what may change it (see `manager_touched`).
    fn mgr(&mut self) -> &mut TunnelManager {
        self.manager_touched = true;
        self.counts_stale = true;
        &mut self.manager
    }

    /// When the manager is due.
    fn manager_due(&self) -> Instant {
        if self.manager_touched { self.manager.poll_timeout() } else { self.manager_due }
    }

    /// Drop counters.
    pub fn drops(&self) -> Drops {
        self.drops
    }

    /// Per-tunnel counters, by peer.
    pub fn tunnel_counters(&self) -> impl Iterator<Item = (PeerId, TunnelCounters)> + '_ {
        let mut all: Vec<(PeerId, TunnelCounters)> =
            self.tunnels.iter().map(|(p, t)| (p, t.counters)).collect();
        all.sort_unstable_by_key(|(p, _)| *p);
        all.into_iter()
    }

    /// The peer the route to `dst` goes through, if any.
    pub fn route(&self, dst: Ipv6Addr) -> Option<PeerId> {
        self.fib.lookup(dst).copied()
    }

    /// A count of the forwarding table's changes: while it stays the same,
    /// [`NodeCore::route`] gives the same answers (a simulator re-checks
    /// only the paths through nodes whose tables changed).
    pub fn fib_generation(&self) -> u64 {
        self.fib_generation
    }

    /// Applies new tunnel-manager parameters at once.
    pub fn set_manager_config(&mut self, now: Instant, cfg: ManagerConfig) {
        self.cfg.manager = cfg.clone();
        self.mgr().set_config(now, cfg);
        self.pump(now);
    }

    /// A tunnel to `peer` is established (both directions work): Babel
    /// starts speaking in it.
    pub fn tunnel_up(&mut self, now: Instant, peer: PeerId) {
        if self.tunnels.contains(&peer) {
            self.mgr().tunnel_up(now, peer);
            return;
        }
        let id = self.tunnels.insert(now, peer, false);
        let mut ic = InterfaceConfig::new(LinkKind::Tunnel, self.ll);
        ic.hello_interval = self.cfg.hello_interval;
        ic.update_interval = self.cfg.update_interval;
        ic.rtt = self.cfg.rtt;
        // Inner packets carry the Babel datagram plus 48 bytes of headers.
        ic.mtu = 1280 - 48;
        self.router.add_interface(now, id, ic);
        self.mgr().tunnel_up(now, peer);
        self.pump(now);
    }

    /// A tunnel to a peer that does not speak Babel (a plain WireGuard
    /// peer) is up: traffic to its prefix goes to it, it may send from its
    /// prefix only, and we announce its prefix in Babel (we are the mesh's
    /// gateway to it).
    pub fn fixed_tunnel_up(&mut self, now: Instant, peer: PeerId) {
        if self.tunnels.contains(&peer) {
            return;
        }
        // The peer may send from its own prefix at once.
        self.tunnels.insert(now, peer, true);
        self.set_route(peer, Some(peer));
        self.events.push_back(NodeEvent::Route { prefix: peer, via: Some(peer), metric: 0 });
        // We are the mesh's gateway to it.
        self.router.announce(now, peer, None);
        self.pump(now);
    }

    /// The tunnel to `peer` is gone (or never came up).
    pub fn tunnel_down(&mut self, now: Instant, peer: PeerId) {
        if let Some(t) = self.tunnels.remove(&peer) {
            if t.fixed {
                if self.fib.lookup(peer.network()) == Some(&peer) {
                    self.set_route(peer, None);
                }
                self.router.withdraw(now, peer, None);
            } else {
                self.router.remove_interface(now, t.id);
            }
        }
        self.mgr().tunnel_down(now, peer);
        self.pump(now);
    }

    /// Whether to accept a tunnel that `peer` opens to us.
    pub fn accept_incoming(&mut self, now: Instant, peer: PeerId) -> bool {
        let ok = self.mgr().accept_incoming(now, peer);
        self.pump(now);
        ok
    }

    /// A packet the machine sent into the mesh (read from the TUN device).
    pub fn from_tun(&mut self, now: Instant, mut packet: Vec<u8>) {
        if let (Verdict::Tunnel(peer), ids) = self.tun_verdict(now, &mut packet) {
            self.outputs.push_back(Output::ToTunnel { peer, packet: packet.into(), ids });
        }
    }

    /// A decrypted packet that arrived in the tunnel from `peer`. Shared
    /// bytes are read in place (copied only if the packet must change: data
    /// to forward, its hop limit decremented).
    pub fn from_tunnel(&mut self, now: Instant, peer: PeerId, packet: impl Into<Payload>) {
        self.from_tunnel_with(now, peer, TunnelIds::UNKNOWN, packet);
    }

    /// [`NodeCore::from_tunnel`] for a packet that came with the sender's
    /// [`TunnelIds`] (as in [`Output::ToTunnel`]): the tunnel is found by
    /// the id the sender gave for ours, and the sender's own id is noted
    /// for what we send back.
    pub fn from_tunnel_with(
        &mut self,
        now: Instant,
        peer: PeerId,
        ids: TunnelIds,
        packet: impl Into<Payload>,
    ) {
        let (verdict, packet) = match packet.into() {
            Payload::Own(mut v) => match self.receive(now, peer, ids, &v) {
                // Read and done with: the next packet built may reuse it.
                Ok(Verdict::Taken | Verdict::Dropped) => {
                    sixmesh_routing::wire::recycle(v);
                    return;
                }
                Ok(verdict) => ((verdict, TunnelIds::UNKNOWN), v),
                Err(h) => (self.forward(h, &mut v), v),
            },
            Payload::Shared(a) => match self.receive(now, peer, ids, &a) {
                Ok(v @ (Verdict::Tun | Verdict::Tunnel(_))) => ((v, TunnelIds::UNKNOWN), a.to_vec()),
                // Taken or dropped: nothing to hand on, no copy.
                Ok(v) => ((v, TunnelIds::UNKNOWN), Vec::new()),
                Err(h) => {
                    let mut v = a.to_vec();
                    (self.forward(h, &mut v), v)
                }
            },
        };
        match verdict {
            (Verdict::Tunnel(next), ids) => {
                self.outputs.push_back(Output::ToTunnel { peer: next, packet: packet.into(), ids })
            }
            (Verdict::Tun, _) => self.outputs.push_back(Output::ToTun(packet)),
            (Verdict::Dropped | Verdict::Taken, _) => {}
        }
    }

    /// [`NodeCore::from_tun`] without taking the packet: says where it goes
    /// (the hop limit already decremented in place), so that the driver
    /// encrypts it straight from its read buffer.
    pub fn route_from_tun(&mut self, now: Instant, packet: &mut [u8]) -> Verdict {
        self.tun_verdict(now, packet).0
    }

    /// [`NodeCore::route_from_tun`], with the tunnel's ids.
    fn tun_verdict(&mut self, _now: Instant, packet: &mut [u8]) -> (Verdict, TunnelIds) {
        let h = match packet::parse_ipv6(packet) {
            Ok(h) => h,
            Err(_) => {
                self.drops.not_ipv6 += 1;
                return (Verdict::Dropped, TunnelIds::UNKNOWN);
            }
        };
        if self.cfg.prefix.contains(&h.dst) {
            // Our own prefix is the kernel's business: sending it back to the
            // TUN would loop.
            self.drops.no_route += 1;
            return (Verdict::Dropped, TunnelIds::UNKNOWN);
        }
        self.forward(h, packet)
    }

    /// [`NodeCore::from_tunnel`] without taking the packet. Babel and
    /// gossip are handled here ([`Verdict::Taken`]); data is checked
    /// against what `peer` may send from, then goes to the TUN or, hop limit
    /// decremented in place, to another tunnel.
    pub fn route_from_tunnel(&mut self, now: Instant, peer: PeerId, packet: &mut [u8]) -> Verdict {
        match self.receive(now, peer, TunnelIds::UNKNOWN, packet) {
            Ok(v) => v,
            Err(h) => self.forward(h, packet).0,
        }
    }

    /// [`NodeCore::route_from_tunnel`] short of changing the packet: its
    /// verdict, or its header if it is data to forward. `ids`: the
    /// sender's, if it gave them.
    fn receive(
        &mut self,
        now: Instant,
        peer: PeerId,
        ids: TunnelIds,
        packet: &[u8],
    ) -> Result<Verdict, Ipv6Header> {
        let Some(t) = self.tunnels.find_mut(&peer, ids.remote) else {
            self.drops.no_tunnel += 1;
            return Ok(Verdict::Dropped);
        };
        t.counters.rx_packets += 1;
        t.counters.rx_bytes += packet.len() as u64;
        t.last_rx = now;
        if ids.local != TunnelId::MAX {
            t.remote = ids.local;
        }
        let (id, fixed) = (t.id, t.fixed);
        // The router's state for this tunnel loads while the packet is
        // parsed and its checksum summed.
        self.router.prefetch_link(id, t.link_hint);
        let h = match packet::parse_ipv6(packet) {
            Ok(h) => h,
            Err(_) => {
                self.drops.not_ipv6 += 1;
                return Ok(Verdict::Dropped);
            }
        };
        if is_link_local(&h.src) {
            // Gossip from the neighbour itself, link-local.
            if h.dst == self.ll
                && let Some(payload) = packet::udp_payload(packet, &h, GOSSIP_PORT)
            {
                if packet::udp_checksum_ok(packet, &h) {
                    self.events.push_back(NodeEvent::Gossip { peer, payload: payload.to_vec() });
                    return Ok(Verdict::Taken);
                }
                self.drops.not_ipv6 += 1;
                return Ok(Verdict::Dropped);
            }
            // Babel, link-local, inside this tunnel.
            if h.dst == BABEL_GROUP || h.dst == self.ll {
                if let Some(payload) = packet::udp_payload(packet, &h, BABEL_PORT)
                    && packet::udp_checksum_ok(packet, &h)
                {
                    self.router.handle_packet(now, id, h.src, payload);
                    let hint = self.router.link_hint(id);
                    if let Some((_, t)) = self.tunnels.at_mut(id) {
                        t.link_hint = hint;
                    }
                    self.pump(now);
                    return Ok(Verdict::Taken);
                }
                self.drops.not_ipv6 += 1;
                return Ok(Verdict::Dropped);
            }
        }
        // Data: the peer may only send from its own prefix and from what it
        // advertises to us in Babel (WireGuard's allowed-IPs, fed by Babel).
        let allowed = peer.contains(&h.src) || (!fixed && self.router.advertises(id, h.src));
        if !allowed || !self.cfg.network.contains(&h.src) {
            tracing::debug!(%peer, src = %h.src, dst = %h.dst, "dropped: source not allowed from this peer");
            self.drops.bad_source += 1;
            return Ok(Verdict::Dropped);
        }
        if self.cfg.prefix.contains(&h.dst) {
            return Ok(Verdict::Tun);
        }
        Err(h)
    }

    /// Where data goes next, and the tunnel's ids if into a tunnel.
    fn forward(&mut self, h: Ipv6Header, packet: &mut [u8]) -> (Verdict, TunnelIds) {
        let dropped = (Verdict::Dropped, TunnelIds::UNKNOWN);
        if !self.cfg.network.contains(&h.dst) {
            self.drops.no_route += 1;
            return dropped;
        }
        let Some(peer) = self.fib.lookup(h.dst).copied() else {
            self.drops.no_route += 1;
            return dropped;
        };
        if !packet::decrement_hop_limit(packet) {
            self.drops.hop_limit += 1;
            return dropped;
        }
        match self.count_tx(peer, packet.len()) {
            Some(ids) => (Verdict::Tunnel(peer), ids),
            None => dropped,
        }
    }

    /// Counts a packet going into the tunnel to `peer`: its ids, or `None`
    /// (and counted as a drop) when there is no such tunnel.
    fn count_tx(&mut self, peer: PeerId, len: usize) -> Option<TunnelIds> {
        let Some(id) = self.tunnels.id(&peer) else {
            self.drops.no_tunnel += 1;
            return None;
        };
        self.count_tx_at(id, len).map(|(_, ids)| ids)
    }

    /// [`NodeCore::count_tx`] for tunnel `id`: its peer too.
    fn count_tx_at(&mut self, id: TunnelId, len: usize) -> Option<(PeerId, TunnelIds)> {
        let Some((peer, t)) = self.tunnels.at_mut(id) else {
            self.drops.no_tunnel += 1;
            return None;
        };
        t.counters.tx_packets += 1;
        t.counters.tx_bytes += len as u64;
        Some((peer, t.ids()))
    }

    /// Sends `packet` into tunnel `id`.
    fn send_at(&mut self, id: TunnelId, packet: Payload) {
        if let Some((peer, ids)) = self.count_tx_at(id, packet.len()) {
            self.outputs.push_back(Output::ToTunnel { peer, packet, ids });
        }
    }

    /// Sends a gossip message to a tunnel neighbour (a Babel peer).
    pub fn send_gossip(&mut self, peer: PeerId, payload: &[u8]) {
        let Some(t) = self.tunnels.get(&peer).filter(|t| !t.fixed) else { return };
        let id = t.id;
        let p = packet::build_udp(self.ll, tunnel_link_local(&peer), GOSSIP_PORT, 1, payload);
        self.send_at(id, p.into());
    }

    /// Tunnel neighbours that speak Babel (and gossip), by prefix.
    pub fn babel_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        let mut all: Vec<PeerId> = self.tunnels.iter().filter(|(_, t)| !t.fixed).map(|(p, _)| p).collect();
        all.sort_unstable();
        all.into_iter()
    }

    /// When [`NodeCore::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.manager_due().min(self.next_housekeeping);
        for (d, ..) in &self.draining {
            t = t.min(*d);
        }
        if let Some(r) = self.router.poll_timeout() {
            t = t.min(r);
        }
        t
    }

    /// Runs what is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<(PeerId, &'static str)> =
            self.draining.iter().filter(|(t, ..)| *t <= now).map(|(_, p, r)| (*p, *r)).collect();
        self.draining.retain(|(t, ..)| *t > now);
        for (peer, reason) in due {
            if let Some(t) = self.tunnels.remove(&peer) {
                self.router.remove_interface(now, t.id);
            }
            // Should the manager have chosen this peer again meanwhile, it
            // learns that the tunnel is gone.
            self.mgr().tunnel_down(now, peer);
            self.events.push_back(NodeEvent::Manager(Action::Disconnect { peer, reason }));
        }
        if now >= self.next_housekeeping {
            self.close_silent_tunnels(now);
            self.housekeeping();
            self.next_housekeeping = now + HOUSEKEEPING;
        }
        self.router.handle_timeout(now);
        if now >= self.manager_due() {
            self.mgr().handle_timeout(now);
        }
        self.pump(now);
    }

    /// The next packet to send.
    pub fn poll_output(&mut self) -> Option<Output> {
        let o = self.outputs.pop_front();
        if o.is_none() {
            sixmesh_routing::core::shrink_idle(&mut self.outputs);
        }
        o
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// Tunnels silent for 10 Hello intervals (at least 5 s) are dead: close
    /// them, so that the manager replaces them.
    fn close_silent_tunnels(&mut self, now: Instant) {
        let limit = (self.cfg.hello_interval * 10).max(Duration::from_secs(5));
        let mut dead: Vec<PeerId> = self
            .tunnels
            .iter()
            .filter(|(_, t)| !t.fixed && now.saturating_duration_since(t.last_rx) > limit)
            .map(|(p, _)| p)
            .collect();
        dead.sort_unstable();
        for peer in dead {
            tracing::info!(%peer, "tunnel silent for {limit:?}: closing it");
            self.events.push_back(NodeEvent::Manager(Action::Disconnect { peer, reason: "silent" }));
            self.tunnel_down(now, peer);
        }
    }

    /// Hands the route counts to the tunnel manager.
    fn housekeeping(&mut self) {
        // Handing the same counts to the same tunnels again changes nothing.
        if self.counts_stale {
            self.manager.set_route_counts(&self.route_counts);
            self.counts_stale = false;
        }
    }

    /// Points the FIB entry for `prefix` at `via` (or removes it), keeping
    /// the route counts and the manager's set of destinations Babel routes
    /// to (candidates for exploration) in step.
    fn set_route(&mut self, prefix: Ipv6Net, via: Option<PeerId>) {
        let old = match via {
            Some(p) => self.fib.insert(prefix, p),
            None => self.fib.remove(&prefix),
        };
        if old != via {
            self.fib_generation += 1;
        }
        if let Some(o) = old
            && let Some(c) = self.route_counts.get_mut(&o)
        {
            *c -= 1;
            if *c == 0 {
                self.route_counts.remove(&o);
            }
        }
        if let Some(p) = via {
            *self.route_counts.entry(p).or_default() += 1;
        }
        self.counts_stale = true;
        if prefix.prefix_len() == self.cfg.prefix.prefix_len() {
            match (old.is_some(), via.is_some()) {
                (false, true) => self.mgr().add_distant(prefix),
                (true, false) => self.mgr().remove_distant(&prefix),
                _ => {}
            }
        }
    }

    /// Moves the router's and manager's outputs into ours, until neither
    /// has anything left (closing a tunnel makes Babel retract routes).
    fn pump(&mut self, now: Instant) {
        // Shared datagrams (the same full update on every tunnel), wrapped
        // once for all their tunnels: (datagram, destination, packet).
        type Wrapped = (Arc<[u8]>, Ipv6Addr, Arc<[u8]>);
        let mut wrapped: Vec<Wrapped> = Vec::new();
        let mut refresh_due = false;
        loop {
            let mut busy = false;
            let touched = std::mem::take(&mut self.manager_touched);
            refresh_due |= touched;
            while touched && let Some(a) = self.manager.poll_action() {
                busy = true;
                if let Action::Disconnect { peer, reason } = &a
                    && let Some(t) = self.tunnels.get(peer)
                {
                    if !t.fixed && DRAINED.contains(reason) {
                        // Soft lock: make the tunnel expensive both ways so
                        // that Babel moves traffic away, and close it a
                        // little later.
                        self.router.drain_interface(now, t.id, DRAIN_COST);
                        self.draining.push((now + self.cfg.hello_interval * 4, *peer, reason));
                        continue;
                    }
                    let t = self.tunnels.remove(peer).expect("present");
                    self.router.remove_interface(now, t.id);
                }
                self.events.push_back(NodeEvent::Manager(a));
            }
            while let Some(e) = self.router.poll_event() {
                busy = true;
                self.apply_router_event(e);
            }
            while let Some(t) = self.router.poll_transmit() {
                busy = true;
                if self.tunnels.at(t.iface).is_none() {
                    continue;
                }
                let dst = match t.dst {
                    Destination::Multicast => BABEL_GROUP,
                    Destination::Unicast(a) => a,
                };
                let p = match t.payload {
                    Payload::Own(v) => Payload::Own(packet::wrap_udp(self.ll, dst, BABEL_PORT, 1, v)),
                    Payload::Shared(d) => {
                        let known = wrapped.iter().find(|(k, a, _)| Arc::ptr_eq(k, &d) && *a == dst);
                        Payload::Shared(match known {
                            Some((.., p)) => p.clone(),
                            None => {
                                let p: Arc<[u8]> = packet::build_udp(self.ll, dst, BABEL_PORT, 1, &d).into();
                                wrapped.push((d, dst, p.clone()));
                                p
                            }
                        })
                    }
                };
                self.send_at(t.iface, p);
            }
            if !busy && !self.manager_touched {
                if refresh_due {
                    self.manager_due = self.manager.poll_timeout();
                }
                return;
            }
        }
    }

    fn apply_router_event(&mut self, e: Event) {
        match e {
            Event::Selected { prefix, src: None, iface, metric, .. } => {
                if let Some((peer, _)) = self.tunnels.at(iface) {
                    self.set_route(prefix, Some(peer));
                    self.events.push_back(NodeEvent::Route { prefix, via: Some(peer), metric });
                }
            }
            Event::Unselected { prefix, src: None } => {
                self.set_route(prefix, None);
                self.events.push_back(NodeEvent::Route { prefix, via: None, metric: u16::MAX });
            }
            // Source-specific routes (gateways) stay in Babel's table; the
            // node does not forward by source yet.
            Event::Selected { .. } | Event::Unselected { .. } => {}
            Event::SeqnoChanged(s) => self.events.push_back(NodeEvent::SeqnoChanged(s)),
            Event::NeighbourUp { .. } | Event::NeighbourDown { .. } => {}
        }
    }
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(now: Instant) -> NodeCore {
        let cfg = NodeConfig::new(
            "fd5e:77::/64".parse().unwrap(),
            "fd5e:77::/48".parse().unwrap(),
            RouterId([2, 0, 0, 0, 0, 0, 0, 1]),
            0,
        );
        NodeCore::new(cfg, now)
    }

    /// A new tunnel takes the lowest free id (the router's interface), so
    /// that ids stay small however many tunnels came and went; a fixed
    /// tunnel takes one too, and no two tunnels ever share one.
    #[test]
    fn tunnel_ids_are_reused_lowest_first() {
        let now = Instant::now();
        let mut c = core(now);
        let peer = |i: u16| -> Ipv6Net { format!("fd5e:77:0:{i:x}::/64").parse().unwrap() };
        let ids = |c: &NodeCore| c.router().interfaces().map(|(id, _)| id).collect::<Vec<_>>();
        for i in 1..=4 {
            c.tunnel_up(now, peer(i));
        }
        assert_eq!(ids(&c), [1, 2, 3, 4]);
        c.tunnel_down(now, peer(2));
        c.tunnel_down(now, peer(3));
        assert_eq!(ids(&c), [1, 4]);
        c.fixed_tunnel_up(now, peer(9));
        c.tunnel_up(now, peer(5));
        assert_eq!(ids(&c), [1, 3, 4], "the fixed tunnel took 2");
        for i in 10..200 {
            c.tunnel_up(now, peer(i));
            c.tunnel_down(now, peer(i));
        }
        c.tunnel_down(now, peer(4));
        c.tunnel_up(now, peer(6));
        assert_eq!(ids(&c), [1, 3, 4]);
        assert!(c.tunnels.slots.len() <= 5, "{:?}", c.tunnels.slots);
    }

    /// The node looks at its tunnel manager only when the manager is due or
    /// was given something (it keeps the manager's due time while nothing
    /// changed it): whatever changes the manager, through the node or
    /// through [`NodeCore::manager`], is seen at once.
    #[test]
    fn the_manager_is_asked_as_soon_as_something_changes_it() {
        let t0 = Instant::now();
        let mut c = core(t0);
        let connects = |c: &mut NodeCore| {
            std::iter::from_fn(|| c.poll_event())
                .filter(|e| matches!(e, NodeEvent::Manager(Action::Connect { .. })))
                .count()
        };
        c.handle_timeout(t0);
        connects(&mut c);
        // Nothing to do: the next check is an interval away.
        let t1 = t0 + Duration::from_secs(1);
        c.handle_timeout(t1);
        let idle = c.poll_timeout();
        assert!(idle > t1, "{idle:?}");
        // Candidates and a new configuration given through `manager()`,
        // with no pump: the node must not sleep on its old due time.
        let peer: Ipv6Net = "fd5e:77:0:1::/64".parse().unwrap();
        c.manager().add_candidates([(peer, vec!["192.0.2.1:326".parse().unwrap()])]);
        let cfg = c.cfg.manager.clone();
        c.manager().set_config(t1, cfg);
        assert!(c.poll_timeout() <= t1, "{:?}", c.poll_timeout());
        c.handle_timeout(t1);
        assert_eq!(connects(&mut c), 1, "the manager asks for a tunnel to the candidate");
        // Done: back to a due time in the future, kept by the node.
        assert!(c.poll_timeout() > t1);
        assert_eq!(c.poll_timeout(), c.manager.poll_timeout().min(c.poll_timeout()));
    }

    /// A periodic full update goes out on every tunnel as one packet whose
    /// bytes the tunnels share (wrapped once, checksum and all), and a
    /// shared packet that comes in is handled like an owned one: Babel is
    /// taken, data forwarded from a copy, the shared bytes left as they were.
    #[test]
    fn full_updates_are_shared_by_the_tunnels() {
        let t0 = Instant::now();
        let mut c = core(t0);
        let peer = |i: u16| -> Ipv6Net { format!("fd5e:77:0:{i:x}::/64").parse().unwrap() };
        for i in 1..=3 {
            c.tunnel_up(t0, peer(i));
        }
        while c.poll_output().is_some() {}
        let later = t0 + Duration::from_secs(40);
        let mut shared: Vec<(PeerId, Arc<[u8]>)> = Vec::new();
        let mut now = t0;
        while now < later {
            now = c.poll_timeout().min(later);
            c.handle_timeout(now);
            while let Some(o) = c.poll_output() {
                if let Output::ToTunnel { peer, packet: Payload::Shared(p), .. } = o {
                    shared.push((peer, p));
                }
            }
        }
        let peers: std::collections::BTreeSet<PeerId> = shared.iter().map(|(p, _)| *p).collect();
        assert_eq!(peers.len(), 3, "a full update on every tunnel: {shared:?}");
        let first = &shared[0].1;
        let same: Vec<_> = shared.iter().filter(|(_, p)| Arc::ptr_eq(p, first)).map(|(p, _)| *p).collect();
        assert_eq!(same.len(), 3, "one copy for the three tunnels");
        let h = packet::parse_ipv6(first).expect("IPv6");
        assert_eq!(h.dst, BABEL_GROUP);
        assert!(packet::udp_checksum_ok(first, &h) && packet::udp_payload(first, &h, BABEL_PORT).is_some());

        // Coming in shared: a Babel packet is taken (the sender becomes a
        // Babel neighbour)...
        let mut other = core(t0);
        other.tunnel_up(t0, "fd5e:77::/64".parse().unwrap());
        while other.poll_output().is_some() {}
        let before = other.drops();
        other.from_tunnel(later, "fd5e:77::/64".parse().unwrap(), Payload::Shared(first.clone()));
        assert_eq!(other.drops(), before, "taken, not dropped");
        assert_eq!(other.router().neighbours(later).len(), 1, "heard by Babel");
        // ... and data to forward is copied, the shared bytes untouched.
        let data: Arc<[u8]> = packet::build_udp(
            "fd5e:77:0:1::1".parse().unwrap(),
            "fd5e:77:0:2::1".parse().unwrap(),
            9,
            64,
            b"x",
        )
        .into();
        // (Silent for 40 s, the tunnels were closed: up again.)
        c.tunnel_up(later, peer(1));
        c.tunnel_up(later, peer(2));
        while c.poll_output().is_some() {}
        c.set_route(peer(2), Some(peer(2)));
        c.from_tunnel(later, peer(1), Payload::Shared(data.clone()));
        let out: Vec<Output> = std::iter::from_fn(|| c.poll_output()).collect();
        let fwd = out.iter().find_map(|o| match o {
            Output::ToTunnel { peer: p, packet, .. } if *p == peer(2) => Some(packet.to_vec()),
            _ => None,
        });
        let fwd = fwd.unwrap_or_else(|| panic!("forwarded: {out:?} {:?}", c.drops()));
        assert_eq!(fwd[7], 63, "hop limit decremented in the copy");
        assert_eq!(data[7], 64, "the shared bytes are unchanged");
    }

    /// A Babel packet that came in is, once read, the buffer of the next
    /// packet the node builds (the simulator's threads send and drop a
    /// packet per event: a fresh allocation was a cache miss each time).
    #[test]
    fn a_babel_packet_read_is_the_next_one_built() {
        let t0 = Instant::now();
        let mut c = core(t0);
        let far: Ipv6Net = "fd5e:77:0:1::/64".parse().unwrap();
        let mut f = NodeCore::new(
            NodeConfig::new(far, "fd5e:77::/48".parse().unwrap(), RouterId([2, 0, 0, 0, 0, 0, 0, 2]), 0),
            t0,
        );
        c.tunnel_up(t0, far);
        f.tunnel_up(t0, "fd5e:77::/64".parse().unwrap());
        // The first packet of the far node's own (not shared).
        let (hello, now) = loop {
            let now = f.poll_timeout();
            f.handle_timeout(now);
            if let Some(p) = std::iter::from_fn(|| f.poll_output()).find_map(|o| match o {
                Output::ToTunnel { packet: Payload::Own(p), .. } => Some(p),
                _ => None,
            }) {
                break (p, now);
            }
            assert!(now < t0 + Duration::from_secs(5), "the far node sends a Hello");
        };
        while c.poll_output().is_some() {}
        let (ptr, cap) = (hello.as_ptr(), hello.capacity());
        c.from_tunnel(now, far, hello);
        assert_eq!(c.router().neighbours(now).len(), 1, "heard by Babel");
        // Had it been freed, the allocator would hand it out here (its
        // freed memory is often the next allocation of that size anyway).
        let other = Vec::<u8>::with_capacity(cap);
        while c.poll_output().is_some() {}
        let next = loop {
            let at = c.poll_timeout();
            c.handle_timeout(at);
            if let Some(p) = std::iter::from_fn(|| c.poll_output()).find_map(|o| match o {
                Output::ToTunnel { packet: Payload::Own(p), .. } => Some(p),
                _ => None,
            }) {
                break p;
            }
            assert!(at < now + Duration::from_secs(5), "the node sends a Hello");
        };
        assert_eq!(next.as_ptr(), ptr, "built in the buffer read last");
        assert_ne!(other.as_ptr(), ptr);
        let h = packet::parse_ipv6(&next).expect("IPv6");
        assert!(packet::udp_checksum_ok(&next, &h) && packet::udp_payload(&next, &h, BABEL_PORT).is_some());
    }

    /// The first Babel packet of its own a node sends, once `now` passes
    /// its timers: (packet, ids, when).
    fn next_own_packet(c: &mut NodeCore, after: Instant) -> (Vec<u8>, PeerId, TunnelIds, Instant) {
        loop {
            let now = c.poll_timeout();
            c.handle_timeout(now);
            if let Some(found) = std::iter::from_fn(|| c.poll_output()).find_map(|o| match o {
                Output::ToTunnel { peer, packet: Payload::Own(p), ids } => Some((p, peer, ids, now)),
                _ => None,
            }) {
                return found;
            }
            assert!(now < after + Duration::from_secs(5), "a Hello within 5 s");
        }
    }

    /// Packets carry the tunnel's ids at both ends (WireGuard's indices):
    /// a node notes the far end's id from what it receives and puts it in
    /// what it sends back; a wrong or unknown id only costs a lookup by
    /// peer, never the wrong tunnel.
    #[test]
    fn tunnel_ids_travel_both_ways_and_a_wrong_one_is_harmless() {
        let t0 = Instant::now();
        let mut c = core(t0);
        let peers: Vec<Ipv6Net> = (1..=3).map(|i| format!("fd5e:77:0:{i:x}::/64").parse().unwrap()).collect();
        for p in &peers {
            c.tunnel_up(t0, *p);
        }
        // Nothing heard yet: the far ids are unknown.
        let (_, peer, ids, _) = next_own_packet(&mut c, t0);
        let k = peers.iter().position(|p| *p == peer).expect("one of ours") as TunnelId + 1;
        assert_eq!(ids, TunnelIds { local: k, remote: TunnelId::MAX });
        while c.poll_output().is_some() {}

        // The third peer's node, whose id for this tunnel is 7 (say), sends
        // a Hello giving the first peer's tunnel id as ours.
        let mut f = NodeCore::new(
            NodeConfig::new(peers[2], "fd5e:77::/48".parse().unwrap(), RouterId([2, 0, 0, 0, 0, 0, 0, 3]), 0),
            t0,
        );
        f.tunnel_up(t0, "fd5e:77::/64".parse().unwrap());
        let (hello, _, _, now) = next_own_packet(&mut f, t0);
        let rx =
            |c: &NodeCore, p: &PeerId| c.tunnel_counters().find(|(q, _)| q == p).map(|(_, n)| n.rx_packets);
        c.from_tunnel_with(now, peers[2], TunnelIds { local: 7, remote: 1 }, hello.clone());
        assert_eq!(
            (rx(&c, &peers[0]), rx(&c, &peers[2])),
            (Some(0), Some(1)),
            "counted on the sender's tunnel"
        );
        let heard = c.router().neighbours(now);
        assert_eq!(heard.iter().map(|n| n.iface).collect::<Vec<_>>(), [3], "heard on its interface");
        // The tunnel keeps the router's hint for its next packets.
        let hint = c.tunnels.at(3).map(|(_, t)| t.link_hint);
        assert!(hint.is_some_and(|h| h != u32::MAX) && hint == Some(c.router().link_hint(3)));
        // Right, unknown and out-of-range ids alike.
        for remote in [3, TunnelId::MAX, 40] {
            c.from_tunnel_with(now, peers[2], TunnelIds { local: 7, remote }, hello.clone());
        }
        assert_eq!((rx(&c, &peers[0]), rx(&c, &peers[2])), (Some(0), Some(4)));
        // What goes back to it carries its id.
        while c.poll_output().is_some() {}
        let back = loop {
            let (_, peer, ids, at) = next_own_packet(&mut c, now);
            if peer == peers[2] {
                break ids;
            }
            assert!(at < now + Duration::from_secs(5));
        };
        assert_eq!(back, TunnelIds { local: 3, remote: 7 });
        // A packet from a peer without a tunnel is dropped, whatever its ids.
        let before = c.drops().no_tunnel;
        c.from_tunnel_with(
            now,
            "fd5e:77:0:9::/64".parse().unwrap(),
            TunnelIds { local: 1, remote: 3 },
            hello,
        );
        assert_eq!(c.drops().no_tunnel, before + 1);
    }

    #[test]
    fn fixed_peer_may_send_from_its_prefix_only_and_is_routed_to() {
        let now = Instant::now();
        let mut c = core(now);
        let peer: Ipv6Net = "fd5e:77:0:ffff::/64".parse().unwrap();
        c.fixed_tunnel_up(now, peer);
        while c.poll_output().is_some() {}
        let ok = packet::build_udp(
            "fd5e:77:0:ffff::1".parse().unwrap(),
            "fd5e:77::1".parse().unwrap(),
            9,
            64,
            b"x",
        );
        c.from_tunnel(now, peer, ok.clone());
        assert_eq!(c.poll_output(), Some(Output::ToTun(ok)), "{:?}", c.drops());
        let spoofed =
            packet::build_udp("fd5e:77:1::1".parse().unwrap(), "fd5e:77::1".parse().unwrap(), 9, 64, b"x");
        c.from_tunnel(now, peer, spoofed);
        assert_eq!(c.poll_output(), None);
        assert_eq!(c.drops().bad_source, 1);
        let out = packet::build_udp(
            "fd5e:77::1".parse().unwrap(),
            "fd5e:77:0:ffff::1".parse().unwrap(),
            9,
            64,
            b"y",
        );
        c.from_tun(now, out);
        assert!(matches!(c.poll_output(), Some(Output::ToTunnel { peer: p, .. }) if p == peer));
    }
}
