//! The scenario file: a mesh, its underlay, what happens to it and what
//! must hold. TOML, every key documented in `docs/netsim.md`; unknown keys
//! are errors that name the key and its line.
//!
//! ```toml
//! name = "europe-china"
//! seed = 1
//! duration_s = 300
//!
//! [nodes]
//! count = 60
//! nat_fraction = 0.1
//!
//! [[region]]
//! name = "europe"
//! share = 2
//! broken = 0.01
//!
//! [[region]]
//! name = "china"
//! share = 1
//! broken = 0.10
//!
//! [latency_ms]
//! europe = { europe = 15, china = 120 }
//! china = { china = 30 }
//!
//! [[event]]
//! at_s = 120
//! do = "cut_tunnel"
//!
//! [assert]
//! reachable_within_s = 10
//! no_loops = true
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sixmesh_mesh_node::manager::ManagerConfig;

/// A whole scenario.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in reports.
    #[serde(default)]
    pub name: String,
    /// One line on what it shows.
    #[serde(default)]
    pub description: String,
    /// Seed of every random choice: the same seed gives the same run.
    #[serde(default = "one")]
    pub seed: u64,
    /// Virtual seconds to simulate.
    pub duration_s: f64,
    /// How often reachability is sampled (and loops looked for), seconds.
    #[serde(default = "half")]
    pub sample_interval_s: f64,
    /// At most this many (source, destination) pairs are checked at each
    /// sample; with more pairs than that, a fixed seeded subset is used.
    #[serde(default = "default_pairs")]
    pub sample_pairs: usize,
    /// The nodes.
    pub nodes: Nodes,
    /// Regions of the underlay; none: one region "default" with 20 ms paths.
    #[serde(default)]
    pub region: Vec<Region>,
    /// One-way latency between regions in milliseconds:
    /// `[latency_ms] europe = { europe = 15, us = 45 }`. Symmetric: giving
    /// one direction is enough. A missing pair is an error.
    #[serde(default)]
    pub latency_ms: BTreeMap<String, BTreeMap<String, f64>>,
    /// Tunnel-manager parameters (`mesh-node`'s `ManagerConfig` keys).
    #[serde(default)]
    pub manager: ManagerConfig,
    /// Babel timers inside tunnels.
    #[serde(default)]
    pub babel: Babel,
    /// What happens, at virtual times.
    #[serde(default)]
    pub event: Vec<EventSpec>,
    /// What must hold; a run with a failed assertion fails.
    #[serde(default, rename = "assert")]
    pub assertions: Assertions,
    /// Threads to simulate on (0: one per core, at most one per 100
    /// nodes). Not part of the file: the result is the same whatever it
    /// is (`sixmesh sim --threads`).
    #[serde(skip)]
    pub threads: usize,
}

fn one() -> u64 {
    1
}
fn half() -> f64 {
    0.5
}
fn default_pairs() -> usize {
    4000
}

/// The nodes: a count spread over the regions by their `share`, or an
/// explicit list, or both.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    /// Nodes named `n0`, `n1`, …, spread over the regions by share.
    #[serde(default)]
    pub count: usize,
    /// Fraction of the counted nodes behind NAT (chosen at random).
    #[serde(default)]
    pub nat_fraction: f64,
    /// Counted nodes that are not running at the start: `join` events
    /// start them (chosen at random, never among the listed nodes).
    #[serde(default)]
    pub joining: usize,
    /// How many of the counted nodes announce their prefix in Babel, chosen
    /// at random (default: all; named nodes always do). The others run
    /// their tunnels and Babel all the same and route to the announced
    /// prefixes; reachability, loops and stretch are checked towards those.
    /// Route tables grow as nodes × announced prefixes × tunnels, so this
    /// is what lets a mesh of 10,000 nodes fit in memory. Simulator only.
    #[serde(default)]
    pub destinations: Option<usize>,
    /// How many peers each node starts knowing, drawn at random like a
    /// registry's bootstrap list (default: every other node; the tunnel
    /// manager keeps at most `manager.max_candidates` of them and learns
    /// others from Babel's routes). Simulator only.
    #[serde(default)]
    pub bootstrap: Option<usize>,
    /// Named nodes.
    #[serde(default)]
    pub list: Vec<NodeSpec>,
}

/// One named node.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    /// Its region (default: the first one).
    #[serde(default)]
    pub region: Option<String>,
    /// Behind NAT: accepts no incoming tunnel.
    #[serde(default)]
    pub nat: bool,
}

/// A region of the underlay.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: String,
    /// Relative share of the counted nodes.
    #[serde(default = "one_f")]
    pub share: f64,
    /// Probability that a path with an end in this region is broken for the
    /// whole run (re6st: about 0.01 in Europe and the US, 0.10 in China). A
    /// path between two regions takes the larger of their probabilities.
    #[serde(default)]
    pub broken: f64,
    /// Probability that a packet is lost, taken like `broken`.
    #[serde(default)]
    pub loss: f64,
    /// Extra delay per packet, uniform in [0, jitter), added from both ends.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Upstream bandwidth of each node's access link, kbit/s (none: unlimited).
    #[serde(default)]
    pub uplink_kbps: Option<f64>,
}

fn one_f() -> f64 {
    1.0
}

/// Babel timers in tunnels (the node's defaults: 0.5 s and 30 s).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Babel {
    #[serde(default = "hello")]
    pub hello_interval_s: f64,
    #[serde(default = "update")]
    pub update_interval_s: f64,
}

fn hello() -> f64 {
    0.5
}
fn update() -> f64 {
    30.0
}

impl Default for Babel {
    fn default() -> Self {
        Babel { hello_interval_s: hello(), update_interval_s: update() }
    }
}

/// An event, at `at_s`, repeated `repeat` times every `every_s` if given.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    /// Virtual time of the (first) occurrence, seconds.
    pub at_s: f64,
    /// Period of repetitions, seconds.
    #[serde(default)]
    pub every_s: Option<f64>,
    /// Number of occurrences (with `every_s`; default 1).
    #[serde(default)]
    pub repeat: Option<usize>,
    /// What happens.
    #[serde(rename = "do")]
    pub action: ActionKind,
    /// The node (`fail_node`, `restore_node`, `leave`) or first end
    /// (`cut_path`, `heal_path`): a name, `random`, or `random:REGION`.
    #[serde(default)]
    pub node: Option<String>,
    /// The other end of a path.
    #[serde(default)]
    pub peer: Option<String>,
    /// The region (`partition`).
    #[serde(default)]
    pub region: Option<String>,
    /// How many (`cut_tunnel`, `join`, `leave`, `fail_node`; default 1).
    #[serde(default)]
    pub count: Option<usize>,
}

/// The kinds of events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Break the underlay path between `node` and `peer`.
    CutPath,
    /// Heal the path between `node` and `peer`.
    HealPath,
    /// Break the underlay paths under `count` random tunnels that are up.
    CutTunnel,
    /// Heal every path cut by an event and end every partition (paths
    /// broken from the start stay broken).
    Heal,
    /// Node(s) crash: they stop answering, nobody is told.
    FailNode,
    /// A failed node restarts (afresh, with its persisted seqno).
    RestoreNode,
    /// Cut every path between `region` and the other regions.
    Partition,
    /// End every partition.
    HealPartition,
    /// `count` of the `joining` nodes start.
    Join,
    /// Node(s) leave gracefully: their tunnels close at once.
    Leave,
}

/// What must hold. Every key is optional.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Assertions {
    /// Every checked pair in the same underlay component is reachable
    /// within this many seconds after the start.
    pub converged_within_s: Option<f64>,
    /// …and within this many seconds after each event.
    pub reachable_within_s: Option<f64>,
    /// No forwarding loop is ever seen.
    #[serde(default)]
    pub no_loops: bool,
    /// Control bytes each node sends per second (on the underlay, averaged
    /// over the run), for every node.
    pub max_control_bytes_per_s: Option<f64>,
    /// Mean path stretch at the end: overlay path latency over the shortest
    /// underlay path latency.
    pub max_mean_stretch: Option<f64>,
    /// Mean hop count of the tunnel graph at the end.
    pub max_mean_hops: Option<f64>,
    /// Fraction of checked pairs reachable at the end.
    pub min_final_reachability: Option<f64>,
}

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(msg: impl Into<String>) -> String {
    msg.into()
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a scenario; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse { path: origin.to_string(), message: e.to_string() })?;
        s.validate().map_err(|message| ScenarioError::Invalid { path: origin.to_string(), message })?;
        Ok(s)
    }

    /// The regions, or the single default one.
    pub fn regions(&self) -> Vec<Region> {
        if self.region.is_empty() {
            vec![Region {
                name: "default".into(),
                share: 1.0,
                broken: 0.0,
                loss: 0.0,
                jitter_ms: 0.0,
                uplink_kbps: None,
            }]
        } else {
            self.region.clone()
        }
    }

    /// Total number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.count + self.nodes.list.len()
    }

    /// One-way latency between two regions.
    pub fn latency(&self, a: &str, b: &str) -> Option<Duration> {
        if self.region.is_empty() {
            return Some(Duration::from_millis(20));
        }
        let ms = self
            .latency_ms
            .get(a)
            .and_then(|m| m.get(b))
            .or_else(|| self.latency_ms.get(b).and_then(|m| m.get(a)))?;
        Some(Duration::from_secs_f64(ms / 1000.0))
    }

    /// The same scenario, smaller: at most `max_nodes` counted nodes (NAT
    /// and joining nodes scaled alike) and at most `max_duration_s`
    /// seconds: event occurrences later than the duration minus
    /// `assert.reachable_within_s` are dropped, so that each one left can be
    /// judged. For CI.
    pub fn scaled(&self, max_nodes: usize, max_duration_s: f64) -> Scenario {
        let mut s = self.clone();
        if s.nodes.count > max_nodes {
            let f = max_nodes as f64 / s.nodes.count as f64;
            s.nodes.joining = ((s.nodes.joining as f64) * f).round() as usize;
            s.nodes.count = max_nodes;
        }
        if s.duration_s > max_duration_s {
            s.duration_s = max_duration_s;
            // Keep only the occurrences that leave time to judge them.
            let last = s.duration_s - s.assertions.reachable_within_s.unwrap_or(0.0);
            s.event.retain(|e| e.at_s <= last);
            for e in &mut s.event {
                if let Some(p) = e.every_s {
                    let fit = ((last - e.at_s) / p).floor() as usize + 1;
                    e.repeat = Some(e.repeat.unwrap_or(1).min(fit));
                }
            }
        }
        s
    }

    fn validate(&self) -> Result<(), String> {
        let fin = |v: f64| v.is_finite() && v >= 0.0;
        if !(fin(self.duration_s) && self.duration_s > 0.0) {
            return Err(invalid("`duration_s` must be a positive number of seconds"));
        }
        if !(fin(self.sample_interval_s) && self.sample_interval_s >= 0.01) {
            return Err(invalid("`sample_interval_s` must be at least 0.01 s"));
        }
        if self.node_count() < 2 {
            return Err(invalid(
                "a mesh needs at least 2 nodes: set `[nodes] count` or add `[[nodes.list]]` entries",
            ));
        }
        if self.node_count() > 1 << 20 {
            return Err(invalid("at most 1048576 nodes"));
        }
        if !(0.0..=1.0).contains(&self.nodes.nat_fraction) {
            return Err(invalid("`nodes.nat_fraction` must be between 0 and 1"));
        }
        if self.nodes.joining > self.nodes.count {
            return Err(invalid("`nodes.joining` cannot exceed `nodes.count`"));
        }
        if self.nodes.destinations == Some(0) && self.nodes.list.is_empty() {
            return Err(invalid(
                "`nodes.destinations` must be at least 1: some node has to announce a prefix",
            ));
        }
        if self.nodes.bootstrap == Some(0) {
            return Err(invalid("`nodes.bootstrap` must be at least 1 (leave it out for every node)"));
        }
        if !(fin(self.babel.hello_interval_s) && self.babel.hello_interval_s >= 0.05) {
            return Err(invalid("`babel.hello_interval_s` must be at least 0.05"));
        }
        if !(fin(self.babel.update_interval_s) && self.babel.update_interval_s >= self.babel.hello_interval_s)
        {
            return Err(invalid("`babel.update_interval_s` must be at least the Hello interval"));
        }
        if self.manager.client_count == 0 {
            return Err(invalid("`manager.client_count` must be at least 1"));
        }
        let regions = self.regions();
        let mut names = HashSet::new();
        for r in &regions {
            if !names.insert(r.name.as_str()) {
                return Err(format!("region `{}` is defined twice", r.name));
            }
            for (k, v) in [("broken", r.broken), ("loss", r.loss)] {
                if !(0.0..=1.0).contains(&v) {
                    return Err(format!("region `{}`: `{k}` must be a probability between 0 and 1", r.name));
                }
            }
            if !fin(r.share) || !fin(r.jitter_ms) || r.uplink_kbps.is_some_and(|b| !(fin(b) && b > 0.0)) {
                return Err(format!(
                    "region `{}`: `share`, `jitter_ms` and `uplink_kbps` must be non-negative numbers",
                    r.name
                ));
            }
        }
        if self.nodes.count > 0 && regions.iter().map(|r| r.share).sum::<f64>() <= 0.0 {
            return Err(invalid("the regions' `share`s add up to 0: no region can hold the counted nodes"));
        }
        for (a, row) in &self.latency_ms {
            if !names.contains(a.as_str()) {
                return Err(format!("`latency_ms.{a}`: no region `{a}` (add a [[region]] with that name)"));
            }
            for (b, v) in row {
                if !names.contains(b.as_str()) {
                    return Err(format!("`latency_ms.{a}.{b}`: no region `{b}`"));
                }
                if !fin(*v) {
                    return Err(format!("`latency_ms.{a}.{b}` must be a non-negative number of ms"));
                }
            }
        }
        for a in &regions {
            for b in &regions {
                if self.latency(&a.name, &b.name).is_none() {
                    return Err(format!(
                        "no latency between regions `{}` and `{}`: add `{} = {{ {} = MS }}` under [latency_ms]",
                        a.name, b.name, a.name, b.name
                    ));
                }
            }
        }
        let mut node_names = HashSet::new();
        for n in &self.nodes.list {
            if !node_names.insert(n.name.as_str()) || is_counted_name(&n.name) {
                return Err(format!(
                    "node name `{}` is used twice (names `n0`, `n1`, … are taken by counted nodes)",
                    n.name
                ));
            }
            if let Some(r) = &n.region
                && !names.contains(r.as_str())
            {
                return Err(format!("node `{}`: no region `{r}`", n.name));
            }
        }
        for (i, e) in self.event.iter().enumerate() {
            let at = format!("event {} (`do = \"{}\"` at {} s)", i + 1, e.action.name(), e.at_s);
            if !fin(e.at_s) {
                return Err(format!("{at}: `at_s` must be a non-negative number"));
            }
            if e.every_s.is_some_and(|p| !(fin(p) && p > 0.0)) {
                return Err(format!("{at}: `every_s` must be positive"));
            }
            if e.repeat.is_some() && e.every_s.is_none() {
                return Err(format!("{at}: `repeat` needs `every_s`"));
            }
            let check_ref = |r: &Option<String>, key: &str| -> Result<(), String> {
                if let Some(r) = r {
                    if r == "random" {
                        return Ok(());
                    }
                    if let Some(reg) = r.strip_prefix("random:") {
                        if !names.contains(reg) {
                            return Err(format!("{at}: `{key} = \"{r}\"`: no region `{reg}`"));
                        }
                        return Ok(());
                    }
                    if !node_names.contains(r.as_str())
                        && counted_index(r).is_none_or(|i| i >= self.nodes.count)
                    {
                        return Err(format!(
                            "{at}: `{key} = \"{r}\"`: no such node (use a node's name, \"random\" or \"random:REGION\")"
                        ));
                    }
                }
                Ok(())
            };
            check_ref(&e.node, "node")?;
            check_ref(&e.peer, "peer")?;
            match e.action {
                ActionKind::CutPath | ActionKind::HealPath if e.node.is_none() || e.peer.is_none() => {
                    return Err(format!("{at}: needs `node` and `peer` (the two ends of the path)"));
                }
                ActionKind::Partition => match &e.region {
                    None => return Err(format!("{at}: needs `region`")),
                    Some(r) if !names.contains(r.as_str()) => {
                        return Err(format!("{at}: no region `{r}`"));
                    }
                    _ => {}
                },
                ActionKind::Join if self.nodes.joining == 0 => {
                    return Err(format!("{at}: no node to join: set `[nodes] joining = N`"));
                }
                _ => {}
            }
        }
        for (k, v) in [
            ("converged_within_s", self.assertions.converged_within_s),
            ("reachable_within_s", self.assertions.reachable_within_s),
            ("max_control_bytes_per_s", self.assertions.max_control_bytes_per_s),
            ("max_mean_stretch", self.assertions.max_mean_stretch),
            ("max_mean_hops", self.assertions.max_mean_hops),
            ("min_final_reachability", self.assertions.min_final_reachability),
        ] {
            if v.is_some_and(|v| !fin(v)) {
                return Err(format!("`assert.{k}` must be a non-negative number"));
            }
        }
        Ok(())
    }
}

impl ActionKind {
    /// The name used in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::CutPath => "cut_path",
            ActionKind::HealPath => "heal_path",
            ActionKind::CutTunnel => "cut_tunnel",
            ActionKind::Heal => "heal",
            ActionKind::FailNode => "fail_node",
            ActionKind::RestoreNode => "restore_node",
            ActionKind::Partition => "partition",
            ActionKind::HealPartition => "heal_partition",
            ActionKind::Join => "join",
            ActionKind::Leave => "leave",
        }
    }
}

/// Name of counted node `i`.
pub fn counted_name(i: usize) -> String {
    format!("n{i}")
}

fn counted_index(name: &str) -> Option<usize> {
    let digits = name.strip_prefix('n')?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

fn is_counted_name(name: &str) -> bool {
    counted_index(name).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "duration_s = 10\n[nodes]\ncount = 5\n";

    #[test]
    fn minimal_scenario_gets_defaults() {
        let s = Scenario::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(s.node_count(), 5);
        assert_eq!(s.seed, 1);
        assert_eq!(s.regions().len(), 1);
        assert_eq!(s.latency("default", "default"), Some(Duration::from_millis(20)));
        assert_eq!(s.manager, ManagerConfig::default());
    }

    #[test]
    fn sampled_destinations_and_bootstrap_are_checked() {
        let base = "duration_s = 10\n[nodes]\ncount = 5\n";
        let e = Scenario::parse(&format!("{base}destinations = 0\n"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("destinations"), "{e}");
        let e = Scenario::parse(&format!("{base}bootstrap = 0\n"), "t.toml").unwrap_err();
        assert!(e.to_string().contains("bootstrap"), "{e}");
        let s = Scenario::parse(&format!("{base}destinations = 2\nbootstrap = 3\n"), "t.toml").unwrap();
        assert_eq!((s.nodes.destinations, s.nodes.bootstrap), (Some(2), Some(3)));
        // Refused in namespaces (before the root check), whatever the user.
        let e = crate::ns::scenario::check(&s).unwrap_err();
        assert!(e.to_string().contains("destinations") && e.to_string().contains("simulator"), "{e}");
        let mut t = s.clone();
        t.nodes.destinations = None;
        let e = crate::ns::scenario::check(&t).unwrap_err();
        assert!(e.to_string().contains("bootstrap"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = Scenario::parse("duration_s = 10\n[nodes]\ncount = 5\ncuont = 3\n", "t.toml").unwrap_err();
        let m = e.to_string();
        assert!(m.contains("cuont") && m.contains("line 4"), "{m}");
        let e = Scenario::parse(
            "duration_s = 10\n[nodes]\ncount = 5\n[[event]]\nat_s = 1\ndo = \"explode\"\n",
            "t.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("explode") && e.to_string().contains("line 6"), "{e}");
    }

    #[test]
    fn missing_latency_and_bad_references_say_what_to_add() {
        let text = "duration_s = 10\n[nodes]\ncount = 5\n[[region]]\nname = \"eu\"\n[[region]]\nname = \"cn\"\n\
                    [latency_ms]\neu = { eu = 10 }\ncn = { cn = 10 }\n";
        let e = Scenario::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("[latency_ms]") && e.contains("eu") && e.contains("cn"), "{e}");
        let text = format!("{MINIMAL}[[event]]\nat_s = 1\ndo = \"fail_node\"\nnode = \"n9\"\n");
        let e = Scenario::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("n9") && e.contains("random"), "{e}");
        let text = format!("{MINIMAL}[[event]]\nat_s = 1\ndo = \"join\"\n");
        assert!(Scenario::parse(&text, "t.toml").unwrap_err().to_string().contains("joining"));
    }

    #[test]
    fn scaling_keeps_proportions() {
        let text = "duration_s = 600\n[nodes]\ncount = 1000\njoining = 100\n\
                    [[event]]\nat_s = 10\nevery_s = 10\nrepeat = 50\ndo = \"join\"\n\
                    [[event]]\nat_s = 55\ndo = \"heal\"\n[assert]\nreachable_within_s = 10\n";
        let s = Scenario::parse(text, "t.toml").unwrap().scaled(50, 60.0);
        assert_eq!((s.nodes.count, s.nodes.joining, s.duration_s), (50, 5, 60.0));
        assert_eq!(s.event.len(), 1, "the heal at 55 s could not be judged");
        assert_eq!(s.event[0].repeat, Some(5), "joins at 10..=50 s");
    }
}
