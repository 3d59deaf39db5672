//! The segment header: identity of a log segment and the table of what it holds, in the order
//! the writes were made.

use crate::*;

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// One 4 KiB data block, stored in the segment's data slot `data_slot`.
    Data = 1,
    /// A discarded sector range: no data, reads return zeroes.
    Discard = 2,
    /// A zeroed sector range: no data, reads return zeroes.
    WriteZeroes = 3,
}

impl EntryKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Data),
            2 => Some(Self::Discard),
            3 => Some(Self::WriteZeroes),
            _ => None,
        }
    }
}

/// One entry of a segment header (24 bytes on disk).
///
/// Data entries cover exactly one 4 KiB-aligned cache block; `sector_valid` says which of its
/// 512-byte sectors the block holds (the others belong to the backing device). Range entries
/// (discard, write-zeroes) cover `length_sectors` from `start_sector` and carry no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    pub start_sector: u64,
    pub length_sectors: u32,
    /// CRC32C of the data block (data entries only; 0 otherwise).
    pub data_crc: u32,
    pub kind: EntryKind,
    pub sector_valid: u8,
    /// Index of the data block inside the segment (data entries only): the block is at slot block
    /// `start_block + 1 + data_slot`.
    pub data_slot: u16,
}

impl Entry {
    pub fn data(block: u64, data_slot: u16, sector_valid: u8, data_crc: u32) -> Self {
        Entry {
            start_sector: block * SECTORS_PER_BLOCK as u64,
            length_sectors: SECTORS_PER_BLOCK as u32,
            data_crc,
            kind: EntryKind::Data,
            sector_valid,
            data_slot,
        }
    }

    pub fn range(kind: EntryKind, start_sector: u64, length_sectors: u32) -> Self {
        assert!(kind != EntryKind::Data);
        Entry {
            start_sector,
            length_sectors,
            data_crc: 0,
            kind,
            sector_valid: 0,
            data_slot: 0,
        }
    }

    /// The cache block a data entry covers.
    pub fn block(&self) -> u64 {
        self.start_sector / SECTORS_PER_BLOCK as u64
    }

    /// The packed word kind · sector-valid · data slot, as stored at `ENTRY_PLACEMENT_OFFSET`.
    pub fn placement_word(&self) -> u32 {
        (self.kind as u32) | (self.sector_valid as u32) << 8 | (self.data_slot as u32) << 16
    }

    pub fn encode_into(&self, out: &mut [u8]) {
        put_u64(out, 0, self.start_sector);
        put_u32(out, 8, self.length_sectors);
        put_u32(out, 12, self.data_crc);
        put_u32(out, ENTRY_PLACEMENT_OFFSET, self.placement_word());
        put_u32(out, 20, 0);
    }

    /// Decodes and validates one entry; `index` names it in errors.
    pub fn decode(bytes: &[u8], index: usize) -> Result<Entry, FormatError> {
        let bad = |reason| FormatError::BadEntry { index, reason };
        let kind = EntryKind::from_u8(bytes[16]).ok_or(bad("unknown kind"))?;
        let entry = Entry {
            start_sector: get_u64(bytes, 0),
            length_sectors: get_u32(bytes, 8),
            data_crc: get_u32(bytes, 12),
            kind,
            sector_valid: bytes[17],
            data_slot: get_u16(bytes, 18),
        };
        if get_u32(bytes, 20) != 0 {
            return Err(bad("reserved field is not zero"));
        }
        match kind {
            EntryKind::Data => {
                if !entry.start_sector.is_multiple_of(SECTORS_PER_BLOCK as u64) {
                    return Err(bad("data entry not aligned to a 4 KiB block"));
                }
                if entry.length_sectors != SECTORS_PER_BLOCK as u32 {
                    return Err(bad("data entry does not cover one block"));
                }
                if entry.sector_valid == 0 {
                    return Err(bad("data entry with no valid sector"));
                }
                if entry.data_slot as usize >= DATA_BLOCKS_PER_SEGMENT {
                    return Err(bad("data slot out of range"));
                }
            }
            EntryKind::Discard | EntryKind::WriteZeroes => {
                if entry.length_sectors == 0 {
                    return Err(bad("empty range"));
                }
                if entry.data_crc != 0 || entry.sector_valid != 0 || entry.data_slot != 0 {
                    return Err(bad("range entry with data fields set"));
                }
            }
        }
        if entry
            .start_sector
            .checked_add(entry.length_sectors as u64)
            .is_none()
        {
            return Err(bad("range overflows"));
        }
        Ok(entry)
    }
}

/// Header flag: this segment was sealed by a FLUSH or FUA; the epoch ends with it.
pub const FLAG_FLUSH: u32 = 1;

/// The decoded header of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    pub uuid: [u8; 16],
    pub segment_id: u64,
    /// The flush epoch the segment's writes belong to. Epochs only grow along the log; writeback
    /// flushes the backing device whenever it crosses from one epoch to the next.
    pub epoch_id: u64,
    /// Every segment with an id at or below this one was complete and flushed on the leg when
    /// this header was written, so recovery need not read their data to trust them.
    pub durable_id: u64,
    pub flags: u32,
    /// Block of its ring slot the header sits in (`Position::block`); data slot `d` is at slot
    /// block `start_block + 1 + d`, and at most `data_capacity(start_block)` data slots exist.
    pub start_block: u32,
    /// Random per engine start: headers of different runs always differ, so the chain below
    /// never links a segment of one run to a header of another (FORMAT.md §7).
    pub run_nonce: u64,
    /// Record CRC of the header of segment `segment_id - 1` (or, for the first segment after a
    /// checkpoint, the anchor the checkpoint names): recovery follows the log only along it.
    pub prev_crc: u32,
    pub entries: Vec<Entry>,
}

/// The record CRC stored in a self-checksummed record (bytes 12..16): what the next segment
/// header's `prev_crc` names. Meaningful only for a record that decoded.
pub fn stored_record_crc(bytes: &[u8]) -> u32 {
    get_u32(bytes, RECORD_CRC_OFFSET)
}

impl SegmentHeader {
    pub fn sealed_by_flush(&self) -> bool {
        self.flags & FLAG_FLUSH != 0
    }

    /// Encodes into the first `SEGMENT_HEADER_SIZE_BYTES` of `out`, checksum included; returns
    /// the record CRC (what the next header's `prev_crc` must name).
    pub fn encode_into(&self, out: &mut [u8]) -> u32 {
        assert!(self.entries.len() <= MAX_ENTRIES_PER_SEGMENT);
        assert!(self.start_block as usize <= MAX_START_BLOCK);
        let out = &mut out[..SEGMENT_HEADER_SIZE_BYTES];
        out.fill(0);
        out[16..32].copy_from_slice(&self.uuid);
        put_u64(out, SEGMENT_ID_OFFSET, self.segment_id);
        put_u64(out, EPOCH_ID_OFFSET, self.epoch_id);
        put_u64(out, 48, self.durable_id);
        put_u32(out, 56, self.flags);
        put_u32(out, ENTRY_COUNT_OFFSET, self.entries.len() as u32);
        put_u64(out, RUN_NONCE_OFFSET, self.run_nonce);
        put_u32(out, START_BLOCK_OFFSET, self.start_block);
        put_u32(out, PREV_CRC_OFFSET, self.prev_crc);
        for (i, entry) in self.entries.iter().enumerate() {
            entry.encode_into(&mut out[entry_offset(i)..entry_offset(i + 1)]);
        }
        seal_record(out, SEGMENT_MAGIC);
        stored_record_crc(out)
    }

    /// The record CRC this header has on disk. Decoding rejects every byte `encode_into` would
    /// not write, so for a decoded header this is the CRC that was read.
    pub fn record_crc(&self) -> u32 {
        let mut out = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        self.encode_into(&mut out)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; SEGMENT_HEADER_SIZE_BYTES];
        self.encode_into(&mut out);
        out
    }

    /// Decodes and validates a header: magic, version, checksum, cache-set UUID, every entry.
    /// The expected segment id is checked by `decode_expecting`.
    pub fn decode(bytes: &[u8], uuid: &[u8; 16]) -> Result<SegmentHeader, FormatError> {
        check_record(
            bytes,
            "segment header",
            SEGMENT_HEADER_SIZE_BYTES,
            SEGMENT_MAGIC,
        )?;
        if &bytes[16..32] != uuid {
            return Err(FormatError::ForeignUuid {
                record: "segment header",
            });
        }
        let count = get_u32(bytes, ENTRY_COUNT_OFFSET) as usize;
        if count > MAX_ENTRIES_PER_SEGMENT {
            return Err(FormatError::TooManyEntries {
                count,
                max: MAX_ENTRIES_PER_SEGMENT,
            });
        }
        let start_block = get_u32(bytes, START_BLOCK_OFFSET);
        if start_block as usize > MAX_START_BLOCK {
            return Err(FormatError::BadHeader {
                reason: "start block leaves no room for a data block in the slot",
            });
        }
        let mut entries = Vec::with_capacity(count);
        let mut slots_used = 0u128;
        for i in 0..count {
            let entry = Entry::decode(&bytes[entry_offset(i)..entry_offset(i + 1)], i)?;
            if entry.kind == EntryKind::Data {
                if entry.data_slot as usize >= data_capacity(start_block) {
                    return Err(FormatError::BadEntry {
                        index: i,
                        reason: "data slot beyond the end of the slot",
                    });
                }
                let bit = 1u128 << entry.data_slot;
                if slots_used & bit != 0 {
                    return Err(FormatError::BadEntry {
                        index: i,
                        reason: "data slot used twice",
                    });
                }
                slots_used |= bit;
            }
            entries.push(entry);
        }
        // Nothing but zeroes after the table: a header decodes only if `encode_into` of what was
        // decoded gives back the same bytes, so `record_crc` is the CRC that was read.
        if bytes[entry_offset(count)..SEGMENT_HEADER_SIZE_BYTES]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(FormatError::BadHeader {
                reason: "bytes after the entry table are not zero",
            });
        }
        let header = SegmentHeader {
            uuid: *uuid,
            segment_id: get_u64(bytes, SEGMENT_ID_OFFSET),
            epoch_id: get_u64(bytes, EPOCH_ID_OFFSET),
            durable_id: get_u64(bytes, 48),
            flags: get_u32(bytes, 56),
            start_block,
            run_nonce: get_u64(bytes, RUN_NONCE_OFFSET),
            prev_crc: get_u32(bytes, PREV_CRC_OFFSET),
            entries,
        };
        if header.segment_id == 0 {
            return Err(FormatError::WrongSegmentId {
                expected: 1,
                found: 0,
            });
        }
        Ok(header)
    }

    /// `decode`, and the header must carry `expected_id` (a different id is a stale slot from an
    /// earlier lap of the ring, or a gap in the log).
    pub fn decode_expecting(
        bytes: &[u8],
        uuid: &[u8; 16],
        expected_id: u64,
    ) -> Result<SegmentHeader, FormatError> {
        let header = Self::decode(bytes, uuid)?;
        if header.segment_id != expected_id {
            return Err(FormatError::WrongSegmentId {
                expected: expected_id,
                found: header.segment_id,
            });
        }
        Ok(header)
    }

    /// Checks every data block of a whole segment image against its entry's CRC: what recovery
    /// does for the segments that may have been in flight.
    pub fn verify_data(&self, segment: &[u8]) -> Result<(), FormatError> {
        for entry in self.data_entries() {
            let slot = entry.data_slot as usize;
            let block = &segment[data_block_offset(slot)..data_block_offset(slot + 1)];
            if block_crc(block) != entry.data_crc {
                return Err(FormatError::BadDataChecksum { data_slot: slot });
            }
        }
        Ok(())
    }

    pub fn data_entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.kind == EntryKind::Data)
    }

    /// Bytes of the segment that hold something: the header and data slots up to the highest one
    /// used. A segment is written only this far, and the next one starts right behind it
    /// (`Position::next`).
    pub fn used_bytes(&self) -> usize {
        self.used_blocks() * BLOCK_SIZE_BYTES
    }

    /// Blocks of the slot the segment occupies: its header and data slots up to the highest used.
    pub fn used_blocks(&self) -> usize {
        used_blocks(&self.entries)
    }

    /// Where the segment starts, in ring slot `slot`.
    pub fn position(&self, slot: u64) -> Position {
        Position {
            slot,
            block: self.start_block,
        }
    }
}

/// Blocks a segment with these entries occupies: its header and data slots up to the highest used
/// (1 with no data entry).
pub fn used_blocks(entries: &[Entry]) -> usize {
    1 + entries
        .iter()
        .filter(|e| e.kind == EntryKind::Data)
        .map(|e| e.data_slot as usize + 1)
        .max()
        .unwrap_or(0)
}
