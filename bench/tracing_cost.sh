#!/usr/bin/env bash
# What tracing costs: the same `moe bench --router` against a local cluster with tracing off,
# with OTLP export at the default step ratio, and with every step traced. Spans go to
# `otlp-sink` (a receiver that counts them), so export is paid for in full.
# Usage: bench/tracing_cost.sh CHECKPOINT_DIR [NODES]
# Needs release binaries (cargo build --release --bins) and etcd on PATH.
set -euo pipefail
model=${1:?checkpoint dir}
nodes=${2:-2}
args=(--batch "${BATCH:-1,8,32}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-64}" --json)
bin=$(dirname "$0")/../target/release

sink_log=$(mktemp)
"$bin/otlp-sink" > "$sink_log" 2>&1 &
sink=$!
trap 'kill $sink 2>/dev/null; rm -f "$sink_log"' EXIT
for _ in $(seq 1 100); do
  collector=$(grep -o 'listening on [0-9.:]*' "$sink_log" | cut -d' ' -f3 || true)
  [ -n "$collector" ] && break
  sleep 0.1
done

run() { # run LABEL [ENV...]
  local label=$1; shift
  echo "== $label"
  local log; log=$(mktemp)
  env "$@" "$bin/moe" up --model "$model" --nodes "$nodes" ${NODE_THREADS:+--node-threads "$NODE_THREADS"} > "$log" 2>&1 &
  local up=$!
  local addr=""
  for _ in $(seq 1 600); do
    addr=$(grep -o 'router [0-9.:]*' "$log" | head -1 | cut -d' ' -f2 || true)
    [ -n "$addr" ] && break
    sleep 0.5
  done
  [ -n "$addr" ] || { cat "$log"; exit 1; }
  "$bin/moe" bench --router "$addr" "${args[@]}"
  kill -INT $up; wait $up 2>/dev/null || true
  rm -f "$log"
}

run "tracing off" OTEL_EXPORTER_OTLP_ENDPOINT=
run "tracing on, default step ratio (0.1)" OTEL_EXPORTER_OTLP_ENDPOINT="http://$collector"
run "tracing on, every step" OTEL_EXPORTER_OTLP_ENDPOINT="http://$collector" MOE_TRACE_STEP_RATIO=1
# The same as the first run, to show run-to-run noise.
run "tracing off, again" OTEL_EXPORTER_OTLP_ENDPOINT=
sleep 6
tail -1 "$sink_log"
