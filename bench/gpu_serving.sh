#!/usr/bin/env bash
# Serving throughput on a GPU machine, after `ops/gpu-check.sh` has unpacked its binaries
# (/tmp/moe-gpu-bin) and linked the CUDA libraries (/tmp/moe-cuda-libs): a generated DeepSeek-V3
# checkpoint (PRESET, default medium: 2.9B parameters in bf16), the offline engine on cuda:0 in
# each GPU dtype, then a local cluster (router and NODES expert nodes, all on cuda:0, rows over
# the gRPC data plane). Every step is bounded by a timeout; what it printed is the result.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="/tmp/moe-gpu-bin:$PATH" MOE_BIN_DIR=/tmp/moe-gpu-bin
export LD_LIBRARY_PATH="/tmp/moe-cuda-libs:${LD_LIBRARY_PATH:-}"
preset=${PRESET:-medium}
model=/tmp/ds-$preset-bf16
shape=(--batch "${BATCH:-1,8,32,128}" --prompt-len "${PROMPT_LEN:-128}" --gen "${GEN:-64}")

[ -e "$model/config.json" ] ||
  timeout 120 moe gen-checkpoint --arch deepseek_v3 --preset "$preset" --dtype bf16 --out "$model" ||
  exit 1
for dtype in ${DTYPES:-bf16x2 bf16}; do
  echo "== offline engine on cuda:0, $dtype"
  timeout 150 moe bench --model "$model" --device cuda:0 --gpu-dtype "$dtype" "${shape[@]}"
done
echo "== cluster on cuda:0 (router + ${NODES:-2} nodes, gRPC data plane)"
SKIP_OFFLINE=1 BATCH=${CLUSTER_BATCH:-1,8,32} UP_ARGS="--device cuda:0" \
  timeout 200 bench/cluster_vs_offline.sh "$model" "${NODES:-2}"
