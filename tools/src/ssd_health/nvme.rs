//! The NVMe SMART / Health Information log page (log id 02h), read with one Get Log Page admin
//! command through `NVME_IOCTL_ADMIN_CMD` on the namespace block device (the kernel hands
//! admin commands on a namespace to its controller), and decoded.
//!
//! Layouts: `struct nvme_passthru_cmd` of linux/include/uapi/linux/nvme_ioctl.h (72 bytes;
//! `nvme_admin_cmd` is the same struct) and the 512-byte log page of the NVMe base
//! specification ("SMART / Health Information (Log Identifier 02h)"; nvme-cli's
//! `struct nvme_smart_log`), all fields little-endian.

use std::fs::File;
use std::os::fd::AsRawFd as _;

use super::{Source, SsdHealth};

/// `struct nvme_passthru_cmd` (uapi): the command in, `result` (CQE dword 0) out.
#[repr(C)]
#[derive(Debug, Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);

/// `_IOWR('N', 0x41, struct nvme_admin_cmd)`: direction read|write (3) in bits 30-31, the
/// struct's size in bits 16-29, the type 'N' in bits 8-15, the number in bits 0-7.
const NVME_IOCTL_ADMIN_CMD: u64 = (3 << 30) | (72 << 16) | ((b'N' as u64) << 8) | 0x41;

const ADMIN_GET_LOG_PAGE: u8 = 0x02;
const LOG_SMART: u32 = 0x02;
/// The controller-wide log (not one namespace's), which every controller supports.
const NSID_ALL: u32 = 0xffff_ffff;
pub const LOG_LEN: usize = 512;

/// Command dword 10 of a Get Log Page for the whole SMART log: the log id in bits 0-7, the
/// number of dwords minus one (0-based) in bits 16-31.
fn get_log_cdw10() -> u32 {
    let dwords = (LOG_LEN / 4) as u32;
    ((dwords - 1) << 16) | LOG_SMART
}

/// The page from the namespace device `dev` (e.g. /dev/nvme0n1), or why not.
pub fn read_log(dev: &str) -> Result<[u8; LOG_LEN], String> {
    let file = File::open(dev).map_err(|e| format!("{dev}: {e}"))?;
    let mut page = [0u8; LOG_LEN];
    let mut cmd = PassthruCmd {
        opcode: ADMIN_GET_LOG_PAGE,
        nsid: NSID_ALL,
        addr: page.as_mut_ptr() as u64,
        data_len: LOG_LEN as u32,
        cdw10: get_log_cdw10(),
        ..PassthruCmd::default()
    };
    // SAFETY: the fd is open for the whole call; `cmd` is a live, initialised
    // `struct nvme_passthru_cmd` with the layout the request number encodes (72 bytes, checked
    // at compile time); its `addr` points to `page`, a live buffer of `data_len` bytes that
    // the kernel fills and nothing else uses until the call returns; `metadata` is 0 with
    // `metadata_len` 0, so no other user memory is touched.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            NVME_IOCTL_ADMIN_CMD as _,
            &mut cmd as *mut PassthruCmd,
        )
    };
    match rc {
        0 => Ok(page),
        // Positive: the NVMe status code of a completed, failed command.
        status if status > 0 => Err(format!(
            "{dev}: Get Log Page (SMART) failed with NVMe status {status:#x}"
        )),
        _ => Err(format!(
            "{dev}: the NVMe admin command: {}",
            std::io::Error::last_os_error()
        )),
    }
}

/// Bytes `at..at+16` as the little-endian 128-bit counter the log keeps, saturated to u64 (a
/// count beyond 2^64 is not a thing a drive will reach).
fn counter(page: &[u8; LOG_LEN], at: usize) -> u64 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&page[at..at + 16]);
    u64::try_from(u128::from_le_bytes(b)).unwrap_or(u64::MAX)
}

/// The figures of a SMART / Health log page. Offsets from the base specification: critical
/// warning 0, composite temperature 1-2 (kelvin), available spare 3, its threshold 4,
/// percentage used 5, data units written 48-63, power-on hours 128-143, media and data
/// integrity errors 160-175.
pub fn decode(page: &[u8; LOG_LEN], device: &str) -> SsdHealth {
    let kelvin = u16::from_le_bytes([page[1], page[2]]);
    SsdHealth {
        source: Source::Nvme,
        device: Some(device.to_string()),
        reason: None,
        critical_warning: Some(u32::from(page[0])),
        // 0 means the controller does not report it.
        temperature_celsius: (kelvin != 0).then_some(i64::from(kelvin) - 273),
        available_spare: Some(u32::from(page[3])),
        available_spare_threshold: Some(u32::from(page[4])),
        percentage_used: Some(u32::from(page[5])),
        data_units_written: Some(counter(page, 48)),
        power_on_hours: Some(counter(page, 128)),
        media_errors: Some(counter(page, 160)),
        ..SsdHealth::unknown(None, "")
    }
}

/// The health of the namespace device `dev`, or unknown with the reason it could not be read.
pub fn read(dev: &str) -> SsdHealth {
    match read_log(dev) {
        Ok(page) => decode(&page, dev),
        Err(why) => SsdHealth::unknown(Some(dev.to_string()), why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_and_command_match_the_kernel_headers() {
        // As printed by a C program with <linux/nvme_ioctl.h>: NVME_IOCTL_ADMIN_CMD.
        assert_eq!(NVME_IOCTL_ADMIN_CMD, 0xC048_4E41);
        // NUMDL 127 (128 dwords = 512 bytes), LID 2.
        assert_eq!(get_log_cdw10(), 0x007F_0002);
        assert_eq!(std::mem::offset_of!(PassthruCmd, addr), 24);
        assert_eq!(std::mem::offset_of!(PassthruCmd, data_len), 36);
        assert_eq!(std::mem::offset_of!(PassthruCmd, cdw10), 40);
        assert_eq!(std::mem::offset_of!(PassthruCmd, result), 68);
    }

    /// A page as a worn drive might send it, every field at its specified offset and the
    /// reserved bytes around them filled with junk that must be ignored.
    fn worn_page() -> [u8; LOG_LEN] {
        let mut p = [0xEEu8; LOG_LEN];
        p[0] = 0x05; // spare below threshold + reliability degraded
        p[1..3].copy_from_slice(&318u16.to_le_bytes()); // 45 °C
        p[3] = 7; // available spare
        p[4] = 10; // threshold
        p[5] = 91; // percentage used
        p[6] = 0; // endurance group summary
        let field = |p: &mut [u8; LOG_LEN], at: usize, v: u128| {
            p[at..at + 16].copy_from_slice(&v.to_le_bytes())
        };
        field(&mut p, 32, 1_111); // data units read
        field(&mut p, 48, 2_000_000); // data units written: 1.024 TB in 512 000-byte units
        field(&mut p, 64, 3_333);
        field(&mut p, 80, 4_444);
        field(&mut p, 96, 5_555);
        field(&mut p, 112, 66);
        field(&mut p, 128, 43_210); // power-on hours
        field(&mut p, 144, 12);
        field(&mut p, 160, 3); // media errors
        field(&mut p, 176, 9);
        p
    }

    #[test]
    fn a_known_page_decodes_field_by_field() {
        let h = decode(&worn_page(), "/dev/nvme0n1");
        assert_eq!(h.source, Source::Nvme);
        assert_eq!(h.device.as_deref(), Some("/dev/nvme0n1"));
        assert_eq!(h.reason, None);
        assert_eq!(h.critical_warning, Some(5));
        assert_eq!(h.temperature_celsius, Some(45));
        assert_eq!(h.available_spare, Some(7));
        assert_eq!(h.available_spare_threshold, Some(10));
        assert_eq!(h.percentage_used, Some(91));
        assert_eq!(h.data_units_written, Some(2_000_000));
        assert_eq!(h.power_on_hours, Some(43_210));
        assert_eq!(h.media_errors, Some(3));
        assert_eq!(h.smart_passed, None, "not an NVMe field");
    }

    #[test]
    fn a_fresh_page_and_huge_counters() {
        // What QEMU's emulated controller serves: zeros but for the temperature (323 K).
        let mut p = [0u8; LOG_LEN];
        p[1..3].copy_from_slice(&323u16.to_le_bytes());
        let h = decode(&p, "/dev/nvme1n1");
        assert_eq!(
            (h.critical_warning, h.percentage_used, h.available_spare),
            (Some(0), Some(0), Some(0))
        );
        assert_eq!(h.temperature_celsius, Some(50));
        // A counter past 64 bits saturates rather than wrapping to a small number.
        p[160 + 8] = 1;
        assert_eq!(decode(&p, "x").media_errors, Some(u64::MAX));
        // No temperature reported.
        p[1..3].copy_from_slice(&[0, 0]);
        assert_eq!(decode(&p, "x").temperature_celsius, None);
    }

    #[test]
    fn a_device_that_is_not_nvme_is_unknown_with_the_reason() {
        let h = read("/dev/null");
        assert_eq!(h.source, Source::Unknown);
        assert!(
            h.reason.as_deref().unwrap_or("").contains("/dev/null"),
            "{h:?}"
        );
        let h = read("/nonexistent/nvme9n1");
        assert_eq!(h.source, Source::Unknown);
        assert!(h.reason.unwrap().contains("No such file"));
    }
}
