//! The read-only scan of the log: superblocks, the newest checkpoint, and every live segment
//! header from the checkpoint on, per leg. Recovery (`open::recover`) replays what it finds;
//! `wbctl check` and create's dirty-data guard print or test it without changing anything.
//!
//! The log is walked from the checkpoint (FORMAT.md §7): ids `W+1, W+2, …`, each at the position
//! the one before it leads to (`Position::next`), each chained to the header before it
//! (`prev_crc`), stopping at the first header that does not validate, does not carry the
//! expected id or does not chain (a torn write, a stale slot from an earlier lap, a gap, an
//! earlier run's leftover). Per position, the first leg whose copy validates and chains wins.

use std::io;
use std::sync::Arc;

use logfmt::{
    checkpoint_offset, stored_record_crc, Checkpoint, Position, SegmentHeader, Superblock,
    CHECKPOINT_SLOTS, CHECKPOINT_SLOT_SIZE_BYTES, SEGMENT_HEADER_SIZE_BYTES, SEGMENT_SIZE_BYTES,
    SLOT_BLOCKS, SUPERBLOCK_SIZE_BYTES,
};

use crate::device::{AlignedBuf, Device};
use crate::error::{EngineError, Result};
use crate::log::legs::CacheLegs;

/// What recovery found and did; also the result of a read-only scan.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    pub checkpoint: Option<Checkpoint>,
    /// Live segments replayed, oldest first.
    pub headers: Vec<SegmentHeader>,
    /// Where each of `headers` starts.
    pub positions: Vec<Position>,
    /// Where the segment after the head starts (the log's write position).
    pub next_position: Position,
    /// The record CRC of the head's header (the checkpoint's anchor when nothing is live): what
    /// the next segment's `prev_crc` must name.
    pub head_crc: u32,
    /// Segments whose data blocks were read and checked.
    pub data_verified: u64,
    /// Why the replay stopped after the last live segment.
    pub stop_reason: String,
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
    pub position: Position,
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
        let sb = Superblock::decode(&buf).map_err(|source| superblock_error(leg.name(), source))?;
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

/// Why a superblock does not decode, in words; a cache of another format version is named as
/// such, with what to do about it.
fn superblock_error(device: &str, source: logfmt::FormatError) -> EngineError {
    match source {
        logfmt::FormatError::UnsupportedVersion {
            record: "superblock",
            version,
        } => EngineError::refused(device, other_version_message(version)),
        source => EngineError::Format {
            device: device.to_string(),
            source,
        },
    }
}

/// What to do with a cache of on-disk format `version`.
pub fn other_version_message(version: u32) -> String {
    let this = logfmt::FORMAT_VERSION;
    if version < this {
        format!(
            "is a writeboost cache of on-disk format version {version}; this writeboost uses \
             version {this} (segments packed into slots) and cannot read it. Drain and delete it \
             with the writeboost release that created it (`wbctl delete --drain`), or re-create \
             it with --force (which discards whatever it holds)"
        )
    } else {
        format!(
            "is a writeboost cache of on-disk format version {version}, newer than this \
             writeboost's {this}: use the release that created it"
        )
    }
}

/// The format version of a leg whose superblock is a writeboost superblock of another version
/// than this build's (it may hold dirty data this build cannot read), or `None`.
pub fn other_format_version(leg: &dyn Device) -> Option<u32> {
    let mut buf = AlignedBuf::new(SUPERBLOCK_SIZE_BYTES);
    leg.read_at(&mut buf, 0).ok()?;
    match Superblock::decode(&buf) {
        Err(logfmt::FormatError::UnsupportedVersion {
            record: "superblock",
            version,
        }) => Some(version),
        _ => None,
    }
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
    report
}

/// Why no leg holds the header of the segment expected in a slot.
enum NoHeader {
    /// Torn, stale, missing or unreadable: the log ends before it.
    Ends(String),
    /// A later lap's segment: the slot was reused, so the checkpoint read is stale.
    LaterLap(u64),
}

/// Segments a walk may take at most: 64 per slot (a header and a data block each). It also ends
/// at a full lap (`scan_headers`); this bounds it however the positions fall.
pub fn max_walk(segment_count: u64) -> u64 {
    segment_count * (SLOT_BLOCKS / logfmt::MIN_SEGMENT_BLOCKS) as u64
}

/// The headers of the live segments, from the checkpoint on, until the first id no leg holds
/// at its place in the chain. Returns the newest durable id a header vouches for, or `None` (and
/// `checkpoint_error`) when the log shows the checkpoint is older than it.
fn scan_headers(
    legs: &CacheLegs,
    sb: &Superblock,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) -> Option<u64> {
    let checkpoint = report.checkpoint.expect("scanned from a checkpoint");
    let (n, first) = (sb.segment_count, report.written_back_id() + 1);
    let (mut at, mut prev) = (checkpoint.next_position, checkpoint.anchor_crc);
    (report.next_position, report.head_crc) = (at, prev);
    if at.slot >= n {
        report.checkpoint_error = Some(format!(
            "the checkpoint's log position (slot {}) lies beyond the ring of {n} slots",
            at.slot
        ));
        return None;
    }
    let mut newest_durable = 0u64;
    for id in first.. {
        if id - first >= max_walk(n) {
            report.stop_reason = "the whole ring is live".into();
            break;
        }
        match live_header(legs, sb, id, at, prev, image, report) {
            Ok((h, crc)) => {
                debug_assert_eq!(h.segment_id, id);
                newest_durable = newest_durable.max(h.durable_id);
                let next = at.next(h.used_blocks(), n);
                report.headers.push(h);
                report.positions.push(at);
                (report.next_position, report.head_crc) = (next, crc);
                // A full lap: the walk would enter the slot it started in from another one.
                if next.slot == checkpoint.next_position.slot && next.slot != at.slot {
                    report.stop_reason = "the whole ring is live".into();
                    break;
                }
                (at, prev) = (next, crc);
            }
            Err(NoHeader::Ends(why)) => {
                report.stop_reason = format!("segment {id}: {why}");
                break;
            }
            Err(NoHeader::LaterLap(found)) => {
                report.checkpoint_error = Some(format!(
                    "the newest valid checkpoint (segment {}) is older than the log: where \
                     segment {id} belongs, segment {found} sits, which vouches for segment {id} \
                     as durable (the newer checkpoints are damaged)",
                    report.written_back_id(),
                ));
                return None;
            }
        }
    }
    Some(newest_durable)
}

/// The header of segment `id` at `at`, chained to `prev`, from the first healthy leg whose copy
/// validates and chains; with its record CRC.
fn live_header(
    legs: &CacheLegs,
    sb: &Superblock,
    id: u64,
    at: Position,
    prev: u32,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) -> std::result::Result<(SegmentHeader, u32), NoHeader> {
    let mut last_error = String::from("no healthy leg");
    for leg in legs.all().iter().filter(|l| l.is_healthy()) {
        let header = &mut image[..SEGMENT_HEADER_SIZE_BYTES];
        if let Err(e) = leg.device().read_at(header, at.offset()) {
            last_error = e.to_string();
            continue;
        }
        report.bytes_read += SEGMENT_HEADER_SIZE_BYTES as u64;
        match SegmentHeader::decode_expecting(header, &sb.uuid, id) {
            Ok(h) if h.start_block == at.block && h.prev_crc == prev => {
                return Ok((h, stored_record_crc(header)))
            }
            Ok(h) if h.start_block != at.block => {
                last_error = format!(
                    "header names start block {}, not {}",
                    h.start_block, at.block
                )
            }
            // An earlier run's segment, in flight at its crash (FORMAT.md §7 rule 4).
            Ok(_) => last_error = "does not chain to the segment before it".into(),
            Err(e) => last_error = e.to_string(),
        }
        // A later lap's segment where the log should go on: the slot was reused, which happens
        // only after a checkpoint past `id` was durable. Such a segment was written after `id`
        // was on the legs and flushed, so it vouches for `id` as durable; an earlier run's
        // leftover, never durable, vouches for less than the head that run recovered to.
        if let Ok(h) = SegmentHeader::decode(header, &sb.uuid) {
            if h.segment_id > id && h.durable_id >= id {
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
        let (h, at) = (report.headers[i].clone(), report.positions[i]);
        report.data_verified += 1;
        match verify_copies(legs, sb, &h, at, image, report) {
            Ok((good, bad_legs)) => report
                .repairs
                .extend(bad_legs.into_iter().map(|bad| Repair {
                    segment_id: h.segment_id,
                    position: at,
                    from_leg: good,
                    to_leg: bad,
                    len: h.used_bytes(),
                })),
            Err(why) => {
                report.stop_reason = format!("segment {}: {why}", h.segment_id);
                // The log ends before it: the head is the one before, and the chain goes on
                // from there.
                report.next_position = at;
                report.head_crc = h.prev_crc;
                report.headers.truncate(i);
                report.positions.truncate(i);
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
    at: Position,
    image: &mut AlignedBuf,
    report: &mut ScanReport,
) -> std::result::Result<(usize, Vec<usize>), String> {
    let offset = at.offset();
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
                if other != *h {
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

    /// Writes an entry-less header of segment `id` of run `nonce` at `at` on `leg`, chained to
    /// `prev`; returns its record CRC and the next position.
    #[allow(clippy::too_many_arguments)]
    fn put_header(
        legs: &CacheLegs,
        sb: &Superblock,
        leg: usize,
        at: Position,
        id: u64,
        prev: u32,
        nonce: u64,
        durable_id: u64,
    ) -> (u32, Position) {
        let header = SegmentHeader {
            uuid: sb.uuid,
            segment_id: id,
            epoch_id: id,
            durable_id,
            flags: 0,
            start_block: at.block,
            run_nonce: nonce,
            prev_crc: prev,
            entries: Vec::new(),
        };
        let mut buf = AlignedBuf::new(SEGMENT_HEADER_SIZE_BYTES);
        let crc = header.encode_into(&mut buf);
        legs.all()[leg]
            .device()
            .write_at(&buf, at.offset())
            .unwrap();
        (crc, at.next(1, sb.segment_count))
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
        assert!(report.repairs.is_empty());
        assert_eq!(
            (report.next_position, report.head_crc),
            (Position::default(), 0)
        );
    }

    #[test]
    fn headers_are_taken_from_either_leg_along_the_chain_until_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let (legs, sb) = cache_set(dir.path());
        let (c1, p2) = put_header(&legs, &sb, 0, Position::default(), 1, 0, 7, 1);
        // Leg 0 lacks 2: leg 1's copy is taken.
        let (c2, p3) = put_header(&legs, &sb, 1, p2, 2, c1, 7, 2);
        // 3 never landed; 4 sits where it would have gone after a 3 of one block.
        let (_, p4) = (0, p3.next(1, sb.segment_count));
        put_header(&legs, &sb, 0, p4, 4, c2, 7, 4);
        let report = scan(&legs, &sb);
        let ids: Vec<u64> = report.headers.iter().map(|h| h.segment_id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(report.positions, vec![Position::default(), p2]);
        assert_eq!((report.next_position, report.head_crc), (p3, c2));
        assert!(
            report.stop_reason.starts_with("segment 3:"),
            "{}",
            report.stop_reason
        );
        assert_eq!(
            report.data_verified, 0,
            "every segment is vouched durable by its own header"
        );
    }

    /// An earlier run's segment with the expected id at the expected place, but chained to that
    /// run's header, is not taken (FORMAT.md §7 rule 4).
    #[test]
    fn an_earlier_runs_leftover_does_not_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (legs, sb) = cache_set(dir.path());
        let (c1, p2) = put_header(&legs, &sb, 0, Position::default(), 1, 0, 1, 1);
        // Run 1 wrote 2 and 3; 2 was lost, the chain of 3 names run 1's 2.
        let (old2, p3) = put_header(&legs, &sb, 0, p2, 2, c1, 1, 1);
        put_header(&legs, &sb, 0, p3, 3, old2, 1, 1);
        // Run 2 writes its own 2 over the lost one.
        put_header(&legs, &sb, 0, p2, 2, c1, 2, 1);
        let report = scan(&legs, &sb);
        assert_eq!(report.headers.len(), 2, "{}", report.stop_reason);
        assert_eq!(report.headers[1].run_nonce, 2, "run 2's segment 2");
        assert!(
            report.stop_reason.starts_with("segment 3:"),
            "{}",
            report.stop_reason
        );
        assert_eq!(
            report.checkpoint_error, None,
            "a leftover is not a later lap"
        );
    }

    #[test]
    fn a_later_lap_where_the_log_goes_on_means_the_checkpoint_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (legs, sb) = cache_set(dir.path());
        let n = sb.segment_count;
        // A later lap's segment vouches for the id the walk expects as durable.
        put_header(&legs, &sb, 0, Position::default(), 1 + n, 77, 3, n);
        let report = scan(&legs, &sb);
        let why = report.checkpoint_error.expect("a stale checkpoint");
        assert!(why.contains("older than the log"), "{why}");
        assert!(report.headers.is_empty());
    }
}
