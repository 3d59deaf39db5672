//! Migration policy: how hard writeback works, from the cache's fullness, the age of its oldest
//! dirty segment, whether users are idle, and the bandwidth cap (CONTRACT §4). Pure functions of an
//! `Activity` snapshot and an explicit clock, so that tests need no sleeps.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::Activity;

/// How writeback speed rises between `pressure_start` and `pressure_full` fullness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PressureCurve {
    Linear,
    /// Gentle at first, steep near full: keeps the cache absorbing bursts longer.
    Exponential,
    /// Half speed from the start point, full speed from the full point.
    Step,
}

impl FromStr for PressureCurve {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "linear" => Ok(Self::Linear),
            "exponential" => Ok(Self::Exponential),
            "step" => Ok(Self::Step),
            _ => Err(PolicyError(format!(
                "pressure_curve: '{s}' is not linear, exponential or step"
            ))),
        }
    }
}

impl fmt::Display for PressureCurve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Linear => "linear",
            Self::Exponential => "exponential",
            Self::Step => "step",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for PolicyError {}

/// The writeback knobs, all settable at create and at run time.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Write back in the background once more than this fraction of the cache is dirty.
    pub low_watermark: f64,
    pub pressure_curve: PressureCurve,
    /// Fullness where the pressure curve starts to raise the speed above background.
    pub pressure_start: f64,
    /// Fullness where writeback runs at full speed.
    pub pressure_full: f64,
    /// Anything dirty for longer than this is written back whatever the fullness.
    pub age_threshold: Duration,
    /// Upper bound on backing write bandwidth (bytes/s); `None` = unlimited.
    pub max_bandwidth_bytes_per_sec: Option<u64>,
    /// Run at full speed while users leave the backing device alone.
    pub idle_aware: bool,
    /// How long without user I/O counts as idle.
    pub idle_after: Duration,
    /// Speed (fraction of full) of background writeback when no pressure applies.
    pub background_rate: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            low_watermark: 0.10,
            pressure_curve: PressureCurve::Linear,
            pressure_start: 0.70,
            pressure_full: 0.90,
            age_threshold: Duration::from_secs(30),
            max_bandwidth_bytes_per_sec: None,
            idle_aware: true,
            idle_after: Duration::from_secs(1),
            background_rate: 0.25,
        }
    }
}

/// Largest `max_bandwidth_mib`: 1 TiB/s, beyond any backing device. A larger value is a typo,
/// and in bytes per second it would no longer fit in 64 bits.
pub const MAX_BANDWIDTH_MIB: u64 = 1 << 20;

/// The knob names `wbctl set` and the config file accept.
pub const KNOBS: &[&str] = &[
    "low_watermark",
    "pressure_curve",
    "pressure_start",
    "pressure_full",
    "age_threshold_secs",
    "max_bandwidth_mib",
    "idle_aware",
    "idle_after_ms",
    "background_rate",
];

impl Policy {
    /// Speed of writeback as a fraction of full speed (0 = do not write back now).
    pub fn rate(&self, a: &Activity) -> f64 {
        if a.dirty_segments == 0 {
            return 0.0;
        }
        if a.drain_requested || a.writers_waiting || a.degraded {
            return 1.0;
        }
        if self.idle_aware && a.idle_for >= self.idle_after {
            return 1.0;
        }
        let fullness = a.dirty_fraction();
        let mut rate = self.pressure(fullness);
        if fullness > self.low_watermark || a.oldest_dirty_age >= self.age_threshold {
            rate = rate.max(self.background_rate);
        }
        rate
    }

    /// The pressure curve: 0 below `pressure_start`, 1 at and above `pressure_full`.
    pub fn pressure(&self, fullness: f64) -> f64 {
        if fullness < self.pressure_start {
            return 0.0;
        }
        if fullness >= self.pressure_full {
            return 1.0;
        }
        let x = (fullness - self.pressure_start) / (self.pressure_full - self.pressure_start);
        match self.pressure_curve {
            PressureCurve::Linear => x,
            PressureCurve::Exponential => (2f64.powf(8.0 * x) - 1.0) / (2f64.powi(8) - 1.0),
            PressureCurve::Step => 0.5,
        }
    }

    /// Sets one knob from text; the policy is unchanged on error.
    pub fn set(&mut self, knob: &str, value: &str) -> Result<(), PolicyError> {
        let mut next = self.clone();
        let fraction = |v: &str| -> Result<f64, PolicyError> {
            let f: f64 = v
                .trim_end_matches('%')
                .parse()
                .map_err(|_| PolicyError(format!("{knob}: '{v}' is not a number")))?;
            let f = if v.ends_with('%') { f / 100.0 } else { f };
            if !(0.0..=1.0).contains(&f) {
                return Err(PolicyError(format!(
                    "{knob}: {v} is not between 0 and 1 (or 0% and 100%)"
                )));
            }
            Ok(f)
        };
        let number = |v: &str| -> Result<u64, PolicyError> {
            v.parse()
                .map_err(|_| PolicyError(format!("{knob}: '{v}' is not a whole number")))
        };
        match knob {
            "low_watermark" => next.low_watermark = fraction(value)?,
            "pressure_curve" => next.pressure_curve = value.parse()?,
            "pressure_start" => next.pressure_start = fraction(value)?,
            "pressure_full" => next.pressure_full = fraction(value)?,
            "age_threshold_secs" => next.age_threshold = Duration::from_secs(number(value)?),
            "max_bandwidth_mib" => {
                let mib = number(value)?;
                if mib > MAX_BANDWIDTH_MIB {
                    return Err(PolicyError(format!(
                        "max_bandwidth_mib: {mib} is above {MAX_BANDWIDTH_MIB} (1 TiB/s); 0 means \
                         unlimited"
                    )));
                }
                next.max_bandwidth_bytes_per_sec = mib.checked_mul(1 << 20).filter(|&b| b > 0);
            }
            "idle_aware" => {
                next.idle_aware = match value {
                    "true" | "on" | "1" | "yes" => true,
                    "false" | "off" | "0" | "no" => false,
                    _ => return Err(PolicyError(format!("idle_aware: '{value}' is not on/off"))),
                }
            }
            "idle_after_ms" => next.idle_after = Duration::from_millis(number(value)?),
            "background_rate" => next.background_rate = fraction(value)?,
            _ => {
                return Err(PolicyError(format!(
                    "unknown knob '{knob}' (knobs: {})",
                    KNOBS.join(", ")
                )))
            }
        }
        if next.pressure_start >= next.pressure_full {
            return Err(PolicyError(format!(
                "pressure_start ({}) must be below pressure_full ({})",
                next.pressure_start, next.pressure_full
            )));
        }
        *self = next;
        Ok(())
    }

    /// The knobs as (name, value) text pairs, in `KNOBS` order.
    pub fn knobs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("low_watermark", self.low_watermark.to_string()),
            ("pressure_curve", self.pressure_curve.to_string()),
            ("pressure_start", self.pressure_start.to_string()),
            ("pressure_full", self.pressure_full.to_string()),
            (
                "age_threshold_secs",
                self.age_threshold.as_secs().to_string(),
            ),
            (
                "max_bandwidth_mib",
                self.max_bandwidth_bytes_per_sec
                    .map_or(0, |b| b >> 20)
                    .to_string(),
            ),
            ("idle_aware", self.idle_aware.to_string()),
            ("idle_after_ms", self.idle_after.as_millis().to_string()),
            ("background_rate", self.background_rate.to_string()),
        ]
    }
}

/// Paces backing writes: a bandwidth cap (a token bucket with one second of burst) and a duty
/// cycle for rates below full speed. Takes the time as an argument, so it is testable with a
/// fake clock.
#[derive(Debug)]
pub struct Throttle {
    started: Option<Instant>,
    bytes: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle {
            started: None,
            bytes: 0,
        }
    }

    /// After writing `bytes` at `now`: how long to wait so that the average since the first
    /// write stays under `cap` bytes per second. A cap of 0 (which `Policy::set` never makes)
    /// counts as none: this runs on the writeback thread and must not panic.
    pub fn after_write(&mut self, bytes: u64, now: Instant, cap: Option<u64>) -> Duration {
        let started = *self.started.get_or_insert(now);
        self.bytes = self.bytes.saturating_add(bytes);
        let Some(cap) = cap.filter(|&c| c > 0) else {
            return Duration::ZERO;
        };
        let due =
            Duration::try_from_secs_f64(self.bytes as f64 / cap as f64).unwrap_or(Duration::MAX);
        let elapsed = now.saturating_duration_since(started);
        due.saturating_sub(elapsed)
    }

    /// Forgets history (after an idle pause, so a long pause does not become a burst).
    pub fn reset(&mut self) {
        self.started = None;
        self.bytes = 0;
    }

    /// Duty cycle: after `busy` spent writing at `rate` (0 < rate ≤ 1), rest this long.
    pub fn rest_for(busy: Duration, rate: f64) -> Duration {
        if rate >= 1.0 || rate <= 0.0 {
            return Duration::ZERO;
        }
        busy.mul_f64((1.0 - rate) / rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(dirty: u64, age_secs: u64, idle_ms: u64) -> Activity {
        Activity {
            dirty_segments: dirty,
            capacity_segments: 100,
            oldest_dirty_age: Duration::from_secs(age_secs),
            idle_for: Duration::from_millis(idle_ms),
            writers_waiting: false,
            drain_requested: false,
            degraded: false,
        }
    }

    #[test]
    fn nothing_dirty_means_no_writeback() {
        assert_eq!(Policy::default().rate(&activity(0, 100, 100_000)), 0.0);
    }

    #[test]
    fn watermark_starts_background_writeback() {
        let p = Policy::default();
        assert_eq!(
            p.rate(&activity(10, 0, 0)),
            0.0,
            "at the watermark: not above it"
        );
        assert_eq!(p.rate(&activity(11, 0, 0)), p.background_rate);
    }

    #[test]
    fn age_threshold_writes_back_old_data_below_the_watermark() {
        let p = Policy::default();
        assert_eq!(p.rate(&activity(1, 29, 0)), 0.0);
        assert_eq!(p.rate(&activity(1, 30, 0)), p.background_rate);
    }

    #[test]
    fn idle_backing_gets_full_speed_unless_idle_awareness_is_off() {
        let mut p = Policy::default();
        assert_eq!(p.rate(&activity(1, 0, 999)), 0.0);
        assert_eq!(p.rate(&activity(1, 0, 1000)), 1.0);
        p.idle_aware = false;
        assert_eq!(p.rate(&activity(1, 0, 1_000_000)), 0.0);
    }

    #[test]
    fn waiting_writers_and_drain_get_full_speed() {
        let p = Policy::default();
        let mut a = activity(1, 0, 0);
        a.writers_waiting = true;
        assert_eq!(p.rate(&a), 1.0);
        let mut a = activity(1, 0, 0);
        a.drain_requested = true;
        assert_eq!(p.rate(&a), 1.0);
    }

    #[test]
    fn pressure_curves_have_their_shapes() {
        let mut p = Policy::default();
        for curve in [
            PressureCurve::Linear,
            PressureCurve::Exponential,
            PressureCurve::Step,
        ] {
            p.pressure_curve = curve;
            assert_eq!(p.pressure(0.69), 0.0, "{curve}");
            assert_eq!(p.pressure(0.90), 1.0, "{curve}");
            assert_eq!(p.pressure(0.95), 1.0, "{curve}");
            let mut last = 0.0;
            for i in 70..90 {
                let v = p.pressure(i as f64 / 100.0);
                assert!(v >= last && v < 1.0, "{curve}: monotonic below full");
                last = v;
            }
        }
        p.pressure_curve = PressureCurve::Linear;
        assert!((p.pressure(0.80) - 0.5).abs() < 1e-9);
        p.pressure_curve = PressureCurve::Exponential;
        assert!(p.pressure(0.80) < 0.1, "exponential is gentle at mid-range");
        assert!(p.pressure(0.89) > 0.7, "and steep near full");
        p.pressure_curve = PressureCurve::Step;
        assert_eq!(p.pressure(0.70), 0.5);
        assert_eq!(p.pressure(0.89), 0.5);
    }

    #[test]
    fn pressure_overrides_background_rate() {
        let p = Policy::default();
        assert!((p.rate(&activity(85, 0, 0)) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn bandwidth_cap_holds_within_ten_percent_on_a_fake_clock() {
        let cap = 10 << 20; // 10 MiB/s
        let mut throttle = Throttle::new();
        let mut now = Instant::now();
        let start = now;
        let mut total = 0u64;
        // A writer that could do 1 GiB/s, writing 1 MiB I/Os, obeying the throttle.
        for _ in 0..200 {
            let io = 1 << 20;
            now += Duration::from_secs_f64(io as f64 / (1u64 << 30) as f64);
            total += io;
            now += throttle.after_write(io, now, Some(cap));
        }
        let rate = total as f64 / now.duration_since(start).as_secs_f64();
        assert!(
            (rate - cap as f64).abs() / cap as f64 <= 0.10,
            "rate {rate} vs cap {cap}"
        );
    }

    #[test]
    fn uncapped_throttle_never_waits() {
        let mut t = Throttle::new();
        assert_eq!(t.after_write(1 << 30, Instant::now(), None), Duration::ZERO);
    }

    #[test]
    fn bandwidth_knob_is_bounded_and_never_wraps_to_zero() {
        let mut p = Policy::default();
        // 2^44 MiB shifted by 20 used to wrap to a cap of 0 bytes/s: a division by zero and a
        // panic that killed the writeback thread.
        for bad in [1u64 << 44, u64::MAX, MAX_BANDWIDTH_MIB + 1] {
            let e = p.set("max_bandwidth_mib", &bad.to_string()).unwrap_err();
            assert!(
                e.0.contains("max_bandwidth_mib") && e.0.contains("above"),
                "{e}"
            );
            assert_eq!(p, Policy::default(), "a refused value changes nothing");
        }
        assert!(p.set("max_bandwidth_mib", "-1").is_err());
        p.set("max_bandwidth_mib", &MAX_BANDWIDTH_MIB.to_string())
            .unwrap();
        assert_eq!(p.max_bandwidth_bytes_per_sec, Some(1 << 40));
        p.set("max_bandwidth_mib", "1").unwrap();
        assert_eq!(p.max_bandwidth_bytes_per_sec, Some(1 << 20));
        p.set("max_bandwidth_mib", "0").unwrap();
        assert_eq!(p.max_bandwidth_bytes_per_sec, None, "0: unlimited");
    }

    #[test]
    fn a_zero_or_tiny_cap_does_not_panic_the_throttle() {
        let mut t = Throttle::new();
        let now = Instant::now();
        assert_eq!(t.after_write(1 << 20, now, Some(0)), Duration::ZERO);
        assert_eq!(t.after_write(u64::MAX, now, Some(0)), Duration::ZERO);
        // A cap of one byte per second after 2^64 bytes: a wait beyond any Duration.
        assert_eq!(t.after_write(1, now, Some(1)), Duration::MAX);
    }

    #[test]
    fn duty_cycle() {
        assert_eq!(
            Throttle::rest_for(Duration::from_millis(100), 1.0),
            Duration::ZERO
        );
        assert_eq!(
            Throttle::rest_for(Duration::from_millis(100), 0.25),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn knobs_parse_and_bad_values_change_nothing() {
        let mut p = Policy::default();
        p.set("low_watermark", "20%").unwrap();
        assert_eq!(p.low_watermark, 0.2);
        p.set("pressure_curve", "step").unwrap();
        p.set("max_bandwidth_mib", "50").unwrap();
        assert_eq!(p.max_bandwidth_bytes_per_sec, Some(50 << 20));
        let before = p.clone();
        assert!(p.set("low_watermark", "150%").is_err());
        assert!(p.set("pressure_curve", "wavy").is_err());
        assert!(p.set("pressure_start", "0.95").is_err(), "start above full");
        assert!(p.set("nonsense", "1").is_err());
        assert_eq!(p, before);
        for (k, v) in before.knobs() {
            p.set(k, &v).unwrap();
        }
        assert_eq!(p, before, "knobs() round-trips through set()");
    }
}
