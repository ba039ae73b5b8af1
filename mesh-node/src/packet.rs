//! Just enough IPv6 for the node's user-space forwarding: read the fixed
//! header, and build the IPv6/UDP datagrams that carry Babel inside a
//! tunnel (link-local addresses, port 6696, with the UDP checksum).

use std::net::Ipv6Addr;

/// Length of the fixed IPv6 header.
pub const IPV6_HEADER: usize = 40;
/// IPv6 next-header value of UDP.
pub const NEXT_UDP: u8 = 17;

/// A view of an IPv6 packet's fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Header {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
    /// Payload length from the header (checked against the packet).
    pub payload_len: usize,
}

/// Why a packet is not usable IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("shorter than an IPv6 header")]
    Short,
    #[error("not IPv6 (version {0})")]
    NotIpv6(u8),
    #[error("payload length {claimed} but {present} bytes present")]
    Length { claimed: usize, present: usize },
}

/// Parses the fixed IPv6 header of `p`.
pub fn parse_ipv6(p: &[u8]) -> Result<Ipv6Header, PacketError> {
    if p.len() < IPV6_HEADER {
        return Err(PacketError::Short);
    }
    if p[0] >> 4 != 6 {
        return Err(PacketError::NotIpv6(p[0] >> 4));
    }
    let payload_len = u16::from_be_bytes([p[4], p[5]]) as usize;
    if payload_len > p.len() - IPV6_HEADER {
        return Err(PacketError::Length { claimed: payload_len, present: p.len() - IPV6_HEADER });
    }
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).expect("16 bytes"));
    Ok(Ipv6Header { src: addr(8), dst: addr(24), next_header: p[6], hop_limit: p[7], payload_len })
}

/// If `p` is an IPv6/UDP datagram without extension headers to
/// `port`, its UDP payload.
pub fn udp_payload<'a>(p: &'a [u8], h: &Ipv6Header, port: u16) -> Option<&'a [u8]> {
    if h.next_header != NEXT_UDP || h.payload_len < 8 {
        return None;
    }
    let udp = &p[IPV6_HEADER..IPV6_HEADER + h.payload_len];
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if dport != port || len < 8 || len > udp.len() {
        return None;
    }
    Some(&udp[8..len])
}

/// Adds `bytes` to a ones'-complement sum of 16-bit words taken in the
/// machine's byte order (RFC 1071: the sum is the same either way, byte-
/// swapped; [`checksum`] swaps it back), four bytes at a time into 64 bits:
/// 2^16 ≡ 1 modulo 0xffff, so wider words fold to the same sum, and the
/// loop vectorises (a full update is ~600 words, and every Babel datagram
/// is summed twice). Every call but the last must have an even length.
fn checksum_add(sum: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(4);
    let body: u64 =
        (&mut chunks).map(|c| u64::from(u32::from_ne_bytes(c.try_into().expect("4 bytes")))).sum();
    // The last one to three bytes, padded with zeros as the odd byte is.
    let mut last = [0u8; 4];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    sum + body + u64::from(u32::from_ne_bytes(last))
}

/// The ones'-complement sum of a UDP datagram's pseudo-header and `udp`
/// (UDP header and payload), folded and complemented, in network order.
fn checksum(src: Ipv6Addr, dst: Ipv6Addr, udp: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo[39] = NEXT_UDP;
    let mut sum = checksum_add(checksum_add(0, &pseudo), udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let folded = !(sum as u16);
    // Summed in the machine's order: its bytes are the wire's.
    u16::from_be_bytes(folded.to_ne_bytes())
}

/// The IPv6 and UDP headers of a datagram from `src` to `dst`, both ports
/// `port`, hop limit `hops`, around `len` bytes of payload; checksum zero.
fn udp_headers(src: Ipv6Addr, dst: Ipv6Addr, port: u16, hops: u8, len: usize) -> [u8; IPV6_HEADER + 8] {
    let udp_len = (8 + len) as u16;
    let mut h = [0u8; IPV6_HEADER + 8];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&udp_len.to_be_bytes());
    h[6] = NEXT_UDP;
    h[7] = hops;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h[40..42].copy_from_slice(&port.to_be_bytes());
    h[42..44].copy_from_slice(&port.to_be_bytes());
    h[44..46].copy_from_slice(&udp_len.to_be_bytes());
    h
}

/// Fills in the UDP checksum of a datagram `udp_headers` began.
fn set_udp_checksum(p: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr) {
    let c = match checksum(src, dst, &p[IPV6_HEADER..]) {
        0 => 0xffff,
        c => c,
    };
    p[IPV6_HEADER + 6..IPV6_HEADER + 8].copy_from_slice(&c.to_be_bytes());
}

/// Builds an IPv6/UDP datagram from `src` to `dst`, both ports `port`,
/// hop limit `hops`, with a correct UDP checksum.
pub fn build_udp(src: Ipv6Addr, dst: Ipv6Addr, port: u16, hops: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(IPV6_HEADER + 8 + payload.len());
    p.extend(udp_headers(src, dst, port, hops, payload.len()));
    p.extend(payload);
    set_udp_checksum(&mut p, src, dst);
    p
}

/// [`build_udp`] around a payload it takes: the headers go in front of it
/// in its own buffer, which needs no new allocation when it has 48 bytes
/// of spare capacity (Babel's datagrams are built with them).
pub fn wrap_udp(src: Ipv6Addr, dst: Ipv6Addr, port: u16, hops: u8, mut payload: Vec<u8>) -> Vec<u8> {
    let n = payload.len();
    let headers = udp_headers(src, dst, port, hops, n);
    payload.resize(n + headers.len(), 0);
    payload.copy_within(..n, headers.len());
    payload[..headers.len()].copy_from_slice(&headers);
    set_udp_checksum(&mut payload, src, dst);
    payload
}

/// Whether the UDP checksum of an IPv6/UDP datagram is right.
pub fn udp_checksum_ok(p: &[u8], h: &Ipv6Header) -> bool {
    checksum(h.src, h.dst, &p[IPV6_HEADER..IPV6_HEADER + h.payload_len]) == 0
}

/// Decrements the hop limit in place; false when it reached zero (drop).
pub fn decrement_hop_limit(p: &mut [u8]) -> bool {
    if p.len() < IPV6_HEADER || p[7] <= 1 {
        return false;
    }
    p[7] -= 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn udp_round_trip_with_valid_checksum() {
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let dst: Ipv6Addr = "ff02::1:6".parse().unwrap();
        let p = build_udp(src, dst, 6696, 1, b"babel!");
        let h = parse_ipv6(&p).unwrap();
        assert_eq!((h.src, h.dst, h.hop_limit, h.next_header), (src, dst, 1, NEXT_UDP));
        assert_eq!(udp_payload(&p, &h, 6696), Some(&b"babel!"[..]));
        assert_eq!(udp_payload(&p, &h, 53), None);
        assert!(udp_checksum_ok(&p, &h));
        let mut bad = p.clone();
        bad[IPV6_HEADER + 9] ^= 1;
        assert!(!udp_checksum_ok(&bad, &parse_ipv6(&bad).unwrap()));
    }

    #[test]
    fn checksum_matches_a_known_value() {
        // Computed independently (Python, RFC 1071) for this exact datagram.
        let p =
            build_udp("fe80::1".parse().unwrap(), "fe80::2".parse().unwrap(), 6696, 1, &[0x2a, 0x02, 0, 0]);
        assert_eq!(u16::from_be_bytes([p[46], p[47]]), 0xa47f);
    }

    #[test]
    fn bad_packets_are_errors() {
        assert_eq!(parse_ipv6(&[0x60; 10]), Err(PacketError::Short));
        let mut p = build_udp(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 1, 64, b"x");
        p[0] = 0x45;
        assert_eq!(parse_ipv6(&p), Err(PacketError::NotIpv6(4)));
        p[0] = 0x60;
        p[5] = 200;
        assert!(matches!(parse_ipv6(&p), Err(PacketError::Length { .. })));
        let mut q = build_udp(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 1, 2, b"x");
        assert!(decrement_hop_limit(&mut q));
        assert!(!decrement_hop_limit(&mut q));
    }

    /// RFC 1071, one 16-bit word at a time.
    fn reference_checksum(src: Ipv6Addr, dst: Ipv6Addr, udp: &[u8]) -> u16 {
        let mut bytes = [src.octets(), dst.octets()].concat();
        bytes.extend((udp.len() as u32).to_be_bytes());
        bytes.extend([0, 0, 0, NEXT_UDP]);
        bytes.extend(udp);
        let mut sum: u32 = 0;
        for c in bytes.chunks(2) {
            sum += u32::from(c[0]) << 8 | u32::from(c.get(1).copied().unwrap_or(0));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    proptest! {
        #[test]
        fn wide_checksum_agrees_with_the_word_by_word_one(
            payload in proptest::collection::vec(any::<u8>(), 0..1300),
            spare in 0usize..64,
            a in any::<u128>(),
            b in any::<u128>(),
        ) {
            let (src, dst) = (Ipv6Addr::from(a), Ipv6Addr::from(b));
            let built = build_udp(src, dst, 6696, 1, &payload);
            let mut buf = Vec::with_capacity(payload.len() + spare);
            buf.extend(&payload);
            prop_assert_eq!(&wrap_udp(src, dst, 6696, 1, buf), &built);
            let mut zeroed = built.clone();
            zeroed[IPV6_HEADER + 6..IPV6_HEADER + 8].fill(0);
            let want = match reference_checksum(src, dst, &zeroed[IPV6_HEADER..]) { 0 => 0xffff, c => c };
            prop_assert_eq!(u16::from_be_bytes([built[46], built[47]]), want);
            prop_assert!(udp_checksum_ok(&built, &parse_ipv6(&built).unwrap()));
            // One flipped bit moves the sum by 2^k, never 0 modulo 0xffff.
            if !payload.is_empty() {
                let mut bad = built.clone();
                bad[IPV6_HEADER + 8 + a as usize % payload.len()] ^= 1 << (b % 8);
                prop_assert!(!udp_checksum_ok(&bad, &parse_ipv6(&bad).unwrap()));
            }
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(h) = parse_ipv6(&bytes) {
                let _ = udp_payload(&bytes, &h, 6696);
                if h.next_header == NEXT_UDP { let _ = udp_checksum_ok(&bytes, &h); }
            }
        }
    }
}
