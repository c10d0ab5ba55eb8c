//! Opening a [`Device`]: the one place that turns `--device` into what the math runs on, the
//! CPU or a GPU context with its kernels compiled. It sits above both the CPU code and the
//! CUDA code (`gpu`), which is why these methods of [`Device`] are defined here and not beside
//! the type: `device` stays a leaf that the CUDA code imports.

use crate::device::{Device, DeviceError, DeviceInfo, GpuDtype};
use crate::experts::ExpertDevice;

impl Device {
    /// Checks that the device exists and can be used by this build.
    pub fn probe(self) -> Result<DeviceInfo, DeviceError> {
        match self {
            Device::Cpu => Ok(DeviceInfo {
                device: self,
                name: "cpu".into(),
                memory_bytes: 0,
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => crate::gpu::context::probe(self, ordinal),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(DeviceError::NotCompiled(self)),
        }
    }

    /// Opens the device for routed experts (expert nodes, the offline engine): the CPU, or the
    /// GPU with its kernels compiled, or an error saying why that GPU cannot be used.
    pub fn open_experts(self, dtype: GpuDtype) -> Result<ExpertDevice, DeviceError> {
        match self {
            Device::Cpu => Ok(ExpertDevice::Cpu),
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
) -> Result<ExpertDevice, DeviceError> {
    Err(DeviceError::NotCompiled(device))
}

#[cfg(feature = "cuda")]
fn open_gpu(device: Device, ordinal: usize, dtype: GpuDtype) -> Result<ExpertDevice, DeviceError> {
    crate::gpu::GpuContext::open(ordinal, dtype)
        .map(ExpertDevice::Gpu)
        .map_err(|e| DeviceError::Cuda {
            device,
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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
