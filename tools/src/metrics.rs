//! `wbctl metrics`: the devices' status in the Prometheus text exposition format (0.0.4), for
//! node_exporter's textfile collector (the `writeboost-metrics.timer`) or any scraper.
//!
//! Names are under `writeboost_` with their unit in the name (`_bytes`, `_seconds`, `_ratio`,
//! counters `_total`); labels are `device` (the name given at create), `leg` (a cache leg's
//! path) and `mode`. The text is written by `prometheus-client`'s encoder, not by hand, so
//! escaping and the suffix rules are the library's.
//!
//! **Counters across restarts.** The engine keeps its request, byte, flush, stall and writeback
//! counters in memory; a daemon that hands its device over (a stop with the device in use, an
//! upgrade) leaves them in the state file and the next daemon goes on from them, so those
//! `_total`s only grow across such a restart. After a crash they start again from 0, and the
//! per-leg error counters restart with every daemon: Prometheus' `rate()` and `increase()` treat
//! a drop as a reset, which is what it is (`writeboost_uptime_seconds` shows when it happened).
//! Segment ids are kept in the log and do survive restarts; they are gauges. So does
//! `writeboost_leg_media_errors_total`: the drive keeps it.
//!
//! The SSD health of each leg (`writeboost_leg_wear_ratio`, `_available_spare_ratio`, ...) is
//! read by `wbctl` itself (`crate::ssd_health`), never by the daemon; a leg whose health is
//! unknown has no such sample.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use wb_target::control::{DeviceStatus, LegReport};

use crate::ssd_health::{LegHealth, SsdHealth};

/// A device as one collection found it.
#[derive(Debug, Clone)]
pub enum Scrape {
    /// Its daemon answered.
    Up(Box<DeviceStatus>),
    /// It has a state file but its daemon does not answer (its /dev/ublkbN waits for
    /// `wbctl recover`): only `writeboost_daemon_up 0` is known about it.
    Down(String),
}

impl Scrape {
    fn name(&self) -> &str {
        match self {
            Scrape::Up(s) => &s.name,
            Scrape::Down(name) => name,
        }
    }
}

/// The values of the `mode` state set. Every one is exported for every device that answered
/// (1 for its mode, 0 for the others), so `writeboost_mode{mode="degraded"} == 1` needs no
/// `absent()`; a mode a newer daemon reports that is not listed here is exported too.
pub const MODES: [&str; 5] = ["mirrored", "single", "degraded", "passthrough", "failed"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(u64),
    Real(f64),
}

#[derive(Debug)]
struct Sample {
    /// `device` first, then `leg` or `mode` where the family has one.
    labels: Vec<(&'static str, String)>,
    value: Num,
}

/// One metric family: a HELP and TYPE line and its samples.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<&'static str>,
    counter: bool,
    samples: Vec<Sample>,
}

/// A per-device figure: name (without prefix, unit or `_total`), help, unit, counter or gauge,
/// and how to read it (`None`: not known for this device, no sample).
type DeviceFigure = (
    &'static str,
    &'static str,
    Option<&'static str>,
    bool,
    fn(&DeviceStatus) -> Option<Num>,
);

const BYTES: Option<&str> = Some("bytes");
const SECONDS: Option<&str> = Some("seconds");
const RATIO: Option<&str> = Some("ratio");

fn int(v: u64) -> Option<Num> {
    Some(Num::Int(v))
}

fn flag(b: bool) -> Option<Num> {
    int(u64::from(b))
}

fn secs_of_ms(ms: u64) -> Option<Num> {
    Some(Num::Real(ms as f64 / 1000.0))
}

/// The writeback pressure point as a fraction: a number, or a string from a daemon older than
/// typed knobs. Exported so that an alert can compare `writeboost_dirty_ratio` with it.
fn pressure_start(s: &DeviceStatus) -> Option<Num> {
    let v = s.policy.get("pressure_start")?;
    let f = v.as_f64().or_else(|| v.as_str()?.parse().ok())?;
    Some(Num::Real(f))
}

#[rustfmt::skip]
const DEVICE_FIGURES: &[DeviceFigure] = &[
    ("cache_capacity", "Cache space for log segments", BYTES, false, |s| int(s.capacity_bytes)),
    ("cache_used", "Cache space holding live log segments", BYTES, false, |s| int(s.used_bytes)),
    ("dirty", "Data in the cache not yet written back", BYTES, false, |s| int(s.dirty_bytes)),
    ("dirty", "Dirty data as a fraction of the cache capacity", RATIO, false,
        |s| Some(Num::Real(s.dirty_percent / 100.0))),
    ("pressure_start", "Dirty fraction where writeback pressure starts (knob pressure_start)",
        RATIO, false, pressure_start),
    ("oldest_dirty_age", "Writeback lag: age of the oldest data not yet written back \
        (0 when clean; a lower bound just after a restart)", SECONDS, false,
        |s| int(s.oldest_dirty_age_secs)),
    ("segment_current_id", "Id of the log segment being filled", None, false,
        |s| int(s.segments.current_id)),
    ("segment_last_flushed_id", "Id of the last log segment on the cache legs", None, false,
        |s| int(s.segments.last_flushed_id)),
    ("segment_last_written_back_id", "Id of the last log segment written back", None, false,
        |s| int(s.segments.last_written_back_id)),
    ("read_requests", "Read requests since the daemon started", None, true,
        |s| int(s.reads.requests)),
    ("read_hits", "4 KiB blocks read from the cache since the daemon started", None, true,
        |s| int(s.reads.hits)),
    ("read_misses", "4 KiB blocks read from the backing device since the daemon started", None,
        true, |s| int(s.reads.misses)),
    ("writes", "Write requests acknowledged since the daemon started", None, true,
        |s| int(s.writes)),
    ("write", "Bytes written by clients since the daemon started", BYTES, true,
        |s| int(s.write_bytes)),
    ("flushes", "FLUSH requests since the daemon started", None, true, |s| int(s.flushes)),
    ("written_back", "Bytes written back to the backing device since the daemon started", BYTES,
        true, |s| int(s.written_back_bytes)),
    ("backing_write_ios", "Write I/Os sent to the backing device since the daemon started", None,
        true, |s| int(s.backing_write_ios)),
    ("backing_errors", "Backing device I/O errors since the daemon started (retried)", None, true,
        |s| int(s.backing_errors)),
    ("passthrough_writes", "Writes sent straight to the backing device in passthrough mode \
        since the daemon started", None, true, |s| int(s.passthrough_writes)),
    ("stall", "Time writers waited for cache space since the daemon started", SECONDS, true,
        |s| secs_of_ms(s.stall_ms)),
    ("stall_last_minute", "Time writers waited for cache space in the last minute", SECONDS,
        false, |s| secs_of_ms(s.stall_ms_last_minute)),
    ("cache_lost", "1 when every cache leg was lost and the device runs in passthrough", None,
        false, |s| flag(s.cache_lost.is_some() || s.cache_lost_at.is_some())),
    ("engine_failed", "1 while requests fail: a fault can be recorded nowhere", None, false,
        |s| flag(s.failure.is_some())),
    ("uptime", "Time since the daemon started (its counters start from 0 then)", SECONDS, false,
        |s| int(s.uptime_secs)),
];

/// A per-leg figure (labels `device`, `leg`).
type LegFigure = (&'static str, &'static str, bool, fn(&LegReport) -> u64);

#[rustfmt::skip]
const LEG_FIGURES: &[LegFigure] = &[
    ("leg_up", "1 while the cache leg is healthy, 0 once it failed", false,
        |l| u64::from(l.health == "ok")),
    ("leg_errors", "I/O errors on the cache leg since the daemon started", true, |l| l.errors),
    ("leg_read_errors", "Read errors on the cache leg since the daemon started", true,
        |l| l.read_errors),
    ("leg_write_errors", "Write errors on the cache leg since the daemon started", true,
        |l| l.write_errors),
    ("leg_repairs", "Blocks rewritten on the cache leg from its partner since the daemon \
        started", true, |l| l.repairs),
];

/// A per-leg SSD health figure (labels `device`, `leg`): name, help, unit, counter or gauge,
/// and how to read it (`None`: the leg's source does not report it, no sample). A leg whose
/// health is unknown (an image file, a virtio disk, no smartctl) has none of these.
type SsdFigure = (
    &'static str,
    &'static str,
    Option<&'static str>,
    bool,
    fn(&SsdHealth) -> Option<Num>,
);

fn percent_ratio(p: Option<u32>) -> Option<Num> {
    p.map(|p| Num::Real(f64::from(p) / 100.0))
}

#[rustfmt::skip]
const SSD_FIGURES: &[SsdFigure] = &[
    ("leg_wear", "Life used of the cache leg's SSD as its vendor rates it (NVMe percentage used, \
        or the SATA/SAS endurance indicator); may pass 1", RATIO, false,
        |h| percent_ratio(h.percentage_used)),
    ("leg_available_spare", "Spare capacity left on the cache leg's NVMe SSD", RATIO, false,
        |h| percent_ratio(h.available_spare)),
    ("leg_available_spare_threshold", "Spare level below which the cache leg's NVMe SSD raises \
        a critical warning", RATIO, false, |h| percent_ratio(h.available_spare_threshold)),
    ("leg_media_errors", "Unrecovered data integrity errors over the life of the cache leg's \
        NVMe SSD (kept by the drive: survives daemon restarts)", None, true,
        |h| h.media_errors.map(Num::Int)),
    ("leg_critical_warning", "Critical warning bits of the cache leg's NVMe SSD (0: none; 1 \
        spare, 2 temperature, 4 reliability, 8 read-only, 16 volatile backup)", None, false,
        |h| h.critical_warning.map(|c| Num::Int(u64::from(c)))),
    ("leg_temperature", "Temperature of the cache leg's SSD", Some("celsius"), false,
        |h| h.temperature_celsius.map(|t| Num::Real(t as f64))),
    ("leg_smart_passed", "1 when smartctl's overall health self-assessment of the cache leg's \
        SATA/SAS SSD passed, 0 when it failed", None, false, |h| h.smart_passed.map(|p| {
        Num::Int(u64::from(p))
    })),
];

fn device_label(name: &str) -> Vec<(&'static str, String)> {
    vec![("device", name.to_string())]
}

/// Every family for these devices and their legs' SSD health, in a fixed order; a family no
/// device has a sample for is left out (a HELP without samples says nothing).
fn families(devices: &[Scrape], ssds: &LegHealth) -> Vec<Family> {
    let up = devices.iter().filter_map(|d| match d {
        Scrape::Up(s) => Some(s.as_ref()),
        Scrape::Down(_) => None,
    });
    let mut all = vec![Family {
        name: "daemon_up",
        help: "1 when the device's daemon answers, 0 when its state file is there but the \
               daemon is not (the device waits for `wbctl recover`)",
        unit: None,
        counter: false,
        samples: devices
            .iter()
            .map(|d| Sample {
                labels: device_label(d.name()),
                value: Num::Int(u64::from(matches!(d, Scrape::Up(_)))),
            })
            .collect(),
    }];
    all.push(mode_family(up.clone()));
    for &(name, help, unit, counter, read) in DEVICE_FIGURES {
        let samples = up
            .clone()
            .filter_map(|s| {
                read(s).map(|value| Sample {
                    labels: device_label(&s.name),
                    value,
                })
            })
            .collect();
        all.push(Family {
            name,
            help,
            unit,
            counter,
            samples,
        });
    }
    for &(name, help, counter, read) in LEG_FIGURES {
        let samples = up
            .clone()
            .flat_map(|s| s.legs.iter().map(move |l| (s, l)))
            .map(|(s, l)| Sample {
                labels: vec![("device", s.name.clone()), ("leg", l.path.clone())],
                value: Num::Int(read(l)),
            })
            .collect();
        all.push(Family {
            name,
            help,
            unit: None,
            counter,
            samples,
        });
    }
    all.extend(ssd_families(up, ssds));
    all.retain(|f| !f.samples.is_empty());
    all
}

/// The per-leg SSD health families of the devices that answered.
fn ssd_families<'a>(
    up: impl Iterator<Item = &'a DeviceStatus> + Clone,
    ssds: &LegHealth,
) -> Vec<Family> {
    let mut all = Vec::new();
    for &(name, help, unit, counter, read) in SSD_FIGURES {
        let samples = up
            .clone()
            .flat_map(|s| s.legs.iter().map(move |l| (s, l)))
            .filter_map(|(s, l)| {
                let value = read(ssds.get(&l.path)?)?;
                Some(Sample {
                    labels: vec![("device", s.name.clone()), ("leg", l.path.clone())],
                    value,
                })
            })
            .collect();
        all.push(Family {
            name,
            help,
            unit,
            counter,
            samples,
        });
    }
    all
}

/// `writeboost_mode{device, mode}`: a state set, one sample per mode, 1 for the current one.
fn mode_family<'a>(up: impl Iterator<Item = &'a DeviceStatus>) -> Family {
    let mut samples = Vec::new();
    for s in up {
        let extra = (!MODES.contains(&s.mode.as_str())).then_some(s.mode.as_str());
        for mode in MODES.iter().copied().chain(extra) {
            samples.push(Sample {
                labels: vec![("device", s.name.clone()), ("mode", mode.to_string())],
                value: Num::Int(u64::from(mode == s.mode)),
            });
        }
    }
    Family {
        name: "mode",
        help: "The device's mode as a state set: 1 for the current mode, 0 for the others",
        unit: None,
        counter: false,
        samples,
    }
}

/// The families of one collection, handed to `prometheus-client`'s encoder.
#[derive(Debug)]
struct StatusCollector(Vec<Family>);

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let unit = f.unit.map(|u| Unit::Other(u.to_string()));
            let kind = if f.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, unit.as_ref(), kind)?;
            for sample in &f.samples {
                let e = metric.encode_family(&sample.labels)?;
                match (f.counter, sample.value) {
                    (true, Num::Int(v)) => ConstCounter::new(v).encode(e)?,
                    (true, Num::Real(v)) => ConstCounter::new(v).encode(e)?,
                    (false, Num::Int(v)) => ConstGauge::new(v).encode(e)?,
                    (false, Num::Real(v)) => ConstGauge::new(v).encode(e)?,
                }
            }
        }
        Ok(())
    }
}

/// The exposition of these devices, in the Prometheus text format, without SSD health.
pub fn exposition(devices: &[Scrape]) -> String {
    exposition_with_health(devices, &LegHealth::new())
}

/// The exposition of these devices and of their legs' SSD health (by leg path, as
/// `ssd_health::read_all` gives it), in the Prometheus text format.
pub fn exposition_with_health(devices: &[Scrape], ssds: &LegHealth) -> String {
    let mut registry = Registry::with_prefix("writeboost");
    registry.register_collector(Box::new(StatusCollector(families(devices, ssds))));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String does not fail");
    text
}

/// The metric names `exposition` can emit (with prefix, unit and `_total`): what the dashboard
/// and the alert rules may refer to.
pub fn metric_names() -> Vec<String> {
    let name = |n: &str, unit: Option<&str>, counter: bool| {
        let unit = unit.map_or(String::new(), |u| format!("_{u}"));
        let total = if counter { "_total" } else { "" };
        format!("writeboost_{n}{unit}{total}")
    };
    let mut names = vec![name("daemon_up", None, false), name("mode", None, false)];
    names.extend(DEVICE_FIGURES.iter().map(|f| name(f.0, f.2, f.3)));
    names.extend(LEG_FIGURES.iter().map(|f| name(f.0, None, f.2)));
    names.extend(SSD_FIGURES.iter().map(|f| name(f.0, f.2, f.3)));
    names
}

/// Writes `bytes` to `file` so that a reader (node_exporter) sees the old file or the new one,
/// never a part: into `FILE.tmp`, then renamed over `FILE`. The folder is often another user's
/// (`prometheus` owns node_exporter's): a `FILE.tmp` found there is removed, not opened (it could
/// be a link to a file of root's), and the new one is created exclusively, so a link planted
/// between the two makes the write fail instead of following it. Mode 0644: node_exporter
/// runs as its own user.
pub fn write_atomically(file: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests;
