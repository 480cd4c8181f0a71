//! Drives that go away while they are served. A watcher thread listens to
//! the kernel's uevents (the netlink socket udev reads, so no udevd is
//! needed) and checks every block node against sysfs when a block device is
//! removed, and once every `HOTPLUG_CHECK_INTERVAL_MS` in any case (a lost
//! event, or a kernel that does not send them). The data path finds out on
//! its own too: a request that fails the way a removed drive fails is
//! checked against sysfs ([`crate::node::Node::failed_because_removed`]),
//! and the node is marked at once. Either way the daemon reports the
//! removal once ([`crate::daemon::Daemon::check_removed_nodes`]).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SocketFlags, SocketType};

use crate::daemon::Daemon;
use crate::limits::HOTPLUG_CHECK_INTERVAL_MS;

/// The kernel's own uevent multicast group (udev's re-broadcast is group 2).
const KERNEL_UEVENT_GROUP: u32 = 1;
/// Largest uevent we read; longer ones are truncated (we only look at the
/// first keys).
const UEVENT_BUFFER_BYTES: usize = 8192;

/// Starts the watcher; it ends by itself once the daemon is gone or closing.
pub(crate) fn spawn_watcher(daemon: Weak<Daemon>) -> std::io::Result<JoinHandle<()>> {
    let socket = match uevent_socket() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::info!(
                "no kernel uevents ({e}): removed drives are found by a sysfs check every \
                 {HOTPLUG_CHECK_INTERVAL_MS} ms"
            );
            None
        }
    };
    std::thread::Builder::new()
        .name("hotplug".into())
        .spawn(move || watch(daemon, socket))
}

fn uevent_socket() -> rustix::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        Some(netlink::KOBJECT_UEVENT),
    )?;
    rustix::net::bind(&fd, &SocketAddrNetlink::new(0, KERNEL_UEVENT_GROUP))?;
    Ok(fd)
}

fn watch(daemon: Weak<Daemon>, socket: Option<OwnedFd>) {
    let mut buf = vec![0u8; UEVENT_BUFFER_BYTES];
    let interval = Timespec {
        tv_sec: (HOTPLUG_CHECK_INTERVAL_MS / 1000) as i64,
        tv_nsec: ((HOTPLUG_CHECK_INTERVAL_MS % 1000) * 1_000_000) as i64,
    };
    loop {
        if let Some(fd) = &socket {
            let mut fds = [PollFd::new(fd, PollFlags::IN)];
            let _ = rustix::event::poll(&mut fds, Some(&interval));
            // Drain what came; only a block device's removal matters.
            while let Ok((n, _)) = rustix::net::recv(fd, &mut buf[..], RecvFlags::DONTWAIT) {
                if n == 0 {
                    break;
                }
                let event = &buf[..n];
                if is_block_removal(event) {
                    let header = event.split(|&b| b == 0).next().unwrap_or_default();
                    tracing::debug!("uevent: {}", String::from_utf8_lossy(header));
                }
            }
        } else {
            std::thread::sleep(std::time::Duration::from_millis(HOTPLUG_CHECK_INTERVAL_MS));
        }
        let Some(daemon) = daemon.upgrade() else {
            return;
        };
        if daemon.is_closing() {
            return;
        }
        daemon.check_removed_nodes();
    }
}

/// The block device (`/dev/NAME`) whose drive has serial `serial` and is
/// `capacity_bytes` large: where a removed drive is after it came back
/// under another name (an NVMe controller number is taken while the old one
/// is still held open).
pub(crate) fn find_drive(serial: &str, capacity_bytes: u64) -> Option<PathBuf> {
    std::fs::read_dir("/sys/block")
        .ok()?
        .flatten()
        .find(|e| {
            let dir = e.path();
            let size = std::fs::read_to_string(dir.join("size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            size == Some(capacity_bytes >> 9)
                && sluice_hw::parse_queue_limits(&dir)
                    .ok()
                    .and_then(|q| q.serial)
                    .is_some_and(|s| s == serial)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
}

/// Whether a kernel uevent (`ACTION@DEVPATH\0KEY=VALUE\0…`) says that a
/// block device went away.
fn is_block_removal(event: &[u8]) -> bool {
    let mut fields = event.split(|&b| b == 0);
    let header_is_remove = fields.next().is_some_and(|h| h.starts_with(b"remove@"));
    header_is_remove && fields.any(|f| f == b"SUBSYSTEM=block")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_block_removal_counts() {
        let remove = b"remove@/devices/pci0000:00/0000:00:04.0/nvme/nvme1/nvme1n1\0ACTION=remove\0\
DEVPATH=/devices/pci0000:00/0000:00:04.0/nvme/nvme1/nvme1n1\0SUBSYSTEM=block\0MAJOR=259\0MINOR=1\0\
DEVNAME=nvme1n1\0DEVTYPE=disk\0SEQNUM=1234\0";
        assert!(is_block_removal(remove));
        let add = b"add@/devices/virtual/block/loop0\0ACTION=add\0SUBSYSTEM=block\0";
        assert!(!is_block_removal(add));
        let pci = b"remove@/devices/pci0000:00/0000:00:04.0\0ACTION=remove\0SUBSYSTEM=pci\0";
        assert!(!is_block_removal(pci));
        assert!(!is_block_removal(b""));
        assert!(!is_block_removal(b"remove@"));
    }
}
