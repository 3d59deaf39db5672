//! The read path: each block of a read is resolved under the state lock to its newest copy —
//! the RAM buffer (copied out at once), a segment on the legs (its slot pinned so writeback
//! cannot free it), a zeroed range, or the backing device — and the device reads happen after
//! unlocking. A partial-sector copy is completed from the backing device.

use std::sync::atomic::Ordering;

use logfmt::{Position, ALL_SECTORS_VALID, BLOCK_SIZE_BYTES, SECTORS_PER_BLOCK, SECTOR_SIZE_BYTES};

use crate::device::AlignedBuf;
use crate::error::{EngineError, Result};

use super::Shared;

/// Where the newest copy of one block is, resolved under the lock for a read.
enum Source {
    Backing,
    Zero,
    /// Copied out of RAM already.
    Ram {
        mask: u8,
    },
    /// On a leg: slot pinned, read after unlocking.
    Cache {
        segment_id: u64,
        position: Position,
        data_slot: usize,
        mask: u8,
    },
}

impl Shared {
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check_request(offset, out.len() as u64)?;
        self.note_request();
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        if out.is_empty() {
            return Ok(());
        }
        let block_bytes = BLOCK_SIZE_BYTES as u64;
        let first = offset / block_bytes;
        let last = (offset + out.len() as u64 - 1) / block_bytes;
        let count = (last - first + 1) as usize;
        let mut blocks = AlignedBuf::new(count * BLOCK_SIZE_BYTES);
        let sources = self.resolve(first, count, &mut blocks)?;
        let result = self.fill_from_devices(first, &sources, &mut blocks);
        self.unpin(&sources);
        result?;
        let start = (offset - first * block_bytes) as usize;
        out.copy_from_slice(&blocks[start..start + out.len()]);
        let hits = sources
            .iter()
            .filter(|s| !matches!(s, Source::Backing))
            .count() as u64;
        self.stats.read_hits.fetch_add(hits, Ordering::Relaxed);
        self.stats
            .read_misses
            .fetch_add(count as u64 - hits, Ordering::Relaxed);
        Ok(())
    }

    /// Under the lock: where each block's newest copy is. RAM copies are taken right away; leg
    /// copies are pinned so writeback cannot free their segment before we read them.
    fn resolve(&self, first: u64, count: usize, blocks: &mut [u8]) -> Result<Vec<Source>> {
        // In passthrough the map is empty: every block resolves to the backing device.
        let mut state = match self.lock_live() {
            Err(EngineError::Passthrough) => {
                // After every leg was lost, a writeback write that passed the fence just before
                // may still be on its way to the backing device: read after it has landed, or a
                // later read (with no write in between) would return other data.
                self.wait_for_fenced_writeback();
                self.state.lock()
            }
            result => result?,
        };
        let mut sources = Vec::with_capacity(count);
        for i in 0..count {
            let block = first + i as u64;
            let source = match state.map.get(block) {
                Some(location) => {
                    let (slot, block_in_slot) = self.geometry.split(location);
                    let mask = state
                        .partial
                        .get(&location)
                        .copied()
                        .unwrap_or(ALL_SECTORS_VALID);
                    match state.slots[slot as usize].buffered(block_in_slot) {
                        Some(buffer) => {
                            let out = &mut blocks[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                            self.ram.copy_block(buffer, block_in_slot, out);
                            Source::Ram { mask }
                        }
                        None => {
                            let (segment_id, position) = state.segment_at(slot, block_in_slot);
                            state.slots[slot as usize].readers += 1;
                            Source::Cache {
                                segment_id,
                                position,
                                data_slot: (block_in_slot - position.block - 1) as usize,
                                mask,
                            }
                        }
                    }
                }
                None if state.zeros.contains(block) => Source::Zero,
                None => Source::Backing,
            };
            sources.push(source);
        }
        Ok(sources)
    }

    fn fill_from_devices(&self, first: u64, sources: &[Source], blocks: &mut [u8]) -> Result<()> {
        let mut scratch = AlignedBuf::new(BLOCK_SIZE_BYTES);
        for (i, source) in sources.iter().enumerate() {
            let out = &mut blocks[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
            match *source {
                Source::Zero => out.fill(0),
                Source::Cache {
                    segment_id,
                    position,
                    data_slot,
                    ..
                } => {
                    self.read_cached_block(segment_id, position, data_slot, &mut scratch)?;
                    out.copy_from_slice(&scratch[..BLOCK_SIZE_BYTES]);
                }
                Source::Backing | Source::Ram { .. } => {}
            }
        }
        // Backing reads, in runs of consecutive blocks; a partial copy takes its missing sectors
        // from the backing block.
        let needs_backing = |s: &Source| match s {
            Source::Backing => true,
            Source::Ram { mask } | Source::Cache { mask, .. } => *mask != ALL_SECTORS_VALID,
            Source::Zero => false,
        };
        let mut i = 0;
        while i < sources.len() {
            if !needs_backing(&sources[i]) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < sources.len() && matches!(sources[j], Source::Backing) {
                j += 1;
            }
            if j == i {
                // A single partial block.
                let (Source::Ram { mask } | Source::Cache { mask, .. }) = sources[i] else {
                    unreachable!()
                };
                let block = first + i as u64;
                self.read_backing(&mut scratch[..BLOCK_SIZE_BYTES], block)?;
                let out = &mut blocks[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                for sector in 0..SECTORS_PER_BLOCK {
                    if mask & (1 << sector) == 0 {
                        let r = sector * SECTOR_SIZE_BYTES..(sector + 1) * SECTOR_SIZE_BYTES;
                        out[r.clone()].copy_from_slice(&scratch[r]);
                    }
                }
                i += 1;
            } else {
                let range = i * BLOCK_SIZE_BYTES..j * BLOCK_SIZE_BYTES;
                self.read_backing(&mut blocks[range], first + i as u64)?;
                i = j;
            }
        }
        Ok(())
    }

    fn read_backing(&self, out: &mut [u8], block: u64) -> Result<()> {
        self.backing
            .read_at(out, block * BLOCK_SIZE_BYTES as u64)
            .map_err(|e| EngineError::io(self.backing.name(), e))
    }

    fn unpin(&self, sources: &[Source]) {
        if !sources.iter().any(|s| matches!(s, Source::Cache { .. })) {
            return;
        }
        let mut state = self.state.lock();
        let mut woke = false;
        for source in sources {
            if let Source::Cache { position, .. } = source {
                let s = &mut state.slots[position.slot as usize];
                s.readers -= 1;
                woke |= s.readers == 0;
            }
        }
        if woke {
            self.progress.notify_all();
        }
    }
}
