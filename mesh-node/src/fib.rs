//! The forwarding table: longest-prefix match of IPv6 destinations over
//! the routes Babel selected. One hash map per prefix length in use, probed
//! from the longest: a lookup costs one hash per distinct length (a mesh
//! uses few: /64 nodes, /48 networks, ::/0 gateways).

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
// Fast, deterministic hashing of the masked addresses (they are rebuilt
// every second for allowed sources: SipHash showed in profiles).
use sixmesh_routing::core::FxMap as HashMap;

/// A longest-prefix-match table from prefixes to `V`.
#[derive(Clone, Debug)]
pub struct Fib<V> {
    by_len: BTreeMap<u8, HashMap<u128, V>>,
}

impl<V> Default for Fib<V> {
    fn default() -> Self {
        Fib { by_len: BTreeMap::new() }
    }
}

fn mask(addr: u128, len: u8) -> u128 {
    if len == 0 { 0 } else { addr & (u128::MAX << (128 - u32::from(len))) }
}

impl<V> Fib<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the value for `prefix`, returning the old one.
    pub fn insert(&mut self, prefix: Ipv6Net, v: V) -> Option<V> {
        let len = prefix.prefix_len();
        self.by_len.entry(len).or_default().insert(mask(u128::from(prefix.network()), len), v)
    }

    /// Removes `prefix`, returning its value.
    pub fn remove(&mut self, prefix: &Ipv6Net) -> Option<V> {
        let len = prefix.prefix_len();
        let m = self.by_len.get_mut(&len)?;
        let v = m.remove(&mask(u128::from(prefix.network()), len));
        if m.is_empty() {
            self.by_len.remove(&len);
        }
        v
    }

    /// The value of the longest prefix containing `addr`.
    pub fn lookup(&self, addr: Ipv6Addr) -> Option<&V> {
        let a = u128::from(addr);
        self.by_len.iter().rev().find_map(|(len, m)| m.get(&mask(a, *len)))
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.by_len.values().map(HashMap::len).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.by_len.is_empty()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.by_len.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv6Net {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut f = Fib::new();
        f.insert(net("::/0"), "default");
        f.insert(net("fd00::/16"), "mesh");
        f.insert(net("fd00:1:2:3::/64"), "node");
        assert_eq!(f.lookup("fd00:1:2:3::1".parse().unwrap()), Some(&"node"));
        assert_eq!(f.lookup("fd00:9::1".parse().unwrap()), Some(&"mesh"));
        assert_eq!(f.lookup("2001:db8::1".parse().unwrap()), Some(&"default"));
        assert_eq!(f.remove(&net("fd00::/16")), Some("mesh"));
        assert_eq!(f.lookup("fd00:9::1".parse().unwrap()), Some(&"default"));
        assert_eq!(f.len(), 2);
    }

    proptest! {
        /// Agrees with a linear scan over random tables.
        #[test]
        fn matches_linear_scan(
            entries in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..40),
            probes in proptest::collection::vec(any::<u128>(), 1..40),
        ) {
            let mut f = Fib::new();
            let mut list: Vec<Ipv6Net> = Vec::new();
            for (a, l) in entries {
                let p = Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc();
                f.insert(p, p);
                list.retain(|q| *q != p);
                list.push(p);
            }
            for probe in probes {
                // Probe near an entry half the time, to hit long prefixes.
                let addr = Ipv6Addr::from(probe);
                let want = list.iter().filter(|p| p.contains(&addr)).max_by_key(|p| p.prefix_len());
                prop_assert_eq!(f.lookup(addr), want);
                if let Some(p) = list.first() {
                    let near = p.network();
                    let want = list.iter().filter(|q| q.contains(&near)).max_by_key(|q| q.prefix_len());
                    prop_assert_eq!(f.lookup(near), want);
                }
            }
        }
    }
}
