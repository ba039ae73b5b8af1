//! The thin tokio driver that runs the sans-IO [`Router`] on real interfaces:
//! one UDP socket on port 6696 joined to ff02::1:6 on every interface,
//! kernel routes through [`KernelRoutes`], a state file that keeps the
//! router-id and seqno across restarts, and a Unix control socket.
//!
//! Control protocol: the client writes one JSON object on a line, e.g.
//! `{"cmd":"dump"}`, and reads JSON lines back. Commands: `dump` (one
//! object with the router, interfaces, neighbours, routes and counters),
//! `monitor` (one line per event until the client hangs up), `announce` and
//! `withdraw` (with `prefix` and optional `from`).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::BABEL_PORT;
use crate::core::{Destination, Event, IfaceId, InterfaceConfig, LinkKind, RouteKey, Router};
use crate::kernel::KernelRoutes;
use crate::wire::RouterId;

/// ff02::1:6, the all-Babel-routers group.
pub const BABEL_GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 6);

/// What went wrong running the router.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("interface {0:?} does not exist (check `ip link`)")]
    NoInterface(String),
    #[error("cannot open the Babel socket on port 6696: {0} (is another Babel router running here?)")]
    Socket(#[source] std::io::Error),
    #[error("cannot join ff02::1:6 on {iface}: {source}")]
    Join {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path}: {msg} (fix or delete it; a new router-id is then chosen)")]
    BadState { path: PathBuf, msg: String },
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
}

/// An interface to run Babel on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub name: String,
    pub kind: LinkKind,
}

impl std::str::FromStr for InterfaceSpec {
    type Err = String;
    /// `NAME` or `NAME:wired` or `NAME:tunnel`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, kind) = match s.rsplit_once(':') {
            Some((n, "wired")) => (n, LinkKind::Wired),
            Some((n, "tunnel")) => (n, LinkKind::Tunnel),
            Some((_, k)) => return Err(format!("unknown interface type {k:?}: use wired or tunnel")),
            None => (s, LinkKind::Wired),
        };
        if name.is_empty() || name.len() > 15 {
            return Err(format!("{name:?} is not an interface name"));
        }
        Ok(InterfaceSpec { name: name.to_string(), kind })
    }
}

/// How to run the router.
#[derive(Clone, Debug)]
pub struct Config {
    pub interfaces: Vec<InterfaceSpec>,
    pub announce: Vec<RouteKey>,
    /// Keeps the router-id and seqno across restarts.
    pub state_file: Option<PathBuf>,
    pub control: Option<PathBuf>,
    /// Overrides the Hello interval of every interface.
    pub hello_interval: Option<Duration>,
    /// Install selected routes in the kernel (needs CAP_NET_ADMIN).
    pub install_routes: bool,
}

/// What the state file keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PersistentState {
    pub router_id: RouterId,
    pub seqno: u16,
}

impl PersistentState {
    /// Reads the state file, or makes a fresh random identity if it does
    /// not exist. A restarted router resumes at the next seqno.
    pub fn load_or_create(path: &Path) -> Result<Self, DriverError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bad = |msg: String| DriverError::BadState { path: path.to_owned(), msg };
                let mut id = None;
                let mut seqno = None;
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                    match line.split_once(' ') {
                        Some(("router-id", v)) => id = Some(v.trim().parse::<RouterId>().map_err(bad)?),
                        Some(("seqno", v)) => {
                            seqno = Some(v.trim().parse::<u16>().map_err(|e| bad(format!("seqno: {e}")))?)
                        }
                        _ => return Err(bad(format!("unexpected line {line:?}"))),
                    }
                }
                let router_id =
                    id.filter(RouterId::is_valid).ok_or_else(|| bad("no valid router-id".into()))?;
                let seqno = seqno.ok_or_else(|| bad("no seqno".into()))?.wrapping_add(1);
                let s = PersistentState { router_id, seqno };
                s.save(path)?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = PersistentState::fresh();
                s.save(path)?;
                Ok(s)
            }
            Err(source) => Err(DriverError::State { path: path.to_owned(), source }),
        }
    }

    /// A random router-id and seqno.
    pub fn fresh() -> Self {
        let mut b = [0u8; 10];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut b);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[..8]);
        id[0] = (id[0] & 0xfc) | 0x02; // locally administered, like an EUI-64
        PersistentState { router_id: RouterId(id), seqno: u16::from_be_bytes([b[8], b[9]]) }
    }

    /// Writes the state atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), DriverError> {
        let err = |source| DriverError::State { path: path.to_owned(), source };
        let tmp = path.with_extension("tmp");
        let text =
            format!("# sixmesh Babel router state\nrouter-id {}\nseqno {}\n", self.router_id, self.seqno);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// The link-local address the kernel sends our Babel packets from on
/// interface `ifindex` (an interface may have several; the one that
/// neighbours see is the one IHUs name), or `None` if it has none usable.
pub fn source_link_local(ifindex: u32) -> Option<Ipv6Addr> {
    let probe = std::net::UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).ok()?;
    probe.connect(SocketAddrV6::new(BABEL_GROUP, BABEL_PORT, 0, ifindex)).ok()?;
    match probe.local_addr().ok()? {
        SocketAddr::V6(a) if a.ip().segments()[0] & 0xffc0 == 0xfe80 => Some(*a.ip()),
        _ => None,
    }
}

/// Reads an interface's usable (non-tentative) link-local address from
/// `/proc/net/if_inet6`.
pub fn link_local_of(name: &str) -> Option<Ipv6Addr> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || f[5] != name || f[3] != "20" {
            return None;
        }
        let flags = u32::from_str_radix(f[4], 16).ok()?;
        if flags & 0x40 != 0 {
            return None; // tentative (DAD in progress)
        }
        u128::from_str_radix(f[0], 16).ok().map(Ipv6Addr::from)
    })
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
enum Request {
    Dump,
    Monitor,
    Announce { prefix: Ipv6Net, from: Option<Ipv6Net> },
    Withdraw { prefix: Ipv6Net, from: Option<Ipv6Net> },
}

#[derive(Serialize)]
struct IfaceDump {
    name: String,
    ifindex: u32,
    kind: LinkKind,
    link_local: Ipv6Addr,
}

/// The answer to `dump`.
#[derive(Serialize)]
struct Dump {
    router_id: String,
    seqno: u16,
    interfaces: Vec<IfaceDump>,
    neighbours: Vec<crate::core::NeighbourInfo>,
    routes: Vec<crate::core::RouteInfo>,
    stats: crate::core::Stats,
}

type ControlMsg = (Request, oneshot::Sender<String>);

/// Runs Babel until `shutdown` resolves, then retracts our prefixes and
/// removes the kernel routes we installed.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), DriverError> {
    let state = match &cfg.state_file {
        Some(p) => PersistentState::load_or_create(p)?,
        None => PersistentState::fresh(),
    };
    tracing::info!(router_id = %state.router_id, seqno = state.seqno, "Babel router starting");

    // Interfaces: index and link-local address (wait for DAD if needed).
    let mut ifaces: BTreeMap<IfaceId, (InterfaceSpec, Ipv6Addr)> = BTreeMap::new();
    for spec in &cfg.interfaces {
        let idx = nix::net::if_::if_nametoindex(spec.name.as_str())
            .map_err(|_| DriverError::NoInterface(spec.name.clone()))?;
        let mut waited = 0;
        let ll = loop {
            if link_local_of(&spec.name).is_some()
                && let Some(ll) = source_link_local(idx)
            {
                break ll;
            }
            if waited % 10 == 0 {
                tracing::warn!(iface = %spec.name, "interface has no usable link-local address yet; waiting");
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ifaces.insert(idx, (spec.clone(), ll));
    }

    let std_sock = std::net::UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, BABEL_PORT)))
        .map_err(DriverError::Socket)?;
    std_sock.set_multicast_loop_v6(false).map_err(DriverError::Socket)?;
    for (idx, (spec, _)) in &ifaces {
        std_sock
            .join_multicast_v6(&BABEL_GROUP, *idx)
            .map_err(|source| DriverError::Join { iface: spec.name.clone(), source })?;
    }
    std_sock.set_nonblocking(true).map_err(DriverError::Socket)?;
    let sock = UdpSocket::from_std(std_sock).map_err(DriverError::Socket)?;

    let mut kernel = if cfg.install_routes {
        let k = KernelRoutes::new()?;
        let idxs: Vec<u32> = ifaces.keys().copied().collect();
        match k.remove_stale(&idxs).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "removed stale Babel routes left by an earlier run"),
            Err(e) => tracing::warn!("could not look for stale routes: {e}"),
        }
        Some(k)
    } else {
        None
    };

    let start = Instant::now();
    let mut router = Router::new(state.router_id, state.seqno, start);
    for (idx, (spec, ll)) in &ifaces {
        let mut ic = InterfaceConfig::new(spec.kind, *ll);
        if let Some(h) = cfg.hello_interval {
            ic = ic.with_hello_interval(h);
        }
        tracing::info!(iface = %spec.name, kind = ?spec.kind, link_local = %ll, "Babel interface up");
        router.add_interface(start, *idx, ic);
    }
    for key in &cfg.announce {
        router.announce(start, key.0, key.1);
    }

    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlMsg>(16);
    let (mon_tx, _) = broadcast::channel::<String>(1024);
    if let Some(path) = &cfg.control {
        let listener = bind_control(path)?;
        tokio::spawn(serve_control(listener, ctl_tx.clone(), mon_tx.clone()));
    }

    let mut persisted = state;
    let mut buf = vec![0u8; 65536];
    tokio::pin!(shutdown);
    loop {
        let deadline = router.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = &mut shutdown => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, SocketAddr::V6(from))) => {
                    let idx = from.scope_id();
                    let ours = ifaces.get(&idx).map(|(_, ll)| *ll);
                    if ours.is_some() && ours != Some(*from.ip()) {
                        router.handle_packet(Instant::now(), idx, *from.ip(), &buf[..n]);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("recv: {e}"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => router.handle_timeout(Instant::now()),
            Some((req, reply)) = ctl_rx.recv() => {
                let answer = handle_request(&mut router, &ifaces, req, &mon_tx);
                let _ = reply.send(answer);
            }
        }
        pump(&mut router, &sock, kernel.as_mut(), &mon_tx, &cfg, &mut persisted).await;
    }

    // Clean exit: retract what we announce, take our routes out of the kernel.
    tracing::info!("Babel router stopping: retracting routes");
    let now = Instant::now();
    let announced: Vec<RouteKey> = router.announced().copied().collect();
    for key in announced {
        router.withdraw(now, key.0, key.1);
    }
    pump(&mut router, &sock, kernel.as_mut(), &mon_tx, &cfg, &mut persisted).await;
    if let Some(k) = kernel.as_mut() {
        k.remove_all().await;
    }
    if let Some(p) = &cfg.state_file {
        PersistentState { router_id: router.id(), seqno: router.seqno() }.save(p)?;
    }
    if let Some(p) = &cfg.control {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Sends what the router wants sent and applies its events.
async fn pump(
    router: &mut Router,
    sock: &UdpSocket,
    mut kernel: Option<&mut KernelRoutes>,
    mon: &broadcast::Sender<String>,
    cfg: &Config,
    persisted: &mut PersistentState,
) {
    while let Some(t) = router.poll_transmit() {
        let dst = match t.dst {
            Destination::Multicast => BABEL_GROUP,
            Destination::Unicast(a) => a,
        };
        if let Err(e) = sock.send_to(&t.payload, SocketAddrV6::new(dst, BABEL_PORT, 0, t.iface)).await {
            tracing::debug!(iface = t.iface, %dst, "send: {e}");
        }
    }
    while let Some(ev) = router.poll_event() {
        match &ev {
            Event::Selected { prefix, src, iface, next_hop, metric, .. } => {
                tracing::debug!(%prefix, ?src, %next_hop, metric, "route selected");
                if let Some(k) = kernel.as_deref_mut()
                    && let Err(e) = k.install((*prefix, *src), *iface, *next_hop).await
                {
                    tracing::warn!(%prefix, "cannot install route: {e}");
                }
            }
            Event::Unselected { prefix, src } => {
                tracing::debug!(%prefix, ?src, "route retracted");
                if let Some(k) = kernel.as_deref_mut()
                    && let Err(e) = k.remove(&(*prefix, *src)).await
                {
                    tracing::warn!(%prefix, "cannot remove route: {e}");
                }
            }
            Event::NeighbourUp { iface, addr } => tracing::info!(iface, %addr, "Babel neighbour up"),
            Event::NeighbourDown { iface, addr } => tracing::info!(iface, %addr, "Babel neighbour down"),
            Event::SeqnoChanged(s) => {
                persisted.seqno = *s;
                if let Some(p) = &cfg.state_file
                    && let Err(e) = persisted.save(p)
                {
                    tracing::warn!("{e}");
                }
            }
        }
        if mon.receiver_count() > 0 {
            let _ = mon.send(serde_json::to_string(&ev).unwrap_or_default());
        }
    }
}

fn handle_request(
    router: &mut Router,
    ifaces: &BTreeMap<IfaceId, (InterfaceSpec, Ipv6Addr)>,
    req: Request,
    _mon: &broadcast::Sender<String>,
) -> String {
    let now = Instant::now();
    let answer = match req {
        Request::Dump => serde_json::to_string(&Dump {
            router_id: router.id().to_string(),
            seqno: router.seqno(),
            interfaces: ifaces
                .iter()
                .map(|(i, (s, ll))| IfaceDump {
                    name: s.name.clone(),
                    ifindex: *i,
                    kind: s.kind,
                    link_local: *ll,
                })
                .collect(),
            neighbours: router.neighbours(now),
            routes: router.routes(),
            stats: router.stats(),
        }),
        Request::Announce { prefix, from } => {
            router.announce(now, prefix, from);
            Ok(r#"{"ok":true}"#.to_string())
        }
        Request::Withdraw { prefix, from } => {
            router.withdraw(now, prefix, from);
            Ok(r#"{"ok":true}"#.to_string())
        }
        Request::Monitor => Ok(String::new()),
    };
    answer.unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
}

fn bind_control(path: &Path) -> Result<UnixListener, DriverError> {
    bind_control_socket(path).map_err(|source| DriverError::Control { path: path.to_owned(), source })
}

/// Binds a daemon's control socket (mode 0600, parent directories made). A
/// socket file that nobody answers on is a crash's leftover and is
/// replaced; one that answers means another daemon runs: an error.
pub fn bind_control_socket(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon answers on it; stop it or pick another control socket path",
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve_control(listener: UnixListener, tx: mpsc::Sender<ControlMsg>, mon: broadcast::Sender<String>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let tx = tx.clone();
        let mon = mon.clone();
        tokio::spawn(async move {
            if let Err(e) = control_client(stream, tx, mon).await {
                tracing::debug!("control client: {e}");
            }
        });
    }
}

async fn control_client(
    stream: UnixStream,
    tx: mpsc::Sender<ControlMsg>,
    mon: broadcast::Sender<String>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let msg = serde_json::json!({ "error": format!("bad request: {e}") });
                w.write_all(format!("{msg}\n").as_bytes()).await?;
                continue;
            }
        };
        if matches!(req, Request::Monitor) {
            let mut rx = mon.subscribe();
            loop {
                match rx.recv().await {
                    Ok(line) => w.write_all(format!("{line}\n").as_bytes()).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return Ok(()),
                }
            }
        }
        let (otx, orx) = oneshot::channel();
        if tx.send((req, otx)).await.is_err() {
            return Ok(());
        }
        let answer = orx.await.unwrap_or_default();
        w.write_all(format!("{answer}\n").as_bytes()).await?;
    }
    Ok(())
}

/// Sends one request to a running router's control socket and returns the
/// answer line (a client for `sixmesh routes`).
pub async fn control_request(path: &Path, request: &str) -> std::io::Result<String> {
    let stream = UnixStream::connect(path).await?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{request}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    lines.next_line().await?.ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "router closed the control socket")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_keeps_router_id_and_resumes_past_the_seqno() {
        let dir = std::env::temp_dir().join(format!("sixmesh-babel-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("babel.state");
        let _ = std::fs::remove_file(&path);
        let first = PersistentState::load_or_create(&path).unwrap();
        assert!(first.router_id.is_valid());
        let second = PersistentState::load_or_create(&path).unwrap();
        assert_eq!(second.router_id, first.router_id);
        assert_eq!(second.seqno, first.seqno.wrapping_add(1));
        PersistentState { router_id: first.router_id, seqno: 65535 }.save(&path).unwrap();
        assert_eq!(PersistentState::load_or_create(&path).unwrap().seqno, 0, "wraps");
        std::fs::write(&path, "router-id zz\n").unwrap();
        let err = PersistentState::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("fix or delete it"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interface_specs_parse() {
        assert_eq!("eth0".parse::<InterfaceSpec>().unwrap().kind, LinkKind::Wired);
        assert_eq!("wg0:tunnel".parse::<InterfaceSpec>().unwrap().kind, LinkKind::Tunnel);
        assert!("wg0:wireless".parse::<InterfaceSpec>().is_err());
        assert!("averyveryverylongname0".parse::<InterfaceSpec>().is_err());
    }
}
