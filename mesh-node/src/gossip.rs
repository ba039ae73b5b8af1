//! Messages between tunnel neighbours, inside the tunnel (link-local UDP,
//! port [`crate::node::GOSSIP_PORT`]): asking for another node's endpoints,
//! answering with its certificate and endpoints (the certificate makes the
//! answer checkable: the key comes from the CA, not from the neighbour), and
//! telling the network-config version (re6st's scheme: a node that hears
//! of a newer version fetches it from the registry).
//!
//! ```text
//! 1 WantPeer       | plen u8 | prefix 16 bytes
//! 2 Peer           | count u8 | count × (4 ip4 port | 6 ip6 port) | certificate DER
//! 3 ConfigVersion  | version u64
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::Ipv6Net;

/// Most endpoints in one peer record.
pub const MAX_ENDPOINTS: usize = 8;
/// Largest certificate carried.
pub const MAX_CERT: usize = 1200;

/// A gossip message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gossip {
    /// "Do you know how to reach this node?"
    WantPeer { prefix: Ipv6Net },
    /// A node's certificate and where it can be reached.
    Peer { endpoints: Vec<SocketAddr>, cert_der: Vec<u8> },
    /// The sender's network-config version.
    ConfigVersion(u64),
}

/// A message that does not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GossipError {
    #[error("empty message")]
    Empty,
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("truncated message")]
    Truncated,
    #[error("invalid field")]
    Invalid,
}

impl Gossip {
    /// Parses a message; never panics.
    pub fn parse(b: &[u8]) -> Result<Self, GossipError> {
        let (&t, rest) = b.split_first().ok_or(GossipError::Empty)?;
        match t {
            1 => {
                if rest.len() != 17 {
                    return Err(GossipError::Truncated);
                }
                let addr =
                    Ipv6Addr::from(<[u8; 16]>::try_from(&rest[1..17]).map_err(|_| GossipError::Truncated)?);
                let prefix = Ipv6Net::new(addr, rest[0]).map_err(|_| GossipError::Invalid)?;
                Ok(Gossip::WantPeer { prefix: prefix.trunc() })
            }
            2 => {
                let (&n, mut r) = rest.split_first().ok_or(GossipError::Truncated)?;
                if n as usize > MAX_ENDPOINTS {
                    return Err(GossipError::Invalid);
                }
                let mut endpoints = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let (&fam, tail) = r.split_first().ok_or(GossipError::Truncated)?;
                    let len = match fam {
                        4 => 4,
                        6 => 16,
                        _ => return Err(GossipError::Invalid),
                    };
                    if tail.len() < len + 2 {
                        return Err(GossipError::Truncated);
                    }
                    let ip = if len == 4 {
                        IpAddr::V4(Ipv4Addr::new(tail[0], tail[1], tail[2], tail[3]))
                    } else {
                        IpAddr::V6(Ipv6Addr::from(
                            <[u8; 16]>::try_from(&tail[..16]).map_err(|_| GossipError::Truncated)?,
                        ))
                    };
                    let port = u16::from_be_bytes([tail[len], tail[len + 1]]);
                    endpoints.push(SocketAddr::new(ip, port));
                    r = &tail[len + 2..];
                }
                if r.is_empty() || r.len() > MAX_CERT {
                    return Err(GossipError::Invalid);
                }
                Ok(Gossip::Peer { endpoints, cert_der: r.to_vec() })
            }
            3 => {
                let v: [u8; 8] = rest.try_into().map_err(|_| GossipError::Truncated)?;
                Ok(Gossip::ConfigVersion(u64::from_be_bytes(v)))
            }
            t => Err(GossipError::UnknownType(t)),
        }
    }

    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Gossip::WantPeer { prefix } => {
                let mut v = vec![1, prefix.prefix_len()];
                v.extend(prefix.network().octets());
                v
            }
            Gossip::Peer { endpoints, cert_der } => {
                let eps = &endpoints[..endpoints.len().min(MAX_ENDPOINTS)];
                let mut v = vec![2, eps.len() as u8];
                for e in eps {
                    match e.ip() {
                        IpAddr::V4(a) => {
                            v.push(4);
                            v.extend(a.octets());
                        }
                        IpAddr::V6(a) => {
                            v.push(6);
                            v.extend(a.octets());
                        }
                    }
                    v.extend(e.port().to_be_bytes());
                }
                v.extend(cert_der);
                v
            }
            Gossip::ConfigVersion(n) => {
                let mut v = vec![3];
                v.extend(n.to_be_bytes());
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_gossip() -> impl Strategy<Value = Gossip> {
        let ep = prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((a, p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::from((Ipv6Addr::from(a), p))),
        ];
        prop_oneof![
            (any::<u128>(), 0u8..=128).prop_map(|(a, l)| Gossip::WantPeer {
                prefix: Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc()
            }),
            (
                proptest::collection::vec(ep, 0..=MAX_ENDPOINTS),
                proptest::collection::vec(any::<u8>(), 1..=MAX_CERT)
            )
                .prop_map(|(endpoints, cert_der)| Gossip::Peer { endpoints, cert_der }),
            any::<u64>().prop_map(Gossip::ConfigVersion),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(g in arb_gossip()) {
            prop_assert_eq!(Gossip::parse(&g.encode()), Ok(g));
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Gossip::parse(&b);
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        assert_eq!(Gossip::parse(&[]), Err(GossipError::Empty));
        assert_eq!(Gossip::parse(&[9]), Err(GossipError::UnknownType(9)));
        assert_eq!(Gossip::parse(&[1, 64]), Err(GossipError::Truncated));
        assert_eq!(Gossip::parse(&[2, 9]), Err(GossipError::Invalid), "too many endpoints");
        assert_eq!(Gossip::parse(&[2, 0]), Err(GossipError::Invalid), "no certificate");
        assert_eq!(Gossip::parse(&[3, 0, 0]), Err(GossipError::Truncated));
    }
}
