#!/usr/bin/env bash
# Fetch Debian's cloud kernel (the package linux-image-cloud-amd64 points at) without installing
# it, extract its bzImage to $HYPE_CACHE/debian-kernel-<package>_<version>/vmlinuz and print
# that path. Used to test the bzImage boot path with a stock distribution kernel.
# Next to it: `config`, `package`, `release` (the module directory name, e.g. 6.1.0-48-cloud-amd64)
# and `modules/`, the package's own virtio modules (virtio, virtio_ring, virtio_mmio, virtio_blk;
# uncompressed .ko files) for an initramfs that loads them (scripts/verify-debian-kernel).
# guest/extract-vmlinux.sh turns the vmlinuz into a vmlinux that boots through PVH.
# The version is resolved from the local apt lists on every run (cheap); a warm run downloads
# nothing. No root needed unless the package lists are missing.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=./lib.sh
. "$here/lib.sh"

meta=linux-image-cloud-amd64

resolve() {
    # The metapackage depends on exactly one versioned image, e.g. linux-image-6.1.0-41-cloud-amd64.
    apt-cache depends "$meta" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1
}

pkg="$(resolve)"
if [ -z "$pkg" ]; then
    [ "$(id -u)" -eq 0 ] || die "apt does not know $meta (run apt-get update as root)"
    log "apt does not know $meta; refreshing package lists"
    DEBIAN_FRONTEND=noninteractive apt-get -q update >&2
    pkg="$(resolve)"
    [ -n "$pkg" ] || die "could not resolve $meta to a versioned kernel package"
fi
version="$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')"
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    die "no installable version of $pkg"
fi

out="$HYPE_CACHE/debian-kernel-${pkg}_${version//:/%3a}"
# The modules are the last part written: an entry without them (written by an older version of
# this script) is rebuilt.
if [ -f "$out/vmlinuz" ] && [ -f "$out/modules/virtio_blk.ko" ]; then
    printf '%s\n' "$out/vmlinuz"
    exit 0
fi

mkdir -p "$HYPE_CACHE"
exec 9>"$out.lock"
flock 9
if [ -f "$out/vmlinuz" ] && [ -f "$out/modules/virtio_blk.ko" ]; then
    printf '%s\n' "$out/vmlinuz"
    exit 0
fi

log "downloading $pkg $version"
deb="$(download_deb "$pkg" "$HYPE_CACHE/debs")"
case "$(basename "$deb")" in
"${pkg}_${version//:/%3a}_"*) ;;
*) die "downloaded $(basename "$deb"), expected ${pkg} ${version}" ;;
esac
rm -rf "$out.tmp"
mkdir -p "$out.tmp/unpacked"
dpkg-deb -x "$deb" "$out.tmp/unpacked"
vmlinuz="$(find "$out.tmp/unpacked/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)"
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $(basename "$deb")"
mv "$vmlinuz" "$out.tmp/vmlinuz"
cp "$out.tmp/unpacked/boot/"config-* "$out.tmp/config" 2>/dev/null || true
release="$(basename "$vmlinuz")"
release="${release#vmlinuz-}"
printf '%s\n' "$release" >"$out.tmp/release"
mkdir "$out.tmp/modules"
for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko drivers/virtio/virtio_mmio.ko \
    drivers/block/virtio_blk.ko; do
    ko="$out.tmp/unpacked/lib/modules/$release/kernel/$m"
    [ -f "$ko" ] || die "no $m in $(basename "$deb")"
    cp "$ko" "$out.tmp/modules/"
done
rm -rf "$out.tmp/unpacked"
printf '%s %s\n' "$pkg" "$version" >"$out.tmp/package"
rm -f "$deb"
rm -rf "$out"
mv "$out.tmp" "$out"
printf '%s\n' "$out/vmlinuz"
