//! The superblock at offset 0 of every cache leg: which cache set this leg belongs to, which
//! backing device it caches, and the geometry of its ring.

use crate::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    /// Size of the backing device when the cache was created; a smaller backing device at
    /// re-attach means it shrank and dirty blocks could lie beyond its end.
    pub backing_size_bytes: u64,
    /// Identity of the backing device recorded at create (see the engine's `backing_fingerprint`),
    /// so that a cache is never replayed onto a device it does not belong to.
    pub backing_fingerprint: [u8; 16],
    pub logical_block_size: u32,
    pub segment_count: u64,
    pub leg_count: u32,
    pub leg_index: u32,
    pub created_unix_secs: u64,
    /// Which device of leg `leg_index` this is: 0 at create, one more at every replacement
    /// (FORMAT.md §3). The fault record names the current one, so an older device of the leg —
    /// one that was replaced, and may miss segments — is never taken for it.
    pub leg_incarnation: u32,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; SUPERBLOCK_SIZE_BYTES];
        out[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut out, 32, self.backing_size_bytes);
        out[40..56].copy_from_slice(&self.backing_fingerprint);
        put_u32(&mut out, 56, SEGMENT_SIZE_BYTES as u32);
        put_u32(&mut out, 60, self.logical_block_size);
        put_u64(&mut out, 64, self.segment_count);
        put_u32(&mut out, 72, self.leg_count);
        put_u32(&mut out, 76, self.leg_index);
        put_u64(&mut out, 80, self.created_unix_secs);
        put_u32(&mut out, 88, self.leg_incarnation);
        seal_record(&mut out, SUPERBLOCK_MAGIC);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Superblock, FormatError> {
        check_record(bytes, "superblock", SUPERBLOCK_SIZE_BYTES, SUPERBLOCK_MAGIC)?;
        let bad = |reason| FormatError::BadSuperblock { reason };
        if get_u32(bytes, 56) as usize != SEGMENT_SIZE_BYTES {
            return Err(bad("segment size is not 512 KiB"));
        }
        let sb = Superblock {
            uuid: bytes[16..32].try_into().unwrap(),
            backing_size_bytes: get_u64(bytes, 32),
            backing_fingerprint: bytes[40..56].try_into().unwrap(),
            logical_block_size: get_u32(bytes, 60),
            segment_count: get_u64(bytes, 64),
            leg_count: get_u32(bytes, 72),
            leg_index: get_u32(bytes, 76),
            created_unix_secs: get_u64(bytes, 80),
            leg_incarnation: get_u32(bytes, 88),
        };
        if sb.logical_block_size != 512 && sb.logical_block_size != 4096 {
            return Err(bad("logical block size is neither 512 nor 4096"));
        }
        if sb.segment_count < MIN_SEGMENTS {
            return Err(bad("fewer segments than the minimum"));
        }
        // Every offset on the leg is computed from this count; one that overflows u64 would wrap
        // to a small leg size that a real device could pass for.
        let leg_size = sb
            .segment_count
            .checked_mul(SEGMENT_SIZE_BYTES as u64)
            .and_then(|bytes| bytes.checked_add(SEGMENT_AREA_OFFSET));
        if leg_size.is_none() {
            return Err(bad("more segments than a 64-bit device can hold"));
        }
        if sb.leg_count == 0 || sb.leg_count > 2 || sb.leg_index >= sb.leg_count {
            return Err(bad("leg count or leg index out of range"));
        }
        if sb.backing_size_bytes == 0
            || !sb
                .backing_size_bytes
                .is_multiple_of(BLOCK_SIZE_BYTES as u64)
        {
            return Err(bad("backing size is not a whole number of 4 KiB blocks"));
        }
        Ok(sb)
    }

    /// Bytes of a leg this superblock describes.
    pub fn leg_size_bytes(&self) -> u64 {
        segment_offset(self.segment_count)
    }
}
