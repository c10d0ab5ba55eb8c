#!/usr/bin/env bash
# Times the elastic operations on a local cluster: scale up by one node (process start to
# serving in the new epoch), drain it (request to process exit), SIGKILL of a node while
# streams run (time to the first token after the kill and the longest token stall), and SIGKILL
# recovery of an idle node (kill to the router serving an epoch without the node).
#   bench/elastic.sh CHECKPOINT_DIR [NODES]
# Needs release binaries (cargo build --release --bins, or MOE_BIN_DIR=DIR), etcd on PATH and
# python3 with grpcio and grpcio-tools (the load). STREAMS (8) greedy streams of LOAD_TOKENS
# (128) new tokens each run through the kill under load.
set -euo pipefail
ckpt=${1:?checkpoint dir}
nodes=${2:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${MOE_BIN_DIR:-$root/target/release}" && pwd)
streams=${STREAMS:-8}
load_tokens=${LOAD_TOKENS:-128}
log=$(mktemp)
spare=
"$bin/moe" up --model "$ckpt" --nodes "$nodes" --node-threads 1 >"$log" 2>&1 &
up=$!
trap 'kill $up $spare 2>/dev/null; wait $up $spare 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do grep -q '^router ' "$log" && break; sleep 0.2; done
router=$(awk '/^router /{print $2}' "$log")
etcd=$(sed -n 's/^router [^ ]* (etcd \([^,]*\),.*/\1/p' "$log")
echo "router $router, etcd $etcd, $nodes nodes"

now() { date +%s.%N; }
node_pid() { # our node process (a child of moe up or of this script) for a node id
  local p
  p=$(pgrep -P "$up,$$" -f -- "--node-id $1( |$)" | head -1)
  [ -n "$p" ] || { echo "no process for node $1" >&2; return 1; }
  echo "$p"
}
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

# SIGKILL under load: once every stream has 4 tokens, a placed node is killed. The router sees
# its data-plane stream break, reports it suspect and re-plans without waiting for the lease;
# the streams pause, then go on. Times are taken where the tokens arrive (the client).
victim=$(placed | awk '{print $1}')
pid=$(node_pid "$victim")
MOE_ROOT=$root python3 - "$router" "$pid" "$streams" "$load_tokens" <<'EOF'
import os, signal, sys, threading, time
sys.path.insert(0, os.path.join(os.environ["MOE_ROOT"], "tests", "python"))
import grpc
from grpc_client import load_stubs
router, pid, streams, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pb, pb_grpc = load_stubs()
from moe.v1 import admin_pb2, admin_pb2_grpc  # compiled by load_stubs

def status():
    with grpc.insecure_channel(router) as channel:
        return admin_pb2_grpc.AdminStub(channel).ClusterStatus(admin_pb2.ClusterStatusRequest(), timeout=10)

lock = threading.Lock()
arrivals = [[] for _ in range(streams)]
errors = []

def stream(i):
    request = pb.GenerateRequest(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    request.prompt = f"Stream {i} of the elastic benchmark: the quick brown fox jumps over the lazy dog"
    try:
        with grpc.insecure_channel(router) as channel:
            for msg in pb_grpc.InferenceStub(channel).Generate(request, timeout=600):
                now = time.monotonic()
                with lock:
                    arrivals[i].extend([now] * len(msg.token_ids))
    except grpc.RpcError as e:
        with lock:
            errors.append(f"stream {i}: {e.code()}: {e.details()}")

before = status()
threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
for t in threads:
    t.start()
deadline = time.monotonic() + 300
while True:
    with lock:
        if all(len(a) >= 4 for a in arrivals):
            finished_at_kill = sum(len(a) >= tokens for a in arrivals)
            break
        if errors or time.monotonic() > deadline:
            sys.exit(f"the streams did not start: {errors}")
    time.sleep(0.001)
killed = time.monotonic()
os.kill(pid, signal.SIGKILL)
for t in threads:
    t.join()
after = status()
later = sorted(t for a in arrivals for t in a if t > killed)
if not later:
    sys.exit(f"no token after the kill: {errors}")
marks = [killed] + later
# No token on any stream, from the kill on (the first wait included); the first token after
# it is when the streams resumed. (Tokens right after the kill may come from a step that
# finished before the node died: the first token after the kill alone says little.)
stall, resumed = max((b - a, b - killed) for a, b in zip(marks, marks[1:]))
# The longest wait between two tokens of one stream, for waits that end after the kill.
pause = max((b - a for s in arrivals for a, b in zip(s, s[1:]) if b > killed), default=0.0)
complete = sum(len(a) == tokens for a in arrivals)
print(f"SIGKILL under load ({streams} streams x {tokens} tokens, {finished_at_kill} finished at the kill): "
      f"first token after the kill {later[0] - killed:.3f} s; longest token stall {stall:.3f} s "
      f"(no stream got a token), ending {resumed:.3f} s after the kill; "
      f"longest pause within one stream {pause:.3f} s; "
      f"{complete}/{streams} streams complete, {len(errors)} failed")
print(f"  recovery: epoch {before.serving_epoch} -> {after.serving_epoch}, "
      f"suspect re-plans {before.suspect_replans} -> {after.suspect_replans}, "
      f"layers re-dispatched {before.layer_retries} -> {after.layer_retries}")
for e in errors[:5]:
    print("  " + e)
sys.exit(1 if errors or complete < streams else 0)
EOF
wait_until '[[ -n "$p" && " $p " != *" $victim "* ]]'
# Back to NODES nodes for the idle kill.
"$bin/moe-expert-node" --model "$ckpt" --etcd "$etcd" --cluster local --node-id spare --threads 1 2>/dev/null &
spare=$!
wait_until '[[ " $p " == *" spare "* ]]'

victim=$(placed | awk '{print $1}')
pid=$(node_pid "$victim")
t0=$(now)
kill -9 "$pid"
# Without traffic nobody sees a broken stream: the lease TTL (3 s) is what reveals the death.
wait_until '[[ -n "$p" && " $p " != *" $victim "* ]]'
t1=$(now)
printf 'SIGKILL of an idle node -> epoch without it (lease expiry): %.2f s\n' "$(echo "$t1 - $t0" | bc)"
