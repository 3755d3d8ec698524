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

# candidate_version PKG: the version apt would install (empty when unknown).
candidate_version() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -vx '(none)' || true
}

# download_deb PKG DIR: make DIR hold the .deb of PKG's candidate version, downloading it
# without installing anything when it is not there yet; prints the .deb path. Refreshes the
# package lists once (as root) when apt does not know PKG or the download fails.
download_deb() {
    local pkg="$1" dir="$2" version deb
    mkdir -p "$dir"
    version="$(candidate_version "$pkg")"
    if [ -n "$version" ]; then
        deb="$(find "$dir" -maxdepth 1 -name "${pkg}_${version//:/%3a}_*.deb" | head -n1)"
        if [ -n "$deb" ]; then
            printf '%s\n' "$deb"
            return 0
        fi
    fi
    if [ -z "$version" ] || ! (cd "$dir" && apt-get download -q "$pkg" >&2); then
        [ "$(id -u)" -eq 0 ] || die "cannot download $pkg (stale package lists? run apt-get update as root)"
        log "refreshing package lists for $pkg"
        DEBIAN_FRONTEND=noninteractive apt-get -q update >&2
        version="$(candidate_version "$pkg")"
        [ -n "$version" ] || die "apt knows no installable version of $pkg"
        (cd "$dir" && apt-get download -q "$pkg" >&2)
    fi
    deb="$(find "$dir" -maxdepth 1 -name "${pkg}_${version//:/%3a}_*.deb" | head -n1)"
    [ -n "$deb" ] || die "no .deb for $pkg $version in $dir after download"
    printf '%s\n' "$deb"
}
