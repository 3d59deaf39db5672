//! The writeboost on-disk format, version 2: pure encode / decode / validate, no I/O.
//!
//! Everything that is written to a cache leg or to the RAM buffer file is laid out here and only
//! here; the engine, recovery, writeback and `wbctl check` all go through these types. The byte
//! layout is documented in `FORMAT.md` beside this crate; the two must stay in step.
//!
//! A cache leg is: superblock (4 KiB) · checkpoint ring · padding · a ring of `N` slots of
//! 512 KiB. Segments (ids start at 1, only grow) are packed one after another into the slots:
//! where segment `k + 1` starts follows from where segment `k` starts and how many blocks it
//! uses (`Position::next`), and each header names the CRC of the header before it, so the log
//! is a hash chain walked from the position the checkpoint names.
//!
//! Integrity: every data block's CRC32C sits in its entry, and one CRC32C covers the whole
//! segment header (id and entries included), so a valid header vouches for the identity of
//! every data block it lists, and a torn or stale segment fails validation.

pub mod buffer_file;
mod checkpoint;
mod error;
mod layout;
mod segment;
mod superblock;

pub use checkpoint::{CacheLost, Checkpoint, Faults};
pub use error::FormatError;
pub use layout::*;
pub use segment::{stored_record_crc, used_blocks, Entry, EntryKind, SegmentHeader, FLAG_FLUSH};
pub use superblock::Superblock;

/// CRC32C (Castagnoli) of `bytes`: the one checksum of the whole format.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// CRC32C of `bytes` as if the 4 bytes at `crc_offset` were zero: how every self-checksummed
/// record (superblock, checkpoint, segment header) computes its own checksum.
pub fn crc32c_with_hole(bytes: &[u8], crc_offset: usize) -> u32 {
    let crc = crc32c::crc32c(&bytes[..crc_offset]);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, &bytes[crc_offset + 4..])
}

pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Checks the common prologue of every record: length, magic, version, and the record's own CRC.
pub(crate) fn check_record(
    bytes: &[u8],
    record: &'static str,
    size: usize,
    magic: &[u8; 8],
) -> Result<(), FormatError> {
    if bytes.len() < size {
        return Err(FormatError::Truncated {
            record,
            needed: size,
            got: bytes.len(),
        });
    }
    let bytes = &bytes[..size];
    if &bytes[0..8] != magic {
        return Err(FormatError::BadMagic { record });
    }
    let version = get_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { record, version });
    }
    let stored = get_u32(bytes, RECORD_CRC_OFFSET);
    let computed = crc32c_with_hole(bytes, RECORD_CRC_OFFSET);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            record,
            stored,
            computed,
        });
    }
    Ok(())
}

/// Writes the common prologue (magic, version) and, once the body is in place, the CRC.
pub(crate) fn seal_record(bytes: &mut [u8], magic: &[u8; 8]) {
    bytes[0..8].copy_from_slice(magic);
    put_u32(bytes, 8, FORMAT_VERSION);
    put_u32(bytes, RECORD_CRC_OFFSET, 0);
    let crc = crc32c_with_hole(bytes, RECORD_CRC_OFFSET);
    put_u32(bytes, RECORD_CRC_OFFSET, crc);
}
