//! [`ExpertBackend`]: how a dense part reaches the routed experts of a MoE layer, whoever holds
//! them. It hands over rows and their [`ExpertRoutes`] and takes back one weighted row per
//! (row, expert) pair; the offline engine's [`crate::experts::ExpertSet`] runs them here, the
//! router dispatches them to expert nodes. Every dense part (CPU, device, GPU) depends on this
//! trait only, never on where the experts are.

use crate::error::Result;
use crate::routes::ExpertRoutes;

/// Runs routed experts for a MoE layer. The offline engine's [`crate::experts::ExpertSet`]
/// implements it; the router implements it by dispatching to expert nodes.
pub trait ExpertBackend: Sync {
    /// Returns `[routes.pairs(), hidden]`: each pair's expert output times its weight.
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>>;

    /// Whether `expert` of `layer` can run here: an expert node checks every pair of a batch
    /// with it before running or allocating anything. Backends that reach every expert (the
    /// router's) keep the default.
    fn holds(&self, _layer: usize, _expert: usize) -> bool {
        true
    }

    /// Whether every expert here rounds its input rows to bf16 (to nearest, ties to even)
    /// before its first GEMM, as GPU experts in `--gpu-dtype bf16` do: rows that arrive
    /// already rounded then give bitwise the same outputs, so a collective may carry them in
    /// half the bytes. A node refuses bf16 rows unless this holds.
    fn reads_rows_as_bf16(&self) -> bool {
        false
    }

    /// [`ExpertBackend::run_experts`] on rows received in host memory as bf16 (`bytes`, two
    /// little-endian bytes a value; only called where [`ExpertBackend::reads_rows_as_bf16`]
    /// holds): a GPU set uploads them as they are, half the bytes of f32, and its experts read
    /// them without converting. `None` widens them to f32 on the host for `run_experts`.
    fn run_bf16_host_rows(
        &self,
        _layer: usize,
        _bytes: &[u8],
        _routes: &ExpertRoutes,
    ) -> Option<Result<Vec<f32>>> {
        None
    }

    /// [`ExpertBackend::run_experts`] on rows already in device memory (as NCCL received
    /// them), returning the outputs there too, so a node's rows never cross to the host.
    /// `None` when this backend's experts are not on the GPU that holds `rows`.
    #[cfg(feature = "cuda")]
    fn run_experts_on_device(
        &self,
        _layer: usize,
        _rows: &cudarc::driver::CudaSlice<f32>,
        _routes: &ExpertRoutes,
    ) -> Option<Result<cudarc::driver::CudaSlice<f32>>> {
        None
    }

    /// [`ExpertBackend::run_experts_on_device`] on `values` bf16 values received in device
    /// memory, two to a word of `rows` (only called where
    /// [`ExpertBackend::reads_rows_as_bf16`] holds). `None` sends them through host memory.
    #[cfg(feature = "cuda")]
    fn run_bf16_rows_on_device(
        &self,
        _layer: usize,
        _rows: &cudarc::driver::CudaSlice<f32>,
        _values: usize,
        _routes: &ExpertRoutes,
    ) -> Option<Result<cudarc::driver::CudaSlice<f32>>> {
        None
    }

    /// Whether `layer`'s routed experts can run from the gate's choices on `ctx`'s device
    /// ([`ExpertBackend::run_choices_on_device`]): every one of its `num_experts` experts here,
    /// on that context, in a form whose grouped launch plans its rows on the device and keeps
    /// rows from changing each other's results. May upload what those launches read, so it is
    /// called before a step's work is captured, never inside a capture.
    #[cfg(feature = "cuda")]
    fn prepare_choices_on_device(
        &self,
        _layer: usize,
        _num_experts: usize,
        _ctx: &crate::gpu::GpuContext,
    ) -> Result<bool> {
        Ok(false)
    }

    /// `layer`'s routed experts on `rows`, from the gate's choices on the device, after
    /// [`ExpertBackend::prepare_choices_on_device`] said yes: `pair_out[r * top_k + j]` is row
    /// r's j-th choice in ascending expert id, its output times its weight. Launches only, on
    /// the context's stream.
    #[cfg(feature = "cuda")]
    fn run_choices_on_device(
        &self,
        _layer: usize,
        _rows: &cudarc::driver::CudaSlice<f32>,
        _choices: &crate::gpu::device_routes::DeviceChoices<'_>,
        _pair_out: &mut cudarc::driver::CudaSlice<f32>,
    ) -> Result<()> {
        Err(crate::error::ModelError::ExpertBackend(
            "these experts do not run from the gate's choices on a device".into(),
        ))
    }
}
