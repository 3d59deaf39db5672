//! Recovery: from the cache legs (and a crashed daemon's RAM buffer file) back to a running
//! engine, and the read-only scan that `wbctl check` and the dirty-data guard of `format` share.
//!
//! The log is replayed from the checkpoint: ids `W+1, W+2, …` in their slots, stopping at the
//! first header that does not validate or does not carry the expected id (a torn write, a stale
//! slot from an earlier lap, a gap). Headers are read for every live segment; data blocks only
//! for segments above the newest `durable_id` a valid header vouches for — the few that may have
//! been in flight (SPEC §3). Per slot, the first leg whose copy validates wins (mirror).
//!
//! Invariant established here: after recovery no slot holds a valid header with an id beyond the
//! replayed head (such a segment was written out of order before the crash and never became
//! durable); they are invalidated before anything new is logged, so a later crash cannot
//! resurrect them behind a newer segment of the same id.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{
    checkpoint_offset, segment_offset, slot_of, Checkpoint, EntryKind, SegmentHeader, Superblock,
    ALL_SECTORS_VALID, CHECKPOINT_SLOTS, CHECKPOINT_SLOT_SIZE_BYTES, SECTORS_PER_BLOCK,
    SEGMENT_HEADER_SIZE_BYTES, SEGMENT_SIZE_BYTES, SUPERBLOCK_SIZE_BYTES,
};
use parking_lot::{Condvar, Mutex};

use crate::block_map::BlockMap;
use crate::device::{AlignedBuf, Device};
use crate::engine::{remove_map_range, Engine, Geometry, Shared, Slot, State, Stats};
use crate::error::{EngineError, Result};
use crate::legs::CacheLegs;
use crate::ram_buffer::{Adopted, RamBuffers};
use crate::zero_ranges::ZeroRanges;

/// Slots past the replayed head that are checked for out-of-order leftovers. Bounded by the
/// segments that can be in flight at once (`MAX_RAM_BUFFERS`), with margin.
const TAIL_SCAN_SEGMENTS: u64 = 2 * MAX_RAM_BUFFERS as u64;
/// Upper bound on RAM buffers (segments in flight); see `TAIL_SCAN_SEGMENTS`.
pub const MAX_RAM_BUFFERS: usize = 32;

/// How an engine is started.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The RAM buffer file (on tmpfs, under /run, in production).
    pub buffer_path: PathBuf,
    /// Segments buffered in RAM (open + in flight to the legs).
    pub ram_buffers: usize,
    /// An open segment is sealed and made durable at least this often.
    pub sync_interval: Duration,
    /// Writeback policy; `None` starts no writeback thread (tests of the log alone).
    pub writeback: Option<writeback::Policy>,
}

impl OpenOptions {
    pub fn new(buffer_path: PathBuf) -> Self {
        OpenOptions {
            buffer_path,
            ram_buffers: 16,
            sync_interval: Duration::from_secs(1),
            writeback: Some(writeback::Policy::default()),
        }
    }
}

/// What recovery found and did; also the result of a read-only scan.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    pub checkpoint: Option<Checkpoint>,
    /// Live segments replayed, oldest first.
    pub headers: Vec<SegmentHeader>,
    /// Segments whose data blocks were read and checked.
    pub data_verified: u64,
    /// Why the replay stopped after the last live segment.
    pub stop_reason: String,
    /// Valid headers with ids past the head (out-of-order leftovers).
    pub stale_tail: Vec<u64>,
    /// Live segments whose copy on one leg is torn or missing while another leg's is whole.
    pub repairs: Vec<Repair>,
    pub bytes_read: u64,
}

/// A segment copy to rewrite on one leg from another (see `ScanReport::repairs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    pub segment_id: u64,
    pub from_leg: usize,
    pub to_leg: usize,
    pub len: usize,
}

impl ScanReport {
    pub fn written_back_id(&self) -> u64 {
        self.checkpoint.map_or(0, |c| c.last_written_back_id)
    }
    pub fn head_id(&self) -> u64 {
        self.headers
            .last()
            .map_or(self.written_back_id(), |h| h.segment_id)
    }
    pub fn dirty_data_blocks(&self) -> u64 {
        self.headers
            .iter()
            .map(|h| h.data_entries().count() as u64)
            .sum()
    }
    pub fn is_dirty(&self) -> bool {
        self.headers.iter().any(|h| !h.entries.is_empty())
    }
}

/// Reads and validates the superblock of every leg; they must belong to one cache set.
pub fn read_superblocks(legs: &[Arc<dyn Device>]) -> Result<Vec<Superblock>> {
    let mut superblocks: Vec<Superblock> = Vec::new();
    for leg in legs {
        let mut buf = AlignedBuf::new(SUPERBLOCK_SIZE_BYTES);
        leg.read_at(&mut buf, 0)
            .map_err(|e| EngineError::io(leg.name(), e))?;
        let sb = Superblock::decode(&buf).map_err(|source| EngineError::Format {
            device: leg.name().to_string(),
            source,
        })?;
        if leg.size_bytes() < sb.leg_size_bytes() {
            return Err(EngineError::refused(
                leg.name(),
                format!(
                    "cache device is {} bytes but its superblock describes {} bytes (it shrank)",
                    leg.size_bytes(),
                    sb.leg_size_bytes()
                ),
            ));
        }
        if let Some(first) = superblocks.first() {
            if first.uuid != sb.uuid
                || first.segment_count != sb.segment_count
                || first.leg_count != sb.leg_count
            {
                return Err(EngineError::refused(
                    leg.name(),
                    format!(
                        "cache leg belongs to another cache set than {}",
                        legs[0].name()
                    ),
                ));
            }
        }
        superblocks.push(sb);
    }
    Ok(superblocks)
}

/// The legs whose superblock cannot even be read (I/O error), with the error.
fn unreadable_legs(legs: &[Arc<dyn Device>]) -> Vec<(usize, io::Error)> {
    legs.iter()
        .enumerate()
        .filter_map(|(i, leg)| {
            let mut buf = AlignedBuf::new(SUPERBLOCK_SIZE_BYTES);
            leg.read_at(&mut buf, 0).err().map(|e| (i, e))
        })
        .collect()
}

/// Reads the log of a cache set without changing anything.
pub fn scan(legs: &CacheLegs, sb: &Superblock) -> ScanReport {
    let mut report = ScanReport::default();
    let uuid = sb.uuid;
    // The newest valid checkpoint over all legs.
    let mut ring = AlignedBuf::new(CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES);
    for leg in legs.all().iter().filter(|l| l.is_healthy()) {
        if leg
            .device()
            .read_at(&mut ring, checkpoint_offset(0))
            .is_ok()
        {
            report.bytes_read += ring.len() as u64;
            if let Some(c) = Checkpoint::newest_in_ring(&ring, &uuid) {
                if report
                    .checkpoint
                    .is_none_or(|old| c.sequence > old.sequence)
                {
                    report.checkpoint = Some(c);
                }
            }
        }
    }
    let n = sb.segment_count;
    let first = report.written_back_id() + 1;
    let mut image = AlignedBuf::new(SEGMENT_SIZE_BYTES);
    let mut newest_durable = 0u64;
    let mut id = first;
    // Headers first: they say which ids the legs vouch for as complete and flushed.
    loop {
        if id - first >= n {
            report.stop_reason = "the whole ring is live".into();
            break;
        }
        let offset = segment_offset(slot_of(id, n));
        let mut found = None;
        let mut last_error = String::from("no healthy leg");
        for leg in legs.all().iter().filter(|l| l.is_healthy()) {
            let header = &mut image[..SEGMENT_HEADER_SIZE_BYTES];
            if let Err(e) = leg.device().read_at(header, offset) {
                last_error = e.to_string();
                continue;
            }
            report.bytes_read += SEGMENT_HEADER_SIZE_BYTES as u64;
            match SegmentHeader::decode_expecting(header, &uuid, id) {
                Ok(h) => {
                    found = Some(h);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        match found {
            Some(h) => {
                newest_durable = newest_durable.max(h.durable_id);
                report.headers.push(h);
                id += 1;
            }
            None => {
                report.stop_reason = format!("segment {id}: {last_error}");
                break;
            }
        }
    }
    // Then the data of every segment no later header vouches for, on every leg: the legs lost
    // power independently, so one may hold a torn copy where the other holds a whole one.
    if let Some(cut) = report
        .headers
        .iter()
        .position(|h| h.segment_id > newest_durable)
    {
        for i in cut..report.headers.len() {
            let h = report.headers[i].clone();
            let offset = segment_offset(slot_of(h.segment_id, n));
            let len = h.used_bytes();
            let mut good_leg = None;
            let mut bad_legs = Vec::new();
            let mut last_error = String::new();
            for leg in legs.all().iter().filter(|l| l.is_healthy()) {
                if let Err(e) = leg.device().read_at(&mut image[..len], offset) {
                    last_error = e.to_string();
                    bad_legs.push(leg.index);
                    continue;
                }
                report.bytes_read += len as u64;
                let verdict = SegmentHeader::decode_expecting(&image, &uuid, h.segment_id)
                    .map_err(|e| e.to_string())
                    .and_then(|other| {
                        if other.entries != h.entries || other.epoch_id != h.epoch_id {
                            return Err("header differs between legs".to_string());
                        }
                        h.verify_data(&image).map_err(|e| e.to_string())
                    });
                match verdict {
                    Ok(()) => {
                        good_leg.get_or_insert(leg.index);
                    }
                    Err(e) => {
                        last_error = e;
                        bad_legs.push(leg.index);
                    }
                }
            }
            report.data_verified += 1;
            let Some(good) = good_leg else {
                report.stop_reason = format!("segment {}: {last_error}", h.segment_id);
                report.headers.truncate(i);
                break;
            };
            for bad in bad_legs {
                report.repairs.push(Repair {
                    segment_id: h.segment_id,
                    from_leg: good,
                    to_leg: bad,
                    len,
                });
            }
        }
    }
    // Leftovers past the head.
    let head = report.head_id();
    for id in head + 1..=head + TAIL_SCAN_SEGMENTS.min(n - 1) {
        let offset = segment_offset(slot_of(id, n));
        for leg in legs.all().iter().filter(|l| l.is_healthy()) {
            let header = &mut image[..SEGMENT_HEADER_SIZE_BYTES];
            if leg.device().read_at(header, offset).is_ok() {
                report.bytes_read += SEGMENT_HEADER_SIZE_BYTES as u64;
                if let Ok(h) = SegmentHeader::decode(header, &uuid) {
                    if h.segment_id > head && !report.stale_tail.contains(&h.segment_id) {
                        report.stale_tail.push(h.segment_id);
                    }
                }
            }
        }
    }
    report
}

/// A stable 16-byte fingerprint of a backing device's identity string.
pub fn backing_fingerprint(identity: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(4).enumerate() {
        let crc = crc32c::crc32c_append(i as u32 + 1, identity.as_bytes());
        chunk.copy_from_slice(&crc.to_le_bytes());
    }
    out
}

/// Checks that the cache belongs to this backing device and that the device did not shrink.
fn check_backing(sb: &Superblock, backing: &dyn Device, identity: &str) -> Result<()> {
    if sb.backing_fingerprint != backing_fingerprint(identity) {
        return Err(EngineError::refused(
            backing.name(),
            "the cache belongs to another backing device (identity differs from the one \
             recorded at create); refusing to replay its data here",
        ));
    }
    if backing.size_bytes() < sb.backing_size_bytes {
        return Err(EngineError::refused(
            backing.name(),
            format!(
                "backing device shrank from {} to {} bytes; cached blocks may lie beyond its end",
                sb.backing_size_bytes,
                backing.size_bytes()
            ),
        ));
    }
    Ok(())
}

/// Refuses adopted buffers that cannot be what a crashed predecessor left. Its buffers hold a
/// run of ids without a gap (released strictly in id order, begun one after the other): above
/// the checkpoint, starting at most one past the log head (no hole) and reaching at least the
/// head (every segment on the legs past the oldest buffer still had its buffer), within one lap
/// of the ring; and every entry addresses the device. Anything else is a damaged or planted
/// file, and adopting it would write its blocks into live log slots.
fn check_adopted(
    adopted: &[Adopted],
    report: &ScanReport,
    sb: &Superblock,
    path: &Path,
) -> Result<()> {
    let (Some(oldest), Some(newest)) = (adopted.first(), adopted.last()) else {
        return Ok(());
    };
    let (first, last) = (oldest.header.segment_id, newest.header.segment_id);
    let (written_back, head) = (report.written_back_id(), report.head_id());
    if first > head + 1 {
        return Err(EngineError::CacheFailed(format!(
            "RAM buffer file {} starts at segment {first} but the log ends at {head} ({}); \
             refusing to continue with a hole in the log",
            path.display(),
            report.stop_reason
        )));
    }
    let refuse = |reason: String| {
        EngineError::refused(
            format!("RAM buffer file {}", path.display()),
            format!(
                "{reason}; refusing to adopt it (nothing of it was written). Move it away to \
                 start without it: whatever it held is then lost"
            ),
        )
    };
    if let Some(w) = adopted
        .windows(2)
        .find(|w| w[1].header.segment_id != w[0].header.segment_id + 1)
    {
        return Err(refuse(format!(
            "holds segments {} and {} with nothing between them (a predecessor's buffers hold \
             consecutive ids)",
            w[0].header.segment_id, w[1].header.segment_id
        )));
    }
    if first <= written_back || last < head || last - written_back > sb.segment_count {
        return Err(refuse(format!(
            "holds segments {first}..={last}, outside what the log allows (written back through \
             {written_back}, head {head}, {} segments in the ring)",
            sb.segment_count
        )));
    }
    for a in adopted {
        check_adopted_addresses(a, sb.backing_size_bytes).map_err(refuse)?;
    }
    Ok(())
}

/// Every entry of an adopted segment lies inside the device (`size_bytes`).
fn check_adopted_addresses(a: &Adopted, size_bytes: u64) -> std::result::Result<(), String> {
    let sectors = size_bytes / logfmt::SECTOR_SIZE_BYTES as u64;
    for (i, e) in a.header.entries.iter().enumerate() {
        let end = e.start_sector.checked_add(e.length_sectors as u64);
        if end.is_none_or(|end| end > sectors) {
            return Err(format!(
                "segment {} entry {i} addresses sectors {}+{}, beyond the device's {sectors} \
                 sectors",
                a.header.segment_id, e.start_sector, e.length_sectors
            ));
        }
    }
    Ok(())
}

/// Opens a formatted cache: validates it against the backing device, replays the log, adopts a
/// crashed predecessor's RAM buffer, and starts the engine's threads.
pub fn open(
    leg_devices: Vec<Arc<dyn Device>>,
    backing: Arc<dyn Device>,
    backing_identity: &str,
    options: OpenOptions,
) -> Result<Engine> {
    assert!((2..=MAX_RAM_BUFFERS).contains(&options.ram_buffers));
    // A leg that cannot be read at all (a dead SSD) leaves a mirrored set degraded, not
    // unopenable; a leg that reads but does not validate is bad input and refused.
    let unreadable = unreadable_legs(&leg_devices);
    if unreadable.len() == leg_devices.len() {
        let (i, e) = &unreadable[0];
        return Err(EngineError::io(
            leg_devices[*i].name(),
            io::Error::new(e.kind(), e.to_string()),
        ));
    }
    let readable: Vec<usize> = (0..leg_devices.len())
        .filter(|i| !unreadable.iter().any(|(u, _)| u == i))
        .collect();
    let readable_devices: Vec<Arc<dyn Device>> =
        readable.iter().map(|&i| leg_devices[i].clone()).collect();
    let superblocks = read_superblocks(&readable_devices)?;
    let sb = superblocks[0].clone();
    if sb.leg_count as usize != leg_devices.len() {
        return Err(EngineError::refused(
            leg_devices[0].name(),
            format!(
                "cache set has {} legs but {} were given",
                sb.leg_count,
                leg_devices.len()
            ),
        ));
    }
    for (s, &i) in superblocks.iter().zip(&readable) {
        if s.leg_index as usize != i {
            return Err(EngineError::refused(
                leg_devices[i].name(),
                format!("is leg {} of its cache set, given as leg {i}", s.leg_index),
            ));
        }
    }
    check_backing(&sb, backing.as_ref(), backing_identity)?;
    let legs = CacheLegs::new(leg_devices);
    for (i, e) in &unreadable {
        log::error!("opening degraded: cache leg {i} cannot be read");
        legs.all()[*i].mark_failed(e);
    }
    let report = scan(&legs, &sb);
    let n = sb.segment_count;
    let uuid = sb.uuid;

    let (ram, adopted) = RamBuffers::open(&options.buffer_path, options.ram_buffers, &uuid)
        .map_err(|e| EngineError::io(options.buffer_path.display().to_string(), e))?;

    // Invalidate out-of-order leftovers past the head before anything new is logged.
    let head = report.head_id();
    let zero_header = AlignedBuf::new(SEGMENT_HEADER_SIZE_BYTES);
    for &id in &report.stale_tail {
        let owned_by_buffer = adopted.iter().any(|a| a.header.segment_id == id);
        if !owned_by_buffer {
            log::warn!("invalidating segment {id}: written out of order past the log head {head}");
        }
        legs.write_all(&zero_header, segment_offset(slot_of(id, n)))
            .map_err(|e| EngineError::CacheFailed(format!("invalidating stale segment: {e}")))?;
    }

    // Make the legs agree again: a torn copy on one leg is rewritten from the other.
    for r in &report.repairs {
        let mut copy = AlignedBuf::new(r.len);
        let offset = segment_offset(slot_of(r.segment_id, n));
        let all = legs.all();
        let repaired = all[r.from_leg]
            .device()
            .read_at(&mut copy, offset)
            .and_then(|()| all[r.to_leg].device().write_at(&copy, offset));
        match repaired {
            Ok(()) => log::warn!(
                "segment {} was torn on {}; rewritten from {}",
                r.segment_id,
                all[r.to_leg].device().name(),
                all[r.from_leg].device().name()
            ),
            Err(e) => all[r.to_leg].mark_failed(&e),
        }
    }

    let mut headers = report.headers.clone();
    // Adopt the predecessor's buffers: segments the log may not have yet. They must continue the
    // log without a gap (every id below the oldest buffer was on the legs when it was written).
    check_adopted(&adopted, &report, &sb, &options.buffer_path)?;
    for a in &adopted {
        let id = a.header.segment_id;
        let mut header = a.header.clone();
        header.durable_id = 0;
        let image = ram.image(a.buffer);
        // Rewrite the header in place with its checksums, then log the whole segment.
        let mut full = AlignedBuf::new(SEGMENT_SIZE_BYTES);
        full.copy_from_slice(image);
        header.encode_into(&mut full);
        let len = header.used_bytes();
        legs.write_all(&full[..len], segment_offset(slot_of(id, n)))
            .map_err(|e| EngineError::CacheFailed(format!("logging adopted segment {id}: {e}")))?;
        if id > head {
            headers.push(header);
        }
        log::info!(
            "adopted segment {id} ({} entries) from the RAM buffer file",
            a.header.entries.len()
        );
    }
    legs.flush_all()
        .map_err(|e| EngineError::CacheFailed(format!("flushing cache legs: {e}")))?;
    for a in &adopted {
        ram.release(a.buffer);
    }

    // Rebuild the in-memory state from the live segments, oldest first.
    let geometry = Geometry {
        uuid,
        segment_count: n,
        logical_block_size: sb.logical_block_size,
        device_size_bytes: sb.backing_size_bytes,
    };
    let mut map = BlockMap::with_capacity(geometry.capacity_blocks() as usize);
    let mut partial = HashMap::new();
    let mut zeros = ZeroRanges::default();
    let mut slots = vec![Slot::default(); n as usize];
    let mut epoch_id = report.checkpoint.map_or(0, |c| c.last_written_back_epoch);
    let now = Instant::now();
    for h in &headers {
        let slot = slot_of(h.segment_id, n);
        slots[slot as usize] = Slot {
            segment_id: h.segment_id,
            buffer: None,
            readers: 0,
            sealed_at: Some(now),
            used_bytes: h.used_bytes(),
        };
        epoch_id = epoch_id.max(h.epoch_id);
        for e in &h.entries {
            match e.kind {
                EntryKind::Data => {
                    let location = geometry.location(slot, e.data_slot as usize);
                    if let Some(old) = map.insert(e.block(), location) {
                        partial.remove(&old);
                    }
                    if e.sector_valid != ALL_SECTORS_VALID {
                        partial.insert(location, e.sector_valid);
                    }
                }
                EntryKind::Discard | EntryKind::WriteZeroes => {
                    let start = e.start_sector / SECTORS_PER_BLOCK as u64;
                    let end = (e.start_sector + e.length_sectors as u64) / SECTORS_PER_BLOCK as u64;
                    remove_map_range(&mut map, &mut partial, start, end);
                    zeros.insert(start, end, h.segment_id);
                }
            }
        }
    }
    let head = headers
        .last()
        .map_or(report.written_back_id(), |h| h.segment_id);
    let legs_count = legs.all().len();
    let checkpoint = report.checkpoint;
    let state = State {
        open: None,
        next_segment_id: head + 1,
        // A crash (or a clean stop) ends an epoch: nothing logged before it may be merged with
        // anything after it.
        epoch_id: epoch_id + 1,
        sealed_id: head,
        written_id: head,
        durable_id: head,
        written_back_id: report.written_back_id(),
        written_back_epoch: checkpoint.map_or(0, |c| c.last_written_back_epoch),
        checkpoint_sequence: checkpoint.map_or(0, |c| c.sequence),
        leg_written: vec![head; legs_count],
        leg_durable: vec![head; legs_count],
        map,
        partial,
        zeros,
        slots,
        free_buffers: (0..ram.count()).rev().collect(),
        writers_waiting: 0,
        drain_requested: false,
        shutting_down: false,
        failure: None,
        closing_log: false,
        passthrough: false,
        cache_lost_at: None,
        lost_generation: 0,
    };
    log::info!(
        "recovered cache {}: checkpoint {}, log head {head}, {} live segments, {} verified, read {} bytes ({})",
        hex(&uuid),
        report.written_back_id(),
        headers.len(),
        report.data_verified,
        report.bytes_read,
        report.stop_reason
    );
    let (log_tx, log_rx) = crossbeam_channel::unbounded();
    let shared = Arc::new(Shared {
        geometry,
        legs,
        backing,
        ram,
        state: Mutex::new(state),
        space_freed: Condvar::new(),
        progress: Condvar::new(),
        writeback_wakeup: Condvar::new(),
        log_jobs: log_tx,
        stats: Stats::default(),
        durable_hint: AtomicU64::new(head),
        started: Instant::now(),
        last_request_ns: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        sync_interval: options.sync_interval,
        policy: Mutex::new(None),
        superblock: sb.clone(),
        crc_cache: Default::default(),
        backing_gate: parking_lot::RwLock::new(()),
        writeback_fenced: AtomicBool::new(false),
        writeback_running: AtomicBool::new(false),
        last_writeback_error: Mutex::new(None),
        recovery: report,
    });
    Ok(Engine::start(shared, log_rx, options.writeback))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
