//! What the CUDA backend can fail with: a library that does not load, a driver or cuBLAS
//! call that fails, kernels that do not compile, or a launch whose shapes do not fit its
//! buffers. Mapped once into [`ModelError`].

use crate::error::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{0} could not be loaded (put the CUDA libraries on LD_LIBRARY_PATH)")]
    MissingLibrary(&'static str),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    #[error("{0}")]
    Shape(String),
}

impl From<GpuError> for ModelError {
    fn from(e: GpuError) -> Self {
        ModelError::Gpu(e.to_string())
    }
}
