#!/usr/bin/env bash
# Prints the tables of docs/capacity.md: DeepSeek-V3 (FP8) on 1, 2, 4 and 8 machines of
# 8 x H200 and 8 x H800, both layouts, 4k context, 50 ms per output token, no MTP.
# Usage: ops/plan/capacity-tables.sh [path/to/moe [more moe plan flags]]
# (default: target/release/moe); e.g. `... target/release/moe --wire-dtype bf16` for a what-if.
set -euo pipefail
moe=${1:-target/release/moe}
shift || true
# What-if flags (--wire-dtype, --kv-dtype) are for our layout only.
layouts="disaggregated colocated"
[ $# -gt 0 ] && layouts=disaggregated
model=$(dirname "$0")/deepseek-v3
echo "| GPUs | layout | fits | split (routers + expert GPUs) | expert slots/GPU | decode batch | decode tok/s/node | bound | step: attention / dense / experts / exchange (ms) | prefill input tok/s/node | prefill bound |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for gpu in h200 h800; do
  for machines in 1 2 4 8; do
    for layout in $layouts; do
      "$moe" plan --model "$model" --gpu "$gpu" --machines "$machines" --layout "$layout" \
        --context 4096 --tpot-ms 50 --json "$@" 2>/dev/null | tail -1 |
        python3 "$(dirname "$0")/table_row.py"
    done
  done
done
