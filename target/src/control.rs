//! The control plane's vocabulary: where a device's files live under `/run/writeboost`, the state
//! file a daemon leaves for its successor (`wbctl recover`), and the JSON-lines protocol spoken
//! over each device's Unix socket (`wbctl status / set / drain / delete`).
//!
//! Protocol: the client connects, writes one `Request` as a JSON line, and reads `Reply` lines
//! until a final one (`Status`, `Done` or `Error`); a drain sends `Progress` lines before its
//! final reply. One request per connection, so a slow drain never blocks a status query.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default folder of the per-device files (tmpfs: it must vanish with the host, like the RAM it
/// describes, and outlive a daemon).
pub const DEFAULT_RUN_DIR: &str = "/run/writeboost";
/// Environment variable that moves the run folder (tests; several hosts in one namespace).
pub const RUN_DIR_ENV: &str = "WRITEBOOST_RUN_DIR";
/// Device names: what fits in a file name and a systemd instance name, nothing to escape.
pub const MAX_NAME_BYTES: usize = 64;
/// How long a client waits for a daemon that accepted the connection but does not answer.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The RAM buffer file the engine maps (SPEC §2: outlives a killed daemon).
    pub fn buffer(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.buf"))
    }
    /// Where a detached daemon's log goes.
    pub fn log(&self, name: &str) -> PathBuf {
        self.path.join(format!("{name}.log"))
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
}

impl DeviceState {
    pub fn load(path: &Path) -> io::Result<DeviceState> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a writeboost state file: {e}", path.display()),
            )
        })
    }

    /// Writes the file atomically (a reader never sees half of it).
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }
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
    /// cache is written back and runs in passthrough meanwhile (SPEC §5).
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
    /// "passthrough" (requests go straight to the backing device) or "failed".
    pub mode: String,
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
    pub used_bytes: u64,
    pub dirty_bytes: u64,
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
    pub map_bytes: u64,
    /// All in-memory metadata of the cache (map, partial masks, zeroed ranges).
    pub metadata_bytes: u64,
    pub queues: u16,
    pub depth: u16,
    pub uptime_secs: u64,
    pub policy: BTreeMap<String, String>,
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
    send_line(&mut stream, request)?;
    let mut reader = BufReader::new(stream);
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

/// Whether process `pid` exists.
pub fn process_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for the process; it touches no memory.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
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
        };
        state.store(&run.state("d0")).unwrap();
        assert_eq!(DeviceState::load(&run.state("d0")).unwrap(), state);
        assert_eq!(run.names().unwrap(), vec!["d0".to_string()]);
    }
}
