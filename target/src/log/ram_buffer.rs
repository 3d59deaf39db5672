//! The RAM buffer: the open segment and every sealed segment not yet written to all cache legs,
//! kept in a memory-mapped file on tmpfs (under `/run`) that outlives the daemon, so that a
//! successor adopts it after a crash and nothing acknowledged is lost (CONTRACT §2).
//!
//! Layout and publication protocol: `logfmt::buffer_file`. Access rules, which make the raw
//! pointer accesses below sound:
//! - the open buffer is written only by the engine while it holds its state lock;
//! - a sealed buffer's header is finalised once by the log writer, which then hands the image to
//!   the leg writers; from then on the image is only read;
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
    ENTRY_COUNT_OFFSET, ENTRY_PLACEMENT_OFFSET, SEGMENT_SIZE_BYTES,
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

/// A segment found in the buffer file of a crashed predecessor.
pub struct Adopted {
    pub buffer: usize,
    pub header: SegmentHeader,
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

    fn collect_adoptable(&self, uuid: &[u8; 16]) -> Vec<Adopted> {
        let mut adopted = Vec::new();
        for buffer in 0..self.count {
            let owner = self.owner(buffer);
            if owner == 0 {
                continue;
            }
            let image = self.image(buffer);
            let entries = bf::published_entries(image);
            let epoch_id = u64::from_le_bytes(image[40..48].try_into().unwrap());
            let id_in_image = u64::from_le_bytes(image[32..40].try_into().unwrap());
            if id_in_image != owner {
                // The owner word is set after the image header, so this cannot happen unless
                // the file was damaged; adopt nothing from this buffer rather than guess.
                log::error!(
                    "{}: buffer {buffer} owner word {owner} disagrees with its image ({id_in_image}); skipped",
                    self.path.display()
                );
                continue;
            }
            let mut header = SegmentHeader {
                uuid: *uuid,
                segment_id: owner,
                epoch_id,
                durable_id: 0,
                flags: 0,
                entries,
            };
            self.finalise_crcs(buffer, &mut header);
            adopted.push(Adopted { buffer, header });
        }
        adopted.sort_by_key(|a| a.header.segment_id);
        adopted
    }

    fn base(&self, buffer: usize) -> *mut u8 {
        assert!(buffer < self.count);
        // SAFETY: buffer_offset(buffer) + SEGMENT_SIZE_BYTES <= file_size(count) = mapping size.
        unsafe { self.map.as_mut_ptr().add(bf::buffer_offset(buffer)) }
    }

    fn owner_word(&self, buffer: usize) -> &AtomicU64 {
        // SAFETY: the owner word is 8-byte aligned (page-aligned mapping, offset 64 + 8·i) and
        // inside the mapping; it is only ever accessed atomically.
        unsafe { &*(self.map.as_mut_ptr().add(bf::owner_word_offset(buffer)) as *const AtomicU64) }
    }

    fn entry_count_word(&self, buffer: usize) -> &AtomicU32 {
        // SAFETY: 4-byte aligned inside the buffer's header; accessed atomically only while the
        // buffer is open (the log writer rewrites it in place once sealed, single-threaded).
        unsafe { &*(self.base(buffer).add(ENTRY_COUNT_OFFSET) as *const AtomicU32) }
    }

    pub fn owner(&self, buffer: usize) -> u64 {
        self.owner_word(buffer).load(Ordering::Acquire)
    }

    /// The whole segment image of a buffer, for reading. Only valid once the buffer is sealed and
    /// finalised (or, at adoption, before any writer runs).
    pub fn image(&self, buffer: usize) -> &[u8] {
        // SAFETY: see the module's access rules: nobody writes a sealed, finalised image.
        unsafe { std::slice::from_raw_parts(self.base(buffer), SEGMENT_SIZE_BYTES) }
    }

    /// Starts segment `segment_id` in a free buffer. The header fields are written before the
    /// owner word, so a successor that sees the owner word sees the header too.
    pub fn begin(&self, buffer: usize, uuid: &[u8; 16], segment_id: u64, epoch_id: u64) {
        assert_eq!(self.owner(buffer), 0, "buffer {buffer} is in use");
        let header = SegmentHeader {
            uuid: *uuid,
            segment_id,
            epoch_id,
            durable_id: 0,
            flags: 0,
            entries: Vec::new(),
        };
        let mut bytes = vec![0u8; logfmt::SEGMENT_HEADER_SIZE_BYTES];
        header.encode_into(&mut bytes);
        // SAFETY: the buffer is free (asserted) and we hold the engine lock: no other accessor.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base(buffer), bytes.len()) };
        self.owner_word(buffer).store(segment_id, Ordering::Release);
    }

    /// Copies `data` (the sectors in `sector_mask`, each 512 bytes, at their places in the
    /// block) into data slot `data_slot`; with `base` the other sectors are first copied from that
    /// data slot (a partial rewrite merging the older copy).
    pub fn fill_block(
        &self,
        buffer: usize,
        data_slot: usize,
        block: &[u8],
        sector_mask: u8,
        base: Option<usize>,
    ) {
        assert_eq!(block.len(), BLOCK_SIZE_BYTES);
        let dst = data_block_offset(data_slot);
        // SAFETY: caller holds the engine lock and the buffer is open; data_slot is free, so no
        // reader can be copying it (readers only follow published entries).
        unsafe {
            let base_ptr = self.base(buffer);
            if let Some(src) = base {
                std::ptr::copy_nonoverlapping(
                    base_ptr.add(data_block_offset(src)),
                    base_ptr.add(dst),
                    BLOCK_SIZE_BYTES,
                );
            }
            for sector in 0..logfmt::SECTORS_PER_BLOCK {
                if sector_mask & (1 << sector) != 0 {
                    let off = sector * logfmt::SECTOR_SIZE_BYTES;
                    std::ptr::copy_nonoverlapping(
                        block.as_ptr().add(off),
                        base_ptr.add(dst + off),
                        logfmt::SECTOR_SIZE_BYTES,
                    );
                }
            }
        }
    }

    /// Publishes entry `index` (its data already filled): the entry bytes first, then the count.
    pub fn publish_entry(&self, buffer: usize, index: usize, entry: &Entry) {
        let mut bytes = [0u8; logfmt::ENTRY_SIZE_BYTES];
        entry.encode_into(&mut bytes);
        // SAFETY: engine lock held, buffer open; the entry slot is beyond the published count.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base(buffer).add(entry_offset(index)),
                bytes.len(),
            )
        };
        self.entry_count_word(buffer)
            .store(index as u32 + 1, Ordering::Release);
    }

    /// Points published entry `index` at another data slot / sector set in one atomic store.
    pub fn switch_placement(&self, buffer: usize, index: usize, entry: &Entry) {
        // SAFETY: 4-byte aligned word inside the header (entry_offset is 8-aligned, +16);
        // accessed atomically; engine lock held.
        let word = unsafe {
            &*(self
                .base(buffer)
                .add(entry_offset(index) + ENTRY_PLACEMENT_OFFSET)
                as *const AtomicU32)
        };
        word.store(entry.placement_word(), Ordering::Release);
    }

    /// Copies one data block out (a read hit in RAM). Engine lock held.
    pub fn copy_block(&self, buffer: usize, data_slot: usize, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_SIZE_BYTES);
        // SAFETY: the data slot belongs to a published entry; writers only fill free slots.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base(buffer).add(data_block_offset(data_slot)),
                out.as_mut_ptr(),
                BLOCK_SIZE_BYTES,
            )
        };
    }

    /// Computes the data CRCs of `header`'s entries from the image.
    fn finalise_crcs(&self, buffer: usize, header: &mut SegmentHeader) {
        let image = self.image(buffer);
        for entry in header.entries.iter_mut() {
            if entry.kind == logfmt::EntryKind::Data {
                let off = data_block_offset(entry.data_slot as usize);
                entry.data_crc = block_crc(&image[off..off + BLOCK_SIZE_BYTES]);
            }
        }
    }

    /// Seals a buffer for writing: fills in the data CRCs, then encodes the final header (with
    /// its checksum) over the image's header block. Called by the log writer, once per segment.
    pub fn finalise(&self, buffer: usize, header: &mut SegmentHeader) {
        self.finalise_crcs(buffer, header);
        let mut bytes = vec![0u8; logfmt::SEGMENT_HEADER_SIZE_BYTES];
        header.encode_into(&mut bytes);
        // SAFETY: the buffer is sealed: the engine no longer writes it, readers never read the
        // header block, and the leg writers get the image only after this returns.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base(buffer), bytes.len()) };
    }

    /// The segment is on every leg (and so is every lower id): the buffer may be reused.
    pub fn release(&self, buffer: usize) {
        self.owner_word(buffer).store(0, Ordering::Release);
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
