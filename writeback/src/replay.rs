//! Ordered replay: the `wb-writeback` loop and the batch planner.
//!
//! Invariants enforced here (SPEC §2, "cache lost entirely"):
//! - Segments are written back in id order, in batches of consecutive segments of ONE epoch.
//! - Inside a batch, and only there, blocks are sorted, merged and superseded versions dropped.
//! - After each batch the backing device is flushed, and only then is the checkpoint advanced
//!   (`CacheLog::commit`); so every epoch boundary is crossed with the previous epoch flushed,
//!   and a crash at any point leaves: all epochs before the batch's, plus a subset of its writes.
//! - Re-writing a segment that was already written back (after a crash before the checkpoint)
//!   writes the same values in the same order again: harmless.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{
    data_block_offset, EntryKind, SegmentHeader, ALL_SECTORS_VALID, BLOCK_SIZE_BYTES,
    SECTOR_SIZE_BYTES, SEGMENT_SIZE_BYTES,
};

use crate::{AlignedBuf, CacheLog, Throttle};

/// Segments per batch at most: 16 MiB of reads held in memory at once.
pub const MAX_BATCH_SEGMENTS: usize = 32;
/// Largest merged backing write.
pub const MAX_MERGED_WRITE_BYTES: usize = 1 << 20;
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
    let mut run: Option<(u64, Vec<(usize, usize, usize)>, usize)> = None;
    let flush_run = |run: &mut Option<(u64, Vec<(usize, usize, usize)>, usize)>,
                     ops: &mut Vec<BackingOp>| {
        if let Some((offset, pieces, _)) = run.take() {
            ops.push(BackingOp::Write { offset, pieces });
        }
    };
    for (block, n) in newest {
        let block_offset = block * BLOCK_SIZE_BYTES as u64;
        let data_offset = data_block_offset(n.data_slot);
        if n.mask != ALL_SECTORS_VALID {
            flush_run(&mut run, &mut ops);
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
        match &mut run {
            Some((offset, pieces, len))
                if *offset + *len as u64 == block_offset
                    && *len + BLOCK_SIZE_BYTES <= MAX_MERGED_WRITE_BYTES =>
            {
                pieces.push((n.segment, data_offset, BLOCK_SIZE_BYTES));
                *len += BLOCK_SIZE_BYTES;
            }
            _ => {
                flush_run(&mut run, &mut ops);
                run = Some((
                    block_offset,
                    vec![(n.segment, data_offset, BLOCK_SIZE_BYTES)],
                    BLOCK_SIZE_BYTES,
                ));
            }
        }
    }
    flush_run(&mut run, &mut ops);
    BatchPlan { ops, entries }
}

/// The writeback worker. `run` loops until the cache shuts down.
pub struct Writeback {
    log: Arc<dyn CacheLog>,
    images: Vec<Vec<u8>>,
    /// A segment read past the end of the previous batch (it began a new epoch).
    lookahead: Option<(SegmentHeader, Vec<u8>)>,
    throttle: Throttle,
    /// Merged writes are assembled here: aligned, because the backing device is opened O_DIRECT.
    write_buf: AlignedBuf,
    pub stats: WritebackStats,
}

impl Writeback {
    pub fn new(log: Arc<dyn CacheLog>) -> Writeback {
        Writeback {
            log,
            images: Vec::new(),
            lookahead: None,
            throttle: Throttle::new(),
            write_buf: AlignedBuf::new(MAX_MERGED_WRITE_BYTES),
            stats: WritebackStats::default(),
        }
    }

    pub fn run(&mut self) -> io::Result<()> {
        while !self.log.is_shutting_down() {
            let policy = self.log.policy();
            let rate = policy.rate(&self.log.activity(Instant::now()));
            let next = self.log.written_back_id() + 1;
            if rate <= 0.0 || next > self.log.written_id() {
                self.throttle.reset();
                self.log.wait_for_work(IDLE_POLL);
                continue;
            }
            let started = Instant::now();
            self.write_back_one_batch(policy.max_bandwidth_bytes_per_sec)?;
            std::thread::sleep(Throttle::rest_for(started.elapsed(), rate));
        }
        Ok(())
    }

    /// Writes back the next batch: read, plan, write, flush the backing device, commit.
    /// Returns the number of segments written back (0 if none were ready).
    pub fn write_back_one_batch(&mut self, bandwidth_cap: Option<u64>) -> io::Result<usize> {
        let headers = self.read_batch()?;
        if headers.is_empty() {
            return Ok(0);
        }
        let plan = plan_batch(&headers);
        loop {
            match self.apply(&plan, bandwidth_cap) {
                Ok(()) => break,
                Err(e) if self.log.is_shutting_down() => return Err(e),
                Err(e) => {
                    // The cache still holds the data: retry the whole (idempotent) batch.
                    self.stats.backing_errors += 1;
                    log::error!("writeback to the backing device failed: {e}; retrying");
                    std::thread::sleep(BACKING_RETRY_PAUSE);
                }
            }
        }
        let last = headers.last().expect("non-empty");
        self.log.commit(last.segment_id, last.epoch_id, &headers)?;
        self.stats.batches += 1;
        self.stats.segments += headers.len() as u64;
        self.stats.ios_unmerged += plan.entries;
        Ok(headers.len())
    }

    /// Reads consecutive written segments of one epoch, starting after the checkpoint.
    fn read_batch(&mut self) -> io::Result<Vec<SegmentHeader>> {
        let mut headers = Vec::new();
        self.images.truncate(0);
        let mut next = self.log.written_back_id() + 1;
        let written = self.log.written_id();
        if let Some((h, image)) = self.lookahead.take() {
            if h.segment_id == next {
                headers.push(h);
                self.images.push(image);
                next += 1;
            }
        }
        while next <= written && headers.len() < MAX_BATCH_SEGMENTS {
            let mut image = vec![0u8; SEGMENT_SIZE_BYTES];
            let h = self.log.read_segment(next, &mut image)?;
            if headers
                .first()
                .is_some_and(|first: &SegmentHeader| first.epoch_id != h.epoch_id)
            {
                self.lookahead = Some((h, image));
                break;
            }
            headers.push(h);
            self.images.push(image);
            next += 1;
        }
        Ok(headers)
    }

    fn apply(&mut self, plan: &BatchPlan, cap: Option<u64>) -> io::Result<()> {
        for op in &plan.ops {
            let bytes = match op {
                BackingOp::Zero {
                    offset,
                    len,
                    discard,
                } => {
                    self.log.backing_zero(*offset, *len, *discard)?;
                    0
                }
                BackingOp::Write { offset, pieces } => {
                    let len: usize = pieces.iter().map(|p| p.2).sum();
                    let mut at = 0;
                    for &(segment, from, n) in pieces {
                        self.write_buf[at..at + n]
                            .copy_from_slice(&self.images[segment][from..from + n]);
                        at += n;
                    }
                    self.log.backing_write(&self.write_buf[..len], *offset)?;
                    len as u64
                }
            };
            self.stats.ios_merged += 1;
            self.stats.bytes_written += bytes;
            let wait = self.throttle.after_write(bytes, Instant::now(), cap);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        self.log.backing_flush()?;
        self.stats.backing_flushes += 1;
        Ok(())
    }
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

    #[test]
    fn merged_writes_are_capped() {
        let entries: Vec<Entry> = (0..127)
            .map(|i| Entry::data(i, i as u16, 0xff, 0))
            .collect();
        let headers: Vec<SegmentHeader> = (0..3)
            .map(|s| {
                header(
                    s + 1,
                    entries
                        .iter()
                        .map(|e| Entry::data(e.block() + s * 127, e.data_slot, 0xff, 0))
                        .collect(),
                )
            })
            .collect();
        let plan = plan_batch(&headers);
        let lens: Vec<usize> = plan
            .ops
            .iter()
            .map(|op| match op {
                BackingOp::Write { pieces, .. } => pieces.iter().map(|p| p.2).sum(),
                _ => 0,
            })
            .collect();
        assert!(lens.iter().all(|&l| l <= MAX_MERGED_WRITE_BYTES));
        assert_eq!(lens.iter().sum::<usize>(), 3 * 127 * 4096);
        assert_eq!(
            lens.len(),
            (3 * 127 * 4096usize).div_ceil(MAX_MERGED_WRITE_BYTES)
        );
    }
}
