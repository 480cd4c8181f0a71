//! What `sluice udev-info DEVNAME` tells udev (`IMPORT{program}` in
//! `udev/60-sluice.rules`): for a `ublkbN` that sluice serves,
//! `SLUICE_EXPORT=<export name>`, from which the rule makes the stable link
//! `/dev/disk/by-sluice/<export name>`. Nothing for other devices.

/// The udev properties of block device `devname` (`ublkb3` or
/// `/dev/ublkb3`), one `KEY=value` line each; empty when it is not a ublk
/// device sluice serves.
pub fn properties(devname: &str) -> String {
    let name = devname.rsplit('/').next().unwrap_or(devname);
    let Some(id) = name
        .strip_prefix("ublkb")
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return String::new();
    };
    match crate::export::ublk::export_of_device(id) {
        Some(export) => format!("SLUICE_EXPORT={}\n", link_safe(&export)),
        None => String::new(),
    }
}

/// A name as one path component of a udev link: letters, digits and
/// `._-` kept, anything else `_` (a name cannot climb out of
/// `/dev/disk/by-sluice/`).
fn link_safe(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match safe.as_str() {
        "" | "." | ".." => format!("_{safe}"),
        _ => safe,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_one_safe_path_component() {
        assert_eq!(link_safe("vm0-root"), "vm0-root");
        assert_eq!(link_safe("a/../b c"), "a_.._b_c");
        assert_eq!(link_safe(".."), "_..");
        assert_eq!(link_safe(""), "_");
        assert_eq!(link_safe("dïsk"), "d_sk");
    }

    #[test]
    fn other_devices_get_nothing() {
        assert_eq!(properties("sda"), "");
        assert_eq!(properties("/dev/ublkc0"), "");
        assert_eq!(properties("ublkbX"), "");
    }
}
