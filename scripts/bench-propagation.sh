#!/usr/bin/env bash
# Propagation: from a FlagAdmin write's acknowledgement to the change being applied on
# all of 16 flagread processes (seen through their Watch streams), over 2 x 300 writes. About 1 minute.
#
# Loopback only; every process it starts is killed when it ends (or on Ctrl-C,
# or after its time budget). Knobs: see the header of flagread/benches/propagation.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Both servers in the bench profile (release + line tables), next to the
# benchmark, which finds them beside its own copy of flagread.
cargo build --profile bench -p flagwrite -p flagread --bins
exec cargo bench -p flagread --bench propagation
