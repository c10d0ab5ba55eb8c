//! cuBLAS's entry points the GPU path calls (handles, streams, `GemmEx`, the strided and
//! grouped batches): each GEMM checked as cuBLAS checks it and run on the host
//! (`host_gemm`), or recorded where its stream is capturing. The summation order is not
//! cuBLAS's (which is not specified); the GPU path's tests compare with a tolerance where they
//! go through cuBLAS, and bitwise only through its own kernels.

use std::ffi::{c_int, c_uint, c_void};

use crate::host_gemm::{element_bytes, gemm_of};
use crate::memory;
use crate::status::*;

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
    let recorded = crate::capture::record(stream_of(handle), || crate::capture::Op::Gemms {
        gemms: gemms.clone(),
        alpha,
        beta,
    });
    match recorded {
        Some(CUDA_SUCCESS) => return CUBLAS_STATUS_SUCCESS,
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
    if crate::capture::refuse(stream_of(handle), "a grouped GEMM").is_some() {
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
