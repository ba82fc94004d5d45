#!/usr/bin/env bash
# Set up a Debian 12 machine for ferry: install the Debian packages the project needs, then build
# (or reuse) the lab host and guest images (lab/build). Idempotent; a no-op when all is in place.
# Run as root (or with sudo available) on a fresh machine; the Rust toolchain comes from rustup.
set -euo pipefail

# One package per line; append what your part of the project needs.
PACKAGES=(
    qemu-system-x86 # the lab host (TCG) and the reference VMM inside it
    busybox-static  # userland of the lab host and guest initramfs
    cpio            # initramfs archives
    gzip            # initramfs compression
    xz-utils        # unpacking the kernel for the lab's fast (PVH) boot
    kmod            # depmod/modprobe: resolving the kernel modules' dependencies
    iproute2        # networking inside the lab
    jq              # lab/test: reading cargo's JSON output
    fonts-dejavu-core # ferry bench-vm: text in the PNG charts
)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        log "error: installing packages needs root: run this script as root"
        exit 1
    fi
}

installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

missing=()
for package in "${PACKAGES[@]}"; do
    installed "$package" || missing+=("$package")
done

# apt-get download of the kernel (lab/build) needs package lists, as does installing.
lists_ready() { apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; }
if ((${#missing[@]})) || ! lists_ready; then
    log "apt-get update"
    as_root apt-get update -q
fi
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || {
    log "error: cargo not found: install the Rust toolchain (rustup), then run this again"
    exit 1
}

"$REPO_ROOT/lab/build"
log "ready"
