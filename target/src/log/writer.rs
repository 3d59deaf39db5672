//! The log writer: turns sealed RAM buffers into segments on the cache legs.
//!
//! Each leg has a lane: a queue of writes (and flushes) in id order, drained by whoever drives
//! it — its own `wb-log-leg<i>` thread, or the thread of a FLUSH that sealed its segment itself
//! and would otherwise only wait (see below). A driver writes the queued segments' used blocks
//! with one sequential write at their position, and flushes its leg when asked (FLUSH, FUA,
//! sync timer) or every `LOG_BYTES_BETWEEN_LEG_FLUSHES`. The lanes run side by side: a
//! segment's write and flush go to every leg at once, and nothing but the engine's lock (taken
//! briefly to report progress) is shared between them. One driver at a time per lane, jobs in
//! id order, so "written up to k" per leg is a single number; the engine takes the minimum over
//! healthy legs.
//!
//! Sealed segments are finalised (data CRCs, header checksum, the durable id it may vouch for,
//! the chain link to the header before it) by the `wb-log` thread, off the writers' lock — or,
//! for a segment a FLUSH seals while `wb-log` has nothing queued, by the FLUSH's own thread under
//! the engine's lock, which then drives leg 0 itself (`LogQueues::write_now`, `drive`): an
//! fsync'd write then costs its own write and flush, not three thread hand-offs on top. (The
//! engine also seals a sync writer's write at once, so that its write and flush overlap the
//! FLUSH's way through the kernel: `Shared::seal_if_sync_writer`.)
//!
//! Segments in flight are bounded by the RAM buffers: a buffer is reused only once its slot is
//! closed and on every leg.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use logfmt::{Position, SegmentHeader, SEGMENT_SIZE_BYTES};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::log::legs::{CacheLegs, Leg};
use crate::log::ram_buffer::RamBuffers;

/// A leg is flushed at least once per this many bytes written to it even without FLUSH requests,
/// so that recovery after a power cut has to verify the data of only the last few MiB of the log
/// (recovery reads data only above the newest durable id a header vouches for: CONTRACT §3, §8).
/// Bytes, not segments: a segment may be one block or a whole slot.
pub const LOG_BYTES_BETWEEN_LEG_FLUSHES: u64 = 4 << 20;

/// Segments queued together whose blocks follow one another on the leg go out as one write of up
/// to this many bytes (2 MiB): the per-I/O cost is paid once for them all.
pub const MAX_COALESCED_BYTES: usize = 4 * SEGMENT_SIZE_BYTES;

/// The lane a FLUSH that seals its own segment drives itself; the other legs' threads write it
/// meanwhile.
pub const SELF_DRIVEN_LANE: usize = 0;

/// How often an idle leg thread looks at its lane without being woken: only a job queued for
/// the FLUSH thread that sealed it, in the moment before that thread drives it, goes unwoken —
/// this bounds what a mistake there could cost, it is not how work normally arrives.
const LANE_POLL: Duration = Duration::from_millis(100);

/// What the log writer needs from the one it writes for (the engine): the legs and RAM buffers
/// it writes from and to, the durable id a header may vouch for, and where to report progress
/// and failures. The log never names the engine: dependencies point from the engine to the log.
pub trait LogHost: Send + Sync + 'static {
    fn legs(&self) -> &CacheLegs;
    fn ram(&self) -> &RamBuffers;
    fn queues(&self) -> &LogQueues;
    fn segment_count(&self) -> u64;
    /// The newest id known durable on every leg in use: the next sealed header vouches for it.
    fn durable_hint(&self) -> u64;
    /// Leg `leg` has written (`written`) and flushed (`durable`) every segment up to these ids.
    fn on_leg_progress(&self, leg: usize, written: u64, durable: u64);
    /// A leg write or flush failed: the failure must be on record before a FLUSH may complete
    /// on the other legs alone.
    fn on_leg_failed(&self);
    /// This run's nonce, in every header it writes.
    fn run_nonce(&self) -> u64;
    /// The record CRC of the header of segment `id - 1`, sealed just before (the chain).
    fn link(&self, id: u64) -> u32;
    /// Segment `id` is sealed and its header's record CRC is `crc`.
    fn linked(&self, id: u64, crc: u32);
}

pub(crate) enum LogJob {
    Segment {
        header: SegmentHeader,
        /// Its ring slot (the header names its block).
        slot: u64,
        buffer: usize,
        /// Flush the legs after writing (FLUSH, FUA, timer).
        flush_legs: bool,
    },
    /// Flush every leg once everything up to this id is written.
    Flush,
    Stop,
}

enum LegJob {
    Write { piece: Piece, flush: bool },
    Flush,
}

/// The way from the engine to the legs: the `wb-log` thread's queue and one lane per leg.
pub struct LogQueues {
    jobs: Sender<LogJob>,
    /// Jobs sent to `wb-log` and not yet queued on the lanes. Raised only under the engine's
    /// lock (which every seal holds), so at zero under that lock nothing sealed before is still
    /// on its way to the lanes, and a segment sealed now may go to them directly.
    in_sealer: AtomicU64,
    lanes: Vec<Lane>,
}

/// One leg's queue and the position of its writes.
struct Lane {
    queue: Mutex<LaneQueue>,
    work: Condvar,
}

#[derive(Default)]
struct LaneQueue {
    jobs: VecDeque<LegJob>,
    /// A thread is writing or flushing this leg (it takes queued jobs until none is left or, a
    /// FLUSH's thread, until its own segment is done).
    driven: bool,
    /// A FLUSH's thread saw this leg fail: the leg's own thread records it (`on_leg_failed`
    /// writes the fault record, which may wait for writeback's checkpoint: no client request
    /// waits for that here; the FLUSH waits for the record only if it needs the leg).
    failure_to_record: bool,
    stop: bool,
    progress: LaneProgress,
}

/// Where a leg's writes stand; changed only by the lane's driver.
#[derive(Default, Clone, Copy)]
struct LaneProgress {
    written: u64,
    durable: u64,
    unflushed_bytes: u64,
}

impl LogQueues {
    pub(crate) fn new(legs: usize) -> (LogQueues, Receiver<LogJob>) {
        let (jobs, rx) = crossbeam_channel::unbounded();
        let lanes = (0..legs)
            .map(|_| Lane {
                queue: Mutex::new(LaneQueue::default()),
                work: Condvar::new(),
            })
            .collect();
        let queues = LogQueues {
            jobs,
            in_sealer: AtomicU64::new(0),
            lanes,
        };
        (queues, rx)
    }

    /// Hands a sealed segment or a flush to `wb-log`. The caller holds the engine's lock.
    pub(crate) fn send(&self, job: LogJob) {
        self.in_sealer.fetch_add(1, Ordering::AcqRel);
        // The log writer outlives every sealer (it stops only after the last seal at shutdown).
        self.jobs.send(job).expect("log writer is running");
    }

    pub(crate) fn stop(&self) {
        let _ = self.jobs.send(LogJob::Stop);
    }

    /// Whether `wb-log` has nothing queued: a segment sealed now (under the engine's lock) may
    /// skip it without overtaking an earlier one.
    pub(crate) fn sealer_idle(&self) -> bool {
        self.in_sealer.load(Ordering::Acquire) == 0
    }

    /// Finalises a segment sealed in place for someone who waits for it (a FLUSH, or the FLUSH
    /// expected after a sync writer's write), and queues it on every lane, to be written and
    /// flushed. The caller holds the engine's lock and found `sealer_idle`. With
    /// `caller_drives`, `SELF_DRIVEN_LANE`'s thread is not woken: the caller must `drive` that
    /// lane once it has let the lock go.
    pub(crate) fn write_now(
        &self,
        host: &impl LogHost,
        header: SegmentHeader,
        slot: u64,
        buffer: usize,
        caller_drives: bool,
    ) {
        debug_assert!(
            self.sealer_idle(),
            "a segment sealed in place overtook wb-log"
        );
        let piece = finalise(host, header, slot, buffer);
        self.push_all(|| LegJob::Write { piece, flush: true }, caller_drives);
    }

    /// Queues a flush of every leg, for a FLUSH whose writes are all sealed: as with
    /// `write_now(caller_drives)`, the caller drives `SELF_DRIVEN_LANE`.
    pub(crate) fn flush_now(&self) {
        debug_assert!(
            self.sealer_idle(),
            "a flush queued in place overtook wb-log"
        );
        self.push_all(|| LegJob::Flush, true);
    }

    /// Queues `job` on every lane and wakes the legs' threads, all but `SELF_DRIVEN_LANE`'s if
    /// `caller_drives` (the caller drives that lane itself once it holds no lock).
    fn push_all(&self, job: impl Fn() -> LegJob, caller_drives: bool) {
        for (index, lane) in self.lanes.iter().enumerate() {
            lane.push(job(), !caller_drives || index != SELF_DRIVEN_LANE);
        }
    }

    /// Writes what lane `index` holds, unless another thread drives it already (it takes what
    /// was queued). With `until` (a FLUSH's thread), stops once segment `until` is durable on the
    /// leg (or the lane is empty: a leg out of use is not flushed), and wakes the leg's thread
    /// for the rest and to record a failure: a FLUSH's thread serves its own request, not the
    /// whole log. Without (the leg's own thread), drains the lane.
    pub(crate) fn drive(&self, host: &impl LogHost, index: usize, until: Option<u64>) {
        let lane = &self.lanes[index];
        let mut q = lane.queue.lock();
        if q.driven {
            return;
        }
        q.driven = true;
        while until.is_none_or(|id| q.progress.durable < id) {
            let Some((run, flush)) = q.next_work() else {
                break;
            };
            let before = q.progress;
            // The I/O and the report without the lane's lock: the engine queues jobs under its
            // own lock, which the report takes. Only this driver changes the progress.
            let (progress, failed) =
                MutexGuard::unlocked(&mut q, || leg_io(host, index, &run, flush, before));
            q.progress = progress;
            if failed && until.is_none() {
                // Before a FLUSH may complete on the other leg alone, the failure must be on
                // record (the engine's durable id waits for it): record it now.
                MutexGuard::unlocked(&mut q, || host.on_leg_failed());
            }
            q.failure_to_record |= failed && until.is_some();
        }
        q.driven = false;
        if !q.jobs.is_empty() || q.stop || q.failure_to_record {
            lane.work.notify_all();
        }
    }

    fn stop_lanes(&self) {
        for lane in &self.lanes {
            lane.queue.lock().stop = true;
            lane.work.notify_all();
        }
    }
}

impl Lane {
    fn push(&self, job: LegJob, wake: bool) {
        let mut q = self.queue.lock();
        // The log writer outlives every sealer (it stops only after the last seal at shutdown).
        assert!(!q.stop, "a log job queued after the log writer stopped");
        q.jobs.push_back(job);
        drop(q);
        if wake {
            self.work.notify_one();
        }
    }
}

impl LaneQueue {
    /// The next write (segments that follow one another on the leg, coalesced) or flush, and
    /// whether the leg is to be flushed after it.
    fn next_work(&mut self) -> Option<(Vec<Piece>, bool)> {
        match self.jobs.pop_front()? {
            LegJob::Flush => Some((Vec::new(), true)),
            LegJob::Write { piece, flush } => {
                // "Written up to k" is one number per leg because the jobs come in id order.
                assert!(
                    piece.id > self.progress.written,
                    "segment {} queued after segment {}",
                    piece.id,
                    self.progress.written
                );
                Some(self.coalesce(piece, flush))
            }
        }
    }

    /// Coalesces the segments queued behind `first` whose blocks follow on the leg (sub-segments
    /// packed in a slot, full segments in adjacent slots) into one larger write, as long as no
    /// flush is asked for before the last: fewer, larger I/Os for the same bytes.
    fn coalesce(&mut self, first: Piece, mut flush: bool) -> (Vec<Piece>, bool) {
        let mut run = vec![first];
        let mut bytes = first.len;
        while !flush {
            let last = *run.last().expect("non-empty");
            match self.jobs.front() {
                Some(&LegJob::Write { piece, flush: f })
                    if piece.id == last.id + 1
                        && piece.position.offset() == last.end()
                        && bytes + piece.len <= MAX_COALESCED_BYTES =>
                {
                    self.jobs.pop_front();
                    run.push(piece);
                    bytes += piece.len;
                    flush = f;
                }
                _ => break,
            }
        }
        (run, flush)
    }
}

pub(crate) fn start<H: LogHost>(shared: &Arc<H>, jobs: Receiver<LogJob>) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    for leg in 0..shared.legs().all().len() {
        let shared = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("wb-log-leg{leg}"))
                .spawn(move || leg_thread(&*shared, leg))
                .expect("spawn leg writer"),
        );
    }
    let shared = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("wb-log".into())
            .spawn(move || sealer(&*shared, jobs))
            .expect("spawn log writer"),
    );
    threads
}

/// The data CRCs, the durable id it vouches for and the chain link of a sealed segment, encoded
/// into its header block: what is left to do before it may be written.
fn finalise(host: &impl LogHost, mut header: SegmentHeader, slot: u64, buffer: usize) -> Piece {
    let id = header.segment_id;
    header.durable_id = host.durable_hint();
    header.run_nonce = host.run_nonce();
    header.prev_crc = host.link(id);
    let crc = host.ram().finalise(buffer, &mut header);
    host.linked(id, crc);
    Piece {
        id,
        buffer,
        position: header.position(slot),
        len: header.used_bytes(),
    }
}

/// Stops the lanes when `wb-log` ends, however it ends (a panic too): the legs' threads finish
/// what is queued and exit, and the engine's stop does not wait for them for ever.
struct StopLanesOnExit<'a>(&'a LogQueues);

impl Drop for StopLanesOnExit<'_> {
    fn drop(&mut self) {
        self.0.stop_lanes();
    }
}

fn sealer(host: &impl LogHost, jobs: Receiver<LogJob>) {
    let queues = host.queues();
    let _stop_lanes = StopLanesOnExit(queues);
    for job in jobs {
        match job {
            LogJob::Segment {
                header,
                slot,
                buffer,
                flush_legs,
            } => {
                let piece = finalise(host, header, slot, buffer);
                let job = || LegJob::Write {
                    piece,
                    flush: flush_legs,
                };
                queues.push_all(job, false);
            }
            LogJob::Flush => queues.push_all(|| LegJob::Flush, false),
            LogJob::Stop => break,
        }
        queues.in_sealer.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A leg's own thread: drives its lane whenever jobs wait and no other thread drives it; ends
/// once the log writer stopped and the lane is empty.
fn leg_thread(host: &impl LogHost, index: usize) {
    let queues = host.queues();
    let lane = &queues.lanes[index];
    loop {
        {
            let mut q = lane.queue.lock();
            while (q.jobs.is_empty() || q.driven) && !q.failure_to_record {
                if q.stop && q.jobs.is_empty() && !q.driven {
                    return;
                }
                lane.work.wait_for(&mut q, LANE_POLL);
            }
            if std::mem::take(&mut q.failure_to_record) {
                MutexGuard::unlocked(&mut q, || host.on_leg_failed());
            }
        }
        queues.drive(host, index, None);
    }
}

/// Writes a run of segments (if any) to leg `index`, flushes the leg if asked or due, and
/// reports the leg's progress to the host. Returns the new progress and whether the leg failed.
fn leg_io(
    host: &impl LogHost,
    index: usize,
    run: &[Piece],
    flush: bool,
    mut p: LaneProgress,
) -> (LaneProgress, bool) {
    let leg: &Leg = &host.legs().all()[index];
    let mut failed = false;
    if let Some(last) = run.last() {
        failed = !write_run(host, leg, run);
        p.written = last.id;
        p.unflushed_bytes += run.iter().map(|p| p.len as u64).sum::<u64>();
    }
    let flush = flush || p.unflushed_bytes >= LOG_BYTES_BETWEEN_LEG_FLUSHES;
    if flush && leg.is_healthy() && p.durable < p.written {
        let (device, generation) = leg.device_for_io();
        match device.flush() {
            Ok(()) => (p.durable, p.unflushed_bytes) = (p.written, 0),
            Err(e) => {
                leg.write_failed(generation, &e);
                failed = true;
            }
        }
    }
    leg.handled_id.fetch_max(p.written, Ordering::AcqRel);
    if !run.is_empty() || flush {
        host.on_leg_progress(index, p.written, p.durable);
    }
    (p, failed)
}

/// One segment to write: its id, RAM buffer, position and bytes used.
#[derive(Clone, Copy)]
struct Piece {
    id: u64,
    buffer: usize,
    position: Position,
    len: usize,
}

impl Piece {
    fn end(&self) -> u64 {
        self.position.offset() + self.len as u64
    }
}

/// Writes a run of segments that follow one another on the leg with one I/O, unless the leg is
/// out of use. Returns false if the write failed (the leg is then marked failed).
fn write_run(shared: &impl LogHost, leg: &Leg, run: &[Piece]) -> bool {
    if !leg.is_healthy() {
        return true;
    }
    let images: Vec<&[u8]> = run
        .iter()
        .map(|p| {
            shared
                .ram()
                .segment_bytes(p.buffer, p.position.block, p.len)
        })
        .collect();
    let offset = run[0].position.offset();
    let (device, generation) = leg.device_for_io();
    match device.write_vectored_at(&images, offset) {
        Ok(()) => true,
        Err(e) => {
            leg.write_failed(generation, &e);
            false
        }
    }
}
