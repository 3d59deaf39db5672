//! The log writer: turns sealed RAM buffers into segments on the cache legs.
//!
//! Threads: `wb-log` finalises each sealed segment (data CRCs, header checksum, the durable id it
//! may vouch for) and hands it to one `wb-log-leg<i>` thread per leg, which writes it with one
//! sequential 512 KiB write and flushes its leg when asked (FLUSH, FUA, sync timer) or every
//! `SEGMENTS_BETWEEN_LEG_FLUSHES`. Each leg thread handles jobs in id order, so "written up to k"
//! per leg is a single number; the engine takes the minimum over healthy legs.
//!
//! Segments in flight are bounded by the RAM buffers: a buffer is reused only once its segment
//! is on every leg.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use logfmt::{segment_offset, slot_of, SegmentHeader, SEGMENT_SIZE_BYTES};

use crate::log::legs::{CacheLegs, Leg};
use crate::log::ram_buffer::RamBuffers;

/// Leg flushes happen at least this often even without FLUSH requests, so that recovery after a
/// power cut has to verify the data of only the few newest segments (CONTRACT §3, §8: start-up reads
/// at most 1 % of the cache).
pub const SEGMENTS_BETWEEN_LEG_FLUSHES: u64 = 8;

/// Full segments in adjacent slots that are queued together go out as one write of up to this
/// many segments (2 MiB): the per-I/O cost is paid once for them all.
pub const MAX_COALESCED_SEGMENTS: usize = 4;

/// What the log writer needs from the one it writes for (the engine): the legs and RAM buffers
/// it writes from and to, the durable id a header may vouch for, and where to report progress
/// and failures. The log never names the engine: dependencies point from the engine to the log.
pub trait LogHost: Send + Sync + 'static {
    fn legs(&self) -> &CacheLegs;
    fn ram(&self) -> &RamBuffers;
    fn segment_count(&self) -> u64;
    /// The newest id known durable on every leg in use: the next sealed header vouches for it.
    fn durable_hint(&self) -> u64;
    /// Leg `leg` has written (`written`) and flushed (`durable`) every segment up to these ids.
    fn on_leg_progress(&self, leg: usize, written: u64, durable: u64);
    /// A leg write or flush failed: the failure must be on record before a FLUSH may complete
    /// on the other legs alone.
    fn on_leg_failed(&self);
}

pub(crate) enum LogJob {
    Segment {
        header: SegmentHeader,
        buffer: usize,
        /// Flush the legs after writing (FLUSH, FUA, timer).
        flush_legs: bool,
    },
    /// Flush every leg once everything up to this id is written.
    Flush,
    Stop,
}

enum LegJob {
    Write {
        id: u64,
        buffer: usize,
        len: usize,
        flush: bool,
    },
    Flush,
    Stop,
}

pub(crate) fn start<H: LogHost>(shared: &Arc<H>, jobs: Receiver<LogJob>) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    let mut leg_queues: Vec<Sender<LegJob>> = Vec::new();
    for leg in 0..shared.legs().all().len() {
        let (tx, rx) = crossbeam_channel::unbounded();
        leg_queues.push(tx);
        let shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("wb-log-leg{leg}"))
                .spawn(move || leg_writer(&*shared, leg, rx))
                .expect("spawn leg writer"),
        );
    }
    let shared = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("wb-log".into())
            .spawn(move || sealer(&*shared, jobs, leg_queues))
            .expect("spawn log writer"),
    );
    threads
}

fn sealer(shared: &impl LogHost, jobs: Receiver<LogJob>, legs: Vec<Sender<LegJob>>) {
    let send_all = |job: &dyn Fn() -> LegJob| {
        for q in &legs {
            let _ = q.send(job());
        }
    };
    for job in jobs {
        match job {
            LogJob::Segment {
                mut header,
                buffer,
                flush_legs,
            } => {
                header.durable_id = shared.durable_hint();
                shared.ram().finalise(buffer, &mut header);
                let len = header.used_bytes();
                let id = header.segment_id;
                send_all(&|| LegJob::Write {
                    id,
                    buffer,
                    len,
                    flush: flush_legs,
                });
            }
            LogJob::Flush => send_all(&|| LegJob::Flush),
            LogJob::Stop => break,
        }
    }
    send_all(&|| LegJob::Stop);
}

fn leg_writer(shared: &impl LogHost, leg_index: usize, jobs: Receiver<LegJob>) {
    let leg: &Leg = &shared.legs().all()[leg_index];
    let n = shared.segment_count();
    let mut written = 0u64;
    let mut durable = 0u64;
    let mut held: Option<LegJob> = None;
    while let Some(job) = held.take().or_else(|| jobs.recv().ok()) {
        let mut failed = false;
        let (flush, wrote) = match job {
            LegJob::Write {
                id,
                buffer,
                len,
                flush,
            } => {
                // "Written up to k" is one number per leg because the jobs come in id order.
                assert!(
                    id > written,
                    "leg {leg_index}: segment {id} queued after segment {written}"
                );
                let (run, flush) = coalesce((id, buffer, len), flush, &jobs, &mut held, n);
                failed = !write_run(shared, leg, &run, n);
                written = run.last().expect("non-empty").0;
                (
                    flush || written - durable >= SEGMENTS_BETWEEN_LEG_FLUSHES,
                    true,
                )
            }
            LegJob::Flush => (true, false),
            LegJob::Stop => break,
        };
        if flush && leg.is_healthy() && durable < written {
            let (device, generation) = leg.device_for_io();
            match device.flush() {
                Ok(()) => durable = written,
                Err(e) => {
                    leg.write_failed(generation, &e);
                    failed = true;
                }
            }
        }
        leg.handled_id.fetch_max(written, Ordering::AcqRel);
        if wrote || flush {
            shared.on_leg_progress(leg_index, written, durable);
        }
        if failed {
            // Before a FLUSH may complete on the other leg alone, the failure must be on record
            // (the engine's durable id waits for it): report it now rather than at the next tick.
            shared.on_leg_failed();
        }
    }
}

/// One segment to write: id, RAM buffer, bytes used.
type Piece = (u64, usize, usize);

/// Coalesces the full segments queued behind `first` into one larger write, as long as their
/// slots are adjacent and no flush is asked for before the last: fewer, larger I/Os for the
/// same bytes. A job that cannot join is kept in `held` for the next round.
fn coalesce(
    first: Piece,
    mut flush: bool,
    jobs: &Receiver<LegJob>,
    held: &mut Option<LegJob>,
    n: u64,
) -> (Vec<Piece>, bool) {
    let mut run = vec![first];
    while run.len() < MAX_COALESCED_SEGMENTS && !flush {
        let &(last_id, _, last_len) = run.last().expect("non-empty");
        if last_len != SEGMENT_SIZE_BYTES || slot_of(last_id + 1, n) == 0 {
            break;
        }
        match jobs.try_recv() {
            Ok(LegJob::Write {
                id,
                buffer,
                len,
                flush: f,
            }) if id == last_id + 1 => {
                run.push((id, buffer, len));
                flush = f;
            }
            Ok(other) => {
                *held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    (run, flush)
}

/// Writes a run of segments in adjacent slots with one I/O, unless the leg is out of use.
/// Returns false if the write failed (the leg is then marked failed).
fn write_run(shared: &impl LogHost, leg: &Leg, run: &[Piece], n: u64) -> bool {
    if !leg.is_healthy() {
        return true;
    }
    let images: Vec<&[u8]> = run
        .iter()
        .map(|&(_, buffer, len)| &shared.ram().image(buffer)[..len])
        .collect();
    let offset = segment_offset(slot_of(run[0].0, n));
    let (device, generation) = leg.device_for_io();
    match device.write_vectored_at(&images, offset) {
        Ok(()) => true,
        Err(e) => {
            leg.write_failed(generation, &e);
            false
        }
    }
}
