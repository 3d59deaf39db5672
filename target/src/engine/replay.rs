//! Rebuilding the engine's state from the log: the map, zero ranges and slots of the live
//! segments, replayed oldest first from their headers (recovery reads them; see
//! `open::recover`), and the `State` an engine starts with on top of them.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use logfmt::{
    EntryKind, Faults, Position, SegmentHeader, Superblock, ALL_SECTORS_VALID, SECTORS_PER_BLOCK,
};

use crate::log::scan::ScanReport;
use crate::map::block_map::{BlockMap, Location};
use crate::map::zero_ranges::ZeroRanges;

use super::state::Placed;
use super::{remove_map_range, Geometry, Slot, State};

/// The engine's view of the log, rebuilt by recovery.
pub(crate) struct Recovered {
    pub map: BlockMap,
    pub partial: HashMap<Location, u8>,
    pub zeros: ZeroRanges,
    pub slots: Vec<Slot>,
    /// Where each live segment sits, oldest first.
    pub live: VecDeque<Placed>,
    /// Where the segment after the head goes.
    pub place: Position,
    /// The head's header CRC: the next segment's `prev_crc`.
    pub head_crc: u32,
    /// The record CRC of the header of `written_back_id` (the checkpoint's anchor).
    pub anchor_crc: u32,
    /// The nonce of the run that starts on this log (adoption already wrote with it).
    pub run_nonce: u64,
    /// The newest live segment (or the checkpoint when none is live).
    pub head: u64,
    pub epoch_id: u64,
    pub written_back_id: u64,
    pub written_back_epoch: u64,
    pub checkpoint_sequence: u64,
    pub faults_recorded: Faults,
    pub cache_lost: Option<logfmt::CacheLost>,
    pub flush_error_owed: bool,
}

impl Recovered {
    /// No live segment: everything up to `through` is written back (or lost); the next segment
    /// goes to `place`, chained to `anchor_crc`.
    pub(crate) fn empty(
        sb: &Superblock,
        through: u64,
        place: Position,
        anchor_crc: u32,
    ) -> Recovered {
        let capacity = sb.segment_count * logfmt::DATA_BLOCKS_PER_SEGMENT as u64;
        Recovered {
            map: BlockMap::with_capacity(capacity as usize),
            partial: HashMap::new(),
            zeros: ZeroRanges::default(),
            slots: vec![Slot::default(); sb.segment_count as usize],
            live: VecDeque::new(),
            place,
            head_crc: anchor_crc,
            anchor_crc,
            run_nonce: rand::random(),
            head: through,
            epoch_id: 0,
            written_back_id: through,
            written_back_epoch: 0,
            checkpoint_sequence: 0,
            faults_recorded: Faults::default(),
            cache_lost: None,
            flush_error_owed: false,
        }
    }

    /// The map, zero ranges, slots and placements of the live segments (`log`: each header and
    /// its position, oldest first, from the checkpoint on), the log going on at `place` chained
    /// to `head_crc`.
    pub(crate) fn replay(
        sb: &Superblock,
        log: &[(SegmentHeader, Position)],
        report: &ScanReport,
        place: Position,
        head_crc: u32,
    ) -> Recovered {
        let geometry = Geometry::of(sb);
        let checkpoint = report.checkpoint.expect("replayed from a checkpoint");
        let mut r = Recovered::empty(
            sb,
            report.written_back_id(),
            checkpoint.next_position,
            checkpoint.anchor_crc,
        );
        r.written_back_epoch = checkpoint.last_written_back_epoch;
        r.checkpoint_sequence = checkpoint.sequence;
        r.epoch_id = r.written_back_epoch;
        let now = Instant::now();
        for (h, at) in log {
            assert_eq!(h.segment_id, r.head + 1, "the log has consecutive ids");
            let slot = &mut r.slots[at.slot as usize];
            if !slot.in_use() {
                slot.first_id = h.segment_id;
            }
            slot.last_id = h.segment_id;
            r.live.push_back(Placed {
                position: *at,
                used_bytes: h.used_bytes(),
                sealed_at: Some(now),
            });
            r.epoch_id = r.epoch_id.max(h.epoch_id);
            r.head = h.segment_id;
            for e in &h.entries {
                r.apply(&geometry, e, h.segment_id, *at);
            }
        }
        (r.place, r.head_crc) = (place, head_crc);
        r
    }

    fn apply(&mut self, geometry: &Geometry, e: &logfmt::Entry, segment_id: u64, at: Position) {
        match e.kind {
            EntryKind::Data => {
                let location = geometry.location(at, e.data_slot as usize);
                if let Some(old) = self.map.insert(e.block(), location) {
                    self.partial.remove(&old);
                }
                if e.sector_valid != ALL_SECTORS_VALID {
                    self.partial.insert(location, e.sector_valid);
                }
            }
            EntryKind::Discard | EntryKind::WriteZeroes => {
                let start = e.start_sector / SECTORS_PER_BLOCK as u64;
                let end = (e.start_sector + e.length_sectors as u64) / SECTORS_PER_BLOCK as u64;
                remove_map_range(&mut self.map, &mut self.partial, start, end);
                self.zeros.insert(start, end, segment_id);
            }
        }
    }
}

impl State {
    /// The state of an engine opened on a recovered log: everything up to the head is on the
    /// legs (sealed, written, durable), nothing is open, and a new epoch begins.
    pub(crate) fn recovered(r: Recovered, legs_count: usize, buffers: usize) -> State {
        let head = r.head;
        let state = State {
            open: None,
            next_segment_id: head + 1,
            // A crash (or a clean stop) ends an epoch: nothing logged before it may be merged with
            // anything after it.
            epoch_id: r.epoch_id + 1,
            sealed_id: head,
            written_id: head,
            durable_id: head,
            written_back_id: r.written_back_id,
            written_back_epoch: r.written_back_epoch,
            checkpoint_sequence: r.checkpoint_sequence.max(r.faults_recorded.sequence),
            leg_written: vec![head; legs_count],
            leg_durable: vec![head; legs_count],
            sealed_log_bytes: r.live.iter().map(|p| p.used_bytes as u64).sum(),
            live: r.live,
            place: r.place,
            anchor_crc: Some(r.anchor_crc),
            map: r.map,
            partial: r.partial,
            zeros: r.zeros,
            slots: r.slots,
            free_buffers: (0..buffers).rev().collect(),
            writers_waiting: 0,
            drain_requested: false,
            shutting_down: false,
            closing_log: false,
            replacing_legs: 0,
            passthrough: r.cache_lost.is_some(),
            cache_lost: r.cache_lost,
            lost_dirty_blocks: None,
            lost_generation: 0,
            // Conservative: a loss reports every write this engine did not see covered by a FLUSH.
            flushed_id: r.written_back_id,
            flush_error_owed: r.flush_error_owed,
            logged_writes: 0,
            writes_sealed: 0,
            flush_mark: 0,
            epoch_ended_writes: 0,
            commit_target: 0,
            lost_writes_mark: 0,
            faults_recorded: r.faults_recorded,
            leg_incarnations: r.faults_recorded.leg_incarnations,
            fault_record_error: None,
        };
        state.check_invariants();
        state
    }
}
