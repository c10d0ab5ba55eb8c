#!/usr/bin/env bash
# Kimi-K2's tokenizer at its real vocabulary size: load and encode times, and the ids checked
# against tiktoken under Kimi's class (bench/tiktoken_at_scale.py says what it makes).
# Usage: bench/tiktoken_at_scale.sh [DIR]   (needs python3 with tiktoken)
set -euo pipefail
dir=${1:-$(mktemp -d)}
here=$(dirname "$0")
python3 "$here/tiktoken_at_scale.py" make "$dir"
MOE_TIKTOKEN_AT_SCALE="$dir" cargo test --release -p moe-model --lib -- --ignored \
  tiktoken_at_scale --nocapture 2>&1 | grep -E '^(loaded|encoded)'
python3 "$here/tiktoken_at_scale.py" compare "$dir"
