// Element-wise kernels of the expert FFN on CUDA, compiled at start-up with NVRTC
// (model/src/gpu/kernels.rs). bf16 is handled as its bit pattern (unsigned short), so the
// source needs no CUDA header and compiles the same with every toolkit.
//
// Indices are `long long`: DeepSeek-V3 shapes at 8192 tokens x top-8 give 65536 x 7168
// elements, more than an int holds. Kernels over rows take a block per row (`ROW_STRIDE`);
// the others are grid-stride loops over elements.

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

// x as hi + lo, both bf16 (the bf16x2 mode): a GEMM over each, summed in f32, keeps about 16
// significant bits of x instead of 8.
__device__ __forceinline__ void f32_to_bf16x2(float x, bf16_t* hi, bf16_t* lo) {
    bf16_t h = f32_to_bf16(x);
    *hi = h;
    *lo = f32_to_bf16(x - bf16_to_f32(h));
}

__device__ __forceinline__ float silu(float x) {
    return x / (1.0f + expf(-x));
}

#define GRID_STRIDE(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (long long)gridDim.x * blockDim.x)

// One block per row (striding over the rows when there are more than the grid), its threads
// across the row's columns: the hot expert-FFN kernels below move ~4 GB per DeepSeek-V3 layer at
// 8192 tokens, and a 64-bit division per element to find the row made them cost a third of
// the GEMMs' time. Launched with `row_grid` (kernels.rs).
#define ROW_STRIDE(r, rows) for (long long r = blockIdx.x; r < (rows); r += gridDim.x)
#define COLUMN_STRIDE(c, width) for (int c = threadIdx.x; c < (width); c += blockDim.x)

// out[s, :] = rows[index[s], :]: the rows of each expert's pairs, contiguous, in GEMM dtype.
extern "C" __global__ void gather_rows_bf16(const float* rows, const unsigned int* index, bf16_t* out,
                                            int slots, int hidden) {
    ROW_STRIDE(s, slots) {
        const float* src = rows + (long long)index[s] * hidden;
        bf16_t* dst = out + s * hidden;
        COLUMN_STRIDE(c, hidden) { dst[c] = f32_to_bf16(src[c]); }
    }
}

// Rows already rounded to bf16 (received so from a router that rounds as f32_to_bf16 does),
// gathered as they are into a bf16 GEMM input.
extern "C" __global__ void gather_bf16_rows(const bf16_t* rows, const unsigned int* index,
                                            bf16_t* out, int slots, int hidden) {
    ROW_STRIDE(s, slots) {
        const bf16_t* src = rows + (long long)index[s] * hidden;
        bf16_t* dst = out + s * hidden;
        COLUMN_STRIDE(c, hidden) { dst[c] = src[c]; }
    }
}

extern "C" __global__ void gather_rows_f32(const float* rows, const unsigned int* index, float* out,
                                           int slots, int hidden) {
    ROW_STRIDE(s, slots) {
        const float* src = rows + (long long)index[s] * hidden;
        float* dst = out + s * hidden;
        COLUMN_STRIDE(c, hidden) { dst[c] = src[c]; }
    }
}

extern "C" __global__ void gather_rows_bf16x2(const float* rows, const unsigned int* index,
                                              bf16_t* hi, bf16_t* lo, int slots, int hidden) {
    ROW_STRIDE(s, slots) {
        const float* src = rows + (long long)index[s] * hidden;
        long long base = s * hidden;
        COLUMN_STRIDE(c, hidden) { f32_to_bf16x2(src[c], hi + base + c, lo + base + c); }
    }
}

// out[r, :] = table[ids[r], :] in f32: the embedding lookup from a bf16 table (an f32 table
// uses gather_rows_f32).
extern "C" __global__ void embed_rows_bf16(const bf16_t* table, const unsigned int* ids,
                                           float* out, int rows, int width) {
    ROW_STRIDE(r, rows) {
        const bf16_t* src = table + (long long)ids[r] * width;
        float* dst = out + r * width;
        COLUMN_STRIDE(c, width) { dst[c] = bf16_to_f32(src[c]); }
    }
}

// act[s, j] = silu(gate_up[s, j]) * gate_up[s, inter + j]  (gate rows, then up rows).
extern "C" __global__ void silu_mul_bf16(const float* gate_up, bf16_t* act, int slots,
                                         int inter) {
    ROW_STRIDE(s, slots) {
        const float* row = gate_up + s * 2 * inter;
        bf16_t* dst = act + s * inter;
        COLUMN_STRIDE(j, inter) { dst[j] = f32_to_bf16(silu(row[j]) * row[inter + j]); }
    }
}

extern "C" __global__ void silu_mul_bf16x2(const float* gate_up, bf16_t* hi, bf16_t* lo,
                                           int slots, int inter) {
    ROW_STRIDE(s, slots) {
        const float* row = gate_up + s * 2 * inter;
        long long base = s * inter;
        COLUMN_STRIDE(j, inter) {
            f32_to_bf16x2(silu(row[j]) * row[inter + j], hi + base + j, lo + base + j);
        }
    }
}

extern "C" __global__ void silu_mul_f32(const float* gate_up, float* act, int slots, int inter) {
    ROW_STRIDE(s, slots) {
        const float* row = gate_up + s * 2 * inter;
        float* dst = act + s * inter;
        COLUMN_STRIDE(j, inter) { dst[j] = silu(row[j]) * row[inter + j]; }
    }
}

// out[r] = the index of row r's largest value, the lowest on a tie, as the host's argmax scans
// (ops::argmax): a NaN first value wins, a later NaN never does. A block per row (256
// threads: `row_grid`), each thread over its columns in ascending order, then a tree whose
// ties go to the lower index. A greedy pick on the device: one id crosses instead of a row.
extern "C" __global__ void argmax_rows(const float* x, int rows, int width, unsigned int* out) {
    __shared__ float best_value[256];
    __shared__ int best_index[256];
    ROW_STRIDE(r, rows) {
        const float* row = x + r * width;
        float v = 0.0f;
        int i = -1;  // none yet
        COLUMN_STRIDE(c, width) {
            float value = row[c];
            if (value != value) continue;
            if (i < 0 || value > v) { v = value; i = c; }
        }
        best_value[threadIdx.x] = v;
        best_index[threadIdx.x] = i;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) {
                float other = best_value[threadIdx.x + half];
                int other_i = best_index[threadIdx.x + half];
                float mine = best_value[threadIdx.x];
                int mine_i = best_index[threadIdx.x];
                bool take = other_i >= 0 &&
                            (mine_i < 0 || other > mine || (other == mine && other_i < mine_i));
                if (take) {
                    best_value[threadIdx.x] = other;
                    best_index[threadIdx.x] = other_i;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            float first = row[0];
            out[r] = (first != first || best_index[0] < 0) ? 0u : (unsigned int)best_index[0];
        }
        __syncthreads();
    }
}

// The race (race.rs): a draw from softmax(logits / T) as the best score logit / T - ln(-ln(u)),
// u from an integer hash of (key, token id), the lowest id on a tie, a NaN or -inf logit never
// drawn (0 when no token can be). Every floating-point operation is a correctly rounded
// intrinsic (__dadd_rn, __dmul_rn, __ddiv_rn; no fma, as on the host), so the compiler fuses
// and reorders nothing and each score is the host's to the bit; the constants are written as the host's
// bits (race.rs checks that they are). A block per race: the sampled id crosses, not the row.
__device__ __forceinline__ unsigned long long race_mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// race.rs's ln: x = m 2^e, m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m - 1) / (m + 1)).
__device__ double race_ln(double x) {
    // RACE_CONSTANTS: 1/3 .. 1/23, sqrt(2), ln2 high and low.
    const unsigned long long series_bits[11] = {
        0x3fd5555555555555ULL, 0x3fc999999999999aULL, 0x3fc2492492492492ULL,
        0x3fbc71c71c71c71cULL, 0x3fb745d1745d1746ULL, 0x3fb3b13b13b13b14ULL,
        0x3fb1111111111111ULL, 0x3fae1e1e1e1e1e1eULL, 0x3faaf286bca1af28ULL,
        0x3fa8618618618618ULL, 0x3fa642c8590b2164ULL};
    const double sqrt2 = __longlong_as_double(0x3ff6a09e667f3bcdLL);
    const double ln2_hi = __longlong_as_double(0x3fe62e42fee00000LL);
    const double ln2_lo = __longlong_as_double(0x3dea39ef35793c76LL);
    unsigned long long bits = (unsigned long long)__double_as_longlong(x);
    long long e = (long long)((bits >> 52) & 0x7ffULL) - 1023;
    double m = __longlong_as_double((long long)((bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL));
    if (m > sqrt2) {
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    double s = __ddiv_rn(__dadd_rn(m, -1.0), __dadd_rn(m, 1.0));
    double z = __dmul_rn(s, s);
    double series = __longlong_as_double((long long)series_bits[10]);
    for (int i = 9; i >= 0; --i)
        series = __dadd_rn(__dmul_rn(series, z), __longlong_as_double((long long)series_bits[i]));
    double two_s = __dmul_rn(2.0, s);
    double ln_m = __dadd_rn(__dmul_rn(__dmul_rn(two_s, z), series), two_s);
    double ed = (double)e;
    return __dadd_rn(__dmul_rn(ed, ln2_hi), __dadd_rn(__dmul_rn(ed, ln2_lo), ln_m));
}

// nucleus.rs's exp, for x <= 0: x = k ln 2 + r (k the nearest integer), Taylor's series of exp(r) to r^13, times 2^k in
// two normal halves; 0 below -745 and for NaN.
__device__ double nucleus_exp(double x) {
    // NUCLEUS_CONSTANTS: 1/2! .. 1/13!, 1 / ln 2.
    const unsigned long long series_bits[12] = {
        0x3fe0000000000000ULL, 0x3fc5555555555555ULL, 0x3fa5555555555555ULL,
        0x3f81111111111111ULL, 0x3f56c16c16c16c17ULL, 0x3f2a01a01a01a01aULL,
        0x3efa01a01a01a01aULL, 0x3ec71de3a556c734ULL, 0x3e927e4fb7789f5cULL,
        0x3e5ae64567f544e4ULL, 0x3e21eed8eff8d898ULL, 0x3de6124613a86d09ULL};
    const double inv_ln2 = __longlong_as_double(0x3ff71547652b82feLL);
    const double ln2_hi = __longlong_as_double(0x3fe62e42fee00000LL);
    const double ln2_lo = __longlong_as_double(0x3dea39ef35793c76LL);
    if (!(x >= -745.0)) return 0.0;
    // Round to the nearest integer by adding and subtracting 1.5 * 2^52, as the host does.
    const double rounding = 6755399441055744.0;
    double k = __dsub_rn(__dadd_rn(__dmul_rn(x, inv_ln2), rounding), rounding);
    double r = __dsub_rn(__dsub_rn(x, __dmul_rn(k, ln2_hi)), __dmul_rn(k, ln2_lo));
    double p = __longlong_as_double((long long)series_bits[11]);
    for (int i = 10; i >= 0; --i)
        p = __dadd_rn(__dmul_rn(p, r), __longlong_as_double((long long)series_bits[i]));
    p = __dadd_rn(__dmul_rn(__dadd_rn(__dmul_rn(p, r), 1.0), r), 1.0);
    long long ki = (long long)k;
    long long half = ki / 2;
    double a = __longlong_as_double((long long)((unsigned long long)(half + 1023) << 52));
    double b = __longlong_as_double((long long)((unsigned long long)(ki - half + 1023) << 52));
    return __dmul_rn(__dmul_rn(p, a), b);
}

// f32's total order as unsigned keys (NaN aside), and back.
__device__ __forceinline__ unsigned int float_order_key(float f) {
    unsigned int bits = __float_as_uint(f);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float float_of_order_key(unsigned int key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The weight of the drawable logits >= threshold, in nucleus.rs's fixed order: lane = thread
// (256 of them), ids ascending in each, then lanes added pairwise. Every thread gets it.
__device__ double nucleus_mass(const float* row, int width, float max, double t, float threshold,
                               double* lanes) {
    const float neg_inf = __int_as_float((int)0xff800000u);
    double acc = 0.0;
    COLUMN_STRIDE(c, width) {
        float l = row[c];
        if (l != l || l == neg_inf || !(l >= threshold)) continue;
        acc = __dadd_rn(acc, nucleus_exp(__ddiv_rn(__dsub_rn((double)l, (double)max), t)));
    }
    lanes[threadIdx.x] = acc;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) lanes[threadIdx.x] = __dadd_rn(lanes[threadIdx.x], lanes[threadIdx.x + half]);
        __syncthreads();
    }
    double total = lanes[0];
    __syncthreads();
    return total;
}

// A synthetic checkpoint's FP8 codes generated where they will lie (checkpoint/synthetic.rs,
// fill_fp8_codes): element i is byte i % 8 of the hash of (key, i / 8), its sign and mantissa
// kept and its exponent made 2^-3..2^0 (never NaN, never subnormal).
extern "C" __global__ void synthetic_e4m3(unsigned char* out, long long n, unsigned long long key) {
    GRID_STRIDE(i, n) {
        const unsigned long long bits =
            race_mix64(key + (unsigned long long)(i >> 3) * 0x9e3779b97f4a7c15ULL);
        const unsigned int b = (unsigned int)(bits >> (8 * (i & 7))) & 0xffu;
        out[i] = (unsigned char)((b & 0x80u) | ((4u + ((b >> 3) & 3u)) << 3) | (b & 7u));
    }
}

// A grammar's mask on the rows the device keeps (token_mask.rs, TokenMask::apply): a block per
// masked row, its threads across the columns; `words` holds `words_per_row` words of bits per
// masked row (bits past a mask are clear), and a token whose bit is clear becomes -inf.
extern "C" __global__ void mask_logit_rows(float* x, int width, int masked, const unsigned int* rows,
                                           const unsigned int* words, int words_per_row) {
    ROW_STRIDE(m, masked) {
        float* row = x + (long long)rows[m] * width;
        const unsigned int* bits = words + m * words_per_row;
        COLUMN_STRIDE(c, width) {
            if (((bits[c >> 5] >> (c & 31)) & 1u) == 0u) row[c] = __int_as_float((int)0xff800000u);
        }
    }
}

// A request's logit adjustments (logit_adjust.rs, TokenEdit::apply) on the rows the device
// keeps: a thread per edited logit, each (row, id) named once; `index` holds (row, id, flags)
// and `values` (bias, penalty, repetition) per edit. Each step is one correctly rounded f32
// operation, as on the host: hidden (-inf), biased, the repetition penalty (a positive logit
// divided, another multiplied), the frequency and presence penalty subtracted.
extern "C" __global__ void edit_logit_rows(float* x, int width, int edits, const unsigned int* index,
                                           const float* values) {
    GRID_STRIDE(e, edits) {
        const unsigned int row = index[3 * e], id = index[3 * e + 1], flags = index[3 * e + 2];
        float* at = x + (long long)row * width + id;
        float v = *at;
        if (flags & 1u) v = __int_as_float((int)0xff800000u);
        if (flags & 2u) v = __fadd_rn(v, values[3 * e]);
        if (flags & 4u) {
            const float r = values[3 * e + 2];
            v = v > 0.0f ? __fdiv_rn(v, r) : __fmul_rn(v, r);
        }
        if (flags & 8u) v = __fsub_rn(v, values[3 * e + 1]);
        *at = v;
    }
}

// A block per race; with min_p > 0 the race is among the tokens at least the min-p cut
// (`max + T ln(min_p)`, nucleus.rs's min_p_cut); with top_p < 1, among their nucleus: logits
// >= its floor, the largest value whose logits weigh top_p of the kept ones (nucleus.rs),
// found by bisecting f32 keys. Launched with 256 threads (`row_grid`): the summation order is
// the host's.
extern "C" __global__ void race_rows(const float* x, int width, int races, const unsigned int* rows,
                                     const float* temperatures, const float* top_ps,
                                     const float* min_ps, const unsigned long long* keys,
                                     unsigned int* out) {
    __shared__ double best_score[256];
    __shared__ int best_index[256];
    __shared__ float low_value[256];
    __shared__ float high_value[256];
    const float neg_inf = __int_as_float((int)0xff800000u);
    const float pos_inf = __int_as_float(0x7f800000);
    const double neg_inf_d = __longlong_as_double((long long)0xfff0000000000000ULL);
    ROW_STRIDE(r, races) {
        const float* row = x + (long long)rows[r] * width;
        const double t = (double)temperatures[r];
        const float top_p = top_ps[r];
        const float min_p = min_ps[r];
        const unsigned long long key = keys[r];
        float floor_value = neg_inf;
        if (top_p < 1.0f || min_p > 0.0f) {
            // The drawable logits' largest and smallest.
            float high = neg_inf, low = 0.0f;
            int any = 0;
            COLUMN_STRIDE(c, width) {
                float l = row[c];
                if (l != l || l == neg_inf) continue;
                if (!any || l > high) high = l;
                if (!any || l < low) low = l;
                any = 1;
            }
            high_value[threadIdx.x] = any ? high : neg_inf;
            low_value[threadIdx.x] = any ? low : pos_inf;
            __syncthreads();
            for (int half = blockDim.x / 2; half > 0; half >>= 1) {
                if (threadIdx.x < half) {
                    high_value[threadIdx.x] = fmaxf(high_value[threadIdx.x], high_value[threadIdx.x + half]);
                    low_value[threadIdx.x] = fminf(low_value[threadIdx.x], low_value[threadIdx.x + half]);
                }
                __syncthreads();
            }
            const float max = high_value[0];
            float min = low_value[0];
            __syncthreads();
            if (max == neg_inf) {
                if (threadIdx.x == 0) out[r] = 0u;
                continue;
            }
            if (min_p > 0.0f) {
                // The smallest logit at least the cut (max itself always is).
                const double cut = __dadd_rn((double)max, __dmul_rn(t, race_ln((double)min_p)));
                float kept_low = pos_inf;
                COLUMN_STRIDE(c, width) {
                    float l = row[c];
                    if (l != l || l == neg_inf || !((double)l >= cut)) continue;
                    kept_low = fminf(kept_low, l);
                }
                low_value[threadIdx.x] = kept_low;
                __syncthreads();
                for (int half = blockDim.x / 2; half > 0; half >>= 1) {
                    if (threadIdx.x < half)
                        low_value[threadIdx.x] = fminf(low_value[threadIdx.x], low_value[threadIdx.x + half]);
                    __syncthreads();
                }
                min = low_value[0];
                floor_value = min;
                __syncthreads();
            }
            if (top_p < 1.0f) {
                const double target =
                    __dmul_rn((double)top_p, nucleus_mass(row, width, max, t, floor_value, best_score));
                unsigned int lo = float_order_key(min), hi = float_order_key(max);
                while (lo < hi) {
                    unsigned int mid = lo + (hi - lo + 1u) / 2u;
                    if (nucleus_mass(row, width, max, t, float_of_order_key(mid), best_score) >= target) lo = mid;
                    else hi = mid - 1u;
                }
                floor_value = float_of_order_key(lo);
            }
        }
        double best = 0.0;
        int i = -1;  // none yet
        COLUMN_STRIDE(c, width) {
            float logit = row[c];
            if (logit != logit || logit == neg_inf || logit < floor_value) continue;
            unsigned long long h = race_mix64(key + (unsigned long long)(c + 1) * 0x9e3779b97f4a7c15ULL);
            double u = __dmul_rn(__dadd_rn((double)(h >> 12), 0.5), __longlong_as_double(0x3cb0000000000000LL));
            double noise = -race_ln(-race_ln(u));
            double score = __dadd_rn(__ddiv_rn((double)logit, t), noise);
            if (score > neg_inf_d && (i < 0 || score > best)) {
                best = score;
                i = c;
            }
        }
        best_score[threadIdx.x] = best;
        best_index[threadIdx.x] = i;
        __syncthreads();
        for (int half = blockDim.x / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) {
                double other = best_score[threadIdx.x + half];
                int other_i = best_index[threadIdx.x + half];
                double mine = best_score[threadIdx.x];
                int mine_i = best_index[threadIdx.x];
                bool take = other_i >= 0 &&
                            (mine_i < 0 || other > mine || (other == mine && other_i < mine_i));
                if (take) {
                    best_score[threadIdx.x] = other;
                    best_index[threadIdx.x] = other_i;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) out[r] = best_index[0] < 0 ? 0u : (unsigned int)best_index[0];
        __syncthreads();
    }
}

// The k best-ranked values of each row and their indices, ranked as the host's sampler ranks
// them (sampling::ranked_top_k): by f32's total order (a positive NaN above +inf, -0 below +0),
// largest first, the lower index first on a tie. Each value's rank is one u64 (the order-
// preserving key of its bits, then the complement of its index), so pass j takes the largest
// rank below pass j-1's: k block-wide maxima, no sort and no scratch. A block per row.
__device__ __forceinline__ unsigned long long total_order_rank(float value, int index) {
    unsigned int bits = __float_as_uint(value);
    unsigned int key = bits ^ ((unsigned int)((int)bits >> 31) | 0x80000000u);
    return ((unsigned long long)key << 32) | (unsigned long long)(0xFFFFFFFFu - (unsigned int)index);
}

extern "C" __global__ void ranked_top_k_rows(const float* x, int rows, int width, int k,
                                             unsigned int* ids, float* values) {
    __shared__ unsigned long long best[256];
    ROW_STRIDE(r, rows) {
        const float* row = x + r * width;
        unsigned long long bound = 0;
        for (int j = 0; j < k; ++j) {
            unsigned long long mine = 0;
            bool any = false;
            COLUMN_STRIDE(c, width) {
                unsigned long long rank = total_order_rank(row[c], c);
                if ((j == 0 || rank < bound) && (!any || rank > mine)) {
                    mine = rank;
                    any = true;
                }
            }
            // 0 is below every rank a column can have (index < 2^32 - 1), so it marks "none".
            best[threadIdx.x] = any ? mine : 0;
            __syncthreads();
            for (int half = blockDim.x / 2; half > 0; half >>= 1) {
                if (threadIdx.x < half && best[threadIdx.x + half] > best[threadIdx.x]) {
                    best[threadIdx.x] = best[threadIdx.x + half];
                }
                __syncthreads();
            }
            bound = best[0];
            if (threadIdx.x == 0) {
                int index = (int)(0xFFFFFFFFu - (unsigned int)(bound & 0xFFFFFFFFull));
                ids[r * k + j] = (unsigned int)index;
                values[r * k + j] = row[index];
            }
            __syncthreads();
        }
    }
}

// dst[index[s], :] = src[s, :]: a node's outputs placed in the layer's pair order (the router's
// device-resident dispatch; every destination row is some node's, so none is read first).
extern "C" __global__ void place_rows_f32(const float* src, const unsigned int* index, float* dst,
                                          int rows, int hidden) {
    ROW_STRIDE(s, rows) {
        const float* from = src + s * hidden;
        float* to = dst + (long long)index[s] * hidden;
        COLUMN_STRIDE(c, hidden) { to[c] = from[c]; }
    }
}

// pair_out[pair[s], :] = out[s, :] * weight[pair[s]]: back from expert order to pair order.
extern "C" __global__ void scatter_weighted(const float* out, const unsigned int* pair,
                                            const float* weight, float* pair_out, int slots,
                                            int hidden) {
    ROW_STRIDE(s, slots) {
        unsigned int p = pair[s];
        float w = weight[p];
        const float* src = out + s * hidden;
        float* dst = pair_out + (long long)p * hidden;
        COLUMN_STRIDE(c, hidden) { dst[c] = src[c] * w; }
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

// Finite e4m3 bytes (benchmark FP8 weights): a byte from the same hash, NaN (x111 1111) moved
// to the largest finite magnitude.
extern "C" __global__ void fill_e4m3(unsigned char* out, long long n, unsigned int seed) {
    GRID_STRIDE(i, n) {
        unsigned char b = (unsigned char)((hash_uniform(i, seed) + 1.0f) * 127.99f);
        out[i] = (b & 0x7f) == 0x7f ? (unsigned char)(b ^ 1) : b;
    }
}

// ---------------------------------------------------------------------------------------------
// The router's dense part (model/src/gpu/dense_ops.rs). Views: element (r, h, c) of a
// [rows, heads, width] block is at offset + r * row_stride + h * head_stride + c.

// -inf without math.h (the source compiles with no CUDA header).
#define NEG_INF __int_as_float((int)0xff800000u)

extern "C" __global__ void convert_f32_to_bf16(const float* x, bf16_t* out, long long n) {
    GRID_STRIDE(i, n) { out[i] = f32_to_bf16(x[i]); }
}

extern "C" __global__ void convert_f32_to_bf16x2(const float* x, bf16_t* hi, bf16_t* lo,
                                                 long long n) {
    GRID_STRIDE(i, n) { f32_to_bf16x2(x[i], hi + i, lo + i); }
}

extern "C" __global__ void add_f32(float* acc, const float* x, long long n) {
    GRID_STRIDE(i, n) { acc[i] += x[i]; }
}

// A projection's bias on every row: acc[i] += bias[i % width].
extern "C" __global__ void add_bias_rows(float* acc, const float* bias, long long n, int width) {
    GRID_STRIDE(i, n) { acc[i] += bias[i % width]; }
}

#define NORM_THREADS 256

// One block per (row, head): x * rsqrt(mean(x^2) + eps) * weight, reduced in a fixed tree.
extern "C" __global__ void rms_norm_heads(const float* x, long long x_offset, int x_row_stride,
                                          int x_head_stride, const float* weight, float* out,
                                          long long out_offset, int out_row_stride,
                                          int out_head_stride, int rows, int heads, int width,
                                          float eps) {
    __shared__ float partial[NORM_THREADS];
    long long item = blockIdx.x;
    if (item >= (long long)rows * heads) return;
    long long r = item / heads, h = item - (item / heads) * heads;
    const float* v = x + x_offset + r * x_row_stride + h * x_head_stride;
    float* o = out + out_offset + r * out_row_stride + h * out_head_stride;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) sum += v[c] * v[c];
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    float inv = 1.0f / sqrtf(partial[0] / (float)width + eps);
    for (int c = threadIdx.x; c < width; c += blockDim.x) o[c] = v[c] * inv * weight[c];
}

// Rotary embedding, out of place, of every (row, head) vector of 2 * half values; cos/sin are
// [rows, half]. Interleaved input (DeepSeek) is read as pairs (2i, 2i+1); output is halves.
extern "C" __global__ void rope_heads(const float* x, long long x_offset, int x_row_stride,
                                      int x_head_stride, float* out, long long out_offset,
                                      int out_row_stride, int out_head_stride, const float* cos_t,
                                      const float* sin_t, int rows, int heads, int half,
                                      int interleaved, int width) {
    // Per head, threads j < half turn a pair; the others copy value half + j (the head's
    // values past 2 * half, which GLM's partial rotary leaves as they are).
    const long long per_head = width - half;
    GRID_STRIDE(i, (long long)rows * heads * per_head) {
        long long r = i / ((long long)heads * per_head);
        long long rest = i - r * heads * per_head;
        long long h = rest / per_head;
        long long j = rest - h * per_head;
        const float* v = x + x_offset + r * x_row_stride + h * x_head_stride;
        float* o = out + out_offset + r * out_row_stride + h * out_head_stride;
        if (j >= half) {
            o[half + j] = v[half + j];
            continue;
        }
        float x1 = interleaved ? v[2 * j] : v[j];
        float x2 = interleaved ? v[2 * j + 1] : v[half + j];
        float c = cos_t[r * half + j], s = sin_t[r * half + j];
        o[j] = x1 * c - x2 * s;
        o[half + j] = x2 * c + x1 * s;
    }
}

// Row r of src (width values) to caches[row_seq[r]] at row_pos[r] * cache_stride + offset.
// Where a sequence's cached position `pos` lies in the KV pool (device_dense/ops.rs,
// `CacheBlocks::locate`): row pos % block_tokens of block table[start + pos / block_tokens],
// in its chunk (chunk_blocks blocks of block_tokens rows, rows `stride` floats apart).
__device__ __forceinline__ float* cache_row(const unsigned long long* chunks,
                                            const unsigned int* table, unsigned int start,
                                            long long pos, int block_tokens, int chunk_blocks,
                                            int stride) {
    const unsigned int block = table[start + pos / block_tokens];
    const long long row =
        (long long)(block % chunk_blocks) * block_tokens + pos % block_tokens;
    return (float*)chunks[block / chunk_blocks] + row * stride;
}

extern "C" __global__ void append_rows(const float* src, long long src_offset, int src_row_stride,
                                       int width, const unsigned long long* chunks,
                                       const unsigned int* table,
                                       const unsigned int* table_start, int block_tokens,
                                       int chunk_blocks, int cache_stride, int cache_offset,
                                       const unsigned int* row_seq, const unsigned int* row_pos,
                                       int rows) {
    GRID_STRIDE(i, (long long)rows * width) {
        long long r = i / width;
        long long c = i - r * width;
        float* row = cache_row(chunks, table, table_start[row_seq[r]], row_pos[r], block_tokens,
                               chunk_blocks, cache_stride);
        row[cache_offset + c] = src[src_offset + r * src_row_stride + c];
    }
}

#define ATT_THREADS 128
#define ATT_MAX_OUT_PER_THREAD 8

// One block per (row, query head): causal attention over the row's own sequence up to its own
// position, in tiles of ATT_THREADS cached tokens with a running max (online softmax). Every
// sum runs in a fixed order, so a row's result does not depend on its batch-mates.
// q: [rows, heads, dk]; out: [rows, heads, dv] (dv <= ATT_THREADS * ATT_MAX_OUT_PER_THREAD).
extern "C" __global__ void attention_rows(const float* q, const unsigned long long* key_chunks,
                                          const unsigned long long* value_chunks,
                                          const unsigned int* table,
                                          const unsigned int* table_start, int block_tokens,
                                          int chunk_blocks, const unsigned int* row_seq,
                                          const unsigned int* row_pos, float* out, int rows,
                                          int heads, int kv_heads, int dk, int dv, int key_stride,
                                          int value_stride, int key_head_stride,
                                          int value_head_stride, float scale) {
    __shared__ float weights[ATT_THREADS];
    __shared__ float reduce[ATT_THREADS];
    long long item = blockIdx.x;
    if (item >= (long long)rows * heads) return;
    int r = (int)(item / heads);
    int h = (int)(item - (long long)r * heads);
    int kvh = h / (heads / kv_heads);
    const float* qh = q + item * dk;
    const unsigned int start = table_start[row_seq[r]];
    const long long key_head = (long long)kvh * key_head_stride;
    const long long value_head = (long long)kvh * value_head_stride;
    int visible = (int)row_pos[r] + 1;
    float acc[ATT_MAX_OUT_PER_THREAD];
    for (int k = 0; k < ATT_MAX_OUT_PER_THREAD; k++) acc[k] = 0.0f;
    float running_max = NEG_INF, running_sum = 0.0f;
    for (int base = 0; base < visible; base += ATT_THREADS) {
        int j = base + threadIdx.x;
        float score = NEG_INF;
        if (j < visible) {
            const float* k = cache_row(key_chunks, table, start, j, block_tokens, chunk_blocks,
                                       key_stride) + key_head;
            float dot = 0.0f;
            for (int c = 0; c < dk; c++) dot += qh[c] * k[c];
            score = dot * scale;
        }
        reduce[threadIdx.x] = score;
        __syncthreads();
        for (int s = ATT_THREADS / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) reduce[threadIdx.x] = fmaxf(reduce[threadIdx.x], reduce[threadIdx.x + s]);
            __syncthreads();
        }
        float new_max = fmaxf(running_max, reduce[0]);
        float correction = expf(running_max - new_max);
        __syncthreads();
        float p = (j < visible) ? expf(score - new_max) : 0.0f;
        weights[threadIdx.x] = p;
        reduce[threadIdx.x] = p;
        __syncthreads();
        for (int s = ATT_THREADS / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) reduce[threadIdx.x] += reduce[threadIdx.x + s];
            __syncthreads();
        }
        running_sum = running_sum * correction + reduce[0];
        int tile = min(ATT_THREADS, visible - base);
        for (int k = 0; k < ATT_MAX_OUT_PER_THREAD; k++) {
            int c = threadIdx.x + k * ATT_THREADS;
            if (c >= dv) break;
            float a = acc[k] * correction;
            for (int t = 0; t < tile; t++) {
                const float* v = cache_row(value_chunks, table, start, base + t, block_tokens,
                                           chunk_blocks, value_stride) + value_head;
                a += weights[t] * v[c];
            }
            acc[k] = a;
        }
        running_max = new_max;
        __syncthreads();
    }
    float inv = 1.0f / running_sum;
    for (int k = 0; k < ATT_MAX_OUT_PER_THREAD; k++) {
        int c = threadIdx.x + k * ATT_THREADS;
        if (c >= dv) break;
        out[item * dv + c] = acc[k] * inv;
    }
}

// Index of the largest of values[0..n) not yet taken (taken[i] != 0); ties go to the lower
// index, as the CPU gate's sort does.
__device__ int argmax_free(const float* values, const unsigned char* taken, int n) {
    int best = -1;
    for (int i = 0; i < n; i++) {
        if (taken[i]) continue;
        if (best < 0 || values[i] > values[best]) best = i;
    }
    return best;
}

// The MoE gate's top-k, one thread per row, the CPU rule step by step (layers/gate.rs):
// mode 0: softmax, top-k, optional renormalisation; mode 1 (DeepSeek-V3): sigmoid, selection
// bias, top-2 sum per group, top groups kept (others masked with 0.0), top-k, optional
// renormalisation (+1e-20), routed scaling. scratch: per row 2 * n_experts floats and
// n_experts + n_group bytes (flags).
extern "C" __global__ void moe_gate_topk(const float* logits, const float* bias, int has_bias,
                                         float* scratch, unsigned char* flags,
                                         unsigned int* out_experts, float* out_weights, int rows,
                                         int n_experts, int top_k, int mode, int n_group,
                                         int topk_group, int norm_topk_prob, float scaling) {
    GRID_STRIDE(r, (long long)rows) {
        const float* row = logits + r * n_experts;
        float* scores = scratch + r * 2 * n_experts;
        float* choice = scores + n_experts;
        unsigned char* taken = flags + r * (n_experts + n_group);
        unsigned char* group_taken = taken + n_experts;
        unsigned int* experts = out_experts + r * top_k;
        float* weights = out_weights + r * top_k;
        for (int e = 0; e < n_experts; e++) taken[e] = 0;
        if (mode == 0) {
            float mx = NEG_INF;
            for (int e = 0; e < n_experts; e++) mx = fmaxf(mx, row[e]);
            float sum = 0.0f;
            for (int e = 0; e < n_experts; e++) {
                scores[e] = expf(row[e] - mx);
                sum += scores[e];
            }
            float inv = 1.0f / sum;
            for (int e = 0; e < n_experts; e++) scores[e] *= inv;
            float total = 0.0f;
            for (int k = 0; k < top_k; k++) {
                int e = argmax_free(scores, taken, n_experts);
                taken[e] = 1;
                experts[k] = (unsigned int)e;
                weights[k] = scores[e];
                total += scores[e];
            }
            if (norm_topk_prob) {
                for (int k = 0; k < top_k; k++) weights[k] /= total;
            }
        } else {
            for (int e = 0; e < n_experts; e++) {
                scores[e] = 1.0f / (1.0f + expf(-row[e]));
                choice[e] = has_bias ? scores[e] + bias[e] : scores[e];
            }
            int group_size = n_experts / n_group;
            for (int g = 0; g < n_group; g++) group_taken[g] = 0;
            for (int pick = 0; pick < topk_group; pick++) {
                int best = -1;
                float best_score = 0.0f;
                for (int g = 0; g < n_group; g++) {
                    if (group_taken[g]) continue;
                    const float* v = choice + g * group_size;
                    int i0 = 0;
                    for (int i = 1; i < group_size; i++) if (v[i] > v[i0]) i0 = i;
                    int i1 = -1;
                    for (int i = 0; i < group_size; i++) {
                        if (i == i0) continue;
                        if (i1 < 0 || v[i] > v[i1]) i1 = i;
                    }
                    float s = 0.0f + v[i0];
                    if (i1 >= 0) s += v[i1];
                    if (best < 0 || s > best_score) { best = g; best_score = s; }
                }
                group_taken[best] = 1;
            }
            for (int g = 0; g < n_group; g++) {
                if (group_taken[g]) continue;
                for (int i = 0; i < group_size; i++) choice[g * group_size + i] = 0.0f;
            }
            float total = 0.0f;
            for (int k = 0; k < top_k; k++) {
                int e = argmax_free(choice, taken, n_experts);
                taken[e] = 1;
                experts[k] = (unsigned int)e;
                weights[k] = scores[e];
                total += scores[e];
            }
            if (norm_topk_prob) {
                total += 1e-20f;
                for (int k = 0; k < top_k; k++) weights[k] /= total;
            }
            for (int k = 0; k < top_k; k++) weights[k] *= scaling;
        }
    }
}

// hidden[r, c] += (sum of row r's pair outputs, in pair order, from zero) + shared[r, c].
extern "C" __global__ void combine_add(float* hidden, const float* pair_out,
                                       const unsigned int* row_offsets, const float* shared,
                                       int has_shared, int rows, int width) {
    GRID_STRIDE(i, (long long)rows * width) {
        long long r = i / width;
        long long c = i - r * width;
        float acc = 0.0f;
        for (unsigned int p = row_offsets[r]; p < row_offsets[r + 1]; p++) {
            acc += pair_out[(long long)p * width + c];
        }
        if (has_shared) acc += shared[i];
        hidden[i] += acc;
    }
}

// --- GEMM over FP8 weights kept as FP8 (DeepSeek's e4m3 with a scale per column segment) ---
//
// out[r, j] = sum over k of x[r, k] * w(j, k), with w(j, k) = f32(e4m3 byte) * scale(j, segment
// of k): one rounding, the value dequantizing at load computes and the CPU's FP8 panels widen
// to. Each output is one chain of fused multiply-adds over k in ascending order from zero, the
// CPU GEMM's chain, so the result is bitwise the CPU's and does not depend on the other rows
// (batch-invariant: no split of k, whatever the row count). Tiles of FP8_TILE_N outputs x
// FP8_TILE_ROWS rows per block of 256 threads; each K tile of the weights is widened once into
// shared memory for all the block's rows.
#define FP8_TILE_N 32
#define FP8_TILE_ROWS 8
#define FP8_TILE_K 64

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits, no infinities (NaN bytes are
// refused at load). Exact in f32.
__device__ __forceinline__ float e4m3_to_f32(unsigned char b) {
    unsigned int sign = ((unsigned int)b & 0x80u) << 24;
    unsigned int exponent = ((unsigned int)b >> 3) & 0xfu;
    unsigned int mantissa = (unsigned int)b & 0x7u;
    float magnitude = exponent == 0
        ? (float)mantissa * 0.001953125f  // subnormal: mantissa / 8 * 2^-6
        : __uint_as_float(((exponent + 120u) << 23) | (mantissa << 20));
    return __uint_as_float(__float_as_uint(magnitude) | sign);
}

// The segment holding column c: the last start <= c (starts ascending, starts[0] == 0).
__device__ __forceinline__ int segment_of(const int* starts, int segments, int c) {
    int lo = 0, hi = segments - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (starts[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// How a tile reads weight (col, c) of a row-major [n, k] matrix (rows `stride` apart) as the
// exact f32 the CPU's panels widen it to.
struct Fp8Weights {
    const unsigned char* w;
    const float* scales;
    const int* segment_starts;
    int segments;
    long long stride;
    __device__ __forceinline__ float at(int col, int c) const {
        const int s = segment_of(segment_starts, segments, c);
        return __fmul_rn(e4m3_to_f32(w[(long long)col * stride + c]),
                         scales[(long long)col * segments + s]);
    }
};

struct F32Weights {
    const float* w;
    long long stride;
    __device__ __forceinline__ float at(int col, int c) const {
        return w[(long long)col * stride + c];
    }
};

// bf16 bits, widened exactly.
struct Bf16Weights {
    const unsigned short* w;
    long long stride;
    __device__ __forceinline__ float at(int col, int c) const {
        return __uint_as_float(((unsigned int)w[(long long)col * stride + c]) << 16);
    }
};

// One block's tile: outputs first_col.. (FP8_TILE_N of them) of the `rows` (at most
// FP8_TILE_ROWS) rows from row0; x rows x_stride apart, weights read through `w`; out rows
// out_stride apart. Each output: one FMA chain over k ascending from zero.
template <typename W>
__device__ __forceinline__ void row_tile(const float* x, long long x_stride, long long row0,
                                         int rows, const W& w, float* out, long long out_stride,
                                         int first_col, int n, int k) {
    __shared__ float w_tile[FP8_TILE_N][FP8_TILE_K + 1];  // +1: no bank conflicts across j
    __shared__ float x_tile[FP8_TILE_ROWS][FP8_TILE_K];
    const int tj = threadIdx.x % FP8_TILE_N;
    const int tr = threadIdx.x / FP8_TILE_N;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += FP8_TILE_K) {
        const int kc = min(FP8_TILE_K, k - k0);
        for (int i = threadIdx.x; i < FP8_TILE_N * FP8_TILE_K; i += blockDim.x) {
            const int jj = i / FP8_TILE_K, kk = i % FP8_TILE_K;
            const int col = first_col + jj;
            w_tile[jj][kk] = (col < n && kk < kc) ? w.at(col, k0 + kk) : 0.0f;
        }
        for (int i = threadIdx.x; i < FP8_TILE_ROWS * FP8_TILE_K; i += blockDim.x) {
            const int rr = i / FP8_TILE_K, kk = i % FP8_TILE_K;
            x_tile[rr][kk] = (rr < rows && kk < kc) ? x[(row0 + rr) * x_stride + k0 + kk] : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < kc; ++kk) {
            acc = __fmaf_rn(x_tile[tr][kk], w_tile[tj][kk], acc);
        }
        __syncthreads();
    }
    const int col = first_col + tj;
    if (tr < rows && col < n) out[(row0 + tr) * out_stride + col] = acc;
}

// The gate/up pass with SiLU-and-multiply fused: `w` is an expert's [2 * inter, k] gate rows
// then up rows; a block computes outputs first_col.. of the gate half and the same columns of
// the up half (two FMA chains per thread, each the chain `row_tile` runs) and writes
// act[r, j] = silu(gate) * up, the expression of `silu_mul_f32`: bitwise the unfused pair, with
// no [rows, 2 * inter] intermediate written and read back, and one launch fewer.
template <typename W>
__device__ __forceinline__ void row_tile_silu(const float* x, long long x_stride, long long row0,
                                              int rows, const W& w, float* act,
                                              long long act_stride, int first_col, int inter,
                                              int k) {
    __shared__ float gate_tile[FP8_TILE_N][FP8_TILE_K + 1];
    __shared__ float up_tile[FP8_TILE_N][FP8_TILE_K + 1];
    __shared__ float x_tile[FP8_TILE_ROWS][FP8_TILE_K];
    const int tj = threadIdx.x % FP8_TILE_N;
    const int tr = threadIdx.x / FP8_TILE_N;
    float gate = 0.0f, up = 0.0f;
    for (int k0 = 0; k0 < k; k0 += FP8_TILE_K) {
        const int kc = min(FP8_TILE_K, k - k0);
        for (int i = threadIdx.x; i < FP8_TILE_N * FP8_TILE_K; i += blockDim.x) {
            const int jj = i / FP8_TILE_K, kk = i % FP8_TILE_K;
            const int col = first_col + jj;
            const bool inside = col < inter && kk < kc;
            gate_tile[jj][kk] = inside ? w.at(col, k0 + kk) : 0.0f;
            up_tile[jj][kk] = inside ? w.at(inter + col, k0 + kk) : 0.0f;
        }
        for (int i = threadIdx.x; i < FP8_TILE_ROWS * FP8_TILE_K; i += blockDim.x) {
            const int rr = i / FP8_TILE_K, kk = i % FP8_TILE_K;
            x_tile[rr][kk] = (rr < rows && kk < kc) ? x[(row0 + rr) * x_stride + k0 + kk] : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < kc; ++kk) {
            gate = __fmaf_rn(x_tile[tr][kk], gate_tile[tj][kk], gate);
            up = __fmaf_rn(x_tile[tr][kk], up_tile[tj][kk], up);
        }
        __syncthreads();
    }
    const int col = first_col + tj;
    if (tr < rows && col < inter) act[(row0 + tr) * act_stride + col] = silu(gate) * up;
}

// x: rows of k f32 values, x_stride apart; out: rows of n values, out_stride apart. Grid:
// (ceil(n / FP8_TILE_N), ceil(rows / FP8_TILE_ROWS)), 256 threads.
extern "C" __global__ void gemm_rows_fp8(const float* x, long long x_stride,
                                         const unsigned char* w, const float* scales,
                                         const int* segment_starts, int segments, float* out,
                                         long long out_stride, int rows, int n, int k) {
    const long long row0 = (long long)blockIdx.y * FP8_TILE_ROWS;
    const int tile_rows = (int)min((long long)FP8_TILE_ROWS, (long long)rows - row0);
    const Fp8Weights weights = {w, scales, segment_starts, segments, (long long)k};
    row_tile(x, x_stride, row0, tile_rows, weights, out, out_stride, blockIdx.x * FP8_TILE_N, n,
             k);
}

// Per-head FP8 matrices stacked (MLA's absorbed kv_b halves kept as FP8): batch b (blockIdx.z)
// reads x + b * x_batch, its matrix's bytes at w + b * n * k and scales at
// scales + b * n * segments (every head on the same segments), and writes out + b * out_batch.
// Grid: (ceil(n / FP8_TILE_N), ceil(rows / FP8_TILE_ROWS), batch), 256 threads.
extern "C" __global__ void gemm_rows_fp8_batched(const float* x, long long x_stride,
                                                 long long x_batch, const unsigned char* w,
                                                 const float* scales, const int* segment_starts,
                                                 int segments, float* out, long long out_stride,
                                                 long long out_batch, int rows, int n, int k) {
    const long long b = blockIdx.z;
    const long long row0 = (long long)blockIdx.y * FP8_TILE_ROWS;
    const int tile_rows = (int)min((long long)FP8_TILE_ROWS, (long long)rows - row0);
    const Fp8Weights weights = {w + b * n * k, scales + b * n * segments, segment_starts,
                                segments, (long long)k};
    row_tile(x + b * x_batch, x_stride, row0, tile_rows, weights, out + b * out_batch, out_stride,
             blockIdx.x * FP8_TILE_N, n, k);
}

// --- Exact GEMMs over f32 and bf16 weights (`--deterministic` on a GPU) ---
//
// The same tiles and chain as the FP8 GEMM: out[r, j] = sum over k of x[r, k] * w[j, k] with
// f32 inputs and the weight widened exactly, one FMA chain per output over k ascending from
// zero, bitwise the CPU GEMM's and independent of the other rows. Batched: batch b (blockIdx.z)
// reads x + b * x_batch and w + b * w_batch and writes out + b * out_batch (MLA's per-head
// products). Grid: (ceil(n / FP8_TILE_N), ceil(rows / FP8_TILE_ROWS), batch), 256 threads.
template <typename W>
__device__ __forceinline__ void exact_batch_tile(const float* x, long long x_stride,
                                                 long long x_batch, W w, long long w_batch,
                                                 float* out, long long out_stride,
                                                 long long out_batch, int rows, int n, int k) {
    const long long b = blockIdx.z;
    const long long row0 = (long long)blockIdx.y * FP8_TILE_ROWS;
    const int tile_rows = (int)min((long long)FP8_TILE_ROWS, (long long)rows - row0);
    w.w += b * w_batch;
    row_tile(x + b * x_batch, x_stride, row0, tile_rows, w, out + b * out_batch, out_stride,
             blockIdx.x * FP8_TILE_N, n, k);
}

extern "C" __global__ void gemm_rows_exact_f32(const float* x, long long x_stride,
                                               long long x_batch, const float* w,
                                               long long w_stride, long long w_batch, float* out,
                                               long long out_stride, long long out_batch,
                                               int rows, int n, int k) {
    const F32Weights weights = {w, w_stride};
    exact_batch_tile(x, x_stride, x_batch, weights, w_batch, out, out_stride, out_batch, rows, n,
                     k);
}

extern "C" __global__ void gemm_rows_exact_bf16(const float* x, long long x_stride,
                                                long long x_batch, const unsigned short* w,
                                                long long w_stride, long long w_batch,
                                                float* out, long long out_stride,
                                                long long out_batch, int rows, int n, int k) {
    const Bf16Weights weights = {w, w_stride};
    exact_batch_tile(x, x_stride, x_batch, weights, w_batch, out, out_stride, out_batch, rows, n,
                     k);
}

// The run that owns tile t: the last whose first tile is at most t (device/grouped_tiles.rs).
__device__ __forceinline__ int tile_owner(const unsigned int* first_tile, int runs,
                                          unsigned int t) {
    int lo = 0, hi = runs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (first_tile[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// This block's row tile (blockIdx.y) of a grouped launch: its run (expert), first slot and
// row count.
struct RunTile {
    int run;
    long long row0;
    int rows;
};

__device__ __forceinline__ RunTile run_tile(const unsigned int* first_tile,
                                            const unsigned int* run_start,
                                            const unsigned int* run_len, int runs,
                                            unsigned int tile_rows = FP8_TILE_ROWS) {
    const unsigned int t = blockIdx.y;
    const int run = tile_owner(first_tile, runs, t);
    const unsigned int within = (t - first_tile[run]) * tile_rows;
    const int rows = (int)min(tile_rows, run_len[run] - within);
    return RunTile{run, (long long)run_start[run] + within, rows};
}

// Every expert of a layer in one launch: slots (rows of x and out) in runs, one run per
// expert, cut in tiles of FP8_TILE_ROWS (first_tile, run_start, run_len: the plan of
// device/grouped_tiles.rs, on the device, first_tile with runs + 1 entries; the grid may be
// larger than the plan's tiles, as where plan_routes made it, and its blocks past
// first_tile[runs] do nothing); run e's weights (and FP8 scales) at weights[e]
// (scales[e]), all [n_w, k] (FP8: on the same segments). Writes each weight row's products
// (`row_tile`: out is [slots, n_w]), or with SILU the gate/up pass with SiLU-and-multiply
// fused (`row_tile_silu`: the weights are gate rows then up rows, out is [slots, n_w / 2]).
// Grid: (ceil(n / FP8_TILE_N), tiles), n the output width.
template <bool SILU, typename W>
__device__ __forceinline__ void grouped_tile(const RunTile& tile, const float* x,
                                             long long x_stride, const W& w, float* out,
                                             long long out_stride, int n, int k) {
    if constexpr (SILU) {
        row_tile_silu(x, x_stride, tile.row0, tile.rows, w, out, out_stride,
                      blockIdx.x * FP8_TILE_N, n, k);
    } else {
        row_tile(x, x_stride, tile.row0, tile.rows, w, out, out_stride, blockIdx.x * FP8_TILE_N,
                 n, k);
    }
}

template <bool SILU>
__device__ __forceinline__ void grouped_fp8(
    const float* x, long long x_stride, const unsigned long long* weights,
    const unsigned long long* scales, const int* segment_starts, int segments, float* out,
    long long out_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int n, int k) {
    if (blockIdx.y >= first_tile[runs]) return;  // a grid sized for a plan made on the device
    const RunTile tile = run_tile(first_tile, run_start, run_len, runs);
    const Fp8Weights w = {(const unsigned char*)weights[tile.run],
                          (const float*)scales[tile.run], segment_starts, segments,
                          (long long)k};
    grouped_tile<SILU>(tile, x, x_stride, w, out, out_stride, n, k);
}

extern "C" __global__ void grouped_gemm_rows_fp8(
    const float* x, long long x_stride, const unsigned long long* weights,
    const unsigned long long* scales, const int* segment_starts, int segments, float* out,
    long long out_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int n, int k) {
    grouped_fp8<false>(x, x_stride, weights, scales, segment_starts, segments, out, out_stride,
                       first_tile, run_start, run_len, runs, n, k);
}

extern "C" __global__ void grouped_gate_up_silu_fp8(
    const float* x, long long x_stride, const unsigned long long* weights,
    const unsigned long long* scales, const int* segment_starts, int segments, float* act,
    long long act_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int inter, int k) {
    grouped_fp8<true>(x, x_stride, weights, scales, segment_starts, segments, act, act_stride,
                      first_tile, run_start, run_len, runs, inter, k);
}

// The grouped launch over f32 or bf16 experts (`--deterministic`): run e's [n_w, k] weights at
// weights[e], row-major; otherwise as grouped_fp8.
template <bool SILU, typename W, typename T>
__device__ __forceinline__ void grouped_exact(const float* x, long long x_stride,
                                              const unsigned long long* weights, float* out,
                                              long long out_stride,
                                              const unsigned int* first_tile,
                                              const unsigned int* run_start,
                                              const unsigned int* run_len, int runs, int n,
                                              int k) {
    if (blockIdx.y >= first_tile[runs]) return;  // as in grouped_fp8
    const RunTile tile = run_tile(first_tile, run_start, run_len, runs);
    const W w = {(const T*)weights[tile.run], (long long)k};
    grouped_tile<SILU>(tile, x, x_stride, w, out, out_stride, n, k);
}

extern "C" __global__ void grouped_gate_up_silu_exact_f32(
    const float* x, long long x_stride, const unsigned long long* weights, float* act,
    long long act_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int inter, int k) {
    grouped_exact<true, F32Weights, float>(x, x_stride, weights, act, act_stride, first_tile,
                                           run_start, run_len, runs, inter, k);
}

extern "C" __global__ void grouped_gate_up_silu_exact_bf16(
    const float* x, long long x_stride, const unsigned long long* weights, float* act,
    long long act_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int inter, int k) {
    grouped_exact<true, Bf16Weights, unsigned short>(x, x_stride, weights, act, act_stride,
                                                     first_tile, run_start, run_len, runs, inter,
                                                     k);
}

extern "C" __global__ void grouped_gemm_rows_exact_f32(
    const float* x, long long x_stride, const unsigned long long* weights, float* out,
    long long out_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int n, int k) {
    grouped_exact<false, F32Weights, float>(x, x_stride, weights, out, out_stride, first_tile,
                                            run_start, run_len, runs, n, k);
}

extern "C" __global__ void grouped_gemm_rows_exact_bf16(
    const float* x, long long x_stride, const unsigned long long* weights, float* out,
    long long out_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int n, int k) {
    grouped_exact<false, Bf16Weights, unsigned short>(x, x_stride, weights, out, out_stride,
                                                      first_tile, run_start, run_len, runs, n,
                                                      k);
}

// --- A MoE layer's routes planned on the device (device/route_plan.rs, step for step) ---
//
// From the gate's choices ([rows, top_k] experts and weights, as moe_gate_topk leaves them):
// each row's choices in ascending expert id (pair_expert, pair_weight: pair r * top_k + j),
// one run of slots per expert of the layer (run_start, run_len; empty runs too), slots in
// pair order within a run (row_of_slot, pair_of_slot), and the grouped GEMM's row tiles of
// `tile_rows` rows (first_tile, experts + 1 entries). One block of PLAN_WARPS warps, a
// stable counting sort: rows sorted a thread each; then each warp owns one contiguous range
// of pairs, read 32 at a time in pair order, and counts its pairs per expert (lanes holding
// the same expert found with __match_any_sync, the lowest of them adding their number), so
// a pair is read twice in all however many experts the layer has; a scan gives each run its
// start and each warp its first slot within each run; the same walk then places every pair
// at its warp's next slot of its run plus its rank among the lanes that share its expert.
// The plan depends on the choices only, never on the threads' timing. Choices are the gate's
// own (every id below `experts`); an id that is not is left unplaced.
#define PLAN_MAX_TOP_K 16
#define PLAN_WARPS 16
#define PLAN_MAX_EXPERTS 512
#define PLAN_NO_EXPERT 0xffffffffu
#define PLAN_FULL_WARP 0xffffffffu
#define PLAN_LAUNCH_BOUNDS __launch_bounds__(PLAN_WARPS * 32)

// Pair p's expert, or PLAN_NO_EXPERT past the warp's range or for an id not below `experts`.
__device__ __forceinline__ unsigned int plan_expert_of(const unsigned int* pair_expert, int p,
                                                      int last, int experts) {
    const unsigned int x = p < last ? pair_expert[p] : PLAN_NO_EXPERT;
    return x < (unsigned int)experts ? x : PLAN_NO_EXPERT;
}

extern "C" __global__ void PLAN_LAUNCH_BOUNDS plan_routes(
    const unsigned int* chosen, const float* chosen_weight, int rows, int top_k, int experts,
    int tile_rows, unsigned int* pair_expert, float* pair_weight, unsigned int* row_of_slot,
    unsigned int* pair_of_slot, unsigned int* first_tile, unsigned int* run_start,
    unsigned int* run_len) {
    // [warp][expert]: the warp's pairs of each expert, then the warp's next slot of each run.
    __shared__ unsigned int warp_slot[PLAN_WARPS * PLAN_MAX_EXPERTS];
    __shared__ unsigned int run_total[PLAN_MAX_EXPERTS];
    __shared__ unsigned int run_first[PLAN_MAX_EXPERTS];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int pairs = rows * top_k;
    // Slots an id past `experts` would leave unplaced still name row 0 and pair 0 (the gate
    // never chooses one; a bad plan must not read or write past the buffers).
    for (int p = tid; p < pairs; p += blockDim.x) {
        row_of_slot[p] = 0;
        pair_of_slot[p] = 0;
    }
    for (int i = tid; i < PLAN_WARPS * experts; i += blockDim.x) warp_slot[i] = 0;
    for (int r = tid; r < rows; r += blockDim.x) {
        unsigned int e[PLAN_MAX_TOP_K];
        float w[PLAN_MAX_TOP_K];
        for (int j = 0; j < top_k; ++j) {
            const unsigned int ej = chosen[r * top_k + j];
            const float wj = chosen_weight[r * top_k + j];
            int i = j;
            while (i > 0 && e[i - 1] > ej) {
                e[i] = e[i - 1];
                w[i] = w[i - 1];
                --i;
            }
            e[i] = ej;
            w[i] = wj;
        }
        for (int j = 0; j < top_k; ++j) {
            pair_expert[r * top_k + j] = e[j];
            pair_weight[r * top_k + j] = w[j];
        }
    }
    __syncthreads();
    // The same number of steps in every warp (lanes past a range hold no expert), so every
    // lane takes part in every warp-wide call.
    const int per_warp = (pairs + PLAN_WARPS - 1) / PLAN_WARPS;
    const int steps = (per_warp + 31) / 32;
    const int first = warp * per_warp, last = min(first + per_warp, pairs);
    unsigned int* own = warp_slot + warp * experts;
    const unsigned int lanes_below = (1u << lane) - 1u;
    for (int step = 0; step < steps; ++step) {
        const unsigned int x = plan_expert_of(pair_expert, first + step * 32 + lane, last, experts);
        const unsigned int same = __match_any_sync(PLAN_FULL_WARP, x);
        if (x != PLAN_NO_EXPERT && (same & lanes_below) == 0) own[x] += __popc(same);
        __syncwarp();
    }
    __syncthreads();
    // Per expert, each warp's count becomes the pairs of that expert in the warps before it.
    for (int x = tid; x < experts; x += blockDim.x) {
        unsigned int n = 0;
        for (int w = 0; w < PLAN_WARPS; ++w) {
            const unsigned int c = warp_slot[w * experts + x];
            warp_slot[w * experts + x] = n;
            n += c;
        }
        run_total[x] = n;
        run_len[x] = n;
    }
    __syncthreads();
    // Runs' starts and first tiles: each lane sums a contiguous share of the experts, a scan
    // across the lanes, then each lane writes its share. Every warp computes it (so every lane
    // takes part in the shuffles); warp 0 writes it.
    {
        const int share = (experts + 31) / 32;
        const int x0 = min(lane * share, experts), x1 = min(x0 + share, experts);
        unsigned int slots = 0, tiles = 0;
        for (int x = x0; x < x1; ++x) {
            slots += run_total[x];
            tiles += (run_total[x] + tile_rows - 1) / tile_rows;
        }
        unsigned int slots_through = slots, tiles_through = tiles;
        for (int d = 1; d < 32; d *= 2) {
            const unsigned int s = __shfl_up_sync(PLAN_FULL_WARP, slots_through, d);
            const unsigned int t = __shfl_up_sync(PLAN_FULL_WARP, tiles_through, d);
            if (lane >= d) {
                slots_through += s;
                tiles_through += t;
            }
        }
        if (warp == 0) {
            unsigned int start = slots_through - slots, tile = tiles_through - tiles;
            for (int x = x0; x < x1; ++x) {
                run_start[x] = start;
                run_first[x] = start;
                first_tile[x] = tile;
                start += run_total[x];
                tile += (run_total[x] + tile_rows - 1) / tile_rows;
            }
            if (lane == 31) first_tile[experts] = tiles_through;
        }
    }
    __syncthreads();
    for (int i = tid; i < PLAN_WARPS * experts; i += blockDim.x) {
        warp_slot[i] += run_first[i % experts];
    }
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int p = first + step * 32 + lane;
        const unsigned int x = plan_expert_of(pair_expert, p, last, experts);
        const unsigned int same = __match_any_sync(PLAN_FULL_WARP, x);
        if (x != PLAN_NO_EXPERT) {
            const unsigned int s = own[x] + __popc(same & lanes_below);
            row_of_slot[s] = (unsigned int)(p / top_k);
            pair_of_slot[s] = (unsigned int)p;
        }
        // Every lane has read its run's next slot before the lowest lane moves it on.
        __syncwarp();
        if (x != PLAN_NO_EXPERT && (same & lanes_below) == 0) own[x] += __popc(same);
        __syncwarp();
    }
}


// --- bf16 experts on the tensor cores (`--gpu-expert-gemm tensor-cores`) ---
//
// A tile computes out^T = W x^T with mma.m16n8k16: the mma's M is 16 output columns (rows of
// the expert's row-major [n, k] weights: the row-major A, read in place), its N 8 of the
// tile's rows (x's rows: the column-major B, read in place). A tile is TC_TILE_ROWS rows of
// one run (tables of device/grouped_tiles.rs planned with that size, on the host or by
// plan_routes), as TC_N_BLOCKS blocks of 8 that share each A fragment, so the weights are
// read once per TC_TILE_ROWS rows; blocks past the tile's rows are skipped (the same in every
// warp of the block: a decode step's one row per expert costs one mma per step, not four).
// A block's 8 warps cover TC_TILE_N outputs, 16 each, over k ascending TC_K_STEP at a time
// (two mmas) into one f32 accumulator per output: no split of k, so an output depends on its
// own row and the weights only (batch-invariant), though it is not the CPU's chain (bf16
// products, the tensor core's sums). bf16x2 activations (hi, lo): two products per mma step,
// hi then lo, into the same accumulator.
#define TC_WARPS 8
#define TC_TILE_N (TC_WARPS * 16)
#define TC_N_BLOCKS 4
#define TC_TILE_ROWS (TC_N_BLOCKS * 8)
#define TC_K_STEP 32
// Two blocks of 8 warps per SM at least (at most 128 registers a thread): the kernel is bound
// by its weight reads, which want warps in flight more than registers.
#define TC_LAUNCH_BOUNDS __launch_bounds__(TC_WARPS * 32, 2)

#ifndef MOE_EMULATED_MMA
// d += a b, one m16n8k16 bf16 product with f32 accumulation (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"; g = lane / 4, t = lane % 4, each register's lower
// half the lower index): a[0..3] hold A(g, 2t..2t+1), A(g + 8, 2t..), A(g, 2t + 8..),
// A(g + 8, 2t + 8..); b[0..1] B(2t..2t+1, g), B(2t + 8.., g); d[0..3] D(g, 2t), D(g, 2t + 1),
// D(g + 8, 2t), D(g + 8, 2t + 1). The CUDA emulator's prelude.h has its own, over a warp.
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a,
                                               const unsigned int* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the host never picks tensor cores below compute capability 8.0
#endif
}
#endif

// Columns c and c + 1 of a bf16 row as one register (c in the lower half), zero past `k`;
// one 32-bit load where the row allows it (c is always even).
__device__ __forceinline__ unsigned int bf16_pair(const bf16_t* row, int c, int k,
                                                  bool aligned) {
    if (aligned && c + 1 < k) return *(const unsigned int*)(row + c);
    const unsigned int first = c < k ? (unsigned int)row[c] : 0u;
    const unsigned int second = c + 1 < k ? (unsigned int)row[c + 1] : 0u;
    return first | (second << 16);
}

// Whether every row of a [*, stride] matrix of `bytes`-byte elements at `base` starts on a
// boundary of `align` bytes.
__device__ __forceinline__ bool rows_aligned(const void* base, long long stride, int bytes,
                                             int align) {
    return ((unsigned long long)base % align) == 0 && (stride * bytes) % align == 0;
}

// Columns c..c + 7 of a bf16 row (c a multiple of 8) as four registers of two (the lower
// column in the lower half), zero past `k`; one 16-byte load where the row allows it.
__device__ __forceinline__ void bf16_octet(const bf16_t* row, int c, int k, bool aligned,
                                           unsigned int* r) {
    if (aligned && c + 8 <= k) {
        const uint4 v = *(const uint4*)(row + c);
        r[0] = v.x;
        r[1] = v.y;
        r[2] = v.z;
        r[3] = v.w;
        return;
    }
    for (int i = 0; i < 4; ++i) r[i] = bf16_pair(row, c + 2 * i, k, false);
}

// How the tensor-core kernel reads bf16 weights: eight columns of a row at a time, one
// segment over all of k, scale 1.
struct Bf16Fragments {
    static constexpr bool scaled = false;
    const bf16_t* w;
    int k;
    bool aligned;
    __device__ __forceinline__ Bf16Fragments(const bf16_t* w, int k)
        : w(w), k(k), aligned(rows_aligned(w, k, 2, 16)) {}
    // The same matrix from row `first` on (the fused pass's up rows).
    __device__ __forceinline__ Bf16Fragments rows_from(int first) const {
        return Bf16Fragments(w + (long long)first * k, k);
    }
    __device__ __forceinline__ void octet(int row, int c, unsigned int* r) const {
        bf16_octet(w + (long long)row * k, c, k, aligned, r);
    }
    __device__ __forceinline__ int segment_end(int) const { return k; }
    __device__ __forceinline__ float scale(int, int) const { return 1.0f; }
};

// e4m3 bytes with per-(row, segment) f32 scales (DeepSeek-V3's 128x128 blocks: a row's
// segments are its 128-column blocks), each byte widened to bf16 exactly (e4m3 has 3
// mantissa bits) in registers; the products of a segment summed apart and scaled as they
// are added in, as DeepGEMM does. Segment starts are multiples of TC_K_STEP (the host
// checks), so no step straddles two.
struct Fp8Fragments {
    static constexpr bool scaled = true;
    const unsigned char* w;
    const float* scales;
    const int* segment_starts;
    int segments;
    int k;
    bool aligned;
    __device__ __forceinline__ Fp8Fragments(const unsigned char* w, const float* scales,
                                            const int* segment_starts, int segments, int k)
        : w(w), scales(scales), segment_starts(segment_starts), segments(segments), k(k),
          aligned(rows_aligned(w, k, 1, 8)) {}
    __device__ __forceinline__ Fp8Fragments rows_from(int first) const {
        return Fp8Fragments(w + (long long)first * k, scales + (long long)first * segments,
                            segment_starts, segments, k);
    }
    __device__ __forceinline__ static unsigned int as_bf16(unsigned int byte) {
        return __float_as_uint(e4m3_to_f32((unsigned char)(byte & 0xffu))) >> 16;  // exact
    }
    // Two bytes (the lower in the lower half of `two`) as two bf16 in one register.
    __device__ __forceinline__ static unsigned int pair_of(unsigned int two) {
        return as_bf16(two) | (as_bf16(two >> 8) << 16);
    }
    __device__ __forceinline__ void octet(int row, int c, unsigned int* r) const {
        const unsigned char* p = w + (long long)row * k;
        unsigned int low, high;  // bytes c..c + 3 and c + 4..c + 7, the first lowest
        if (aligned && c + 8 <= k) {
            const uint2 v = *(const uint2*)(p + c);
            low = v.x;
            high = v.y;
        } else {
            low = 0u;
            high = 0u;
            for (int i = 0; i < 4; ++i) {
                if (c + i < k) low |= (unsigned int)p[c + i] << (8 * i);
                if (c + 4 + i < k) high |= (unsigned int)p[c + 4 + i] << (8 * i);
            }
        }
        r[0] = pair_of(low);
        r[1] = pair_of(low >> 16);
        r[2] = pair_of(high);
        r[3] = pair_of(high >> 16);
    }
    // Where the segment holding k0 ends.
    __device__ __forceinline__ int segment_end(int k0) const {
        const int s = segment_of(segment_starts, segments, k0);
        return s + 1 < segments ? segment_starts[s + 1] : k;
    }
    __device__ __forceinline__ float scale(int row, int k0) const {
        return scales[(long long)row * segments + segment_of(segment_starts, segments, k0)];
    }
};

// Columns c..c + 7 of weight rows col and col + 8 (zero rows at and past `n`).
template <typename W>
__device__ __forceinline__ void weight_octets(const W& w, int col, int n, int c,
                                              unsigned int* upper, unsigned int* lower) {
    for (int i = 0; i < 4; ++i) upper[i] = lower[i] = 0u;
    if (col < n) w.octet(col, c, upper);
    if (col + 8 < n) w.octet(col + 8, c, lower);
}

// acc += part * the scale of each output's row (col, or col + 8) in the segment at k0;
// part back to zero.
template <typename W>
__device__ __forceinline__ void fold_segment(const W& w, int col, int n, int k0, int blocks,
                                             float (*acc)[4], float (*part)[4]) {
    const float upper = col < n ? w.scale(col, k0) : 0.0f;
    const float lower = col + 8 < n ? w.scale(col + 8, k0) : 0.0f;
#pragma unroll
    for (int j = 0; j < TC_N_BLOCKS; ++j) {
        if (j >= blocks) break;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[j][i] = __fmaf_rn(part[j][i], i >= 2 ? lower : upper, acc[j][i]);
            part[j][i] = 0.0f;
        }
    }
}

// One warp's 16 outputs of a tile's rows; with SILU the weights are gate rows then up rows
// (`n` = inter) and the warp writes silu(gate) * up as act (bf16, or hi and lo where x_lo is
// set), the expressions of silu_mul_bf16 and silu_mul_bf16x2; otherwise the f32 products to
// out. Every warp of the block runs the same steps (a warp past `n` too). Scaled (FP8)
// weights: per segment of k, the products are summed apart, then added in times the
// segment's scale; bf16 weights sum straight into the outputs.
//
// A step covers TC_K_STEP = 32 columns of k as two mmas: lane (g, t) loads columns
// k0 + 8t..k0 + 8t + 7 of its weight rows and of its activation rows (one 16-byte load of
// bf16, 8 bytes of FP8), and gives the first mma its columns 8t..8t + 3 in the places of the
// mma's k 2t, 2t + 1, 2t + 8, 2t + 9, the second its columns 8t + 4..8t + 7. A and B take
// the same columns in the same places, so each mma sums 16 true products (a dot product
// does not depend on which of its k is called which), and the two cover the step's 32.
template <bool SILU, typename W>
__device__ __forceinline__ void tensor_core_tile(const RunTile& tile, const bf16_t* x_hi,
                                                 const bf16_t* x_lo, long long x_stride,
                                                 const W& w, float* out, bf16_t* act_hi,
                                                 bf16_t* act_lo, long long out_stride, int n,
                                                 int k) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int col = blockIdx.x * TC_TILE_N + warp * 16 + g;
    const bool two_terms = x_lo != nullptr;
    const int blocks = (tile.rows + 7) / 8;  // the same in every warp of the block
    const bool x_aligned = rows_aligned(x_hi, x_stride, 2, 16) &&
                           (!two_terms || rows_aligned(x_lo, x_stride, 2, 16));
    const W up_w = w.rows_from(n);  // SILU: the up rows
    // This lane's row (g) of each block of 8, null past the tile's rows.
    const bf16_t* hi_rows[TC_N_BLOCKS];
    const bf16_t* lo_rows[TC_N_BLOCKS];
    for (int j = 0; j < TC_N_BLOCKS; ++j) {
        const int r = j * 8 + g;
        const long long offset = (tile.row0 + r) * x_stride;
        hi_rows[j] = r < tile.rows ? x_hi + offset : nullptr;
        lo_rows[j] = r < tile.rows && two_terms ? x_lo + offset : nullptr;
    }
    float acc[TC_N_BLOCKS][4] = {};
    float up[TC_N_BLOCKS][4] = {};
    float part[TC_N_BLOCKS][4] = {};
    float part_up[TC_N_BLOCKS][4] = {};
    for (int k0 = 0; k0 < k;) {
        const int segment = k0;
        const int end = w.segment_end(k0);
        for (; k0 < end; k0 += TC_K_STEP) {
            const int c = k0 + 8 * t;
            unsigned int wu[4], wl[4], uu[4] = {0u, 0u, 0u, 0u}, ul[4] = {0u, 0u, 0u, 0u};
            weight_octets(w, col, n, c, wu, wl);
            if constexpr (SILU) weight_octets(up_w, col, n, c, uu, ul);
#pragma unroll
            for (int j = 0; j < TC_N_BLOCKS; ++j) {
                if (j >= blocks) break;
                // Unscaled weights sum straight into the outputs.
                float* sum = W::scaled ? part[j] : acc[j];
                float* sum_up = W::scaled ? part_up[j] : up[j];
                unsigned int xh[4] = {0u, 0u, 0u, 0u}, xl[4] = {0u, 0u, 0u, 0u};
                if (hi_rows[j]) bf16_octet(hi_rows[j], c, k, x_aligned, xh);
                if (lo_rows[j]) bf16_octet(lo_rows[j], c, k, x_aligned, xl);
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const unsigned int a[4] = {wu[2 * s], wl[2 * s], wu[2 * s + 1],
                                               wl[2 * s + 1]};
                    const unsigned int a_up[4] = {uu[2 * s], ul[2 * s], uu[2 * s + 1],
                                                  ul[2 * s + 1]};
                    const unsigned int b_hi[2] = {xh[2 * s], xh[2 * s + 1]};
                    mma_bf16_16816(sum, a, b_hi);
                    if constexpr (SILU) mma_bf16_16816(sum_up, a_up, b_hi);
                    if (two_terms) {
                        const unsigned int b_lo[2] = {xl[2 * s], xl[2 * s + 1]};
                        mma_bf16_16816(sum, a, b_lo);
                        if constexpr (SILU) mma_bf16_16816(sum_up, a_up, b_lo);
                    }
                }
            }
        }
        if constexpr (W::scaled) {
            fold_segment(w, col, n, segment, blocks, acc, part);
            if constexpr (SILU) fold_segment(up_w, col, n, segment, blocks, up, part_up);
        }
    }
#pragma unroll
    for (int j = 0; j < TC_N_BLOCKS; ++j) {
        if (j >= blocks) break;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = col + (i >= 2 ? 8 : 0);
            const int r = j * 8 + 2 * t + (i & 1);
            if (c >= n || r >= tile.rows) continue;
            const long long at = (tile.row0 + r) * out_stride + c;
            if constexpr (SILU) {
                const float v = silu(acc[j][i]) * up[j][i];
                if (two_terms) {
                    f32_to_bf16x2(v, act_hi + at, act_lo + at);
                } else {
                    act_hi[at] = f32_to_bf16(v);
                }
            } else {
                out[at] = acc[j][i];
            }
        }
    }
}

// Every expert of a layer in one launch, as grouped_fp8 (a grid sized for the tiles' bound),
// over tiles of TC_TILE_ROWS rows; run e's bf16 [n_w, k] weights at weights[e]; x_lo null
// for bf16 activations, set for bf16x2. Grid: (ceil(n / TC_TILE_N), tiles), TC_WARPS * 32
// threads.
extern "C" __global__ void TC_LAUNCH_BOUNDS tensor_core_grouped_gemm_rows(
    const bf16_t* x_hi, const bf16_t* x_lo, long long x_stride,
    const unsigned long long* weights, float* out, long long out_stride,
    const unsigned int* first_tile, const unsigned int* run_start, const unsigned int* run_len,
    int runs, int n, int k) {
    if (blockIdx.y >= first_tile[runs]) return;  // as in grouped_fp8
    const RunTile tile = run_tile(first_tile, run_start, run_len, runs, TC_TILE_ROWS);
    const Bf16Fragments w((const bf16_t*)weights[tile.run], k);
    tensor_core_tile<false>(tile, x_hi, x_lo, x_stride, w, out, nullptr, nullptr, out_stride, n,
                            k);
}

// The gate/up pass with SiLU-and-multiply fused: run e's weights are [2 * inter, k] (gate rows
// then up rows); writes act_hi (and act_lo where x_lo is set), [slots, inter].
extern "C" __global__ void TC_LAUNCH_BOUNDS tensor_core_grouped_gate_up_silu(
    const bf16_t* x_hi, const bf16_t* x_lo, long long x_stride,
    const unsigned long long* weights, bf16_t* act_hi, bf16_t* act_lo, long long act_stride,
    const unsigned int* first_tile, const unsigned int* run_start, const unsigned int* run_len,
    int runs, int inter, int k) {
    if (blockIdx.y >= first_tile[runs]) return;
    const RunTile tile = run_tile(first_tile, run_start, run_len, runs, TC_TILE_ROWS);
    const Bf16Fragments w((const bf16_t*)weights[tile.run], k);
    tensor_core_tile<true>(tile, x_hi, x_lo, x_stride, w, nullptr, act_hi, act_lo, act_stride,
                           inter, k);
}

// The same over FP8 experts (`--gpu-fp8 keep`): run e's e4m3 [n_w, k] bytes at weights[e],
// its [n_w, segments] scales at scales[e], every expert on the same segment starts.
extern "C" __global__ void TC_LAUNCH_BOUNDS tensor_core_grouped_gemm_rows_fp8(
    const bf16_t* x_hi, const bf16_t* x_lo, long long x_stride,
    const unsigned long long* weights, const unsigned long long* scales,
    const int* segment_starts, int segments, float* out, long long out_stride,
    const unsigned int* first_tile, const unsigned int* run_start, const unsigned int* run_len,
    int runs, int n, int k) {
    if (blockIdx.y >= first_tile[runs]) return;
    const RunTile tile = run_tile(first_tile, run_start, run_len, runs, TC_TILE_ROWS);
    const Fp8Fragments w((const unsigned char*)weights[tile.run], (const float*)scales[tile.run],
                         segment_starts, segments, k);
    tensor_core_tile<false>(tile, x_hi, x_lo, x_stride, w, out, nullptr, nullptr, out_stride, n,
                            k);
}

extern "C" __global__ void TC_LAUNCH_BOUNDS tensor_core_grouped_gate_up_silu_fp8(
    const bf16_t* x_hi, const bf16_t* x_lo, long long x_stride,
    const unsigned long long* weights, const unsigned long long* scales,
    const int* segment_starts, int segments, bf16_t* act_hi, bf16_t* act_lo,
    long long act_stride, const unsigned int* first_tile, const unsigned int* run_start,
    const unsigned int* run_len, int runs, int inter, int k) {
    if (blockIdx.y >= first_tile[runs]) return;
    const RunTile tile = run_tile(first_tile, run_start, run_len, runs, TC_TILE_ROWS);
    const Fp8Fragments w((const unsigned char*)weights[tile.run], (const float*)scales[tile.run],
                         segment_starts, segments, k);
    tensor_core_tile<true>(tile, x_hi, x_lo, x_stride, w, nullptr, act_hi, act_lo, act_stride,
                           inter, k);
}

// A dense linear over one FP8 matrix (`--gpu-fp8 keep`, the dense part's projections), or
// over per-head FP8 matrices stacked (MLA's absorbed kv_b halves, one head per batch):
// x [rows, k] bf16 (x_lo null) or bf16x2, w [n, k] e4m3 with its scales, out [rows, n] f32;
// block y takes rows blockIdx.y * TC_TILE_ROWS.. (no tables: one run of every row); batch
// b = blockIdx.z reads x + b * x_batch, the b-th matrix (w + b * n * k, its n * segments
// scales after the others', as gemm_rows_fp8_batched) and writes out + b * out_batch. Grid:
// (ceil(n / TC_TILE_N), ceil(rows / TC_TILE_ROWS), batch), TC_WARPS * 32 threads.
extern "C" __global__ void TC_LAUNCH_BOUNDS tensor_core_gemm_rows_fp8(
    const bf16_t* x_hi, const bf16_t* x_lo, long long x_stride, long long x_batch,
    const unsigned char* w, const float* scales, const int* segment_starts, int segments,
    float* out, long long out_stride, long long out_batch, int rows, int n, int k) {
    const long long b = blockIdx.z;
    const long long row0 = (long long)blockIdx.y * TC_TILE_ROWS;
    const RunTile tile{0, row0, (int)min((long long)TC_TILE_ROWS, (long long)rows - row0)};
    const Fp8Fragments f(w + b * n * k, scales + b * n * segments, segment_starts, segments, k);
    tensor_core_tile<false>(tile, x_hi + b * x_batch, x_lo ? x_lo + b * x_batch : nullptr,
                            x_stride, f, out + b * out_batch, nullptr, nullptr, out_stride, n,
                            k);
}
