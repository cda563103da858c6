//! The id map of one memslot set in the indexed layout (KVM's `id_hash`):
//! slot id to slot, as a two-level radix array.
//!
//! Slot ids are small (`u16`, at most [`KVM_MEM_SLOTS_NUM`](crate::KVM_MEM_SLOTS_NUM)
//! per address space) and VMMs hand them out densely from 0, so an array
//! indexed by id beats a hash table: a lookup is two dependent loads (the
//! chunk pointer, then the entry) with nothing to hash or probe, where a
//! hash table at 32k slots loads a control group, then a bucket in a 1 MiB
//! table. That matters to updates, which find the map cold (measured at 32k
//! slots: ~1900 cycles per cold `get_mut` in `hashbrown`), and the map is
//! smaller: 8 bytes per slot when ids are dense, against ~33 for the hash
//! table.
//!
//! Memory stays proportional to the slots in use: the ids are split into
//! chunks of [`CHUNK`] entries, a chunk is allocated when its first id is
//! inserted and freed when its last one is removed, and the top array ends
//! at the last chunk in use (shrinking when a quarter used). At worst (one
//! slot per chunk) that is one chunk, 1 KiB, per slot; an emptied map holds
//! nothing. Written by hand because no crate offers a sparse `u16`-keyed
//! array with this allocation policy.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Ids per chunk (a power of two).
const CHUNK: usize = 128;
const CHUNK_SHIFT: u32 = CHUNK.trailing_zeros();

struct Chunk<V> {
    entries: [Option<V>; CHUNK],
    /// Entries that are `Some` (never 0 while the chunk is in the map).
    len: usize,
}

/// Map from `u16` id to `V`, iterated in id order.
pub(crate) struct IdMap<V> {
    /// `chunks[c]` holds ids `c * CHUNK..(c + 1) * CHUNK`; the last one, if
    /// any, is `Some`.
    chunks: Vec<Option<Box<Chunk<V>>>>,
    len: usize,
}

impl<V> IdMap<V> {
    /// An empty map. Does not allocate.
    pub(crate) const fn new() -> Self {
        IdMap { chunks: Vec::new(), len: 0 }
    }

    fn split(id: u16) -> (usize, usize) {
        (usize::from(id) >> CHUNK_SHIFT, usize::from(id) & (CHUNK - 1))
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn get(&self, id: u16) -> Option<&V> {
        let (c, i) = Self::split(id);
        self.chunks.get(c)?.as_ref()?.entries[i].as_ref()
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, id: u16) -> Option<&mut V> {
        let (c, i) = Self::split(id);
        self.chunks.get_mut(c)?.as_mut()?.entries[i].as_mut()
    }

    /// Inserts `v` at `id`, returning the value that was there.
    pub(crate) fn insert(&mut self, id: u16, v: V) -> Option<V> {
        let (c, i) = Self::split(id);
        if c >= self.chunks.len() {
            self.chunks.resize_with(c + 1, || None);
        }
        let chunk = self.chunks[c].get_or_insert_with(|| Box::new(Chunk { entries: [const { None }; CHUNK], len: 0 }));
        let old = chunk.entries[i].replace(v);
        if old.is_none() {
            chunk.len += 1;
            self.len += 1;
        }
        old
    }

    /// Removes the value at `id`, freeing its chunk if that was the chunk's last.
    pub(crate) fn remove(&mut self, id: u16) -> Option<V> {
        let (c, i) = Self::split(id);
        let chunk = self.chunks.get_mut(c)?.as_mut()?;
        let old = chunk.entries[i].take()?;
        chunk.len -= 1;
        self.len -= 1;
        if chunk.len == 0 {
            self.chunks[c] = None;
            while self.chunks.last().is_some_and(Option::is_none) {
                self.chunks.pop();
            }
            if self.chunks.is_empty() {
                self.chunks = Vec::new();
            } else if self.chunks.len() < self.chunks.capacity() / 4 {
                // Amortised O(1): shrinking at least halves.
                self.chunks.shrink_to(self.chunks.len() * 2);
            }
        }
        Some(old)
    }

    /// Prefetches the entry of `id` and its chunk's count (its chunk
    /// pointer is loaded).
    pub(crate) fn prefetch(&self, id: u16) {
        let (c, i) = Self::split(id);
        if let Some(Some(chunk)) = self.chunks.get(c) {
            crate::prefetch::prefetch(core::ptr::from_ref(&chunk.entries[i]).cast(), 8);
            crate::prefetch::prefetch(core::ptr::from_ref(&chunk.len).cast(), 8);
        }
    }

    /// The values, in id order.
    pub(crate) fn values(&self) -> Values<'_, V> {
        Values { chunks: self.chunks.iter(), entries: [].iter() }
    }

    /// Heap bytes held (the top array and the chunks).
    pub(crate) fn heap_bytes(&self) -> usize {
        let chunks = self.chunks.iter().filter(|c| c.is_some()).count();
        self.chunks.capacity() * core::mem::size_of::<Option<Box<Chunk<V>>>>()
            + chunks * core::mem::size_of::<Chunk<V>>()
    }
}

/// Iterator over an [`IdMap`]'s values in id order.
pub(crate) struct Values<'a, V> {
    chunks: core::slice::Iter<'a, Option<Box<Chunk<V>>>>,
    entries: core::slice::Iter<'a, Option<V>>,
}

impl<'a, V> Iterator for Values<'a, V> {
    type Item = &'a V;
    fn next(&mut self) -> Option<&'a V> {
        loop {
            if let Some(v) = self.entries.by_ref().flatten().next() {
                return Some(v);
            }
            self.entries = self.chunks.by_ref().flatten().next()?.entries.iter();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    fn check(map: &IdMap<u32>, model: &BTreeMap<u16, u32>) -> Result<(), TestCaseError> {
        prop_assert_eq!(map.len(), model.len());
        let got: Vec<u32> = map.values().copied().collect();
        let want: Vec<u32> = model.values().copied().collect();
        prop_assert_eq!(got, want, "values in id order");
        // The top array ends at the last chunk in use; chunks in use only.
        let last_chunk = model.keys().next_back().map_or(0, |&id| usize::from(id) / CHUNK + 1);
        prop_assert_eq!(map.chunks.len(), last_chunk);
        prop_assert!(map.chunks.capacity() <= 4 * last_chunk.max(1) || last_chunk == 0 && map.chunks.capacity() == 0);
        for (c, chunk) in map.chunks.iter().enumerate() {
            let used = model.keys().filter(|&&id| usize::from(id) / CHUNK == c).count();
            prop_assert_eq!(chunk.as_ref().map_or(0, |ch| ch.len), used, "chunk {}", c);
        }
        if model.is_empty() {
            prop_assert_eq!(map.heap_bytes(), 0);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_btreemap(ops in proptest::collection::vec((any::<bool>(), prop_oneof![0u16..300, any::<u16>()], any::<u32>()), 1..800)) {
            let mut map = IdMap::new();
            let mut model = BTreeMap::new();
            for (insert, id, v) in ops {
                if insert {
                    prop_assert_eq!(map.insert(id, v), model.insert(id, v));
                } else {
                    prop_assert_eq!(map.remove(id), model.remove(&id));
                }
                prop_assert_eq!(map.get(id), model.get(&id));
                if let Some(x) = map.get_mut(id) {
                    *x ^= 1;
                    *model.get_mut(&id).unwrap() ^= 1;
                }
                check(&map, &model)?;
            }
            for id in model.keys().copied().collect::<Vec<_>>() {
                prop_assert_eq!(map.remove(id), model.remove(&id));
            }
            check(&map, &model)?;
        }
    }

    #[test]
    fn dense_ids_cost_eight_bytes_each() {
        let mut map = IdMap::new();
        for id in 0..32000u16 {
            map.insert(id, Box::new(id));
        }
        let per = map.heap_bytes() as f64 / 32000.0;
        assert!(per <= 8.5, "{per} bytes per id");
        assert_eq!(map.get(u16::MAX), None);
        assert_eq!(map.get(31999).map(|b| **b), Some(31999));
    }
}
