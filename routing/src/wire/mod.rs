//! The Babel wire format (RFC 8966 §4), with RFC 9616 timestamps and RFC 9079
//! source prefixes.
//!
//! Two layers:
//! - [`tlv`]: the raw TLVs, sub-TLVs and framing, byte for byte;
//! - this module: [`decode`] applies the per-packet parser state (router-id,
//!   next hop, default prefixes for compression, the mandatory-sub-TLV rule)
//!   and yields [`Message`]s that the router core understands, and
//!   [`PacketBuilder`] turns messages back into packets of bounded size.
//!
//! Nothing here panics on any input: malformed parts are skipped and counted
//! in [`Decoded::errors`], a bad header is an error.

pub mod tlv;

use std::cell::RefCell;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use self::tlv::{Frames, RawSubTlv, RawTlv, Subs, TlvRef, sub};

/// Metric value meaning "unreachable" (a retraction when sent).
pub const INFINITY: u16 = 0xFFFF;

/// Update flag: this prefix becomes the default for compression (AE 1, 2).
pub const FLAG_DEFAULT_PREFIX: u8 = 0x80;
/// Update flag: the router-id is the last 8 bytes of the prefix.
pub const FLAG_ROUTER_ID: u8 = 0x40;
/// Hello flag: a unicast Hello.
pub const HELLO_UNICAST: u16 = 0x8000;

/// Why a packet, or part of one, could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet shorter than its header")]
    Truncated,
    #[error("bad magic {0} (expected 42)")]
    BadMagic(u8),
    #[error("unsupported version {0} (expected 2)")]
    BadVersion(u8),
    #[error("body length {claimed} exceeds the {available} bytes present")]
    BodyLength { claimed: usize, available: usize },
    #[error("TLV {ty} claims {len} bytes, only {available} left")]
    TlvLength { ty: u8, len: usize, available: usize },
    #[error("TLV {ty} too short for its fields")]
    TlvTooShort { ty: u8 },
    #[error("sub-TLV of TLV {ty} overruns its TLV")]
    SubTlvLength { ty: u8 },
    #[error("TLV {ty} has unknown address encoding {ae}")]
    UnknownAe { ty: u8, ae: u8 },
    #[error("TLV {ty} has an invalid prefix")]
    BadPrefix { ty: u8 },
    #[error("TLV {ty} needs a router-id and none was set")]
    NoRouterId { ty: u8 },
    #[error("TLV {ty} carries an unknown mandatory sub-TLV")]
    MandatorySubTlv { ty: u8 },
    #[error("field of TLV {ty} too long for its length byte")]
    TooLong { ty: u8 },
    #[error("packet of {0} bytes is too long")]
    PacketTooLong(usize),
}

/// A router-id: 8 bytes, never all zeros or all ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RouterId(pub [u8; 8]);

impl RouterId {
    /// Whether the RFC allows this value (not all zeros, not all ones).
    pub fn is_valid(&self) -> bool {
        self.0 != [0; 8] && self.0 != [0xff; 8]
    }
}

impl fmt::Display for RouterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
        )
    }
}

impl fmt::Debug for RouterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for RouterId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for RouterId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<_> = s.split(':').collect();
        if parts.len() != 8 {
            return Err(format!("router-id {s:?}: expected 8 hex bytes separated by ':'"));
        }
        let mut id = [0u8; 8];
        for (b, p) in id.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16).map_err(|e| format!("router-id {s:?}: {e}"))?;
        }
        Ok(RouterId(id))
    }
}

/// A destination of a route request: everything, or one (source-specific)
/// prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestTarget {
    /// AE 0: a full dump is asked for.
    All,
    Prefix {
        prefix: IpNet,
        src: Option<IpNet>,
    },
}

/// A Babel message with the parser state applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    AckReq {
        opaque: u16,
        /// Centiseconds.
        interval: u16,
    },
    Ack {
        opaque: u16,
    },
    Hello {
        unicast: bool,
        seqno: u16,
        /// Centiseconds; 0 for an unscheduled Hello.
        interval: u16,
        /// RFC 9616 transmit timestamp (µs, sender's clock).
        timestamp: Option<u32>,
    },
    Ihu {
        rxcost: u16,
        /// Centiseconds.
        interval: u16,
        /// The neighbour this IHU is about; `None` (AE 0) means the receiver.
        addr: Option<IpAddr>,
        /// RFC 9616: (origin timestamp echoed from the neighbour's Hello,
        /// receive time of that Hello on the sender's clock), µs.
        timestamps: Option<(u32, u32)>,
    },
    Update {
        /// `None` for an AE 0 update: retraction of every route of the sender.
        prefix: Option<IpNet>,
        /// RFC 9079 source prefix (source-specific route).
        src: Option<IpNet>,
        router_id: RouterId,
        /// `None`: the sender's own address is the next hop.
        next_hop: Option<IpAddr>,
        seqno: u16,
        metric: u16,
        /// Centiseconds.
        interval: u16,
    },
    RouteReq(RequestTarget),
    SeqnoReq {
        prefix: IpNet,
        src: Option<IpNet>,
        seqno: u16,
        hop_count: u8,
        router_id: RouterId,
    },
}

/// What [`decode`] made of a packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub messages: Vec<Message>,
    /// TLVs skipped because they were malformed or carried something that
    /// must be ignored (unknown mandatory sub-TLV, AE 4, missing router-id).
    pub errors: u32,
    /// TLVs of types this implementation does not interpret (skipped).
    pub unknown: u32,
}

/// Parser state of one packet (RFC 8966 §4.5).
#[derive(Default)]
struct State {
    router_id: Option<RouterId>,
    next_hop_v4: Option<Ipv4Addr>,
    next_hop_v6: Option<Ipv6Addr>,
    default_v4: [u8; 4],
    default_v6: [u8; 16],
}

/// Decodes a packet. A bad header is an error; a bad TLV is skipped and
/// counted, and decoding stops at the first TLV that overruns the body.
pub fn decode(bytes: &[u8]) -> Result<Decoded, WireError> {
    let mut out = Decoded::default();
    decode_into(bytes, &mut out)?;
    Ok(out)
}

/// [`decode`] into `out`, which is cleared first: a receiver that keeps
/// one `Decoded` allocates nothing per packet.
pub fn decode_into(bytes: &[u8], out: &mut Decoded) -> Result<(), WireError> {
    decode_with(bytes, out, true)
}

/// [`decode_into`] with the fast paths for plain Updates and Router-Ids on
/// or off (off: every TLV through the general parse, which the fast paths
/// must agree with).
fn decode_with(bytes: &[u8], out: &mut Decoded, fast: bool) -> Result<(), WireError> {
    out.messages.clear();
    out.errors = 0;
    out.unknown = 0;
    let (body, _trailer) = tlv::split_packet(bytes)?;
    let mut st = State::default();
    // Straight from the packet's bytes (no raw TLVs built: that allocated
    // for every update's prefix).
    for frame in Frames::new(body) {
        // Fast paths for the two TLVs a full table is made of.
        if fast && let Ok((t, b)) = frame {
            if t == tlv::ty::UPDATE
                && let Some(m) = plain_update(&st, b)
            {
                out.messages.push(m);
                continue;
            }
            if t == tlv::ty::ROUTER_ID
                && let &[_, _, ref id @ ..] = b
                && let Ok(id) = <[u8; 8]>::try_from(id)
                && RouterId(id).is_valid()
            {
                // Exactly reserved + id: no sub-TLVs.
                st.router_id = Some(RouterId(id));
                continue;
            }
        }
        match frame.and_then(|(t, b)| tlv::parse_tlv_ref(t, b)) {
            Ok(tlv) => match apply(&mut st, tlv) {
                Ok(Some(m)) => out.messages.push(m),
                Ok(None) => {}
                Err(Skip::Unknown) => out.unknown += 1,
                Err(Skip::Error) => out.errors += 1,
            },
            Err(_) => out.errors += 1,
        }
    }
    Ok(())
}

/// The Update nearly every packet is full of — IPv6 (AE 2), no flags, no
/// sub-TLVs, a router-id already set — decoded straight from its body `b`;
/// `None` for any other Update, valid or not, which the general parse then
/// decodes (or counts as an error) as before. A full table is a thousand of
/// these per neighbour every update interval: the general path's TLV enum,
/// sub-TLV scan and prefix checks were a quarter of the cost of receiving one.
fn plain_update(st: &State, b: &[u8]) -> Option<Message> {
    let &[2, 0, plen, omitted, i0, i1, s0, s1, m0, m1, ref prefix @ ..] = b else { return None };
    let omitted = usize::from(omitted);
    // Exactly the prefix's bytes: anything after them is sub-TLVs.
    if plen > 128 || omitted + prefix.len() != tlv::prefix_bytes(plen) {
        return None;
    }
    let router_id = st.router_id?;
    let prefix = make_prefix(2, plen, prefix, &st.default_v6[..omitted])?;
    Some(Message::Update {
        prefix: Some(prefix),
        src: None,
        router_id,
        next_hop: st.next_hop_v6.map(IpAddr::V6),
        seqno: u16::from_be_bytes([s0, s1]),
        metric: u16::from_be_bytes([m0, m1]),
        interval: u16::from_be_bytes([i0, i1]),
    })
}

enum Skip {
    Unknown,
    Error,
}

impl From<WireError> for Skip {
    fn from(_: WireError) -> Self {
        Skip::Error
    }
}

/// Splits sub-TLVs into the ones we interpret; fails on an unknown
/// mandatory one. `allow_src` says whether Source Prefix is meaningful here.
/// The bodies of the Timestamp and Source Prefix sub-TLVs of a TLV.
type KnownSubs<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

fn known_subs(subs: Subs<'_>, allow_src: bool) -> Result<KnownSubs<'_>, Skip> {
    let (mut ts, mut src) = (None, None);
    for (t, body) in subs.iter() {
        match t {
            sub::TIMESTAMP => ts = Some(body),
            sub::SOURCE_PREFIX if allow_src => src = Some(body),
            t if t >= sub::MANDATORY => return Err(Skip::Error),
            _ => {}
        }
    }
    Ok((ts, src))
}

/// Decodes a Source Prefix sub-TLV body: plen, then the prefix bytes.
fn source_prefix(body: &[u8], v6: bool) -> Result<IpNet, Skip> {
    let (&plen, rest) = body.split_first().ok_or(Skip::Error)?;
    if plen == 0 || rest.len() != tlv::prefix_bytes(plen) {
        return Err(Skip::Error);
    }
    make_prefix(if v6 { 2 } else { 1 }, plen, rest, &[]).ok_or(Skip::Error)
}

/// Builds a prefix of `plen` bits for `ae` from the `omitted` leading bytes
/// of `default` followed by `bytes`. Host bits are cleared.
fn make_prefix(ae: u8, plen: u8, bytes: &[u8], default: &[u8]) -> Option<IpNet> {
    // `default` then `bytes`, on the stack (one per update received).
    let mut buf = [0u8; 16];
    let len = default.len() + bytes.len();
    if len > buf.len() {
        return None;
    }
    buf[..default.len()].copy_from_slice(default);
    buf[default.len()..len].copy_from_slice(bytes);
    let full = &buf[..len];
    match ae {
        1 => {
            let mut a = [0u8; 4];
            if plen > 32 || full.len() > 4 {
                return None;
            }
            a[..full.len()].copy_from_slice(full);
            Some(IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), plen).ok()?.trunc()))
        }
        2 => {
            let mut a = [0u8; 16];
            if plen > 128 || full.len() > 16 {
                return None;
            }
            a[..full.len()].copy_from_slice(full);
            Some(IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), plen).ok()?.trunc()))
        }
        3 => {
            // fe80::/64 is implied; the 8 bytes are the interface id.
            if !(64..=128).contains(&plen) || !default.is_empty() || bytes.len() > 8 {
                return None;
            }
            let mut a = [0u8; 16];
            a[..2].copy_from_slice(&[0xfe, 0x80]);
            a[8..8 + bytes.len()].copy_from_slice(bytes);
            Some(IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), plen).ok()?.trunc()))
        }
        _ => None,
    }
}

/// Decodes an address of a fixed-length AE (IHU, Next Hop).
fn make_addr(ae: u8, b: &[u8]) -> Option<IpAddr> {
    match (ae, b.len()) {
        (1, 4) => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        (2, 16) => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        (3, 8) => {
            let mut a = [0u8; 16];
            a[..2].copy_from_slice(&[0xfe, 0x80]);
            a[8..].copy_from_slice(b);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => None,
    }
}

fn apply(st: &mut State, tlv: TlvRef<'_>) -> Result<Option<Message>, Skip> {
    Ok(Some(match tlv {
        TlvRef::Pad1 | TlvRef::PadN(_) => return Ok(None),
        TlvRef::Unknown { .. } => return Err(Skip::Unknown),
        TlvRef::AckReq { opaque, interval, subs, .. } => {
            known_subs(subs, false)?;
            Message::AckReq { opaque, interval }
        }
        TlvRef::Ack { opaque, subs } => {
            known_subs(subs, false)?;
            Message::Ack { opaque }
        }
        TlvRef::Hello { flags, seqno, interval, subs } => {
            let (ts, _) = known_subs(subs, false)?;
            let timestamp = ts.and_then(|b| Some(u32::from_be_bytes(b.try_into().ok()?)));
            Message::Hello { unicast: flags & HELLO_UNICAST != 0, seqno, interval, timestamp }
        }
        TlvRef::Ihu { ae, rxcost, interval, addr, subs, .. } => {
            let (ts, _) = known_subs(subs, false)?;
            let addr = match ae {
                0 => None,
                1..=3 => Some(make_addr(ae, addr).ok_or(Skip::Error)?),
                _ => return Err(Skip::Error),
            };
            let timestamps = ts.and_then(|b| {
                let b: [u8; 8] = b.try_into().ok()?;
                Some((
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                ))
            });
            Message::Ihu { rxcost, interval, addr, timestamps }
        }
        TlvRef::RouterId { router_id, subs, .. } => {
            known_subs(subs, false)?;
            let id = RouterId(router_id);
            if !id.is_valid() {
                return Err(Skip::Error);
            }
            st.router_id = Some(id);
            return Ok(None);
        }
        TlvRef::NextHop { ae, addr, subs, .. } => {
            known_subs(subs, false)?;
            match make_addr(ae, addr) {
                Some(IpAddr::V4(a)) => st.next_hop_v4 = Some(a),
                Some(IpAddr::V6(a)) => st.next_hop_v6 = Some(a),
                None => return Err(Skip::Error),
            }
            return Ok(None);
        }
        TlvRef::Update { ae, flags, plen, omitted, interval, seqno, metric, prefix, subs } => {
            let (_, src) = known_subs(subs, true)?;
            let prefix = match ae {
                0 => {
                    if plen != 0 || metric != INFINITY {
                        return Err(Skip::Error);
                    }
                    None
                }
                1..=3 => {
                    let default: &[u8] = match ae {
                        1 => &st.default_v4,
                        2 => &st.default_v6,
                        _ => &[],
                    };
                    let omitted = omitted as usize;
                    if omitted > default.len() {
                        return Err(Skip::Error);
                    }
                    let p = make_prefix(ae, plen, prefix, &default[..omitted]).ok_or(Skip::Error)?;
                    if flags & FLAG_DEFAULT_PREFIX != 0 {
                        // The default is the prefix as written (zero-padded), like babeld.
                        // `make_prefix` accepted it: at most 4 or 16 bytes.
                        let mut buf = [0u8; 16];
                        let len = omitted + prefix.len();
                        buf[..omitted].copy_from_slice(&default[..omitted]);
                        buf[omitted..len].copy_from_slice(prefix);
                        let full = &buf[..len];
                        match ae {
                            1 => {
                                st.default_v4 = [0; 4];
                                st.default_v4[..full.len()].copy_from_slice(full);
                            }
                            2 => {
                                st.default_v6 = [0; 16];
                                st.default_v6[..full.len()].copy_from_slice(full);
                            }
                            _ => {}
                        }
                    }
                    if flags & FLAG_ROUTER_ID != 0 {
                        let octets: [u8; 16] = match p.addr() {
                            IpAddr::V4(a) => {
                                let mut o = [0; 16];
                                o[12..].copy_from_slice(&a.octets());
                                o
                            }
                            IpAddr::V6(a) => a.octets(),
                        };
                        let id = RouterId(octets[8..].try_into().expect("8 bytes"));
                        if !id.is_valid() {
                            return Err(Skip::Error);
                        }
                        st.router_id = Some(id);
                    }
                    Some(p)
                }
                // AE 4 (v4-via-v6, RFC 9229) and unknown AEs: skipped.
                _ => return Err(Skip::Error),
            };
            let v6 = matches!(prefix, Some(IpNet::V6(_)));
            let src = src.map(|b| source_prefix(b, v6)).transpose()?;
            let router_id = match prefix {
                // A wildcard retraction is about no router in particular.
                None => RouterId::default(),
                Some(_) => st.router_id.ok_or(Skip::Error)?,
            };
            let next_hop = match prefix {
                Some(IpNet::V4(_)) => st.next_hop_v4.map(IpAddr::V4),
                Some(IpNet::V6(_)) => st.next_hop_v6.map(IpAddr::V6),
                None => None,
            };
            Message::Update { prefix, src, router_id, next_hop, seqno, metric, interval }
        }
        TlvRef::RouteReq { ae, plen, prefix, subs } => {
            let (_, src) = known_subs(subs, true)?;
            if ae == 0 {
                if plen != 0 || src.is_some() {
                    return Err(Skip::Error);
                }
                Message::RouteReq(RequestTarget::All)
            } else {
                let p = make_prefix(ae, plen, prefix, &[]).ok_or(Skip::Error)?;
                let src = src.map(|b| source_prefix(b, p.addr().is_ipv6())).transpose()?;
                Message::RouteReq(RequestTarget::Prefix { prefix: p, src })
            }
        }
        TlvRef::SeqnoReq { ae, plen, seqno, hop_count, router_id, prefix, subs, .. } => {
            let (_, src) = known_subs(subs, true)?;
            let p = make_prefix(ae, plen, prefix, &[]).ok_or(Skip::Error)?;
            let src = src.map(|b| source_prefix(b, p.addr().is_ipv6())).transpose()?;
            let router_id = RouterId(router_id);
            if !router_id.is_valid() {
                return Err(Skip::Error);
            }
            Message::SeqnoReq { prefix: p, src, seqno, hop_count, router_id }
        }
    }))
}

/// AE and prefix bytes of a prefix, uncompressed (AE 1 or 2).
fn prefix_ae(p: &IpNet) -> (u8, Vec<u8>) {
    let n = tlv::prefix_bytes(p.prefix_len());
    match p {
        IpNet::V4(p) => (1, p.network().octets()[..n].to_vec()),
        IpNet::V6(p) => (2, p.network().octets()[..n].to_vec()),
    }
}

fn src_sub(src: &Option<IpNet>) -> Vec<RawSubTlv> {
    match src {
        None => Vec::new(),
        Some(s) => {
            let (_, bytes) = prefix_ae(s);
            let mut body = vec![s.prefix_len()];
            body.extend(bytes);
            vec![RawSubTlv::Other { ty: sub::SOURCE_PREFIX, body }]
        }
    }
}

fn addr_ae(a: &IpAddr) -> (u8, Vec<u8>) {
    match a {
        IpAddr::V4(a) => (1, a.octets().to_vec()),
        IpAddr::V6(a) if a.segments()[..4] == [0xfe80, 0, 0, 0] => (3, a.octets()[8..].to_vec()),
        IpAddr::V6(a) => (2, a.octets().to_vec()),
    }
}

/// Turns [`Message`]s into raw TLVs, inserting Router-Id and Next Hop TLVs
/// when they change, and cuts the result into packets of at most `mtu`
/// bytes of UDP payload. Emits no prefix compression and never more than one
/// sub-TLV per TLV (babeld 1.12.1 mis-parses more).
#[derive(Debug)]
pub struct PacketBuilder {
    mtu: usize,
    packets: Vec<Vec<u8>>,
    current: Vec<u8>,
    router_id: Option<RouterId>,
    next_hop: Option<IpAddr>,
}

impl PacketBuilder {
    /// Smallest packet size accepted: one message with all its state TLVs fits.
    pub const MIN_MTU: usize = 128;

    /// Capacity each packet has past its bytes, so that a driver can put its
    /// own headers in front (IPv6 and UDP: 48 bytes) without reallocating.
    pub const SPARE: usize = 64;

    /// A builder whose packets hold at most `mtu` bytes (at least [`Self::MIN_MTU`]).
    pub fn new(mtu: usize) -> Self {
        PacketBuilder {
            mtu: mtu.max(Self::MIN_MTU),
            packets: Vec::new(),
            current: Vec::new(),
            router_id: None,
            next_hop: None,
        }
    }

    /// Whether nothing has been pushed.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty() && self.current.is_empty()
    }

    /// Adds a message.
    pub fn push(&mut self, m: &Message) {
        match m {
            Message::Update {
                prefix: Some(IpNet::V6(p)),
                src: None,
                router_id,
                next_hop: None,
                seqno,
                metric,
                interval,
            } => self.push_plain_update(p, *router_id, *seqno, *metric, *interval),
            Message::Hello { unicast, seqno, interval, timestamp } => {
                let len = 8 + if timestamp.is_some() { 6 } else { 0 };
                let out = self.room_for(len);
                out.extend([tlv::ty::HELLO, (len - 2) as u8]);
                let flags = if *unicast { HELLO_UNICAST } else { 0 };
                for v in [flags, *seqno, *interval] {
                    out.extend(v.to_be_bytes());
                }
                if let Some(t) = timestamp {
                    out.extend([sub::TIMESTAMP, 4]);
                    out.extend(t.to_be_bytes());
                }
            }
            Message::Ihu { rxcost, interval, addr, timestamps } => {
                let (ae, n) = match addr {
                    None => (0, 0),
                    Some(IpAddr::V4(_)) => (1, 4),
                    Some(IpAddr::V6(a)) if a.segments()[..4] == [0xfe80, 0, 0, 0] => (3, 8),
                    Some(IpAddr::V6(_)) => (2, 16),
                };
                let len = 8 + n + if timestamps.is_some() { 10 } else { 0 };
                let out = self.room_for(len);
                out.extend([tlv::ty::IHU, (len - 2) as u8, ae, 0]);
                out.extend(rxcost.to_be_bytes());
                out.extend(interval.to_be_bytes());
                match addr {
                    None => {}
                    Some(IpAddr::V4(a)) => out.extend(a.octets()),
                    Some(IpAddr::V6(a)) => out.extend(&a.octets()[16 - n..]),
                }
                if let Some((o, r)) = timestamps {
                    out.extend([sub::TIMESTAMP, 8]);
                    out.extend(o.to_be_bytes());
                    out.extend(r.to_be_bytes());
                }
            }
            _ => self.push_generic(m),
        }
    }

    /// The packet to write a TLV of `len` bytes into that needs neither a
    /// Router-Id nor a Next Hop (a Hello, an IHU), started or flushed as
    /// [`PacketBuilder::push_generic`] would. Hellos and IHUs go out on every
    /// tunnel twice a second: written straight in, they allocate nothing.
    fn room_for(&mut self, len: usize) -> &mut Vec<u8> {
        if !self.current.is_empty() && self.current.len() + len > self.mtu {
            self.flush_current();
        }
        self.make_room(len);
        &mut self.current
    }

    /// Starts the packet if none is, and makes room in it for `len` more
    /// bytes and [`PacketBuilder::SPARE`]. A packet starts with room for a
    /// Hello and its IHUs (one allocation, not four growing ones, and small
    /// enough to stay in flight by the thousand), and grows once, straight
    /// to the MTU, if it gets more.
    fn make_room(&mut self, len: usize) {
        if self.current.is_empty() {
            if self.current.capacity() == 0
                && let Some(b) = pooled_buffer()
            {
                self.current = b;
            }
            self.current.reserve_exact(FIRST_PACKET.min(self.mtu) + Self::SPARE);
            self.current.extend([tlv::MAGIC, tlv::VERSION, 0, 0]);
        }
        let need = self.current.len() + len + Self::SPARE;
        if self.current.capacity() < need {
            let full = (self.mtu + Self::SPARE).max(need);
            self.current.reserve_exact(full - self.current.len());
        }
    }

    /// The common update (IPv6, not source-specific, next hop = sender),
    /// written straight into the packet: full tables are thousands of these,
    /// and the generic path allocates for every TLV. Same bytes as
    /// [`PacketBuilder::push_generic`] (a property test checks it).
    fn push_plain_update(
        &mut self,
        p: &Ipv6Net,
        router_id: RouterId,
        seqno: u16,
        metric: u16,
        interval: u16,
    ) {
        let plen = p.prefix_len();
        let n = tlv::prefix_bytes(plen);
        let len = 2 + 10 + n;
        let extra = if self.router_id != Some(router_id) { 12 } else { 0 };
        if !self.current.is_empty()
            && (self.next_hop.is_some() || self.current.len() + extra + len > self.mtu)
        {
            self.flush_current();
        }
        self.make_room(extra + len);
        // After a flush the new packet needs the Router-Id again.
        if self.router_id != Some(router_id) {
            self.current.extend([tlv::ty::ROUTER_ID, 10, 0, 0]);
            self.current.extend(router_id.0);
            self.router_id = Some(router_id);
        }
        self.current.extend([tlv::ty::UPDATE, (10 + n) as u8, 2, 0, plen, 0]);
        self.current.extend(interval.to_be_bytes());
        self.current.extend(seqno.to_be_bytes());
        self.current.extend(metric.to_be_bytes());
        self.current.extend(&p.network().octets()[..n]);
    }

    /// Adds any message, through the raw TLV layer.
    fn push_generic(&mut self, m: &Message) {
        let mut tlvs = Vec::with_capacity(3);
        match m {
            Message::AckReq { opaque, interval } => {
                tlvs.push(RawTlv::AckReq { reserved: 0, opaque: *opaque, interval: *interval, subs: vec![] })
            }
            Message::Ack { opaque } => tlvs.push(RawTlv::Ack { opaque: *opaque, subs: vec![] }),
            Message::Hello { unicast, seqno, interval, timestamp } => tlvs.push(RawTlv::Hello {
                flags: if *unicast { HELLO_UNICAST } else { 0 },
                seqno: *seqno,
                interval: *interval,
                subs: timestamp
                    .map(|t| vec![RawSubTlv::Other { ty: sub::TIMESTAMP, body: t.to_be_bytes().to_vec() }])
                    .unwrap_or_default(),
            }),
            Message::Ihu { rxcost, interval, addr, timestamps } => {
                let (ae, addr) = addr.as_ref().map(addr_ae).unwrap_or((0, vec![]));
                let subs = timestamps
                    .map(|(o, r)| {
                        let mut body = o.to_be_bytes().to_vec();
                        body.extend(r.to_be_bytes());
                        vec![RawSubTlv::Other { ty: sub::TIMESTAMP, body }]
                    })
                    .unwrap_or_default();
                tlvs.push(RawTlv::Ihu { ae, reserved: 0, rxcost: *rxcost, interval: *interval, addr, subs })
            }
            Message::Update { prefix, src, router_id, next_hop, seqno, metric, interval } => {
                let Some(prefix) = prefix else {
                    tlvs.push(RawTlv::Update {
                        ae: 0,
                        flags: 0,
                        plen: 0,
                        omitted: 0,
                        interval: *interval,
                        seqno: *seqno,
                        metric: INFINITY,
                        prefix: vec![],
                        subs: vec![],
                    });
                    return self.push_group(tlvs, None, None);
                };
                let (ae, bytes) = prefix_ae(prefix);
                tlvs.push(RawTlv::Update {
                    ae,
                    flags: 0,
                    plen: prefix.prefix_len(),
                    omitted: 0,
                    interval: *interval,
                    seqno: *seqno,
                    metric: *metric,
                    prefix: bytes,
                    subs: src_sub(src),
                });
                return self.push_group(tlvs, Some(*router_id), *next_hop);
            }
            Message::RouteReq(RequestTarget::All) => {
                tlvs.push(RawTlv::RouteReq { ae: 0, plen: 0, prefix: vec![], subs: vec![] })
            }
            Message::RouteReq(RequestTarget::Prefix { prefix, src }) => {
                let (ae, bytes) = prefix_ae(prefix);
                tlvs.push(RawTlv::RouteReq {
                    ae,
                    plen: prefix.prefix_len(),
                    prefix: bytes,
                    subs: src_sub(src),
                })
            }
            Message::SeqnoReq { prefix, src, seqno, hop_count, router_id } => {
                let (ae, bytes) = prefix_ae(prefix);
                tlvs.push(RawTlv::SeqnoReq {
                    ae,
                    plen: prefix.prefix_len(),
                    seqno: *seqno,
                    hop_count: *hop_count,
                    reserved: 0,
                    router_id: router_id.0,
                    prefix: bytes,
                    subs: src_sub(src),
                })
            }
        }
        self.push_group(tlvs, None, None)
    }

    /// Emits `tlvs` together in one packet, preceded by the Router-Id and
    /// Next Hop TLVs they need in this packet's parser state.
    fn push_group(&mut self, tlvs: Vec<RawTlv>, router_id: Option<RouterId>, next_hop: Option<IpAddr>) {
        let body_len = |tlvs: &[RawTlv]| tlvs.iter().map(RawTlv::emitted_len).sum::<usize>();
        let need_id = |s: &Self| router_id.is_some() && s.router_id != router_id;
        let need_nh = |s: &Self| next_hop.is_some() && s.next_hop != next_hop;
        let id_tlv = router_id.map(|id| RawTlv::RouterId { reserved: 0, router_id: id.0, subs: vec![] });
        let nh_tlv = next_hop.map(|a| {
            let (ae, addr) = addr_ae(&a);
            RawTlv::NextHop { ae, reserved: 0, addr, subs: vec![] }
        });
        let extra = |s: &Self| {
            (if need_id(s) { 12 } else { 0 })
                + (if need_nh(s) { nh_tlv.as_ref().map_or(0, |t| t.emitted_len()) } else { 0 })
        };
        // An update whose next hop is the sender cannot follow a Next Hop TLV
        // in the same packet: the parser state would give it that next hop.
        let next_hop_clash = router_id.is_some() && next_hop.is_none() && self.next_hop.is_some();
        if !self.current.is_empty()
            && (next_hop_clash || self.current.len() + extra(self) + body_len(&tlvs) > self.mtu)
        {
            self.flush_current();
        }
        self.make_room(extra(self) + body_len(&tlvs));
        if need_id(self) {
            id_tlv.as_ref().expect("router-id").emit(&mut self.current).expect("fixed-size TLV");
            self.router_id = router_id;
        }
        if need_nh(self) {
            nh_tlv.as_ref().expect("next hop").emit(&mut self.current).expect("fixed-size TLV");
            self.next_hop = next_hop;
        }
        for t in &tlvs {
            // Our own messages always fit a length byte (at most 2 + 14 + 16 + 19 bytes).
            t.emit(&mut self.current).expect("bounded TLV");
        }
    }

    fn flush_current(&mut self) {
        if let Some(p) = self.seal_current() {
            self.packets.push(p);
        }
    }

    /// The packet being built, its length set, if it has anything; the
    /// next starts afresh.
    fn seal_current(&mut self) -> Option<Vec<u8>> {
        let p = (self.current.len() > tlv::HEADER_LEN).then(|| {
            let body = (self.current.len() - tlv::HEADER_LEN) as u16;
            self.current[2..4].copy_from_slice(&body.to_be_bytes());
            std::mem::take(&mut self.current)
        });
        self.current.clear();
        self.router_id = None;
        self.next_hop = None;
        p
    }

    /// The packets, in order.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.flush_current();
        self.packets
    }

    /// The packets, in order, each to `f` (without gathering them in a
    /// vector: most builders make one packet).
    pub fn finish_each(mut self, mut f: impl FnMut(Vec<u8>)) {
        let last = self.seal_current();
        self.packets.into_iter().chain(last).for_each(&mut f);
    }
}

/// How much a packet holds when it starts (a Hello and its IHUs fit).
const FIRST_PACKET: usize = 256;
/// Buffers [`recycle`] keeps per thread, and the largest it keeps.
const POOLED: usize = 64;
const POOLED_CAPACITY: usize = 4096;

thread_local! {
    /// Packets done with, emptied, for the next packets built on this
    /// thread: the last one given back is the first taken, while its memory
    /// is still in cache (a fresh allocation is memory freed long before:
    /// on a simulator's thread, which sends and drops a packet for every
    /// event, taking it was a cache miss per packet and 6 % of its time).
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Gives back a packet buffer that is done with (a received datagram, read
/// and dropped), so that the next packet [`PacketBuilder`] starts on this
/// thread reuses it rather than allocating. Small and huge buffers, and
/// any past a few dozen, are simply freed.
pub fn recycle(mut buf: Vec<u8>) {
    if !(FIRST_PACKET + PacketBuilder::SPARE..=POOLED_CAPACITY).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    let _ = POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut()
            && p.len() < POOLED
        {
            p.push(buf);
        }
    });
}

/// The buffer [`recycle`] was given last on this thread, if any.
fn pooled_buffer() -> Option<Vec<u8>> {
    POOL.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop())).ok().flatten()
}

/// A copy whose packets keep [`PacketBuilder::SPARE`] capacity (a derived
/// clone would make them exactly as long as their bytes).
impl Clone for PacketBuilder {
    fn clone(&self) -> Self {
        let copy = |p: &Vec<u8>, room: usize| {
            let mut c = Vec::with_capacity(room + Self::SPARE);
            c.extend_from_slice(p);
            c
        };
        PacketBuilder {
            mtu: self.mtu,
            packets: self.packets.iter().map(|p| copy(p, p.len())).collect(),
            // Still being filled: room for a whole packet.
            current: if self.current.is_empty() { Vec::new() } else { copy(&self.current, self.mtu) },
            router_id: self.router_id,
            next_hop: self.next_hop,
        }
    }
}

/// Encodes messages into packets of at most `mtu` bytes.
pub fn encode(messages: &[Message], mtu: usize) -> Vec<Vec<u8>> {
    let mut b = PacketBuilder::new(mtu);
    for m in messages {
        b.push(m);
    }
    b.finish()
}

#[cfg(test)]
mod tests;
