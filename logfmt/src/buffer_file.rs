//! The RAM buffer file: segments not yet durable on the cache legs, in a memory-mapped file on
//! tmpfs that outlives the daemon (CONTRACT §2: a daemon crash loses nothing acknowledged).
//!
//! Layout: a 4 KiB file header, then `buffer_count` segment images of `SEGMENT_SIZE_BYTES`,
//! each laid out exactly as it will be written to a leg (header block, then data blocks).
//!
//! File header: magic (8) · version (4) · buffer_count (4) · cache-set UUID (16) ·
//! `buffer_count` × u64 *owner words* from byte 64. An owner word is the id of the segment the
//! buffer holds, or 0 when the buffer is free.
//!
//! Publication protocol (what a successor may rely on after a kill at any instant):
//! 1. the writer fills the data block, then writes the entry, and only then stores the
//!    segment header's entry count (release); an entry below the count is complete;
//! 2. a rewrite of a block already in the buffer fills a *free* data slot and then switches the
//!    entry's placement word (one aligned 32-bit store), so the entry always names a whole block;
//! 3. the owner word is set before the first entry is published and cleared only after the
//!    segment is written to every leg and every lower id is too.
//!
//! A successor therefore takes every buffer with a non-zero owner word, in id order, rebuilds
//! its header checksums from the published entries, and writes it to the log before serving I/O.

use crate::*;

pub const BUFFER_FILE_MAGIC: &[u8; 8] = b"WBRAMBF1";
/// The file header; segment images start after it, page-aligned.
pub const BUFFER_FILE_HEADER_BYTES: usize = 4096;
/// Offset of the first owner word in the file header.
pub const OWNER_WORDS_OFFSET: usize = 64;
/// Upper bound on buffers in one file, from the owner words that fit in the header.
pub const MAX_BUFFERS: usize = (BUFFER_FILE_HEADER_BYTES - OWNER_WORDS_OFFSET) / 8;

/// Byte offset of the owner word of buffer `index`.
pub fn owner_word_offset(index: usize) -> usize {
    assert!(index < MAX_BUFFERS);
    OWNER_WORDS_OFFSET + index * 8
}

/// Byte offset of segment image `index` in the file.
pub fn buffer_offset(index: usize) -> usize {
    BUFFER_FILE_HEADER_BYTES + index * SEGMENT_SIZE_BYTES
}

/// Total file size for `buffer_count` buffers.
pub fn file_size(buffer_count: usize) -> usize {
    buffer_offset(buffer_count)
}

/// Writes a fresh file header (all buffers free).
pub fn encode_header(out: &mut [u8], buffer_count: usize, uuid: &[u8; 16]) {
    assert!(buffer_count <= MAX_BUFFERS);
    let out = &mut out[..BUFFER_FILE_HEADER_BYTES];
    out.fill(0);
    out[0..8].copy_from_slice(BUFFER_FILE_MAGIC);
    put_u32(out, 8, FORMAT_VERSION);
    put_u32(out, 12, buffer_count as u32);
    out[16..32].copy_from_slice(uuid);
}

/// Validates a file header and returns its buffer count. The UUID must be the cache set's: a
/// buffer file of another cache is never adopted.
pub fn decode_header(bytes: &[u8], uuid: &[u8; 16]) -> Result<usize, FormatError> {
    let record = "RAM buffer file";
    if bytes.len() < BUFFER_FILE_HEADER_BYTES {
        return Err(FormatError::Truncated {
            record,
            needed: BUFFER_FILE_HEADER_BYTES,
            got: bytes.len(),
        });
    }
    if &bytes[0..8] != BUFFER_FILE_MAGIC {
        return Err(FormatError::BadMagic { record });
    }
    let version = get_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { record, version });
    }
    if &bytes[16..32] != uuid {
        return Err(FormatError::ForeignUuid { record });
    }
    let count = get_u32(bytes, 12) as usize;
    if count == 0 || count > MAX_BUFFERS || bytes.len() < file_size(count) {
        return Err(FormatError::Truncated {
            record,
            needed: file_size(count.clamp(1, MAX_BUFFERS)),
            got: bytes.len(),
        });
    }
    Ok(count)
}

/// Who a buffer file belongs to and which segments it holds, read from its header without
/// validating it against a cache set: `wbctl create` asks this of a file left under the name it
/// is about to use (a crashed daemon's acknowledged writes must not be thrown away unnoticed).
/// `None` if the bytes are not a buffer file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owners {
    pub uuid: [u8; 16],
    /// Segment ids held by buffers (non-zero owner words), in buffer order.
    pub segments: Vec<u64>,
}

pub fn peek_owners(bytes: &[u8]) -> Option<Owners> {
    if bytes.len() < BUFFER_FILE_HEADER_BYTES || &bytes[0..8] != BUFFER_FILE_MAGIC {
        return None;
    }
    let count = (get_u32(bytes, 12) as usize).min(MAX_BUFFERS);
    let segments = (0..count)
        .map(|i| get_u64(bytes, owner_word_offset(i)))
        .filter(|&id| id != 0)
        .collect();
    Some(Owners {
        uuid: bytes[16..32].try_into().expect("16 bytes"),
        segments,
    })
}

/// Reads the entries published in an unsealed segment image (its checksums are not trusted:
/// they are recomputed by the successor). Entries past the first invalid one are dropped: they
/// cannot have been published.
pub fn published_entries(image: &[u8]) -> Vec<Entry> {
    let count = (get_u32(image, ENTRY_COUNT_OFFSET) as usize).min(MAX_ENTRIES_PER_SEGMENT);
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        match Entry::decode(&image[entry_offset(i)..entry_offset(i + 1)], i) {
            Ok(entry) => entries.push(entry),
            Err(_) => break,
        }
    }
    entries
}
