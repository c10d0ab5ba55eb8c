//! `moe-gateway`: one front door for many routers. Routers keep the KV cache and the request
//! state, so a router that dies takes its streams with it; the gateway holds none of that,
//! only the token ids it has sent, and moves such a stream to another router which resumes it
//! exactly (see `relay`).
//!
//! - [`args`]: command line.
//! - [`router_set`]: the routers registered in etcd, their channels and counters;
//!   [`probes`]: their active health checks.
//! - [`policy`]: which router gets a new request (`cache-aware`, `least-load`,
//!   `round-robin`).
//! - [`intake`]: what a request gets before its first router (a seed, a span, block hashes);
//!   [`relay`]: one request carried across routers.
//! - [`service`]: the public gRPC services; [`openai`]: the OpenAI HTTP API (`moe-openai`, which
//!   routers serve too, over the relay), whose context and chats' default `max_tokens`
//!   follow the routers' ([`published_limits`]); [`metrics`]: the Prometheus page.

pub mod args;
pub mod intake;
pub mod metrics;
pub mod openai;
pub mod policy;
pub mod probes;
pub mod published_limits;
pub mod relay;
pub mod router_set;
pub mod service;
