//! A map for the router's small integer ids (interfaces, neighbours).

use std::ops::Index;

use super::fxhash::FxMap;

/// Values by `u32` id. Ids below [`IdMap::DIRECT`] index a vector: a lookup
/// is one load, where a hash probe read the control bytes and then the
/// bucket (two cache misses for every packet, in a large mesh's
/// simulation). Larger ids (an operating system's interface index, say)
/// go to a hash map. Iteration is in id order.
#[derive(Clone, Debug)]
pub(super) struct IdMap<V> {
    direct: Vec<Option<V>>,
    far: FxMap<u32, V>,
    len: usize,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        IdMap { direct: Vec::new(), far: FxMap::default(), len: 0 }
    }
}

impl<V> IdMap<V> {
    /// Ids below this are stored in place.
    pub const DIRECT: u32 = 1024;

    pub fn get(&self, id: &u32) -> Option<&V> {
        if *id < Self::DIRECT {
            self.direct.get(*id as usize).and_then(Option::as_ref)
        } else {
            self.far.get(id)
        }
    }

    pub fn get_mut(&mut self, id: &u32) -> Option<&mut V> {
        if *id < Self::DIRECT {
            self.direct.get_mut(*id as usize).and_then(Option::as_mut)
        } else {
            self.far.get_mut(id)
        }
    }

    /// Starts loading `id`'s value, if it is stored in place (no waiting,
    /// nothing read).
    pub fn prefetch(&self, id: u32) {
        if (id as usize) < self.direct.len() {
            let p = self.direct.as_ptr().wrapping_add(id as usize).cast::<u8>();
            let mut off = 0;
            while off < size_of::<Option<V>>() {
                super::prefetch(p.wrapping_add(off));
                off += 64;
            }
        }
    }

    pub fn contains_key(&self, id: &u32) -> bool {
        self.get(id).is_some()
    }

    /// Sets `id`'s value, giving back the one it replaces.
    pub fn insert(&mut self, id: u32, v: V) -> Option<V> {
        let old = if id < Self::DIRECT {
            let i = id as usize;
            if self.direct.len() <= i {
                self.direct.resize_with(i + 1, || None);
            }
            self.direct[i].replace(v)
        } else {
            self.far.insert(id, v)
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, id: &u32) -> Option<V> {
        let old = if *id < Self::DIRECT {
            let old = self.direct.get_mut(*id as usize).and_then(Option::take);
            while self.direct.last().is_some_and(Option::is_none) {
                self.direct.pop();
            }
            old
        } else {
            self.far.remove(id)
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The lowest id without a value.
    pub fn vacant_id(&self) -> u32 {
        self.direct.iter().position(Option::is_none).unwrap_or(self.direct.len()) as u32
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// (id, value) in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &V)> + '_ {
        let mut far: Vec<(u32, &V)> = self.far.iter().map(|(k, v)| (*k, v)).collect();
        far.sort_unstable_by_key(|(k, _)| *k);
        self.direct.iter().enumerate().filter_map(|(i, v)| v.as_ref().map(|v| (i as u32, v))).chain(far)
    }

    pub fn keys(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, v)| v)
    }
}

impl<V> Index<&u32> for IdMap<V> {
    type Output = V;

    fn index(&self, id: &u32) -> &V {
        self.get(id).expect("no value for this id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_ids_behave_like_a_map() {
        let mut m = IdMap::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x = 7u64;
        for step in 0..5000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = match x >> 62 {
                0 => (x >> 32) as u32 % 8,
                1 => (x >> 32) as u32 % 40,
                2 => IdMap::<u32>::DIRECT - 2 + (x >> 32) as u32 % 4,
                _ => (x >> 32) as u32,
            };
            if x & 4 == 0 {
                assert_eq!(m.insert(id, step), model.insert(id, step));
            } else {
                assert_eq!(m.remove(&id), model.remove(&id));
            }
            assert_eq!(m.len(), model.len());
            assert_eq!(m.get(&id), model.get(&id));
            let v = m.vacant_id();
            assert!(!m.contains_key(&v) && (0..v).all(|i| m.contains_key(&i)));
        }
        let ours: Vec<(u32, u32)> = m.iter().map(|(k, v)| (k, *v)).collect();
        let theirs: Vec<(u32, u32)> = model.into_iter().collect();
        assert_eq!(ours, theirs);
    }
}
