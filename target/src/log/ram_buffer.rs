//! The RAM buffer: the open segment and every sealed segment not yet written to all cache legs,
//! kept in a memory-mapped file on tmpfs (under `/run`) that outlives the daemon, so that a
//! successor adopts it after a crash and nothing acknowledged is lost (CONTRACT §2). One buffer
//! per ring slot the log is writing: its image is laid out like the slot, every segment of the
//! slot at its start block.
//!
//! Layout and publication protocol: `logfmt::buffer_file`, FORMAT.md §6. Access rules, which
//! make the raw pointer accesses below sound (they are about blocks of an image: the segments of
//! a slot never share a block):
//! - the open segment's blocks, and the header block where the next segment will start, are
//!   written only by the engine while it holds its state lock;
//! - a sealed segment's header block is finalised once by the log writer, which then hands the
//!   segment's blocks to the leg writers; from then on they are only read;
//! - readers copy data blocks of any held buffer under the engine lock (the log writer never
//!   touches data blocks, so its header writes never overlap them).
//!
//! The file holds acknowledged user data and what a successor writes to the log: it is created
//! 0600 and exclusively, and a file found in place is adopted only if it is a regular file of
//! root's with mode 0600 (`private_file::open_private`): never a link, never anyone else's.

use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use logfmt::buffer_file as bf;
use logfmt::{
    block_crc, data_block_offset, entry_offset, Entry, SegmentHeader, BLOCK_SIZE_BYTES,
    ENTRY_COUNT_OFFSET, ENTRY_PLACEMENT_OFFSET, EPOCH_ID_OFFSET, SEGMENT_HEADER_SIZE_BYTES,
    SEGMENT_ID_OFFSET, SEGMENT_MAGIC, SEGMENT_SIZE_BYTES, SLOT_BLOCKS,
};
use memmap2::MmapRaw;

/// Upper bound on RAM buffers (segments in flight at once); recovery checks twice as many slots
/// past the replayed head for out-of-order leftovers.
pub const MAX_RAM_BUFFERS: usize = 32;

pub struct RamBuffers {
    map: MmapRaw,
    count: usize,
    path: PathBuf,
    /// Held (flock) for the life of the engine: one daemon per cache.
    _file: File,
}

/// A segment found in the buffer file of a crashed predecessor: its header (start block, epoch,
/// published entries with their data CRCs recomputed; no chain yet), in buffer `buffer`.
pub struct Adopted {
    pub buffer: usize,
    pub header: SegmentHeader,
    /// The owner word's first segment id: the buffer's segments are this one and the ones after.
    pub buffer_first: bool,
}

impl RamBuffers {
    /// Opens (or creates) the buffer file at `path` with `count` buffers and returns the segments
    /// a crashed predecessor left in it, oldest first. The caller must log them and then call
    /// `release` on each before reusing the buffers.
    pub fn open(path: &Path, count: usize, uuid: &[u8; 16]) -> io::Result<(Self, Vec<Adopted>)> {
        assert!((2..=bf::MAX_BUFFERS).contains(&count));
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(crate::private_file::RUN_DIR_MODE)
                .create(dir)?;
        }
        let file =
            crate::private_file::open_private(path, crate::private_file::Access::ReadWrite, true)
                .map_err(|e| io::Error::new(e.kind(), format!("RAM buffer file {}", e)))?;
        lock_exclusive(&file, path)?;
        let existing_len = file.metadata()?.len() as usize;
        let mut adopted = Vec::new();
        let mut buffers = None;
        if existing_len >= bf::BUFFER_FILE_HEADER_BYTES {
            let map = MmapRaw::map_raw(&file)?;
            // SAFETY: the mapping is `existing_len` bytes long and nobody else writes it (flock).
            let bytes = unsafe { std::slice::from_raw_parts(map.as_ptr(), existing_len) };
            match bf::decode_header(bytes, uuid) {
                Ok(old_count) => {
                    let old = RamBuffers {
                        map,
                        count: old_count,
                        path: path.to_path_buf(),
                        _file: file.try_clone()?,
                    };
                    adopted = old.collect_adoptable(uuid);
                    if old_count == count || !adopted.is_empty() {
                        buffers = Some(old);
                    }
                }
                Err(logfmt::FormatError::ForeignUuid { .. }) if holds_segments(bytes) => {
                    return Err(io::Error::other(format!(
                        "{}: RAM buffer file belongs to another cache set; refusing to overwrite \
                         what may be another cache's acknowledged writes",
                        path.display()
                    )))
                }
                Err(logfmt::FormatError::UnsupportedVersion { version, .. })
                    if holds_segments(bytes) =>
                {
                    return Err(io::Error::other(format!(
                        "{}: RAM buffer file of format version {version} holds segments that were \
                         never logged, and this version cannot read them; start the version that \
                         wrote it to log them (or drain the cache with it) first",
                        path.display()
                    )))
                }
                // Not a buffer file of ours with anything in it: start afresh.
                Err(_) => {}
            }
        }
        let buffers = match buffers {
            Some(b) => b,
            None => {
                file.set_len(0)?;
                file.set_len(bf::file_size(count) as u64)?;
                let map = MmapRaw::map_raw(&file)?;
                // SAFETY: the header region is within the fresh mapping; no other user (flock).
                let header = unsafe {
                    std::slice::from_raw_parts_mut(map.as_mut_ptr(), bf::BUFFER_FILE_HEADER_BYTES)
                };
                bf::encode_header(header, count, uuid);
                RamBuffers {
                    map,
                    count,
                    path: path.to_path_buf(),
                    _file: file,
                }
            }
        };
        Ok((buffers, adopted))
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every segment the buffers hold (FORMAT.md §6.1: each buffer walked from its owner word),
    /// oldest first. An open segment with nothing published is left out: it holds nothing.
    fn collect_adoptable(&self, uuid: &[u8; 16]) -> Vec<Adopted> {
        let mut adopted = Vec::new();
        for buffer in 0..self.count {
            let owner = self.owner(buffer);
            if owner == 0 {
                continue;
            }
            // SAFETY: at adoption no writer runs (flock, before the engine starts).
            let image =
                unsafe { std::slice::from_raw_parts(self.base(buffer), SEGMENT_SIZE_BYTES) };
            let found = bf::walk_image(image, owner);
            if found.is_empty() {
                // The owner word is set after its segment's id, so this cannot happen unless the
                // file was damaged; adopt nothing from this buffer rather than guess.
                log::error!(
                    "{}: buffer {buffer} owner word {owner:#x} names no segment in its image; \
                     skipped",
                    self.path.display()
                );
                continue;
            }
            for (i, p) in found.into_iter().enumerate() {
                if p.entries.is_empty() {
                    continue;
                }
                let mut header = SegmentHeader {
                    uuid: *uuid,
                    segment_id: p.segment_id,
                    epoch_id: p.epoch_id,
                    durable_id: 0,
                    flags: 0,
                    start_block: p.start_block,
                    run_nonce: 0,
                    prev_crc: 0,
                    entries: p.entries,
                };
                self.finalise_crcs(buffer, &mut header);
                adopted.push(Adopted {
                    buffer,
                    header,
                    buffer_first: i == 0,
                });
            }
        }
        adopted.sort_by_key(|a| a.header.segment_id);
        adopted
    }

    fn base(&self, buffer: usize) -> *mut u8 {
        assert!(buffer < self.count);
        // SAFETY: buffer_offset(buffer) + SEGMENT_SIZE_BYTES <= file_size(count) = mapping size.
        unsafe { self.map.as_mut_ptr().add(bf::buffer_offset(buffer)) }
    }

    /// The start of slot block `block` of a buffer's image.
    fn block_ptr(&self, buffer: usize, block: u32) -> *mut u8 {
        assert!((block as usize) < SLOT_BLOCKS);
        // SAFETY: inside the image (block < 128 blocks of 4 KiB = the image's size).
        unsafe { self.base(buffer).add(block as usize * BLOCK_SIZE_BYTES) }
    }

    fn owner_word(&self, buffer: usize) -> &AtomicU64 {
        // SAFETY: the owner word is 8-byte aligned (page-aligned mapping, offset 64 + 8·i) and
        // inside the mapping; it is only ever accessed atomically.
        unsafe { &*(self.map.as_mut_ptr().add(bf::owner_word_offset(buffer)) as *const AtomicU64) }
    }

    /// An 8-byte word of the header block at slot block `block` (offsets 0, 32, 40: aligned).
    fn header_u64(&self, buffer: usize, block: u32, offset: usize) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= SEGMENT_HEADER_SIZE_BYTES);
        // SAFETY: 8-aligned inside the page-aligned header block; the protocol's words are only
        // ever accessed atomically while the block is the engine's (module access rules).
        unsafe { &*(self.block_ptr(buffer, block).add(offset) as *const AtomicU64) }
    }

    /// A 4-byte word of the header block at slot block `block`.
    fn header_u32(&self, buffer: usize, block: u32, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= SEGMENT_HEADER_SIZE_BYTES);
        // SAFETY: as `header_u64`, 4-aligned.
        unsafe { &*(self.block_ptr(buffer, block).add(offset) as *const AtomicU32) }
    }

    pub fn owner(&self, buffer: usize) -> u64 {
        self.owner_word(buffer).load(Ordering::Acquire)
    }

    /// The `len` bytes of the sealed segment at slot block `start_block` of a buffer, for
    /// writing to the legs. Only valid once the segment is sealed and finalised (or, at
    /// adoption, before any writer runs).
    pub fn segment_bytes(&self, buffer: usize, start_block: u32, len: usize) -> &[u8] {
        assert!(start_block as usize * BLOCK_SIZE_BYTES + len <= SEGMENT_SIZE_BYTES);
        // SAFETY: see the module's access rules: nobody writes a sealed, finalised segment's
        // blocks, and they never overlap another segment's.
        unsafe { std::slice::from_raw_parts(self.block_ptr(buffer, start_block), len) }
    }

    /// Takes free buffer `buffer` for a slot whose first segment here is `segment_id`, at slot
    /// block `block`. The segment is begun before the owner word is set, so a successor that
    /// sees the owner word finds the segment.
    pub fn take(&self, buffer: usize, block: u32, segment_id: u64, epoch_id: u64) {
        assert_eq!(self.owner(buffer), 0, "buffer {buffer} is in use");
        self.begin_header(buffer, block, segment_id, epoch_id);
        self.owner_word(buffer)
            .store(bf::owner_word(segment_id, block), Ordering::Release);
    }

    /// Begins segment `segment_id` at slot block `block` of the (held) buffer of its slot, behind
    /// the sealed segments already in it.
    pub fn begin(&self, buffer: usize, block: u32, segment_id: u64, epoch_id: u64) {
        let (first, first_block) = bf::owner_parts(self.owner(buffer));
        assert!(
            first != 0 && first <= segment_id && first_block <= block,
            "buffer {buffer} does not hold the slot of segment {segment_id}"
        );
        // Sealing the segment before it (or abandoning one here) stored id 0 here: the walk of a
        // successor stops here until this segment is begun.
        let old = self.header_u64(buffer, block, SEGMENT_ID_OFFSET);
        assert_eq!(
            old.load(Ordering::Relaxed),
            0,
            "buffer {buffer} block {block}: segment {segment_id} begins where no segment was \
             prepared"
        );
        self.begin_header(buffer, block, segment_id, epoch_id);
    }

    /// FORMAT.md §6.1 step 1: count 0, no magic, the epoch, and the id last.
    fn begin_header(&self, buffer: usize, block: u32, segment_id: u64, epoch_id: u64) {
        self.header_u32(buffer, block, ENTRY_COUNT_OFFSET)
            .store(0, Ordering::Release);
        self.header_u64(buffer, block, 0)
            .store(0, Ordering::Release);
        self.header_u64(buffer, block, EPOCH_ID_OFFSET)
            .store(epoch_id, Ordering::Release);
        self.header_u64(buffer, block, SEGMENT_ID_OFFSET)
            .store(segment_id, Ordering::Release);
    }

    /// FORMAT.md §6.1 step 5: the segment at `block` is sealed (its entries are final); the one
    /// after it will start at `next_in_slot` (if in this slot), whose header block must not
    /// pass for a segment until it is begun.
    pub fn seal_mark(&self, buffer: usize, block: u32, next_in_slot: Option<u32>) {
        if let Some(next) = next_in_slot {
            self.header_u64(buffer, next, SEGMENT_ID_OFFSET)
                .store(0, Ordering::Release);
        }
        let magic = u64::from_ne_bytes(*SEGMENT_MAGIC);
        self.header_u64(buffer, block, 0)
            .store(magic, Ordering::Release);
    }

    /// An open segment with no entry is given up: its header block no longer names it.
    pub fn abandon(&self, buffer: usize, block: u32) {
        self.header_u64(buffer, block, SEGMENT_ID_OFFSET)
            .store(0, Ordering::Release);
    }

    /// Moves the open segment at `block` to epoch `epoch_id` (a FLUSH ended the epoch before it).
    pub fn set_epoch(&self, buffer: usize, block: u32, epoch_id: u64) {
        self.header_u64(buffer, block, EPOCH_ID_OFFSET)
            .store(epoch_id, Ordering::Release);
    }

    /// Copies `data` (the sectors in `sector_mask`, each 512 bytes, at their places in the
    /// block) into slot block `block`; with `base` the other sectors are first copied from that
    /// block (a partial rewrite merging the older copy).
    pub fn fill_block(
        &self,
        buffer: usize,
        block: u32,
        data: &[u8],
        sector_mask: u8,
        base: Option<u32>,
    ) {
        assert_eq!(data.len(), BLOCK_SIZE_BYTES);
        let dst = self.block_ptr(buffer, block);
        // SAFETY: caller holds the engine lock and the block is a free data slot of the open
        // segment, so no reader can be copying it (readers only follow published entries).
        unsafe {
            if let Some(src) = base {
                std::ptr::copy_nonoverlapping(self.block_ptr(buffer, src), dst, BLOCK_SIZE_BYTES);
            }
            for sector in 0..logfmt::SECTORS_PER_BLOCK {
                if sector_mask & (1 << sector) != 0 {
                    let off = sector * logfmt::SECTOR_SIZE_BYTES;
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr().add(off),
                        dst.add(off),
                        logfmt::SECTOR_SIZE_BYTES,
                    );
                }
            }
        }
    }

    /// Publishes entry `index` (its data already filled) of the open segment whose header is at
    /// slot block `header_block`: the entry bytes first, then the count.
    pub fn publish_entry(&self, buffer: usize, header_block: u32, index: usize, entry: &Entry) {
        let mut bytes = [0u8; logfmt::ENTRY_SIZE_BYTES];
        entry.encode_into(&mut bytes);
        // SAFETY: engine lock held, segment open; the entry slot is beyond the published count.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.block_ptr(buffer, header_block)
                    .add(entry_offset(index)),
                bytes.len(),
            )
        };
        self.header_u32(buffer, header_block, ENTRY_COUNT_OFFSET)
            .store(index as u32 + 1, Ordering::Release);
    }

    /// Points published entry `index` at another data slot / sector set in one atomic store.
    pub fn switch_placement(&self, buffer: usize, header_block: u32, index: usize, entry: &Entry) {
        self.header_u32(
            buffer,
            header_block,
            entry_offset(index) + ENTRY_PLACEMENT_OFFSET,
        )
        .store(entry.placement_word(), Ordering::Release);
    }

    /// Copies slot block `block` out (a read hit in RAM). Engine lock held.
    pub fn copy_block(&self, buffer: usize, block: u32, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_SIZE_BYTES);
        // SAFETY: the block belongs to a published entry; writers only fill free slots.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.block_ptr(buffer, block),
                out.as_mut_ptr(),
                BLOCK_SIZE_BYTES,
            )
        };
    }

    /// Computes the data CRCs of `header`'s entries from the image.
    fn finalise_crcs(&self, buffer: usize, header: &mut SegmentHeader) {
        let len = header.used_bytes();
        let segment = self.segment_bytes(buffer, header.start_block, len);
        for entry in header.entries.iter_mut() {
            if entry.kind == logfmt::EntryKind::Data {
                let off = data_block_offset(entry.data_slot as usize);
                entry.data_crc = block_crc(&segment[off..off + BLOCK_SIZE_BYTES]);
            }
        }
    }

    /// Seals a segment for writing: fills in the data CRCs, then encodes the final header (with
    /// its checksum) over its header block. Called by the log writer, once per segment. Returns
    /// the header's record CRC.
    pub fn finalise(&self, buffer: usize, header: &mut SegmentHeader) -> u32 {
        self.finalise_crcs(buffer, header);
        let mut bytes = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        let crc = header.encode_into(&mut bytes);
        // SAFETY: the segment is sealed: the engine no longer writes its blocks, readers never
        // read a header block, and the leg writers get the segment only after this returns.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.block_ptr(buffer, header.start_block),
                bytes.len(),
            )
        };
        crc
    }

    /// The slot is closed and all of it is on every leg (and so is every lower id): the buffer
    /// may be reused.
    pub fn release(&self, buffer: usize) {
        self.owner_word(buffer).store(0, Ordering::Release);
    }

    /// Every buffer is free: what a predecessor left is logged (or, after a loss, given up).
    pub fn release_all(&self) {
        for buffer in 0..self.count {
            self.release(buffer);
        }
    }
}

/// Whether a buffer file (of any cache set) still holds segments a daemon never logged. An empty
/// one of another cache set (e.g. after a forced re-format) may be replaced.
fn holds_segments(bytes: &[u8]) -> bool {
    (0..bf::MAX_BUFFERS).any(|i| {
        let off = bf::owner_word_offset(i);
        bytes[off..off + 8] != [0u8; 8]
    })
}

fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only takes the fd and flags.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{}: RAM buffer file is in use by another running daemon of this cache",
                    path.display()
                ),
            ));
        }
        return Err(err);
    }
    Ok(())
}
