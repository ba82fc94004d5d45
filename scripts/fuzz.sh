#!/usr/bin/env bash
# Builds every fuzz target and runs each for a few seconds (default 20; 0 = build only).
# cargo-fuzz needs nightly compiler features; RUSTC_BOOTSTRAP=1 enables them on the stable
# toolchain installed here. Crashes are kept under fuzz/artifacts/ and fail the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
seconds=${1:-20}

if ! command -v cargo-fuzz >/dev/null; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
for t in $targets; do
    echo "fuzz: building $t"
    cargo fuzz build "$t"
done
((seconds > 0)) || exit 0
for t in $targets; do
    corpus="corpus/$t"
    mkdir -p "$corpus"
    seeds=()
    [[ -d "seeds/$t" ]] && seeds=("seeds/$t")
    # Inputs that once failed (kept as regression tests) start every run too.
    [[ -d "regressions/$t" ]] && seeds+=("regressions/$t")
    echo "fuzz: running $t for ${seconds}s"
    log="target/fuzz-$t.log"
    mkdir -p target
    if ! cargo fuzz run "$t" "$corpus" "${seeds[@]}" -- -max_total_time="$seconds" \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $t found a failure (reproducer under fuzz/artifacts/$t)"
        exit 1
    fi
    grep -E '^Done|stat::number_of_executed_units' "$log" || true
done
