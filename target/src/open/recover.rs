//! Recovery: from the cache legs (and a crashed daemon's RAM buffer file) back to a running
//! engine, in phases: open the legs → apply the fault record → walk the log (`log::scan`) →
//! repair torn mirror copies → adopt the RAM buffers → rebuild the state (`engine::replay`) →
//! start.
//!
//! The walk reads headers for every live segment; data blocks only for segments above the
//! newest `durable_id` a valid header vouches for — the few that may have been in flight
//! (CONTRACT §3). Per position, the first leg whose copy validates and chains wins (mirror).
//!
//! Segments an earlier run left past the head (in flight at its crash) are not invalidated: the
//! new run's headers carry its own nonce, and the chain never links one of them to a leftover
//! (FORMAT.md §7 rule 4).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use logfmt::{Checkpoint, Faults, Position, SegmentHeader, Superblock};

use crate::device::{AlignedBuf, Device};
use crate::engine::faults::{self, FaultFile};
use crate::engine::replay::Recovered;
use crate::engine::{Engine, Parts, Shared, State};
use crate::error::{EngineError, Result};
use crate::hex;
use crate::log::legs::CacheLegs;
use crate::log::ram_buffer::MAX_RAM_BUFFERS;
use crate::log::ram_buffer::{Adopted, RamBuffers};
use crate::log::scan::{
    max_walk, read_checkpoint, read_superblocks, scan, unreadable_legs, CheckpointRead, ScanReport,
};

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
    /// Folder of the host's copy of the fault record (`faults`): persistent storage, because a
    /// cache loss must be remembered across a reboot. `None`: the legs' copies only (then a
    /// loss with no writable leg refuses passthrough writes).
    pub fault_dir: Option<PathBuf>,
}

impl OpenOptions {
    /// Defaults; the fault record's file goes beside the buffer file (the daemon moves it to
    /// persistent storage).
    pub fn new(buffer_path: PathBuf) -> Self {
        OpenOptions {
            fault_dir: buffer_path.parent().map(Path::to_path_buf),
            buffer_path,
            ram_buffers: 16,
            sync_interval: Duration::from_secs(1),
            writeback: Some(writeback::Policy::default()),
        }
    }
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
    if first <= written_back || last < head || last - written_back > max_walk(sb.segment_count) {
        return Err(refuse(format!(
            "holds segments {first}..={last}, outside what the log allows (written back through \
             {written_back}, head {head}, {} slots in the ring)",
            sb.segment_count
        )));
    }
    for a in adopted {
        check_adopted_addresses(a, sb.backing_size_bytes).map_err(refuse)?;
    }
    adopted_positions(adopted, report, sb.segment_count)
        .map(|_| ())
        .map_err(refuse)
}

/// Where each adopted segment goes: the first where the log has (or would have) its id, each
/// next one behind the one before (`Position::next`). Each must start at the block its buffer
/// holds it at: the predecessor placed them so.
fn adopted_positions(
    adopted: &[Adopted],
    report: &ScanReport,
    n: u64,
) -> std::result::Result<Vec<Position>, String> {
    let first = adopted[0].header.segment_id;
    let index = (first - report.written_back_id() - 1) as usize;
    let mut at = report
        .positions
        .get(index)
        .copied()
        .unwrap_or(report.next_position);
    let mut positions = Vec::with_capacity(adopted.len());
    for a in adopted {
        if a.header.start_block != at.block {
            return Err(format!(
                "holds segment {} at block {} of its slot, where the log puts it at block {}",
                a.header.segment_id, a.header.start_block, at.block
            ));
        }
        positions.push(at);
        at = at.next(a.header.used_blocks(), n);
    }
    Ok(positions)
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

/// Opens a formatted cache: validates it against the backing device, applies the fault record
/// (failed legs stay out of use; a lost cache comes up in passthrough without its log), replays
/// the log, adopts a crashed predecessor's RAM buffer, and starts the engine's threads.
pub fn open(
    leg_devices: Vec<Arc<dyn Device>>,
    backing: Arc<dyn Device>,
    backing_identity: &str,
    options: OpenOptions,
) -> Result<Engine> {
    assert!((2..=MAX_RAM_BUFFERS).contains(&options.ram_buffers));
    let (legs, sb, incarnations) = open_legs(leg_devices)?;
    check_backing(&sb, backing.as_ref(), backing_identity)?;
    let fault_file = options
        .fault_dir
        .as_deref()
        .map(|dir| FaultFile::new(dir, &sb.uuid));
    let (checkpoint, _) = read_checkpoint(&legs, &sb.uuid);
    let (faults, on_record) = apply_fault_record(
        &legs,
        &sb.uuid,
        &incarnations,
        fault_file.as_ref(),
        &checkpoint,
    )?;
    if let Some(lost) = faults.cache_lost {
        // Past every checkpoint on any leg, the one `apply_fault_record` may have written
        // included: a later checkpoint with a lower sequence would lose to an older one at the
        // next start. (Without a loss, `scan` reads the newest back.)
        let checkpoint_sequence = checkpoint.as_ref().map_or(0, |c| c.sequence) + 1;
        let through = checkpoint
            .as_ref()
            .map_or(0, |c| c.last_written_back_id)
            .max(lost.log_through_id);
        let (place, anchor) = checkpoint.as_ref().map_or((Position::default(), 0), |c| {
            (c.next_position, c.anchor_crc)
        });
        let mut recovered = Recovered::empty(&sb, through, place, anchor);
        recovered.checkpoint_sequence = checkpoint_sequence;
        recovered.faults_recorded = on_record;
        return open_lost(
            legs,
            sb,
            backing,
            options,
            fault_file,
            recovered,
            (faults, lost),
        );
    }
    let report = scan(&legs, &sb);
    if let Some(why) = &report.checkpoint_error {
        return Err(EngineError::refused(
            legs.all()[0].device().name(),
            format!(
                "{why}; refusing to start: what was written back is unknown, and guessing would \
                 discard dirty data. Check the cache legs (`wbctl check`); re-create with --force \
                 only to give up what the cache holds"
            ),
        ));
    }
    let (ram, mut adopted) = RamBuffers::open(&options.buffer_path, options.ram_buffers, &sb.uuid)
        .map_err(|e| EngineError::io(options.buffer_path.display().to_string(), e))?;
    // A slot's buffer outlives segments of it that writeback already passed (the slot was not
    // closed yet): they are on the backing device, nothing to adopt.
    adopted.retain(|a| a.header.segment_id > report.written_back_id());
    // Before anything is written to the legs: a refused buffer file changes nothing.
    check_adopted(&adopted, &report, &sb, &options.buffer_path)?;
    repair_torn_copies(&legs, &report);
    let run_nonce: u64 = rand::random();
    let (log, place, head_crc) = adopt_buffers(&legs, &ram, &adopted, &report, &sb, run_nonce)?;
    let headers = log.len();
    let mut recovered = Recovered::replay(&sb, &log, &report, place, head_crc);
    recovered.run_nonce = run_nonce;
    recovered.faults_recorded = on_record;
    // Legs attached after a loss that no FLUSH reported yet: the error is still owed.
    recovered.flush_error_owed = flush_error_marker(&options).exists();
    log::info!(
        "recovered cache {}: checkpoint {}, log head {}, {} live segments, {} verified, read {} \
         bytes ({})",
        hex(&sb.uuid),
        report.written_back_id(),
        recovered.head,
        headers,
        report.data_verified,
        report.bytes_read,
        report.stop_reason
    );
    let engine = start(
        legs, backing, ram, sb, recovered, report, fault_file, options,
    );
    faults_on_record_then_release(engine)
}

/// Reads and checks the superblocks; a leg that cannot be read at all (a dead SSD) leaves a
/// mirrored set degraded, not unopenable; a leg that reads but does not validate is bad input.
/// Returns the legs, the set's superblock, and each leg's incarnation (`None`: unreadable).
fn open_legs(
    leg_devices: Vec<Arc<dyn Device>>,
) -> Result<(CacheLegs, Superblock, Vec<Option<u32>>)> {
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
    if sb.segment_count > crate::map::block_map::MAX_SLOTS {
        return Err(EngineError::refused(
            leg_devices[0].name(),
            format!(
                "cache ring of {} slots is larger than this build addresses ({})",
                sb.segment_count,
                crate::map::block_map::MAX_SLOTS
            ),
        ));
    }
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
    let mut incarnations = vec![None; leg_devices.len()];
    for (s, &i) in superblocks.iter().zip(&readable) {
        incarnations[i] = Some(s.leg_incarnation);
    }
    let legs = CacheLegs::new(leg_devices);
    for (i, e) in &unreadable {
        log::error!("opening degraded: cache leg {i} cannot be read");
        legs.all()[*i].mark_failed(e);
    }
    Ok((legs, sb, incarnations))
}

/// Takes the newest fault record (the legs' checkpoints, the host's file) and applies it: a leg
/// recorded as failed stays out of use, and after a cache loss every leg does. Records what
/// changed (legs unreadable now) before anything is written to the legs, and brings a copy that
/// is behind up to date. Returns the record now in force, and the record on record where every
/// later start looks (the same, unless the newest copy could not be made that durable: then
/// the engine's run-time guards treat the difference as not yet recorded).
fn apply_fault_record(
    legs: &CacheLegs,
    uuid: &[u8; 16],
    incarnations: &[Option<u32>],
    file: Option<&FaultFile>,
    checkpoint: &CheckpointRead,
) -> Result<(Faults, Faults)> {
    let from_file = match file {
        Some(f) => f
            .load()
            .map_err(|e| EngineError::io(f.path().display().to_string(), e))?,
        None => None,
    };
    let on_legs = checkpoint.as_ref().map_or(Faults::default(), |c| c.faults);
    let recorded = faults::newest(on_legs, from_file);
    // What is on record where every later start looks: with a fault file, what the file holds.
    // A failure or loss the legs' newest copy has beyond it may have been written to one leg
    // only (a record attempt that failed): it is recorded again below under the same rules as
    // at run time, or the engine starts with the file's record and its guards hold.
    let trusted = match file {
        Some(_) => from_file.unwrap_or_default(),
        None => recorded,
    };
    mark_recorded_failures(legs, incarnations, &recorded);
    if legs.healthy_count() == 0 && recorded.cache_lost.is_none() {
        return Err(EngineError::refused(
            legs.all()[0].device().name(),
            "no usable cache leg: every leg is unreadable or recorded as failed (a failed leg \
             may miss segments only the other one holds). Bring the unreadable leg back and \
             retry; re-create with --force only to give up what the cache holds",
        ));
    }
    let now = Faults {
        failed_legs: legs.failed_mask(),
        ..recorded
    };
    let changed = now != recorded;
    let any_fault = now.failed_legs != 0 || now.cache_lost.is_some();
    let file_behind = file.is_some() && from_file.map(|f| f.sequence) != Some(recorded.sequence);
    let legs_behind = on_legs.sequence != recorded.sequence;
    if !changed && !(any_fault && (file_behind || legs_behind)) {
        return Ok((recorded, recorded));
    }
    let next = Faults {
        sequence: recorded.sequence + 1,
        ..now
    };
    let record = fault_checkpoint(legs, uuid, checkpoint, next)?;
    match faults::persist(legs, file, &record, &trusted) {
        Ok(places) => {
            log::warn!(
                "fault record {} written to {}",
                next.sequence,
                places.join(", ")
            );
            Ok((next, next))
        }
        // A new failure must be on record before the legs that are left are written to.
        Err(e) if changed => Err(EngineError::CacheFailed(e.to_string())),
        Err(e) => {
            log::warn!("bringing the fault record's copies up to date: {e}");
            // Only what every start would find counts as recorded (newest sequence kept, so
            // the next record still wins).
            let on_record = Faults {
                sequence: recorded.sequence,
                ..trusted
            };
            Ok((recorded, on_record))
        }
    }
}

/// Takes out of use every leg the record says failed (all of them after a cache loss), and a
/// leg whose device is not the one the record names (an older device of a replaced leg).
fn mark_recorded_failures(legs: &CacheLegs, incarnations: &[Option<u32>], recorded: &Faults) {
    for leg in legs.all().iter().filter(|l| l.is_healthy()) {
        let current = recorded.leg_incarnations[leg.index];
        if let Some(found) = incarnations[leg.index].filter(|&i| i != current) {
            leg.mark_failed(&io::Error::other(format!(
                "device {found} of this leg, the set's is {current}: it was replaced and may \
                 miss what was written since (is the configuration or state file stale?)"
            )));
            continue;
        }
        if recorded.cache_lost.is_some() || recorded.leg_failed(leg.index) {
            leg.mark_failed(&io::Error::other(format!(
                "recorded as failed (fault record {}{})",
                recorded.sequence,
                if recorded.cache_lost.is_some() {
                    ": the whole cache was lost"
                } else {
                    ""
                }
            )));
        }
    }
}

/// The checkpoint that carries fault record `next`: written with the checkpoint of the legs
/// still trusted — a failed leg's (stale) one must not be copied onto the others. None trusted:
/// refused (what was written back is unknown), unless the cache is lost (its log is never
/// replayed; any sequence will do).
fn fault_checkpoint(
    legs: &CacheLegs,
    uuid: &[u8; 16],
    checkpoint: &CheckpointRead,
    next: Faults,
) -> Result<Checkpoint> {
    let trusted = read_checkpoint(legs, uuid).0;
    let base = match (&trusted, next.cache_lost) {
        (Ok(c), _) => *c,
        (Err(why), None) => {
            return Err(EngineError::refused(
                legs.all()[0].device().name(),
                format!("{why}; refusing to start: what was written back is unknown"),
            ))
        }
        (Err(_), Some(_)) => checkpoint.clone().unwrap_or(Checkpoint {
            uuid: *uuid,
            sequence: 0,
            last_written_back_id: 0,
            last_written_back_epoch: 0,
            faults: Faults::default(),
            next_position: Position::default(),
            anchor_crc: 0,
        }),
    };
    Ok(Checkpoint {
        uuid: *uuid,
        sequence: base.sequence + 1,
        last_written_back_id: next.cache_lost.map_or(base.last_written_back_id, |l| {
            l.log_through_id.max(base.last_written_back_id)
        }),
        last_written_back_epoch: base.last_written_back_epoch,
        faults: next,
        // A lost log's successor starts where the base's log would have gone on: nothing is
        // replayed, so any consistent position and anchor will do.
        next_position: base.next_position,
        anchor_crc: base.anchor_crc,
    })
}

/// A start after a recorded cache loss: the log is not replayed (the backing device was written
/// directly since), the RAM buffer's segments (part of that log) are dropped, every leg stays
/// out of use, and requests go straight to the backing device until new legs are attached.
fn open_lost(
    legs: CacheLegs,
    sb: Superblock,
    backing: Arc<dyn Device>,
    options: OpenOptions,
    fault_file: Option<FaultFile>,
    mut recovered: Recovered,
    (faults, lost): (Faults, logfmt::CacheLost),
) -> Result<Engine> {
    let (ram, adopted) = RamBuffers::open(&options.buffer_path, options.ram_buffers, &sb.uuid)
        .map_err(|e| EngineError::io(options.buffer_path.display().to_string(), e))?;
    log::error!(
        "CRITICAL: cache {} was lost (fault record {}): segments {}..={} are gone and are not \
         replayed; the backing device holds every segment up to id {}. Starting in \
         passthrough{}. Attach new legs with `wbctl replace` (each leg), or re-create the cache \
         with --force.",
        hex(&sb.uuid),
        faults.sequence,
        lost.backing_holds_id + 1,
        lost.log_through_id,
        lost.backing_holds_id,
        if adopted.is_empty() {
            String::new()
        } else {
            format!(
                "; {} segments of the lost log in the RAM buffer file dropped",
                adopted.len()
            )
        }
    );
    recovered.cache_lost = Some(lost);
    recovered.flush_error_owed = flush_error_marker(&options).exists();
    let report = ScanReport {
        stop_reason: "the cache was lost: its log is not replayed".into(),
        ..ScanReport::default()
    };
    let engine = start(
        legs, backing, ram, sb, recovered, report, fault_file, options,
    );
    faults_on_record_then_release(engine)
}

/// A leg that failed during recovery (repairing a torn copy,
/// logging adopted buffers) is on record before a FLUSH may complete on the others; where it
/// cannot be recorded, the engine does not start, and the adopted buffers stay in the buffer
/// file for the next try (the one leg that took them may be the one that does not return).
fn faults_on_record_then_release(engine: Engine) -> Result<Engine> {
    if let Err(e) = engine.shared.record_faults() {
        engine.abandon();
        return Err(EngineError::CacheFailed(format!(
            "a cache leg failed during start-up and its failure could not be recorded ({e}); not \
             starting, because a later start could take that leg for a good one. Make the fault \
             file writable or the leg readable, then start again"
        )));
    }
    // Every buffer the predecessor left is logged or given up (a lost log, or segments
    // writeback already passed); no segment of this run is open yet to own one.
    debug_assert!(engine.shared.state.lock().open.is_none());
    engine.shared.ram.release_all();
    Ok(engine)
}

/// Makes the legs agree again: a torn copy on one leg is rewritten from the other.
fn repair_torn_copies(legs: &CacheLegs, report: &ScanReport) {
    for r in &report.repairs {
        let mut copy = AlignedBuf::new(r.len);
        let offset = r.position.offset();
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
}

/// The live log after adoption: each header and where it starts, the write position after the
/// head, and the head's header CRC.
type AdoptedLog = (Vec<(SegmentHeader, Position)>, Position, u32);

/// Logs the predecessor's segments the log lacks (ids past the head), chained to the head and
/// stamped with this run's nonce, and returns the live log, adopted segments included. Those
/// the log holds already are not rewritten: a rewrite torn by a power cut could damage a segment
/// that a FLUSH made durable.
fn adopt_buffers(
    legs: &CacheLegs,
    ram: &RamBuffers,
    adopted: &[Adopted],
    report: &ScanReport,
    sb: &Superblock,
    run_nonce: u64,
) -> Result<AdoptedLog> {
    let head = report.head_id();
    let mut log: Vec<(SegmentHeader, Position)> = report
        .headers
        .iter()
        .cloned()
        .zip(report.positions.iter().copied())
        .collect();
    let (mut place, mut prev) = (report.next_position, report.head_crc);
    let positions = if adopted.is_empty() {
        Vec::new()
    } else {
        // `check_adopted` made sure they continue the log without a gap, where it goes on.
        adopted_positions(adopted, report, sb.segment_count).expect("checked")
    };
    for (a, &at) in adopted.iter().zip(&positions) {
        let id = a.header.segment_id;
        if id <= head {
            continue;
        }
        assert_eq!(at, place, "adopted segment {id} continues the log");
        let header = SegmentHeader {
            durable_id: 0,
            run_nonce,
            prev_crc: prev,
            ..a.header.clone()
        };
        let len = header.used_bytes();
        let mut full = AlignedBuf::new(len);
        full.copy_from_slice(ram.segment_bytes(a.buffer, header.start_block, len));
        prev = header.encode_into(&mut full);
        legs.write_all(&full, at.offset())
            .map_err(|e| EngineError::CacheFailed(format!("logging adopted segment {id}: {e}")))?;
        place = at.next(header.used_blocks(), sb.segment_count);
        log::info!(
            "adopted segment {id} ({} entries) from the RAM buffer file",
            header.entries.len()
        );
        log.push((header, at));
    }
    legs.flush_all()
        .map_err(|e| EngineError::CacheFailed(format!("flushing cache legs: {e}")))?;
    // The buffers are released by `open` once the legs that took them are on record.
    Ok((log, place, prev))
}

/// Where an engine owes a FLUSH error after a cache loss (beside the RAM buffer file, on tmpfs).
fn flush_error_marker(options: &OpenOptions) -> PathBuf {
    options.buffer_path.with_extension("flush-error")
}

/// Builds the engine from what recovery found and starts its threads.
#[allow(clippy::too_many_arguments)]
fn start(
    legs: CacheLegs,
    backing: Arc<dyn Device>,
    ram: RamBuffers,
    sb: Superblock,
    r: Recovered,
    report: ScanReport,
    fault_file: Option<FaultFile>,
    options: OpenOptions,
) -> Engine {
    for leg in legs.all() {
        // Every segment up to the head is on the legs already: nothing for the writers to do.
        leg.handled_id.store(r.head, Ordering::Release);
    }
    // A predecessor (killed) in passthrough — which needs a fault on record — may have
    // acknowledged writes it never flushed: this engine's first FLUSH flushes them too.
    let backing_unflushed =
        r.faults_recorded.failed_legs != 0 || r.faults_recorded.cache_lost.is_some();
    let chain = (r.head, r.head_crc);
    let run_nonce = r.run_nonce;
    let state = State::recovered(r, legs.all().len(), ram.count());
    let (shared, log_rx) = Shared::new(Parts {
        chain,
        run_nonce,
        flush_error_marker: flush_error_marker(&options),
        superblock: sb,
        legs,
        backing,
        ram,
        state,
        recovery: report,
        fault_file,
        sync_interval: options.sync_interval,
        backing_unflushed,
    });
    Engine::start(shared, log_rx, options.writeback)
}
