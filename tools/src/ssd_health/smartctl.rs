//! SATA/SAS legs: `smartctl --json -a DEV` (smartmontools 7+), where it is installed, parsed
//! for the few figures that matter to a cache SSD: the overall self-assessment, the life used,
//! reallocated sectors, power-on hours and temperature.

use std::process::Command;

use serde_json::Value;

use super::{Source, SsdHealth};

/// smartctl's exit status is a bit mask: bit 0 the command line did not parse, bit 1 the
/// device could not be opened. Either means the JSON holds no device data. The other bits
/// (failing disk, errors logged) come with full data.
const NO_DATA_BITS: i32 = 0b11;

/// The health of `dev` (e.g. /dev/sda) by smartctl, or unknown with the reason.
pub fn read(dev: &str) -> SsdHealth {
    let out = match Command::new("smartctl")
        .args(["--json", "-a", dev])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return SsdHealth::unknown(
                Some(dev.to_string()),
                "smartctl is not installed (apt-get install smartmontools)",
            )
        }
        Err(e) => return SsdHealth::unknown(Some(dev.to_string()), format!("smartctl: {e}")),
    };
    let json: Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => {
            return SsdHealth::unknown(
                Some(dev.to_string()),
                format!("smartctl --json printed no JSON ({e}; smartctl older than 7.0?)"),
            )
        }
    };
    parse(&json, dev, out.status.code().unwrap_or(-1))
}

/// The figures of one `smartctl --json -a` document that exited with `exit_status`.
pub fn parse(json: &Value, dev: &str, exit_status: i32) -> SsdHealth {
    if exit_status < 0 || exit_status & NO_DATA_BITS != 0 {
        let messages: Vec<&str> = json["smartctl"]["messages"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["string"].as_str()).collect())
            .unwrap_or_default();
        return SsdHealth::unknown(
            Some(dev.to_string()),
            format!(
                "smartctl exited with status {exit_status}: {}",
                messages.join("; ")
            ),
        );
    }
    SsdHealth {
        source: Source::Smartctl,
        device: Some(dev.to_string()),
        reason: None,
        percentage_used: percentage_used(json),
        reallocated_sectors: attribute(json, 5)
            .and_then(|a| a["raw"]["value"].as_u64())
            .or_else(|| json["scsi_grown_defect_list"].as_u64()),
        smart_passed: json["smart_status"]["passed"].as_bool(),
        power_on_hours: json["power_on_time"]["hours"].as_u64(),
        temperature_celsius: json["temperature"]["current"].as_i64(),
        ..SsdHealth::unknown(None, "")
    }
}

/// The ATA SMART attribute `id` of the document, if listed.
fn attribute(json: &Value, id: u64) -> Option<&Value> {
    json["ata_smart_attributes"]["table"]
        .as_array()?
        .iter()
        .find(|a| a["id"].as_u64() == Some(id))
}

/// The life used, in percent, from the first of: the ATA Device Statistics "Percentage Used
/// Endurance Indicator" (ACS-3, what new SATA SSDs report), the SCSI one (SAS SSDs), and the
/// vendor wear attributes whose normalised value counts the life left down from 100 (177
/// Wear_Leveling_Count, 231 SSD_Life_Left, 233 Media_Wearout_Indicator).
fn percentage_used(json: &Value) -> Option<u32> {
    let statistics = json["ata_device_statistics"]["pages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|page| page["table"].as_array().into_iter().flatten())
        .find(|row| row["name"].as_str() == Some("Percentage Used Endurance Indicator"))
        .and_then(|row| row["value"].as_u64());
    let scsi = json["scsi_percentage_used_endurance_indicator"].as_u64();
    let vendor = [177, 231, 233]
        .into_iter()
        .find_map(|id| attribute(json, id)?["value"].as_u64())
        .map(|left| 100u64.saturating_sub(left));
    statistics
        .or(scsi)
        .or(vendor)
        .map(|p| u32::try_from(p).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of a `smartctl --json -a` document of a SATA SSD (smartmontools 7.3 shape).
    fn sata_ssd() -> Value {
        serde_json::json!({
            "json_format_version": [1, 0],
            "smartctl": {"version": [7, 3], "exit_status": 0},
            "device": {"name": "/dev/sda", "info_name": "/dev/sda [SAT]", "type": "sat"},
            "smart_status": {"passed": true},
            "ata_smart_attributes": {"revision": 1, "table": [
                {"id": 5, "name": "Reallocated_Sector_Ct", "value": 100, "worst": 100,
                 "thresh": 10, "raw": {"value": 3, "string": "3"}},
                {"id": 177, "name": "Wear_Leveling_Count", "value": 93, "worst": 93,
                 "thresh": 0, "raw": {"value": 72, "string": "72"}}
            ]},
            "ata_device_statistics": {"pages": [
                {"number": 1, "name": "General Statistics", "table": [
                    {"offset": 8, "name": "Lifetime Power-On Resets", "value": 40}]},
                {"number": 7, "name": "Solid State Device Statistics", "table": [
                    {"offset": 8, "name": "Percentage Used Endurance Indicator", "value": 6}]}
            ]},
            "power_on_time": {"hours": 12345},
            "temperature": {"current": 31}
        })
    }

    #[test]
    fn a_sata_ssd_document() {
        let h = parse(&sata_ssd(), "/dev/sda", 0);
        assert_eq!(h.source, Source::Smartctl);
        assert_eq!(h.device.as_deref(), Some("/dev/sda"));
        assert_eq!(h.percentage_used, Some(6), "device statistics come first");
        assert_eq!(h.reallocated_sectors, Some(3));
        assert_eq!(h.smart_passed, Some(true));
        assert_eq!(h.power_on_hours, Some(12345));
        assert_eq!(h.temperature_celsius, Some(31));
        assert_eq!((h.available_spare, h.media_errors), (None, None));
    }

    #[test]
    fn wear_from_a_vendor_attribute_and_a_failing_disk() {
        let mut doc = sata_ssd();
        doc["ata_device_statistics"] = Value::Null;
        doc["smart_status"]["passed"] = false.into();
        // Exit bit 3 (disk failing) still comes with the data.
        let h = parse(&doc, "/dev/sda", 0b1000);
        assert_eq!(h.percentage_used, Some(7), "100 - normalised 93");
        assert_eq!(h.smart_passed, Some(false));
        assert_eq!(h.source, Source::Smartctl);
    }

    #[test]
    fn a_device_smartctl_cannot_open_is_unknown() {
        let doc = serde_json::json!({"smartctl": {"exit_status": 2, "messages": [
            {"string": "Smartctl open device: /dev/sdz failed: No such device",
             "severity": "error"}]}});
        let h = parse(&doc, "/dev/sdz", 2);
        assert_eq!(h.source, Source::Unknown);
        assert!(
            h.reason.as_deref().unwrap().contains("No such device"),
            "{h:?}"
        );
    }
}
