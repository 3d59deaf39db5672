//! Shared test utilities: simulated devices that lose power, tear writes and fail, a byte model
//! of the exported device, and helpers to build an engine over them. Crash and fault oracles live
//! here once, not per test.

pub mod gate;
pub mod hooked;
pub mod model;
pub mod simdisk;
pub mod vm;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use gate::Gate;
pub use hooked::{Hooked, IoOp};
pub use model::Model;
pub use simdisk::SimDisk;
use wb_target::{Device, Engine, FormatOptions, OpenOptions};

/// The identity string the tests record for their simulated backing devices.
pub const BACKING_IDENTITY: &str = "sim:backing";

/// A cache set of simulated devices.
pub struct Rig {
    pub legs: Vec<Arc<SimDisk>>,
    pub backing: Arc<SimDisk>,
    pub buffer_dir: tempfile::TempDir,
}

impl Rig {
    /// `legs` cache legs of `cache_segments` segments over a backing device of `backing_bytes`.
    pub fn new(legs: usize, cache_segments: u64, backing_bytes: u64, lbs: u32) -> Rig {
        let cache_bytes =
            logfmt::SEGMENT_AREA_OFFSET + cache_segments * logfmt::SEGMENT_SIZE_BYTES as u64;
        let rig = Rig {
            legs: (0..legs)
                .map(|i| SimDisk::new(&format!("sim:leg{i}"), cache_bytes))
                .collect(),
            backing: SimDisk::new("sim:backing", backing_bytes),
            buffer_dir: tempfile::tempdir().expect("tempdir"),
        };
        // Devices are never blank in real life: old content must not pass for valid data.
        for (i, disk) in rig.legs.iter().chain([&rig.backing]).enumerate() {
            disk.fill_garbage(i as u64 + 1);
        }
        wb_target::format(
            &rig.leg_devices(),
            rig.backing.as_ref(),
            BACKING_IDENTITY,
            &FormatOptions {
                logical_block_size: lbs,
                force: false,
            },
        )
        .expect("format");
        rig
    }

    pub fn leg_devices(&self) -> Vec<Arc<dyn Device>> {
        self.legs
            .iter()
            .map(|l| l.clone() as Arc<dyn Device>)
            .collect()
    }

    pub fn buffer_path(&self) -> std::path::PathBuf {
        self.buffer_dir.path().join("cache.buf")
    }

    pub fn options(&self) -> OpenOptions {
        let mut o = OpenOptions::new(self.buffer_path());
        o.ram_buffers = 4;
        o.sync_interval = Duration::from_millis(200);
        o
    }

    pub fn open(&self) -> Engine {
        self.open_with(self.options())
    }

    pub fn open_with(&self, options: OpenOptions) -> Engine {
        wb_target::open(
            self.leg_devices(),
            self.backing.clone(),
            BACKING_IDENTITY,
            options,
        )
        .expect("open engine")
    }

    /// The host lost power: every device forgets what it did not flush (and may tear the writes
    /// in flight), and the tmpfs buffer file is gone.
    pub fn power_cut(&self, rng: &mut impl rand::Rng) {
        // Every device loses power at the same instant, before any is examined.
        for disk in self.legs.iter().chain([&self.backing]) {
            disk.freeze();
        }
        for leg in &self.legs {
            leg.power_cut(rng);
        }
        // A disk writes a sector atomically: a torn passthrough write keeps whole sectors (the
        // legs may tear anywhere; their CRCs find it).
        self.backing
            .power_cut_atomic(rng, logfmt::SECTOR_SIZE_BYTES);
        // tmpfs: the buffer file and what lives beside it (a FLUSH error owed to the client).
        let _ = std::fs::remove_file(self.buffer_path());
        let _ = std::fs::remove_file(self.buffer_path().with_extension("flush-error"));
    }

    /// Options with writeback off: what is logged stays in the cache.
    pub fn no_writeback(&self) -> OpenOptions {
        let mut options = self.options();
        options.writeback = None;
        options
    }

    /// Options writing back all the time (no idle wait).
    pub fn writing_back_always(&self) -> OpenOptions {
        let mut options = self.options();
        options.writeback = Some(writeback::Policy {
            idle_after: Duration::ZERO,
            ..Default::default()
        });
        options
    }

    /// Kills (or revives) every leg.
    pub fn kill_legs(&self, dead: bool) {
        for leg in &self.legs {
            leg.faults
                .dead
                .store(dead, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Makes the engine's fault file unwritable (a folder where its temp file goes) until the
    /// returned guard is dropped: a daemon killed before the file's fsync, or a full disk.
    pub fn block_fault_file(&self, engine: &Engine) -> FaultFileBlocked {
        let file = engine
            .status()
            .fault_file
            .expect("the rig's engines keep a fault file");
        let tmp = std::path::PathBuf::from(file).with_extension("faults.tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join("x"), b"x").unwrap();
        FaultFileBlocked { tmp }
    }

    /// Blocks 0 and 1 written and flushed around the death of leg `leg`; returns once the
    /// engine has written back and runs in passthrough (degraded and clean).
    pub fn fail_leg_until_passthrough(&self, engine: &Engine, leg: usize) {
        engine.write(0, &block_of(0x01), false).unwrap();
        engine.flush().unwrap();
        self.legs[leg]
            .faults
            .dead
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let block = logfmt::BLOCK_SIZE_BYTES as u64;
        engine.write(block, &block_of(0x02), false).unwrap();
        engine.flush().unwrap();
        wait_for_mode(engine, "passthrough");
    }

    /// Brings the devices back on after `power_cut`.
    pub fn power_on(&self) {
        for leg in &self.legs {
            leg.power_on();
        }
        self.backing.power_on();
    }
}

/// See `Rig::block_fault_file`.
pub struct FaultFileBlocked {
    tmp: std::path::PathBuf,
}

impl FaultFileBlocked {
    /// The fault file is writable again.
    pub fn unblock(self) {}
}

impl Drop for FaultFileBlocked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// A 4 KiB block of one byte.
pub fn block_of(byte: u8) -> Vec<u8> {
    vec![byte; logfmt::BLOCK_SIZE_BYTES]
}

/// One 4 KiB block read through the engine.
pub fn read_block(engine: &Engine, block: u64) -> Vec<u8> {
    let mut buf = vec![0u8; logfmt::BLOCK_SIZE_BYTES];
    let bytes = logfmt::BLOCK_SIZE_BYTES as u64;
    engine.read(block * bytes, &mut buf).unwrap();
    buf
}

/// Removes a file if present (tests reuse paths).
pub fn remove_if_exists(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Runs `f` on a thread; fails the test if it does not finish within `secs`.
pub fn finishes_within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

/// Waits (at most a minute) until the engine reports `mode`.
pub fn wait_for_mode(engine: &Engine, mode: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while engine.status().mode != mode {
        let status = engine.status();
        assert!(
            std::time::Instant::now() < deadline,
            "mode stayed {} (waiting for {mode}): {:?}, legs {:?}",
            status.mode,
            status.segments,
            status.legs
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
