//! Writeback: replays sealed log segments onto the backing device strictly in segment-id order,
//! so that losing the whole cache leaves the backing device in a consistent older state (CONTRACT §2).
//!
//! The crate knows nothing of the engine's internals: it sees the cache through `CacheLog`, and
//! the engine (crate `wb-target`) implements that trait and runs `Writeback` on a thread named
//! `wb-writeback`. Data flows one way: log → this crate → backing device.

mod aligned;
mod policy;
mod replay;

pub use aligned::AlignedBuf;
pub use policy::{Policy, PolicyError, PressureCurve, Throttle, KNOBS};
pub use replay::{
    plan_batch, BackingOp, BatchPlan, Writeback, WritebackStats, MAX_BATCH_SEGMENTS,
    READS_IN_FLIGHT,
};

use std::io;
use std::time::{Duration, Instant};

use logfmt::SegmentHeader;

/// What writeback needs from the cache.
pub trait CacheLog: Send + Sync {
    /// Every segment with an id at or below this is written to every healthy cache leg.
    fn written_id(&self) -> u64;
    /// The checkpoint: every segment at or below this is on the (flushed) backing device.
    fn written_back_id(&self) -> u64;
    /// Epoch of segment `written_back_id` (0 if none).
    fn written_back_epoch(&self) -> u64;
    /// Reads segment `id` (header validated, every data block checked against its CRC) into
    /// `image`, which is `SEGMENT_SIZE_BYTES` long (writeback's are 4 KiB aligned, so they can be
    /// read into directly). Only the header and the data blocks it lists are meaningful after.
    /// Called from a second thread (read-ahead) while the first writes to the backing device.
    fn read_segment(&self, id: u64, image: &mut [u8]) -> io::Result<SegmentHeader>;
    /// Writes `bufs` back to back from `offset`, as one I/O where the backing device can.
    fn backing_write(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()>;
    fn backing_zero(&self, offset: u64, len: u64, discard: bool) -> io::Result<()>;
    fn backing_flush(&self) -> io::Result<()>;
    /// Records the checkpoint `through_id` (durably, on every leg) and then frees the segments
    /// up to it; `headers` are theirs, so the cache can drop their map entries.
    fn commit(&self, through_id: u64, epoch: u64, headers: &[SegmentHeader]) -> io::Result<()>;
    /// The current policy (knobs change at run time).
    fn policy(&self) -> Policy;
    /// Occupancy and activity, for the policy.
    fn activity(&self, now: Instant) -> Activity;
    /// Sleeps until there may be new work (a segment written, a knob changed, a drain asked) or
    /// `timeout` passes.
    fn wait_for_work(&self, timeout: Duration);
    fn is_shutting_down(&self) -> bool;
}

/// A snapshot of the cache for the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Activity {
    /// Segments holding data not yet written back.
    pub dirty_segments: u64,
    /// Segments the ring holds.
    pub capacity_segments: u64,
    /// Age of the oldest segment not yet written back (zero if none).
    pub oldest_dirty_age: Duration,
    /// Time since the last I/O request from users.
    pub idle_for: Duration,
    /// Writers are waiting for space.
    pub writers_waiting: bool,
    /// Someone asked for everything to be written back (`wbctl drain`, shutdown).
    pub drain_requested: bool,
    /// A cache leg is missing: what the cache holds has one copy; get it to the backing device.
    pub degraded: bool,
}

impl Activity {
    pub fn dirty_fraction(&self) -> f64 {
        self.dirty_segments as f64 / self.capacity_segments.max(1) as f64
    }
}
