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

fn checksum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds an IPv6/UDP datagram from `src` to `dst`, both ports `port`,
/// hop limit `hops`, with a correct UDP checksum.
pub fn build_udp(src: Ipv6Addr, dst: Ipv6Addr, port: u16, hops: u8, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = Vec::with_capacity(IPV6_HEADER + udp_len);
    p.extend([0x60, 0, 0, 0]);
    p.extend((udp_len as u16).to_be_bytes());
    p.extend([NEXT_UDP, hops]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(port.to_be_bytes());
    p.extend(port.to_be_bytes());
    p.extend((udp_len as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    // Pseudo-header: addresses, length, next header.
    let mut sum = checksum_add(0, &src.octets());
    sum = checksum_add(sum, &dst.octets());
    sum += udp_len as u32 + u32::from(NEXT_UDP);
    sum = checksum_add(sum, &p[IPV6_HEADER..]);
    let mut c = fold(sum);
    if c == 0 {
        c = 0xffff;
    }
    p[IPV6_HEADER + 6..IPV6_HEADER + 8].copy_from_slice(&c.to_be_bytes());
    p
}

/// Whether the UDP checksum of an IPv6/UDP datagram is right.
pub fn udp_checksum_ok(p: &[u8], h: &Ipv6Header) -> bool {
    let udp = &p[IPV6_HEADER..IPV6_HEADER + h.payload_len];
    let mut sum = checksum_add(0, &h.src.octets());
    sum = checksum_add(sum, &h.dst.octets());
    sum += h.payload_len as u32 + u32::from(NEXT_UDP);
    sum = checksum_add(sum, udp);
    fold(sum) == 0
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

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(h) = parse_ipv6(&bytes) {
                let _ = udp_payload(&bytes, &h, 6696);
                if h.next_header == NEXT_UDP { let _ = udp_checksum_ok(&bytes, &h); }
            }
        }
    }
}
