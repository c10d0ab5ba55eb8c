#!/usr/bin/env bash
# A router's resident memory once its dense part (and draft head, if any) is loaded: starts
# etcd and one moe-router with no expert node, waits for LOG_LINE in its log, prints VmHWM and
# VmRSS and the load time, and stops both.
# Usage: bench/router_memory.sh CHECKPOINT_DIR [ROUTER_FLAGS...]
# Environment: LOG_LINE ("dense part loaded"; "MTP draft head loaded" with deepseek_mtp),
# MOE_BIN_DIR (target/release). Needs etcd on PATH.
# Example (DeepSeek-V3's dimensions, its MTP layer on the router):
#   moe gen-checkpoint --arch deepseek_v3 --preset full --layers 4 --mtp-layers 1 --dtype fp8 \
#     --synthetic --out /tmp/ds-v3-mtp
#   LOG_LINE="MTP draft head loaded" bench/router_memory.sh /tmp/ds-v3-mtp --threads 2 \
#     --speculative-config '{"method": "deepseek_mtp", "num_speculative_tokens": 1}'
set -euo pipefail
model=${1:?checkpoint dir}
shift
bin=${MOE_BIN_DIR:-$(dirname "$0")/../target/release}
line=${LOG_LINE:-dense part loaded}
work=$(mktemp -d)
port=$((23000 + RANDOM % 1000))
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$port" \
  --advertise-client-urls "http://127.0.0.1:$port" \
  --listen-peer-urls "http://127.0.0.1:$((port + 1000))" > "$work/etcd.log" 2>&1 &
etcd_pid=$!
router_pid=""
cleanup() {
  [ -n "$router_pid" ] && kill "$router_pid" 2>/dev/null || true
  kill "$etcd_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
sleep 2
start=$(date +%s.%N)
MOE_LOG=info "$bin/moe-router" --model "$model" --grpc-listen 127.0.0.1:0 \
  --etcd "http://127.0.0.1:$port" --cluster memory "$@" > "$work/router.log" 2>&1 &
router_pid=$!
until grep -q "$line" "$work/router.log"; do
  if ! kill -0 "$router_pid" 2>/dev/null; then
    echo "the router stopped:" >&2
    tail -5 "$work/router.log" >&2
    exit 1
  fi
  sleep 0.5
done
loaded=$(date +%s.%N)
sleep 3 # what the load left behind settles
grep -E 'VmHWM|VmRSS' "/proc/$router_pid/status" | tr -s ' \t' ' '
echo "loaded in $(echo "$loaded - $start" | bc) s"
grep "$line" "$work/router.log" | sed 's/\x1b\[[0-9;]*m//g' | sed 's/.*INFO //'
