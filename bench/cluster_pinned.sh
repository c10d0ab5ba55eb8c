#!/usr/bin/env bash
# A local cluster with the router pinned to core 0 and every expert node to core 1, so that the
# router's work and the nodes' do not take each other's core (as on separate machines), then
# `moe bench --router` on it. Usage: bench/cluster_pinned.sh CHECKPOINT_DIR [NODES]
# Environment: BATCH, PROMPT_LEN, GEN (bench shape); MOE_MICRO_BATCHES and other MOE_* router
# settings pass through `moe up` to the router. Needs release binaries and etcd on PATH.
set -euo pipefail
model=${1:?checkpoint dir}
nodes=${2:-2}
bin=$(dirname "$0")/../target/release
args=(--batch "${BATCH:-8,32}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-32}" --json)
log=$(mktemp)
"$bin/moe" up --model "$model" --nodes "$nodes" --node-threads 1 > "$log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  addr=$(grep -o 'router [0-9.:]*' "$log" | head -1 | cut -d' ' -f2 || true)
  [ -n "$addr" ] && break
  sleep 0.5
done
[ -n "$addr" ] || { cat "$log"; exit 1; }
for p in $(pgrep -P "$up"); do
  case $(ps -o comm= -p "$p") in
    moe-router) taskset -a -p 0x1 "$p" > /dev/null ;;
    moe-expert-node) taskset -a -p 0x2 "$p" > /dev/null ;;
  esac
done
"$bin/moe" bench --router "$addr" "${args[@]}"
"$bin/moe" status --router "$addr"
