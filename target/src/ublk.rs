//! The kernel glue: exports an `Engine` as `/dev/ublkbN` through libublk, in copy mode (kernel
//! 6.12 has no zero copy). Nothing here knows about the cache: each request becomes one engine
//! call, and the engine's result becomes the request's completion.
//!
//! Shape, and why:
//! - One queue per CPU by default, each served by one thread (`wb-q<i>` in libublk's spawn). The
//!   handler runs the engine call synchronously in the queue thread: a WRITE completes from RAM
//!   (one copy into the RAM buffer under the engine lock), so there is nothing to overlap; a READ
//!   miss or a FLUSH blocks only its own queue, and the other queues keep going.
//! - The device advertises a volatile write cache with FUA (`UBLK_ATTR_VOLATILE_CACHE |
//!   UBLK_ATTR_FUA`), so the kernel sends FLUSH and FUA through (CONTRACT §2).
//! - `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: a killed daemon leaves the device
//!   QUIESCED, a successor re-attaches, and the kernel re-issues what was in flight. The kernel
//!   silently drops flags it does not know, so the granted flags are checked after ADD_DEV.
//!
//! Invariants owned here:
//! - READ and WRITE complete with their full byte count or a negative errno, never a short count.
//! - A request is completed only after the engine call for it returned (the engine decides when
//!   data is acknowledged: RAM for a plain write, durable for FUA and FLUSH).
//! - Once the `RequestGate` holds, no request reaches the engine: the daemon can shut the engine
//!   down under a live device and leave, and the kernel re-issues the requests it still holds
//!   to the next daemon (a stop that leaves the device to the kernel, CONTRACT §6).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkIORes};
use thiserror::Error;

use crate::engine::Engine;

/// Where the kernel's ublk control device lives; its absence means no ublk_drv.
pub const UBLK_CONTROL_PATH: &str = "/dev/ublk-control";
/// libublk exports each device's parameters (queue thread ids, target JSON) here.
pub const UBLKSRV_RUN_DIR: &str = "/run/ublksrvd";
/// Largest request: one segment's worth. Larger requests are split by the block layer.
pub const DEFAULT_IO_BUF_BYTES: u32 = 512 * 1024;
/// Default requests in flight per queue: enough to keep QD32 fio and a filesystem busy without
/// pinning much memory (depth × `DEFAULT_IO_BUF_BYTES` of buffers per queue).
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Upper bound on queues (the kernel's own limit is 4096; more than CPUs helps nobody).
pub const MAX_QUEUES: u16 = 64;
/// Upper bound on depth (the kernel's own limit, UBLK_MAX_QUEUE_DEPTH).
pub const MAX_QUEUE_DEPTH: u16 = 4096;
/// The flags without which the crash-recovery contract of CONTRACT §2 cannot hold.
pub const REQUIRED_CTRL_FLAGS: u64 =
    (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
/// Name shown by `ublk list` and in libublk's JSON.
pub const TARGET_NAME: &str = "writeboost";
/// Largest DISCARD / WRITE_ZEROES the device accepts (4 KiB aligned, below the block layer's
/// 4 GiB bio limit); each one is a single range entry in the log.
const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> 9) & !7;

#[derive(Debug, Error)]
pub enum UblkSetupError {
    #[error(
        "{UBLK_CONTROL_PATH} is missing: load the ublk_drv module (`modprobe ublk_drv`; needs Linux \
         kernel >= 6.0 built with CONFIG_BLK_DEV_UBLK)"
    )]
    NoControlDevice,
    #[error("ublk: {what}: {reason}")]
    Kernel { what: String, reason: String },
    #[error(
        "ublk: the kernel did not grant user recovery (asked for flags {wanted:#x}, got {granted:#x}); \
         a daemon crash could not be recovered without losing in-flight I/O, so refusing to run. \
         Needs Linux >= 6.0 (UBLK_F_USER_RECOVERY_REISSUE)"
    )]
    NoUserRecovery { wanted: u64, granted: u64 },
    #[error("ublk device {dev_id}: {reason}")]
    NotRecoverable { dev_id: u32, reason: String },
}

/// Turns libublk's terse errors into the errno text they carry.
pub fn describe(e: &UblkError) -> String {
    match e {
        UblkError::OtherError(code) | UblkError::UringIOError(code) => {
            std::io::Error::from_raw_os_error(code.saturating_abs()).to_string()
        }
        UblkError::IOError(io) => io.to_string(),
        other => other.to_string(),
    }
}

fn kernel_error(what: impl Into<String>, e: &UblkError) -> UblkSetupError {
    UblkSetupError::Kernel {
        what: what.into(),
        reason: describe(e),
    }
}

/// How to get a ublk device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// ADD_DEV a new device; `-1` lets the kernel pick the id.
    Add { dev_id: i32 },
    /// Take over a QUIESCED device whose daemon died (START/END_USER_RECOVERY).
    Recover { dev_id: u32 },
}

#[derive(Debug, Clone)]
pub struct UblkOptions {
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
    pub attach: Attach,
}

impl UblkOptions {
    pub fn new(attach: Attach) -> Self {
        UblkOptions {
            queues: default_queue_count(),
            depth: DEFAULT_QUEUE_DEPTH,
            io_buf_bytes: DEFAULT_IO_BUF_BYTES,
            attach,
        }
    }
}

/// One queue per CPU, within `MAX_QUEUES`.
pub fn default_queue_count() -> u16 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_QUEUES as usize) as u16
}

/// Fails clearly when the kernel has no ublk driver loaded.
pub fn check_control_device() -> Result<(), UblkSetupError> {
    if std::path::Path::new(UBLK_CONTROL_PATH).exists() {
        Ok(())
    } else {
        Err(UblkSetupError::NoControlDevice)
    }
}

/// The ublk parameters for an engine: size and logical block size from the cache superblock,
/// 4 KiB physical blocks (the cache's block), volatile cache with FUA, and discard.
pub fn device_params(
    device_size_bytes: u64,
    logical_block_size: u32,
    io_buf_bytes: u32,
) -> sys::ublk_params {
    assert!(logical_block_size == 512 || logical_block_size == 4096);
    assert_eq!(device_size_bytes % 4096, 0);
    sys::ublk_params {
        len: std::mem::size_of::<sys::ublk_params>() as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: logical_block_size.trailing_zeros() as u8,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: io_buf_bytes >> 9,
            dev_sectors: device_size_bytes >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            // The kernel supports only single-segment discards from ublk servers.
            max_discard_segments: 1,
            reserved0: 0,
        },
        ..Default::default()
    }
}

/// Creates (ADD_DEV) or takes over (user recovery) the ublk control device. On success the
/// granted flags include `REQUIRED_CTRL_FLAGS`.
pub fn attach(options: &UblkOptions) -> Result<UblkCtrl, UblkSetupError> {
    check_control_device()?;
    std::fs::create_dir_all(UBLKSRV_RUN_DIR).map_err(|e| UblkSetupError::Kernel {
        what: format!("creating {UBLKSRV_RUN_DIR}"),
        reason: e.to_string(),
    })?;
    assert!((1..=MAX_QUEUES).contains(&options.queues));
    assert!((1..=MAX_QUEUE_DEPTH).contains(&options.depth));
    match options.attach {
        Attach::Add { dev_id } => {
            let ctrl = UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(dev_id)
                .nr_queues(options.queues)
                .depth(options.depth)
                .io_buf_bytes(options.io_buf_bytes)
                .ctrl_flags(REQUIRED_CTRL_FLAGS)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|e| kernel_error("adding a device (ADD_DEV)", &e))?;
            let granted = ctrl.dev_info().flags;
            if granted & REQUIRED_CTRL_FLAGS != REQUIRED_CTRL_FLAGS {
                // Dropping the control deletes the device it added.
                drop(ctrl);
                return Err(UblkSetupError::NoUserRecovery {
                    wanted: REQUIRED_CTRL_FLAGS,
                    granted,
                });
            }
            Ok(ctrl)
        }
        Attach::Recover { dev_id } => {
            let ctrl = UblkCtrlBuilder::default()
                .name(TARGET_NAME)
                .id(dev_id as i32)
                .nr_queues(options.queues)
                .depth(options.depth)
                .io_buf_bytes(options.io_buf_bytes)
                .ctrl_flags(REQUIRED_CTRL_FLAGS)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(|e| UblkSetupError::NotRecoverable {
                    dev_id,
                    reason: format!("cannot open it: {} (was it deleted?)", describe(&e)),
                })?;
            let info = ctrl.dev_info();
            if info.flags & REQUIRED_CTRL_FLAGS != REQUIRED_CTRL_FLAGS {
                return Err(UblkSetupError::NotRecoverable {
                    dev_id,
                    reason: format!(
                        "was created without user recovery (flags {:#x})",
                        info.flags
                    ),
                });
            }
            match ctrl.start_user_recover() {
                Ok(r) if r >= 0 => Ok(ctrl),
                Ok(r) => Err(UblkSetupError::NotRecoverable {
                    dev_id,
                    reason: format!(
                        "START_USER_RECOVERY failed: {} (state {}; is its daemon still running?)",
                        std::io::Error::from_raw_os_error(-r),
                        state_name(info.state)
                    ),
                }),
                Err(e) => Err(UblkSetupError::NotRecoverable {
                    dev_id,
                    reason: format!(
                        "START_USER_RECOVERY failed: {} (state {}; is its daemon still running?)",
                        describe(&e),
                        state_name(info.state)
                    ),
                }),
            }
        }
    }
}

/// The block layer's request timeout set on every device: while the daemon lives the ublk
/// driver only re-arms it, but once the daemon is gone it is what notices a queue whose every
/// request the daemon held (no fetch command left to cancel): the kernel then re-queues them
/// and the device can be taken over. The default 30 s would stall a takeover that long.
pub const IO_TIMEOUT_MS: u32 = 5000;

/// Sets `IO_TIMEOUT_MS` on `device` (/dev/ublkbN); a failure only costs a slower takeover.
pub fn shorten_io_timeout(device: &str) {
    let name = device.trim_start_matches("/dev/");
    let path = format!("/sys/block/{name}/queue/io_timeout");
    if let Err(e) = std::fs::write(&path, IO_TIMEOUT_MS.to_string()) {
        log::warn!("{path}: cannot set {IO_TIMEOUT_MS} ms: {e} (a takeover may wait 30 s)");
    }
}

/// Removes ublk device `dev_id` whose daemon is gone (`wbctl delete --force` of a dead device).
/// Returns the state it was in.
pub fn delete_device(dev_id: u32) -> Result<&'static str, UblkSetupError> {
    check_control_device()?;
    let ctrl = UblkCtrl::new_simple(dev_id as i32).map_err(|e| UblkSetupError::NotRecoverable {
        dev_id,
        reason: format!("cannot open it: {}", describe(&e)),
    })?;
    let state = state_name(ctrl.dev_info().state);
    ctrl.del_dev()
        .map_err(|e| kernel_error(format!("deleting device {dev_id}"), &e))?;
    Ok(state)
}

pub fn state_name(state: u16) -> &'static str {
    match state as u32 {
        sys::UBLK_S_DEV_DEAD => "DEAD",
        sys::UBLK_S_DEV_LIVE => "LIVE",
        sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
        sys::UBLK_S_DEV_FAIL_IO => "FAIL_IO",
        _ => "UNKNOWN",
    }
}

/// Serves `engine` on the device of `ctrl` until the device is stopped (by `on_live` calling
/// `ctrl.kill_dev()`, or from outside). `on_live` runs in the calling thread once the device is
/// live; when it returns, this waits for the queue threads to finish. `queues_down` is set as
/// soon as any queue thread stops (the device is going away).
pub fn serve<W>(
    ctrl: &UblkCtrl,
    engine: Arc<Engine>,
    gate: Arc<RequestGate>,
    queues_down: Arc<AtomicBool>,
    on_live: W,
) -> Result<(), UblkSetupError>
where
    W: FnOnce(&UblkCtrl) + Send + Sync + 'static,
{
    let size = engine.device_size_bytes();
    let lbs = engine.geometry().logical_block_size;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = size;
        dev.tgt.params = device_params(size, lbs, dev.dev_info.max_io_buf_bytes);
        Ok(())
    };
    let q_engine = engine.clone();
    let q_down = queues_down.clone();
    let q_handler = move |qid: u16, dev: &UblkDev| {
        let _down_when_done = SetOnDrop(q_down.clone());
        serve_queue(qid, dev, &q_engine, &gate);
    };
    let r = ctrl
        .run_target(tgt_init, q_handler, on_live)
        .map_err(|e| kernel_error("starting the device", &e))?;
    if r < 0 {
        return Err(UblkSetupError::Kernel {
            what: "starting the device".into(),
            reason: std::io::Error::from_raw_os_error(-r).to_string(),
        });
    }
    Ok(())
}

/// One queue thread: fetch requests, run each through the engine, complete it.
fn serve_queue(qid: u16, dev: &UblkDev, engine: &Engine, gate: &RequestGate) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            log::error!("ublk queue {qid}: setup failed: {}", describe(&e));
            return;
        }
    };
    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let buf = &mut bufs[tag as usize];
        let _admitted = gate.admit();
        let res = handle_request(
            engine,
            iod.op_flags,
            iod.start_sector,
            iod.nr_sectors,
            buf.as_mut_slice(),
        );
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            log::error!(
                "ublk queue {qid} tag {tag}: completing failed: {}",
                describe(&e)
            );
        }
    });
    log::info!("ublk queue {qid}: stopped");
}

/// Runs one request against the engine; returns what the request completes with: the byte
/// count for READ and WRITE, 0 for the others, or a negative errno.
pub fn handle_request(
    engine: &Engine,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let op = op_flags & 0xff;
    let offset = start_sector << 9;
    let len = (nr_sectors as usize) << 9;
    let result = match op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if len > buf.len() => {
            return -libc::EINVAL;
        }
        sys::UBLK_IO_OP_READ => engine.read(offset, &mut buf[..len]),
        sys::UBLK_IO_OP_WRITE => {
            let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
            engine.write(offset, &buf[..len], fua)
        }
        sys::UBLK_IO_OP_FLUSH => engine.flush(),
        sys::UBLK_IO_OP_DISCARD => engine.discard(offset, len as u64),
        sys::UBLK_IO_OP_WRITE_ZEROES => engine.write_zeroes(offset, len as u64),
        _ => return -libc::EOPNOTSUPP,
    };
    match result {
        // READ and WRITE complete with their byte count (at most the I/O buffer, 512 KiB). The
        // others complete with 0: a DISCARD of 2 GiB or more would overflow an i32 byte count
        // into a negative result, which the kernel takes for an error.
        Ok(()) if matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) => len as i32,
        Ok(()) => 0,
        // A FLUSH carries no range (the kernel sends sector -1): name it as what it is.
        Err(e) if op == sys::UBLK_IO_OP_FLUSH => {
            log::error!("FLUSH failed: {e}");
            -e.errno()
        }
        Err(e) => {
            log::error!("request op {op} at byte {offset} length {len}: {e}");
            -e.errno()
        }
    }
}

/// Between the kernel's requests and the engine: lets them through until `hold`, then keeps
/// every later one out for good — the queue thread that picked it up waits here and never
/// completes it, so the kernel still owns it and (with `UBLK_F_USER_RECOVERY_REISSUE`) re-issues
/// it to the next daemon. `hold` returns once every request let through has left the engine:
/// from then on nothing touches the engine through the device. (libublk sends completions in
/// batches: one queued before the hold may reach the kernel after it — its engine call is
/// done — and one queued by a thread that then blocks here never does: the kernel re-issues
/// that request, which is harmless, as it was never acknowledged and every request is
/// idempotent.)
///
/// The open gate costs two atomic operations per request (no lock on the I/O path): `admit`
/// counts itself in and then looks at `holding`, `hold` raises `holding` and then looks at the
/// count — with sequentially consistent order one of the two sees the other.
#[derive(Default)]
pub struct RequestGate {
    holding: AtomicBool,
    inside: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

/// A request let through the gate; leaving (drop) counts it out after its completion.
pub struct Admitted<'a>(&'a RequestGate);

/// How often `hold` looks at the count again (a wake-up may race with its wait).
const GATE_POLL: Duration = Duration::from_millis(10);

impl RequestGate {
    /// Lets a request through, or, once the gate holds, waits for ever.
    pub fn admit(&self) -> Admitted<'_> {
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.holding.load(Ordering::SeqCst) {
            self.leave();
            let mut guard = self.lock.lock();
            loop {
                self.changed.wait(&mut guard);
            }
        }
        Admitted(self)
    }

    /// Closes the gate and waits until every request let through has left, or `limit` passed;
    /// says whether they all left.
    pub fn hold(&self, limit: Duration) -> bool {
        self.holding.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + limit;
        let mut guard = self.lock.lock();
        while self.inside.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            self.changed.wait_for(&mut guard, GATE_POLL);
        }
        true
    }

    fn leave(&self) {
        let before = self.inside.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "a request left the gate twice");
        if self.holding.load(Ordering::SeqCst) {
            let _guard = self.lock.lock();
            self.changed.notify_all();
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Sets an `AtomicBool` when dropped, so a queue thread that unwinds still reports it is down.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hold` waits for the requests inside; once it returned, no request gets through.
    #[test]
    fn a_held_gate_lets_nothing_through() {
        use std::sync::mpsc;
        let gate = Arc::new(RequestGate::default());
        let first = gate.admit();
        let second = gate.admit();
        assert!(
            !gate.hold(Duration::from_millis(50)),
            "hold said every request left while two were inside"
        );
        let (held_tx, held_rx) = mpsc::channel();
        let holder = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                held_tx.send(gate.hold(Duration::from_secs(600))).unwrap();
            })
        };
        drop(first);
        assert!(
            held_rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "hold returned while a request was inside"
        );
        drop(second);
        assert!(held_rx.recv().unwrap(), "hold gave up although both left");
        holder.join().unwrap();
        let (passed_tx, passed_rx) = mpsc::channel();
        let late = gate.clone();
        // Never joined: a request after the hold waits for ever, like the queue thread would.
        std::thread::spawn(move || {
            let _admitted = late.admit();
            let _ = passed_tx.send(());
        });
        assert!(
            passed_rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a request got through a held gate"
        );
    }

    #[test]
    fn params_follow_the_cache() {
        let p = device_params(1 << 30, 512, DEFAULT_IO_BUF_BYTES);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, 1024);
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_sectors % 8, 0);
        let p = device_params(1 << 30, 4096, DEFAULT_IO_BUF_BYTES);
        assert_eq!(p.basic.logical_bs_shift, 12);
    }

    /// An engine over files in `dir`: two 32 MiB legs, an 8 GiB (sparse) backing file.
    fn engine_in(dir: &std::path::Path) -> Engine {
        use crate::device::{Device, FileDevice};
        let file = |name: &str, size: u64| -> Arc<dyn Device> {
            let path = dir.join(name);
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            Arc::new(FileDevice::open(&path).unwrap())
        };
        let legs = vec![file("leg0", 32 << 20), file("leg1", 32 << 20)];
        let backing = file("backing", 8 << 30);
        let options = crate::open::create::FormatOptions {
            logical_block_size: 512,
            force: false,
        };
        crate::open::create::format(&legs, backing.as_ref(), "test-backing", &options).unwrap();
        crate::open::recover::open(
            legs,
            backing,
            "test-backing",
            crate::open::recover::OpenOptions::new(dir.join("buf")),
        )
        .unwrap()
    }

    #[test]
    fn requests_map_onto_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine_in(dir.path());
        let mut buf = vec![0u8; DEFAULT_IO_BUF_BYTES as usize];
        let op = |engine: &Engine, op: u32, sector: u64, sectors: u32, buf: &mut [u8]| {
            handle_request(engine, op, sector, sectors, buf)
        };
        // WRITE 8 KiB at sector 16, then READ it back: full byte counts both ways.
        buf[..8192].fill(0xab);
        assert_eq!(op(&engine, sys::UBLK_IO_OP_WRITE, 16, 16, &mut buf), 8192);
        buf.fill(0);
        assert_eq!(op(&engine, sys::UBLK_IO_OP_READ, 16, 16, &mut buf), 8192);
        assert!(buf[..8192].iter().all(|&b| b == 0xab));
        // A 512-byte write (FUA) inside that range.
        buf[..512].fill(0xcd);
        let fua = sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA;
        assert_eq!(op(&engine, fua, 17, 1, &mut buf), 512);
        assert_eq!(op(&engine, sys::UBLK_IO_OP_READ, 16, 4, &mut buf), 2048);
        assert!(buf[..512].iter().all(|&b| b == 0xab));
        assert!(buf[512..1024].iter().all(|&b| b == 0xcd));
        assert!(buf[1024..2048].iter().all(|&b| b == 0xab));
        let status = engine.status();
        assert_eq!(status.writes, 2);
        assert!(status.flushes >= 1, "FUA flushes");
        // FLUSH completes with 0 bytes.
        assert_eq!(op(&engine, sys::UBLK_IO_OP_FLUSH, 0, 0, &mut buf), 0);
        // DISCARD and WRITE_ZEROES: the range reads back as zeroes.
        assert_eq!(op(&engine, sys::UBLK_IO_OP_DISCARD, 16, 8, &mut buf), 0);
        assert_eq!(
            op(&engine, sys::UBLK_IO_OP_WRITE_ZEROES, 24, 8, &mut buf),
            0
        );
        buf.fill(0xff);
        assert_eq!(op(&engine, sys::UBLK_IO_OP_READ, 16, 16, &mut buf), 8192);
        assert!(buf[..8192].iter().all(|&b| b == 0));
        // The largest discard the device accepts (mkfs discards whole devices): more than
        // i32::MAX bytes, yet it completes with 0, never a negative (error) count.
        assert!((MAX_DISCARD_SECTORS as u64) << 9 > i32::MAX as u64);
        assert_eq!(
            op(
                &engine,
                sys::UBLK_IO_OP_DISCARD,
                0,
                MAX_DISCARD_SECTORS,
                &mut buf
            ),
            0
        );
        assert_eq!(op(&engine, sys::UBLK_IO_OP_READ, 16, 16, &mut buf), 8192);
        assert!(buf[..8192].iter().all(|&b| b == 0));
        assert_eq!(
            handle_request(&engine, sys::UBLK_IO_OP_DISCARD, 0, 0, &mut buf),
            0
        );
        // Beyond the end, larger than the buffer, unknown ops: errors, never short counts.
        let end_sector = engine.device_size_bytes() >> 9;
        assert_eq!(
            op(&engine, sys::UBLK_IO_OP_WRITE, end_sector, 8, &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            op(&engine, sys::UBLK_IO_OP_READ, 0, 2048, &mut buf[..4096]),
            -libc::EINVAL
        );
        assert_eq!(op(&engine, 0x7f, 0, 8, &mut buf), -libc::EOPNOTSUPP);
        engine.shutdown().unwrap();
    }

    #[test]
    fn required_flags_are_recovery_with_reissue() {
        assert_eq!(REQUIRED_CTRL_FLAGS, 8 | 16);
    }
}
