//! Files only root may read: the run folder's RAM buffer (live user data), state file, log and
//! socket. Opened without following symbolic links, created exclusively with mode 0600, and
//! refused when they are not root's own 0600 files (CONTRACT §6).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Mode of the run folder: root alone may list, enter or change it.
pub const RUN_DIR_MODE: u32 = 0o700;
/// Mode of every file in the run folder, the control socket included.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// How `open_private` opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Write only (a temporary file).
    Write,
    ReadWrite,
    Append,
}

/// Opens a file of the run folder: never through a symbolic link (O_NOFOLLOW), never blocking
/// on a planted FIFO. With `create`, a missing file is created exclusively (O_EXCL) with mode
/// 0600. A file found in place must be a regular file with one link, owned by this process's
/// user (root, for the daemon) and mode 0600; anything else is refused and left as it is. The
/// errors say why, without the path (callers add it).
pub fn open_private(path: &Path, access: Access, create: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    match access {
        Access::Read => options.read(true),
        Access::Write => options.write(true),
        Access::ReadWrite => options.read(true).write(true),
        Access::Append => options.append(true),
    };
    options
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
    if create {
        match options.clone().create_new(true).open(path) {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(explain_open_error(e)),
        }
    }
    let file = options.open(path).map_err(explain_open_error)?;
    check_private(&file)?;
    Ok(file)
}

fn explain_open_error(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            "is a symbolic link; refusing to follow it (files of the run folder are never links)",
        ),
        _ => e,
    }
}

/// The checks of `open_private` on a file found in place.
pub fn check_private(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let problem = if !meta.is_file() {
        Some("is not a regular file".to_string())
    } else if meta.uid() != euid {
        Some(format!(
            "is owned by uid {}; it must belong to uid {euid} (root)",
            meta.uid()
        ))
    } else if meta.mode() & 0o7777 != PRIVATE_FILE_MODE {
        Some(format!(
            "has mode {:o}, not {PRIVATE_FILE_MODE:o}",
            meta.mode() & 0o7777
        ))
    } else if meta.nlink() != 1 {
        Some(format!("has {} hard links, not one", meta.nlink()))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{p}; refusing to use it (nothing was changed). If you trust it: chown root, \
                 chmod 600; else remove it"
            ),
        )),
    }
}
