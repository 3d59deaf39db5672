//! Cache modes and leg failures (CONTRACT §5): mirrored → degraded → passthrough, cache loss, and
//! attaching a replacement leg.
//!
//! - *mirrored* (or *single* for a one-leg set): every segment goes to every leg.
//! - *degraded*: a leg failed. The log keeps going to the survivor and writeback runs at full
//!   speed; once only a few segments are dirty no new segment is opened (`closing_log`), and when
//!   the last one is written back the engine switches to *passthrough*.
//! - *passthrough*: requests go straight to the backing device, so nothing lives only on the one
//!   remaining SSD. Entered at once when every leg is lost (what the cache held is gone; the
//!   backing device holds a consistent older state, named in the log and in status).
//! - `replace_leg` formats a new device as the missing leg and returns to mirrored. It waits for
//!   passthrough first, so the cache is clean and the new leg needs no copy of live segments, and
//!   for the old leg's writer to be idle; it flushes the backing device before leaving
//!   passthrough (the passthrough writes were plain writes in its volatile cache).
//!
//! Failures are recorded durably (`faults`) before anything relies on them: a failed leg is not
//! read again after a restart, and a lost log is never replayed (the next start comes up in
//! passthrough, saying so).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use logfmt::{
    checkpoint_offset, Checkpoint, EntryKind, CHECKPOINT_SLOTS, CHECKPOINT_SLOT_SIZE_BYTES,
};

use crate::device::{AlignedBuf, Device};
use crate::engine::{Engine, SealReason, Shared, Slot, State};
use crate::error::{EngineError, Result};
use crate::log::legs::Leg;
use crate::map::block_map::BlockMap;
use crate::map::zero_ranges::ZeroRanges;
use parking_lot::MutexGuard;

/// In degraded mode, stop opening segments once no more than this many are dirty, so the switch
/// to passthrough stalls writers only for the time it takes to write back this little.
pub const CLOSE_LOG_AT_DIRTY_SEGMENTS: u64 = 2;

impl Shared {
    pub(crate) fn mode_name(&self, state: &State) -> &'static str {
        let healthy = self.legs.healthy_count();
        let total = self.legs.all().len();
        if state.passthrough {
            "passthrough"
        } else if healthy < total {
            "degraded"
        } else if total == 1 {
            "single"
        } else {
            "mirrored"
        }
    }

    /// Every leg is gone: what only the cache held is lost. Go to passthrough at once. The loss
    /// is recorded (`faults`) before the first passthrough write reaches the backing device.
    pub(crate) fn enter_cache_lost(&self, state: &mut State) {
        if state.cache_lost.is_some() {
            return;
        }
        let lost = logfmt::CacheLost {
            backing_holds_id: state.written_back_id,
            log_through_id: state.sealed_id,
        };
        let open_entries = state.open.as_ref().is_some_and(|o| !o.entries.is_empty());
        let dirty_blocks = state.map.len() as u64;
        log::error!(
            target: crate::CRITICAL_LOG_TARGET,
            "CRITICAL: every cache leg has failed; the cache's dirty data is lost: {} \
             acknowledged blocks ({} KiB) not yet written back, in log segments {}..={}{}. The \
             backing device holds every segment up to id {} (a consistent older state: the disk \
             as of an earlier FLUSH). Passthrough from now on; the lost log will never be \
             replayed, and the next FLUSH fails if it covers lost writes. Attach new legs with \
             `wbctl replace`, or re-create the cache with --force.",
            dirty_blocks,
            dirty_blocks * 4,
            lost.backing_holds_id + 1,
            lost.log_through_id,
            if open_entries {
                " and the open segment"
            } else {
                ""
            },
            lost.backing_holds_id
        );
        // Acknowledged writes that no successful FLUSH covered, and that writeback had not put
        // on the backing device either, are gone: the next FLUSH says so. (A clean cache —
        // degraded and in passthrough — loses nothing.)
        if open_entries || state.sealed_id > state.flushed_id.max(state.written_back_id) {
            state.flush_error_owed = true;
            if let Err(e) = std::fs::write(&self.flush_error_marker, b"cache lost\n") {
                log::warn!("{}: {e}", self.flush_error_marker.display());
            }
        }
        state.cache_lost = Some(lost);
        state.lost_dirty_blocks = Some(dirty_blocks);
        state.lost_writes_mark = state.logged_writes;
        // Only the writeback thread lifts the fence (`wait_for_work`), once it holds nothing it
        // read before the loss.
        if self.writeback_running.load(Ordering::Acquire) {
            self.writeback_fenced.store(true, Ordering::Release);
        }
        state.lost_generation += 1;
        state.passthrough = true;
        state.closing_log = false;
        state.map = BlockMap::with_capacity(self.geometry.capacity_blocks() as usize);
        state.partial.clear();
        state.zeros = ZeroRanges::default();
        // Nothing in flight will reach a leg: every id is settled, every buffer and slot free.
        state.open = None;
        state.next_segment_id = state.sealed_id + 1;
        // The write position stays where segment `sealed_id + 1` was to go; the log writer may
        // still be sealing up to `sealed_id`, so the anchor is its chain's (`anchor`).
        state.live.clear();
        state.sealed_log_bytes = 0;
        state.anchor_crc = None;
        state.writes_sealed = state.logged_writes;
        state.written_id = state.sealed_id;
        state.durable_id = state.sealed_id;
        state.written_back_id = state.sealed_id;
        state.flushed_id = state.sealed_id;
        // The buffers go back to the free list but keep their segments in the buffer file until
        // the loss is on record (`record_faults` releases them): a daemon killed before that
        // leaves them to its successor, which adopts them if the legs come back.
        for slot in state.slots.iter_mut() {
            if let Some(buffer) = slot.buffer.take() {
                state.free_buffers.push(buffer);
            }
            *slot = Slot {
                readers: slot.readers,
                ..Slot::default()
            };
        }
        for leg in state
            .leg_written
            .iter_mut()
            .chain(state.leg_durable.iter_mut())
        {
            *leg = state.sealed_id;
        }
        self.progress.notify_all();
        self.space_freed.notify_all();
        self.writeback_wakeup.notify_all();
    }

    /// The record CRC of the header of `written_back_id`, the checkpoint's anchor. After a cache
    /// loss reset the log past segments the log writer was still sealing, it is the chain's
    /// once the log writer has handled them (a replacement waits for that).
    pub(crate) fn anchor(&self, state: &State) -> u32 {
        state.anchor_crc.unwrap_or_else(|| {
            let chain = self.chain.lock();
            assert_eq!(
                chain.0, state.written_back_id,
                "the log writer has sealed every segment of the lost log"
            );
            chain.1
        })
    }

    /// A leg is out of use and its failure is not on record yet.
    pub(crate) fn leg_failure_unrecorded(&self, state: &State) -> bool {
        self.legs.failed_mask() & !state.faults_recorded.failed_legs != 0
    }

    /// Degraded → (closing the log) → passthrough, as writeback catches up. Called by the sync
    /// timer and after every writeback commit.
    pub(crate) fn check_mode_transition(&self, state: &mut State) {
        let degraded =
            self.legs.healthy_count() < self.legs.all().len() || state.replacing_legs > 0;
        if state.passthrough || !degraded || state.shutting_down {
            return;
        }
        let dirty = state.sealed_id - state.written_back_id;
        if !state.closing_log && dirty <= CLOSE_LOG_AT_DIRTY_SEGMENTS {
            log::warn!("degraded: writeback has caught up; closing the log for passthrough");
            state.closing_log = true;
            self.seal(state, SealReason::Timer);
        }
        if state.closing_log && state.open.is_none() && state.written_back_id == state.sealed_id {
            if self.leg_failure_unrecorded(state) {
                // Not before the failure is on record: a restart could otherwise take the failed
                // leg for a good one and replay its stale log over the passthrough writes.
                // The sync timer records it and calls again.
                return;
            }
            log::warn!(
                "degraded and clean: passthrough until a replacement leg is attached \
                 (`wbctl replace`)"
            );
            state.closing_log = false;
            state.passthrough = true;
            self.space_freed.notify_all();
        }
    }

    /// Every writeback write that passed the fence before it was raised has landed once the
    /// gate can be taken exclusively (see `Shared::backing_gate`). Passthrough writes wait for
    /// this so that they land on top; passthrough reads, so that what they return is not
    /// changed afterwards by such a write; FLUSHes, so that they cover it.
    pub(crate) fn wait_for_fenced_writeback(&self) {
        if self.writeback_fenced.load(Ordering::Acquire) {
            drop(self.backing_gate.write());
        }
    }

    /// Before a passthrough write or zeroing reaches the backing device: the faults that put the
    /// engine in passthrough are on record, so no later start replays a lost log over it. If
    /// the record cannot be written anywhere, the write is refused (an I/O error now is better
    /// than a silent overwrite later).
    fn faults_on_record(&self) -> Result<()> {
        {
            // Only a loss matters here (a leg failure or its end does not make a passthrough
            // write unsafe), and once it is on record, nothing more is to wait for.
            let state = self.state.lock();
            if !state.loss_unrecorded() {
                return Ok(());
            }
        }
        self.record_faults().map_err(|e| {
            EngineError::CacheFailed(format!(
                "refusing a passthrough write: the cache's failure could not be recorded ({e})"
            ))
        })
    }

    pub(crate) fn passthrough_write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.faults_on_record()?;
        self.wait_for_fenced_writeback();
        let mut buf = AlignedBuf::new(data.len());
        buf[..data.len()].copy_from_slice(data);
        self.backing
            .write_at(&buf[..data.len()], offset)
            .map_err(|e| EngineError::io(self.backing.name(), e))?;
        self.backing_writes.fetch_add(1, Ordering::SeqCst);
        self.stats
            .passthrough_writes
            .fetch_add(1, Ordering::Relaxed);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if fua {
            self.passthrough_flush()?;
        }
        Ok(())
    }

    pub(crate) fn passthrough_flush(&self) -> Result<()> {
        // What a FLUSH returns for covers everything on the backing device, a writeback write
        // issued before the loss included.
        self.wait_for_fenced_writeback();
        self.flush_backing(true)
    }

    /// Flushes the backing device — `always`, or if a passthrough write acknowledged before
    /// this call is not yet covered by a flush that succeeded. One flush at a time: a caller
    /// that finds one in flight waits for it and then needs no flush of its own if it covered
    /// what this caller must cover. A failure leaves the writes uncovered for the next FLUSH.
    fn flush_backing(&self, always: bool) -> Result<()> {
        let mut flushed = self.backing_flushed.lock();
        let written = self.backing_writes.load(Ordering::SeqCst);
        debug_assert!(
            *flushed <= written,
            "a flush covers only writes made before it"
        );
        if !always && *flushed >= written {
            return Ok(());
        }
        self.backing
            .flush()
            .map_err(|e| EngineError::io(self.backing.name(), e))?;
        *flushed = written;
        Ok(())
    }

    /// A FLUSH through the log also covers the passthrough writes acknowledged before it (made
    /// before the engine left passthrough, or racing that switch).
    pub(crate) fn flush_backing_if_written(&self) -> Result<()> {
        self.flush_backing(false)
    }

    /// A FLUSH in passthrough. After a cache loss that took acknowledged writes no FLUSH had
    /// covered, the first one fails (after flushing what it can): they are gone.
    pub(crate) fn flush_in_passthrough(
        &self,
        mut state: MutexGuard<'_, State>,
        client_flush: bool,
    ) -> Result<()> {
        let owed = self.take_owed_flush_error(&mut state, client_flush);
        drop(state);
        let flushed = self.passthrough_flush();
        if owed {
            return Err(owed_flush_error());
        }
        flushed
    }

    /// Takes the FLUSH error a cache loss owes the client (and its marker), if there is one and
    /// `client_flush`: only a client's FLUSH reports it, not a FUA write, a drain or a shutdown.
    pub(crate) fn take_owed_flush_error(&self, state: &mut State, client_flush: bool) -> bool {
        if !client_flush || !std::mem::take(&mut state.flush_error_owed) {
            return false;
        }
        let _ = std::fs::remove_file(&self.flush_error_marker);
        true
    }

    pub(crate) fn passthrough_zero(&self, offset: u64, len: u64, kind: EntryKind) -> Result<()> {
        self.faults_on_record()?;
        self.wait_for_fenced_writeback();
        self.backing
            .zero_range(offset, len, kind == EntryKind::Discard)
            .map_err(|e| EngineError::io(self.backing.name(), e))?;
        self.backing_writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Engine {
    /// Replaces cache leg `index` by `device`, online. Waits (with writeback at full speed) until
    /// the cache is clean and in passthrough — a healthy leg stays in use meanwhile, the log
    /// closing as if degraded (`replacing_legs`) — then formats `device` as leg `index` of the
    /// set and returns to mirrored operation.
    pub fn replace_leg(
        &self,
        index: usize,
        device: Arc<dyn Device>,
        timeout: Duration,
    ) -> Result<()> {
        let s = &self.shared;
        let leg = self.check_replacement(index, device.as_ref())?;
        self.loss_on_record_before_replace()?;
        let generation = leg.generation();
        // Checked and counted under one lock: two replaces of the two legs both keep theirs.
        let healthy = {
            let mut state = s.state.lock();
            let healthy = leg.is_healthy();
            state.replacing_legs += healthy as u32;
            healthy
        };
        let swapped = self.swap_leg(leg, generation, healthy, device, timeout);
        if healthy && leg.generation() == generation {
            // Not swapped (timed out, refused): the log may open again.
            self.resume_after_failed_replace();
        }
        swapped
    }

    /// The leg `index` names, if `device` may become it.
    fn check_replacement(&self, index: usize, device: &dyn Device) -> Result<&Leg> {
        let s = &self.shared;
        let legs = s.legs.all();
        let Some(leg) = legs.get(index) else {
            return Err(EngineError::refused(
                device.name(),
                format!("the cache set has no leg {index}"),
            ));
        };
        let needed = s.superblock.leg_size_bytes();
        if device.size_bytes() < needed {
            return Err(EngineError::refused(
                device.name(),
                format!(
                    "cache device too small: {} bytes, the set's legs are {needed}",
                    device.size_bytes()
                ),
            ));
        }
        if legs
            .iter()
            .any(|l| l.index != index && l.device().name() == device.name())
        {
            return Err(EngineError::refused(
                device.name(),
                "is already the other leg of this cache set",
            ));
        }
        Ok(leg)
    }

    /// Waits until `leg` may be swapped, formats `device` as it and records the change; then
    /// leaves passthrough if every leg is back.
    fn swap_leg(
        &self,
        leg: &Leg,
        generation: u64,
        healthy: bool,
        device: Arc<dyn Device>,
        timeout: Duration,
    ) -> Result<()> {
        let s = &self.shared;
        let index = leg.index;
        let deadline = std::time::Instant::now() + timeout;
        let (_recorder, mut state) = loop {
            self.wait_until_replaceable(leg, deadline, device.name())?;
            // The fault record changes with the swap: no other writer of it meanwhile (taken
            // before the state lock, the lock order of `faults`).
            let recorder = s.fault_recorder.lock();
            // Leaving passthrough: what it wrote must be durable first, since the next FLUSH
            // waits for the log only (`flush_backing_if_written` covers writes racing the switch).
            s.passthrough_flush()?;
            let state = s.state.lock();
            if s.replaceable(&state, leg) {
                break (recorder, state);
            }
        };
        if leg.generation() != generation {
            // Another `replace` of this leg got here first.
            return Err(EngineError::refused(
                device.name(),
                format!("leg {index} was replaced meanwhile"),
            ));
        }
        if state.loss_unrecorded() {
            // Lost while this waited, and not on record: attaching now would drop the loss.
            return Err(EngineError::CacheFailed(
                "the cache was lost while the replacement waited, and the loss is not on record \
                 yet; no leg is attached before it is"
                    .into(),
            ));
        }
        debug_assert!(
            state.passthrough && state.open.is_none(),
            "swapped only when clean"
        );
        // Every sealed segment is handled (`replaceable`): the chain is settled, and checkpoints
        // from now on go to a leg again.
        state.anchor_crc = Some(s.anchor(&state));
        let incarnation = state.leg_incarnations[index] + 1;
        format_as_leg(s, &state, index, incarnation, device.as_ref())?;
        leg.replace(device.clone());
        state.leg_incarnations[index] = incarnation;
        state.leg_written[index] = state.written_id;
        state.leg_durable[index] = state.durable_id;
        state.replacing_legs -= healthy as u32;
        // Back to the log only once no other replace waits for passthrough.
        let all_back = s.legs.healthy_count() == s.legs.all().len() && state.replacing_legs == 0;
        let lost = state.cache_lost;
        if all_back {
            state.cache_lost = None;
        }
        drop(state);
        // Until this is on record the old record stands: the new leg counts as failed at a
        // restart (safe: degraded, then replace again), and the cache as lost. Leaving
        // passthrough before it is recorded would let FLUSHed writes go to a log that a
        // restart would not replay.
        if let Err(e) = s.record_faults_locked() {
            s.state.lock().cache_lost = lost;
            return Err(EngineError::CacheFailed(format!(
                "leg {index} was attached, but the fault record could not be updated ({e}); \
                 staying in passthrough"
            )));
        }
        let mut state = s.state.lock();
        if all_back {
            state.passthrough = false;
            state.lost_dirty_blocks = None;
            log::warn!("leg {index} replaced by {}: mirrored again", device.name());
        } else {
            log::warn!(
                "leg {index} replaced by {}; another leg is still missing: passthrough continues",
                device.name()
            );
        }
        drop(state);
        s.space_freed.notify_all();
        Ok(())
    }

    /// A leg is attached only once a cache loss is on record: the record that attaches it says
    /// what the set is from then on, and without the loss in it a restart would replay the lost
    /// log (and adopt its buffers) over what passthrough wrote since.
    fn loss_on_record_before_replace(&self) -> Result<()> {
        let s = &self.shared;
        if !s.state.lock().loss_unrecorded() {
            return Ok(());
        }
        s.record_faults().map_err(|e| {
            EngineError::CacheFailed(format!(
                "the cache loss is not on record yet ({e}); no leg is attached before it is"
            ))
        })
    }

    /// A healthy leg was not swapped after all: if no other replace waits and nothing failed
    /// meanwhile, the log opens again. Leaving passthrough flushes what it wrote first (like any
    /// way out of passthrough); if that flush fails, the device stays in passthrough (safe) and
    /// says so.
    fn resume_after_failed_replace(&self) {
        let s = &self.shared;
        let mut state = s.state.lock();
        state.replacing_legs -= 1;
        let all_healthy = s.legs.healthy_count() == s.legs.all().len();
        if state.replacing_legs > 0 || !all_healthy || state.cache_lost.is_some() {
            return; // another replace, or a real failure meanwhile: its own way applies
        }
        state.closing_log = false;
        if state.passthrough {
            drop(state);
            if let Err(e) = s.passthrough_flush() {
                log::error!("staying in passthrough after a replace that did not happen: {e}");
                return;
            }
            state = s.state.lock();
            state.passthrough = false;
        }
        s.space_freed.notify_all();
    }

    /// Waits (writeback at full speed meanwhile) until leg `leg` may be swapped: see
    /// `Shared::replaceable`.
    fn wait_until_replaceable(
        &self,
        leg: &Leg,
        deadline: std::time::Instant,
        name: &str,
    ) -> Result<()> {
        let s = &self.shared;
        let mut state = s.state.lock();
        loop {
            if s.replaceable(&state, leg) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(EngineError::refused(
                    name,
                    "timed out waiting for writeback to empty the cache before attaching",
                ));
            }
            s.writeback_wakeup.notify_all();
            s.space_freed
                .wait_for(&mut state, Duration::from_millis(100));
        }
    }
}

impl Shared {
    /// A leg may be swapped once the cache is clean and in passthrough; after a cache loss, also
    /// once writeback has dropped the batch it held then (new segments must not be written back
    /// while its writes are being dropped); and once the leg's writer has handled every segment
    /// sealed for it (a write it still had queued must not land on the new device, nor a late
    /// error of the old device fail the new one).
    fn replaceable(&self, state: &State, leg: &Leg) -> bool {
        state.passthrough
            && !self.writeback_fenced.load(Ordering::Acquire)
            && leg.handled_id.load(Ordering::Acquire) >= state.sealed_id
    }
}

/// Formats `device` as leg `index` of the set, its device number `incarnation`: the set's
/// superblock (as that leg) and the current checkpoint, durably. Nothing is in flight to the
/// leg (the cache is clean). Until the fault record names the new incarnation, a start takes
/// the new device for a stale one (safe: degraded, replace again).
fn format_as_leg(
    s: &Shared,
    state: &State,
    index: usize,
    incarnation: u32,
    device: &dyn Device,
) -> Result<()> {
    let mut superblock = s.superblock.clone();
    superblock.leg_index = index as u32;
    superblock.leg_incarnation = incarnation;
    let checkpoint = Checkpoint {
        uuid: s.geometry.uuid,
        sequence: state.checkpoint_sequence,
        last_written_back_id: state.written_back_id,
        last_written_back_epoch: state.written_back_epoch,
        faults: state.faults_recorded,
        next_position: state.next_after_written_back(),
        anchor_crc: s.anchor(state),
    };
    let mut ring = AlignedBuf::new(CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES);
    let at = checkpoint.ring_index() * CHECKPOINT_SLOT_SIZE_BYTES;
    ring[at..at + CHECKPOINT_SLOT_SIZE_BYTES].copy_from_slice(&checkpoint.encode());
    let mut sb = AlignedBuf::new(logfmt::SUPERBLOCK_SIZE_BYTES);
    sb.copy_from_slice(&superblock.encode());
    device
        .write_at(&ring, checkpoint_offset(0))
        .and_then(|()| device.write_at(&sb, 0))
        .and_then(|()| device.flush())
        .map_err(|e| EngineError::io(device.name(), e))
}

/// What the FLUSH that reports a cache loss's lost writes fails with.
pub(crate) fn owed_flush_error() -> EngineError {
    EngineError::CacheFailed(
        "every cache leg was lost with acknowledged writes this FLUSH covers: they are gone (the \
         backing device holds an older, consistent state)"
            .into(),
    )
}
