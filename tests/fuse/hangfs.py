#!/usr/bin/env python3
"""hangfs: a FUSE filesystem with one file that can be told to stop answering.

    hangfs.py MOUNTPOINT BACKING NAME SIZE CONTROL [hang-flush] [slow-read=OFFSET:LENGTH:SECONDS]

serves MOUNTPOINT/NAME, SIZE bytes, stored in the regular file BACKING
(created sparse, or grown, to SIZE). It works normally until CONTROL exists
(`touch CONTROL`) or the process gets SIGUSR1; from then on every read,
write and fsync/fdatasync of the file blocks forever: the request is taken
from the kernel and never answered, as a dead drive or a hard NFS mount
behaves. Metadata (getattr, statfs, open) keeps answering, so the hang is
only where a block device's I/O would hang.

FUSE_FLUSH (sent by every close(2), including the implicit ones of a process
exiting) keeps answering unless `hang-flush` is given: a close that never
returns is FUSE's, not a drive's (closing an O_DIRECT block device does no
I/O), and the kernel waits for it uninterruptibly, so no process that ever
opened the file could exit, whatever it does. Only unmounting (`fusermount -u -z`) and
killing this process end the blocked requests (the kernel then fails them
with ENOTCONN).

Mounted with `direct_io` (no page cache, so O_DIRECT opens and 4 KiB-aligned
pread/pwrite go straight here) and runs in the foreground, multithreaded (a
blocked request holds one libfuse thread, never the others). fallocate is
not implemented: the kernel answers it EOPNOTSUPP.

With `slow-read=OFFSET:LENGTH:SECONDS`, every read that overlaps bytes
[OFFSET, OFFSET+LENGTH) of the file is answered SECONDS late (a slow drive, a
far away network block device), and says so on stdout: `slow-read start
OFFSET SIZE` when it is taken, `slow-read done OFFSET SIZE` when answered.
Other reads, and all writes, answer at once.

SIGUSR2 makes every write of the file from then on fail with EIO (a drive
whose media went bad: reads still work), and prints `failing writes`.

It prints `ready` on stdout once the mount is visible. Needs fusepy
(`pip install fusepy`) and libfuse2 (`libfuse.so.2`, Debian `libfuse2`).
"""

import errno
import os
import signal
import stat
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations


class HangFS(Operations):
    def __init__(self, backing, name, size, control, hang_flush, slow_read=None):
        self.name = "/" + name
        self.hang_flush = hang_flush
        self.slow_read = slow_read
        self.size = size
        self.control = control
        self.hung = threading.Event()
        self.failing_writes = threading.Event()
        self.never = threading.Event()
        fd = os.open(backing, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self.fd = fd
        now = time.time()
        self.times = (now, now, now)

    # -- the hang --------------------------------------------------------

    def _maybe_hang(self):
        if not self.hung.is_set() and os.path.exists(self.control):
            self.hung.set()
        if self.hung.is_set():
            # Taken from the kernel, never answered.
            while True:
                self.never.wait(3600)

    # -- metadata --------------------------------------------------------

    def getattr(self, path, fh=None):
        t = self.times
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_size=0,
                        st_atime=t[0], st_mtime=t[1], st_ctime=t[2])
        if path == self.name:
            return dict(st_mode=stat.S_IFREG | 0o600, st_nlink=1,
                        st_size=self.size, st_blocks=self.size // 512,
                        st_blksize=4096,
                        st_atime=t[0], st_mtime=t[1], st_ctime=t[2])
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        if path != "/":
            raise FuseOSError(errno.ENOTDIR)
        return [".", "..", self.name[1:]]

    def statfs(self, path):
        return dict(f_bsize=4096, f_frsize=4096, f_blocks=self.size // 4096,
                    f_bfree=0, f_bavail=0, f_namemax=255)

    def open(self, path, flags):
        if path != self.name:
            raise FuseOSError(errno.ENOENT)
        return 0

    def truncate(self, path, length, fh=None):
        if path != self.name:
            raise FuseOSError(errno.ENOENT)
        if length != self.size:
            raise FuseOSError(errno.EPERM)

    def release(self, path, fh):
        return 0

    # -- I/O -------------------------------------------------------------

    def read(self, path, size, offset, fh):
        self._maybe_hang()
        if offset >= self.size:
            return b""
        slow = self.slow_read
        if slow is not None and offset < slow[0] + slow[1] and slow[0] < offset + size:
            print("slow-read start %d %d" % (offset, size), flush=True)
            time.sleep(slow[2])
            data = os.pread(self.fd, min(size, self.size - offset), offset)
            print("slow-read done %d %d" % (offset, size), flush=True)
            return data
        return os.pread(self.fd, min(size, self.size - offset), offset)

    def write(self, path, data, offset, fh):
        self._maybe_hang()
        if self.failing_writes.is_set():
            raise FuseOSError(errno.EIO)
        if offset + len(data) > self.size:
            raise FuseOSError(errno.ENOSPC)
        return os.pwrite(self.fd, data, offset)

    def fsync(self, path, datasync, fh):
        self._maybe_hang()
        if datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)
        return 0

    def flush(self, path, fh):
        if self.hang_flush:
            self._maybe_hang()
        return 0


def main():
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    mountpoint, backing, name, size, control = sys.argv[1:6]
    hang_flush = False
    slow_read = None
    for opt in sys.argv[6:]:
        if opt == "hang-flush":
            hang_flush = True
        elif opt.startswith("slow-read="):
            try:
                off, length, secs = opt[len("slow-read="):].split(":")
                slow_read = (int(off), int(length), float(secs))
            except ValueError:
                sys.exit(__doc__)
        else:
            sys.exit(__doc__)
    size = int(size)
    if size <= 0 or size % 4096:
        sys.exit("hangfs: SIZE must be a positive multiple of 4096")
    fs = HangFS(backing, name, size, control, hang_flush, slow_read)

    # SIGUSR1: hang. Python runs signal handlers on the main thread only, and
    # that one sits in libfuse's loop; so block the signal everywhere (the
    # libfuse threads inherit the mask) and take it on a thread of our own.
    # The same for SIGUSR2 (writes fail).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})

    def on_signals():
        while True:
            sig = signal.sigwait({signal.SIGUSR1, signal.SIGUSR2})
            if sig == signal.SIGUSR1:
                fs.hung.set()
                print("hung", flush=True)
            else:
                fs.failing_writes.set()
                print("failing writes", flush=True)

    threading.Thread(target=on_signals, daemon=True).start()

    # Say ready once the mount answers (FUSE() below blocks in libfuse).
    def announce():
        want = os.path.join(mountpoint, name)
        for _ in range(2000):
            if os.path.ismount(mountpoint) and os.path.exists(want):
                print("ready", flush=True)
                return
            time.sleep(0.005)

    threading.Thread(target=announce, daemon=True).start()

    FUSE(fs, mountpoint, foreground=True, nothreads=False, direct_io=True,
         fsname="hangfs", subtype="hangfs")


if __name__ == "__main__":
    main()
