//! The engine's state under its one lock: the ring of slots, where every live segment sits, the
//! open segment, the id counters (sealed, written, durable, written back), the block map, and
//! the counters `status` reports. `State::check_invariants` asserts the order of the ids and the
//! placement of the newest segments after every change of them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use logfmt::{Entry, Position, MAX_ENTRIES_PER_SEGMENT, SLOT_BLOCKS};

use crate::control::Counters;
use crate::error::{EngineError, Result};
use crate::map::block_map::{BlockMap, Location};
use crate::map::zero_ranges::ZeroRanges;

/// One ring slot as the engine tracks it. A slot is in use from the first segment placed in it
/// until writeback has freed every segment in it; only then may the log wrap into it again.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// The first and last segment placed in the slot (0 when the slot is free). Its segments
    /// have consecutive ids.
    pub first_id: u64,
    pub last_id: u64,
    /// The slot's RAM buffer: it holds the slot's segments from `buffer_block` on, until the slot
    /// is closed (the log moved on to another slot) and all of them are on every leg.
    pub buffer: Option<usize>,
    pub buffer_block: u32,
    /// Readers reading data of the slot from a leg; writeback may not free it before they finish.
    pub readers: u32,
}

impl Slot {
    pub fn in_use(&self) -> bool {
        self.first_id != 0
    }
    /// Whether slot block `block` is read from the RAM buffer rather than a leg.
    pub fn buffered(&self, block: u32) -> Option<usize> {
        self.buffer.filter(|_| block >= self.buffer_block)
    }
}

/// Where a live segment (not yet written back) sits, and what it uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placed {
    pub position: Position,
    /// Bytes of the segment that hold something (`SegmentHeader::used_bytes`), once sealed (0
    /// while open): writeback reads a segment in one I/O of this length, and the next segment
    /// starts right behind it.
    pub used_bytes: usize,
    pub sealed_at: Option<Instant>,
}

pub(crate) struct OpenSegment {
    pub id: u64,
    pub position: Position,
    /// The RAM buffer of the open segment's slot.
    pub buffer: usize,
    pub epoch_id: u64,
    pub entries: Vec<Entry>,
    /// Block → index of its data entry, for rewrites in place. Cleared by a range entry: a
    /// write after a discard must be logged after it, not folded into an earlier entry.
    pub rewritable: RewriteIndex,
    pub used_data_slots: u128,
    pub opened_at: Instant,
}

/// Block → entry index within the open segment: a fixed open-addressing table, because it is
/// probed on every write and a general hash map costs more than the rest of the write path.
pub(crate) struct RewriteIndex {
    keys: [u64; REWRITE_INDEX_BUCKETS],
    entries: [u8; REWRITE_INDEX_BUCKETS],
    len: usize,
}

/// Twice the entries a segment can hold, so probes stay short.
const REWRITE_INDEX_BUCKETS: usize = 512;
const NO_BLOCK: u64 = u64::MAX;
const _: () = assert!(MAX_ENTRIES_PER_SEGMENT * 2 <= REWRITE_INDEX_BUCKETS);
const _: () = assert!(MAX_ENTRIES_PER_SEGMENT <= u8::MAX as usize);

impl RewriteIndex {
    pub(super) fn new() -> Self {
        RewriteIndex {
            keys: [NO_BLOCK; REWRITE_INDEX_BUCKETS],
            entries: [0; REWRITE_INDEX_BUCKETS],
            len: 0,
        }
    }
    fn bucket(block: u64) -> usize {
        (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 55) as usize
    }
    pub(super) fn get(&self, block: u64) -> Option<usize> {
        let mut i = Self::bucket(block);
        loop {
            match self.keys[i] {
                NO_BLOCK => return None,
                k if k == block => return Some(self.entries[i] as usize),
                _ => i = (i + 1) % REWRITE_INDEX_BUCKETS,
            }
        }
    }
    pub(super) fn insert(&mut self, block: u64, entry: usize) {
        let mut i = Self::bucket(block);
        while self.keys[i] != NO_BLOCK && self.keys[i] != block {
            i = (i + 1) % REWRITE_INDEX_BUCKETS;
        }
        if self.keys[i] == NO_BLOCK {
            assert!(self.len < MAX_ENTRIES_PER_SEGMENT);
            self.len += 1;
        }
        self.keys[i] = block;
        self.entries[i] = entry as u8;
    }
    pub(super) fn clear(&mut self) {
        if self.len > 0 {
            self.keys.fill(NO_BLOCK);
            self.len = 0;
        }
    }
}

impl OpenSegment {
    /// The lowest free data slot within the segment's capacity (the rest of its slot).
    pub(super) fn free_data_slot(&self) -> Option<usize> {
        let capacity = self.position.data_capacity();
        let free = !self.used_data_slots & ((1u128 << capacity) - 1);
        (free != 0).then(|| free.trailing_zeros() as usize)
    }
    /// The slot block of data slot `data_slot`.
    pub(super) fn block_of(&self, data_slot: usize) -> u32 {
        self.position.block + 1 + data_slot as u32
    }
    pub(super) fn has_room_for_entry(&self) -> bool {
        self.entries.len() < MAX_ENTRIES_PER_SEGMENT
    }
}

pub(crate) struct State {
    pub open: Option<OpenSegment>,
    pub next_segment_id: u64,
    pub epoch_id: u64,
    pub sealed_id: u64,
    pub written_id: u64,
    pub durable_id: u64,
    pub written_back_id: u64,
    pub written_back_epoch: u64,
    pub checkpoint_sequence: u64,
    pub leg_written: Vec<u64>,
    pub leg_durable: Vec<u64>,
    /// Where each live segment sits: ids `written_back_id + 1 ..next_segment_id` (the open one
    /// included), oldest first (`placed`).
    pub live: VecDeque<Placed>,
    /// Where the open segment is, or where the next one will be placed (`Position::next` of the
    /// newest sealed one): the log's write position.
    pub place: Position,
    /// Bytes the sealed live segments occupy (`log_bytes`).
    pub sealed_log_bytes: u64,
    /// Record CRC of the header of segment `written_back_id` (the checkpoint's anchor); `None`
    /// after a cache loss reset the log past segments the log writer may still be sealing (then
    /// `Shared::chain` knows it).
    pub anchor_crc: Option<u32>,
    pub map: BlockMap,
    /// Sector-valid masks of the (rare) copies that do not hold a whole block, by location.
    pub partial: HashMap<Location, u8>,
    pub zeros: ZeroRanges,
    pub slots: Vec<Slot>,
    pub free_buffers: Vec<usize>,
    /// Writers waiting for a ring slot, i.e. for writeback (not those waiting for a RAM buffer).
    pub writers_waiting: usize,
    pub drain_requested: bool,
    pub shutting_down: bool,
    /// Degraded and (almost) clean: no new segment is opened until writeback catches up, then
    /// the engine goes to passthrough (see `mode`).
    pub closing_log: bool,
    /// `replace`s of healthy legs under way: the log closes for passthrough as if degraded, so
    /// the cache is clean before the leg is swapped, while the leg stays in use (taking it out
    /// at once would leave the cache on one leg, or none, for the whole drain).
    pub replacing_legs: u32,
    /// Requests go straight to the backing device (a leg is missing and the cache is clean, or
    /// every leg is lost).
    pub passthrough: bool,
    /// Every leg was lost: what the backing device holds, and the log that is gone.
    pub cache_lost: Option<logfmt::CacheLost>,
    /// Dirty blocks the loss took (known only to the engine that saw it happen).
    pub lost_dirty_blocks: Option<u64>,
    /// Bumped when every leg is lost: FLUSHes waiting at that moment fail, and so does a FUA
    /// write logged before it.
    pub lost_generation: u64,
    /// Every write in a segment up to this id was covered by a FLUSH that succeeded.
    pub flushed_id: u64,
    /// A cache loss took acknowledged writes no FLUSH had covered: the next FLUSH fails.
    pub flush_error_owed: bool,
    /// Writes and zeroings logged so far; a FLUSH covers those logged before it was issued.
    pub logged_writes: u64,
    /// Every write counted in `logged_writes` up to this many lies in sealed segments: a FLUSH
    /// that covers no more need not seal the open segment.
    pub writes_sealed: u64,
    /// Every write counted up to this many lies in an epoch that has ended.
    pub epoch_ended_writes: u64,
    /// The logged writes the newest FLUSH (or FUA write) covered: the write after them is
    /// likely a sync writer's, whose FLUSH follows (`Shared::seal_if_sync_writer`).
    pub flush_mark: u64,
    /// The newest segment sealed by a FLUSH (group commit): while it is not durable, a FLUSH that
    /// needs the open segment sealed waits for it, and then one seal serves every such waiter.
    pub commit_target: u64,
    /// `logged_writes` at the loss: a FLUSH that covers this many has reported the loss.
    pub lost_writes_mark: u64,
    /// The fault record as it is durably recorded (`faults`).
    pub faults_recorded: logfmt::Faults,
    /// Each leg's current device (`Superblock::leg_incarnation`); `replace_leg` advances it.
    pub leg_incarnations: [u32; 2],
    /// Why the last attempt to record a change of the fault record failed: FLUSHes that wait
    /// for it fail with this instead of waiting (cleared when a record succeeds).
    pub fault_record_error: Option<String>,
}

impl State {
    /// The order of the ids (engine invariants, `engine` module): writeback works only on
    /// segments on every leg, a leg's flush covers only what it wrote, ids are sealed before
    /// they are written, and a FLUSH covers only segments durable somewhere. Called after every
    /// change of them.
    pub(crate) fn check_invariants(&self) {
        let ids = || {
            format!(
                "written_back {}, durable {}, written {}, sealed {}, next {}, flushed {}",
                self.written_back_id,
                self.durable_id,
                self.written_id,
                self.sealed_id,
                self.next_segment_id,
                self.flushed_id
            )
        };
        assert!(
            self.written_back_id <= self.written_id,
            "written_back_id ≤ written_id: {}",
            ids()
        );
        assert!(
            self.durable_id <= self.written_id,
            "durable_id ≤ written_id: {}",
            ids()
        );
        assert!(
            self.written_id <= self.sealed_id,
            "written_id ≤ sealed_id: {}",
            ids()
        );
        assert!(
            self.sealed_id < self.next_segment_id,
            "sealed_id < next_segment_id: {}",
            ids()
        );
        assert!(
            self.flushed_id <= self.durable_id.max(self.written_back_id),
            "flushed_id ≤ max(durable_id, written_back_id): {}",
            ids()
        );
        assert_eq!(
            self.live.len() as u64,
            self.next_segment_id - 1 - self.written_back_id,
            "one placement per live segment: {}",
            ids()
        );
        self.check_newest_placement();
    }

    /// Placement (FORMAT.md §1), checked on the newest segments, where it changes: a segment
    /// never crosses the end of its slot, and each one starts where the one before it ends
    /// (`Position::next`), up to the write position. O(1): called after every change of the ids.
    fn check_newest_placement(&self) {
        let n = self.slots.len() as u64;
        let sealed = self.sealed_id - self.written_back_id;
        let open = self.live.len() as u64 - sealed;
        if sealed == 0 {
            return;
        }
        let newest = self.live[sealed as usize - 1];
        let used_blocks = newest.used_bytes / logfmt::BLOCK_SIZE_BYTES;
        assert!(
            used_blocks >= 1 && newest.position.block as usize + used_blocks <= SLOT_BLOCKS,
            "segment {} at {:?} uses {used_blocks} blocks: it crosses its slot",
            self.sealed_id,
            newest.position
        );
        let after = newest.position.next(used_blocks, n);
        let follows = if open == 1 {
            self.live[sealed as usize].position
        } else {
            self.place
        };
        assert_eq!(
            after, follows,
            "the segment after {} does not start where it ends",
            self.sealed_id
        );
    }

    /// Where live segment `id` sits.
    pub fn placed(&self, id: u64) -> &Placed {
        assert!(
            id > self.written_back_id && id < self.next_segment_id,
            "segment {id} is not live (written back through {}, next {})",
            self.written_back_id,
            self.next_segment_id
        );
        &self.live[(id - self.written_back_id - 1) as usize]
    }

    pub fn placed_mut(&mut self, id: u64) -> &mut Placed {
        let index = (id - self.written_back_id - 1) as usize;
        &mut self.live[index]
    }

    /// The live segment holding slot block `block` of slot `slot` (a data block a map entry
    /// points to): the newest segment of the slot starting before it.
    pub fn segment_at(&self, slot: u64, block: u32) -> (u64, Position) {
        let s = &self.slots[slot as usize];
        assert!(s.in_use(), "slot {slot} holds no segment");
        let first = s.first_id.max(self.written_back_id + 1);
        // A map entry points only into live segments: an abandoned open segment may leave a
        // slot's ids all written back, but then nothing maps into the slot.
        assert!(
            s.last_id >= first,
            "slot {slot}: its segments through {} are written back (through {})",
            s.last_id,
            self.written_back_id
        );
        let ids = first..=s.last_id;
        let start = (first - self.written_back_id - 1) as usize;
        let count = (s.last_id + 1 - first) as usize;
        let (a, b) = self.live.as_slices();
        // Positions grow along the slot: the last segment starting at or before `block`.
        let index = partition(a, b, start, count, |p| p.position.block <= block);
        assert!(
            index > 0,
            "block {block} of slot {slot} precedes its live segments {ids:?}"
        );
        let id = first + index as u64 - 1;
        (id, self.placed(id).position)
    }

    /// Bytes the live segments occupy in the log (headers and data blocks up to the highest
    /// used; the open one as far as it is used now).
    pub fn log_bytes(&self) -> u64 {
        let open = self.open.as_ref().map_or(0, |o| {
            let top = 128 - o.used_data_slots.leading_zeros() as u64;
            (1 + top) * logfmt::BLOCK_SIZE_BYTES as u64
        });
        self.sealed_log_bytes + open
    }

    /// Slots in use (holding a segment not yet written back). Live segments follow one another
    /// around the ring, so they span the slots from the oldest one's to the newest one's (never
    /// a whole lap and more: the log does not enter a slot in use at its block 0).
    pub fn slots_in_use(&self) -> u64 {
        let n = self.slots.len() as u64;
        match (self.live.front(), self.live.back()) {
            (Some(first), Some(last)) => (last.position.slot + n - first.position.slot) % n + 1,
            _ => 0,
        }
    }

    /// The checkpoint's view of the log: where segment `written_back_id + 1` starts, and the
    /// anchor, if known (`anchor_crc`).
    pub fn next_after_written_back(&self) -> Position {
        self.live.front().map_or(self.place, |p| p.position)
    }

    /// Every leg was lost and the loss is not on record yet: no passthrough write may reach the
    /// backing device and no leg may be attached before it is (`mode`).
    pub(crate) fn loss_unrecorded(&self) -> bool {
        self.cache_lost.is_some() && self.faults_recorded.cache_lost.is_none()
    }

    /// The error of a FLUSH (or a write held for passthrough) that a record it waits for could
    /// not be written for (`fault_record_error`; the sync thread retries the record, and the
    /// reason goes once it succeeds).
    pub(crate) fn unrecorded_failure(&self) -> Option<String> {
        self.fault_record_error
            .as_ref()
            .map(|why| format!("a cache leg failed and its failure cannot be recorded: {why}"))
    }

    /// Fails once the engine is stopping.
    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        Ok(())
    }

    /// Admits a request to the log: fails as `check_alive`, and reroutes it
    /// (`EngineError::Passthrough`) to the backing device while the log is out of use.
    pub(crate) fn admit_to_log(&self) -> Result<()> {
        self.check_alive()?;
        if self.passthrough {
            return Err(EngineError::Passthrough);
        }
        Ok(())
    }

    /// When the oldest sealed segment that writeback has not passed was sealed, or `None` when
    /// every sealed segment is written back. Writeback frees segments in id order, so that is
    /// segment `written_back_id + 1`; its slot keeps the time (a segment found at start-up
    /// counts from the engine's start, so its age is a lower bound).
    pub fn oldest_sealed_at(&self) -> Option<Instant> {
        let oldest = self.written_back_id + 1;
        if oldest > self.sealed_id {
            return None;
        }
        let placed = self.placed(oldest);
        debug_assert!(
            placed.sealed_at.is_some(),
            "a sealed segment has a seal time"
        );
        placed.sealed_at
    }

    /// When the oldest data not yet written back entered the cache: the oldest sealed segment's
    /// seal time, else the open segment's opening when it holds anything (a writer opens a
    /// segment just before logging into it). `None` when nothing waits for writeback.
    pub fn oldest_dirty_since(&self) -> Option<Instant> {
        self.oldest_sealed_at().or_else(|| {
            self.open
                .as_ref()
                .filter(|o| !o.entries.is_empty())
                .map(|o| o.opened_at)
        })
    }
}

/// How many of the `count` placements from index `start` of a deque (given as its two slices)
/// satisfy `pred`, which holds for a prefix of them (a binary search).
fn partition(
    a: &[Placed],
    b: &[Placed],
    start: usize,
    count: usize,
    pred: impl Fn(&Placed) -> bool,
) -> usize {
    let at = |i: usize| {
        let i = start + i;
        if i < a.len() {
            &a[i]
        } else {
            &b[i - a.len()]
        }
    };
    let (mut lo, mut hi) = (0, count);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(at(mid)) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[derive(Default)]
pub struct Stats {
    // Each field is named once more in `counters!` below.
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub stall_ns: AtomicU64,
    pub written_back_bytes: AtomicU64,
    pub written_back_segments: AtomicU64,
    pub backing_write_ios: AtomicU64,
    pub backing_errors: AtomicU64,
    pub partial_merges: AtomicU64,
    pub passthrough_writes: AtomicU64,
    pub writeback_errors: AtomicU64,
}

/// Applies `$m!(field)` to every counter of `Stats` (and of `control::Counters`, its image).
macro_rules! counters {
    ($m:ident) => {
        $m!(writes);
        $m!(write_bytes);
        $m!(reads);
        $m!(read_hits);
        $m!(read_misses);
        $m!(flushes);
        $m!(discards);
        $m!(stall_ns);
        $m!(written_back_bytes);
        $m!(written_back_segments);
        $m!(backing_write_ios);
        $m!(backing_errors);
        $m!(partial_merges);
        $m!(passthrough_writes);
        $m!(writeback_errors);
    };
}

impl Stats {
    /// The counters as they stand.
    pub fn snapshot(&self) -> Counters {
        let mut c = Counters::default();
        macro_rules! take {
            ($f:ident) => {
                c.$f = self.$f.load(Ordering::Relaxed)
            };
        }
        counters!(take);
        c
    }

    /// Goes on from `base` (a predecessor's final counters): each counter grows by it.
    pub fn continue_from(&self, base: &Counters) {
        macro_rules! add {
            ($f:ident) => {
                self.$f.fetch_add(base.$f, Ordering::Relaxed)
            };
        }
        counters!(add);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use logfmt::{Entry, Position, Superblock};

    use super::{OpenSegment, Placed, RewriteIndex, State};
    use crate::engine::replay::Recovered;

    fn state() -> State {
        let sb = Superblock {
            uuid: [1; 16],
            backing_size_bytes: 1 << 30,
            backing_fingerprint: [2; 16],
            logical_block_size: 4096,
            segment_count: 16,
            leg_count: 2,
            leg_index: 0,
            created_unix_secs: 0,
            leg_incarnation: 0,
        };
        State::recovered(
            Recovered::empty(&sb, 5, Position { slot: 2, block: 7 }, 0),
            2,
            4,
        )
    }

    #[test]
    fn a_recovered_state_keeps_the_id_order() {
        let s = state();
        assert_eq!(
            (s.written_back_id, s.written_id, s.next_segment_id),
            (5, 5, 6)
        );
        s.check_invariants();
    }

    /// Writeback may only take segments that are on every leg.
    #[test]
    fn counters_go_on_from_a_predecessors() {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = super::Stats::default();
        stats.writes.fetch_add(3, Relaxed);
        stats.writeback_errors.fetch_add(1, Relaxed);
        let base = crate::control::Counters {
            writes: 10,
            stall_ns: 5,
            writeback_errors: 2,
            ..Default::default()
        };
        stats.continue_from(&base);
        let c = stats.snapshot();
        assert_eq!(
            (c.writes, c.stall_ns, c.writeback_errors, c.reads),
            (13, 5, 3, 0)
        );
        // Every counter is carried: a snapshot fed back doubles each one.
        stats.continue_from(&c);
        let d = stats.snapshot();
        assert_eq!((d.writes, d.stall_ns, d.writeback_errors), (26, 10, 6));
    }

    #[test]
    #[should_panic(expected = "written_back_id ≤ written_id")]
    fn writeback_past_the_written_log_is_caught() {
        let mut s = state();
        s.written_back_id = s.written_id + 1;
        s.check_invariants();
    }

    /// Opens segment `id` at the write position, as `Shared::open_at` does.
    fn open(s: &mut State, opened_at: Instant) {
        let (id, at) = (s.next_segment_id, s.place);
        s.live.push_back(Placed {
            position: at,
            used_bytes: 0,
            sealed_at: None,
        });
        let slot = &mut s.slots[at.slot as usize];
        if !slot.in_use() {
            slot.first_id = id;
        }
        slot.last_id = id;
        s.open = Some(OpenSegment {
            id,
            position: at,
            buffer: 0,
            epoch_id: s.epoch_id,
            entries: Vec::new(),
            rewritable: RewriteIndex::new(),
            used_data_slots: 0,
            opened_at,
        });
        s.next_segment_id += 1;
    }

    /// Seals the open segment with `blocks` blocks used, as `Shared::seal` does.
    fn seal(s: &mut State, blocks: usize, sealed_at: Instant) {
        let open = s.open.take().unwrap();
        s.sealed_id = open.id;
        s.place = open.position.next(blocks, 16);
        let placed = s.placed_mut(open.id);
        placed.used_bytes = blocks * logfmt::BLOCK_SIZE_BYTES;
        placed.sealed_at = Some(sealed_at);
        (s.written_id, s.durable_id) = (open.id, open.id);
    }

    /// The oldest dirty data is the oldest sealed segment writeback has not passed, else the
    /// open segment once it holds something; nothing once writeback passed everything.
    #[test]
    fn the_oldest_dirty_data_is_the_oldest_segment_not_written_back() {
        let mut s = state();
        assert_eq!(s.oldest_dirty_since(), None, "a clean cache");
        let opened = Instant::now();
        open(&mut s, opened);
        assert_eq!(
            s.oldest_dirty_since(),
            None,
            "an empty open segment holds nothing"
        );
        s.open
            .as_mut()
            .unwrap()
            .entries
            .push(Entry::data(9, 0, 0xff, 0));
        assert_eq!(s.oldest_dirty_since(), Some(opened));

        // Sealed: the seal time counts from now on, and a later open segment does not.
        let sealed = opened + Duration::from_secs(1);
        seal(&mut s, 2, sealed);
        s.check_invariants();
        assert_eq!(s.oldest_sealed_at(), Some(sealed));
        assert_eq!(s.oldest_dirty_since(), Some(sealed));

        s.written_back_id = 6;
        s.live.pop_front();
        s.check_invariants();
        assert_eq!(s.oldest_dirty_since(), None, "written back");
    }

    /// Segments follow one another in their slot; the block of a map entry finds its segment.
    #[test]
    fn packed_segments_are_found_by_their_blocks() {
        let mut s = state();
        let now = Instant::now();
        for blocks in [2, 5, 1, 3] {
            open(&mut s, now);
            seal(&mut s, blocks, now);
            s.check_invariants();
        }
        // 6 at block 7 (2 blocks), 7 at 9 (5), 8 at 14 (1), 9 at 15 (3); all in slot 2.
        assert_eq!(s.place, Position { slot: 2, block: 18 });
        let at = |block| Position { slot: 2, block };
        assert_eq!(s.segment_at(2, 8), (6, at(7)));
        assert_eq!(s.segment_at(2, 10), (7, at(9)));
        assert_eq!(s.segment_at(2, 13), (7, at(9)));
        assert_eq!(s.segment_at(2, 17), (9, at(15)));
        assert_eq!(s.slots_in_use(), 1);
        assert_eq!((s.slots[2].first_id, s.slots[2].last_id), (6, 9));
    }

    /// A segment that does not start where the one before it ends is caught.
    #[test]
    #[should_panic(expected = "does not start where it ends")]
    fn a_misplaced_segment_is_caught() {
        let mut s = state();
        let now = Instant::now();
        open(&mut s, now);
        seal(&mut s, 2, now);
        s.place.block += 1;
        s.check_invariants();
    }

    #[test]
    #[should_panic(expected = "durable_id ≤ written_id")]
    fn a_durable_id_past_the_written_log_is_caught() {
        let mut s = state();
        s.durable_id = s.written_id + 1;
        s.check_invariants();
    }
}
