#!/usr/bin/env bash
# Sets up this machine and runs ferry's whole test suite. CI runs exactly this (.ci/run).
#
#   scripts/test.sh            everything: format, lint, dependency rules, unit/simulation/CLI
#                              tests, a brief fuzz run, and the real-guest tests in the lab
#   FERRY_SIM_SEEDS=N          seeds per workload and hint behaviour in the simulation (default 12)
#   FERRY_FUZZ_SECONDS=N       seconds per fuzz target (default 20; 0 skips fuzzing)
#   FERRY_SKIP_LAB=1           skip the lab tests (for quick local runs; CI never sets it)
#   FERRY_LAB_QUARANTINE=run   also run the quarantined lab tests (see below)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

failed=()
passed=0
started=$(date +%s)
step() {
    local name=$1
    shift
    local t0
    t0=$(date +%s)
    printf '\n==> %s\n' "$name"
    if "$@"; then
        printf '==> %s: ok (%ss)\n' "$name" $(($(date +%s) - t0))
        passed=$((passed + 1))
    else
        printf '==> %s: FAILED (%ss)\n' "$name" $(($(date +%s) - t0))
        failed+=("$name")
    fi
}

step "set-up" scripts/setup.sh
step "format" cargo fmt --all -- --check
step "lint" cargo clippy --workspace --all-targets -- -D warnings
step "dependency rules" scripts/check-deps.sh
step "unit, simulation and CLI tests" env FERRY_SIM_SEEDS="${FERRY_SIM_SEEDS:-12}" cargo test --workspace
step "fuzz (brief)" scripts/fuzz.sh "${FERRY_FUZZ_SECONDS:-20}"
# Quarantined real-guest tests: known open bugs that make them fail at random, each tracked in
# an open issue. They are still built and can be run with FERRY_LAB_QUARANTINE=run; remove an
# entry together with the fix.
#   boots_with_ram_above_the_32_bit_mmio_window: the 4 GiB guest boot hung once in a full run
#   (passed in the others); not understood yet (issue 5 follow-up).
# (migrates_every_workload_with_hints_off_and_on left the list with lazy dirty-log arming: the
# soft lockups came from write faults on the blocks the guest clears before hinting them.)
quarantine=(boots_with_ram_above_the_32_bit_mmio_window)
skip_args=()
if [[ "${FERRY_LAB_QUARANTINE:-}" != run ]]; then
    for t in "${quarantine[@]}"; do
        printf 'QUARANTINED (not run, known open bug): %s\n' "$t"
        skip_args+=(--skip "$t")
    done
fi
if [[ "${FERRY_SKIP_LAB:-}" == 1 ]]; then
    printf '\n==> lab tests: skipped (FERRY_SKIP_LAB=1)\n'
else
    step "lab tests (real guests under KVM)" lab/test -- "${skip_args[@]}"
fi

printf '\nsuite finished in %ss\n' $(($(date +%s) - started))
printf 'steps: %d passed, %d failed\n' "$passed" "${#failed[@]}"
if ((${#failed[@]})); then
    printf 'FAILED steps: %s\n' "${failed[*]}"
    exit 1
fi
echo "all steps passed"
