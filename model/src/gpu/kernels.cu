// Element-wise kernels of the expert FFN on CUDA, compiled at start-up with NVRTC
// (model/src/gpu/kernels.rs). bf16 is handled as its bit pattern (unsigned short), so the
// source needs no CUDA header and compiles the same with every toolkit.
//
// Every kernel is a grid-stride loop over `long long` indices: DeepSeek-V3 shapes at 8192
// tokens x top-8 give 65536 x 7168 elements, more than an int holds.

typedef unsigned short bf16_t;

__device__ __forceinline__ bf16_t f32_to_bf16(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float bf16_to_f32(bf16_t x) {
    return __uint_as_float(((unsigned int)x) << 16);
}

__device__ __forceinline__ float silu(float x) {
    return x / (1.0f + expf(-x));
}

#define GRID_STRIDE(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (long long)gridDim.x * blockDim.x)

// out[s, :] = rows[index[s], :]: the rows of each expert's pairs, contiguous, in GEMM dtype.
extern "C" __global__ void gather_rows_bf16(const float* rows, const unsigned int* index, bf16_t* out,
                                            int slots, int hidden) {
    GRID_STRIDE(i, (long long)slots * hidden) {
        long long s = i / hidden;
        long long c = i - s * hidden;
        out[i] = f32_to_bf16(rows[(long long)index[s] * hidden + c]);
    }
}

extern "C" __global__ void gather_rows_f32(const float* rows, const unsigned int* index, float* out,
                                           int slots, int hidden) {
    GRID_STRIDE(i, (long long)slots * hidden) {
        long long s = i / hidden;
        long long c = i - s * hidden;
        out[i] = rows[(long long)index[s] * hidden + c];
    }
}

// act[s, j] = silu(gate_up[s, j]) * gate_up[s, inter + j]  (gate rows, then up rows).
extern "C" __global__ void silu_mul_bf16(const float* gate_up, bf16_t* act, int slots,
                                         int inter) {
    GRID_STRIDE(i, (long long)slots * inter) {
        long long s = i / inter;
        long long j = i - s * inter;
        const float* row = gate_up + s * 2 * inter;
        act[i] = f32_to_bf16(silu(row[j]) * row[inter + j]);
    }
}

extern "C" __global__ void silu_mul_f32(const float* gate_up, float* act, int slots, int inter) {
    GRID_STRIDE(i, (long long)slots * inter) {
        long long s = i / inter;
        long long j = i - s * inter;
        const float* row = gate_up + s * 2 * inter;
        act[i] = silu(row[j]) * row[inter + j];
    }
}

// pair_out[pair[s], :] = out[s, :] * weight[pair[s]]: back from expert order to pair order.
extern "C" __global__ void scatter_weighted(const float* out, const unsigned int* pair,
                                            const float* weight, float* pair_out, int slots,
                                            int hidden) {
    GRID_STRIDE(i, (long long)slots * hidden) {
        long long s = i / hidden;
        long long c = i - s * hidden;
        unsigned int p = pair[s];
        pair_out[(long long)p * hidden + c] = out[i] * weight[p];
    }
}

// Deterministic pseudo-random values in [-scale, scale] (benchmark weights, filled on the
// device: DeepSeek-V3's 256 experts of one layer are 22.5 GB in bf16).
__device__ __forceinline__ float hash_uniform(unsigned long long i, unsigned int seed) {
    unsigned long long x = i * 0x9E3779B97F4A7C15ull + seed;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (float)(x >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
}

extern "C" __global__ void fill_uniform_bf16(bf16_t* out, long long n, unsigned int seed,
                                             float scale) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16(hash_uniform(i, seed) * scale); }
}

extern "C" __global__ void fill_uniform_f32(float* out, long long n, unsigned int seed,
                                            float scale) {
    GRID_STRIDE(i, n) { out[i] = hash_uniform(i, seed) * scale; }
}
