#!/usr/bin/env bash
# Offline engine vs a local cluster (router + N expert nodes on loopback) on one checkpoint, with
# the same `moe bench` parameters. Usage: bench/cluster_vs_offline.sh CHECKPOINT_DIR [NODES]
# Environment: BATCH, PROMPT_LEN, GEN (bench shape), NODE_THREADS; SKIP_OFFLINE=1 skips the
# offline run; PIN=1 pins the router to core 0 and the nodes to core 1. MOE_* router settings
# (MOE_MICRO_BATCHES, MOE_TRANSPORT, ...) pass through `moe up`. OFFLINE_ARGS and UP_ARGS add
# flags to the offline bench and to `moe up` (a GPU: OFFLINE_ARGS/UP_ARGS="--device cuda:0").
# Needs release binaries (cargo build --release --bins, or MOE_BIN_DIR) and etcd on PATH.
set -euo pipefail
model=${1:?checkpoint dir}
nodes=${2:-2}
args=(--batch "${BATCH:-1,8,32}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-64}" --json)
bin=${MOE_BIN_DIR:-$(dirname "$0")/../target/release}
if [ -z "${SKIP_OFFLINE:-}" ]; then
  echo "== offline"
  # shellcheck disable=SC2086 # OFFLINE_ARGS is a list of flags
  "$bin/moe" bench --model "$model" "${args[@]}" ${OFFLINE_ARGS:-}
fi
echo "== cluster, $nodes nodes"
log=$(mktemp)
# shellcheck disable=SC2086 # UP_ARGS is a list of flags
"$bin/moe" up --model "$model" --nodes "$nodes" ${NODE_THREADS:+--node-threads "$NODE_THREADS"} ${UP_ARGS:-} > "$log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  addr=$(grep -o 'router [0-9.:]*' "$log" | head -1 | cut -d' ' -f2 || true)
  [ -n "$addr" ] && break
  sleep 0.5
done
[ -n "$addr" ] || { cat "$log"; exit 1; }
if [ -n "${PIN:-}" ]; then
  # The router on core 0, every node on core 1: neither takes the other's core, as on
  # separate machines (give the nodes NODE_THREADS=1).
  for p in $(pgrep -P "$up"); do
    case $(ps -o comm= -p "$p") in
      moe-router) taskset -a -p 0x1 "$p" > /dev/null ;;
      moe-expert-node) taskset -a -p 0x2 "$p" > /dev/null ;;
    esac
  done
fi
"$bin/moe" bench --router "$addr" "${args[@]}"
echo "== where MoE-layer time went"
"$bin/moe" status --router "$addr"
