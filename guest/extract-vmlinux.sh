#!/usr/bin/env bash
# Extract the uncompressed ELF vmlinux from a Linux x86 bzImage, so that hype can boot it through
# PVH (`hype vmm --kernel vmlinux`) instead of the bzImage path. On PVM hosts, where the guest runs
# under an instruction emulator, this skips the in-guest decompression (~50 s of emulated
# instructions for Debian's cloud kernel).
#
# Usage: guest/extract-vmlinux.sh [BZIMAGE]
#   BZIMAGE defaults to Debian's stock cloud kernel (guest/fetch-debian-kernel.sh).
#   Prints the path of the vmlinux: BZIMAGE's directory/vmlinux (cached: a warm run does nothing).
#
# How: the boot protocol header (Documentation/x86/boot.rst, version 2.08 or later) names the
# compressed kernel exactly: it starts payload_offset (u32 at 0x248) bytes into the protected-mode
# part, which itself starts after (setup_sects (u8 at 0x1f1) + 1) * 512 bytes, and is
# payload_length (u32 at 0x24c) bytes long. No scanning for magic numbers. The format is told by
# the payload's first bytes; for every format but gzip the kernel's build appends the
# uncompressed size as a little-endian u32, which is stripped and checked here. The result must
# be an x86-64 ELF carrying the XEN_ELFNOTE_PHYS32_ENTRY note (the PVH entry point), else the
# script fails.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=./lib.sh
. "$here/lib.sh"

if [ "$#" -gt 1 ]; then
    log "usage: $0 [BZIMAGE]"
    exit 2
fi
bz="${1:-$("$here/fetch-debian-kernel.sh")}"
[ -f "$bz" ] || die "no such file: $bz"
out="$(dirname "$bz")/vmlinux"
if [ -f "$out" ] && [ "$out" -nt "$bz" ]; then
    printf '%s\n' "$out"
    exit 0
fi

# u8/u32 little-endian fields of the header.
u8_at() { od -An -tu1 -j "$1" -N1 "$bz" | tr -d ' '; }
u32_at() { od -An -tu4 -j "$1" -N4 --endian=little "$bz" | tr -d ' '; }

[ "$(od -An -c -j 0x202 -N4 "$bz" | tr -d ' ')" = "HdrS" ] || die "$bz is not a bzImage (no HdrS)"
proto="$(od -An -tu2 -j 0x206 -N2 --endian=little "$bz" | tr -d ' ')"
[ "$proto" -ge $((0x208)) ] || die "boot protocol $(printf '%#x' "$proto") has no payload fields (needs 2.08+)"
setup_sects="$(u8_at $((0x1f1)))"
[ "$setup_sects" -ne 0 ] || setup_sects=4
payload_offset="$(u32_at $((0x248)))"
payload_length="$(u32_at $((0x24c)))"
start=$(((setup_sects + 1) * 512 + payload_offset))
size="$(stat -c %s "$bz")"
[ $((start + payload_length)) -le "$size" ] || die "payload ($start + $payload_length) runs past the end of $bz ($size bytes)"

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp" "$tmp.z"' EXIT
dd if="$bz" of="$tmp.z" bs=64K skip="$start" count="$payload_length" iflag=skip_bytes,count_bytes status=none

magic="$(od -An -tx1 -N4 "$tmp.z" | tr -d ' ')"
case "$magic" in
1f8b*) format=gzip ;;
02214c18) format=lz4 ;;  # lz4 legacy frame (lz4 -l), as the kernel uses
fd377a58) format=xz ;;
28b52ffd) format=zstd ;;
*) die "unknown payload format (first bytes $magic)" ;;
esac
if [ "$format" != gzip ]; then
    # Strip the appended uncompressed size.
    want="$(od -An -tu4 -j $((payload_length - 4)) -N4 --endian=little "$tmp.z" | tr -d ' ')"
    truncate -s $((payload_length - 4)) "$tmp.z"
fi
case "$format" in
gzip) gzip -dc <"$tmp.z" >"$tmp" ;;
lz4) lz4 -dc <"$tmp.z" >"$tmp" ;;
xz) xz -dc <"$tmp.z" >"$tmp" ;;
zstd) zstd -qdc <"$tmp.z" >"$tmp" ;;
esac
if [ "$format" != gzip ]; then
    got="$(stat -c %s "$tmp")"
    [ "$got" -eq "$want" ] || die "$format payload decompressed to $got bytes, the kernel says $want"
fi
[ "$(od -An -tx1 -N5 "$tmp" | tr -d ' ')" = "7f454c4602" ] || die "payload is not a 64-bit ELF"
readelf -n "$tmp" | grep -A1 -E '^ +Xen ' | grep -q '0x00000012' ||
    die "vmlinux lacks the XEN_ELFNOTE_PHYS32_ENTRY (PVH) note: boot the bzImage instead"
mv "$tmp" "$out"
log "$format payload of $(basename "$bz"): $(stat -c %s "$out") bytes of vmlinux with a PVH entry"
printf '%s\n' "$out"
