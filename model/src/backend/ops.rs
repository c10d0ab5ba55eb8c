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
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `log_softmax(x)[index]`, accumulated in f64 for a stable reported logprob.
pub fn log_softmax_at(x: &[f32], index: usize) -> f32 {
    (x[index] as f64 - log_sum_exp(x)) as f32
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn dot_handles_tails() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let expected: f32 = a.iter().map(|v| v * v).sum();
        assert_eq!(dot(&a, &a), expected);
    }
}
