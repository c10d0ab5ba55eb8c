//! The router's dense part on a device (`--device cuda:N`): attention with its KV cache,
//! norms, the MoE gate, shared experts and lm_head, with weights, cache and activations kept on
//! the device.
//!
//! - [`ops`]: the primitive steps ([`ops::DenseOps`]): GEMMs (strided-batched), RMSNorm,
//!   rotary, append to the cache, attention, gating top-k, combine.
//! - [`model`]: the forward pass written once over those steps ([`DeviceDenseModel`]);
//!   [`attention`]: its GQA and MLA layers.
//! - [`pool`]: the KV cache on the device, one pool of blocks numbered as the host pool's
//!   (block tables, shared prefixes); [`weights`]: matrices from checkpoint tensors (FP8 kept
//!   as FP8 where the device keeps it).
//! - [`reference`](mod@reference): every step on the host, by its definition (and with the GPU's bf16
//!   rounding): what the CUDA steps are tested against, and the orchestration's CI check.
//!
//! The CUDA steps are `gpu::dense_ops`; the tests run the same orchestration over a host
//! reference of every step and compare with the CPU model, on every machine.

pub mod attention;
pub mod model;
pub mod ops;
pub mod pool;
pub mod reference;
pub mod weights;

pub use model::DeviceDenseModel;
pub use ops::DenseOps;
