#!/usr/bin/env bash
# Runs a command with the CUDA emulator in place of the CUDA driver, cuBLAS and NCCL (cuda-emulator/:
# the GPU path's Rust code, its launches and buffers, NVRTC's compilation and the kernels' own
# source run on the CPU; docs/gpu.md says what it shows and what it cannot). For a machine
# without a GPU:
#
#   ops/cuda-emulator.sh ops/gpu-check.sh            the GPU checks, emulated
#   ops/cuda-emulator.sh cargo test -p moe-model --features cuda --lib gpu
#
# Builds the emulator (release), links it as libcuda.so, libcublas.so and libnccl.so under
# target/cuda-emulator/, finds NVRTC (pip's nvidia-cuda-nvrtc, installed into /tmp/moe-nvrtc
# when no libnvrtc is found), then runs the command with both first on LD_LIBRARY_PATH and
# MOE_REQUIRE_GPU=1 (a GPU test that cannot open cuda:0 fails instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n 2,13p "$0"; exit 2; }

cargo build --release -q -p moe-cuda-emulator
target=${CARGO_TARGET_DIR:-$PWD/target}
emulator="$target/cuda-emulator"
mkdir -p "$emulator"
# Only the names cudarc tries first: NVRTC opens libcuda.so.1 itself, for what this does not
# emulate, and must not find it.
rm -f "$emulator"/lib*.so*
for name in libcuda.so libcublas.so libnccl.so; do
  ln -sf "$target/release/libmoe_cuda_emulator.so" "$emulator/$name"
done

nvrtc=$(find /tmp/moe-nvrtc -name 'libnvrtc.so.13' 2>/dev/null | head -1 || true)
if [ -z "$nvrtc" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so'; then
  python3 -m pip install --quiet --disable-pip-version-check --target /tmp/moe-nvrtc "nvidia-cuda-nvrtc>=13,<14"
  nvrtc=$(find /tmp/moe-nvrtc -name 'libnvrtc.so.13' | head -1)
fi
export LD_LIBRARY_PATH="$emulator${nvrtc:+:$(dirname "$nvrtc")}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOE_REQUIRE_GPU=1 MOE_CUDA_EMULATOR="$emulator"
exec "$@"
