#!/usr/bin/env bash
# Prefix caching on a local cluster: BATCH requests sharing a PREFIX-token prefix (each with
# PROMPT_LEN tokens of its own), time to first token with the cache against
# `--prefix-caching=false`, and the cache's hit rate from the router's /metrics.
# Usage: bench/prefix_cache.sh CHECKPOINT_DIR [NODES]
# Environment: BATCH (32), PREFIX (1000), PROMPT_LEN (16), GEN (4), UP_ARGS (more `moe up`
# flags, e.g. `--device cuda:0`). Needs release binaries (cargo build --release --bins, or
# MOE_BIN_DIR) and etcd on PATH.
set -euo pipefail
model=${1:?checkpoint dir}
nodes=${2:-1}
bin=${MOE_BIN_DIR:-$(dirname "$0")/../target/release}
args=(--batch "${BATCH:-32}" --shared-prefix "${PREFIX:-1000}" --prompt-len "${PROMPT_LEN:-16}" --gen "${GEN:-4}" --json)
for caching in true false; do
  log=$(mktemp)
  # shellcheck disable=SC2086 # UP_ARGS is a list of flags
  MOE_PREFIX_CACHING=$caching "$bin/moe" up --model "$model" --nodes "$nodes" ${UP_ARGS:-} > "$log" 2>&1 &
  up=$!
  addr=""; http=""
  for _ in $(seq 1 600); do
    addr=$(grep -o '^router [0-9.:]*' "$log" | head -1 | cut -d' ' -f2 || true)
    http=$(grep -o '^openai http://[0-9.:]*' "$log" | head -1 | sed 's|openai http://||' || true)
    [ -n "$addr" ] && [ -n "$http" ] && break
    sleep 0.5
  done
  [ -n "$addr" ] || { cat "$log"; kill -INT $up; exit 1; }
  echo "== prefix caching $caching"
  "$bin/moe" bench --router "$addr" "${args[@]}"
  curl -s "http://$http/metrics" | grep -E '^moe_prefix_cache_(queried|hit)_tokens_total|^moe_prefix_cache_blocks' || true
  kill -INT $up; wait $up 2>/dev/null || true
  rm -f "$log"
done
