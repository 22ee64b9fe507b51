#!/usr/bin/env bash
# Capacity: the writer's CPU and memory per subscriber (0-128 replicas), write -> applied on
# 16/64/128 replicas directly and on 128 leaves through 8 mid replicas, and 16/64 simultaneous
# cold starts against 10,000 and 100,000 flags. About 15 minutes.
#
# Loopback only; every process it starts is killed when it ends (or on Ctrl-C,
# or after its time budget). Knobs (BENCH_PARTS=subscribers,propagation,storm, ...): see
# the header of flagread/benches/capacity.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Both servers in the bench profile (release + line tables), next to the
# benchmark, which finds them beside its own copy of flagread.
cargo build --profile bench -p flagwrite -p flagread --bins
exec cargo bench -p flagread --bench capacity
