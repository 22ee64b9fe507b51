#!/usr/bin/env bash
# Isolation: Evaluate latency on one namespace while 20,000 flags are imported into
# others and applied on the same replica. About 1 minute.
#
# Loopback only; every process it starts is killed when it ends (or on Ctrl-C,
# or after its time budget). Knobs: see the header of flagread/benches/isolation.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Both servers in the bench profile (release + line tables), next to the
# benchmark, which finds them beside its own copy of flagread.
cargo build --profile bench -p flagwrite -p flagread --bins
exec cargo bench -p flagread --bench isolation
