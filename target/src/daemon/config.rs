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

/// `text` (a device's TOML) with `knobs` set in its `[policy]` table, for `wbctl set` to keep
/// what was tuned across a restart: comments, order and layout stay as they were; a knob's
/// trailing comment stays with it; values are written as TOML booleans or numbers when they
/// read as such, else as strings.
pub fn with_knobs(text: &str, knobs: &[(String, String)]) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    if doc.get("policy").is_none() {
        doc["policy"] = toml_edit::table();
    }
    let policy = doc["policy"]
        .as_table_mut()
        .ok_or("`policy` is not a table")?;
    for (k, v) in knobs {
        let mut value = typed(v);
        if let Some(old) = policy.get(k).and_then(|i| i.as_value()) {
            *value.decor_mut() = old.decor().clone();
        }
        policy[k.as_str()] = toml_edit::Item::Value(value);
    }
    Ok(doc.to_string())
}

fn typed(text: &str) -> toml_edit::Value {
    if let Ok(b) = text.parse::<bool>() {
        b.into()
    } else if let Ok(i) = text.parse::<i64>() {
        i.into()
    } else if let Ok(f) = text.parse::<f64>() {
        f.into()
    } else {
        text.into()
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

    #[test]
    fn knobs_are_written_into_the_file_keeping_its_comments() {
        let text = "# tank0\nbacking = \"/dev/sda\"\n\n[policy]\nlow_watermark = \"10%\" # background writeback\nidle_aware = true\n";
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let out = with_knobs(
            text,
            &pairs(&[
                ("low_watermark", "0.3"),
                ("idle_aware", "false"),
                ("pressure_curve", "step"),
            ]),
        )
        .unwrap();
        assert!(
            out.starts_with("# tank0\nbacking = \"/dev/sda\"\n"),
            "{out}"
        );
        assert!(
            out.contains("low_watermark = 0.3 # background writeback"),
            "{out}"
        );
        assert!(out.contains("idle_aware = false"), "{out}");
        assert!(out.contains("pressure_curve = \"step\""), "{out}");
        let c: DeviceConfig = toml::from_str(&out).unwrap();
        assert_eq!(c.knobs().len(), 3);
        let fresh = with_knobs(
            "backing = \"/dev/sda\"\n",
            &pairs(&[("low_watermark", "0.2")]),
        )
        .unwrap();
        assert!(
            fresh.contains("[policy]") && fresh.contains("low_watermark = 0.2"),
            "{fresh}"
        );
        assert!(with_knobs("policy = 3\n", &pairs(&[("low_watermark", "0.2")])).is_err());
    }
}
