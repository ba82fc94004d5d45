#!/usr/bin/env bash
# Checks the dependency direction the architecture promises (docs/ARCHITECTURE.md):
# the engine knows nothing of KVM, virtio or the VMM; the balloon knows nothing of KVM or
# the VMM; only the VMM may use unsafe code outside of what its KVM and memory modules need.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

status=0
forbid() { # crate, regex of forbidden dependencies, reason
    local deps
    deps=$(cargo tree -p "$1" -e normal --prefix none 2>/dev/null | awk '{print $1}' | sort -u)
    local bad
    bad=$(grep -E "$2" <<<"$deps" || true)
    if [[ -n "$bad" ]]; then
        echo "check-deps: $1 must not depend on $(tr '\n' ' ' <<<"$bad")($3)"
        status=1
    fi
}
forbid ferry-migration '^(kvm-ioctls|kvm-bindings|virtio-|ferry-vmm|ferry-balloon|linux-loader|vm-superio)$' \
    "the engine is hypervisor- and device-agnostic"
forbid ferry-balloon '^(kvm-ioctls|kvm-bindings|ferry-vmm)$' "devices know nothing of KVM or the VMM"
forbid ferry-sim '^(kvm-ioctls|kvm-bindings|virtio-|ferry-vmm|ferry-balloon)$' "the simulation is engine-only"

# The product: the engine, the balloon, the VMM and the `ferry` binary without its developer
# commands (`--no-default-features`) link no test or developer tooling.
product_tooling='^(ferry-sim|ferry-lab|ferry-bench|ferry-guest-agent|ferry-e2e)$'
for crate in ferry-migration ferry-balloon ferry-vmm; do
    forbid "$crate" "$product_tooling" "a product crate links no test or developer tooling"
done
tree=$(cargo tree -p ferry --no-default-features -e normal --prefix none 2>/dev/null | awk '{print $1}' | sort -u)
if [[ -z "$tree" ]]; then
    echo "check-deps: cannot list the dependencies of ferry --no-default-features"
    status=1
elif bad=$(grep -E "$product_tooling" <<<"$tree"); then
    echo "check-deps: ferry --no-default-features must not depend on $(tr '\n' ' ' <<<"$bad")(the product binary links no test or developer tooling)"
    status=1
fi
if ! cargo check --quiet -p ferry --no-default-features 2>/dev/null; then
    echo "check-deps: ferry does not build without its developer commands (--no-default-features)"
    status=1
fi
for lib in crates/ferry-migration/src/lib.rs testing/ferry-sim/src/lib.rs crates/ferry-balloon/src/lib.rs \
    crates/ferry/src/main.rs; do
    if [[ -f "$lib" ]] && ! grep -q '#!\[forbid(unsafe_code)\]' "$lib"; then
        echo "check-deps: $lib must declare #![forbid(unsafe_code)]"
        status=1
    fi
done
((status == 0)) && echo "check-deps: dependency direction and unsafe rules hold"
exit $status
