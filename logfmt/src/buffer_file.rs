//! The RAM buffer file: segments not yet durable on the cache legs, in a memory-mapped file on
//! tmpfs that outlives the daemon (CONTRACT §2: a daemon crash loses nothing acknowledged).
//!
//! Layout: a 4 KiB file header, then `buffer_count` slot images of `SEGMENT_SIZE_BYTES`, each
//! laid out exactly as the ring slot it stands for (block `i` of the image is block `i` of the
//! slot): the segments of that slot not yet on every leg, each at its start block.
//!
//! File header: magic (8) · version (4) · buffer_count (4) · cache-set UUID (16) ·
//! `buffer_count` × u64 *owner words* from byte 64. An owner word is
//! `first_segment_id << 8 | start_block` of the first segment the buffer holds (`owner_word`),
//! or 0 when the buffer is free.
//!
//! Publication protocol (what a successor may rely on after a kill at any instant), FORMAT.md
//! §6.1: per segment, the header block at its start block gets entry count 0 and then its id
//! before any entry is counted; data block, then entry, then count (release); a rewrite switches
//! one placement word; the owner word is set after the first segment is begun and cleared only
//! once the slot is closed and all of it is on every leg.
//!
//! A successor takes every buffer with a non-zero owner word, in id order, walks its segments
//! (`walk_image`), rebuilds their headers from the published entries, and logs them before
//! serving I/O.

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

/// The owner word of a buffer whose first segment is `first_id`, starting at `start_block`.
pub fn owner_word(first_id: u64, start_block: u32) -> u64 {
    assert!((1..1 << 56).contains(&first_id), "segment id out of range");
    assert!(start_block as usize <= MAX_START_BLOCK);
    first_id << 8 | start_block as u64
}

/// (first segment id, its start block) of an owner word (0: a free buffer).
pub fn owner_parts(word: u64) -> (u64, u32) {
    (word >> 8, (word & 0xff) as u32)
}

/// Byte offset of slot image `index` in the file.
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

/// Who a buffer file belongs to and which segments it holds (the first of each buffer), read from its header without
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
        .map(|i| owner_parts(get_u64(bytes, owner_word_offset(i))).0)
        .filter(|&id| id != 0)
        .collect();
    Some(Owners {
        uuid: bytes[16..32].try_into().expect("16 bytes"),
        segments,
    })
}

/// Reads the entries published in the header block of an unsealed segment that starts at slot
/// block `start_block` (`header` is that block; its checksums are not trusted: they are
/// recomputed by the successor). Entries past the first invalid one, or the first whose data
/// slot lies beyond the slot, are dropped: they cannot have been published.
pub fn published_entries(header: &[u8], start_block: u32) -> Vec<Entry> {
    let count = (get_u32(header, ENTRY_COUNT_OFFSET) as usize).min(MAX_ENTRIES_PER_SEGMENT);
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        match Entry::decode(&header[entry_offset(i)..entry_offset(i + 1)], i) {
            Ok(e)
                if e.kind == EntryKind::Data
                    && e.data_slot as usize >= data_capacity(start_block) =>
            {
                break
            }
            Ok(entry) => entries.push(entry),
            Err(_) => break,
        }
    }
    entries
}

/// One segment found in a slot image by `walk_image`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub segment_id: u64,
    pub start_block: u32,
    pub epoch_id: u64,
    pub entries: Vec<Entry>,
}

/// The segments of a slot image whose owner word is `owner` (FORMAT.md §6.1): the first at the
/// owner's start block with the owner's id, then each next one where `Position::next` puts it
/// after the previous one's published entries, as long as the previous one is sealed (its header
/// block carries the segment magic) and the next header block carries the next id. Stale header
/// blocks of an earlier use of the buffer carry lower ids, so the walk stops there.
pub fn walk_image(image: &[u8], owner: u64) -> Vec<Published> {
    let (mut id, mut block) = owner_parts(owner);
    let mut found = Vec::new();
    if id == 0 || block as usize > MAX_START_BLOCK || image.len() < SEGMENT_SIZE_BYTES {
        return found;
    }
    loop {
        let at = block as usize * BLOCK_SIZE_BYTES;
        let header = &image[at..at + SEGMENT_HEADER_SIZE_BYTES];
        if get_u64(header, SEGMENT_ID_OFFSET) != id {
            break;
        }
        let entries = published_entries(header, block);
        let used = used_blocks(&entries);
        found.push(Published {
            segment_id: id,
            start_block: block,
            epoch_id: get_u64(header, EPOCH_ID_OFFSET),
            entries,
        });
        // Only a sealed segment's entries are final (an open one's extent can still change, and
        // the block behind it may hold a freed data slot: user data, which must never be read as
        // a header). The slot's last segment: the next one starts in another slot (buffer).
        let next = Position { slot: 0, block }.next(used, 2);
        if &header[0..8] != SEGMENT_MAGIC || next.slot != 0 {
            break;
        }
        (id, block) = (id + 1, next.block);
    }
    found
}
