//! A small, fast, deterministic hasher for the router's tables (the
//! algorithm of rustc's `FxHasher`). The keys are prefixes, router-ids and
//! small integers that peers cannot choose freely enough to make a
//! difference to a Babel router, and the tables are hashed on every
//! update: SipHash was a quarter of the router's time in large meshes. It
//! also makes iteration order the same in every run.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` with [`FxHasher`].
pub type FxMap<K, V> = HashMap<K, V, FxBuildHasher>;

/// Builds [`FxHasher`]s (for `HashMap::with_hasher` and friends).
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

/// rustc's Fx hash: rotate, xor, multiply, per word. Not resistant to
/// chosen keys: for tables whose keys peers cannot pick freely.
#[derive(Clone, Copy, Debug, Default)]
pub struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn equal_keys_hash_equal_and_different_ones_spread() {
        let b = BuildHasherDefault::<FxHasher>::default();
        let h = |x: &(u32, [u8; 11])| b.hash_one(x);
        assert_eq!(h(&(1, [7; 11])), h(&(1, [7; 11])));
        let hashes: std::collections::HashSet<u64> = (0..1000u32).map(|i| h(&(i, [0; 11]))).collect();
        assert_eq!(hashes.len(), 1000);
        // The top 7 bits (hashbrown's control bytes) vary too.
        let tops: std::collections::HashSet<u64> = (0..1000u32).map(|i| h(&(i, [0; 11])) >> 57).collect();
        assert!(tops.len() > 64, "{}", tops.len());
    }
}
