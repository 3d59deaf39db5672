//! The read-only scan of the log: superblocks, the newest checkpoint, and every live segment
//! header from the checkpoint on, per leg. Recovery (`open::recover`) replays what it finds;
//! `wbctl check` and create's dirty-data guard print or test it without changing anything.
//!
//! The log is scanned from the checkpoint: ids `W+1, W+2, …` in their slots, stopping at the
//! first header that does not validate or does not carry the expected id (a torn write, a stale
//! slot from an earlier lap, a gap). Per slot, the first leg whose copy validates wins (mirror).

use std::io;
use std::sync::Arc;

use logfmt::{
    checkpoint_offset, segment_offset, slot_of, Checkpoint, SegmentHeader, Superblock,
    CHECKPOINT_SLOTS, CHECKPOINT_SLOT_SIZE_BYTES, SEGMENT_HEADER_SIZE_BYTES, SEGMENT_SIZE_BYTES,
    SUPERBLOCK_SIZE_BYTES,
};

use crate::device::{AlignedBuf, Device};
use crate::error::{EngineError, Result};
use crate::log::legs::CacheLegs;
use crate::log::ram_buffer::MAX_RAM_BUFFERS;

/// Slots past the replayed head that are checked for out-of-order leftovers. Bounded by the
/// segments that can be in flight at once (`MAX_RAM_BUFFERS`), with margin.
pub const TAIL_SCAN_SEGMENTS: u64 = 2 * MAX_RAM_BUFFERS as u64;

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
    /// Why the checkpoint (and so the log's start) cannot be trusted; nothing past it was read.
    pub checkpoint_error: Option<String>,
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
pub(crate) fn unreadable_legs(legs: &[Arc<dyn Device>]) -> Vec<(usize, io::Error)> {
    legs.iter()
        .enumerate()
        .filter_map(|(i, leg)| {
            let mut buf = AlignedBuf::new(SUPERBLOCK_SIZE_BYTES);
            leg.read_at(&mut buf, 0).err().map(|e| (i, e))
        })
        .collect()
}

/// The newest valid checkpoint over the healthy legs, or why there is none. A formatted cache
/// always has one (format writes sequence 0), so none at all means the rings are unreadable or
/// damaged on every leg: the written-back id is unknown, and guessing 0 would discard every dirty
/// block of a wrapped ring (recovery refuses, as for a bad superblock).
pub fn read_checkpoint(legs: &CacheLegs, uuid: &[u8; 16]) -> (CheckpointRead, u64) {
    let mut found: Option<Checkpoint> = None;
    let mut problems = Vec::new();
    let mut bytes_read = 0;
    let mut ring = AlignedBuf::new(CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES);
    for leg in legs.all().iter().filter(|l| l.is_healthy()) {
        let name = leg.device().name().to_string();
        if let Err(e) = leg.device().read_at(&mut ring, checkpoint_offset(0)) {
            problems.push(format!("{name}: checkpoint ring unreadable: {e}"));
            continue;
        }
        bytes_read += ring.len() as u64;
        match Checkpoint::newest_in_ring(&ring, uuid) {
            Some(c) if found.is_none_or(|old| c.sequence > old.sequence) => found = Some(c),
            Some(_) => {}
            None => problems.push(format!("{name}: no valid checkpoint in the ring")),
        }
    }
    let read = match found {
        Some(c) => Ok(c),
        None if problems.is_empty() => Err("no healthy leg to read the checkpoint from".into()),
        None => Err(problems.join("; ")),
    };
    (read, bytes_read)
}

/// The newest checkpoint, or why none could be read (`read_checkpoint`).
pub type CheckpointRead = std::result::Result<Checkpoint, String>;

/// Reads the log of a cache set without changing anything.
pub fn scan(legs: &CacheLegs, sb: &Superblock) -> ScanReport {
    let mut report = ScanReport::default();
    let (checkpoint, bytes_read) = read_checkpoint(legs, &sb.uuid);
    report.bytes_read += bytes_read;
    match checkpoint {
        Ok(c) => report.checkpoint = Some(c),
        Err(why) => {
            report.checkpoint_error = Some(why);
            return report;
        }
    }
    let mut image = AlignedBuf::new(SEGMENT_SIZE_BYTES);
    // Headers first: they say which ids the legs vouch for as complete and flushed.
    let Some(newest_durable) = scan_headers(legs, sb, &mut image, &mut report) else {
        return report;
    };
    verify_unvouched_data(legs, sb, newest_durable, &mut image, &mut report);
    find_stale_tail(legs, sb, &mut image, &mut report);
    report
}

/// Why no leg holds the header of the segment expected in a slot.
enum NoHeader {
    /// Torn, stale, missing or unreadable: the log ends before it.
    Ends(String),
    /// A later lap's segment: the slot was reused, so the checkpoint read is stale.
    LaterLap(u64),
}

/// The headers of the live segments, from the checkpoint on, until the first id no leg holds.
/// Returns the newest durable id a header vouches for, or `None` (and `checkpoint_error`) when
/// the log shows the checkpoint is older than it.
fn scan_headers(
    legs: &CacheLegs,
    sb: &Superblock,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) -> Option<u64> {
    let (n, first) = (sb.segment_count, report.written_back_id() + 1);
    let mut newest_durable = 0u64;
    for id in first.. {
        if id - first >= n {
            report.stop_reason = "the whole ring is live".into();
            break;
        }
        match live_header(legs, sb, id, image, report) {
            Ok(h) => {
                debug_assert_eq!(h.segment_id, id);
                newest_durable = newest_durable.max(h.durable_id);
                report.headers.push(h);
            }
            Err(NoHeader::Ends(why)) => {
                report.stop_reason = format!("segment {id}: {why}");
                break;
            }
            Err(NoHeader::LaterLap(found)) => {
                report.checkpoint_error = Some(format!(
                    "the newest valid checkpoint (segment {}) is older than the log: slot of \
                     segment {id} holds segment {found} (the newer checkpoints are damaged)",
                    report.written_back_id(),
                ));
                return None;
            }
        }
    }
    Some(newest_durable)
}

/// The header of segment `id` from the first healthy leg whose copy validates.
fn live_header(
    legs: &CacheLegs,
    sb: &Superblock,
    id: u64,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) -> std::result::Result<SegmentHeader, NoHeader> {
    let n = sb.segment_count;
    let offset = segment_offset(slot_of(id, n));
    let mut last_error = String::from("no healthy leg");
    for leg in legs.all().iter().filter(|l| l.is_healthy()) {
        let header = &mut image[..SEGMENT_HEADER_SIZE_BYTES];
        if let Err(e) = leg.device().read_at(header, offset) {
            last_error = e.to_string();
            continue;
        }
        report.bytes_read += SEGMENT_HEADER_SIZE_BYTES as u64;
        match SegmentHeader::decode_expecting(header, &sb.uuid, id) {
            Ok(h) => return Ok(h),
            Err(e) => last_error = e.to_string(),
        }
        // A later lap's segment where the log should go on: the slot was reused, which happens
        // only after a checkpoint past `id` was durable. The checkpoint read is older than
        // that one: trusting it would discard the live log as leftovers.
        if let Ok(h) = SegmentHeader::decode(header, &sb.uuid) {
            if h.segment_id > id && slot_of(h.segment_id, n) == slot_of(id, n) {
                return Err(NoHeader::LaterLap(h.segment_id));
            }
        }
    }
    Err(NoHeader::Ends(last_error))
}

/// The data of every segment no later header vouches for as durable, on every leg: the legs
/// lost power independently, so one may hold a torn copy where the other holds a whole one
/// (a repair). The log ends before the first segment no leg holds whole.
fn verify_unvouched_data(
    legs: &CacheLegs,
    sb: &Superblock,
    newest_durable: u64,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) {
    let Some(cut) = report
        .headers
        .iter()
        .position(|h| h.segment_id > newest_durable)
    else {
        return;
    };
    for i in cut..report.headers.len() {
        let h = report.headers[i].clone();
        report.data_verified += 1;
        match verify_copies(legs, sb, &h, image, report) {
            Ok((good, bad_legs)) => report
                .repairs
                .extend(bad_legs.into_iter().map(|bad| Repair {
                    segment_id: h.segment_id,
                    from_leg: good,
                    to_leg: bad,
                    len: h.used_bytes(),
                })),
            Err(why) => {
                report.stop_reason = format!("segment {}: {why}", h.segment_id);
                report.headers.truncate(i);
                break;
            }
        }
    }
}

/// Reads segment `h` whole from every healthy leg: the first leg whose copy matches `h` and
/// its data CRCs, and the legs whose copy does not; or the last reason when none does.
fn verify_copies(
    legs: &CacheLegs,
    sb: &Superblock,
    h: &SegmentHeader,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) -> std::result::Result<(usize, Vec<usize>), String> {
    let offset = segment_offset(slot_of(h.segment_id, sb.segment_count));
    let len = h.used_bytes();
    let (mut good_leg, mut bad_legs, mut last_error) = (None, Vec::new(), String::new());
    for leg in legs.all().iter().filter(|l| l.is_healthy()) {
        if let Err(e) = leg.device().read_at(&mut image[..len], offset) {
            last_error = e.to_string();
            bad_legs.push(leg.index);
            continue;
        }
        report.bytes_read += len as u64;
        let verdict = SegmentHeader::decode_expecting(image, &sb.uuid, h.segment_id)
            .map_err(|e| e.to_string())
            .and_then(|other| {
                if other.entries != h.entries || other.epoch_id != h.epoch_id {
                    return Err("header differs between legs".to_string());
                }
                h.verify_data(image).map_err(|e| e.to_string())
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
    good_leg.map(|good| (good, bad_legs)).ok_or(last_error)
}

/// Valid headers with ids past the head in the slots after it: segments written out of order
/// before a crash, never durable (recovery invalidates them before logging anything new).
fn find_stale_tail(
    legs: &CacheLegs,
    sb: &Superblock,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) {
    let (n, head) = (sb.segment_count, report.head_id());
    for id in head + 1..=head + TAIL_SCAN_SEGMENTS.min(n - 1) {
        let offset = segment_offset(slot_of(id, n));
        for leg in legs.all().iter().filter(|l| l.is_healthy()) {
            let header = &mut image[..SEGMENT_HEADER_SIZE_BYTES];
            if leg.device().read_at(header, offset).is_err() {
                continue;
            }
            report.bytes_read += SEGMENT_HEADER_SIZE_BYTES as u64;
            if let Ok(h) = SegmentHeader::decode(header, &sb.uuid) {
                if h.segment_id > head && !report.stale_tail.contains(&h.segment_id) {
                    report.stale_tail.push(h.segment_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::FileDevice;

    /// A fresh cache set of two 16 MiB legs (files in `dir`) and its superblock.
    fn cache_set(dir: &std::path::Path) -> (CacheLegs, Superblock) {
        let file = |name: &str, size: u64| -> Arc<dyn Device> {
            let path = dir.join(name);
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            Arc::new(FileDevice::open(&path).unwrap())
        };
        let legs = vec![file("leg0", 16 << 20), file("leg1", 16 << 20)];
        let backing = file("backing", 64 << 20);
        let options = crate::open::create::FormatOptions {
            logical_block_size: 4096,
            force: false,
        };
        let sb = crate::open::create::format(&legs, backing.as_ref(), "b", &options).unwrap();
        (CacheLegs::new(legs), sb)
    }

    /// Writes an entry-less header of segment `id` into the slot of `slot_id` on `leg`.
    fn put_header(legs: &CacheLegs, sb: &Superblock, leg: usize, slot_id: u64, id: u64) {
        let header = SegmentHeader {
            uuid: sb.uuid,
            segment_id: id,
            epoch_id: id,
            durable_id: id,
            flags: 0,
            entries: Vec::new(),
        };
        let mut buf = AlignedBuf::new(SEGMENT_HEADER_SIZE_BYTES);
        header.encode_into(&mut buf);
        let offset = segment_offset(slot_of(slot_id, sb.segment_count));
        legs.all()[leg].device().write_at(&buf, offset).unwrap();
    }

    #[test]
    fn a_fresh_cache_has_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let (legs, sb) = cache_set(dir.path());
        let report = scan(&legs, &sb);
        assert_eq!(report.checkpoint_error, None);
        assert!(report.headers.is_empty());
        assert!(
            report.stop_reason.starts_with("segment 1:"),
            "{}",
            report.stop_reason
        );
        assert!(report.stale_tail.is_empty() && report.repairs.is_empty());
    }

    #[test]
    fn headers_are_taken_from_either_leg_until_a_gap_and_leftovers_past_it_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (legs, sb) = cache_set(dir.path());
        put_header(&legs, &sb, 0, 1, 1);
        put_header(&legs, &sb, 1, 2, 2); // leg 0 lacks it: leg 1's copy is taken
        put_header(&legs, &sb, 0, 4, 4); // after the gap at 3: a leftover
        let report = scan(&legs, &sb);
        let ids: Vec<u64> = report.headers.iter().map(|h| h.segment_id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!(
            report.stop_reason.starts_with("segment 3:"),
            "{}",
            report.stop_reason
        );
        assert_eq!(report.stale_tail, vec![4]);
        assert_eq!(
            report.data_verified, 0,
            "every segment is vouched durable by its own header"
        );
    }

    #[test]
    fn a_later_lap_where_the_log_goes_on_means_the_checkpoint_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (legs, sb) = cache_set(dir.path());
        let n = sb.segment_count;
        put_header(&legs, &sb, 0, 1, 1 + n);
        let report = scan(&legs, &sb);
        let why = report.checkpoint_error.expect("a stale checkpoint");
        assert!(why.contains("older than the log"), "{why}");
        assert!(report.headers.is_empty());
    }
}
