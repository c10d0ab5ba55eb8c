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
//!   [`routes::ExpertRoutes`] and the [`experts::ExpertBackend`] trait.
//! - [`engine::Engine`] puts both in one process with a tokenizer and a batched generation
//!   loop; [`sampling`] picks tokens; [`generator`] writes random checkpoints for tests and
//!   benchmarks.
//! - [`device`] picks where the math runs; with the `cuda` feature, `gpu` runs routed experts
//!   on a GPU (cuBLAS, NVRTC kernels).

pub mod backend;
pub mod batch;
pub mod chat_template;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod dense;
pub mod device;
pub mod device_dense;
pub mod engine;
pub mod error;
pub mod experts;
pub mod families;
pub mod generator;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod grouped_ffn;
pub mod kv_cache;
pub mod layers;
pub mod routes;
pub mod sampling;
pub mod tokenizer;

pub use config::{Family, ModelConfig};
/// The CUDA bindings the GPU path is built on, for the crates above (NCCL lives in `cluster`).
#[cfg(feature = "cuda")]
pub use cudarc;
pub use engine::{Engine, FinishReason, GenerateOutput, GenerateRequest};
pub use error::{ModelError, Result};
pub use sampling::SamplingParams;
