//! Where the math runs and how a device holds its numbers: the types that the CPU code, the
//! device-generic dense part (`device_dense`) and the CUDA code (`gpu`, feature `cuda`) all
//! import, and that import none of them.
//!
//! - [`Device`]: `cpu` (the default) or `cuda:N`, as `--device` names it.
//! - [`GpuDtype`] and [`MatrixPrecision`]: how a GPU holds weights and GEMM inputs.
//! - [`shapes`]: the shapes device steps are called with (cuBLAS GEMMs, head views, attention);
//!   [`grouped_tiles`]: the row tiles of a grouped GEMM over every expert of a layer;
//!   [`row_gemm`]: the exact, batch-invariant GEMM of `--deterministic`, in row terms.
//!
//! Opening a device (probing the driver, compiling kernels) is `Device::probe` and
//! `Device::open_experts`, defined in `open_device` above the CUDA code, so that this module
//! stays a leaf. A GPU asked for where there is no driver, no such device, or a build without
//! the `cuda` feature is a typed [`DeviceError`] at start-up, never a panic.

pub mod grouped_tiles;
pub mod route_plan;
pub mod row_gemm;
pub mod shapes;

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected cpu, cuda or cuda:N")]
    Unknown(String),
    #[error("--device {0}: this build has no CUDA support (build with --features cuda)")]
    NotCompiled(Device),
    #[error("--device {0}: no CUDA driver found (libcuda could not be loaded)")]
    NoDriver(Device),
    #[error("--device {device}: {message}")]
    Cuda { device: Device, message: String },
    #[error("unknown GPU dtype {0:?}: expected bf16x2, bf16 or f32")]
    UnknownDtype(String),
}

/// How weights and GEMM inputs are held on a GPU (accumulation and outputs are f32 always).
///
/// `Bf16x2` is the default because plain bf16 activations do not reproduce the float32
/// reference: measured on the bundled fixtures (the `bf16_device_numerics` golden test, which
/// emulates both on the host), bf16 GEMM inputs move logits by 0.03 to 0.16, and where a
/// token's gate scores are close, flip its experts and move logits by several units;
/// splitting each activation into two bf16 terms keeps them within 2e-4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuDtype {
    /// bf16 weights (half the memory of f32, tensor cores), each GEMM input split into
    /// `hi + lo` bf16 terms (two tensor-core GEMMs into one f32 output): near-f32 results.
    /// Costs up to twice the GEMM work where it is compute-bound (prefill, large expert
    /// batches); little in memory-bound decode.
    #[default]
    Bf16x2,
    /// bf16 weights and GEMM inputs: the fastest, not the reference's numerics.
    Bf16,
    /// f32 weights and inputs, cuBLAS's true-f32 path (no TF32).
    F32,
}

impl GpuDtype {
    /// Whether weights are held in bf16 (both bf16 modes).
    pub fn bf16_weights(self) -> bool {
        matches!(self, GpuDtype::Bf16 | GpuDtype::Bf16x2)
    }
}

impl fmt::Display for GpuDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuDtype::Bf16x2 => "bf16x2",
            GpuDtype::Bf16 => "bf16",
            GpuDtype::F32 => "f32",
        })
    }
}

impl FromStr for GpuDtype {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bf16x2" => Ok(GpuDtype::Bf16x2),
            "bf16" | "bfloat16" => Ok(GpuDtype::Bf16),
            "f32" | "float32" => Ok(GpuDtype::F32),
            _ => Err(DeviceError::UnknownDtype(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

/// How a GPU holds the routed experts of an FP8 checkpoint (`--gpu-fp8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuFp8 {
    /// Widened at load (f32, as `MatrixPrecision::Wide` says): what every GPU check so far
    /// has run.
    #[default]
    Widen,
    /// Kept as FP8 (bytes and scales: `gpu::fp8_gemm`), widened in the GEMM kernel, whose
    /// products are bitwise the CPU's. Experimental until `ops/gpu-check.sh` has run it.
    Keep,
}

impl fmt::Display for GpuFp8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuFp8::Widen => "widen",
            GpuFp8::Keep => "keep",
        })
    }
}

impl FromStr for GpuFp8 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "widen" => Ok(GpuFp8::Widen),
            "keep" => Ok(GpuFp8::Keep),
            _ => Err(format!("unknown --gpu-fp8 {s:?}: expected widen or keep")),
        }
    }
}

static PROCESS_GPU_FP8: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every GPU expert set this process loads hold FP8 experts as `mode` says.
pub fn set_process_gpu_fp8(mode: GpuFp8) {
    PROCESS_GPU_FP8.store(mode == GpuFp8::Keep, std::sync::atomic::Ordering::Relaxed);
}

pub fn process_gpu_fp8() -> GpuFp8 {
    match PROCESS_GPU_FP8.load(std::sync::atomic::Ordering::Relaxed) {
        true => GpuFp8::Keep,
        false => GpuFp8::Widen,
    }
}

/// How a GPU runs a layer's per-expert GEMMs (`--gpu-expert-gemm`), where neither FP8 kept as
/// FP8 nor `--deterministic` sends them to our own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertGemm {
    /// One cuBLAS `GemmEx` per expert, spread over the context's GEMM lanes (streams): what
    /// every GPU check so far has run.
    #[default]
    Lanes,
    /// Every expert of a pass in one `cublasGemmGroupedBatchedEx` call (one launch, whatever
    /// the number of experts). Experimental until `ops/gpu-check.sh bench` has measured it.
    Grouped,
    /// Every expert of a pass in one launch of our own tensor-core kernel (bf16 experts, and
    /// FP8 ones kept as FP8, in the `bf16` and `bf16x2` modes, compute capability 8.0 or
    /// later): batch-invariant, its
    /// row counts read on the device (so a decode step's experts can be part of its CUDA
    /// graph), SiLU-and-multiply fused into the gate/up pass. Experimental until
    /// `ops/gpu-check.sh` has run it on a GPU. The dense part's FP8 projections (kept as FP8)
    /// run on the same kernel.
    TensorCores,
}

impl fmt::Display for ExpertGemm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExpertGemm::Lanes => "lanes",
            ExpertGemm::Grouped => "grouped",
            ExpertGemm::TensorCores => "tensor-cores",
        })
    }
}

impl FromStr for ExpertGemm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|mode| mode.to_string() == wanted)
            .ok_or_else(|| {
                format!("unknown --gpu-expert-gemm {s:?}: expected lanes, grouped or tensor-cores")
            })
    }
}

static PROCESS_GPU_EXPERT_GEMM: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Makes every GPU this process opens run its experts' GEMMs as `mode` says.
pub fn set_process_gpu_expert_gemm(mode: ExpertGemm) {
    PROCESS_GPU_EXPERT_GEMM.store(mode.code(), std::sync::atomic::Ordering::Relaxed);
}

pub fn process_gpu_expert_gemm() -> ExpertGemm {
    ExpertGemm::from_code(PROCESS_GPU_EXPERT_GEMM.load(std::sync::atomic::Ordering::Relaxed))
}

impl ExpertGemm {
    const ALL: [ExpertGemm; 3] = [
        ExpertGemm::Lanes,
        ExpertGemm::Grouped,
        ExpertGemm::TensorCores,
    ];

    /// The mode as one byte, for the atomics that hold it.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The mode of [`ExpertGemm::code`] (an unknown byte: the default).
    pub fn from_code(code: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|mode| mode.code() == code)
            .unwrap_or_default()
    }
}

static PROCESS_GPU_DETERMINISTIC: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes every GPU this process opens run its GEMMs batch-invariant (`--deterministic`: the
/// exact kernels of `gpu::exact_gemm` instead of cuBLAS's).
pub fn set_process_gpu_deterministic(on: bool) {
    PROCESS_GPU_DETERMINISTIC.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn process_gpu_deterministic() -> bool {
    PROCESS_GPU_DETERMINISTIC.load(std::sync::atomic::Ordering::Relaxed)
}

static PROCESS_GPU_CUDA_GRAPHS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Makes every GPU this process opens run the dense part's decode steps as CUDA graphs
/// (`--cuda-graphs`).
pub fn set_process_gpu_cuda_graphs(on: bool) {
    PROCESS_GPU_CUDA_GRAPHS.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn process_gpu_cuda_graphs() -> bool {
    PROCESS_GPU_CUDA_GRAPHS.load(std::sync::atomic::Ordering::Relaxed)
}

/// What was found for a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub device: Device,
    pub name: String,
    pub memory_bytes: u64,
}

/// What a matrix comes from, which decides how the device holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixPrecision {
    /// bf16 checkpoint tensors: bf16 in both bf16 modes, f32 in the f32 mode.
    Narrow,
    /// Wider tensors (f16, f32, and FP8 with its block scales, whose products bf16 cannot
    /// hold): f32 except in the plain bf16 mode, which casts them (a bf16 copy would change
    /// the model, which bf16x2 promises not to do).
    Wide,
    /// Always f32: the MoE gate, whose top-k choices flip on small errors (transformers
    /// computes DeepSeek's gate in f32 too).
    F32,
}

impl MatrixPrecision {
    /// The precision of a matrix made of these checkpoint tensors.
    pub fn of(ckpt: &crate::checkpoint::Checkpoint, names: &[&str]) -> Self {
        if names.iter().all(|n| ckpt.narrow_as_bf16(n)) {
            MatrixPrecision::Narrow
        } else {
            MatrixPrecision::Wide
        }
    }

    /// Whether the matrix is held in bf16 under `numerics` (else f32).
    pub fn in_bf16(self, numerics: GpuDtype) -> bool {
        !matches!(
            (self, numerics),
            (MatrixPrecision::F32, _)
                | (_, GpuDtype::F32)
                | (MatrixPrecision::Wide, GpuDtype::Bf16x2)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpu_fp8_modes() {
        assert_eq!("keep".parse(), Ok(GpuFp8::Keep));
        assert_eq!(" Widen".parse(), Ok(GpuFp8::Widen));
        assert!("fp8".parse::<GpuFp8>().is_err());
        assert_eq!(GpuFp8::default().to_string(), "widen");
    }

    #[test]
    fn parses_expert_gemm_modes() {
        assert_eq!("grouped".parse(), Ok(ExpertGemm::Grouped));
        assert_eq!(" LANES".parse(), Ok(ExpertGemm::Lanes));
        assert!("cutlass".parse::<ExpertGemm>().is_err());
        for mode in ExpertGemm::ALL {
            assert_eq!(mode.to_string().parse(), Ok(mode));
            assert_eq!(ExpertGemm::from_code(mode.code()), mode);
        }
        assert_eq!("Tensor-Cores".parse(), Ok(ExpertGemm::TensorCores));
        assert_eq!(ExpertGemm::default().to_string(), "lanes");
    }

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("CUDA:3".parse(), Ok(Device::Cuda(3)));
        assert!(matches!(
            "cuda:x".parse::<Device>(),
            Err(DeviceError::Unknown(_))
        ));
        assert!(matches!(
            "tpu".parse::<Device>(),
            Err(DeviceError::Unknown(_))
        ));
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
        assert_eq!("BF16".parse(), Ok(GpuDtype::Bf16));
        assert_eq!("f32".parse(), Ok(GpuDtype::F32));
        assert_eq!("bf16x2".parse(), Ok(GpuDtype::Bf16x2));
        assert_eq!(GpuDtype::default().to_string(), "bf16x2");
        assert!(matches!(
            "fp8".parse::<GpuDtype>(),
            Err(DeviceError::UnknownDtype(_))
        ));
    }
}
