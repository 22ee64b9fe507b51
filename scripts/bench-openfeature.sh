#!/usr/bin/env bash
# The OpenFeature front ends against FlagEval with one load generator (h2load): flagd's
# ResolveBoolean next to Evaluate on the same flag, ResolveAll next to EvaluateAll, and OFREP's
# single-flag and bulk endpoints (HTTP/1.1) next to them. By default flagread runs alone on
# CPU 0 and the load on CPU 1. About 3 minutes. Knobs: see the header of
# flagread/benches/openfeature.rs. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

# h2load comes from Debian's nghttp2-client.
if ! command -v "${FLAGSTREAM_H2LOAD:-h2load}" >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq nghttp2-client >/dev/null
fi

cargo build --profile bench -p flagwrite -p flagread --bins
exec cargo bench -p flagread --bench openfeature
