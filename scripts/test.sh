#!/usr/bin/env bash
# Sets up this machine and runs ferry's whole test suite. CI runs exactly this (.ci/run).
#
#   scripts/test.sh            everything: format, lint, dependency rules, unit/simulation/CLI
#                              tests, a brief fuzz run, and the real-guest tests in the lab
#   FERRY_SIM_SEEDS=N          seeds per workload and hint behaviour in the simulation (default 12)
#   FERRY_FUZZ_SECONDS=N       seconds per fuzz target (default 20; 0 skips fuzzing)
#   FERRY_SKIP_LAB=1           skip the lab tests (for quick local runs; CI never sets it)
#   FERRY_LAB_SOAK=1           also run the quarantined soak (see below)
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
# The 4 GiB boot test, once quarantined for a hang, runs again since the lab moved to QEMU 10
# (docs/lab.md). QUARANTINED (issue 11, "Every migrated guest survives"): the soak (lab/soak)
# loses about one guest in 30 hops. A destination whose vCPU runs on page tables outside its
# RAM is the lab's (its emulated host writes its own CR3 into the guest: docs/lab.md) and the
# soak counts it as a lab fault; triple faults, whose CR3 KVM erases, are not attributed yet.
# Open bug, not a pass. Run it with `lab/soak` or FERRY_LAB_SOAK=1.
# The lab host's emulated CPU crashes it or corrupts a guest about once every few minutes of
# 2-vCPU guest work (docs/lab.md, "The lab writes its own CR3 into the guest"): a crash
# (exit 125, its console printed) runs the test binaries that had not passed yet again, a
# test binary that proves a lab fault ("LAB FAULT", exit 125) runs again; anything else fails.
lab_retries=(--crash-retries "${FERRY_LAB_CRASH_RETRIES:-4}")
lab_args=("${lab_retries[@]}" -- --skip soak_)
[[ "${FERRY_LAB_SOAK:-}" != 1 ]] || lab_args=("${lab_retries[@]}")
if [[ "${FERRY_SKIP_LAB:-}" == 1 ]]; then
    printf '\n==> lab tests: skipped (FERRY_SKIP_LAB=1)\n'
else
    [[ "${FERRY_LAB_SOAK:-}" == 1 ]] || printf 'QUARANTINED (not run, open bug, issue 11): the soak\n'
    step "lab tests (real guests under KVM)" lab/test "${lab_args[@]}"
fi

printf '\nsuite finished in %ss\n' $(($(date +%s) - started))
printf 'steps: %d passed, %d failed\n' "$passed" "${#failed[@]}"
if ((${#failed[@]})); then
    printf 'FAILED steps: %s\n' "${failed[*]}"
    exit 1
fi
echo "all steps passed"
