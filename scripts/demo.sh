#!/usr/bin/env bash
# Sets up this machine (packages, lab and guest image), builds ferry and runs its demo
# (`ferry demo`): a Debian guest under ferry's VMM frees most of its memory and is live-migrated
# between two ferry processes with hints off, then on; the guest checks its data after each hop.
# Without hardware KVM the demo runs inside the lab (lab/run). Extra arguments go to `ferry demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release -p ferry
exec target/release/ferry demo "$@"
