//! A whole sixmesh network in namespaces, with the real binary: an
//! "internet" namespace with a bridge, a registry, and nodes that joined it,
//! each in its own namespace with an underlay address `fd99::N`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::netns::{Netns, veth};
use super::relay::{HostRelay, Latency};

/// Underlay address of host `i` (the registry is 1, nodes start at 2).
pub fn underlay(i: usize) -> String {
    format!("fd99::{:x}", i)
}

/// The nftables table (in the "internet" namespace) that impairs the
/// path between two hosts.
fn path_table(a: usize, b: usize) -> String {
    format!("path_{}_{}", a.min(b), a.max(b))
}

/// A running `sixmesh` process that is stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Stops with SIGTERM and waits up to 5 s; true if it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `BIN ARGS` (the `sixmesh` binary) in `ns` and returns stdout, panicking with stderr on failure.
pub fn sixmesh(bin: &Path, ns: &Netns, args: &[&str]) -> String {
    let out = ns.command(bin).args(args).output().expect("run sixmesh");
    assert!(
        out.status.success(),
        "sixmesh {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Spawns `BIN ARGS` (the `sixmesh` binary) in `ns` with its stderr
/// appended to `log` (a restarted process keeps its earlier log).
pub fn spawn(bin: &Path, ns: &Netns, args: &[&str], log: &Path) -> Proc {
    let f = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    let child = ns
        .command(bin)
        .args(args)
        .env("RUST_LOG", "info,sixmesh_mesh_node=debug")
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("spawn sixmesh");
    Proc { child, log: log.to_owned() }
}

/// Runs an nftables script in `ns`, panicking with nft's message if it fails.
pub fn nft_script(ns: &Netns, script: &str) {
    use std::io::Write;
    if script.is_empty() {
        return;
    }
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft (apt-get install -y nftables)");
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write to nft");
    let out = child.wait_with_output().expect("wait for nft");
    assert!(out.status.success(), "nft failed: {}\n{script}", String::from_utf8_lossy(&out.stderr));
}

/// Polls `f` every 100 ms until it holds; how long that took.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A namespace on the "internet" bridge with underlay address `fd99::i`:
/// linked by a veth pair, or with `latency`, by a [`HostRelay`] that delays
/// what it sends.
fn attach_host(
    inet: &Netns,
    i: usize,
    tag: &str,
    latency: Option<&Arc<Latency>>,
) -> (Netns, Option<HostRelay>) {
    let ns = Netns::new(tag).unwrap();
    ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
        .unwrap();
    let port = format!("p{i}");
    let relay = match latency {
        Some(l) => Some(HostRelay::new(&ns, "u0", inet, &port, i, l.clone()).unwrap()),
        None => {
            veth(&ns, "u0", inet, &port).unwrap();
            None
        }
    };
    inet.ip(&["link", "set", &port, "master", "br0"]).unwrap();
    ns.ip(&["addr", "add", &format!("{}/64", underlay(i)), "dev", "u0", "nodad"]).unwrap();
    (ns, relay)
}

/// One node of the network.
pub struct Node {
    pub ns: Netns,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub prefix: String,
    pub mesh_address: String,
    pub index: usize,
    pub proc: Option<Proc>,
}

/// The network.
pub struct Mesh {
    /// The `sixmesh` binary everything runs.
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub inet: Netns,
    pub reg: Netns,
    pub registry: Option<Proc>,
    pub fingerprint: String,
    pub nodes: Vec<Node>,
    /// Path latencies, when the hosts are linked through relays.
    latency: Option<Arc<Latency>>,
    /// Dropped after the processes (fields drop in order).
    relays: std::sync::Mutex<Vec<HostRelay>>,
    /// Keep [`Mesh::dir`] (logs, state, configs) when dropped. It is
    /// removed otherwise, unless the thread is panicking (a failed test's
    /// logs stay for whoever debugs it).
    pub keep_logs: bool,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if self.keep_logs || std::thread::panicking() {
            return;
        }
        // Daemons first: they write into the directory until they stop.
        for node in &mut self.nodes {
            node.proc.take();
        }
        self.registry.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Mesh {
    /// Builds the namespaces, starts a registry and enrolls `n` nodes (not
    /// started yet: see [`Mesh::start_node`]). Hosts are linked to the
    /// "internet" by veth pairs: no latency.
    pub fn new(bin: &Path, tag: &str, n: usize) -> Mesh {
        Self::build(bin, tag, n, None)
    }

    /// Like [`Mesh::new`], with every host linked through a user-space
    /// relay so that paths can be given latency ([`Mesh::set_latency`]).
    pub fn with_latency(bin: &Path, tag: &str, n: usize) -> Mesh {
        Self::build(bin, tag, n, Some(Arc::new(Latency::default())))
    }

    fn build(bin: &Path, tag: &str, n: usize, latency: Option<Arc<Latency>>) -> Mesh {
        let dir = std::env::temp_dir().join(format!("sixmesh-mesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let inet = Netns::new("inet").unwrap();
        inet.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
        inet.ip(&["link", "set", "br0", "up"]).unwrap();
        let mut relays = Vec::new();
        let mut host = |i: usize, tag: &str| {
            let (ns, relay) = attach_host(&inet, i, tag, latency.as_ref());
            relays.extend(relay);
            ns
        };
        let reg = host(1, "reg");
        let regdir = dir.join("registry");
        let out = sixmesh(
            bin,
            &reg,
            &["registry", "init", "--state-dir", regdir.to_str().unwrap(), "--network", "fd5e:77::/48"],
        );
        let fingerprint =
            out.split_whitespace().find(|w| w.starts_with("sha256:")).expect("fingerprint").to_string();
        let registry = spawn(
            bin,
            &reg,
            &[
                "registry",
                "serve",
                "--state-dir",
                regdir.to_str().unwrap(),
                "--listen",
                "[::]:8443",
                "--name",
                &underlay(1),
            ],
            &dir.join("registry.log"),
        );
        let url = format!("https://[{}]:8443", underlay(1));
        assert!(
            wait_until(Duration::from_secs(10), || reg
                .command("sh")
                .args(["-c", "ss -ltn | grep -q 8443"])
                .status()
                .is_ok_and(|s| s.success()))
            .is_some(),
            "registry did not start: {}",
            registry.log()
        );
        let mut nodes = Vec::new();
        for k in 0..n {
            let i = k + 2;
            let ns = host(i, &format!("n{k}"));
            let token_out =
                sixmesh(bin, &reg, &["registry", "token", "add", "--state-dir", regdir.to_str().unwrap()]);
            let token = token_out
                .split_whitespace()
                .find(|w| {
                    w.len() >= 20 && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
                .expect("token")
                .to_string();
            let ndir = dir.join(format!("n{k}"));
            let joined = sixmesh(
                bin,
                &ns,
                &[
                    "join",
                    "--registry",
                    &url,
                    "--token",
                    &token,
                    "--ca-fingerprint",
                    &fingerprint,
                    "--state-dir",
                    ndir.to_str().unwrap(),
                ],
            );
            let mesh_address = joined
                .lines()
                .find_map(|l| l.strip_prefix("mesh address:").map(|s| s.trim().to_string()))
                .expect("mesh address in join's output");
            let prefix = std::fs::read_to_string(ndir.join("prefix")).unwrap().trim().to_string();
            nodes.push(Node {
                ns,
                control: dir.join(format!("n{k}.sock")),
                dir: ndir,
                prefix,
                mesh_address,
                index: i,
                proc: None,
            });
        }
        Mesh {
            bin: bin.to_owned(),
            dir,
            inet,
            reg,
            registry: Some(registry),
            fingerprint,
            nodes,
            latency,
            relays: std::sync::Mutex::new(relays),
            keep_logs: false,
        }
    }

    /// Starts node `k`'s daemon, with `extra` lines of node.toml (after
    /// `hello_interval_ms = 500` and `config_refresh_secs = 5`).
    pub fn start_node(&mut self, k: usize, extra: &str) {
        self.start_node_with(k, &format!("hello_interval_ms = 500\nconfig_refresh_secs = 5\n{extra}\n"));
    }

    /// Crashes node `k`'s daemon (SIGKILL: it cleans nothing up, tells no one).
    pub fn kill_node(&mut self, k: usize) {
        if let Some(mut p) = self.nodes[k].proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Stops node `k`'s daemon gracefully (SIGTERM); true if it exited cleanly.
    pub fn stop_node(&mut self, k: usize) -> bool {
        self.nodes[k].proc.take().is_some_and(|mut p| p.stop())
    }

    /// Starts node `k`'s daemon with this whole node.toml.
    pub fn start_node_with(&mut self, k: usize, config: &str) {
        let node = &self.nodes[k];
        let cfg = self.dir.join(format!("n{k}.toml"));
        std::fs::write(&cfg, config).unwrap();
        let endpoint = format!("[{}]:51820", underlay(node.index));
        let proc = spawn(
            &self.bin,
            &node.ns,
            &[
                "node",
                "run",
                "--state-dir",
                node.dir.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--control",
                node.control.to_str().unwrap(),
                "--endpoint",
                &endpoint,
            ],
            &self.dir.join(format!("n{k}.log")),
        );
        self.nodes[k].proc = Some(proc);
    }

    /// Whether `from` gets an answer to one ping to `to`'s mesh address.
    pub fn ping(&self, from: usize, to: usize) -> bool {
        self.nodes[from]
            .ns
            .command("ping")
            .args(["-6", "-c", "1", "-W", "1", &self.nodes[to].mesh_address])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Pairs that do not answer pings, among running nodes.
    pub fn unreachable(&self) -> Vec<(usize, usize)> {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|&k| self.nodes[k].proc.is_some()).collect();
        let mut v = Vec::new();
        for &a in &running {
            for &b in &running {
                if a != b && !self.ping(a, b) {
                    v.push((a, b));
                }
            }
        }
        v
    }

    /// `sixmesh peers --json` of node `k`.
    pub fn peers(&self, k: usize) -> serde_json::Value {
        let out = self.nodes[k]
            .ns
            .command(&self.bin)
            .args(["peers", "--json", "--control", self.nodes[k].control.to_str().unwrap()])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Blocks underlay traffic between two nodes in the "internet" (until [`Mesh::heal`]).
    pub fn cut(&self, a: usize, b: usize) {
        self.impair(a, b, 1.0);
    }

    /// Makes the underlay path between two nodes drop each packet, either
    /// way, with probability `loss` (1 or more: every packet), with an
    /// nftables `numgen random` rule on the "internet" bridge. Replaces any
    /// earlier impairment of the path.
    pub fn impair(&self, a: usize, b: usize, loss: f64) {
        self.impair_paths(&[(a, b, loss)]);
    }

    /// [`Mesh::impair`] for many paths at once (one `nft` run); a loss of
    /// 0 heals the path.
    pub fn impair_paths(&self, paths: &[(usize, usize, f64)]) {
        use std::fmt::Write;
        let mut script = String::new();
        for &(a, b, loss) in paths {
            let (ia, ib) = (self.nodes[a].index, self.nodes[b].index);
            let table = path_table(ia, ib);
            // `add` first: deleting a table that does not exist fails the whole script.
            let _ = writeln!(script, "add table bridge {table}\ndelete table bridge {table}");
            let per_mille = (loss.clamp(0.0, 1.0) * 1000.0).round() as u32;
            if per_mille == 0 {
                continue;
            }
            let verdict = if per_mille >= 1000 {
                "drop".to_string()
            } else {
                format!("numgen random mod 1000 < {per_mille} drop")
            };
            let _ = writeln!(
                script,
                "add table bridge {table}\n\
                 add chain bridge {table} fw {{ type filter hook forward priority 0; policy accept; }}"
            );
            for (x, y) in [(underlay(ia), underlay(ib)), (underlay(ib), underlay(ia))] {
                let _ = writeln!(script, "add rule bridge {table} fw ip6 saddr {x} ip6 daddr {y} {verdict}");
            }
        }
        nft_script(&self.inet, &script);
    }

    /// Undoes [`Mesh::cut`] or [`Mesh::impair`] on the path between two nodes.
    pub fn heal(&self, a: usize, b: usize) {
        self.impair_paths(&[(a, b, 0.0)]);
    }

    /// Another host on the "internet" (not a node), underlay `fd99::i`.
    pub fn add_host(&self, i: usize, tag: &str) -> Netns {
        let (ns, relay) = attach_host(&self.inet, i, tag, self.latency.as_ref());
        self.relays.lock().expect("not poisoned").extend(relay);
        ns
    }

    /// Gives the underlay path between nodes `a` and `b` a one-way latency
    /// (each way) and jitter. Needs a mesh made by [`Mesh::with_latency`].
    pub fn set_latency(&self, a: usize, b: usize, latency: Duration, jitter: Duration) {
        let l = self.latency.as_ref().expect("latency needs a mesh made by Mesh::with_latency");
        l.set(self.nodes[a].index, self.nodes[b].index, latency, jitter);
    }

    /// Limits what node `k` sends onto the underlay to `kbps` kbit/s (its
    /// access link's upstream, like a home box's), with a token bucket
    /// (`tbf`) on its underlay interface that queues up to a second of
    /// traffic; `None` lifts the limit.
    pub fn set_uplink(&self, k: usize, kbps: Option<f64>) {
        let ns = &self.nodes[k].ns;
        match kbps {
            Some(kbps) => {
                let rate = (kbps.max(8.0)).round() as u64;
                // A burst of at least a few full frames, or 10 ms of traffic.
                let burst = (rate * 1000 / 8 / 100).max(4 * 1600);
                ns.exec(
                    "tc",
                    &[
                        "qdisc",
                        "replace",
                        "dev",
                        "u0",
                        "root",
                        "tbf",
                        "rate",
                        &format!("{rate}kbit"),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        "1s",
                    ],
                )
                .unwrap();
            }
            None => {
                let _ = ns.exec("tc", &["qdisc", "del", "dev", "u0", "root"]);
            }
        }
    }

    /// `sixmesh status --json` of node `k`.
    pub fn status(&self, k: usize) -> serde_json::Value {
        let out = self.nodes[k]
            .ns
            .command(&self.bin)
            .args(["status", "--json", "--control", self.nodes[k].control.to_str().unwrap()])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// Runs a command in a node's namespace (helper for ad-hoc checks).
    pub fn command(&self, k: usize, program: &str) -> Command {
        self.nodes[k].ns.command(program)
    }
}
