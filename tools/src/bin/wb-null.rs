//! `wb-null` — a null ublk target: the transport ceiling.
//!
//! Every READ, WRITE, FLUSH, DISCARD and WRITE_ZEROES is completed at once
//! with its full byte count; nothing is stored. Reads return whatever the
//! per-tag buffer holds (or zeroes with `--zero-reads`). The project's
//! benchmarks compare a writeboost device against this target measured in
//! the same kernel and the same run (CONTRACT §8: ≥ 80 % of its IOPS).
//!
//! It runs in the foreground, prints the block device it made (`/dev/ublkbN`)
//! on stdout as soon as the device is live, and deletes the device on
//! SIGINT/SIGTERM (or when the device is deleted from outside).
//!
//! Copy mode only (no zero copy, no user copy): that is what the writeboost
//! target uses on kernel 6.12.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkFlags, UblkIORes};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

#[derive(Parser, Debug)]
#[command(
    name = "wb-null",
    about = "Null ublk target: completes every request at once (transport ceiling)"
)]
struct Args {
    /// Device size in bytes; K/M/G/T suffixes (powers of 1024) are accepted.
    #[arg(long, short = 's', default_value = "16G", value_parser = parse_size)]
    size: u64,
    /// Number of hardware queues.
    #[arg(long, short = 'q', default_value_t = 1)]
    queues: u16,
    /// Depth of each queue (in-flight requests per queue).
    #[arg(long, short = 'd', default_value_t = 128)]
    depth: u16,
    /// Largest request in bytes (becomes the queue's max_sectors).
    #[arg(long, default_value_t = 512 * 1024)]
    io_buf_bytes: u32,
    /// Device id to ask for; -1 lets the driver choose.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    id: i32,
    /// Fill the buffer of every READ with zeroes (costs a memset per read).
    #[arg(long)]
    zero_reads: bool,
    /// Also write the block device path into this file once it is live.
    #[arg(long)]
    dev_file: Option<std::path::PathBuf>,
}

/// `--size`: a byte count; K/M/G/T (and KiB, KB, ...) are all powers of 1024, and a fraction
/// such as 1.5G is taken. The device is made of 4 KiB pages, so the size is a multiple.
fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = ::parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| format!("bad size {s:?}: {e} (use e.g. 4096, 512M, 16G)"))?;
    if bytes == 0 || bytes % 4096 != 0 {
        return Err(format!("size {s:?} must be a non-zero multiple of 4096"));
    }
    Ok(bytes)
}

/// Result for one request: the full byte count for data-carrying and
/// data-describing ops, 0 for FLUSH (nr_sectors is 0 there), -EINVAL for
/// anything unknown.
#[inline]
fn null_result(op: u32, nr_sectors: u32) -> i32 {
    match op {
        sys::UBLK_IO_OP_READ
        | sys::UBLK_IO_OP_WRITE
        | sys::UBLK_IO_OP_FLUSH
        | sys::UBLK_IO_OP_DISCARD
        | sys::UBLK_IO_OP_WRITE_ZEROES => (nr_sectors << 9) as i32,
        _ => -libc::EINVAL,
    }
}

fn queue_fn(qid: u16, dev: &UblkDev, zero_reads: bool, down: &AtomicBool) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            eprintln!("wb-null: queue {qid}: setup failed: {e}");
            down.store(true, Ordering::SeqCst);
            return;
        }
    };

    queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let res = null_result(op, iod.nr_sectors);
        let buf = &mut bufs[tag as usize];
        if zero_reads && op == sys::UBLK_IO_OP_READ && res > 0 {
            buf.as_mut_slice()[..res as usize].fill(0);
        }
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            eprintln!("wb-null: queue {qid} tag {tag}: complete failed: {e}");
        }
    });
    down.store(true, Ordering::SeqCst);
}

/// Blocks SIGINT/SIGTERM in this thread and in every thread spawned after (so no queue
/// thread's io_uring wait is interrupted by one), and opens a signalfd to take them here.
fn block_signals() -> Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("opening a signalfd for SIGINT/SIGTERM")
}

/// Waits for SIGINT/SIGTERM, or until a queue reports it is down (looked at every 200 ms).
fn wait_for_stop(signals: &SignalFd, down: &AtomicBool) -> Option<i32> {
    loop {
        if down.load(Ordering::SeqCst) {
            return None;
        }
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        // A signal, the timeout or EINTR: whichever, the signalfd and `down` say what to do.
        let _ = poll(&mut fds, PollTimeout::from(200u8));
        if let Ok(Some(info)) = signals.read_signal() {
            return Some(info.ssi_signo as i32);
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.queues == 0 || args.depth == 0 {
        bail!("--queues and --depth must be at least 1");
    }
    if !std::path::Path::new("/dev/ublk-control").exists() {
        bail!("/dev/ublk-control is missing: load the ublk_drv module (modprobe ublk_drv; kernel >= 6.0)");
    }
    // Before any thread is spawned: they all inherit the mask.
    let signals = block_signals()?;
    let ctrl = add_device(&args)?;
    let dev_id = ctrl.dev_info().dev_id;

    let size = args.size;
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        // Volatile cache so FLUSH arrives, FUA so FUA arrives (like writeboost).
        dev.tgt.params.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
        Ok(())
    };

    let down = Arc::new(AtomicBool::new(false));
    let zero_reads = args.zero_reads;
    let q_down = down.clone();
    let q_handler = move |qid: u16, dev: &UblkDev| queue_fn(qid, dev, zero_reads, &q_down);

    let dev_file = args.dev_file.clone();
    let on_live = move |c: &UblkCtrl| serve_until_stopped(c, dev_file, &signals, &down);

    ctrl.run_target(tgt_init, q_handler, on_live)
        .context("running the null target failed")?;
    ctrl.del_dev().ok();
    eprintln!("wb-null: device {dev_id} deleted");
    Ok(())
}

/// Adds the ublk device (ADD_DEV) in copy mode, and checks the kernel kept it so.
fn add_device(args: &Args) -> Result<UblkCtrl> {
    // Copy mode: no UBLK_F_USER_COPY, no zero copy.
    let wanted_flags: u64 = 0;
    let ctrl = UblkCtrlBuilder::default()
        .name("wb-null")
        .id(args.id)
        .nr_queues(args.queues)
        .depth(args.depth)
        .io_buf_bytes(args.io_buf_bytes)
        .ctrl_flags(wanted_flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .context(
            "creating the ublk device (ADD_DEV) failed; is ublk_drv loaded and are we root?",
        )?;

    let info = ctrl.dev_info();
    let got = info.flags;
    if got & wanted_flags != wanted_flags {
        bail!("kernel dropped requested ublk flags: wanted {wanted_flags:#x}, got {got:#x}");
    }
    if got & (sys::UBLK_F_USER_COPY as u64 | sys::UBLK_F_SUPPORT_ZERO_COPY as u64) != 0 {
        bail!("unexpected copy mode flags {got:#x}: wb-null only does copy mode");
    }
    eprintln!(
        "wb-null: dev {} flags {:#x} queues {} depth {} max_io {} size {}",
        info.dev_id, got, info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes, args.size
    );
    Ok(ctrl)
}

/// Once the device is live: prints its path (and writes it to `dev_file`), waits for
/// SIGINT/SIGTERM or for the queues to go down, then stops the device.
fn serve_until_stopped(
    c: &UblkCtrl,
    dev_file: Option<std::path::PathBuf>,
    signals: &SignalFd,
    down: &AtomicBool,
) {
    let bdev = c.get_bdev_path();
    println!("{bdev}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Some(f) = dev_file {
        if let Err(e) = std::fs::write(&f, format!("{bdev}\n")) {
            eprintln!("wb-null: cannot write {}: {e}", f.display());
        }
    }
    match wait_for_stop(signals, down) {
        Some(sig) => eprintln!("wb-null: signal {sig}, stopping {bdev}"),
        None => eprintln!("wb-null: queues are down, stopping {bdev}"),
    }
    if let Err(e) = c.kill_dev() {
        eprintln!("wb-null: stopping {bdev} failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("16g").unwrap(), 16 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(
            parse_size(" 4k ").unwrap(),
            4096,
            "blanks around are ignored"
        );
    }

    /// Blocked in this test's thread only; `raise` sends to this very thread, so the signal
    /// waits in the signalfd and no other test sees it.
    #[test]
    fn a_stop_signal_is_taken_from_the_signalfd() {
        let signals = block_signals().unwrap();
        let down = AtomicBool::new(false);
        nix::sys::signal::raise(Signal::SIGTERM).unwrap();
        assert_eq!(wait_for_stop(&signals, &down), Some(libc::SIGTERM));
        down.store(true, Ordering::SeqCst);
        assert_eq!(wait_for_stop(&signals, &down), None, "the queues are down");
    }

    #[test]
    fn results_are_full_byte_counts() {
        assert_eq!(null_result(sys::UBLK_IO_OP_READ, 8), 4096);
        assert_eq!(null_result(sys::UBLK_IO_OP_WRITE, 1024), 512 * 1024);
        assert_eq!(null_result(sys::UBLK_IO_OP_FLUSH, 0), 0);
        assert_eq!(null_result(0xfe, 8), -libc::EINVAL);
    }
}
