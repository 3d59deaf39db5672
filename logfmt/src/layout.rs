//! Format constants and the arithmetic of where things live on a cache leg. Each constant says
//! why it has its value; nothing outside this crate may repeat one.

/// Version of the on-disk format. Bumped on any incompatible change; older daemons refuse newer
/// caches instead of guessing.
pub const FORMAT_VERSION: u32 = 1;

/// The cache block: the unit of mapping, logging and writeback. 4 KiB because that is the page
/// size, the physical block size we advertise, and what filesystems write.
pub const BLOCK_SIZE_BYTES: usize = 4096;
/// The smallest logical block the exported device may have (a 512e backing device).
pub const SECTOR_SIZE_BYTES: usize = 512;
/// Sectors per cache block: the width of an entry's sector-valid bitmap.
pub const SECTORS_PER_BLOCK: usize = BLOCK_SIZE_BYTES / SECTOR_SIZE_BYTES;
/// Sector-valid bitmap with every sector of a block present.
pub const ALL_SECTORS_VALID: u8 = 0xff;

/// A log segment: one header block plus data blocks. 512 KiB is large enough that writing one is
/// a purely sequential, full-bandwidth I/O on an SSD and small enough that the RAM buffer of a few
/// open segments stays a few MiB (dm-writeboost chose the same).
pub const SEGMENT_SIZE_BYTES: usize = 512 * 1024;
/// The header occupies the first block of a segment.
pub const SEGMENT_HEADER_SIZE_BYTES: usize = BLOCK_SIZE_BYTES;
/// Data blocks per segment: the rest of the segment after its header.
pub const DATA_BLOCKS_PER_SEGMENT: usize =
    (SEGMENT_SIZE_BYTES - SEGMENT_HEADER_SIZE_BYTES) / BLOCK_SIZE_BYTES;

/// Every self-checksummed record (superblock, checkpoint, segment header) starts with
/// magic (8) · version (4) · crc (4).
pub const RECORD_CRC_OFFSET: usize = 12;

/// Fixed part of a segment header before the entry table.
pub const SEGMENT_HEADER_FIXED_BYTES: usize = 64;
/// One entry of the table: see `Entry`.
pub const ENTRY_SIZE_BYTES: usize = 24;
/// Entries that fit in a header. More than the data blocks, so that discard / write-zeroes
/// entries (which carry no data) still fit in a segment whose data blocks are all used.
pub const MAX_ENTRIES_PER_SEGMENT: usize =
    (SEGMENT_HEADER_SIZE_BYTES - SEGMENT_HEADER_FIXED_BYTES) / ENTRY_SIZE_BYTES;
/// Byte offset of the entry count in a segment header (the RAM buffer publishes entries by
/// storing it last).
pub const ENTRY_COUNT_OFFSET: usize = 60;

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

/// Ring slot of segment `segment_id` (ids start at 1).
pub fn slot_of(segment_id: u64, segment_count: u64) -> u64 {
    assert!(segment_id >= 1, "segment ids start at 1");
    (segment_id - 1) % segment_count
}

/// Byte offset of ring slot `slot` on a leg.
pub fn segment_offset(slot: u64) -> u64 {
    SEGMENT_AREA_OFFSET + slot * SEGMENT_SIZE_BYTES as u64
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
const _: () = assert!(MAX_ENTRIES_PER_SEGMENT >= DATA_BLOCKS_PER_SEGMENT);
const _: () = assert!(
    CHECKPOINT_RING_OFFSET + (CHECKPOINT_SLOTS * CHECKPOINT_SLOT_SIZE_BYTES) as u64
        <= SEGMENT_AREA_OFFSET
);
const _: () = assert!(entry_offset(0).is_multiple_of(8) && ENTRY_SIZE_BYTES.is_multiple_of(8));
