//! Element-wise and row-wise kernels. Each reduces a row in a fixed order, independent of how
//! many rows are processed together.

/// RMSNorm of each `width`-wide row of `x`, in place: `x * rsqrt(mean(x^2) + eps) * weight`.
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let width = weight.len();
    for row in x.chunks_exact_mut(width) {
        let sum_sq: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (sum_sq / width as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// Returns the RMSNorm of each row as a new buffer.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    rms_norm_rows(&mut out, weight, eps);
    out
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// For each row `[gate | up]` (each `inter` wide) returns `silu(gate) * up`.
pub fn silu_and_mul(gate_up: &[f32], inter: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * inter);
    let mut out = Vec::with_capacity(rows * inter);
    for row in gate_up.chunks_exact(2 * inter) {
        let (gate, up) = row.split_at(inter);
        out.extend(gate.iter().zip(up).map(|(g, u)| silu(*g) * u));
    }
    out
}

/// Softmax in place, in f32, with max subtraction.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    exp_minus_max(x, max);
    // Summed in order: the same chain of additions whatever computed the exponentials.
    let mut sum = 0.0f32;
    for v in x.iter() {
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x[i] = (x[i] - max).exp()`: sixteen at a time on AVX-512, bitwise the scalar calls (a
/// prefill's attention over a long prompt spent a sixth of its time in these calls).
pub fn exp_minus_max(x: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if crate::backend::has_avx512() {
        // SAFETY: the features were detected at run time.
        unsafe { avx512::exp_minus_max(x, max) };
        return;
    }
    for v in x.iter_mut() {
        *v = (*v - max).exp();
    }
}

/// `log_softmax(x)[index]`, accumulated in f64 for a stable reported logprob.
pub fn log_softmax_at(x: &[f32], index: usize) -> f32 {
    (x[index] as f64 - log_sum_exp(x)) as f32
}

/// The rank of `x[index]` among `x`: how many values are at least it (1 for the largest; a
/// tie ranks it after the others, as vLLM counts prompt tokens' ranks). NaN ranks behind all.
pub fn rank_at(x: &[f32], index: usize) -> u32 {
    let own = x[index];
    if own.is_nan() {
        return x.len() as u32;
    }
    x.iter().map(|&v| u32::from(v >= own)).sum()
}

/// log Σ exp(x), in f64; `x[i] - log_sum_exp(x)` is what [`log_softmax_at`] returns.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max
}

/// Index of the largest value; the lowest index wins ties (as torch's argmax does).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Runs `$body` compiled for AVX2+FMA when the CPU has it (so `mul_add` is one instruction),
/// else compiled for the baseline (where `mul_add` is a libm call: slow, bitwise the same).
macro_rules! fma_dispatch {
    ($(#[$meta:meta])* $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$meta])*
        #[inline]
        pub fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret { body($($arg),*) }
                if crate::backend::has_avx2_fma() {
                    // SAFETY: the features were detected at run time.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

fma_dispatch!(dot(a: &[f32], b: &[f32]) -> f32 { dot_inline(a, b) });

fma_dispatch!(
    /// `out[j] = dot(q, rows[j * stride + offset..][..q.len()])` for every j: the attention
    /// scores of one head, with the whole loop compiled for the CPU's FMA.
    dot_rows(q: &[f32], rows: &[f32], stride: usize, offset: usize, out: &mut [f32]) -> () {
    let width = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_inline(q, &rows[j * stride + offset..j * stride + offset + width]);
    }
});

fma_dispatch!(
    /// `out += sum_j weights[j] * rows[j * stride + offset..][..out.len()]`, rows in ascending j.
    accumulate_rows(weights: &[f32], rows: &[f32], stride: usize, offset: usize, out: &mut [f32]) -> () {
    let width = out.len();
    for (j, &w) in weights.iter().enumerate() {
        let row = &rows[j * stride + offset..j * stride + offset + width];
        for (a, v) in out.iter_mut().zip(row) {
            *a = w.mul_add(*v, *a);
        }
    }
});

/// `out[i * n + j] = dot(queries[i * width..][..width], rows[j][offset..][..width])` for
/// `n = out.len() / queries` rows: [`dot_rows`] for several queries (the heads of one token) at
/// once, reading each row once for all of them. Each dot is bitwise [`dot`]'s. The rows are
/// given one slice each (a paged cache's rows are not evenly spaced).
pub fn dot_rows_many(
    queries: &[f32],
    width: usize,
    rows: &[&[f32]],
    offset: usize,
    out: &mut [f32],
) {
    let count = queries.len().checked_div(width).unwrap_or(0);
    let Some(n) = out.len().checked_div(count) else {
        return;
    };
    assert!(rows.len() >= n && rows[..n].iter().all(|r| r.len() >= offset + width));
    #[cfg(target_arch = "x86_64")]
    if count >= 2 && crate::backend::has_avx512() {
        // SAFETY: as below; AVX-512F detected too.
        unsafe { avx512::dot_rows_many(queries, width, count, rows, offset, n, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::backend::has_avx2_fma() {
        // SAFETY: the features were detected at run time; every row read lies in its slice (the
        // assert above) and every query in `queries`.
        unsafe { x86::dot_rows_many(queries, width, count, rows, offset, n, out) };
        return;
    }
    portable_dot_rows_many(queries, width, &rows[..n], offset, out);
}

/// [`dot_rows_many`] without vector kernels: the definition the kernels are tested against.
fn portable_dot_rows_many(
    queries: &[f32],
    width: usize,
    rows: &[&[f32]],
    offset: usize,
    out: &mut [f32],
) {
    let n = rows.len();
    for (j, row) in rows.iter().enumerate() {
        let row = &row[offset..offset + width];
        for (i, q) in queries.chunks_exact(width).enumerate() {
            out[i * n + j] = dot_inline(q, row);
        }
    }
}

/// For every query i: `out[i * width..][..width] = sum_j weights[i * n + j] * rows[j][offset..]
/// [..width]`, rows in ascending j (bitwise [`accumulate_rows`] into zeros, per query).
///
/// `out` is written, never read: a fresh `vec![0.0; n]` is calloc'd memory whose pages are not
/// yet mapped, and reading one first maps the shared zero page, so the write that follows takes a
/// copy-on-write fault and a TLB shootdown on every core (a tenth of a 4096-token prefill).
pub fn weighted_sum_rows_many(
    weights: &[f32],
    rows: &[&[f32]],
    offset: usize,
    width: usize,
    out: &mut [f32],
) {
    let count = out.len().checked_div(width).unwrap_or(0);
    let Some(n) = weights.len().checked_div(count) else {
        return;
    };
    if n == 0 {
        out.fill(0.0);
        return;
    }
    assert!(rows.len() >= n && rows[..n].iter().all(|r| r.len() >= offset + width));
    #[cfg(target_arch = "x86_64")]
    if crate::backend::has_avx512() {
        // SAFETY: as below; AVX-512F detected too.
        unsafe { avx512::weighted_sum_rows_many(weights, rows, offset, width, count, n, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::backend::has_avx2_fma() {
        // SAFETY: the features were detected at run time; every row read lies in its slice (the
        // assert above), every weight in `weights` and every output in `out`.
        unsafe { x86::weighted_sum_rows_many(weights, rows, offset, width, count, n, out) };
        return;
    }
    portable_weighted_sum_rows_many(weights, &rows[..n], offset, width, out);
}

/// [`weighted_sum_rows_many`] without vector kernels: the definition the kernels are tested
/// against.
fn portable_weighted_sum_rows_many(
    weights: &[f32],
    rows: &[&[f32]],
    offset: usize,
    width: usize,
    out: &mut [f32],
) {
    let n = rows.len();
    for (i, acc) in out.chunks_exact_mut(width).enumerate() {
        acc.fill(0.0);
        for (&w, row) in weights[i * n..(i + 1) * n].iter().zip(rows) {
            for (a, v) in acc.iter_mut().zip(&row[offset..offset + width]) {
                *a = w.mul_add(*v, *a);
            }
        }
    }
}

#[inline(always)]
fn dot_inline(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent lanes, then a fixed tree: vectorises and stays order-deterministic.
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    let mut tail = 0.0f32;
    for i in chunks * 8..n {
        tail = a[i].mul_add(b[i], tail);
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

fma_dispatch!(axpy(acc: &mut [f32], w: f32, x: &[f32]) -> () {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = w.mul_add(*v, *a);
    }
});

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::dot_inline`]'s eight lanes as one register and its fixed tree: `(l0 + l4) +
    /// (l1 + l5)` etc. (the compiler vectorises the portable form over shuffled 4-lane
    /// registers, at half the speed).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn reduce(acc: __m256, tail: f32) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let pairs = _mm_hadd_ps(halves, halves);
        let upper = _mm_movehdup_ps(pairs);
        (_mm_cvtss_f32(pairs) + _mm_cvtss_f32(upper)) + tail
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn tail(a: *const f32, b: *const f32, from: usize, to: usize) -> f32 {
        let mut tail = 0.0f32;
        for i in from..to {
            tail = (*a.add(i)).mul_add(*b.add(i), tail);
        }
        tail
    }

    /// Rows are taken a few at a time ([`VALUE_ROWS_PER_PASS`]) so that they stay in L1 while
    /// every 16-float slice of every query's output passes over them (one slice over all the
    /// rows walked the cache 1 KiB apart, a stride the prefetcher follows poorly). Each slice of
    /// 4 queries is held in registers over those rows and stored between them: the same FMA
    /// chain per element, in the same order, as the one-query loop.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_sum_rows_many(
        weights: &[f32],
        rows: &[&[f32]],
        offset: usize,
        width: usize,
        count: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let (w, o) = (weights.as_ptr(), out.as_mut_ptr());
        let blocks = width / 16;
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + VALUE_ROWS_PER_PASS).min(n);
            // This pass's rows, read from the table once (not once per 16-float slice).
            let mut pass = [std::ptr::null::<f32>(); VALUE_ROWS_PER_PASS];
            for (p, j) in pass.iter_mut().zip(j0..j1) {
                *p = rows.get_unchecked(j).as_ptr().add(offset);
            }
            let base = |j: usize| *pass.get_unchecked(j - j0);
            let mut i = 0;
            while i < count {
                let group = (count - i).min(4);
                for b in 0..blocks {
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    if j0 > 0 {
                        // A later pass: continue the chains stored by the previous one (the
                        // first pass only stores, so `out` is never read before it is written).
                        for (k, a) in acc.iter_mut().enumerate().take(group) {
                            let dst = o.add((i + k) * width + b * 16);
                            a[0] = _mm256_loadu_ps(dst);
                            a[1] = _mm256_loadu_ps(dst.add(8));
                        }
                    }
                    for j in j0..j1 {
                        let row = base(j).add(b * 16);
                        let (r0, r1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                        for (k, a) in acc.iter_mut().enumerate().take(group) {
                            let wk = _mm256_broadcast_ss(&*w.add((i + k) * n + j));
                            a[0] = _mm256_fmadd_ps(wk, r0, a[0]);
                            a[1] = _mm256_fmadd_ps(wk, r1, a[1]);
                        }
                    }
                    for (k, a) in acc.iter().enumerate().take(group) {
                        let dst = o.add((i + k) * width + b * 16);
                        _mm256_storeu_ps(dst, a[0]);
                        _mm256_storeu_ps(dst.add(8), a[1]);
                    }
                }
                // Columns past the last 16-float block, one at a time in the same order.
                for k in 0..group {
                    for col in blocks * 16..width {
                        let dst = o.add((i + k) * width + col);
                        let mut a = if j0 > 0 { *dst } else { 0.0f32 };
                        for j in j0..j1 {
                            let wj = *w.add((i + k) * n + j);
                            a = wj.mul_add(*base(j).add(col), a);
                        }
                        *dst = a;
                    }
                }
                i += group;
            }
            j0 = j1;
        }
    }

    /// Cached rows per pass of [`weighted_sum_rows_many`]: 8 KiB of MLA's 256-float latents,
    /// beside a 16-head output of 16 KiB, inside a 32 KiB L1.
    const VALUE_ROWS_PER_PASS: usize = 8;

    /// Two rows by four queries per pass: eight independent FMA chains (four left the FMA
    /// units waiting on their latency half the time), each row and query chunk loaded once.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows_many(
        queries: &[f32],
        width: usize,
        count: usize,
        rows: &[&[f32]],
        offset: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let q = queries.as_ptr();
        let o = out.as_mut_ptr();
        let row = |j: usize| rows.get_unchecked(j).as_ptr().add(offset);
        let mut j = 0;
        while j < n {
            if j + 2 <= n {
                dot_block::<2>(q, width, count, [row(j), row(j + 1)], j, n, o);
                j += 2;
            } else {
                dot_block::<1>(q, width, count, [row(j)], j, n, o);
                j += 1;
            }
        }
    }

    /// `out[i * n + first + r] = dot(query i, rows[r])` for all queries and the `R` rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot_block<const R: usize>(
        q: *const f32,
        width: usize,
        count: usize,
        rows: [*const f32; R],
        first: usize,
        n: usize,
        out: *mut f32,
    ) {
        let chunks = width / 8;
        let mut i = 0;
        while i < count {
            let group = (count - i).min(4);
            let qs: [*const f32; 4] =
                std::array::from_fn(|k| q.add((i + k.min(group - 1)) * width));
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            if group == 4 {
                for c in 0..chunks {
                    let qv: [__m256; 4] =
                        std::array::from_fn(|k| _mm256_loadu_ps(qs[k].add(c * 8)));
                    for (acc_r, row) in acc.iter_mut().zip(&rows) {
                        let r = _mm256_loadu_ps(row.add(c * 8));
                        for k in 0..4 {
                            acc_r[k] = _mm256_fmadd_ps(qv[k], r, acc_r[k]);
                        }
                    }
                }
            } else {
                for c in 0..chunks {
                    let qv = _mm256_loadu_ps(qs[0].add(c * 8));
                    for (acc_r, row) in acc.iter_mut().zip(&rows) {
                        acc_r[0] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(c * 8)), acc_r[0]);
                    }
                }
            }
            let done = if group == 4 { 4 } else { 1 };
            for (r, (acc_r, row)) in acc.iter().zip(&rows).enumerate() {
                for k in 0..done {
                    let value = reduce(acc_r[k], tail(qs[k], *row, chunks * 8, width));
                    *out.add((i + k) * n + first + r) = value;
                }
            }
            i += done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_counts_the_values_at_least_as_large() {
        let x = [0.5, 2.0, -1.0, 2.0, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(rank_at(&x, 1), 2, "a tie ranks after the other");
        assert_eq!(rank_at(&x, 3), 2);
        assert_eq!(rank_at(&x, 0), 3);
        assert_eq!(rank_at(&x, 2), 4);
        assert_eq!(rank_at(&x, 5), 5);
        assert_eq!(rank_at(&x, 4), 6, "NaN ranks last");
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0, -1.0];
        softmax_in_place(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0]);
    }

    #[test]
    fn log_softmax_matches_definition() {
        let x = [0.5f32, -1.0, 2.0];
        let lse = x.iter().map(|v| v.exp()).sum::<f32>().ln();
        assert!((log_softmax_at(&x, 2) - (2.0 - lse)).abs() < 1e-6);
    }

    /// The many-query forms are the one-query forms, bitwise, whatever the number of queries.
    #[test]
    fn many_query_rows_match_one_query_rows_bitwise() {
        // Ragged widths and row counts (tails of every loop), and MLA's decode shape (several
        // 16-float slices, rows in several passes, an odd row and a group of 4 plus one).
        for (width, stride, offset, n, count) in [(19, 23, 3, 37, 5), (256, 288, 0, 21, 9)] {
            many_queries_match_one_query(width, stride, offset, n, count);
        }
    }

    fn many_queries_match_one_query(
        width: usize,
        stride: usize,
        offset: usize,
        n: usize,
        count: usize,
    ) {
        let value = |i: usize| ((i * 7919) % 113) as f32 / 17.0 - 3.0;
        let rows: Vec<f32> = (0..n * stride).map(value).collect();
        let queries: Vec<f32> = (0..count * width).map(|i| value(i + 5)).collect();
        let mut many = vec![0.0f32; count * n];
        let table: Vec<&[f32]> = rows.chunks_exact(stride).collect();
        dot_rows_many(&queries, width, &table, offset, &mut many);
        let weights: Vec<f32> = (0..count * n).map(|i| value(i + 11) / 50.0).collect();
        // Whatever `out` held before is overwritten.
        let mut acc_many: Vec<f32> = (0..count * width).map(|i| value(i + 13)).collect();
        let mut acc_one = vec![0.0f32; count * width];
        weighted_sum_rows_many(&weights, &table, offset, width, &mut acc_many);
        for i in 0..count {
            let mut one = vec![0.0f32; n];
            dot_rows(
                &queries[i * width..(i + 1) * width],
                &rows,
                stride,
                offset,
                &mut one,
            );
            assert_eq!(
                one,
                many[i * n..(i + 1) * n].to_vec(),
                "scores of query {i}"
            );
            let out = &mut acc_one[i * width..(i + 1) * width];
            accumulate_rows(&weights[i * n..(i + 1) * n], &rows, stride, offset, out);
        }
        assert_eq!(acc_one, acc_many, "weighted sums, width {width}");
    }

    /// Each vector form of the many-query kernels (AVX2, and AVX-512 where the CPU has it) is
    /// the portable loop, bitwise, over every remainder: odd query counts (AVX-512 pairs them),
    /// widths with 8- and 16-float tails, row counts off the 2-row and 8-row steps.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_vector_kernel_is_the_portable_loop_bitwise() {
        if !crate::backend::has_avx2_fma() {
            return;
        }
        let value = |i: usize| ((i * 7919) % 113) as f32 / 17.0 - 3.0;
        for width in [1, 7, 8, 16, 19, 32, 37, 48, 256] {
            for count in 1..=9 {
                for n in [1, 2, 3, 8, 9, 17] {
                    let (stride, offset) = (width + 5, 3);
                    let rows: Vec<f32> = (0..n * stride).map(value).collect();
                    let table: Vec<&[f32]> = rows.chunks_exact(stride).collect();
                    let queries: Vec<f32> = (0..count * width).map(|i| value(i + 5)).collect();
                    let weights: Vec<f32> = (0..count * n).map(|i| value(i + 11) / 50.0).collect();
                    let mut want = vec![0.0f32; count * n];
                    portable_dot_rows_many(&queries, width, &table, offset, &mut want);
                    let mut want_sum = vec![0.0f32; count * width];
                    portable_weighted_sum_rows_many(&weights, &table, offset, width, &mut want_sum);
                    let case = format!("width {width}, {count} queries, {n} rows");
                    let mut kernels: Vec<&str> = vec!["avx2"];
                    if crate::backend::has_avx512() {
                        kernels.push("avx512");
                    }
                    for kernel in kernels {
                        let mut got = vec![f32::NAN; count * n];
                        let mut got_sum = vec![f32::NAN; count * width];
                        // SAFETY: the features were checked above; the slices have the sizes
                        // the kernels read and write.
                        unsafe {
                            if kernel == "avx2" {
                                x86::dot_rows_many(
                                    &queries, width, count, &table, offset, n, &mut got,
                                );
                                x86::weighted_sum_rows_many(
                                    &weights,
                                    &table,
                                    offset,
                                    width,
                                    count,
                                    n,
                                    &mut got_sum,
                                );
                            } else {
                                avx512::dot_rows_many(
                                    &queries, width, count, &table, offset, n, &mut got,
                                );
                                avx512::weighted_sum_rows_many(
                                    &weights,
                                    &table,
                                    offset,
                                    width,
                                    count,
                                    n,
                                    &mut got_sum,
                                );
                            }
                        }
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{kernel} scores, {case}");
                        assert_eq!(bits(&got_sum), bits(&want_sum), "{kernel} sums, {case}");
                    }
                }
            }
        }
    }

    /// `exp_minus_max` against the scalar `f32::exp` (glibc's `expf`) over `values`, bitwise;
    /// lengths that leave every tail of 16.
    fn exp_matches_scalar(values: &[f32], max: f32) {
        let mut fast = values.to_vec();
        exp_minus_max(&mut fast, max);
        for (v, got) in values.iter().zip(&fast) {
            let want = (v - max).exp();
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "exp({v:e} - {max:e}): {got:e}, the scalar call gives {want:e}"
            );
        }
    }

    /// A sweep of every 509th bit pattern of f32 (8.4 million values: normals, subnormals,
    /// both signs, infinities and NaNs), then the fast path's edges and an input where an
    /// unfused `x / ln2 - k` gives another result (such inputs are rare: the sweep misses them;
    /// the ignored test below tries every float), under three maxima.
    #[test]
    fn exp_minus_max_is_the_scalar_exp_bitwise() {
        let sweep: Vec<f32> = (0..u32::MAX / 509)
            .map(|i| f32::from_bits(i * 509))
            .collect();
        let edges: Vec<f32> = [
            32.564632f32,
            88.0,
            87.99999,
            -88.0,
            -87.99999,
            88.72283,
            88.72284,
            -103.97207,
            -103.97208,
            -103.27893,
            -103.2789,
            -87.33655,
            -87.33654,
            0.0,
            -0.0,
            1e-45,
            -1e-45,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            0.5,
            -0.5,
        ]
        .iter()
        .flat_map(|&e: &f32| {
            [
                e,
                f32::from_bits(e.to_bits() + 1),
                f32::from_bits(e.to_bits().wrapping_sub(1)),
            ]
        })
        .collect();
        for max in [0.0f32, 3.5, -2.25] {
            exp_matches_scalar(&sweep, max);
            for len in 0..edges.len() {
                exp_matches_scalar(&edges[..len], max);
            }
        }
    }

    /// Every f32, once (4.3 billion values; `cargo test --release -p moe-model --lib
    /// every_float -- --ignored`, about a minute): run after changing the vector `expf`.
    #[test]
    #[ignore]
    fn exp_minus_max_is_the_scalar_exp_on_every_float() {
        let mut chunk = Vec::with_capacity(1 << 20);
        let mut bits: u64 = 0;
        while bits <= u64::from(u32::MAX) {
            chunk.clear();
            let end = (bits + (1 << 20)).min(u64::from(u32::MAX) + 1);
            chunk.extend((bits..end).map(|b| f32::from_bits(b as u32)));
            exp_matches_scalar(&chunk, 0.0);
            bits = end;
        }
    }

    #[test]
    fn a_weighted_sum_over_no_rows_is_zero() {
        let mut out = vec![7.0f32; 2 * 4];
        weighted_sum_rows_many(&[], &[], 0, 4, &mut out);
        assert_eq!(out, vec![0.0; 8]);
    }

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let expected: f32 = a.iter().map(|v| v * v).sum();
        assert_eq!(dot(&a, &a), expected);
    }
}
