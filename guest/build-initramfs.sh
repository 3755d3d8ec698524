#!/usr/bin/env bash
# Build the hype test initramfs: an uncompressed newc cpio holding Debian's busybox-static and
# the guest agent as /init.
#
# There are no per-applet links: unpacking each cpio entry costs ~37 ms of guest time when the
# CPU is emulated (measured: 270 links took 10 s of boot), and Debian's busybox runs applets
# without them (its ash is built with FEATURE_SH_STANDALONE and FEATURE_PREFER_APPLETS, so
# `cat`, `xargs cat`, `env cat`, `find -exec cat` all work). Only /bin/sh is linked.
#
#   build-initramfs.sh [OUT.cpio] [EXTRA_DIR]
#
# The archive is cached as $HYPE_CACHE/initramfs-<hash>.cpio (<hash> covers this script, the
# agent, the cpio writer and the contents of EXTRA_DIR); with OUT.cpio it is also copied there.
# Prints the path of the archive. EXTRA_DIR's files, directories and symlinks are added at the
# same paths inside the guest (e.g. EXTRA_DIR/usr/bin/mytool -> /usr/bin/mytool), owned by root.
#
# busybox comes from the installed busybox-static package when present, otherwise from
# `apt-get download busybox-static` (no root needed) cached under $HYPE_CACHE/debs.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=./lib.sh
. "$here/lib.sh"
# shellcheck source=./cpio.sh
. "$here/cpio.sh"

out_arg="${1:-}"
extra="${2:-}"
[ -z "$extra" ] || [ -d "$extra" ] || die "extra directory $extra does not exist"
[ -z "$extra" ] || extra="$(cd "$extra" && pwd)"

agent="$here/agent/init"
inputs=("$here/build-initramfs.sh" "$here/cpio.sh" "$agent")
extra_manifest=""
if [ -n "$extra" ]; then
    # Name, type, mode and content of every extra entry, so any change gives a new hash.
    extra_manifest="$(cd "$extra" && find . -mindepth 1 \( -type f -o -type d -o -type l \) -printf '%y %m %p %l\n' | sort)"
    extra_manifest+=$'\n'"$(cd "$extra" && find . -type f -print0 | sort -z | xargs -0r sha256sum)"
fi
hash="$( (
    content_hash "${inputs[@]}"
    printf '%s\n' "$extra_manifest"
) | sha256sum | cut -c1-16)"
cached="$HYPE_CACHE/initramfs-$hash.cpio"

deliver() {
    if [ -n "$out_arg" ]; then
        mkdir -p "$(dirname "$out_arg")"
        cp "$cached" "$out_arg.tmp.$$"
        mv "$out_arg.tmp.$$" "$out_arg"
        printf '%s\n' "$out_arg"
    else
        printf '%s\n' "$cached"
    fi
}

if [ -f "$cached" ]; then
    deliver
    exit 0
fi

mkdir -p "$HYPE_CACHE"
if package_installed busybox-static; then
    busybox=/bin/busybox
    bb_version="busybox-static $(dpkg-query -W -f='${Version}' busybox-static) (installed)"
else
    deb="$(download_deb busybox-static "$HYPE_CACHE/debs")"
    unpacked="$HYPE_CACHE/debs/$(basename "$deb" .deb)"
    if [ ! -x "$unpacked/bin/busybox" ]; then
        rm -rf "$unpacked.tmp"
        dpkg-deb -x "$deb" "$unpacked.tmp"
        mv "$unpacked.tmp" "$unpacked"
    fi
    busybox="$unpacked/bin/busybox"
    bb_version="$(basename "$deb")"
fi
[ -x "$busybox" ] || die "no busybox binary at $busybox"
log "using $bb_version"

"$busybox" sh -c 'type cat' 2>/dev/null | grep -qx 'cat is cat' ||
    die "$busybox is not built as a standalone shell (FEATURE_SH_STANDALONE); applets would need links"

tmp="$cached.tmp.$$"
trap 'rm -f "$tmp"' EXIT
{
    for d in bin dev etc mnt proc root sys tmp; do
        cpio_dir "$d" 0755
    done
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio_chardev dev/console 0600 5 1
    cpio_chardev dev/null 0666 1 3
    cpio_file bin/busybox 0755 "$busybox"
    cpio_symlink bin/sh busybox
    cpio_file init 0755 "$agent"
    etc="$(mktemp -d)"
    printf 'proc /proc proc defaults 0 0\nsysfs /sys sysfs defaults 0 0\ndevtmpfs /dev devtmpfs defaults 0 0\n' >"$etc/fstab"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$etc/passwd"
    printf 'root:x:0:\n' >"$etc/group"
    for f in fstab passwd group; do
        cpio_file "etc/$f" 0644 "$etc/$f"
    done
    rm -rf "$etc"
    cpio_symlink etc/mtab /proc/mounts
    if [ -n "$extra" ]; then
        while IFS= read -r -d '' p; do
            p="${p#./}"
            perm=$((8#$(stat -c %a "$extra/$p")))
            if [ -L "$extra/$p" ]; then
                cpio_symlink "$p" "$(readlink "$extra/$p")"
            elif [ -d "$extra/$p" ]; then
                cpio_dir "$p" "$perm"
            elif [ -f "$extra/$p" ]; then
                cpio_file "$p" "$perm" "$extra/$p"
            else
                die "extra entry $p is not a file, directory or symlink"
            fi
        done < <(cd "$extra" && find . -mindepth 1 -print0 | sort -z)
    fi
    cpio_trailer
} >"$tmp"
mv "$tmp" "$cached"
trap - EXIT
printf '%s\n' "$bb_version" >"$cached.info"
log "built $cached ($(stat -c %s "$cached") bytes)"
deliver
