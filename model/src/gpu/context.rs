//! The process's GPU: context, stream, cuBLAS handle and compiled kernels.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaStream};

use super::error::GpuError;
use super::kernels::Kernels;
use crate::device::{Device, DeviceError, DeviceInfo, ExpertGemm, GpuDtype};

/// Streams (each with its own cuBLAS handle) that the per-expert GEMMs of one batch are spread
/// over by default: one expert's GEMM is too small to fill an H200 (256 rows x 4096 outputs is
/// 32 tiles for 132 SMs), so several run at once.
pub const GEMM_LANES: usize = 4;
/// Lanes created (the benchmark sweeps up to this many).
pub const MAX_GEMM_LANES: usize = 16;

/// A side stream and the cuBLAS handle bound to it.
pub struct GemmLane {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
}

thread_local! {
    /// The context whose lock this thread holds (its address), 0 for none.
    static SERIAL_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// [`GpuContext::lock`]'s hold: the lock itself, or nothing where this thread held it already.
pub struct SerialGuard<'a> {
    _guard: Option<MutexGuard<'a, ()>>,
    previous: usize,
}

impl Drop for SerialGuard<'_> {
    fn drop(&mut self) {
        if self._guard.is_some() {
            SERIAL_HELD.with(|held| held.set(self.previous));
        }
    }
}

pub struct GpuContext {
    device: Device,
    name: String,
    dtype: GpuDtype,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    lanes: Vec<GemmLane>,
    lanes_in_use: AtomicUsize,
    kernels: Kernels,
    /// GEMMs through the exact, batch-invariant kernels (`--deterministic`).
    deterministic: AtomicBool,
    /// How a pass's expert GEMMs run where neither FP8 kept nor `--deterministic` picks our
    /// kernels (`--gpu-expert-gemm`, an [`crate::device::ExpertGemm`] code).
    expert_gemm: AtomicU8,
    /// Compute capability 8.0 or later: the `mma.sync` bf16 tensor-core instructions.
    tensor_cores: bool,
    /// The experts' gate/up pass and SiLU-and-multiply in one kernel where our own grouped
    /// kernels run it (FP8 kept as FP8, `--deterministic`); off only to compare.
    fused_silu: AtomicBool,
    /// One batch at a time: a cuBLAS handle must not be used from two threads at once, and
    /// the work of one stream runs in order anyway.
    serial: Mutex<()>,
    /// The dense part's decode steps as CUDA graphs (`--cuda-graphs`).
    cuda_graphs: AtomicBool,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("device", &self.device)
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// What [`Device::probe`] finds for GPU `ordinal`: that the driver loads, that the GPU exists,
/// its name and memory. Checked before anything else is called, since cudarc panics on a
/// missing library.
pub fn probe(device: Device, ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    // SAFETY: only tries to load the library; no CUDA call is made before it succeeds.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::NoDriver(device));
    }
    let cuda = |e: cudarc::driver::DriverError| DeviceError::Cuda {
        device,
        message: e.to_string(),
    };
    let count = CudaContext::device_count().map_err(cuda)?;
    if ordinal >= count.max(0) as usize {
        return Err(DeviceError::Cuda {
            device,
            message: format!("only {count} CUDA device(s) present"),
        });
    }
    let context = CudaContext::new(ordinal).map_err(cuda)?;
    Ok(DeviceInfo {
        device,
        name: context.name().map_err(cuda)?,
        memory_bytes: context.total_mem().map_err(cuda)? as u64,
    })
}

/// Whether the CUDA libraries the backend calls can be loaded (the driver is checked by
/// [`Device::probe`]).
pub fn check_libraries() -> Result<(), GpuError> {
    // SAFETY: these only try to open the shared libraries; nothing is called yet.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(GpuError::MissingLibrary("libcuda"));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(GpuError::MissingLibrary("libcublas"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(GpuError::MissingLibrary("libnvrtc"));
        }
    }
    Ok(())
}

/// Stream-ordered allocations (each batch's scratch: ~6 GB for a DeepSeek-V3 layer at 8192
/// tokens) come from the device's default pool, which by default gives its memory back to the
/// driver at every synchronisation, so every batch would map it again. Keeping it makes a
/// batch's allocations reuse the previous batch's memory (what PyTorch's caching allocator does).
fn keep_pool_memory(ctx: &CudaContext) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the pool handle is written by the driver for this context's device; the
    // attribute takes a u64 that outlives the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
        )
        .result()?;
    }
    Ok(())
}

impl GpuContext {
    /// Opens GPU `ordinal`, creates its stream and cuBLAS handle and compiles the kernels.
    pub fn open(ordinal: usize, dtype: GpuDtype) -> Result<Arc<Self>, GpuError> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal)?;
        keep_pool_memory(&ctx)?;
        let name = ctx.name()?;
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(Arc::clone(&stream))?;
        let lanes = (0..MAX_GEMM_LANES)
            .map(|_| {
                let stream = ctx.new_stream()?;
                let blas = CudaBlas::new(Arc::clone(&stream))?;
                Ok(GemmLane { stream, blas })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let capability = ctx.compute_capability()?;
        let kernels = Kernels::compile(&ctx, capability)?;
        tracing::info!(device = %Device::Cuda(ordinal), %name, %dtype, "GPU backend ready");
        Ok(Arc::new(Self {
            device: Device::Cuda(ordinal),
            name,
            dtype,
            stream,
            blas,
            lanes,
            lanes_in_use: AtomicUsize::new(GEMM_LANES),
            kernels,
            deterministic: AtomicBool::new(crate::device::process_gpu_deterministic()),
            expert_gemm: AtomicU8::new(crate::device::process_gpu_expert_gemm().code()),
            tensor_cores: capability.0 >= 8,
            fused_silu: AtomicBool::new(true),
            serial: Mutex::new(()),
            cuda_graphs: AtomicBool::new(crate::device::process_gpu_cuda_graphs()),
        }))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> GpuDtype {
        self.dtype
    }

    /// Whether GEMMs run batch-invariant ([`super::exact_gemm`]): a row's result the same
    /// whatever rows are computed with it.
    pub fn deterministic(&self) -> bool {
        self.deterministic.load(Ordering::Relaxed)
    }

    /// Runs later GEMMs batch-invariant (`on`) or through cuBLAS.
    pub fn set_deterministic(&self, on: bool) {
        self.deterministic.store(on, Ordering::Relaxed);
    }

    /// How a pass's expert GEMMs run (see [`crate::device::ExpertGemm`]).
    pub fn expert_gemm(&self) -> ExpertGemm {
        ExpertGemm::from_code(self.expert_gemm.load(Ordering::Relaxed))
    }

    /// Runs later passes' expert GEMMs as `mode` says.
    pub fn set_expert_gemm(&self, mode: ExpertGemm) {
        self.expert_gemm.store(mode.code(), Ordering::Relaxed);
    }

    /// Whether a pass's expert GEMMs go to cuBLAS in one grouped call.
    pub fn grouped_expert_gemm(&self) -> bool {
        self.expert_gemm() == ExpertGemm::Grouped
    }

    /// Whether bf16 experts run on our tensor-core kernel: asked for, on a GPU that has the
    /// instructions, and not `--deterministic` (whose exact kernels take precedence).
    pub fn tensor_core_experts(&self) -> bool {
        self.tensor_cores && !self.deterministic() && self.expert_gemm() == ExpertGemm::TensorCores
    }

    /// Whether the experts' gate/up pass fuses SiLU-and-multiply where our kernels run it.
    pub fn fused_silu(&self) -> bool {
        self.fused_silu.load(Ordering::Relaxed)
    }

    /// Fuses (`on`, the default) or runs the gate/up pass and SiLU-and-multiply apart (the
    /// results are the same bit for bit; to compare their cost).
    pub fn set_fused_silu(&self, on: bool) {
        self.fused_silu.store(on, Ordering::Relaxed);
    }

    /// Whether the dense part's decode steps run as CUDA graphs.
    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs.load(Ordering::Relaxed)
    }

    /// Runs later decode steps as CUDA graphs (`on`) or launches every kernel anew.
    pub fn set_cuda_graphs(&self, on: bool) {
        self.cuda_graphs.store(on, Ordering::Relaxed);
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `work`'s launches on the main stream captured as one CUDA graph, not run (call it with
    /// the context locked, as every launch is). cudarc's cross-stream event waits are off
    /// meanwhile: a capturing stream may not wait on an event recorded before its capture
    /// (`CUDA_ERROR_STREAM_CAPTURE_ISOLATION`), and work on one stream needs no event to keep
    /// its order. Synchronises first, so nothing queued before is still pending.
    pub fn capture_graph<E: From<GpuError>>(
        &self,
        work: impl FnOnce() -> Result<(), E>,
    ) -> Result<cudarc::driver::CudaGraph, E> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = &self.stream;
        stream
            .synchronize()
            .map_err(|e| E::from(GpuError::from(e)))?;
        let cuda = stream.context();
        let tracking = cuda.is_event_tracking();
        // SAFETY: while tracking is off only this capture's work is queued, on one stream
        // (its own order), after a synchronisation; tracking is restored before returning.
        unsafe { cuda.disable_event_tracking() };
        let worked = stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| E::from(GpuError::from(e)))
            .and_then(|()| {
                let done = work();
                let graph = stream.end_capture(CUgraphInstantiate_flags(0));
                done.and(graph.map_err(|e| E::from(GpuError::from(e))))
            });
        if tracking {
            // SAFETY: as it was before the capture.
            unsafe { cuda.enable_event_tracking() };
        }
        worked?.ok_or_else(|| E::from(GpuError::Shape("the capture gave no graph".into())))
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The lanes GEMMs are spread over now.
    pub(crate) fn lanes(&self) -> &[GemmLane] {
        let n = self
            .lanes_in_use
            .load(Ordering::Relaxed)
            .clamp(1, self.lanes.len());
        &self.lanes[..n]
    }

    /// Spreads the GEMMs of later batches over `n` lanes (1 to [`MAX_GEMM_LANES`]).
    pub fn set_gemm_lanes(&self, n: usize) {
        self.lanes_in_use
            .store(n.clamp(1, MAX_GEMM_LANES), Ordering::Relaxed);
    }

    /// Makes every lane wait for the work queued so far on the main stream.
    pub(crate) fn fork_lanes(&self) -> Result<(), GpuError> {
        for lane in self.lanes() {
            lane.stream.join(&self.stream)?;
        }
        Ok(())
    }

    /// Makes the main stream wait for everything queued on the lanes.
    pub(crate) fn join_lanes(&self) -> Result<(), GpuError> {
        for lane in self.lanes() {
            self.stream.join(&lane.stream)?;
        }
        Ok(())
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Exclusive use of the stream and cuBLAS handle for one batch, with the context made
    /// current on this thread (cuBLAS uses the thread's current context; a tokio blocking
    /// thread has none, or another GPU's). Reentrant on the thread that holds it: a CUDA
    /// graph's capture holds it throughout (no other thread's launch may join the capture)
    /// while each captured step takes it again.
    pub fn lock(&self) -> Result<SerialGuard<'_>, GpuError> {
        let me = self as *const Self as usize;
        let held = SERIAL_HELD.with(|held| held.get());
        let guard = if held == me {
            None
        } else {
            let guard = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            SERIAL_HELD.with(|held| held.set(me));
            Some(guard)
        };
        let serial = SerialGuard {
            _guard: guard,
            previous: held,
        };
        self.stream.context().bind_to_thread()?;
        Ok(serial)
    }

    /// Waits for all queued work; errors of earlier asynchronous work surface here.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}
