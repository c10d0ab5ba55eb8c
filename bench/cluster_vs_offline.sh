#!/usr/bin/env bash
# Offline engine vs a local cluster (router + N expert nodes on loopback) on one checkpoint, with
# the same `moe bench` parameters. Usage: bench/cluster_vs_offline.sh CHECKPOINT_DIR [NODES]
# Needs release binaries (cargo build --release --bins) and etcd on PATH.
set -euo pipefail
model=${1:?checkpoint dir}
nodes=${2:-2}
args=(--batch "${BATCH:-1,8,32}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-64}" --json)
bin=$(dirname "$0")/../target/release
echo "== offline"
"$bin/moe" bench --model "$model" "${args[@]}"
echo "== cluster, $nodes nodes"
log=$(mktemp)
"$bin/moe" up --model "$model" --nodes "$nodes" ${NODE_THREADS:+--node-threads "$NODE_THREADS"} > "$log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  addr=$(grep -o 'router [0-9.:]*' "$log" | head -1 | cut -d' ' -f2 || true)
  [ -n "$addr" ] && break
  sleep 0.5
done
[ -n "$addr" ] || { cat "$log"; exit 1; }
"$bin/moe" bench --router "$addr" "${args[@]}"
echo "== where MoE-layer time went"
"$bin/moe" status --router "$addr"
