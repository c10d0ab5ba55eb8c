#!/usr/bin/env bash
# The GPU check (issue 6), for a machine with an NVIDIA GPU (reference: one H200, driver 580,
# CUDA 13; it passed there on 2026-11-30 in about 30 s: docs/performance.md). Two steps,
# because a GPU machine may have no Rust toolchain:
#
#   ops/gpu-check.sh prepare   on any x86-64 build machine (no GPU needed): builds what the
#                              check runs with --features cuda (and this machine's etcd),
#                              stripped and gzipped, into .gpu-bin/ (git-ignored, ~30 MB;
#                              carry it to the GPU machine).
#   ops/gpu-check.sh           on the GPU machine, from the repository root: runs the checks
#                              and prints a summary. Without .gpu-bin/ it prepares first
#                              (needs cargo there).
#   ops/gpu-check.sh bench     the benchmarks, as a run of their own (each part stays well under
#                              the device's 600 s per command, so a part that fails can be run
#                              again within one session's 15 minutes).
#   ops/gpu-check.sh serving   DeepSeek-V3's real dimensions (8 layers, FP8, weights generated
#                              from a synthetic checkpoint's seed: bench/gpu_serving.sh
#                              deepseek-v3), batches 1 to 256: the offline engine, then
#                              `moe-router --in-process-nodes 2` serving that many streams
#                              (tok/s, TTFT, ITL p50/p99), beside the bandwidth bound; a run
#                              of its own (bound 560 s: 210 + 120 to load the router + 210).
#                              The experts run on the exact FP8 CUDA-core kernel (f32);
#                              `V3_GPU_DTYPE=bf16x2 MOE_GPU_EXPERT_GEMM=tensor-cores
#                              ops/gpu-check.sh serving` runs them on our tensor-core kernel.
#
# Checks, each bounded by a timeout (the bounds add up to 840 s; a normal run takes far less),
# in order of priority (the exit status is non-zero when one failed):
#   1. the device unit tests of moe-model with the cuda feature: each dense-part kernel and
#      cuBLAS call against the host reference, the whole GPU dense part against it on the
#      fixtures, the FP8 and exact (`--deterministic`) GEMM kernels bitwise the CPU's, a
#      sequence's logits bitwise the same alone and in a batch of 64 with `--deterministic`
#      (MOE_REQUIRE_GPU=1: a GPU that cannot be opened fails them);
#   2. the engine's golden tests with the whole model on cuda:0 (dense part: attention with
#      the KV cache, norms, gate, shared experts, lm_head; routed experts, given the dense
#      part's rows in place): f32 and bf16x2 (the default: bf16 weights, activations as two
#      bf16 terms) within 2e-3, the FP8 fixture among them (its weights widened to f32 on the
#      device in both), and bf16x2 again with the decode steps as CUDA graphs
#      (`--cuda-graphs`), with `--deterministic` (f32) and with bf16 experts on our tensor-core
#      kernel (`--gpu-expert-gemm tensor-cores`, the FP8 fixture's experts kept as FP8 on it),
#      the routed experts inside the graphs. Plain bf16 is not run against the goldens: its host emulation
#      (tests/golden.rs, bf16_device_numerics) already shows it moving logits by up to 6.6 on
#      these fixtures (docs/gpu.md);
#   3. `moe generate --device cuda:0 --gpu-dtype f32` gives the CPU's tokens, on a fixture and
#      on a generated FP8 checkpoint (the CPU holding FP8 panels, the GPU its f32 widening, and
#      with `--gpu-fp8 keep` its routed experts and dense projections kept as FP8, also from
#      the same checkpoint as a synthetic one, the expert codes generated on the device); so does
#      `--deterministic` (every GEMM through the exact kernels), also after a 700-token prompt
#      (a prefill whose routes are planned on the device);
#   4. a local cluster (etcd, a router and 2 expert nodes on cuda:0) gives the golden tokens
#      over the gRPC data plane, in f32 and in bf16x2 with the experts on our tensor-core
#      kernel; a CPU router with the same GPU nodes over the per-epoch TCP collective;
#   5. a one-rank NCCL communicator round trip (non-blocking init, grouped send/recv), and
#      rows received over it run by GPU experts where they lie, against the same experts
#      run from host rows;
#   6. (run after the `moe generate` checks of 3) `moe generate --in-process-nodes 2` on
#      cuda:0: the experts behind two in-process nodes over the layer exchange, a layer's
#      rows gathered per node and placed back on the device = the CPU's tokens (with and
#      without `--cuda-graphs`); in `--gpu-dtype bf16` the nodes' rows gathered as bf16 on the
#      device give the JSON (tokens and log-probs) of the engine's own experts; and the same
#      served by `moe-router --in-process-nodes 2 --device cuda:0` (no etcd) over gRPC,
#      greedy and with a presence penalty (the row edited on the device, only the pick
#      downloaded);
#   7. the router's device-resident dispatch (rows gathered per node on the GPU, outputs
#      placed in pair order there) through the in-process device transport to two expert
#      sets on the same GPU, against the CPU experts (the row kernels themselves run in 1);
#      and in `bf16` numerics with the rows gathered as bf16 (half the bytes), bitwise the
#      outputs of f32 rows; over TCP too, a cluster of `bf16` nodes against the same cluster
#      over gRPC (tokens and log-probs bit for bit, two bytes a value on the wire).
# Benchmarks (`bench`; bounds add up to 725 s, a normal run far less):
#   1. `moe gpu-bench`: expert-FFN TFLOP/s at DeepSeek-V3 shapes (hidden 7168, intermediate
#      2048, 256 experts, top-8) at 128/1024/8192 tokens vs one 8192^3 bf16 GEMM; then the
#      same with each pass's expert GEMMs in one grouped cuBLAS call (`--expert-gemm grouped`),
#      and in one launch of our tensor-core kernel (`--expert-gemm tensor-cores`, bf16 and
#      `--fp8`);
#   2. the same with the experts kept as FP8 (the grouped FP8 kernel, SiLU fused into the
#      gate/up pass, then apart from it to compare), and with bf16 experts through the exact
#      kernels (`--deterministic`), with the weights' device memory;
#   3. what `--deterministic` costs a whole model: `moe bench` at batch 1, 8 and 32 on a
#      generated small preset, with and without;
#   4. what launching 500 small kernels one by one costs against replaying them as one
#      captured CUDA graph (`moe gpu-bench --launches 500`), and what planning a MoE layer's
#      routes on the device costs at 1 to 8192 tokens (`moe gpu-bench --plan-routes`);
#   5. what `--cuda-graphs` gains a whole model's decode steps: `moe bench` at batch 1, 8
#      and 32 on the generated small preset, with and without; with `--deterministic` (the
#      routed experts inside the graph); with bf16 experts on our tensor-core kernel (inside
#      the graph too).
# Not covered here: `--transport nccl` in a running cluster (NCCL refuses two ranks on one
# GPU: it needs a GPU per process).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.gpu-bin

prepare() {
  set -e
  rm -rf "$BIN"
  mkdir -p "$BIN"
  cargo build --release --features cuda -p moe-cli -p moe-router -p moe-expert-node --bins
  cp target/release/moe target/release/moe-router target/release/moe-expert-node "$BIN/"
  # The GPU machine has no etcd; the cluster check starts this one.
  cp "$(command -v etcd)" "$BIN/etcd"
  # Test executables: cargo prints their paths in its JSON messages.
  local exe
  for spec in "moe-tests --test golden:golden" "moe-tests --test gpu_cluster:gpu-cluster" \
    "moe-model --lib:model-lib" "moe-cluster --lib:cluster-lib"; do
    exe=$(cargo test --release --features cuda -p ${spec%%:*} --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("profile", {}).get("test"):
        print(m["executable"])' | tail -1)
    cp "$exe" "$BIN/${spec##*:}"
  done
  strip "$BIN"/* 2>/dev/null || true
  gzip -9 "$BIN"/*
  ls -la "$BIN"
  echo "prepared $BIN/ ($(du -sh "$BIN" | cut -f1)); carry it to the GPU machine"
  set +e
}

PART=${1:-checks}
if [ "$PART" = prepare ]; then
  prepare
  exit
fi
if [ ! -e "$BIN/moe.gz" ]; then
  command -v cargo >/dev/null || { echo "no $BIN/ and no cargo: run 'ops/gpu-check.sh prepare' on a build machine"; exit 2; }
  prepare
fi
UNPACKED=/tmp/moe-gpu-bin
rm -rf "$UNPACKED" && mkdir -p "$UNPACKED"
for f in "$BIN"/*.gz; do gunzip -c "$f" >"$UNPACKED/$(basename "$f" .gz)"; done
chmod +x "$UNPACKED"/*
export PATH="$UNPACKED:$PATH" MOE_BIN_DIR="$UNPACKED"

# cudarc opens libcublas.so.13, libnvrtc.so.13 and libnccl.so (unversioned: NCCL's soname is
# libnccl.so.2, which cudarc does not try). PyTorch's cu13 wheels carry all three; link them
# under the names cudarc looks for.
LIBS=/tmp/moe-cuda-libs
mkdir -p "$LIBS"
nvidia_dir=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
# The toolkit's copies come last and win: its NVRTC matches the driver, and PTX from a newer
# NVRTC than the driver does not load.
for dir in ${nvidia_dir:+$(find "$nvidia_dir" -name 'lib*.so*' -printf '%h\n' | sort -u)} /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64; do
  [ -d "$dir" ] || continue
  for lib in "$dir"/libcublas.so.* "$dir"/libcublasLt.so.* "$dir"/libnvrtc.so.* "$dir"/libnvrtc-builtins.so.* "$dir"/libnccl.so.*; do
    [ -e "$lib" ] || continue
    base=$(basename "$lib")
    ln -sf "$lib" "$LIBS/$base"
    ln -sf "$lib" "$LIBS/${base%%.so*}.so"
  done
done
export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
# Under ops/cuda-emulator.sh the emulator stands in for the driver and cuBLAS, ahead of any
# real library: every check then runs on the CPU (what that shows: docs/gpu.md).
# Each check's bound is for a GPU; the emulator runs kernels one thread at a time.
TIME_SCALE=1
if [ -n "${MOE_CUDA_EMULATOR:-}" ]; then
  export LD_LIBRARY_PATH="$MOE_CUDA_EMULATOR:$LD_LIBRARY_PATH"
  TIME_SCALE=${MOE_CHECK_TIME_SCALE:-12}
  echo "== EMULATED: the CUDA emulator on the CPU stands in for the GPU ($MOE_CUDA_EMULATOR); no timing here is a GPU's"
fi
export MOE_FIXTURES_DIR="$PWD/tests/fixtures"
export RUST_BACKTRACE=1 RUST_LIB_BACKTRACE=0 UNPACKED

summary=()
note() { summary+=("$1"); echo "== $1"; }
check() { # name, seconds, command...
  local name=$1 secs=$(($2 * TIME_SCALE))
  shift 2
  echo
  echo "== $name"
  local start=$SECONDS
  if declare -F "$1" >/dev/null; then
    export -f "$1"
    set -- bash -c "$*"
  fi
  if timeout "$secs" "$@"; then
    note "$name: ok ($((SECONDS - start)) s)"
  else
    note "$name: FAILED (exit $?, $((SECONDS - start)) s)"
  fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/nvidia-smi: /' || true
ls "$LIBS"

if [ "$PART" = checks ]; then
check "device unit tests (cuda feature)" 45 env MOE_REQUIRE_GPU=1 "$UNPACKED/model-lib" device gpu routes --nocapture
check "golden tests, whole model on cuda:0, f32 (2e-3)" 55 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_GPU_DTYPE=f32 "$UNPACKED/golden" --test-threads=1 --nocapture
check "golden tests, whole model on cuda:0, bf16x2 (2e-3)" 55 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_GPU_DTYPE=bf16x2 "$UNPACKED/golden" --test-threads=1 --nocapture
check "golden tests, bf16x2, decode steps as CUDA graphs (--cuda-graphs)" 55 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_GPU_DTYPE=bf16x2 MOE_TEST_CUDA_GRAPHS=1 "$UNPACKED/golden" --test-threads=1 --nocapture
check "golden tests, f32, --cuda-graphs --deterministic (routed experts inside the graphs)" 55 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_GPU_DTYPE=f32 MOE_TEST_CUDA_GRAPHS=1 MOE_TEST_DETERMINISTIC=1 "$UNPACKED/golden" --test-threads=1 --nocapture
check "golden tests, bf16x2, bf16 and FP8 experts on our tensor-core kernel inside the graphs (--gpu-expert-gemm tensor-cores --gpu-fp8 keep --cuda-graphs)" 55 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_GPU_DTYPE=bf16x2 MOE_TEST_CUDA_GRAPHS=1 MOE_TEST_GPU_EXPERT_GEMM=tensor-cores MOE_TEST_GPU_FP8=keep "$UNPACKED/golden" --test-threads=1 --nocapture

same_tokens() {
  set -eo pipefail
  local model=tests/fixtures/deepseek-v3-tiny cpu gpu
  cpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json | tail -1)
  gpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype f32 | tail -1)
  echo "cpu: $cpu"
  echo "gpu: $gpu"
  [ -n "$cpu" ] && [ "$(echo "$cpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)["output_ids"])')" = \
    "$(echo "$gpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)["output_ids"])')" ]
}
check "moe generate --device cuda:0 = cpu tokens" 30 same_tokens

deterministic_same_tokens() {
  set -eo pipefail
  local model=tests/fixtures/qwen3-moe-tiny cpu gpu ids long
  cpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json | tail -1)
  gpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json --device cuda:0 --deterministic | tail -1)
  echo "cpu: $cpu"
  echo "gpu (bf16x2, --deterministic: exact GEMM kernels): $gpu"
  ids='import json,sys; print(json.load(sys.stdin)["output_ids"])'
  [ -n "$cpu" ] && [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$gpu" | python3 -c "$ids")" ]
  # A 700-token prompt: one prefill step of 700 rows, its routes planned on the device.
  long=$(python3 -c 'print(",".join(str((t * 31 + 7) % 500 + 2) for t in range(700)))')
  cpu=$("$UNPACKED/moe" generate --model $model --input-ids "$long" --max-new-tokens 8 --ignore-eos --json | tail -1)
  gpu=$("$UNPACKED/moe" generate --model $model --input-ids "$long" --max-new-tokens 8 --ignore-eos --json --device cuda:0 --deterministic | tail -1)
  echo "700-token prompt, cpu: $(echo "$cpu" | python3 -c "$ids")"
  echo "700-token prompt, gpu: $(echo "$gpu" | python3 -c "$ids")"
  [ -n "$cpu" ] && [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$gpu" | python3 -c "$ids")" ]
}
check "--deterministic: cuda:0 = cpu tokens (and a 700-token prefill, routes planned on the device)" 40 deterministic_same_tokens

fp8_same_tokens() {
  set -eo pipefail
  local model=/tmp/moe-fp8-tiny cpu gpu ids
  rm -rf $model
  "$UNPACKED/moe" gen-checkpoint --arch deepseek_v3 --preset tiny --dtype fp8 --out $model >/dev/null
  cpu=$("$UNPACKED/moe" generate --model $model --input-ids 1,5,7,9 --max-new-tokens 16 --ignore-eos --json | tail -1)
  gpu=$("$UNPACKED/moe" generate --model $model --input-ids 1,5,7,9 --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype f32 | tail -1)
  echo "cpu (FP8 panels): $cpu"
  echo "gpu (widened at load, f32): $gpu"
  ids='import json,sys; print(json.load(sys.stdin)["output_ids"])'
  [ -n "$cpu" ] && [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$gpu" | python3 -c "$ids")" ]
}
check "FP8 checkpoint: cuda:0 f32 = cpu FP8 panels, tokens" 30 fp8_same_tokens

in_process_same_tokens() {
  set -eo pipefail
  local model=tests/fixtures/deepseek-v3-tiny cpu gpu graphs ids
  cpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json | tail -1)
  gpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype f32 --in-process-nodes 2 | tail -1)
  graphs=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype f32 --in-process-nodes 2 --cuda-graphs | tail -1)
  echo "cpu: $cpu"
  echo "gpu (experts behind 2 in-process nodes, rows gathered and placed on the device): $gpu"
  echo "the same, decode steps as CUDA graphs: $graphs"
  ids='import json,sys; print(json.load(sys.stdin)["output_ids"])'
  [ -n "$cpu" ] && [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$gpu" | python3 -c "$ids")" ] &&
    [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$graphs" | python3 -c "$ids")" ]
}
check "device-resident exchange (--in-process-nodes 2, with and without --cuda-graphs): cuda:0 = cpu tokens" 25 in_process_same_tokens

in_process_bf16_rows() {
  set -eo pipefail
  local model=tests/fixtures/deepseek-v3-tiny alone nodes
  local flags=(--model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype bf16)
  alone=$("$UNPACKED/moe" generate "${flags[@]}" | tail -1)
  nodes=$("$UNPACKED/moe" generate "${flags[@]}" --in-process-nodes 2 | tail -1)
  echo "bf16, experts in the engine: $alone"
  echo "bf16, experts behind 2 in-process nodes (rows gathered as bf16 on the device): $nodes"
  [ -n "$alone" ] && [ "$alone" = "$nodes" ]
}
check "bf16 rows on the device (--gpu-dtype bf16 --in-process-nodes 2) = the engine's own experts, tokens and log-probs" 25 in_process_bf16_rows

served_in_process_same_tokens() {
  set -eo pipefail
  local model=tests/fixtures/deepseek-v3-tiny out=/tmp/moe-in-process-router.out cpu gpu cpu_pen gpu_pen ids addr="" pid
  cpu=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json | tail -1)
  "$UNPACKED/moe-router" --model $model --device cuda:0 --gpu-dtype f32 --in-process-nodes 2 \
    --grpc-listen 127.0.0.1:0 >$out 2>/tmp/moe-in-process-router.log &
  pid=$!
  for _ in $(seq 1 60); do
    addr=$(sed -n 's/^moe-router listening on //p' $out)
    [ -n "$addr" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.5
  done
  [ -n "$addr" ] || { tail -5 /tmp/moe-in-process-router.log; kill $pid 2>/dev/null; return 1; }
  gpu=$("$UNPACKED/moe" generate --router "$addr" --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json | tail -1) || true
  # Penalties: the router edits the row on the device and downloads only the pick.
  local penalties=(--presence-penalty -0.8)
  cpu_pen=$("$UNPACKED/moe" generate --model $model --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json "${penalties[@]}" | tail -1)
  gpu_pen=$("$UNPACKED/moe" generate --router "$addr" --prompt "The expert nodes" --max-new-tokens 16 --ignore-eos --json "${penalties[@]}" | tail -1) || true
  kill $pid 2>/dev/null; wait $pid 2>/dev/null || true
  echo "cpu: $cpu"
  echo "served by moe-router --in-process-nodes 2 on cuda:0: $gpu"
  echo "cpu, penalties: $cpu_pen"
  echo "served, penalties applied on the device: $gpu_pen"
  ids='import json,sys; print(json.load(sys.stdin)["output_ids"])'
  [ -n "$gpu" ] && [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$gpu" | python3 -c "$ids")" ] &&
    [ -n "$gpu_pen" ] && [ "$(echo "$cpu_pen" | python3 -c "$ids")" = "$(echo "$gpu_pen" | python3 -c "$ids")" ] &&
    [ "$(echo "$cpu" | python3 -c "$ids")" != "$(echo "$cpu_pen" | python3 -c "$ids")" ]
}
check "moe-router --in-process-nodes 2 on cuda:0 serves the cpu tokens (greedy, penalties)" 40 served_in_process_same_tokens

fp8_kept_same_tokens() {
  set -eo pipefail
  local model=/tmp/moe-fp8-tiny cpu gpu ids
  [ -d $model ] || "$UNPACKED/moe" gen-checkpoint --arch deepseek_v3 --preset tiny --dtype fp8 --out $model >/dev/null
  cpu=$("$UNPACKED/moe" generate --model $model --input-ids 1,5,7,9 --max-new-tokens 16 --ignore-eos --json | tail -1)
  gpu=$("$UNPACKED/moe" generate --model $model --input-ids 1,5,7,9 --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype f32 --gpu-fp8 keep | tail -1)
  # The same checkpoint as a synthetic one (no weight files): its expert codes generated on
  # the device.
  local synthetic=/tmp/moe-fp8-tiny-synthetic generated
  [ -d $synthetic ] || "$UNPACKED/moe" gen-checkpoint --arch deepseek_v3 --preset tiny --dtype fp8 --synthetic --out $synthetic >/dev/null
  generated=$("$UNPACKED/moe" generate --model $synthetic --input-ids 1,5,7,9 --max-new-tokens 16 --ignore-eos --json --device cuda:0 --gpu-dtype f32 --gpu-fp8 keep | tail -1)
  echo "cpu (FP8 panels): $cpu"
  echo "gpu (experts kept as FP8, gemm_rows_fp8): $gpu"
  echo "gpu, synthetic checkpoint (expert codes generated on the device): $generated"
  ids='import json,sys; print(json.load(sys.stdin)["output_ids"])'
  [ -n "$cpu" ] && [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$gpu" | python3 -c "$ids")" ] &&
    [ "$(echo "$cpu" | python3 -c "$ids")" = "$(echo "$generated" | python3 -c "$ids")" ]
}
check "FP8 checkpoint: cuda:0 --gpu-fp8 keep = cpu FP8 panels, tokens (also generated on the device)" 30 fp8_kept_same_tokens
check "cluster, router + 2 expert nodes on cuda:0 = golden tokens" 60 env MOE_TEST_DEVICE=cuda:0 "$UNPACKED/gpu-cluster" --ignored gpu_expert_nodes --nocapture
check "cluster, bf16x2, experts on our tensor-core kernel (MOE_GPU_EXPERT_GEMM=tensor-cores) = golden tokens" 60 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_GPU_DTYPE=bf16x2 MOE_GPU_EXPERT_GEMM=tensor-cores "$UNPACKED/gpu-cluster" --ignored gpu_expert_nodes --nocapture
check "CPU router, GPU nodes, over the TCP collective" 60 env MOE_TEST_DEVICE=cuda:0 MOE_TEST_ROUTER_DEVICE=cpu MOE_TEST_TRANSPORT=tcp "$UNPACKED/gpu-cluster" --ignored gpu_expert_nodes --nocapture
check "bf16 rows on the wire to bf16 nodes (TCP collective) = f32 rows over gRPC, bit for bit" 60 env MOE_TEST_DEVICE=cuda:0 "$UNPACKED/gpu-cluster" --ignored bf16_rows_on_the_wire --nocapture
check "NCCL one-rank round trip; received rows run in place" 30 "$UNPACKED/cluster-lib" --ignored one_rank --nocapture
check "router's device-resident dispatch through the in-process device transport (f32, and bf16 rows)" 30 "$UNPACKED/cluster-lib" --ignored device_rows_go_to_in_process bf16_rows_on_the_device --nocapture
fi

gpu_bench() { # name of the JSON file, then moe gpu-bench's flags
  set -eo pipefail
  local name=$1
  shift
  # shellcheck disable=SC2086 # the shapes are words
  "$UNPACKED/moe" gpu-bench --json $BENCH_SHAPES "$@" | tee "/tmp/$name.json"
  [ -n "${OUT:-}" ] && cp "/tmp/$name.json" "$OUT/" 2>/dev/null
  GPU_BENCH_JSON="/tmp/$name.json" python3 - <<'EOF'
import json, os
r = json.load(open(os.environ["GPU_BENCH_JSON"]))
print(f"weights: {r.get('weights', 'held')}, deterministic: {r.get('deterministic', False)}, expert GEMMs: {r.get('expert_gemm', 'lanes')}, SiLU fused: {r.get('fused_silu', False)}, {r.get('weight_bytes', 0) / 1e9:.2f} GB on the device")
print(f"{r['name']} {r['dtype']}: dense {r['roofline']['m']}^3 GEMM {r['roofline']['tflops']:.1f} TFLOP/s")
for f in r["expert_ffn"]:
    print(f"  {f['lanes']:>2} lanes, {f['tokens']:>5} tokens ({f['pairs']} pairs): {f['ms']:.3f} ms, {f['tflops']:.1f} TFLOP/s, {100 * f['of_roofline']:.0f}% of the dense GEMM; GEMMs alone {f['gemm_ms']:.3f} ms, {f['gemm_tflops']:.1f} TFLOP/s")
EOF
}
with_and_without() { # a switch of moe bench (then other flags for both runs): the small preset at batch 1, 8 and 32, off then on
  set -eo pipefail
  local model=/tmp/moe-$BENCH_PRESET-bf16 switch=$1
  shift
  [ -d $model ] || "$UNPACKED/moe" gen-checkpoint --arch deepseek_v3 --preset $BENCH_PRESET --dtype bf16 --out $model >/dev/null
  for on in false true; do
    echo "--$switch=$on $*"
    "$UNPACKED/moe" bench --model $model --device cuda:0 --batch 1,8,32 --prompt-len 64 --gen 32 "--$switch=$on" "$@"
  done
}

tensor_core_steps() { # the with_and_without model, --cuda-graphs on, bf16 experts on the tensor cores
  set -eo pipefail
  local model=/tmp/moe-$BENCH_PRESET-bf16
  [ -d $model ] || "$UNPACKED/moe" gen-checkpoint --arch deepseek_v3 --preset $BENCH_PRESET --dtype bf16 --out $model >/dev/null
  echo "--cuda-graphs=true --gpu-expert-gemm tensor-cores"
  "$UNPACKED/moe" bench --model $model --device cuda:0 --batch 1,8,32 --prompt-len 64 --gen 32 --cuda-graphs=true --gpu-expert-gemm tensor-cores
}

# DeepSeek-V3's shapes on a GPU; on the emulator, shapes it gets through in seconds (what that
# checks: the benchmark's code and this script's reading of it, not a figure).
# (Exported as words: each check runs in a child bash, which takes no arrays.)
BENCH_SHAPES=""
BENCH_PRESET=small
if [ -n "${MOE_CUDA_EMULATOR:-}" ]; then
  BENCH_SHAPES="--tokens 16,64 --hidden 256 --intermediate 128 --experts 8 --top-k 2 --roofline-size 128"
  BENCH_PRESET=tiny
fi
export BENCH_SHAPES BENCH_PRESET
if [ "$PART" = bench ]; then
  check "expert-FFN benchmark (moe gpu-bench)" 90 gpu_bench gpu-bench
  check "expert FFN, one grouped cuBLAS call per pass (moe gpu-bench --expert-gemm grouped)" 45 gpu_bench gpu-bench-grouped --expert-gemm grouped --iters 5
  check "expert FFN, our tensor-core kernel, one launch per pass (moe gpu-bench --expert-gemm tensor-cores)" 45 gpu_bench gpu-bench-tensor-cores --expert-gemm tensor-cores --iters 5
  check "expert FFN, FP8 experts on our tensor-core kernel (moe gpu-bench --fp8 --expert-gemm tensor-cores)" 45 gpu_bench gpu-bench-fp8-tensor-cores --fp8 --expert-gemm tensor-cores --iters 5
  check "expert FFN, experts kept as FP8 (moe gpu-bench --fp8)" 60 gpu_bench gpu-bench-fp8 --fp8 --lanes 4 --iters 5
  check "expert FFN, FP8, SiLU apart from the gate/up pass (moe gpu-bench --fp8 --fused-silu=false)" 60 gpu_bench gpu-bench-fp8-unfused --fp8 --fused-silu=false --lanes 4 --iters 5
  check "expert FFN, exact kernels (moe gpu-bench --deterministic)" 60 gpu_bench gpu-bench-exact --deterministic --lanes 4 --iters 5
  check "--deterministic: its cost (moe bench, $BENCH_PRESET preset, bf16x2)" 80 with_and_without deterministic
  check "kernel launches one by one vs one CUDA graph (moe gpu-bench --launches 500)" 20 \
    "$UNPACKED/moe" gpu-bench --launches 500 --iters 20
  check "a MoE layer's routes planned on the device (moe gpu-bench --plan-routes, top-8 of 256)" 20 \
    "$UNPACKED/moe" gpu-bench --plan-routes --tokens 1,64,256,512,2048,8192 --iters 50
  check "decode steps as CUDA graphs: their gain (moe bench --cuda-graphs, $BENCH_PRESET preset, bf16x2)" 80 with_and_without cuda-graphs
  check "a decode step as one CUDA graph, routed experts inside (moe bench --cuda-graphs --deterministic)" 80 with_and_without cuda-graphs --deterministic
  check "bf16 experts on our tensor-core kernel, inside the decode graph (moe bench --cuda-graphs --gpu-expert-gemm tensor-cores)" 40 tensor_core_steps
fi

if [ "$PART" = serving ]; then
  check "DeepSeek-V3 dimensions, synthetic FP8 weights (bench/gpu_serving.sh deepseek-v3)" 560 \
    env V3_TIMEOUT=210 V3_LOAD_WAIT=120 bench/gpu_serving.sh deepseek-v3
fi

echo
echo "== summary${MOE_CUDA_EMULATOR:+ (EMULATED on the CPU: no GPU ran this)}"
printf '%s\n' "${summary[@]}"
# Non-zero when a check failed (the summary above says which).
[[ "${summary[*]}" != *FAILED* ]]
