//! `moe-router`: serves a MoE model. It runs the dense part (embeddings, attention and its KV
//! cache, norms, gates, shared experts, lm_head) and dispatches each MoE layer's tokens to the
//! expert nodes of the current placement.
//!
//! - [`args`]: command line.
//! - [`validation`] → [`scheduler`] (continuous batching, [`kv_blocks`], [`prefix_cache`],
//!   [`detokenize`], drafts by [`speculative`]) →
//!   [`expert_reach`] (the cluster's nodes, or `--in-process-nodes`) →
//!   [`dispatch`] is the request path: [`dispatch_plan`] says what each node gets,
//!   [`layer_exchange`] sends it over the nodes' [`node_link`] streams or the epoch's
//!   [`collective`], and dispatch places the answers, retries and falls back.
//! - [`planner`]: membership, placement epochs, readiness; [`cluster_view`] holds what it knows.
//! - [`server`]: the Inference and Admin gRPC services ([`inference_access`]: API keys, or
//!   the cluster proof a gateway brings, and the router's `moe-openai` generator); the
//!   OpenAI-compatible API itself is the `moe-openai` crate, which gateways serve too.
//! - [`request_trace`]: a request's OpenTelemetry spans.
//! - [`error`]: why a request is refused or fails, one enum turned into a gRPC status or an
//!   OpenAI HTTP error only at the edges.
//! - [`request_metrics`]: what the request path records; [`metrics`]: the Prometheus page.

pub mod admission;
pub mod api_keys;
pub mod args;
pub mod cluster_view;
pub mod collective;
pub mod detokenize;
pub mod dispatch;
pub mod dispatch_plan;
pub mod error;
pub mod expert_reach;
pub mod generation_defaults;
pub mod inference_access;
pub mod kv_blocks;
pub mod layer_exchange;
pub mod load_window;
pub mod metrics;
pub mod micro_batch;
pub mod node_link;
pub mod planner;
pub mod prefix_cache;
pub mod published_load;
pub mod request_metrics;
pub mod request_trace;
pub mod scheduler;
pub mod server;
pub use moe_model::speculative;
pub mod structured;
pub mod validation;
