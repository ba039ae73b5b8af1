//! The router's tables: neighbours (Hello history, IHU, RTT), route entries
//! per neighbour, and the source table (feasibility distances).

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;

use super::{IfaceId, InterfaceConfig, RttConfig, add_metric};
use crate::wire::{INFINITY, RouterId};

/// Whether seqno `a` is newer than `b`, modulo 2^16 (RFC 8966 §3.2.1).
pub fn seqno_newer(a: u16, b: u16) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 0x8000
}

/// A neighbour that has stopped sending Hellos is forgotten after this
/// many missed ones have emptied its history, or after this long silent.
const SILENT_DROP: Duration = Duration::from_secs(60);
/// An RTT sample older than this no longer counts (babeld: 180 s).
const RTT_VALID: Duration = Duration::from_secs(180);

#[derive(Clone, Debug)]
pub(super) struct Neighbour {
    pub iface: IfaceId,
    pub addr: Ipv6Addr,
    /// Hello history, most recent in the top bit (RFC 8966 A.1).
    reach: u16,
    hello_seqno: Option<u16>,
    hello_interval: Duration,
    hello_deadline: Option<Instant>,
    last_heard: Instant,
    txcost: u16,
    ihu_deadline: Option<Instant>,
    rtt: Option<Duration>,
    rtt_time: Option<Instant>,
    /// The RTT penalty of `rtt` (computed when it changes: the cost is asked
    /// for on every Hello and IHU, and the division showed in profiles).
    rtt_penalty: u16,
    /// (their Hello timestamp, our receive time) to echo in our next IHU.
    pub last_hello_ts: Option<(u32, u32)>,
    pub was_up: bool,
    pub last_cost: u16,
}

impl Neighbour {
    pub fn new(iface: IfaceId, addr: Ipv6Addr, now: Instant) -> Self {
        Neighbour {
            iface,
            addr,
            reach: 0,
            hello_seqno: None,
            hello_interval: Duration::from_secs(4),
            hello_deadline: None,
            last_heard: now,
            txcost: INFINITY,
            ihu_deadline: None,
            rtt: None,
            rtt_time: None,
            rtt_penalty: 0,
            last_hello_ts: None,
            was_up: false,
            last_cost: INFINITY,
        }
    }

    /// A multicast Hello arrived (RFC 8966 A.1, like babeld's
    /// `update_neighbour`: late Hellos undo the misses counted for them).
    pub fn hello(&mut self, now: Instant, seqno: u16, interval_cs: u16, ts: Option<(u32, u32)>) {
        if let Some(last) = self.hello_seqno {
            let gap = i32::from(seqno.wrapping_sub(last) as i16) - 1;
            if !(-8..=16).contains(&gap) {
                self.reach = 0;
            } else if gap < 0 {
                self.reach = self.reach.checked_shl((-gap) as u32).unwrap_or(0);
            } else if gap > 0 {
                // A gap of 16 empties the history (found by cargo fuzz).
                self.reach = self.reach.checked_shr(gap as u32).unwrap_or(0);
            }
        }
        self.reach = (self.reach >> 1) | 0x8000;
        self.hello_seqno = Some(seqno);
        if interval_cs > 0 {
            self.hello_interval = Duration::from_millis(u64::from(interval_cs) * 10);
            self.hello_deadline = Some(now + self.hello_interval * 3 / 2);
        }
        self.last_heard = now;
        self.last_hello_ts = ts;
    }

    /// An IHU about us arrived.
    pub fn ihu(
        &mut self,
        now: Instant,
        rxcost: u16,
        interval_cs: u16,
        rtt: Option<Duration>,
        cfg: &InterfaceConfig,
    ) {
        self.txcost = rxcost;
        let interval = if interval_cs == 0 {
            cfg.hello_interval * 3
        } else {
            Duration::from_millis(u64::from(interval_cs) * 10)
        };
        self.ihu_deadline = Some(now + interval * 7 / 2);
        self.last_heard = now;
        if let (Some(sample), Some(rc)) = (rtt, cfg.rtt) {
            let valid = self.rtt_fresh(now);
            self.rtt = Some(match self.rtt {
                Some(old) if valid => {
                    let us = (u128::from(rc.decay) * sample.as_micros()
                        + u128::from(256 - rc.decay.min(256)) * old.as_micros())
                        / 256;
                    Duration::from_micros(us as u64)
                }
                _ => sample,
            });
            self.rtt_time = Some(now);
            self.rtt_penalty = self.rtt.map_or(0, |rtt| rtt_penalty(rtt, &rc));
        }
    }

    /// Counts the Hellos that did not come and the IHU that expired.
    pub fn expire(&mut self, now: Instant) {
        while let Some(d) = self.hello_deadline {
            if d > now || self.reach == 0 {
                break;
            }
            self.reach >>= 1;
            self.hello_seqno = self.hello_seqno.map(|s| s.wrapping_add(1));
            self.hello_deadline = Some(d + self.hello_interval);
        }
        if self.ihu_deadline.is_some_and(|d| d <= now) {
            self.txcost = INFINITY;
            self.ihu_deadline = None;
        }
    }

    /// Nothing heard for long: forget it.
    pub fn is_dead(&self, now: Instant) -> bool {
        self.reach == 0
            && now.saturating_duration_since(self.last_heard) >= SILENT_DROP.min(self.hello_interval * 16)
    }

    /// The next time something about this neighbour may change.
    pub fn next_deadline(&self) -> Option<Instant> {
        let silent = (self.reach == 0).then(|| self.last_heard + SILENT_DROP.min(self.hello_interval * 16));
        [self.hello_deadline.filter(|_| self.reach != 0), self.ihu_deadline, silent]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether an RTT sample was taken less than [`RTT_VALID`] ago.
    fn rtt_fresh(&self, now: Instant) -> bool {
        self.rtt_time.is_some_and(|t| now.saturating_duration_since(t) < RTT_VALID)
    }

    /// Our cost of receiving from this neighbour: 2-out-of-3.
    pub fn rxcost(&self, cfg: &InterfaceConfig) -> u16 {
        if (self.reach & 0xE000).count_ones() >= 2 { cfg.cost } else { INFINITY }
    }

    /// The RTT penalty, while the last sample is recent: computed with the
    /// sample (samples are only taken on interfaces with RTT parameters,
    /// which never change).
    fn rtt_cost(&self, now: Instant) -> u16 {
        if self.rtt_fresh(now) { self.rtt_penalty } else { 0 }
    }

    /// Link cost: the neighbour's view of our Hellos (txcost) if we hear it
    /// too, plus the RTT penalty; at least the interface's `min_cost`.
    pub fn cost(&self, now: Instant, cfg: &InterfaceConfig) -> u16 {
        if self.rxcost(cfg) == INFINITY || self.txcost == INFINITY {
            return INFINITY;
        }
        add_metric(self.txcost, self.rtt_cost(now)).max(cfg.min_cost).min(INFINITY - 1)
    }

    pub fn info(&self, now: Instant, cfg: &InterfaceConfig) -> NeighbourInfo {
        NeighbourInfo {
            iface: self.iface,
            addr: self.addr,
            reach: self.reach,
            rxcost: self.rxcost(cfg),
            txcost: self.txcost,
            rtt_ms: self.rtt.map(|d| d.as_secs_f64() * 1000.0),
            rtt_cost: self.rtt_cost(now),
            cost: self.cost(now, cfg),
        }
    }
}

/// The penalty for an RTT of `rtt` (babeld's: none up to `min`, the
/// maximum from `max`, linear between).
fn rtt_penalty(rtt: Duration, rc: &RttConfig) -> u16 {
    if rc.max_penalty == 0 || rtt <= rc.min {
        return 0;
    }
    if rtt >= rc.max || rc.max <= rc.min {
        return rc.max_penalty;
    }
    // rc.min < rtt < rc.max: below max_penalty. In u64, not u128; the
    // products saturate only for RTTs of years.
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let frac =
        micros(rtt - rc.min).saturating_mul(u64::from(rc.max_penalty)) / micros(rc.max - rc.min).max(1);
    frac.min(u64::from(rc.max_penalty)) as u16
}

/// A neighbour as shown to operators.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NeighbourInfo {
    pub iface: IfaceId,
    pub addr: Ipv6Addr,
    pub reach: u16,
    pub rxcost: u16,
    pub txcost: u16,
    pub rtt_ms: Option<f64>,
    pub rtt_cost: u16,
    pub cost: u16,
}

/// A route as shown to operators.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouteInfo {
    pub prefix: Ipv6Net,
    pub src: Option<Ipv6Net>,
    pub router_id: RouterId,
    pub seqno: u16,
    pub metric: u16,
    pub refmetric: u16,
    /// `None` for a route we originate.
    pub next_hop: Option<Ipv6Addr>,
    pub iface: Option<IfaceId>,
    pub selected: bool,
    pub feasible: bool,
}

/// One neighbour's route to a destination. A router holds one per
/// destination per neighbour (20,000 with 1,000 destinations over 20
/// tunnels), so it is kept small: 24 bytes. Its next hop is the
/// neighbour's address unless [`Slot::next_hop`] says otherwise, and it
/// expires at a time or with the repeated datagram it came in
/// ([`Expiry`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RouteEntry {
    pub nbr: u32,
    pub router_id: RouterId,
    pub seqno: u16,
    pub refmetric: u16,
    pub metric: u16,
    pub expires: Expiry,
}

/// When a route entry expires: at a time, or when the datagram group it
/// belongs to does (see `repeats`: a datagram the neighbour repeats byte
/// for byte refreshes all its entries at once). In one `u32`, so that an
/// entry stays 24 bytes: the top bit tells which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Expiry(u32);

const GROUPED: u32 = 1 << 31;

impl Expiry {
    /// At `t` (times past 17 years from the epoch are taken as 17 years).
    pub fn at(t: Ticks) -> Self {
        Expiry(t.0.min(GROUPED - 1))
    }

    /// In group `g` (below [`Expiry::MAX_GROUPS`]), at place `k` of its
    /// chunk (below 16).
    pub fn group(g: u32, k: usize) -> Self {
        debug_assert!(g < Self::MAX_GROUPS && k < 16);
        Expiry(GROUPED | g << 4 | k as u32)
    }

    /// Groups there can be: the low four bits are the place.
    pub const MAX_GROUPS: u32 = 1 << 27;

    /// The group, if the entry expires with one.
    #[inline]
    pub fn group_id(self) -> Option<u32> {
        self.group_place().map(|(g, _)| g)
    }

    /// The group and the entry's place in its chunk, if it is in one.
    #[inline]
    pub fn group_place(self) -> Option<(u32, usize)> {
        (self.0 & GROUPED != 0).then_some(((self.0 & !GROUPED) >> 4, (self.0 & 15) as usize))
    }

    /// The time, if the entry has its own.
    #[inline]
    pub fn ticks(self) -> Option<Ticks> {
        (self.0 & GROUPED == 0).then_some(Ticks(self.0))
    }
}

/// A time as quarter-seconds since the router's epoch (34 years fit), for
/// route expiry: entries are swept every few seconds anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Ticks(pub(super) u32);

impl Ticks {
    /// A tick, in nanoseconds.
    const NANOS: u64 = 250_000_000;
    /// Later than any expiry.
    pub const MAX: Ticks = Ticks(u32::MAX);

    fn new(epoch: Instant, t: Instant, round_up: bool) -> Self {
        // In u64 (a 128-bit division per received update showed in
        // profiles); 584 years saturate, far past `u32::MAX` ticks anyway.
        let ns = u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        let ticks = if round_up { ns.div_ceil(Self::NANOS) } else { ns / Self::NANOS };
        Ticks(u32::try_from(ticks).unwrap_or(u32::MAX))
    }

    /// `t` rounded up: an entry never expires early.
    pub fn ceil(epoch: Instant, t: Instant) -> Self {
        Self::new(epoch, t, true)
    }

    /// `t` rounded down.
    pub fn floor(epoch: Instant, t: Instant) -> Self {
        Self::new(epoch, t, false)
    }
}

/// What was last reported for a destination, to tell changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Installed {
    pub nbr: u32,
    pub router_id: RouterId,
    pub seqno: u16,
    pub metric: u16,
    pub next_hop: Ipv6Addr,
}

impl Installed {
    pub fn new(e: &RouteEntry, next_hop: Ipv6Addr) -> Self {
        Installed { nbr: e.nbr, router_id: e.router_id, seqno: e.seqno, metric: e.metric, next_hop }
    }
}

/// Neighbour ids kept inside a [`Slot`] (more spill to the heap).
const INLINE_NBRS: usize = 24;

/// All neighbours' routes to one destination, and which one is selected.
/// A router holds one per destination, in its route table's buckets: what
/// every update received reads (the entries, the neighbour ids, the
/// selection) is kept together, and what few destinations need is boxed
/// (144 bytes, from 224: a bucket spans three cache lines, not four).
#[derive(Clone, Debug)]
pub(super) struct Slot {
    /// Add with [`Slot::push`], remove with [`Slot::remove_nbr`].
    pub entries: Vec<RouteEntry>,
    /// `entries[i].nbr`, packed and kept in the slot itself (the first
    /// [`INLINE_NBRS`]; the rest in `rare`): finding a neighbour's entry
    /// is the commonest lookup (every update received), and when the ids
    /// sit next to the slot's key, which the hash lookup just read, it
    /// costs no cache miss of its own.
    nbrs: [u32; INLINE_NBRS],
    rare: Option<Box<Rare>>,
    /// What was last reported for this destination.
    installed: Option<Box<Installed>>,
    /// Index of the selected entry, or [`NO_SELECTION`].
    selected: u32,
}

/// [`Slot::selected`]'s "none".
const NO_SELECTION: u32 = u32::MAX;

/// What few slots need: neighbour ids past [`INLINE_NBRS`], and the entries
/// whose next hop is not the neighbour's own address (a Next-Hop TLV said
/// so), by neighbour id.
#[derive(Clone, Debug, Default)]
struct Rare {
    spill: Vec<u32>,
    other_next_hops: Vec<(u32, Ipv6Addr)>,
}

/// The first index of `x` in `v`, eight at a time (the compiler makes
/// vector comparisons of each eight: a destination has ~20 neighbours'
/// entries, and this runs twice for every update received).
fn find_u32(v: &[u32], x: u32) -> Option<usize> {
    let mut chunks = v.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        // No early exit inside the eight: that is what lets it vectorise.
        if c.iter().fold(false, |any, &y| any | (y == x)) {
            return c.iter().position(|&y| y == x).map(|i| base + i);
        }
        base += 8;
    }
    chunks.remainder().iter().position(|&y| y == x).map(|i| base + i)
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            entries: Vec::new(),
            nbrs: [0; INLINE_NBRS],
            rare: None,
            installed: None,
            selected: NO_SELECTION,
        }
    }
}

impl Slot {
    /// An empty slot with room for `n` entries.
    pub fn with_room(n: usize) -> Self {
        Slot { entries: Vec::with_capacity(n), ..Slot::default() }
    }

    /// Index of the selected entry.
    #[inline]
    pub fn selected(&self) -> Option<usize> {
        (self.selected != NO_SELECTION).then_some(self.selected as usize)
    }

    /// Selects entry `i` (or none).
    pub fn set_selected(&mut self, i: Option<usize>) {
        // An index is below the number of entries, far below u32::MAX.
        self.selected = i.map_or(NO_SELECTION, |i| u32::try_from(i).unwrap_or(NO_SELECTION));
    }

    /// Records what is now reported, returning what was (in the box it
    /// was in, when there is still something: a new seqno or metric of the
    /// selected route is the commonest change, and a box freed and another
    /// allocated for it cost a cache miss on the allocator's side).
    pub fn replace_installed(&mut self, now: Option<Installed>) -> Option<Installed> {
        match (&mut self.installed, now) {
            (Some(b), Some(n)) => Some(std::mem::replace(&mut **b, n)),
            (slot, n) => std::mem::replace(slot, n.map(Box::new)).map(|b| *b),
        }
    }

    fn spill(&self) -> &[u32] {
        self.rare.as_ref().map_or(&[], |r| &r.spill)
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Frees the boxed part once it holds nothing.
    fn tidy_rare(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.spill.is_empty() && r.other_next_hops.is_empty()) {
            self.rare = None;
        }
    }

    /// Where the neighbour's entry is.
    #[inline]
    /// Starts loading what handling an update of neighbour `nbr` for this
    /// destination reads past the slot itself: its entry, the selected
    /// entry (compared with it) and the rare part (next hops), if any.
    pub fn prefetch_for(&self, nbr: u32) {
        if let Some(e) = self.position(nbr).and_then(|i| self.entries.get(i)) {
            super::prefetch(std::ptr::from_ref(e));
        }
        if let Some(e) = self.selected().and_then(|i| self.entries.get(i)) {
            super::prefetch(std::ptr::from_ref(e));
        }
        if let Some(r) = &self.rare {
            super::prefetch(std::ptr::from_ref::<Rare>(r));
        }
    }

    /// The neighbour of entry `i` (read from the slot's packed ids when it
    /// is among the first: no cache miss on the entries).
    pub fn nbr_at(&self, i: usize) -> Option<u32> {
        if i < INLINE_NBRS.min(self.entries.len()) {
            Some(self.nbrs[i])
        } else {
            self.entries.get(i).map(|e| e.nbr)
        }
    }

    pub fn position(&self, nbr: u32) -> Option<usize> {
        let n = self.entries.len();
        if let Some(i) = find_u32(&self.nbrs[..n.min(INLINE_NBRS)], nbr) {
            return Some(i);
        }
        find_u32(self.spill(), nbr).map(|i| i + INLINE_NBRS)
    }

    fn set_nbr(&mut self, i: usize, nbr: u32) {
        match self.nbrs.get_mut(i) {
            Some(x) => *x = nbr,
            None => self.rare().spill[i - INLINE_NBRS] = nbr,
        }
    }

    /// The next hop of neighbour `nbr`'s entry, `addr` being the
    /// neighbour's address.
    #[inline]
    pub fn next_hop(&self, nbr: u32, addr: Ipv6Addr) -> Ipv6Addr {
        let Some(r) = &self.rare else { return addr };
        r.other_next_hops.iter().find(|(n, _)| *n == nbr).map_or(addr, |(_, a)| *a)
    }

    /// Sets the next hop of neighbour `nbr`'s entry.
    pub fn set_next_hop(&mut self, nbr: u32, next_hop: Ipv6Addr, addr: Ipv6Addr) {
        let at = self.rare.as_ref().and_then(|r| r.other_next_hops.iter().position(|(n, _)| *n == nbr));
        match at {
            _ if next_hop == addr => {
                if let Some(i) = at {
                    self.rare().other_next_hops.swap_remove(i);
                    self.tidy_rare();
                }
            }
            Some(i) => self.rare().other_next_hops[i].1 = next_hop,
            None => self.rare().other_next_hops.push((nbr, next_hop)),
        }
    }

    /// Adds an entry (for a neighbour that has none yet). The vector
    /// grows four entries at a time, not doubling: a destination has as
    /// many entries as neighbours, and there are many destinations.
    pub fn push(&mut self, e: RouteEntry) {
        let i = self.entries.len();
        if i == self.entries.capacity() {
            self.entries.reserve_exact(4);
        }
        if i < INLINE_NBRS {
            self.nbrs[i] = e.nbr;
        } else {
            self.rare().spill.push(e.nbr);
        }
        self.entries.push(e);
    }

    /// Removes the neighbour's entry; true if there was one.
    pub fn remove_nbr(&mut self, nbr: u32) -> bool {
        let Some(i) = self.position(nbr) else { return false };
        self.entries.swap_remove(i);
        if let Some(r) = &mut self.rare {
            r.other_next_hops.retain(|(n, _)| *n != nbr);
        }
        let last = self.entries.len();
        // The last entry moved to `i`: so does its id.
        if i < last {
            let moved = self.entries[i].nbr;
            self.set_nbr(i, moved);
        }
        if last >= INLINE_NBRS {
            self.rare().spill.pop();
        }
        self.tidy_rare();
        self.set_selected(match self.selected() {
            Some(s) if s == i => None,
            Some(s) if s == last => Some(i),
            s => s,
        });
        true
    }
}

/// A feasibility distance (RFC 8966 §3.2.5).
#[derive(Clone, Copy, Debug)]
pub(super) struct Source {
    pub seqno: u16,
    pub metric: u16,
    pub used: Instant,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// The chunked search finds the first match, as a plain scan does,
        /// wherever it falls (in a chunk of eight, in the remainder, twice).
        #[test]
        fn find_u32_finds_what_a_scan_finds(v in proptest::collection::vec(0u32..6, 0..40), x in 0u32..7) {
            prop_assert_eq!(super::find_u32(&v, x), v.iter().position(|&y| y == x));
        }
    }
}
