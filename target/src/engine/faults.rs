//! The fault record (logfmt/FORMAT.md §4.1; docs/CONTRACT.md "Failures"): which legs are out of
//! use, and whether the whole cache was lost — and keeping it where a later start reads it.
//!
//! Copies: the checkpoint on every leg that takes it, and a file on the host
//! (`<fault dir>/<uuid>.faults`, by default `/var/lib/writeboost`), because when every leg has
//! failed there may be no leg left to write to, yet the next start (after a reboot, the legs
//! readable again) must not replay the lost log over what passthrough wrote since. Of the copies
//! the one with the highest fault sequence wins.
//!
//! Rules enforced with it (see `Shared::record_faults` and its callers):
//! - no FLUSH completes on the strength of the legs that are left while a leg's failure is not
//!   yet recorded (the log's durable id waits for it, `recompute_log_progress`);
//! - no passthrough write reaches the backing device after a cache loss before the loss is
//!   recorded (`Shared::passthrough_*`): otherwise a start could replay the lost log over it.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use logfmt::{checkpoint_offset, CacheLost, Checkpoint, Faults, CHECKPOINT_SLOT_SIZE_BYTES};
use serde::{Deserialize, Serialize};

use crate::device::AlignedBuf;
use crate::engine::{Shared, State};
use crate::log::legs::CacheLegs;

/// Where fault files live unless `WRITEBOOST_FAULT_DIR` says otherwise: persistent storage
/// (unlike the run folder on tmpfs), because a loss must be remembered across a reboot.
pub const DEFAULT_FAULT_DIR: &str = "/var/lib/writeboost";
/// Environment variable that moves the fault folder (tests).
pub const FAULT_DIR_ENV: &str = "WRITEBOOST_FAULT_DIR";

/// `$WRITEBOOST_FAULT_DIR`, else `/var/lib/writeboost`.
pub fn fault_dir_from_env() -> PathBuf {
    std::env::var_os(FAULT_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_FAULT_DIR), PathBuf::from)
}

/// The host's copy of one cache set's fault record.
#[derive(Debug, Clone)]
pub struct FaultFile {
    path: PathBuf,
    uuid: [u8; 16],
}

/// The file's content (JSON, so an administrator can read it).
#[derive(Debug, Serialize, Deserialize)]
struct FaultFileJson {
    uuid: String,
    sequence: u64,
    failed_legs: u32,
    cache_lost: Option<CacheLostJson>,
    /// The current device of each leg (absent in files written before it existed: zeros).
    #[serde(default)]
    leg_incarnations: [u32; 2],
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheLostJson {
    backing_holds_id: u64,
    log_through_id: u64,
}

impl FaultFile {
    pub fn new(dir: &Path, uuid: &[u8; 16]) -> FaultFile {
        FaultFile {
            path: dir.join(format!("{}.faults", crate::hex(uuid))),
            uuid: *uuid,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded faults, `None` if there is no file. A file that does not parse or names
    /// another cache set is an error: guessing "no fault" could replay a lost log.
    pub fn load(&self) -> io::Result<Option<Faults>> {
        let text = match std::fs::read_to_string(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            result => result?,
        };
        let bad = |why: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a valid fault record: {why}", self.path.display()),
            )
        };
        let json: FaultFileJson = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if json.uuid != crate::hex(&self.uuid) {
            return Err(bad(format!("it names cache set {}", json.uuid)));
        }
        Ok(Some(Faults {
            sequence: json.sequence,
            failed_legs: json.failed_legs,
            cache_lost: json.cache_lost.map(|l| CacheLost {
                backing_holds_id: l.backing_holds_id,
                log_through_id: l.log_through_id,
            }),
            leg_incarnations: json.leg_incarnations,
        }))
    }

    /// Replaces the file atomically and durably (temp file, fsync, rename, fsync of the folder).
    pub fn store(&self, faults: &Faults) -> io::Result<()> {
        let dir = self.path.parent().expect("a fault file has a folder");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let json = FaultFileJson {
            uuid: crate::hex(&self.uuid),
            sequence: faults.sequence,
            failed_legs: faults.failed_legs,
            cache_lost: faults.cache_lost.map(|l| CacheLostJson {
                backing_holds_id: l.backing_holds_id,
                log_through_id: l.log_through_id,
            }),
            leg_incarnations: faults.leg_incarnations,
        };
        let mut text = serde_json::to_string_pretty(&json).map_err(io::Error::other)?;
        text.push('\n');
        let tmp = self.path.with_extension("faults.tmp");
        let _ = std::fs::remove_file(&tmp);
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

/// The newer of two copies of the record (the higher sequence; `None` counts as sequence 0).
pub fn newest(a: Faults, b: Option<Faults>) -> Faults {
    match b {
        Some(b) if b.sequence > a.sequence => b,
        _ => a,
    }
}

/// Writes `checkpoint` (carrying a new fault record, replacing `previous`) to the fault file,
/// durably to the healthy legs, and, best effort, to the failed legs (a failed leg that keeps
/// the record names itself failed; its errors change nothing). Returns where it is durable.
///
/// An error if it is durable nowhere — or if it records a newly failed leg, a fault file is
/// configured, and only the surviving legs took it: such a record is lost with them, and the
/// failed leg, coming back alone, would pass for a good one; or if it records a new cache loss
/// that neither the fault file nor every leg took: a start on a leg without it would replay the
/// lost log.
pub(crate) fn persist(
    legs: &CacheLegs,
    file: Option<&FaultFile>,
    checkpoint: &Checkpoint,
    previous: &Faults,
) -> io::Result<Vec<String>> {
    let mut places = Vec::new();
    // Durable somewhere other than the legs still in use: the host's file or a failed leg.
    let mut beyond_survivors = false;
    let mut errors = Vec::new();
    let mut file_took = false;
    match file.map(|f| (f, f.store(&checkpoint.faults))) {
        Some((f, Ok(()))) => {
            places.push(f.path().display().to_string());
            beyond_survivors = true;
            file_took = true;
        }
        Some((f, Err(e))) => errors.push(format!("{}: {e}", f.path().display())),
        None => {}
    }
    let mut buf = AlignedBuf::new(CHECKPOINT_SLOT_SIZE_BYTES);
    buf.copy_from_slice(&checkpoint.encode());
    let offset = checkpoint_offset(checkpoint.ring_index());
    if legs.healthy_count() > 0 {
        match legs.write_durably_all(&buf, offset) {
            Ok(()) => places.extend(
                legs.all()
                    .iter()
                    .filter(|l| l.is_healthy())
                    .map(|l| l.device().name().to_string()),
            ),
            Err(e) => errors.push(format!("cache legs: {e}")),
        }
    }
    for leg in legs.all().iter().filter(|l| !l.is_healthy()) {
        let device = leg.device();
        match device.write_at(&buf, offset).and_then(|()| device.flush()) {
            Ok(()) => {
                places.push(device.name().to_string());
                beyond_survivors = true;
            }
            Err(e) => errors.push(format!("{}: {e}", device.name())),
        }
    }
    if places.is_empty() {
        return Err(io::Error::other(format!(
            "the fault record could not be written anywhere: {}",
            errors.join("; ")
        )));
    }
    // A loss must be where every later start looks, whichever legs come back: in the fault
    // file or on every leg (one failed leg that took it may be the one that never returns).
    let legs_holding = places.len() - file_took as usize;
    if checkpoint.faults.cache_lost.is_some()
        && previous.cache_lost.is_none()
        && !file_took
        && legs_holding < legs.all().len()
    {
        return Err(io::Error::other(format!(
            "the cache loss could be recorded on {legs_holding} of {} legs and not in the fault \
             file: a start on another leg would replay the lost log ({})",
            legs.all().len(),
            errors.join("; ")
        )));
    }
    let newly_failed = checkpoint.faults.failed_legs & !previous.failed_legs;
    if newly_failed != 0 && file.is_some() && !beyond_survivors {
        return Err(io::Error::other(format!(
            "the failure of leg(s) {newly_failed:#b} could be recorded on the surviving leg only \
             (the fault file and the failed leg took no write: {})",
            errors.join("; ")
        )));
    }
    Ok(places)
}

impl Shared {
    /// The fault record as the engine stands now (sequence not set).
    pub(crate) fn current_faults(&self, state: &State) -> Faults {
        Faults {
            sequence: 0,
            failed_legs: self.legs.failed_mask(),
            cache_lost: state.cache_lost,
            leg_incarnations: state.leg_incarnations,
        }
    }

    /// Makes the fault record durable if it changed since it was last recorded; then lets the
    /// FLUSHes that waited for it complete. Ok once the record is durable somewhere.
    pub(crate) fn record_faults(&self) -> io::Result<()> {
        let _recorder = self.fault_recorder.lock();
        self.record_faults_locked()
    }

    /// Whether the fault record in force differs from the one on record.
    fn faults_unrecorded(&self, state: &State) -> bool {
        self.current_faults(state)
            != Faults {
                sequence: 0,
                ..state.faults_recorded
            }
    }

    /// `record_faults` for a caller that holds `fault_recorder` (replacing a leg).
    pub(crate) fn record_faults_locked(&self) -> io::Result<()> {
        // The sync thread asks every tick: answer that from the state alone, without waiting for
        // a commit's checkpoint write to release `checkpoint_lock`.
        if !self.faults_unrecorded(&self.state.lock()) {
            return Ok(());
        }
        // A leg may fail while its record is written (the write itself fails it): record again,
        // at most once per leg.
        for _ in 0..=self.legs.all().len() {
            // Held from reading the sequence and the written-back id until the state has the new
            // sequence: a commit in between would reuse the sequence with a newer written-back id,
            // and this checkpoint, landing after it, would move the checkpoint back.
            let _checkpoints = self.checkpoint_lock.lock();
            let (recorded, checkpoint) = {
                let state = self.state.lock();
                if !self.faults_unrecorded(&state) {
                    return Ok(());
                }
                let now = self.current_faults(&state);
                let recorded = state.faults_recorded;
                (
                    recorded,
                    Checkpoint {
                        uuid: self.geometry.uuid,
                        sequence: state.checkpoint_sequence + 1,
                        last_written_back_id: state.written_back_id,
                        last_written_back_epoch: state.written_back_epoch,
                        faults: Faults {
                            sequence: recorded.sequence + 1,
                            ..now
                        },
                        next_position: state.next_after_written_back(),
                        // Unknown only after every leg was lost: then this checkpoint reaches
                        // no leg (the fault file keeps the record).
                        anchor_crc: state.anchor_crc.unwrap_or(0),
                    },
                )
            };
            let persisted = persist(&self.legs, self.fault_file.as_ref(), &checkpoint, &recorded);
            let places = match persisted {
                Ok(places) => places,
                Err(e) => {
                    let why = e.to_string();
                    let before = self.state.lock().fault_record_error.replace(why.clone());
                    // The sync thread tries again every tick: say it once, and again if the
                    // reason changes.
                    if before.as_deref() != Some(why.as_str()) {
                        log::error!("CRITICAL: {e}");
                    }
                    // FLUSHes waiting for this record fail now rather than sleep until some
                    // unrelated progress wakes them.
                    self.progress.notify_all();
                    self.space_freed.notify_all();
                    return Err(e);
                }
            };
            log::warn!(
                "fault record {} (failed legs {:#b}{}) written to {}",
                checkpoint.faults.sequence,
                checkpoint.faults.failed_legs,
                if checkpoint.faults.cache_lost.is_some() {
                    ", cache lost"
                } else {
                    ""
                },
                places.join(", ")
            );
            let mut state = self.state.lock();
            state.faults_recorded = checkpoint.faults;
            state.fault_record_error = None;
            state.checkpoint_sequence = state.checkpoint_sequence.max(checkpoint.sequence);
            if checkpoint.faults.cache_lost.is_some() {
                // The lost log's segments may leave the buffer file now: no start replays them.
                for &buffer in &state.free_buffers {
                    self.ram.release(buffer);
                }
            }
            self.recompute_log_progress(&mut state);
        }
        Ok(())
    }
}
