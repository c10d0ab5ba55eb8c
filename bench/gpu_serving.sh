#!/usr/bin/env bash
# Serving throughput on a GPU machine, after `ops/gpu-check.sh` has unpacked its binaries
# (/tmp/moe-gpu-bin) and linked the CUDA libraries (/tmp/moe-cuda-libs): a generated DeepSeek-V3
# checkpoint (PRESET, default medium: 2.9B parameters in bf16), the offline engine on DEVICE
# (default cuda:0) in each of DTYPES, then with `--deterministic` (what batch invariance
# costs), the same preset in FP8 with `--gpu-fp8 keep`, then a local cluster (router and NODES
# expert nodes, all on DEVICE, rows over the gRPC data plane), and prefix caching on it (a
# shared 1,000-token prefix, TTFT with and without, `--deterministic`). Batches 1, 8, 64 and
# 256 by default; the engine also with its experts behind two in-process nodes over the layer
# exchange (the router's device-resident path on one GPU: rows gathered per node and placed
# back on the device). Every step is bounded by a timeout; what it printed is the result.
# `DEVICE=cpu DTYPES=bf16 MOE_BIN_DIR=target/release PRESET=small` runs the same steps on a
# CPU machine (to check the script).
#
# `bench/gpu_serving.sh deepseek-v3` instead serves DeepSeek-V3's real dimensions (hidden 7168,
# MLA, 256 experts top-8, vocabulary 129,280, FP8 with 128x128 block scales) with V3_LAYERS
# layers (default 8: the 3 dense ones and 5 MoE layers, 56 GB of FP8 experts, which fits an H100 too) from a synthetic
# checkpoint (no weight files: each process generates them from the seed, the experts' FP8
# codes by a kernel on the device), `--gpu-fp8 keep`, at batches 1, 8, 64 and 256: the offline engine, then
# `moe-router --in-process-nodes 2` serving that many concurrent streams (router and experts in
# one process on one GPU: the device-resident exchange; tok/s, TTFT and ITL p50/p99), drawing as
# DeepSeek recommends (V3_SAMPLING, default `--temperature 0.6 --top-p 0.95`: a race among the
# nucleus on the device; empty for greedy), beside the memory-bandwidth bound of the same
# decode (bench/decode_bound.py, BANDWIDTH_GBS, default the H200's 4800). `DEVICE=cpu V3_LAYERS=4 V3_BATCH=1 V3_GEN=8` runs it on a 24 GB CPU machine.
# On a GPU in `--gpu-dtype f32` (V3_GPU_DTYPE; the kept FP8 experts on the exact CUDA-core
# kernel); `V3_GPU_DTYPE=bf16x2 MOE_GPU_EXPERT_GEMM=tensor-cores` runs them on our
# tensor-core kernel instead (bf16x2 activations against the FP8 bytes widened in registers).
set -uo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${MOE_BIN_DIR:-/tmp/moe-gpu-bin}")
export PATH="$bin:$PATH" MOE_BIN_DIR="$bin"
export LD_LIBRARY_PATH="/tmp/moe-cuda-libs:${LD_LIBRARY_PATH:-}"
device=${DEVICE:-cuda:0}

if [ "${1:-}" = deepseek-v3 ]; then
  layers=${V3_LAYERS:-8}
  model=/tmp/ds-v3-fp8-${layers}l
  batch=${V3_BATCH:-1,8,64,256} prompt=${V3_PROMPT_LEN:-128} gen=${V3_GEN:-32}
  timeout 30 moe gen-checkpoint --arch deepseek_v3 --preset full --layers "$layers" --dtype fp8 \
    --synthetic --out "$model" || exit 1
  gpu=()
  # f32 runs the kept FP8 experts through the exact CUDA-core kernel;
  # `V3_GPU_DTYPE=bf16x2 MOE_GPU_EXPERT_GEMM=tensor-cores` through our tensor-core kernel.
  [ "$device" = cpu ] || gpu=(--gpu-dtype "${V3_GPU_DTYPE:-f32}")
  read -r -a sampling <<<"${V3_SAMPLING---temperature 0.6 --top-p 0.95}"
  status=0
  echo "== DeepSeek-V3 dimensions, $layers layers, synthetic FP8 weights, on $device, --gpu-fp8 keep ${gpu[*]} (expert GEMMs: ${MOE_GPU_EXPERT_GEMM:-lanes})"
  MOE_GPU_FP8=keep timeout "${V3_TIMEOUT:-240}" moe bench --model "$model" --device "$device" "${gpu[@]}" \
    "${sampling[@]}" --batch "$batch" --prompt-len "$prompt" --gen "$gen" || status=1
  echo "== served: moe-router with its experts on 2 in-process nodes (device-resident exchange), concurrent streams"
  out=/tmp/moe-v3-router.out log=/tmp/moe-v3-router.log
  # Every stream of the largest batch runs at once; prefill chunks of 2,048 tokens.
  MOE_GPU_FP8=keep moe-router --model "$model" --device "$device" "${gpu[@]}" --in-process-nodes 2 \
    --grpc-listen 127.0.0.1:0 --max-running 256 --max-waiting 512 --max-batch-tokens 2048 \
    --kv-cache-bytes 8000000000 >"$out" 2>"$log" &
  router_pid=$!
  addr=""
  for _ in $(seq 1 "${V3_LOAD_WAIT:-180}"); do
    addr=$(sed -n 's/^moe-router listening on //p' "$out")
    [ -n "$addr" ] && break
    kill -0 "$router_pid" 2>/dev/null || break
    sleep 1
  done
  if [ -n "$addr" ]; then
    timeout "${V3_TIMEOUT:-240}" moe bench --router "$addr" "${sampling[@]}" --batch "$batch" \
      --prompt-len "$prompt" --gen "$gen" || status=1
  else
    echo "the router did not start:"; tail -5 "$log"; status=1
  fi
  kill "$router_pid" 2>/dev/null; wait "$router_pid" 2>/dev/null
  # Weights as held: projections FP8 (1 byte), embeddings, lm_head and gates widened to f32 on
  # a GPU in --gpu-dtype f32 (bf16 on the CPU); the KV cache in f32.
  other=4
  [ "$device" = cpu ] && other=2
  python3 bench/decode_bound.py "$model" --batches "$batch" --context $((prompt + gen / 2)) \
    --bandwidth-gbs "${BANDWIDTH_GBS:-4800}" --projection-bytes 1 --other-bytes $other --kv-bytes 4 ||
    status=1
  exit $status
fi

preset=${PRESET:-medium}
model=/tmp/ds-$preset-bf16
shape=(--batch "${BATCH:-1,8,64,256}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-64}")

[ -e "$model/config.json" ] ||
  timeout 120 moe gen-checkpoint --arch deepseek_v3 --preset "$preset" --dtype bf16 --out "$model" ||
  exit 1
status=0
for dtype in ${DTYPES:-bf16x2 bf16}; do
  echo "== offline engine on $device, $dtype"
  timeout 150 moe bench --model "$model" --device "$device" --gpu-dtype "$dtype" "${shape[@]}" ||
    status=1
done
echo "== offline engine on $device, bf16x2, experts behind 2 in-process nodes (device-resident exchange)"
timeout 150 moe bench --model "$model" --device "$device" --in-process-nodes 2 "${shape[@]}" ||
  status=1
echo "== offline engine on $device, bf16x2, --deterministic (exact GEMM kernels)"
MOE_DETERMINISTIC=true timeout 150 moe bench --model "$model" --device "$device" "${shape[@]}" ||
  status=1
fp8=/tmp/ds-$preset-fp8
[ -e "$fp8/config.json" ] ||
  timeout 120 moe gen-checkpoint --arch deepseek_v3 --preset "$preset" --dtype fp8 --out "$fp8" ||
  status=1
echo "== offline engine on $device, FP8 checkpoint, --gpu-fp8 keep"
MOE_GPU_FP8=keep timeout 150 moe bench --model "$fp8" --device "$device" --gpu-dtype f32 "${shape[@]}" ||
  status=1
echo "== cluster on $device (router + ${NODES:-2} nodes, gRPC data plane)"
SKIP_OFFLINE=1 BATCH=${CLUSTER_BATCH:-1,8,32} UP_ARGS="--device $device" \
  timeout 200 bench/cluster_vs_offline.sh "$model" "${NODES:-2}" || status=1
echo "== prefix caching on $device (paged device KV pool, --deterministic)"
MOE_DETERMINISTIC=true UP_ARGS="--device $device" BATCH=32 \
  timeout 200 bench/prefix_cache.sh "$model" "${NODES:-2}" || status=1
exit $status
