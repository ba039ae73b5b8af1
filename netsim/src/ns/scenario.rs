//! Runs a scenario file on real processes: one network namespace per node
//! running `sixmesh node run`, a registry, and an "internet" bridge whose
//! paths get the scenario's latency and jitter (user-space relays,
//! [`super::relay`]), loss and broken paths (nftables). The same runner as
//! the simulator's applies the events on the wall clock
//! ([`crate::run::run_on`]) and writes the same report.
//!
//! What is measured differs where it must: reachability is real ICMPv6
//! echo between mesh addresses (up to four tries per pair and sample), a loop is
//! an ICMPv6 Time Exceeded coming back, latency is half the round trip,
//! control bytes are the Babel bytes each node sent plus the simulator's
//! per-packet tunnel overhead ([`crate::mesh::WIRE_OVERHEAD`]). NAT nodes get
//! a stateful firewall (no unsolicited UDP in); a region's `uplink_kbps`
//! is a token bucket filter (`tbf`) on each of its nodes' underlay
//! interfaces.

use std::collections::HashMap;
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::libc;

use super::mesh::{Mesh, nft_script};
use crate::babel::NodeId;
use crate::mesh::{NodeTraffic, PathParams, WIRE_OVERHEAD, Walk, components, distances};
use crate::run::{Layout, Network, Report, layout, paths, run_on};
use crate::scenario::Scenario;

/// More nodes than this in namespaces would swamp a small machine.
pub const MAX_NODES: usize = 40;

/// Why a scenario cannot run in namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NsScenarioError {
    #[error(
        "{0} nodes is too many for namespaces on one machine (at most {MAX_NODES}): scale it down with \
         --nodes, or run it in the in-process simulator (without --namespaces)"
    )]
    TooLarge(usize),
    #[error(
        "running a scenario in namespaces needs root (network namespaces, TAP devices, nftables): run it \
         with sudo, or drop --namespaces to use the in-process simulator"
    )]
    NotRoot,
    #[error(
        "`[nodes] {0}` is a simulator option: real nodes all announce their prefix and learn their \
         peers from the registry. Remove it (or scale the scenario down with --nodes until it has no \
         effect) to run in namespaces"
    )]
    SimulatorOnly(&'static str),
}

/// Whether `s` can run in namespaces here (size, root).
pub fn check(s: &Scenario) -> Result<(), NsScenarioError> {
    let n = s.node_count();
    if n > MAX_NODES {
        return Err(NsScenarioError::TooLarge(n));
    }
    if s.nodes.destinations.is_some_and(|d| d < s.nodes.count) {
        return Err(NsScenarioError::SimulatorOnly("destinations"));
    }
    if s.nodes.bootstrap.is_some_and(|b| b + 1 < n) {
        return Err(NsScenarioError::SimulatorOnly("bootstrap"));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(NsScenarioError::NotRoot);
    }
    Ok(())
}

/// Runs `s` in namespaces with the `sixmesh` binary `bin`;
/// `progress(seconds_done)` after every sample. Blocks for the scenario's
/// duration (wall-clock seconds) plus setup. When `stop` is set (Ctrl-C),
/// time stops passing and pings stop being sent: the run ends at once,
/// every namespace and process is removed, and the report says nothing
/// reliable (the caller should not use it).
pub fn run(
    s: &Scenario,
    bin: &Path,
    stop: &'static AtomicBool,
    progress: impl FnMut(f64),
) -> Result<Report, NsScenarioError> {
    check(s)?;
    let l = layout(s);
    let mut net = NsNetwork::new(s, bin, &l, stop);
    // The report names the logs: they stay.
    net.mesh.keep_logs = true;
    let logs = net.mesh.dir.display().to_string();
    let mut report = run_on(s, net, l.names, l.region_of, progress);
    report.logs = Some(logs);
    Ok(report)
}

/// A scenario's network in namespaces (see the module documentation).
pub struct NsNetwork {
    mesh: Mesh,
    /// node.toml of every node.
    config: String,
    start: Instant,
    paths: Vec<PathParams>,
    overrides: HashMap<(NodeId, NodeId), bool>,
    islands: Vec<u32>,
    /// Loss now applied on each path (1: cut), by (a, b) with a < b.
    applied: HashMap<(NodeId, NodeId), f64>,
    alive: Vec<bool>,
    nat: Vec<bool>,
    /// Traffic of earlier runs of each node (counters restart with the process).
    base: Vec<NodeTraffic>,
    pingers: Vec<Option<OwnedFd>>,
    by_address: HashMap<Ipv6Addr, NodeId>,
    by_prefix: HashMap<String, NodeId>,
    round: u16,
    stop: &'static AtomicBool,
    /// Nodes whose daemon exited on its own (reported once).
    crashed: Vec<bool>,
}

/// Control counters of a node's earlier runs and its current one.
fn sum(a: NodeTraffic, b: NodeTraffic) -> NodeTraffic {
    NodeTraffic {
        control_tx_bytes: a.control_tx_bytes + b.control_tx_bytes,
        control_rx_bytes: a.control_rx_bytes + b.control_rx_bytes,
        control_tx_packets: a.control_tx_packets + b.control_tx_packets,
        data_tx_bytes: 0,
    }
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl NsNetwork {
    /// Builds the namespaces of layout `l` (its underlay paths and uplinks
    /// drawn as the simulator draws them), enrolls every node and starts
    /// the ones not joining later. Setting `stop` ends the run early (see
    /// [`run`]).
    pub(crate) fn new(s: &Scenario, bin: &Path, l: &Layout, stop: &'static AtomicBool) -> Self {
        let (nat, joining) = (&l.nat, &l.joining);
        let path = paths(s, &l.region_of);
        let n = nat.len();
        let mesh = Mesh::with_latency(bin, "sc", n);
        let mut paths = Vec::with_capacity(n * n);
        for a in 0..n {
            for b in 0..n {
                paths.push(path(a.min(b), a.max(b)));
            }
        }
        for a in 0..n {
            for b in a + 1..n {
                let p = &paths[a * n + b];
                // Each direction's jitter is drawn per packet by its sender, as in the simulator.
                mesh.set_latency(a, b, p.latency, p.jitter);
            }
        }
        let regions = s.regions();
        for (k, &r) in l.region_of.iter().enumerate() {
            if let Some(kbps) = regions[r].uplink_kbps {
                mesh.set_uplink(k, Some(kbps));
            }
        }
        // The scenario's Babel timers and tunnel manager, all of it.
        let config = format!(
            "hello_interval_ms = {}\nupdate_interval_ms = {}\nconfig_refresh_secs = 5\n[manager]\n{}",
            (s.babel.hello_interval_s * 1000.0).round() as u64,
            (s.babel.update_interval_s * 1000.0).round() as u64,
            toml::to_string(&s.manager).expect("a manager config serializes"),
        );
        for (k, &behind) in nat.iter().enumerate() {
            if behind {
                // NAT as seen from outside: nothing comes in that was not asked for.
                nft_script(
                    &mesh.nodes[k].ns,
                    "add table inet nat\n\
                     add chain inet nat in { type filter hook input priority 0; policy accept; }\n\
                     add rule inet nat in ct state established,related accept\n\
                     add rule inet nat in iifname \"u0\" meta l4proto udp drop\n",
                );
            }
        }
        let by_address = mesh
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(k, node)| Some((node.mesh_address.parse().ok()?, k)))
            .collect();
        let by_prefix = mesh.nodes.iter().enumerate().map(|(k, node)| (node.prefix.clone(), k)).collect();
        let mut net = NsNetwork {
            mesh,
            config,
            start: Instant::now(),
            paths,
            overrides: HashMap::new(),
            islands: vec![0; n],
            applied: HashMap::new(),
            alive: vec![false; n],
            nat: nat.to_vec(),
            base: vec![NodeTraffic::default(); n],
            pingers: (0..n).map(|_| None).collect(),
            by_address,
            by_prefix,
            round: 0,
            crashed: vec![false; n],
            stop,
        };
        net.reconcile();
        for (k, _) in joining.iter().enumerate().filter(|(_, j)| !**j) {
            net.start_node(k);
        }
        net.start = Instant::now();
        net
    }

    /// The harness underneath (namespaces, processes, logs).
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    fn start_node(&mut self, k: usize) {
        let cfg = self.config.clone();
        self.mesh.start_node_with(k, &cfg);
        self.alive[k] = true;
    }

    fn link_up(&self, a: NodeId, b: NodeId) -> bool {
        if a == b {
            return true;
        }
        if self.islands[a] != self.islands[b] {
            return false;
        }
        let n = self.alive.len();
        self.overrides.get(&pair(a, b)).copied().unwrap_or(!self.paths[a * n + b].broken)
    }

    /// Applies the paths' wanted state (cut, lossy, clean) where it changed.
    fn reconcile(&mut self) {
        let n = self.alive.len();
        let mut changes = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let want = if self.link_up(a, b) { self.paths[a * n + b].loss } else { 1.0 };
                if self.applied.get(&(a, b)).copied().unwrap_or(0.0) != want {
                    changes.push((a, b, want));
                    self.applied.insert((a, b), want);
                }
            }
        }
        self.mesh.impair_paths(&changes);
    }

    /// Babel's counters of a running node, as underlay control traffic.
    fn current_traffic(&self, k: NodeId) -> NodeTraffic {
        if !self.alive[k] {
            return NodeTraffic::default();
        }
        let b = &self.mesh.status(k)["babel"];
        let get = |key: &str| b[key].as_u64().unwrap_or(0);
        NodeTraffic {
            control_tx_bytes: get("bytes_out") + get("packets_out") * WIRE_OVERHEAD,
            control_rx_bytes: get("bytes_in") + get("packets_in") * WIRE_OVERHEAD,
            control_tx_packets: get("packets_out"),
            data_tx_bytes: 0,
        }
    }

    /// Keeps a node's counters before its process goes.
    fn bank_traffic(&mut self, k: NodeId) {
        self.base[k] = sum(self.base[k], self.current_traffic(k));
    }

    /// Says so, once, when a daemon that should run has exited.
    fn check_daemons(&mut self) {
        for k in 0..self.alive.len() {
            if !self.alive[k] || self.crashed[k] {
                continue;
            }
            let Some(p) = self.mesh.nodes[k].proc.as_mut() else { continue };
            if let Ok(Some(status)) = p.child.try_wait() {
                self.crashed[k] = true;
                tracing::warn!(
                    "n{k}'s daemon exited on its own ({status}); its log: {}",
                    self.mesh.dir.join(format!("n{k}.log")).display()
                );
            }
        }
    }

    /// A raw ICMPv6 socket in node `k`'s namespace, bound to its mesh address.
    fn pinger(&mut self, k: NodeId) -> Option<&OwnedFd> {
        if self.pingers[k].is_none() {
            let addr: Ipv6Addr = self.mesh.nodes[k].mesh_address.parse().ok()?;
            let fd = self.mesh.nodes[k].ns.run(|| icmp_socket(addr)).ok()?;
            match fd {
                Ok(fd) => self.pingers[k] = Some(fd),
                Err(e) => {
                    tracing::warn!("cannot open an ICMPv6 socket for n{k}: {e}");
                    return None;
                }
            }
        }
        self.pingers[k].as_ref()
    }
}

/// A non-blocking raw ICMPv6 socket bound to `addr` (the kernel fills in
/// ICMPv6 checksums).
fn icmp_socket(addr: Ipv6Addr) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The node gives its TUN device the mesh address once it runs: bind
    // before that (IPV6_FREEBIND, Linux 4.15).
    const IPV6_FREEBIND: libc::c_int = 78;
    let one: libc::c_int = 1;
    // SAFETY: an int option of its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            IPV6_FREEBIND,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let sa = sockaddr(addr);
    // SAFETY: a valid sockaddr_in6 of its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn sockaddr(addr: Ipv6Addr) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; all zeros is a valid value.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_addr.s6_addr = addr.octets();
    sa
}

/// ICMPv6 echo request `id`/`seq` (checksum left to the kernel).
fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 128;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"sixmesh!");
    p
}

/// What an ICMPv6 message says about one of our echo requests.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Reply { id: u16, seq: u16 },
    TimeExceeded { id: u16, seq: u16 },
    Unreachable { id: u16, seq: u16 },
}

/// Reads an ICMPv6 message (from its type byte on, as raw sockets give it).
fn parse_answer(m: &[u8]) -> Option<Answer> {
    let ids = |at: usize| -> Option<(u16, u16)> {
        let e = m.get(at..at + 8)?;
        (e[0] == 128).then(|| (u16::from_be_bytes([e[4], e[5]]), u16::from_be_bytes([e[6], e[7]])))
    };
    match *m.first()? {
        129 if m.len() >= 8 => Some(Answer::Reply {
            id: u16::from_be_bytes([m[4], m[5]]),
            seq: u16::from_be_bytes([m[6], m[7]]),
        }),
        // Errors quote our packet after their 8-byte header: its IPv6 header, then the echo.
        3 => ids(48).map(|(id, seq)| Answer::TimeExceeded { id, seq }),
        1 => ids(48).map(|(id, seq)| Answer::Unreachable { id, seq }),
        _ => None,
    }
}

impl Network for NsNetwork {
    fn len(&self) -> usize {
        self.alive.len()
    }
    fn is_empty(&self) -> bool {
        self.alive.is_empty()
    }
    fn is_alive(&self, i: NodeId) -> bool {
        self.alive[i]
    }
    fn is_nat(&self, i: NodeId) -> bool {
        self.nat[i]
    }
    fn run_until(&mut self, t: f64) {
        let at = self.start + Duration::from_secs_f64(t.max(0.0));
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if at <= now {
                break;
            }
            std::thread::sleep((at - now).min(Duration::from_millis(100)));
        }
    }
    fn is_real(&self) -> bool {
        true
    }
    fn sample_time(&self, _t: f64) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
    fn set_path(&mut self, a: NodeId, b: NodeId, up: bool) {
        self.overrides.insert(pair(a, b), up);
        self.reconcile();
    }
    fn reset_paths(&mut self) {
        self.overrides.clear();
        self.reconcile();
    }
    fn set_islands(&mut self, island: Vec<u32>) {
        self.islands = island;
        self.reconcile();
    }
    fn fail(&mut self, i: NodeId) {
        self.bank_traffic(i);
        self.mesh.kill_node(i);
        self.alive[i] = false;
    }
    fn restart(&mut self, i: NodeId) {
        if self.alive[i] {
            self.fail(i);
        }
        self.crashed[i] = false;
        self.start_node(i);
    }
    fn leave(&mut self, i: NodeId) {
        self.bank_traffic(i);
        self.mesh.stop_node(i);
        self.alive[i] = false;
    }
    fn tunnel_graph(&mut self) -> Vec<(NodeId, NodeId)> {
        let mut edges = std::collections::BTreeSet::new();
        for i in 0..self.alive.len() {
            if !self.alive[i] {
                continue;
            }
            let st = self.mesh.status(i);
            for t in st["tunnels"].as_array().into_iter().flatten() {
                if t["up"] != true {
                    continue;
                }
                if let Some(&j) = t["peer"].as_str().and_then(|p| self.by_prefix.get(p))
                    && self.alive[j]
                {
                    edges.insert(pair(i, j));
                }
            }
        }
        edges.into_iter().collect()
    }
    fn underlay_components(&self) -> Vec<u32> {
        components(self.alive.len(), |i| self.alive[i], |a, b| self.link_up(a, b))
    }
    fn underlay_distances(&self, a: NodeId) -> Vec<Option<Duration>> {
        let n = self.alive.len();
        distances(n, a, |i| self.alive[i], |u, v| self.link_up(u, v).then(|| self.paths[u * n + v].latency))
    }
    fn path_broken(&self, a: NodeId, b: NodeId) -> bool {
        self.paths[a * self.alive.len() + b].broken
    }
    fn traffic(&mut self, i: NodeId) -> NodeTraffic {
        sum(self.base[i], self.current_traffic(i))
    }

    /// Pings every pair at once from the sources' mesh addresses; pairs
    /// unanswered are asked again every 250 ms (four tries); answers count
    /// until 1 s.
    fn check(&mut self, pairs: &[(NodeId, NodeId)]) -> Vec<Walk> {
        if self.stop.load(Ordering::Relaxed) {
            return pairs.iter().map(|&(a, _)| Walk::NoRoute { at: a }).collect();
        }
        self.check_daemons();
        self.round = self.round.wrapping_add(1);
        let id = self.round;
        let mut out: Vec<Option<Walk>> = vec![None; pairs.len()];
        let mut sent_at = vec![Instant::now(); pairs.len()];
        let send = |net: &mut Self, k: usize, sent_at: &mut Vec<Instant>| {
            let (a, b) = pairs[k];
            let Ok(dst) = net.mesh.nodes[b].mesh_address.parse::<Ipv6Addr>() else { return };
            let Some(fd) = net.pinger(a) else { return };
            let req = echo_request(id, k as u16);
            let sa = sockaddr(dst);
            sent_at[k] = Instant::now();
            // SAFETY: a valid buffer and sockaddr_in6. A failed send (no
            // route, say) is a missing answer.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                );
            }
        };
        for k in 0..pairs.len() {
            send(self, k, &mut sent_at);
        }
        let mut sources: Vec<NodeId> = pairs.iter().map(|p| p.0).collect();
        sources.sort_unstable();
        sources.dedup();
        let started = Instant::now();
        let mut tries = 1;
        let mut buf = [0u8; 1500];
        while out.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(1) {
            // Lossy paths lose pings too: ask again every 250 ms, four times in all.
            if tries < 4 && started.elapsed() >= Duration::from_millis(250) * tries {
                tries += 1;
                let missing: Vec<usize> = (0..pairs.len()).filter(|&k| out[k].is_none()).collect();
                for k in missing {
                    send(self, k, &mut sent_at);
                }
            }
            let mut pfds: Vec<libc::pollfd> = sources
                .iter()
                .filter_map(|&a| self.pingers[a].as_ref())
                .map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: valid pollfds.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 20) };
            for p in &pfds {
                if p.revents & libc::POLLIN == 0 {
                    continue;
                }
                loop {
                    // SAFETY: a sockaddr_in6-sized buffer for the source.
                    let mut from: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                    // SAFETY: buffers we own, of their lengths.
                    let r = unsafe {
                        libc::recvfrom(
                            p.fd,
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&mut from as *mut libc::sockaddr_in6).cast(),
                            &mut len,
                        )
                    };
                    if r <= 0 {
                        break;
                    }
                    let Some(ans) = parse_answer(&buf[..r as usize]) else { continue };
                    let (Answer::Reply { id: i, seq }
                    | Answer::TimeExceeded { id: i, seq }
                    | Answer::Unreachable { id: i, seq }) = ans;
                    let k = usize::from(seq);
                    if i != id || k >= pairs.len() || out[k].is_some() {
                        continue;
                    }
                    let (a, _) = pairs[k];
                    if self.pingers[a].as_ref().is_none_or(|fd| fd.as_raw_fd() != p.fd) {
                        continue;
                    }
                    let reporter = self.by_address.get(&Ipv6Addr::from(from.sin6_addr.s6_addr)).copied();
                    out[k] = Some(match ans {
                        Answer::Reply { .. } => Walk::Reached { hops: 0, latency: sent_at[k].elapsed() / 2 },
                        Answer::TimeExceeded { .. } => Walk::Loop { path: reporter.into_iter().collect() },
                        Answer::Unreachable { .. } => Walk::NoRoute { at: reporter.unwrap_or(a) },
                    });
                }
            }
        }
        pairs.iter().zip(out).map(|(&(a, _), w)| w.unwrap_or(Walk::NoRoute { at: a })).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_matched_to_our_echo_requests() {
        let req = echo_request(7, 300);
        let mut reply = req;
        reply[0] = 129;
        assert_eq!(parse_answer(&reply), Some(Answer::Reply { id: 7, seq: 300 }));
        // Time Exceeded: 8-byte header, the quoted IPv6 header, our echo.
        let mut te = vec![3u8, 0, 0, 0, 0, 0, 0, 0];
        te.extend([0u8; 40]);
        te.extend(req);
        assert_eq!(parse_answer(&te), Some(Answer::TimeExceeded { id: 7, seq: 300 }));
        te[0] = 1;
        assert_eq!(parse_answer(&te), Some(Answer::Unreachable { id: 7, seq: 300 }));
        // An echo request (someone pinging us) or a truncated error is not an answer.
        assert_eq!(parse_answer(&req), None);
        assert_eq!(parse_answer(&te[..50]), None);
    }
}
