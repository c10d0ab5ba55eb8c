#!/usr/bin/env python3
"""The yardstick for `cargo bench -p moe-model --bench kernels`: numpy's sgemm (OpenBLAS) at the
same shapes, on the same machine, in the same run. Prints one line per shape and a JSON line.

Usage: python3 bench/numpy_gemm.py [--threads 2]
"""
import argparse
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))

import numpy as np  # noqa: E402

try:
    from threadpoolctl import threadpool_info

    blas = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()]
except ImportError:  # threadpoolctl is optional
    blas = []


def median_seconds(fn, min_time=1.0):
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_time and len(samples) < 1000):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2]


def silu(x):
    return x / (1.0 + np.exp(-x))


results = []
rng = np.random.default_rng(0)
hidden, inter = 2048, 1408
for tokens in (64, 1):
    a = rng.standard_normal((tokens, hidden), dtype=np.float32)
    w = rng.standard_normal((inter, hidden), dtype=np.float32)
    out = np.empty((tokens, inter), dtype=np.float32)
    s = median_seconds(lambda: np.matmul(a, w.T, out=out))
    results.append({"name": f"gemm_{tokens}x{hidden}x{inter}", "seconds": s, "gflops": 2 * tokens * hidden * inter / s / 1e9})
    gate = rng.standard_normal((inter, hidden), dtype=np.float32)
    up = rng.standard_normal((inter, hidden), dtype=np.float32)
    down = rng.standard_normal((hidden, inter), dtype=np.float32)
    s = median_seconds(lambda: (silu(a @ gate.T) * (a @ up.T)) @ down.T)
    results.append({"name": f"expert_ffn_{tokens}x{hidden}x{inter}", "seconds": s, "gflops": 6 * tokens * hidden * inter / s / 1e9})
n = 2048
a = rng.standard_normal((n, n), dtype=np.float32)
s = median_seconds(lambda: a @ a)
results.append({"name": "gemm_2048x2048x2048", "seconds": s, "gflops": 2 * n**3 / s / 1e9})

print(f"numpy {np.__version__}, BLAS {blas}")
for r in results:
    print(f"{r['name']:<34} {r['seconds'] * 1e3:>9.3f} ms {r['gflops']:>9.1f} GFLOP/s")
print(json.dumps(results))
