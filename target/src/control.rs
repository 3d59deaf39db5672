//! The control plane's vocabulary: where a device's files live under `/run/writeboost`, the state
//! file a daemon leaves for its successor (`wbctl recover`), and the JSON-lines protocol spoken
//! over each device's Unix socket (`wbctl status / set / drain / delete`).
//!
//! Protocol: the client connects, writes one `Request` as a JSON line, and reads `Reply` lines
//! until a final one (`Status`, `Done` or `Error`); a drain sends `Progress` lines before its
//! final reply. One request per connection, so a slow drain never blocks a status query.
//!
//! Trust: the run folder holds live user data (the RAM buffer) and what a successor believes
//! (the state file), so only root may reach it. It is created 0700 and refused when it is not
//! root's or others may write to it; its files are opened without following symbolic links,
//! created exclusively with mode 0600, and refused when they are not root's own 0600 files; the
//! control socket is 0600 and its peers must be uid 0 (SO_PEERCRED).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::private_file::{
    check_private, open_private, Access, PRIVATE_FILE_MODE, RUN_DIR_MODE,
};

/// Default folder of the per-device files (tmpfs: it must vanish with the host, like the RAM it
/// describes, and outlive a daemon).
pub const DEFAULT_RUN_DIR: &str = "/run/writeboost";
/// Environment variable that moves the run folder (tests; several hosts in one namespace).
pub const RUN_DIR_ENV: &str = "WRITEBOOST_RUN_DIR";
/// Device names: what fits in a file name and a systemd instance name, nothing to escape.
pub const MAX_NAME_BYTES: usize = 64;
/// How long a client waits for a daemon that accepted the connection but does not answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request line a daemon reads (the largest real one, a `set` of every knob, is well
/// under 1 KiB); a longer one is refused, so a client cannot make the daemon buffer without end.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// A connection's whole request line must arrive within this (not per read: a client that
/// trickles a byte at a time is cut off too).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Largest state file read (a real one is about 1 KiB).
const MAX_STATE_FILE_BYTES: u64 = 1 << 20;

/// The per-device files in the run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// `$WRITEBOOST_RUN_DIR`, else `/run/writeboost`.
    pub fn from_env() -> RunDir {
        let path = std::env::var_os(RUN_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from);
        RunDir { path }
    }

    pub fn new(path: impl Into<PathBuf>) -> RunDir {
        RunDir { path: path.into() }
    }

    /// The state file: parameters for `wbctl recover` and `wbctl list`.
    pub fn state(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.json"))
    }
    pub fn socket(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.sock"))
    }
    /// The RAM buffer file the engine maps (CONTRACT §2: outlives a killed daemon).
    pub fn buffer(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.buf"))
    }
    /// Where a detached daemon's log goes.
    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.log"))
    }
    /// Locked (an OFD write lock) by the daemon of `name` for its whole life: the proof that it
    /// runs, which only root can give (the file is root's, 0600, in a root-only folder).
    pub fn lock(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.lock"))
    }

    /// Creates the folder (mode 0700, with any missing parent) unless it exists, then checks it.
    pub fn prepare(&self) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(RUN_DIR_MODE)
            .create(&self.path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{}: creating: {e}", self.path.display()))
            })?;
        self.check()
    }

    /// Refuses a run folder whose files others could have planted or replaced: it must be a
    /// directory (not a symbolic link), owned by root, and writable by root alone.
    pub fn check(&self) -> io::Result<()> {
        let meta = std::fs::symlink_metadata(&self.path).map_err(|e| {
            io::Error::new(e.kind(), format!("run folder {}: {e}", self.path.display()))
        })?;
        let problem = if meta.file_type().is_symlink() {
            Some("is a symbolic link".to_string())
        } else if !meta.is_dir() {
            Some("is not a directory".to_string())
        } else if meta.uid() != 0 {
            Some(format!("is owned by uid {}, not by root", meta.uid()))
        } else if meta.mode() & 0o022 != 0 {
            Some(format!(
                "is writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ))
        } else {
            None
        };
        match problem {
            None => Ok(()),
            Some(p) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "run folder {} {p}; refusing to trust the files in it (it must be a \
                     directory owned by root that only root may write: chown root, chmod 700)",
                    self.path.display()
                ),
            )),
        }
    }

    /// `check`, when the folder exists (a missing one holds nothing to trust).
    pub fn check_if_present(&self) -> io::Result<()> {
        match self.check() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// The state file of `name`, checked to describe `name` and a ublk device.
    pub fn load_state(&self, name: &str) -> io::Result<DeviceState> {
        let path = self.state(name);
        let state = DeviceState::load(&path)?;
        let bad = |reason: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {reason}; refusing to use it", path.display()),
            )
        };
        if state.name != name {
            return Err(bad(format!(
                "describes device '{}', not '{name}'",
                state.name
            )));
        }
        if state.device != format!("/dev/ublkb{}", state.dev_id) || state.dev_id > i32::MAX as u32 {
            return Err(bad(format!(
                "device {} does not match ublk device id {}",
                state.device, state.dev_id
            )));
        }
        let paths = || std::iter::once(&state.backing).chain(&state.caches);
        if !(1..=2).contains(&state.caches.len()) || paths().any(|p| !p.is_absolute()) {
            return Err(bad(
                "device paths are not one backing and one or two cache devices \
                 given by absolute paths"
                    .into(),
            ));
        }
        Ok(state)
    }

    /// The log of a detached daemon, for appending (created 0600 when missing).
    pub fn open_log(&self, name: &str) -> io::Result<File> {
        let path = self.log(name);
        open_private(&path, Access::Append, true)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Takes the lock that says the daemon of `name` runs; held until the returned file is
    /// closed (the process exits). Fails with `AddrInUse` when another daemon holds it.
    pub fn lock_name(&self, name: &str) -> io::Result<File> {
        let path = self.lock(name);
        let shown = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = open_private(&path, Access::ReadWrite, true).map_err(shown)?;
        if ofd_lock(&file, libc::F_OFD_SETLK).map_err(shown)? {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "name in use: another daemon of {name} holds {}",
                    path.display()
                ),
            ));
        }
        Ok(file)
    }

    /// Whether a daemon of `name` holds its lock (see `lock_name`); does not take it.
    pub fn name_locked(&self, name: &str) -> bool {
        open_private(&self.lock(name), Access::Read, false)
            .and_then(|f| ofd_lock(&f, libc::F_OFD_GETLK))
            .unwrap_or(false)
    }

    /// Names with a state file, sorted.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    if validate_name(stem).is_ok() {
                        names.push(stem.to_string());
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// Checks a device name: 1..=64 bytes of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "device name '{name}' must be 1 to {MAX_NAME_BYTES} characters"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "device name '{name}' must not start with '.' or '-'"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "device name '{name}' contains '{c}'; use letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// What a running daemon records about itself, so a successor can take over after a kill -9.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub name: String,
    pub backing: PathBuf,
    pub caches: Vec<PathBuf>,
    /// The ublk device id: `/dev/ublkb<dev_id>`.
    pub dev_id: u32,
    pub device: String,
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
    /// Writeback knobs in force (name → value text, as `wbctl set` takes them).
    pub policy: BTreeMap<String, String>,
    pub pid: u32,
    pub started_unix_secs: u64,
    /// The program run on every mode change and leg event (`daemon::events`).
    #[serde(default)]
    pub event_hook: Option<PathBuf>,
    /// The configuration file SIGHUP re-reads (`daemon::config`).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Set by a daemon that stopped with the device in use and left it to the kernel
    /// (`daemon::hand_over`): its absence is a stop, not a crash.
    #[serde(default)]
    pub handed_over: bool,
    /// The engine's counters as that daemon left them (set with `handed_over`): the next daemon
    /// goes on from them, so that they only grow across a stop and start the engine knew
    /// about. After a crash there is nothing exact to go on from: they start again from zero.
    #[serde(default)]
    pub counters: Option<Counters>,
}

/// The engine's cumulative counters (`status`, `wbctl metrics`), carried from a daemon that
/// handed its device over to the next one.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub writes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    pub flushes: u64,
    pub discards: u64,
    pub stall_ns: u64,
    pub written_back_bytes: u64,
    pub written_back_segments: u64,
    pub backing_write_ios: u64,
    pub backing_errors: u64,
    pub partial_merges: u64,
    pub passthrough_writes: u64,
    pub writeback_errors: u64,
}

impl DeviceState {
    /// Reads a state file (a private file of the run folder: see `open_private`). Callers that
    /// act on it use `RunDir::load_state`, which also checks what it says.
    pub fn load(path: &Path) -> io::Result<DeviceState> {
        let shown = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = open_private(path, Access::Read, false).map_err(shown)?;
        let mut text = String::new();
        file.take(MAX_STATE_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(shown)?;
        serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a writeboost state file: {e}", path.display()),
            )
        })
    }

    /// Writes the file atomically (a reader never sees half of it): a fresh 0600 temporary file
    /// (never one found in place, which may be a link), renamed over the old one.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        // Two threads of one daemon (`set` and `replace`) must not share the temporary file.
        static STORING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = STORING.lock().unwrap_or_else(|p| p.into_inner());
        let tmp = path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        // A leftover of a crash (unlink removes a link itself, never its target).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        {
            let mut f = open_private(&tmp, Access::Write, true)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", tmp.display())))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }
}

/// An OFD write lock on all of `file`: `F_OFD_SETLK` takes it, `F_OFD_GETLK` only looks.
/// Returns whether another open file holds it.
fn ofd_lock(file: &File, command: libc::c_int) -> io::Result<bool> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the fd is open for the call; fcntl reads and (GETLK) writes the live `lock`.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &mut lock as *mut libc::flock) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) if command == libc::F_OFD_SETLK => Ok(true),
            _ => Err(e),
        };
    }
    Ok(command == libc::F_OFD_GETLK && lock.l_type != libc::F_UNLCK as libc::c_short)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Sets knobs, all or none.
    Set {
        knobs: Vec<(String, String)>,
    },
    /// Writes everything back; `Progress` replies until clean.
    Drain,
    /// Stops the device (optionally draining first), seals and flushes the log, removes the
    /// device. `force` deletes a device that is still open exclusively (mounted).
    Delete {
        drain: bool,
        force: bool,
    },
    /// Replaces cache leg `old` (a path as given at create) by the device `new`, online: the
    /// cache is written back and runs in passthrough meanwhile (CONTRACT §5).
    Replace {
        old: PathBuf,
        new: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status { status: Box<DeviceStatus> },
    Progress(Progress),
    Done { message: String },
    Error { error: String },
}

impl Reply {
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Progress(_))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub segments_left: u64,
    pub segments_done: u64,
    pub dirty_bytes: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegReport {
    pub path: String,
    /// "ok" or "failed".
    pub health: String,
    pub errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    /// Blocks that failed their CRC or read on this leg and were rewritten from the other.
    pub repairs: u64,
}

/// `DeviceStatus::cache_lost`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheLostReport {
    /// The backing device holds every segment up to this id (a consistent older state).
    pub backing_holds_id: u64,
    /// Log segments `lost_from_id..=lost_through_id` are gone and never replayed.
    pub lost_from_id: u64,
    pub lost_through_id: u64,
    /// Acknowledged bytes the loss took (known only to the daemon that saw it).
    pub lost_dirty_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentReport {
    pub current_id: u64,
    pub last_flushed_id: u64,
    pub last_written_back_id: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadReport {
    pub requests: u64,
    /// 4 KiB blocks served from the cache (RAM or a leg) …
    pub hits: u64,
    /// … and from the backing device.
    pub misses: u64,
}

/// `wbctl status --json`: one object per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub device: String,
    pub dev_id: u32,
    pub pid: u32,
    /// "mirrored" (or "single" for a one-leg set), "degraded" (a leg failed; writing back),
    /// "passthrough" (requests go straight to the backing device) or "failed" (requests fail:
    /// `failure` says why).
    pub mode: String,
    /// Why requests fail now: a fault that can be recorded nowhere (`EngineStatus::failure`).
    pub failure: Option<String>,
    /// Set when every cache leg was lost: the last segment id the backing device holds.
    pub cache_lost_at: Option<u64>,
    /// Set when every cache leg was lost (now or recorded by an earlier run): what is gone and
    /// what the backing device holds.
    #[serde(default)]
    pub cache_lost: Option<CacheLostReport>,
    /// The fault record: its sequence (0: nothing ever failed) and the host's copy.
    #[serde(default)]
    pub fault_record_sequence: u64,
    #[serde(default)]
    pub fault_file: Option<String>,
    pub backing: String,
    pub legs: Vec<LegReport>,
    pub device_size_bytes: u64,
    pub logical_block_size: u32,
    pub capacity_bytes: u64,
    /// Space of the slots holding live log segments (freed a slot at a time by writeback).
    pub used_bytes: u64,
    /// What the live segments occupy of it: headers and data blocks (format v2 packs small
    /// FLUSHed segments into a slot).
    #[serde(default)]
    pub log_bytes: u64,
    pub dirty_bytes: u64,
    /// `dirty_bytes` as a percentage of `capacity_bytes`.
    #[serde(default)]
    pub dirty_percent: f64,
    /// Writeback lag: how long the oldest data not yet written back has been in the cache, in
    /// seconds (0 when nothing waits). Data found in the log at start-up counts from the
    /// daemon's start, so after a restart this is a lower bound.
    #[serde(default)]
    pub oldest_dirty_age_secs: u64,
    pub segments: SegmentReport,
    pub epoch_id: u64,
    pub reads: ReadReport,
    /// Write requests acknowledged.
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub written_back_bytes: u64,
    pub backing_write_ios: u64,
    /// Backing device I/O errors (writeback retries them).
    pub backing_errors: u64,
    /// Writes sent straight to the backing device in passthrough mode.
    pub passthrough_writes: u64,
    /// Over the last sampling second.
    pub write_bytes_per_sec: u64,
    pub written_back_bytes_per_sec: u64,
    /// Time writers spent waiting for cache space (back-pressure).
    pub stall_ms: u64,
    /// How much `stall_ms` grew over the last minute (sampled every second; a wait counts when
    /// it ends).
    #[serde(default)]
    pub stall_ms_last_minute: u64,
    /// Writers waited for cache space within the last minute (`stall_ms_last_minute` > 0).
    #[serde(default)]
    pub stalled_recently: bool,
    pub map_bytes: u64,
    /// All in-memory metadata of the cache (map, partial masks, zeroed ranges).
    pub metadata_bytes: u64,
    pub queues: u16,
    pub depth: u16,
    pub uptime_secs: u64,
    /// The writeback knobs, typed: numbers as JSON numbers, booleans as booleans, the pressure
    /// curve as a string (`daemon::typed_knob_map`).
    pub policy: BTreeMap<String, serde_json::Value>,
}

/// Writes one JSON line.
pub fn send_line<T: Serialize>(stream: &mut impl Write, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

/// Reads one JSON line; `Ok(None)` at end of stream.
pub fn read_line<T: for<'de> Deserialize<'de>>(reader: &mut impl BufRead) -> io::Result<Option<T>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    serde_json::from_str(line.trim_end())
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

/// Reads the one request of a connection: a line of at most `MAX_REQUEST_BYTES`, all of it
/// within `deadline`. `Ok(None)`: the client closed the connection without sending anything.
pub fn read_request(stream: &mut UnixStream, deadline: Duration) -> io::Result<Option<Request>> {
    let until = Instant::now() + deadline;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow(deadline));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(too_slow(deadline))
            }
            Err(e) => return Err(e),
        };
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        line.extend_from_slice(&chunk[..end.unwrap_or(n)]);
        if line.len() > MAX_REQUEST_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            ));
        }
        if n == 0 && line.is_empty() {
            return Ok(None);
        }
        if n == 0 || end.is_some() {
            break;
        }
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

fn too_slow(deadline: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no complete request line within {} s",
            deadline.as_secs_f64()
        ),
    )
}

/// Binds a control socket at `path` (which must not exist) and makes it 0600. The run folder
/// being root's alone, nobody else can reach it before the mode is set.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(listener)
}

/// The uid of the process at the other end of a control connection (SO_PEERCRED: what the
/// kernel recorded at connect, not anything the client says).
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    // SAFETY: an all-zero ucred is a valid value of this plain C struct.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket; getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Only root may control a device (delete it, replace a leg by any disk, read its status):
/// the refusal to send to anyone else, or `None` for root.
pub fn refuse_peer(stream: &UnixStream) -> Option<String> {
    match peer_uid(stream) {
        Ok(0) => None,
        Ok(uid) => Some(format!(
            "permission denied: only root may control writeboost devices (this connection is \
             from uid {uid})"
        )),
        Err(e) => Some(format!(
            "permission denied: cannot tell who is connecting ({e})"
        )),
    }
}

/// Serves a daemon's control socket until it fails: turns away every peer but root (with an
/// error reply saying so), answers "busy" beyond `max_connections` at once, reads each request
/// (`read_request`: bounded, with a deadline) on a thread of its own and hands it to `serve`
/// with the connection, for the replies.
pub fn serve_socket<F>(listener: UnixListener, max_connections: usize, serve: F)
where
    F: Fn(Request, UnixStream) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                continue;
            }
        };
        // A client that does not read its replies must not hold a daemon thread for ever.
        let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
        if let Some(refusal) = refuse_peer(&stream) {
            log::warn!("control socket: {refusal}");
            let _ = send_line(&mut stream, &Reply::Error { error: refusal });
            continue;
        }
        if open.fetch_add(1, Ordering::SeqCst) >= max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            let error = "busy: too many control connections".to_string();
            let _ = send_line(&mut stream, &Reply::Error { error });
            continue;
        }
        let (serve, done) = (serve.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("wb-ctl-conn".into())
            .spawn(move || {
                serve_connection(stream, serve.as_ref());
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            log::error!("control socket: cannot spawn a connection thread: {e}");
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve_connection(mut stream: UnixStream, serve: &impl Fn(Request, UnixStream)) {
    match read_request(&mut stream, REQUEST_DEADLINE) {
        Ok(Some(request)) => serve(request, stream),
        Ok(None) => {}
        Err(e) => {
            let error = format!("bad request: {e}");
            let _ = send_line(&mut stream, &Reply::Error { error });
        }
    }
}

/// Sends `request` to the daemon behind `socket`, hands every `Progress` to `on_progress`, and
/// returns the final reply. `timeout` bounds the wait between two replies (`None`: forever,
/// for drains of a slow backing device that report progress anyway).
pub fn call(
    socket: &Path,
    request: &Request,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(&Progress),
) -> io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(timeout)?;
    // A daemon that refuses the connection (a peer that is not root) answers at once and
    // closes: its answer says more than the broken pipe the request then meets.
    let sent = send_line(&mut stream, request);
    let mut reader = BufReader::new(stream);
    if let Err(e) = sent {
        return match read_line::<Reply>(&mut reader) {
            Ok(Some(reply @ Reply::Error { .. })) => Ok(reply),
            _ => Err(e),
        };
    }
    loop {
        match read_line::<Reply>(&mut reader)? {
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection without an answer",
                ))
            }
            Some(Reply::Progress(p)) => on_progress(&p),
            Some(reply) => return Ok(reply),
        }
    }
}

/// Whether a daemon answers on `socket` (connect succeeds).
pub fn daemon_answers(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("db0").is_ok());
        assert!(validate_name("zvol_tank.01-a").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name(".x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn protocol_round_trips() {
        let requests = [
            Request::Status,
            Request::Set {
                knobs: vec![("low_watermark".into(), "20%".into())],
            },
            Request::Drain,
            Request::Delete {
                drain: true,
                force: false,
            },
            Request::Replace {
                old: "/dev/vdb".into(),
                new: "/dev/vdd".into(),
            },
        ];
        for r in &requests {
            let mut buf = Vec::new();
            send_line(&mut buf, r).unwrap();
            assert!(buf.ends_with(b"\n"));
            let back: Request = read_line(&mut &buf[..]).unwrap().unwrap();
            assert_eq!(&back, r);
        }
        let reply = Reply::Progress(Progress {
            segments_left: 3,
            segments_done: 1,
            dirty_bytes: 4096,
            elapsed_ms: 10,
        });
        let mut buf = Vec::new();
        send_line(&mut buf, &reply).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.contains("\"reply\":\"progress\""), "{text}");
        let back: Reply = read_line(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(back, reply);
        assert!(!back.is_final());
    }

    #[test]
    fn a_request_line_is_bounded() {
        let (mut server, mut client) = UnixStream::pair().unwrap();
        client.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let request = read_request(&mut server, REQUEST_DEADLINE).unwrap();
        assert_eq!(request, Some(Request::Status));
        let (mut server, client) = UnixStream::pair().unwrap();
        drop(client);
        assert_eq!(read_request(&mut server, REQUEST_DEADLINE).unwrap(), None);
        // A line without end: refused once it passes the bound, not read to the end.
        let (mut server, mut client) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = [b'x'; 4096];
            while client.write_all(&chunk).is_ok() {}
        });
        let e = read_request(&mut server, REQUEST_DEADLINE).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("longer than 65536 bytes"), "{e}");
        drop(server);
        writer.join().unwrap();
    }

    /// A client that trickles a byte at a time never trips a per-read timeout; the deadline is
    /// for the whole line. (The trickle takes seconds longer than the deadline to send its
    /// newline, so the outcome does not depend on timing.)
    #[test]
    fn a_request_line_must_arrive_within_the_deadline() {
        let (mut server, mut client) = UnixStream::pair().unwrap();
        let trickle = std::thread::spawn(move || {
            for _ in 0..400 {
                if client.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = client.write_all(b"{\"cmd\":\"status\"}\n");
        });
        let e = read_request(&mut server, Duration::from_millis(300)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("no complete request line"), "{e}");
        drop(server);
        trickle.join().unwrap();
    }

    #[test]
    fn private_files_are_created_exclusively_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = open_private(&path, Access::ReadWrite, true).unwrap();
        assert_eq!(f.metadata().unwrap().mode() & 0o7777, PRIVATE_FILE_MODE);
        drop(f);
        // Found in place and ours: opened again.
        open_private(&path, Access::Read, false).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        for create in [false, true] {
            let e = open_private(&link, Access::ReadWrite, create).unwrap_err();
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = open_private(&path, Access::ReadWrite, true).unwrap_err();
        assert!(e.to_string().contains("has mode 640, not 600"), "{e}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_private(&fifo, Access::Read, false).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn state_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        let state = DeviceState {
            name: "d0".into(),
            backing: "/dev/vdc".into(),
            caches: vec!["/dev/vda".into(), "/dev/vdb".into()],
            dev_id: 3,
            device: "/dev/ublkb3".into(),
            queues: 2,
            depth: 128,
            io_buf_bytes: 524288,
            policy: [("low_watermark".to_string(), "0.1".to_string())].into(),
            pid: 42,
            started_unix_secs: 1,
            event_hook: Some("/usr/local/bin/hook".into()),
            config: Some("/etc/writeboost/d0.toml".into()),
            handed_over: true,
            counters: Some(Counters {
                writes: 7,
                stall_ns: u64::MAX,
                ..Counters::default()
            }),
        };
        state.store(&run.state("d0")).unwrap();
        assert_eq!(DeviceState::load(&run.state("d0")).unwrap(), state);
        assert_eq!(run.load_state("d0").unwrap(), state);
        assert_eq!(run.names().unwrap(), vec!["d0".to_string()]);
        // A state file is believed only about its own name and a consistent device.
        std::fs::copy(run.state("d0"), run.state("d1")).unwrap();
        let e = run.load_state("d1").unwrap_err();
        assert!(
            e.to_string().contains("describes device 'd0', not 'd1'"),
            "{e}"
        );
        let forged = DeviceState {
            dev_id: 4,
            ..state.clone()
        };
        forged.store(&run.state("d0")).unwrap();
        let e = run.load_state("d0").unwrap_err();
        assert!(e.to_string().contains("/dev/ublkb3 does not match"), "{e}");
    }
}
