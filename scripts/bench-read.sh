#!/usr/bin/env bash
# Load test of the read path: a bare tonic echo server, flagread Evaluate (constraints +
# rollout + split) and EvaluateAll over 350 flags, driven by h2load with a pre-encoded gRPC frame;
# then p50/p99 latency of each at 70% of its maximum rate. Two layouts: shared cores, then each
# server pinned to CPU 0 with the load on CPU 1 (an open-loop generator finds each server's
# maximum and measures latency at 70% of it). About 12 minutes; BENCH_LAYOUT=shared runs only
# the first (about 4.5).
#
# Loopback only; every process it starts is killed when it ends (or on Ctrl-C,
# or after its time budget). Knobs: see the header of flagread/benches/read_load.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

# h2load comes from Debian's nghttp2-client.
if ! command -v "${FLAGSTREAM_H2LOAD:-h2load}" >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nghttp2-client >/dev/null
fi

# Both servers in the bench profile (release + line tables), next to the
# benchmark, which finds them beside its own copy of flagread.
cargo build --profile bench -p flagwrite -p flagread --bins
exec cargo bench -p flagread --bench read_load
