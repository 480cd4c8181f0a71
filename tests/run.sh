#!/usr/bin/env bash
# The whole sluice test suite, on a fresh Debian 12 machine, as root:
# installs what it needs (Debian packages, the VM kernel and QEMU), builds,
# and runs unit, integration (real binary + libblkio) and VM tests.
#
#   sudo tests/run.sh            # everything
#   sudo tests/run.sh --no-vm    # skip preparing and booting the QEMU guest
set -euo pipefail
cd "$(dirname "$0")/.."

with_vm=1
[ "${1:-}" = "--no-vm" ] && with_vm=0

if [ "$(id -u)" != 0 ]; then
    echo "tests/run.sh: run as root (loop devices, ublk in the VM need it)" >&2
    exit 1
fi

# Debian packages: libclang for bindgen (libublk's sys crate), losetup,
# mkfs/fsck and fio for the storage checks; libfuse2 (libfuse.so.2, which
# fusepy loads) and fuse (fusermount) for the FUSE file that stops answering
# (tests/fuse/hangfs.py, tests/tests/hang.rs); tmux, the terminal that
# `sluice ctl top` is tested in (tests/tests/top.rs); prometheus for promtool,
# which checks the metrics exposition (tests/tests/metrics.rs).
want=(libclang-dev clang util-linux e2fsprogs fio libfuse2 fuse udev tmux prometheus)
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # Only promtool is wanted: the Prometheus server the package starts
    # under systemd is stopped again (when we installed it just now).
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

# fusepy for hangfs.py, in the python3 the tests run: pip when it can; a
# Debian python3 that refuses pip (PEP 668) or has none gets python3-fusepy.
if ! python3 -c 'import fuse' >/dev/null 2>&1; then
    echo "== installing fusepy"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore fusepy >/dev/null 2>&1 \
        || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-fusepy
    python3 -c 'import fuse' || echo "warning: python3 cannot import fusepy: FUSE tests will skip" >&2
fi
if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || echo "warning: no /dev/fuse: FUSE tests will skip" >&2
fi

# Loop devices are the real block devices on this host.
if [ ! -e /dev/loop-control ]; then
    modprobe loop 2>/dev/null || echo "warning: no /dev/loop-control: loop-device tests will skip" >&2
fi

if [ "$with_vm" = 1 ] && [ -x tests/vm/prepare.sh ]; then
    echo "== preparing the VM harness (QEMU from bookworm-backports, Debian 6.12 and 6.18 kernels)"
    tests/vm/prepare.sh
fi

echo "== building"
cargo build --workspace --all-targets
if [ "$with_vm" = 0 ]; then
    export SLUICE_SKIP_VM=1
fi
echo "== testing"
cargo test --workspace --no-fail-fast -- --test-threads=2
