//! Updates a neighbour repeats, refreshed in one step.
//!
//! A neighbour's periodic full update is, as long as its table does not
//! change, the same datagrams byte for byte every time (the sender reuses
//! its encoding), and when it changes, most of it is still the same.
//! Handling an update again only moves the expiry of the entry it
//! refreshed last time (the router's per-update shortcut): yet that costs
//! the destination's cache misses, a thousand per full update, nearly all
//! of a large mesh's steady-state work. Here the entries that a *chunk* of
//! a datagram's updates (up to [`CHUNK`] in a row) left in that state form
//! a *group*; while every member is untouched since, the same chunk again
//! (same neighbour, same updates, same link cost) moves the group's expiry
//! instead. A datagram whose chunks all have groups is filed too: the same
//! bytes again refresh its groups without being decoded.
//!
//! A chunk that comes again with some of its updates changed (a new seqno
//! or metric travelling through the mesh, carried by the periodic full
//! updates) need not have all its updates handled again: each member has
//! its place in the chunk, and the group keeps each place's seqno and
//! metric beside a hash of the rest of the chunk, so the unchanged members
//! are refreshed in their group and only the changed updates are handled,
//! joining the group again at their places ([`Repeats::reopen`]).
//!
//! The router keeps the invariant that makes this exact: an entry stays in
//! its group only while handling its update again would take the
//! per-update shortcut: anything that changes the entry (another update,
//! a retraction, a metric change, removal) or its destination's selection
//! (none left) takes it out first ([`Repeats::detach`]). A group is used
//! only while all of its members are in it, and reopened only when every
//! changed place's update is that of the member there (or of no member).

use super::fxhash::FxMap;
use super::tables::{Expiry, RouteEntry, Ticks};
use crate::wire::{Message, RouterId};

/// Updates per chunk. Before chunks were reopened, a change spoiled its
/// chunk for a round (at 300 nodes with tunnels cut, chunks of 4, 8 and 16
/// kept 83, 76 and 69 % of the unchanged updates in unchanged chunks), and
/// 8 was best; reopened, 16 needs one lookup per 16 updates to find the
/// group and saves 4.7 % of the thousand's first 360 s against 8 (one
/// thread side by side), and 32 saves nothing more for more memory.
pub(super) const CHUNK: usize = 16;

/// A datagram's hash: 128 bits over its bytes (two Fx-style lanes, then
/// mixed). Equal datagrams hash alike; two different datagrams of the same
/// neighbour colliding by accident is out of the question at 128 bits. A
/// neighbour could craft one, but it could as well just send what it
/// wants the receiver to believe.
pub(super) fn datagram_hash(bytes: &[u8]) -> u128 {
    const K1: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    const K2: u64 = 0x9e_37_79_b9_7f_4a_7c_15;
    let (mut a, mut b) = (bytes.len() as u64, !(bytes.len() as u64));
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        a = (a.rotate_left(5) ^ w).wrapping_mul(K1);
        b = (b.rotate_left(23) ^ w).wrapping_mul(K2);
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    let w = u64::from_le_bytes(last);
    a = fmix(a ^ w);
    b = fmix(b ^ w.rotate_left(32));
    (u128::from(a) << 64) | u128::from(b)
}

/// What a chunk of updates says, to tell which of them changed: a
/// 128-bit hash (two Fx-style lanes, then mixed) of all but their seqnos
/// and metrics (how many updates, their destinations and sources,
/// router-ids, next hops and intervals, in order), and each place's seqno
/// and metric as they are.
/// Equal chunks give equal `Hashes`; different ones that agree but for
/// some seqnos and metrics differ only at those places; any other
/// difference changes the hash (but for a 2^-128 accident).
pub(super) fn chunk_hashes(msgs: &[Message]) -> Hashes {
    const K1: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    const K2: u64 = 0x9e_37_79_b9_7f_4a_7c_15;
    let (mut a, mut b) = (msgs.len() as u64, !(msgs.len() as u64));
    let mut add = |w: u64| {
        a = (a.rotate_left(5) ^ w).wrapping_mul(K1);
        b = (b.rotate_left(23) ^ w).wrapping_mul(K2);
    };
    let net = |n: Option<ipnet::IpNet>| match n {
        None => (0, 0, 0),
        Some(n) => {
            let bits = match n.addr() {
                std::net::IpAddr::V6(a) => u128::from(a),
                std::net::IpAddr::V4(a) => u128::from(u32::from(a)) | 1 << 127,
            };
            ((bits >> 64) as u64, bits as u64, u64::from(n.prefix_len()) + 1)
        }
    };
    let mut vals = [0; CHUNK];
    for (v, m) in vals.iter_mut().zip(msgs) {
        let Message::Update { prefix, src, router_id: RouterId(id), next_hop, seqno, metric, interval } = m
        else {
            add(u64::MAX);
            *v = u32::MAX;
            continue;
        };
        let (p1, p2, pl) = net(*prefix);
        let (s1, s2, sl) = net(*src);
        let hop = match next_hop {
            None => 0,
            Some(std::net::IpAddr::V6(a)) => u128::from(*a) ^ 1,
            Some(std::net::IpAddr::V4(a)) => u128::from(u32::from(*a)) | 1 << 126,
        };
        for w in [p1, p2, s1, s2, (hop >> 64) as u64, hop as u64, u64::from_le_bytes(*id)] {
            add(w);
        }
        add(pl | sl << 8 | u64::from(*interval) << 16);
        *v = u32::from(*seqno) << 16 | u32::from(*metric);
    }
    let h = (u128::from(fmix(a)) << 64) | u128::from(fmix(b));
    Hashes { rest: [h as u32, (h >> 32) as u32, (h >> 64) as u32, (h >> 96) as u32], vals }
}

/// MurmurHash3's finaliser: every input bit reaches every output bit.
fn fmix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// What a chunk of updates says ([`chunk_hashes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hashes {
    /// The hash of all but the seqnos and metrics, in words of 4 bytes (a
    /// `u128` would make a group 16-byte aligned).
    rest: [u32; 4],
    /// Each place's seqno (high half) and metric (`0` past the chunk's end).
    vals: [u32; CHUNK],
}

/// A set of places in a chunk, as bits.
pub(super) type Places = u16;

/// The entries one chunk of updates refreshed (104 bytes). Each member has
/// its place in the chunk (its entry's [`Expiry`] says which), so that a
/// chunk in which some updates changed refreshes the others here and has
/// only those handled ([`Repeats::reopen`]).
#[derive(Clone, Debug)]
struct Group {
    nbr: u32,
    /// Tells this group from earlier ones in its slot, and from what it
    /// was before it was reopened.
    serial: u32,
    /// When the members expire.
    expires: Ticks,
    /// The neighbour's link cost when the members' metrics were computed.
    /// A cost change that the router handles updates the members' metrics
    /// to match (and takes them out), but the cost also moves with time
    /// alone (an RTT sample going stale) until the router notices: a group
    /// is used only with the cost it was formed with.
    cost: u16,
    /// The interval the updates announced (one for all).
    interval: u16,
    /// The places whose entries must be members for the group to be used
    /// (not our own routes echoed).
    want: Places,
    /// The places whose entries are members now.
    live: Places,
    /// Still being formed (its chunk is being handled).
    open: bool,
    /// The chunk's updates' hashes.
    hashes: Hashes,
}

const _: () = assert!(
    CHUNK <= Places::BITS as usize && CHUNK <= 16,
    "places are bits of `Places` and of an entry's `Expiry`"
);

impl Group {
    fn is_whole(&self) -> bool {
        self.live == self.want && !self.open
    }
}

/// A datagram filed: the other half of its hash (the first half, mixed
/// with the neighbour, is its key) and (group, serial) of each chunk.
#[derive(Clone, Debug)]
struct Filed {
    check: u64,
    groups: FiledGroups,
}

/// Chunks of a filed datagram kept in place (a full update's datagrams
/// have two to four; boxed, their groups were one more cache miss per
/// repeated datagram).
const FILED_INLINE: usize = 4;

/// A filed datagram's (group, serial) of each chunk.
#[derive(Clone, Debug)]
enum FiledGroups {
    Inline(u8, [(u32, u32); FILED_INLINE]),
    Boxed(Box<[(u32, u32)]>),
}

impl FiledGroups {
    fn new(groups: &[(u32, u32)]) -> Self {
        match groups.len() {
            n @ ..=FILED_INLINE => {
                let mut a = [(0, 0); FILED_INLINE];
                a[..n].copy_from_slice(groups);
                FiledGroups::Inline(n as u8, a)
            }
            _ => FiledGroups::Boxed(groups.into()),
        }
    }

    fn as_slice(&self) -> &[(u32, u32)] {
        match self {
            FiledGroups::Inline(n, a) => &a[..usize::from(*n)],
            FiledGroups::Boxed(b) => b,
        }
    }
}

/// The groups of a router (a few per neighbour: one per chunk of its
/// full update). A chunk's group is found through the entry of its first
/// update (every member of a whole group is in it), so groups need no
/// index of their own.
#[derive(Clone, Debug, Default)]
pub(super) struct Repeats {
    groups: Vec<Group>,
    free: Vec<u32>,
    serial: u32,
    /// Datagrams whose chunks all formed groups, by their hash's first
    /// half mixed with the neighbour.
    datagrams: FxMap<u64, Filed>,
    /// Datagrams left by the last sweep.
    swept: usize,
}

/// A datagram's key in [`Repeats::datagrams`] and its check.
fn datagram_key(nbr: u32, hash: u128) -> (u64, u64) {
    ((hash as u64) ^ u64::from(nbr).wrapping_mul(0x9e37_79b9_7f4a_7c15), (hash >> 64) as u64)
}

/// What a repeated chunk needs to refresh its group.
#[derive(Debug)]
pub(super) struct Hit {
    pub group: u32,
    pub members: u32,
    pub cost: u16,
    pub interval: u16,
}

impl Repeats {
    /// Group `g` if it is the whole group of a chunk with these hashes from
    /// `nbr` (`g` is the group of the chunk's first member's entry).
    pub fn lookup(&self, nbr: u32, hashes: &Hashes, g: u32) -> Option<Hit> {
        let grp = &self.groups[g as usize];
        (grp.nbr == nbr && grp.hashes == *hashes).then(|| self.hit(g))?
    }

    fn hit(&self, g: u32) -> Option<Hit> {
        let grp = &self.groups[g as usize];
        grp.is_whole().then_some(Hit {
            group: g,
            members: grp.want.count_ones(),
            cost: grp.cost,
            interval: grp.interval,
        })
    }

    /// The places of a chunk with these hashes from `nbr` whose updates
    /// are those of members of group `g` still in it, if `g` was formed by
    /// a chunk like it but for seqnos and metrics, with this link cost and
    /// interval (and is not being formed): handling those updates again
    /// would only refresh their entries. The chunk's other updates changed,
    /// or their entries left.
    pub fn unchanged(&self, g: u32, nbr: u32, hashes: &Hashes, cost: u16, interval: u16) -> Option<Places> {
        let grp = &self.groups[g as usize];
        if grp.nbr != nbr
            || grp.hashes.rest != hashes.rest
            || grp.cost != cost
            || grp.interval != interval
            || grp.open
        {
            return None;
        }
        let same = grp
            .hashes
            .vals
            .iter()
            .zip(&hashes.vals)
            .enumerate()
            .fold(0, |m: Places, (k, (a, b))| m | Places::from(a == b) << k);
        Some(same & grp.live)
    }

    /// The places of group `g` whose entries are in it.
    pub fn live(&self, g: u32) -> Places {
        self.groups[g as usize].live
    }

    /// Reopens group `g` for a chunk that repeats some of its members'
    /// updates (the places [`Repeats::unchanged`] gave: those members stay,
    /// their expiry moved to `expires`) and changes the others, which are
    /// handled now and join again. Under a new serial: a datagram filed
    /// with the group as it was is not taken for this one.
    pub fn reopen(&mut self, g: u32, hashes: &Hashes, want: Places, expires: Ticks) {
        self.serial = self.serial.wrapping_add(1);
        let grp = &mut self.groups[g as usize];
        grp.serial = self.serial;
        grp.hashes = *hashes;
        grp.want = want;
        grp.open = true;
        grp.expires = grp.expires.max(expires);
    }

    /// The groups of a datagram with this hash from `nbr`, into `hits`
    /// (emptied first; a buffer the caller keeps), if each still has all
    /// its members: false (and `hits` unspecified) otherwise.
    pub fn lookup_datagram(&self, nbr: u32, hash: u128, hits: &mut Vec<Hit>) -> bool {
        hits.clear();
        let (key, check) = datagram_key(nbr, hash);
        let Some(filed) = self.datagrams.get(&key).filter(|f| f.check == check) else { return false };
        for &(g, serial) in filed.groups.as_slice() {
            match self.hit(g).filter(|_| self.groups[g as usize].serial == serial) {
                Some(h) => hits.push(h),
                None => return false,
            }
        }
        true
    }

    /// Files a datagram whose chunks formed these groups (as
    /// [`Repeats::finish`] returned them). Another datagram whose key is
    /// the same (its check tells them apart) is forgotten.
    pub fn file_datagram(&mut self, nbr: u32, hash: u128, groups: &[(u32, u32)]) {
        let (key, check) = datagram_key(nbr, hash);
        self.datagrams.insert(key, Filed { check, groups: FiledGroups::new(groups) });
    }

    /// Forgets the datagrams whose groups are no longer all whole (run now
    /// and then: a datagram the neighbour no longer sends is not seen again).
    pub fn sweep(&mut self) {
        // When there are twice as many as the last sweep left: each sweep
        // reads every filed datagram's groups.
        if self.datagrams.len() < 2 * self.swept.max(64) {
            return;
        }
        let groups = &self.groups;
        self.datagrams.retain(|_, f| {
            f.groups.as_slice().iter().all(|&(g, serial)| {
                let grp = &groups[g as usize];
                grp.serial == serial && grp.is_whole()
            })
        });
        self.swept = self.datagrams.len();
    }

    /// Group `g`'s serial.
    pub fn serial_of(&self, g: u32) -> u32 {
        self.groups[g as usize].serial
    }

    /// Moves a group's expiry (never back).
    pub fn refresh(&mut self, g: u32, expires: Ticks) {
        let grp = &mut self.groups[g as usize];
        grp.expires = grp.expires.max(expires);
    }

    /// Starts a group for a chunk of updates with these hashes being
    /// handled (the places in `want` are to join: not our own routes
    /// echoed); entries join it with [`Repeats::join`], and
    /// [`Repeats::finish`] closes it. None when there can be no more groups.
    pub fn begin(
        &mut self,
        nbr: u32,
        hashes: &Hashes,
        want: Places,
        (cost, interval): (u16, u16),
        expires: Ticks,
    ) -> Option<u32> {
        self.serial = self.serial.wrapping_add(1);
        let grp = Group {
            nbr,
            serial: self.serial,
            expires,
            cost,
            interval,
            want,
            live: 0,
            open: true,
            hashes: *hashes,
        };
        match self.free.pop() {
            Some(g) => {
                self.groups[g as usize] = grp;
                Some(g)
            }
            None if self.groups.len() >= Expiry::MAX_GROUPS as usize => None,
            None => {
                // Grown by a quarter, not doubled: groups are a large part
                // of a big router's memory, and a cold start forms many.
                if self.groups.len() == self.groups.capacity() {
                    self.groups.reserve_exact(self.groups.len() / 4 + 16);
                }
                self.groups.push(grp);
                // Below MAX_GROUPS, checked above.
                Some((self.groups.len() - 1) as u32)
            }
        }
    }

    /// Puts `e` (which has just been refreshed to the group's expiry, and
    /// is in no group) in group `g`, at place `k` of its chunk.
    pub fn join(&mut self, g: u32, k: usize, e: &mut RouteEntry) {
        debug_assert!(e.expires.group_id().is_none());
        let grp = &mut self.groups[g as usize];
        debug_assert!(grp.live & 1 << k == 0, "place {k} of group {g} taken twice");
        grp.live |= 1 << k;
        e.expires = Expiry::group(g, k);
    }

    /// Closes group `g` once its chunk is handled: usable if every
    /// update's entry joined it (then returned with its serial), dropped
    /// if none did.
    pub fn finish(&mut self, g: u32) -> Option<(u32, u32)> {
        let grp = &mut self.groups[g as usize];
        grp.open = false;
        if grp.live == grp.want {
            return Some((g, grp.serial));
        }
        if grp.live == 0 {
            self.free.push(g);
        }
        None
    }

    /// Takes `e` out of its group, if it is in one, giving it the group's
    /// expiry as its own. Must come before anything changes the entry.
    #[inline]
    pub fn detach(&mut self, e: &mut RouteEntry) {
        let Some((g, k)) = e.expires.group_place() else { return };
        let grp = &mut self.groups[g as usize];
        e.expires = Expiry::at(grp.expires);
        grp.live &= !(1 << k);
        if grp.live == 0 && !grp.open {
            self.free.push(g);
        }
    }

    /// When `e` expires.
    #[inline]
    pub fn expires(&self, e: &RouteEntry) -> Ticks {
        match e.expires.group_id() {
            Some(g) => self.groups[g as usize].expires,
            None => e.expires.ticks().unwrap_or(Ticks::MAX),
        }
    }

    /// Groups in use (for tests).
    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.groups.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RouterId;

    /// A group is as large as its doc says (there are millions in a large
    /// simulation).
    #[test]
    fn a_group_is_104_bytes() {
        assert_eq!(size_of::<Group>(), 104);
    }

    /// A datagram of any number of chunks is filed and found again whole,
    /// for its neighbour only, and no longer once one member leaves its
    /// group.
    #[test]
    fn filed_datagrams_keep_all_their_groups() {
        for n in 1..=10u32 {
            let mut r = Repeats::default();
            let mut entries = Vec::new();
            let groups: Vec<(u32, u32)> = (0..n)
                .map(|i| {
                    let g = r
                        .begin(3, &Hashes { rest: [i; 4], vals: [0; CHUNK] }, 1, (96, 400), Ticks(100))
                        .expect("room");
                    let mut e = RouteEntry {
                        nbr: 3,
                        router_id: RouterId([0; 8]),
                        seqno: 1,
                        refmetric: 0,
                        metric: 96,
                        expires: Expiry::at(Ticks(100)),
                    };
                    r.join(g, 0, &mut e);
                    entries.push(e);
                    r.finish(g).expect("whole")
                })
                .collect();
            r.file_datagram(3, 0xfeed, &groups);
            let mut hits = Vec::new();
            assert!(r.lookup_datagram(3, 0xfeed, &mut hits), "{n} groups");
            assert_eq!(
                hits.iter().map(|h| h.group).collect::<Vec<_>>(),
                groups.iter().map(|g| g.0).collect::<Vec<_>>()
            );
            assert!(!r.lookup_datagram(4, 0xfeed, &mut hits), "another neighbour's");
            r.detach(entries.last_mut().expect("one"));
            assert!(!r.lookup_datagram(3, 0xfeed, &mut hits), "a group no longer whole");
        }
    }
}
