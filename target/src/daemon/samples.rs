//! What the `wb-stats` thread samples every second for `status`: the throughput over the last
//! second, and how long writers waited for cache space over the last minute (`status -x` warns
//! about writers stalled recently, not about a stall hours ago that the total still shows).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::engine::status::EngineStatus;

/// How far back "recently" reaches for stalls.
pub(super) const STALL_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub(super) struct Samples {
    pub write_bytes_per_sec: u64,
    pub written_back_bytes_per_sec: u64,
    /// `(when, stall_ms)` samples no older than `STALL_WINDOW`, oldest first: one a second, so
    /// about sixty of them.
    stalls: VecDeque<(Instant, u64)>,
}

impl Samples {
    /// Takes a sample at `at`, `secs` after `prev` was taken.
    pub fn record(&mut self, at: Instant, prev: &EngineStatus, now: &EngineStatus, secs: f64) {
        let secs = secs.max(1e-3);
        let rate = |bytes: u64| (bytes as f64 / secs) as u64;
        self.write_bytes_per_sec = rate(now.write_bytes.saturating_sub(prev.write_bytes));
        self.written_back_bytes_per_sec = rate(
            now.written_back_bytes
                .saturating_sub(prev.written_back_bytes),
        );
        self.note_stall(at, now.stall_ms);
    }

    /// Adds a sample of the engine's total stall time and forgets those older than the window.
    pub fn note_stall(&mut self, at: Instant, stall_ms: u64) {
        while self
            .stalls
            .front()
            .is_some_and(|&(t, _)| at.saturating_duration_since(t) > STALL_WINDOW)
        {
            self.stalls.pop_front();
        }
        debug_assert!(
            self.stalls
                .back()
                .is_none_or(|&(t, ms)| t <= at && ms <= stall_ms),
            "samples come in time order and the stall total only grows"
        );
        self.stalls.push_back((at, stall_ms));
    }

    /// For `status` with the engine's status `s`: the write and writeback rates, and the ms
    /// writers waited for cache space in the last minute.
    pub fn now(&self, s: &EngineStatus) -> (u64, u64, u64) {
        (
            self.write_bytes_per_sec,
            self.written_back_bytes_per_sec,
            self.stall_ms_last_minute(s.stall_ms),
        )
    }

    /// How much the stall total grew since the oldest sample of the window, given the total now
    /// (0 before the first sample).
    pub fn stall_ms_last_minute(&self, stall_ms: u64) -> u64 {
        self.stalls
            .front()
            .map_or(0, |&(_, first)| stall_ms.saturating_sub(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_counts_for_a_minute_then_is_forgotten() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut samples = Samples::default();
        assert_eq!(samples.stall_ms_last_minute(0), 0, "no sample yet");
        samples.note_stall(at(0), 100);
        assert_eq!(
            samples.stall_ms_last_minute(100),
            0,
            "older stalls do not count"
        );
        samples.note_stall(at(1), 350);
        assert_eq!(samples.stall_ms_last_minute(350), 250);
        for s in 2..=60 {
            samples.note_stall(at(s), 350);
        }
        assert_eq!(
            samples.stall_ms_last_minute(350),
            250,
            "a minute after: still within"
        );
        samples.note_stall(at(61), 350);
        samples.note_stall(at(62), 350);
        assert_eq!(
            samples.stall_ms_last_minute(350),
            0,
            "more than a minute ago"
        );
        assert!(samples.stalls.len() <= 62, "the window stays bounded");
    }

    #[test]
    fn rates_are_per_second_of_the_interval() {
        let prev = EngineStatus::default();
        let now = EngineStatus {
            write_bytes: 4 << 20,
            written_back_bytes: 1 << 20,
            stall_ms: 7,
            ..EngineStatus::default()
        };
        let mut samples = Samples::default();
        samples.record(Instant::now(), &prev, &now, 2.0);
        assert_eq!(samples.write_bytes_per_sec, 2 << 20);
        assert_eq!(samples.written_back_bytes_per_sec, 512 << 10);
    }
}
