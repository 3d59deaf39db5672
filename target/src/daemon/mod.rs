//! The daemon: one process per device, holding the engine, its ublk device and its control
//! socket. `wbctl create` and `wbctl recover` run it (detached, or in the foreground for systemd).
//!
//! Two phases, in this order:
//! 1. `check_create` / `check_recover` (`preflight`) — every check of CONTRACT §7, read-only,
//!    cheapest first. Nothing is written before all of them pass.
//! 2. `run` — claims the name (the control socket), formats or opens the cache (adopting a
//!    crashed predecessor's RAM buffer), adds or recovers the ublk device, records the state file
//!    for a successor, and serves until a signal, `wbctl delete`, or the device going away.
//!
//! Invariant: every way out of `run` after the engine opened goes through `Engine::shutdown`
//! (seal and flush the log), except a kill -9, which the RAM buffer file and user recovery cover.
//! A stop signal while the device is in use ends the process in `hand_over` — after that
//! shutdown, with the device left to the kernel for the next start.
//! Threads: `wb-signal` (SIGTERM/SIGINT stop; SIGHUP re-reads the configuration), `wb-ctl`
//! (accepts control connections), `wb-ctl-conn` (one per connection), `wb-stats` (throughput
//! sampling and the event hook).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use libublk::ctrl::UblkCtrl;
use nix::sys::signal::{SigSet, Signal};
use parking_lot::Mutex;
use sd_notify::NotifyState;
use thiserror::Error;
use writeback::Policy;

use crate::control::{
    self, Counters, DeviceState, DeviceStatus, LegReport, Progress, ReadReport, Reply, Request,
    RunDir, SegmentReport,
};
use crate::device::{Device, DeviceNode, FileDevice};
use crate::engine::status::EngineStatus;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::ublk::{self, Attach, RequestGate, UblkOptions, UblkSetupError};

pub mod config;
mod events;
mod hand_over;
pub mod holders;
mod preflight;
mod samples;

use preflight::{absolute, hold_checked, same_file};
pub use preflight::{check_create, check_recover, daemon_running};
use samples::Samples;

/// Control connections served at once; more get a "busy" reply (a stuck client cannot pile up
/// threads in the daemon).
const MAX_CONTROL_CONNECTIONS: usize = 16;
/// How often a drain reports progress to its client.
const DRAIN_PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Throughput figures in `status` are averaged over this window.
const STATS_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the main thread looks for queues that went down on their own.
const MAIN_POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum DaemonError {
    /// Bad input, refused before anything was written.
    #[error("{thing}: {reason}")]
    Refused { thing: String, reason: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Ublk(#[from] UblkSetupError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The run folder or one of its files cannot be trusted (the message names it and says why).
    #[error("{0}")]
    Untrusted(io::Error),
}

fn refused(thing: impl Into<String>, reason: impl Into<String>) -> DaemonError {
    DaemonError::Refused {
        thing: thing.into(),
        reason: reason.into(),
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

pub type Result<T> = std::result::Result<T, DaemonError>;

/// What `wbctl create` asks for.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub backing: PathBuf,
    pub caches: Vec<PathBuf>,
    pub single_leg: bool,
    pub force: bool,
    /// For a new cache; default: the backing device's.
    pub logical_block_size: Option<u32>,
    pub policy: Policy,
    pub queues: u16,
    pub depth: u16,
    /// ublk device id to ask for; -1: the kernel's choice.
    pub dev_id: i32,
    pub run_dir: RunDir,
    /// Run on every mode change and leg event (`events`); must be an executable file.
    pub event_hook: Option<PathBuf>,
    /// The configuration file SIGHUP re-reads (`config`), if it was created from one.
    pub config: Option<PathBuf>,
}

/// Everything a daemon needs to run (also what a successor rebuilds from the state file).
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub name: String,
    pub backing: PathBuf,
    /// In leg-index order.
    pub caches: Vec<PathBuf>,
    pub policy: Policy,
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
    pub run_dir: RunDir,
    /// The devices the checks looked at, backing first, then the caches in leg order: the
    /// daemon starts on these and nothing else (a path that now leads elsewhere is refused).
    pub nodes: Vec<DeviceNode>,
    /// Run on every mode change and leg event (`events`).
    pub event_hook: Option<PathBuf>,
    /// The configuration file SIGHUP re-reads (`config`), if it was created from one.
    pub config: Option<PathBuf>,
}

/// How the daemon gets its cache and device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Format the legs as a new cache set, then add a device (`dev_id`: the id asked for, -1
    /// the kernel's choice).
    Format {
        logical_block_size: u32,
        force: bool,
        dev_id: i32,
    },
    /// Open the existing cache set, then add a device.
    Attach { dev_id: i32 },
    /// A daemon of this device died or stopped with it in use: open the cache (adopting its
    /// RAM buffer) and take over its device through ublk user recovery; the counters go on from
    /// where a daemon that handed the device over left them.
    Recover {
        dev_id: u32,
        counters: Option<Counters>,
    },
}

/// Why the main loop ended.
enum Stop {
    Signal(i32),
    Delete { drain: bool, client: UnixStream },
    QueuesDown,
}

/// What the control threads share with the main thread.
struct Daemon {
    spec: DaemonSpec,
    engine: Arc<Engine>,
    dev_id: u32,
    device: String,
    pid: u32,
    started: Instant,
    started_unix_secs: u64,
    policy: Mutex<Policy>,
    /// The cache legs' paths in leg order (`wbctl replace` changes one).
    caches: Mutex<Vec<PathBuf>>,
    /// Exclusive holds on legs attached by `wbctl replace`.
    replaced_holds: Mutex<Vec<File>>,
    /// Throughput and recent stalls, sampled by `wb-stats`.
    samples: Mutex<Samples>,
    stopping: AtomicBool,
    events: Sender<Stop>,
}

impl Daemon {
    fn state(&self) -> DeviceState {
        DeviceState {
            name: self.spec.name.clone(),
            backing: self.spec.backing.clone(),
            caches: self.caches.lock().clone(),
            dev_id: self.dev_id,
            device: self.device.clone(),
            queues: self.spec.queues,
            depth: self.spec.depth,
            io_buf_bytes: self.spec.io_buf_bytes,
            policy: knob_map(&self.policy.lock()),
            pid: self.pid,
            started_unix_secs: self.started_unix_secs,
            event_hook: self.spec.event_hook.clone(),
            config: self.spec.config.clone(),
            handed_over: false,
            counters: None,
        }
    }

    fn store_state(&self) -> io::Result<()> {
        self.state()
            .store(&self.spec.run_dir.state(&self.spec.name))
    }

    fn status(&self) -> DeviceStatus {
        let s = self.engine.status();
        let (write_rate, writeback_rate, stall_ms_last_minute) = self.samples.lock().now(&s);
        let legs = leg_reports(&s);
        let mode = s.shown_mode().to_string();
        DeviceStatus {
            name: self.spec.name.clone(),
            device: self.device.clone(),
            dev_id: self.dev_id,
            pid: self.pid,
            mode,
            failure: s.failure.clone(),
            cache_lost_at: s.cache_lost_at,
            cache_lost: s
                .cache_lost
                .as_ref()
                .map(|l| crate::control::CacheLostReport {
                    backing_holds_id: l.backing_holds_id,
                    lost_from_id: l.lost_from_id,
                    lost_through_id: l.lost_through_id,
                    lost_dirty_bytes: l.lost_dirty_bytes,
                }),
            fault_record_sequence: s.fault_record_sequence,
            fault_file: s.fault_file.clone(),
            backing: self.spec.backing.display().to_string(),
            legs,
            device_size_bytes: self.engine.device_size_bytes(),
            logical_block_size: self.engine.geometry().logical_block_size,
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            log_bytes: s.log_bytes,
            dirty_bytes: s.dirty_bytes,
            dirty_percent: percent(s.dirty_bytes, s.capacity_bytes),
            // Rounded up: data that waits at all shows as at least a second of lag.
            oldest_dirty_age_secs: s
                .oldest_dirty_age
                .map_or(0, |age| age.as_secs() + u64::from(age.subsec_nanos() > 0)),
            segments: SegmentReport {
                current_id: s.segments.current_id,
                last_flushed_id: s.segments.last_flushed_id,
                last_written_back_id: s.segments.last_written_back_id,
            },
            epoch_id: s.epoch_id,
            reads: ReadReport {
                requests: s.reads,
                hits: s.read_hits,
                misses: s.read_misses,
            },
            writes: s.writes,
            write_bytes: s.write_bytes,
            flushes: s.flushes,
            written_back_bytes: s.written_back_bytes,
            backing_write_ios: s.backing_write_ios,
            backing_errors: s.backing_errors,
            passthrough_writes: s.passthrough_writes,
            write_bytes_per_sec: write_rate,
            written_back_bytes_per_sec: writeback_rate,
            stall_ms: s.stall_ms,
            stall_ms_last_minute,
            stalled_recently: stall_ms_last_minute > 0,
            map_bytes: s.map_bytes,
            metadata_bytes: s.metadata_bytes,
            queues: self.spec.queues,
            depth: self.spec.depth,
            uptime_secs: self.started.elapsed().as_secs(),
            policy: typed_knob_map(&self.policy.lock()),
        }
    }
}

fn leg_reports(s: &EngineStatus) -> Vec<LegReport> {
    s.legs
        .iter()
        .map(|l| LegReport {
            path: l.path.clone(),
            health: if l.healthy { "ok" } else { "failed" }.into(),
            errors: l.read_errors + l.write_errors,
            read_errors: l.read_errors,
            write_errors: l.write_errors,
            repairs: l.repairs,
        })
        .collect()
}

/// Applies knobs to a copy of `base`, all or none. Knobs that depend on each other
/// (`pressure_start` < `pressure_full`) are accepted in any order.
pub fn apply_knobs(
    base: &Policy,
    knobs: &[(String, String)],
) -> std::result::Result<Policy, writeback::PolicyError> {
    let mut policy = base.clone();
    let mut pending: Vec<&(String, String)> = knobs.iter().collect();
    while !pending.is_empty() {
        let before = pending.len();
        let mut last_error = None;
        pending.retain(|(k, v)| match policy.set(k, v) {
            Ok(()) => false,
            Err(e) => {
                last_error = Some(e);
                true
            }
        });
        if pending.len() == before {
            return Err(last_error.expect("a knob failed"));
        }
    }
    Ok(policy)
}

pub fn knob_map(policy: &Policy) -> BTreeMap<String, String> {
    policy
        .knobs()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// The knobs for `status`: numbers as JSON numbers and booleans as booleans, so that a script
/// compares them without parsing strings; anything else (the pressure curve) stays a string.
pub fn typed_knob_map(policy: &Policy) -> BTreeMap<String, serde_json::Value> {
    knob_map(policy)
        .into_iter()
        .map(|(k, v)| {
            let typed = if let Ok(b) = v.parse::<bool>() {
                b.into()
            } else if let Ok(n) = v.parse::<u64>() {
                n.into()
            } else {
                match v.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                    Some(n) => serde_json::Value::Number(n),
                    None => v.into(),
                }
            };
            (k, typed)
        })
        .collect()
}

/// `a` as a percentage of `b`, to two decimals (0 when `b` is).
fn percent(a: u64, b: u64) -> f64 {
    if b == 0 {
        return 0.0;
    }
    (10_000.0 * a as f64 / b as f64).round() / 100.0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2024-05-01 12:00:00 UTC` from seconds since the epoch (UTC: no time-zone database needed).
pub fn format_unix_time(secs: u64) -> String {
    match i64::try_from(secs).map(jiff::Timestamp::from_second) {
        Ok(Ok(t)) => t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string(),
        // Past the year 9999 (jiff's range): no date a cache was made on, so the number as is.
        _ => format!("{secs} s after 1970-01-01 00:00:00 UTC"),
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Blocks the stop signals (SIGTERM, SIGINT) and SIGHUP in this thread and every thread it
/// spawns afterwards, so that only `wb-signal` takes them, synchronously: a signal handled in a
/// ublk queue thread would end its io_uring wait with EINTR, and libublk ends the queue then.
fn block_stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    // pthread_sigmask fails only for an invalid `how`; SIG_BLOCK is valid.
    set.thread_block().expect("blocking the stop signals");
    set
}

fn spawn_signal_thread(set: SigSet, daemon: Arc<Daemon>) {
    std::thread::Builder::new()
        .name("wb-signal".into())
        .spawn(move || loop {
            // sigwait fails only for a set holding an invalid signal; this one holds none.
            let Ok(sig) = set.wait() else {
                continue;
            };
            if sig == Signal::SIGHUP {
                reload(&daemon);
                continue;
            }
            // By number: the logs and the VM tests say "signal 15".
            let sig = sig as i32;
            log::info!("signal {sig}: stopping");
            if daemon.events.send(Stop::Signal(sig)).is_err() {
                return;
            }
        })
        .expect("spawn wb-signal");
}

/// SIGHUP (`systemctl reload`): re-reads the device's configuration file and applies its
/// writeback knobs (knobs it does not name return to their defaults: the file is the truth).
/// Device paths are not changed on a running device: a file that names others is refused, with
/// the reason in the log, and nothing changes. I/O goes on throughout.
fn reload(daemon: &Daemon) {
    let name = &daemon.spec.name;
    let Some(path) = &daemon.spec.config else {
        log::warn!("{name}: SIGHUP: no configuration file to re-read (created without --config)");
        return;
    };
    let reloaded = config::DeviceConfig::load(path).and_then(|c| {
        check_same_devices(&daemon.spec.backing, &daemon.caches.lock(), &c, path)?;
        apply_knobs(&Policy::default(), &c.knobs()).map_err(|e| format!("{}: {e}", path.display()))
    });
    match reloaded {
        Ok(policy) => {
            let knobs = knob_map(&policy);
            daemon.engine.set_policy(policy.clone());
            *daemon.policy.lock() = policy;
            if let Err(e) = daemon.store_state() {
                log::error!("writing the state file: {e}");
            }
            log::info!("{name}: reloaded {}: {knobs:?}", path.display());
        }
        Err(e) => log::error!("{name}: SIGHUP: {e}; nothing changed"),
    }
}

/// A reload may not move the device: the backing device and caches the file names (if any)
/// must be the ones it runs on now (after a `wbctl replace`, the replacement).
fn check_same_devices(
    backing: &Path,
    caches: &[PathBuf],
    c: &config::DeviceConfig,
    path: &Path,
) -> std::result::Result<(), String> {
    let backing_moved = c.backing.as_ref().is_some_and(|b| !same_file(b, backing));
    let caches_moved = !c.caches.is_empty()
        && (c.caches.len() != caches.len()
            || !c
                .caches
                .iter()
                .all(|n| caches.iter().any(|o| same_file(n, o))));
    if backing_moved || caches_moved {
        return Err(format!(
            "{}: names other devices than the running device's (backing {}, cache {}); device \
             paths change only with a restart, or a leg with `wbctl replace`",
            path.display(),
            backing.display(),
            display_paths(caches)
        ));
    }
    Ok(())
}

/// Claims `name` in the run folder (created 0700 and checked first): takes its lock, which
/// only one daemon can hold, and only then binds its control socket (0600), replacing a stale
/// one. Holding the lock, the socket found in place cannot be a live rival's: two daemons
/// started at once for one name never unlink each other's socket. Both live until the daemon
/// exits.
fn claim_name(run_dir: &RunDir, name: &str) -> Result<(File, UnixListener)> {
    run_dir.prepare().map_err(DaemonError::Untrusted)?;
    let lock = run_dir.lock_name(name).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => refused(name, e.to_string()),
        _ => DaemonError::Untrusted(e),
    })?;
    let path = run_dir.socket(name);
    if std::fs::symlink_metadata(&path).is_ok() {
        // A daemon of an older version holds no lock, but answers.
        if control::daemon_answers(&path) {
            return Err(refused(
                path.display().to_string(),
                "name in use: another daemon answers on this control socket",
            ));
        }
        std::fs::remove_file(&path).map_err(io_error(format!("{}: removing", path.display())))?;
    }
    let listener = control::bind_socket(&path).map_err(io_error(format!(
        "{}: binding the control socket",
        path.display()
    )))?;
    Ok((lock, listener))
}

/// Runs the daemon until it is stopped. `ready` is called with `/dev/ublkbN` once the device is
/// live (and the state file written).
pub fn run(
    spec: DaemonSpec,
    start: Start,
    ready: impl FnOnce(&str) + Send + Sync + 'static,
) -> Result<()> {
    // Before any thread starts: a panic in any of them ends the daemon (`crate::panics`).
    crate::panics::abort_on_uncaught_panics();
    let signals = block_stop_signals();
    let spec = leave_working_directory(spec);
    let (run_dir, name) = (spec.run_dir.clone(), spec.name.clone());
    // Held to the end: the socket and state file are removed while it is.
    let (_name_lock, listener) = claim_name(&run_dir, &name)?;
    let (engine, holds, ctrl) = match open_and_attach(&spec, &start) {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(run_dir.socket(&name));
            return Err(e);
        }
    };
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let daemon = Arc::new(Daemon::new(spec, engine, &ctrl, events_tx));
    spawn_signal_thread(signals, daemon.clone());
    let (served, stop) = serve(&daemon, &ctrl, listener, events_rx, ready);
    notify_systemd(&[NotifyState::Stopping]);
    shut_down(daemon, &ctrl, stop, served, holds)
}

/// Holds no directory busy (a daemon outlives the shell that started it): every path in the
/// spec is absolute, and the working directory is `/`.
fn leave_working_directory(spec: DaemonSpec) -> DaemonSpec {
    let spec = DaemonSpec {
        run_dir: RunDir::new(absolute(&spec.run_dir.path)),
        ..spec
    };
    if let Err(e) = std::env::set_current_dir("/") {
        log::warn!("cannot change to /: {e}");
    }
    spec
}

/// Opens the engine and adds (or recovers) its ublk device; a device that cannot be added
/// leaves the engine shut down cleanly.
fn open_and_attach(spec: &DaemonSpec, start: &Start) -> Result<(Arc<Engine>, Vec<File>, UblkCtrl)> {
    let (engine, holds) = open_engine(spec, start)?;
    let engine = Arc::new(engine);
    let attach = match *start {
        Start::Format { dev_id, .. } => Attach::Add { dev_id },
        Start::Attach { dev_id } => Attach::Add { dev_id },
        Start::Recover { dev_id, counters } => {
            if let Some(counters) = &counters {
                engine.continue_counters(counters);
            }
            Attach::Recover { dev_id }
        }
    };
    let options = UblkOptions {
        queues: spec.queues,
        depth: spec.depth,
        io_buf_bytes: spec.io_buf_bytes,
        attach,
    };
    match ublk::attach(&options) {
        Ok(ctrl) => Ok((engine, holds, ctrl)),
        Err(e) => {
            if let Err(s) = engine.shutdown() {
                log::error!("shutting down the engine: {s}");
            }
            Err(e.into())
        }
    }
}

impl Daemon {
    fn new(spec: DaemonSpec, engine: Arc<Engine>, ctrl: &UblkCtrl, events: Sender<Stop>) -> Daemon {
        let info = ctrl.dev_info();
        let device = ctrl.get_bdev_path();
        let spec = DaemonSpec {
            // After a recovery the kernel's queue count and depth are what they were.
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            ..spec
        };
        log::info!(
            "{}: {device} ({} bytes, {} queues × depth {}, flags {:#x}) over {} with cache {}",
            spec.name,
            engine.device_size_bytes(),
            info.nr_hw_queues,
            info.queue_depth,
            info.flags,
            spec.backing.display(),
            display_paths(&spec.caches)
        );
        Daemon {
            policy: Mutex::new(spec.policy.clone()),
            caches: Mutex::new(spec.caches.clone()),
            replaced_holds: Mutex::new(Vec::new()),
            spec,
            engine,
            dev_id: info.dev_id,
            device,
            pid: std::process::id(),
            started: Instant::now(),
            started_unix_secs: unix_now(),
            samples: Mutex::new(Samples::default()),
            stopping: AtomicBool::new(false),
            events,
        }
    }
}

/// Serves the device until a stop event: once it is live, records the state file for a
/// successor, starts the control and stats threads and tells the caller and systemd; at the
/// stop, stops the device (no new requests; the queue threads finish what they hold).
fn serve(
    daemon: &Arc<Daemon>,
    ctrl: &UblkCtrl,
    listener: UnixListener,
    events: Receiver<Stop>,
    ready: impl FnOnce(&str) + Send + Sync + 'static,
) -> (std::result::Result<(), UblkSetupError>, Option<Stop>) {
    let queues_down = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(RequestGate::default());
    let stop_slot: Arc<Mutex<Option<Stop>>> = Arc::new(Mutex::new(None));
    let live = {
        let (daemon, gate, queues_down, stop_slot) = (
            daemon.clone(),
            gate.clone(),
            queues_down.clone(),
            stop_slot.clone(),
        );
        move |ctrl: &UblkCtrl| {
            if let Err(e) = daemon.store_state() {
                log::error!(
                    "writing the state file: {e}; `wbctl recover` will not find this device"
                );
            }
            ublk::shorten_io_timeout(&daemon.device);
            spawn_control_thread(daemon.clone(), listener);
            spawn_stats_thread(daemon.clone());
            log::info!("{}: live as {}", daemon.spec.name, daemon.device);
            ready(&daemon.device);
            let status = format!("serving {}", daemon.device);
            notify_systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
            let stop = wait_for_stop(&events, &queues_down);
            daemon.stopping.store(true, Ordering::SeqCst);
            if matches!(stop, Stop::Signal(_)) {
                // In use: this may leave the device to the kernel and end the process here.
                hand_over::on_stop_signal(&daemon, &gate, &queues_down);
            }
            *stop_slot.lock() = Some(stop);
            if let Err(e) = ctrl.kill_dev() {
                log::error!("stopping {}: {}", daemon.device, ublk::describe(&e));
            }
        }
    };
    let served = ublk::serve(ctrl, daemon.engine.clone(), gate, queues_down, live);
    daemon.stopping.store(true, Ordering::SeqCst);
    let stop = stop_slot.lock().take();
    (served, stop)
}

/// The device takes no more requests: drain if asked, seal and flush the log, delete the
/// device, remove the run folder's files, release the devices, and answer a `wbctl delete`.
fn shut_down(
    daemon: Arc<Daemon>,
    ctrl: &UblkCtrl,
    stop: Option<Stop>,
    served: std::result::Result<(), UblkSetupError>,
    holds: Vec<File>,
) -> Result<()> {
    let (name, device) = (daemon.spec.name.clone(), daemon.device.clone());
    let run_dir = daemon.spec.run_dir.clone();
    let mut client = None;
    let mut drained = Ok(());
    match stop {
        Some(Stop::Delete {
            drain,
            client: mut stream,
        }) => {
            if drain {
                drained = drain_with_progress(&daemon, &mut stream);
            }
            client = Some(stream);
        }
        Some(Stop::Signal(sig)) => log::info!("{name}: stopped by signal {sig}"),
        Some(Stop::QueuesDown) => log::warn!("{name}: the device went away; shutting down"),
        None => {}
    }
    let flushed = daemon.engine.shutdown();
    match &flushed {
        Ok(()) => log::info!("{name}: log sealed and flushed"),
        Err(e) => log::error!("{name}: sealing and flushing the log failed: {e}"),
    }
    let deleted = deleted_message(&name, &device, &daemon.engine.status());
    if let Err(e) = ctrl.del_dev() {
        log::warn!("{name}: deleting {device}: {}", ublk::describe(&e));
    }
    let _ = std::fs::remove_file(run_dir.state(&name));
    let _ = std::fs::remove_file(run_dir.socket(&name));
    drop(daemon);
    // Release the devices before answering: a `wbctl delete` that returned leaves the backing
    // device free to mount.
    drop(holds);
    if flushed.is_ok() {
        // Everything it held is on the cache legs now.
        let _ = std::fs::remove_file(run_dir.buffer(&name));
    }
    let outcome: Result<()> = served
        .map_err(DaemonError::from)
        .and(drained)
        .and(flushed.map_err(DaemonError::from));
    if let Some(mut stream) = client {
        let reply = match &outcome {
            Ok(()) => Reply::Done { message: deleted },
            Err(e) => Reply::Error {
                error: format!("{name}: {e}"),
            },
        };
        let _ = control::send_line(&mut stream, &reply);
    }
    outcome
}

/// What `wbctl delete` answers: where the device's data is now — on the backing device alone
/// (clean, or drained), still in the cache (dirty: re-attached by `create`), or partly gone (the
/// cache was lost).
fn deleted_message(name: &str, device: &str, st: &EngineStatus) -> String {
    match &st.cache_lost {
        Some(lost) => format!(
            "{name}: {device} deleted; its cache was lost: the backing device holds the data up to \
             log segment {} (an older state)",
            lost.backing_holds_id
        ),
        None if st.dirty_bytes == 0 => format!(
            "{name}: {device} deleted; the cache is clean: the backing device holds all of its data"
        ),
        None => format!(
            "{name}: {device} deleted; the cache holds {} bytes not yet written back (`wbctl \
             create` with the same devices re-attaches it; `delete --drain` writes them back first)",
            st.dirty_bytes
        ),
    }
}

/// Opens (after formatting, for a new cache) the engine; returns it with the exclusive holds
/// on the block devices, which must live as long as it.
fn open_engine(spec: &DaemonSpec, start: &Start) -> Result<(Engine, Vec<File>)> {
    let paths: Vec<&PathBuf> = std::iter::once(&spec.backing).chain(&spec.caches).collect();
    if spec.nodes.len() != paths.len() {
        return Err(refused(
            &spec.name,
            "the devices to start on were never checked (internal error); nothing was written",
        ));
    }
    // One lookup per path: the hold, checked against what the checks saw, and the engine's own
    // descriptor opened through it.
    let mut holds = Vec::new();
    let mut devices = Vec::new();
    for (i, (path, node)) in paths.iter().zip(&spec.nodes).enumerate() {
        let role = if i == 0 {
            "backing device"
        } else {
            "cache device"
        };
        let hold = hold_checked(path, role, Some(*node))?;
        devices.push(
            FileDevice::reopen(&hold, path, true)
                .map_err(io_error(format!("{}: opening", path.display())))?,
        );
        holds.push(hold);
    }
    let mut devices = devices.into_iter();
    let backing_file = devices.next().expect("the backing device");
    let identity = backing_file.identity();
    let backing: Arc<dyn Device> = Arc::new(backing_file);
    let legs: Vec<Arc<dyn Device>> = devices.map(|d| Arc::new(d) as Arc<dyn Device>).collect();
    let buffer_path = spec.run_dir.buffer(&spec.name);
    if let Start::Format {
        logical_block_size,
        force,
        ..
    } = *start
    {
        // A buffer file of an earlier cache under this name: checked to hold nothing (or
        // --force given); the new cache set starts without it.
        if std::fs::symlink_metadata(&buffer_path).is_ok() {
            std::fs::remove_file(&buffer_path)
                .map_err(io_error(format!("{}: removing", buffer_path.display())))?;
        }
        let sb = crate::open::create::format(
            &legs,
            backing.as_ref(),
            &identity,
            &crate::open::create::FormatOptions {
                logical_block_size,
                force,
            },
        )?;
        log::info!(
            "{}: formatted {} as a new cache set ({} segments, logical block size {})",
            spec.name,
            display_paths(&spec.caches),
            sb.segment_count,
            sb.logical_block_size
        );
    }
    let mut options = crate::open::recover::OpenOptions::new(buffer_path);
    options.writeback = Some(spec.policy.clone());
    options.fault_dir = Some(crate::engine::faults::fault_dir_from_env());
    let engine = crate::open::recover::open(legs, backing, &identity, options)?;
    let report = engine.recovery_report();
    log::info!(
        "{}: cache opened: log {}..={}, {} dirty blocks, read {} bytes at start-up",
        spec.name,
        report.written_back_id() + 1,
        report.head_id(),
        report.dirty_data_blocks(),
        report.bytes_read
    );
    Ok((engine, holds))
}

/// Tells systemd (a `Type=notify` unit) how the daemon is doing: `READY=1` once the device is
/// live, so that units ordered after it (the iSCSI target, Samba) find `/dev/ublkbN`. Does
/// nothing outside systemd (no `NOTIFY_SOCKET`).
pub(super) fn notify_systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        let shown: Vec<String> = states.iter().map(|s| s.to_string()).collect();
        log::warn!("telling systemd '{}': {e}", shown.join("\n"));
    }
}

fn wait_for_stop(events: &Receiver<Stop>, queues_down: &AtomicBool) -> Stop {
    loop {
        match events.recv_timeout(MAIN_POLL_INTERVAL) {
            Ok(stop) => return stop,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Stop::QueuesDown,
        }
        if queues_down.load(Ordering::SeqCst) {
            return Stop::QueuesDown;
        }
    }
}

fn drain_with_progress(daemon: &Daemon, stream: &mut UnixStream) -> Result<()> {
    let mut client_gone = false;
    let result = daemon.engine.drain(DRAIN_PROGRESS_INTERVAL, |p| {
        if client_gone {
            return;
        }
        let progress = Reply::Progress(Progress {
            segments_left: p.segments_left,
            segments_done: p.segments_done,
            dirty_bytes: daemon.engine.status().dirty_bytes,
            elapsed_ms: p.elapsed.as_millis() as u64,
        });
        // A client that went away does not stop the drain.
        client_gone = control::send_line(stream, &progress).is_err();
    });
    result.map_err(DaemonError::from)
}

fn spawn_stats_thread(daemon: Arc<Daemon>) {
    std::thread::Builder::new()
        .name("wb-stats".into())
        .spawn(move || {
            let mut last = daemon.engine.status();
            let mut at = Instant::now();
            daemon.samples.lock().note_stall(at, last.stall_ms);
            while !daemon.stopping.load(Ordering::SeqCst) {
                std::thread::sleep(STATS_SAMPLE_INTERVAL);
                let now = daemon.engine.status();
                let secs = at.elapsed().as_secs_f64();
                at = Instant::now();
                daemon.samples.lock().record(at, &last, &now, secs);
                report_events(&daemon, &last, &now);
                last = now;
            }
        })
        .expect("spawn wb-stats");
}

/// Hands what changed since the last sample to the event hook, if one is configured.
fn report_events(daemon: &Daemon, prev: &EngineStatus, now: &EngineStatus) {
    let Some(hook) = &daemon.spec.event_hook else {
        return;
    };
    let events = events::between(prev, now);
    events::run_hooks(hook, &daemon.spec.name, &daemon.device, prev, now, events);
}

fn spawn_control_thread(daemon: Arc<Daemon>, listener: UnixListener) {
    std::thread::Builder::new()
        .name("wb-ctl".into())
        .spawn(move || {
            control::serve_socket(listener, MAX_CONTROL_CONNECTIONS, move |request, stream| {
                serve_request(&daemon, request, stream)
            })
        })
        .expect("spawn wb-ctl");
}

/// Answers one request (from root: `control::serve_socket` turned everyone else away).
fn serve_request(daemon: &Daemon, request: Request, mut stream: UnixStream) {
    if daemon.stopping.load(Ordering::SeqCst) && !matches!(request, Request::Status) {
        let _ = control::send_line(
            &mut stream,
            &Reply::Error {
                error: format!("{}: the daemon is shutting down", daemon.spec.name),
            },
        );
        return;
    }
    let reply = match request {
        Request::Status => Reply::Status {
            status: Box::new(daemon.status()),
        },
        Request::Set { knobs } => set_knobs(daemon, &knobs),
        Request::Replace { old, new } => replace_leg(daemon, &old, &new),
        Request::Drain => match drain_with_progress(daemon, &mut stream) {
            Ok(()) => Reply::Done {
                message: format!("{}: clean (everything written back)", daemon.spec.name),
            },
            Err(e) => Reply::Error {
                error: format!("{}: drain failed: {e}", daemon.spec.name),
            },
        },
        Request::Delete { drain, force } => {
            let users = match force {
                true => Vec::new(),
                false => holders::users(Path::new(&daemon.device)),
            };
            if !users.is_empty() {
                let _ = control::send_line(&mut stream, &in_use(daemon, &users));
                return;
            }
            // The main thread stops the device, drains, shuts down and answers.
            let _ = daemon.events.send(Stop::Delete {
                drain,
                client: stream,
            });
            return;
        }
    };
    let _ = control::send_line(&mut stream, &reply);
}

/// The refusal of a `wbctl delete` of a device in use: nothing changed, and who uses it.
fn in_use(daemon: &Daemon, users: &[String]) -> Reply {
    Reply::Error {
        error: format!(
            "{}: refused: {} is in use: {}. Nothing was changed. Unmount it, log the initiators \
             out, stop what has it open, then delete; --force deletes it anyway (its users' I/O \
             then fails)",
            daemon.spec.name,
            daemon.device,
            users.join("; ")
        ),
    }
}

/// How long `wbctl replace` waits for the cache to be written back (it goes to passthrough
/// first, so the new leg needs no copy of live segments).
const REPLACE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn replace_leg(daemon: &Daemon, old: &Path, new: &Path) -> Reply {
    let name = &daemon.spec.name;
    let error = |e: String| Reply::Error {
        error: format!("{name}: {e}"),
    };
    let caches = daemon.caches.lock().clone();
    let Some(index) = caches
        .iter()
        .position(|c| same_file(c, old) || c.as_path() == old)
    else {
        return error(format!(
            "{} is not a cache leg of this device (legs: {})",
            old.display(),
            display_paths(&caches)
        ));
    };
    if same_file(new, &daemon.spec.backing) || caches.iter().any(|c| same_file(c, new)) {
        return error(format!(
            "{}: already part of this device (its backing device or a cache leg)",
            new.display()
        ));
    }
    // One lookup of `new`: the hold (which also proves it unused), then the leg through it.
    let hold = match hold_checked(new, "new cache device", None) {
        Ok(hold) => hold,
        Err(e) => return error(e.to_string()),
    };
    let ours = std::iter::once(&daemon.spec.backing).chain(&caches);
    let new_node = DeviceNode::of_file(&hold).ok();
    if ours
        .filter_map(|p| std::fs::metadata(p).ok().as_ref().and_then(DeviceNode::of))
        .any(|n| Some(n) == new_node)
    {
        return error(format!(
            "{}: already part of this device (its backing device or a cache leg)",
            new.display()
        ));
    }
    let device = match FileDevice::reopen(&hold, new, true) {
        Ok(d) => d,
        Err(e) => return error(format!("{}: opening: {e}", new.display())),
    };
    log::info!(
        "{name}: replacing cache leg {index} ({}) by {}",
        old.display(),
        new.display()
    );
    if let Err(e) = daemon
        .engine
        .replace_leg(index, Arc::new(device), REPLACE_TIMEOUT)
    {
        return error(format!("replacing leg {index}: {e}"));
    }
    daemon.caches.lock()[index] = new.to_path_buf();
    daemon.replaced_holds.lock().push(hold);
    if let Err(e) = daemon.store_state() {
        log::error!("writing the state file: {e}");
    }
    Reply::Done {
        message: format!(
            "{name}: cache leg {index} is now {} (was {}); mode {}",
            new.display(),
            old.display(),
            daemon.engine.status().mode
        ),
    }
}

fn set_knobs(daemon: &Daemon, knobs: &[(String, String)]) -> Reply {
    let mut policy = daemon.policy.lock();
    let next = match apply_knobs(&policy, knobs) {
        Ok(next) => next,
        Err(e) => {
            return Reply::Error {
                error: format!("{}: {e}; nothing changed", daemon.spec.name),
            }
        }
    };
    daemon.engine.set_policy(next.clone());
    *policy = next;
    drop(policy);
    if let Err(e) = daemon.store_state() {
        log::error!("writing the state file: {e}");
    }
    let text = knobs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    log::info!("{}: set {text}", daemon.spec.name);
    Reply::Done {
        message: format!("{}: set {text}", daemon.spec.name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_apply_in_any_order_all_or_none() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let p = apply_knobs(
            &Policy::default(),
            &pairs(&[("pressure_start", "0.95"), ("pressure_full", "1.0")]),
        )
        .unwrap();
        assert_eq!(p.pressure_start, 0.95);
        assert_eq!(p.pressure_full, 1.0);
        let e = apply_knobs(
            &Policy::default(),
            &pairs(&[("low_watermark", "20%"), ("nonsense", "1")]),
        )
        .unwrap_err();
        assert!(e.0.contains("unknown knob"), "{e}");
        assert!(apply_knobs(&Policy::default(), &pairs(&[("pressure_start", "0.95")])).is_err());
    }

    #[test]
    fn status_knobs_are_typed() {
        let policy = Policy {
            idle_aware: false,
            max_bandwidth_bytes_per_sec: Some(200 << 20),
            ..Policy::default()
        };
        let knobs = typed_knob_map(&policy);
        assert_eq!(knobs["idle_aware"], serde_json::json!(false));
        assert_eq!(knobs["max_bandwidth_mib"], serde_json::json!(200));
        assert_eq!(
            knobs["pressure_start"],
            serde_json::json!(policy.pressure_start)
        );
        assert_eq!(knobs["pressure_curve"], serde_json::json!("linear"));
        assert_eq!(knobs.len(), knob_map(&policy).len(), "every knob");
        assert_eq!((percent(1, 3), percent(5, 0)), (33.33, 0.0));
    }

    #[test]
    fn a_delete_says_where_the_data_is() {
        let mut st = EngineStatus::default();
        let clean = deleted_message("d", "/dev/ublkb0", &st);
        assert!(
            clean.contains("the cache is clean: the backing device holds all"),
            "{clean}"
        );
        st.dirty_bytes = 4096;
        let dirty = deleted_message("d", "/dev/ublkb0", &st);
        assert!(
            dirty.contains("holds 4096 bytes not yet written back"),
            "{dirty}"
        );
        st.cache_lost = Some(crate::engine::status::CacheLostStatus {
            backing_holds_id: 7,
            lost_from_id: 8,
            lost_through_id: 9,
            lost_dirty_bytes: None,
        });
        let lost = deleted_message("d", "/dev/ublkb0", &st);
        assert!(
            lost.contains("cache was lost") && lost.contains("segment 7"),
            "{lost}"
        );
    }

    #[test]
    fn a_reload_may_not_move_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, b"").unwrap();
            p
        };
        let (b, c0, c1, other) = (file("b"), file("c0"), file("c1"), file("other"));
        let toml = dir.path().join("d0.toml");
        let config = |backing: Option<&Path>, caches: &[&Path]| config::DeviceConfig {
            backing: backing.map(Path::to_path_buf),
            caches: caches.iter().map(|p| p.to_path_buf()).collect(),
            ..Default::default()
        };
        let check =
            |c: &config::DeviceConfig| check_same_devices(&b, &[c0.clone(), c1.clone()], c, &toml);
        assert!(
            check(&config(Some(&b), &[&c1, &c0])).is_ok(),
            "same devices, any order"
        );
        assert!(check(&config(None, &[])).is_ok(), "a file of knobs only");
        let e = check(&config(Some(&other), &[])).unwrap_err();
        assert!(
            e.contains("d0.toml: names other devices") && e.contains("restart"),
            "{e}"
        );
        assert!(check(&config(None, &[&c0, &other])).is_err());
        assert!(check(&config(None, &[&c0])).is_err(), "a leg fewer");
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(
            format_unix_time(u64::MAX),
            "18446744073709551615 s after 1970-01-01 00:00:00 UTC"
        );
    }
}
