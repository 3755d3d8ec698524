#!/usr/bin/env bash
# Build the hype test guest kernel (Linux 6.1 from Debian's linux-source-6.1) with
# `make tinyconfig` + guest/kernel.config, and cache vmlinux/bzImage under
# $HYPE_CACHE/kernel-<hash>/ where <hash> covers kernel.config and this script.
# Prints the output directory on stdout. A warm run does no work.
#
# Environment: HYPE_CACHE (default ~/.cache/hype), HYPE_JOBS (default nproc),
#              HYPE_KEEP_BUILD=1 keeps the build tree next to the output for debugging,
#              HYPE_LINUX_TARBALL=/path/linux-6.1.x.tar.{xz,gz} builds from that tarball instead
#              of Debian's package (for hosts without linux-source-6.1; its name and size join
#              the cache key).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=./lib.sh
. "$here/lib.sh"

fragment="$here/kernel.config"
tarball="${HYPE_LINUX_TARBALL:-}"
hash="$(
    content_hash "$fragment" "$here/build-kernel.sh"
    if [ -n "$tarball" ]; then
        [ -f "$tarball" ] || die "HYPE_LINUX_TARBALL=$tarball does not exist"
        printf '%s %s\n' "$(basename "$tarball")" "$(stat -c %s "$tarball")"
    fi
)"
hash="$(printf '%s\n' "$hash" | sha256sum | cut -c1-16)"
out="$HYPE_CACHE/kernel-$hash"

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    printf '%s\n' "$out"
    exit 0
fi

mkdir -p "$HYPE_CACHE"
exec 9>"$HYPE_CACHE/kernel-$hash.lock"
flock 9
# Another run may have finished the build while this one waited for the lock.
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    printf '%s\n' "$out"
    exit 0
fi

if [ -n "$tarball" ]; then
    ensure_packages make gcc libc6-dev bc bison flex libelf-dev xz-utils binutils
    src_version="$(basename "$tarball")"
else
    ensure_packages linux-source-6.1 make gcc libc6-dev bc bison flex libelf-dev xz-utils binutils
    tarball=/usr/src/linux-source-6.1.tar.xz
    [ -f "$tarball" ] || die "linux-source-6.1 is installed but $tarball is missing"
    src_version="linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
fi

work="$HYPE_CACHE/kernel-$hash.build"
rm -rf "$work" "$out.tmp"
mkdir -p "$work" "$out.tmp"
started=$(date +%s)

log "unpacking $src_version into $work"
tar -xf "$tarball" -C "$work" --strip-components=1

kmake() {
    make -C "$work" ARCH=x86_64 KBUILD_BUILD_USER=hype KBUILD_BUILD_HOST=hype \
        KBUILD_BUILD_TIMESTAMP="$src_version" "$@"
}

log "configuring: tinyconfig + $(basename "$fragment")"
{
    kmake -s tinyconfig &&
        (cd "$work" && ./scripts/kconfig/merge_config.sh -m .config "$fragment") &&
        kmake -s olddefconfig
} >"$work/config.log" 2>&1 || {
    cat "$work/config.log" >&2
    die "configuring the kernel failed"
}

# merge_config + olddefconfig silently drop options whose dependencies are off: check each one.
bad=0
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        grep -qxF "$line" "$work/.config" || {
            log "config: wanted '$line', got '$(grep -E "^(# )?${line%%=*}[= ]" "$work/.config" || echo absent)'"
            bad=1
        }
        ;;
    "# CONFIG_"*" is not set")
        sym="${line#\# }"
        sym="${sym%% *}"
        if grep -q "^$sym=" "$work/.config"; then
            log "config: wanted '$line', got '$(grep "^$sym=" "$work/.config")'"
            bad=1
        fi
        ;;
    esac
done <"$fragment"
[ "$bad" -eq 0 ] || die "kernel config does not hold every option of $fragment (see above)"

jobs="${HYPE_JOBS:-$(nproc)}"
log "building vmlinux and bzImage with -j$jobs (log: $work/build.log)"
if ! kmake -j"$jobs" vmlinux bzImage >"$work/build.log" 2>&1; then
    tail -n 40 "$work/build.log" >&2
    die "kernel build failed (full log: $work/build.log)"
fi

# The PVH entry point is what lets a VMM boot the uncompressed ELF directly.
readelf -n "$work/vmlinux" | grep -A1 -E '^ +Xen ' | grep -q '0x00000012' ||
    die "vmlinux lacks the XEN_ELFNOTE_PHYS32_ENTRY (PVH) note"

cp "$work/vmlinux" "$work/arch/x86/boot/bzImage" "$work/System.map" "$out.tmp/"
cp "$work/.config" "$out.tmp/config"
{
    echo "source=$src_version"
    echo "release=$(cat "$work/include/config/kernel.release")"
    echo "fragment_hash=$hash"
    echo "build_seconds=$(($(date +%s) - started))"
    echo "jobs=$jobs"
} >"$out.tmp/build-info"
rm -rf "$out"
mv "$out.tmp" "$out"
if [ "${HYPE_KEEP_BUILD:-0}" = 1 ]; then
    log "kept build tree $work"
else
    rm -rf "$work"
fi
log "built in $(($(date +%s) - started)) s"
printf '%s\n' "$out"
