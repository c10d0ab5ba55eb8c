#!/usr/bin/env bash
# Times the elastic operations on a local cluster: scale up by one node (process start to
# serving in the new epoch), drain it (request to process exit), and SIGKILL recovery (kill to
# the router serving an epoch without the node).
#   bench/elastic.sh CHECKPOINT_DIR [NODES]
# Needs release binaries (cargo build --release --bins) and etcd on PATH.
set -euo pipefail
ckpt=${1:?checkpoint dir}
nodes=${2:-2}
bin=$(cd "$(dirname "$0")/.." && pwd)/target/release
log=$(mktemp)
"$bin/moe" up --model "$ckpt" --nodes "$nodes" --node-threads 1 >"$log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do grep -q '^router ' "$log" && break; sleep 0.2; done
router=$(awk '/^router /{print $2}' "$log")
etcd=$(sed -n 's/^router [^ ]* (etcd \([^,]*\),.*/\1/p' "$log")
echo "router $router, etcd $etcd, $nodes nodes"

now() { date +%s.%N; }
placed() { # node ids holding experts in a settled placement
  "$bin/moe" status --router "$router" --json | python3 -c '
import json,sys
s=json.load(sys.stdin)
if s["serving_epoch"] and s["serving_epoch"]==s["latest_epoch"]:
    print(" ".join(n["node_id"] for n in s["nodes"] if n["experts"]))'
}
wait_until() { # predicate on the placed node list
  for _ in $(seq 3000); do
    p=$(placed); if eval "$1"; then return 0; fi; sleep 0.02
  done
  echo "timed out waiting for: $1" >&2; return 1
}

t0=$(now)
"$bin/moe-expert-node" --model "$ckpt" --etcd "$etcd" --cluster local --node-id extra --threads 1 2>/dev/null &
extra=$!
wait_until '[[ " $p " == *" extra "* ]]'
t1=$(now)
printf 'scale up (process start -> serving in the new epoch): %.2f s\n' "$(echo "$t1 - $t0" | bc)"

t0=$(now)
"$bin/moe" drain --router "$router" extra >/dev/null
wait $extra
t1=$(now)
printf 'drain (request -> node exited 0, routers moved off): %.2f s\n' "$(echo "$t1 - $t0" | bc)"

victim=$(placed | awk '{print $1}')
pid=$(pgrep -f -- "--node-id $victim( |$)" | head -1)
t0=$(now)
kill -9 "$pid"
# Without traffic nobody sees a broken stream: the lease TTL (3 s) is what reveals the death.
wait_until '[[ -n "$p" && " $p " != *" $victim "* ]]'
t1=$(now)
printf 'SIGKILL of an idle node -> epoch without it (lease expiry): %.2f s\n' "$(echo "$t1 - $t0" | bc)"
