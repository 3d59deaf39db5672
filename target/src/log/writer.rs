//! The log writer: turns sealed RAM buffers into segments on the cache legs.
//!
//! Threads: `wb-log` finalises each sealed segment (data CRCs, header checksum, the durable id it
//! may vouch for, the chain link to the header before it) and hands it to one `wb-log-leg<i>`
//! thread per leg, which writes its used blocks with one sequential write at its position and
//! flushes its leg when asked (FLUSH, FUA, sync timer) or every `LOG_BYTES_BETWEEN_LEG_FLUSHES`.
//! The legs' threads run side by side: a segment's write and flush go to every leg at once, and
//! nothing but the engine's lock (taken briefly to report progress) is shared between them. Each
//! leg thread handles jobs in id order, so "written up to k" per leg is a single number; the
//! engine takes the minimum over healthy legs.
//!
//! Segments in flight are bounded by the RAM buffers: a buffer is reused only once its slot is
//! closed and on every leg.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use logfmt::{Position, SegmentHeader, SEGMENT_SIZE_BYTES};

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
                slot,
                buffer,
                flush_legs,
            } => {
                let id = header.segment_id;
                header.durable_id = shared.durable_hint();
                header.run_nonce = shared.run_nonce();
                header.prev_crc = shared.link(id);
                let crc = shared.ram().finalise(buffer, &mut header);
                shared.linked(id, crc);
                let piece = Piece {
                    id,
                    buffer,
                    position: header.position(slot),
                    len: header.used_bytes(),
                };
                send_all(&|| LegJob::Write {
                    piece,
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
    let mut written = 0u64;
    let mut durable = 0u64;
    let mut unflushed_bytes = 0u64;
    let mut held: Option<LegJob> = None;
    while let Some(job) = held.take().or_else(|| jobs.recv().ok()) {
        let mut failed = false;
        let (flush, wrote) = match job {
            LegJob::Write { piece, flush } => {
                // "Written up to k" is one number per leg because the jobs come in id order.
                assert!(
                    piece.id > written,
                    "leg {leg_index}: segment {} queued after segment {written}",
                    piece.id
                );
                let (run, flush) = coalesce(piece, flush, &jobs, &mut held);
                failed = !write_run(shared, leg, &run);
                written = run.last().expect("non-empty").id;
                unflushed_bytes += run.iter().map(|p| p.len as u64).sum::<u64>();
                (
                    flush || unflushed_bytes >= LOG_BYTES_BETWEEN_LEG_FLUSHES,
                    true,
                )
            }
            LegJob::Flush => (true, false),
            LegJob::Stop => break,
        };
        if flush && leg.is_healthy() && durable < written {
            let (device, generation) = leg.device_for_io();
            match device.flush() {
                Ok(()) => (durable, unflushed_bytes) = (written, 0),
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

/// Coalesces the segments queued behind `first` whose blocks follow on the leg (sub-segments
/// packed in a slot, full segments in adjacent slots) into one larger write, as long as no flush
/// is asked for before the last: fewer, larger I/Os for the same bytes. A job that cannot join
/// is kept in `held` for the next round.
fn coalesce(
    first: Piece,
    mut flush: bool,
    jobs: &Receiver<LegJob>,
    held: &mut Option<LegJob>,
) -> (Vec<Piece>, bool) {
    let mut run = vec![first];
    let mut bytes = first.len;
    while !flush {
        let last = *run.last().expect("non-empty");
        match jobs.try_recv() {
            Ok(LegJob::Write { piece, flush: f })
                if piece.id == last.id + 1
                    && piece.position.offset() == last.end()
                    && bytes + piece.len <= MAX_COALESCED_BYTES =>
            {
                run.push(piece);
                bytes += piece.len;
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
