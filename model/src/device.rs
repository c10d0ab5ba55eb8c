//! Where the math runs: `cpu` (the default) or `cuda:N`.
//!
//! The CUDA path is the `cuda` cargo feature (cudarc with dynamic loading, so it builds on
//! machines without the toolkit). Asking for a GPU where there is no driver, no such device, or
//! a build without the feature is a typed error at start-up, never a panic: cudarc panics when
//! libcuda is missing, so its presence is checked before any call.

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

/// What was found for a device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    pub device: Device,
    pub name: String,
    pub memory_bytes: u64,
}

impl Device {
    /// Checks that the device exists and can be used by this build.
    pub fn probe(self) -> Result<DeviceInfo, DeviceError> {
        match self {
            Device::Cpu => Ok(DeviceInfo {
                device: self,
                name: "cpu".into(),
                memory_bytes: 0,
            }),
            Device::Cuda(ordinal) => probe_cuda(self, ordinal),
        }
    }

    /// Opens the device for routed experts (expert nodes, the offline engine): the CPU, or the
    /// GPU with its kernels compiled, or an error saying why that GPU cannot be used.
    pub fn open_experts(
        self,
        dtype: GpuDtype,
    ) -> Result<crate::experts::ExpertDevice, DeviceError> {
        match self {
            Device::Cpu => Ok(crate::experts::ExpertDevice::Cpu),
            Device::Cuda(ordinal) => {
                self.probe()?;
                open_gpu(self, ordinal, dtype)
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(
    device: Device,
    _ordinal: usize,
    _dtype: GpuDtype,
) -> Result<crate::experts::ExpertDevice, DeviceError> {
    Err(DeviceError::NotCompiled(device))
}

#[cfg(feature = "cuda")]
fn open_gpu(
    device: Device,
    ordinal: usize,
    dtype: GpuDtype,
) -> Result<crate::experts::ExpertDevice, DeviceError> {
    crate::gpu::GpuContext::open(ordinal, dtype)
        .map(crate::experts::ExpertDevice::Gpu)
        .map_err(|e| DeviceError::Cuda {
            device,
            message: e.to_string(),
        })
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda(device: Device, _ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    Err(DeviceError::NotCompiled(device))
}

#[cfg(feature = "cuda")]
fn probe_cuda(device: Device, ordinal: usize) -> Result<DeviceInfo, DeviceError> {
    // SAFETY: only tries to load the library; no CUDA call is made before it succeeds.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(DeviceError::NoDriver(device));
    }
    let cuda = |e: cudarc::driver::DriverError| DeviceError::Cuda {
        device,
        message: e.to_string(),
    };
    let count = cudarc::driver::CudaContext::device_count().map_err(cuda)?;
    if ordinal >= count.max(0) as usize {
        return Err(DeviceError::Cuda {
            device,
            message: format!("only {count} CUDA device(s) present"),
        });
    }
    let context = cudarc::driver::CudaContext::new(ordinal).map_err(cuda)?;
    Ok(DeviceInfo {
        device,
        name: context.name().map_err(cuda)?,
        memory_bytes: context.total_mem().map_err(cuda)? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// On a machine without a GPU (CI), asking for one is a clear error, with or without the
    /// `cuda` feature.
    #[test]
    fn asking_for_a_missing_gpu_is_an_error_not_a_panic() {
        assert!(Device::Cpu.probe().is_ok());
        let err = Device::Cuda(0).open_experts(GpuDtype::Bf16).err();
        let expected = match &err {
            None => cfg!(feature = "cuda"), // a machine with a GPU and the feature
            Some(e) if cfg!(feature = "cuda") => {
                matches!(e, DeviceError::NoDriver(_) | DeviceError::Cuda { .. })
            }
            Some(e) => *e == DeviceError::NotCompiled(Device::Cuda(0)),
        };
        assert!(expected, "{err:?}");
        assert!(Device::Cpu.open_experts(GpuDtype::Bf16).is_ok());
        let msg = Device::Cuda(7)
            .open_experts(GpuDtype::Bf16)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("cuda:7"), "{msg}");
    }
}
