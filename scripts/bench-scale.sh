#!/usr/bin/env bash
# Scale: cold sync time and resident memory of a flagread replica holding 100,000 flags
# (loaded into flagwrite with ImportNamespace). About 1 minute.
#
# Loopback only; every process it starts is killed when it ends (or on Ctrl-C,
# or after its time budget). Knobs: see the header of flagread/benches/scale.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Both servers in the bench profile (release + line tables), next to the
# benchmark, which finds them beside its own copy of flagread.
cargo build --profile bench -p flagwrite -p flagread --bins
exec cargo bench -p flagread --bench scale
