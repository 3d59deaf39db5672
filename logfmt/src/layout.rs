//! Format constants and the arithmetic of where things live on a cache leg (`Position`: where a
//! segment starts, and where the next one goes). Each constant says
//! why it has its value; nothing outside this crate may repeat one.

/// Version of the on-disk format. Bumped on any incompatible change; older daemons refuse newer
/// caches instead of guessing. Version 2 packs several segments into one ring slot (a segment
/// header names its start block, its run and the CRC of the header before it); version 1 gave
/// every segment a slot of its own.
pub const FORMAT_VERSION: u32 = 2;

/// The cache block: the unit of mapping, logging and writeback. 4 KiB because that is the page
/// size, the physical block size we advertise, and what filesystems write.
pub const BLOCK_SIZE_BYTES: usize = 4096;
/// The smallest logical block the exported device may have (a 512e backing device).
pub const SECTOR_SIZE_BYTES: usize = 512;
/// Sectors per cache block: the width of an entry's sector-valid bitmap.
pub const SECTORS_PER_BLOCK: usize = BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES;
/// Sector-valid bitmap with every sector of a block present.
pub const ALL_SECTORS_VALID: u8 = 0xff;

/// A ring slot, and the largest segment: one header block plus up to 127 data blocks. 512 KiB is
/// large enough that writing a full one is a purely sequential, full-bandwidth I/O on an SSD and
/// small enough that the RAM buffer of a few slots stays a few MiB (dm-writeboost chose the
/// same). Segments sealed early (a FLUSH) are smaller and packed one after another in a slot.
pub const SEGMENT_SIZE_BYTES: usize = 512 * 1024;
/// Blocks in a ring slot: a segment starts at one of them (`Position::block`).
pub const SLOT_BLOCKS: usize = SEGMENT_SIZE_BYTES / BLOCK_SIZE_BYTES;
/// The smallest segment worth placing: a header and one data block. A slot with fewer blocks
/// left is closed and the next segment starts at block 0 of the next slot.
pub const MIN_SEGMENT_BLOCKS: usize = 2;
/// The highest block a segment may start at.
pub const MAX_START_BLOCK: usize = SLOT_BLOCKS - MIN_SEGMENT_BLOCKS;
/// The header occupies the first block of a segment.
pub const SEGMENT_HEADER_SIZE_BYTES: usize = BLOCK_SIZE_BYTES;
/// Data blocks of a segment that starts at block 0: the rest of the slot after its header. A
/// segment at block `b` has `DATA_BLOCKS_PER_SEGMENT - b` (`data_capacity`).
pub const DATA_BLOCKS_PER_SEGMENT: usize =
    (SEGMENT_SIZE_BYTES - SEGMENT_HEADER_SIZE_BYTES) / BLOCK_SIZE_BYTES;

/// Every self-checksummed record (superblock, checkpoint, segment header) starts with
/// magic (8) · version (4) · crc (4).
pub const RECORD_CRC_OFFSET: usize = 12;

/// Fixed part of a segment header before the entry table.
pub const SEGMENT_HEADER_FIXED_BYTES: usize = 80;
/// One entry of the table: see `Entry`.
pub const ENTRY_SIZE_BYTES: usize = 24;
/// Entries that fit in a header. More than the data blocks, so that discard / write-zeroes
/// entries (which carry no data) still fit in a segment whose data blocks are all used.
pub const MAX_ENTRIES_PER_SEGMENT: usize =
    (SEGMENT_HEADER_SIZE_BYTES - SEGMENT_HEADER_FIXED_BYTES) / ENTRY_SIZE_BYTES;
/// Byte offset of the entry count in a segment header (the RAM buffer publishes entries by
/// storing it last).
pub const ENTRY_COUNT_OFFSET: usize = 60;
/// Byte offset of the segment id in a segment header (the RAM buffer stores it last when it
/// begins a segment, so a successor never takes an earlier use's entries for this segment's).
pub const SEGMENT_ID_OFFSET: usize = 32;
/// Byte offset of the epoch id in a segment header.
pub const EPOCH_ID_OFFSET: usize = 40;
/// Byte offset of the run nonce: random per engine start, so two runs never write equal headers.
pub const RUN_NONCE_OFFSET: usize = 64;
/// Byte offset of the start block (`Position::block`) of the segment.
pub const START_BLOCK_OFFSET: usize = 72;
/// Byte offset of the record CRC of the header of segment `id - 1` (the hash chain).
pub const PREV_CRC_OFFSET: usize = 76;

/// Byte offset of entry `index` inside a segment header.
pub const fn entry_offset(index: usize) -> usize {
    SEGMENT_HEADER_FIXED_BYTES + index * ENTRY_SIZE_BYTES
}
/// Byte offset, inside an entry, of the 32-bit word kind · sector-valid · data slot. The RAM
/// buffer rewrites a block in place by storing this one aligned word atomically.
pub const ENTRY_PLACEMENT_OFFSET: usize = 16;

/// Byte offset of data block `data_slot` inside a segment.
pub const fn data_block_offset(data_slot: usize) -> usize {
    SEGMENT_HEADER_SIZE_BYTES + data_slot * BLOCK_SIZE_BYTES
}

/// Size of the superblock record at offset 0 of every leg.
pub const SUPERBLOCK_SIZE_BYTES: usize = 4096;
/// The checkpoint ring follows the superblock.
pub const CHECKPOINT_RING_OFFSET: u64 = SUPERBLOCK_SIZE_BYTES as u64;
/// One checkpoint per 4 KiB slot, so that a torn checkpoint write can only damage its own slot.
pub const CHECKPOINT_SLOT_SIZE_BYTES: usize = 4096;
/// Slots in the checkpoint ring. Checkpoint `seq` goes to slot `seq % CHECKPOINT_SLOTS`, so the
/// previous seven survive any torn write.
pub const CHECKPOINT_SLOTS: usize = 8;
/// Segments start at an offset aligned to their own size, after superblock and checkpoints.
pub const SEGMENT_AREA_OFFSET: u64 = SEGMENT_SIZE_BYTES as u64;
/// A cache smaller than this many segments cannot keep a useful number in flight while
/// writeback frees the oldest; it is refused as too small.
pub const MIN_SEGMENTS: u64 = 16;

/// Smallest cache leg the format accepts.
pub const MIN_CACHE_SIZE_BYTES: u64 =
    SEGMENT_AREA_OFFSET + MIN_SEGMENTS * SEGMENT_SIZE_BYTES as u64;

pub const SUPERBLOCK_MAGIC: &[u8; 8] = b"WBSUPER1";
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"WBCHKPT1";
pub const SEGMENT_MAGIC: &[u8; 8] = b"WBSEGMT1";

/// Number of whole segments a leg of `cache_size_bytes` holds.
pub fn segment_count_for(cache_size_bytes: u64) -> u64 {
    cache_size_bytes.saturating_sub(SEGMENT_AREA_OFFSET) / SEGMENT_SIZE_BYTES as u64
}

/// Byte offset of ring slot `slot` on a leg.
pub fn segment_offset(slot: u64) -> u64 {
    SEGMENT_AREA_OFFSET + slot * SEGMENT_SIZE_BYTES as u64
}

/// Where a segment starts: its ring slot and the block of the slot its header sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Position {
    pub slot: u64,
    pub block: u32,
}

impl Position {
    /// Byte offset of the segment's header on a leg.
    pub fn offset(&self) -> u64 {
        segment_offset(self.slot) + self.block as u64 * BLOCK_SIZE_BYTES as u64
    }

    /// Data blocks a segment starting here can hold.
    pub fn data_capacity(&self) -> usize {
        data_capacity(self.block)
    }

    /// Where the segment after this one starts, if this one uses `used_blocks` blocks (its
    /// header and data blocks up to the highest used, `SegmentHeader::used_blocks`): right
    /// behind it in the same slot if a header and one data block still fit there, else at block
    /// 0 of the next slot of a ring of `segment_count` slots. A segment never spans slots.
    pub fn next(&self, used_blocks: usize, segment_count: u64) -> Position {
        assert!(
            (1..=SLOT_BLOCKS - self.block as usize).contains(&used_blocks),
            "a segment at block {} cannot use {used_blocks} blocks",
            self.block
        );
        let end = self.block as usize + used_blocks;
        if end + MIN_SEGMENT_BLOCKS <= SLOT_BLOCKS {
            Position {
                slot: self.slot,
                block: end as u32,
            }
        } else {
            Position {
                slot: (self.slot + 1) % segment_count,
                block: 0,
            }
        }
    }
}

/// Data blocks a segment starting at slot block `start_block` can hold: the rest of the slot.
pub const fn data_capacity(start_block: u32) -> usize {
    DATA_BLOCKS_PER_SEGMENT - start_block as usize
}

/// Byte offset of checkpoint ring slot `index`.
pub fn checkpoint_offset(index: usize) -> u64 {
    assert!(index < CHECKPOINT_SLOTS);
    CHECKPOINT_RING_OFFSET + (index * CHECKPOINT_SLOT_SIZE_BYTES) as u64
}

/// CRC32C of one data block as the entry records it.
pub fn block_crc(block: &[u8]) -> u32 {
    debug_assert_eq!(block.len(), BLOCK_SIZE_BYTES);
    crc32c::crc32c(block)
}

const _: () = assert!(DATA_BLOCKS_PER_SEGMENT == 127);
const _: () = assert!(SLOT_BLOCKS == 128 && MAX_START_BLOCK == 126);
const _: () = assert!(PREV_CRC_OFFSET + 4 == SEGMENT_HEADER_FIXED_BYTES);
const _: () = assert!(MAX_ENTRIES_PER_SEGMENT >= DATA_BLOCKS_PER_SEGMENT);
const _: () = assert!(
    CHECKPOINT_RING_OFFSET + (CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES) as u64
        <= SEGMENT_AREA_OFFSET
);
const _: () = assert!(entry_offset(0).is_multiple_of(8) && ENTRY_SIZE_BYTES.is_multiple_of(8));
