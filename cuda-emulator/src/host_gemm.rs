//! cuBLAS's GEMMs (column-major, as cuBLAS defines them) computed on the host: f32 and bf16
//! (and f16) operands, f32 or bf16 results, products summed in f64 over k ascending and
//! rounded once. What the cuBLAS entry points (`blas`) queue and a graph (`graph`) replays.

use std::ffi::{c_int, c_uint, c_void};

use crate::memory;
use crate::status::*;

const CUDA_R_32F: c_uint = 0;
const CUDA_R_16F: c_uint = 2;
const CUDA_R_16BF: c_uint = 14;

/// Compute types taken: 32F, 32F_PEDANTIC, and the fast modes, computed as 32F (TF32 and
/// bf16 "fast" modes round the inputs on a GPU; this does not).
const COMPUTE_32F: [c_uint; 5] = [68, 69, 74, 75, 77];

/// Checks and runs GEMMs recorded in a graph, as when they were queued.
pub(crate) unsafe fn run_gemms(gemms: &[Gemm], alpha: f32, beta: f32) -> CUresult {
    for gemm in gemms {
        if gemm.check().is_err() {
            return CUDA_ERROR_LAUNCH_FAILED;
        }
        gemm.run(alpha, beta);
    }
    CUDA_SUCCESS
}

pub(crate) fn element_bytes(dtype: c_uint) -> Option<usize> {
    match dtype {
        CUDA_R_32F => Some(4),
        CUDA_R_16F | CUDA_R_16BF => Some(2),
        _ => None,
    }
}

/// Element `index` of a matrix of `dtype` at `base`, widened to f64.
unsafe fn read(base: *const c_void, dtype: c_uint, index: usize) -> f64 {
    match dtype {
        CUDA_R_32F => f64::from(*base.cast::<f32>().add(index)),
        CUDA_R_16BF => f64::from(half::bf16::from_bits(*base.cast::<u16>().add(index))),
        _ => f64::from(half::f16::from_bits(*base.cast::<u16>().add(index))),
    }
}

/// One column-major GEMM's operands, as cuBLAS takes them.
#[derive(Clone)]
pub(crate) struct Gemm {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    pub(crate) a: *const c_void,
    a_type: c_uint,
    lda: usize,
    pub(crate) b: *const c_void,
    b_type: c_uint,
    ldb: usize,
    pub(crate) c: *mut c_void,
    c_type: c_uint,
    ldc: usize,
}

fn dim(value: c_int) -> Option<usize> {
    usize::try_from(value).ok()
}

impl Gemm {
    /// The checks cuBLAS makes (leading dimensions at least the stored rows), and that each
    /// operand's extent lies inside one device allocation (a GPU would fault there).
    pub(crate) fn check(&self) -> Result<(), CublasStatus> {
        let (a_rows, a_cols) = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (b_rows, b_cols) = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        if self.lda < a_rows.max(1) || self.ldb < b_rows.max(1) || self.ldc < self.m.max(1) {
            return Err(CUBLAS_STATUS_INVALID_VALUE);
        }
        let extent = |ld: usize, rows: usize, cols: usize, dtype: c_uint| {
            if rows == 0 || cols == 0 {
                0
            } else {
                ((cols - 1) * ld + rows) * element_bytes(dtype).unwrap_or(4)
            }
        };
        let parts = [
            (
                "A",
                self.a as usize,
                extent(self.lda, a_rows, a_cols, self.a_type),
            ),
            (
                "B",
                self.b as usize,
                extent(self.ldb, b_rows, b_cols, self.b_type),
            ),
            (
                "C",
                self.c as usize,
                extent(self.ldc, self.m, self.n, self.c_type),
            ),
        ];
        for (name, address, bytes) in parts {
            if bytes > 0 && !memory::covers(address, bytes) {
                eprintln!(
                    "cuda emulator: GEMM {}x{}x{}: {name} ({bytes} bytes at {address:#x}) is not inside one allocation",
                    self.m, self.n, self.k
                );
                return Err(CUBLAS_STATUS_EXECUTION_FAILED);
            }
        }
        Ok(())
    }

    /// `C = alpha op(A) op(B) + beta C`; C is not read when beta is 0, as in cuBLAS.
    pub(crate) unsafe fn run(&self, alpha: f32, beta: f32) {
        let mut column = vec![0f64; self.k];
        for j in 0..self.n {
            for (l, v) in column.iter_mut().enumerate() {
                let index = if self.trans_b {
                    j + l * self.ldb
                } else {
                    l + j * self.ldb
                };
                *v = read(self.b, self.b_type, index);
            }
            for i in 0..self.m {
                let mut sum = 0f64;
                for (l, &b) in column.iter().enumerate() {
                    let index = if self.trans_a {
                        l + i * self.lda
                    } else {
                        i + l * self.lda
                    };
                    sum += read(self.a, self.a_type, index) * b;
                }
                let at = i + j * self.ldc;
                let mut value = (f64::from(alpha) * sum) as f32;
                if beta != 0.0 {
                    let old = read(self.c, self.c_type, at) as f32;
                    value += beta * old;
                }
                match self.c_type {
                    CUDA_R_32F => *self.c.cast::<f32>().add(at) = value,
                    _ => *self.c.cast::<u16>().add(at) = half::bf16::from_f32(value).to_bits(),
                }
            }
        }
    }
}

/// Validates the enums and sizes common to both entry points.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_of(
    transa: c_uint,
    transb: c_uint,
    m: c_int,
    n: c_int,
    k: c_int,
    a: *const c_void,
    a_type: c_uint,
    lda: c_int,
    b: *const c_void,
    b_type: c_uint,
    ldb: c_int,
    c: *mut c_void,
    c_type: c_uint,
    ldc: c_int,
    compute: c_uint,
) -> Result<Gemm, CublasStatus> {
    let op = |t: c_uint| match t {
        0 => Ok(false),
        1 | 2 => Ok(true),
        _ => Err(CUBLAS_STATUS_INVALID_VALUE),
    };
    if !COMPUTE_32F.contains(&compute)
        || element_bytes(a_type).is_none()
        || element_bytes(b_type).is_none()
        || !matches!(c_type, CUDA_R_32F | CUDA_R_16BF)
    {
        return Err(CUBLAS_STATUS_NOT_SUPPORTED);
    }
    let (Some(m), Some(n), Some(k), Some(lda), Some(ldb), Some(ldc)) =
        (dim(m), dim(n), dim(k), dim(lda), dim(ldb), dim(ldc))
    else {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    };
    Ok(Gemm {
        trans_a: op(transa)?,
        trans_b: op(transb)?,
        m,
        n,
        k,
        a,
        a_type,
        lda,
        b,
        b_type,
        ldb,
        c,
        c_type,
        ldc,
    })
}
