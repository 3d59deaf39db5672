//! Starting and stopping an engine's threads, the writeback seam (`CacheLog`), drain and status.
//!
//! Threads: `wb-log` and `wb-log-leg<i>` (log writer), `wb-sync` (seals an open segment once the
//! sync interval passes), `wb-writeback` (ordered replay onto the backing device).
//! Every shutdown path seals and flushes the log before the threads stop.

use std::cell::Cell;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use logfmt::{checkpoint_offset, segment_offset, slot_of, Checkpoint, EntryKind, SegmentHeader};
use parking_lot::Mutex;
use writeback::{Activity, CacheLog, Policy, Writeback};

use crate::device::AlignedBuf;
use crate::engine::{Engine, Shared, Slot};
use crate::error::{EngineError, Result};
use crate::log::writer::LogJob;

/// How often `wb-sync` looks at the open segment.
const SYNC_TICK: Duration = Duration::from_millis(50);
/// Pause before writeback retries after a failed batch.
const WRITEBACK_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A drain returns an error once writeback has failed this many times in a row (about as many
/// seconds: `WRITEBACK_RETRY_PAUSE`) without writing anything back, instead of waiting forever
/// on a backing device that is gone. Writeback itself keeps retrying.
const DRAIN_GIVES_UP_AFTER_ERRORS: u64 = 5;

/// One run of the writeback loop. A panic in it (a bug) becomes an error like any other: the
/// thread logs it, counts it (status, a drain that gives up) and starts again from the
/// checkpoint, instead of dying unnoticed while the cache fills and writers stall.
fn run_writeback(s: &Arc<Shared>) -> std::result::Result<(), String> {
    let log: Arc<dyn CacheLog> = s.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Writeback::new(log).run())) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|m| m.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            Err(format!("the writeback thread panicked: {what}"))
        }
    }
}

impl Engine {
    pub(crate) fn start(
        shared: Arc<Shared>,
        log_jobs: Receiver<LogJob>,
        policy: Option<Policy>,
    ) -> Engine {
        let mut threads = crate::log::writer::start(&shared, log_jobs);
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("wb-sync".into())
                .spawn(move || {
                    while !s.stopping.load(Ordering::Acquire) {
                        // Parked, not asleep: `stop_threads` unparks it, so a stop does not
                        // wait for the tick.
                        std::thread::park_timeout(SYNC_TICK);
                        s.seal_if_stale();
                        // Failures noticed by reads or checkpoint writes (the log writer records
                        // its own at once); a FLUSH waits for them to be on record.
                        let _ = s.record_faults();
                        s.check_mode_transition(&mut s.state.lock());
                    }
                })
                .expect("spawn wb-sync"),
        );
        if let Some(policy) = policy {
            *shared.policy.lock() = Some(policy);
            shared.writeback_running.store(true, Ordering::Release);
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("wb-writeback".into())
                    .spawn(move || {
                        // A failed batch (a cache read that no leg could serve, a checkpoint no
                        // leg took, the cache lost mid-batch) is retried from the checkpoint:
                        // writing a segment back twice is harmless.
                        while !s.stopping.load(Ordering::Acquire) {
                            match run_writeback(&s) {
                                Ok(()) => break,
                                Err(e) => {
                                    log::error!("writeback: {e}; retrying from the checkpoint");
                                    *s.last_writeback_error.lock() = Some(e.to_string());
                                    s.stats.writeback_errors.fetch_add(1, Ordering::Relaxed);
                                    // Legs may have been taken out by read errors: settle the
                                    // mode (every leg gone → passthrough, waiting writers go on).
                                    s.recompute_log_progress(&mut s.state.lock());
                                    let _ = s.record_faults();
                                    s.wait_for_work(WRITEBACK_RETRY_PAUSE);
                                }
                            }
                        }
                    })
                    .expect("spawn wb-writeback"),
            );
        }
        Engine {
            shared,
            threads: Mutex::new(threads),
        }
    }

    /// Seals and flushes the log, then stops every thread. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        let flushed = {
            let failed = self.shared.state.lock().failure.is_some();
            if failed || self.shared.stopping.load(Ordering::Acquire) {
                Ok(())
            } else {
                self.shared.flush_internal()
            }
        };
        self.stop_threads();
        flushed
    }

    /// Stops the threads without flushing: what a killed daemon leaves behind (tests).
    pub fn abandon(&self) {
        self.stop_threads();
    }

    fn stop_threads(&self) {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut state = self.shared.state.lock();
            state.shutting_down = true;
        }
        self.shared.space_freed.notify_all();
        self.shared.progress.notify_all();
        self.shared.writeback_wakeup.notify_all();
        let mut threads = std::mem::take(&mut *self.threads.lock());
        // Sync and writeback stop first (they may still hand jobs to the log writer).
        let log_threads: Vec<JoinHandle<()>> = threads
            .extract_if(.., |t| {
                t.thread().name().is_some_and(|n| n.starts_with("wb-log"))
            })
            .collect();
        for t in &threads {
            t.thread().unpark();
        }
        for t in threads {
            let _ = t.join();
        }
        let _ = self.shared.log_jobs.send(LogJob::Stop);
        for t in log_threads {
            let _ = t.join();
        }
    }

    /// Writes everything back; `progress` is called about every `interval` with the blocks and
    /// segments left. Returns when the cache is clean.
    pub fn drain(
        &self,
        interval: Duration,
        mut progress: impl FnMut(&DrainProgress),
    ) -> Result<()> {
        self.shared.flush_internal()?;
        let started = Instant::now();
        let first = self.status();
        let writeback_errors = || self.shared.stats.writeback_errors.load(Ordering::Relaxed);
        // (written-back id, writeback errors) when writeback last made progress.
        let mut last_progress = (first.segments.last_written_back_id, writeback_errors());
        let mut state = self.shared.state.lock();
        state.drain_requested = true;
        self.shared.writeback_wakeup.notify_all();
        let result = loop {
            if let Some(why) = &state.failure {
                break Err(EngineError::CacheFailed(why.clone()));
            }
            if state.shutting_down {
                break Err(EngineError::ShuttingDown);
            }
            if state.written_back_id != last_progress.0 {
                last_progress = (state.written_back_id, writeback_errors());
            }
            let errors = writeback_errors() - last_progress.1;
            if errors >= DRAIN_GIVES_UP_AFTER_ERRORS {
                let last = self.shared.last_writeback_error.lock().clone();
                break Err(EngineError::WritebackStuck {
                    errors,
                    last: last.unwrap_or_default(),
                });
            }
            let left = state.sealed_id - state.written_back_id;
            if left == 0 && state.open.is_none() {
                break Ok(());
            }
            if state.open.is_some() && left == 0 {
                // Writes arrived during the drain: seal them too.
                self.shared
                    .seal(&mut state, crate::engine::SealReason::Timer);
            }
            let done = state
                .written_back_id
                .saturating_sub(first.segments.last_written_back_id);
            let p = DrainProgress {
                segments_left: left,
                segments_done: done,
                elapsed: started.elapsed(),
            };
            drop(state);
            progress(&p);
            std::thread::sleep(interval.min(Duration::from_millis(200)));
            state = self.shared.state.lock();
        };
        state.drain_requested = false;
        drop(state);
        result
    }

    pub fn status(&self) -> EngineStatus {
        let s = &self.shared;
        let state = s.state.lock();
        let n = s.geometry.segment_count;
        let live = state.sealed_id - state.written_back_id + state.open.is_some() as u64;
        let block = logfmt::BLOCK_SIZE_BYTES as u64;
        EngineStatus {
            capacity_bytes: n * logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * block,
            used_bytes: live * logfmt::DATA_BLOCKS_PER_SEGMENT as u64 * block,
            dirty_bytes: state.map.len() as u64 * block,
            segments: SegmentIds {
                current_id: state.next_segment_id - 1,
                last_flushed_id: state.durable_id,
                last_written_back_id: state.written_back_id,
            },
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
            failure: state.failure.clone(),
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

    /// Replaces the writeback policy at run time.
    pub fn set_policy(&self, policy: Policy) {
        *self.shared.policy.lock() = Some(policy);
        self.shared.writeback_wakeup.notify_all();
    }

    /// What recovery found when this engine was opened.
    pub fn recovery_report(&self) -> &crate::log::scan::ScanReport {
        &self.shared.recovery
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::error!("shutting down the engine: {e}");
        }
    }
}

#[derive(Debug, Clone)]
pub struct DrainProgress {
    pub segments_left: u64,
    pub segments_done: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
pub struct LegStatus {
    pub path: String,
    pub healthy: bool,
    pub read_errors: u64,
    pub write_errors: u64,
    pub repairs: u64,
}

#[derive(Debug, Clone)]
pub struct EngineStatus {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub dirty_bytes: u64,
    pub segments: SegmentIds,
    pub epoch_id: u64,
    pub legs: Vec<LegStatus>,
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

impl Shared {
    /// After every leg was lost, writeback's batch in hand is stale: its writes are dropped
    /// (what it held was lost with the cache; any subset of one epoch may reach the backing
    /// device). They are not refused: writeback would retry the batch until the fence drops and
    /// then write it over passthrough writes. Dropped, the batch reaches its commit, which fails.
    fn fenced(&self) -> bool {
        self.writeback_fenced.load(Ordering::Acquire)
    }

    /// Writeback waits for work only between batches, holding nothing it read before a loss (a
    /// batch read ahead is stale and dropped by its first id): the fence can go.
    fn lift_fence(&self) {
        if self.writeback_fenced.swap(false, Ordering::AcqRel) {
            log::info!("writeback dropped the batch it held when the cache was lost");
        }
    }

    /// Writeback retries failed backing I/O (the cache still holds the data); the errors are
    /// counted so that `wbctl status` shows a backing device in trouble.
    fn count_backing_error(&self, result: io::Result<()>) -> io::Result<()> {
        if result.is_err() {
            self.stats.backing_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl CacheLog for Shared {
    fn written_id(&self) -> u64 {
        self.state.lock().written_id
    }

    fn written_back_id(&self) -> u64 {
        self.state.lock().written_back_id
    }

    fn written_back_epoch(&self) -> u64 {
        self.state.lock().written_back_epoch
    }

    fn policy(&self) -> Policy {
        self.policy.lock().clone().unwrap_or_default()
    }

    fn read_segment(&self, id: u64, image: &mut [u8]) -> io::Result<SegmentHeader> {
        let n = self.geometry.segment_count;
        let offset = segment_offset(slot_of(id, n));
        let used_bytes = {
            let state = self.state.lock();
            let slot = &state.slots[slot_of(id, n) as usize];
            if id > state.written_id || id <= state.written_back_id || slot.segment_id != id {
                // Only after every leg was lost (the log was reset under writeback's feet).
                return Err(io::Error::other(format!(
                    "segment {id} is no longer in the cache"
                )));
            }
            slot.used_bytes
        };
        // Straight into the image when it is aligned for direct I/O (writeback's are).
        if (image.as_ptr() as usize).is_multiple_of(logfmt::BLOCK_SIZE_BYTES) {
            return read_segment_into(self, id, offset, used_bytes, image);
        }
        let mut buf = AlignedBuf::new(image.len());
        let header = read_segment_into(self, id, offset, used_bytes, &mut buf[..image.len()])?;
        image.copy_from_slice(&buf[..image.len()]);
        Ok(header)
    }

    fn backing_write(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let _gate = self.backing_gate.read();
        if self.fenced() {
            return Ok(());
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.stats.backing_write_ios.fetch_add(1, Ordering::Relaxed);
        self.stats
            .written_back_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.count_backing_error(self.backing.write_vectored_at(bufs, offset))
    }

    fn backing_zero(&self, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        let _gate = self.backing_gate.read();
        if self.fenced() {
            return Ok(());
        }
        self.stats.backing_write_ios.fetch_add(1, Ordering::Relaxed);
        self.count_backing_error(self.backing.zero_range(offset, len, discard))
    }

    fn backing_flush(&self) -> io::Result<()> {
        self.count_backing_error(self.backing.flush())
    }

    fn commit(&self, through_id: u64, epoch: u64, headers: &[SegmentHeader]) -> io::Result<()> {
        // Until the state has the new sequence: the fault record writes checkpoints too.
        let checkpoints = self.checkpoint_lock.lock();
        let (sequence, faults) = {
            let state = self.state.lock();
            if through_id <= state.written_back_id {
                // Every leg was lost while this batch was written back (the log was reset past
                // it; new legs may be attached since): nothing to commit.
                return Err(io::Error::other("the cache was lost during writeback"));
            }
            assert!(through_id <= state.written_id);
            (state.checkpoint_sequence + 1, state.faults_recorded)
        };
        // The checkpoint must be durable before any slot it covers is reused.
        let checkpoint = Checkpoint {
            uuid: self.geometry.uuid,
            sequence,
            last_written_back_id: through_id,
            last_written_back_epoch: epoch,
            faults,
        };
        let mut buf = AlignedBuf::new(logfmt::CHECKPOINT_SLOT_SIZE_BYTES);
        buf.copy_from_slice(&checkpoint.encode());
        self.legs
            .write_durably_all(&buf, checkpoint_offset(checkpoint.ring_index()))?;

        let n = self.geometry.segment_count;
        let mut state = self.state.lock();
        // Readers of these segments' blocks finish before the slots can be reused.
        while headers
            .iter()
            .any(|h| state.slots[slot_of(h.segment_id, n) as usize].readers > 0)
        {
            self.progress.wait(&mut state);
        }
        if through_id <= state.written_back_id {
            // Every leg was lost after the checkpoint was written: the log, slots included, was
            // reset meanwhile; nothing is left to release. The sequence is used all the same.
            state.checkpoint_sequence = state.checkpoint_sequence.max(sequence);
            return Err(io::Error::other("the cache was lost during writeback"));
        }
        for h in headers {
            let slot = slot_of(h.segment_id, n);
            assert_eq!(state.slots[slot as usize].segment_id, h.segment_id);
            for e in h.entries.iter().filter(|e| e.kind == EntryKind::Data) {
                let location = self.geometry.location(slot, e.data_slot as usize);
                if state.map.remove_if(e.block(), location) {
                    state.partial.remove(&location);
                }
            }
            state.slots[slot as usize] = Slot::default();
        }
        state.zeros.release_through(through_id);
        assert!(
            through_id > state.written_back_id,
            "the checkpoint only moves forward"
        );
        state.written_back_id = through_id;
        state.written_back_epoch = epoch;
        state.checkpoint_sequence = sequence;
        drop(checkpoints);
        self.check_mode_transition(&mut state);
        self.stats
            .written_back_segments
            .fetch_add(headers.len() as u64, Ordering::Relaxed);
        drop(state);
        self.space_freed.notify_all();
        Ok(())
    }

    fn activity(&self, now: Instant) -> Activity {
        let state = self.state.lock();
        let n = self.geometry.segment_count;
        let oldest = state.written_back_id + 1;
        let oldest_dirty_age = if oldest <= state.sealed_id {
            state.slots[slot_of(oldest, n) as usize]
                .sealed_at
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
        } else {
            Duration::ZERO
        };
        Activity {
            dirty_segments: state.dirty_segments(),
            capacity_segments: n,
            oldest_dirty_age,
            idle_for: self.idle_for(now),
            writers_waiting: state.writers_waiting > 0,
            drain_requested: state.drain_requested,
            degraded: self.legs.healthy_count() < self.legs.all().len(),
        }
    }

    fn wait_for_work(&self, timeout: Duration) {
        self.lift_fence();
        let mut state = self.state.lock();
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        self.writeback_wakeup.wait_for(&mut state, timeout);
        drop(state);
        self.lift_fence();
    }

    fn is_shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Reads segment `id` (at `offset` on the legs) into `buf`, an aligned segment-sized buffer, and
/// checks the header and the data it lists against their CRCs; like any cache read, from the
/// other leg when one fails, which is then repaired.
///
/// One I/O of `used_bytes` (recorded when the segment was sealed or recovered; 0: unknown, the
/// whole segment) reads the header and the data together: a second round trip per segment halved
/// writeback's read rate. Consecutive segments are read from alternate legs, so a mirrored cache
/// serves writeback from both of its devices.
fn read_segment_into(
    shared: &Shared,
    id: u64,
    offset: u64,
    used_bytes: usize,
    buf: &mut [u8],
) -> io::Result<SegmentHeader> {
    let len = match used_bytes {
        0 => buf.len(),
        n => n.min(buf.len()),
    };
    let found = Cell::new(None);
    let check = |bytes: &[u8]| {
        let header = SegmentHeader::decode_expecting(bytes, &shared.geometry.uuid, id);
        match header {
            Ok(h) if h.used_bytes() <= bytes.len() && h.verify_data(bytes).is_ok() => {
                found.set(Some(h));
                true
            }
            _ => false,
        }
    };
    shared.legs.read(&mut buf[..len], offset, Some(&check))?;
    Ok(found
        .take()
        .expect("a read that passed the check found the header"))
}
