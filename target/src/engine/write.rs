//! The write path: a write (or FUA write) goes into the open segment in its RAM buffer — a
//! rewrite of a block already in that segment in place, a partial block merged with the cached
//! copy — and a full, timed-out or flushed segment is sealed and handed to the log writer.
//! DISCARD / WRITE_ZEROES become range entries (their partial-block edges, writes of zeroes).
//! Writers wait here for a RAM buffer or a ring slot (back-pressure: writeback frees slots).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use logfmt::{
    Entry, EntryKind, SegmentHeader, ALL_SECTORS_VALID, BLOCK_SIZE_BYTES, DATA_BLOCKS_PER_SEGMENT,
    FLAG_FLUSH, SECTORS_PER_BLOCK, SECTOR_SIZE_BYTES,
};
use parking_lot::MutexGuard;

use crate::device::AlignedBuf;
use crate::error::{EngineError, Result};
use crate::log::writer::LogJob;

use super::state::{OpenSegment, Placed, RewriteIndex, State};
use super::{remove_map_range, sector_mask, SealReason, Shared};

impl Shared {
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_request(offset, data.len() as u64)?;
        self.note_request();
        let (generation, logged) = match self.log_write(offset, data) {
            Err(EngineError::Passthrough) => return self.passthrough_write(offset, data, fua),
            result => result?,
        };
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if fua {
            // Durable only if no cache loss took the log it was written to.
            self.flush_inner(generation, logged, false)?;
        }
        Ok(())
    }

    /// Logs a write into the RAM buffer, block by block. Returns the loss generation it was
    /// logged in, and how many writes were logged with it (a FUA write's flush covers them).
    pub(super) fn log_write(&self, offset: u64, data: &[u8]) -> Result<(u64, u64)> {
        let mut state = self.lock_live()?;
        let generation = state.lost_generation;
        let mut scratch = [0u8; BLOCK_SIZE_BYTES];
        let mut pos = 0usize;
        while pos < data.len() {
            let byte = offset + pos as u64;
            let block = byte / BLOCK_SIZE_BYTES as u64;
            let in_block = (byte % BLOCK_SIZE_BYTES as u64) as usize;
            let n = (BLOCK_SIZE_BYTES - in_block).min(data.len() - pos);
            let piece: &[u8] = if n == BLOCK_SIZE_BYTES {
                &data[pos..pos + n]
            } else {
                scratch[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
                &scratch
            };
            self.put_block(&mut state, block, sector_mask(in_block, n), piece)?;
            pos += n;
        }
        // Counted once logged, under the lock it was logged with (waiting for space releases it
        // on the way): a FLUSH issued before this point does not cover the write.
        state.logged_writes += 1;
        self.seal_if_sync_writer(&mut state);
        Ok((generation, state.logged_writes))
    }

    /// A sync writer alternates a write and a FLUSH (fsync, O_DSYNC, a journal commit). The
    /// first write after a FLUSH, with the log idle (everything sealed durable, so no commit in
    /// flight for other FLUSHes to share), is sealed at once, written and flushed: that overlaps
    /// the FLUSH's way through the kernel, and the FLUSH then finds its write durable or on its
    /// way (a commit in flight, as a FLUSH's own seal is). If more writes come before the FLUSH,
    /// they share the next segment: the cost is one header block and one leg flush. Writers that
    /// do not FLUSH are never sealed early.
    fn seal_if_sync_writer(&self, state: &mut State) {
        // `flush_mark` 0: no FLUSH has covered a write in this run yet.
        let first_since_flush = state.flush_mark > 0
            && state.logged_writes == state.flush_mark + 1
            && state.writes_sealed == state.flush_mark;
        let log_idle = state.durable_id == state.sealed_id && self.log.sealer_idle();
        if first_since_flush && log_idle && !state.closing_log {
            self.seal(state, SealReason::Eager);
            state.commit_target = state.sealed_id;
        }
    }

    /// Logs one block (the sectors of `mask`, at their places in `data`) into the open segment.
    fn put_block(
        &self,
        state: &mut MutexGuard<'_, State>,
        block: u64,
        mask: u8,
        data: &[u8],
    ) -> Result<()> {
        loop {
            self.ensure_open(state)?;
            let open = state
                .open
                .as_ref()
                .expect("ensure_open leaves a segment open");
            if let Some(index) = open.rewritable.get(block) {
                if let Some(new_slot) = open.free_data_slot() {
                    self.rewrite_in_place(state, block, index, new_slot, mask, data);
                    return Ok(());
                }
                self.seal(state, SealReason::Full);
                continue;
            }
            if !open.has_room_for_entry() || open.free_data_slot().is_none() {
                self.seal(state, SealReason::Full);
                continue;
            }
            let (mask, data) = if mask == ALL_SECTORS_VALID {
                (mask, std::borrow::Cow::Borrowed(data))
            } else {
                let (m, d) = self.merge_with_current(state, block, mask, data)?;
                (m, std::borrow::Cow::Owned(d))
            };
            // merge_with_current may have read a leg, but never released the lock: the open
            // segment is the one we checked.
            let open = state.open.as_mut().expect("still open");
            let data_slot = open.free_data_slot().expect("checked above");
            let index = open.entries.len();
            let entry = Entry::data(block, data_slot as u16, mask, 0);
            self.ram
                .fill_block(open.buffer, open.block_of(data_slot), &data, mask, None);
            self.ram
                .publish_entry(open.buffer, open.position.block, index, &entry);
            open.entries.push(entry);
            open.used_data_slots |= 1 << data_slot;
            open.rewritable.insert(block, index);
            let location = self.geometry.location(open.position, data_slot);
            let state = &mut **state;
            let old = state.map.insert(block, location);
            // Partial copies are rare: skip hashing on the hot path when there are none.
            if let (Some(old), false) = (old, state.partial.is_empty()) {
                state.partial.remove(&old);
            }
            if mask != ALL_SECTORS_VALID {
                state.partial.insert(location, mask);
            }
            return Ok(());
        }
    }

    /// A rewrite of a block already in the open segment: fill a free data slot, then switch the
    /// entry to it in one atomic store (a kill mid-copy leaves the old, whole block).
    fn rewrite_in_place(
        &self,
        state: &mut State,
        block: u64,
        index: usize,
        new_slot: usize,
        mask: u8,
        data: &[u8],
    ) {
        let open = state.open.as_mut().expect("open");
        let old = open.entries[index];
        debug_assert_eq!(old.block(), block);
        let base = (mask != ALL_SECTORS_VALID).then(|| open.block_of(old.data_slot as usize));
        self.ram
            .fill_block(open.buffer, open.block_of(new_slot), data, mask, base);
        let merged = old.sector_valid | mask;
        let entry = Entry::data(block, new_slot as u16, merged, 0);
        self.ram
            .switch_placement(open.buffer, open.position.block, index, &entry);
        open.entries[index] = entry;
        open.used_data_slots |= 1 << new_slot;
        open.used_data_slots &= !(1 << old.data_slot);
        let old_location = self
            .geometry
            .location(open.position, old.data_slot as usize);
        let location = self.geometry.location(open.position, new_slot);
        let previous = state.map.insert(block, location);
        debug_assert_eq!(previous, Some(old_location));
        if !state.partial.is_empty() {
            state.partial.remove(&old_location);
        }
        if merged != ALL_SECTORS_VALID {
            state.partial.insert(location, merged);
        }
    }

    /// For a partial-block write of a block that has a cached copy or lies in a zeroed range:
    /// returns the whole current content with the new sectors laid over it, so the new copy
    /// never depends on an older cached one. With no cached copy, the missing sectors are the
    /// backing device's, and the copy stays partial.
    fn merge_with_current(
        &self,
        state: &mut State,
        block: u64,
        mask: u8,
        data: &[u8],
    ) -> Result<(u8, Vec<u8>)> {
        let mut current = vec![0u8; BLOCK_SIZE_BYTES];
        let current_mask = if let Some(location) = state.map.get(block) {
            self.stats.partial_merges.fetch_add(1, Ordering::Relaxed);
            let (slot, block_in_slot) = self.geometry.split(location);
            match state.slots[slot as usize].buffered(block_in_slot) {
                Some(buffer) => self.ram.copy_block(buffer, block_in_slot, &mut current),
                None => {
                    let (segment_id, position) = state.segment_at(slot, block_in_slot);
                    let data_slot = (block_in_slot - position.block - 1) as usize;
                    let mut aligned = AlignedBuf::new(BLOCK_SIZE_BYTES);
                    self.read_cached_block(segment_id, position, data_slot, &mut aligned)?;
                    current.copy_from_slice(&aligned[..BLOCK_SIZE_BYTES]);
                }
            }
            state
                .partial
                .get(&location)
                .copied()
                .unwrap_or(ALL_SECTORS_VALID)
        } else if state.zeros.contains(block) {
            ALL_SECTORS_VALID
        } else {
            0
        };
        for sector in 0..SECTORS_PER_BLOCK {
            if mask & (1 << sector) != 0 {
                let r = sector * SECTOR_SIZE_BYTES..(sector + 1) * SECTOR_SIZE_BYTES;
                current[r.clone()].copy_from_slice(&data[r]);
            }
        }
        Ok((current_mask | mask, current))
    }

    /// Makes sure a segment is open, waiting for a free RAM buffer and a free ring slot.
    fn ensure_open(&self, state: &mut MutexGuard<'_, State>) -> Result<()> {
        let mut stall_started: Option<Instant> = None;
        while state.open.is_none() {
            state.admit_to_log()?;
            if state.closing_log && state.fault_record_error.is_some() {
                // The log is closing for passthrough, which waits for a failure that cannot be
                // recorded: fail the write rather than hold it for as long as that lasts.
                let why = state.unrecorded_failure().expect("checked");
                return Err(EngineError::CacheFailed(why));
            }
            let at = state.place;
            let slot = &state.slots[at.slot as usize];
            // Block 0 starts a new lap of the slot: it must be free (writeback freed every segment
            // in it). Mid-slot, the slot is the log's own, the one the previous segment is in.
            let ring_full = at.block == 0 && slot.in_use();
            let needs_buffer = slot.buffer.is_none();
            if !ring_full && (!needs_buffer || !state.free_buffers.is_empty()) && !state.closing_log
            {
                self.open_at(state);
                break;
            }
            // The cache (or the RAM buffer) is full: wait for the log writer or writeback. Only
            // a full ring calls writeback to full speed: a writer waiting for a RAM buffer waits
            // for the log writer, which writeback would only slow down.
            stall_started.get_or_insert_with(Instant::now);
            state.writers_waiting += ring_full as usize;
            if ring_full {
                self.writeback_wakeup.notify_all();
            }
            self.space_freed.wait_for(state, Duration::from_millis(100));
            state.writers_waiting -= ring_full as usize;
        }
        if let Some(started) = stall_started {
            self.stats
                .stall_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Opens segment `next_segment_id` at the write position, in the slot's RAM buffer (taking a
    /// free one if the slot has none: a new slot, or the head's slot after a start).
    fn open_at(&self, state: &mut State) {
        let (id, at, epoch_id) = (state.next_segment_id, state.place, state.epoch_id);
        let slot = &state.slots[at.slot as usize];
        if at.block == 0 {
            assert!(
                !slot.in_use(),
                "segment {id} would reuse slot {} of segments {}..={}, not written back \
                 (through {})",
                at.slot,
                slot.first_id,
                slot.last_id,
                state.written_back_id
            );
        }
        let buffer = match slot.buffer {
            Some(buffer) => {
                self.ram.begin(buffer, at.block, id, epoch_id);
                buffer
            }
            None => {
                let buffer = state.free_buffers.pop().expect("checked by the caller");
                self.ram.take(buffer, at.block, id, epoch_id);
                buffer
            }
        };
        let slot = &mut state.slots[at.slot as usize];
        if slot.buffer.is_none() {
            (slot.buffer, slot.buffer_block) = (Some(buffer), at.block);
        }
        if !slot.in_use() {
            slot.first_id = id;
        }
        slot.last_id = id;
        state.live.push_back(Placed {
            position: at,
            used_bytes: 0,
            sealed_at: None,
        });
        state.open = Some(OpenSegment {
            id,
            position: at,
            buffer,
            epoch_id,
            entries: Vec::with_capacity(DATA_BLOCKS_PER_SEGMENT),
            rewritable: RewriteIndex::new(),
            used_data_slots: 0,
            opened_at: Instant::now(),
        });
        state.next_segment_id += 1;
    }

    /// Gives up an open segment with no entry: its id and place are used by the next one.
    fn abandon(&self, state: &mut State, open: OpenSegment) {
        self.ram.abandon(open.buffer, open.position.block);
        state.live.pop_back();
        state.next_segment_id -= 1;
        let slot = &mut state.slots[open.position.slot as usize];
        if slot.first_id == open.id {
            (slot.first_id, slot.last_id) = (0, 0);
        } else {
            slot.last_id = open.id - 1;
        }
        if slot.buffer_block == open.position.block && slot.buffer == Some(open.buffer) {
            // The buffer was taken for this segment: nothing else is in it.
            slot.buffer = None;
            self.ram.release(open.buffer);
            state.free_buffers.push(open.buffer);
        }
    }

    /// Seals the open segment and hands it to the log writer. A segment with no entry is
    /// abandoned instead (its id and place are reused), so a FLUSH never writes an empty segment.
    pub(crate) fn seal(&self, state: &mut State, reason: SealReason) {
        let Some(open) = state.open.take() else {
            if reason == SealReason::Flush {
                state.epoch_id += 1;
            }
            return;
        };
        if open.entries.is_empty() {
            self.abandon(state, open);
            if reason == SealReason::Flush {
                state.epoch_id += 1;
            }
            return;
        }
        assert_eq!(
            open.id,
            state.sealed_id + 1,
            "segments are sealed in id order"
        );
        let flags = if reason == SealReason::Flush {
            FLAG_FLUSH
        } else {
            0
        };
        let header = SegmentHeader {
            uuid: self.geometry.uuid,
            segment_id: open.id,
            epoch_id: open.epoch_id,
            durable_id: 0,
            flags,
            start_block: open.position.block,
            run_nonce: self.run_nonce,
            prev_crc: 0,
            entries: open.entries,
        };
        let used_blocks = header.used_blocks();
        let next = open.position.next(used_blocks, self.geometry.segment_count);
        // The entries are final: mark the image sealed (and the next header block not begun),
        // so a successor walks past it (FORMAT.md §6.1 step 5).
        let next_in_slot = (next.slot == open.position.slot).then_some(next.block);
        self.ram
            .seal_mark(open.buffer, open.position.block, next_in_slot);
        state.sealed_id = open.id;
        state.place = next;
        state.writes_sealed = state.logged_writes;
        let placed = state.placed_mut(open.id);
        placed.sealed_at = Some(Instant::now());
        placed.used_bytes = header.used_bytes();
        state.sealed_log_bytes += header.used_bytes() as u64;
        if reason == SealReason::Flush {
            state.epoch_id += 1;
            state.epoch_ended_writes = state.logged_writes;
        }
        let (slot, buffer) = (open.position.slot, open.buffer);
        if matches!(reason, SealReason::Flush | SealReason::Eager) && self.log.sealer_idle() {
            // Someone waits for this segment alone (a FLUSH, or the FLUSH expected after a sync
            // writer's write): finalise it here, and hand it to the legs without `wb-log`. A
            // FLUSH's thread writes it to leg 0 itself (`flush_inner`).
            self.log
                .write_now(self, header, slot, buffer, reason == SealReason::Flush);
        } else {
            self.log.send(LogJob::Segment {
                header,
                slot,
                buffer,
                flush_legs: reason != SealReason::Full,
            });
        }
        state.check_invariants();
    }

    /// Seals the open segment if the sync interval has passed since it was opened.
    pub(crate) fn seal_if_stale(&self) {
        let mut state = self.state.lock();
        let stale = state
            .open
            .as_ref()
            .is_some_and(|o| !o.entries.is_empty() && o.opened_at.elapsed() >= self.sync_interval);
        if stale {
            self.seal(&mut state, SealReason::Timer);
        }
    }

    /// DISCARD and WRITE_ZEROES: whole blocks become one range entry; partial-block edges are
    /// logged as writes of zeroes (reads of a discarded range return zeroes either way).
    pub fn zero_range(&self, offset: u64, len: u64, kind: EntryKind) -> Result<()> {
        self.check_request(offset, len)?;
        self.note_request();
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        if len == 0 {
            return Ok(());
        }
        match self.log_zero_range(offset, len, kind) {
            Err(EngineError::Passthrough) => self.passthrough_zero(offset, len, kind),
            result => result,
        }
    }

    fn log_zero_range(&self, offset: u64, len: u64, kind: EntryKind) -> Result<()> {
        let block_bytes = BLOCK_SIZE_BYTES as u64;
        let end = offset + len;
        let first_full = offset.div_ceil(block_bytes);
        let end_full = end / block_bytes;
        let zeroes = [0u8; BLOCK_SIZE_BYTES];
        let mut state = self.lock_live()?;
        if first_full >= end_full {
            // Inside one block, or straddling two without a whole one.
            self.zero_edges(&mut state, offset, end, &zeroes)?;
            state.logged_writes += 1;
            return Ok(());
        }
        self.zero_edges(&mut state, offset, first_full * block_bytes, &zeroes)?;
        let mut block = first_full;
        let max_blocks_per_entry = (u32::MAX as u64 / SECTORS_PER_BLOCK as u64) & !7;
        while block < end_full {
            let n = (end_full - block).min(max_blocks_per_entry);
            self.put_range(&mut state, kind, block, block + n)?;
            block += n;
        }
        self.zero_edges(&mut state, end_full * block_bytes, end, &zeroes)?;
        state.logged_writes += 1;
        Ok(())
    }

    fn zero_edges(
        &self,
        state: &mut MutexGuard<'_, State>,
        start: u64,
        end: u64,
        zeroes: &[u8; BLOCK_SIZE_BYTES],
    ) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let block = pos / BLOCK_SIZE_BYTES as u64;
            let in_block = (pos % BLOCK_SIZE_BYTES as u64) as usize;
            let n = ((BLOCK_SIZE_BYTES - in_block) as u64).min(end - pos) as usize;
            self.put_block(state, block, sector_mask(in_block, n), zeroes)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn put_range(
        &self,
        state: &mut MutexGuard<'_, State>,
        kind: EntryKind,
        start_block: u64,
        end_block: u64,
    ) -> Result<()> {
        loop {
            self.ensure_open(state)?;
            let open = state.open.as_mut().expect("open");
            if !open.has_room_for_entry() {
                self.seal(state, SealReason::Full);
                continue;
            }
            let entry = Entry::range(
                kind,
                start_block * SECTORS_PER_BLOCK as u64,
                ((end_block - start_block) * SECTORS_PER_BLOCK as u64) as u32,
            );
            let index = open.entries.len();
            self.ram
                .publish_entry(open.buffer, open.position.block, index, &entry);
            open.entries.push(entry);
            open.rewritable.clear();
            let id = open.id;
            let state = &mut **state;
            remove_map_range(&mut state.map, &mut state.partial, start_block, end_block);
            state.zeros.insert(start_block, end_block, id);
            return Ok(());
        }
    }
}
