//! The route table: each destination's [`Slot`] by its key, in an
//! open-addressed table (linear probing, at most half full) whose bucket
//! for a key follows from the key's hash alone. So a packet's updates can
//! have their buckets fetched from memory all at once, before any is looked
//! up ([`RouteTable::prefetch`]): in a hash map, finding the bucket is
//! itself a cache miss (the control bytes) before the bucket's own, and
//! the updates of a datagram waited for them one after the other.

use std::hash::BuildHasher;
use std::ops::Index;

use super::RouteKey;
use super::fxhash::FxBuildHasher;
use super::prefetch;
use super::tables::Slot;

type Bucket = Option<(RouteKey, Slot)>;

/// Destinations' slots by key. Iterates in bucket order, which depends
/// only on what was inserted and removed, in what order.
#[derive(Debug, Default)]
pub(super) struct RouteTable {
    buckets: Vec<Bucket>,
    len: usize,
}

impl RouteTable {
    /// The bucket a key is looked for first.
    fn home(&self, key: &RouteKey) -> usize {
        let h = FxBuildHasher::default().hash_one(key);
        // The high bits of a Fibonacci multiple: every bit of the hash
        // counts, whatever the table's size.
        let bits = self.buckets.len().trailing_zeros();
        (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    fn find(&self, key: &RouteKey) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut i = self.home(key);
        loop {
            match &self.buckets[i] {
                None => return None,
                Some((k, _)) if k == key => return Some(i),
                Some(_) => i = (i + 1) & self.mask(),
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, key: &RouteKey) -> Option<&Slot> {
        self.find(key).and_then(|i| self.buckets[i].as_ref()).map(|(_, s)| s)
    }

    pub fn get_mut(&mut self, key: &RouteKey) -> Option<&mut Slot> {
        let i = self.find(key)?;
        self.buckets[i].as_mut().map(|(_, s)| s)
    }

    /// The slot of `key`, made by `make` if there was none (then `true`).
    pub fn get_or_insert_with(&mut self, key: RouteKey, make: impl FnOnce() -> Slot) -> (&mut Slot, bool) {
        let (i, added) = match self.find(&key) {
            Some(i) => (i, false),
            None => {
                if (self.len + 1) * 2 > self.buckets.len() {
                    self.grow();
                }
                let mut i = self.home(&key);
                while self.buckets[i].is_some() {
                    i = (i + 1) & self.mask();
                }
                self.buckets[i] = Some((key, make()));
                self.len += 1;
                (i, true)
            }
        };
        (&mut self.buckets[i].as_mut().expect("occupied").1, added)
    }

    /// Removes `key`'s slot; the entries after it in its run move back, so
    /// that no lookup stops short of them.
    pub fn remove(&mut self, key: &RouteKey) -> Option<Slot> {
        let mut hole = self.find(key)?;
        let (_, slot) = self.buckets[hole].take().expect("found");
        self.len -= 1;
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let Some((k, _)) = &self.buckets[j] else { break };
            let home = self.home(k);
            // It stays if its home lies cyclically in (hole, j].
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.buckets[hole] = self.buckets[j].take();
                hole = j;
            }
        }
        Some(slot)
    }

    pub fn iter(&self) -> Iter<'_> {
        self.buckets.iter().flatten().map(|(k, s)| (k, s))
    }

    pub fn values(&self) -> impl Iterator<Item = &Slot> {
        self.iter().map(|(_, s)| s)
    }

    /// Starts loading the bucket `key` is looked for first (nearly always
    /// where it is): no waiting, nothing read.
    pub fn prefetch(&self, key: &RouteKey) {
        if self.buckets.is_empty() {
            return;
        }
        let b = self.buckets.as_ptr().wrapping_add(self.home(key)).cast::<u8>();
        let mut off = 0;
        while off < size_of::<Bucket>() {
            prefetch(b.wrapping_add(off));
            off += 64;
        }
    }

    fn grow(&mut self) {
        let cap = (self.buckets.len() * 2).max(16);
        let old = std::mem::replace(&mut self.buckets, (0..cap).map(|_| None).collect());
        for (k, s) in old.into_iter().flatten() {
            let mut i = self.home(&k);
            while self.buckets[i].is_some() {
                i = (i + 1) & self.mask();
            }
            self.buckets[i] = Some((k, s));
        }
    }
}

impl Index<&RouteKey> for RouteTable {
    type Output = Slot;

    fn index(&self, key: &RouteKey) -> &Slot {
        self.get(key).expect("no slot for this key")
    }
}

/// The iterator of [`RouteTable::iter`].
pub(super) type Iter<'a> = std::iter::Map<
    std::iter::Flatten<std::slice::Iter<'a, Bucket>>,
    fn(&'a (RouteKey, Slot)) -> (&'a RouteKey, &'a Slot),
>;

impl<'a> IntoIterator for &'a RouteTable {
    type Item = (&'a RouteKey, &'a Slot);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn key(i: u16) -> RouteKey {
        (format!("2001:db8:{i:x}::/48").parse().unwrap(), None)
    }

    proptest! {
        /// Any mix of inserts and removals leaves what a map would, and
        /// every key stays reachable (removal closes the gaps it makes).
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((any::<bool>(), 0u16..300), 0..600)) {
            let mut t = RouteTable::default();
            let mut m: BTreeMap<u16, usize> = BTreeMap::new();
            for (insert, i) in ops {
                if insert {
                    let (s, added) = t.get_or_insert_with(key(i), || Slot::with_room(usize::from(i % 7)));
                    prop_assert_eq!(added, !m.contains_key(&i));
                    if added {
                        m.insert(i, usize::from(i % 7));
                    }
                    prop_assert!(s.entries.capacity() >= m[&i]);
                } else {
                    prop_assert_eq!(t.remove(&key(i)).is_some(), m.remove(&i).is_some());
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for i in 0..300 {
                prop_assert_eq!(t.get(&key(i)).is_some(), m.contains_key(&i), "key {}", i);
            }
            let mut seen: Vec<RouteKey> = t.iter().map(|(k, _)| *k).collect();
            seen.sort();
            let mut want: Vec<RouteKey> = m.keys().map(|i| key(*i)).collect();
            want.sort();
            prop_assert_eq!(seen, want);
            prop_assert!(t.buckets.is_empty() || t.len() * 2 <= t.buckets.len());
        }
    }
}
