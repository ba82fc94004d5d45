#!/usr/bin/env bash
# Set up a Debian 12 machine for ferry: install the Debian packages the project needs, then build
# (or reuse) the lab host and guest images (lab/build). Idempotent; a no-op when all is in place.
# Run as root (or with sudo available) on a fresh machine; the Rust toolchain comes from rustup.
set -euo pipefail

# One package per line; append what your part of the project needs.
PACKAGES=(
    qemu-system-x86 # the reference VMM inside the lab; its firmware boots the lab (lab/build-qemu)
    busybox-static  # userland of the lab host and guest initramfs
    cpio            # initramfs archives
    gzip            # initramfs compression
    xz-utils        # unpacking the kernel (and its modules) for the lab's fast (PVH) boot
    zstd            # the same for kernels whose bzImage is zstd-compressed (FERRY_LAB_KERNEL)
    kmod            # depmod/modprobe: resolving the kernel modules' dependencies
    iproute2        # networking inside the lab
    jq              # lab/test: reading cargo's JSON output
    fonts-dejavu-core # ferry bench-vm: text in the PNG charts
    # Building the lab's patched emulator (lab/build-qemu); meson comes from backports below.
    curl patch gcc make pkg-config ninja-build flex bison python3-venv
    libglib2.0-dev libpixman-1-dev libfdt-dev libcap-ng-dev libattr1-dev
)
# From bookworm-backports: QEMU 10 (see below) and what building QEMU 10 needs.
BACKPORTS=(
    qemu-system-x86 # the reference VMM inside the lab (bench-vm, tests)
    meson           # >= 1.5 for lab/build-qemu (bookworm has 1.0)
    python3-pycotap # QEMU's configure checks for it next to meson
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

# The lab needs QEMU 10 or later. Debian 12's QEMU 7.2 emulates nested SVM with bugs that
# lose the lab (measured with lab/soak: an interrupt taken with GIF clear crashes the lab host
# kernel in __svm_vcpu_run, both lab vCPUs soft-lock inside KVM_RUN for minutes, a guest's
# serial interrupt goes missing); Debian's backport of QEMU 10 ran the same soak clean.
# docs/lab.md, "Which QEMU".
readonly QEMU_MAJOR_MIN=10
qemu_major() {
    local v
    v="$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" || v=0
    v="${v#*:}"
    v="${v%%.*}"
    printf '%s\n' "${v:-0}"
}
backports=''
if [[ "$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")" == bookworm ]]; then
    backports=bookworm-backports
fi
backports_missing() {
    (($(qemu_major) < QEMU_MAJOR_MIN)) && return 0
    local package
    for package in "${BACKPORTS[@]:1}"; do installed "$package" || return 0; done
    return 1
}
if backports_missing && [[ -n "$backports" ]]; then
    # Same mirror as the machine's own bookworm entry, backports suite.
    list=/etc/apt/sources.list.d/ferry-backports.list
    if ! apt-get indextargets --format '$(CODENAME)' 2>/dev/null | grep -qx "$backports"; then
        site="$(apt-get indextargets --format '$(SITE) $(CODENAME)' 2>/dev/null |
            awk '$2 == "bookworm" { print $1; exit }')"
        [[ -n "$site" ]] || {
            log "error: no bookworm entry in apt's sources to add $backports next to"
            exit 1
        }
        log "adding $backports ($site) for QEMU $QEMU_MAJOR_MIN"
        printf 'deb %s %s main\n' "$site" "$backports" | as_root tee "$list" >/dev/null
    fi
    as_root apt-get update -q
    log "installing ${BACKPORTS[*]} from $backports"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -t "$backports" "${BACKPORTS[@]}"
fi
if (($(qemu_major) < QEMU_MAJOR_MIN)); then
    log "warning: qemu-system-x86 $(qemu_major) is older than $QEMU_MAJOR_MIN: the lab will be unreliable"
fi

command -v cargo >/dev/null || {
    log "error: cargo not found: install the Rust toolchain (rustup), then run this again"
    exit 1
}

"$REPO_ROOT/lab/build"
log "ready"
