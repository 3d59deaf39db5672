//! Block devices as the engine sees them: positional reads and writes, a cache flush, and (for
//! the backing device) zeroing a range. Real devices are files or block devices opened with
//! O_DIRECT; tests substitute simulated devices that tear and drop writes.
//!
//! A path is looked up once (`open_node`): the checks, the exclusive hold and the engine's own
//! descriptor all refer to the inode that lookup found (`FileDevice::reopen` goes through
//! `/proc/self/fd`, not the path), so a path swapped between a check and the start cannot make
//! the daemon format or write a device it never checked.
//!
//! Plain positional I/O (pread/pwrite) was chosen over io_uring by measurement: the log writer
//! issues one 512 KiB write per leg at a time from a thread of its own, which already reaches
//! the device's sequential limit (see `wbbench engine`), and the simulated devices of the crash
//! tests need the same synchronous interface. For sync writers (a FLUSH after each 4 KiB write)
//! io_uring was tried too, in the suite's VM, same boot, interleaved: both legs' write + flush
//! submitted together by the FLUSH's thread, and a sync writer's early segment sent as FUA
//! writes on both legs with no leg thread woken — no gain beyond the noise (mirrored, six
//! rounds: 453–494 fsync'd writes/s with the latter, 468–490 with these blocking calls), so the
//! blocking calls stayed.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use writeback::AlignedBuf;

pub trait Device: Send + Sync {
    /// A name for error messages and status (the path, for real devices).
    fn name(&self) -> &str;
    fn size_bytes(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (the device's volatile cache is flushed).
    fn flush(&self) -> io::Result<()>;
    /// Writes `bufs` back to back from `offset` (one I/O where the device can).
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs {
            self.write_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }
    /// Makes `len` bytes from `offset` read as zeroes. `discard` says the caller only needs the
    /// space released; either way reads of the range must return zeroes afterwards.
    fn zero_range(&self, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        let _ = discard;
        write_zeroes(self, offset, len)
    }
}

/// Zeroes a range by writing zero-filled blocks (where the device cannot zero it by itself).
fn write_zeroes<D: Device + ?Sized>(device: &D, offset: u64, len: u64) -> io::Result<()> {
    let chunk = AlignedBuf::new(1 << 20);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        device.write_at(&chunk[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Which device a descriptor refers to: a block device by its device number, a file by its
/// filesystem and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceNode {
    Block { rdev: u64 },
    File { dev: u64, ino: u64 },
}

impl DeviceNode {
    /// `None` for anything but a block device or a regular file.
    pub fn of(meta: &Metadata) -> Option<DeviceNode> {
        if meta.file_type().is_block_device() {
            Some(DeviceNode::Block { rdev: meta.rdev() })
        } else if meta.is_file() {
            Some(DeviceNode::File {
                dev: meta.dev(),
                ino: meta.ino(),
            })
        } else {
            None
        }
    }

    pub fn of_file(file: &File) -> io::Result<DeviceNode> {
        DeviceNode::of(&file.metadata()?).ok_or_else(not_a_device)
    }
}

fn not_a_device() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "not a regular file or block device",
    )
}

/// Looks `path` up once and opens it read-only: the descriptor every later check and open goes
/// through. `exclusive` claims a block device (O_EXCL: fails with EBUSY while it is mounted or
/// held by anyone else) for as long as the file stays open. Never blocks on a FIFO.
pub fn open_node(path: &Path, exclusive: bool) -> io::Result<(File, DeviceNode)> {
    let mut flags = libc::O_NONBLOCK;
    if exclusive {
        // Without O_CREAT, Linux gives O_EXCL a meaning for block devices only.
        flags |= libc::O_EXCL;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    let node = DeviceNode::of_file(&file)?;
    Ok((file, node))
}

/// The same inode as `file`, opened anew with `flags` (through `/proc/self/fd`; where /proc is
/// missing, through `path`, checked to still be the same device).
fn reopen_same(file: &File, path: &Path, options: &OpenOptions) -> io::Result<File> {
    let expected = DeviceNode::of_file(file)?;
    let via_proc = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let reopened = match options.open(&via_proc) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => options.open(path)?,
        other => other?,
    };
    if DeviceNode::of_file(&reopened)? != expected {
        return Err(io::Error::other(format!(
            "{} changed while it was being opened (it is now another device)",
            path.display()
        )));
    }
    Ok(reopened)
}

/// A file or block device opened for direct I/O.
pub struct FileDevice {
    file: File,
    path: PathBuf,
    name: String,
    size_bytes: u64,
    is_block_device: bool,
}

impl FileDevice {
    /// Opens `path` read-write with O_DIRECT (falling back to buffered I/O plus fdatasync where
    /// the filesystem refuses O_DIRECT, e.g. tmpfs in tests).
    pub fn open(path: &Path) -> io::Result<FileDevice> {
        Self::open_with(path, true)
    }

    /// Opens read-only, for inspection (`wbctl check`): nothing can be written.
    pub fn open_read_only(path: &Path) -> io::Result<FileDevice> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, writable: bool) -> io::Result<FileDevice> {
        let (file, _) = open_node(path, false)?;
        Self::reopen(&file, path, writable)
    }

    /// Opens the device behind `file` (from `open_node`) for I/O, named `path`: the very inode
    /// `file` refers to, whatever `path` points to now.
    pub fn reopen(file: &File, path: &Path, writable: bool) -> io::Result<FileDevice> {
        let mut options = OpenOptions::new();
        options.read(true).write(writable);
        let file = match reopen_same(file, path, options.clone().custom_flags(libc::O_DIRECT)) {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => reopen_same(file, path, &options)?,
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size_bytes = if is_block_device {
            block_device_size(&file)?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(not_a_device());
        };
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            name: path.display().to_string(),
            size_bytes,
            is_block_device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn node(&self) -> io::Result<DeviceNode> {
        DeviceNode::of_file(&self.file)
    }

    /// An exclusive read-only claim of this very device (see `open_node`): `EBUSY` while it is
    /// mounted or held by someone else. Regular files have no such claim; they always succeed.
    pub fn claim_exclusive(&self) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_NONBLOCK);
        reopen_same(&self.file, &self.path, &options)
    }

    /// The logical block size of a block device (512 for files, or where it cannot be read).
    pub fn logical_block_size(&self) -> u32 {
        if !self.is_block_device {
            return 512;
        }
        let mut size: libc::c_int = 0;
        // BLKSSZGET = _IO(0x12, 104)
        const BLKSSZGET: libc::c_ulong = 0x1268;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live c_int.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                BLKSSZGET as _,
                &mut size as *mut libc::c_int,
            )
        };
        if rc == 0 && (size == 512 || size == 4096) {
            size as u32
        } else {
            512
        }
    }

    /// A stable identity for this device, recorded in the superblock at create so that a cache
    /// is never replayed onto another device: the device's own serial / WWID / dm UUID where the
    /// kernel exposes one, otherwise its device number; for a file, its device and inode.
    pub fn identity(&self) -> String {
        let meta = match self.file.metadata() {
            Ok(meta) => meta,
            Err(_) => return format!("path:{}", self.name),
        };
        if !self.is_block_device {
            return format!("file:{}:{}", meta.dev(), meta.ino());
        }
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let sys = format!("/sys/dev/block/{major}:{minor}");
        for attr in ["wwid", "serial", "device/wwid", "device/serial", "dm/uuid"] {
            if let Ok(value) = std::fs::read_to_string(format!("{sys}/{attr}")) {
                let value = value.trim();
                if !value.is_empty() {
                    return format!("{attr}:{value}");
                }
            }
        }
        format!("blockdev:{major}:{minor}")
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl Device for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // SAFETY: every iovec points into a live slice of `bufs` for the duration of the call,
        // and pwritev only reads from them.
        let n = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // A short write: finish buffer by buffer from where it stopped.
        let mut done = n as usize;
        let mut at = 0usize;
        for buf in bufs {
            let end = at + buf.len();
            if done < end {
                let skip = done.saturating_sub(at);
                self.file
                    .write_all_at(&buf[skip..], offset + (at + skip) as u64)?;
                done = end;
            }
            at = end;
        }
        debug_assert_eq!(done.max(at), total);
        Ok(())
    }
    fn zero_range(&self, offset: u64, len: u64, discard: bool) -> io::Result<()> {
        // Punching a hole (discard) or zeroing a range both guarantee zeroes on read, on files
        // and, since Linux 4.9, on block devices; where unsupported, write the zeroes.
        let mode = if discard {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by self.file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
                write_zeroes(self, offset, len)
            }
            _ => Err(err),
        }
    }
}
