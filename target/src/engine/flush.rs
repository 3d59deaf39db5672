//! FLUSH: a FLUSH makes every write it covers durable on every leg in use — or fails, if a
//! cache loss took them (CONTRACT §2, §5) — and ends their epoch. It seals the open segment only
//! if that holds writes it covers, and FLUSHes share the log commits (group commit): while one
//! commit (a sealed segment's write and leg flush) is in flight, FLUSHes that need the open
//! segment sealed wait for it, and then one seal — one small log write and one leg flush —
//! serves all of them. The leg writers' progress arrives here (`on_leg_progress`) and moves
//! `written_id` and `durable_id`.

use std::sync::atomic::Ordering;

use parking_lot::MutexGuard;

use crate::error::{EngineError, Result};
use crate::log::writer::{LogJob, SELF_DRIVEN_LANE};

use super::state::State;
use super::{SealReason, Shared};

impl Shared {
    /// A FLUSH of the engine's own (a drain, a shutdown): like a FUA write's, it neither reports
    /// nor clears a FLUSH error owed to the client after a cache loss.
    pub(crate) fn flush_internal(&self) -> Result<()> {
        let (generation, covers) = {
            let state = self.state.lock();
            (state.lost_generation, state.logged_writes)
        };
        self.flush_inner(generation, covers, false)
    }

    pub fn flush(&self) -> Result<()> {
        self.note_request();
        let (generation, covers) = {
            let state = self.state.lock();
            (state.lost_generation, state.logged_writes)
        };
        self.flush_inner(generation, covers, true)
    }

    /// A FLUSH (`client`) or a FUA write's or the engine's own flush (which vouch for their
    /// writes only), covering the first `covers` logged writes, issued in loss generation
    /// `issued`: it fails if the cache was lost since, because what it covers was in the cache
    /// that is gone.
    pub(super) fn flush_inner(&self, issued: u64, covers: u64, client: bool) -> Result<()> {
        let covers = client.then_some(covers).ok_or(covers);
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let lost_since = |state: &mut State| {
            // A FLUSH that covers every write the loss took has reported it to the client.
            if covers.is_ok_and(|c| c >= state.lost_writes_mark) {
                self.take_owed_flush_error(state, true);
            }
            EngineError::CacheFailed(
                "every cache leg was lost before this FLUSH completed: the writes it covers are \
                 gone"
                    .into(),
            )
        };
        let mut state = self.state.lock();
        state.check_alive()?;
        if state.lost_generation != issued {
            return Err(lost_since(&mut state));
        }
        if state.passthrough {
            return self.flush_in_passthrough(state, covers.is_ok());
        }
        let writes = covers.unwrap_or_else(|c| c);
        self.commit(&mut state, writes, issued)?;
        let target = state.sealed_id;
        if state.durable_id < target && state.commit_target < target {
            // Sealed by a full segment or the timer, not yet flushed: one leg flush for them.
            state.commit_target = target;
            if self.log.sealer_idle() {
                self.log.flush_now();
            } else {
                self.log.send(LogJob::Flush);
            }
        }
        if state.durable_id < target {
            // A segment (or flush) this FLUSH queued itself waits on that lane for this thread
            // (`LogQueues::write_now`, `flush_now`): no hand-off to the leg's thread and back.
            MutexGuard::unlocked(&mut state, || {
                self.log.drive(self, SELF_DRIVEN_LANE, Some(target))
            });
        }
        // The loss check comes first: a loss sets `durable_id` past every id it dropped.
        loop {
            if state.lost_generation != issued {
                return Err(lost_since(&mut state));
            }
            if state.durable_id >= target {
                break;
            }
            if let Some(why) = state.unrecorded_failure() {
                // Held back for a leg failure that cannot be recorded: fail, not hang.
                return Err(EngineError::CacheFailed(why));
            }
            self.progress.wait(&mut state);
        }
        if covers.is_ok() {
            // Only a client's FLUSH covers every write before it: a FUA write vouches for itself,
            // a drain or a shutdown for nothing the client can see (a loss after them still owes
            // the client the error for the writes in between).
            state.flushed_id = state.flushed_id.max(target);
        }
        // New legs were attached after a loss that no FLUSH has reported yet: this one does (a
        // FUA write vouches for itself only, and its data is durable).
        let owed = self.take_owed_flush_error(&mut state, covers.is_ok());
        drop(state);
        self.flush_backing_if_written()?;
        if owed {
            return Err(crate::engine::mode::owed_flush_error());
        }
        Ok(())
    }

    /// Seals what the first `writes` logged writes need sealed, and ends their epoch. The open
    /// segment is sealed only if it holds one of them; and while an earlier FLUSH's commit is in
    /// flight, not at once: its durability comes first anyway, and meanwhile more writes (and the
    /// FLUSHes that cover them) gather in the open segment, to share one seal (group commit).
    fn commit(&self, state: &mut MutexGuard<'_, State>, writes: u64, issued: u64) -> Result<()> {
        state.flush_mark = state.flush_mark.max(writes);
        loop {
            let open_holds_writes = state.open.as_ref().is_some_and(|o| !o.entries.is_empty());
            if state.writes_sealed >= writes || !open_holds_writes {
                break;
            }
            if state.durable_id < state.commit_target {
                self.progress.wait(state);
                state.check_alive()?;
                if state.lost_generation != issued
                    || state.passthrough
                    || state.fault_record_error.is_some()
                {
                    // The caller's loop reports it.
                    return Ok(());
                }
                continue;
            }
            self.seal(state, SealReason::Flush);
            state.commit_target = state.sealed_id;
            return Ok(());
        }
        if state.epoch_ended_writes < writes {
            self.end_epoch(state);
        }
        Ok(())
    }

    /// Ends the epoch after the sealed segments without sealing the open one, which holds only
    /// writes logged after the FLUSH was issued (`commit`): they may belong to the next epoch.
    fn end_epoch(&self, state: &mut State) {
        state.epoch_id += 1;
        state.epoch_ended_writes = state.writes_sealed;
        let epoch = state.epoch_id;
        if let Some(open) = state.open.as_mut() {
            open.epoch_id = epoch;
            self.ram.set_epoch(open.buffer, open.position.block, epoch);
        }
    }

    /// A leg writer finished writing (and maybe flushing) segments up to these ids.
    pub(crate) fn on_leg_progress(&self, leg: usize, written: u64, durable: u64) {
        let mut state = self.state.lock();
        state.leg_written[leg] = state.leg_written[leg].max(written);
        state.leg_durable[leg] = state.leg_durable[leg].max(durable);
        self.recompute_log_progress(&mut state);
    }

    /// The log's progress is that of the slowest healthy leg. Buffers are released strictly in id
    /// order, once their segment is on every healthy leg.
    pub(crate) fn recompute_log_progress(&self, state: &mut State) {
        let healthy: Vec<usize> = self
            .legs
            .all()
            .iter()
            .filter(|l| l.is_healthy())
            .map(|l| l.index)
            .collect();
        if healthy.is_empty() {
            self.enter_cache_lost(state);
            return;
        }
        let written = healthy.iter().map(|&l| state.leg_written[l]).min().unwrap();
        // A failed leg counts for durability until its failure is on record: a FLUSH must not
        // complete on the other leg alone while a restart could still take the failed leg for a
        // good one (`faults`).
        let durable = self
            .legs
            .all()
            .iter()
            .filter(|l| l.is_healthy() || !state.faults_recorded.leg_failed(l.index))
            .map(|l| state.leg_durable[l.index])
            .min()
            .unwrap();
        while state.written_id < written {
            state.written_id += 1;
            let slot = state.placed(state.written_id).position.slot;
            self.release_buffer_if_done(state, slot);
        }
        state.durable_id = state.durable_id.max(durable.min(state.written_id));
        self.durable_hint.store(state.durable_id, Ordering::Release);
        state.check_invariants();
        self.progress.notify_all();
        self.space_freed.notify_all();
        self.writeback_wakeup.notify_all();
    }

    /// Releases the RAM buffer of slot `slot` once the slot is closed (the write position moved
    /// on to another slot) and every segment in it is on every healthy leg.
    pub(crate) fn release_buffer_if_done(&self, state: &mut State, slot: u64) {
        let closed = state.place.slot != slot;
        let s = &mut state.slots[slot as usize];
        if closed && s.last_id <= state.written_id {
            if let Some(buffer) = s.buffer.take() {
                self.ram.release(buffer);
                state.free_buffers.push(buffer);
            }
        }
    }
}
