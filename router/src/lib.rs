//! `moe-router`: serves a MoE model. It runs the dense part (embeddings, attention and its KV
//! cache, norms, gates, shared experts, lm_head) and dispatches each MoE layer's tokens to the
//! expert nodes of the current placement.
//!
//! - [`args`]: command line.
//! - [`validation`] → [`scheduler`] (continuous batching, [`kv_blocks`], [`detokenize`]) →
//!   [`dispatch`] (data plane: gRPC streams or the epoch's [`collective`], planned by
//!   [`dispatch_plan`]) is the request path.
//! - [`planner`]: membership, placement epochs, readiness; [`cluster_view`] holds what it knows.
//! - [`server`]: the Inference and Admin gRPC services; [`http`]: the OpenAI-compatible API.
//! - [`request_trace`]: a request's OpenTelemetry spans.

pub mod admission;
pub mod api_keys;
pub mod args;
pub mod cluster_view;
pub mod collective;
pub mod detokenize;
pub mod dispatch;
pub mod dispatch_plan;
pub mod http;
pub mod kv_blocks;
pub mod metrics;
pub mod micro_batch;
pub mod planner;
pub mod request_trace;
pub mod scheduler;
pub mod server;
pub mod validation;
