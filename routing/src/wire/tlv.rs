//! The raw layer: packet framing, TLVs and sub-TLVs exactly as they are on
//! the wire (RFC 8966 §4.3–4.6), with no parser state applied. Parsing then
//! emitting a [`RawPacket`] gives back the same bytes (up to the trailer),
//! which is what golden tests against babeld check.

use super::WireError;

/// First byte of every Babel packet.
pub const MAGIC: u8 = 42;
/// Protocol version this codec speaks.
pub const VERSION: u8 = 2;
/// Size of the packet header (magic, version, body length).
pub const HEADER_LEN: usize = 4;

/// TLV type numbers (RFC 8966 §4.6, RFC 8967).
pub mod ty {
    pub const PAD1: u8 = 0;
    pub const PADN: u8 = 1;
    pub const ACK_REQ: u8 = 2;
    pub const ACK: u8 = 3;
    pub const HELLO: u8 = 4;
    pub const IHU: u8 = 5;
    pub const ROUTER_ID: u8 = 6;
    pub const NEXT_HOP: u8 = 7;
    pub const UPDATE: u8 = 8;
    pub const ROUTE_REQ: u8 = 9;
    pub const SEQNO_REQ: u8 = 10;
}

/// Sub-TLV type numbers.
pub mod sub {
    pub const PAD1: u8 = 0;
    pub const PADN: u8 = 1;
    /// RFC 9616.
    pub const TIMESTAMP: u8 = 3;
    /// RFC 9079; mandatory (≥ 128).
    pub const SOURCE_PREFIX: u8 = 128;
    /// Sub-TLVs with a type at or above this are mandatory.
    pub const MANDATORY: u8 = 128;
}

/// A sub-TLV as found after a TLV's fixed part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawSubTlv {
    Pad1,
    /// PadN with this many bytes of body.
    PadN(u8),
    /// Any other sub-TLV, kept verbatim (Timestamp, Source Prefix, unknown).
    Other {
        ty: u8,
        body: Vec<u8>,
    },
}

impl RawSubTlv {
    /// Whether a receiver that does not understand this sub-TLV must ignore
    /// the whole TLV.
    pub fn is_mandatory(&self) -> bool {
        matches!(self, RawSubTlv::Other { ty, .. } if *ty >= sub::MANDATORY)
    }

    fn emitted_len(&self) -> usize {
        match self {
            RawSubTlv::Pad1 => 1,
            RawSubTlv::PadN(n) => 2 + *n as usize,
            RawSubTlv::Other { body, .. } => 2 + body.len(),
        }
    }
}

/// A TLV, fields as on the wire. Addresses and prefixes are the raw bytes
/// present in the packet (possibly compressed); [`super::decode`] applies
/// the parser state to them. `B` holds bytes and `S` sub-TLVs: owned by
/// default; the decoder borrows them from the packet instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawTlv<B = Vec<u8>, S = Vec<RawSubTlv>> {
    Pad1,
    /// PadN with this many bytes of body.
    PadN(u8),
    AckReq {
        reserved: u16,
        opaque: u16,
        interval: u16,
        subs: S,
    },
    Ack {
        opaque: u16,
        subs: S,
    },
    Hello {
        flags: u16,
        seqno: u16,
        interval: u16,
        subs: S,
    },
    Ihu {
        ae: u8,
        reserved: u8,
        rxcost: u16,
        interval: u16,
        addr: B,
        subs: S,
    },
    RouterId {
        reserved: u16,
        router_id: [u8; 8],
        subs: S,
    },
    NextHop {
        ae: u8,
        reserved: u8,
        addr: B,
        subs: S,
    },
    Update {
        ae: u8,
        flags: u8,
        plen: u8,
        omitted: u8,
        interval: u16,
        seqno: u16,
        metric: u16,
        prefix: B,
        subs: S,
    },
    RouteReq {
        ae: u8,
        plen: u8,
        prefix: B,
        subs: S,
    },
    SeqnoReq {
        ae: u8,
        plen: u8,
        seqno: u16,
        hop_count: u8,
        reserved: u8,
        router_id: [u8; 8],
        prefix: B,
        subs: S,
    },
    /// A TLV type this codec does not interpret (MAC, PC, challenges, future
    /// types), kept verbatim so that it can be skipped or re-emitted.
    Unknown {
        ty: u8,
        body: B,
    },
}

/// A whole packet: its TLVs and the trailer that followed the body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawPacket {
    pub tlvs: Vec<RawTlv>,
    pub trailer: Vec<u8>,
}

/// Length in bytes of an address with this AE, when the AE has a fixed
/// length (IHU, Next Hop). `None` for unknown AEs.
pub fn ae_addr_len(ae: u8) -> Option<usize> {
    match ae {
        0 => Some(0),
        1 => Some(4),
        2 => Some(16),
        3 => Some(8),
        4 => Some(4),
        _ => None,
    }
}

/// Bytes needed for a prefix of `plen` bits.
pub fn prefix_bytes(plen: u8) -> usize {
    (plen as usize).div_ceil(8)
}

/// Checks the header and returns (body, trailer).
pub fn split_packet(bytes: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    if bytes[0] != MAGIC {
        return Err(WireError::BadMagic(bytes[0]));
    }
    if bytes[1] != VERSION {
        return Err(WireError::BadVersion(bytes[1]));
    }
    let body_len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let rest = &bytes[HEADER_LEN..];
    if body_len > rest.len() {
        return Err(WireError::BodyLength { claimed: body_len, available: rest.len() });
    }
    Ok(rest.split_at(body_len))
}

/// Iterates over the TLVs of a packet body as (type, body) without
/// interpreting them (Pad1 comes as type 0 with an empty body). After the
/// first framing error (a TLV longer than what is left) it yields that
/// error and stops.
pub(crate) struct Frames<'a> {
    body: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Frames<'a> {
    pub(crate) fn new(body: &'a [u8]) -> Self {
        Frames { body, pos: 0, done: false }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<(u8, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.body.len() {
            return None;
        }
        let rest = &self.body[self.pos..];
        if rest[0] == ty::PAD1 {
            self.pos += 1;
            return Some(Ok((ty::PAD1, &[])));
        }
        if rest.len() < 2 {
            self.done = true;
            return Some(Err(WireError::Truncated));
        }
        let (t, len) = (rest[0], rest[1] as usize);
        if rest.len() < 2 + len {
            self.done = true;
            return Some(Err(WireError::TlvLength { ty: t, len, available: rest.len() - 2 }));
        }
        self.pos += 2 + len;
        Some(Ok((t, &rest[2..2 + len])))
    }
}

/// Iterates over the TLVs of a packet body. After the first framing error
/// (a TLV longer than what is left) it yields that error and stops; a TLV
/// whose body is malformed yields an error and iteration goes on with the
/// next TLV, since its length is known.
pub struct TlvIter<'a>(Frames<'a>);

impl<'a> TlvIter<'a> {
    /// Iterates over `body` (the bytes after the 4-byte header).
    pub fn new(body: &'a [u8]) -> Self {
        TlvIter(Frames::new(body))
    }
}

impl Iterator for TlvIter<'_> {
    type Item = Result<RawTlv, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.0.next()?.and_then(|(t, body)| parse_tlv_ref(t, body)).map(TlvRef::into_raw))
    }
}

/// Parses a whole packet into raw TLVs. Fails on the first error; use
/// [`TlvIter`] to keep what precedes a bad TLV.
pub fn parse_raw(bytes: &[u8]) -> Result<RawPacket, WireError> {
    let (body, trailer) = split_packet(bytes)?;
    let tlvs = TlvIter::new(body).collect::<Result<Vec<_>, _>>()?;
    Ok(RawPacket { tlvs, trailer: trailer.to_vec() })
}

/// A cursor over a TLV body.
struct Reader<'a> {
    b: &'a [u8],
    ty: u8,
}

impl<'a> Reader<'a> {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.b.len() < n { Err(WireError::TlvTooShort { ty: self.ty }) } else { Ok(()) }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        let v = self.b[0];
        self.b = &self.b[1..];
        Ok(v)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        let v = u16::from_be_bytes([self.b[0], self.b[1]]);
        self.b = &self.b[2..];
        Ok(v)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        self.need(n)?;
        let (a, b) = self.b.split_at(n);
        self.b = b;
        Ok(a)
    }
    fn id(&mut self) -> Result<[u8; 8], WireError> {
        let mut id = [0; 8];
        id.copy_from_slice(self.bytes(8)?);
        Ok(id)
    }
    fn addr(&mut self, ae: u8) -> Result<&'a [u8], WireError> {
        let n = ae_addr_len(ae).ok_or(WireError::UnknownAe { ty: self.ty, ae })?;
        self.bytes(n)
    }
    /// The rest of the body, as sub-TLVs (their framing checked).
    fn subs(self) -> Result<Subs<'a>, WireError> {
        for frame in sub_frames(self.b) {
            frame.map_err(|()| WireError::SubTlvLength { ty: self.ty })?;
        }
        Ok(Subs(self.b))
    }
}

/// The sub-TLVs in `b` as (type, body), Pad1 with an empty body; `Err`
/// for one longer than what is left, and nothing after it.
fn sub_frames(mut b: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), ()>> {
    std::iter::from_fn(move || {
        let (&t, rest) = b.split_first()?;
        if t == sub::PAD1 {
            b = rest;
            return Some(Ok((t, &[][..])));
        }
        let frame = rest.split_first().and_then(|(&len, rest)| rest.split_at_checked(len as usize));
        let Some((body, rest)) = frame else {
            b = &[];
            return Some(Err(()));
        };
        b = rest;
        Some(Ok((t, body)))
    })
}

/// The sub-TLVs of a TLV, as on the wire, their framing checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Subs<'a>(&'a [u8]);

impl<'a> Subs<'a> {
    /// (type, body) of each sub-TLV but Pad1 and PadN.
    pub(crate) fn iter(self) -> impl Iterator<Item = (u8, &'a [u8])> {
        sub_frames(self.0).filter_map(Result::ok).filter(|(t, _)| *t != sub::PAD1 && *t != sub::PADN)
    }

    fn to_raw(self) -> Vec<RawSubTlv> {
        sub_frames(self.0)
            .filter_map(Result::ok)
            .map(|(t, body)| match t {
                sub::PAD1 => RawSubTlv::Pad1,
                sub::PADN => RawSubTlv::PadN(body.len() as u8),
                _ => RawSubTlv::Other { ty: t, body: body.to_vec() },
            })
            .collect()
    }
}

/// A TLV borrowing its bytes from the packet (the receive path decodes
/// from this without allocating).
pub(crate) type TlvRef<'a> = RawTlv<&'a [u8], Subs<'a>>;

impl TlvRef<'_> {
    fn into_raw(self) -> RawTlv {
        match self {
            TlvRef::Pad1 => RawTlv::Pad1,
            TlvRef::PadN(n) => RawTlv::PadN(n),
            TlvRef::AckReq { reserved, opaque, interval, subs } => {
                RawTlv::AckReq { reserved, opaque, interval, subs: subs.to_raw() }
            }
            TlvRef::Ack { opaque, subs } => RawTlv::Ack { opaque, subs: subs.to_raw() },
            TlvRef::Hello { flags, seqno, interval, subs } => {
                RawTlv::Hello { flags, seqno, interval, subs: subs.to_raw() }
            }
            TlvRef::Ihu { ae, reserved, rxcost, interval, addr, subs } => {
                RawTlv::Ihu { ae, reserved, rxcost, interval, addr: addr.to_vec(), subs: subs.to_raw() }
            }
            TlvRef::RouterId { reserved, router_id, subs } => {
                RawTlv::RouterId { reserved, router_id, subs: subs.to_raw() }
            }
            TlvRef::NextHop { ae, reserved, addr, subs } => {
                RawTlv::NextHop { ae, reserved, addr: addr.to_vec(), subs: subs.to_raw() }
            }
            TlvRef::Update { ae, flags, plen, omitted, interval, seqno, metric, prefix, subs } => {
                RawTlv::Update {
                    ae,
                    flags,
                    plen,
                    omitted,
                    interval,
                    seqno,
                    metric,
                    prefix: prefix.to_vec(),
                    subs: subs.to_raw(),
                }
            }
            TlvRef::RouteReq { ae, plen, prefix, subs } => {
                RawTlv::RouteReq { ae, plen, prefix: prefix.to_vec(), subs: subs.to_raw() }
            }
            TlvRef::SeqnoReq { ae, plen, seqno, hop_count, reserved, router_id, prefix, subs } => {
                RawTlv::SeqnoReq {
                    ae,
                    plen,
                    seqno,
                    hop_count,
                    reserved,
                    router_id,
                    prefix: prefix.to_vec(),
                    subs: subs.to_raw(),
                }
            }
            TlvRef::Unknown { ty, body } => RawTlv::Unknown { ty, body: body.to_vec() },
        }
    }
}

/// Parses the body of a TLV of type `t` (as [`Frames`] gives them).
pub(crate) fn parse_tlv_ref(t: u8, body: &[u8]) -> Result<TlvRef<'_>, WireError> {
    let mut r = Reader { b: body, ty: t };
    Ok(match t {
        ty::PAD1 => TlvRef::Pad1,
        ty::PADN => TlvRef::PadN(body.len() as u8),
        ty::ACK_REQ => {
            TlvRef::AckReq { reserved: r.u16()?, opaque: r.u16()?, interval: r.u16()?, subs: r.subs()? }
        }
        ty::ACK => TlvRef::Ack { opaque: r.u16()?, subs: r.subs()? },
        ty::HELLO => TlvRef::Hello { flags: r.u16()?, seqno: r.u16()?, interval: r.u16()?, subs: r.subs()? },
        ty::IHU => {
            let ae = r.u8()?;
            let reserved = r.u8()?;
            let rxcost = r.u16()?;
            let interval = r.u16()?;
            let addr = r.addr(ae)?;
            TlvRef::Ihu { ae, reserved, rxcost, interval, addr, subs: r.subs()? }
        }
        ty::ROUTER_ID => TlvRef::RouterId { reserved: r.u16()?, router_id: r.id()?, subs: r.subs()? },
        ty::NEXT_HOP => {
            let ae = r.u8()?;
            let reserved = r.u8()?;
            let addr = r.addr(ae)?;
            TlvRef::NextHop { ae, reserved, addr, subs: r.subs()? }
        }
        ty::UPDATE => {
            let ae = r.u8()?;
            let flags = r.u8()?;
            let plen = r.u8()?;
            let omitted = r.u8()?;
            let interval = r.u16()?;
            let seqno = r.u16()?;
            let metric = r.u16()?;
            let n = prefix_bytes(plen).checked_sub(omitted as usize).ok_or(WireError::BadPrefix { ty: t })?;
            let prefix = r.bytes(n)?;
            TlvRef::Update { ae, flags, plen, omitted, interval, seqno, metric, prefix, subs: r.subs()? }
        }
        ty::ROUTE_REQ => {
            let ae = r.u8()?;
            let plen = r.u8()?;
            let prefix = r.bytes(prefix_bytes(plen))?;
            TlvRef::RouteReq { ae, plen, prefix, subs: r.subs()? }
        }
        ty::SEQNO_REQ => {
            let ae = r.u8()?;
            let plen = r.u8()?;
            let seqno = r.u16()?;
            let hop_count = r.u8()?;
            let reserved = r.u8()?;
            let router_id = r.id()?;
            let prefix = r.bytes(prefix_bytes(plen))?;
            TlvRef::SeqnoReq { ae, plen, seqno, hop_count, reserved, router_id, prefix, subs: r.subs()? }
        }
        _ => TlvRef::Unknown { ty: t, body },
    })
}

impl RawTlv {
    /// Appends this TLV's bytes to `out`. Fails if a field would not fit in
    /// the one-byte length.
    pub fn emit(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let (t, pad) = match self {
            RawTlv::Pad1 => {
                out.push(ty::PAD1);
                return Ok(());
            }
            RawTlv::PadN(n) => (ty::PADN, *n),
            RawTlv::AckReq { .. } => (ty::ACK_REQ, 0),
            RawTlv::Ack { .. } => (ty::ACK, 0),
            RawTlv::Hello { .. } => (ty::HELLO, 0),
            RawTlv::Ihu { .. } => (ty::IHU, 0),
            RawTlv::RouterId { .. } => (ty::ROUTER_ID, 0),
            RawTlv::NextHop { .. } => (ty::NEXT_HOP, 0),
            RawTlv::Update { .. } => (ty::UPDATE, 0),
            RawTlv::RouteReq { .. } => (ty::ROUTE_REQ, 0),
            RawTlv::SeqnoReq { .. } => (ty::SEQNO_REQ, 0),
            RawTlv::Unknown { ty, .. } => (*ty, 0),
        };
        let start = out.len();
        out.push(t);
        out.push(0);
        let subs = match self {
            RawTlv::Pad1 => unreachable!(),
            RawTlv::PadN(_) => {
                out.extend(std::iter::repeat_n(0, pad as usize));
                &[][..]
            }
            RawTlv::AckReq { reserved, opaque, interval, subs } => {
                put16(out, &[*reserved, *opaque, *interval]);
                subs
            }
            RawTlv::Ack { opaque, subs } => {
                put16(out, &[*opaque]);
                subs
            }
            RawTlv::Hello { flags, seqno, interval, subs } => {
                put16(out, &[*flags, *seqno, *interval]);
                subs
            }
            RawTlv::Ihu { ae, reserved, rxcost, interval, addr, subs } => {
                out.extend([*ae, *reserved]);
                put16(out, &[*rxcost, *interval]);
                out.extend(addr);
                subs
            }
            RawTlv::RouterId { reserved, router_id, subs } => {
                put16(out, &[*reserved]);
                out.extend(router_id);
                subs
            }
            RawTlv::NextHop { ae, reserved, addr, subs } => {
                out.extend([*ae, *reserved]);
                out.extend(addr);
                subs
            }
            RawTlv::Update { ae, flags, plen, omitted, interval, seqno, metric, prefix, subs } => {
                out.extend([*ae, *flags, *plen, *omitted]);
                put16(out, &[*interval, *seqno, *metric]);
                out.extend(prefix);
                subs
            }
            RawTlv::RouteReq { ae, plen, prefix, subs } => {
                out.extend([*ae, *plen]);
                out.extend(prefix);
                subs
            }
            RawTlv::SeqnoReq { ae, plen, seqno, hop_count, reserved, router_id, prefix, subs } => {
                out.extend([*ae, *plen]);
                put16(out, &[*seqno]);
                out.extend([*hop_count, *reserved]);
                out.extend(router_id);
                out.extend(prefix);
                subs
            }
            RawTlv::Unknown { body, .. } => {
                out.extend(body);
                &[][..]
            }
        };
        for s in subs {
            match s {
                RawSubTlv::Pad1 => out.push(sub::PAD1),
                RawSubTlv::PadN(n) => {
                    out.extend([sub::PADN, *n]);
                    out.extend(std::iter::repeat_n(0, *n as usize));
                }
                RawSubTlv::Other { ty, body } => {
                    let len = u8::try_from(body.len()).map_err(|_| WireError::TooLong { ty: *ty })?;
                    out.extend([*ty, len]);
                    out.extend(body);
                }
            }
        }
        let len = out.len() - start - 2;
        out[start + 1] = u8::try_from(len).map_err(|_| {
            out.truncate(start);
            WireError::TooLong { ty: t }
        })?;
        Ok(())
    }

    /// Bytes this TLV takes on the wire.
    pub fn emitted_len(&self) -> usize {
        let subs = |s: &[RawSubTlv]| s.iter().map(RawSubTlv::emitted_len).sum::<usize>();
        match self {
            RawTlv::Pad1 => 1,
            RawTlv::PadN(n) => 2 + *n as usize,
            RawTlv::AckReq { subs: s, .. } => 2 + 6 + subs(s),
            RawTlv::Ack { subs: s, .. } => 2 + 2 + subs(s),
            RawTlv::Hello { subs: s, .. } => 2 + 6 + subs(s),
            RawTlv::Ihu { addr, subs: s, .. } => 2 + 6 + addr.len() + subs(s),
            RawTlv::RouterId { subs: s, .. } => 2 + 10 + subs(s),
            RawTlv::NextHop { addr, subs: s, .. } => 2 + 2 + addr.len() + subs(s),
            RawTlv::Update { prefix, subs: s, .. } => 2 + 10 + prefix.len() + subs(s),
            RawTlv::RouteReq { prefix, subs: s, .. } => 2 + 2 + prefix.len() + subs(s),
            RawTlv::SeqnoReq { prefix, subs: s, .. } => 2 + 14 + prefix.len() + subs(s),
            RawTlv::Unknown { body, .. } => 2 + body.len(),
        }
    }
}

fn put16(out: &mut Vec<u8>, vals: &[u16]) {
    for v in vals {
        out.extend(v.to_be_bytes());
    }
}

impl RawPacket {
    /// The packet's bytes: header, TLVs, trailer.
    pub fn emit(&self) -> Result<Vec<u8>, WireError> {
        let mut out = vec![MAGIC, VERSION, 0, 0];
        for tlv in &self.tlvs {
            tlv.emit(&mut out)?;
        }
        let body = out.len() - HEADER_LEN;
        let body = u16::try_from(body).map_err(|_| WireError::PacketTooLong(body))?;
        out[2..4].copy_from_slice(&body.to_be_bytes());
        out.extend(&self.trailer);
        Ok(out)
    }
}
