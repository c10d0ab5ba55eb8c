//! `moe-proto`: the cluster's gRPC contracts, generated from `proto/moe/v1/*.proto`.
//!
//! - `Inference` (public): Generate (server streaming), Tokenize, ModelInfo.
//! - `Admin` (operators): ClusterStatus, Drain, DrainRouter.
//! - `Gateway` (operators of a `moe-gateway`): Routers, DrainRouter.
//! - `ExpertData` (internal): the router-to-expert-node data plane, one bidirectional stream
//!   per (router, node), tensors as little-endian bytes.

pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// Encoded `FileDescriptorSet` of every file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("moe_descriptor");

/// The status message (after `UNAVAILABLE`) with which a draining router ends a gateway's
/// stream: the gateway resumes the request on another router. Part of the contract between
/// the two, as the messages are.
pub const ROUTER_DRAINING: &str = "router draining: the request moves to another router";
