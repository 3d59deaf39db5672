//! The fault campaign (docs/CONTRACT.md "Failures"): seeded random cases that cross faults with
//! restarts on one engine over simulated devices. Each case interleaves writes (some FUA), FLUSH,
//! DISCARD and verified reads with: one leg failing for good or transiently (healthy again at
//! the next restart), both legs failing (for good or transiently), `replace`, a daemon crash
//! (threads stopped, the RAM buffer file adopted), a power cut (every device keeps a random part
//! of what it did not flush, the buffer file is gone) and a clean restart.
//!
//! After every step the model is checked: every read; every FLUSH/FUA result (an error only where
//! a cache loss took what it covers; after a loss, a FLUSH that succeeds must have made the whole
//! device durable on the backing device); after a crash every acknowledged write; after a power
//! cut every write acknowledged before a completed FLUSH; after a cache loss the backing device
//! passes the cache-loss oracle and no later start brings the lost log back.
//!
//! `WB_SIM_CASES=N` runs N cases (default below) from seed `WB_SIM_FIRST` (default 0) on
//! `WB_SIM_THREADS` threads (default: one per CPU); `WB_SIM_SEED=S` runs the one case S,
//! `WB_SIM_TRACE=1` prints every step. A failure prints the seed, the step and the history of
//! the sector an oracle names. Threads make the engine's timing vary: a seed fixes the sequence
//! of operations and faults, not the interleaving, so a failing seed may need a few runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wb_target::{Device, Engine, OpenOptions};
use wb_tests::{wait_for_mode, Model, Rig, SimDisk};

const BACKING_BYTES: u64 = 1 << 20;
/// About 40 s on two cores in a release build.
const DEFAULT_CASES: u64 = 1000;

/// How a leg is failing, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegFault {
    None,
    /// Dead until the next restart, then healthy again (an HBA reset, a loose cable).
    Transient,
    /// Dead for good.
    Permanent,
}

struct Case {
    seed: u64,
    step: usize,
    rng: StdRng,
    rig: Rig,
    engine: Option<Engine>,
    model: Model,
    faults: Vec<LegFault>,
    writeback: writeback::Policy,
    lbs: u64,
    /// The engine reports a cache loss (now or recorded by an earlier run).
    lost: bool,
    /// Both legs failed for good: the case ends at the next restart.
    over: bool,
    /// What was done, for the report of a failure: (step, what, byte offset, bytes).
    history: Vec<(usize, String, u64, u64)>,
    /// The write issued as every leg failed: logged and lost, or (if the log was closing for
    /// passthrough) written to the backing device after the loss: either is right.
    racing_the_loss: Option<std::ops::Range<usize>>,
}

impl Case {
    fn new(seed: u64) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let legs = if rng.gen_bool(0.85) { 2 } else { 1 };
        let lbs = if rng.gen_bool(0.25) { 512 } else { 4096 };
        let rig = Rig::new(legs, 16, BACKING_BYTES, lbs as u32);
        let model = Model::from_image(rig.backing.snapshot());
        let writeback = match rng.gen_range(0..3) {
            // Held back: only a cache filling up writes back (no writeback at all would leave
            // writers waiting for ever once the ring is full).
            0 => Some(writeback::Policy {
                idle_aware: false,
                low_watermark: 0.99,
                age_threshold: Duration::from_secs(3600),
                ..Default::default()
            }),
            1 => Some(writeback::Policy::default()),
            _ => Some(writeback::Policy {
                idle_after: Duration::ZERO,
                ..Default::default()
            }),
        }
        .expect("a policy");
        let mut case = Case {
            seed,
            step: 0,
            rng,
            rig,
            engine: None,
            model,
            faults: vec![LegFault::None; legs],
            writeback,
            lbs,
            lost: false,
            over: false,
            history: Vec::new(),
            racing_the_loss: None,
        };
        case.engine = Some(case.open().expect("first open"));
        case
    }

    fn at(&self) -> String {
        format!("seed {} step {}", self.seed, self.step)
    }

    fn note(&mut self, what: String, offset: u64, len: u64) {
        self.history.push((self.step, what, offset, len));
    }

    /// Fails the case on an oracle's verdict, with the history of the sector it names.
    fn verdict(&self, what: &str, result: Result<(), String>, image: &[u8]) {
        let Err(e) = result else {
            return;
        };
        let sector: Option<u64> = e
            .strip_prefix("sector ")
            .and_then(|rest| rest.split(':').next())
            .and_then(|n| n.parse().ok());
        let mut report = format!("{}: {what}: {e}", self.at());
        if let Some(sector) = sector {
            let byte = sector * 512;
            report += &format!(
                "\n  the device holds {:#x}.. there, the model {:#x}..; what touched it:",
                image[byte as usize], self.model.data[byte as usize]
            );
            for (step, op, offset, len) in &self.history {
                if *offset <= byte && byte < offset + len {
                    report += &format!("\n  step {step}: {op} ({offset}+{len})");
                }
            }
        }
        panic!("{report}");
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("an engine is open")
    }

    fn options(&self) -> OpenOptions {
        let mut o = self.rig.options();
        o.sync_interval = Duration::from_millis(20);
        o.writeback = Some(self.writeback.clone());
        o
    }

    fn open(&self) -> wb_target::Result<Engine> {
        wb_target::open(
            self.rig.leg_devices(),
            self.rig.backing.clone(),
            wb_tests::BACKING_IDENTITY,
            self.options(),
        )
    }

    /// A random extent in logical blocks: (byte offset, bytes).
    fn extent(&mut self) -> (u64, u64) {
        let units = BACKING_BYTES / self.lbs;
        let len = self.rng.gen_range(1..=16u64.min(units));
        let first = self.rng.gen_range(0..=units - len);
        (first * self.lbs, len * self.lbs)
    }

    fn run(&mut self, steps: usize) {
        for step in 0..steps {
            self.step = step;
            if self.over {
                return;
            }
            let roll = self.rng.gen_range(0..100);
            if std::env::var_os("WB_SIM_TRACE").is_some() {
                let status = self.engine().status();
                eprintln!(
                    "step {step}: roll {roll}; mode {} lost {} faults {:?} segments {:?}",
                    status.mode, self.lost, self.faults, status.segments
                );
            }
            match roll {
                0..=39 => self.write(),
                40..=49 => self.flush(),
                50..=54 => self.discard(),
                55..=71 => self.read(),
                72..=77 => self.fail_one_leg(),
                78..=80 => self.lose_every_leg(),
                81..=83 => self.replace(),
                84..=89 => self.restart(Restart::DaemonCrash),
                90..=95 => self.restart(Restart::PowerCut),
                _ => self.restart(Restart::Clean),
            }
        }
        if !self.over {
            self.restart(Restart::DaemonCrash);
        }
    }

    fn write(&mut self) {
        let (offset, len) = self.extent();
        let fill: u8 = self.rng.gen();
        let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8) | 1).collect();
        let fua = self.rng.gen_bool(0.15);
        let result = self.engine().write(offset, &data, fua);
        if let Err(e) = result {
            panic!("{}: write at {offset} (fua {fua}) failed: {e}", self.at());
        }
        self.model.write(offset as usize, &data);
        self.note(
            format!("write{} fill {fill:#x}", if fua { " FUA" } else { "" }),
            offset,
            len,
        );
        if fua {
            self.check_durable_when_lost("a FUA write");
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.engine().flush() {
            panic!("{}: FLUSH failed with no cache loss: {e}", self.at());
        }
        self.model.flush();
        self.note("FLUSH".into(), 0, BACKING_BYTES);
        self.check_durable_when_lost("a FLUSH");
    }

    /// With no leg in use, a FLUSH or FUA that succeeded made everything durable on the backing
    /// device (a FUA write only itself, but nothing else is unflushed in these cases: every
    /// passthrough write is followed by this check).
    fn check_durable_when_lost(&self, what: &str) {
        if self.lost && self.model.flush_count() > 0 {
            let durable = self.rig.backing.durable_snapshot();
            if let Err(e) = self.model.check_after_power_cut(&durable) {
                panic!(
                    "{}: {what} succeeded after the cache loss but the backing device does not \
                     hold it durably: {e}",
                    self.at()
                );
            }
        }
    }

    fn discard(&mut self) {
        let (offset, len) = self.extent();
        if let Err(e) = self.engine().discard(offset, len) {
            panic!("{}: discard failed: {e}", self.at());
        }
        self.model.zero(offset as usize, len as usize);
        self.note("discard".into(), offset, len);
    }

    fn read(&mut self) {
        let (offset, len) = self.extent();
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = self.engine().read(offset, &mut buf) {
            panic!("{}: read at {offset} failed: {e}", self.at());
        }
        let expected = &self.model.data[offset as usize..(offset + len) as usize];
        assert!(
            buf == expected,
            "{}: read at byte {offset} ({len} bytes) differs from the model",
            self.at()
        );
    }

    fn full_read(&self) -> Vec<u8> {
        let mut image = vec![0u8; BACKING_BYTES as usize];
        if let Err(e) = self.engine().read(0, &mut image) {
            panic!("{}: full read failed: {e}", self.at());
        }
        image
    }

    fn healthy_legs(&self) -> Vec<usize> {
        let status = self.engine().status();
        (0..self.faults.len())
            .filter(|&i| status.legs[i].healthy && self.faults[i] == LegFault::None)
            .collect()
    }

    /// One leg of two fails (never the last one: that is `lose_every_leg`).
    fn fail_one_leg(&mut self) {
        let healthy = self.healthy_legs();
        if self.lost || healthy.len() < 2 {
            return;
        }
        let leg = healthy[self.rng.gen_range(0..healthy.len())];
        self.note(format!("leg {leg} fails"), 0, BACKING_BYTES);
        self.faults[leg] = if self.rng.gen_bool(0.5) {
            LegFault::Transient
        } else {
            LegFault::Permanent
        };
        self.rig.legs[leg]
            .faults
            .dead
            .store(true, Ordering::Relaxed);
    }

    /// Every leg still in use fails; a write and a FLUSH make the engine notice.
    fn lose_every_leg(&mut self) {
        if self.lost {
            return;
        }
        let transient = self.rng.gen_bool(0.6);
        // In passthrough (degraded and clean) nothing lives on the legs: their death loses
        // nothing and goes unnoticed until a restart finds them.
        let in_passthrough = self.engine().status().mode == "passthrough";
        self.note("every leg fails".into(), 0, BACKING_BYTES);
        self.racing_the_loss = None;
        for (i, leg) in self.rig.legs.iter().enumerate() {
            if self.faults[i] == LegFault::None {
                self.faults[i] = if transient {
                    LegFault::Transient
                } else {
                    LegFault::Permanent
                };
            }
            leg.faults.dead.store(true, Ordering::Relaxed);
        }
        if in_passthrough {
            return;
        }
        // Whole 4 KiB blocks: a partial block would be merged with its cached copy, read from
        // the dead legs (that write fails, honestly, and the loss goes unnoticed).
        let block = logfmt::BLOCK_SIZE_BYTES as u64;
        let offset = self.rng.gen_range(0..BACKING_BYTES / block) * block;
        let len = block;
        let data = vec![0xee; len as usize];
        self.engine().write(offset, &data, false).unwrap();
        self.model.write(offset as usize, &data);
        self.note("every leg fails; a write".into(), offset, len);
        let flushed = self.engine().flush();
        wait_for_mode(self.engine(), "passthrough");
        if self.engine().status().cache_lost.is_none() {
            // The engine was closing its log for passthrough (degraded, clean): the write went
            // to the backing device and nothing was lost. The FLUSH must have made it durable.
            assert!(flushed.is_ok(), "{}: FLUSH failed with no loss", self.at());
            self.model.flush();
            let durable = self.rig.backing.durable_snapshot();
            assert!(
                durable[offset as usize..(offset + len) as usize] == data[..],
                "{}: a FLUSH succeeded but the passthrough write it covers is not durable",
                self.at()
            );
            return;
        }
        // The write may have been logged (then the loss took it and the FLUSH must fail), or it
        // may have waited for a log closing for passthrough and gone to the backing device
        // (then the FLUSH may succeed, if it made everything durable there).
        self.racing_the_loss = Some(offset as usize..(offset + len) as usize);
        if flushed.is_ok() {
            let durable = self.rig.backing.durable_snapshot();
            assert!(
                durable[offset as usize..(offset + len) as usize] == data[..],
                "{}: the FLUSH covering a write the cache loss took succeeded",
                self.at()
            );
        }
        self.after_loss();
    }

    /// The engine is in passthrough after losing the cache: the device is now the backing
    /// device, which must hold a state some crash could have left.
    fn after_loss(&mut self) {
        let status = self.engine().status();
        assert!(
            status.cache_lost.is_some(),
            "{}: passthrough after every leg failed, but status names no loss",
            self.at()
        );
        // A read in passthrough waits for writeback writes issued before the loss.
        let image = self.full_read();
        let racing = self.racing_the_loss.take().unwrap_or(0..0);
        let checked = self
            .model
            .explain_cache_loss_except(&image, racing)
            .map(|_| ());
        self.verdict(
            "after the cache loss: not a consistent older state",
            checked,
            &image,
        );
        self.lost = true;
        self.model = Model::from_image(image);
        // The loss has been reported (the FLUSH above failed): this one covers nothing lost.
        if let Err(e) = self.engine().flush() {
            panic!("{}: the second FLUSH after a loss failed: {e}", self.at());
        }
        self.model.flush();
        self.check_durable_when_lost("the FLUSH after the loss");
    }

    /// A failed leg is replaced by a fresh device (`replace` waits, writeback at full speed,
    /// for the cache to be clean).
    fn replace(&mut self) {
        let status = self.engine().status();
        let Some(leg) = (0..self.faults.len()).find(|&i| !status.legs[i].healthy) else {
            return;
        };
        let fresh = SimDisk::new(
            &format!("sim:new{}", self.step),
            self.rig.legs[leg].size_bytes(),
        );
        fresh.fill_garbage(self.seed ^ self.step as u64);
        let replaced = self.engine().replace_leg(
            leg,
            fresh.clone() as Arc<dyn Device>,
            Duration::from_secs(60),
        );
        if let Err(e) = replaced {
            panic!("{}: replacing leg {leg} failed: {e}", self.at());
        }
        self.rig.legs[leg] = fresh;
        self.faults[leg] = LegFault::None;
        self.note(format!("leg {leg} replaced"), 0, BACKING_BYTES);
        let status = self.engine().status();
        self.lost = status.cache_lost.is_some();
        assert!(
            status.legs[leg].healthy,
            "{}: leg {leg} replaced but status shows it failed",
            self.at()
        );
        if status.legs.iter().all(|l| l.healthy) {
            assert!(!self.lost, "{}: every leg replaced, still lost", self.at());
        }
    }

    fn restart(&mut self, how: Restart) {
        self.note(format!("{how:?}"), 0, BACKING_BYTES);
        let engine = self.engine.take().expect("an engine is open");
        match how {
            Restart::Clean => {
                if let Err(e) = engine.shutdown() {
                    panic!("{}: clean shutdown failed: {e}", self.at());
                }
                self.model.flush();
            }
            Restart::DaemonCrash => engine.abandon(),
            Restart::PowerCut => {
                self.rig.power_cut(&mut self.rng);
                engine.abandon();
            }
        }
        drop(engine);
        if how == Restart::PowerCut {
            self.rig.power_on();
        }
        for (i, fault) in self.faults.iter_mut().enumerate() {
            if *fault == LegFault::Transient {
                self.rig.legs[i].faults.dead.store(false, Ordering::Relaxed);
                *fault = LegFault::None;
            }
        }
        let engine = match self.open() {
            Ok(engine) => engine,
            Err(e) => return self.refused_at_start(&e.to_string()),
        };
        self.engine = Some(engine);
        self.check_after_restart(how);
    }

    /// A start may refuse only when no usable leg holds the log: every leg dead for good, or the
    /// only readable one recorded as failed (its data is on the dead one).
    fn refused_at_start(&mut self, why: &str) {
        let permanent = self
            .faults
            .iter()
            .filter(|f| **f == LegFault::Permanent)
            .count();
        assert!(
            permanent > 0,
            "{}: the restart was refused with no leg dead for good: {why}",
            self.at()
        );
        self.over = true;
    }

    fn check_after_restart(&mut self, how: Restart) {
        let status = self.engine().status();
        if self.lost {
            assert!(
                status.cache_lost.is_some() || status.legs.iter().all(|l| l.healthy),
                "{}: a recorded cache loss was forgotten at the restart",
                self.at()
            );
        }
        let image = self.full_read();
        match how {
            Restart::Clean | Restart::DaemonCrash => assert!(
                image == self.model.data,
                "{}: after a {how:?} the device differs from every acknowledged write",
                self.at()
            ),
            Restart::PowerCut => {
                let checked = self.model.check_after_power_cut(&image);
                self.verdict("after a power cut", checked, &image);
                self.model.power_cut_to(&image);
            }
        }
        self.lost = status.cache_lost.is_some();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    Clean,
    DaemonCrash,
    PowerCut,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs one case; returns whether it ended with the cache lost.
fn run_case(seed: u64) -> bool {
    let mut case = Case::new(seed);
    let steps = case.rng.gen_range(20..60);
    case.run(steps);
    case.lost
}

#[test]
fn fault_campaign() {
    // The rigs' files (RAM buffer, fault record) on tmpfs where there is one, as in production
    // for the buffer: the fault record's fsyncs would otherwise dominate the run.
    if std::path::Path::new("/dev/shm").is_dir() && std::env::var_os("TMPDIR").is_none() {
        std::env::set_var("TMPDIR", "/dev/shm");
    }
    let first = env_u64("WB_SIM_FIRST").unwrap_or(0);
    let seeds: Vec<u64> = match env_u64("WB_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (first..first + env_u64("WB_SIM_CASES").unwrap_or(DEFAULT_CASES)).collect(),
    };
    let workers = env_u64("WB_SIM_THREADS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u64))
        .clamp(1, 64);
    let started = std::time::Instant::now();
    let losses: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (seeds, started) = (&seeds, &started);
                scope.spawn(move || {
                    let mut lost = 0;
                    for (i, &seed) in seeds
                        .iter()
                        .skip(w as usize)
                        .step_by(workers as usize)
                        .enumerate()
                    {
                        lost += run_case(seed) as u64;
                        // A long soak says how far it got (every 5000 cases, all threads).
                        if w == 0 && (i + 1) % (5000 / workers as usize).max(1) == 0 {
                            println!(
                                "fault campaign: about {} cases passed, {:.0} s",
                                (i + 1) * workers as usize,
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    lost
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("a case failed (its seed and step are printed above)")
            })
            .sum()
    });
    println!(
        "fault campaign: {} cases (seeds {}..{}) on {workers} threads in {:.1} s ({losses} ended \
         with the cache lost)",
        seeds.len(),
        seeds.first().copied().unwrap_or(0),
        seeds.last().map_or(0, |s| s + 1),
        started.elapsed().as_secs_f64()
    );
}
