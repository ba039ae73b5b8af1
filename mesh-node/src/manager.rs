//! The tunnel manager (re6st's idea, sans-IO): keep `client_count` outgoing
//! tunnels to peers drawn at random, accept up to `max_clients` incoming
//! ones, and every `tunnel_refresh` drop the outgoing tunnel that carries
//! the fewest routes so that a new random peer replaces it. The random graph
//! this keeps reshuffling is what survives broken Internet paths.
//!
//! The manager decides; the driver (or netsim) acts. Inputs: candidates
//! (from the peer database, the registry's bootstrap list and gossip),
//! tunnel up/down/failed, and how many routes go through each tunnel.
//! Outputs ([`Action`]): connect, disconnect, ask the registry or the mesh
//! for peers.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sixmesh_routing::core::FxBuildHasher;

/// First wait before asking the registry for peers again.
const FIRST_BOOTSTRAP_RETRY: Duration = Duration::from_secs(10);

/// A peer is known by its node prefix (the identity its certificate binds).
pub type PeerId = Ipv6Net;

/// Tunnel-manager parameters (the network config can change them live).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    /// Outgoing tunnels to keep (re6st: 10).
    pub client_count: usize,
    /// Incoming tunnels accepted at most (re6st: 20).
    pub max_clients: usize,
    /// Period of the drop-the-least-useful-tunnel reshuffle (re6st: 300 s).
    #[serde(with = "secs")]
    pub tunnel_refresh: Duration,
    /// How often the manager looks at its tunnels (re6st: 5 s).
    #[serde(with = "secs")]
    pub check_interval: Duration,
    /// An outgoing tunnel that is not up after this long has failed.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// A peer that failed is not tried again for this long.
    #[serde(with = "secs")]
    pub retry_after: Duration,
    /// Outgoing tunnels kept by a node that nobody connects to (it is
    /// probably behind NAT): re6st keeps min(2, client_count).
    pub unreachable_client_count: usize,
    /// How long without any incoming tunnel before a node counts as
    /// unreachable.
    #[serde(with = "secs")]
    pub unreachable_after: Duration,
    /// Most candidates remembered.
    pub max_candidates: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            client_count: 10,
            max_clients: 20,
            tunnel_refresh: Duration::from_secs(300),
            check_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            retry_after: Duration::from_secs(120),
            unreachable_client_count: 2,
            unreachable_after: Duration::from_secs(600),
            max_candidates: 200,
        }
    }
}

mod secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = <f64 as serde::Deserialize>::deserialize(d)?;
        if !(0.0..=1e9).contains(&v) {
            return Err(serde::de::Error::custom("a duration in seconds, 0 or more"));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

/// Which side opened a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outgoing,
    Incoming,
}

/// What the manager wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a tunnel to `peer` at one of its endpoints.
    Connect { peer: PeerId, endpoints: Vec<SocketAddr> },
    /// Close the tunnel to `peer`.
    Disconnect { peer: PeerId, reason: &'static str },
    /// No candidate is left: ask the registry for bootstrap peers.
    NeedBootstrap,
    /// Ask neighbours for the endpoints of `peer` (a node Babel knows but
    /// whose address we lack).
    RequestEndpoints { peer: PeerId },
}

/// Which peers announce a prefix in Babel. In a real mesh every node does;
/// a simulation that routes to a sample of its nodes says which, so that
/// the manager does not take the others for unreachable (see
/// [`TunnelManager::set_announcing`]).
#[derive(Clone)]
pub struct Announcing(pub Arc<dyn Fn(&PeerId) -> bool + Send + Sync>);

impl std::fmt::Debug for Announcing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Announcing(..)")
    }
}

#[derive(Clone, Debug)]
struct Tunnel {
    dir: Direction,
    /// `None` while an outgoing tunnel is being set up.
    up_since: Option<Instant>,
    started: Instant,
    routes: usize,
}

/// The manager. See the module documentation.
#[derive(Debug)]
pub struct TunnelManager {
    me: PeerId,
    cfg: ManagerConfig,
    rng: StdRng,
    candidates: BTreeMap<PeerId, Vec<SocketAddr>>,
    failed: BTreeMap<PeerId, Instant>,
    tunnels: BTreeMap<PeerId, Tunnel>,
    /// Prefixes Babel routes to: candidates for new tunnels even without a
    /// known endpoint (we then ask the mesh for one).
    distant: HashSet<PeerId, FxBuildHasher>,
    /// `None`: every peer announces its prefix.
    announcing: Option<Announcing>,
    next_check: Instant,
    next_refresh: Instant,
    last_incoming: Option<Instant>,
    started: Instant,
    last_bootstrap: Option<Instant>,
    bootstrap_backoff: Duration,
    actions: VecDeque<Action>,
}

impl TunnelManager {
    /// A manager for the node whose prefix is `me`, seeded for reproducible
    /// choices (use a random seed in production).
    pub fn new(me: PeerId, cfg: ManagerConfig, seed: u64, now: Instant) -> Self {
        TunnelManager {
            me,
            next_check: now,
            next_refresh: now + cfg.tunnel_refresh,
            cfg,
            rng: StdRng::seed_from_u64(seed),
            candidates: BTreeMap::new(),
            failed: BTreeMap::new(),
            tunnels: BTreeMap::new(),
            distant: HashSet::default(),
            announcing: None,
            last_incoming: None,
            started: now,
            last_bootstrap: None,
            bootstrap_backoff: FIRST_BOOTSTRAP_RETRY,
            actions: VecDeque::new(),
        }
    }

    /// Says which peers announce a prefix (by default all do): exploring
    /// looks for peers Babel does not route to, which only means something
    /// for those.
    pub fn set_announcing(&mut self, announcing: Announcing) {
        self.announcing = Some(announcing);
    }

    /// The parameters in force.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// Applies new parameters at once (no restart): extra outgoing tunnels
    /// go at the next check, missing ones are opened.
    pub fn set_config(&mut self, now: Instant, cfg: ManagerConfig) {
        if cfg.tunnel_refresh != self.cfg.tunnel_refresh {
            self.next_refresh = now + cfg.tunnel_refresh;
        }
        self.cfg = cfg;
        self.next_check = now;
    }

    /// Learns endpoints for peers (peer database, bootstrap list, gossip).
    pub fn add_candidates(&mut self, peers: impl IntoIterator<Item = (PeerId, Vec<SocketAddr>)>) {
        for (p, eps) in peers {
            if p == self.me || eps.is_empty() {
                continue;
            }
            if self.candidates.insert(p, eps).is_none() {
                // Something new: the next shortage may ask again soon.
                self.bootstrap_backoff = FIRST_BOOTSTRAP_RETRY;
            }
        }
        // Bounded: forget random ones, but never a peer we have a tunnel to.
        let excess = self.candidates.len().saturating_sub(self.cfg.max_candidates);
        if excess > 0 {
            let spare: Vec<PeerId> =
                self.candidates.keys().filter(|p| !self.tunnels.contains_key(p)).copied().collect();
            for i in draw_without_replacement(spare.len(), excess, &mut self.rng) {
                self.candidates.remove(&spare[i]);
            }
        }
    }

    /// Forgets a peer (revoked, or its endpoints are known to be wrong) and
    /// closes any tunnel to it.
    pub fn remove_peer(&mut self, peer: PeerId, reason: &'static str) {
        self.candidates.remove(&peer);
        self.distant.remove(&peer);
        if self.tunnels.remove(&peer).is_some() {
            self.actions.push_back(Action::Disconnect { peer, reason });
        }
    }

    /// The known candidates (for the peer database).
    pub fn candidates(&self) -> impl Iterator<Item = (&PeerId, &Vec<SocketAddr>)> {
        self.candidates.iter()
    }

    /// Destinations Babel currently routes to.
    pub fn set_distant(&mut self, prefixes: impl IntoIterator<Item = PeerId>) {
        self.distant = prefixes.into_iter().filter(|p| *p != self.me).collect();
    }

    /// Babel now routes to `prefix` (see [`TunnelManager::set_distant`]).
    pub fn add_distant(&mut self, prefix: PeerId) {
        if prefix != self.me {
            self.distant.insert(prefix);
        }
    }

    /// Babel no longer routes to `prefix`.
    pub fn remove_distant(&mut self, prefix: &PeerId) {
        self.distant.remove(prefix);
    }

    /// An incoming tunnel asks to be set up: accept it?
    pub fn accept_incoming(&mut self, now: Instant, peer: PeerId) -> bool {
        if peer == self.me {
            return false;
        }
        if let Some(t) = self.tunnels.get_mut(&peer) {
            // Both sides opened a tunnel to each other. There is one
            // WireGuard session per pair anyway; the node with the smaller
            // prefix counts it as incoming (re6st's rule) and opens another
            // outgoing tunnel at the next check.
            if t.dir == Direction::Outgoing && self.me < peer {
                t.dir = Direction::Incoming;
                self.last_incoming = Some(now);
                self.next_check = self.next_check.min(now);
            }
            return true;
        }
        let incoming = self.tunnels.values().filter(|t| t.dir == Direction::Incoming).count();
        if incoming >= self.cfg.max_clients {
            return false;
        }
        self.tunnels
            .insert(peer, Tunnel { dir: Direction::Incoming, up_since: Some(now), started: now, routes: 0 });
        self.last_incoming = Some(now);
        true
    }

    /// A tunnel is up (handshake done).
    pub fn tunnel_up(&mut self, now: Instant, peer: PeerId) {
        if let Some(t) = self.tunnels.get_mut(&peer) {
            t.up_since.get_or_insert(now);
            if t.dir == Direction::Incoming {
                self.last_incoming = Some(now);
            }
        }
        self.failed.remove(&peer);
    }

    /// A tunnel went away (peer gone, keepalives lost, closed by the peer).
    pub fn tunnel_down(&mut self, now: Instant, peer: PeerId) {
        if let Some(t) = self.tunnels.remove(&peer)
            && t.up_since.is_none()
        {
            self.failed.insert(peer, now);
        }
        self.next_check = self.next_check.min(now);
    }

    /// How many routes Babel selected through each tunnel.
    pub fn set_route_counts(&mut self, counts: &BTreeMap<PeerId, usize>) {
        for (p, t) in &mut self.tunnels {
            t.routes = counts.get(p).copied().unwrap_or(0);
        }
    }

    /// The tunnels: (peer, direction, up).
    pub fn tunnels(&self) -> impl Iterator<Item = (PeerId, Direction, bool)> + '_ {
        self.tunnels.iter().map(|(p, t)| (*p, t.dir, t.up_since.is_some()))
    }

    /// Outgoing tunnels wanted now: fewer when nobody can reach us.
    pub fn target_outgoing(&self, now: Instant) -> usize {
        let reachable = match self.last_incoming {
            Some(t) => now.saturating_duration_since(t) < self.cfg.unreachable_after,
            None => now.saturating_duration_since(self.started) < self.cfg.unreachable_after,
        };
        if reachable {
            self.cfg.client_count
        } else {
            self.cfg.client_count.min(self.cfg.unreachable_client_count)
        }
    }

    /// When [`TunnelManager::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_check.min(self.next_refresh)
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Runs the periodic check and the refresh when they are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_refresh {
            self.refresh(now);
            self.next_refresh = now + self.cfg.tunnel_refresh;
        }
        if now >= self.next_check {
            self.check(now);
            self.next_check = now + self.cfg.check_interval;
        }
    }

    /// Drops the outgoing tunnel that carries the fewest routes, if we are
    /// at the target: the next check replaces it with a random peer.
    fn refresh(&mut self, now: Instant) {
        let out: Vec<(PeerId, usize)> = self
            .tunnels
            .iter()
            .filter(|(_, t)| t.dir == Direction::Outgoing && t.up_since.is_some())
            .map(|(p, t)| (*p, t.routes))
            .collect();
        if out.len() < self.target_outgoing(now) || out.is_empty() {
            return;
        }
        let fewest = out.iter().map(|(_, r)| *r).min().expect("non-empty");
        let worst: Vec<PeerId> = out.iter().filter(|(_, r)| *r == fewest).map(|(p, _)| *p).collect();
        let victim = *worst.choose(&mut self.rng).expect("non-empty");
        self.tunnels.remove(&victim);
        // Do not pick it again right away.
        self.failed.insert(victim, now);
        self.actions.push_back(Action::Disconnect { peer: victim, reason: "refresh: fewest routes" });
    }

    /// At the target, looks for a peer Babel does not route to (the other
    /// side of a healed partition, a node that just joined) and opens one
    /// extra tunnel to it; the next checks drop whichever tunnel carries the
    /// fewest routes. One at a time; peers that failed are tried again after
    /// a quarter of `retry_after`.
    fn explore(&mut self, now: Instant) {
        if self.distant.is_empty()
            || !self.tunnels.values().any(|t| t.up_since.is_some())
            || self.tunnels.values().any(|t| t.dir == Direction::Outgoing && t.up_since.is_none())
        {
            return;
        }
        let unknown: Vec<PeerId> = self
            .candidates
            .keys()
            .filter(|p| {
                !self.distant.contains(p)
                    && self.announcing.as_ref().is_none_or(|a| (a.0)(p))
                    && !self.tunnels.contains_key(p)
                    && self
                        .failed
                        .get(p)
                        .is_none_or(|t| now.saturating_duration_since(*t) >= self.cfg.retry_after / 4)
            })
            .copied()
            .collect();
        if let Some(peer) = unknown.choose(&mut self.rng).copied() {
            let endpoints = self.candidates[&peer].clone();
            self.tunnels
                .insert(peer, Tunnel { dir: Direction::Outgoing, up_since: None, started: now, routes: 0 });
            self.actions.push_back(Action::Connect { peer, endpoints });
        }
    }

    fn check(&mut self, now: Instant) {
        // Outgoing tunnels that never came up have failed.
        let stuck: Vec<PeerId> = self
            .tunnels
            .iter()
            .filter(|(_, t)| {
                t.up_since.is_none() && now.saturating_duration_since(t.started) >= self.cfg.connect_timeout
            })
            .map(|(p, _)| *p)
            .collect();
        for p in stuck {
            self.tunnels.remove(&p);
            self.failed.insert(p, now);
            self.actions.push_back(Action::Disconnect { peer: p, reason: "no handshake" });
        }
        self.failed.retain(|_, t| now.saturating_duration_since(*t) < self.cfg.retry_after);

        let target = self.target_outgoing(now);
        let mut out: Vec<PeerId> =
            self.tunnels.iter().filter(|(_, t)| t.dir == Direction::Outgoing).map(|(p, _)| *p).collect();
        // Too many (the target went down, or an exploring tunnel came up):
        // drop the ones carrying least, among those up long enough for Babel
        // to have counted their routes.
        let settled = self.cfg.check_interval * 2;
        while out.len() > target {
            let up_for = |p: &PeerId| self.tunnels[p].up_since.map(|t| now.saturating_duration_since(t));
            let pick = |min_age: Duration| {
                out.iter()
                    .enumerate()
                    .filter(|(_, p)| up_for(p).is_some_and(|a| a >= min_age))
                    .min_by_key(|(_, p)| self.tunnels[*p].routes)
                    .map(|(i, _)| i)
            };
            // Prefer tunnels up long enough to be judged; any up tunnel else.
            let Some(i) = pick(settled).or_else(|| pick(Duration::ZERO)) else {
                break;
            };
            let p = out.remove(i);
            self.tunnels.remove(&p);
            self.actions.push_back(Action::Disconnect { peer: p, reason: "over the target" });
        }
        let missing = target.saturating_sub(out.len());
        if missing == 0 {
            self.explore(now);
            return;
        }
        let mut pool: Vec<PeerId> = self
            .candidates
            .keys()
            .filter(|p| !self.tunnels.contains_key(p) && !self.failed.contains_key(p))
            .copied()
            .collect();
        pool.shuffle(&mut self.rng);
        // Last resort (re6st does the same): peers that failed a while ago,
        // oldest failure first — after a partition heals, nothing else
        // would reconnect the two sides before `retry_after`.
        if pool.len() < missing {
            let mut old: Vec<(Instant, PeerId)> = self
                .failed
                .iter()
                .filter(|(p, t)| {
                    self.candidates.contains_key(p)
                        && !self.tunnels.contains_key(p)
                        && now.saturating_duration_since(**t) >= self.cfg.retry_after / 4
                })
                .map(|(p, t)| (*t, *p))
                .collect();
            old.sort();
            pool.extend(old.into_iter().map(|(_, p)| p).take(missing - pool.len()));
        }
        for peer in pool.into_iter().take(missing) {
            let endpoints = self.candidates[&peer].clone();
            self.tunnels
                .insert(peer, Tunnel { dir: Direction::Outgoing, up_since: None, started: now, routes: 0 });
            self.actions.push_back(Action::Connect { peer, endpoints });
        }
        let still_missing =
            target.saturating_sub(self.tunnels.values().filter(|t| t.dir == Direction::Outgoing).count());
        if still_missing == 0 {
            return;
        }
        // Nodes Babel knows but we have no address for: ask the mesh.
        let mut unknown: Vec<PeerId> = self
            .distant
            .iter()
            .filter(|p| {
                !self.candidates.contains_key(p)
                    && !self.tunnels.contains_key(p)
                    && !self.failed.contains_key(p)
            })
            .copied()
            .collect();
        unknown.sort_unstable(); // the set's order is its hashes'
        unknown.shuffle(&mut self.rng);
        for peer in unknown.into_iter().take(still_missing) {
            self.actions.push_back(Action::RequestEndpoints { peer });
        }
        // Out of candidates: ask the registry too, backing off (10 s, 20 s,
        // … up to the refresh period) while it has nothing new for us.
        if self.last_bootstrap.is_none_or(|t| now.saturating_duration_since(t) >= self.bootstrap_backoff) {
            if self.last_bootstrap.is_some() {
                self.bootstrap_backoff =
                    (self.bootstrap_backoff * 2).min(self.cfg.tunnel_refresh.max(self.cfg.check_interval));
            }
            self.last_bootstrap = Some(now);
            self.actions.push_back(Action::NeedBootstrap);
        }
    }
}

/// `k` indices of `0..n` drawn one after another, each uniformly among the
/// ones not drawn yet, as `k` calls of `choose` on a list losing its chosen
/// item each time would (the same random draws, the same victims), in
/// O(n + k log n) instead of O(n k): a registry's bootstrap list or a
/// simulator can hand a manager thousands of peers to keep 200 of.
fn draw_without_replacement(n: usize, k: usize, rng: &mut StdRng) -> Vec<usize> {
    // A Fenwick tree of 1s: the prefix sums count the indices left, and
    // descending it finds the r-th one left.
    let mut tree = vec![0u32; n + 1];
    for i in 1..=n {
        tree[i] += 1;
        let j = i + (i & i.wrapping_neg());
        if j <= n {
            tree[j] += tree[i];
        }
    }
    let top = if n == 0 { 0 } else { 1 << n.ilog2() };
    let mut out = Vec::with_capacity(k.min(n));
    for left in (n.saturating_sub(k)..n).rev() {
        let left = left + 1;
        // `SliceRandom::choose`'s draw (rand 0.8's `gen_index`).
        let mut r = if left <= u32::MAX as usize {
            rng.gen_range(0..left as u32) as usize
        } else {
            rng.gen_range(0..left)
        };
        let mut pos = 0;
        let mut step = top;
        while step > 0 {
            if pos + step <= n && (tree[pos + step] as usize) <= r {
                pos += step;
                r -= tree[pos] as usize;
            }
            step >>= 1;
        }
        // `pos` is the last index (1-based) with r ones up to it: the
        // r-th left (0-based) is the next one.
        out.push(pos);
        let mut i = pos + 1;
        while i <= n {
            tree[i] -= 1;
            i += i & i.wrapping_neg();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn p(i: u16) -> PeerId {
        Ipv6Net::new(std::net::Ipv6Addr::new(0xfd00, 0, 0, i, 0, 0, 0, 0), 64).unwrap()
    }

    fn ep(i: u16) -> Vec<SocketAddr> {
        vec![SocketAddr::from(([192, 0, 2, (i % 250) as u8], 4400))]
    }

    fn drain(m: &mut TunnelManager) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn connects(actions: &[Action]) -> Vec<PeerId> {
        actions
            .iter()
            .filter_map(|a| if let Action::Connect { peer, .. } = a { Some(*peer) } else { None })
            .collect()
    }

    fn manager(now: Instant) -> TunnelManager {
        let cfg = ManagerConfig { client_count: 3, max_clients: 2, ..Default::default() };
        let mut m = TunnelManager::new(p(0), cfg, 7, now);
        m.add_candidates((1..=10).map(|i| (p(i), ep(i))));
        m
    }

    #[test]
    fn opens_client_count_tunnels_to_distinct_random_peers() {
        let now = Instant::now();
        let mut m = manager(now);
        m.handle_timeout(now);
        let c = connects(&drain(&mut m));
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().collect::<BTreeSet<_>>().len(), 3);
        assert!(!c.contains(&p(0)));
        // Same seed, same choice; another seed, (almost surely) another.
        let mut m2 = manager(now);
        m2.handle_timeout(now);
        assert_eq!(connects(&drain(&mut m2)), c);
        let mut m3 = TunnelManager::new(p(0), m.config().clone(), 8, now);
        m3.add_candidates((1..=10).map(|i| (p(i), ep(i))));
        m3.handle_timeout(now);
        assert_ne!(connects(&drain(&mut m3)), c);
    }

    #[test]
    fn failed_connections_are_replaced_and_not_retried_at_once() {
        let now = Instant::now();
        let mut m = manager(now);
        m.handle_timeout(now);
        let first = connects(&drain(&mut m));
        m.tunnel_up(now, first[0]);
        // The other two never complete their handshake.
        let later = now + Duration::from_secs(11);
        m.handle_timeout(later);
        let acts = drain(&mut m);
        let dropped: Vec<PeerId> = acts
            .iter()
            .filter_map(|a| if let Action::Disconnect { peer, .. } = a { Some(*peer) } else { None })
            .collect();
        assert_eq!(dropped.len(), 2);
        let again = connects(&acts);
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|p| !first.contains(p)), "failed peers retried at once");
    }

    #[test]
    fn failed_peers_are_retried_as_a_last_resort() {
        let now = Instant::now();
        let cfg = ManagerConfig { client_count: 2, ..Default::default() };
        let mut m = TunnelManager::new(p(0), cfg, 5, now);
        m.add_candidates((1..=2).map(|i| (p(i), ep(i))));
        m.handle_timeout(now);
        assert_eq!(connects(&drain(&mut m)).len(), 2);
        // Neither answers: both fail at +10 s and nobody else is known.
        m.handle_timeout(now + Duration::from_secs(10));
        assert!(connects(&drain(&mut m)).is_empty(), "just failed: not retried at once");
        m.handle_timeout(now + Duration::from_secs(35));
        assert!(connects(&drain(&mut m)).is_empty(), "still too recent");
        m.handle_timeout(now + Duration::from_secs(41));
        assert_eq!(connects(&drain(&mut m)).len(), 2, "retried 30 s after failing, for want of anyone else");
    }

    #[test]
    fn drawing_victims_matches_choosing_from_a_shrinking_list() {
        // The draw must give the victims the naive eviction gave (so that
        // seeded simulations keep their results), for every size and seed.
        for seed in 0..40u64 {
            for (n, k) in [(0, 3), (1, 1), (2, 5), (7, 3), (64, 63), (100, 1), (257, 200), (1000, 799)] {
                let mut a = StdRng::seed_from_u64(seed);
                let mut b = StdRng::seed_from_u64(seed);
                let mut left: Vec<usize> = (0..n).collect();
                let mut naive = Vec::new();
                for _ in 0..k {
                    let Some(&v) = left.choose(&mut a) else { break };
                    left.retain(|x| *x != v);
                    naive.push(v);
                }
                assert_eq!(draw_without_replacement(n, k, &mut b), naive, "n={n} k={k} seed={seed}");
                assert_eq!(a.r#gen::<u64>(), b.r#gen::<u64>(), "same number of draws");
            }
        }
    }

    /// A manager that keeps 2 tunnels, knows 4 peers and has tunnels up
    /// to the 2 it picked (returned).
    fn two_tunnels_up_of_four(now: Instant) -> (TunnelManager, Vec<PeerId>) {
        let cfg = ManagerConfig { client_count: 2, ..Default::default() };
        let mut m = TunnelManager::new(p(0), cfg, 5, now);
        m.add_candidates((1..=4).map(|i| (p(i), ep(i))));
        m.handle_timeout(now);
        let first = connects(&drain(&mut m));
        for &peer in &first {
            m.tunnel_up(now, peer);
        }
        (m, first)
    }

    #[test]
    fn at_the_target_one_extra_tunnel_explores_peers_babel_does_not_reach() {
        let now = Instant::now();
        let (mut m, first) = two_tunnels_up_of_four(now);
        // Babel routes to everyone: nothing to explore.
        m.set_distant((1..=4).map(p));
        m.handle_timeout(now + Duration::from_secs(5));
        assert!(connects(&drain(&mut m)).is_empty());
        // Babel lost two nodes (a partition healed on their side, say): one
        // extra tunnel towards one of them.
        let lost: Vec<PeerId> = (1..=4).map(p).filter(|q| !first.contains(q)).collect();
        m.set_distant(first.clone());
        m.handle_timeout(now + Duration::from_secs(10));
        let extra = connects(&drain(&mut m));
        assert_eq!(extra.len(), 1);
        assert!(lost.contains(&extra[0]));
        // It comes up, Babel learns the other side through it, and it
        // carries many routes: the tunnel carrying fewest goes.
        m.tunnel_up(now + Duration::from_secs(10), extra[0]);
        m.set_distant((1..=4).map(p));
        let counts: BTreeMap<PeerId, usize> =
            [(first[0], 1), (first[1], 3), (extra[0], 40)].into_iter().collect();
        m.set_route_counts(&counts);
        m.handle_timeout(now + Duration::from_secs(25));
        let acts = drain(&mut m);
        assert!(acts.contains(&Action::Disconnect { peer: first[0], reason: "over the target" }), "{acts:?}");
        assert_eq!(m.tunnels().filter(|(_, d, _)| *d == Direction::Outgoing).count(), 2);
    }

    #[test]
    fn peers_that_announce_nothing_are_not_explored() {
        let now = Instant::now();
        let (mut m, first) = two_tunnels_up_of_four(now);
        // Babel routes only to the two we have tunnels to: the other two
        // announce nothing, which is no reason to look for them.
        m.set_distant(first.clone());
        let routed = first.clone();
        m.set_announcing(Announcing(Arc::new(move |q: &PeerId| routed.contains(q))));
        m.handle_timeout(now + Duration::from_secs(5));
        m.handle_timeout(now + Duration::from_secs(10));
        assert!(connects(&drain(&mut m)).is_empty());
    }

    #[test]
    fn refresh_drops_the_tunnel_with_fewest_routes() {
        let now = Instant::now();
        let mut m = manager(now);
        m.handle_timeout(now);
        let c = connects(&drain(&mut m));
        for &peer in &c {
            m.tunnel_up(now, peer);
        }
        let counts: BTreeMap<PeerId, usize> = [(c[0], 5), (c[1], 0), (c[2], 9)].into_iter().collect();
        m.set_route_counts(&counts);
        let t = now + Duration::from_secs(300);
        m.handle_timeout(t);
        let acts = drain(&mut m);
        assert!(
            acts.contains(&Action::Disconnect { peer: c[1], reason: "refresh: fewest routes" }),
            "{acts:?}"
        );
        let new = connects(&acts);
        assert_eq!(new.len(), 1, "the dropped tunnel is replaced in the same round");
        assert!(!c.contains(&new[0]));
    }

    #[test]
    fn incoming_tunnels_are_bounded() {
        let now = Instant::now();
        let mut m = manager(now);
        assert!(m.accept_incoming(now, p(20)));
        assert!(m.accept_incoming(now, p(21)));
        assert!(!m.accept_incoming(now, p(22)), "max_clients is 2");
        assert!(m.accept_incoming(now, p(20)), "a known peer re-handshaking is fine");
        assert!(!m.accept_incoming(now, p(0)), "not ourselves");
    }

    #[test]
    fn unreachable_node_keeps_fewer_tunnels() {
        let now = Instant::now();
        let cfg = ManagerConfig { client_count: 5, unreachable_client_count: 2, ..Default::default() };
        let mut m = TunnelManager::new(p(0), cfg, 1, now);
        m.add_candidates((1..=10).map(|i| (p(i), ep(i))));
        m.handle_timeout(now);
        let c = connects(&drain(&mut m));
        assert_eq!(c.len(), 5);
        for peer in c {
            m.tunnel_up(now, peer);
        }
        let later = now + Duration::from_secs(601);
        assert_eq!(m.target_outgoing(later), 2);
        m.handle_timeout(later);
        let acts = drain(&mut m);
        let drops = acts.iter().filter(|a| matches!(a, Action::Disconnect { .. })).count();
        assert_eq!(drops, 3, "{acts:?}");
        // Someone connects to us: reachable again.
        assert!(m.accept_incoming(later, p(30)));
        assert_eq!(m.target_outgoing(later), 5);
    }

    #[test]
    fn alone_asks_registry_then_mesh_for_peers() {
        let now = Instant::now();
        let mut m = TunnelManager::new(p(0), ManagerConfig::default(), 1, now);
        m.handle_timeout(now);
        assert_eq!(drain(&mut m), vec![Action::NeedBootstrap]);
        m.handle_timeout(now + Duration::from_secs(5));
        assert!(drain(&mut m).is_empty(), "bootstrap is rate-limited");
        m.set_distant([p(4), p(5)]);
        m.handle_timeout(now + Duration::from_secs(10));
        let acts = drain(&mut m);
        assert!(acts.contains(&Action::RequestEndpoints { peer: p(4) }));
        assert!(acts.contains(&Action::RequestEndpoints { peer: p(5) }));
        assert!(acts.contains(&Action::NeedBootstrap), "asked again after 10 s");
        // Then it backs off: not at +25 s (20 s after the last), yes at +30 s.
        m.handle_timeout(now + Duration::from_secs(25));
        assert!(!drain(&mut m).contains(&Action::NeedBootstrap));
        m.handle_timeout(now + Duration::from_secs(30));
        assert!(drain(&mut m).contains(&Action::NeedBootstrap));
        // New candidates reset the back-off.
        m.add_candidates([(p(9), ep(9))]);
        assert_eq!(m.bootstrap_backoff, FIRST_BOOTSTRAP_RETRY);
    }

    #[test]
    fn lowering_client_count_live_drops_tunnels() {
        let now = Instant::now();
        let mut m = manager(now);
        m.handle_timeout(now);
        for c in connects(&drain(&mut m)) {
            m.tunnel_up(now, c);
        }
        let cfg = ManagerConfig { client_count: 1, ..m.config().clone() };
        m.set_config(now, cfg);
        m.handle_timeout(now);
        let drops = drain(&mut m).iter().filter(|a| matches!(a, Action::Disconnect { .. })).count();
        assert_eq!(drops, 2);
    }

    #[test]
    fn candidates_are_bounded_and_keep_connected_peers() {
        let now = Instant::now();
        let cfg = ManagerConfig { max_candidates: 20, client_count: 2, ..Default::default() };
        let mut m = TunnelManager::new(p(0), cfg, 3, now);
        m.add_candidates((1..=5).map(|i| (p(i), ep(i))));
        m.handle_timeout(now);
        let c = connects(&drain(&mut m));
        m.add_candidates((100..400).map(|i| (p(i), ep(i))));
        assert_eq!(m.candidates().count(), 20);
        for peer in c {
            assert!(m.candidates().any(|(p, _)| *p == peer));
        }
    }
}
