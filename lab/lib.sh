# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
# Common paths and helpers for the lab scripts. Sourced, not executed.

LAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAB_DIR/.." && pwd)"
BUILD_DIR="${FERRY_BUILD_DIR:-$REPO_ROOT/build}"
KERNEL_DIR="$BUILD_DIR/kernel"
LAB_OUT="$BUILD_DIR/lab"
GUEST_OUT="$BUILD_DIR/guest"
AGENT_TARGET=x86_64-unknown-linux-gnu
AGENT_BIN="$REPO_ROOT/target/$AGENT_TARGET/release/ferry-guest-agent"

log() { printf 'lab: %s\n' "$*" >&2; }
die() {
    printf 'lab: error: %s\n' "$*" >&2
    exit 1
}

# Seconds since the epoch with nanoseconds, for timings.
now() { date +%s.%N; }

# Difference b - a in seconds, one decimal.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Hardware KVM is usable when kvm_intel or kvm_amd is loaded; /dev/kvm alone is not enough
# (PVM provides one that emulates every guest instruction).
hw_kvm_usable() {
    [[ -e /dev/kvm && ! -e /sys/module/kvm_pvm ]] &&
        [[ -e /sys/module/kvm_intel || -e /sys/module/kvm_amd ]]
}

# The kernel version (e.g. 6.1.0-56-amd64) that lab/build unpacked for a flavour.
kernel_version() {
    local flavour="$1" f="$KERNEL_DIR/$1.version"
    [[ -s "$f" ]] || die "no $flavour kernel in $KERNEL_DIR: run lab/build"
    cat "$f"
}
