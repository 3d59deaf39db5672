//! The block map: backing block number → location of its newest copy in the cache.
//!
//! Memory budget (CONTRACT §8): at most 16 bytes per cached 4 KiB block. The table is sized once, at
//! start-up, for every data block the cache can hold (a block has at most one live newest copy,
//! so it can never hold more keys than that): 12 bytes per bucket (8-byte key, 4-byte location)
//! at a load factor of at most 4/5 is 15 bytes per cached block, leaving room under the budget
//! for the per-segment state. Open addressing with linear
//! probing and backward-shift deletion, so there are no tombstones and no growth on the hot path.
//!
//! Invariant (owned by the engine, asserted there): a block's location only ever moves to a newer
//! copy, and an entry is removed by writeback only while it still points into the segment being
//! freed.

/// Location of a cached block: `slot * SLOT_BLOCKS + block`, its ring slot and the block of the
/// slot it sits in (`Geometry::location`). 4 bytes per bucket keep the map within its budget.
pub type Location = u32;

/// The most ring slots a `Location` can address: 2^25 slots of 512 KiB, a 16 TiB leg. `format`
/// uses no more of a larger leg, and a superblock with more is refused.
pub const MAX_SLOTS: u64 = (Location::MAX as u64 + 1) / logfmt::SLOT_BLOCKS as u64;

const EMPTY: u64 = u64::MAX;

/// One bucket: key and location side by side, so a probe touches one cache line.
#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Bucket {
    block: u64,
    location: Location,
}

const _: () = assert!(std::mem::size_of::<Bucket>() == 12);

pub struct BlockMap {
    buckets: Vec<Bucket>,
    len: usize,
    max_len: usize,
}

impl BlockMap {
    /// A map able to hold `max_len` blocks.
    pub fn with_capacity(max_len: usize) -> BlockMap {
        let buckets = (max_len * 5).div_ceil(4).max(8);
        BlockMap {
            buckets: vec![
                Bucket {
                    block: EMPTY,
                    location: 0
                };
                buckets
            ],
            len: 0,
            max_len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the table occupies.
    pub fn memory_bytes(&self) -> usize {
        self.buckets.len() * std::mem::size_of::<Bucket>()
    }

    fn home(&self, block: u64) -> usize {
        // Fibonacci hashing, then a multiply-shift range reduction (no modulo, any table size).
        let h = block.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ((h as u128 * self.buckets.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.buckets.len() {
            0
        } else {
            i + 1
        }
    }

    fn find(&self, block: u64) -> Result<usize, usize> {
        let mut i = self.home(block);
        loop {
            let k = self.buckets[i].block;
            if k == EMPTY {
                return Err(i);
            }
            if k == block {
                return Ok(i);
            }
            i = self.next(i);
        }
    }

    pub fn get(&self, block: u64) -> Option<Location> {
        self.find(block).ok().map(|i| self.buckets[i].location)
    }

    /// Inserts or replaces; returns the previous location.
    pub fn insert(&mut self, block: u64, location: Location) -> Option<Location> {
        assert!(block != EMPTY);
        match self.find(block) {
            Ok(i) => {
                let old = self.buckets[i].location;
                self.buckets[i].location = location;
                Some(old)
            }
            Err(i) => {
                assert!(self.len < self.max_len, "block map over capacity");
                self.buckets[i] = Bucket { block, location };
                self.len += 1;
                None
            }
        }
    }

    /// Removes `block` only if it still maps to `location` (writeback freeing a segment must not
    /// drop a newer copy written meanwhile).
    pub fn remove_if(&mut self, block: u64, location: Location) -> bool {
        match self.find(block) {
            Ok(i) if self.buckets[i].location == location => {
                self.remove_at(i);
                true
            }
            _ => false,
        }
    }

    pub fn remove(&mut self, block: u64) -> Option<Location> {
        let i = self.find(block).ok()?;
        let location = self.buckets[i].location;
        self.remove_at(i);
        Some(location)
    }

    /// Removes every block in `[start, end)`, choosing whichever is cheaper: probing each block
    /// or scanning the table (a whole-device discard covers far more blocks than the cache).
    pub fn remove_range(&mut self, start: u64, end: u64) {
        if end.saturating_sub(start) <= self.buckets.len() as u64 {
            for block in start..end {
                self.remove(block);
            }
            return;
        }
        let mut i = 0;
        while i < self.buckets.len() {
            let k = self.buckets[i].block;
            if k != EMPTY && k >= start && k < end {
                // The shift may move an unvisited key into i: look at i again.
                self.remove_at(i);
            } else {
                i += 1;
            }
        }
    }

    fn remove_at(&mut self, mut hole: usize) {
        // Backward-shift deletion: pull later members of the probe run into the hole so that
        // every key stays reachable from its home bucket without tombstones.
        let mut i = self.next(hole);
        while self.buckets[i].block != EMPTY {
            let home = self.home(self.buckets[i].block);
            let distance_home_to_i = (i + self.buckets.len() - home) % self.buckets.len();
            let distance_home_to_hole = (hole + self.buckets.len() - home) % self.buckets.len();
            if distance_home_to_hole <= distance_home_to_i {
                self.buckets[hole] = self.buckets[i];
                hole = i;
            }
            i = self.next(i);
        }
        self.buckets[hole].block = EMPTY;
        self.len -= 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, Location)> + '_ {
        self.buckets
            .iter()
            .map(|b| (b.block, b.location))
            .filter(|(k, _)| *k != EMPTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        #[test]
        fn behaves_like_a_hashmap(ops in proptest::collection::vec((0u8..4, 0u64..200, any::<u32>()), 1..2000)) {
            let mut map = BlockMap::with_capacity(200);
            let mut model = HashMap::new();
            for (op, block, loc) in ops {
                match op {
                    0 | 1 => { prop_assert_eq!(map.insert(block, loc), model.insert(block, loc)); }
                    2 => {
                        let expect = model.get(&block) == Some(&loc);
                        if expect { model.remove(&block); }
                        prop_assert_eq!(map.remove_if(block, loc), expect);
                    }
                    _ => {
                        let end = block + (loc % 50) as u64;
                        map.remove_range(block, end);
                        model.retain(|k, _| *k < block || *k >= end);
                    }
                }
                prop_assert_eq!(map.len(), model.len());
            }
            for (k, v) in &model { prop_assert_eq!(map.get(*k), Some(*v)); }
            prop_assert_eq!(map.iter().count(), model.len());
        }
    }

    #[test]
    fn whole_table_scan_removal() {
        let mut map = BlockMap::with_capacity(100);
        for b in 0..100u64 {
            map.insert(b * 1000, b as u32);
        }
        map.remove_range(10_000, u64::MAX - 1);
        assert_eq!(map.len(), 10);
        assert!((0..10).all(|b| map.get(b * 1000) == Some(b as u32)));
    }

    #[test]
    fn memory_within_sixteen_bytes_per_block() {
        let map = BlockMap::with_capacity(127 * 8192);
        assert!(map.memory_bytes() as f64 / (127.0 * 8192.0) <= 15.0);
    }
}
