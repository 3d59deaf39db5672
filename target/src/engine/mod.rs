//! The cache engine: the write path (RAM buffer → sealed segments → log writer), the read path
//! (RAM, log, backing), FLUSH/FUA, DISCARD/WRITE_ZEROES, and back-pressure. No ublk here: the
//! ublk glue and the tests drive it through `Engine`'s methods.
//!
//! Invariants owned here (asserted where they are enforced):
//! - Segment ids are handed out in order, one open segment at a time; each is placed where the
//!   one before it ends (`logfmt::Position::next`), never across the end of a slot, and the log
//!   wraps into a slot only after writeback freed every segment in it.
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
mod flush;
pub mod lifecycle;
pub mod mode;
mod read;
pub(crate) mod replay;
pub(crate) mod state;
pub mod status;
mod write;
mod writeback_port;

pub(crate) use state::{Slot, State, Stats};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use logfmt::{
    EntryKind, Position, DATA_BLOCKS_PER_SEGMENT, SECTORS_PER_BLOCK, SECTOR_SIZE_BYTES, SLOT_BLOCKS,
};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::device::Device;
use crate::error::{EngineError, Result};
use crate::log::legs::CacheLegs;
use crate::log::ram_buffer::RamBuffers;
use crate::log::writer::{LogJob, LogQueues};
use crate::map::block_map::{BlockMap, Location};

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
    /// The location of data slot `data_slot` of the segment at `position`: its slot and its
    /// block in the slot (`Location`).
    pub fn location(&self, position: Position, data_slot: usize) -> Location {
        assert!(data_slot < position.data_capacity());
        let block = position.block as u64 + 1 + data_slot as u64;
        (position.slot * SLOT_BLOCKS as u64 + block) as Location
    }
    /// (slot, block of the slot) of a location.
    pub fn split(&self, location: Location) -> (u64, u32) {
        let l = location as u64;
        (l / SLOT_BLOCKS as u64, (l % SLOT_BLOCKS as u64) as u32)
    }
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
    /// To the log writer: `wb-log`'s queue and the legs' lanes.
    pub(crate) log: LogQueues,
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
    /// Passthrough writes and zeroings acknowledged so far (a predecessor's, possibly unflushed,
    /// count as one). A FLUSH covers those acknowledged before it, in passthrough or not (a
    /// FLUSH after leaving passthrough must cover the writes made in it).
    pub(crate) backing_writes: AtomicU64,
    /// How many of `backing_writes` the newest successful backing flush covers. Held across the
    /// flush: a FLUSH that finds one in flight waits for it instead of returning before it
    /// (CONTRACT §2).
    pub(crate) backing_flushed: Mutex<u64>,
    /// On tmpfs beside the RAM buffer file: present while a cache loss owes the client a FLUSH
    /// error (it outlives a daemon crash, like the client's view of the device; not a reboot).
    pub(crate) flush_error_marker: std::path::PathBuf,
    /// Random per engine start, in every header this engine writes (FORMAT.md §7 rule 4).
    pub(crate) run_nonce: u64,
    /// The newest segment the log writer sealed and its header's record CRC: the next header's
    /// `prev_crc` (the hash chain). Only the log writer advances it, in id order.
    pub(crate) chain: Mutex<(u64, u32)>,
}

/// What opening a cache hands the engine (`open::recover`): the devices, the state rebuilt from
/// the log, and how to run.
pub(crate) struct Parts {
    pub superblock: logfmt::Superblock,
    pub legs: CacheLegs,
    pub backing: Arc<dyn Device>,
    pub ram: RamBuffers,
    pub state: State,
    pub recovery: crate::log::scan::ScanReport,
    pub fault_file: Option<crate::engine::faults::FaultFile>,
    pub sync_interval: Duration,
    pub flush_error_marker: std::path::PathBuf,
    /// Passthrough writes of a predecessor may not be flushed on the backing device yet.
    pub backing_unflushed: bool,
    /// The log's head and its header's record CRC (the chain the next segment continues).
    pub chain: (u64, u32),
    /// This run's nonce (`Shared::run_nonce`).
    pub run_nonce: u64,
}

impl Geometry {
    pub fn of(sb: &logfmt::Superblock) -> Geometry {
        Geometry {
            uuid: sb.uuid,
            segment_count: sb.segment_count,
            logical_block_size: sb.logical_block_size,
            device_size_bytes: sb.backing_size_bytes,
        }
    }
}

impl Shared {
    /// The shared state of an engine about to start, and the log writer's job queue.
    pub(crate) fn new(p: Parts) -> (Arc<Shared>, crossbeam_channel::Receiver<LogJob>) {
        let (log, log_rx) = LogQueues::new(p.legs.all().len());
        let durable = p.state.durable_id;
        let shared = Shared {
            geometry: Geometry::of(&p.superblock),
            legs: p.legs,
            backing: p.backing,
            ram: p.ram,
            state: Mutex::new(p.state),
            space_freed: Condvar::new(),
            progress: Condvar::new(),
            writeback_wakeup: Condvar::new(),
            log,
            stats: Stats::default(),
            durable_hint: AtomicU64::new(durable),
            started: Instant::now(),
            last_request_ns: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            sync_interval: p.sync_interval,
            policy: Mutex::new(None),
            superblock: p.superblock,
            crc_cache: Default::default(),
            backing_gate: parking_lot::RwLock::new(()),
            writeback_fenced: AtomicBool::new(false),
            writeback_running: AtomicBool::new(false),
            last_writeback_error: Mutex::new(None),
            recovery: p.recovery,
            fault_file: p.fault_file,
            fault_recorder: Mutex::new(()),
            checkpoint_lock: Mutex::new(()),
            backing_writes: AtomicU64::new(p.backing_unflushed as u64),
            backing_flushed: Mutex::new(0),
            flush_error_marker: p.flush_error_marker,
            run_nonce: p.run_nonce,
            chain: Mutex::new(p.chain),
        };
        (Arc::new(shared), log_rx)
    }
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
    /// The first write after a FLUSH, the log idle (`Shared::seal_if_sync_writer`): written and
    /// flushed at once, same epoch.
    Eager,
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

    /// The cumulative counters (`status`), for a successor to go on from.
    pub fn counters(&self) -> crate::control::Counters {
        self.shared.stats.snapshot()
    }

    /// Goes on from a predecessor's final counters (a hand-over: `daemon::hand_over`), before
    /// the device serves I/O.
    pub fn continue_counters(&self, from: &crate::control::Counters) {
        self.shared.stats.continue_from(from)
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

    /// The state lock, for a request that goes through the log: fails if the engine stops, and
    /// reroutes (`EngineError::Passthrough`) if the log is out of use.
    fn lock_live(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.state.lock();
        state.admit_to_log()?;
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
    fn queues(&self) -> &LogQueues {
        &self.log
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
    fn run_nonce(&self) -> u64 {
        self.run_nonce
    }
    fn link(&self, id: u64) -> u32 {
        let chain = self.chain.lock();
        assert_eq!(chain.0 + 1, id, "segments are sealed in id order");
        chain.1
    }
    fn linked(&self, id: u64, crc: u32) {
        *self.chain.lock() = (id, crc);
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
