#!/usr/bin/env bash
# What the gateway costs and what a router's death costs behind it, on a local cluster:
#  1. time to first token and inter-token latency calling one router directly, then through a
#     moe-gateway in front of that same router (so the difference is the gateway's hop), at
#     batch 1 and 8 (`moe bench --router`), alternated ROUNDS (5) times (min and median);
#  2. kill to next token: a second router joins, STREAMS (16) greedy streams of LOAD_TOKENS
#     (256) tokens run through the gateway (Python grpcio), and the second router is SIGKILLed
#     once each stream has 32 tokens; the gateway's moe_gateway_migration_seconds histogram
#     (from a stream's interruption to its next token from the other router) is printed.
#   bench/gateway.sh CHECKPOINT_DIR
# Needs release binaries (cargo build --release --bins, or MOE_BIN_DIR=DIR), etcd on PATH and
# python3 with grpcio and grpcio-tools.
set -euo pipefail
ckpt=${1:?checkpoint dir}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${MOE_BIN_DIR:-$root/target/release}" && pwd)
rounds=${ROUNDS:-5}
streams=${STREAMS:-16}
load_tokens=${LOAD_TOKENS:-256}
log=$(mktemp)
glog=$(mktemp)
rlog=$(mktemp)
gateway_pid=
second=
"$bin/moe" up --model "$ckpt" --nodes 2 --node-threads 1 >"$log" 2>&1 &
up=$!
trap 'kill $up $gateway_pid $second 2>/dev/null; wait $up $gateway_pid $second 2>/dev/null; rm -f "$log" "$glog" "$rlog"' EXIT
for _ in $(seq 600); do grep -q '^Ctrl-C' "$log" && break; sleep 0.2; done
router=$(awk '/^router /{print $2; exit}' "$log")
etcd=$(sed -n 's/^router [^ ]* (etcd \([^,]*\),.*/\1/p' "$log")
token=$(sed -n 's/^members share the cluster token in \([^ ]*\) .*/\1/p' "$log")
"$bin/moe-gateway" --model "$ckpt" --etcd "$etcd" --cluster local --cluster-token-file "$token" \
  --grpc-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$glog" 2>/dev/null &
gateway_pid=$!
for _ in $(seq 300); do grep -q '^moe-gateway listening' "$glog" && break; sleep 0.1; done
gateway=$(awk '/^moe-gateway listening on/{print $4}' "$glog")
metrics=$(awk '/^moe-gateway metrics listening on/{print $5}' "$glog")
serving() { # routers the gateway sees serving
  "$bin/moe" status --gateway "$gateway" --json | python3 -c '
import json,sys; print(sum(1 for r in json.load(sys.stdin)["routers"] if r["serving_epoch"]))'
}
for _ in $(seq 300); do [ "$(serving)" -ge 1 ] && break; sleep 0.1; done
echo "router $router, gateway $gateway (metrics $metrics), etcd $etcd"

echo "== the gateway's hop: $ckpt, prompt 128, 64 new tokens, batch 1 and 8"
figures=$(mktemp)
record='
import json,sys
what = sys.argv[1]
for r in json.loads(sys.stdin.read().strip().splitlines()[-1])["results"]:
    print(what, r["batch"], r["time_to_first_token_ms"] * 1000, r["inter_token_latency_ms"]["p50"] * 1000)'
for round in $(seq "$rounds"); do
  for target in "$router" "$gateway"; do
    what=router; [ "$target" = "$gateway" ] && what=gateway
    "$bin/moe" bench --router "$target" --batch 1,8 --prompt-len 128 --gen 64 --json \
      | python3 -c "$record" "$what" >>"$figures"
  done
done
python3 - "$figures" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for batch in sorted({int(r[1]) for r in rows}):
    for what in ("router", "gateway"):
        ttft = [float(r[2]) for r in rows if r[0] == what and int(r[1]) == batch]
        itl = [float(r[3]) for r in rows if r[0] == what and int(r[1]) == batch]
        print("  batch %d, %-7s: ttft min %6.0f us, median %6.0f us; inter-token p50 min %5.0f us, median %5.0f us (%d runs)"
              % (batch, what, min(ttft), statistics.median(ttft), min(itl), statistics.median(itl), len(ttft)))
PY
rm -f "$figures"

echo "== kill to next token: $streams streams of $load_tokens tokens, the second router SIGKILLed"
"$bin/moe-router" --model "$ckpt" --etcd "$etcd" --cluster local --cluster-token-file "$token" \
  --grpc-listen 127.0.0.1:0 >"$rlog" 2>/dev/null &
second=$!
for _ in $(seq 600); do [ "$(serving)" -ge 2 ] && break; sleep 0.1; done
spec=$(python3 -c "
import json
ids = [[(7 * i + 3 * k) % 400 + 3 for k in range(24)] for i in range($streams)]
print(json.dumps({'streams': [{'input_ids': p, 'max_new_tokens': $load_tokens, 'temperature': 0.0}
                              for p in ids], 'ready_after': 32}))")
python3 "$root/tests/python/gateway_streams.py" "$gateway" "$spec" | while read -r line; do
  if [ "$line" = READY ]; then
    kill -9 "$second"
  else
    echo "$line" | python3 -c '
import json,sys
r = json.load(sys.stdin)
failed = [s for s in r if "error" in s]
tokens = sum(len(s["ids"]) for s in r)
print("  streams: %d, failed: %d, tokens: %d" % (len(r), len(failed), tokens))'
  fi
done
curl -s "http://$metrics/metrics" | grep -E '^moe_gateway_(migration_seconds_(sum|count)|migrations_total)'
curl -s "http://$metrics/metrics" | python3 -c '
import sys
lines = [l for l in sys.stdin if l.startswith("moe_gateway_migration_seconds_bucket")]
prev = 0
for l in lines:
    le = l.split("le=\"")[1].split("\"")[0]; n = int(float(l.split()[-1]))
    if n > prev: print(f"  moved streams with their next token within {le} s: {n}")
    prev = n'
