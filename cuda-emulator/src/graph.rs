//! CUDA graphs made by a stream capture (`capture`): instantiated, launched (their recorded
//! operations run again in order, reading their buffers as they are then) and destroyed.

use std::ffi::c_void;

use crate::capture::{refuse, Graph, Op};
use crate::status::*;

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut *mut c_void,
    graph: *mut c_void,
    _flags: u64,
) -> CUresult {
    let Some(graph) = graph.cast::<Graph>().as_ref() else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if exec.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *exec = Box::into_raw(Box::new(Graph {
        ops: graph.ops.clone(),
        memory: std::sync::Arc::clone(&graph.memory),
    }))
    .cast();
    CUDA_SUCCESS
}

/// Runs the graph's operations in order, now (work runs when queued, as everywhere here).
#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: *mut c_void, stream: *mut c_void) -> CUresult {
    let Some(graph) = exec.cast::<Graph>().as_ref() else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if let Some(refused) = refuse(stream, "a graph launched") {
        return refused;
    }
    for op in &graph.ops {
        let status = run(op);
        if status != CUDA_SUCCESS {
            return status;
        }
    }
    CUDA_SUCCESS
}

unsafe fn run(op: &Op) -> CUresult {
    match op {
        Op::Launch {
            function,
            grid,
            block,
            shared_bytes,
            params,
        } => {
            let mut pointers: Vec<*mut c_void> =
                params.iter().map(|p| p.as_ptr() as *mut c_void).collect();
            crate::driver::launch_now(
                *function as *mut c_void,
                *grid,
                *block,
                *shared_bytes,
                pointers.as_mut_ptr(),
            )
        }
        Op::CopyDeviceToDevice { dst, src, bytes } => {
            crate::driver::cuMemcpyDtoD_v2(*dst, *src, *bytes)
        }
        Op::Set8 { dst, value, count } => crate::driver::cuMemsetD8_v2(*dst, *value, *count),
        Op::Set32 { dst, value, count } => crate::driver::cuMemsetD32_v2(*dst, *value, *count),
        Op::Gemms { gemms, alpha, beta } => crate::host_gemm::run_gemms(gemms, *alpha, *beta),
    }
}

#[no_mangle]
pub extern "C" fn cuGraphUpload(exec: *mut c_void, _stream: *mut c_void) -> CUresult {
    crate::driver::known(exec)
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(graph: *mut c_void) -> CUresult {
    crate::driver::release::<Graph>(graph)
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: *mut c_void) -> CUresult {
    crate::driver::release::<Graph>(exec)
}
