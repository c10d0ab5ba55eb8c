//! cuBLAS's GEMMs (column-major, as cuBLAS defines them) on the host: f32 and bf16 (and f16)
//! operands, f32 or bf16 results, products summed in f64 over k ascending and rounded once. The
//! summation order is not cuBLAS's (which is not specified); the GPU path's tests compare with
//! a tolerance where they go through cuBLAS, and bitwise only through its own kernels.

use std::ffi::{c_int, c_uint, c_void};

use crate::memory;

pub type CublasStatus = c_uint;
const CUBLAS_STATUS_SUCCESS: CublasStatus = 0;
const CUBLAS_STATUS_NOT_INITIALIZED: CublasStatus = 1;
const CUBLAS_STATUS_INVALID_VALUE: CublasStatus = 7;
const CUBLAS_STATUS_EXECUTION_FAILED: CublasStatus = 13;
const CUBLAS_STATUS_NOT_SUPPORTED: CublasStatus = 15;

const CUDA_R_32F: c_uint = 0;
const CUDA_R_16F: c_uint = 2;
const CUDA_R_16BF: c_uint = 14;

/// Compute types taken: 32F, 32F_PEDANTIC, and the fast modes, computed as 32F (TF32 and
/// bf16 "fast" modes round the inputs on a GPU; this does not).
const COMPUTE_32F: [c_uint; 5] = [68, 69, 74, 75, 77];

/// A handle: the stream it was given (work runs at once, unless that stream is capturing).
struct Handle {
    stream: *mut c_void,
}

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(handle: *mut *mut c_void) -> CublasStatus {
    if handle.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *handle = Box::into_raw(Box::new(Handle {
        stream: std::ptr::null_mut(),
    }))
    .cast();
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(handle: *mut c_void) -> CublasStatus {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    drop(Box::from_raw(handle.cast::<Handle>()));
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(
    handle: *mut c_void,
    stream: *mut c_void,
) -> CublasStatus {
    let Some(handle) = handle.cast::<Handle>().as_mut() else {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    };
    handle.stream = stream;
    CUBLAS_STATUS_SUCCESS
}

/// The stream a handle queues on (null: the default stream).
unsafe fn stream_of(handle: *mut c_void) -> *mut c_void {
    handle
        .cast::<Handle>()
        .as_ref()
        .map_or(std::ptr::null_mut(), |h| h.stream)
}

/// Checks and runs GEMMs recorded in a graph, as when they were queued.
pub(crate) unsafe fn run_gemms(gemms: &[Gemm], alpha: f32, beta: f32) -> crate::driver::CUresult {
    for gemm in gemms {
        if gemm.check().is_err() {
            return crate::driver::CUDA_ERROR_LAUNCH_FAILED;
        }
        gemm.run(alpha, beta);
    }
    crate::driver::CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cublasSetMathMode(handle: *mut c_void, _mode: c_uint) -> CublasStatus {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub extern "C" fn cublasSetWorkspace_v2(
    handle: *mut c_void,
    _workspace: *mut c_void,
    _bytes: usize,
) -> CublasStatus {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    CUBLAS_STATUS_SUCCESS
}

fn element_bytes(dtype: c_uint) -> Option<usize> {
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
    a: *const c_void,
    a_type: c_uint,
    lda: usize,
    b: *const c_void,
    b_type: c_uint,
    ldb: usize,
    c: *mut c_void,
    c_type: c_uint,
    ldc: usize,
}

fn dim(value: c_int) -> Option<usize> {
    usize::try_from(value).ok()
}

impl Gemm {
    /// The checks cuBLAS makes (leading dimensions at least the stored rows), and that each
    /// operand's extent lies inside one device allocation (a GPU would fault there).
    fn check(&self) -> Result<(), CublasStatus> {
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
    unsafe fn run(&self, alpha: f32, beta: f32) {
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
unsafe fn gemm_of(
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

#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    handle: *mut c_void,
    transa: c_uint,
    transb: c_uint,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_uint,
    lda: c_int,
    b: *const c_void,
    b_type: c_uint,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_uint,
    ldc: c_int,
    compute: c_uint,
    _algo: c_int,
) -> CublasStatus {
    cublasGemmStridedBatchedEx(
        handle, transa, transb, m, n, k, alpha, a, a_type, lda, 0, b, b_type, ldb, 0, beta, c,
        c_type, ldc, 0, 1, compute, _algo,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    handle: *mut c_void,
    transa: c_uint,
    transb: c_uint,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_uint,
    lda: c_int,
    stride_a: i64,
    b: *const c_void,
    b_type: c_uint,
    ldb: c_int,
    stride_b: i64,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_uint,
    ldc: c_int,
    stride_c: i64,
    batch: c_int,
    compute: c_uint,
    _algo: c_int,
) -> CublasStatus {
    crate::driver::count_call(if batch == 1 {
        "cublasGemmEx"
    } else {
        "cublasGemmStridedBatchedEx"
    });
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if alpha.is_null() || beta.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let Ok(batch) = usize::try_from(batch) else {
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    let (alpha, beta) = (*alpha.cast::<f32>(), *beta.cast::<f32>());
    let mut gemm = match gemm_of(
        transa, transb, m, n, k, a, a_type, lda, b, b_type, ldb, c, c_type, ldc, compute,
    ) {
        Ok(g) => g,
        Err(e) => return e,
    };
    let step = |base: usize, stride: i64, dtype: c_uint, i: usize| {
        (base as i64 + stride * i as i64 * element_bytes(dtype).unwrap_or(4) as i64) as usize
    };
    let (a0, b0, c0) = (a as usize, b as usize, c as usize);
    let mut gemms = Vec::with_capacity(batch);
    for i in 0..batch {
        gemm.a = step(a0, stride_a, a_type, i) as *const c_void;
        gemm.b = step(b0, stride_b, b_type, i) as *const c_void;
        gemm.c = step(c0, stride_c, c_type, i) as *mut c_void;
        if let Err(e) = gemm.check() {
            return e;
        }
        gemms.push(gemm.clone());
    }
    let recorded = crate::graph::record(stream_of(handle), || crate::graph::Op::Gemms {
        gemms: gemms.clone(),
        alpha,
        beta,
    });
    match recorded {
        Some(crate::driver::CUDA_SUCCESS) => return CUBLAS_STATUS_SUCCESS,
        Some(_) => return CUBLAS_STATUS_EXECUTION_FAILED,
        None => {}
    }
    for gemm in &gemms {
        gemm.run(alpha, beta);
    }
    CUBLAS_STATUS_SUCCESS
}

/// The cuBLAS these entry points stand for: 13.0 (the grouped GEMM exists from 12.5).
#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(
    handle: *mut c_void,
    version: *mut c_int,
) -> CublasStatus {
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if version.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *version = 13_00_00;
    CUBLAS_STATUS_SUCCESS
}

/// Groups of GEMMs, as cuBLAS defines them: the per-group sizes, operations and scalars are
/// host arrays of `group_count`; the operand addresses are device arrays with one address per
/// problem (`sum(group_size)`), which must lie inside an allocation as a GPU would read them.
#[no_mangle]
pub unsafe extern "C" fn cublasGemmGroupedBatchedEx(
    handle: *mut c_void,
    transa: *const c_uint,
    transb: *const c_uint,
    m: *const c_int,
    n: *const c_int,
    k: *const c_int,
    alpha: *const c_void,
    a: *const *const c_void,
    a_type: c_uint,
    lda: *const c_int,
    b: *const *const c_void,
    b_type: c_uint,
    ldb: *const c_int,
    beta: *const c_void,
    c: *const *mut c_void,
    c_type: c_uint,
    ldc: *const c_int,
    group_count: c_int,
    group_size: *const c_int,
    compute: c_uint,
) -> CublasStatus {
    crate::driver::count_call("cublasGemmGroupedBatchedEx");
    if handle.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if crate::graph::refuse(stream_of(handle), "a grouped GEMM").is_some() {
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    let Ok(groups) = usize::try_from(group_count) else {
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    let host = [
        transa.cast::<c_void>(),
        transb.cast(),
        m.cast(),
        n.cast(),
        k.cast(),
        alpha,
        lda.cast(),
        ldb.cast(),
        beta,
        ldc.cast(),
        group_size.cast(),
    ];
    if groups > 0 && host.iter().any(|p| p.is_null()) {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let mut sizes = Vec::with_capacity(groups);
    for g in 0..groups {
        let Ok(size) = usize::try_from(*group_size.add(g)) else {
            return CUBLAS_STATUS_INVALID_VALUE;
        };
        sizes.push(size);
    }
    let problems: usize = sizes.iter().sum();
    let address_bytes = problems * std::mem::size_of::<*const c_void>();
    for (name, array) in [("A", a as usize), ("B", b as usize), ("C", c as usize)] {
        if problems > 0 && !memory::covers(array, address_bytes) {
            eprintln!(
                "cuda emulator: grouped GEMM: the {name} addresses ({address_bytes} bytes at {array:#x}) are not inside one allocation"
            );
            return CUBLAS_STATUS_EXECUTION_FAILED;
        }
    }
    let mut problem = 0;
    for (g, &size) in sizes.iter().enumerate() {
        let mut gemm = match gemm_of(
            *transa.add(g),
            *transb.add(g),
            *m.add(g),
            *n.add(g),
            *k.add(g),
            std::ptr::null(),
            a_type,
            *lda.add(g),
            std::ptr::null(),
            b_type,
            *ldb.add(g),
            std::ptr::null_mut(),
            c_type,
            *ldc.add(g),
            compute,
        ) {
            Ok(gemm) => gemm,
            Err(e) => return e,
        };
        let (alpha, beta) = (*alpha.cast::<f32>().add(g), *beta.cast::<f32>().add(g));
        for _ in 0..size {
            gemm.a = *a.add(problem);
            gemm.b = *b.add(problem);
            gemm.c = *c.add(problem);
            if let Err(e) = gemm.check() {
                return e;
            }
            gemm.run(alpha, beta);
            problem += 1;
        }
    }
    CUBLAS_STATUS_SUCCESS
}
