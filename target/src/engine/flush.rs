//! FLUSH: a FLUSH seals the open segment (ending its epoch) and waits until every write it
//! covers is durable on every leg in use — or fails, if a cache loss took them (CONTRACT §2,
//! §5). The leg writers' progress arrives here (`on_leg_progress`) and moves `written_id` and
//! `durable_id`.

use std::sync::atomic::Ordering;

use logfmt::slot_of;

use crate::error::{EngineError, Result};
use crate::log::writer::LogJob;

use super::state::State;
use super::{SealReason, Shared};

impl Shared {
    /// A FLUSH of the engine's own (a drain, a shutdown): like a FUA write's, it neither reports
    /// nor clears a FLUSH error owed to the client after a cache loss.
    pub(crate) fn flush_internal(&self) -> Result<()> {
        let generation = self.state.lock().lost_generation;
        self.flush_inner(generation, None)
    }

    pub fn flush(&self) -> Result<()> {
        self.note_request();
        let (generation, covers) = {
            let state = self.state.lock();
            (state.lost_generation, state.logged_writes)
        };
        self.flush_inner(generation, Some(covers))
    }

    /// A FLUSH (covering the first `covers` logged writes) or a FUA write's flush (`None`: it
    /// vouches for that write only) issued in loss generation `issued`: it fails if the cache was
    /// lost since, because what it covers was in the cache that is gone.
    pub(super) fn flush_inner(&self, issued: u64, covers: Option<u64>) -> Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let lost_since = |state: &mut State| {
            // A FLUSH that covers every write the loss took has reported it to the client.
            if covers.is_some_and(|c| c >= state.lost_writes_mark) {
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
            return self.flush_in_passthrough(state, covers.is_some());
        }
        self.seal(&mut state, SealReason::Flush);
        let target = state.sealed_id;
        if state.durable_id < target {
            self.log_jobs
                .send(LogJob::Flush)
                .expect("log writer is running");
        }
        // The loss check comes first: a loss sets `durable_id` past every id it dropped.
        loop {
            state.check_failed()?;
            if state.lost_generation != issued {
                return Err(lost_since(&mut state));
            }
            if state.durable_id >= target {
                break;
            }
            if let Some(why) = &state.fault_record_error {
                // Held back for a leg failure that cannot be recorded: fail, not hang.
                return Err(EngineError::CacheFailed(format!(
                    "a cache leg failed and its failure cannot be recorded: {why}"
                )));
            }
            self.progress.wait(&mut state);
        }
        if covers.is_some() {
            // Only a client's FLUSH covers every write before it: a FUA write vouches for itself,
            // a drain or a shutdown for nothing the client can see (a loss after them still owes
            // the client the error for the writes in between).
            state.flushed_id = state.flushed_id.max(target);
        }
        // New legs were attached after a loss that no FLUSH has reported yet: this one does (a
        // FUA write vouches for itself only, and its data is durable).
        let owed = self.take_owed_flush_error(&mut state, covers.is_some());
        drop(state);
        self.flush_backing_if_written()?;
        if owed {
            return Err(crate::engine::mode::owed_flush_error());
        }
        Ok(())
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
            let slot = slot_of(state.written_id, self.geometry.segment_count) as usize;
            assert_eq!(state.slots[slot].segment_id, state.written_id);
            let buffer = state.slots[slot]
                .buffer
                .take()
                .expect("written segment had a buffer");
            self.ram.release(buffer);
            state.free_buffers.push(buffer);
        }
        state.durable_id = state.durable_id.max(durable.min(state.written_id));
        self.durable_hint.store(state.durable_id, Ordering::Release);
        state.check_invariants();
        self.progress.notify_all();
        self.space_freed.notify_all();
        self.writeback_wakeup.notify_all();
    }
}
