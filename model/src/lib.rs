//! `moe-model`: everything about a Mixture-of-Experts model that runs in one process.
//!
//! - [`config`] reads a Hugging Face `config.json` into a typed [`config::ModelConfig`].
//! - [`checkpoint`] memory-maps safetensors (single or sharded, f32/bf16/f16/fp8) and loads
//!   tensors by name and shape.
//! - [`backend`] is the CPU math: a packed, batch-invariant GEMM and row kernels.
//! - [`layers`] builds attention (GQA, MLA), MLPs and the MoE gate from those tensors;
//!   [`families`] says where each family keeps them.
//! - [`dense::DenseModel`] is the dense part of the model (what the router runs) and
//!   [`experts::ExpertSet`] holds routed experts (what an expert node runs); they meet through
//!   [`routes::ExpertRoutes`] and the [`expert_backend::ExpertBackend`] trait. A step of any
//!   dense part is a [`dense_step::DenseStep`].
//! - [`engine::Engine`] puts both in one process with a tokenizer and a batched generation
//!   loop; [`sampling`] picks tokens; [`generator`] writes random checkpoints for tests and
//!   benchmarks.
//!
//! By device, bottom up: [`device`] names where the math runs and how a GPU holds numbers, and
//! [`device::shapes`] the shapes of device steps; both import nothing else of the crate but
//! the checkpoint, so the CPU code and the CUDA code both stand on them and never on each
//! other. [`grouped_ffn`] (routed experts) and [`device_dense`] (the dense part) write the
//! device orchestration once over step traits, with host references of every step; with the
//! `cuda` feature, `gpu` implements those steps with cuBLAS and NVRTC kernels. Above them,
//! [`experts::ExpertSet`] and [`dense::load_dense`] choose the CPU or the GPU, and opening a
//! device (`Device::probe`, `Device::open_experts`) is defined above both, in `open_device`.

pub mod backend;
pub mod batch;
pub mod chat_template;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod counter_hash;
pub mod dense;
pub mod dense_step;
pub mod device;
pub mod device_dense;
pub mod engine;
pub mod error;
pub mod expert_backend;
pub mod experts;
pub mod families;
pub mod generation_config;
pub mod generator;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod grouped_ffn;
pub mod kv_cache;
pub mod kv_pool;
pub mod layers;
pub mod logit_adjust;
pub mod mtp;
pub mod ngram_draft;
pub mod nucleus;
pub mod offline_drafts;
mod open_checkpoint;
mod open_device;
pub mod race;
pub mod routes;
pub mod sampling;
pub mod speculative;
#[cfg(test)]
mod test_support;
pub mod token_mask;
pub mod tokenizer;

pub use config::{Family, ModelConfig};
/// The CUDA bindings the GPU path is built on, for the crates above (NCCL lives in `cluster`).
#[cfg(feature = "cuda")]
pub use cudarc;
pub use engine::{Engine, FinishReason, GenerateOutput, GenerateRequest};
pub use error::{ModelError, Result};
pub use logit_adjust::LogitAdjustments;
pub use sampling::SamplingParams;
