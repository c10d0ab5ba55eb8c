//! A CPU stand-in for the CUDA driver API, cuBLAS and NCCL (within one process). cudarc opens
//! `libcuda.so`, `libcublas.so` and `libnccl.so` at run time and looks each function up by name when first called; with this
//! library first on `LD_LIBRARY_PATH` under those names (`ops/cuda-emulator.sh`), the GPU path
//! runs on the host unchanged: the Rust launch code, its buffers and argument lists, NVRTC's
//! compilation of the kernels, and the kernels' own source, compiled for the host
//! (`runtime.cpp`) and run with CUDA's thread model (blocks, threads, shared memory,
//! barriers). What it cannot show: the hardware's speed, cuBLAS's own summation order, races
//! between threads that a real GPU runs at once (a block's threads take turns between
//! barriers here), the device's fused multiply-adds where the source does not spell them out.
//!
//! Work runs at once on the calling thread, so every stream is in order with every other and
//! an event is complete when recorded. Device memory is host memory: each allocation ends at a
//! page the process may not touch, so a kernel that writes past its buffer stops the process
//! there instead of corrupting a neighbour, and starts filled with NaN bytes (a read of what
//! nothing wrote shows), as device memory holds whatever was there.

// These are the CUDA driver's and cuBLAS's C entry points: their contracts are NVIDIA's
// documentation, their callers cudarc's FFI layer.
#![allow(clippy::missing_safety_doc, non_snake_case, clippy::too_many_arguments)]

mod blas;
mod capture;
mod driver;
mod graph;
mod host_gemm;
mod memory;
mod nccl;
mod ptx;
mod status;

pub use blas::*;
pub use capture::*;
pub use driver::*;
pub use graph::*;
pub use nccl::*;
pub use status::*;

#[cfg(test)]
mod tests {
    use std::ffi::{c_int, c_void};

    use super::*;

    /// PTX as NVRTC would write it, declaring `names`.
    fn ptx(names: &[&str]) -> std::ffi::CString {
        let mut text = String::from(".version 8.8\n.target sm_90\n.address_size 64\n");
        for name in names {
            text.push_str(&format!(".visible .entry {name}(\n)\n{{\n}}\n"));
        }
        std::ffi::CString::new(text).unwrap()
    }

    fn function(name: &str) -> *mut c_void {
        let mut module = std::ptr::null_mut();
        let mut f = std::ptr::null_mut();
        let name_c = std::ffi::CString::new(name).unwrap();
        unsafe {
            assert_eq!(
                cuModuleLoadData(&mut module, ptx(&[name]).as_ptr().cast()),
                0
            );
            assert_eq!(cuModuleGetFunction(&mut f, module, name_c.as_ptr()), 0);
        }
        f
    }

    fn device<T: Copy>(values: &[T]) -> CUdeviceptr {
        let bytes = std::mem::size_of_val(values);
        let mut ptr = 0;
        unsafe {
            assert_eq!(cuMemAlloc_v2(&mut ptr, bytes), 0);
            assert_eq!(cuMemcpyHtoD_v2(ptr, values.as_ptr().cast(), bytes), 0);
        }
        ptr
    }

    fn host<T: Copy + Default>(ptr: CUdeviceptr, len: usize) -> Vec<T> {
        let mut out = vec![T::default(); len];
        let bytes = std::mem::size_of_val(out.as_slice());
        unsafe { assert_eq!(cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), ptr, bytes), 0) };
        out
    }

    unsafe fn launch(
        f: *mut c_void,
        grid: u32,
        block: u32,
        params: &mut [*mut c_void],
    ) -> CUresult {
        cuLaunchKernel(
            f,
            grid,
            1,
            1,
            block,
            1,
            1,
            0,
            std::ptr::null_mut(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }

    #[test]
    fn a_kernel_of_kernels_cu_runs_as_launched() {
        // argmax_rows: a block per row, 256 threads, a tree over shared memory.
        let (rows, width) = (5usize, 700usize);
        let x: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 7919) % 1013) as f32 - 500.0)
            .collect();
        let want: Vec<u32> = x
            .chunks(width)
            .map(|row| {
                let best = row.iter().copied().fold(f32::MIN, f32::max);
                row.iter().position(|&v| v == best).unwrap() as u32
            })
            .collect();
        let (x_dev, out_dev) = (device(&x), device(&vec![0u32; rows]));
        let (mut xp, mut r, mut w, mut op) = (x_dev, rows as c_int, width as c_int, out_dev);
        let mut params: Vec<*mut c_void> = vec![
            (&mut xp as *mut u64).cast(),
            (&mut r as *mut c_int).cast(),
            (&mut w as *mut c_int).cast(),
            (&mut op as *mut u64).cast(),
        ];
        unsafe {
            assert_eq!(
                launch(function("argmax_rows"), rows as u32, 256, &mut params),
                0
            )
        };
        assert_eq!(host::<u32>(out_dev, rows), want);
        for p in [x_dev, out_dev] {
            assert_eq!(cuMemFree_v2(p), 0);
        }
    }

    /// A stream capture records a launch (its parameter values as they were queued) and a
    /// memset without running them; the launched graph runs them on the buffers as they are
    /// then, each time it is launched. Work a capture cannot hold invalidates it, with the
    /// GPU's errors.
    #[test]
    fn a_captured_graph_replays_its_work_on_the_buffers_of_the_moment() {
        let mut stream = std::ptr::null_mut();
        unsafe { assert_eq!(cuStreamCreate(&mut stream, 0), 0) };
        let (rows, width) = (2usize, 300usize);
        let mut x: Vec<f32> = (0..rows * width).map(|i| (i % 17) as f32).collect();
        let (x_dev, out_dev, flags) = (device(&x), device(&vec![99u32; rows]), device(&[0u32; 4]));
        let (mut xp, mut r, mut w, mut op) = (x_dev, rows as c_int, width as c_int, out_dev);
        let mut params: Vec<*mut c_void> = vec![
            (&mut xp as *mut u64).cast(),
            (&mut r as *mut c_int).cast(),
            (&mut w as *mut c_int).cast(),
            (&mut op as *mut u64).cast(),
        ];
        let argmax = function("argmax_rows");
        let mut graph = std::ptr::null_mut();
        let mut exec = std::ptr::null_mut();
        let mut status = 9;
        unsafe {
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(cuStreamIsCapturing(stream, &mut status), 0);
            assert_eq!(status, 1);
            let queued = cuLaunchKernel(
                argmax,
                rows as u32,
                1,
                1,
                256,
                1,
                1,
                0,
                stream,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            );
            assert_eq!(queued, 0);
            assert_eq!(cuMemsetD32Async(flags, 7, 4, stream), 0);
            assert_eq!(
                host::<u32>(out_dev, rows),
                [99, 99],
                "ran during the capture"
            );
            assert_eq!(host::<u32>(flags, 4), [0; 4], "ran during the capture");
            assert_eq!(cuStreamEndCapture(stream, &mut graph), 0);
            assert_eq!(cuGraphInstantiateWithFlags(&mut exec, graph, 0), 0);
        }
        // The parameters were copied when queued: a later change to the variables does not
        // reach the graph, while the buffers' contents at launch time do.
        r = 0;
        let _ = r;
        for (round, best) in [(0usize, 5usize), (1, 123)] {
            x.iter_mut().for_each(|v| *v = 0.0);
            x[best] = 1.0;
            x[width + best + round] = 1.0;
            unsafe {
                assert_eq!(
                    cuMemcpyHtoD_v2(x_dev, x.as_ptr().cast(), std::mem::size_of_val(&x[..])),
                    0
                );
                assert_eq!(cuGraphLaunch(exec, stream), 0);
            }
            let want = [best as u32, (best + round) as u32];
            assert_eq!(host::<u32>(out_dev, rows), want);
            assert_eq!(host::<u32>(flags, 4), [7; 4]);
        }
        unsafe {
            // A synchronisation inside a capture invalidates it, as on a GPU.
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(
                cuStreamSynchronize(stream),
                CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
            );
            assert_eq!(cuStreamIsCapturing(stream, &mut status), 0);
            assert_eq!(status, 2);
            let mut none = std::ptr::null_mut();
            assert_eq!(
                cuStreamEndCapture(stream, &mut none),
                CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            );
            assert!(none.is_null());
            assert_eq!(cuStreamIsCapturing(stream, &mut status), 0);
            assert_eq!(status, 0);
            assert_eq!(cuStreamSynchronize(stream), 0);
            // Waiting on an event recorded before the capture crosses its boundary: refused
            // as on a GPU; one recorded inside the capture may be waited on there.
            let mut event = std::ptr::null_mut();
            assert_eq!(cuEventCreate(&mut event, 0), 0);
            assert_eq!(cuEventRecord(event, stream), 0);
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(
                cuStreamWaitEvent(stream, event, 0),
                crate::capture::CUDA_ERROR_STREAM_CAPTURE_ISOLATION
            );
            let mut none = std::ptr::null_mut();
            assert_eq!(
                cuStreamEndCapture(stream, &mut none),
                CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            );
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(cuEventRecord(event, stream), 0);
            assert_eq!(cuStreamWaitEvent(stream, event, 0), 0);
            let mut joined = std::ptr::null_mut();
            assert_eq!(cuStreamEndCapture(stream, &mut joined), 0);
            assert!(!joined.is_null());
            assert_eq!(cuGraphDestroy(joined), 0);
            assert_eq!(cuEventDestroy_v2(event), 0);
            assert_eq!(cuGraphExecDestroy(exec), 0);
            assert_eq!(cuGraphDestroy(graph), 0);
            assert_eq!(cuStreamDestroy_v2(stream), 0);
        }
        for p in [x_dev, out_dev, flags] {
            assert_eq!(cuMemFree_v2(p), 0);
        }
    }

    /// Stream-ordered allocations in a capture are the graph's memory: made when captured,
    /// reused by every launch, held until the graph is gone. One the capture does not free
    /// invalidates it (stricter than a GPU), and so does freeing memory it did not allocate.
    #[test]
    fn a_capture_allocates_its_graph_memory_and_frees_it_inside() {
        let mut stream = std::ptr::null_mut();
        unsafe { assert_eq!(cuStreamCreate(&mut stream, 0), 0) };
        let out = device(&[0u32; 4]);
        let (mut graph, mut exec) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut scratch: CUdeviceptr = 0;
        unsafe {
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(cuMemAllocAsync(&mut scratch, 16, stream), 0);
            assert!(crate::memory::covers(scratch as usize, 16));
            assert_eq!(cuMemsetD32Async(scratch, 5, 4, stream), 0);
            assert_eq!(cuMemcpyDtoDAsync_v2(out, scratch, 16, stream), 0);
            assert_eq!(cuMemFreeAsync(scratch, stream), 0);
            assert_eq!(host::<u32>(out, 4), [0; 4], "ran during the capture");
            assert_eq!(cuStreamEndCapture(stream, &mut graph), 0);
            assert_eq!(cuGraphInstantiateWithFlags(&mut exec, graph, 0), 0);
            for _ in 0..2 {
                assert_eq!(cuMemsetD32_v2(out, 0, 4), 0);
                assert_eq!(cuGraphLaunch(exec, stream), 0);
                assert_eq!(host::<u32>(out, 4), [5; 4]);
            }
            // The graph's memory lives as long as one of its forms does.
            assert_eq!(cuGraphExecDestroy(exec), 0);
            assert!(crate::memory::covers(scratch as usize, 16));
            assert_eq!(cuGraphDestroy(graph), 0);

            // An allocation that outlives its capture.
            let mut kept: CUdeviceptr = 0;
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(cuMemAllocAsync(&mut kept, 16, stream), 0);
            let mut none = std::ptr::null_mut();
            assert_eq!(
                cuStreamEndCapture(stream, &mut none),
                CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            );
            assert!(none.is_null());

            // Memory allocated before the capture is not the capture's to free.
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(
                cuMemFreeAsync(out, stream),
                CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
            );
            let mut none = std::ptr::null_mut();
            assert_eq!(
                cuStreamEndCapture(stream, &mut none),
                CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            );
            assert!(crate::memory::covers(out as usize, 16));
            assert_eq!(cuStreamDestroy_v2(stream), 0);
        }
        assert_eq!(cuMemFree_v2(out), 0);
    }

    /// A GEMM queued by a cuBLAS handle on a capturing stream joins the graph (C = A.B with
    /// A and B read when the graph runs); a grouped GEMM is refused in a capture.
    #[test]
    fn a_cublas_gemm_on_a_capturing_stream_joins_the_graph() {
        let mut stream = std::ptr::null_mut();
        let mut handle = std::ptr::null_mut();
        let (a_dev, b_dev, c_dev) = (device(&[2f32]), device(&[3f32]), device(&[f32::NAN]));
        let (alpha, beta) = (1f32, 0f32);
        let gemm = |handle| unsafe {
            cublasGemmEx(
                handle,
                0,
                0,
                1,
                1,
                1,
                (&alpha as *const f32).cast(),
                a_dev as *const c_void,
                0,
                1,
                b_dev as *const c_void,
                0,
                1,
                (&beta as *const f32).cast(),
                c_dev as *mut c_void,
                0,
                1,
                68,
                -1,
            )
        };
        let (mut graph, mut exec) = (std::ptr::null_mut(), std::ptr::null_mut());
        unsafe {
            assert_eq!(cuStreamCreate(&mut stream, 0), 0);
            assert_eq!(cublasCreate_v2(&mut handle), 0);
            assert_eq!(cublasSetStream_v2(handle, stream), 0);
            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            assert_eq!(gemm(handle), 0);
            assert!(host::<f32>(c_dev, 1)[0].is_nan(), "ran during the capture");
            assert_eq!(cuStreamEndCapture(stream, &mut graph), 0);
            assert_eq!(cuGraphInstantiateWithFlags(&mut exec, graph, 0), 0);
            assert_eq!(cuMemcpyHtoD_v2(a_dev, [5f32].as_ptr().cast(), 4), 0);
            assert_eq!(cuGraphLaunch(exec, stream), 0);
            assert_eq!(host::<f32>(c_dev, 1), [15.0]);

            assert_eq!(cuStreamBeginCapture_v2(stream, 0), 0);
            let one = [1i32];
            let ops = [0u32];
            let scalars = [1f32];
            let grouped = cublasGemmGroupedBatchedEx(
                handle,
                ops.as_ptr(),
                ops.as_ptr(),
                one.as_ptr(),
                one.as_ptr(),
                one.as_ptr(),
                scalars.as_ptr().cast(),
                std::ptr::null(),
                0,
                one.as_ptr(),
                std::ptr::null(),
                0,
                one.as_ptr(),
                scalars.as_ptr().cast(),
                std::ptr::null(),
                0,
                one.as_ptr(),
                1,
                one.as_ptr(),
                68,
            );
            assert_ne!(grouped, 0);
            let mut none = std::ptr::null_mut();
            assert_eq!(
                cuStreamEndCapture(stream, &mut none),
                CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
            );
            assert_eq!(cuGraphExecDestroy(exec), 0);
            assert_eq!(cuGraphDestroy(graph), 0);
            assert_eq!(cublasDestroy_v2(handle), 0);
            assert_eq!(cuStreamDestroy_v2(stream), 0);
        }
        for p in [a_dev, b_dev, c_dev] {
            assert_eq!(cuMemFree_v2(p), 0);
        }
    }

    #[test]
    fn a_module_gives_only_the_functions_its_ptx_declares_and_this_build_holds() {
        let mut module = std::ptr::null_mut();
        let mut f = std::ptr::null_mut();
        unsafe {
            assert_eq!(
                cuModuleLoadData(&mut module, ptx(&["add_f32", "not_ours"]).as_ptr().cast()),
                0
            );
            assert_eq!(cuModuleGetFunction(&mut f, module, c"add_f32".as_ptr()), 0);
            assert_eq!(
                cuModuleGetFunction(&mut f, module, c"silu_mul_f32".as_ptr()),
                CUDA_ERROR_NOT_FOUND
            );
            assert_eq!(
                cuModuleGetFunction(&mut f, module, c"not_ours".as_ptr()),
                CUDA_ERROR_NOT_FOUND
            );
            assert_eq!(
                cuModuleLoadData(&mut module, c"not ptx".as_ptr().cast()),
                CUDA_ERROR_INVALID_IMAGE
            );
        }
    }

    #[test]
    fn threads_that_miss_a_barrier_fail_the_launch() {
        let f = function("emu_test_divergent_barrier");
        let out = device(&[0i32; 256]);
        // None, all, some with thread 0 (the fibers' path), some without it (plain calls).
        let cases = [
            (0, 0, CUDA_SUCCESS),
            (0, 256, CUDA_SUCCESS),
            (0, 100, CUDA_ERROR_LAUNCH_FAILED),
            (100, 256, CUDA_ERROR_LAUNCH_FAILED),
        ];
        for (from, to, want) in cases {
            let (mut a, mut b, mut o) = (from as c_int, to as c_int, out);
            let mut params: Vec<*mut c_void> = vec![
                (&mut a as *mut c_int).cast(),
                (&mut b as *mut c_int).cast(),
                (&mut o as *mut u64).cast(),
            ];
            unsafe { assert_eq!(launch(f, 1, 256, &mut params), want, "threads {from}..{to}") };
        }
    }

    /// A vector or word read at an address its type's alignment does not divide fails the
    /// launch with the device's error, as it would on a GPU (where it faults), not only
    /// reads what lies there.
    #[test]
    fn a_misaligned_read_fails_the_launch_as_on_the_device() {
        let f = function("emu_test_vector_load");
        let bytes = device(&[1u8; 64]);
        let out = device(&[0u32; 32]);
        let cases = [
            (0, 0, CUDA_SUCCESS),
            (16, 4, CUDA_SUCCESS),
            (8, 0, CUDA_ERROR_MISALIGNED_ADDRESS),
            (4, 0, CUDA_ERROR_MISALIGNED_ADDRESS),
            (0, 2, CUDA_ERROR_MISALIGNED_ADDRESS),
        ];
        for (offset, word_offset, want) in cases {
            let (mut b, mut o, mut w, mut out_p) =
                (bytes, offset as c_int, word_offset as c_int, out);
            let mut params: Vec<*mut c_void> = vec![
                (&mut b as *mut u64).cast(),
                (&mut o as *mut c_int).cast(),
                (&mut w as *mut c_int).cast(),
                (&mut out_p as *mut u64).cast(),
            ];
            unsafe {
                assert_eq!(
                    launch(f, 1, 32, &mut params),
                    want,
                    "uint4 at {offset}, word at {word_offset}"
                )
            };
        }
        // The aligned launches read the bytes: four words of 0x01010101, and one more.
        assert_eq!(host::<u32>(out, 32), vec![5 * 0x0101_0101; 32]);
        for p in [bytes, out] {
            assert_eq!(cuMemFree_v2(p), 0);
        }
    }

    /// Kernels are compiled as NVRTC compiles them by default: `a * b + c` is one fused
    /// multiply-add (one rounding), while `__fmul_rn` is never fused with the add after it.
    #[test]
    fn a_plain_multiply_add_is_fused_and_an_rn_multiply_is_not() {
        if !std::arch::is_x86_feature_detected!("fma") {
            return; // built without FMA: nothing is fused (build.rs says so)
        }
        let f = function("emu_test_contraction");
        // a * b = 1 + 2^-11 + 2^-24 exactly, which rounds to 1 + 2^-11 (ties to even) in f32.
        let (mut a, mut b, mut c) = (1.0f32 + 2f32.powi(-12), 1.0f32 + 2f32.powi(-12), -1.0f32);
        let out = device(&[0f32; 3]);
        let mut o = out;
        let mut params: Vec<*mut c_void> = vec![
            (&mut a as *mut f32).cast(),
            (&mut b as *mut f32).cast(),
            (&mut c as *mut f32).cast(),
            (&mut o as *mut u64).cast(),
        ];
        unsafe { assert_eq!(launch(f, 1, 1, &mut params), 0) };
        let got = host::<f32>(out, 3);
        let fused = 2f32.powi(-11) + 2f32.powi(-24);
        assert_eq!(got[0], fused, "a * b + c as written");
        assert_eq!(got[1], 2f32.powi(-11), "__fmul_rn then +");
        assert_eq!(got[2], fused, "__fmaf_rn");
    }

    #[test]
    fn a_read_of_shared_memory_without_a_barrier_reads_a_stale_value() {
        let f = function("emu_test_neighbour");
        let (blocks, threads) = (4usize, 64usize);
        let want: Vec<i32> = (0..blocks * threads)
            .map(|i| ((i / threads) * 1000 + (i % threads + 1) % threads) as i32)
            .collect();
        for barrier in [1, 0] {
            let out = device(&vec![0i32; blocks * threads]);
            let (mut b, mut o) = (barrier as c_int, out);
            let mut params: Vec<*mut c_void> =
                vec![(&mut b as *mut c_int).cast(), (&mut o as *mut u64).cast()];
            unsafe { assert_eq!(launch(f, blocks as u32, threads as u32, &mut params), 0) };
            let got = host::<i32>(out, blocks * threads);
            if barrier == 1 {
                assert_eq!(got, want);
            } else {
                assert_ne!(got, want, "the race went unseen");
            }
        }
    }

    /// Blocks of one grid run in no set order on a GPU: a kernel that reads what another
    /// block of its grid wrote, with nothing between them, gives different results in two
    /// launches in a row here.
    #[test]
    fn a_read_of_another_blocks_write_changes_from_launch_to_launch() {
        let f = function("emu_test_previous_block");
        let blocks = 6usize;
        let mut results = Vec::new();
        for _ in 0..2 {
            let out = device(&vec![0i32; blocks]);
            let mut o = out;
            let mut params: Vec<*mut c_void> = vec![(&mut o as *mut u64).cast()];
            unsafe { assert_eq!(launch(f, blocks as u32, 32, &mut params), 0) };
            results.push(host::<i32>(out, blocks));
            assert_eq!(cuMemFree_v2(out), 0);
        }
        let ascending: Vec<i32> = (1..=blocks as i32).collect();
        let descending: Vec<i32> = (0..blocks).map(|b| if b == 0 { 2 } else { 1 }).collect();
        assert!(results.contains(&ascending), "{results:?}");
        assert!(results.contains(&descending), "{results:?}");
    }

    /// The warp-wide calls read their own warp's lanes only, in every block: matches by
    /// value, shuffles up by lane, counts of bits.
    #[test]
    fn warp_calls_see_their_own_warp() {
        let f = function("emu_test_warp_calls");
        let (blocks, threads) = (2usize, 96usize);
        let values: Vec<u32> = (0..blocks * threads)
            .map(|t| ((t * 7) % 5) as u32)
            .collect();
        let input = device(&values);
        let out = device(&vec![0u32; 3 * blocks * threads]);
        let (mut i, mut o) = (input, out);
        let mut params: Vec<*mut c_void> =
            vec![(&mut i as *mut u64).cast(), (&mut o as *mut u64).cast()];
        unsafe { assert_eq!(launch(f, blocks as u32, threads as u32, &mut params), 0) };
        let got = host::<u32>(out, 3 * blocks * threads);
        for t in 0..blocks * threads {
            let (warp0, lane) = (t / 32 * 32, t % 32);
            let same = (0..32)
                .filter(|&l| values[warp0 + l] == values[t])
                .fold(0u32, |m, l| m | 1 << l);
            let up = if lane >= 3 { values[t - 3] } else { values[t] };
            assert_eq!(
                got[3 * t..3 * t + 3],
                [same, up, same.count_ones()],
                "thread {t}"
            );
        }
    }

    #[test]
    fn copies_stay_inside_one_allocation_and_fresh_memory_is_nan() {
        let mut ptr = 0;
        let bytes = [0u8; 300];
        unsafe {
            assert_eq!(cuMemAlloc_v2(&mut ptr, 100), 0);
            assert_eq!(ptr % 256, 0);
            assert!(host::<f32>(ptr, 25).iter().all(|v| v.is_nan()));
            assert_eq!(cuMemcpyHtoD_v2(ptr, bytes.as_ptr().cast(), 100), 0);
            assert_eq!(
                cuMemcpyHtoD_v2(ptr, bytes.as_ptr().cast(), 101),
                CUDA_ERROR_INVALID_VALUE
            );
            let mut back = [0u8; 60];
            assert_eq!(
                cuMemcpyDtoH_v2(back.as_mut_ptr().cast(), ptr + 50, 60),
                CUDA_ERROR_INVALID_VALUE
            );
            assert_eq!(cuMemcpyDtoH_v2(back.as_mut_ptr().cast(), ptr + 40, 60), 0);
            assert_eq!(cuMemFree_v2(ptr), 0);
            assert_eq!(cuMemFree_v2(ptr), CUDA_ERROR_INVALID_VALUE);
        }
    }

    #[test]
    fn a_write_past_an_allocation_stops_the_process() {
        let mut ptr = 0;
        unsafe {
            assert_eq!(cuMemAlloc_v2(&mut ptr, 256), 0);
            let child = libc::fork();
            if child == 0 {
                // The byte after the allocation lies on the guard page.
                std::ptr::write_volatile((ptr + 256) as *mut u8, 1);
                libc::_exit(0);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV);
            // The last byte of the allocation is its own.
            std::ptr::write_volatile((ptr + 255) as *mut u8, 1);
            assert_eq!(cuMemFree_v2(ptr), 0);
        }
    }

    /// Two ranks of one unique id, each a thread, send each other a buffer in one group and
    /// receive the other's; a receive whose size differs from the send is an error.
    #[test]
    fn two_ranks_in_one_process_exchange_through_nccl() {
        let mut id = NcclUniqueId { internal: [0; 128] };
        unsafe { assert_eq!(ncclGetUniqueId(&mut id), 0) };
        let threads: Vec<_> = (0..2u8)
            .map(|rank| {
                std::thread::spawn(move || unsafe {
                    let mut comm = std::ptr::null_mut();
                    let config = std::ptr::null_mut();
                    assert_eq!(
                        ncclCommInitRankConfig(&mut comm, 2, id, rank.into(), config),
                        0
                    );
                    let mine = device(&[rank + 10; 64]);
                    let got = device(&[0u8; 64]);
                    let peer = c_int::from(1 - rank);
                    let none = std::ptr::null_mut();
                    assert_eq!(ncclGroupStart(), 0);
                    assert_eq!(ncclSend(mine as *const c_void, 16, 7, peer, comm, none), 0);
                    assert_eq!(ncclRecv(got as *mut c_void, 16, 7, peer, comm, none), 0);
                    assert_eq!(ncclGroupEnd(), 0);
                    let received = host::<u8>(got, 64);
                    assert!(received.iter().all(|&b| b == 11 - rank), "rank {rank}");
                    let mut error = -1;
                    assert_eq!(ncclCommGetAsyncError(comm, &mut error), 0);
                    assert_eq!(error, 0);
                    // A send of 64 bytes received as 32 is refused.
                    assert_eq!(ncclGroupStart(), 0);
                    assert_eq!(ncclSend(mine as *const c_void, 16, 7, peer, comm, none), 0);
                    assert_eq!(ncclRecv(got as *mut c_void, 8, 7, peer, comm, none), 0);
                    assert_ne!(ncclGroupEnd(), 0);
                    assert_eq!(ncclCommAbort(comm), 0);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn gemms_follow_cublas_column_major_definition() {
        // C (m x n) = A^T (A stored k x m) . B (k x n), A in bf16, then strided over 2 batches.
        let (m, n, k) = (3usize, 4usize, 5usize);
        let a: Vec<f32> = (0..2 * k * m).map(|i| i as f32 * 0.25 - 3.0).collect();
        let a_bf16: Vec<u16> = a
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let b: Vec<f32> = (0..2 * k * n).map(|i| 1.0 - i as f32 * 0.125).collect();
        let (a_dev, b_dev) = (device(&a_bf16), device(&b));
        let c_dev = device(&vec![f32::NAN; 2 * m * n]);
        let mut handle = std::ptr::null_mut();
        let (alpha, beta) = (1f32, 0f32);
        unsafe {
            assert_eq!(cublasCreate_v2(&mut handle), 0);
            let status = cublasGemmStridedBatchedEx(
                handle,
                1,
                0,
                m as c_int,
                n as c_int,
                k as c_int,
                (&alpha as *const f32).cast(),
                a_dev as *const c_void,
                14,
                k as c_int,
                (k * m) as i64,
                b_dev as *const c_void,
                0,
                k as c_int,
                (k * n) as i64,
                (&beta as *const f32).cast(),
                c_dev as *mut c_void,
                0,
                m as c_int,
                (m * n) as i64,
                2,
                68,
                -1,
            );
            assert_eq!(status, 0);
            // A leading dimension below the rows stored is refused, as cuBLAS does.
            let bad = cublasGemmEx(
                handle,
                1,
                0,
                m as c_int,
                n as c_int,
                k as c_int,
                (&alpha as *const f32).cast(),
                a_dev as *const c_void,
                14,
                (k - 1) as c_int,
                b_dev as *const c_void,
                0,
                k as c_int,
                (&beta as *const f32).cast(),
                c_dev as *mut c_void,
                0,
                m as c_int,
                68,
                -1,
            );
            assert_eq!(bad, 7);
            assert_eq!(cublasDestroy_v2(handle), 0);
        }
        let got = host::<f32>(c_dev, 2 * m * n);
        for batch in 0..2 {
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k)
                        .map(|l| a[batch * k * m + l + i * k] * b[batch * k * n + l + j * k])
                        .sum();
                    assert_eq!(
                        got[batch * m * n + i + j * m],
                        want,
                        "batch {batch} ({i}, {j})"
                    );
                }
            }
        }
    }
}
