//! The node daemon's data plane: the TUN device, one UDP socket, one
//! WireGuard session (boringtun `noise::Tunn`) per peer, and the sans-IO
//! [`NodeCore`] deciding everything else. A thin tokio loop.
//!
//! The data path works in batches: a TUN read with offloads brings a TCP
//! super-packet of up to 64 KB, split into MTU-sized packets that are
//! encrypted back to back into one buffer and leave in one UDP GSO send;
//! a socket read (`recvmmsg`, UDP GRO) brings many datagrams, decrypted
//! into buffers that tun-rs coalesces into few TUN writes.
//!
//! Datagrams on the socket are WireGuard messages (types 1–4); a
//! handshake from an unknown key is dropped. Peers are known by the tunnel
//! key their certificate binds (or that the configuration names, for plain
//! WireGuard peers).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::Ipv6Net;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener};
use tokio::sync::{mpsc, oneshot};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::manager::{Action, PeerId};
use crate::node::{NodeConfig, NodeCore, NodeEvent, Output, Verdict};
use crate::udp::{RxBatch, TxBatch, Udp};

/// Default UDP port of the tunnels (the network config may set another).
pub const DEFAULT_PORT: u16 = 51820;
/// First bytes of sixmesh's own datagrams on the tunnel socket. WireGuard
/// messages start with a little-endian type 1–4, so they never collide.
pub const CONTROL_MAGIC: &[u8; 4] = b"SXM\x01";
/// Control message: "here is my certificate" (DER follows).
const MSG_CERT: u8 = 1;
/// Most certificates of other nodes remembered.
const MAX_KNOWN_KEYS: usize = 4096;
/// WireGuard overhead on IPv6: outer IPv6 (40) + UDP (8) + WireGuard (32).
pub const OVERHEAD: usize = 80;
/// MTU of the TUN device: inner packets fit a 1500-byte underlay.
pub const TUN_MTU: u16 = 1420;
/// Socket or TUN reads per wake-up before looking at the other sources.
const BATCH: usize = 8;
/// Packets one TUN read may split into (a 64 KB super-packet in MTU-sized
/// segments), and packets gathered before a TUN write.
const TUN_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Room before each packet written to the TUN, for the virtio-net header.
const VNET: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Capacity of a TUN write buffer: the packets coalesced into it grow it up
/// to 64 KB (tun-rs does not coalesce into a smaller buffer).
const TUN_WRITE_CAP: usize = 2 * VNET + 65535;
/// WireGuard's data-message overhead: header (16) and tag (16).
const WG_DATA: usize = 32;
/// Output space boringtun needs at least (a handshake initiation).
const WG_MIN_OUT: usize = 148;
/// Handshakes per second accepted before cookies are required.
const HANDSHAKE_RATE: u64 = 100;

/// What went wrong running the node.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the TUN device {name}: {source} (needs root or CAP_NET_ADMIN, and /dev/net/tun)")]
    Tun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open UDP port {port}: {source} (is another node running? set listen_port)")]
    Socket {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel setup: {0}")]
    Kernel(String),
    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A peer given in the configuration (e.g. a plain WireGuard peer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    /// Its prefix (what it may send from, and what is routed to it).
    pub prefix: Ipv6Net,
    /// Its WireGuard public key, base64.
    pub public_key: String,
    /// Where to reach it (optional: it may only connect to us).
    pub endpoint: Option<SocketAddr>,
    /// Whether it speaks Babel inside the tunnel (a sixmesh node) or not (a
    /// plain WireGuard peer, which gets a fixed route).
    #[serde(default)]
    pub babel: bool,
}

/// What peers' certificates are checked against.
pub struct Trust {
    /// The network CA (DER).
    pub ca_der: Vec<u8>,
    /// Our own certificate (DER), offered to peers before a handshake.
    pub cert_der: Vec<u8>,
    /// Revoked serials (lowercase hex), from the signed network config.
    pub revoked: Vec<String>,
}

/// Everything the daemon needs to run.
pub struct DaemonConfig {
    /// The state directory `sixmesh join` filled: registry access for
    /// bootstrap peers, network-config refreshes and endpoint reports, and
    /// the peer cache. `None` for tests with static peers only.
    pub state_dir: Option<PathBuf>,
    /// Underlay endpoints to report to the registry (`ip:port`).
    pub endpoints: Vec<SocketAddr>,
    /// How often the signed network config is fetched again.
    pub config_refresh: Duration,
    /// Where Babel's router-id and seqno are kept across restarts.
    pub babel_state: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (opt-in).
    pub metrics: Option<SocketAddr>,
    /// Certificate checks; `None` only for tests with static peers.
    pub trust: Option<Trust>,
    pub node: NodeConfig,
    pub tunnel_secret: StaticSecret,
    pub listen_port: u16,
    pub tun_name: String,
    pub control: Option<PathBuf>,
    pub static_peers: Vec<StaticPeer>,
    /// Peers with known keys and endpoints (bootstrap list, peer cache).
    pub known_peers: Vec<(PeerId, PublicKey, Vec<SocketAddr>)>,
    /// Other services in this process that report through the node's
    /// control socket and metrics (the TLS bridge of `node run --bridge`).
    pub reporters: Vec<Reporter>,
}

/// A service that runs in the node's process without being part of the
/// node (the TLS bridge of `sixmesh node run --bridge`): the node knows of
/// it only these two functions. They are called from the node's loop, so
/// they must be quick (read counters, format them).
#[derive(Clone)]
pub struct Reporter {
    /// Its control command (`{"cmd":"<name>"}` answers its status) and its
    /// key in the node's `status`.
    pub name: String,
    /// Its status, as a JSON document.
    pub status: Arc<dyn Fn() -> String + Send + Sync>,
    /// Its Prometheus metrics (text format), served after the node's.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter").field("name", &self.name).finish_non_exhaustive()
    }
}

/// One peer's WireGuard session and where it is.
struct PeerSession {
    tunn: Tunn,
    index: u32,
    endpoint: Option<SocketAddr>,
    up: bool,
    fixed: bool,
    handshakes: u64,
}

/// Counters for `sixmesh status`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DataPlaneStats {
    /// Datagrams received.
    pub udp_in: u64,
    /// Socket reads that brought them (`recvmmsg`, GRO): the batching.
    pub udp_reads: u64,
    /// Tunnel datagrams sent, and the sends that carried them (GSO).
    pub udp_out: u64,
    pub udp_sends: u64,
    /// TUN reads (each a packet, or a super-packet with offloads).
    pub tun_reads: u64,
    pub certs_accepted: u64,
    pub certs_refused: u64,
    pub udp_bad: u64,
    pub handshakes_unknown_key: u64,
    pub handshakes_refused: u64,
    pub tun_in: u64,
    pub tun_out: u64,
}

#[derive(Serialize)]
struct TunnelStatus {
    peer: Ipv6Net,
    endpoint: Option<SocketAddr>,
    up: bool,
    babel: bool,
    rtt_ms: Option<f64>,
    tx_bytes: u64,
    rx_bytes: u64,
    last_handshake_s: Option<f64>,
}

#[derive(Serialize)]
struct Status {
    prefix: Ipv6Net,
    mesh_address: Ipv6Addr,
    public_key: String,
    listen_port: u16,
    uptime_s: f64,
    routes: usize,
    tunnels: Vec<TunnelStatus>,
    stats: DataPlaneStats,
    drops: crate::node::Drops,
    /// Babel's own counters (packets, route updates received and how many
    /// changed the table).
    babel: sixmesh_routing::core::Stats,
}

type ControlMsg = (String, oneshot::Sender<String>);

/// Results of the background registry calls.
enum Background {
    Peers(Vec<(PeerId, PublicKey, Vec<SocketAddr>)>),
    Config(sixmesh_registry::netconfig::NetworkConfig),
    /// Our certificate was renewed: offer the new one from now on.
    Cert(Vec<u8>),
}

/// Asks the registry for peers (bootstrap list) in the background.
fn spawn_bootstrap(dir: PathBuf, tx: mpsc::Sender<Background>) {
    tokio::spawn(async move {
        match sixmesh_registry::client::bootstrap_peers(&dir, 32).await {
            Ok(peers) => {
                let list = peers
                    .into_iter()
                    .filter_map(|p| {
                        let prefix: Ipv6Net = p.prefix.parse().ok()?;
                        let key = PublicKey::from(parse_key(p.tunnel_key.as_deref()?)?);
                        let eps: Vec<SocketAddr> =
                            p.endpoints.iter().filter_map(|e| e.parse().ok()).collect();
                        (!eps.is_empty()).then_some((prefix, key, eps))
                    })
                    .collect::<Vec<_>>();
                tracing::info!(peers = list.len(), "bootstrap peers from the registry");
                let _ = tx.send(Background::Peers(list)).await;
            }
            Err(e) => tracing::warn!("cannot get bootstrap peers from the registry: {e}"),
        }
    });
}

/// Fetches the signed network config every `every` (or at once when
/// `refresh_now` is notified), reports our endpoints every ten rounds, and
/// renews the certificate when due.
fn spawn_registry_loop(
    dir: PathBuf,
    endpoints: Vec<SocketAddr>,
    every: Duration,
    tx: mpsc::Sender<Background>,
    refresh_now: Arc<tokio::sync::Notify>,
) {
    tokio::spawn(async move {
        let mut round = 0u64;
        loop {
            if round.is_multiple_of(10) && !endpoints.is_empty() {
                let eps = endpoints.iter().map(ToString::to_string).collect();
                if let Err(e) = sixmesh_registry::client::report_endpoints(&dir, eps).await {
                    tracing::warn!("cannot report our endpoints to the registry: {e}");
                }
            }
            // Renewal from 2/3 of the lifetime (a local check; the registry is
            // asked only when due). The tunnel key stays; the TLS key rotates.
            if round.is_multiple_of(20) {
                match sixmesh_registry::client::renew(&dir, false).await {
                    Ok(Some(id)) => {
                        tracing::info!(serial = %id.serial, "certificate renewed");
                        let der = std::fs::read_to_string(dir.join(sixmesh_registry::client::files::CERT))
                            .ok()
                            .and_then(|pem| sixmesh_registry::ca::pem_to_der(&pem).ok());
                        if let Some(der) = der
                            && tx.send(Background::Cert(der)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("certificate renewal failed (will retry): {e}"),
                }
            }
            if round > 0 {
                match sixmesh_registry::client::refresh_network_config(&dir).await {
                    Ok(c) => {
                        if tx.send(Background::Config(c)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!("network config refresh: {e}"),
                }
            }
            round += 1;
            // A neighbour told of a newer config version: fetch at once.
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = refresh_now.notified() => { round = round.max(1); }
            }
        }
    });
}

/// Underlay addresses of this machine worth reporting as endpoints: every
/// address that is not loopback, link-local, inside the mesh, or on the
/// TUN device.
pub fn local_endpoints(port: u16, network: &Ipv6Net, tun_name: &str) -> Vec<SocketAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut v = Vec::new();
    for a in addrs {
        if a.interface_name == tun_name {
            continue;
        }
        let Some(sa) = a.address else { continue };
        let ip: IpAddr = if let Some(s6) = sa.as_sockaddr_in6() {
            IpAddr::V6(s6.ip())
        } else if let Some(s4) = sa.as_sockaddr_in() {
            IpAddr::V4(s4.ip())
        } else {
            continue;
        };
        let skip = match ip {
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.segments()[0] & 0xffc0 == 0xfe80 || network.contains(&v6)
            }
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        };
        if !skip && !v.contains(&SocketAddr::new(ip, port)) {
            v.push(SocketAddr::new(ip, port));
        }
    }
    v
}

/// The node's mesh address: the first host address of its prefix.
pub fn mesh_address(prefix: &Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) | 1)
}

fn b64(k: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Decodes a base64 WireGuard key.
pub fn parse_key(s: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).ok()?.try_into().ok()
}

struct Daemon {
    core: NodeCore,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
    udp: Udp,
    tun: tun_rs::AsyncDevice,
    sessions: BTreeMap<PeerId, PeerSession>,
    by_index: HashMap<u32, PeerId>,
    keys: HashMap<[u8; 32], PeerId>,
    peer_keys: HashMap<PeerId, PublicKey>,
    endpoints: HashMap<PeerId, Vec<SocketAddr>>,
    serials: HashMap<PeerId, String>,
    /// Peers' certificates (DER), to answer gossip with.
    certs: HashMap<PeerId, Vec<u8>>,
    /// When we last asked the mesh about a peer.
    asked: HashMap<PeerId, Instant>,
    /// Wakes the registry loop to fetch the network config now.
    refresh_now: Arc<tokio::sync::Notify>,
    cert_sent: HashMap<SocketAddr, Instant>,
    state_dir: Option<PathBuf>,
    babel_state: Option<PathBuf>,
    bg_tx: mpsc::Sender<Background>,
    bootstrap_at: Option<Instant>,
    config_version: u64,
    trust: Option<Trust>,
    next_index: u32,
    stats: DataPlaneStats,
    started: Instant,
    listen_port: u16,
    /// Datagrams read from the socket.
    rx: RxBatch,
    /// Encrypted datagrams waiting for one GSO send.
    tx: TxBatch,
    /// Decrypted packets waiting for one TUN write (each after `VNET`
    /// bytes of room), coalesced by `gro` when the TUN has offloads.
    tun_out: Vec<Vec<u8>>,
    /// Spare buffers for `tun_out`.
    pool: Vec<Vec<u8>>,
    gro: tun_rs::GROTable,
    reporters: Vec<Reporter>,
}

/// A Prometheus counter by one label: (name, help, label, [(label value, count)]).
type LabelledCounter<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, u64)]);

impl Daemon {
    fn new_index(&mut self) -> u32 {
        // 24-bit indexes (boringtun shifts them left by 8).
        loop {
            self.next_index =
                (self.next_index.wrapping_mul(1_103_515_245).wrapping_add(12_345)) & 0x00ff_ffff;
            if self.next_index != 0 && !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }

    fn session(&mut self, peer: PeerId, fixed: bool) -> Option<&mut PeerSession> {
        if !self.sessions.contains_key(&peer) {
            let key = *self.peer_keys.get(&peer)?;
            let index = self.new_index();
            let tunn = Tunn::new(self.secret.clone(), key, None, None, index, Some(self.limiter.clone()));
            let endpoint = self.endpoints.get(&peer).and_then(|e| e.first().copied());
            self.by_index.insert(index, peer);
            self.sessions
                .insert(peer, PeerSession { tunn, index, endpoint, up: false, fixed, handshakes: 0 });
        }
        self.sessions.get_mut(&peer)
    }

    fn close(&mut self, peer: &PeerId) {
        if let Some(s) = self.sessions.remove(peer) {
            self.by_index.remove(&s.index);
        }
    }

    async fn send_to(&self, data: &[u8], to: SocketAddr) {
        if let Err(e) = self.udp.sock.send_to(data, to).await {
            tracing::debug!(%to, "udp send: {e}");
        }
    }

    /// Encrypts an inner packet for `peer` into the GSO batch (sending the
    /// batch first when this datagram cannot join it).
    async fn send_to_peer(&mut self, peer: PeerId, packet: &[u8]) {
        let Some(ep) = self.sessions.get(&peer).and_then(|s| s.endpoint) else { return };
        let max = packet.len() + WG_DATA;
        let segments = self.udp.max_segments();
        if self.tx.room(ep, max, WG_MIN_OUT, segments).is_none() {
            self.flush_udp().await;
        }
        let (Some(s), Some(room)) =
            (self.sessions.get_mut(&peer), self.tx.room(ep, max, WG_MIN_OUT, segments))
        else {
            return;
        };
        match s.tunn.encapsulate(packet, room) {
            TunnResult::WriteToNetwork(b) if b.len() == max && b.first() == Some(&4) => {
                self.tx.commit(ep, max)
            }
            TunnResult::WriteToNetwork(b) => {
                // No session yet: boringtun queued the packet and wrote a
                // handshake initiation instead; it goes alone.
                let init = b.to_vec();
                self.send_to(&init, ep).await;
            }
            _ => {}
        }
    }

    /// Sends the GSO batch.
    async fn flush_udp(&mut self) {
        if let Some((to, bytes, segment)) = self.tx.take() {
            self.stats.udp_sends += 1;
            self.stats.udp_out += bytes.len().div_ceil(segment.max(1)) as u64;
            self.udp.send(to, bytes, Some(segment)).await;
        }
    }

    /// Writes the decrypted packets gathered for the TUN, coalesced.
    async fn flush_tun(&mut self) {
        if self.tun_out.is_empty() {
            return;
        }
        self.stats.tun_out += self.tun_out.len() as u64;
        if let Err(e) = self.tun.send_multiple(&mut self.gro, &mut self.tun_out, VNET).await {
            tracing::debug!("tun write: {e}");
        }
        let keep = (2 * TUN_BATCH).saturating_sub(self.pool.len());
        self.pool.extend(self.tun_out.drain(..).take(keep));
    }

    /// Queues a packet for the TUN (`b` holds it after `VNET` bytes).
    async fn queue_for_tun(&mut self, b: Vec<u8>) {
        self.tun_out.push(b);
        if self.tun_out.len() >= TUN_BATCH {
            self.flush_tun().await;
        }
    }

    /// Routes and encrypts the packets of one TUN read.
    async fn handle_tun_read(&mut self, segs: &mut [Vec<u8>], lens: &[usize]) {
        let now = Instant::now();
        self.stats.tun_reads += 1;
        for (b, &n) in segs.iter_mut().zip(lens) {
            self.stats.tun_in += 1;
            let Some(p) = b.get_mut(..n) else { continue };
            if let Verdict::Tunnel(peer) = self.core.route_from_tun(now, p) {
                self.send_to_peer(peer, p).await;
            }
        }
    }

    /// Handles the datagrams of the last socket read.
    async fn handle_rx(&mut self, filled: usize) {
        let rx = std::mem::replace(&mut self.rx, RxBatch::empty());
        let now = Instant::now();
        self.stats.udp_reads += 1;
        for i in 0..filled.min(rx.meta.len()) {
            let (from, datagrams) = rx.datagrams(i);
            for d in datagrams {
                self.handle_datagram(d, from, now).await;
            }
        }
        self.rx = rx;
    }

    async fn handle_datagram(&mut self, datagram: &[u8], from: SocketAddr, now: Instant) {
        self.stats.udp_in += 1;
        if datagram.starts_with(CONTROL_MAGIC) {
            self.handle_control(&datagram[CONTROL_MAGIC.len()..], from).await;
            return;
        }
        // Decrypted data lands in a TUN write buffer, after room for the
        // virtio-net header.
        // (Resizing without clearing first: only new bytes are zeroed.)
        let mut out = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(TUN_WRITE_CAP));
        out.resize(VNET + datagram.len().max(WG_MIN_OUT) + 64, 0);
        self.decrypt(datagram, &mut out, from, now).await;
        if !out.is_empty() && self.pool.len() < 2 * TUN_BATCH {
            self.pool.push(out);
        }
    }

    /// Handles a WireGuard message; a data packet for this machine moves
    /// out of `out` (left empty) into the TUN batch.
    async fn decrypt(&mut self, datagram: &[u8], out: &mut Vec<u8>, from: SocketAddr, now: Instant) {
        let packet = match self.limiter.verify_packet(Some(from.ip()), datagram, &mut out[VNET..]) {
            Ok(p) => p,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                let c = cookie.to_vec();
                self.send_to(&c, from).await;
                return;
            }
            Err(_) => {
                self.stats.udp_bad += 1;
                return;
            }
        };
        let peer = match &packet {
            Packet::HandshakeInit(init) => {
                let Ok(half) = parse_handshake_anon(&self.secret, &self.public, init) else {
                    self.stats.udp_bad += 1;
                    return;
                };
                let Some(peer) = self.keys.get(&half.peer_static_public).copied() else {
                    self.stats.handshakes_unknown_key += 1;
                    tracing::debug!(%from, "handshake from an unknown tunnel key: dropped");
                    return;
                };
                let fixed = self.is_fixed(&peer);
                if !self.sessions.contains_key(&peer) && !fixed && !self.core.accept_incoming(now, peer) {
                    self.stats.handshakes_refused += 1;
                    return;
                }
                if self.session(peer, fixed).is_none() {
                    return;
                }
                peer
            }
            Packet::HandshakeResponse(p) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(peer) => *peer,
                None => return,
            },
            Packet::PacketCookieReply(p) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(peer) => *peer,
                None => return,
            },
            Packet::PacketData(p) => match self.by_index.get(&(p.receiver_idx >> 8)) {
                Some(peer) => *peer,
                None => {
                    self.stats.udp_bad += 1;
                    return;
                }
            },
        };
        let is_data = matches!(packet, Packet::PacketData(_));
        let mut inner = None;
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut became_up = false;
        let mut fixed = false;
        {
            let Some(s) = self.sessions.get_mut(&peer) else { return };
            let mut first = true;
            loop {
                let src: &[u8] = if first { datagram } else { &[] };
                let r = s.tunn.decapsulate(Some(from.ip()), src, &mut out[VNET..]);
                first = false;
                match r {
                    TunnResult::WriteToNetwork(b) => replies.push(b.to_vec()),
                    TunnResult::WriteToTunnelV6(b, _) => {
                        inner = Some(b.len());
                        break;
                    }
                    TunnResult::WriteToTunnelV4(..) => break,
                    TunnResult::Done => break,
                    TunnResult::Err(e) => {
                        tracing::debug!(%peer, "decapsulate: {e:?}");
                        break;
                    }
                }
            }
            // Authenticated traffic tells where the peer is now (roaming): a
            // data message that decrypted, or a handshake that completed.
            let authenticated = if is_data { inner.is_some() } else { s.tunn.stats().0.is_some() };
            if authenticated {
                s.endpoint = Some(from);
                if !s.up {
                    s.up = true;
                    s.handshakes += 1;
                    became_up = true;
                    fixed = s.fixed;
                }
            }
        }
        for r in replies {
            self.send_to(&r, from).await;
        }
        if became_up {
            tracing::info!(%peer, %from, "tunnel up");
            if fixed {
                self.core.fixed_tunnel_up(now, peer);
            } else {
                self.core.tunnel_up(now, peer);
                let v = crate::gossip::Gossip::ConfigVersion(self.config_version).encode();
                self.core.send_gossip(peer, &v);
            }
        }
        let Some(n) = inner else { return };
        out.truncate(VNET + n);
        match self.core.route_from_tunnel(now, peer, &mut out[VNET..]) {
            Verdict::Tun => self.queue_for_tun(std::mem::take(out)).await,
            Verdict::Tunnel(next) => self.send_to_peer(next, &out[VNET..]).await,
            Verdict::Dropped | Verdict::Taken => {}
        }
    }

    /// A certificate offered by a node about to handshake with us: if the
    /// CA signed it and it is valid and not revoked, its tunnel key may
    /// connect. We answer with ours (rate-limited), so that both sides know
    /// each other's serial.
    async fn handle_control(&mut self, msg: &[u8], from: SocketAddr) {
        let Some((&MSG_CERT, der)) = msg.split_first() else {
            self.stats.udp_bad += 1;
            return;
        };
        let Some(trust) = &self.trust else { return };
        match crate::identity::verify_peer_cert(
            &trust.ca_der,
            der,
            crate::identity::now_unix(),
            &trust.revoked,
        ) {
            Ok((prefix, key, serial)) if prefix != self.core.prefix() => {
                self.stats.certs_accepted += 1;
                if self.keys.len() >= MAX_KNOWN_KEYS && !self.peer_keys.contains_key(&prefix) {
                    // Forget a peer we have no session with.
                    if let Some(old) = self.peer_keys.keys().find(|p| !self.sessions.contains_key(p)).copied()
                    {
                        if let Some(k) = self.peer_keys.remove(&old) {
                            self.keys.remove(k.as_bytes());
                        }
                        self.serials.remove(&old);
                    }
                }
                if let Some(old) = self.peer_keys.insert(prefix, PublicKey::from(key))
                    && *old.as_bytes() != key
                {
                    self.keys.remove(old.as_bytes());
                }
                self.keys.insert(key, prefix);
                self.serials.insert(prefix, serial);
                self.certs.insert(prefix, der.to_vec());
                self.endpoints.entry(prefix).or_insert_with(|| vec![from]);
                self.offer_cert(from).await;
            }
            Ok(_) => {}
            Err(e) => {
                self.stats.certs_refused += 1;
                tracing::info!(%from, "refused a certificate: {e}");
            }
        }
    }

    /// Sends our certificate to `to`, at most every 10 s per address.
    async fn offer_cert(&mut self, to: SocketAddr) {
        let Some(trust) = &self.trust else { return };
        let now = Instant::now();
        if self
            .cert_sent
            .get(&to)
            .is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(10))
        {
            return;
        }
        if self.cert_sent.len() > MAX_KNOWN_KEYS {
            self.cert_sent.retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(10));
        }
        self.cert_sent.insert(to, now);
        let mut msg = CONTROL_MAGIC.to_vec();
        msg.push(MSG_CERT);
        msg.extend(&trust.cert_der);
        self.send_to(&msg, to).await;
    }

    /// Applies a new list of revoked serials: sessions with revoked peers
    /// close at once, and their keys are forgotten.
    fn set_revoked(&mut self, revoked: Vec<String>) {
        let now = Instant::now();
        let gone: Vec<PeerId> = self
            .serials
            .iter()
            .filter(|(_, s)| revoked.iter().any(|r| r.eq_ignore_ascii_case(s)))
            .map(|(p, _)| *p)
            .collect();
        for peer in gone {
            tracing::info!(%peer, "peer revoked: closing its tunnel");
            self.close(&peer);
            if let Some(k) = self.peer_keys.remove(&peer) {
                self.keys.remove(k.as_bytes());
            }
            self.serials.remove(&peer);
            self.certs.remove(&peer);
            self.endpoints.remove(&peer);
            self.core.manager().remove_peer(peer, "revoked");
            self.core.tunnel_down(now, peer);
        }
        if let Some(t) = &mut self.trust {
            t.revoked = revoked;
        }
    }

    fn background(&mut self, bg: Background) {
        match bg {
            Background::Peers(list) => {
                let me = self.core.prefix();
                for (p, k, eps) in &list {
                    if *p == me {
                        continue;
                    }
                    self.keys.insert(*k.as_bytes(), *p);
                    self.peer_keys.insert(*p, *k);
                    self.endpoints.insert(*p, eps.clone());
                }
                self.core
                    .manager()
                    .add_candidates(list.into_iter().filter(|(p, ..)| *p != me).map(|(p, _, e)| (p, e)));
            }
            Background::Cert(der) => {
                if let Some(t) = &mut self.trust {
                    t.cert_der = der;
                    self.cert_sent.clear();
                }
            }
            Background::Config(c) => {
                if c.version <= self.config_version {
                    return;
                }
                tracing::info!(
                    version = c.version,
                    revoked = c.revoked_serials.len(),
                    "network config applied"
                );
                self.config_version = c.version;
                self.set_revoked(c.revoked_serials.clone());
                let mut m = self.core.manager().config().clone();
                m.client_count = c.tunnel.client_count as usize;
                m.max_clients = c.tunnel.max_clients as usize;
                m.tunnel_refresh = Duration::from_secs(u64::from(c.tunnel.refresh_secs.max(1)));
                if &m != self.core.manager().config() {
                    self.core.set_manager_config(Instant::now(), m);
                }
            }
        }
    }

    /// Writes the peers we have working sessions with to the peer cache.
    fn save_cache(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        let peers: Vec<crate::peerdb::CachedPeer> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.up && !s.fixed)
            .filter_map(|(p, s)| {
                Some(crate::peerdb::CachedPeer {
                    prefix: *p,
                    key: *self.peer_keys.get(p)?.as_bytes(),
                    endpoints: vec![s.endpoint?],
                })
            })
            .collect();
        if peers.is_empty() {
            return;
        }
        let r = crate::peerdb::PeerDb::open(&dir.join("peers.db"))
            .and_then(|mut db| db.upsert(&peers, crate::identity::now_unix()));
        if let Err(e) = r {
            tracing::warn!("cannot write the peer cache: {e}");
        }
    }

    /// Asks two tunnel neighbours how to reach `target` (at most every 10 s).
    fn ask_mesh(&mut self, target: PeerId) {
        let now = Instant::now();
        if self
            .asked
            .get(&target)
            .is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(10))
        {
            return;
        }
        if self.asked.len() > MAX_KNOWN_KEYS {
            self.asked.clear();
        }
        self.asked.insert(target, now);
        let msg = crate::gossip::Gossip::WantPeer { prefix: target }.encode();
        let mut nbrs: Vec<PeerId> =
            self.core.babel_peers().filter(|p| self.sessions.get(p).is_some_and(|s| s.up)).collect();
        use rand::seq::SliceRandom;
        nbrs.shuffle(&mut rand::thread_rng());
        for n in nbrs.into_iter().take(2) {
            self.core.send_gossip(n, &msg);
        }
    }

    fn gossip(&mut self, from: PeerId, payload: &[u8]) {
        use crate::gossip::Gossip;
        let msg = match Gossip::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.udp_bad += 1;
                tracing::debug!(%from, "bad gossip: {e}");
                return;
            }
        };
        match msg {
            Gossip::WantPeer { prefix } => {
                let (Some(cert), Some(eps)) = (self.certs.get(&prefix), self.endpoints.get(&prefix)) else {
                    return;
                };
                let mut endpoints = eps.clone();
                if let Some(s) = self.sessions.get(&prefix).and_then(|s| s.endpoint)
                    && !endpoints.contains(&s)
                {
                    endpoints.insert(0, s);
                }
                let answer = Gossip::Peer { endpoints, cert_der: cert.clone() }.encode();
                self.core.send_gossip(from, &answer);
            }
            Gossip::Peer { endpoints, cert_der } => {
                let Some(trust) = &self.trust else { return };
                match crate::identity::verify_peer_cert(
                    &trust.ca_der,
                    &cert_der,
                    crate::identity::now_unix(),
                    &trust.revoked,
                ) {
                    Ok((prefix, key, serial)) if prefix != self.core.prefix() && !endpoints.is_empty() => {
                        tracing::debug!(%prefix, via = %from, "learned a peer through the mesh");
                        self.keys.insert(key, prefix);
                        self.peer_keys.insert(prefix, PublicKey::from(key));
                        self.serials.insert(prefix, serial);
                        self.certs.insert(prefix, cert_der);
                        self.endpoints.insert(prefix, endpoints.clone());
                        self.core.manager().add_candidates([(prefix, endpoints)]);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.stats.certs_refused += 1;
                        tracing::info!(%from, "refused a gossiped certificate: {e}");
                    }
                }
            }
            Gossip::ConfigVersion(v) => {
                if v > self.config_version {
                    tracing::debug!(%from, version = v, "a neighbour has a newer network config");
                    self.refresh_now.notify_one();
                }
            }
        }
    }

    fn is_fixed(&self, peer: &PeerId) -> bool {
        self.sessions.get(peer).is_some_and(|s| s.fixed)
    }

    /// Initiates (or re-initiates) the handshake with a peer.
    async fn connect(&mut self, peer: PeerId, endpoints: Vec<SocketAddr>, fixed: bool) {
        if !endpoints.is_empty() {
            self.endpoints.insert(peer, endpoints.clone());
        }
        let mut out = vec![0u8; 256];
        let Some(s) = self.session(peer, fixed) else {
            tracing::debug!(%peer, "no tunnel key known for this peer");
            return;
        };
        if s.endpoint.is_none() {
            s.endpoint = endpoints.first().copied();
        }
        let Some(ep) = s.endpoint else { return };
        let init = match s.tunn.format_handshake_initiation(&mut out, false) {
            TunnResult::WriteToNetwork(b) => Some(b.to_vec()),
            _ => None,
        };
        if !fixed {
            self.offer_cert(ep).await;
        }
        if let Some(b) = init {
            self.send_to(&b, ep).await;
        }
    }

    /// Sends what the core produced and acts on its events.
    async fn pump(&mut self) {
        while let Some(o) = self.core.poll_output() {
            match o {
                Output::ToTunnel { peer, packet, .. } => self.send_to_peer(peer, &packet).await,
                Output::ToTun(p) => {
                    let mut b = vec![0u8; VNET];
                    b.extend(p);
                    self.queue_for_tun(b).await;
                }
            }
        }
        while let Some(e) = self.core.poll_event() {
            match e {
                NodeEvent::Manager(Action::Connect { peer, endpoints }) => {
                    self.connect(peer, endpoints, false).await
                }
                NodeEvent::Manager(Action::Disconnect { peer, reason }) => {
                    tracing::info!(%peer, reason, "tunnel closed");
                    self.close(&peer);
                }
                NodeEvent::Manager(Action::NeedBootstrap) => {
                    let now = Instant::now();
                    if let Some(dir) = &self.state_dir
                        && self
                            .bootstrap_at
                            .is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(10))
                    {
                        self.bootstrap_at = Some(now);
                        spawn_bootstrap(dir.clone(), self.bg_tx.clone());
                    }
                }
                NodeEvent::Manager(Action::RequestEndpoints { peer }) => self.ask_mesh(peer),
                NodeEvent::Gossip { peer, payload } => self.gossip(peer, &payload),
                NodeEvent::SeqnoChanged(seqno) => {
                    if let Some(path) = &self.babel_state {
                        let st = sixmesh_routing::driver::PersistentState {
                            router_id: self.core.router().id(),
                            seqno,
                        };
                        if let Err(e) = st.save(path) {
                            tracing::warn!("{e}");
                        }
                    }
                }
                NodeEvent::Route { .. } => {}
            }
        }
        self.flush_udp().await;
        self.flush_tun().await;
    }

    /// boringtun's timers (keepalives, rekeys, expiry), every 250 ms.
    async fn wg_timers(&mut self) {
        let mut out = vec![0u8; 256];
        let mut sends = Vec::new();
        let mut expired = Vec::new();
        for (peer, s) in &mut self.sessions {
            match s.tunn.update_timers(&mut out) {
                TunnResult::WriteToNetwork(b) => {
                    if let Some(ep) = s.endpoint {
                        sends.push((b.to_vec(), ep));
                    }
                }
                TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                    expired.push(*peer)
                }
                _ => {}
            }
        }
        for (b, ep) in sends {
            self.send_to(&b, ep).await;
        }
        let now = Instant::now();
        for peer in expired {
            tracing::info!(%peer, "WireGuard session expired");
            let fixed = self.sessions.get(&peer).is_some_and(|s| s.fixed);
            self.close(&peer);
            if !fixed {
                self.core.tunnel_down(now, peer);
            }
        }
    }

    fn status(&self) -> String {
        let now = Instant::now();
        let counters: HashMap<PeerId, crate::node::TunnelCounters> = self.core.tunnel_counters().collect();
        let nbrs = self.core.router().neighbours(now);
        let tunnels = self
            .sessions
            .iter()
            .map(|(peer, s)| {
                let c = counters.get(peer).copied().unwrap_or_default();
                let (hs, _, _, _, _) = s.tunn.stats();
                let ll = crate::node::tunnel_link_local(peer);
                TunnelStatus {
                    peer: *peer,
                    endpoint: s.endpoint,
                    up: s.up,
                    babel: !s.fixed,
                    rtt_ms: nbrs.iter().find(|n| n.addr == ll).and_then(|n| n.rtt_ms),
                    tx_bytes: c.tx_bytes,
                    rx_bytes: c.rx_bytes,
                    last_handshake_s: hs.map(|d| d.as_secs_f64()),
                }
            })
            .collect();
        let prefix = self.core.prefix();
        let status = serde_json::to_string(&Status {
            prefix,
            mesh_address: mesh_address(&prefix),
            public_key: b64(self.public.as_bytes()),
            listen_port: self.listen_port,
            uptime_s: self.started.elapsed().as_secs_f64(),
            routes: self.core.router().selected_count(),
            tunnels,
            stats: self.stats,
            drops: self.core.drops(),
            babel: self.core.router().stats(),
        })
        .unwrap_or_default();
        if self.reporters.is_empty() {
            return status;
        }
        // Each reporter's status under its name.
        let mut v: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        for r in &self.reporters {
            v[r.name.as_str()] = serde_json::from_str(&(r.status)()).unwrap_or_default();
        }
        v.to_string()
    }

    /// Prometheus text exposition of the counters.
    fn metrics(&self) -> String {
        use std::fmt::Write;
        let mut m = String::new();
        let mut metric = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
            let _ = writeln!(m, "# HELP sixmesh_{name} {help}\n# TYPE sixmesh_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(m, "sixmesh_{name}{labels} {v}");
            }
        };
        let up = self.sessions.values().filter(|s| s.up).count();
        metric(
            "uptime_seconds",
            "Seconds since the node started.",
            "gauge",
            &[(String::new(), self.started.elapsed().as_secs_f64())],
        );
        metric(
            "tunnels",
            "Tunnels by state.",
            "gauge",
            &[
                ("{state=\"up\"}".into(), up as f64),
                ("{state=\"connecting\"}".into(), (self.sessions.len() - up) as f64),
            ],
        );
        metric(
            "routes",
            "Destinations with a selected route.",
            "gauge",
            &[(String::new(), self.core.router().selected_count() as f64)],
        );
        let b = self.core.router().stats();
        for (name, help, v) in [
            ("babel_updates_received_total", "Babel route updates received.", b.updates_in),
            (
                "babel_updates_changed_total",
                "Received Babel updates that changed the route table (the rest only refreshed it).",
                b.updates_changed,
            ),
            (
                "babel_updates_repeated_total",
                "Received Babel updates in datagrams that repeated earlier ones, refreshed without being handled one by one.",
                b.updates_repeated,
            ),
            (
                "babel_seqno_bumps_total",
                "Times a neighbour's seqno request raised this node's own seqno.",
                b.seqno_bumps,
            ),
        ] {
            metric(name, help, "counter", &[(String::new(), v as f64)]);
        }
        let counters: Vec<_> = self.core.tunnel_counters().collect();
        let per = |f: fn(&crate::node::TunnelCounters) -> u64| -> Vec<(String, f64)> {
            counters.iter().map(|(p, c)| (format!("{{peer=\"{p}\"}}"), f(c) as f64)).collect()
        };
        metric(
            "tunnel_tx_bytes_total",
            "Inner bytes sent into each tunnel.",
            "counter",
            &per(|c| c.tx_bytes),
        );
        metric(
            "tunnel_rx_bytes_total",
            "Inner bytes received from each tunnel.",
            "counter",
            &per(|c| c.rx_bytes),
        );
        let (d, st) = (self.core.drops(), self.stats);
        let by_label: [LabelledCounter; 6] = [
            (
                "babel_packets_total",
                "Babel packets by direction, and those dropped whole.",
                "dir",
                &[("in", b.packets_in), ("out", b.packets_out), ("dropped", b.packets_dropped)],
            ),
            (
                "babel_seqno_requests_total",
                "Babel seqno requests sent, ours (a destination without a feasible route) or passed on towards the source.",
                "kind",
                &[("ours", b.seqno_requests_sent), ("forwarded", b.seqno_requests_forwarded)],
            ),
            (
                "dropped_packets_total",
                "Packets dropped, by reason.",
                "reason",
                &[
                    ("not_ipv6", d.not_ipv6),
                    ("no_route", d.no_route),
                    ("bad_source", d.bad_source),
                    ("hop_limit", d.hop_limit),
                    ("no_tunnel", d.no_tunnel),
                ],
            ),
            (
                "udp_datagrams_total",
                "Datagrams on the tunnel socket.",
                "kind",
                &[("all", st.udp_in), ("bad", st.udp_bad)],
            ),
            (
                "handshakes_refused_total",
                "Handshakes refused, by reason.",
                "reason",
                &[("unknown_key", st.handshakes_unknown_key), ("over_max_clients", st.handshakes_refused)],
            ),
            (
                "certificates_total",
                "Peer certificates checked, by result.",
                "result",
                &[("accepted", st.certs_accepted), ("refused", st.certs_refused)],
            ),
        ];
        for (name, help, label, values) in by_label {
            let samples: Vec<(String, f64)> =
                values.iter().map(|(v, n)| (format!("{{{label}=\"{v}\"}}"), *n as f64)).collect();
            metric(name, help, "counter", &samples);
        }
        for r in &self.reporters {
            m.push_str(&(r.metrics)());
        }
        m
    }

    fn control(&self, req: &str) -> String {
        let cmd: serde_json::Value = serde_json::from_str(req).unwrap_or_default();
        match cmd["cmd"].as_str() {
            Some("metrics") => serde_json::json!({ "metrics": self.metrics() }).to_string(),
            Some("status") | Some("peers") => self.status(),
            Some(name) if self.reporters.iter().any(|r| r.name == name) => {
                self.reporters.iter().find(|r| r.name == name).map(|r| (r.status)()).unwrap_or_default()
            }
            Some("routes") | Some("dump") => serde_json::json!({
                "router_id": self.core.router().id().to_string(),
                "seqno": self.core.router().seqno(),
                "interfaces": [],
                "neighbours": self.core.router().neighbours(Instant::now()),
                "routes": self.core.router().routes(),
            })
            .to_string(),
            _ => {
                let extra: String = self.reporters.iter().map(|r| format!(", {}", r.name)).collect();
                serde_json::json!({
                    "error": format!("unknown command: use status, peers, routes, dump or metrics{extra}")
                })
                .to_string()
            }
        }
    }
}

/// Kernel side: the TUN gets the mesh address, the network prefix is
/// routed to it, and the rest of our own prefix is unreachable (so that
/// the kernel never loops it through the TUN).
async fn setup_kernel(tun_name: &str, prefix: Ipv6Net, network: Ipv6Net) -> Result<u32, DaemonError> {
    use rtnetlink::packet_route::route::RouteType;
    use rtnetlink::{LinkUnspec, RouteMessageBuilder};
    let err = |what: &str, e: rtnetlink::Error| DaemonError::Kernel(format!("{what}: {e}"));
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DaemonError::Kernel(e.to_string()))?;
    tokio::spawn(conn);
    let idx = nix::net::if_::if_nametoindex(tun_name)
        .map_err(|e| DaemonError::Kernel(format!("{tun_name}: {e}")))?;
    handle
        .link()
        .set(
            rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
                .index(idx)
                .mtu(u32::from(TUN_MTU))
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| err("link up", e))?;
    handle
        .address()
        .add(idx, IpAddr::V6(mesh_address(&prefix)), 128)
        .replace()
        .execute()
        .await
        .map_err(|e| err("mesh address", e))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(network.network(), network.prefix_len())
                .output_interface(idx)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(|e| err("network route", e))?;
    handle
        .route()
        .add(
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(prefix.network(), prefix.prefix_len())
                .kind(RouteType::Unreachable)
                .build(),
        )
        .replace()
        .execute()
        .await
        .map_err(|e| err("unreachable own prefix", e))?;
    Ok(idx)
}

async fn teardown_kernel(prefix: Ipv6Net) {
    use rtnetlink::RouteMessageBuilder;
    use rtnetlink::packet_route::route::RouteType;
    if let Ok((conn, handle, _)) = rtnetlink::new_connection() {
        tokio::spawn(conn);
        let _ = handle
            .route()
            .del(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(prefix.network(), prefix.prefix_len())
                    .kind(RouteType::Unreachable)
                    .build(),
            )
            .execute()
            .await;
    }
}

/// Runs the node until `shutdown` resolves. The TUN device goes away with
/// the process; the one route outside it is removed on a clean exit and
/// replaced on the next start after a crash.
pub async fn run(
    cfg: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let prefix = cfg.node.prefix;
    let network = cfg.node.network;
    // Offloads (virtio-net header): the kernel hands over TCP super-packets
    // of up to 64 KB and takes coalesced ones.
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new().name(&cfg.tun_name).mtu(TUN_MTU).offload(offload).build_async()
    };
    let tun = match build(true) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!("TUN offloads unavailable ({e}): one packet per read");
            build(false).map_err(|source| DaemonError::Tun { name: cfg.tun_name.clone(), source })?
        }
    };
    setup_kernel(&cfg.tun_name, prefix, network).await?;
    let sock_err = |source| DaemonError::Socket { port: cfg.listen_port, source };
    let std_sock = std::net::UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.listen_port)))
        .map_err(sock_err)?;
    std_sock.set_nonblocking(true).map_err(sock_err)?;
    let udp = Udp::new(UdpSocket::from_std(std_sock).map_err(sock_err)?).map_err(sock_err)?;
    tracing::debug!(tun_offload = tun.tcp_gso(), udp_gso_segments = udp.max_segments(), "data path offloads");

    let now = Instant::now();
    let public = PublicKey::from(&cfg.tunnel_secret);
    let (bg_tx, mut bg_rx) = mpsc::channel::<Background>(16);
    let refresh_now = Arc::new(tokio::sync::Notify::new());
    let mut d = Daemon {
        core: NodeCore::new(cfg.node, now),
        limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE)),
        secret: cfg.tunnel_secret,
        public,
        udp,
        tun,
        sessions: BTreeMap::new(),
        by_index: HashMap::new(),
        keys: HashMap::new(),
        peer_keys: HashMap::new(),
        endpoints: HashMap::new(),
        serials: HashMap::new(),
        certs: HashMap::new(),
        asked: HashMap::new(),
        refresh_now: refresh_now.clone(),
        cert_sent: HashMap::new(),
        state_dir: cfg.state_dir.clone(),
        babel_state: cfg.babel_state.clone(),
        bg_tx: bg_tx.clone(),
        bootstrap_at: None,
        config_version: 0,
        trust: cfg.trust,
        next_index: rand::random::<u32>() | 1,
        stats: DataPlaneStats::default(),
        started: now,
        listen_port: cfg.listen_port,
        rx: RxBatch::with_buffers(),
        tx: TxBatch::default(),
        tun_out: Vec::with_capacity(TUN_BATCH),
        pool: Vec::new(),
        gro: tun_rs::GROTable::new(),
        reporters: cfg.reporters.clone(),
    };
    let mut known = cfg.known_peers.clone();
    if let Some(dir) = &cfg.state_dir {
        match crate::peerdb::PeerDb::open(&dir.join("peers.db")).and_then(|db| db.all()) {
            Ok(cached) => {
                tracing::info!(peers = cached.len(), "peers from the cache");
                known.extend(cached.into_iter().map(|c| (c.prefix, PublicKey::from(c.key), c.endpoints)));
            }
            Err(e) => tracing::warn!("peer cache unreadable, starting without it: {e}"),
        }
    }
    for (peer, key, eps) in &known {
        d.keys.insert(*key.as_bytes(), *peer);
        d.peer_keys.insert(*peer, *key);
        d.endpoints.insert(*peer, eps.clone());
    }
    d.core.manager().add_candidates(known.iter().map(|(p, _, e)| (*p, e.clone())));
    let mut fixed_peers = Vec::new();
    for sp in &cfg.static_peers {
        let Some(k) = parse_key(&sp.public_key) else {
            tracing::warn!(prefix = %sp.prefix, "static peer has an invalid public key: ignored");
            continue;
        };
        let key = PublicKey::from(k);
        d.keys.insert(k, sp.prefix);
        d.peer_keys.insert(sp.prefix, key);
        if let Some(ep) = sp.endpoint {
            d.endpoints.insert(sp.prefix, vec![ep]);
        }
        if sp.babel {
            if let Some(ep) = sp.endpoint {
                d.core.manager().add_candidates([(sp.prefix, vec![ep])]);
            }
        } else {
            fixed_peers.push(sp.prefix);
            d.session(sp.prefix, true);
        }
    }
    for p in &fixed_peers {
        if let Some(eps) = d.endpoints.get(p).cloned() {
            d.connect(*p, eps, true).await;
        }
    }
    tracing::info!(%prefix, mesh_address = %mesh_address(&prefix), port = d.listen_port,
        public_key = %b64(d.public.as_bytes()), "node up");

    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlMsg>(16);
    if let Some(path) = &cfg.control {
        let l = bind_control(path)?;
        tokio::spawn(serve_control(l, ctl_tx.clone()));
    }
    if let Some(addr) = cfg.metrics {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Control { path: PathBuf::from(addr.to_string()), source })?;
        tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(l, ctl_tx));
    }

    let mut wg_tick = tokio::time::interval(Duration::from_millis(250));
    let mut limiter_tick = tokio::time::interval(Duration::from_secs(1));
    // One TUN read: a super-packet of up to 64 KB with offloads, split into
    // `segs` (sizes in `seg_len`).
    let mut tun_buf = vec![0u8; VNET + 65535];
    let mut segs = vec![vec![0u8; 1500]; TUN_BATCH];
    let mut seg_len = vec![0usize; TUN_BATCH];
    let mut cache_tick = tokio::time::interval(Duration::from_secs(30));
    if let Some(dir) = &cfg.state_dir {
        spawn_registry_loop(
            dir.clone(),
            cfg.endpoints.clone(),
            cfg.config_refresh,
            bg_tx.clone(),
            refresh_now.clone(),
        );
    }
    tokio::pin!(shutdown);
    loop {
        let deadline = d.core.poll_timeout();
        tokio::select! {
            _ = &mut shutdown => break,
            r = d.udp.sock.readable() => match r {
                Ok(()) => {
                    // Drain what is queued (a few reads) before going back to select!.
                    for _ in 0..BATCH {
                        match d.udp.try_recv(&mut d.rx) {
                            Ok(n) => d.handle_rx(n).await,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::debug!("udp recv: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!("udp recv: {e}"),
            },
            r = d.tun.recv_multiple(&mut tun_buf, &mut segs, &mut seg_len, 0) => {
                let mut r = r;
                for _ in 0..BATCH {
                    match r {
                        Ok(n) => d.handle_tun_read(&mut segs[..n], &seg_len[..n]).await,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        // A malformed super-packet: drop it, read on.
                        Err(e) => tracing::debug!("tun read: {e}"),
                    }
                    r = d.tun.try_recv_multiple(&mut tun_buf, &mut segs, &mut seg_len, 0);
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => d.core.handle_timeout(Instant::now()),
            _ = wg_tick.tick() => d.wg_timers().await,
            _ = limiter_tick.tick() => d.limiter.reset_count(),
            Some((req, reply)) = ctl_rx.recv() => { let _ = reply.send(d.control(&req)); }
            Some(bg) = bg_rx.recv() => d.background(bg),
            _ = cache_tick.tick() => d.save_cache(),
        }
        d.pump().await;
    }
    tracing::info!("node stopping");
    d.save_cache();
    if let Some(path) = &d.babel_state {
        let st = sixmesh_routing::driver::PersistentState {
            router_id: d.core.router().id(),
            seqno: d.core.router().seqno(),
        };
        let _ = st.save(path);
    }
    teardown_kernel(prefix).await;
    if let Some(p) = &cfg.control {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// A minimal HTTP/1.1 endpoint for Prometheus: any GET gets the metrics.
async fn serve_metrics(l: tokio::net::TcpListener, tx: mpsc::Sender<ControlMsg>) {
    use tokio::io::AsyncReadExt;
    while let Ok((mut stream, _)) = l.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            // Read the request head (bounded), then answer and close.
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => return,
                }
            }
            let (otx, orx) = oneshot::channel();
            if tx.send((r#"{"cmd":"metrics"}"#.to_string(), otx)).await.is_err() {
                return;
            }
            let answer: serde_json::Value =
                serde_json::from_str(&orx.await.unwrap_or_default()).unwrap_or_default();
            let body = answer["metrics"].as_str().unwrap_or_default().to_string();
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

fn bind_control(path: &std::path::Path) -> Result<UnixListener, DaemonError> {
    sixmesh_routing::driver::bind_control_socket(path)
        .map_err(|source| DaemonError::Control { path: path.to_owned(), source })
}

async fn serve_control(l: UnixListener, tx: mpsc::Sender<ControlMsg>) {
    while let Ok((stream, _)) = l.accept().await {
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let (otx, orx) = oneshot::channel();
                if tx.send((line, otx)).await.is_err() {
                    return;
                }
                let answer = orx.await.unwrap_or_default();
                if w.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IPv6/TCP packet of one flow, with the fields a peer controls.
    fn tcp6(seq: u32, flags: u8, data_off: u8, payload: usize, hop: u8) -> Vec<u8> {
        let tcp_len = 20 + payload;
        let mut p = vec![0u8; 40 + tcp_len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        p[6] = 6;
        p[7] = hop;
        p[8] = 0xfd;
        p[24] = 0xfd;
        p[39] = 1;
        p[40 + 4..40 + 8].copy_from_slice(&seq.to_be_bytes());
        p[40 + 12] = data_off;
        p[40 + 13] = flags;
        // A valid checksum, or tun-rs would not even try to coalesce.
        let mut sum: u32 = u32::from(6u16) + tcp_len as u32;
        for c in p[8..].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        p[40 + 16..40 + 18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        p
    }

    proptest! {
        /// What an allowed peer sends goes through tun-rs's GRO before the
        /// TUN write: whatever its headers say, that must not panic.
        #[test]
        fn tun_coalescing_never_panics_on_what_a_peer_sends(
            pkts in proptest::collection::vec(
                (0u32..5_000, any::<u8>(), prop_oneof![Just(0x50u8), any::<u8>()], 0usize..1400, 1u8..3, any::<bool>()),
                1..12,
            )
        ) {
            let mut bufs: Vec<Vec<u8>> = pkts
                .iter()
                .map(|&(seq, flags, off, len, hop, ack)| {
                    let flags = if ack { 0x10 } else { flags };
                    let mut b = Vec::with_capacity(TUN_WRITE_CAP);
                    b.resize(VNET, 0);
                    b.extend(tcp6(seq, flags, off, len, hop));
                    b
                })
                .collect();
            let mut gro = tun_rs::GROTable::new();
            let _ = gro.apply_gro(&mut bufs, VNET, false);
        }

        /// Consecutive segments of one flow do coalesce (the reason for the
        /// 64 KB buffers).
        #[test]
        fn consecutive_segments_coalesce(n in 2usize..40) {
            let mut bufs: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let mut b = Vec::with_capacity(TUN_WRITE_CAP);
                    b.resize(VNET, 0);
                    b.extend(tcp6(1000 + 1340 * i as u32, 0x10, 0x50, 1340, 64));
                    b
                })
                .collect();
            let mut gro = tun_rs::GROTable::new();
            gro.apply_gro(&mut bufs, VNET, false).unwrap();
            prop_assert_eq!(bufs[0].len(), VNET + 60 + 1340 * n);
        }
    }
}
