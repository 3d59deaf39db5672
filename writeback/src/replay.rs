//! Ordered replay: the `wb-writeback` loop and the batch planner.
//!
//! Invariants enforced here (CONTRACT §2, "cache lost entirely"):
//! - Segments are written back in id order, in batches of consecutive segments of ONE epoch.
//! - Inside a batch, and only there, blocks are sorted, merged and superseded versions dropped,
//!   and whole-block writes are issued several at a time (they may complete in any order).
//! - Reading is not writing: the next batch is read from the cache while this one is written,
//!   but nothing of it reaches the backing device before this batch's writes have completed.
//! - Before the first write of a batch of a new epoch, every segment written back before it is
//!   flushed on the backing device and committed: the backing device is flushed, and only then
//!   is the checkpoint advanced (`CacheLog::commit`). So every epoch boundary is crossed with the
//!   previous epoch flushed, and a crash at any point leaves: all epochs before the one being
//!   written back, plus a subset of its writes. Several batches of ONE epoch may share a commit.
//! - Re-writing segments that were already written back (after a crash or an error before the
//!   checkpoint) writes values of one epoch again, before anything newer: harmless.

use std::collections::{BTreeMap, VecDeque};
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
/// Largest merged backing write. Its pieces are sent straight from the segment images as one
/// vectored write (no copy), at most 256 of them.
pub const MAX_MERGED_WRITE_BYTES: usize = 1 << 20;
/// Whole-block backing writes of a batch issued at once. They cover distinct blocks of one
/// epoch, so they may complete in any order; several in flight keep a backing device that is
/// an array, a zvol or an iSCSI LUN busy (one at a time waits a full round trip per write).
pub const WRITES_IN_FLIGHT: usize = 4;
/// Segments read from the cache at once. One 512 KiB read at a time left the cache device idle
/// between requests: `wbbench writeback` read segments at ~400 MiB/s where the same device
/// streams several times that with a few requests in flight.
pub const READS_IN_FLIGHT: usize = 4;
/// Within one epoch, the backing device is flushed and the checkpoint advanced at least this
/// often (64 MiB of segments): less often than every batch, because a flush and a checkpoint
/// per 16 MiB batch cost a quarter of a fast drain; often enough that space comes back
/// steadily (and at once, batch by batch, while writers wait for it).
pub const COMMIT_EVERY_SEGMENTS: usize = 128;
/// How long the loop sleeps when the policy says "not now" (it is woken earlier by new work).
const IDLE_POLL: Duration = Duration::from_millis(100);

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
    // "Newest" is "logged last": the order of the headers is the order of the log, and merging
    // is only sound inside one epoch.
    for pair in headers.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after.segment_id == before.segment_id + 1 && after.epoch_id == before.epoch_id,
            "plan_batch: segment {} (epoch {}) does not follow segment {} (epoch {}) in one epoch",
            after.segment_id,
            after.epoch_id,
            before.segment_id,
            before.epoch_id
        );
    }
    let Versions {
        newest,
        zeros,
        entries,
    } = newest_versions(headers);
    let mut ops = zeros;
    ops.extend(data_writes(newest));
    BatchPlan { ops, entries }
}

/// What is left of a batch once superseded versions are dropped.
struct Versions {
    /// The newest version of each block that no later zeroed range covers, by block number.
    newest: BTreeMap<u64, Newest>,
    /// The zeroed ranges, in log order.
    zeros: Vec<BackingOp>,
    /// Entries of the batch, all kinds.
    entries: u64,
}

/// Walks the batch's entries in log order: a data entry supersedes the block's earlier versions,
/// a zeroed range every earlier version of the blocks it touches.
fn newest_versions(headers: &[SegmentHeader]) -> Versions {
    let mut v = Versions {
        newest: BTreeMap::new(),
        zeros: Vec::new(),
        entries: 0,
    };
    for (segment, h) in headers.iter().enumerate() {
        for e in &h.entries {
            v.entries += 1;
            match e.kind {
                EntryKind::Data => {
                    v.newest.insert(
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
                    let doomed: Vec<u64> = v.newest.range(start..end).map(|(b, _)| *b).collect();
                    for b in doomed {
                        v.newest.remove(&b);
                    }
                    v.zeros.push(BackingOp::Zero {
                        offset: e.start_sector * SECTOR_SIZE_BYTES as u64,
                        len: e.length_sectors as u64 * SECTOR_SIZE_BYTES as u64,
                        discard: e.kind == EntryKind::Discard,
                    });
                }
            }
        }
    }
    v
}

/// The data writes, in block order: whole blocks at adjacent addresses merged into runs (up to
/// `MAX_MERGED_WRITE_BYTES`), a partial block written run of valid sectors by run.
fn data_writes(newest: BTreeMap<u64, Newest>) -> Vec<BackingOp> {
    let mut ops = Vec::new();
    let mut run: Option<Run> = None;
    for (block, n) in newest {
        let block_offset = block * BLOCK_SIZE_BYTES as u64;
        if n.mask != ALL_SECTORS_VALID {
            ops.extend(run.take().map(Run::into_op));
            push_partial_block(&mut ops, block_offset, n);
            continue;
        }
        let piece = (n.segment, data_block_offset(n.data_slot), BLOCK_SIZE_BYTES);
        match &mut run {
            Some(r) if r.takes(block_offset, &piece) => r.push(piece),
            _ => ops.extend(run.replace(Run::new(block_offset, piece)).map(Run::into_op)),
        }
    }
    ops.extend(run.map(Run::into_op));
    ops
}

/// A partial block: one write per run of valid sectors.
fn push_partial_block(ops: &mut Vec<BackingOp>, block_offset: u64, n: Newest) {
    let data_offset = data_block_offset(n.data_slot);
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
    /// fit under the cap.
    fn takes(&self, offset: u64, piece: &Piece) -> bool {
        self.offset + self.len as u64 == offset && self.len + piece.2 <= MAX_MERGED_WRITE_BYTES
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
    /// Segments read past the batch's end, in id order; the first begins another epoch. They
    /// start the following batch (segments are read several at a time, before their epochs
    /// are known).
    rest: VecDeque<(SegmentHeader, AlignedBuf)>,
}

impl Batch {
    fn first_id(&self) -> Option<u64> {
        self.headers.first().map(|h| h.segment_id)
    }

    fn last_id(&self) -> Option<u64> {
        self.headers.last().map(|h| h.segment_id)
    }

    fn epoch_id(&self) -> Option<u64> {
        self.headers.first().map(|h| h.epoch_id)
    }

    /// Gives the images back for reuse.
    fn recycle(self, spare: &mut Vec<AlignedBuf>) {
        spare.extend(self.images);
        spare.extend(self.rest.into_iter().map(|(_, image)| image));
    }

    /// Adds the segment after the last one: to the batch while it continues its epoch, else to
    /// `rest` (and everything after it too: a batch never spans an epoch boundary).
    fn push(&mut self, header: SegmentHeader, image: AlignedBuf) {
        let previous = self.rest.back().map(|(h, _)| h).or(self.headers.last());
        if let Some(previous) = previous {
            assert_eq!(
                header.segment_id,
                previous.segment_id + 1,
                "a batch takes segments in id order, none left out"
            );
            // The epoch test below only ends a batch; it would not notice an epoch going back.
            assert!(
                header.epoch_id >= previous.epoch_id,
                "epochs never go back along the log: segment {} has epoch {}, segment {} had {}",
                header.segment_id,
                header.epoch_id,
                previous.segment_id,
                previous.epoch_id
            );
        }
        if self.rest.is_empty() && self.epoch_id().is_none_or(|e| e == header.epoch_id) {
            self.headers.push(header);
            self.images.push(image);
        } else {
            self.rest.push_back((header, image));
        }
    }

    /// The batch that follows this one, begun with the segments read past its end.
    fn take_following(&mut self) -> Batch {
        let mut following = Batch::default();
        for (header, image) in std::mem::take(&mut self.rest) {
            following.push(header, image);
        }
        following
    }

    /// Reads written segments after the batch's last one (from `first` if it is empty), up to
    /// `MAX_BATCH_SEGMENTS` in all, `READS_IN_FLIGHT` at a time. Stops at the first error.
    fn fill(
        &mut self,
        log: &dyn CacheLog,
        first: u64,
        spare: &mut Vec<AlignedBuf>,
    ) -> io::Result<()> {
        if !self.rest.is_empty() {
            return Ok(()); // the epoch ended
        }
        let from = self.last_id().map_or(first, |last| last + 1);
        let room = (MAX_BATCH_SEGMENTS - self.headers.len()) as u64;
        let count = (log.written_id() + 1).saturating_sub(from).min(room) as usize;
        let images = (0..count)
            .map(|_| {
                spare
                    .pop()
                    .unwrap_or_else(|| AlignedBuf::new(SEGMENT_SIZE_BYTES))
            })
            .collect();
        let mut result = Ok(());
        for (read, image) in read_segments(log, from, images) {
            match (read, &result) {
                (Ok(header), Ok(())) => self.push(header, image),
                (Err(e), Ok(())) => {
                    result = Err(e);
                    spare.push(image);
                }
                (_, Err(_)) => spare.push(image),
            }
        }
        result
    }
}

/// Reads segments `from`, `from + 1`, … into `images`, `READS_IN_FLIGHT` at a time (reader `r`
/// takes every `READS_IN_FLIGHT`-th segment from `from + r`, so the device still sees one
/// ascending stream). Returns each image with what its read gave, in id order.
fn read_segments(
    log: &dyn CacheLog,
    from: u64,
    images: Vec<AlignedBuf>,
) -> Vec<(io::Result<SegmentHeader>, AlignedBuf)> {
    let read = |(i, mut image): (usize, AlignedBuf)| {
        let header = log.read_segment(from + i as u64, &mut image);
        (i, header, image)
    };
    let readers = READS_IN_FLIGHT.min(images.len());
    let mut done: Vec<_> = if readers <= 1 {
        images.into_iter().enumerate().map(read).collect()
    } else {
        let mut shares: Vec<Vec<(usize, AlignedBuf)>> = (0..readers).map(|_| Vec::new()).collect();
        for (i, image) in images.into_iter().enumerate() {
            shares[i % readers].push((i, image));
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|share| {
                    std::thread::Builder::new()
                        .name("wb-read".into())
                        .spawn_scoped(scope, || share.into_iter().map(read).collect::<Vec<_>>())
                        .expect("spawn a writeback reader")
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("writeback reader"))
                .collect()
        })
    };
    done.sort_unstable_by_key(|(i, _, _)| *i);
    done.into_iter()
        .map(|(_, header, image)| (header, image))
        .collect()
}

/// The writeback worker. `run` loops until the cache shuts down.
///
/// While one batch is written to the backing device, the next is read from the cache on a
/// second thread (the cache and the backing device work at the same time), into images that
/// are reused from batch to batch.
///
/// Flush and checkpoint (`commit`) come at the end of an epoch, not after every batch: when the
/// batch read ahead continues the same epoch, the commit waits, up to `COMMIT_EVERY_SEGMENTS`
/// segments. Any error drops what is not committed: the owner starts again from the checkpoint.
pub struct Writeback {
    log: Arc<dyn CacheLog>,
    /// The next batch, read while the previous one was written back.
    ahead: Option<Batch>,
    /// Segments written to the backing device since the last commit, in id order, all of one
    /// epoch: their writes completed, but are not flushed there yet.
    uncommitted: Vec<SegmentHeader>,
    /// Segment images not in use. Aligned, so the engine reads straight into them and
    /// whole stretches of them are written to the backing device without a copy.
    spare: Vec<AlignedBuf>,
    throttle: Throttle,
    pub stats: WritebackStats,
    /// Read the next batch while writing this one (on by default; off, each batch is read,
    /// then written, then committed).
    pub read_ahead: bool,
}

impl Writeback {
    pub fn new(log: Arc<dyn CacheLog>) -> Writeback {
        Writeback {
            log,
            ahead: None,
            uncommitted: Vec::new(),
            spare: Vec::new(),
            throttle: Throttle::new(),
            stats: WritebackStats::default(),
            read_ahead: true,
        }
    }

    /// Writes back until the cache shuts down. An error (from the cache or the backing device)
    /// ends it with nothing uncommitted kept: the caller starts a new one, which resumes from
    /// the checkpoint (writing a segment back twice is harmless).
    pub fn run(&mut self) -> io::Result<()> {
        while !self.log.is_shutting_down() {
            let policy = self.log.policy();
            let rate = policy.rate(&self.log.activity(Instant::now()));
            if rate <= 0.0 || self.next_id() > self.log.written_id() {
                // Nothing uncommitted is held while waiting: the wait is where the cache may
                // lift its fence after a loss (see `CacheLog::wait_for_work`).
                self.commit()?;
                self.throttle.reset();
                // Idle: give the spare images' memory back (a read-ahead batch is kept).
                self.spare = Vec::new();
                self.log.wait_for_work(IDLE_POLL);
                continue;
            }
            let started = Instant::now();
            match self.write_back_one_batch(policy.max_bandwidth_bytes_per_sec) {
                // The cache is stopping: the batch in progress is left to the next start.
                Err(e) if is_stop(&e) => break,
                r => r?,
            };
            std::thread::sleep(Throttle::rest_for(started.elapsed(), rate));
        }
        // Only whole batches were added to `uncommitted`: commit them, not the one cut short.
        self.commit()
    }

    /// The first segment not yet written to the backing device.
    fn next_id(&self) -> u64 {
        self.uncommitted
            .last()
            .map_or(self.log.written_back_id() + 1, |h| h.segment_id + 1)
    }

    /// Writes back the next batch: read (or take the batch read ahead, topped up), plan, write
    /// while reading the following batch, then flush and commit unless the following batch
    /// continues the epoch. Returns the number of segments written back (0 if none were ready).
    /// On an error nothing uncommitted is kept (the next call starts from the checkpoint).
    pub fn write_back_one_batch(&mut self, bandwidth_cap: Option<u64>) -> io::Result<usize> {
        let result = self.try_one_batch(bandwidth_cap);
        if let Err(e) = &result {
            // A stop keeps the whole batches before the one it cut short (still worth a commit);
            // an I/O error keeps nothing.
            if !is_stop(e) {
                self.uncommitted.clear();
            }
            if let Some(stale) = self.ahead.take() {
                stale.recycle(&mut self.spare);
            }
        }
        result
    }

    fn try_one_batch(&mut self, bandwidth_cap: Option<u64>) -> io::Result<usize> {
        let started = Instant::now();
        let first = self.next_id();
        let mut batch = self.read_batch(first)?;
        let (Some(first_id), Some(last_id), Some(epoch)) =
            (batch.first_id(), batch.last_id(), batch.epoch_id())
        else {
            batch.recycle(&mut self.spare);
            return Ok(0);
        };
        // In id order: the batch takes up where the segments written back so far end.
        assert_eq!(
            first_id, first,
            "a batch begins at the first segment not written back"
        );
        self.check_epoch_committed(first_id, epoch);
        let read = started.elapsed();
        let plan = plan_batch(&batch.headers);

        let following = batch.take_following();
        let applied =
            self.apply_reading_ahead(&plan, &batch.images, following, last_id, bandwidth_cap);
        let Batch {
            headers, images, ..
        } = batch;
        self.spare.extend(images);
        applied?;
        let written = started.elapsed();
        self.stats.batches += 1;
        self.stats.segments += headers.len() as u64;
        self.stats.ios_unmerged += plan.entries;
        self.uncommitted.extend(headers);
        log::debug!(
            "segments {first_id}..={last_id} (epoch {epoch}): {} entries in {} backing I/Os; \
             read {read:?}, written (and the following batch read) {:?}",
            plan.entries,
            plan.ops.len(),
            written - read,
        );
        if self.commit_due(epoch) {
            self.commit()?;
        }
        Ok((last_id - first_id + 1) as usize)
    }

    /// The batch that begins at segment `first`: the one read ahead if it begins there, else a
    /// new one; topped up from the cache. Empty if nothing is ready. On an error, nothing is kept.
    fn read_batch(&mut self, first: u64) -> io::Result<Batch> {
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
        Ok(batch)
    }

    /// Nothing of a later epoch is written before the previous epoch is flushed and committed:
    /// the segments written back but not committed must be of the epoch of the batch about to
    /// be written (`commit_due` commits at the end of every epoch).
    fn check_epoch_committed(&self, first_id: u64, epoch: u64) {
        if let Some(last) = self.uncommitted.last() {
            assert!(
                last.epoch_id == epoch,
                "segment {first_id} (epoch {epoch}) would be written before segment {} (epoch {}) \
                 is committed",
                last.segment_id,
                last.epoch_id
            );
        }
    }

    /// Applies `plan` from `images` (the batch through segment `last_id`). With `read_ahead`,
    /// `following` is topped up from the cache on a second thread meanwhile and kept as the next
    /// batch; without, it is kept as it is (and read when its turn comes). A failed read ahead is
    /// only logged: it is read again then.
    fn apply_reading_ahead(
        &mut self,
        plan: &BatchPlan,
        images: &[AlignedBuf],
        mut following: Batch,
        last_id: u64,
        cap: Option<u64>,
    ) -> io::Result<()> {
        if !self.read_ahead {
            self.ahead = Some(following);
            return self.apply(plan, images, cap);
        }
        let log = self.log.clone();
        let mut spare = std::mem::take(&mut self.spare);
        let (applied, (ahead, spare)) = std::thread::scope(|scope| {
            let reader = std::thread::Builder::new()
                .name("wb-read-ahead".into())
                .spawn_scoped(scope, move || {
                    let read = following.fill(log.as_ref(), last_id + 1, &mut spare);
                    (read.map(|()| following), spare)
                })
                .expect("spawn the read-ahead thread");
            let applied = self.apply(plan, images, cap);
            (applied, reader.join().expect("read-ahead thread"))
        });
        self.spare = spare;
        match ahead {
            Ok(ahead) => self.ahead = Some(ahead),
            // Read again (and the error met again, if it persists) when its turn comes.
            Err(e) => log::warn!("reading ahead after segment {last_id}: {e}"),
        }
        applied
    }

    /// Whether to flush and commit now, after a batch of `epoch`: unless the batch read ahead
    /// continues that epoch; and in any case once `COMMIT_EVERY_SEGMENTS` segments wait for it,
    /// or writers wait for space.
    fn commit_due(&self, epoch: u64) -> bool {
        let epoch_continues = self
            .ahead
            .as_ref()
            .and_then(Batch::epoch_id)
            .is_some_and(|next| next == epoch);
        !epoch_continues
            || self.uncommitted.len() >= COMMIT_EVERY_SEGMENTS
            || self.log.activity(Instant::now()).writers_waiting
    }

    /// Flushes the backing device, then records the checkpoint through the last uncommitted
    /// segment, which frees the uncommitted segments. Nothing of a later epoch was written
    /// before this (`check_epoch_committed`), so every epoch boundary is crossed with the
    /// previous epoch flushed.
    fn commit(&mut self) -> io::Result<()> {
        let Some(last) = self.uncommitted.last() else {
            return Ok(());
        };
        let (through, epoch) = (last.segment_id, last.epoch_id);
        let started = Instant::now();
        let result = self.log.backing_flush().and_then(|()| {
            self.stats.backing_flushes += 1;
            self.log.commit(through, epoch, &self.uncommitted)
        });
        let segments = self.uncommitted.len();
        self.uncommitted.clear();
        result?;
        log::debug!(
            "committed through segment {through} ({segments} segments) in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    /// Zeroed ranges first, one at a time (data logged after a discard in the batch must land on
    /// top of it); then writes of partial blocks, one at a time (two may share a 4 KiB block);
    /// then whole-block writes, `WRITES_IN_FLIGHT` at a time: they cover distinct blocks of one
    /// epoch, so they may complete in any order. Returns once every write has completed.
    fn apply(
        &mut self,
        plan: &BatchPlan,
        images: &[AlignedBuf],
        cap: Option<u64>,
    ) -> io::Result<()> {
        let Writeback {
            log,
            throttle,
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
            stop_point(log)?;
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
            stop_point(log)?;
            let bytes = write_one(log, op, images)?;
            stats.ios_merged += 1;
            stats.bytes_written += bytes;
            pace(bytes);
        }
        for result in write_in_parallel(log, &whole, images, &pace) {
            let (ios, bytes) = result?;
            stats.ios_merged += ios;
            stats.bytes_written += bytes;
        }
        Ok(())
    }
}

/// Issues whole-block writes `WRITES_IN_FLIGHT` at a time, each paced by `pace`; once one fails,
/// no writer starts another. Returns each writer's (writes, bytes), or its error.
/// Between two backing writes: a stopping cache cuts the batch short rather than make its stop
/// wait for the rest (on a slow backing device, up to a batch of segments: a minute, during which
/// a restart holds the clients' I/O). Safe: the batch's epoch is not committed, so the next start
/// writes it back again, and the backing device meanwhile holds a part of one unflushed epoch,
/// which a crash mid-batch leaves as well.
fn stop_point(log: &dyn CacheLog) -> io::Result<()> {
    if log.is_shutting_down() {
        return Err(io::Error::new(io::ErrorKind::Interrupted, STOPPING));
    }
    Ok(())
}

const STOPPING: &str = "the cache is stopping";

/// Whether `e` is `stop_point`'s, not an I/O error.
fn is_stop(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted && e.to_string() == STOPPING
}

fn write_in_parallel(
    log: &dyn CacheLog,
    whole: &[&BackingOp],
    images: &[AlignedBuf],
    pace: &(dyn Fn(u64) + Sync),
) -> Vec<io::Result<(u64, u64)>> {
    // They may complete in any order only because no two touch one block. The plan lists them
    // by address, so: each ends before the next begins.
    assert!(
        whole.windows(2).all(|w| w[0].end() <= w[1].offset()),
        "whole-block writes issued at once overlap"
    );
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let worker = || -> io::Result<(u64, u64)> {
        let (mut ios, mut bytes) = (0, 0);
        while !failed.load(Ordering::Relaxed) {
            let Some(op) = whole.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            match stop_point(log).and_then(|()| write_one(log, op, images)) {
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
    if writers <= 1 {
        return vec![worker()];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                std::thread::Builder::new()
                    .name("wb-write".into())
                    .spawn_scoped(scope, worker)
                    .expect("spawn a writeback writer")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writeback writer"))
            .collect()
    })
}

impl BackingOp {
    /// Where on the backing device the operation begins.
    fn offset(&self) -> u64 {
        match self {
            BackingOp::Zero { offset, .. } | BackingOp::Write { offset, .. } => *offset,
        }
    }

    /// Where on the backing device the operation ends (exclusive).
    fn end(&self) -> u64 {
        let len = match self {
            BackingOp::Zero { len, .. } => *len,
            BackingOp::Write { pieces, .. } => pieces.iter().map(|p| p.2 as u64).sum(),
        };
        self.offset() + len
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

/// Issues one data write, its pieces straight from their images. Returns the bytes written.
fn write_one(log: &dyn CacheLog, op: &BackingOp, images: &[AlignedBuf]) -> io::Result<u64> {
    let BackingOp::Write { offset, pieces } = op else {
        unreachable!("only data writes here");
    };
    let bufs: Vec<&[u8]> = pieces
        .iter()
        .map(|&(segment, from, n)| &images[segment][from..from + n])
        .collect();
    log.backing_write(&bufs, *offset)?;
    Ok(pieces.iter().map(|p| p.2 as u64).sum())
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
            start_block: 0,
            run_nonce: 0,
            prev_crc: 0,
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
    fn sequential_images_merge_into_capped_writes() {
        // Sequential writes: each segment holds 127 consecutive blocks in slot order, so the
        // images follow each other on the backing device and merge up to the cap.
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
        let stretch = 127 * 4096;
        assert_eq!(
            plan.ops,
            vec![
                BackingOp::Write {
                    offset: 0,
                    pieces: vec![
                        (0, data_block_offset(0), stretch),
                        (1, data_block_offset(0), stretch),
                        (2, data_block_offset(0), 2 * 4096),
                    ],
                },
                BackingOp::Write {
                    offset: MAX_MERGED_WRITE_BYTES as u64,
                    pieces: vec![(2, data_block_offset(2), 125 * 4096)],
                },
            ]
        );
    }

    #[test]
    fn scattered_pieces_merge_up_to_the_cap() {
        // Two segments interleave: segment s holds blocks 2i + s. Adjacent blocks alternate
        // between images, so writes gather many pieces, and are capped.
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
        // 4 blocks at the end of one image, then 127 in the next: one write of two pieces.
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
        /// The cache starts stopping once this many backing writes were made.
        stop_after_writes: Option<usize>,
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
        fn backing_write(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
            let buf = bufs.concat();
            self.events
                .lock()
                .unwrap()
                .push(Event::Write(offset, buf.len()));
            self.backing.lock().unwrap()[offset as usize..][..buf.len()].copy_from_slice(&buf);
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
            crate::Activity {
                dirty_segments: self.written_id() - self.written_back_id(),
                capacity_segments: 1024,
                oldest_dirty_age: Duration::ZERO,
                idle_for: Duration::ZERO,
                writers_waiting: false,
                // `run` (the stop test) writes back at once only when asked to drain.
                drain_requested: self.stop_after_writes.is_some(),
                degraded: false,
            }
        }
        fn wait_for_work(&self, _: Duration) {}
        fn is_shutting_down(&self) -> bool {
            self.stop_after_writes.is_some_and(|n| self.writes() >= n)
        }
    }

    impl FakeLog {
        fn writes(&self) -> usize {
            let events = self.events.lock().unwrap();
            events
                .iter()
                .filter(|e| matches!(e, Event::Write(..)))
                .count()
        }
    }

    use std::sync::Mutex;

    /// A stop cuts the batch in progress short between two backing writes: `run` returns
    /// without writing the rest, commits the whole batch before it, and not the one cut short.
    #[test]
    fn a_stop_cuts_the_batch_in_progress_short() {
        for read_ahead in [true, false] {
            // Segment 1 is epoch 1 (a batch of its own); 2..=20 are epoch 2, each with 4 blocks
            // apart from each other: 76 backing writes that cannot merge.
            let segments: Vec<(SegmentHeader, Vec<u8>)> = (1..=20u64)
                .map(|id| {
                    let entries = (0..4)
                        .map(|i| Entry::data(id * 8 + 2 * i, i as u16, 0xff, 0))
                        .collect();
                    let mut h = header(id, entries);
                    h.epoch_id = if id == 1 { 1 } else { 2 };
                    (h, vec![id as u8; SEGMENT_SIZE_BYTES])
                })
                .collect();
            let log = Arc::new(FakeLog {
                segments,
                backing: Mutex::new(vec![0; 21 * 8 * 4096]),
                events: Mutex::new(Vec::new()),
                written_back: Mutex::new((0, 0)),
                stop_after_writes: Some(4 + 3),
            });
            let mut wb = Writeback::new(log.clone());
            wb.read_ahead = read_ahead;
            wb.run().unwrap();
            let events = log.events.lock().unwrap().clone();
            let commits: Vec<&Event> = events
                .iter()
                .filter(|e| matches!(e, Event::Commit(..)))
                .collect();
            assert_eq!(commits, [&Event::Commit(1, 1, vec![1])], "{events:?}");
            // The writer that saw the stop, plus one in flight in each other writer at most.
            let writes = log.writes();
            assert!(
                writes < 4 + 3 + WRITES_IN_FLIGHT,
                "{writes} writes: not cut short"
            );
            assert_eq!(*log.written_back.lock().unwrap(), (1, 1));
        }
    }

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
            stop_after_writes: None,
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
                    // (reads ahead may interleave: they are other threads')
                    let before = events[..i]
                        .iter()
                        .rev()
                        .find(|e| !matches!(e, Event::Read(_)));
                    assert_eq!(before, Some(&Event::Flush), "flushed right before commit");
                    assert_eq!(ids.first(), Some(&(last_committed + 1)), "consecutive");
                    assert_eq!(ids.last(), Some(through));
                    assert!(ids.len() < COMMIT_EVERY_SEGMENTS + MAX_BATCH_SEGMENTS);
                    assert!(ids.iter().all(|&id| epoch_of(id) == *epoch), "one epoch");
                    last_committed = *through;
                    commits.push(ids.len());
                }
                Event::Write(offset, _) => {
                    // Nothing of an epoch is written while an older one is not committed.
                    let id = offset / (4 * 4096);
                    assert!(id > last_committed);
                    assert_eq!(epoch_of(last_committed + 1), epoch_of(id));
                }
                Event::Read(id) => {
                    // Nothing is read twice, and reading stays within a bounded window.
                    assert!(*id > last_committed);
                    assert!(
                        *id <= last_committed
                            + (COMMIT_EVERY_SEGMENTS + 2 * MAX_BATCH_SEGMENTS) as u64
                    );
                }
                _ => {}
            }
        }
        // Batches 12-43 and 44-59 share a commit when 44-59 was read ahead: same epoch.
        let expected = if read_ahead {
            vec![9, 1, 1, 48, 21]
        } else {
            vec![9, 1, 1, 32, 16, 21]
        };
        assert_eq!(commits, expected);
        assert_eq!(last_committed, 80);
        let mut reads: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Read(id) => Some(*id),
                _ => None,
            })
            .collect();
        // (several at a time: in any order)
        reads.sort_unstable();
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

    fn segment(id: u64, epoch: u64) -> SegmentHeader {
        let mut h = header(id, vec![Entry::data(id * 4, 0, 0xff, 0)]);
        h.epoch_id = epoch;
        h
    }

    /// A batch given segments `(id, epoch)` one by one, as `fill` and `take_following` do.
    fn batch_of(segments: &[(u64, u64)]) -> Batch {
        let mut batch = Batch::default();
        for &(id, epoch) in segments {
            batch.push(segment(id, epoch), AlignedBuf::new(4096));
        }
        batch
    }

    #[test]
    fn a_batch_ends_where_its_epoch_does() {
        let batch = batch_of(&[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]);
        let ids: Vec<u64> = batch.headers.iter().map(|h| h.segment_id).collect();
        let rest: Vec<u64> = batch.rest.iter().map(|(h, _)| h.segment_id).collect();
        assert_eq!((ids, rest), (vec![1, 2], vec![3, 4, 5]));
    }

    #[test]
    #[should_panic(expected = "a batch takes segments in id order, none left out")]
    fn a_batch_refuses_a_segment_out_of_order() {
        batch_of(&[(1, 1), (3, 1)]);
    }

    #[test]
    #[should_panic(expected = "a batch takes segments in id order, none left out")]
    fn segments_read_past_a_batch_follow_the_last_one_read() {
        // Segment 2 begins another epoch, so it goes to `rest`: the next one must be 3.
        batch_of(&[(1, 1), (2, 2), (2, 2)]);
    }

    #[test]
    #[should_panic(expected = "segment 2 has epoch 1, segment 1 had 2")]
    fn a_batch_refuses_an_epoch_going_back() {
        batch_of(&[(1, 2), (2, 1)]);
    }

    #[test]
    #[should_panic(expected = "segment 3 has epoch 2, segment 2 had 3")]
    fn an_epoch_going_back_past_a_batch_is_refused() {
        // Segment 3 follows segment 2 (epoch 3, in `rest`), not the batch's segment 1 (epoch 1).
        batch_of(&[(1, 1), (2, 3), (3, 2)]);
    }

    #[test]
    #[should_panic(
        expected = "plan_batch: segment 3 (epoch 1) does not follow segment 1 (epoch 1)"
    )]
    fn plan_batch_refuses_a_gap() {
        plan_batch(&[segment(1, 1), segment(3, 1)]);
    }

    #[test]
    #[should_panic(
        expected = "plan_batch: segment 2 (epoch 2) does not follow segment 1 (epoch 1)"
    )]
    fn plan_batch_refuses_two_epochs() {
        plan_batch(&[segment(1, 1), segment(2, 2)]);
    }

    /// A cache log holding `segments` (as the cache answers reads of ids 1, 2, …), nothing
    /// written back yet.
    fn fake_log(segments: Vec<SegmentHeader>) -> Arc<FakeLog> {
        Arc::new(FakeLog {
            segments: segments
                .into_iter()
                .map(|h| (h, vec![0u8; SEGMENT_SIZE_BYTES]))
                .collect(),
            backing: Mutex::new(vec![0; 64 * 4096]),
            events: Mutex::new(Vec::new()),
            written_back: Mutex::new((0, 0)),
            stop_after_writes: None,
        })
    }

    /// Writes back one batch, reading ahead or not; returns the panic message, if it panicked.
    fn one_batch_panics(wb: &mut Writeback, read_ahead: bool) -> Option<String> {
        wb.read_ahead = read_ahead;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wb.write_back_one_batch(None)
        }));
        let panic = result.err()?;
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|m| m.to_string()))
    }

    #[test]
    fn a_batch_begins_where_writeback_stands() {
        for read_ahead in [false, true] {
            // The cache answers the read of segment 1 with segment 2.
            let log = fake_log(vec![segment(2, 1), segment(3, 1)]);
            let message = one_batch_panics(&mut Writeback::new(log.clone()), read_ahead);
            assert!(
                message.is_some_and(|m| m.contains("a batch begins at the first segment not")),
                "read ahead: {read_ahead}"
            );
            let events = log.events.lock().unwrap();
            assert!(!events.iter().any(|e| matches!(e, Event::Write(..))));
        }
    }

    #[test]
    fn a_segment_the_cache_mislabels_is_not_written_back() {
        for read_ahead in [false, true] {
            // The cache answers the read of segment 2 with segment 3.
            let log = fake_log(vec![segment(1, 1), segment(3, 1)]);
            let message = one_batch_panics(&mut Writeback::new(log.clone()), read_ahead);
            assert!(
                message.is_some_and(|m| m.contains("a batch takes segments in id order")),
                "read ahead: {read_ahead}"
            );
            let events = log.events.lock().unwrap();
            assert!(!events.iter().any(|e| matches!(e, Event::Write(..))));
        }
    }

    #[test]
    fn nothing_of_an_epoch_is_written_before_the_previous_one_is_committed() {
        for read_ahead in [false, true] {
            let log = fake_log(vec![segment(1, 1), segment(2, 2)]);
            let mut wb = Writeback::new(log.clone());
            // As if segment 1 had been written back and the commit after it skipped.
            wb.uncommitted.push(segment(1, 1));
            let message = one_batch_panics(&mut wb, read_ahead);
            assert!(
                message.is_some_and(|m| m.contains(
                    "segment 2 (epoch 2) would be written before segment 1 (epoch 1) is committed"
                )),
                "read ahead: {read_ahead}"
            );
            let events = log.events.lock().unwrap();
            assert!(!events.iter().any(|e| matches!(e, Event::Write(..))));
        }
    }

    fn whole_block_write(offset: u64) -> BackingOp {
        BackingOp::Write {
            offset,
            pieces: vec![(0, data_block_offset(0), 4096)],
        }
    }

    #[test]
    #[should_panic(expected = "whole-block writes issued at once overlap")]
    fn whole_block_writes_in_flight_never_overlap() {
        let mut wb = Writeback::new(fake_log(vec![segment(1, 1)]));
        let plan = BatchPlan {
            ops: vec![whole_block_write(4096), whole_block_write(4096)],
            entries: 2,
        };
        let _ = wb.apply(&plan, &[AlignedBuf::new(SEGMENT_SIZE_BYTES)], None);
    }

    #[test]
    fn adjacent_whole_block_writes_go_in_flight_together() {
        let log = fake_log(vec![segment(1, 1)]);
        let mut wb = Writeback::new(log.clone());
        let plan = BatchPlan {
            ops: vec![whole_block_write(0), whole_block_write(4096)],
            entries: 2,
        };
        wb.apply(&plan, &[AlignedBuf::new(SEGMENT_SIZE_BYTES)], None)
            .unwrap();
        // (in any order)
        let events = log.events.lock().unwrap();
        assert_eq!(events.len(), 2);
        assert!(events.contains(&Event::Write(0, 4096)));
        assert!(events.contains(&Event::Write(4096, 4096)));
    }
}
