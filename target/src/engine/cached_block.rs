//! Reading one cached data block from the legs, verified against its entry's CRC32C.
//!
//! The CRCs live in the segment headers on the legs; keeping them in memory for every cached
//! block would cost 4 bytes per block, a quarter of the metadata budget (CONTRACT §8). Instead a
//! small direct-mapped cache holds the CRC tables of recently read segments, and a miss reads the
//! segment's 4 KiB header. A block whose copy fails its CRC (or cannot be read) on one leg is
//! served from the other leg and rewritten on the bad one (`CacheLegs::read`).

use logfmt::{
    data_block_offset, Position, SegmentHeader, BLOCK_SIZE_BYTES, DATA_BLOCKS_PER_SEGMENT,
    SEGMENT_HEADER_SIZE_BYTES,
};
use parking_lot::Mutex;

use crate::device::AlignedBuf;
use crate::engine::Shared;
use crate::error::{EngineError, Result};

/// Segments whose CRC tables are kept (≈ 0.5 KiB each).
pub const CRC_CACHE_SEGMENTS: usize = 1024;

struct CrcTable {
    segment_id: u64,
    crcs: [u32; DATA_BLOCKS_PER_SEGMENT],
}

/// Direct-mapped by segment id; a slot reused by a newer segment simply misses.
pub struct CrcCache {
    lines: Vec<Mutex<Option<Box<CrcTable>>>>,
}

impl Default for CrcCache {
    fn default() -> Self {
        CrcCache {
            lines: (0..CRC_CACHE_SEGMENTS).map(|_| Mutex::new(None)).collect(),
        }
    }
}

impl CrcCache {
    fn get(&self, segment_id: u64, data_slot: usize) -> Option<u32> {
        let line = self.lines[segment_id as usize % CRC_CACHE_SEGMENTS].lock();
        line.as_ref()
            .filter(|t| t.segment_id == segment_id)
            .map(|t| t.crcs[data_slot])
    }

    fn put(&self, header: &SegmentHeader) {
        let mut crcs = [0u32; DATA_BLOCKS_PER_SEGMENT];
        for e in header.data_entries() {
            crcs[e.data_slot as usize] = e.data_crc;
        }
        *self.lines[header.segment_id as usize % CRC_CACHE_SEGMENTS].lock() =
            Some(Box::new(CrcTable {
                segment_id: header.segment_id,
                crcs,
            }));
    }
}

impl Shared {
    /// Reads data block `data_slot` of segment `segment_id` (at `position`) into `out` (aligned,
    /// at least 4 KiB), checked against its CRC. The caller keeps the slot pinned.
    pub(crate) fn read_cached_block(
        &self,
        segment_id: u64,
        position: Position,
        data_slot: usize,
        out: &mut AlignedBuf,
    ) -> Result<()> {
        let crc = self.block_crc(segment_id, position, data_slot)?;
        let offset = position.offset() + data_block_offset(data_slot) as u64;
        let check = |bytes: &[u8]| logfmt::block_crc(bytes) == crc;
        self.legs
            .read(&mut out[..BLOCK_SIZE_BYTES], offset, Some(&check))
            .map_err(|e| {
                EngineError::CacheFailed(format!(
                    "segment {segment_id} block {data_slot}: no leg holds a good copy: {e}"
                ))
            })
    }

    fn block_crc(&self, segment_id: u64, position: Position, data_slot: usize) -> Result<u32> {
        if let Some(crc) = self.crc_cache.get(segment_id, data_slot) {
            return Ok(crc);
        }
        let mut buf = AlignedBuf::new(SEGMENT_HEADER_SIZE_BYTES);
        let uuid = self.geometry.uuid;
        let check =
            |bytes: &[u8]| SegmentHeader::decode_expecting(bytes, &uuid, segment_id).is_ok();
        self.legs
            .read(&mut buf, position.offset(), Some(&check))
            .map_err(|e| {
                EngineError::CacheFailed(format!(
                    "segment {segment_id}: no leg holds a good header: {e}"
                ))
            })?;
        let header =
            SegmentHeader::decode_expecting(&buf, &uuid, segment_id).expect("checked by the read");
        self.crc_cache.put(&header);
        Ok(self
            .crc_cache
            .get(segment_id, data_slot)
            .expect("just cached"))
    }
}
