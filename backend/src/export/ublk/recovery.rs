//! What a previous server left under a ublk id. sluice creates its devices
//! with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: when the
//! server dies (crash, `kill -9`, an upgrade's restart) the kernel keeps
//! `/dev/ublkbN` and quiesces it, holding new I/O and taking back what the
//! dead server had in flight; the next server takes the device over
//! (`START_USER_RECOVERY` … `END_USER_RECOVERY`) and the held and reissued
//! requests are served. A device that cannot be recovered is removed; one
//! that a live process serves is left alone and named.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use libublk::ctrl::UblkCtrl;
use libublk::sys;

use super::{ctrl_bounded, UblkFailure};

/// The state of an existing device, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Leftover {
    /// Quiesced by the kernel after its server died, with recovery on:
    /// take it over. Its geometry is fixed; the new server must match it.
    Recoverable {
        /// Hardware queues the device was created with.
        queues: u16,
        /// Their depth.
        queue_depth: u16,
        /// Its size as the kernel knows it.
        capacity_bytes: u64,
        /// Its logical block size.
        logical_block_size_bytes: u32,
    },
    /// Nobody serves it and it cannot be recovered (created without
    /// recovery, or its state does not allow it): remove it.
    Dead {
        /// `UBLK_S_DEV_*`.
        state: u16,
    },
    /// A live process serves it or holds its char device.
    Served {
        /// The process.
        pid: i32,
        /// Its command name.
        comm: String,
    },
}

/// The name of a device state, for messages.
pub(super) fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "failing I/O",
        _ => "unknown",
    }
}

/// Looks at device `id` (which exists). The calling thread needs libublk's
/// control ring.
pub(super) fn inspect(id: u32) -> Result<Leftover, UblkFailure> {
    let ctrl = UblkCtrl::new_simple(id as i32)
        .map_err(|source| UblkFailure::Inspect { dev_id: id, source })?;
    let info = ctrl.dev_info();
    let me = std::process::id() as i32;
    // A live server, by the pid the kernel recorded or as the holder of the
    // char device (a server that is starting, or that leaked it).
    if info.ublksrv_pid > 0 && info.ublksrv_pid != me && process_alive(info.ublksrv_pid) {
        if let Some(comm) = comm_of(info.ublksrv_pid) {
            if u32::from(info.state) == sys::UBLK_S_DEV_LIVE || holds(info.ublksrv_pid, id) {
                return Ok(Leftover::Served {
                    pid: info.ublksrv_pid,
                    comm,
                });
            }
        }
    }
    if let Some((pid, comm)) = holder_of(id) {
        return Ok(Leftover::Served { pid, comm });
    }
    let recoverable_state = matches!(
        u32::from(info.state),
        sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO
    );
    if recoverable_state && info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0 {
        let mut params = sys::ublk_params {
            len: std::mem::size_of::<sys::ublk_params>() as u32,
            types: sys::UBLK_PARAM_TYPE_BASIC,
            ..Default::default()
        };
        ctrl.get_params(&mut params)
            .map_err(|source| UblkFailure::Inspect { dev_id: id, source })?;
        return Ok(Leftover::Recoverable {
            queues: info.nr_hw_queues,
            queue_depth: info.queue_depth,
            capacity_bytes: params.basic.dev_sectors << 9,
            logical_block_size_bytes: 1 << params.basic.logical_bs_shift,
        });
    }
    Ok(Leftover::Dead { state: info.state })
}

/// Removes device `id`, which nobody serves: `STOP_DEV`, then `DEL_DEV`,
/// each bounded by `timeout`.
pub(super) fn remove(id: u32, timeout: Duration) -> Result<(), UblkFailure> {
    let ctrl = Arc::new(
        UblkCtrl::new_simple(id as i32)
            .map_err(|source| UblkFailure::Inspect { dev_id: id, source })?,
    );
    // STOP_DEV fails on a device that is not live; DEL_DEV is what counts.
    let _ = ctrl_bounded(&ctrl, "STOP_DEV", UblkCtrl::kill_dev, id, timeout)?;
    match ctrl_bounded(&ctrl, "DEL_DEV", UblkCtrl::del_dev, id, timeout)? {
        Ok(_) => Ok(()),
        Err(source) => Err(UblkFailure::Remove { dev_id: id, source }),
    }
}

fn process_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn comm_of(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// Whether process `pid` has `/dev/ublkc<id>` open.
fn holds(pid: i32, id: u32) -> bool {
    let cdev = Path::new("/dev").join(format!("ublkc{id}"));
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == cdev))
}

/// A process other than this one that has `/dev/ublkc<id>` open.
fn holder_of(id: u32) -> Option<(i32, String)> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .find(|&pid| holds(pid, id))
        .map(|pid| (pid, comm_of(pid).unwrap_or_else(|| "?".into())))
}
