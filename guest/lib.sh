# Shared helpers for the guest build scripts. Sourced, not executed.
# shellcheck shell=bash

# Cache root for everything the guest scripts build or download (never inside git).
HYPE_CACHE="${HYPE_CACHE:-${HOME:-/tmp}/.cache/hype}"

# log MSG...: progress on stderr (stdout carries only the result path).
log() {
    printf '[%s] %s\n' "$(basename "$0")" "$*" >&2
}

# die MSG...: report and stop.
die() {
    log "error: $*"
    exit 1
}

# content_hash FILE...: short sha256 over the named files' contents (and their order).
content_hash() {
    local f
    for f in "$@"; do
        printf '%s\n' "$(basename "$f")"
        sha256sum <"$f"
    done | sha256sum | cut -c1-16
}

# package_installed PKG: true when dpkg reports PKG as installed.
package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# ensure_packages PKG...: apt-get install the packages that are missing (quiet, non-interactive).
# Needs root or sudo; otherwise names the missing packages and stops.
ensure_packages() {
    local missing=() p sudo=()
    for p in "$@"; do
        package_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 ||
            die "missing packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})"
        sudo=(sudo)
    fi
    log "installing ${missing[*]}"
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0)
    if ! "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2; then
        log "apt-get install failed; refreshing package lists and retrying"
        "${apt[@]}" update >&2
        "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2
    fi
}

# download_deb PKG DIR: fetch PKG's .deb (candidate version) into DIR without installing it;
# prints the .deb path. Retries once after `apt-get update` when the lists are stale.
download_deb() {
    local pkg="$1" dir="$2" deb
    mkdir -p "$dir"
    if ! (cd "$dir" && apt-get download -q "$pkg" >&2); then
        [ "$(id -u)" -eq 0 ] || die "apt-get download $pkg failed (stale package lists? run apt-get update)"
        log "apt-get download $pkg failed; refreshing package lists and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get -q update >&2
        (cd "$dir" && apt-get download -q "$pkg" >&2)
    fi
    deb=$(ls -t "$dir/${pkg}_"*.deb 2>/dev/null | head -n1)
    [ -n "$deb" ] || die "no .deb for $pkg in $dir after download"
    printf '%s\n' "$deb"
}
