//! `moe-capacity`: how a checkpoint would be laid out on GPU machines and how fast it would
//! serve, before anyone rents them (`moe plan`).
//!
//! - [`footprint`]: parameters and bytes by part, from the engine's own [`moe_model::ModelConfig`].
//! - [`gpu`] and [`efficiency`]: datasheet peaks, and the fractions kernels reach of them
//!   (published microbenchmarks, each named beside its figure).
//! - [`deployment`]: what is asked (machines, layout, workload) and the split of GPUs into
//!   attention GPUs (routers) and expert GPUs.
//! - [`kernels`], [`exchange`], [`step`]: the time of a decode or prefill step: roofline
//!   kernels, the bytes the data plane moves (its own frame sizes), micro-batch overlap.
//! - [`memory`] and [`plan`]: what each GPU holds, the batch that meets the time per output
//!   token, and the split with the most tokens/s.

pub mod deployment;
pub mod efficiency;
pub mod exchange;
pub mod footprint;
pub mod gpu;
pub mod kernels;
pub mod memory;
pub mod plan;
pub mod step;
#[cfg(test)]
mod test_support;

pub use deployment::{Deployment, Layout};
pub use efficiency::Efficiency;
pub use footprint::WeightFormat;
pub use gpu::{GpuKind, GpuOverrides};
pub use plan::{plan, Plan};
