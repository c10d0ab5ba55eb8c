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
    #[error(
        "--device {device} ({name}) was found, but the CUDA model backend is not part of this \
         build yet; run with --device cpu"
    )]
    BackendMissing { device: Device, name: String },
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

    /// Opens the device for serving: the CPU, or an error saying why a GPU cannot be used.
    pub fn open_for_serving(self) -> Result<DeviceInfo, DeviceError> {
        let info = self.probe()?;
        match self {
            Device::Cpu => Ok(info),
            Device::Cuda(_) => Err(DeviceError::BackendMissing {
                device: self,
                name: info.name,
            }),
        }
    }
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
    }

    /// On a machine without a GPU (CI), asking for one is a clear error, with or without the
    /// `cuda` feature; with a GPU and the feature, the device is found but the backend is not
    /// there yet, which is also an error.
    #[test]
    fn asking_for_a_missing_gpu_is_an_error_not_a_panic() {
        assert!(Device::Cpu.open_for_serving().is_ok());
        let err = Device::Cuda(0).open_for_serving().unwrap_err();
        let expected = if cfg!(feature = "cuda") {
            matches!(
                err,
                DeviceError::NoDriver(_)
                    | DeviceError::Cuda { .. }
                    | DeviceError::BackendMissing { .. }
            )
        } else {
            err == DeviceError::NotCompiled(Device::Cuda(0))
        };
        assert!(expected, "{err}");
        let msg = Device::Cuda(7).open_for_serving().unwrap_err().to_string();
        assert!(msg.contains("cuda:7"), "{msg}");
    }
}
