//! The per-device configuration file (`/etc/writeboost/NAME.toml`, tools/systemd/example.toml):
//! what `wbctl create --config` starts from, and what the daemon re-reads on SIGHUP
//! (`systemctl reload`) to apply its writeback knobs without stopping the device.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's fields; unknown ones are refused (a typo must not be silently ignored).
#[derive(Debug, Deserialize, Serialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub backing: Option<PathBuf>,
    #[serde(default)]
    pub caches: Vec<PathBuf>,
    #[serde(default)]
    pub single_leg: bool,
    pub queues: Option<u16>,
    pub depth: Option<u16>,
    pub logical_block_size: Option<u32>,
    /// The ublk device id (`/dev/ublkb<dev_id>`).
    pub dev_id: Option<i32>,
    /// Program run on every mode change and leg event, with the facts in `WRITEBOOST_*`
    /// environment variables (`daemon::events`).
    pub event_hook: Option<PathBuf>,
    /// Writeback knobs, by the names `wbctl set` takes.
    #[serde(default)]
    pub policy: BTreeMap<String, toml::Value>,
}

impl DeviceConfig {
    /// Reads and parses `path`; the error names the file and says why.
    pub fn load(path: &Path) -> Result<DeviceConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the configuration: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The writeback knobs as `wbctl set` takes them (name, value text).
    pub fn knobs(&self) -> Vec<(String, String)> {
        self.policy
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_read_as_wbctl_set_takes_them_and_typos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d0.toml");
        std::fs::write(
            &path,
            "backing = \"/dev/sda\"\n[policy]\nlow_watermark = \"20%\"\nidle_aware = true\n",
        )
        .unwrap();
        let c = DeviceConfig::load(&path).unwrap();
        assert_eq!(
            c.knobs(),
            vec![
                ("idle_aware".to_string(), "true".to_string()),
                ("low_watermark".to_string(), "20%".to_string())
            ]
        );
        std::fs::write(&path, "backnig = \"/dev/sda\"\n").unwrap();
        let e = DeviceConfig::load(&path).unwrap_err();
        assert!(e.contains("d0.toml") && e.contains("backnig"), "{e}");
        let e = DeviceConfig::load(&dir.path().join("none.toml")).unwrap_err();
        assert!(
            e.contains("none.toml: cannot read the configuration"),
            "{e}"
        );
    }
}
