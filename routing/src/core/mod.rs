//! The sans-IO Babel router (RFC 8966, with RFC 9616 RTT costs and RFC 9079
//! source-specific routes).
//!
//! A [`Router`] never touches a socket or a clock: the driver (or netsim)
//! feeds it packets with [`Router::handle_packet`] and wakes it at
//! [`Router::poll_timeout`] with [`Router::handle_timeout`]; it answers with
//! datagrams to send ([`Router::poll_transmit`]) and route changes to apply
//! ([`Router::poll_event`]). Every method takes `now`; the same inputs give
//! the same outputs.

mod fxhash;
mod idmap;
mod repeats;
mod routetable;
mod tables;
#[cfg(test)]
mod tests;

/// The decoded messages of the packet being handled, one buffer per
/// thread rather than per router: it stays in cache from one packet to the
/// next, whichever router handles it (one per router was a cold buffer for
/// every packet of a simulation running thousands, and their memory).
mod scratch {
    use std::cell::Cell;

    use crate::wire::Decoded;

    thread_local! {
        static DECODED: Cell<Option<Decoded>> = const { Cell::new(None) };
    }

    /// The thread's buffer, empty (a new one if it is in use).
    pub(super) fn take() -> Decoded {
        DECODED.try_with(Cell::take).ok().flatten().unwrap_or_default()
    }

    /// Gives the buffer back, emptied, for the next packet.
    pub(super) fn put(mut d: Decoded) {
        d.messages.clear();
        d.errors = 0;
        d.unknown = 0;
        let _ = DECODED.try_with(|c| c.set(Some(d)));
    }
}

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv6Net};

pub use self::fxhash::{FxBuildHasher, FxHasher, FxMap};
use self::idmap::IdMap;
use self::repeats::Repeats;
use self::routetable::RouteTable;
use self::tables::{Expiry, Installed, Neighbour, RouteEntry, Slot, Source, Ticks};
pub use self::tables::{NeighbourInfo, RouteInfo, seqno_newer};
use crate::wire::{self, INFINITY, Message, PacketBuilder, RequestTarget, RouterId};

/// Opaque interface handle chosen by the driver (an ifindex, a tunnel id).
pub type IfaceId = u32;

/// A route's key: destination prefix and optional source prefix (RFC 9079).
pub type RouteKey = (Ipv6Net, Option<Ipv6Net>);

/// The kind of link an interface is, which sets its defaults like babeld's
/// `type wired` and `type tunnel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// Cost 96, 2-out-of-3, no timestamps.
    Wired,
    /// Cost 96, 2-out-of-3, timestamps and an RTT penalty of up to 96.
    Tunnel,
}

/// RTT-based cost (RFC 9616), with babeld's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttConfig {
    /// Weight of a new sample, out of 256 (babeld `rtt-decay`, 42).
    pub decay: u32,
    /// Below this RTT there is no penalty (babeld `rtt-min`, 10 ms).
    pub min: Duration,
    /// At and above this RTT the penalty is `max_penalty` (`rtt-max`, 120 ms).
    pub max: Duration,
    /// Largest cost added (babeld `max-rtt-penalty`, 96 on tunnels).
    pub max_penalty: u16,
}

impl Default for RttConfig {
    fn default() -> Self {
        RttConfig {
            decay: 42,
            min: Duration::from_millis(10),
            max: Duration::from_millis(120),
            max_penalty: 96,
        }
    }
}

/// Per-interface settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub kind: LinkKind,
    /// Our link-local address on this interface: IHUs about it are ours.
    pub link_local: Ipv6Addr,
    /// Multicast Hello interval (default 4 s).
    pub hello_interval: Duration,
    /// Full-table update interval (default 4 × the Hello interval).
    pub update_interval: Duration,
    /// Nominal link cost (96): our rxcost, which our IHUs give the
    /// neighbours as their cost of reaching us.
    pub cost: u16,
    /// A floor on our own cost of reaching the neighbours on this link
    /// (0: none; the cost is what their IHUs say, plus the RTT penalty).
    /// A local choice, as Babel lets link costs be: see
    /// [`Router::drain_interface`].
    pub min_cost: u16,
    /// Timestamps and RTT cost; `Some` on tunnels by default.
    pub rtt: Option<RttConfig>,
    /// Largest Babel packet to send on this interface.
    pub mtu: usize,
}

impl InterfaceConfig {
    /// Defaults for a link of this kind.
    pub fn new(kind: LinkKind, link_local: Ipv6Addr) -> Self {
        InterfaceConfig {
            kind,
            link_local,
            hello_interval: Duration::from_secs(4),
            update_interval: Duration::from_secs(16),
            cost: 96,
            min_cost: 0,
            rtt: (kind == LinkKind::Tunnel).then(RttConfig::default),
            mtu: 1400,
        }
    }

    /// Sets the Hello interval and, with it, the update interval (4 ×).
    pub fn with_hello_interval(mut self, hello: Duration) -> Self {
        self.hello_interval = hello;
        self.update_interval = hello * 4;
        self
    }

    /// IHU interval: with every Hello on links that measure RTT (each IHU
    /// carries a sample), every third Hello otherwise.
    fn ihu_every(&self) -> u16 {
        if self.rtt.is_some() { 1 } else { 3 }
    }
}

/// Where a datagram goes on its interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    /// ff02::1:6, port 6696.
    Multicast,
    /// A neighbour's link-local address, port 6696.
    Unicast(Ipv6Addr),
}

/// A datagram to send from our link-local address on `iface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub iface: IfaceId,
    pub dst: Destination,
    pub payload: Payload,
}

/// A datagram's bytes: its own, or shared with the same datagram sent on
/// other interfaces (a full update goes out alike on every tunnel: one
/// copy, not one per tunnel, and a driver may wrap it once for all).
/// Equal when the bytes are.
#[derive(Clone, Debug)]
pub enum Payload {
    /// With [`PacketBuilder::SPARE`] capacity past its bytes, for headers.
    Own(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Payload {
    /// The bytes as a vector of their own (a copy only if shared).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Own(v) => v,
            Payload::Shared(a) => a.to_vec(),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Own(v) => v,
            Payload::Shared(a) => a,
        }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload::Own(v)
    }
}

/// Something the driver should act on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Install (or replace) the route for `prefix` from `src` through
    /// `next_hop` on `iface`.
    Selected {
        prefix: Ipv6Net,
        src: Option<Ipv6Net>,
        iface: IfaceId,
        next_hop: Ipv6Addr,
        metric: u16,
        router_id: RouterId,
    },
    /// Remove the route for `prefix` from `src`.
    Unselected { prefix: Ipv6Net, src: Option<Ipv6Net> },
    /// A neighbour became usable (finite cost) on `iface`.
    NeighbourUp { iface: IfaceId, addr: Ipv6Addr },
    /// A neighbour stopped being usable or disappeared.
    NeighbourDown { iface: IfaceId, addr: Ipv6Addr },
    /// Our seqno changed: persist it, so that a restart is not ignored.
    SeqnoChanged(u16),
}

/// Counters for operators and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Packets dropped whole: bad header, non-link-local source, unknown iface.
    pub packets_dropped: u64,
    /// TLVs skipped inside otherwise good packets.
    pub tlvs_dropped: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Route updates received (retractions included).
    pub updates_in: u64,
    /// Of those, the ones that changed the table (a new route, another
    /// metric, seqno, router-id or next hop, a retraction): the rest only
    /// refreshed an entry. A steady network changes almost nothing.
    pub updates_changed: u64,
    /// Of the updates received, the ones refreshed in bulk: their chunk of
    /// 8 updates (or their whole datagram, then not even decoded) repeated
    /// one already handled, with nothing changed since. Only datagrams of
    /// 16 updates or more: most of a large steady network's updates.
    pub updates_repeated: u64,
    /// Seqno requests we originated (a destination left without a feasible
    /// route, or offered a much better one that is not feasible, asks its
    /// source for a new seqno), counted per neighbour asked.
    pub seqno_requests_sent: u64,
    /// Seqno requests of others passed on towards the source, per
    /// neighbour asked.
    pub seqno_requests_forwarded: u64,
    /// Times a neighbour's request raised our own seqno. Each makes every
    /// node's entry for our prefix change, from every neighbour: a mesh
    /// where this keeps growing is rerouting over and over.
    pub seqno_bumps: u64,
}

impl Stats {
    /// Counts seqno requests to `n` neighbours, `ours` or passed on.
    fn count_requests(&mut self, ours: bool, n: usize) {
        let n = n as u64;
        if ours {
            self.seqno_requests_sent += n;
        } else {
            self.seqno_requests_forwarded += n;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    ExpireRoutes,
    Urgent(u32),
    Request(u32),
    SourceGc,
}

/// Datagrams of fewer updates are handled without groups (see `repeats`).
const REPEATABLE_MIN: usize = 16;
/// How often route entries are checked for expiry (they are kept 3.5
/// update intervals: this is a backstop, retractions and lost neighbours
/// remove routes at once).
const EXPIRY_SWEEP: Duration = Duration::from_secs(2);
/// At most this often when every interface's update interval is long.
const EXPIRY_SWEEP_MAX: Duration = Duration::from_secs(10);
/// How long an unused source (feasibility distance) is kept (RFC 8966 B).
const SOURCE_GC: Duration = Duration::from_secs(180);
/// Hop count of the seqno requests we originate.
const REQUEST_HOPS: u8 = 64;
/// A new route must beat the selected one by this much to replace it.
const HYSTERESIS: u16 = 16;
/// Retractions, source switches and seqno-bumped updates are sent this
/// many times.
const URGENT_REPEAT: u8 = 3;
/// Triggered updates wait up to about this long (and at most a Hello
/// interval) so that the changes of one moment share datagrams; babeld's
/// `update_jitter`: 100 ms when urgent, the Hello interval (≤ 4 s) else.
const URGENT_FLUSH: Duration = Duration::from_millis(100);
const NORMAL_FLUSH: Duration = Duration::from_secs(4);
/// What must go at once (retractions, source switches, seqno answers, and
/// their repetitions) still waits about this long, as babeld's urgent
/// buffers do (`jitter`: half of 20 ms, roughly): the changes a burst of
/// packets brings leave together instead of a datagram per packet on every
/// interface (a thousand tunnels drained at once sent 6.6 M datagrams of
/// two updates in five seconds).
const RESEND_FLUSH: Duration = Duration::from_millis(10);
const URGENT_INTERVAL: Duration = Duration::from_millis(200);
/// Seqno requests are resent after this, doubling, up to `REQUEST_RESENDS`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_RESENDS: u8 = 2;

#[derive(Debug)]
struct Iface {
    cfg: InterfaceConfig,
    hello_seqno: u16,
    hellos_sent: u16,
    /// When we last asked the whole link for its routes.
    requested: Instant,
    /// The neighbours heard on this interface (one on a tunnel), with
    /// their addresses: every Hello we send carries an IHU for each, and a
    /// packet finds its sender here without a lookup in `by_addr`.
    nbrs: IfaceNbrs,
    /// When its next Hello and its next periodic full update are due, on
    /// the timer heap's clock (`u64::MAX`: not scheduled yet). Outside the
    /// heap: see `Router::periodic_top`.
    next_hello: u64,
    next_update: u64,
}

/// An interface's neighbours: the first in place (a tunnel has one, and
/// every packet looks it up: a separate allocation was a cache miss per
/// packet), any others in a list.
#[derive(Debug, Default)]
struct IfaceNbrs {
    first: Option<(u32, Ipv6Addr)>,
    more: Vec<(u32, Ipv6Addr)>,
}

impl IfaceNbrs {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn iter(&self) -> impl Iterator<Item = (u32, Ipv6Addr)> + '_ {
        self.first.iter().chain(&self.more).copied()
    }

    fn push(&mut self, id: u32, addr: Ipv6Addr) {
        match self.first {
            None => self.first = Some((id, addr)),
            Some(_) => self.more.push((id, addr)),
        }
    }

    fn remove(&mut self, id: u32) {
        if self.first.is_some_and(|(x, _)| x == id) {
            self.first = if self.more.is_empty() { None } else { Some(self.more.remove(0)) };
        } else {
            self.more.retain(|(x, _)| *x != id);
        }
    }
}

impl Iface {
    /// Beyond this many neighbours on an interface (a crowded LAN), they
    /// are found through `Router::by_addr` rather than by a scan.
    const SCANNED: usize = 8;

    /// The id of the neighbour at `addr`, if the interface's short list
    /// has it (`None`: unknown, or to be looked up in `by_addr`).
    fn known_neighbour(&self, addr: Ipv6Addr) -> Option<u32> {
        if self.nbrs.len() > Self::SCANNED {
            return None;
        }
        self.nbrs.iter().find(|(_, a)| *a == addr).map(|(id, _)| id)
    }

    /// When its next Hello (`hello`) or full update is due.
    fn next_periodic(&self, hello: bool) -> u64 {
        if hello { self.next_hello } else { self.next_update }
    }

    fn next_periodic_mut(&mut self, hello: bool) -> &mut u64 {
        if hello { &mut self.next_hello } else { &mut self.next_update }
    }
}

/// A full update's messages, kept to be sent again on the other interfaces
/// (every tunnel is an interface, and each sends the same full update every
/// update interval: building it, and keeping the source table for it, was
/// a tenth of a large mesh's simulation).
#[derive(Debug)]
struct FullUpdate {
    generation: u64,
    interval: u16,
    /// When its sources were last noted (RFC 8966 §3.7.3): again at least
    /// this often, so that none of them ages towards garbage collection.
    noted: Instant,
    /// Shared with the queues it waits in (see [`Queued::Shared`]).
    msgs: Arc<[Message]>,
}

/// How long a full update's messages may be reused without noting their
/// sources again (well under [`SOURCE_GC`]).
const FULL_UPDATE_REUSE: Duration = Duration::from_secs(30);

/// A seqno request we sent or forwarded, kept until answered or given up.
#[derive(Clone, Debug)]
struct Pending {
    key: RouteKey,
    router_id: RouterId,
    seqno: u16,
    hop_count: u8,
    /// Neighbours the request was sent to (`None`: multicast everywhere).
    to: Vec<u32>,
    resends: u8,
    timeout: Duration,
    /// We asked (rather than passed on a neighbour's request).
    ours: bool,
}

/// A message waiting to be sent to a destination on an interface, with
/// its place in the queue.
type Outgoing = ((IfaceId, Destination), u32, Queued);

/// What waits in an outgoing queue.
#[derive(Clone, Debug)]
enum Queued {
    Msg(Message),
    /// Messages queued alike on several interfaces, in order, shared
    /// rather than copied: a full update (one table's worth of updates,
    /// queued on every tunnel in turn), or a flush's triggered updates.
    Shared(Arc<[Message]>),
}

/// Shared messages (see [`Queued::Shared`]) as the packet builder left
/// them, written into empty packets for an MTU: the same messages give the
/// same bytes, so the next interface with that MTU starts from a copy
/// instead of encoding them again.
#[derive(Debug)]
struct Encoded {
    msgs: Arc<[Message]>,
    mtu: usize,
    builder: PacketBuilder,
    /// The datagrams, once finished for an interface that had nothing else
    /// queued: shared by the next such interfaces.
    datagrams: Option<Arc<[Arc<[u8]>]>>,
}

/// What the chunk groups of a repeatable datagram share.
struct Repeatable {
    cost: u16,
    interval: u16,
    default_interval: Duration,
    expires: Ticks,
}

/// The router. See the module documentation.
#[derive(Debug)]
pub struct Router {
    id: RouterId,
    seqno: u16,
    epoch: Instant,
    rng: u64,
    /// Looked up for every packet in and out (by id, without hashing).
    ifaces: IdMap<Iface>,
    /// By id: the lowest free one is taken, so that they stay small.
    neighbours: IdMap<Neighbour>,
    by_addr: FxMap<(IfaceId, Ipv6Addr), u32>,
    routes: RouteTable,
    route_ids: FxMap<RouteKey, u32>,
    route_keys: FxMap<u32, RouteKey>,
    xroutes: BTreeSet<RouteKey>,
    sources: FxMap<(RouteKey, RouterId), Source>,
    pending: FxMap<u32, Pending>,
    urgent: FxMap<u32, u8>,
    triggered: BTreeSet<RouteKey>,
    /// When the triggered updates are sent.
    flush_at: Option<Instant>,
    /// The shortest Hello interval of our interfaces (4 s without any):
    /// triggered updates wait about that long at most.
    min_hello: Duration,
    /// The sending neighbour's (id, cost, update interval) while the
    /// updates of one packet are handled; cleared by anything that may
    /// change the cost.
    cost_cache: Option<(u32, u16, Duration)>,
    /// The expiry of the last update handled in this packet, by (sending
    /// neighbour, announced interval): the packet's updates share one
    /// `now` and nearly always one interval. Cleared between packets.
    expiry_cache: Option<(u32, u16, Ticks)>,
    /// How many learned destinations have each prefix length (plain
    /// routes), and the source-specific ones, for [`Router::advertises`].
    plain_lens: BTreeMap<u8, u32>,
    specific: BTreeSet<RouteKey>,
    /// Messages waiting for [`Router::flush`], in the order queued: one
    /// vector, kept for its allocation, sorted by interface and destination
    /// when flushed so that datagrams go out in a fixed order (a queue per
    /// destination was an allocation per tunnel for every shared Hello).
    out: Vec<Outgoing>,
    /// A repeated datagram's groups (kept for its allocation).
    hits_buf: Vec<repeats::Hit>,
    /// A Hello's IHUs while it is queued (kept for its allocation).
    ihu_buf: Vec<Message>,
    /// The interfaces a Hello or full-update wake-up sends on (kept for
    /// its allocation).
    periodic_buf: Vec<IfaceId>,
    /// The earliest `next_hello` or `next_update` of the interfaces
    /// (`u64::MAX`: none). Hellos and full updates are not in the timer
    /// heap: a node's tunnels share one wake-up per interval, and each
    /// interface's own timer in the heap was a push and a stale pop per
    /// tunnel per Hello interval.
    periodic_top: u64,
    /// No route entry expires before this (a lower bound: refreshed entries
    /// only move away from it): the expiry sweep skips the table until then.
    min_expiry: Ticks,
    /// The entries that datagrams of updates refreshed, to refresh them at
    /// once when the same datagram comes again.
    repeats: Repeats,
    /// The group the packet being handled forms, if it may repeat.
    forming: Option<(u32, usize)>,
    /// Whether repeated datagrams are refreshed at once (off in tests that
    /// check it changes nothing).
    repeat_shortcut: bool,
    /// Bumped whenever what a full update carries may change: a selected
    /// route, the destinations (their order too), our prefixes or seqno.
    generation: u64,
    /// The last full update built, reused while `generation` holds.
    full_update: Option<FullUpdate>,
    /// The last shared messages encoded (a full update, or a flush's
    /// triggered updates).
    encoded: Option<Encoded>,
    /// (due, as nanoseconds since `epoch`; order of scheduling; timer):
    /// integers compare faster than `Instant`s, and this heap is popped
    /// for every Hello.
    timers: BinaryHeap<Reverse<(u64, u64, Timer)>>,
    /// When the heap's first timer is due (`u64::MAX`: none), kept beside
    /// the router's other fields: [`Router::poll_timeout`] runs after every
    /// packet, and reading the heap itself was a cache miss each time.
    timers_top: u64,
    timer_seq: u64,
    /// Each neighbour's next deadline (heap clock, `u64::MAX`: none), by
    /// neighbour id, outside the heap: every Hello moves its neighbour's
    /// deadline, and a heap entry per Hello (pushed, then popped stale) was
    /// a tenth of a large mesh's simulation. A tunnel node has about
    /// twenty: a scan is cheap.
    nbr_due: Vec<u64>,
    /// The id of the earliest in `nbr_due` (`usize::MAX`: none).
    nbr_min: usize,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl Router {
    /// A router with this id, starting from `seqno` (persist it across
    /// restarts; see [`Event::SeqnoChanged`]).
    pub fn new(id: RouterId, seqno: u16, now: Instant) -> Self {
        let mut r = Router {
            id,
            seqno,
            epoch: now,
            rng: u64::from_be_bytes(id.0) | 1,
            ifaces: IdMap::default(),
            neighbours: IdMap::default(),
            by_addr: FxMap::default(),
            routes: RouteTable::default(),
            route_ids: FxMap::default(),
            route_keys: FxMap::default(),
            xroutes: BTreeSet::new(),
            sources: FxMap::default(),
            pending: FxMap::default(),
            urgent: FxMap::default(),
            triggered: BTreeSet::new(),
            flush_at: None,
            min_hello: Duration::from_secs(4),
            cost_cache: None,
            expiry_cache: None,
            plain_lens: BTreeMap::new(),
            specific: BTreeSet::new(),
            out: Vec::new(),
            hits_buf: Vec::new(),
            ihu_buf: Vec::new(),
            periodic_buf: Vec::new(),
            periodic_top: u64::MAX,
            min_expiry: Ticks::MAX,
            repeats: Repeats::default(),
            forming: None,
            repeat_shortcut: true,
            generation: 0,
            full_update: None,
            encoded: None,
            timers: BinaryHeap::new(),
            timers_top: u64::MAX,
            timer_seq: 0,
            nbr_due: Vec::new(),
            nbr_min: usize::MAX,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        };
        r.schedule(now + Duration::from_secs(60), Timer::SourceGc);
        r.schedule(now + EXPIRY_SWEEP, Timer::ExpireRoutes);
        r
    }

    /// Our router-id.
    pub fn id(&self) -> RouterId {
        self.id
    }

    /// Our current seqno.
    pub fn seqno(&self) -> u16 {
        self.seqno
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    // ---------------------------------------------------------------- API

    /// Starts speaking Babel on an interface: Hellos begin at once and a
    /// wildcard route request asks the link for its routes.
    pub fn add_interface(&mut self, now: Instant, iface: IfaceId, cfg: InterfaceConfig) {
        if self.ifaces.contains_key(&iface) {
            self.remove_interface(now, iface);
        }
        let seqno = (self.next_random() & 0xffff) as u16;
        self.ifaces.insert(
            iface,
            Iface {
                cfg,
                hello_seqno: seqno,
                hellos_sent: 0,
                requested: now,
                nbrs: IfaceNbrs::default(),
                next_hello: u64::MAX,
                next_update: u64::MAX,
            },
        );
        self.update_min_hello();
        self.send_hello(now, iface);
        self.queue(iface, Destination::Multicast, Message::RouteReq(RequestTarget::All));
        self.send_full_update(now, iface, Destination::Multicast);
        let (h, u) = {
            let c = &self.ifaces[&iface].cfg;
            (c.hello_interval, c.update_interval)
        };
        let jitter = self.jitter(h);
        self.schedule_periodic(now + h - jitter, iface, true);
        let jitter = self.jitter(u);
        self.schedule_periodic(now + u - jitter, iface, false);
        self.flush(now);
    }

    /// Makes an interface very expensive both ways before it is closed
    /// (re6st's soft lock): our routes through it move to other neighbours
    /// now, and so do theirs through us, told by IHUs sent at once. Closed
    /// a little later, the link then carries no route, and its going
    /// changes nothing. Draining both ways at the same moment matters in a
    /// large mesh: a route that gets worse and has no feasible alternative
    /// makes its source bump its seqno, which changes that route everywhere,
    /// and two rounds of it (one side now, the other at the close) cost
    /// twice.
    pub fn drain_interface(&mut self, now: Instant, iface: IfaceId, cost: u16) {
        let Some(i) = self.ifaces.get_mut(&iface) else { return };
        if i.cfg.cost == cost && i.cfg.min_cost == cost {
            return;
        }
        i.cfg.cost = cost;
        i.cfg.min_cost = cost;
        let nbrs: Vec<u32> = i.nbrs.iter().map(|(id, _)| id).collect();
        for &id in &nbrs {
            self.neighbour_changed(now, id);
        }
        let mut ihus = Vec::new();
        self.ihus(iface, &mut ihus);
        for ihu in ihus {
            self.enqueue(iface, Destination::Multicast, Queued::Msg(ihu));
        }
        self.flush(now);
    }

    /// Stops speaking on an interface; its neighbours and their routes go.
    pub fn remove_interface(&mut self, now: Instant, iface: IfaceId) {
        if self.ifaces.remove(&iface).is_none() {
            return;
        }
        self.rescan_periodic();
        self.update_min_hello();
        let gone: Vec<u32> =
            self.neighbours.iter().filter(|(_, n)| n.iface == iface).map(|(id, _)| id).collect();
        for id in gone {
            self.drop_neighbour(now, id);
        }
        self.out.retain(|((i, _), ..)| *i != iface);
        self.flush(now);
    }

    /// The interfaces and their settings.
    pub fn interfaces(&self) -> impl Iterator<Item = (IfaceId, &InterfaceConfig)> {
        // In id order, as the table iterates.
        self.ifaces.iter().map(|(id, i)| (id, &i.cfg))
    }

    /// Originates a route to `prefix` (from `src`, if source-specific).
    pub fn announce(&mut self, now: Instant, prefix: Ipv6Net, src: Option<Ipv6Net>) {
        let key = (prefix.trunc(), src.map(|s| s.trunc()));
        if self.xroutes.insert(key) {
            self.generation += 1;
            if let Some(slot) = self.routes.get_mut(&key) {
                slot.set_selected(None);
                if slot.replace_installed(None).is_some() {
                    self.events.push_back(Event::Unselected { prefix: key.0, src: key.1 });
                }
            }
            self.trigger(now, key, Urgency::Resend);
            // Asked for by the operator, one at a time: at once.
            self.flush_at = Some(now);
            self.flush(now);
        }
    }

    /// Stops originating a route; neighbours get a retraction.
    pub fn withdraw(&mut self, now: Instant, prefix: Ipv6Net, src: Option<Ipv6Net>) {
        let key = (prefix.trunc(), src.map(|s| s.trunc()));
        if self.xroutes.remove(&key) {
            self.generation += 1;
            self.reselect(now, key);
            self.trigger(now, key, Urgency::Resend);
            // Asked for by the operator, one at a time: at once.
            self.flush_at = Some(now);
            self.flush(now);
        }
    }

    /// The prefixes we originate.
    pub fn announced(&self) -> impl Iterator<Item = &RouteKey> {
        self.xroutes.iter()
    }

    /// A hint a driver may keep for `iface` and give back with the
    /// interface's next packet ([`Router::prefetch_link`]): opaque, and
    /// only a hint (a stale one costs nothing but a wasted prefetch).
    pub fn link_hint(&self, iface: IfaceId) -> u32 {
        self.ifaces.get(&iface).and_then(|i| i.nbrs.first).map_or(u32::MAX, |(id, _)| id)
    }

    /// Starts loading what a packet on `iface` reads first (the interface
    /// and, by `hint` from [`Router::link_hint`], its neighbour), while the
    /// driver checks the packet: they are cache misses one after the other
    /// otherwise. Changes nothing.
    pub fn prefetch_link(&self, iface: IfaceId, hint: u32) {
        self.ifaces.prefetch(iface);
        self.neighbours.prefetch(hint);
    }

    /// Starts loading the router's own fields (a few cache lines, read by
    /// every packet and timer), for a driver that knows it comes next.
    /// Changes nothing.
    pub fn prefetch(&self) {
        let start: *const u8 = (self as *const Router).cast();
        for off in (0..std::mem::size_of::<Router>()).step_by(64) {
            prefetch(start.wrapping_add(off));
        }
    }

    /// Processes a datagram received on `iface` from `src` (the sender's
    /// link-local address; anything else is dropped, like babeld does).
    pub fn handle_packet(&mut self, now: Instant, iface: IfaceId, src: Ipv6Addr, bytes: &[u8]) {
        self.stats.packets_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        let known = match self.ifaces.get(&iface) {
            Some(i) if is_link_local(&src) => i.known_neighbour(src),
            _ => {
                self.stats.packets_dropped += 1;
                return;
            }
        };
        // A datagram of updates (it starts with a Router-Id, Next-Hop or
        // Update TLV) may repeat one the neighbour sent before.
        let hash = (self.repeat_shortcut && matches!(bytes.get(4), Some(6..=8)))
            .then(|| repeats::datagram_hash(bytes));
        if let Some(h) = hash
            && let Some(nbr) = known.or_else(|| self.by_addr.get(&(iface, src)).copied())
            && self.refresh_datagram(now, nbr, h)
        {
            self.flush(now);
            return;
        }
        // One buffer for every packet's messages (no allocation per packet).
        let mut decoded = scratch::take();
        if let Err(e) = wire::decode_into(bytes, &mut decoded) {
            tracing::debug!(%src, iface, "dropped Babel packet: {e}");
            self.stats.packets_dropped += 1;
            scratch::put(decoded);
            return;
        }
        self.stats.tlvs_dropped += u64::from(decoded.errors);
        let nbr = match known {
            Some(id) => id,
            None => self.neighbour_for(now, iface, src),
        };
        // RFC 9616: the Hello's timestamp in this packet is t3 for the IHUs.
        let mut packet_ts = None;
        for m in &decoded.messages {
            if let Message::Hello { unicast: false, timestamp: Some(t), .. } = m {
                packet_ts = Some(*t);
            }
        }
        self.cost_cache = None;
        self.expiry_cache = None;
        let from = {
            let n = &self.neighbours[&nbr];
            (n.iface, n.addr)
        };
        match hash.and_then(|h| self.repeatable(now, nbr, &decoded).map(|r| (h, r))) {
            Some((h, r)) => self.handle_chunks(now, nbr, from, h, r, &decoded.messages),
            None => {
                self.warm(nbr, &decoded.messages);
                for m in decoded.messages.drain(..) {
                    self.handle_message(now, nbr, from, m, packet_ts);
                }
            }
        }
        scratch::put(decoded);
        self.cost_cache = None;
        self.expiry_cache = None;
        self.flush(now);
    }

    /// Handles a datagram that repeats, byte for byte, one `nbr` sent
    /// before, if every chunk of it has a whole group and the link cost is
    /// the same: then handling it again would only move those entries'
    /// expiry (see `repeats`), and so does this, without decoding it. False
    /// if the datagram must be handled (decoded, then chunk by chunk).
    fn refresh_datagram(&mut self, now: Instant, nbr: u32, hash: u128) -> bool {
        let mut hits = std::mem::take(&mut self.hits_buf);
        let done = self.refresh_hits(now, nbr, hash, &mut hits);
        self.hits_buf = hits;
        done
    }

    /// [`Router::refresh_datagram`] with a buffer for the hits.
    fn refresh_hits(&mut self, now: Instant, nbr: u32, hash: u128, hits: &mut Vec<repeats::Hit>) -> bool {
        if !self.repeats.lookup_datagram(nbr, hash, hits) {
            return false;
        }
        let Some(n) = self.neighbours.get(&nbr) else { return false };
        let Some(i) = self.ifaces.get(&n.iface) else { return false };
        let cost = n.cost(now, &i.cfg);
        if hits.iter().any(|h| h.cost != cost) {
            return false;
        }
        let default = i.cfg.update_interval;
        for hit in hits.iter() {
            self.refresh_group(now, hit, default);
        }
        true
    }

    /// Refreshes a group's entries, as handling their updates again would.
    fn refresh_group(&mut self, now: Instant, hit: &repeats::Hit, default_interval: Duration) {
        let expires = self.update_expiry(now, hit.interval, default_interval);
        self.repeats.refresh(hit.group, expires);
        self.count_refreshed(hit.members, expires);
    }

    /// Counts `n` updates refreshed in bulk, their entries now expiring at
    /// `expires`.
    fn count_refreshed(&mut self, n: u32, expires: Ticks) {
        self.min_expiry = self.min_expiry.min(expires);
        self.stats.updates_in += u64::from(n);
        self.stats.updates_repeated += u64::from(n);
    }

    /// When an entry refreshed now by an update announcing `interval`
    /// expires (3.5 intervals; `default` if the update gives none).
    fn update_expiry(&self, now: Instant, interval: u16, default: Duration) -> Ticks {
        Ticks::ceil(self.epoch, now + interval_duration(interval, default) * 7 / 2)
    }

    /// Whether a datagram may repeat, chunk by chunk: only updates (no
    /// retraction), at least [`REPEATABLE_MIN`], all with one interval,
    /// nothing dropped. Gives what its
    /// chunks' groups share: the link cost, the interval, the expiry.
    fn repeatable(&self, now: Instant, nbr: u32, d: &wire::Decoded) -> Option<Repeatable> {
        // Short datagrams are triggered updates, which seldom come again:
        // their groups would only fill memory.
        if d.errors != 0 || d.messages.len() < REPEATABLE_MIN {
            return None;
        }
        let mut interval = None;
        for m in &d.messages {
            let Message::Update { prefix: Some(IpNet::V6(_)), src, metric, interval: i, .. } = m else {
                return None;
            };
            if *metric == INFINITY || v6_src(*src).is_none() || interval.is_some_and(|x| x != *i) {
                return None;
            }
            interval = Some(*i);
        }
        let interval = interval?;
        let n = self.neighbours.get(&nbr)?;
        let cfg = &self.ifaces.get(&n.iface)?.cfg;
        Some(Repeatable {
            cost: n.cost(now, cfg),
            interval,
            default_interval: cfg.update_interval,
            expires: self.update_expiry(now, interval, cfg.update_interval),
        })
    }

    /// Handles a repeatable datagram's updates [`repeats::CHUNK`] at a
    /// time: a chunk whose group is whole is refreshed at once, the others
    /// are handled and form groups; if every chunk ends with a whole group,
    /// the datagram is filed for [`Router::refresh_datagram`].
    fn handle_chunks(
        &mut self,
        now: Instant,
        nbr: u32,
        from: (IfaceId, Ipv6Addr),
        hash: u128,
        r: Repeatable,
        msgs: &[Message],
    ) {
        let mut filed: Vec<(u32, u32)> = Vec::new();
        let mut whole = true;
        // Each chunk's group is found through its first update's entry: those
        // lookups overlap here instead of stalling one after the other.
        self.warm(nbr, msgs.iter().step_by(repeats::CHUNK));
        for chunk in msgs.chunks(repeats::CHUNK) {
            // Our own routes echoed back are ignored, whatever the table
            // holds (a full update carries the route to its receiver).
            let want = chunk.iter().enumerate().fold(0, |w: repeats::Places, (k, m)| {
                w | repeats::Places::from(
                    !matches!(m, Message::Update { router_id, .. } if *router_id == self.id),
                ) << k
            });
            let hashes = repeats::chunk_hashes(chunk);
            let group = self.first_group(nbr, chunk);
            if let Some(g) = group
                && let Some(hit) = self.repeats.lookup(nbr, &hashes, g)
                && hit.cost == r.cost
            {
                self.refresh_group(now, &hit, r.default_interval);
                filed.push((hit.group, self.repeats.serial_of(hit.group)));
                continue;
            }
            // Some updates of the chunk changed (a new seqno, a metric):
            // the others' entries are refreshed in their group, and only
            // those are handled.
            let reopened =
                group.and_then(|g| self.reopen_group(now, nbr, from, &r, (chunk, &hashes, want), g));
            let g = match reopened {
                Some(g) => Some(g),
                None => {
                    self.warm(nbr, chunk);
                    let g = if want == 0 {
                        None
                    } else {
                        self.repeats.begin(nbr, &hashes, want, (r.cost, r.interval), r.expires)
                    };
                    self.handle_places(now, nbr, from, chunk, repeats::Places::MAX, g);
                    g
                }
            };
            match g.and_then(|g| self.repeats.finish(g)) {
                Some(g) => filed.push(g),
                None => whole &= want == 0,
            }
        }
        if whole && !filed.is_empty() {
            self.repeats.file_datagram(nbr, hash, &filed);
        }
    }

    /// Handles a chunk whose updates are partly those of group `g`'s
    /// members: if `g` was formed by a chunk like it (the same but for
    /// seqnos and metrics, with the same link cost and interval) and the
    /// updates that differ are those of members or of entries outside `g`
    /// (never the place of a member whose update is gone: that entry would
    /// stay in `g`, refreshed with it), the unchanged members are refreshed
    /// in `g`, the rest are handled and join it again. `g` (reopened:
    /// [`repeats::Repeats::finish`] closes it), or `None` with nothing done.
    fn reopen_group(
        &mut self,
        now: Instant,
        nbr: u32,
        from: (IfaceId, Ipv6Addr),
        r: &Repeatable,
        (chunk, hashes, want): (&[Message], &repeats::Hashes, repeats::Places),
        g: u32,
    ) -> Option<u32> {
        if want == 0 {
            return None;
        }
        let keep = self.repeats.unchanged(g, nbr, hashes, r.cost, r.interval)?;
        let redo = |k: &usize| keep & 1 << k == 0;
        self.warm(nbr, (0..chunk.len()).filter(redo).map(|k| &chunk[k]));
        // A member whose update changed must be the entry of the update now
        // at its place, and handling that update must reach the entry (it
        // does unless it is our own route echoed); an update handled now
        // must not be that of another place's member (the same destination
        // twice in a chunk).
        let live = self.repeats.live(g);
        for k in (0..chunk.len()).filter(redo) {
            let member = live & 1 << k != 0;
            let Message::Update { prefix: Some(IpNet::V6(p)), src, router_id, .. } = &chunk[k] else {
                return None;
            };
            if *router_id == self.id {
                if member {
                    return None;
                }
                continue;
            }
            let place = self
                .routes
                .get(&(*p, v6_src(*src)?))
                .and_then(|slot| slot.entries.get(slot.position(nbr)?))
                .and_then(|e| e.expires.group_place())
                .filter(|(h, _)| *h == g);
            if place != member.then_some((g, k)) {
                return None;
            }
        }
        self.repeats.reopen(g, hashes, want, r.expires);
        self.count_refreshed(keep.count_ones(), r.expires);
        self.handle_places(now, nbr, from, chunk, !keep, Some(g));
        Some(g)
    }

    /// Handles the updates of a chunk at `places`, their entries joining
    /// group `g` (if any) at their places.
    fn handle_places(
        &mut self,
        now: Instant,
        nbr: u32,
        from: (IfaceId, Ipv6Addr),
        chunk: &[Message],
        places: repeats::Places,
        g: Option<u32>,
    ) {
        for (k, m) in chunk.iter().enumerate().filter(|(k, _)| places & 1 << k != 0) {
            self.forming = g.map(|g| (g, k));
            self.handle_message(now, nbr, from, m.clone(), None);
        }
        self.forming = None;
    }

    /// The group of the entry of a chunk's first update that is not our
    /// own route echoed (if the chunk has a whole group, that entry is in
    /// it).
    fn first_group(&self, nbr: u32, chunk: &[Message]) -> Option<u32> {
        let (prefix, src) = chunk.iter().find_map(|m| match m {
            Message::Update { prefix: Some(IpNet::V6(p)), src, router_id, .. } if *router_id != self.id => {
                Some((*p, *src))
            }
            _ => None,
        })?;
        let slot = self.routes.get(&(prefix, v6_src(src)?))?;
        slot.entries.get(slot.position(nbr)?)?.expires.group_id()
    }

    /// Brings into the cache, ahead of handling them, the table entries a
    /// packet's updates will touch. Handling an update is a long chain of
    /// work around two cache misses (the destination's slot, then the
    /// neighbour's entry): in this short loop the slots' misses overlap more,
    /// and the entries' do not stall at all (a prefetch is not waited for).
    /// Nothing is changed.
    fn warm<'a, I>(&self, nbr: u32, messages: I)
    where
        I: IntoIterator<Item = &'a Message>,
        I::IntoIter: Clone,
    {
        let keys = messages.into_iter().filter_map(update_key);
        // The slots' buckets all at once (their places follow from the
        // keys), then the entries in them.
        keys.clone().for_each(|k| self.routes.prefetch(&k));
        for k in keys {
            if let Some(slot) = self.routes.get(&k) {
                slot.prefetch_for(nbr);
            }
        }
    }

    /// Runs the timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = self.nanos(now);
        loop {
            // The earliest of the heap, the Hellos and full updates, and the
            // neighbours (in that order when due at the same time).
            let heap = self.timers_top;
            let periodic = self.periodic_top;
            let nbr = self.next_nbr_due();
            if heap <= due && heap <= periodic && nbr.is_none_or(|(n, _)| heap <= n) {
                let Some(Reverse((_, _, timer))) = self.pop_timer() else { break };
                self.fire(now, timer);
            } else if periodic <= due && nbr.is_none_or(|(n, _)| periodic <= n) {
                self.fire_periodic(now, periodic);
            } else if let Some((_, id)) = nbr.filter(|(n, _)| *n <= due) {
                self.fire_neighbour(now, id);
            } else {
                break;
            }
        }
        self.flush(now);
    }

    /// The earliest neighbour deadline: (due, neighbour id).
    fn next_nbr_due(&self) -> Option<(u64, u32)> {
        self.nbr_due.get(self.nbr_min).map(|at| (*at, self.nbr_min as u32)).filter(|(at, _)| *at != u64::MAX)
    }

    /// Checks the neighbour whose deadline is the earliest (and due), which
    /// gives it its next one (or drops it).
    fn fire_neighbour(&mut self, now: Instant, id: u32) {
        if let Some(at) = self.nbr_due.get_mut(self.nbr_min) {
            *at = u64::MAX;
        }
        self.check_neighbour(now, id);
        if self.nbr_due.get(self.nbr_min).is_some_and(|at| *at == u64::MAX) {
            self.rescan_nbr_due();
        }
    }

    /// Finds the earliest neighbour deadline again.
    fn rescan_nbr_due(&mut self) {
        self.nbr_min =
            self.nbr_due.iter().enumerate().min_by_key(|(_, at)| **at).map_or(usize::MAX, |(i, _)| i);
    }

    /// Pops the heap's first timer, keeping `timers_top`.
    fn pop_timer(&mut self) -> Option<Reverse<(u64, u64, Timer)>> {
        let t = self.timers.pop();
        self.timers_top = self.timers.peek().map_or(u64::MAX, |Reverse((at, ..))| *at);
        t
    }

    /// When [`Router::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let heap = self.timers_top.min(self.periodic_top);
        let heap = Some(heap).filter(|at| *at != u64::MAX);
        let nbr = self.next_nbr_due().map(|(at, _)| at);
        let timer = heap.into_iter().chain(nbr).min().map(|at| self.instant(at));
        match (timer, self.flush_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front();
        if t.is_none() {
            shrink_idle(&mut self.transmits);
        }
        t
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The neighbour table.
    pub fn neighbours(&self, now: Instant) -> Vec<NeighbourInfo> {
        let mut v: Vec<_> =
            self.neighbours.values().map(|n| n.info(now, &self.ifaces[&n.iface].cfg)).collect();
        v.sort_by_key(|n| (n.iface, n.addr));
        v
    }

    /// Every route we know, selected or not, and the ones we originate
    /// (with metric 0 and no next hop).
    pub fn routes(&self) -> Vec<RouteInfo> {
        let mut v = Vec::new();
        for key in &self.xroutes {
            v.push(RouteInfo {
                prefix: key.0,
                src: key.1,
                router_id: self.id,
                seqno: self.seqno,
                metric: 0,
                refmetric: 0,
                next_hop: None,
                iface: None,
                selected: true,
                feasible: true,
            });
        }
        for (key, slot) in &self.routes {
            for (i, e) in slot.entries.iter().enumerate() {
                let n = &self.neighbours[&e.nbr];
                v.push(RouteInfo {
                    prefix: key.0,
                    src: key.1,
                    router_id: e.router_id,
                    seqno: e.seqno,
                    metric: e.metric,
                    refmetric: e.refmetric,
                    next_hop: Some(slot.next_hop(e.nbr, n.addr)),
                    iface: Some(n.iface),
                    selected: slot.selected() == Some(i),
                    feasible: self.feasible(key, e.router_id, e.seqno, e.refmetric),
                });
            }
        }
        v.sort_by(|a, b| {
            (a.prefix, a.src, !a.selected, a.metric).cmp(&(b.prefix, b.src, !b.selected, b.metric))
        });
        v
    }

    /// How many destinations have a selected route (not counting ours).
    pub fn selected_count(&self) -> usize {
        self.routes.values().filter(|s| s.selected().is_some()).count()
    }

    /// The selected route for a destination: (iface, next hop, metric).
    pub fn selected(&self, key: &RouteKey) -> Option<(IfaceId, Ipv6Addr, u16)> {
        let slot = self.routes.get(key)?;
        let e = &slot.entries[slot.selected()?];
        let n = &self.neighbours[&e.nbr];
        Some((n.iface, slot.next_hop(e.nbr, n.addr), e.metric))
    }

    // ------------------------------------------------------- neighbours

    fn neighbour_for(&mut self, now: Instant, iface: IfaceId, addr: Ipv6Addr) -> u32 {
        if let Some(id) = self.by_addr.get(&(iface, addr)) {
            return *id;
        }
        let id = self.neighbours.vacant_id();
        let slot = id as usize;
        if self.nbr_due.len() <= slot {
            self.nbr_due.resize(slot + 1, u64::MAX);
        }
        self.nbr_due[slot] = u64::MAX;
        self.neighbours.insert(id, Neighbour::new(iface, addr, now));
        self.by_addr.insert((iface, addr), id);
        if let Some(i) = self.ifaces.get_mut(&iface) {
            i.nbrs.push(id, addr);
        }
        tracing::debug!(iface, %addr, "new Babel neighbour");
        // Ask the newcomer for its routes, unless we just asked the whole
        // link (a tunnel's one neighbour appears right after the interface:
        // asking again only doubled the full tables a new tunnel carries).
        let recent = self
            .ifaces
            .get(&iface)
            .is_some_and(|i| now.saturating_duration_since(i.requested) < i.cfg.hello_interval * 2);
        if !recent {
            self.queue(iface, Destination::Unicast(addr), Message::RouteReq(RequestTarget::All));
        }
        self.schedule_neighbour(id);
        id
    }

    /// The destinations for which `nbr` has a route entry.
    fn keys_via(&self, nbr: u32) -> Vec<RouteKey> {
        // Nearly every neighbour has an entry for nearly every destination:
        // a scan of the packed neighbour ids beats an index, which cost a
        // quarter of the memory at scale.
        self.routes.iter().filter(|(_, s)| s.position(nbr).is_some()).map(|(k, _)| *k).collect()
    }

    /// Removes `nbr`'s entry for `key`; true if there was one.
    fn remove_entry(&mut self, key: &RouteKey, nbr: u32) -> bool {
        let Some(slot) = self.routes.get_mut(key) else { return false };
        let Some(i) = slot.position(nbr) else { return false };
        self.repeats.detach(&mut slot.entries[i]);
        slot.remove_nbr(nbr)
    }

    /// Keeps the prefix-length counts of learned destinations.
    fn count_key(&mut self, key: &RouteKey, added: bool) {
        if key.1.is_some() {
            if added {
                self.specific.insert(*key);
            } else {
                self.specific.remove(key);
            }
            return;
        }
        let len = key.0.prefix_len();
        if added {
            *self.plain_lens.entry(len).or_default() += 1;
        } else if let Some(c) = self.plain_lens.get_mut(&len) {
            *c -= 1;
            if *c == 0 {
                self.plain_lens.remove(&len);
            }
        }
    }

    /// Whether the neighbours on `iface` advertise a route (finite metric)
    /// to a prefix that contains `addr`: the sources a tunnel peer may send
    /// from (WireGuard's allowed-IPs, fed by Babel). A few hash lookups,
    /// one per prefix length in use.
    pub fn advertises(&self, iface: IfaceId, addr: Ipv6Addr) -> bool {
        let Some(i) = self.ifaces.get(&iface) else { return false };
        // The interface's neighbours' entries, found by id (a lookup of
        // every entry's neighbour was twenty per packet forwarded).
        let by = |slot: &Slot| {
            i.nbrs.iter().any(|(id, _)| slot.position(id).is_some_and(|k| slot.entries[k].metric < INFINITY))
        };
        let bits = u128::from(addr);
        for &len in self.plain_lens.keys() {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            let Ok(net) = Ipv6Net::new(Ipv6Addr::from(bits & mask), len) else { continue };
            if self.routes.get(&(net, None)).is_some_and(by) {
                return true;
            }
        }
        self.specific.iter().any(|k| k.0.contains(&addr) && self.routes.get(k).is_some_and(by))
    }

    fn drop_neighbour(&mut self, now: Instant, id: u32) {
        let Some(n) = self.neighbours.remove(&id) else { return };
        if let Some(at) = self.nbr_due.get_mut(id as usize) {
            *at = u64::MAX;
            self.rescan_nbr_due();
        }
        self.by_addr.remove(&(n.iface, n.addr));
        if let Some(i) = self.ifaces.get_mut(&n.iface) {
            i.nbrs.remove(id);
        }
        if n.was_up {
            self.events.push_back(Event::NeighbourDown { iface: n.iface, addr: n.addr });
        }
        let keys = self.keys_via(id);
        for key in keys {
            self.remove_entry(&key, id);
            self.reselect(now, key);
        }
        for p in self.pending.values_mut() {
            p.to.retain(|t| *t != id);
        }
    }

    /// Applies a change of a neighbour's link cost to its routes.
    fn neighbour_changed(&mut self, now: Instant, id: u32) {
        self.cost_cache = None;
        let Some(n) = self.neighbours.get_mut(&id) else { return };
        let cfg = &self.ifaces[&n.iface].cfg;
        let cost = n.cost(now, cfg);
        let up = cost < INFINITY;
        if up != n.was_up {
            n.was_up = up;
            let ev = if up {
                Event::NeighbourUp { iface: n.iface, addr: n.addr }
            } else {
                Event::NeighbourDown { iface: n.iface, addr: n.addr }
            };
            tracing::debug!(iface = n.iface, addr = %n.addr, up, "Babel neighbour reachability changed");
            self.events.push_back(ev);
        }
        if cost == n.last_cost {
            return;
        }
        n.last_cost = cost;
        let keys = self.keys_via(id);
        for key in keys {
            let Some(slot) = self.routes.get_mut(&key) else { continue };
            let Some(i) = slot.position(id) else { continue };
            let old = slot.entries[i].metric;
            let new = add_metric(cost, slot.entries[i].refmetric);
            // The entry leaves its group (a group is also checked against
            // the link cost it formed with, but the cost used here may be
            // another than the one its updates will be handled with).
            if new != old {
                self.repeats.detach(&mut slot.entries[i]);
            }
            slot.entries[i].metric = new;
            // An entry that is not selected and gets worse, or better but not
            // by enough to win, changes nothing: skip the reselection (this
            // runs on every cost change, for every destination).
            let unchanged = match slot.selected() {
                Some(s) if s != i => new >= old || new.saturating_add(HYSTERESIS) > slot.entries[s].metric,
                _ => false,
            };
            if !unchanged {
                self.reselect(now, key);
            }
        }
    }

    fn check_neighbour(&mut self, now: Instant, id: u32) {
        let Some(n) = self.neighbours.get_mut(&id) else { return };
        n.expire(now);
        if n.is_dead(now) {
            self.drop_neighbour(now, id);
            return;
        }
        self.neighbour_changed(now, id);
        self.schedule_neighbour(id);
    }

    /// Sets the neighbour's entry in `nbr_due` to its next deadline.
    fn schedule_neighbour(&mut self, id: u32) {
        let Some(n) = self.neighbours.get(&id) else { return };
        let next = n.next_deadline().map_or(u64::MAX, |t| self.nanos(t));
        let slot = id as usize;
        let Some(at) = self.nbr_due.get_mut(slot) else { return };
        if *at == next {
            return;
        }
        *at = next;
        if slot == self.nbr_min {
            // Moved, nearly always later (the next Hello): find the new first.
            self.rescan_nbr_due();
        } else if self.nbr_due.get(self.nbr_min).is_none_or(|at| next < *at) {
            self.nbr_min = slot;
        }
    }

    // ---------------------------------------------------------- messages

    /// Handles one message of a packet from neighbour `nbr`, which is
    /// `from` on `iface`.
    fn handle_message(
        &mut self,
        now: Instant,
        nbr: u32,
        (iface, from): (IfaceId, Ipv6Addr),
        m: Message,
        packet_ts: Option<u32>,
    ) {
        match m {
            Message::AckReq { opaque, .. } => {
                self.queue(iface, Destination::Unicast(from), Message::Ack { opaque });
            }
            Message::Ack { .. } => {}
            Message::Hello { unicast: true, .. } => {}
            Message::Hello { unicast: false, seqno, interval, timestamp } => {
                let ts = timestamp.map(|t| (t, self.timestamp(now)));
                let n = self.neighbours.get_mut(&nbr).expect("neighbour");
                n.hello(now, seqno, interval, ts);
                self.neighbour_changed(now, nbr);
                self.schedule_neighbour(nbr);
            }
            Message::Ihu { rxcost, interval, addr, timestamps } => {
                let ours = self.ifaces[&iface].cfg.link_local;
                if addr.is_some_and(|a| a != IpAddr::V6(ours)) {
                    return;
                }
                let rtt = match (timestamps, packet_ts) {
                    // RFC 9616 §3.2: (t4 - t1) - (t3 - t2).
                    (Some((t1, t2)), Some(t3)) if t1 != 0 && t2 != 0 => {
                        let t4 = self.timestamp(now);
                        let total = t4.wrapping_sub(t1) as i32;
                        let remote = t3.wrapping_sub(t2) as i32;
                        Some(Duration::from_micros(total.saturating_sub(remote).max(0) as u64))
                    }
                    _ => None,
                };
                let cfg = self.ifaces[&iface].cfg.clone();
                let n = self.neighbours.get_mut(&nbr).expect("neighbour");
                n.ihu(now, rxcost, interval, rtt, &cfg);
                self.neighbour_changed(now, nbr);
                self.schedule_neighbour(nbr);
            }
            Message::Update { prefix: None, .. } => {
                let keys = self.keys_via(nbr);
                for key in keys {
                    self.remove_entry(&key, nbr);
                    self.reselect(now, key);
                }
            }
            Message::Update {
                prefix: Some(IpNet::V6(prefix)),
                src,
                router_id,
                next_hop,
                seqno,
                metric,
                interval,
            } => {
                let Some(src) = v6_src(src) else { return };
                // Our own routes echoed back are not routes (retractions are
                // about the neighbour's entry whatever router-id they carry).
                if router_id == self.id && metric != INFINITY {
                    return;
                }
                let next_hop = match next_hop {
                    Some(IpAddr::V6(a)) => a,
                    _ => from,
                };
                let hop = (next_hop, from);
                self.handle_update(now, nbr, (prefix, src), router_id, hop, seqno, metric, interval);
            }
            // IPv4 routes are parsed and ignored: the mesh is IPv6.
            Message::Update { .. } => {}
            Message::RouteReq(RequestTarget::All) => {
                self.send_full_update(now, iface, Destination::Unicast(from));
            }
            Message::RouteReq(RequestTarget::Prefix { prefix: IpNet::V6(p), src }) => {
                let Some(src) = v6_src(src) else { return };
                let key = (p, src);
                let msg = self.update_message(&key, iface);
                self.note_sent(now, &key, &msg);
                self.queue(iface, Destination::Unicast(from), msg);
            }
            Message::RouteReq(_) => {}
            Message::SeqnoReq { prefix: IpNet::V6(p), src, seqno, hop_count, router_id } => {
                let Some(src) = v6_src(src) else { return };
                self.handle_seqno_request(now, nbr, (p, src), seqno, hop_count, router_id);
            }
            Message::SeqnoReq { .. } => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_update(
        &mut self,
        now: Instant,
        nbr: u32,
        key: RouteKey,
        router_id: RouterId,
        (next_hop, from): (Ipv6Addr, Ipv6Addr),
        seqno: u16,
        refmetric: u16,
        interval: u16,
    ) {
        let (cost, default_interval) = match self.cost_cache {
            Some((id, c, u)) if id == nbr => (c, u),
            _ => {
                let n = &self.neighbours[&nbr];
                let cfg = &self.ifaces[&n.iface].cfg;
                let v = (n.cost(now, cfg), cfg.update_interval);
                self.cost_cache = Some((nbr, v.0, v.1));
                v
            }
        };
        self.stats.updates_in += 1;
        if refmetric == INFINITY {
            if self.remove_entry(&key, nbr) {
                self.stats.updates_changed += 1;
                self.reselect(now, key);
            }
            return;
        }
        let expires = match self.expiry_cache {
            Some((id, i, t)) if id == nbr && i == interval => t,
            _ => {
                let t = self.update_expiry(now, interval, default_interval);
                self.expiry_cache = Some((nbr, interval, t));
                t
            }
        };
        self.min_expiry = self.min_expiry.min(expires);
        let metric = add_metric(cost, refmetric);
        // Most updates are the periodic repetition of what the neighbour
        // said before: when nothing changed and a route is selected, only
        // the entry's lifetime moves (selection cannot change, and the
        // selected route is feasible).
        if let Some(slot) = self.routes.get_mut(&key)
            && slot.selected().is_some()
            && let Some(i) = slot.position(nbr)
            && slot.next_hop(nbr, from) == next_hop
            && let e = &mut slot.entries[i]
            && e.router_id == router_id
            && e.seqno == seqno
            && e.refmetric == refmetric
            && e.metric == metric
        {
            self.repeats.detach(e);
            e.expires = Expiry::at(expires);
            if let Some((g, k)) = self.forming {
                self.repeats.join(g, k, e);
            }
            return;
        }
        // A new destination's entries, one per neighbour, fill in together
        // (a new tunnel or a cold start): room for them all at once.
        let room = self.neighbours.len();
        let (slot, added) = self.routes.get_or_insert_with(key, || Slot::with_room(room));
        let was_selected_here = slot.selected().and_then(|i| slot.nbr_at(i)) == Some(nbr);
        let old_next_hop = slot.next_hop(nbr, from);
        let changed = match slot.position(nbr) {
            Some(i) => {
                let e = &mut slot.entries[i];
                self.repeats.detach(e);
                let changed = (e.router_id, e.seqno, e.refmetric, e.metric, old_next_hop)
                    != (router_id, seqno, refmetric, metric, next_hop);
                e.router_id = router_id;
                e.seqno = seqno;
                e.refmetric = refmetric;
                e.metric = metric;
                e.expires = Expiry::at(expires);
                changed
            }
            None => {
                slot.push(RouteEntry {
                    nbr,
                    router_id,
                    seqno,
                    refmetric,
                    metric,
                    expires: Expiry::at(expires),
                });
                true
            }
        };
        slot.set_next_hop(nbr, next_hop, from);
        // Another neighbour's route that cannot beat the selected one by
        // the hysteresis changes no selection: the rest of the table is as
        // the last selection saw it (a new tunnel brings a thousand such).
        let selection_stands = !was_selected_here
            && slot.selected().is_some_and(|s| metric.saturating_add(HYSTERESIS) > slot.entries[s].metric);
        if changed {
            self.stats.updates_changed += 1;
        }
        if added {
            self.count_key(&key, true);
            self.generation += 1;
        }
        if !selection_stands {
            self.reselect(now, key);
        }
        // Answer seqno requests the route we now use satisfies.
        self.satisfy_requests(now, &key);
        // RFC 8966 §3.8.2.2: an unfeasible update for the selected route (or
        // when nothing is selected) asks the source for a new seqno. Nothing
        // above changes the source table, so feasibility is checked only
        // for those (a lookup that nearly always misses the cache, skipped
        // for the many updates from neighbours whose routes are not used).
        let selected_elsewhere =
            self.routes.get(&key).is_some_and(|s| s.selected().is_some()) && !was_selected_here;
        if !selected_elsewhere && !self.feasible(&key, router_id, seqno, refmetric) {
            let want = self.sources.get(&(key, router_id)).map_or(seqno, |s| s.seqno.wrapping_add(1));
            self.send_seqno_request(now, key, router_id, want, REQUEST_HOPS, vec![nbr], true);
        }
        // The entry joins its datagram's group if the same update again
        // would only refresh it.
        if let Some((g, k)) = self.forming
            && let Some(slot) = self.routes.get_mut(&key)
            && slot.selected().is_some()
            && slot.next_hop(nbr, from) == next_hop
            && let Some(i) = slot.position(nbr)
            && let e = &mut slot.entries[i]
            && (e.router_id, e.seqno, e.refmetric, e.metric, e.expires)
                == (router_id, seqno, refmetric, metric, Expiry::at(expires))
        {
            self.repeats.join(g, k, e);
        }
    }

    fn handle_seqno_request(
        &mut self,
        now: Instant,
        from: u32,
        key: RouteKey,
        seqno: u16,
        hop_count: u8,
        router_id: RouterId,
    ) {
        if self.xroutes.contains(&key) {
            if router_id == self.id && seqno_newer(seqno, self.seqno) {
                self.seqno = seqno;
                self.stats.seqno_bumps += 1;
                self.generation += 1;
                self.events.push_back(Event::SeqnoChanged(self.seqno));
                tracing::debug!(seqno, "seqno bumped on request");
            }
            self.answer(now, key, from);
            return;
        }
        let Some(slot) = self.routes.get(&key) else { return };
        let selected = slot.selected().map(|i| slot.entries[i].clone());
        if let Some(e) = &selected
            && (e.router_id != router_id || !seqno_newer(seqno, e.seqno))
        {
            // Our route is recent enough, or from another source: send it.
            self.answer(now, key, from);
            return;
        }
        if hop_count < 2 {
            return;
        }
        // Forward towards the source, never back to the requester: if our
        // route goes through it, through the best other neighbour (babeld
        // does the same; the requester is often our next hop when a link
        // it used just broke).
        let successor =
            selected.filter(|e| e.nbr != from && e.metric < INFINITY).map(|e| e.nbr).or_else(|| {
                slot.entries
                    .iter()
                    .filter(|e| e.nbr != from && e.metric < INFINITY)
                    .min_by_key(|e| (e.metric, e.router_id))
                    .map(|e| e.nbr)
            });
        let Some(successor) = successor else { return };
        // Duplicates are suppressed there: a request already pending for
        // this source and seqno is not sent again to a neighbour it went
        // to, but it does go to a new successor (our route may have moved
        // since, e.g. off the link whose loss started it all).
        self.send_seqno_request(now, key, router_id, seqno, hop_count - 1, vec![successor], false);
    }

    /// Answers neighbour `nbr`'s request for `key` with our route, on its
    /// interface alone and at once, as babeld does (`send_update(ifp, 1,
    /// …)`): the other neighbours have not asked (they get the route with
    /// the periodic updates, or ask themselves), and a lost answer is
    /// asked for again. Answering on every interface, three times over,
    /// made a tunnel refresh of the thousand send about 60 times the
    /// updates babeld would.
    fn answer(&mut self, now: Instant, key: RouteKey, nbr: u32) {
        let Some(iface) = self.neighbours.get(&nbr).map(|n| n.iface) else { return };
        let msg = self.update_message(&key, iface);
        self.note_sent(now, &key, &msg);
        self.queue(iface, Destination::Multicast, msg);
    }

    /// Asks neighbours `to` for seqno `seqno` of `router_id`'s route to
    /// `key` (`ours`: we originate the request; else we pass a neighbour's
    /// on). A request already pending goes only to those not asked yet.
    #[allow(clippy::too_many_arguments)]
    fn send_seqno_request(
        &mut self,
        now: Instant,
        key: RouteKey,
        router_id: RouterId,
        seqno: u16,
        hop_count: u8,
        to: Vec<u32>,
        ours: bool,
    ) {
        let rid = self.route_id(key);
        if let Some(p) = self.pending.get_mut(&rid)
            && p.router_id == router_id
            && !seqno_newer(seqno, p.seqno)
        {
            // Already asked: only ask the neighbours not asked yet.
            let new: Vec<u32> = to.into_iter().filter(|t| !p.to.contains(t)).collect();
            if !new.is_empty() {
                self.stats.count_requests(ours, new.len());
                p.to.extend(&new);
                let once = Pending { to: new, ..p.clone() };
                self.emit_request(&once);
            }
            return;
        }
        let p = Pending {
            key,
            router_id,
            seqno,
            hop_count,
            to,
            resends: REQUEST_RESENDS,
            timeout: REQUEST_TIMEOUT,
            ours,
        };
        self.stats.count_requests(ours, p.to.len());
        self.emit_request(&p);
        self.schedule(now + p.timeout, Timer::Request(rid));
        self.pending.insert(rid, p);
    }

    fn emit_request(&mut self, p: &Pending) {
        let msg = Message::SeqnoReq {
            prefix: IpNet::V6(p.key.0),
            src: p.key.1.map(IpNet::V6),
            seqno: p.seqno,
            hop_count: p.hop_count,
            router_id: p.router_id,
        };
        for id in &p.to {
            if let Some(n) = self.neighbours.get(id) {
                let (iface, addr) = (n.iface, n.addr);
                self.queue(iface, Destination::Unicast(addr), msg.clone());
            }
        }
    }

    /// Answers the seqno request pending for `key`, if the route we
    /// selected now satisfies it (babeld's `unsatisfied_request`, checked
    /// against the installed route): an update with the new seqno that we
    /// did not select would only send our old route to whoever asked.
    /// Nor does a route through a drained interface: the source's answer
    /// often comes first straight through the tunnel being drained, and
    /// taking that as the answer left the new seqno with nowhere else to
    /// come from but the periodic updates (the drained tunnel's far end
    /// was lost when it closed).
    ///
    /// A request not yet satisfied follows our selection: when the route
    /// moved to a neighbour not asked yet, it is asked too (as babeld
    /// forwards a request to the installed route's next hop). Else the
    /// answer came back only along the path we used when the request came,
    /// often a tunnel drained since.
    fn satisfy_requests(&mut self, now: Instant, key: &RouteKey) {
        if self.pending.is_empty() {
            return;
        }
        let Some((router_id, seqno, nbr)) = self.routes.get(key).and_then(|s| {
            s.selected().map(|i| (s.entries[i].router_id, s.entries[i].seqno, s.entries[i].nbr))
        }) else {
            return;
        };
        let drained = self
            .neighbours
            .get(&nbr)
            .and_then(|n| self.ifaces.get(&n.iface))
            .is_some_and(|i| i.cfg.min_cost > 0);
        if drained {
            return;
        }
        let Some(rid) = self.route_ids.get(key).copied() else { return };
        let Some(p) = self.pending.get(&rid) else { return };
        if p.router_id == router_id && !seqno_newer(p.seqno, seqno) {
            self.pending.remove(&rid);
            // Whoever asked through us hears about it through the triggered
            // update: sent at once, once (babeld's `urgent = 1`); if it is
            // lost, the requester asks again.
            self.trigger(now, *key, Urgency::Now);
        } else if !p.to.contains(&nbr) && p.hop_count >= 1 {
            let (want_id, want, hops, ours) = (p.router_id, p.seqno, p.hop_count, p.ours);
            self.send_seqno_request(now, *key, want_id, want, hops, vec![nbr], ours);
        }
    }

    // --------------------------------------------------------- selection

    /// RFC 8966 §3.5.1, with modular seqno comparison.
    fn feasible(&self, key: &RouteKey, router_id: RouterId, seqno: u16, refmetric: u16) -> bool {
        if refmetric == INFINITY {
            return true;
        }
        match self.sources.get(&(*key, router_id)) {
            None => true,
            Some(s) => seqno_newer(seqno, s.seqno) || (seqno == s.seqno && refmetric < s.metric),
        }
    }

    /// Chooses the route for `key` again and reports any change.
    fn reselect(&mut self, now: Instant, key: RouteKey) {
        if self.xroutes.contains(&key) {
            return;
        }
        let Some(slot) = self.routes.get(&key) else { return };
        let usable =
            |e: &RouteEntry| e.metric < INFINITY && self.feasible(&key, e.router_id, e.seqno, e.refmetric);
        let best_among = |feasible_only: bool| {
            slot.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| if feasible_only { usable(e) } else { e.metric < INFINITY })
                .min_by_key(|(_, e)| (e.metric, e.router_id))
                .map(|(i, _)| i)
        };
        // The best finite route is nearly always feasible: check that one
        // first (feasibility is a hash lookup per entry).
        let best = match best_among(false) {
            Some(i) if usable(&slot.entries[i]) => Some(i),
            None => None,
            Some(_) => best_among(true),
        };
        let current = slot.selected().filter(|&i| usable(&slot.entries[i]));
        let choice = match (current, best) {
            (Some(c), Some(b)) => {
                let (cm, bm) = (slot.entries[c].metric, slot.entries[b].metric);
                if bm.saturating_add(HYSTERESIS) <= cm { Some(b) } else { Some(c) }
            }
            (None, b) => b,
            (c, None) => c,
        };
        let after = choice.map(|i| {
            let e = &slot.entries[i];
            Installed::new(e, slot.next_hop(e.nbr, self.neighbours[&e.nbr].addr))
        });
        let slot = self.routes.get_mut(&key).expect("slot");
        slot.set_selected(choice);
        if choice.is_none() {
            // An update for a destination without a selection is handled in
            // full (it may ask for a seqno): its entries leave their groups.
            for e in &mut slot.entries {
                self.repeats.detach(e);
            }
        }
        let before = slot.replace_installed(after.clone());
        let empty = slot.entries.is_empty();
        match (&before, &after) {
            (_, Some(a)) => {
                if before.as_ref() != Some(a) {
                    let iface = self.neighbours[&a.nbr].iface;
                    let moved = before.as_ref().is_none_or(|b| {
                        b.nbr != a.nbr
                            || b.metric != a.metric
                            || b.next_hop != a.next_hop
                            || b.router_id != a.router_id
                    });
                    if moved {
                        self.events.push_back(Event::Selected {
                            prefix: key.0,
                            src: key.1,
                            iface,
                            next_hop: a.next_hop,
                            metric: a.metric,
                            router_id: a.router_id,
                        });
                    }
                }
                if let Some(u) = triggered_update(before.as_ref(), a) {
                    self.trigger(now, key, u);
                }
                if before.as_ref().is_some_and(|b| a.metric > b.metric) {
                    self.request_if_starving(now, key, a.metric);
                }
            }
            (Some(_), None) => {
                self.events.push_back(Event::Unselected { prefix: key.0, src: key.1 });
                self.trigger(now, key, Urgency::Resend);
                // Starving: ask the sources of unfeasible routes for a new seqno.
                let asks: Vec<(RouterId, u16, u32)> = self.routes[&key]
                    .entries
                    .iter()
                    .filter(|e| e.metric < INFINITY)
                    .map(|e| {
                        let want = self
                            .sources
                            .get(&(key, e.router_id))
                            .map_or(e.seqno, |s| s.seqno.wrapping_add(1));
                        (e.router_id, want, e.nbr)
                    })
                    .collect();
                for (rid, want, nbr) in asks {
                    self.send_seqno_request(now, key, rid, want, REQUEST_HOPS, vec![nbr], true);
                }
            }
            (None, None) => {}
        }
        if before != after {
            self.generation += 1;
            // A new seqno goes at once only to whoever asked for it.
            if after.is_some() {
                self.satisfy_requests(now, &key);
            }
        }
        if empty && after.is_none() && self.routes.remove(&key).is_some() {
            self.count_key(&key, false);
            self.generation += 1;
        }
    }

    /// Our route to `key` just got worse (a tunnel being drained, a link
    /// degrading): if a neighbour offers a much better route that is not
    /// feasible, ask its source for a new seqno now, rather than when the
    /// selected route is lost (babeld asks when such an update arrives; with
    /// long update intervals that can be after the route is gone).
    fn request_if_starving(&mut self, now: Instant, key: RouteKey, metric: u16) {
        let Some(slot) = self.routes.get(&key) else { return };
        let better = slot
            .entries
            .iter()
            .filter(|e| {
                e.metric < INFINITY
                    && e.metric.saturating_add(256) < metric
                    && !self.feasible(&key, e.router_id, e.seqno, e.refmetric)
            })
            .min_by_key(|e| (e.metric, e.router_id))
            .map(|e| (e.router_id, e.seqno, e.nbr));
        if let Some((rid, seqno, nbr)) = better {
            let want = self.sources.get(&(key, rid)).map_or(seqno, |s| s.seqno.wrapping_add(1));
            self.send_seqno_request(now, key, rid, want, REQUEST_HOPS, vec![nbr], true);
        }
    }

    // ----------------------------------------------------------- output

    /// The update we would send now for `key` on `iface`.
    fn update_message(&self, key: &RouteKey, iface: IfaceId) -> Message {
        let interval = self.announced_interval(iface);
        let (router_id, seqno, metric) = if self.xroutes.contains(key) {
            (self.id, self.seqno, 0)
        } else if let Some(e) = self.routes.get(key).and_then(|s| s.selected().map(|i| &s.entries[i])) {
            (e.router_id, e.seqno, e.metric)
        } else {
            (self.id, self.seqno, INFINITY)
        };
        update_for(key, router_id, seqno, metric, interval)
    }

    /// The update interval we announce on `iface`, in centiseconds.
    fn announced_interval(&self, iface: IfaceId) -> u16 {
        centis(self.ifaces.get(&iface).map_or(Duration::from_secs(16), |i| i.cfg.update_interval))
    }

    /// Maintains the source table for an update we send (RFC 8966 §3.7.3).
    fn note_sent(&mut self, now: Instant, key: &RouteKey, msg: &Message) {
        let Message::Update { router_id, seqno, metric, .. } = *msg else { return };
        if metric == INFINITY {
            return;
        }
        let s = self.sources.entry((*key, router_id)).or_insert(Source { seqno, metric, used: now });
        if seqno_newer(seqno, s.seqno) {
            s.seqno = seqno;
            s.metric = metric;
        } else if seqno == s.seqno && metric < s.metric {
            s.metric = metric;
        }
        s.used = now;
    }

    fn send_full_update(&mut self, now: Instant, iface: IfaceId, dst: Destination) {
        let interval = self.announced_interval(iface);
        if let Some(f) = &self.full_update
            && f.generation == self.generation
            && f.interval == interval
            && now.saturating_duration_since(f.noted) < FULL_UPDATE_REUSE
        {
            // Nothing it carries changed, and its sources were noted with
            // these very values: only sending is left.
            let msgs = f.msgs.clone();
            self.enqueue(iface, dst, Queued::Shared(msgs));
            return;
        }
        // What `updates_for` would give for our prefixes and then every
        // selected route, in that order, built in one pass over the table
        // (this runs for every neighbour every update interval: looking each
        // route up again was a fifth of it).
        let mut msgs: Vec<(RouteKey, Message)> = Vec::with_capacity(self.xroutes.len() + self.routes.len());
        let ours: Vec<RouteKey> = self.xroutes.iter().copied().collect();
        for key in &ours {
            msgs.push((*key, self.update_message(key, iface)));
        }
        for (key, slot) in &self.routes {
            let Some(i) = slot.selected() else { continue };
            let (router_id, seqno, metric) = if ours.contains(key) {
                (self.id, self.seqno, 0)
            } else {
                let e = &slot.entries[i];
                (e.router_id, e.seqno, e.metric)
            };
            msgs.push((*key, update_for(key, router_id, seqno, metric, interval)));
        }
        for (key, msg) in &msgs {
            self.note_sent(now, key, msg);
        }
        let msgs: Arc<[Message]> = msgs.into_iter().map(|(_, m)| m).collect();
        self.enqueue(iface, dst, Queued::Shared(msgs.clone()));
        // The previous one's encoding is of no more use.
        self.encoded = None;
        self.full_update = Some(FullUpdate { generation: self.generation, interval, noted: now, msgs });
    }

    /// Our current update for each of `keys` on `iface`, their sources
    /// noted as sent.
    fn updates_for(&mut self, now: Instant, iface: IfaceId, keys: &[RouteKey]) -> Vec<Message> {
        let mut msgs = Vec::with_capacity(keys.len());
        for key in keys {
            let msg = self.update_message(key, iface);
            self.note_sent(now, key, &msg);
            msgs.push(msg);
        }
        msgs
    }

    fn send_hello(&mut self, now: Instant, iface: IfaceId) {
        let ts = self.timestamp(now);
        let Some(i) = self.ifaces.get_mut(&iface) else { return };
        i.hello_seqno = i.hello_seqno.wrapping_add(1);
        i.hellos_sent = i.hellos_sent.wrapping_add(1);
        let i = &self.ifaces[&iface];
        let cfg = &i.cfg;
        let with_ihu = i.hellos_sent % cfg.ihu_every() == 1 % cfg.ihu_every();
        let hello = Message::Hello {
            unicast: false,
            seqno: i.hello_seqno,
            interval: centis(cfg.hello_interval),
            timestamp: cfg.rtt.map(|_| ts),
        };
        let mut ihus = std::mem::take(&mut self.ihu_buf);
        if with_ihu {
            self.ihus(iface, &mut ihus);
        }
        self.enqueue(iface, Destination::Multicast, Queued::Msg(hello));
        for ihu in ihus.drain(..) {
            self.enqueue(iface, Destination::Multicast, Queued::Msg(ihu));
        }
        self.ihu_buf = ihus;
    }

    /// An IHU for each neighbour on `iface`, in address order, into
    /// `ihus` (a Hello's: a buffer kept for its allocation).
    fn ihus(&self, iface: IfaceId, ihus: &mut Vec<Message>) {
        let Some(i) = self.ifaces.get(&iface) else { return };
        let cfg = &i.cfg;
        let ihu_interval = centis(cfg.hello_interval * u32::from(cfg.ihu_every()));
        // The interface's own list: scanning every neighbour for it cost
        // a cache miss per neighbour on each of twenty tunnels' Hellos.
        ihus.extend(i.nbrs.iter().filter_map(|(id, _)| self.neighbours.get(&id)).map(|n| Message::Ihu {
            rxcost: n.rxcost(cfg),
            interval: ihu_interval,
            addr: Some(IpAddr::V6(n.addr)),
            timestamps: cfg.rtt.and(n.last_hello_ts),
        }));
        ihus.sort_by_key(|m| match m {
            Message::Ihu { addr, .. } => *addr,
            _ => None,
        });
    }

    /// Marks `key` for a triggered update on every interface, sent after a
    /// short delay that lets simultaneous changes share datagrams.
    fn trigger(&mut self, now: Instant, key: RouteKey, urgency: Urgency) {
        self.triggered.insert(key);
        let delay = match urgency {
            Urgency::Normal => roughly(self.min_hello.min(NORMAL_FLUSH), self.next_random()),
            Urgency::Fast => roughly(self.min_hello.min(URGENT_FLUSH), self.next_random()),
            // On the critical path of recovery (a route lost, a seqno asked
            // for): nearly at once.
            Urgency::Resend | Urgency::Now => roughly(RESEND_FLUSH, self.next_random()),
        };
        self.flush_at = Some(self.flush_at.map_or(now + delay, |t| t.min(now + delay)));
        if urgency == Urgency::Resend {
            let rid = self.route_id(key);
            self.urgent.insert(rid, URGENT_REPEAT - 1);
        }
    }

    /// Recomputes `min_hello` after the interfaces changed.
    fn update_min_hello(&mut self) {
        self.min_hello =
            self.ifaces.values().map(|i| i.cfg.hello_interval).min().unwrap_or(Duration::from_secs(4));
    }

    /// Queues `q` for `dst` on `iface`, after what is queued already.
    fn enqueue(&mut self, iface: IfaceId, dst: Destination, q: Queued) {
        let seq = self.out.len() as u32;
        self.out.push(((iface, dst), seq, q));
    }

    fn queue(&mut self, iface: IfaceId, dst: Destination, m: Message) {
        self.enqueue(iface, dst, Queued::Msg(m));
    }

    /// Turns queued messages, and triggered updates once due, into datagrams.
    fn flush(&mut self, now: Instant) {
        if self.flush_at.is_some_and(|t| t <= now) {
            self.flush_at = None;
            let keys: Vec<RouteKey> = std::mem::take(&mut self.triggered).into_iter().collect();
            let mut ifaces: Vec<(IfaceId, u16)> = if keys.is_empty() {
                Vec::new()
            } else {
                self.ifaces.keys().map(|id| (id, self.announced_interval(id))).collect()
            };
            ifaces.sort_unstable();
            // The updates differ between interfaces only by the interval
            // they announce: built (and their sources noted) once per
            // interval, not once per tunnel, and shared by the queues, so
            // that they are encoded once too (a cold start or a tunnel
            // refresh sends hundreds of them on twenty tunnels).
            let mut batches: Vec<(u16, Arc<[Message]>)> = Vec::new();
            for &(iface, interval) in &ifaces {
                let msgs = match batches.iter().find(|(i, _)| *i == interval) {
                    Some((_, msgs)) => msgs.clone(),
                    None => {
                        let msgs: Arc<[Message]> = self.updates_for(now, iface, &keys).into();
                        batches.push((interval, msgs.clone()));
                        msgs
                    }
                };
                self.enqueue(iface, Destination::Multicast, Queued::Shared(msgs));
            }
            for key in &keys {
                if let Some(rid) = self.route_ids.get(key)
                    && self.urgent.contains_key(rid)
                {
                    self.schedule(now + URGENT_INTERVAL, Timer::Urgent(*rid));
                }
            }
        }
        let mut out = std::mem::take(&mut self.out);
        // By destination, each in the order queued (the places are unique).
        out.sort_unstable_by_key(|(k, seq, _)| (*k, *seq));
        let mut rest = &out[..];
        while let Some(&((iface, dst), ..)) = rest.first() {
            let n = rest.iter().take_while(|(k, ..)| *k == (iface, dst)).count();
            let (queued, tail) = rest.split_at(n);
            rest = tail;
            let Some(i) = self.ifaces.get(&iface) else { continue };
            let mtu = i.cfg.mtu;
            // Shared messages alone (a full update, a flush's triggered
            // updates): the same datagrams as on the other interfaces.
            if let [(.., Queued::Shared(msgs))] = queued {
                let e = match &mut self.encoded {
                    Some(e) if e.mtu == mtu && Arc::ptr_eq(&e.msgs, msgs) => e,
                    e => {
                        let mut b = PacketBuilder::new(mtu);
                        msgs.iter().for_each(|m| b.push(m));
                        e.insert(Encoded { msgs: msgs.clone(), mtu, builder: b, datagrams: None })
                    }
                };
                let datagrams = e.datagrams.get_or_insert_with(|| {
                    e.builder.clone().finish().into_iter().map(Arc::from).collect::<Vec<Arc<[u8]>>>().into()
                });
                for d in datagrams.iter() {
                    self.stats.packets_out += 1;
                    self.stats.bytes_out += d.len() as u64;
                    self.transmits.push_back(Transmit { iface, dst, payload: Payload::Shared(d.clone()) });
                }
                continue;
            }
            let mut b = PacketBuilder::new(mtu);
            for (.., q) in queued {
                match q {
                    Queued::Msg(m) => b.push(m),
                    Queued::Shared(msgs) => {
                        // Only what starts a datagram encodes alike everywhere.
                        let first = b.is_empty();
                        match &self.encoded {
                            Some(e) if first && e.mtu == mtu && Arc::ptr_eq(&e.msgs, msgs) => {
                                b = e.builder.clone()
                            }
                            _ => {
                                msgs.iter().for_each(|m| b.push(m));
                                if first {
                                    self.encoded = Some(Encoded {
                                        msgs: msgs.clone(),
                                        mtu,
                                        builder: b.clone(),
                                        datagrams: None,
                                    });
                                }
                            }
                        }
                    }
                }
            }
            let (stats, transmits) = (&mut self.stats, &mut self.transmits);
            b.finish_each(|payload| {
                stats.packets_out += 1;
                stats.bytes_out += payload.len() as u64;
                transmits.push_back(Transmit { iface, dst, payload: Payload::Own(payload) });
            });
        }
        // Nothing was queued meanwhile: keep the allocation.
        out.clear();
        self.out = out;
    }

    // ------------------------------------------------------------ timers

    /// Schedules an interface's next Hello (`hello`) or full update.
    fn schedule_periodic(&mut self, at: Instant, iface: IfaceId, hello: bool) {
        let ns = self.nanos(at);
        if let Some(i) = self.ifaces.get_mut(&iface) {
            *i.next_periodic_mut(hello) = ns;
            self.periodic_top = self.periodic_top.min(ns);
        }
    }

    /// Finds the earliest Hello or full update again.
    fn rescan_periodic(&mut self) {
        self.periodic_top =
            self.ifaces.values().map(|i| i.next_hello.min(i.next_update)).min().unwrap_or(u64::MAX);
    }

    /// Sends the Hello or full update due at `at` (the earliest of any
    /// interface, the first such in id order), and those of every
    /// interface of the same kind and interval whose own is due within half
    /// an interval: early, never late. A node's tunnels soon share one
    /// wake-up of each kind per interval rather than one per tunnel, and a
    /// full update built once serves them all (built apart, each was built
    /// anew whenever a route had changed in between).
    fn fire_periodic(&mut self, now: Instant, at: u64) {
        let first = self.ifaces.iter().find_map(|(id, i)| {
            if i.next_hello == at {
                Some((id, true))
            } else if i.next_update == at {
                Some((id, false))
            } else {
                None
            }
        });
        let Some((iface, hello)) = first else {
            self.rescan_periodic();
            return;
        };
        let at = self.instant(at);
        let interval = |c: &InterfaceConfig| if hello { c.hello_interval } else { c.update_interval };
        let h = interval(&self.ifaces[&iface].cfg);
        let jitter = self.jitter(h);
        let next = at.max(now - h) + h - jitter / 2;
        let soon = self.nanos(now + h / 2);
        let next = self.nanos(next);
        let mut due = std::mem::take(&mut self.periodic_buf);
        due.extend(
            self.ifaces
                .iter()
                .filter(|(_, j)| interval(&j.cfg) == h && j.next_periodic(hello) <= soon)
                .map(|(id, _)| id),
        );
        // In id order (the table's), so that datagrams go out in a fixed order.
        for &j in &due {
            if hello {
                self.send_hello(now, j);
            } else {
                self.send_full_update(now, j, Destination::Multicast);
            }
            if let Some(i) = self.ifaces.get_mut(&j) {
                *i.next_periodic_mut(hello) = next;
            }
        }
        due.clear();
        self.periodic_buf = due;
        self.rescan_periodic();
    }

    fn schedule(&mut self, at: Instant, t: Timer) {
        self.timer_seq += 1;
        let at = self.nanos(at);
        self.timers.push(Reverse((at, self.timer_seq, t)));
        self.timers_top = self.timers_top.min(at);
    }

    /// `t` as nanoseconds since the epoch (the timer heap's clock).
    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The inverse of [`Router::nanos`].
    fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    fn fire(&mut self, now: Instant, timer: Timer) {
        match timer {
            Timer::ExpireRoutes => {
                // One sweep now and then rather than a timer per entry: with
                // thousands of destinations per neighbour those timers were
                // most of the timer heap (babeld sweeps too).
                // Entries are refreshed long before they expire: most sweeps
                // know from `min_expiry` that there is nothing to look at.
                let now_ticks = Ticks::floor(self.epoch, now);
                let mut expired: Vec<(RouteKey, u32)> = Vec::new();
                if self.min_expiry <= now_ticks {
                    let mut min = Ticks::MAX;
                    for (k, slot) in &self.routes {
                        for e in &slot.entries {
                            let t = self.repeats.expires(e);
                            if t <= now_ticks {
                                expired.push((*k, e.nbr));
                            } else {
                                min = min.min(t);
                            }
                        }
                    }
                    self.min_expiry = min;
                }
                for (key, nbr) in expired {
                    if self.remove_entry(&key, nbr) {
                        self.reselect(now, key);
                    }
                }
                self.repeats.sweep();
                let u = self.ifaces.values().map(|i| i.cfg.update_interval).min().unwrap_or(EXPIRY_SWEEP);
                self.schedule(now + (u / 4).clamp(EXPIRY_SWEEP, EXPIRY_SWEEP_MAX), Timer::ExpireRoutes);
            }
            Timer::Urgent(rid) => {
                let Some(left) = self.urgent.get_mut(&rid) else { return };
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.urgent.remove(&rid);
                }
                if let Some(key) = self.route_keys.get(&rid).copied() {
                    self.triggered.insert(key);
                    let at = now + roughly(RESEND_FLUSH, self.next_random());
                    self.flush_at = Some(self.flush_at.map_or(at, |t| t.min(at)));
                }
            }
            Timer::Request(rid) => {
                let Some(p) = self.pending.get_mut(&rid) else { return };
                if p.resends == 0 {
                    self.pending.remove(&rid);
                    return;
                }
                p.resends -= 1;
                p.timeout *= 2;
                let next = now + p.timeout;
                let p = self.pending.remove(&rid).expect("pending");
                self.emit_request(&p);
                self.pending.insert(rid, p);
                self.schedule(next, Timer::Request(rid));
            }
            Timer::SourceGc => {
                self.sources.retain(|_, s| now.saturating_duration_since(s.used) < SOURCE_GC);
                self.schedule(now + Duration::from_secs(60), Timer::SourceGc);
            }
        }
    }

    // ---------------------------------------------------------- helpers

    /// A small id for a route key, for timers (keys are 34 bytes).
    fn route_id(&mut self, key: RouteKey) -> u32 {
        if let Some(id) = self.route_ids.get(&key) {
            return *id;
        }
        let id = self.route_ids.len() as u32;
        self.route_ids.insert(key, id);
        self.route_keys.insert(id, key);
        id
    }

    /// Our RFC 9616 clock: microseconds since the router started, wrapping.
    fn timestamp(&self, now: Instant) -> u32 {
        // 0 means "no timestamp" to some peers; skip it.
        (now.saturating_duration_since(self.epoch).as_micros() as u32).max(1)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic per router-id, good enough for jitter.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Up to a quarter of `d`, at random.
    fn jitter(&mut self, d: Duration) -> Duration {
        let quarter = d.as_micros() as u64 / 4;
        if quarter == 0 { Duration::ZERO } else { Duration::from_micros(self.next_random() % quarter) }
    }
}

/// The source prefix of an IPv6 route's TLV; `None` if it is an IPv4 one
/// (a mismatch the mesh ignores).
fn v6_src(src: Option<IpNet>) -> Option<Option<Ipv6Net>> {
    match src {
        None => Some(None),
        Some(IpNet::V6(s)) => Some(Some(s)),
        Some(IpNet::V4(_)) => None,
    }
}

/// Asks the CPU to bring the cache line at `p` into the cache, without
/// waiting for it (also for the simulator's event loop).
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    // SAFETY: SSE is part of every x86_64 CPU, and a prefetch is a hint
    // that never faults, whatever the address, and reads nothing the
    // program sees.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Gives back most of an emptied queue's room once a burst has gone (a
/// full update on twenty tunnels is hundreds of datagrams; kept, that room
/// was tens of kilobytes per node for good).
pub fn shrink_idle<T>(q: &mut VecDeque<T>) {
    const KEEP: usize = 64;
    if q.is_empty() && q.capacity() > 4 * KEEP {
        q.shrink_to(KEEP);
    }
}

/// How soon a triggered update goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Urgency {
    /// Within about a Hello interval (at most 4 s).
    Normal,
    /// Within about 100 ms.
    Fast,
    /// Within about 10 ms, once (a seqno asked for that arrived).
    Now,
    /// Within about 10 ms, and repeated (retractions, source switches).
    Resend,
}

/// Whether a change of the selected route is worth a triggered update, as
/// babeld's `send_triggered_update` decides: a new route and a switch of
/// source (router-id) always; a route getting much worse quickly; small
/// changes, and improvements below 1024, not at all (they would only make
/// routes unfeasible downstream, and the periodic update carries them).
/// A new seqno alone is not sent either: it goes at once only along the
/// path of the seqno request that asked for it (`satisfy_requests`), and
/// everywhere else with the periodic updates. Flooding it, as this did
/// before, made every seqno bump an update at every node on every link
/// (≈ 20,000 per bump with 1,000 nodes of 20 tunnels).
fn triggered_update(before: Option<&Installed>, after: &Installed) -> Option<Urgency> {
    let Some(b) = before else { return Some(Urgency::Fast) };
    if b.router_id != after.router_id {
        return Some(Urgency::Resend);
    }
    let (old, new) = (b.metric, after.metric);
    let diff = old.abs_diff(new);
    if new > old && old < 6 * 256 && diff >= 512 {
        Some(Urgency::Fast)
    } else if (new < old && diff < 1024) || diff < 384 {
        None
    } else {
        Some(Urgency::Normal)
    }
}

/// The route key of an update for an IPv6 prefix.
fn update_key(m: &Message) -> Option<RouteKey> {
    match m {
        Message::Update { prefix: Some(IpNet::V6(prefix)), src, .. } => Some((*prefix, v6_src(*src)?)),
        _ => None,
    }
}

/// `value` give or take a quarter, like babeld's `roughly`.
fn roughly(value: Duration, random: u64) -> Duration {
    let ms = value.as_millis() as u64;
    if ms <= 1 {
        return value;
    }
    Duration::from_millis(ms * 3 / 4 + random % (ms / 2).max(1))
}

/// The Update TLV for a destination (next hop: the sender).
fn update_for(key: &RouteKey, router_id: RouterId, seqno: u16, metric: u16, interval: u16) -> Message {
    Message::Update {
        prefix: Some(IpNet::V6(key.0)),
        src: key.1.map(IpNet::V6),
        router_id,
        next_hop: None,
        seqno,
        metric,
        interval,
    }
}

/// Metric composition M(c, m) = c + m, capped at infinity.
pub fn add_metric(cost: u16, metric: u16) -> u16 {
    (u32::from(cost) + u32::from(metric)).min(u32::from(INFINITY)) as u16
}

fn centis(d: Duration) -> u16 {
    // Without `as_millis()`'s 128-bit division: the same value.
    let c = d.as_secs().saturating_mul(100).saturating_add(u64::from(d.subsec_millis() / 10));
    c.min(u64::from(u16::MAX)) as u16
}

fn interval_duration(centis: u16, fallback: Duration) -> Duration {
    if centis == 0 { fallback } else { Duration::from_millis(u64::from(centis) * 10) }
}

fn is_link_local(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}
