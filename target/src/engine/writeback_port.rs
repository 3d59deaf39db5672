//! The writeback seam: `impl CacheLog for Shared`, what the ordered replay (`writeback` crate)
//! sees of the engine — read a sealed segment (CRC-checked, from either leg), write, zero and
//! flush the backing device, and `commit`: advance the checkpoint and free the segments written
//! back (CONTRACT §4). A cache loss fences writeback off from the backing device (`fenced`).

use std::cell::Cell;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use logfmt::{checkpoint_offset, Checkpoint, EntryKind, SegmentHeader};
use writeback::{Activity, CacheLog, Policy};

use crate::device::AlignedBuf;
use crate::engine::Shared;

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
        // It changes the engine's state under its lock: a panic half-way must end the daemon,
        // not come back to writeback's retry over a half-changed state (`crate::panics`).
        crate::panics::fatal(|| self.commit_batch(through_id, epoch, headers))
    }

    fn read_segment(&self, id: u64, image: &mut [u8]) -> io::Result<SegmentHeader> {
        // Engine code (it may take a leg out of use or repair a copy): as `commit`.
        crate::panics::fatal(|| self.read_segment_image(id, image))
    }

    fn activity(&self, now: Instant) -> Activity {
        let state = self.state.lock();
        let n = self.geometry.segment_count;
        let oldest_dirty_age = state
            .oldest_sealed_at()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        // Occupancy in slots, the unit writeback frees: small segments packed in a slot count
        // once.
        Activity {
            dirty_segments: state.slots_in_use(),
            capacity_segments: n,
            oldest_dirty_age,
            idle_for: self.idle_for(now),
            writers_waiting: state.writers_waiting > 0,
            drain_requested: state.drain_requested,
            // Full speed also while a replace waits for the cache to empty.
            degraded: self.legs.healthy_count() < self.legs.all().len()
                || state.replacing_legs > 0
                || state.closing_log,
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

impl Shared {
    /// `CacheLog::read_segment`: segment `id` read from a leg into `image`.
    fn read_segment_image(&self, id: u64, image: &mut [u8]) -> io::Result<SegmentHeader> {
        let (offset, used_bytes) = {
            let state = self.state.lock();
            if id > state.written_id || id <= state.written_back_id {
                // Only after every leg was lost (the log was reset under writeback's feet).
                return Err(io::Error::other(format!(
                    "segment {id} is no longer in the cache"
                )));
            }
            let placed = state.placed(id);
            (placed.position.offset(), placed.used_bytes)
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

    /// `CacheLog::commit`: the checkpoint past `through_id`, then the written-back segments'
    /// blocks leave the map and their slots are freed.
    fn commit_batch(
        &self,
        through_id: u64,
        epoch: u64,
        headers: &[SegmentHeader],
    ) -> io::Result<()> {
        // Until the state has the new sequence: the fault record writes checkpoints too.
        let checkpoints = self.checkpoint_lock.lock();
        let sequence = {
            let state = self.state.lock();
            if through_id <= state.written_back_id {
                // Every leg was lost while this batch was written back (the log was reset past
                // it; new legs may be attached since): nothing to commit.
                return Err(io::Error::other("the cache was lost during writeback"));
            }
            assert!(through_id <= state.written_id);
            let next = if through_id + 1 < state.next_segment_id {
                state.placed(through_id + 1).position
            } else {
                state.place
            };
            (state.checkpoint_sequence + 1, state.faults_recorded, next)
        };
        let (sequence, faults, next_position) = sequence;
        let newest = headers.last().expect("a commit frees at least one segment");
        assert_eq!(
            newest.segment_id, through_id,
            "the headers end at the checkpoint"
        );
        // The walk from the checkpoint starts behind `through_id`, chained to its header.
        let anchor_crc = newest.record_crc();
        // The checkpoint must be durable before any slot it covers is reused.
        let checkpoint = Checkpoint {
            uuid: self.geometry.uuid,
            sequence,
            last_written_back_id: through_id,
            last_written_back_epoch: epoch,
            faults,
            next_position,
            anchor_crc,
        };
        let mut buf = AlignedBuf::new(logfmt::CHECKPOINT_SLOT_SIZE_BYTES);
        buf.copy_from_slice(&checkpoint.encode());
        self.legs
            .write_durably_all(&buf, checkpoint_offset(checkpoint.ring_index()))?;

        let mut state = self.state.lock();
        // Readers of these segments' blocks finish before the slots can be reused.
        while headers.iter().any(|h| {
            h.segment_id > state.written_back_id
                && state.slots[state.placed(h.segment_id).position.slot as usize].readers > 0
        }) {
            self.progress.wait(&mut state);
        }
        if through_id <= state.written_back_id {
            // Every leg was lost after the checkpoint was written: the log, slots included, was
            // reset meanwhile; nothing is left to release. The sequence is used all the same.
            state.checkpoint_sequence = state.checkpoint_sequence.max(sequence);
            return Err(io::Error::other("the cache was lost during writeback"));
        }
        assert!(
            through_id > state.written_back_id,
            "the checkpoint only moves forward"
        );
        let written_back = state.written_back_id;
        for h in headers.iter().filter(|h| h.segment_id > written_back) {
            let at = state.placed(h.segment_id).position;
            assert_eq!(h.start_block, at.block, "segment {} moved", h.segment_id);
            for e in h.entries.iter().filter(|e| e.kind == EntryKind::Data) {
                let location = self.geometry.location(at, e.data_slot as usize);
                if state.map.remove_if(e.block(), location) {
                    state.partial.remove(&location);
                }
            }
        }
        self.free_through(&mut state, through_id);
        state.zeros.release_through(through_id);
        state.written_back_epoch = epoch;
        state.anchor_crc = Some(anchor_crc);
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

    /// Frees the segments up to `through_id` (written back): their placements, and every slot
    /// none of whose segments is live any more.
    fn free_through(&self, state: &mut crate::engine::State, through_id: u64) {
        while state.written_back_id < through_id {
            state.written_back_id += 1;
            let placed = state.live.pop_front().expect("a live segment");
            state.sealed_log_bytes -= placed.used_bytes as u64;
            let slot = &mut state.slots[placed.position.slot as usize];
            assert!(
                slot.in_use(),
                "segment {} had its slot",
                state.written_back_id
            );
            if slot.last_id == state.written_back_id {
                (slot.first_id, slot.last_id) = (0, 0);
            }
        }
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
