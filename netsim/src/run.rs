//! Runs a [`Scenario`] on [`MeshSim`] and measures it: reachability over
//! time (by walking the forwarding tables of a fixed, seeded set of pairs
//! at every sample, which also finds forwarding loops), the convergence
//! time after each event, control bytes per node, path stretch and the
//! tunnel graph's hop count at the end; then checks the assertions.
//! Deterministic: the same scenario and seed give the same report.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use serde::Serialize;

use crate::babel::NodeId;
use crate::mesh::{MeshConfig, MeshSim, NodeTraffic, PathParams, Walk};
use crate::rng::Rng;
use crate::scenario::{ActionKind, EventSpec, Scenario, counted_name};

/// Everything a run measured. Serialized as the JSON report; rendered by
/// [`crate::report::html`].
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    pub nodes: usize,
    /// Nodes that announce a prefix: the destinations of the checked pairs
    /// (all nodes unless the scenario sets `[nodes] destinations`).
    pub destinations: usize,
    pub duration_s: f64,
    pub sample_interval_s: f64,
    /// Pairs checked at each sample (all ordered pairs, or a seeded subset).
    pub sampled_pairs: usize,
    pub regions: Vec<RegionSummary>,
    /// The start (cold convergence) and every event, in order.
    pub events: Vec<EventReport>,
    /// One entry per sample.
    pub reachability: Vec<Sample>,
    pub loops: LoopReport,
    pub control: ControlSummary,
    pub per_node: Vec<NodeReport>,
    /// `None` when no checked pair was reachable at the end.
    pub stretch: Option<Distribution>,
    pub tunnel_graph: GraphReport,
    pub assertions: Vec<AssertionResult>,
    /// Whether every assertion held.
    pub passed: bool,
    /// Wall-clock seconds the run took (filled by the caller).
    pub wall_s: Option<f64>,
    /// Run on real processes in namespaces (`false`: the simulator).
    pub namespaces: bool,
    /// Where the real processes' logs are (namespaces only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

/// A region and how many nodes it got.
#[derive(Clone, Debug, Serialize)]
pub struct RegionSummary {
    pub name: String,
    pub nodes: usize,
    pub nat: usize,
    /// Fraction of the paths with an end in this region broken from the start.
    pub broken_paths: f64,
}

/// The start or one event, and how long the mesh took to reach every
/// checked pair again.
#[derive(Clone, Debug, Serialize)]
pub struct EventReport {
    pub at_s: f64,
    /// `start`, or the event's `do`.
    pub what: String,
    /// What it touched, e.g. `n3 - n17`.
    pub detail: String,
    /// Seconds from the event to the first sample where every checked pair
    /// in the same underlay component was reachable; `None`: never.
    pub convergence_s: Option<f64>,
}

/// One reachability sample.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub t_s: f64,
    /// Checked pairs whose ends run and are in the same underlay component.
    pub eligible: usize,
    /// Of those, the ones whose forwarding walk reached the destination.
    pub reachable: usize,
    /// Walks that ran into a loop.
    pub loops: usize,
}

/// Forwarding loops seen.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoopReport {
    /// Walks that met a loop, over all samples.
    pub count: usize,
    /// The first few.
    pub examples: Vec<LoopExample>,
}

/// One forwarding loop.
#[derive(Clone, Debug, Serialize)]
pub struct LoopExample {
    pub t_s: f64,
    pub from: String,
    pub to: String,
    /// The nodes of the loop.
    pub cycle: Vec<String>,
}

/// Control bytes each node sent per second, over all nodes.
#[derive(Clone, Debug, Serialize)]
pub struct ControlSummary {
    pub mean_bytes_per_s: f64,
    pub p50_bytes_per_s: f64,
    pub p99_bytes_per_s: f64,
    pub max_bytes_per_s: f64,
    pub max_node: String,
}

/// One node at the end of the run.
#[derive(Clone, Debug, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub region: String,
    pub nat: bool,
    pub running: bool,
    /// Tunnels up at both ends.
    pub tunnels: usize,
    pub control_tx_bytes: u64,
    pub control_rx_bytes: u64,
    pub control_tx_bytes_per_s: f64,
}

/// Summary of a distribution.
#[derive(Clone, Debug, Serialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub max: f64,
}

/// The tunnel graph at the end.
#[derive(Clone, Debug, Serialize)]
pub struct GraphReport {
    pub nodes_running: usize,
    pub tunnels: usize,
    pub mean_degree: f64,
    /// Mean shortest-path hop count between running nodes (from up to 200
    /// sources).
    pub mean_hops: f64,
    pub max_hops: usize,
    /// Pairs of running nodes with no tunnel path between them.
    pub disconnected_pairs: usize,
    /// The tunnels, by node index (as in `per_node`).
    pub edges: Vec<(usize, usize)>,
}

/// One assertion's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct AssertionResult {
    /// The scenario key.
    pub name: String,
    pub passed: bool,
    /// What was measured against what was allowed.
    pub detail: String,
}

/// What a scenario runs on: the in-process simulator ([`MeshSim`], virtual
/// time) or real processes in network namespaces
/// ([`crate::ns::scenario`], wall-clock time). Nodes are indexes.
pub trait Network {
    /// Number of nodes (running or not).
    fn len(&self) -> usize;
    /// Whether there are no nodes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether node `i` runs.
    fn is_alive(&self, i: NodeId) -> bool;
    /// Whether node `i` accepts no incoming tunnel.
    fn is_nat(&self, i: NodeId) -> bool;
    /// Whether node `i` announces its prefix, i.e. is a destination the
    /// others route to (all of them unless `[nodes] destinations` is set).
    fn announces(&self, _i: NodeId) -> bool {
        true
    }
    /// Lets the network run until `t` seconds after its start.
    fn run_until(&mut self, t: f64);
    /// The time to give a sample taken now that was due at `t` (the
    /// simulator is always on time; real networks may be late).
    fn sample_time(&self, t: f64) -> f64 {
        t
    }
    /// Breaks or heals the underlay path between two nodes.
    fn set_path(&mut self, a: NodeId, b: NodeId, up: bool);
    /// Undoes every `set_path`: paths are as configured again.
    fn reset_paths(&mut self);
    /// Partition islands: paths between different islands are down.
    fn set_islands(&mut self, island: Vec<u32>);
    /// Node `i` crashes: it stops answering, nobody is told.
    fn fail(&mut self, i: NodeId);
    /// Node `i` starts afresh (after a crash, or joining).
    fn restart(&mut self, i: NodeId);
    /// Node `i` leaves gracefully.
    fn leave(&mut self, i: NodeId);
    /// Tunnels up at both ends, as (a, b) with a < b.
    fn tunnel_graph(&mut self) -> Vec<(NodeId, NodeId)>;
    /// Underlay components among running nodes (see [`MeshSim::underlay_components`]).
    fn underlay_components(&self) -> Vec<u32>;
    /// Lowest underlay latency from `a` to every node.
    fn underlay_distances(&self, a: NodeId) -> Vec<Option<Duration>>;

    /// [`Network::underlay_distances`] from each of `sources`.
    fn underlay_distances_from(&self, sources: &[NodeId]) -> Vec<Vec<Option<Duration>>> {
        sources.iter().map(|&a| self.underlay_distances(a)).collect()
    }
    /// Whether the path between two nodes is broken by configuration.
    fn path_broken(&self, a: NodeId, b: NodeId) -> bool;
    /// Node `i`'s control traffic so far.
    fn traffic(&mut self, i: NodeId) -> NodeTraffic;
    /// Whether packets from each pair's first node get to its second now:
    /// one [`Walk`] per pair (`Reached` carries the one-way latency).
    fn check(&mut self, pairs: &[(NodeId, NodeId)]) -> Vec<Walk>;
    /// Whether this is real processes in namespaces.
    fn is_real(&self) -> bool {
        false
    }
}

impl Network for MeshSim {
    fn len(&self) -> usize {
        MeshSim::len(self)
    }
    fn is_alive(&self, i: NodeId) -> bool {
        MeshSim::is_alive(self, i)
    }
    fn is_nat(&self, i: NodeId) -> bool {
        MeshSim::is_nat(self, i)
    }
    fn announces(&self, i: NodeId) -> bool {
        MeshSim::announces(self, i)
    }
    fn run_until(&mut self, t: f64) {
        let now = self.elapsed().as_secs_f64();
        if t > now {
            self.run_for(Duration::from_secs_f64(t - now));
        }
    }
    fn set_path(&mut self, a: NodeId, b: NodeId, up: bool) {
        MeshSim::set_path(self, a, b, up);
    }
    fn reset_paths(&mut self) {
        MeshSim::reset_paths(self);
    }
    fn set_islands(&mut self, island: Vec<u32>) {
        MeshSim::set_islands(self, island);
    }
    fn fail(&mut self, i: NodeId) {
        self.set_alive(i, false);
    }
    fn restart(&mut self, i: NodeId) {
        MeshSim::restart(self, i);
    }
    fn leave(&mut self, i: NodeId) {
        MeshSim::leave(self, i);
    }
    fn tunnel_graph(&mut self) -> Vec<(NodeId, NodeId)> {
        MeshSim::tunnel_graph(self)
    }
    fn underlay_components(&self) -> Vec<u32> {
        MeshSim::underlay_components(self)
    }
    fn underlay_distances(&self, a: NodeId) -> Vec<Option<Duration>> {
        MeshSim::underlay_distances(self, a)
    }

    fn underlay_distances_from(&self, sources: &[NodeId]) -> Vec<Vec<Option<Duration>>> {
        MeshSim::underlay_distances_from(self, sources)
    }
    fn path_broken(&self, a: NodeId, b: NodeId) -> bool {
        self.path(a, b).broken
    }
    fn traffic(&mut self, i: NodeId) -> NodeTraffic {
        MeshSim::traffic(self, i)
    }
    fn check(&mut self, pairs: &[(NodeId, NodeId)]) -> Vec<Walk> {
        self.check_walks(pairs)
    }
}

/// The nodes and underlay built from a scenario.
pub(crate) struct Layout {
    pub names: Vec<String>,
    pub region_of: Vec<usize>,
    pub nat: Vec<bool>,
    pub joining: Vec<bool>,
    /// Nodes that do not announce their prefix (`[nodes] destinations`).
    pub silent: Vec<bool>,
}

fn hash01(seed: u64, a: usize, b: usize, salt: u64) -> f64 {
    let mut r = Rng::new(seed ^ ((a as u64) << 32) ^ (b as u64) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    r.next_f64()
}

pub(crate) fn layout(s: &Scenario) -> Layout {
    let mut rng = Rng::new(s.seed);
    let rng = &mut rng;
    let regions = s.regions();
    let count = s.nodes.count;
    let total_share: f64 = regions.iter().map(|r| r.share).sum();
    let mut names = Vec::new();
    let mut region_of = Vec::new();
    let mut cum = Vec::new();
    let mut acc = 0.0;
    for r in &regions {
        acc += r.share / total_share.max(f64::MIN_POSITIVE);
        cum.push(acc);
    }
    for i in 0..count {
        let x = (i as f64 + 0.5) / count as f64;
        let r = cum.iter().position(|&c| x < c).unwrap_or(regions.len() - 1);
        names.push(counted_name(i));
        region_of.push(r);
    }
    let mut nat = vec![false; count];
    let mut order: Vec<usize> = (0..count).collect();
    shuffle(&mut order, rng);
    let k = (count as f64 * s.nodes.nat_fraction).round() as usize;
    for &i in order.iter().take(k) {
        nat[i] = true;
    }
    let mut joining = vec![false; count];
    shuffle(&mut order, rng);
    for &i in order.iter().take(s.nodes.joining) {
        joining[i] = true;
    }
    let mut silent = vec![false; count];
    if let Some(d) = s.nodes.destinations.filter(|&d| d < count) {
        shuffle(&mut order, rng);
        for &i in order.iter().skip(d) {
            silent[i] = true;
        }
    }
    for n in &s.nodes.list {
        names.push(n.name.clone());
        let r = n.region.as_ref().and_then(|r| regions.iter().position(|x| &x.name == r)).unwrap_or(0);
        region_of.push(r);
        nat.push(n.nat);
        joining.push(false);
        silent.push(false);
    }
    Layout { names, region_of, nat, joining, silent }
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

/// The underlay paths a scenario describes: each path's parameters, drawn
/// from its regions' (seeded: the same in the simulator and in namespaces).
pub(crate) fn paths(s: &Scenario, region_of: &[usize]) -> impl Fn(NodeId, NodeId) -> PathParams + use<> {
    let regions = s.regions();
    let nr = regions.len();
    let mut lat = vec![Duration::ZERO; nr * nr];
    let mut broken = vec![0.0; nr * nr];
    let mut loss = vec![0.0; nr * nr];
    let mut jitter = vec![Duration::ZERO; nr * nr];
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate() {
            lat[i * nr + j] = s.latency(&a.name, &b.name).unwrap_or(Duration::from_millis(20));
            broken[i * nr + j] = a.broken.max(b.broken);
            loss[i * nr + j] = a.loss.max(b.loss);
            jitter[i * nr + j] = Duration::from_secs_f64((a.jitter_ms + b.jitter_ms) / 1000.0);
        }
    }
    let region_of = region_of.to_vec();
    let seed = s.seed;
    move |a: NodeId, b: NodeId| {
        let k = region_of[a] * nr + region_of[b];
        // Each path's latency: the regions' figure times a factor in [0.75, 1.25).
        let f = 0.75 + 0.5 * hash01(seed, a, b, 1);
        PathParams {
            latency: lat[k].mul_f64(f),
            jitter: jitter[k],
            loss: loss[k],
            broken: broken[k] > 0.0 && hash01(seed, a, b, 2) < broken[k],
        }
    }
}

/// Builds the simulated mesh a scenario describes (the nodes, their
/// regions, NAT, the underlay). Also returns node names and regions.
pub fn build(s: &Scenario) -> (MeshSim, Vec<String>, Vec<usize>) {
    let l = layout(s);
    let regions = s.regions();
    let n = l.names.len();
    let mut cfg = MeshConfig::new(n, s.manager.clone());
    cfg.hello_interval = Duration::from_secs_f64(s.babel.hello_interval_s);
    cfg.update_interval = Duration::from_secs_f64(s.babel.update_interval_s);
    cfg.nat = l.nat.clone();
    cfg.threads = s.threads;
    cfg.initially_down = l.joining.clone();
    cfg.silent = l.silent.clone();
    cfg.bootstrap = s.nodes.bootstrap.unwrap_or(0);
    cfg.uplink =
        l.region_of.iter().map(|&r| regions[r].uplink_kbps.map(|k| (k * 1000.0 / 8.0) as u64)).collect();
    let paths = paths(s, &l.region_of);
    (MeshSim::with_config(cfg, paths, s.seed ^ 0x5eed), l.names, l.region_of)
}

/// Runs a scenario to its end; `progress(virtual_seconds_done)` is called
/// after every sample.
pub fn run(s: &Scenario, mut progress: impl FnMut(f64)) -> Report {
    let (sim, names, region_of) = build(s);
    Runner::new(s, sim, names, region_of).run(&mut progress)
}

/// Runs a scenario on any [`Network`] (`names` and `region_of`: one per
/// node, as the scenario's layout gives them).
pub fn run_on<N: Network>(
    s: &Scenario,
    net: N,
    names: Vec<String>,
    region_of: Vec<usize>,
    mut progress: impl FnMut(f64),
) -> Report {
    Runner::new(s, net, names, region_of).run(&mut progress)
}

struct Runner<'a, N> {
    s: &'a Scenario,
    sim: N,
    names: Vec<String>,
    region_of: Vec<usize>,
    rng: Rng,
    pairs: Vec<(NodeId, NodeId)>,
    comp: Vec<u32>,
    failed: Vec<NodeId>,
    to_join: Vec<NodeId>,
    left: HashSet<NodeId>,
    next_island: u32,
    islands: Vec<u32>,
    events: Vec<EventReport>,
    /// Indexes of events not converged yet.
    open: Vec<usize>,
    samples: Vec<Sample>,
    loops: LoopReport,
}

impl<'a, N: Network> Runner<'a, N> {
    fn new(s: &'a Scenario, sim: N, names: Vec<String>, region_of: Vec<usize>) -> Self {
        let mut rng = Rng::new(s.seed ^ 0xe7e7);
        let n = sim.len();
        // Pairs go to nodes that announce a prefix (all, by default).
        let dests: Vec<NodeId> = (0..n).filter(|&i| sim.announces(i)).collect();
        let all = n * dests.len() - dests.len();
        let pairs = if all <= s.sample_pairs {
            (0..n).flat_map(|a| dests.iter().filter(move |&&b| b != a).map(move |&b| (a, b))).collect()
        } else {
            let mut seen = HashSet::new();
            while seen.len() < s.sample_pairs {
                let a = rng.below(n);
                let b = dests[rng.below(dests.len())];
                if a != b {
                    seen.insert((a, b));
                }
            }
            let mut v: Vec<_> = seen.into_iter().collect();
            v.sort();
            v
        };
        let comp = sim.underlay_components();
        let to_join = (0..n).filter(|&i| !sim.is_alive(i)).collect();
        Runner {
            s,
            islands: vec![0; n],
            sim,
            names,
            region_of,
            rng,
            pairs,
            comp,
            failed: Vec::new(),
            to_join,
            left: HashSet::new(),
            next_island: 1,
            events: vec![EventReport {
                at_s: 0.0,
                what: "start".into(),
                detail: format!("{n} nodes"),
                convergence_s: None,
            }],
            open: vec![0],
            samples: Vec::new(),
            loops: LoopReport::default(),
        }
    }

    fn schedule(&self) -> Vec<(f64, &'a EventSpec)> {
        let mut v = Vec::new();
        for e in &self.s.event {
            let times = if e.every_s.is_some() { e.repeat.unwrap_or(1) } else { 1 };
            for k in 0..times {
                let at = e.at_s + e.every_s.unwrap_or(0.0) * k as f64;
                if at <= self.s.duration_s {
                    v.push((at, e));
                }
            }
        }
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    fn run(mut self, progress: &mut dyn FnMut(f64)) -> Report {
        let schedule = self.schedule();
        let mut next_event = 0;
        let dt = self.s.sample_interval_s;
        let mut next_sample = 0.0;
        let end = self.s.duration_s;
        loop {
            let ev_t = schedule.get(next_event).map(|e| e.0).unwrap_or(f64::INFINITY);
            let t = ev_t.min(next_sample).min(end);
            self.sim.run_until(t);
            let mut changed = false;
            while next_event < schedule.len() && schedule[next_event].0 <= t {
                let (at, spec) = schedule[next_event];
                // A real network applies it now, maybe a little late.
                let at = self.sim.sample_time(at);
                self.apply(at, spec);
                next_event += 1;
                changed = true;
            }
            if changed {
                self.comp = self.sim.underlay_components();
            }
            if t >= next_sample || changed {
                self.sample(self.sim.sample_time(t));
                progress(t);
                if t >= next_sample {
                    next_sample += dt;
                }
                // The simulator is always on time; a real network skips
                // the sample times it is already past (a sample with
                // unanswered pings takes up to a second).
                let now = self.sim.sample_time(t);
                while next_sample < now {
                    next_sample += dt;
                }
            }
            if t >= end {
                break;
            }
        }
        self.finish()
    }

    fn sample(&mut self, t: f64) {
        let checked: Vec<(NodeId, NodeId)> = self
            .pairs
            .iter()
            .copied()
            .filter(|&(a, b)| self.comp[a] != u32::MAX && self.comp[a] == self.comp[b])
            .collect();
        let walks = self.sim.check(&checked);
        let eligible = checked.len();
        let mut reachable = 0;
        let mut loops = 0;
        for (&(a, b), walk) in checked.iter().zip(walks) {
            match walk {
                Walk::Reached { .. } => reachable += 1,
                Walk::Loop { path } => {
                    loops += 1;
                    if self.loops.examples.len() < 20 {
                        self.loops.examples.push(LoopExample {
                            t_s: t,
                            from: self.names[a].clone(),
                            to: self.names[b].clone(),
                            cycle: path.iter().map(|&i| self.names[i].clone()).collect(),
                        });
                    }
                }
                _ => {}
            }
        }
        self.loops.count += loops;
        self.samples.push(Sample { t_s: t, eligible, reachable, loops });
        if reachable == eligible {
            for i in self.open.drain(..) {
                let e = &mut self.events[i];
                e.convergence_s = Some(t - e.at_s);
            }
        }
    }

    /// A node named or drawn at random among `among`.
    fn pick(&mut self, r: Option<&String>, among: &[NodeId]) -> Option<NodeId> {
        match r.map(String::as_str) {
            None | Some("random") => {
                if among.is_empty() {
                    None
                } else {
                    Some(among[self.rng.below(among.len())])
                }
            }
            Some(r) => {
                if let Some(reg) = r.strip_prefix("random:") {
                    let v: Vec<NodeId> = among
                        .iter()
                        .copied()
                        .filter(|&i| self.s.regions()[self.region_of[i]].name == reg)
                        .collect();
                    if v.is_empty() { None } else { Some(v[self.rng.below(v.len())]) }
                } else {
                    self.names.iter().position(|x| x == r)
                }
            }
        }
    }

    fn running(&self) -> Vec<NodeId> {
        (0..self.sim.len()).filter(|&i| self.sim.is_alive(i)).collect()
    }

    fn apply(&mut self, at: f64, e: &EventSpec) {
        let count = e.count.unwrap_or(1);
        let mut touched = Vec::new();
        match e.action {
            ActionKind::CutPath | ActionKind::HealPath => {
                let all: Vec<NodeId> = (0..self.sim.len()).collect();
                if let Some(a) = self.pick(e.node.as_ref(), &all) {
                    let others: Vec<NodeId> = all.iter().copied().filter(|&x| x != a).collect();
                    if let Some(b) = self.pick(e.peer.as_ref(), &others)
                        && a != b
                    {
                        self.sim.set_path(a, b, e.action == ActionKind::HealPath);
                        touched.push(format!("{} - {}", self.names[a], self.names[b]));
                    }
                }
            }
            ActionKind::CutTunnel => {
                let mut edges = self.sim.tunnel_graph();
                for _ in 0..count {
                    if edges.is_empty() {
                        break;
                    }
                    let (a, b) = edges.swap_remove(self.rng.below(edges.len()));
                    self.sim.set_path(a, b, false);
                    touched.push(format!("{} - {}", self.names[a], self.names[b]));
                }
            }
            ActionKind::Heal => {
                self.sim.reset_paths();
                self.islands = vec![0; self.sim.len()];
                self.sim.set_islands(self.islands.clone());
                touched.push("all cut paths and partitions".into());
            }
            ActionKind::FailNode | ActionKind::Leave => {
                for _ in 0..count {
                    let running = self.running();
                    let Some(i) = self.pick(e.node.as_ref(), &running) else { break };
                    if !self.sim.is_alive(i) {
                        break;
                    }
                    if e.action == ActionKind::FailNode {
                        self.sim.fail(i);
                        self.failed.push(i);
                    } else {
                        self.sim.leave(i);
                        self.left.insert(i);
                    }
                    touched.push(self.names[i].clone());
                }
            }
            ActionKind::RestoreNode => {
                for _ in 0..count {
                    let failed = self.failed.clone();
                    let Some(i) = self.pick(e.node.as_ref(), &failed) else { break };
                    let Some(k) = self.failed.iter().position(|&x| x == i) else { break };
                    self.failed.swap_remove(k);
                    self.sim.restart(i);
                    touched.push(self.names[i].clone());
                }
            }
            ActionKind::Partition => {
                let reg = e.region.clone().unwrap_or_default();
                let island = self.next_island;
                self.next_island += 1;
                let mut k = 0;
                for i in 0..self.sim.len() {
                    if self.s.regions()[self.region_of[i]].name == reg {
                        self.islands[i] = island;
                        k += 1;
                    }
                }
                self.sim.set_islands(self.islands.clone());
                touched.push(format!("{reg} ({k} nodes) cut off"));
            }
            ActionKind::HealPartition => {
                self.islands = vec![0; self.sim.len()];
                self.sim.set_islands(self.islands.clone());
                touched.push("every partition".into());
            }
            ActionKind::Join => {
                for _ in 0..count {
                    if self.to_join.is_empty() {
                        break;
                    }
                    let i = self.to_join.swap_remove(self.rng.below(self.to_join.len()));
                    self.sim.restart(i);
                    touched.push(self.names[i].clone());
                }
            }
        }
        let detail = if touched.is_empty() { "nothing to do".to_string() } else { touched.join(", ") };
        self.events.push(EventReport { at_s: at, what: e.action.name().into(), detail, convergence_s: None });
        self.open.push(self.events.len() - 1);
    }

    fn finish(mut self) -> Report {
        let n = self.sim.len();
        let regions = self.s.regions();
        let dur = self.s.duration_s;
        let edges = self.sim.tunnel_graph();
        let mut degree = vec![0usize; n];
        let mut adj = vec![Vec::new(); n];
        for &(a, b) in &edges {
            degree[a] += 1;
            degree[b] += 1;
            adj[a].push(b);
            adj[b].push(a);
        }
        let running = self.running();
        let graph = graph_report(&adj, &running, edges.clone(), &mut self.rng);

        let per_node: Vec<NodeReport> = (0..n)
            .map(|i| {
                let t = self.sim.traffic(i);
                NodeReport {
                    name: self.names[i].clone(),
                    region: regions[self.region_of[i]].name.clone(),
                    nat: self.sim.is_nat(i),
                    running: self.sim.is_alive(i),
                    tunnels: degree[i],
                    control_tx_bytes: t.control_tx_bytes,
                    control_rx_bytes: t.control_rx_bytes,
                    control_tx_bytes_per_s: t.control_tx_bytes as f64 / dur,
                }
            })
            .collect();
        let mut rates: Vec<(f64, usize)> =
            per_node.iter().enumerate().map(|(i, r)| (r.control_tx_bytes_per_s, i)).collect();
        rates.sort_by(|a, b| a.0.total_cmp(&b.0));
        let q = |p: f64| rates[((rates.len() - 1) as f64 * p).round() as usize].0;
        let control = ControlSummary {
            mean_bytes_per_s: rates.iter().map(|r| r.0).sum::<f64>() / rates.len() as f64,
            p50_bytes_per_s: q(0.5),
            p99_bytes_per_s: q(0.99),
            max_bytes_per_s: rates.last().map_or(0.0, |r| r.0),
            max_node: rates.last().map_or(String::new(), |r| self.names[r.1].clone()),
        };

        let stretch = self.stretch(&running);

        let regions_summary = regions
            .iter()
            .enumerate()
            .map(|(r, reg)| {
                let members: Vec<usize> = (0..n).filter(|&i| self.region_of[i] == r).collect();
                let (mut paths, mut broken) = (0usize, 0usize);
                for &a in members.iter().take(200) {
                    for b in (0..n).step_by((n / 200).max(1)) {
                        if a != b {
                            paths += 1;
                            broken += usize::from(self.sim.path_broken(a, b));
                        }
                    }
                }
                RegionSummary {
                    name: reg.name.clone(),
                    nodes: members.len(),
                    nat: members.iter().filter(|&&i| self.sim.is_nat(i)).count(),
                    broken_paths: if paths == 0 { 0.0 } else { broken as f64 / paths as f64 },
                }
            })
            .collect();

        let mut report = Report {
            scenario: self.s.name.clone(),
            description: self.s.description.clone(),
            seed: self.s.seed,
            nodes: n,
            destinations: (0..n).filter(|&i| self.sim.announces(i)).count(),
            duration_s: dur,
            sample_interval_s: self.s.sample_interval_s,
            sampled_pairs: self.pairs.len(),
            regions: regions_summary,
            events: self.events,
            reachability: self.samples,
            loops: self.loops,
            control,
            per_node,
            stretch,
            tunnel_graph: graph,
            assertions: Vec::new(),
            passed: true,
            wall_s: None,
            namespaces: self.sim.is_real(),
            logs: None,
        };
        report.assertions = check(self.s, &report);
        report.passed = report.assertions.iter().all(|a| a.passed);
        report
    }

    /// Overlay path latency over the shortest underlay path, from a few
    /// sources to every running node (the shortest path costs O(n²) per
    /// source).
    fn stretch(&mut self, running: &[NodeId]) -> Option<Distribution> {
        let n = self.sim.len();
        let sources = (40_000_000 / (n * n).max(1)).clamp(1, 30).min(running.len());
        let mut pool = running.to_vec();
        shuffle(&mut pool, &mut self.rng);
        let mut pairs = Vec::new();
        let mut shortest = Vec::new();
        let from: Vec<NodeId> = pool.iter().take(sources).copied().collect();
        let all = self.sim.underlay_distances_from(&from);
        for (&a, dist) in from.iter().zip(all) {
            for &b in running {
                if b != a && self.sim.announces(b) {
                    pairs.push((a, b));
                    shortest.push(dist[b]);
                }
            }
        }
        let walks = self.sim.check(&pairs);
        let mut v = Vec::new();
        for (walk, d) in walks.into_iter().zip(shortest) {
            if let (Walk::Reached { latency, .. }, Some(d)) = (walk, d)
                && !d.is_zero()
            {
                v.push(latency.as_secs_f64() / d.as_secs_f64());
            }
        }
        distribution(v)
    }
}

fn distribution(mut v: Vec<f64>) -> Option<Distribution> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some(Distribution {
        count: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: q(0.5),
        p90: q(0.9),
        max: *v.last().expect("non-empty"),
    })
}

/// Hop counts of a graph from up to 200 sources by breadth-first search.
fn graph_report(
    adj: &[Vec<usize>],
    running: &[NodeId],
    edges: Vec<(usize, usize)>,
    rng: &mut Rng,
) -> GraphReport {
    let n = adj.len();
    let mut pool = running.to_vec();
    shuffle(&mut pool, rng);
    let sources: Vec<NodeId> = pool.into_iter().take(200).collect();
    let (mut sum, mut cnt, mut max, mut disc) = (0usize, 0usize, 0usize, 0usize);
    for &s in &sources {
        let mut dist = vec![usize::MAX; n];
        dist[s] = 0;
        let mut q = VecDeque::from([s]);
        while let Some(u) = q.pop_front() {
            for &v in &adj[u] {
                if dist[v] == usize::MAX {
                    dist[v] = dist[u] + 1;
                    q.push_back(v);
                }
            }
        }
        for &t in running {
            if t == s {
                continue;
            }
            if dist[t] == usize::MAX {
                disc += 1;
            } else {
                sum += dist[t];
                cnt += 1;
                max = max.max(dist[t]);
            }
        }
    }
    // Scale the disconnected count from the sampled sources to all pairs.
    let scale = if sources.is_empty() { 0.0 } else { running.len() as f64 / sources.len() as f64 };
    let degree_sum: usize = running.iter().map(|&i| adj[i].len()).sum();
    GraphReport {
        nodes_running: running.len(),
        tunnels: edges.len(),
        mean_degree: if running.is_empty() { 0.0 } else { degree_sum as f64 / running.len() as f64 },
        mean_hops: if cnt == 0 { 0.0 } else { sum as f64 / cnt as f64 },
        max_hops: max,
        disconnected_pairs: (disc as f64 * scale).round() as usize,
        edges,
    }
}

fn check(s: &Scenario, r: &Report) -> Vec<AssertionResult> {
    let a = &s.assertions;
    let mut out = Vec::new();
    let mut push = |name: &str, passed: bool, detail: String| {
        out.push(AssertionResult { name: name.into(), passed, detail });
    };
    let fmt_conv = |c: Option<f64>| c.map_or("never".to_string(), |c| format!("{c:.2} s"));
    if let Some(lim) = a.converged_within_s {
        let c = r.events[0].convergence_s;
        push(
            "converged_within_s",
            c.is_some_and(|c| c <= lim + 1e-9),
            format!("every checked pair reachable {} after the start (limit {lim} s)", fmt_conv(c)),
        );
    }
    if let Some(lim) = a.reachable_within_s {
        let bad: Vec<String> = r.events[1..]
            .iter()
            .filter(|e| e.convergence_s.is_none_or(|c| c > lim + 1e-9))
            .map(|e| format!("{} at {} s: {}", e.what, e.at_s, fmt_conv(e.convergence_s)))
            .collect();
        let worst = r.events[1..].iter().filter_map(|e| e.convergence_s).fold(0.0, f64::max);
        push(
            "reachable_within_s",
            bad.is_empty(),
            if bad.is_empty() {
                format!("{} events, slowest reconvergence {worst:.2} s (limit {lim} s)", r.events.len() - 1)
            } else {
                format!("limit {lim} s exceeded by {}: {}", bad.len(), bad.join("; "))
            },
        );
    }
    if a.no_loops {
        push(
            "no_loops",
            r.loops.count == 0,
            if r.loops.count == 0 {
                format!("no loop in {} samples", r.reachability.len())
            } else {
                let e = &r.loops.examples[0];
                format!(
                    "{} looping walks; first at {} s from {} to {}: {}",
                    r.loops.count,
                    e.t_s,
                    e.from,
                    e.to,
                    e.cycle.join(" -> ")
                )
            },
        );
    }
    if let Some(lim) = a.max_control_bytes_per_s {
        push(
            "max_control_bytes_per_s",
            r.control.max_bytes_per_s <= lim,
            format!(
                "busiest node {} sent {:.0} B/s (mean {:.0}; limit {lim})",
                r.control.max_node, r.control.max_bytes_per_s, r.control.mean_bytes_per_s
            ),
        );
    }
    if let Some(lim) = a.max_mean_stretch {
        let m = r.stretch.as_ref().map(|d| d.mean);
        push(
            "max_mean_stretch",
            m.is_some_and(|m| m <= lim),
            match m {
                Some(m) => format!("mean stretch {m:.2} (limit {lim})"),
                None => "no reachable pair to measure".into(),
            },
        );
    }
    if let Some(lim) = a.max_mean_hops {
        let h = r.tunnel_graph.mean_hops;
        push("max_mean_hops", h <= lim, format!("tunnel graph mean hop count {h:.2} (limit {lim})"));
    }
    if let Some(lim) = a.min_final_reachability {
        let f = r
            .reachability
            .last()
            .map_or(0.0, |s| if s.eligible == 0 { 1.0 } else { s.reachable as f64 / s.eligible as f64 });
        push(
            "min_final_reachability",
            f + 1e-12 >= lim,
            format!("{:.2} % of checked pairs reachable at the end (limit {:.2} %)", f * 100.0, lim * 100.0),
        );
    }
    out
}
