#!/usr/bin/env bash
# The stall a burst of 4 MiB prompts causes in a concurrent greedy stream (docs/performance.md,
# "Tokenization off the runtime"): the ignored test `tokenize_stall_benchmark` of
# tests/runtime.rs, against release binaries. A local cluster (etcd, a router, one node) on the
# DeepSeek-V3 fixture; each round streams TOKENS tokens alone, then again with BURST prompts of
# 4 MiB sent at once after its 4th token; it prints the inter-token gaps seen by the client.
# Usage: bench/tokenize_stall.sh [BIN_DIR]
#   BIN_DIR: the binaries to measure (default target/release; `cargo build --release --bins`
#   first). Another build's, e.g. the code before the change built in a worktree, measures that.
# Env: ROUNDS (5), BURST (4), TOKENS (64). Needs etcd on PATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${1:-$root/target/release}" && pwd)
[ -x "$bin/moe-router" ] || { echo "no $bin/moe-router: cargo build --release --bins" >&2; exit 1; }
cd "$root"
MOE_BIN_DIR=$bin cargo test --release -p moe-tests --test runtime tokenize_stall_benchmark \
  -- --ignored --nocapture
