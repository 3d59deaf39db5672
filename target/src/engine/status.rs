//! What `wbctl status` reports of an engine: ids, counters, mode, legs, a recorded loss.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use writeback::Policy;

use crate::engine::{Engine, Shared, Slot, State};

#[derive(Debug, Clone, Default)]
pub struct SegmentIds {
    pub current_id: u64,
    pub last_flushed_id: u64,
    pub last_written_back_id: u64,
}

/// What a cache loss took, and what the backing device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLostStatus {
    /// The backing device holds every segment up to this id.
    pub backing_holds_id: u64,
    /// Segments `lost_from_id..=lost_through_id` are gone (none if `from > through`).
    pub lost_from_id: u64,
    pub lost_through_id: u64,
    /// Acknowledged bytes not yet written back that the loss took; unknown after a restart.
    pub lost_dirty_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct LegStatus {
    pub path: String,
    pub healthy: bool,
    pub read_errors: u64,
    pub write_errors: u64,
    pub repairs: u64,
}

#[derive(Debug, Clone, Default)]
pub struct EngineStatus {
    /// Data blocks the ring holds (127 per 512 KiB slot).
    pub capacity_bytes: u64,
    /// Ring space writers cannot use until writeback frees it: every slot holding a live segment
    /// counts in full (the slot is the unit writeback frees), in `capacity_bytes`' units.
    pub used_bytes: u64,
    /// What the live segments themselves occupy in the log: their headers and data blocks. The
    /// difference to `used_bytes` is the unused rest of the slots in use.
    pub log_bytes: u64,
    /// Blocks whose newest copy is in the cache only. `used_bytes − dirty_bytes` is space
    /// writeback frees without writing it (headers, superseded copies, slot tails).
    pub dirty_bytes: u64,
    pub segments: SegmentIds,
    /// How long the oldest data not yet written back has been in the cache (`None`: nothing
    /// waits for writeback). Segments found at start-up count from the engine's start.
    pub oldest_dirty_age: Option<Duration>,
    pub epoch_id: u64,
    pub legs: Vec<LegStatus>,
    /// Set while requests fail because a fault can be recorded nowhere a restart would look
    /// (`Shared::requests_failing`). Cleared once the record succeeds (the sync thread retries
    /// it).
    pub failure: Option<String>,
    /// mirrored | single | degraded | passthrough
    pub mode: String,
    /// Set when every leg was lost: the last segment id the backing device holds.
    pub cache_lost_at: Option<u64>,
    /// Set when every leg was lost (in this run or recorded by an earlier one).
    pub cache_lost: Option<CacheLostStatus>,
    /// The fault record's sequence (0: nothing ever failed).
    pub fault_record_sequence: u64,
    /// The host's copy of the fault record.
    pub fault_file: Option<String>,
    pub passthrough_writes: u64,
    pub map_bytes: u64,
    pub metadata_bytes: u64,
    pub reads: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub stall_ms: u64,
    pub written_back_bytes: u64,
    pub backing_write_ios: u64,
    pub backing_errors: u64,
    pub policy: Option<Policy>,
}

impl EngineStatus {
    /// The mode as `status` and the event hook show it: "failed" while `failure` is set.
    pub fn shown_mode(&self) -> &str {
        if self.failure.is_some() {
            "failed"
        } else {
            &self.mode
        }
    }
}

impl Shared {
    /// Why clients' requests fail now, if they do because a change of the fault record could not
    /// be written (status `failure`): out of passthrough, a leg failure not on record holds every
    /// FLUSH, which then fails (`flush_inner`); in passthrough, writes are refused while a cache
    /// loss is not on record (`faults_on_record`). A record that fails while nothing waits for it
    /// (a replaced leg's, in passthrough) fails no request, and is not a failure here.
    fn requests_failing(&self, state: &State) -> Option<String> {
        let why = state.fault_record_error.as_ref()?;
        if state.passthrough {
            return state
                .loss_unrecorded()
                .then(|| format!("the cache loss cannot be recorded: {why}; writes are refused"));
        }
        if !self.leg_failure_unrecorded(state) {
            return None;
        }
        state.unrecorded_failure()
    }
}

impl Engine {
    pub fn status(&self) -> EngineStatus {
        let s = &self.shared;
        let state = s.state.lock();
        let n = s.geometry.segment_count;
        // The ring is freed a slot at a time: a slot holding any live segment is used in full.
        let live_slots = state.slots_in_use();
        let block = logfmt::BLOCK_SIZE_BYTES as u64;
        EngineStatus {
            capacity_bytes: n * logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * block,
            used_bytes: live_slots * logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * block,
            log_bytes: state.log_bytes(),
            dirty_bytes: state.map.len() as u64 * block,
            segments: SegmentIds {
                current_id: state.next_segment_id - 1,
                last_flushed_id: state.durable_id,
                last_written_back_id: state.written_back_id,
            },
            oldest_dirty_age: state
                .oldest_dirty_since()
                .map(|t| Instant::now().saturating_duration_since(t)),
            epoch_id: state.epoch_id,
            legs: s
                .legs
                .all()
                .iter()
                .map(|l| LegStatus {
                    path: l.device().name().to_string(),
                    healthy: l.is_healthy(),
                    read_errors: l.read_errors.load(Ordering::Relaxed),
                    write_errors: l.write_errors.load(Ordering::Relaxed),
                    repairs: l.repairs.load(Ordering::Relaxed),
                })
                .collect(),
            failure: s.requests_failing(&state),
            mode: s.mode_name(&state).to_string(),
            cache_lost_at: state.cache_lost.map(|l| l.backing_holds_id),
            cache_lost: state.cache_lost.map(|l| CacheLostStatus {
                backing_holds_id: l.backing_holds_id,
                lost_from_id: l.backing_holds_id + 1,
                lost_through_id: l.log_through_id,
                lost_dirty_bytes: state.lost_dirty_blocks.map(|b| b * block),
            }),
            fault_record_sequence: state.faults_recorded.sequence,
            fault_file: s
                .fault_file
                .as_ref()
                .map(|f| f.path().display().to_string()),
            passthrough_writes: s.stats.passthrough_writes.load(Ordering::Relaxed),
            map_bytes: state.map.memory_bytes() as u64,
            // Everything kept per cached block or per segment: the map, the per-slot state, the
            // (rare) partial-copy masks and the pending zero ranges.
            metadata_bytes: (state.map.memory_bytes()
                + state.slots.len() * std::mem::size_of::<Slot>()
                + state.partial.capacity() * (std::mem::size_of::<(u32, u8)>() + 1)
                + state.zeros.len() * 48) as u64,
            reads: s.stats.reads.load(Ordering::Relaxed),
            read_hits: s.stats.read_hits.load(Ordering::Relaxed),
            read_misses: s.stats.read_misses.load(Ordering::Relaxed),
            writes: s.stats.writes.load(Ordering::Relaxed),
            write_bytes: s.stats.write_bytes.load(Ordering::Relaxed),
            flushes: s.stats.flushes.load(Ordering::Relaxed),
            stall_ms: s.stats.stall_ns.load(Ordering::Relaxed) / 1_000_000,
            written_back_bytes: s.stats.written_back_bytes.load(Ordering::Relaxed),
            backing_write_ios: s.stats.backing_write_ios.load(Ordering::Relaxed),
            backing_errors: s.stats.backing_errors.load(Ordering::Relaxed),
            policy: s.policy.lock().clone(),
        }
    }
}
