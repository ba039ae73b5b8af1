//! IPv6 network and node prefixes, and their binary-string form.
//!
//! Like re6st, the allocator names a node prefix by its bits *relative to the
//! network prefix*, as a string of `'0'`/`'1'` (e.g. `"0000000000000001"` is
//! the second /64 of a /48). [`Network`] converts between that form, the
//! textual IPv6 prefix and re6st's `"<int>/<len>"` certificate CN.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Shortest network prefix accepted by `registry init`.
pub const MIN_NETWORK_LEN: u8 = 16;
/// Longest network prefix accepted by `registry init`.
pub const MAX_NETWORK_LEN: u8 = 56;

/// An IPv6 prefix: address (host bits zero) and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv6Prefix {
    /// The address with all host bits cleared.
    pub addr: Ipv6Addr,
    /// The prefix length, 0..=128.
    pub len: u8,
}

fn mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

impl Ipv6Prefix {
    /// Builds a prefix; fails if host bits are set or `len > 128`.
    pub fn new(addr: Ipv6Addr, len: u8) -> Result<Self> {
        if len > 128 {
            return Err(Error::BadRequest(format!("prefix length /{len} is longer than 128")));
        }
        if u128::from(addr) & !mask(len) != 0 {
            return Err(Error::BadRequest(format!(
                "{addr}/{len} has host bits set: did you mean {}/{len}?",
                Ipv6Addr::from(u128::from(addr) & mask(len))
            )));
        }
        Ok(Ipv6Prefix { addr, len })
    }

    /// Whether `self` and `other` share any address.
    pub fn overlaps(&self, other: &Ipv6Prefix) -> bool {
        let l = self.len.min(other.len);
        u128::from(self.addr) & mask(l) == u128::from(other.addr) & mask(l)
    }

    /// Whether `addr` is inside this prefix.
    pub fn contains(&self, addr: Ipv6Addr) -> bool {
        u128::from(addr) & mask(self.len) == u128::from(self.addr)
    }

    /// The first host address (`prefix::1`): a node's mesh address.
    pub fn first_host(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) | 1)
    }
}

impl fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv6Prefix {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| Error::BadRequest(format!("{s:?} is not an IPv6 prefix like fd00:1:2::/48")))?;
        let addr: Ipv6Addr =
            a.parse().map_err(|_| Error::BadRequest(format!("{a:?} is not an IPv6 address")))?;
        let len: u8 = l.parse().map_err(|_| Error::BadRequest(format!("{l:?} is not a prefix length")))?;
        Ipv6Prefix::new(addr, len)
    }
}

/// The network prefix of a registry and the default node prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The whole network, e.g. `fd12:3456:789a::/48`.
    pub prefix: Ipv6Prefix,
}

impl Network {
    /// Checks that the network prefix length is within /16../56.
    pub fn new(prefix: Ipv6Prefix) -> Result<Self> {
        if !(MIN_NETWORK_LEN..=MAX_NETWORK_LEN).contains(&prefix.len) {
            return Err(Error::BadRequest(format!(
                "network prefix /{} is not accepted: use a length from /{MIN_NETWORK_LEN} to /{MAX_NETWORK_LEN}",
                prefix.len
            )));
        }
        Ok(Network { prefix })
    }

    /// A random unique-local (`fd00::/8`, RFC 4193) /48.
    pub fn random_ula() -> Self {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut b[1..6]);
        Network { prefix: Ipv6Prefix { addr: Ipv6Addr::from(b), len: 48 } }
    }

    /// Checks a node prefix length (absolute) for this network.
    pub fn check_node_len(&self, len: u8) -> Result<()> {
        if len <= self.prefix.len || len > 128 {
            return Err(Error::BadRequest(format!(
                "node prefix length /{len} must be longer than the network's /{} and at most /128",
                self.prefix.len
            )));
        }
        Ok(())
    }

    /// The IPv6 prefix named by `bits` (relative to the network).
    pub fn prefix_of(&self, bits: &str) -> Result<Ipv6Prefix> {
        let n = bits.len();
        if n + usize::from(self.prefix.len) > 128 || !bits.bytes().all(|b| b == b'0' || b == b'1') {
            return Err(Error::Internal(format!("invalid prefix bits {bits:?}")));
        }
        let mut v = u128::from(self.prefix.addr);
        for (i, b) in bits.bytes().enumerate() {
            if b == b'1' {
                v |= 1u128 << (127 - usize::from(self.prefix.len) - i);
            }
        }
        Ok(Ipv6Prefix { addr: Ipv6Addr::from(v), len: self.prefix.len + n as u8 })
    }

    /// The bits (relative to the network) of a prefix inside the network.
    pub fn bits_of(&self, p: &Ipv6Prefix) -> Result<String> {
        if p.len < self.prefix.len || !self.prefix.contains(p.addr) {
            return Err(Error::BadRequest(format!("{p} is not inside the network {}", self.prefix)));
        }
        let v = u128::from(p.addr);
        Ok((self.prefix.len..p.len)
            .map(|i| if v >> (127 - u32::from(i)) & 1 == 1 { '1' } else { '0' })
            .collect())
    }

    /// re6st's certificate CN for a node prefix: `"<bits as integer>/<number of bits>"`.
    pub fn re6st_cn(bits: &str) -> String {
        let v = bits.bytes().fold(0u128, |acc, b| (acc << 1) | u128::from(b == b'1'));
        format!("{v}/{}", bits.len())
    }

    /// Parses re6st's `"<int>/<len>"` form back into bits.
    pub fn bits_from_re6st_cn(cn: &str) -> Option<String> {
        let (v, l) = cn.split_once('/')?;
        let v: u128 = v.parse().ok()?;
        let l: u32 = l.parse().ok()?;
        if l == 0 || l > 112 || (l < 128 && v >> l != 0) {
            return None;
        }
        Some((0..l).rev().map(|i| if v >> i & 1 == 1 { '1' } else { '0' }).collect())
    }

    /// re6st encodes the network prefix in the CA certificate's serial
    /// number: binary `1` followed by the network bits. Big-endian bytes.
    pub fn re6st_ca_serial(&self) -> Vec<u8> {
        let len = u32::from(self.prefix.len);
        let v: u128 = (1u128 << len) | (u128::from(self.prefix.addr) >> (128 - len));
        let bytes = v.to_be_bytes();
        let first = bytes.iter().position(|&b| b != 0).unwrap_or(15);
        bytes[first..].to_vec()
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.prefix.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> Network {
        Network::new("2001:db8:42::/48".parse().unwrap()).unwrap()
    }

    #[test]
    fn parses_and_rejects_host_bits() {
        assert!("2001:db8:42::1/48".parse::<Ipv6Prefix>().is_err());
        assert!("2001:db8:42::/129".parse::<Ipv6Prefix>().is_err());
        assert!("nonsense".parse::<Ipv6Prefix>().is_err());
        assert_eq!("2001:db8:42::/48".parse::<Ipv6Prefix>().unwrap().len, 48);
        assert!(Network::new("2001:db8::/64".parse().unwrap()).is_err());
        assert!(Network::new("2000::/8".parse().unwrap()).is_err());
    }

    #[test]
    fn bits_round_trip_and_mesh_address() {
        let n = net();
        let p = n.prefix_of("0000000000000001").unwrap();
        assert_eq!(p.to_string(), "2001:db8:42:1::/64");
        assert_eq!(p.first_host().to_string(), "2001:db8:42:1::1");
        assert_eq!(n.bits_of(&p).unwrap(), "0000000000000001");
        assert_eq!(n.prefix_of("").unwrap(), n.prefix);
        assert!(n.bits_of(&"2001:db8:43::/64".parse().unwrap()).is_err());
    }

    #[test]
    fn re6st_encodings_match_the_reference() {
        // reference §1.1: 2001:db8:42::/48 -> serial 0x120010db80042
        assert_eq!(net().re6st_ca_serial(), vec![0x01, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x42]);
        // reference §1.5: second node of a /48 with 16-bit prefixes -> CN "1/16"
        assert_eq!(Network::re6st_cn("0000000000000001"), "1/16");
        assert_eq!(Network::re6st_cn("0000000000000000"), "0/16");
        assert_eq!(Network::bits_from_re6st_cn("1/16").unwrap(), "0000000000000001");
        assert_eq!(Network::bits_from_re6st_cn("65536/16"), None);
    }

    #[test]
    fn overlap() {
        let a: Ipv6Prefix = "fd00:1::/32".parse().unwrap();
        let b: Ipv6Prefix = "fd00:1:2::/48".parse().unwrap();
        let c: Ipv6Prefix = "fd00:2::/32".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }

    #[test]
    fn random_ula_is_a_ula_48() {
        let n = Network::random_ula();
        assert_eq!(n.prefix.len, 48);
        assert_eq!(n.prefix.addr.octets()[0], 0xfd);
        assert_eq!(u128::from(n.prefix.addr) & !mask(48), 0);
    }
}
