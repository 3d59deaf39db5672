//! The cache engine: the write path (RAM buffer → sealed segments → log writer), the read path
//! (RAM, log, backing), FLUSH/FUA, DISCARD/WRITE_ZEROES, and back-pressure. No ublk here: the
//! ublk glue and the tests drive it through `Engine`'s methods.
//!
//! Invariants owned here (asserted where they are enforced):
//! - Segment ids are handed out in order, one open segment at a time; id `k` lives in ring slot
//!   `(k-1) % N`, and a slot is reused only after writeback freed the segment N ids older.
//! - `written_back_id ≤ written_id`, `durable_id ≤ written_id ≤ sealed_id < next_segment_id`
//!   (writeback works up to `written_id`: a segment on every leg, flushed or not).
//! - A FLUSH (or FUA write) completes with success only if every write it covers is durable: on
//!   every leg still in use, whose failures are on record (`faults`), or on the backing device.
//!   After a cache loss, the FLUSHes waiting then, every FUA write logged before it, and the first
//!   FLUSH after it (if acknowledged writes were not yet covered by a FLUSH) fail.
//! - Epochs only grow along the log; a FLUSH ends the epoch of every write acknowledged before it.
//! - A block's map entry only moves to a newer copy; writeback removes it only while it still
//!   points into the segment being freed, and only once no reader has that segment pinned.
//! - A partial-sector copy (512-byte logical blocks) exists only when the block had no other
//!   cached copy when it was written: its missing sectors are exactly the backing device's.

mod cached_block;
pub mod faults;
pub mod lifecycle;
pub mod mode;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use logfmt::{
    slot_of, Entry, EntryKind, SegmentHeader, ALL_SECTORS_VALID, BLOCK_SIZE_BYTES,
    DATA_BLOCKS_PER_SEGMENT, FLAG_FLUSH, MAX_ENTRIES_PER_SEGMENT, SECTORS_PER_BLOCK,
    SECTOR_SIZE_BYTES,
};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::device::{AlignedBuf, Device};
use crate::error::{EngineError, Result};
use crate::log::legs::CacheLegs;
use crate::log::ram_buffer::RamBuffers;
use crate::log::writer::LogJob;
use crate::map::block_map::{BlockMap, Location};
use crate::map::zero_ranges::ZeroRanges;

/// The geometry of an open cache, fixed at create.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub uuid: [u8; 16],
    pub segment_count: u64,
    pub logical_block_size: u32,
    pub device_size_bytes: u64,
}

impl Geometry {
    pub fn capacity_blocks(&self) -> u64 {
        self.segment_count * DATA_BLOCKS_PER_SEGMENT as u64
    }
    pub fn location(&self, slot: u64, data_slot: usize) -> Location {
        (slot * DATA_BLOCKS_PER_SEGMENT as u64 + data_slot as u64) as Location
    }
    pub fn split(&self, location: Location) -> (u64, usize) {
        let l = location as u64;
        (
            l / DATA_BLOCKS_PER_SEGMENT as u64,
            (l % DATA_BLOCKS_PER_SEGMENT as u64) as usize,
        )
    }
}

/// One ring slot as the engine tracks it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Slot {
    /// The segment in the slot, or 0 when the slot is free.
    pub segment_id: u64,
    /// The RAM buffer still holding it, until it is on every leg.
    pub buffer: Option<usize>,
    /// Readers reading its data from a leg; writeback may not free it before they finish.
    pub readers: u32,
    pub sealed_at: Option<Instant>,
    /// Bytes of the segment that hold something (`SegmentHeader::used_bytes`), once sealed:
    /// writeback reads a segment in one I/O of this length.
    pub used_bytes: usize,
}

pub(crate) struct OpenSegment {
    pub id: u64,
    pub slot: u64,
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
    fn new() -> Self {
        RewriteIndex {
            keys: [NO_BLOCK; REWRITE_INDEX_BUCKETS],
            entries: [0; REWRITE_INDEX_BUCKETS],
            len: 0,
        }
    }
    fn bucket(block: u64) -> usize {
        (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 55) as usize
    }
    fn get(&self, block: u64) -> Option<usize> {
        let mut i = Self::bucket(block);
        loop {
            match self.keys[i] {
                NO_BLOCK => return None,
                k if k == block => return Some(self.entries[i] as usize),
                _ => i = (i + 1) % REWRITE_INDEX_BUCKETS,
            }
        }
    }
    fn insert(&mut self, block: u64, entry: usize) {
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
    fn clear(&mut self) {
        if self.len > 0 {
            self.keys.fill(NO_BLOCK);
            self.len = 0;
        }
    }
}

impl OpenSegment {
    fn free_data_slot(&self) -> Option<usize> {
        let free = !self.used_data_slots & ((1u128 << DATA_BLOCKS_PER_SEGMENT) - 1);
        (free != 0).then(|| free.trailing_zeros() as usize)
    }
    fn has_room_for_entry(&self) -> bool {
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
    pub failure: Option<String>,
    /// Degraded and (almost) clean: no new segment is opened until writeback catches up, then
    /// the engine goes to passthrough (see `mode`).
    pub closing_log: bool,
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
    pub(crate) fn check_invariants(&self) {
        assert!(self.written_back_id <= self.written_id);
        assert!(self.durable_id <= self.written_id);
        assert!(self.written_id <= self.sealed_id);
        assert!(self.sealed_id < self.next_segment_id);
        assert!(self.flushed_id <= self.durable_id.max(self.written_back_id));
    }
    pub fn dirty_segments(&self) -> u64 {
        self.sealed_id - self.written_back_id + self.open.is_some() as u64
    }
}

#[derive(Default)]
pub struct Stats {
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

/// What the engine shares with its threads (log writer, leg writers, sync timer, writeback).
pub struct Shared {
    pub geometry: Geometry,
    pub legs: CacheLegs,
    pub backing: Arc<dyn Device>,
    pub(crate) ram: RamBuffers,
    pub(crate) state: Mutex<State>,
    /// Signalled when a buffer or slot is freed (writers waiting for space).
    pub(crate) space_freed: Condvar,
    /// Signalled when segments are written or made durable (FLUSH waiters), and when a pinned
    /// slot's last reader leaves (writeback waiting to free it).
    pub(crate) progress: Condvar,
    /// Signalled when writeback may have work.
    pub(crate) writeback_wakeup: Condvar,
    pub(crate) log_jobs: Sender<LogJob>,
    pub stats: Stats,
    pub(crate) durable_hint: AtomicU64,
    /// When the engine started; `last_request_ns` counts from here.
    pub(crate) started: Instant,
    /// Time of the last user request, in ns since `started` (an atomic: it is touched by every
    /// request, and a lock here would serialise the queues for nothing).
    pub(crate) last_request_ns: AtomicU64,
    pub(crate) stopping: AtomicBool,
    pub sync_interval: Duration,
    pub(crate) policy: Mutex<Option<writeback::Policy>>,
    /// The superblock the legs were opened with (what a replacement leg is given).
    pub superblock: logfmt::Superblock,
    pub(crate) crc_cache: crate::engine::cached_block::CrcCache,
    /// Orders writeback's backing writes before passthrough writes. Once every leg is lost,
    /// writeback may still hold a batch it read before; a write it issued after a passthrough
    /// write could bring back stale data. Writeback holds this shared around each backing write
    /// and checks `writeback_fenced` under it; passthrough writes and reads take it exclusively
    /// while the fence is up, so every writeback write lands before the first passthrough write
    /// and before any passthrough read.
    pub(crate) backing_gate: parking_lot::RwLock<()>,
    pub(crate) writeback_fenced: AtomicBool,
    /// A writeback thread runs (the fence is raised only then: that thread lifts it).
    pub(crate) writeback_running: AtomicBool,
    /// What the last failed writeback attempt said (for a drain that gives up).
    pub(crate) last_writeback_error: Mutex<Option<String>>,
    pub recovery: crate::log::scan::ScanReport,
    /// The host's copy of the fault record (`faults`); `None`: the legs' copies only.
    pub(crate) fault_file: Option<crate::engine::faults::FaultFile>,
    /// One fault-record writer at a time (and `replace_leg`, which changes the record).
    pub(crate) fault_recorder: Mutex<()>,
    /// One checkpoint writer at a time (writeback's commit, the fault record): each takes the
    /// next sequence, and its slot, from the state.
    pub(crate) checkpoint_lock: Mutex<()>,
    /// A passthrough write or zeroing was acknowledged and the backing device not flushed since:
    /// the next FLUSH flushes it, in passthrough or not (a FLUSH after leaving passthrough must
    /// cover the writes made in it).
    pub(crate) backing_unflushed: AtomicBool,
    /// On tmpfs beside the RAM buffer file: present while a cache loss owes the client a FLUSH
    /// error (it outlives a daemon crash, like the client's view of the device; not a reboot).
    pub(crate) flush_error_marker: std::path::PathBuf,
}

/// The engine handle. Dropping it (or `shutdown`) seals and flushes the log and stops threads.
pub struct Engine {
    pub(crate) shared: Arc<Shared>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
}

/// How a segment gets sealed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SealReason {
    /// Out of data slots or entries.
    Full,
    /// The sync-interval timer: make it durable, same epoch.
    Timer,
    /// A FLUSH or FUA: durable, and the epoch ends.
    Flush,
}

/// Where the newest copy of one block is, resolved under the lock for a read.
enum Source {
    Backing,
    Zero,
    /// Copied out of RAM already.
    Ram {
        mask: u8,
    },
    /// On a leg: slot pinned, read after unlocking.
    Cache {
        segment_id: u64,
        slot: u64,
        data_slot: usize,
        mask: u8,
    },
}

impl Engine {
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn geometry(&self) -> &Geometry {
        &self.shared.geometry
    }

    pub fn device_size_bytes(&self) -> u64 {
        self.shared.geometry.device_size_bytes
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.shared.write(offset, data, fua)
    }
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.shared.read(offset, out)
    }
    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.zero_range(offset, len, EntryKind::Discard)
    }
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.shared.zero_range(offset, len, EntryKind::WriteZeroes)
    }
}

impl Shared {
    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        let lbs = self.geometry.logical_block_size as u64;
        let bad = |reason| EngineError::BadRequest {
            offset,
            len,
            reason,
        };
        if !offset.is_multiple_of(lbs) || !len.is_multiple_of(lbs) {
            return Err(bad("not aligned to the logical block size"));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.geometry.device_size_bytes)
        {
            return Err(bad("beyond the end of the device"));
        }
        Ok(())
    }

    /// The state lock, for a request that goes through the log: fails if the engine failed or
    /// stops, and reroutes (`EngineError::Passthrough`) if the log is out of use.
    fn lock_live(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.state.lock();
        if let Some(why) = &state.failure {
            return Err(EngineError::CacheFailed(why.clone()));
        }
        if state.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        if state.passthrough {
            return Err(EngineError::Passthrough);
        }
        Ok(state)
    }

    /// Time since the last user request.
    pub(crate) fn idle_for(&self, now: Instant) -> Duration {
        let last =
            self.started + Duration::from_nanos(self.last_request_ns.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    fn note_request(&self) {
        let ns = self.started.elapsed().as_nanos() as u64;
        self.last_request_ns.store(ns, Ordering::Relaxed);
    }

    // ---------------------------------------------------------------- write path

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_request(offset, data.len() as u64)?;
        self.note_request();
        let generation = match self.log_write(offset, data) {
            Err(EngineError::Passthrough) => return self.passthrough_write(offset, data, fua),
            result => result?,
        };
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if fua {
            // Durable only if no cache loss took the log it was written to.
            self.flush_inner(generation, None)?;
        }
        Ok(())
    }

    /// Logs a write into the RAM buffer, block by block. Returns the loss generation it was
    /// logged in.
    fn log_write(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let mut state = self.lock_live()?;
        let generation = state.lost_generation;
        let mut scratch = [0u8; BLOCK_SIZE_BYTES];
        let mut pos = 0usize;
        while pos < data.len() {
            let byte = offset + pos as u64;
            let block = byte / BLOCK_SIZE_BYTES as u64;
            let in_block = (byte % BLOCK_SIZE_BYTES as u64) as usize;
            let n = (BLOCK_SIZE_BYTES - in_block).min(data.len() - pos);
            let piece: &[u8] = if n == BLOCK_SIZE_BYTES {
                &data[pos..pos + n]
            } else {
                scratch[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
                &scratch
            };
            self.put_block(&mut state, block, sector_mask(in_block, n), piece)?;
            pos += n;
        }
        // Counted once logged, under the lock it was logged with (waiting for space releases it
        // on the way): a FLUSH issued before this point does not cover the write.
        state.logged_writes += 1;
        Ok(generation)
    }

    /// Logs one block (the sectors of `mask`, at their places in `data`) into the open segment.
    fn put_block(
        &self,
        state: &mut MutexGuard<'_, State>,
        block: u64,
        mask: u8,
        data: &[u8],
    ) -> Result<()> {
        loop {
            self.ensure_open(state)?;
            let open = state
                .open
                .as_ref()
                .expect("ensure_open leaves a segment open");
            if let Some(index) = open.rewritable.get(block) {
                if let Some(new_slot) = open.free_data_slot() {
                    self.rewrite_in_place(state, block, index, new_slot, mask, data);
                    return Ok(());
                }
                self.seal(state, SealReason::Full);
                continue;
            }
            if !open.has_room_for_entry() || open.free_data_slot().is_none() {
                self.seal(state, SealReason::Full);
                continue;
            }
            let (mask, data) = if mask == ALL_SECTORS_VALID {
                (mask, std::borrow::Cow::Borrowed(data))
            } else {
                let (m, d) = self.merge_with_current(state, block, mask, data)?;
                (m, std::borrow::Cow::Owned(d))
            };
            // merge_with_current may have read a leg, but never released the lock: the open
            // segment is the one we checked.
            let open = state.open.as_mut().expect("still open");
            let data_slot = open.free_data_slot().expect("checked above");
            let index = open.entries.len();
            let entry = Entry::data(block, data_slot as u16, mask, 0);
            self.ram
                .fill_block(open.buffer, data_slot, &data, mask, None);
            self.ram.publish_entry(open.buffer, index, &entry);
            open.entries.push(entry);
            open.used_data_slots |= 1 << data_slot;
            open.rewritable.insert(block, index);
            let location = self.geometry.location(open.slot, data_slot);
            let state = &mut **state;
            let old = state.map.insert(block, location);
            // Partial copies are rare: skip hashing on the hot path when there are none.
            if let (Some(old), false) = (old, state.partial.is_empty()) {
                state.partial.remove(&old);
            }
            if mask != ALL_SECTORS_VALID {
                state.partial.insert(location, mask);
            }
            return Ok(());
        }
    }

    /// A rewrite of a block already in the open segment: fill a free data slot, then switch the
    /// entry to it in one atomic store (a kill mid-copy leaves the old, whole block).
    fn rewrite_in_place(
        &self,
        state: &mut State,
        block: u64,
        index: usize,
        new_slot: usize,
        mask: u8,
        data: &[u8],
    ) {
        let open = state.open.as_mut().expect("open");
        let old = open.entries[index];
        debug_assert_eq!(old.block(), block);
        let base = (mask != ALL_SECTORS_VALID).then_some(old.data_slot as usize);
        self.ram.fill_block(open.buffer, new_slot, data, mask, base);
        let merged = old.sector_valid | mask;
        let entry = Entry::data(block, new_slot as u16, merged, 0);
        self.ram.switch_placement(open.buffer, index, &entry);
        open.entries[index] = entry;
        open.used_data_slots |= 1 << new_slot;
        open.used_data_slots &= !(1 << old.data_slot);
        let old_location = self.geometry.location(open.slot, old.data_slot as usize);
        let location = self.geometry.location(open.slot, new_slot);
        let previous = state.map.insert(block, location);
        debug_assert_eq!(previous, Some(old_location));
        if !state.partial.is_empty() {
            state.partial.remove(&old_location);
        }
        if merged != ALL_SECTORS_VALID {
            state.partial.insert(location, merged);
        }
    }

    /// For a partial-block write of a block that has a cached copy or lies in a zeroed range:
    /// returns the whole current content with the new sectors laid over it, so the new copy
    /// never depends on an older cached one. With no cached copy, the missing sectors are the
    /// backing device's, and the copy stays partial.
    fn merge_with_current(
        &self,
        state: &mut State,
        block: u64,
        mask: u8,
        data: &[u8],
    ) -> Result<(u8, Vec<u8>)> {
        let mut current = vec![0u8; BLOCK_SIZE_BYTES];
        let current_mask = if let Some(location) = state.map.get(block) {
            self.stats.partial_merges.fetch_add(1, Ordering::Relaxed);
            let (slot, data_slot) = self.geometry.split(location);
            match state.slots[slot as usize].buffer {
                Some(buffer) => self.ram.copy_block(buffer, data_slot, &mut current),
                None => {
                    let segment_id = state.slots[slot as usize].segment_id;
                    let mut aligned = AlignedBuf::new(BLOCK_SIZE_BYTES);
                    self.read_cached_block(segment_id, slot, data_slot, &mut aligned)?;
                    current.copy_from_slice(&aligned[..BLOCK_SIZE_BYTES]);
                }
            }
            state
                .partial
                .get(&location)
                .copied()
                .unwrap_or(ALL_SECTORS_VALID)
        } else if state.zeros.contains(block) {
            ALL_SECTORS_VALID
        } else {
            0
        };
        for sector in 0..SECTORS_PER_BLOCK {
            if mask & (1 << sector) != 0 {
                let r = sector * SECTOR_SIZE_BYTES..(sector + 1) * SECTOR_SIZE_BYTES;
                current[r.clone()].copy_from_slice(&data[r]);
            }
        }
        Ok((current_mask | mask, current))
    }

    /// Makes sure a segment is open, waiting for a free RAM buffer and a free ring slot.
    fn ensure_open(&self, state: &mut MutexGuard<'_, State>) -> Result<()> {
        let mut stall_started: Option<Instant> = None;
        while state.open.is_none() {
            if let Some(why) = &state.failure {
                return Err(EngineError::CacheFailed(why.clone()));
            }
            if state.shutting_down {
                return Err(EngineError::ShuttingDown);
            }
            if state.passthrough {
                return Err(EngineError::Passthrough);
            }
            let id = state.next_segment_id;
            let slot = slot_of(id, self.geometry.segment_count);
            if state.slots[slot as usize].segment_id == 0
                && !state.free_buffers.is_empty()
                && !state.closing_log
            {
                let buffer = state.free_buffers.pop().expect("not empty");
                let epoch_id = state.epoch_id;
                self.ram.begin(buffer, &self.geometry.uuid, id, epoch_id);
                state.slots[slot as usize] = Slot {
                    segment_id: id,
                    buffer: Some(buffer),
                    readers: 0,
                    sealed_at: None,
                    used_bytes: 0,
                };
                state.open = Some(OpenSegment {
                    id,
                    slot,
                    buffer,
                    epoch_id,
                    entries: Vec::with_capacity(DATA_BLOCKS_PER_SEGMENT),
                    rewritable: RewriteIndex::new(),
                    used_data_slots: 0,
                    opened_at: Instant::now(),
                });
                state.next_segment_id += 1;
                break;
            }
            // The cache (or the RAM buffer) is full: wait for the log writer or writeback. Only
            // a full ring calls writeback to full speed: a writer waiting for a RAM buffer waits
            // for the log writer, which writeback would only slow down.
            stall_started.get_or_insert_with(Instant::now);
            let ring_full = state.slots[slot as usize].segment_id != 0;
            state.writers_waiting += ring_full as usize;
            if ring_full {
                self.writeback_wakeup.notify_all();
            }
            self.space_freed.wait_for(state, Duration::from_millis(100));
            state.writers_waiting -= ring_full as usize;
        }
        if let Some(started) = stall_started {
            self.stats
                .stall_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Seals the open segment and hands it to the log writer. A segment with no entry is
    /// abandoned instead (its id is reused), so a FLUSH never writes an empty segment.
    pub(crate) fn seal(&self, state: &mut State, reason: SealReason) {
        let Some(open) = state.open.take() else {
            if reason == SealReason::Flush {
                state.epoch_id += 1;
            }
            return;
        };
        if open.entries.is_empty() {
            self.ram.release(open.buffer);
            state.free_buffers.push(open.buffer);
            state.slots[open.slot as usize] = Slot::default();
            state.next_segment_id -= 1;
            if reason == SealReason::Flush {
                state.epoch_id += 1;
            }
            return;
        }
        assert_eq!(
            open.id,
            state.sealed_id + 1,
            "segments are sealed in id order"
        );
        let flags = if reason == SealReason::Flush {
            FLAG_FLUSH
        } else {
            0
        };
        let header = SegmentHeader {
            uuid: self.geometry.uuid,
            segment_id: open.id,
            epoch_id: open.epoch_id,
            durable_id: 0,
            flags,
            entries: open.entries,
        };
        state.sealed_id = open.id;
        let slot = &mut state.slots[open.slot as usize];
        slot.sealed_at = Some(Instant::now());
        slot.used_bytes = header.used_bytes();
        if reason == SealReason::Flush {
            state.epoch_id += 1;
        }
        let job = LogJob::Segment {
            header,
            buffer: open.buffer,
            flush_legs: reason != SealReason::Full,
        };
        // The log writer outlives every sealer (it stops only after the last seal at shutdown).
        self.log_jobs.send(job).expect("log writer is running");
        state.check_invariants();
    }

    /// Seals the open segment if the sync interval has passed since it was opened.
    pub(crate) fn seal_if_stale(&self) {
        let mut state = self.state.lock();
        let stale = state
            .open
            .as_ref()
            .is_some_and(|o| !o.entries.is_empty() && o.opened_at.elapsed() >= self.sync_interval);
        if stale && state.failure.is_none() {
            self.seal(&mut state, SealReason::Timer);
        }
    }

    /// A FLUSH of the engine's own (a drain, a shutdown): like a FUA write's, it neither reports
    /// nor clears a FLUSH error owed to the client after a cache loss.
    pub(crate) fn flush_internal(&self) -> Result<()> {
        let generation = self.state.lock().lost_generation;
        self.flush_inner(generation, None)
    }

    pub fn flush(&self) -> Result<()> {
        self.note_request();
        let (generation, covers) = {
            let state = self.state.lock();
            (state.lost_generation, state.logged_writes)
        };
        self.flush_inner(generation, Some(covers))
    }

    /// A FLUSH (covering the first `covers` logged writes) or a FUA write's flush (`None`: it
    /// vouches for that write only) issued in loss generation `issued`: it fails if the cache was
    /// lost since, because what it covers was in the cache that is gone.
    fn flush_inner(&self, issued: u64, covers: Option<u64>) -> Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let lost_since = |state: &mut State| {
            // A FLUSH that covers every write the loss took has reported it to the client.
            if covers.is_some_and(|c| c >= state.lost_writes_mark) {
                self.take_owed_flush_error(state, true);
            }
            EngineError::CacheFailed(
                "every cache leg was lost before this FLUSH completed: the writes it covers are \
                 gone"
                    .into(),
            )
        };
        let mut state = self.state.lock();
        if let Some(why) = &state.failure {
            return Err(EngineError::CacheFailed(why.clone()));
        }
        if state.shutting_down {
            return Err(EngineError::ShuttingDown);
        }
        if state.lost_generation != issued {
            return Err(lost_since(&mut state));
        }
        if state.passthrough {
            return self.flush_in_passthrough(state, covers.is_some());
        }
        self.seal(&mut state, SealReason::Flush);
        let target = state.sealed_id;
        if state.durable_id < target {
            self.log_jobs
                .send(LogJob::Flush)
                .expect("log writer is running");
        }
        // The loss check comes first: a loss sets `durable_id` past every id it dropped.
        loop {
            if let Some(why) = &state.failure {
                return Err(EngineError::CacheFailed(why.clone()));
            }
            if state.lost_generation != issued {
                return Err(lost_since(&mut state));
            }
            if state.durable_id >= target {
                break;
            }
            if let Some(why) = &state.fault_record_error {
                // Held back for a leg failure that cannot be recorded: fail, not hang.
                return Err(EngineError::CacheFailed(format!(
                    "a cache leg failed and its failure cannot be recorded: {why}"
                )));
            }
            self.progress.wait(&mut state);
        }
        state.flushed_id = state.flushed_id.max(target);
        // New legs were attached after a loss that no FLUSH has reported yet: this one does (a
        // FUA write vouches for itself only, and its data is durable).
        let owed = self.take_owed_flush_error(&mut state, covers.is_some());
        drop(state);
        self.flush_backing_if_written()?;
        if owed {
            return Err(crate::engine::mode::owed_flush_error());
        }
        Ok(())
    }

    /// DISCARD and WRITE_ZEROES: whole blocks become one range entry; partial-block edges are
    /// logged as writes of zeroes (reads of a discarded range return zeroes either way).
    pub fn zero_range(&self, offset: u64, len: u64, kind: EntryKind) -> Result<()> {
        self.check_request(offset, len)?;
        self.note_request();
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        if len == 0 {
            return Ok(());
        }
        match self.log_zero_range(offset, len, kind) {
            Err(EngineError::Passthrough) => self.passthrough_zero(offset, len, kind),
            result => result,
        }
    }

    fn log_zero_range(&self, offset: u64, len: u64, kind: EntryKind) -> Result<()> {
        let block_bytes = BLOCK_SIZE_BYTES as u64;
        let end = offset + len;
        let first_full = offset.div_ceil(block_bytes);
        let end_full = end / block_bytes;
        let zeroes = [0u8; BLOCK_SIZE_BYTES];
        let mut state = self.lock_live()?;
        if first_full >= end_full {
            // Inside one block, or straddling two without a whole one.
            self.zero_edges(&mut state, offset, end, &zeroes)?;
            state.logged_writes += 1;
            return Ok(());
        }
        self.zero_edges(&mut state, offset, first_full * block_bytes, &zeroes)?;
        let mut block = first_full;
        let max_blocks_per_entry = (u32::MAX as u64 / SECTORS_PER_BLOCK as u64) & !7;
        while block < end_full {
            let n = (end_full - block).min(max_blocks_per_entry);
            self.put_range(&mut state, kind, block, block + n)?;
            block += n;
        }
        self.zero_edges(&mut state, end_full * block_bytes, end, &zeroes)?;
        state.logged_writes += 1;
        Ok(())
    }

    fn zero_edges(
        &self,
        state: &mut MutexGuard<'_, State>,
        start: u64,
        end: u64,
        zeroes: &[u8; BLOCK_SIZE_BYTES],
    ) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let block = pos / BLOCK_SIZE_BYTES as u64;
            let in_block = (pos % BLOCK_SIZE_BYTES as u64) as usize;
            let n = ((BLOCK_SIZE_BYTES - in_block) as u64).min(end - pos) as usize;
            self.put_block(state, block, sector_mask(in_block, n), zeroes)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn put_range(
        &self,
        state: &mut MutexGuard<'_, State>,
        kind: EntryKind,
        start_block: u64,
        end_block: u64,
    ) -> Result<()> {
        loop {
            self.ensure_open(state)?;
            let open = state.open.as_mut().expect("open");
            if !open.has_room_for_entry() {
                self.seal(state, SealReason::Full);
                continue;
            }
            let entry = Entry::range(
                kind,
                start_block * SECTORS_PER_BLOCK as u64,
                ((end_block - start_block) * SECTORS_PER_BLOCK as u64) as u32,
            );
            let index = open.entries.len();
            self.ram.publish_entry(open.buffer, index, &entry);
            open.entries.push(entry);
            open.rewritable.clear();
            let id = open.id;
            let state = &mut **state;
            remove_map_range(&mut state.map, &mut state.partial, start_block, end_block);
            state.zeros.insert(start_block, end_block, id);
            return Ok(());
        }
    }

    // ---------------------------------------------------------------- read path

    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check_request(offset, out.len() as u64)?;
        self.note_request();
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        if out.is_empty() {
            return Ok(());
        }
        let block_bytes = BLOCK_SIZE_BYTES as u64;
        let first = offset / block_bytes;
        let last = (offset + out.len() as u64 - 1) / block_bytes;
        let count = (last - first + 1) as usize;
        let mut blocks = AlignedBuf::new(count * BLOCK_SIZE_BYTES);
        let sources = self.resolve(first, count, &mut blocks)?;
        let result = self.fill_from_devices(first, &sources, &mut blocks);
        self.unpin(&sources);
        result?;
        let start = (offset - first * block_bytes) as usize;
        out.copy_from_slice(&blocks[start..start + out.len()]);
        let hits = sources
            .iter()
            .filter(|s| !matches!(s, Source::Backing))
            .count() as u64;
        self.stats.read_hits.fetch_add(hits, Ordering::Relaxed);
        self.stats
            .read_misses
            .fetch_add(count as u64 - hits, Ordering::Relaxed);
        Ok(())
    }

    /// Under the lock: where each block's newest copy is. RAM copies are taken right away; leg
    /// copies are pinned so writeback cannot free their segment before we read them.
    fn resolve(&self, first: u64, count: usize, blocks: &mut [u8]) -> Result<Vec<Source>> {
        // In passthrough the map is empty: every block resolves to the backing device.
        let mut state = match self.lock_live() {
            Err(EngineError::Passthrough) => {
                // After every leg was lost, a writeback write that passed the fence just before
                // may still be on its way to the backing device: read after it has landed, or a
                // later read (with no write in between) would return other data.
                self.wait_for_fenced_writeback();
                self.state.lock()
            }
            result => result?,
        };
        let mut sources = Vec::with_capacity(count);
        for i in 0..count {
            let block = first + i as u64;
            let source = match state.map.get(block) {
                Some(location) => {
                    let (slot, data_slot) = self.geometry.split(location);
                    let mask = state
                        .partial
                        .get(&location)
                        .copied()
                        .unwrap_or(ALL_SECTORS_VALID);
                    let s = &mut state.slots[slot as usize];
                    match s.buffer {
                        Some(buffer) => {
                            let out = &mut blocks[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                            self.ram.copy_block(buffer, data_slot, out);
                            Source::Ram { mask }
                        }
                        None => {
                            s.readers += 1;
                            Source::Cache {
                                segment_id: s.segment_id,
                                slot,
                                data_slot,
                                mask,
                            }
                        }
                    }
                }
                None if state.zeros.contains(block) => Source::Zero,
                None => Source::Backing,
            };
            sources.push(source);
        }
        Ok(sources)
    }

    fn fill_from_devices(&self, first: u64, sources: &[Source], blocks: &mut [u8]) -> Result<()> {
        let mut scratch = AlignedBuf::new(BLOCK_SIZE_BYTES);
        for (i, source) in sources.iter().enumerate() {
            let out = &mut blocks[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
            match *source {
                Source::Zero => out.fill(0),
                Source::Cache {
                    segment_id,
                    slot,
                    data_slot,
                    ..
                } => {
                    self.read_cached_block(segment_id, slot, data_slot, &mut scratch)?;
                    out.copy_from_slice(&scratch[..BLOCK_SIZE_BYTES]);
                }
                Source::Backing | Source::Ram { .. } => {}
            }
        }
        // Backing reads, in runs of consecutive blocks; a partial copy takes its missing sectors
        // from the backing block.
        let needs_backing = |s: &Source| match s {
            Source::Backing => true,
            Source::Ram { mask } | Source::Cache { mask, .. } => *mask != ALL_SECTORS_VALID,
            Source::Zero => false,
        };
        let mut i = 0;
        while i < sources.len() {
            if !needs_backing(&sources[i]) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < sources.len() && matches!(sources[j], Source::Backing) {
                j += 1;
            }
            if j == i {
                // A single partial block.
                let (Source::Ram { mask } | Source::Cache { mask, .. }) = sources[i] else {
                    unreachable!()
                };
                let block = first + i as u64;
                self.read_backing(&mut scratch[..BLOCK_SIZE_BYTES], block)?;
                let out = &mut blocks[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                for sector in 0..SECTORS_PER_BLOCK {
                    if mask & (1 << sector) == 0 {
                        let r = sector * SECTOR_SIZE_BYTES..(sector + 1) * SECTOR_SIZE_BYTES;
                        out[r.clone()].copy_from_slice(&scratch[r]);
                    }
                }
                i += 1;
            } else {
                let range = i * BLOCK_SIZE_BYTES..j * BLOCK_SIZE_BYTES;
                self.read_backing(&mut blocks[range], first + i as u64)?;
                i = j;
            }
        }
        Ok(())
    }

    fn read_backing(&self, out: &mut [u8], block: u64) -> Result<()> {
        self.backing
            .read_at(out, block * BLOCK_SIZE_BYTES as u64)
            .map_err(|e| EngineError::io(self.backing.name(), e))
    }

    fn unpin(&self, sources: &[Source]) {
        if !sources.iter().any(|s| matches!(s, Source::Cache { .. })) {
            return;
        }
        let mut state = self.state.lock();
        let mut woke = false;
        for source in sources {
            if let Source::Cache { slot, .. } = source {
                let s = &mut state.slots[*slot as usize];
                s.readers -= 1;
                woke |= s.readers == 0;
            }
        }
        if woke {
            self.progress.notify_all();
        }
    }

    // ---------------------------------------------------------------- log progress

    /// A leg writer finished writing (and maybe flushing) segments up to these ids.
    pub(crate) fn on_leg_progress(&self, leg: usize, written: u64, durable: u64) {
        let mut state = self.state.lock();
        state.leg_written[leg] = state.leg_written[leg].max(written);
        state.leg_durable[leg] = state.leg_durable[leg].max(durable);
        self.recompute_log_progress(&mut state);
    }

    /// The log's progress is that of the slowest healthy leg. Buffers are released strictly in id
    /// order, once their segment is on every healthy leg.
    pub(crate) fn recompute_log_progress(&self, state: &mut State) {
        let healthy: Vec<usize> = self
            .legs
            .all()
            .iter()
            .filter(|l| l.is_healthy())
            .map(|l| l.index)
            .collect();
        if healthy.is_empty() {
            self.enter_cache_lost(state);
            return;
        }
        let written = healthy.iter().map(|&l| state.leg_written[l]).min().unwrap();
        // A failed leg counts for durability until its failure is on record: a FLUSH must not
        // complete on the other leg alone while a restart could still take the failed leg for a
        // good one (`faults`).
        let durable = self
            .legs
            .all()
            .iter()
            .filter(|l| l.is_healthy() || !state.faults_recorded.leg_failed(l.index))
            .map(|l| state.leg_durable[l.index])
            .min()
            .unwrap();
        while state.written_id < written {
            state.written_id += 1;
            let slot = slot_of(state.written_id, self.geometry.segment_count) as usize;
            assert_eq!(state.slots[slot].segment_id, state.written_id);
            let buffer = state.slots[slot]
                .buffer
                .take()
                .expect("written segment had a buffer");
            self.ram.release(buffer);
            state.free_buffers.push(buffer);
        }
        state.durable_id = state.durable_id.max(durable.min(state.written_id));
        self.durable_hint.store(state.durable_id, Ordering::Release);
        state.check_invariants();
        self.progress.notify_all();
        self.space_freed.notify_all();
        self.writeback_wakeup.notify_all();
    }
}

/// Removes the map entries of `[start, end)` and the partial masks of their copies.
pub(crate) fn remove_map_range(
    map: &mut BlockMap,
    partial: &mut HashMap<Location, u8>,
    start: u64,
    end: u64,
) {
    if !partial.is_empty() {
        let doomed: Vec<Location> = map
            .iter()
            .filter(|(b, l)| *b >= start && *b < end && partial.contains_key(l))
            .map(|(_, l)| l)
            .collect();
        for l in doomed {
            partial.remove(&l);
        }
    }
    map.remove_range(start, end);
}

/// Sector-valid mask for `len` bytes at `in_block` bytes into a block (both sector-aligned).
fn sector_mask(in_block: usize, len: usize) -> u8 {
    let first = in_block / SECTOR_SIZE_BYTES;
    let count = len / SECTOR_SIZE_BYTES;
    debug_assert!(count >= 1 && first + count <= SECTORS_PER_BLOCK);
    (((1u16 << count) - 1) << first) as u8
}

/// The log writer's view of the engine (`log::LogHost`).
impl crate::log::LogHost for Shared {
    fn legs(&self) -> &CacheLegs {
        &self.legs
    }
    fn ram(&self) -> &RamBuffers {
        &self.ram
    }
    fn segment_count(&self) -> u64 {
        self.geometry.segment_count
    }
    fn durable_hint(&self) -> u64 {
        self.durable_hint.load(Ordering::Acquire)
    }
    fn on_leg_progress(&self, leg: usize, written: u64, durable: u64) {
        Shared::on_leg_progress(self, leg, written, durable)
    }
    fn on_leg_failed(&self) {
        // A failure to record is logged by `record_faults`; the durable id keeps waiting for it.
        let _ = self.record_faults();
    }
}

#[cfg(test)]
mod tests {
    use super::sector_mask;

    #[test]
    fn sector_masks() {
        assert_eq!(sector_mask(0, 4096), 0xff);
        assert_eq!(sector_mask(512, 512), 0b10);
        assert_eq!(sector_mask(3584, 512), 0x80);
        assert_eq!(sector_mask(1024, 2048), 0b0011_1100);
    }
}
