#!/usr/bin/env bash
# Sets up this machine, builds ferry and runs its demo (`ferry demo`): a guest with most of its
# memory freed is live-migrated between two processes with free page hints off, then on, and
# the destination checks every in-use page. Extra arguments go to `ferry demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release -p ferry
exec target/release/ferry demo "$@"
