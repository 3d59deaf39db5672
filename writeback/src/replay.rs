//! Ordered replay: the `wb-writeback` loop and the batch planner.
//!
//! Invariants enforced here (SPEC §2, "cache lost entirely"):
//! - Segments are written back in id order, in batches of consecutive segments of ONE epoch.
//! - Inside a batch, and only there, blocks are sorted, merged and superseded versions dropped,
//!   and whole-block writes are issued several at a time (they may complete in any order).
//! - Reading is not writing: the next batch is read from the cache while this one is written,
//!   but nothing of it reaches the backing device before this batch's flush and commit.
//! - After each batch the backing device is flushed, and only then is the checkpoint advanced
//!   (`CacheLog::commit`); so every epoch boundary is crossed with the previous epoch flushed,
//!   and a crash at any point leaves: all epochs before the batch's, plus a subset of its writes.
//! - Re-writing a segment that was already written back (after a crash before the checkpoint)
//!   writes values of the same epoch again, before anything newer: harmless.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use logfmt::{
    data_block_offset, EntryKind, SegmentHeader, ALL_SECTORS_VALID, BLOCK_SIZE_BYTES,
    SECTOR_SIZE_BYTES, SEGMENT_SIZE_BYTES,
};

use crate::{AlignedBuf, CacheLog, Throttle};

/// Segments per batch at most: 16 MiB of segment images held in memory, twice over while the
/// next batch is read during the writing of this one.
pub const MAX_BATCH_SEGMENTS: usize = 32;
/// Largest merged backing write.
pub const MAX_MERGED_WRITE_BYTES: usize = 1 << 20;
/// A run of blocks that lie one after the other in one segment image, this long or longer, is
/// written on its own straight from the image instead of being copied together with the next
/// image's blocks into a larger write.
pub const ZERO_COPY_RUN_BYTES: usize = 64 << 10;
/// Whole-block backing writes of a batch issued at once. They cover distinct blocks of one
/// epoch, so they may complete in any order; several in flight keep a backing device that is
/// an array, a zvol or an iSCSI LUN busy (one at a time waits a full round trip per write).
pub const WRITES_IN_FLIGHT: usize = 4;
/// How long the loop sleeps when the policy says "not now" (it is woken earlier by new work).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Pause before retrying after a backing device error.
const BACKING_RETRY_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WritebackStats {
    pub batches: u64,
    pub segments: u64,
    pub backing_flushes: u64,
    /// Backing writes one per logged entry would have taken.
    pub ios_unmerged: u64,
    /// Backing writes actually issued.
    pub ios_merged: u64,
    pub bytes_written: u64,
    pub backing_errors: u64,
}

/// One backing operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingOp {
    Zero {
        offset: u64,
        len: u64,
        discard: bool,
    },
    /// `len` bytes at `offset`, taken from `pieces`: (segment index in batch, byte offset in that
    /// segment image, length).
    Write {
        offset: u64,
        pieces: Vec<(usize, usize, usize)>,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// Zeroing first, then data: a write logged after a discard in the same batch survives it,
    /// and a write logged before it was dropped from the plan.
    pub ops: Vec<BackingOp>,
    pub entries: u64,
}

#[derive(Clone, Copy)]
struct Newest {
    segment: usize,
    data_slot: usize,
    mask: u8,
}

/// Plans the backing writes of a batch (headers of consecutive segments of one epoch, in id
/// order): the newest version of each block, sorted by address, adjacent blocks merged.
pub fn plan_batch(headers: &[SegmentHeader]) -> BatchPlan {
    let mut newest: BTreeMap<u64, Newest> = BTreeMap::new();
    let mut zeros: Vec<(u64, u64, bool)> = Vec::new();
    let mut entries = 0u64;
    for (segment, h) in headers.iter().enumerate() {
        for e in &h.entries {
            entries += 1;
            match e.kind {
                EntryKind::Data => {
                    newest.insert(
                        e.block(),
                        Newest {
                            segment,
                            data_slot: e.data_slot as usize,
                            mask: e.sector_valid,
                        },
                    );
                }
                EntryKind::Discard | EntryKind::WriteZeroes => {
                    let spb = (BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES) as u64;
                    let start = e.start_sector / spb;
                    let end = (e.start_sector + e.length_sectors as u64).div_ceil(spb);
                    let doomed: Vec<u64> = newest.range(start..end).map(|(b, _)| *b).collect();
                    for b in doomed {
                        newest.remove(&b);
                    }
                    zeros.push((
                        e.start_sector * SECTOR_SIZE_BYTES as u64,
                        e.length_sectors as u64 * SECTOR_SIZE_BYTES as u64,
                        e.kind == EntryKind::Discard,
                    ));
                }
            }
        }
    }
    let mut ops: Vec<BackingOp> = zeros
        .into_iter()
        .map(|(offset, len, discard)| BackingOp::Zero {
            offset,
            len,
            discard,
        })
        .collect();
    let mut run: Option<Run> = None;
    for (block, n) in newest {
        let block_offset = block * BLOCK_SIZE_BYTES as u64;
        let data_offset = data_block_offset(n.data_slot);
        if n.mask != ALL_SECTORS_VALID {
            ops.extend(run.take().map(Run::into_op));
            // A partial block: one write per run of valid sectors.
            let mut sector = 0;
            while sector < 8 {
                if n.mask & (1 << sector) == 0 {
                    sector += 1;
                    continue;
                }
                let first = sector;
                while sector < 8 && n.mask & (1 << sector) != 0 {
                    sector += 1;
                }
                let (off, len) = (
                    first * SECTOR_SIZE_BYTES,
                    (sector - first) * SECTOR_SIZE_BYTES,
                );
                ops.push(BackingOp::Write {
                    offset: block_offset + off as u64,
                    pieces: vec![(n.segment, data_offset + off, len)],
                });
            }
            continue;
        }
        let piece = (n.segment, data_offset, BLOCK_SIZE_BYTES);
        match &mut run {
            Some(r) if r.takes(block_offset, &piece) => r.push(piece),
            _ => ops.extend(run.replace(Run::new(block_offset, piece)).map(Run::into_op)),
        }
    }
    ops.extend(run.map(Run::into_op));
    BatchPlan { ops, entries }
}

/// (segment index in the batch, byte offset in that segment's image, length)
type Piece = (usize, usize, usize);

/// A merged backing write being assembled.
struct Run {
    offset: u64,
    len: usize,
    pieces: Vec<Piece>,
}

impl Run {
    fn new(offset: u64, piece: Piece) -> Run {
        Run {
            offset,
            len: piece.2,
            pieces: vec![piece],
        }
    }

    /// Whether `piece` continues the last piece within the same segment image.
    fn continues(&self, piece: &Piece) -> bool {
        let last = self.pieces.last().expect("a run has a piece");
        last.0 == piece.0 && last.1 + last.2 == piece.1
    }

    /// Whether the block at `offset`, held by `piece`, joins this run: it must be adjacent and
    /// fit under the cap. A run that is one long stretch of one image goes out as it is (written
    /// straight from the image, no copy) rather than glued to the next image's blocks.
    fn takes(&self, offset: u64, piece: &Piece) -> bool {
        self.offset + self.len as u64 == offset
            && self.len + piece.2 <= MAX_MERGED_WRITE_BYTES
            && (self.continues(piece) || self.pieces.len() > 1 || self.len < ZERO_COPY_RUN_BYTES)
    }

    fn push(&mut self, piece: Piece) {
        if self.continues(&piece) {
            self.pieces.last_mut().expect("a run has a piece").2 += piece.2;
        } else {
            self.pieces.push(piece);
        }
        self.len += piece.2;
    }

    fn into_op(self) -> BackingOp {
        BackingOp::Write {
            offset: self.offset,
            pieces: self.pieces,
        }
    }
}

/// Consecutive segments of one epoch, read from the cache, and their images.
#[derive(Default)]
struct Batch {
    headers: Vec<SegmentHeader>,
    images: Vec<AlignedBuf>,
    /// The segment after the batch, when it begins another epoch (read already).
    next: Option<(SegmentHeader, AlignedBuf)>,
}

impl Batch {
    fn first_id(&self) -> Option<u64> {
        self.headers.first().map(|h| h.segment_id)
    }

    fn last_id(&self) -> Option<u64> {
        self.headers.last().map(|h| h.segment_id)
    }

    /// Gives the images back for reuse.
    fn recycle(self, spare: &mut Vec<AlignedBuf>) {
        spare.extend(self.images);
        spare.extend(self.next.map(|(_, image)| image));
    }

    /// Reads written segments after the batch's last one (from `first` if it is empty) while
    /// they belong to its epoch, up to `MAX_BATCH_SEGMENTS`.
    fn fill(
        &mut self,
        log: &dyn CacheLog,
        first: u64,
        spare: &mut Vec<AlignedBuf>,
    ) -> io::Result<()> {
        if self.next.is_some() {
            return Ok(()); // the epoch ended
        }
        let written = log.written_id();
        let mut id = self.last_id().map_or(first, |last| last + 1);
        while id <= written && self.headers.len() < MAX_BATCH_SEGMENTS {
            let mut image = spare
                .pop()
                .unwrap_or_else(|| AlignedBuf::new(SEGMENT_SIZE_BYTES));
            let header = match log.read_segment(id, &mut image) {
                Ok(header) => header,
                Err(e) => {
                    spare.push(image);
                    return Err(e);
                }
            };
            if self
                .headers
                .first()
                .is_some_and(|first| first.epoch_id != header.epoch_id)
            {
                self.next = Some((header, image));
                break;
            }
            self.headers.push(header);
            self.images.push(image);
            id += 1;
        }
        Ok(())
    }
}

/// The writeback worker. `run` loops until the cache shuts down.
///
/// While one batch is written to the backing device, the next is read from the cache on a
/// second thread (the cache and the backing device work at the same time), into images that
/// are reused from batch to batch.
pub struct Writeback {
    log: Arc<dyn CacheLog>,
    /// The next batch, read while the previous one was written back.
    ahead: Option<Batch>,
    /// Segment images not in use. Aligned, so the engine reads straight into them and
    /// whole stretches of them are written to the backing device without a copy.
    spare: Vec<AlignedBuf>,
    throttle: Throttle,
    /// Merged writes of pieces of several images are assembled here, one buffer per write in
    /// flight: aligned, because the backing device is opened O_DIRECT.
    write_bufs: Vec<AlignedBuf>,
    pub stats: WritebackStats,
    /// Read the next batch while writing this one (on by default; off, each batch is read,
    /// then written).
    pub read_ahead: bool,
}

impl Writeback {
    pub fn new(log: Arc<dyn CacheLog>) -> Writeback {
        Writeback {
            log,
            ahead: None,
            spare: Vec::new(),
            throttle: Throttle::new(),
            write_bufs: (0..WRITES_IN_FLIGHT)
                .map(|_| AlignedBuf::new(MAX_MERGED_WRITE_BYTES))
                .collect(),
            stats: WritebackStats::default(),
            read_ahead: true,
        }
    }

    pub fn run(&mut self) -> io::Result<()> {
        while !self.log.is_shutting_down() {
            let policy = self.log.policy();
            let rate = policy.rate(&self.log.activity(Instant::now()));
            let next = self.log.written_back_id() + 1;
            if rate <= 0.0 || next > self.log.written_id() {
                self.throttle.reset();
                // Idle: give the spare images' memory back (a read-ahead batch is kept).
                self.spare = Vec::new();
                self.log.wait_for_work(IDLE_POLL);
                continue;
            }
            let started = Instant::now();
            self.write_back_one_batch(policy.max_bandwidth_bytes_per_sec)?;
            std::thread::sleep(Throttle::rest_for(started.elapsed(), rate));
        }
        Ok(())
    }

    /// Writes back the next batch: read (or take the batch read ahead, topped up), plan, write
    /// while reading the following batch, flush the backing device, commit. Returns the number
    /// of segments written back (0 if none were ready).
    pub fn write_back_one_batch(&mut self, bandwidth_cap: Option<u64>) -> io::Result<usize> {
        let started = Instant::now();
        let first = self.log.written_back_id() + 1;
        let mut batch = match self.ahead.take() {
            Some(b) if b.first_id() == Some(first) => b,
            Some(stale) => {
                stale.recycle(&mut self.spare);
                Batch::default()
            }
            None => Batch::default(),
        };
        if let Err(e) = batch.fill(self.log.as_ref(), first, &mut self.spare) {
            batch.recycle(&mut self.spare);
            return Err(e);
        }
        let (Some(first_id), Some(last_id)) = (batch.first_id(), batch.last_id()) else {
            batch.recycle(&mut self.spare);
            return Ok(0);
        };
        let read = started.elapsed();
        let plan = plan_batch(&batch.headers);

        // The following batch starts with the segment read past this one's end, if any.
        let mut following = Batch::default();
        if let Some((header, image)) = batch.next.take() {
            following.headers.push(header);
            following.images.push(image);
        }
        let (applied, ahead) = if self.read_ahead {
            let log = self.log.clone();
            let mut spare = std::mem::take(&mut self.spare);
            let (applied, (ahead, spare, read_time), apply_time) = std::thread::scope(|scope| {
                let reader = std::thread::Builder::new()
                    .name("wb-read-ahead".into())
                    .spawn_scoped(scope, move || {
                        let started = Instant::now();
                        let read = following.fill(log.as_ref(), last_id + 1, &mut spare);
                        (read.map(|()| following), spare, started.elapsed())
                    })
                    .expect("spawn the read-ahead thread");
                let started = Instant::now();
                let applied = self.apply_until_done(&plan, &batch.images, bandwidth_cap);
                let apply_time = started.elapsed();
                (
                    applied,
                    reader.join().expect("read-ahead thread"),
                    apply_time,
                )
            });
            self.spare = spare;
            log::debug!(
                "segments {first_id}..={last_id}: written and flushed in {apply_time:?}, the \
                 following batch read meanwhile in {read_time:?}"
            );
            (applied, ahead)
        } else {
            // (the following batch is read when its turn comes)
            let applied = self.apply_until_done(&plan, &batch.images, bandwidth_cap);
            (applied, Ok(following))
        };
        match ahead {
            Ok(ahead) => self.ahead = Some(ahead),
            // Read again (and the error met again, if it persists) when its turn comes.
            Err(e) => log::warn!("reading ahead after segment {last_id}: {e}"),
        }
        if let Err(e) = applied {
            batch.recycle(&mut self.spare);
            return Err(e);
        }
        let written = started.elapsed();
        let last = batch.headers.last().expect("non-empty");
        self.log
            .commit(last.segment_id, last.epoch_id, &batch.headers)?;
        log::debug!(
            "segments {first_id}..={last_id} (epoch {}): {} entries in {} backing I/Os; read {:?}, \
             written and flushed (and the following batch read) {:?}, committed {:?}",
            last.epoch_id,
            plan.entries,
            plan.ops.len(),
            read,
            written - read,
            started.elapsed() - written
        );
        self.stats.batches += 1;
        self.stats.segments += batch.headers.len() as u64;
        self.stats.ios_unmerged += plan.entries;
        batch.recycle(&mut self.spare);
        Ok((last_id - first_id + 1) as usize)
    }

    /// Applies the plan and flushes the backing device, retrying the whole (idempotent) batch
    /// after a backing device error: the cache still holds the data.
    fn apply_until_done(
        &mut self,
        plan: &BatchPlan,
        images: &[AlignedBuf],
        cap: Option<u64>,
    ) -> io::Result<()> {
        loop {
            match self.apply(plan, images, cap) {
                Ok(()) => return Ok(()),
                Err(e) if self.log.is_shutting_down() => return Err(e),
                Err(e) => {
                    self.stats.backing_errors += 1;
                    log::error!("writeback to the backing device failed: {e}; retrying");
                    std::thread::sleep(BACKING_RETRY_PAUSE);
                }
            }
        }
    }

    /// Zeroed ranges first, one at a time (data logged after a discard in the batch must land on
    /// top of it); then writes of partial blocks, one at a time (two may share a 4 KiB block);
    /// then whole-block writes, `WRITES_IN_FLIGHT` at a time: they cover distinct blocks of one
    /// epoch, so they may complete in any order. Then the backing device is flushed.
    fn apply(
        &mut self,
        plan: &BatchPlan,
        images: &[AlignedBuf],
        cap: Option<u64>,
    ) -> io::Result<()> {
        let Writeback {
            log,
            throttle,
            write_bufs,
            stats,
            ..
        } = self;
        let log = log.as_ref();
        let throttle = Mutex::new(throttle);
        let pace = |bytes: u64| {
            let wait = throttle.lock().after_write(bytes, Instant::now(), cap);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        };
        let (zeros, writes): (Vec<&BackingOp>, Vec<&BackingOp>) = plan
            .ops
            .iter()
            .partition(|op| matches!(op, BackingOp::Zero { .. }));
        let (whole, partial): (Vec<&BackingOp>, Vec<&BackingOp>) =
            writes.into_iter().partition(|op| is_whole_blocks(op));
        for op in zeros {
            if let BackingOp::Zero {
                offset,
                len,
                discard,
            } = op
            {
                log.backing_zero(*offset, *len, *discard)?;
            }
            stats.ios_merged += 1;
            pace(0);
        }
        for op in partial {
            let bytes = write_one(log, op, images, &mut write_bufs[0])?;
            stats.ios_merged += 1;
            stats.bytes_written += bytes;
            pace(bytes);
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let worker = |buf: &mut AlignedBuf| -> io::Result<(u64, u64)> {
            let (mut ios, mut bytes) = (0, 0);
            while !failed.load(Ordering::Relaxed) {
                let Some(op) = whole.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                match write_one(log, op, images, buf) {
                    Ok(n) => {
                        ios += 1;
                        bytes += n;
                        pace(n);
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            Ok((ios, bytes))
        };
        let writers = WRITES_IN_FLIGHT.min(whole.len());
        let results: Vec<io::Result<(u64, u64)>> = if writers <= 1 {
            vec![worker(&mut write_bufs[0])]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = write_bufs
                    .iter_mut()
                    .take(writers)
                    .map(|buf| {
                        std::thread::Builder::new()
                            .name("wb-write".into())
                            .spawn_scoped(scope, || worker(buf))
                            .expect("spawn a writeback writer")
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("writeback writer"))
                    .collect()
            })
        };
        for result in results {
            let (ios, bytes) = result?;
            stats.ios_merged += ios;
            stats.bytes_written += bytes;
        }
        log.backing_flush()?;
        stats.backing_flushes += 1;
        Ok(())
    }
}

/// Whether a write covers whole 4 KiB blocks only (no other write of its batch touches them).
fn is_whole_blocks(op: &BackingOp) -> bool {
    match op {
        BackingOp::Write { offset, pieces } => {
            let len: usize = pieces.iter().map(|p| p.2).sum();
            offset.is_multiple_of(BLOCK_SIZE_BYTES as u64) && len.is_multiple_of(BLOCK_SIZE_BYTES)
        }
        BackingOp::Zero { .. } => false,
    }
}

/// Issues one data write: straight from its image when it is one stretch of one image, else
/// assembled in `buf`. Returns the bytes written.
fn write_one(
    log: &dyn CacheLog,
    op: &BackingOp,
    images: &[AlignedBuf],
    buf: &mut AlignedBuf,
) -> io::Result<u64> {
    let BackingOp::Write { offset, pieces } = op else {
        unreachable!("only data writes here");
    };
    let len: usize = pieces.iter().map(|p| p.2).sum();
    if let [(segment, from, n)] = pieces[..] {
        log.backing_write(&images[segment][from..from + n], *offset)?;
    } else {
        let mut at = 0;
        for &(segment, from, n) in pieces {
            buf[at..at + n].copy_from_slice(&images[segment][from..from + n]);
            at += n;
        }
        log.backing_write(&buf[..len], *offset)?;
    }
    Ok(len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use logfmt::Entry;

    fn header(id: u64, entries: Vec<Entry>) -> SegmentHeader {
        SegmentHeader {
            uuid: [0; 16],
            segment_id: id,
            epoch_id: 1,
            durable_id: 0,
            flags: 0,
            entries,
        }
    }

    #[test]
    fn newest_version_wins_and_adjacent_blocks_merge() {
        let plan = plan_batch(&[
            header(
                1,
                vec![Entry::data(10, 0, 0xff, 0), Entry::data(12, 1, 0xff, 0)],
            ),
            header(
                2,
                vec![Entry::data(11, 0, 0xff, 0), Entry::data(10, 1, 0xff, 0)],
            ),
        ]);
        assert_eq!(plan.entries, 4);
        assert_eq!(
            plan.ops,
            vec![BackingOp::Write {
                offset: 10 * 4096,
                pieces: vec![
                    (1, data_block_offset(1), 4096),
                    (1, data_block_offset(0), 4096),
                    (0, data_block_offset(1), 4096)
                ],
            }]
        );
    }

    #[test]
    fn discard_drops_earlier_writes_and_precedes_later_ones() {
        let plan = plan_batch(&[header(
            1,
            vec![
                Entry::data(5, 0, 0xff, 0),
                Entry::range(EntryKind::Discard, 0, 8 * 8),
                Entry::data(6, 1, 0xff, 0),
            ],
        )]);
        assert_eq!(
            plan.ops,
            vec![
                BackingOp::Zero {
                    offset: 0,
                    len: 8 * 8 * 512,
                    discard: true
                },
                BackingOp::Write {
                    offset: 6 * 4096,
                    pieces: vec![(0, data_block_offset(1), 4096)]
                },
            ]
        );
    }

    #[test]
    fn partial_blocks_write_only_their_sectors() {
        let plan = plan_batch(&[header(1, vec![Entry::data(2, 3, 0b1100_0110, 0)])]);
        let base = data_block_offset(3);
        assert_eq!(
            plan.ops,
            vec![
                BackingOp::Write {
                    offset: 2 * 4096 + 512,
                    pieces: vec![(0, base + 512, 1024)]
                },
                BackingOp::Write {
                    offset: 2 * 4096 + 3072,
                    pieces: vec![(0, base + 3072, 1024)]
                },
            ]
        );
    }

    fn write_lens(plan: &BatchPlan) -> Vec<usize> {
        plan.ops
            .iter()
            .map(|op| match op {
                BackingOp::Write { pieces, .. } => pieces.iter().map(|p| p.2).sum(),
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_stretch_of_one_image_is_written_from_it_whole() {
        // Sequential writes: each segment holds 127 consecutive blocks in slot order.
        let headers: Vec<SegmentHeader> = (0..3u64)
            .map(|s| {
                header(
                    s + 1,
                    (0..127)
                        .map(|i| Entry::data(s * 127 + i, i as u16, 0xff, 0))
                        .collect(),
                )
            })
            .collect();
        let plan = plan_batch(&headers);
        assert_eq!(plan.ops.len(), 3, "one write per segment image");
        for (s, op) in plan.ops.iter().enumerate() {
            assert_eq!(
                *op,
                BackingOp::Write {
                    offset: s as u64 * 127 * 4096,
                    pieces: vec![(s, data_block_offset(0), 127 * 4096)],
                }
            );
        }
    }

    #[test]
    fn scattered_pieces_merge_up_to_the_cap() {
        // Two segments interleave: segment s holds blocks 2i + s. Adjacent blocks alternate
        // between images, so writes are assembled (copied) and capped.
        let headers: Vec<SegmentHeader> = (0..3u64)
            .map(|s| {
                header(
                    s + 1,
                    (0..127)
                        .map(|i| Entry::data(3 * i + s, i as u16, 0xff, 0))
                        .collect(),
                )
            })
            .collect();
        let plan = plan_batch(&headers);
        let lens = write_lens(&plan);
        assert!(lens.iter().all(|&l| l <= MAX_MERGED_WRITE_BYTES));
        assert_eq!(lens.iter().sum::<usize>(), 3 * 127 * 4096);
        assert_eq!(
            lens.len(),
            (3 * 127 * 4096usize).div_ceil(MAX_MERGED_WRITE_BYTES)
        );
    }

    #[test]
    fn a_short_stretch_joins_the_next_image() {
        // 4 blocks at the end of one image, then 127 in the next: one write, assembled.
        let first = header(
            1,
            (0..4)
                .map(|i| Entry::data(i, 123 + i as u16, 0xff, 0))
                .collect(),
        );
        let second = header(
            2,
            (0..127)
                .map(|i| Entry::data(4 + i, i as u16, 0xff, 0))
                .collect(),
        );
        let plan = plan_batch(&[first, second]);
        assert_eq!(
            plan.ops,
            vec![BackingOp::Write {
                offset: 0,
                pieces: vec![
                    (0, data_block_offset(123), 4 * 4096),
                    (1, data_block_offset(0), 127 * 4096)
                ],
            }]
        );
    }

    /// An in-memory cache log that records what writeback does, in order.
    struct FakeLog {
        segments: Vec<(SegmentHeader, Vec<u8>)>,
        backing: Mutex<Vec<u8>>,
        events: Mutex<Vec<Event>>,
        written_back: Mutex<(u64, u64)>,
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Event {
        Read(u64),
        Write(u64, usize),
        Flush,
        Commit(u64, u64, Vec<u64>),
    }

    impl CacheLog for FakeLog {
        fn written_id(&self) -> u64 {
            self.segments.len() as u64
        }
        fn written_back_id(&self) -> u64 {
            self.written_back.lock().unwrap().0
        }
        fn written_back_epoch(&self) -> u64 {
            self.written_back.lock().unwrap().1
        }
        fn read_segment(&self, id: u64, image: &mut [u8]) -> io::Result<SegmentHeader> {
            assert!(id > self.written_back_id() && id <= self.written_id());
            self.events.lock().unwrap().push(Event::Read(id));
            let (h, data) = &self.segments[id as usize - 1];
            image.copy_from_slice(data);
            Ok(h.clone())
        }
        fn backing_write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(Event::Write(offset, buf.len()));
            self.backing.lock().unwrap()[offset as usize..][..buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn backing_zero(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            unreachable!("no range entries here")
        }
        fn backing_flush(&self) -> io::Result<()> {
            self.events.lock().unwrap().push(Event::Flush);
            Ok(())
        }
        fn commit(&self, through: u64, epoch: u64, headers: &[SegmentHeader]) -> io::Result<()> {
            let ids = headers.iter().map(|h| h.segment_id).collect();
            self.events
                .lock()
                .unwrap()
                .push(Event::Commit(through, epoch, ids));
            *self.written_back.lock().unwrap() = (through, epoch);
            Ok(())
        }
        fn policy(&self) -> crate::Policy {
            crate::Policy::default()
        }
        fn activity(&self, _: Instant) -> crate::Activity {
            unreachable!("run() is not used here")
        }
        fn wait_for_work(&self, _: Duration) {}
        fn is_shutting_down(&self) -> bool {
            false
        }
    }

    use std::sync::Mutex;

    #[test]
    fn batches_are_one_epoch_flushed_before_commit_and_read_ahead() {
        batches_are_one_epoch_and_flushed_before_commit(true);
    }

    #[test]
    fn batches_are_one_epoch_flushed_before_commit_without_read_ahead() {
        batches_are_one_epoch_and_flushed_before_commit(false);
    }

    fn batches_are_one_epoch_and_flushed_before_commit(read_ahead: bool) {
        // 80 segments; the epoch changes at 10, 11, 12 and 60 (the batch cap is 32).
        let epoch_of = |id: u64| match id {
            1..=9 => 1,
            10 => 2,
            11 => 3,
            12..=59 => 4,
            _ => 5,
        };
        let segments: Vec<(SegmentHeader, Vec<u8>)> = (1..=80u64)
            .map(|id| {
                let mut h = header(
                    id,
                    (0..4)
                        .map(|i| Entry::data(id * 4 + i, i as u16, 0xff, 0))
                        .collect(),
                );
                h.epoch_id = epoch_of(id);
                let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
                for i in 0..4 {
                    image[data_block_offset(i)..data_block_offset(i + 1)].fill(id as u8);
                }
                (h, image)
            })
            .collect();
        let log = Arc::new(FakeLog {
            segments,
            backing: Mutex::new(vec![0; 81 * 4 * 4096]),
            events: Mutex::new(Vec::new()),
            written_back: Mutex::new((0, 0)),
        });
        let mut wb = Writeback::new(log.clone());
        wb.read_ahead = read_ahead;
        let mut batches = 0;
        while wb.write_back_one_batch(None).unwrap() > 0 {
            batches += 1;
        }
        assert_eq!(batches, 6, "1-9, 10, 11, 12-43, 44-59, 60-80");
        let events = log.events.lock().unwrap().clone();
        let mut commits = Vec::new();
        let mut last_committed = 0;
        for (i, e) in events.iter().enumerate() {
            match e {
                Event::Commit(through, epoch, ids) => {
                    // (reads ahead may interleave: they are another thread's)
                    let before = events[..i]
                        .iter()
                        .rev()
                        .find(|e| !matches!(e, Event::Read(_)));
                    assert_eq!(before, Some(&Event::Flush), "flushed right before commit");
                    assert_eq!(ids.first(), Some(&(last_committed + 1)), "consecutive");
                    assert_eq!(ids.last(), Some(through));
                    assert!(ids.len() <= MAX_BATCH_SEGMENTS);
                    assert!(ids.iter().all(|&id| epoch_of(id) == *epoch), "one epoch");
                    last_committed = *through;
                    commits.push(ids.len());
                }
                Event::Read(id) => {
                    // Nothing is read twice, and reading never runs more than a batch ahead.
                    assert!(*id > last_committed);
                    assert!(*id <= last_committed + 2 * MAX_BATCH_SEGMENTS as u64 + 1);
                }
                _ => {}
            }
        }
        assert_eq!(commits, vec![9, 1, 1, 32, 16, 21]);
        assert_eq!(last_committed, 80);
        let reads: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Read(id) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(
            reads,
            (1..=80).collect::<Vec<u64>>(),
            "each segment read once"
        );
        let backing = log.backing.lock().unwrap();
        for id in 1..=80u64 {
            let at = (id * 4 * 4096) as usize;
            assert!(backing[at..at + 4 * 4096].iter().all(|&b| b == id as u8));
        }
    }
}
