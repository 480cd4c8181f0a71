#!/bin/bash
# Prepares this machine for sluice's VM tests (tests/tests/vm_*.rs, harness tests/src/vm.rs).
# Run as root; idempotent, and a fast no-op once everything is in place.
#
#  * host packages: qemu-system-x86 and qemu-utils (qemu-storage-daemon, for bench/'s
#    comparison runner) from bookworm-backports (QEMU 10; the bookworm-backports apt source is
#    added when missing), and the tools the guest runs from the host's root
#    over 9p: fio, e2fsprogs, util-linux, kmod, plus busybox-static and cpio for the initramfs;
#  * the guest kernels: every one pinned in tests/vm/kernel-version (package and version,
#    from bookworm-backports or another suite such as trixie-backports), downloaded with
#    `apt-get download` and extracted with `dpkg-deb -x` (not installed) into the cache, its
#    modules decompressed (saves seconds per boot under emulation) and indexed with
#    `depmod -b`. A suite the host's apt sources lack is reached through a private apt
#    configuration under the cache ($CACHE_BASE/apt/<suite>), so the host's sources and
#    packages stay as they are;
#  * a busybox initramfs with tests/vm/init and the modules that mount the host root
#    (netfs, 9pnet, 9pnet_virtio, 9p, overlay; virtio and virtio_pci are built in), one per
#    kernel.
#
# SLUICE_VM_KERNELS=<release>[,<release>…] prepares only those of the pinned kernels.
#
# Cache: ${SLUICE_VM_CACHE:-/var/cache/sluice-vm}/<release>/, holding vmlinuz,
# initramfs.cpio, init (the guest init it holds), root/ (the extracted package:
# root/lib/modules/<release>, root/modprobe.d) and READY.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Bump when the cache layout or the initramfs changes in a way the READY check must notice.
CACHE_FORMAT=1

say() { echo "prepare-vm: $*"; }
die() {
	echo "prepare-vm: ERROR: $*" >&2
	exit 1
}

CACHE_BASE=${SLUICE_VM_CACHE:-/var/cache/sluice-vm}
# The guest init's hash goes into READY, so an edited init rebuilds the initramfs.
INIT_SUM=$(sha256sum "$HERE/init" | cut -c1-16)
# The pinned kernels: "<release> <version> [<suite> [<package>]]" lines.
mapfile -t KERNELS < <(grep -v '^[[:space:]]*#' "$HERE/kernel-version" | grep .)
[ ${#KERNELS[@]} -gt 0 ] || die "no '<release> <version>' line in $HERE/kernel-version"

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and writes $CACHE_BASE)"

# ---------------------------------------------------------------------------------------
# Host packages
# ---------------------------------------------------------------------------------------
TOOLS=(busybox-static cpio kmod fio e2fsprogs util-linux)

installed_version() { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null | awk '$1 == "ii" { print $2 }'; }

missing=()
for p in "${TOOLS[@]}"; do
	[ -n "$(installed_version "$p")" ] || missing+=("$p")
done
# QEMU packages come from bookworm-backports: qemu-system-x86 for the guest, qemu-utils for
# qemu-storage-daemon (the peer in bench/'s comparison runner).
QEMU_PKGS=(qemu-system-x86 qemu-utils)
missing_qemu=()
for p in "${QEMU_PKGS[@]}"; do
	case "$(installed_version "$p")" in
	*bpo*) ;;
	*) missing_qemu+=("$p") ;;
	esac
done

apt_updated=
apt_update() {
	if [ -z "$apt_updated" ]; then
		say "apt-get update"
		apt-get update -q || die "apt-get update failed"
		apt_updated=1
	fi
}

if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
	say "adding bookworm-backports: /etc/apt/sources.list.d/backports.sources"
	cat >/etc/apt/sources.list.d/backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	apt_update
fi

if [ $((${#missing[@]} + ${#missing_qemu[@]})) -gt 0 ]; then
	say "installing: ${missing[*]} ${missing_qemu[*]}"
	# Lists older than the backports source, or never fetched: update once before installing.
	if ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q bpo; then apt_update; fi
	export DEBIAN_FRONTEND=noninteractive
	if [ ${#missing[@]} -gt 0 ]; then
		apt-get install -y -q --no-install-recommends "${missing[@]}" ||
			{ apt_update && apt-get install -y -q --no-install-recommends "${missing[@]}"; } ||
			die "apt-get install ${missing[*]} failed"
	fi
	if [ ${#missing_qemu[@]} -gt 0 ]; then
		# -t only for QEMU: its own packages (qemu-system-common/-data, seabios) must come
		# from backports too, while the tools above stay at bookworm's versions.
		apt-get install -y -q --no-install-recommends -t bookworm-backports "${missing_qemu[@]}" ||
			{ apt_update && apt-get install -y -q --no-install-recommends -t bookworm-backports "${missing_qemu[@]}"; } ||
			die "apt-get install -t bookworm-backports ${missing_qemu[*]} failed"
	fi
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is not on PATH after installing qemu-system-x86"
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not on PATH after installing qemu-utils"
BUSYBOX=$(command -v busybox) || die "busybox not found after installing busybox-static"
# A dynamically linked busybox (package busybox) would not run in the initramfs.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	die "$BUSYBOX is dynamically linked: install busybox-static"
fi

# ---------------------------------------------------------------------------------------
# Guest kernel and initramfs
# ---------------------------------------------------------------------------------------
# Apt options for downloading from SUITE (in APT_OPTS): none for a suite the host's sources
# have; otherwise a private configuration under $CACHE_BASE/apt/SUITE (a deb822 .sources
# file: apt reads that format only from a file so named; lists and
# package cache of its own, no dpkg status), signed by the Debian archive keyring.
declare -A suite_updated=()
apt_opts_for() {
	local suite=$1
	APT_OPTS=()
	if grep -rqs "^[^#]*\b$suite\b" /etc/apt/sources.list /etc/apt/sources.list.d/; then
		return 0
	fi
	local dir="$CACHE_BASE/apt/$suite"
	mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
	cat >"$dir/$suite.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Architectures: amd64
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	APT_OPTS=(-o "Dir::Etc::SourceList=$dir/$suite.sources" -o "Dir::Etc::SourceParts=$dir/none"
		-o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::State::status=/dev/null")
	[ -n "$(ls "$dir/lists" 2>/dev/null | grep -v -e partial -e lock -e auxfiles)" ] || suite_update "$suite"
}
# apt-get update for SUITE, once: the host's lists, or the private ones.
suite_update() {
	[ -z "${suite_updated[$1]:-}" ] || return 0
	suite_updated[$1]=1
	if [ ${#APT_OPTS[@]} -eq 0 ]; then
		apt_update
	else
		say "apt-get update ($1, private lists)"
		apt-get "${APT_OPTS[@]}" update -q || die "apt-get update of $1 failed"
	fi
}

# prepare_kernel LINE: the kernel of one tests/vm/kernel-version line, extracted into
# $CACHE_BASE/<release> with its initramfs.
prepare_kernel() {
	local KREL KVER KSUITE KPKG
	read -r KREL KVER KSUITE KPKG <<<"$1"
	[ -n "${KREL:-}" ] && [ -n "${KVER:-}" ] || die "malformed line in $HERE/kernel-version: $1"
	KSUITE=${KSUITE:-bookworm-backports}
	KPKG=${KPKG:-linux-image-$KREL-unsigned}
	local CACHE="$CACHE_BASE/$KREL"
	local STAMP="kernel=$KREL version=$KVER format=$CACHE_FORMAT init=$INIT_SUM"
	if [ -f "$CACHE/READY" ] && [ "$(cat "$CACHE/READY")" = "$STAMP" ] &&
		[ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initramfs.cpio" ] && cmp -s "$HERE/init" "$CACHE/init"; then
		say "ready: $CACHE ($KPKG $KVER, QEMU $(installed_version qemu-system-x86))"
		return 0
	fi

	mkdir -p "$CACHE_BASE"
	TMP=$(mktemp -d "$CACHE_BASE/.prepare.XXXXXX")
	trap 'rm -rf "$TMP"' EXIT

	if [ -d "$CACHE/root/lib/modules/$KREL" ] && [ -f "$CACHE/root/boot/vmlinuz-$KREL" ] &&
		[ -f "$CACHE/root/.extracted" ]; then
		say "reusing the extracted kernel in $CACHE/root"
		rm -f "$CACHE/READY"
		mv "$CACHE/root" "$TMP/root"
	else
		apt_opts_for "$KSUITE"
		say "downloading $KPKG=$KVER ($KSUITE)"
		download() { (cd "$TMP" && apt-get "${APT_OPTS[@]}" download -q "$KPKG=$KVER" 2>&1 | { grep -v 'unsandboxed as root' || true; }); }
		if ! download || ! ls "$TMP"/*.deb >/dev/null 2>&1; then
			suite_update "$KSUITE"
			if ! download || ! ls "$TMP"/*.deb >/dev/null 2>&1; then
				local series=${KREL%.*}
				echo "prepare-vm: the $series kernels $KSUITE has now:" >&2
				apt-cache "${APT_OPTS[@]}" search --names-only "^linux-image-${series//./\\.}\\..*-amd64(-unsigned)?\$" |
					while read -r pkg _; do apt-cache "${APT_OPTS[@]}" madison "$pkg"; done | sed 's/^/  /' >&2 || true
				die "cannot download $KPKG=$KVER: pick a listed version ($KSUITE) and update tests/vm/kernel-version"
			fi
		fi
		say "extracting $(basename "$TMP"/*.deb)"
		dpkg-deb -x "$TMP"/*.deb "$TMP/root" || die "dpkg-deb -x failed"
		rm -f "$TMP"/*.deb
		# Packages of a merged-/usr release (trixie on) put the modules in usr/lib/modules;
		# the host's kmod (modprobe -d, depmod -b) and the harness look in lib/modules.
		if [ ! -d "$TMP/root/lib/modules" ] && [ -d "$TMP/root/usr/lib/modules" ]; then
			mkdir -p "$TMP/root/lib"
			mv "$TMP/root/usr/lib/modules" "$TMP/root/lib/modules"
		fi
		[ -d "$TMP/root/lib/modules/$KREL" ] || die "the package has no lib/modules/$KREL"
		[ -f "$TMP/root/boot/vmlinuz-$KREL" ] || die "the package has no boot/vmlinuz-$KREL"
		n=$(find "$TMP/root/lib/modules/$KREL" -name '*.ko.xz' | wc -l)
		say "decompressing $n modules"
		find "$TMP/root/lib/modules/$KREL" -name '*.ko.xz' -print0 | xargs -0 -r -n 256 -P "$(nproc)" xz -d ||
			die "decompressing the modules failed"
		touch "$TMP/root/.extracted"
	fi
	MODDIR="$TMP/root/lib/modules/$KREL"
	say "depmod -b"
	depmod -b "$TMP/root" "$KREL" || die "depmod -b $TMP/root $KREL failed"
	# An empty configuration for the guest's modprobe (-C), so the host's /etc/modprobe.d does
	# not apply.
	mkdir -p "$TMP/root/modprobe.d"

	for builtin in virtio virtio_pci virtio_ring; do
		grep -q "/$builtin.ko\$" "$MODDIR/modules.builtin" ||
			die "$builtin is not built into $KREL: add it to the initramfs modules"
	done

	say "building the initramfs"
	IRD="$TMP/initramfs"
	mkdir -p "$IRD"/{bin,dev,proc,sys,lib/modules}
	cp "$BUSYBOX" "$IRD/bin/busybox"
	cp "$HERE/init" "$IRD/init"
	chmod 0755 "$IRD/init" "$IRD/bin/busybox"
	mknod -m 0600 "$IRD/dev/console" c 5 1
	: >"$IRD/lib/modules/load-order"
	for m in 9pnet_virtio 9p overlay; do
		modprobe -d "$TMP/root" -S "$KREL" -C "$TMP/root/modprobe.d" --show-depends "$m" ||
			die "modprobe --show-depends $m failed"
	done | awk '$1 == "insmod" { print $2 }' | while read -r ko; do
		name=$(basename "$ko")
		grep -qx "$name" "$IRD/lib/modules/load-order" && continue
		cp "$ko" "$IRD/lib/modules/$name"
		echo "$name" >>"$IRD/lib/modules/load-order"
	done
	say "initramfs modules: $(tr '\n' ' ' <"$IRD/lib/modules/load-order")"
	# Uncompressed: the kernel unpacks it faster than it could decompress it under emulation.
	(cd "$IRD" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$TMP/initramfs.cpio" ||
		die "cpio failed"
	rm -rf "$IRD"
	cp "$TMP/root/boot/vmlinuz-$KREL" "$TMP/vmlinuz"
	# tests/src/vm.rs compares this copy with tests/vm/init to notice a stale initramfs.
	cp "$HERE/init" "$TMP/init"
	echo "$STAMP" >"$TMP/READY"

	# Swap the new cache in whole, so no reader ever sees half of one.
	rm -rf "$CACHE"
	mv "$TMP" "$CACHE"
	trap - EXIT
	TMP=
	chmod 0755 "$CACHE"
	say "ready: $CACHE (initramfs $(du -k "$CACHE/initramfs.cpio" | cut -f1) KiB, modules $(du -sm "$CACHE/root" | cut -f1) MiB)"
}

mkdir -p "$CACHE_BASE"
for line in "${KERNELS[@]}"; do
	read -r krel _ <<<"$line"
	if [ -n "${SLUICE_VM_KERNELS:-}" ] && [[ ",$SLUICE_VM_KERNELS," != *",$krel,"* ]]; then
		say "skipping $krel (not in SLUICE_VM_KERNELS)"
		continue
	fi
	prepare_kernel "$line"
done
