//! Block ranges discarded or zeroed in the cache but not yet on the backing device: reads of a
//! block here return zeroes unless the block map has a newer copy.
//!
//! Each range remembers the segment that logged it; when writeback frees that segment, the
//! backing device has been zeroed there and the range is dropped. Ranges never overlap: a newer
//! range replaces the overlapped parts of older ones, so each piece names its newest segment.
//! Whole blocks only: partial-block edges of a discard are logged as data writes of zeroes.

use std::collections::BTreeMap;

#[derive(Default)]
pub struct ZeroRanges {
    /// start block → (end block exclusive, segment id)
    ranges: BTreeMap<u64, (u64, u64)>,
}

impl ZeroRanges {
    pub fn insert(&mut self, start: u64, end: u64, segment_id: u64) {
        assert!(start < end);
        self.cut(start, end);
        self.ranges.insert(start, (end, segment_id));
    }

    /// Removes `[start, end)` from every range, splitting the ones that straddle it.
    fn cut(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, (u64, u64))> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (e, id)) in overlapping {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, (start, id));
            }
            if e > end {
                self.ranges.insert(end, (e, id));
            }
        }
    }

    pub fn contains(&self, block: u64) -> bool {
        self.ranges
            .range(..=block)
            .next_back()
            .is_some_and(|(_, (end, _))| *end > block)
    }

    /// Drops the ranges logged by segments up to `segment_id` (now on the backing device).
    pub fn release_through(&mut self, segment_id: u64) {
        self.ranges.retain(|_, (_, id)| *id > segment_id);
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_per_block_model(ops in proptest::collection::vec((0u64..100, 1u64..30, 1u64..20, any::<bool>()), 1..200)) {
            let mut ranges = ZeroRanges::default();
            let mut model: Vec<Option<u64>> = vec![None; 140];
            let mut id = 0;
            for (start, len, release, is_release) in ops {
                if is_release {
                    ranges.release_through(release);
                    for m in model.iter_mut() { if m.is_some_and(|x| x <= release) { *m = None; } }
                } else {
                    id += 1;
                    ranges.insert(start, start + len, id);
                    for m in &mut model[start as usize..(start + len) as usize] { *m = Some(id); }
                }
                for (b, m) in model.iter().enumerate() {
                    prop_assert_eq!(ranges.contains(b as u64), m.is_some(), "block {}", b);
                }
            }
        }
    }
}
