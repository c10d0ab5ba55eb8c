// What NVRTC gives kernels.cu and a host C++ compiler does not: the execution-space keywords,
// the thread coordinates, the barrier and the intrinsics the source uses. Each emulated CUDA
// thread is a fiber (runtime.cpp); a block's fibers run on one OS thread, so a `__shared__`
// variable is a thread-local static there: one per block in flight, as on the device.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
// Aligned as CUDA's vector types are: a load through a pointer that is not is a fault on the
// device, and here a misaligned-address error (build.rs's alignment check, runtime.cpp).
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

void emu_syncthreads();

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __syncthreads() emu_syncthreads()

using std::exp;
using std::sqrt;

inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline int __float_as_int(float x) { return (int)__float_as_uint(x); }
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }
inline long long __double_as_longlong(double x) {
    long long u;
    std::memcpy(&u, &x, 8);
    return u;
}
inline double __longlong_as_double(long long u) {
    double x;
    std::memcpy(&x, &u, 8);
    return x;
}
// Correctly rounded, as the device's `_rn` intrinsics, which the device never fuses with
// their neighbours: kernels are compiled with contraction on (as NVRTC's default --fmad=true
// contracts a plain `a * b + c`), so these stay out of line, where no multiply can fuse with
// the add that uses it.
#define EMU_RN __attribute__((noinline))
EMU_RN inline double __dadd_rn(double a, double b) { return a + b; }
EMU_RN inline double __dsub_rn(double a, double b) { return a - b; }
EMU_RN inline double __dmul_rn(double a, double b) { return a * b; }
EMU_RN inline double __ddiv_rn(double a, double b) { return a / b; }
EMU_RN inline float __fadd_rn(float a, float b) { return a + b; }
EMU_RN inline float __fsub_rn(float a, float b) { return a - b; }
EMU_RN inline float __fmul_rn(float a, float b) { return a * b; }
EMU_RN inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

// CUDA's overloads: the wider type of the two for integers, IEEE min/max for floats.
template <typename A, typename B>
inline auto min(A a, B b) -> decltype(a + b) {
    return b < a ? (decltype(a + b))b : (decltype(a + b))a;
}
template <typename A, typename B>
inline auto max(A a, B b) -> decltype(a + b) {
    return a < b ? (decltype(a + b))b : (decltype(a + b))a;
}

// Warp-wide calls over a block whose threads take turns: each thread publishes its value, the
// block meets at a barrier, each reads its warp's values, and the block meets again before
// values are published anew. So, like mma_bf16_16816 below, they serve kernels that make
// every warp-wide call in every thread of the block the same number of times (the launcher
// reports a block whose threads reach different barrier counts); the lanes named in `mask`
// must be all 32, as the kernels pass. `__syncwarp` is a block barrier here: stronger than
// the device's, which orders a warp's lanes only.
inline unsigned int emu_thread_rank() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
inline void __syncwarp(unsigned int = 0xffffffffu) { emu_syncthreads(); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline unsigned int __match_any_sync(unsigned int, unsigned int value) {
    static thread_local unsigned int published[1024];
    const unsigned int tid = emu_thread_rank(), warp0 = tid / 32 * 32;
    const unsigned int threads = blockDim.x * blockDim.y * blockDim.z;
    published[tid] = value;
    emu_syncthreads();
    unsigned int same = 0;
    for (unsigned int lane = 0; lane < 32 && warp0 + lane < threads; ++lane) {
        if (published[warp0 + lane] == value) same |= 1u << lane;
    }
    emu_syncthreads();
    return same;
}
inline unsigned int __shfl_up_sync(unsigned int, unsigned int value, unsigned int delta) {
    static thread_local unsigned int published[1024];
    const unsigned int tid = emu_thread_rank(), lane = tid % 32;
    published[tid] = value;
    emu_syncthreads();
    const unsigned int got = lane >= delta ? published[tid - delta] : value;
    emu_syncthreads();
    return got;
}

// mma.m16n8k16 over a warp (bf16 inputs, f32 accumulation), in place of the inline PTX of
// kernels.cu's mma_bf16_16816, whose fragment layout it reads: each thread publishes its
// fragments, the block meets at a barrier (the kernels that use it run the same steps in
// every warp), each thread computes its own four outputs from its warp's fragments, products
// exact and summed in k order (a tensor core's order of summation is its own), and the block
// meets again before the fragments are published anew.
#define MOE_EMULATED_MMA
struct EmuMmaFragments {
    unsigned int a[4];
    unsigned int b[2];
};
inline float emu_bf16_half(unsigned int reg, bool upper) {
    return __uint_as_float((upper ? reg >> 16 : reg & 0xffffu) << 16);
}
inline void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    static thread_local EmuMmaFragments published[1024];
    const unsigned int tid =
        threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    for (int i = 0; i < 4; ++i) published[tid].a[i] = a[i];
    for (int i = 0; i < 2; ++i) published[tid].b[i] = b[i];
    emu_syncthreads();
    const unsigned int warp0 = tid / 32 * 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    // A(m, k): lane (m % 8) * 4 + (k % 8) / 2, register (m >= 8) + 2 (k >= 8).
    auto a_at = [&](int m, int k) {
        const EmuMmaFragments& f = published[warp0 + (m % 8) * 4 + (k % 8) / 2];
        return emu_bf16_half(f.a[(m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], (k & 1) != 0);
    };
    // B(k, n): lane n * 4 + (k % 8) / 2, register (k >= 8).
    auto b_at = [&](int k, int n) {
        const EmuMmaFragments& f = published[warp0 + n * 4 + (k % 8) / 2];
        return emu_bf16_half(f.b[k >= 8 ? 1 : 0], (k & 1) != 0);
    };
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int m = (int)g + (i >= 2 ? 8 : 0), n = 2 * (int)t + (i & 1);
        float sum = d[i];
        for (int k = 0; k < 16; ++k) sum = std::fma(a_at(m, k), b_at(k, n), sum);
        out[i] = sum;
    }
    emu_syncthreads();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}
