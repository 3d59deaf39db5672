//! Preflight: every check of `wbctl create` and `wbctl recover` (CONTRACT §7), read-only and
//! cheapest first — the options, the name, the paths, their sizes, their superblocks, the RAM
//! buffer file, and only then root and `/dev/ublk-control`. Nothing is written before all of
//! them pass. How a create starts (format, attach, recover) is decided by `decide_start`, a
//! pure function of what the devices hold (table-tested below).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use logfmt::buffer_file as bf;
use logfmt::{FormatError, Superblock, BLOCK_SIZE_BYTES, MIN_CACHE_SIZE_BYTES};
use writeback::Policy;

use crate::control::{self, validate_name, DeviceState, RunDir};
use crate::device::{self, AlignedBuf, Device, DeviceNode, FileDevice};
use crate::open::recover::backing_fingerprint;
use crate::private_file::{open_private, Access};
use crate::ublk;

use super::{
    apply_knobs, display_paths, format_unix_time, io_error, refused, CreateRequest, DaemonError,
    DaemonSpec, Result, Start,
};

/// What a leg's first 4 KiB say.
#[derive(Debug)]
enum LegContent {
    /// No writeboost superblock at all: free to format.
    Blank,
    Member(Superblock),
    Corrupt(FormatError),
}

fn read_leg(device: &FileDevice) -> Result<LegContent> {
    let mut buf = AlignedBuf::new(logfmt::SUPERBLOCK_SIZE_BYTES);
    if device.size_bytes() < logfmt::SUPERBLOCK_SIZE_BYTES as u64 {
        return Ok(LegContent::Blank);
    }
    device.read_at(&mut buf, 0).map_err(io_error(format!(
        "{}: reading the superblock",
        device.name()
    )))?;
    Ok(match Superblock::decode(&buf) {
        Ok(sb) => LegContent::Member(sb),
        Err(FormatError::BadMagic { .. }) => LegContent::Blank,
        Err(e) => LegContent::Corrupt(e),
    })
}

/// Opens `path` read-only for inspection (its one lookup: see `device::open_node`), with an
/// error that names it and says why.
fn inspect(path: &Path, role: &str) -> Result<FileDevice> {
    let (file, _) = device::open_node(path, false).map_err(open_refused(path, role))?;
    FileDevice::reopen(&file, path, false).map_err(open_refused(path, role))
}

/// Why `path` (a `role` device) could not be opened, in words.
fn open_refused(path: &Path, role: &str) -> impl FnOnce(io::Error) -> DaemonError {
    let (shown, role) = (path.display().to_string(), role.to_string());
    move |e| {
        let reason = match e.kind() {
            _ if e.raw_os_error() == Some(libc::EBUSY) => IN_USE.to_string(),
            io::ErrorKind::NotFound => "no such device or file".into(),
            io::ErrorKind::PermissionDenied => "permission denied (wbctl must run as root)".into(),
            io::ErrorKind::InvalidInput => "not a block device (or a regular file)".into(),
            _ => format!("cannot open: {e}"),
        };
        refused(shown, format!("{role}: {reason}"))
    }
}

/// The node of an inspected device (its descriptor cannot fail fstat short of a kernel bug).
fn node_of(device: &FileDevice) -> Result<DeviceNode> {
    device
        .node()
        .map_err(io_error(format!("{}: fstat", device.name())))
}

const IN_USE: &str = "in use (mounted, part of a device-mapper or RAID device, or held by \
                      another writeboost device)";

/// Fails if a block device is mounted or claimed by someone else (a filesystem, device mapper,
/// another writeboost daemon): an exclusive open of it fails with EBUSY.
fn check_not_in_use(device: &FileDevice, role: &str) -> Result<()> {
    if device
        .claim_exclusive()
        .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
    {
        return Err(refused(device.name(), format!("{role}: {IN_USE}")));
    }
    Ok(())
}

/// Opens `path` once, claiming it exclusively (see `device::open_node`), and checks it is the
/// device the checks saw: while held, nobody can mount it or claim it.
pub(super) fn hold_checked(path: &Path, role: &str, expected: Option<DeviceNode>) -> Result<File> {
    let (hold, node) = device::open_node(path, true).map_err(open_refused(path, role))?;
    if expected.is_some_and(|n| n != node) {
        return Err(refused(
            path.display().to_string(),
            "is no longer the device the checks looked at (the path changed since); nothing \
             was written, check the path and try again",
        ));
    }
    Ok(hold)
}

pub(super) fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

pub(super) fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The owners of the RAM buffer file at `path` (a private file of the run folder: see
/// `private_file::open_private`; a link or someone else's file is refused), read from its header
/// without mapping or locking it. `None`: no file, or not a buffer file.
fn read_buffer_owners(path: &Path) -> io::Result<Option<bf::Owners>> {
    let file = match open_private(path, Access::Read, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::with_capacity(bf::BUFFER_FILE_HEADER_BYTES);
    file.take(bf::BUFFER_FILE_HEADER_BYTES as u64)
        .read_to_end(&mut bytes)?;
    Ok(bf::peek_owners(&bytes))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn check_root(command: &str) -> Result<()> {
    if !is_root() {
        return Err(refused(
            command,
            "must run as root (it creates ublk devices and opens block devices for direct I/O)",
        ));
    }
    Ok(())
}

/// Whether the daemon of the device `state` describes is still running: it answers on its
/// socket, or holds its name lock (`RunDir::lock_name`; only root can hold that file). A pid or
/// a process name proves nothing: any user can run a process called `wbctl`.
pub fn daemon_running(state: &DeviceState, run_dir: &RunDir) -> bool {
    control::daemon_answers(&run_dir.socket(&state.name)) || run_dir.name_locked(&state.name)
}

/// The run folder, checked before anything in it is believed (see `RunDir::check`).
fn check_run_dir(run_dir: &RunDir) -> Result<()> {
    run_dir.check_if_present().map_err(DaemonError::Untrusted)
}

/// Whether `req.name` is free (`None`), or left by a dead daemon of these very devices (its
/// state: `wbctl create` then recovers it). Believes the run folder only once it is checked.
fn check_name(req: &CreateRequest) -> Result<Option<DeviceState>> {
    let run_dir = &req.run_dir;
    check_run_dir(run_dir)?;
    let state_path = run_dir.state(&req.name);
    if std::fs::symlink_metadata(&state_path).is_ok() {
        let state = run_dir
            .load_state(&req.name)
            .map_err(|e| refused(&req.name, e.to_string()))?;
        if daemon_running(&state, run_dir) {
            return Err(refused(
                &req.name,
                format!(
                    "name in use: it is running as {} (pid {}); pick another name, or `wbctl \
                     delete {}` first",
                    state.device, state.pid, req.name
                ),
            ));
        }
        let same_devices = same_file(&state.backing, &req.backing)
            && state.caches.len() == req.caches.len()
            && req
                .caches
                .iter()
                .all(|c| state.caches.iter().any(|s| same_file(s, c)));
        if !same_devices {
            return Err(refused(
                &req.name,
                format!(
                    "name in use: its daemon died and left {} (backing {}, cache {}); run `wbctl \
                     recover {}` to bring it back, or `wbctl delete {} --force` to remove it",
                    state.device,
                    state.backing.display(),
                    display_paths(&state.caches),
                    req.name,
                    req.name
                ),
            ));
        }
        return Ok(Some(state));
    }
    if control::daemon_answers(&run_dir.socket(&req.name)) || run_dir.name_locked(&req.name) {
        return Err(refused(
            &req.name,
            "name in use: a daemon of this name is running (it answers on its control socket \
             or holds its lock)",
        ));
    }
    Ok(None)
}

/// Every check of `wbctl create`, read-only, cheapest first. Returns the spec to run and how to
/// start.
pub fn check_create(req: &CreateRequest) -> Result<(DaemonSpec, Start)> {
    check_options(req)?;
    // The name: free, or left by a daemon of this very device that died (then: recover).
    let recover_from = check_name(req)?;
    let devices = Devices::inspect(req, recover_from.is_some())?;
    let found = devices.found(req)?;
    let mut decided = decide_start(req, &found, recover_from.is_some())?;
    check_buffer_file(req, decided.existing_uuid)?;
    if let Some(state) = &recover_from {
        if !matches!(decided.start, Start::Attach { .. }) {
            return Err(refused(
                req.caches[0].display().to_string(),
                format!(
                    "holds no cache set, yet the daemon of {} that died used it; refusing to \
                     guess. `wbctl check --cache` shows what it holds",
                    state.device
                ),
            ));
        }
        decided.start = Start::Recover {
            dev_id: state.dev_id,
            counters: state.counters.filter(|_| state.handed_over),
        };
    }
    check_root("wbctl create")?;
    ublk::check_control_device()?;
    Ok((devices.spec(req, &decided.leg_order), decided.start))
}

/// The options alone: name, cache count, queue shape, block size.
fn check_options(req: &CreateRequest) -> Result<()> {
    validate_name(&req.name).map_err(|r| refused("name", r))?;
    check_cache_count(req)?;
    if !(1..=ublk::MAX_QUEUES).contains(&req.queues) {
        return Err(refused(
            "--queues",
            format!("{} is not between 1 and {}", req.queues, ublk::MAX_QUEUES),
        ));
    }
    if !(1..=ublk::MAX_QUEUE_DEPTH).contains(&req.depth) {
        return Err(refused(
            "--depth",
            format!(
                "{} is not between 1 and {}",
                req.depth,
                ublk::MAX_QUEUE_DEPTH
            ),
        ));
    }
    if let Some(hook) = &req.event_hook {
        check_event_hook(hook)?;
    }
    if let Some(lbs) = req.logical_block_size.filter(|&l| l != 512 && l != 4096) {
        return Err(refused(
            "--logical-block-size",
            format!("{lbs} is not 512 or 4096"),
        ));
    }
    Ok(())
}

/// The event hook is a program the daemon can run: a regular file with an execute bit.
fn check_event_hook(hook: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(hook) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(refused(
            hook.display().to_string(),
            "event hook: not an executable file",
        )),
        Err(e) => Err(refused(
            hook.display().to_string(),
            format!("event hook: {e}"),
        )),
    }
}

/// One cache device, or two (a mirror); one only with `--single-leg`.
fn check_cache_count(req: &CreateRequest) -> Result<()> {
    match (req.caches.len(), req.single_leg) {
        (0, _) => Err(refused(
            "--cache",
            "a cache device is needed (two, for a mirror)",
        )),
        (1, false) => Err(refused(
            req.caches[0].display().to_string(),
            "one cache device is no mirror: losing it loses every write not yet written back. \
             Give a second --cache, or pass --single-leg to accept that",
        )),
        (2, true) => Err(refused(
            "--single-leg",
            "given together with two cache devices",
        )),
        (n, _) if n > 2 => Err(refused(
            "--cache",
            format!("{n} cache devices given; a cache set has one or two (a mirror)"),
        )),
        _ => Ok(()),
    }
}

/// The devices of a create, each looked up once: every later check reads through these
/// descriptors (see `device::open_node`), and the daemon starts on these nodes only.
struct Devices {
    backing: FileDevice,
    caches: Vec<FileDevice>,
    backing_node: DeviceNode,
    cache_nodes: Vec<DeviceNode>,
}

impl Devices {
    /// There, distinct, of a usable size, and (unless a dead daemon of this device still holds
    /// them) not in use.
    fn inspect(req: &CreateRequest, recovering: bool) -> Result<Devices> {
        let backing = inspect(&req.backing, "backing device")?;
        let caches: Vec<FileDevice> = req
            .caches
            .iter()
            .map(|p| inspect(p, "cache device"))
            .collect::<Result<_>>()?;
        let backing_node = node_of(&backing)?;
        let cache_nodes: Vec<DeviceNode> = caches.iter().map(node_of).collect::<Result<_>>()?;
        for (i, c) in cache_nodes.iter().enumerate() {
            if *c == backing_node {
                return Err(refused(
                    caches[i].name(),
                    "given as both the backing device and a cache device",
                ));
            }
            if cache_nodes[..i].contains(c) {
                return Err(refused(
                    caches[i].name(),
                    "given twice as a cache device; a mirror needs two different devices",
                ));
            }
        }
        let size = backing.size_bytes();
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE_BYTES as u64) {
            return Err(refused(
                backing.name(),
                format!("backing device size {size} bytes is not a non-zero multiple of 4096"),
            ));
        }
        if !recovering {
            check_not_in_use(&backing, "backing device")?;
            for cache in &caches {
                check_not_in_use(cache, "cache device")?;
            }
        }
        Ok(Devices {
            backing,
            caches,
            backing_node,
            cache_nodes,
        })
    }

    /// What the devices hold: the facts `decide_start` decides on.
    fn found(&self, req: &CreateRequest) -> Result<Found> {
        let caches = self
            .caches
            .iter()
            .map(|c| {
                Ok(CacheFound {
                    name: c.name().to_string(),
                    size_bytes: c.size_bytes(),
                    content: read_leg(c)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Found {
            caches,
            backing_name: self.backing.name().to_string(),
            backing_size_bytes: self.backing.size_bytes(),
            backing_fingerprint: backing_fingerprint(&self.backing.identity()),
            logical_block_size: req
                .logical_block_size
                .unwrap_or_else(|| self.backing.logical_block_size()),
        })
    }

    /// The daemon's spec, its caches in `leg_order` (indexes into `req.caches`).
    fn spec(&self, req: &CreateRequest, leg_order: &[usize]) -> DaemonSpec {
        let nodes = std::iter::once(self.backing_node)
            .chain(leg_order.iter().map(|&i| self.cache_nodes[i]))
            .collect();
        DaemonSpec {
            name: req.name.clone(),
            // Absolute (symlinks kept: /dev/disk/by-id/... stays readable in status), because
            // the daemon leaves its working directory and `wbctl recover` may run from anywhere.
            backing: absolute(&req.backing),
            caches: leg_order
                .iter()
                .map(|&i| absolute(&req.caches[i]))
                .collect(),
            policy: req.policy.clone(),
            queues: req.queues,
            depth: req.depth,
            io_buf_bytes: ublk::DEFAULT_IO_BUF_BYTES,
            run_dir: req.run_dir.clone(),
            nodes,
            event_hook: req.event_hook.as_deref().map(absolute),
            config: req.config.as_deref().map(absolute),
        }
    }
}

/// One cache device as a create found it.
#[derive(Debug)]
struct CacheFound {
    name: String,
    size_bytes: u64,
    content: LegContent,
}

/// What the devices of a create hold (read-only facts; `decide_start` is pure over them).
#[derive(Debug)]
struct Found {
    caches: Vec<CacheFound>,
    backing_name: String,
    backing_size_bytes: u64,
    backing_fingerprint: [u8; 16],
    /// For a new cache set: the one asked for, else the backing device's.
    logical_block_size: u32,
}

/// How a create starts, and the given caches in leg order.
#[derive(Debug, PartialEq, Eq)]
struct Decided {
    start: Start,
    /// Indexes into the given caches, in leg-index order.
    leg_order: Vec<usize>,
    /// The cache set attached to, if any.
    existing_uuid: Option<[u8; 16]>,
}

/// Blank caches are formatted; the complete cache set of this backing device is attached;
/// anything else is refused with the reason, unless `--force` (not while recovering) formats
/// anew. A new cache set needs caches of the minimum size.
fn decide_start(req: &CreateRequest, found: &Found, recovering: bool) -> Result<Decided> {
    let format = || Decided {
        start: Start::Format {
            logical_block_size: found.logical_block_size,
            force: req.force,
            dev_id: req.dev_id,
        },
        leg_order: (0..found.caches.len()).collect(),
        existing_uuid: None,
    };
    let all_blank = found
        .caches
        .iter()
        .all(|c| matches!(c.content, LegContent::Blank));
    let decided = if all_blank {
        format()
    } else {
        match attachable_cache_set(found) {
            Ok((leg_order, uuid)) => Decided {
                start: Start::Attach { dev_id: req.dev_id },
                leg_order,
                existing_uuid: Some(uuid),
            },
            Err(_) if req.force && !recovering => format(),
            Err(problem) => return Err(problem),
        }
    };
    if matches!(decided.start, Start::Format { .. }) {
        check_min_cache_size(found)?;
    }
    Ok(decided)
}

/// The given caches as one complete cache set of this backing device: their leg order and the
/// set's uuid, or the first reason they are not.
fn attachable_cache_set(found: &Found) -> Result<(Vec<usize>, [u8; 16])> {
    let mut members = Vec::new();
    for cache in &found.caches {
        match &cache.content {
            LegContent::Member(sb) => members.push(sb),
            LegContent::Corrupt(e) => {
                return Err(refused(
                    &cache.name,
                    format!(
                        "corrupted superblock ({e}); refusing to touch it. `wbctl check --cache \
                         {}` shows what is left; --force formats it anew (whatever it held is \
                         lost)",
                        cache.name
                    ),
                ))
            }
            LegContent::Blank => {
                return Err(refused(
                    &cache.name,
                    "is not part of the cache set on the other cache device; --force formats \
                     both as a new cache set",
                ))
            }
        }
    }
    let sb0 = members[0];
    check_same_cache_set(found, &members)?;
    check_cache_of_this_backing(found, sb0)?;
    if let Some(cache) = found
        .caches
        .iter()
        .find(|c| c.size_bytes < sb0.leg_size_bytes())
    {
        return Err(refused(
            &cache.name,
            format!(
                "cache device is {} bytes but its superblock describes {} (it shrank)",
                cache.size_bytes,
                sb0.leg_size_bytes()
            ),
        ));
    }
    let mut leg_order: Vec<usize> = (0..members.len()).collect();
    leg_order.sort_by_key(|&i| members[i].leg_index);
    let one_each = leg_order
        .iter()
        .enumerate()
        .all(|(leg, &i)| members[i].leg_index as usize == leg);
    if !one_each {
        return Err(refused(
            &found.caches[0].name,
            "both cache devices claim the same leg of the cache set (one was copied from the \
             other?)",
        ));
    }
    Ok((leg_order, sb0.uuid))
}

/// Every member is of one cache set, of as many legs as were given.
fn check_same_cache_set(found: &Found, members: &[&Superblock]) -> Result<()> {
    let (first, sb0) = (&found.caches[0].name, members[0]);
    if members.iter().any(|sb| sb.uuid != sb0.uuid) {
        return Err(refused(
            &found.caches[1].name,
            format!(
                "belongs to another cache set than {first}; --force formats both as a new cache \
                 set"
            ),
        ));
    }
    if sb0.leg_count as usize != members.len() {
        return Err(refused(
            first,
            format!(
                "belongs to a cache set of {} legs, but {} cache device(s) were given",
                sb0.leg_count,
                members.len()
            ),
        ));
    }
    Ok(())
}

/// The cache set was made for this backing device, and the device did not shrink since.
fn check_cache_of_this_backing(found: &Found, sb0: &Superblock) -> Result<()> {
    let first = &found.caches[0].name;
    if sb0.backing_fingerprint != found.backing_fingerprint {
        return Err(refused(
            first,
            format!(
                "is the cache of another backing device (created {} for a device of {} bytes), \
                 not of {}; refusing to attach it, its data would corrupt this one. `wbctl check \
                 --cache {first}` shows it; --force formats it anew (its data not yet written \
                 back is lost)",
                format_unix_time(sb0.created_unix_secs),
                sb0.backing_size_bytes,
                found.backing_name,
            ),
        ));
    }
    if found.backing_size_bytes < sb0.backing_size_bytes {
        return Err(refused(
            &found.backing_name,
            format!(
                "backing device shrank from {} to {} bytes since its cache was created; cached \
                 blocks may lie beyond its end. Restore its size; --force formats the cache anew \
                 (its data not yet written back is lost)",
                sb0.backing_size_bytes, found.backing_size_bytes
            ),
        ));
    }
    Ok(())
}

fn check_min_cache_size(found: &Found) -> Result<()> {
    match found
        .caches
        .iter()
        .find(|c| c.size_bytes < MIN_CACHE_SIZE_BYTES)
    {
        Some(cache) => Err(refused(
            &cache.name,
            format!(
                "cache device too small: {} bytes, need at least {MIN_CACHE_SIZE_BYTES} (16 \
                 segments of 512 KiB and the superblock area)",
                cache.size_bytes
            ),
        )),
        None => Ok(()),
    }
}

/// A RAM buffer file under this name holds acknowledged writes of a crashed daemon: only the
/// cache set it belongs to may be started under the name (or `--force` discards them).
fn check_buffer_file(req: &CreateRequest, existing_uuid: Option<[u8; 16]>) -> Result<()> {
    let path = req.run_dir.buffer(&req.name);
    let owners =
        read_buffer_owners(&path).map_err(io_error(format!("{}: reading", path.display())))?;
    match owners {
        Some(o) if !o.segments.is_empty() && existing_uuid != Some(o.uuid) && !req.force => {
            Err(refused(
                path.display().to_string(),
                format!(
                    "holds acknowledged writes (segments {:?}) of a crashed daemon of another \
                     cache set; bring that cache back under this name first (`wbctl create` \
                     with its devices), or pass --force to discard them",
                    o.segments
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// Every check of `wbctl recover`, read-only.
pub fn check_recover(name: &str, run_dir: &RunDir) -> Result<(DaemonSpec, Start)> {
    validate_name(name).map_err(|r| refused("name", r))?;
    check_run_dir(run_dir)?;
    let state_path = run_dir.state(name);
    if std::fs::symlink_metadata(&state_path).is_err() {
        return Err(refused(
            name,
            format!(
                "no such device (no state file {}); `wbctl list` shows the devices",
                state_path.display()
            ),
        ));
    }
    let state = run_dir
        .load_state(name)
        .map_err(|e| refused(name, e.to_string()))?;
    if daemon_running(&state, run_dir) {
        return Err(refused(
            name,
            format!(
                "its daemon is running (pid {}, {}); nothing to recover",
                state.pid, state.device
            ),
        ));
    }
    check_queue_shape(&state, &state_path)?;
    let mut nodes = vec![node_of(&inspect(&state.backing, "backing device")?)?];
    for c in &state.caches {
        nodes.push(node_of(&inspect(c, "cache device")?)?);
    }
    let knobs: Vec<(String, String)> = state.policy.clone().into_iter().collect();
    let policy = apply_knobs(&Policy::default(), &knobs)
        .map_err(|e| refused(state_path.display().to_string(), e.to_string()))?;
    check_root("wbctl recover")?;
    ublk::check_control_device()?;
    Ok((
        DaemonSpec {
            name: state.name.clone(),
            backing: state.backing.clone(),
            caches: state.caches.clone(),
            policy,
            queues: state.queues,
            depth: state.depth,
            io_buf_bytes: state.io_buf_bytes,
            run_dir: run_dir.clone(),
            nodes,
            event_hook: state.event_hook.clone(),
            config: state.config.clone(),
        },
        Start::Recover {
            dev_id: state.dev_id,
            counters: state.counters.filter(|_| state.handed_over),
        },
    ))
}

/// The queue figures of a state file, within what the daemon itself would ever record.
fn check_queue_shape(state: &DeviceState, path: &Path) -> Result<()> {
    let io_buf = state.io_buf_bytes;
    if !(1..=ublk::MAX_QUEUES).contains(&state.queues)
        || !(1..=ublk::MAX_QUEUE_DEPTH).contains(&state.depth)
        || !(BLOCK_SIZE_BYTES as u32..=ublk::DEFAULT_IO_BUF_BYTES).contains(&io_buf)
        || !io_buf.is_multiple_of(BLOCK_SIZE_BYTES as u32)
    {
        return Err(refused(
            path.display().to_string(),
            format!(
                "queues {}, depth {}, I/O buffer {io_buf} bytes: not what a daemon records; \
                 refusing to use it",
                state.queues, state.depth
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEG_BYTES: u64 = 64 << 20;
    const SEGMENTS: u64 = 100;

    fn request(caches: usize, force: bool) -> CreateRequest {
        CreateRequest {
            name: "d".into(),
            backing: "/dev/backing".into(),
            caches: (0..caches)
                .map(|i| format!("/dev/cache{i}").into())
                .collect(),
            single_leg: caches == 1,
            force,
            logical_block_size: None,
            policy: Policy::default(),
            queues: 1,
            depth: 64,
            dev_id: -1,
            run_dir: RunDir::new("/nonexistent"),
            event_hook: None,
            config: None,
        }
    }

    fn member(uuid: u8, leg_index: u32, leg_count: u32, fingerprint: u8) -> LegContent {
        LegContent::Member(Superblock {
            uuid: [uuid; 16],
            backing_size_bytes: 1 << 30,
            backing_fingerprint: [fingerprint; 16],
            logical_block_size: 4096,
            segment_count: SEGMENTS,
            leg_count,
            leg_index,
            created_unix_secs: 0,
            leg_incarnation: 0,
        })
    }

    fn found(contents: Vec<LegContent>) -> Found {
        Found {
            caches: contents
                .into_iter()
                .enumerate()
                .map(|(i, content)| CacheFound {
                    name: format!("/dev/cache{i}"),
                    size_bytes: LEG_BYTES,
                    content,
                })
                .collect(),
            backing_name: "/dev/backing".into(),
            backing_size_bytes: 1 << 30,
            backing_fingerprint: [9; 16],
            logical_block_size: 512,
        }
    }

    fn format(force: bool, legs: usize) -> Decided {
        Decided {
            start: Start::Format {
                logical_block_size: 512,
                force,
                dev_id: -1,
            },
            leg_order: (0..legs).collect(),
            existing_uuid: None,
        }
    }

    fn attach(leg_order: Vec<usize>) -> Decided {
        Decided {
            start: Start::Attach { dev_id: -1 },
            leg_order,
            existing_uuid: Some([1; 16]),
        }
    }

    /// Each row: what the caches hold, `--force`, recovering → the decision, or the device the
    /// refusal names and a word of its reason.
    #[test]
    fn decide_start_table() {
        type Row = (
            Vec<LegContent>,
            bool,
            bool,
            std::result::Result<Decided, (&'static str, &'static str)>,
        );
        let corrupt = || {
            LegContent::Corrupt(FormatError::BadChecksum {
                record: "superblock",
                stored: 1,
                computed: 2,
            })
        };
        let rows: Vec<Row> = vec![
            (
                vec![LegContent::Blank, LegContent::Blank],
                false,
                false,
                Ok(format(false, 2)),
            ),
            (vec![LegContent::Blank], true, false, Ok(format(true, 1))),
            (
                vec![member(1, 0, 2, 9), member(1, 1, 2, 9)],
                false,
                false,
                Ok(attach(vec![0, 1])),
            ),
            // Given in the other order: the legs are put back in leg order.
            (
                vec![member(1, 1, 2, 9), member(1, 0, 2, 9)],
                false,
                false,
                Ok(attach(vec![1, 0])),
            ),
            (
                vec![member(1, 0, 2, 9), LegContent::Blank],
                false,
                false,
                Err(("/dev/cache1", "not part of the cache set")),
            ),
            (
                vec![member(1, 0, 2, 9), LegContent::Blank],
                true,
                false,
                Ok(format(true, 2)),
            ),
            (
                vec![member(1, 0, 2, 9), LegContent::Blank],
                true,
                true,
                Err(("/dev/cache1", "not part of the cache set")),
            ),
            (
                vec![corrupt(), member(1, 1, 2, 9)],
                false,
                false,
                Err(("/dev/cache0", "corrupted superblock")),
            ),
            (
                vec![member(1, 0, 2, 9), member(2, 1, 2, 9)],
                false,
                false,
                Err(("/dev/cache1", "another cache set")),
            ),
            (
                vec![member(1, 0, 2, 9)],
                false,
                false,
                Err(("/dev/cache0", "of 2 legs")),
            ),
            (
                vec![member(1, 0, 2, 8), member(1, 1, 2, 8)],
                false,
                false,
                Err(("/dev/cache0", "another backing device")),
            ),
            (
                vec![member(1, 0, 2, 9), member(1, 0, 2, 9)],
                false,
                false,
                Err(("/dev/cache0", "same leg")),
            ),
        ];
        for (i, (contents, force, recovering, expected)) in rows.into_iter().enumerate() {
            let mut req = request(contents.len(), force);
            req.single_leg = contents.len() == 1;
            let got = decide_start(&req, &found(contents), recovering);
            match (got, expected) {
                (Ok(d), Ok(e)) => assert_eq!(d, e, "row {i}"),
                (Err(DaemonError::Refused { thing, reason }), Err((who, why))) => {
                    assert_eq!(thing, who, "row {i}: {reason}");
                    assert!(reason.contains(why), "row {i}: {reason:?} lacks {why:?}");
                }
                (got, e) => panic!("row {i}: got {got:?}, expected {e:?}"),
            }
        }
    }

    /// `--dev-id` / `dev_id` pins the device whether the caches are new or re-attached: the
    /// first start of a unit over blank legs gets /dev/ublkb<dev_id> too (it used to get the
    /// kernel's choice).
    #[test]
    fn the_dev_id_asked_for_holds_for_a_new_cache_set_and_an_attached_one() {
        let mut req = request(2, false);
        req.dev_id = 7;
        let new = decide_start(
            &req,
            &found(vec![LegContent::Blank, LegContent::Blank]),
            false,
        );
        assert!(
            matches!(new.unwrap().start, Start::Format { dev_id: 7, .. }),
            "blank legs"
        );
        let attached = decide_start(
            &req,
            &found(vec![member(1, 0, 2, 9), member(1, 1, 2, 9)]),
            false,
        );
        assert_eq!(attached.unwrap().start, Start::Attach { dev_id: 7 });
    }

    #[test]
    fn a_shrunk_backing_device_or_cache_is_refused_and_a_new_cache_must_be_big_enough() {
        let req = request(2, false);
        let mut f = found(vec![member(1, 0, 2, 9), member(1, 1, 2, 9)]);
        f.backing_size_bytes = 1 << 29;
        let e = decide_start(&req, &f, false).unwrap_err().to_string();
        assert!(e.contains("/dev/backing") && e.contains("shrank"), "{e}");

        let mut f = found(vec![member(1, 0, 2, 9), member(1, 1, 2, 9)]);
        f.caches[1].size_bytes = 1 << 20;
        let e = decide_start(&req, &f, false).unwrap_err().to_string();
        assert!(e.contains("/dev/cache1") && e.contains("it shrank"), "{e}");

        let mut f = found(vec![LegContent::Blank, LegContent::Blank]);
        f.caches[0].size_bytes = MIN_CACHE_SIZE_BYTES - 1;
        let e = decide_start(&req, &f, false).unwrap_err().to_string();
        assert!(e.contains("/dev/cache0") && e.contains("too small"), "{e}");
    }

    #[test]
    fn cache_counts() {
        let cases = [
            (0, false, "needed"),
            (1, false, "no mirror"),
            (2, true, "--single-leg"),
            (3, false, "3 cache devices"),
        ];
        for (n, single, why) in cases {
            let mut req = request(n, false);
            req.single_leg = single;
            let e = check_cache_count(&req).unwrap_err().to_string();
            assert!(e.contains(why), "{n} caches, single {single}: {e}");
        }
        let mut req = request(1, false);
        req.single_leg = true;
        assert!(check_cache_count(&req).is_ok());
        assert!(check_cache_count(&request(2, false)).is_ok());
    }
}
