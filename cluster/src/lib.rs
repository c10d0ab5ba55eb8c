//! `moe-cluster`: what the router and the expert nodes share.
//!
//! - [`keys`] is the etcd key layout under `/moe/<cluster>/`.
//! - [`lease`] keeps one lease alive with the keys a process publishes on it (and the planner
//!   election); [`membership`] builds node and router registrations on it and reads the
//!   cluster's live members, drain requests and suspect reports in one snapshot.
//! - [`placement`] is the expert placement: which node holds which `(layer, expert)`, under a
//!   monotonically increasing epoch, planned by the router and written in a guarded transaction.
//! - [`auth`] is the cluster token (`--cluster-token-file`) and the proofs members exchange.
//! - [`dispatch_rules`] is what a node accepts in a dispatch (batch bound, top-k, held experts),
//!   checked on the frame's bytes before anything is allocated for it.
//! - [`exposure`] holds the cluster-credential flags and refuses to start a process that
//!   would serve beyond loopback without them.
//! - [`frames`] encodes and validates the data-plane messages (`DispatchBatch`,
//!   `CombineBatch`): tensors as little-endian bytes, every length checked before use.

pub mod auth;
pub mod collective;
pub mod config;
pub mod dispatch_rules;
pub mod error;
pub mod exposure;
pub mod frames;
pub mod keys;
pub mod lease;
pub mod listener;
pub mod load;
pub mod local;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod telemetry;
pub mod tls;
pub mod watch;

pub use config::{EtcdArgs, EtcdConnection};
pub use error::ClusterError;
pub use keys::ClusterKeys;
pub use membership::{NodeRecord, NodeRegistration, NodeState, RouterRecord, RouterRegistration};
pub use placement::{Placement, PlacementStore};
