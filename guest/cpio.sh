# Minimal writer for the "newc" cpio format the kernel unpacks as an initramfs. Sourced.
# Needs no root (device nodes are written as headers, never created on the host) and gives
# byte-identical archives for identical inputs (all mtimes are 0, inode numbers sequential).
# shellcheck shell=bash

_cpio_ino=0

# _cpio_pad N: write (4 - N % 4) % 4 zero bytes.
_cpio_pad() {
    case $(($1 % 4)) in
    1) printf '\0\0\0' ;;
    2) printf '\0\0' ;;
    3) printf '\0' ;;
    esac
}

# _cpio_header NAME MODE NLINK SIZE RDEVMAJOR RDEVMINOR: header, name, padding (uid/gid 0).
_cpio_header() {
    local name="$1" namesize=$((${#1} + 1))
    _cpio_ino=$((_cpio_ino + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$_cpio_ino" "$2" 0 0 "$3" 0 "$4" 0 0 "$5" "$6" "$namesize" 0
    printf '%s\0' "$name"
    _cpio_pad $((110 + namesize))
}

# cpio_dir NAME PERM: a directory (PERM octal, e.g. 0755).
cpio_dir() {
    _cpio_header "$1" $((0040000 | $2)) 2 0 0 0
}

# cpio_file NAME PERM SRC: a regular file with the contents of host file SRC.
cpio_file() {
    local size
    size=$(stat -c %s "$3")
    _cpio_header "$1" $((0100000 | $2)) 1 "$size" 0 0
    cat "$3"
    _cpio_pad "$size"
}

# cpio_symlink NAME TARGET: a symbolic link.
cpio_symlink() {
    _cpio_header "$1" $((0120777)) 1 "${#2}" 0 0
    printf '%s' "$2"
    _cpio_pad "${#2}"
}

# cpio_chardev NAME PERM MAJOR MINOR: a character device node.
cpio_chardev() {
    _cpio_header "$1" $((0020000 | $2)) 1 0 "$3" "$4"
}

# cpio_trailer: the end-of-archive record.
cpio_trailer() {
    _cpio_ino=-1
    _cpio_header "TRAILER!!!" 0 1 0 0 0
}
