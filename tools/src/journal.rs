//! The daemon's log lines in the journal with their priorities. Under systemd, stderr goes to
//! the journal (`JOURNAL_STREAM` is set) and a line that starts with `<N>` (sd-daemon(3)) gets
//! priority N: a lost cache is crit, a failed leg err, degraded / passthrough / stalls warning,
//! so `journalctl -p err` and the mail alerts built on it see them. Elsewhere (a terminal, the
//! detached daemon's log file) lines keep env_logger's usual format.

use std::io::Write;

use log::{Level, Record};

/// The journal priority (syslog level) of a log line.
pub fn priority(level: Level, target: &str) -> u8 {
    if target == wb_target::CRITICAL_LOG_TARGET {
        return 2;
    }
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One line for the journal: the priority prefix, where it comes from, the message.
pub fn write_line(out: &mut impl Write, record: &Record) -> std::io::Result<()> {
    writeln!(
        out,
        "<{}>{}: {}",
        priority(record.level(), record.target()),
        record.target(),
        record.args()
    )
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM` for the service).
pub fn stderr_is_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(level: Level, target: &str, message: &str) -> String {
        let mut out = Vec::new();
        write_line(
            &mut out,
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{message}"))
                .build(),
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn failures_reach_the_journal_at_err_or_above() {
        // The leg failure line (log::legs) and the lost-cache line of the engine.
        let leg = line(
            Level::Error,
            "wb_target::log::legs",
            "cache leg 0 (/dev/sdb) failed: EIO",
        );
        assert_eq!(
            leg,
            "<3>wb_target::log::legs: cache leg 0 (/dev/sdb) failed: EIO\n"
        );
        let lost = line(
            Level::Error,
            wb_target::CRITICAL_LOG_TARGET,
            "CRITICAL: every cache leg",
        );
        assert!(lost.starts_with("<2>"), "{lost}");
        assert!(line(Level::Warn, "wb_target::engine::mode", "degraded").starts_with("<4>"));
        assert!(line(Level::Info, "wb_target::daemon", "live").starts_with("<6>"));
        assert!(line(Level::Debug, "x", "y").starts_with("<7>"));
    }
}
