#!/usr/bin/env bash
# Host-side test of the guest agent protocol: unpacks the initramfs that build-initramfs.sh
# produces and runs its /init as PID 1 of fresh user/mount/pid/net namespaces (chroot into the
# unpacked tree), with a given kernel command line and console input on stdin, then compares
# the HYPE-* lines it prints with what guest/README.md specifies. Needs no kernel, no VM and no
# root (unprivileged user namespaces), and takes about a second.
# Exits 0 on success, 1 on a failed check, 77 (skip) when user namespaces are unavailable.
set -euo pipefail
export LC_ALL=C

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=./lib.sh
. "$here/lib.sh"

if ! unshare --user --map-root-user --mount --pid --fork --net true 2>/dev/null; then
    log "skip: unprivileged user namespaces are not available"
    exit 77
fi

cpio_path="$("$here/build-initramfs.sh")"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
# Device nodes cannot be created without privileges; the agent does not need them here.
if command -v cpio >/dev/null 2>&1; then
    (cd "$root" && cpio -id --quiet --no-absolute-filenames <"$cpio_path" 2>/dev/null) || true
else
    (cd "$root" && busybox cpio -id <"$cpio_path" 2>/dev/null) || true
fi
if [ ! -x "$root/init" ] || [ ! -x "$root/bin/busybox" ]; then
    die "unpacking $cpio_path failed"
fi

failures=0

# run_agent NAME CMDLINE INPUT EXPECTED: run the agent, compare its HYPE-* lines (except the
# expected mount failure: devtmpfs cannot be mounted in a user namespace) with EXPECTED, one
# shell glob pattern per line.
run_agent() {
    local name="$1" got want i
    printf '%s\n' "$2" >"$root/cmdline"
    got="$(printf '%s' "$3" | HYPE_AGENT_CMDLINE_FILE=/cmdline timeout -s KILL 30 \
        unshare --user --map-root-user --mount --pid --fork --net --kill-child \
        chroot "$root" /init 2>&1 | grep '^HYPE-' | grep -vx 'HYPE-ERR mount -a failed' || true)"
    mapfile -t got_lines <<<"$got"
    mapfile -t want_lines <<<"$4"
    for i in "${!want_lines[@]}"; do
        want="${want_lines[$i]}"
        # shellcheck disable=SC2053 # the expectation is a glob pattern on purpose
        if [ "$i" -ge "${#got_lines[@]}" ] || [[ "${got_lines[$i]}" != $want ]]; then
            log "FAIL $name: line $((i + 1)): expected '$want', got '${got_lines[$i]:-<nothing>}'"
            log "full output of $name:"
            printf '%s\n' "$got" >&2
            failures=$((failures + 1))
            return
        fi
    done
    if [ "${#got_lines[@]}" -ne "${#want_lines[@]}" ]; then
        log "FAIL $name: ${#got_lines[@]} lines, expected ${#want_lines[@]}:"
        printf '%s\n' "$got" >&2
        failures=$((failures + 1))
        return
    fi
    log "ok $name"
}

step1="$(printf 'echo boot-step\nexit 4\n' | base64 -w0)"
run_agent console-protocol \
    "console=ttyS0 hype.console=nosuch hype.loglevel=x hype.run=$step1 hype.run=@@@ hype.then=later" \
    $'RUN 1 echo hello; echo err >&2\nRUN 2 exit 5\nRUN 3 printf \'a\\n\\nb\'\nRUN 4 echo "<$1>"\nRUN 5 read x; echo "read rc=$?"\nRUN bad!id echo x\nFOO\n\nRUN 6 echo \'x\\ty %s\'\r\nRUN 7 echo (\nRUN 8\nRUN k sh -c \'kill -9 $$\'\nRUN applets echo a b | xargs echo; env printf \'env-%s\\n\' ok; ls /bin\nPING p1\nPING bad!\nPOWEROFF\nRUN 9 echo never\n' \
    "HYPE-AGENT READY
HYPE-ERR hype.console: no such tty /dev/nosuch
HYPE-ERR hype.loglevel: not a digit: x
HYPE-OUT boot1 boot-step
HYPE-DONE boot1 rc=4
HYPE-ERR boot2: hype.run is not valid base64
HYPE-DONE boot2 rc=255
HYPE-ERR hype.then: unknown action later
HYPE-OUT 1 hello
HYPE-OUT 1 err
HYPE-DONE 1 rc=0
HYPE-DONE 2 rc=5
HYPE-OUT 3 a
HYPE-OUT 3 
HYPE-OUT 3 b
HYPE-DONE 3 rc=0
HYPE-OUT 4 <>
HYPE-DONE 4 rc=0
HYPE-OUT 5 read rc=1
HYPE-DONE 5 rc=0
HYPE-ERR bad id in: RUN bad!id echo x
HYPE-ERR unknown: FOO
HYPE-OUT 6 x\\\\ty %s
HYPE-DONE 6 rc=0
HYPE-OUT 7 *syntax error*
HYPE-DONE 7 rc=2
HYPE-DONE 8 rc=0
HYPE-OUT k Killed
HYPE-DONE k rc=137
HYPE-OUT applets a b
HYPE-OUT applets env-ok
HYPE-OUT applets busybox
HYPE-OUT applets sh
HYPE-DONE applets rc=0
HYPE-PONG p1
HYPE-ERR bad id in: PING bad!
HYPE-AGENT POWEROFF"

run_agent then-reboot "quiet hype.then=reboot hype.run=$(printf 'uname -s' | base64 -w0)" \
    $'RUN 1 echo not-reached\n' \
    "HYPE-AGENT READY
HYPE-OUT boot1 Linux
HYPE-DONE boot1 rc=0
HYPE-AGENT REBOOT"

run_agent console-eof "quiet" $'RUN x echo last\n' \
    "HYPE-AGENT READY
HYPE-OUT x last
HYPE-DONE x rc=0
HYPE-ERR console closed
HYPE-AGENT POWEROFF"

if [ "$failures" -ne 0 ]; then
    log "$failures check(s) failed"
    exit 1
fi
log "all agent checks passed"
