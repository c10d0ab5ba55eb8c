#!/usr/bin/env bash
# One process serving the whole model (`moe-router --in-process-nodes 2`) against a local
# cluster of the same model (`moe up --nodes 2`: router and two expert-node processes) over
# the gRPC and the TCP data plane: `moe bench --router` on each, started fresh in turn.
# Usage: bench/single_process_vs_cluster.sh CHECKPOINT [ROUNDS]  (BATCH, PROMPT_LEN, GEN;
# binaries from MOE_BIN_DIR, default target/release).
set -uo pipefail
cd "$(dirname "$0")/.."
model=${1:?checkpoint directory}
rounds=${2:-1}
bin=${MOE_BIN_DIR:-target/release}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
workload=(--batch "${BATCH:-1,8}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-32}")

# Waits for `sed_expr` to print an address from `file` while `pid` lives; prints it.
wait_addr() {
  local file=$1 sed_expr=$2 pid=$3 addr=""
  for _ in $(seq 1 180); do
    addr=$(sed -n "$sed_expr" "$file" | head -1)
    [ -n "$addr" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  echo "$addr"
}

for round in $(seq 1 "$rounds"); do
  echo "== round $round: moe-router --in-process-nodes 2"
  "$bin/moe-router" --model "$model" --in-process-nodes 2 --grpc-listen 127.0.0.1:0 \
    >"$work/single.out" 2>"$work/single.err" &
  pid=$!
  addr=$(wait_addr "$work/single.out" 's/^moe-router listening on //p' $pid)
  [ -n "$addr" ] && "$bin/moe" bench --router "$addr" "${workload[@]}" | tail -n +2
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  for transport in grpc tcp; do
    echo "== round $round: moe up --nodes 2 --transport $transport"
    "$bin/moe" up --model "$model" --nodes 2 --transport $transport >"$work/up.out" 2>"$work/up.err" &
    pid=$!
    addr=$(wait_addr "$work/up.out" 's/^router \([0-9.:]*\) .*/\1/p' $pid)
    [ -n "$addr" ] && "$bin/moe" bench --router "$addr" "${workload[@]}" | tail -n +2
    kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null
  done
done
