//! Starting and stopping an engine's threads, drain, and run-time policy changes.
//!
//! Threads: `wb-log` and `wb-log-leg<i>` (log writer), `wb-sync` (seals an open segment once the
//! sync interval passes), `wb-writeback` (ordered replay onto the backing device).
//! Every shutdown path seals and flushes the log before the threads stop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::Mutex;
use writeback::{CacheLog, Policy, Writeback};

use crate::engine::{Engine, Shared};
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
/// checkpoint, instead of dying unnoticed while the cache fills and writers stall. (A panic
/// anywhere else ends the daemon: `crate::panics`.)
fn run_writeback(s: &Arc<Shared>) -> std::result::Result<(), String> {
    let log: Arc<dyn CacheLog> = s.clone();
    match crate::panics::catching(|| Writeback::new(log).run()) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => Err(format!(
            "the writeback thread panicked: {}",
            crate::panics::message(&*panic)
        )),
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
        let flushed = if self.shared.stopping.load(Ordering::Acquire) {
            // Stopped already (by an earlier shutdown, or `abandon`: what a killed daemon
            // leaves, the buffer file included, is left as it is).
            None
        } else {
            Some(self.shared.flush_internal())
        };
        self.stop_threads();
        if let Some(Ok(())) = flushed {
            self.release_written_buffers();
        }
        flushed.unwrap_or(Ok(()))
    }

    /// After the last seal: the buffer of the slot the log was writing is released once all of
    /// it is on the legs, though the slot is not closed (no segment will follow in this run), so
    /// that a clean stop leaves a buffer file holding nothing.
    fn release_written_buffers(&self) {
        let s = &self.shared;
        let mut state = s.state.lock();
        let state = &mut *state;
        for slot in state.slots.iter_mut() {
            if slot.last_id <= state.written_id {
                if let Some(buffer) = slot.buffer.take() {
                    s.ram.release(buffer);
                    state.free_buffers.push(buffer);
                }
            }
        }
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
        self.shared.log.stop();
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
            if let Err(e) = state.check_alive() {
                break Err(e);
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
