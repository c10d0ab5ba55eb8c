//! `moe-cluster`: what the router and the expert nodes share.
//!
//! - [`keys`] is the etcd key layout under `/moe/<cluster>/`.
//! - [`lease`] keeps one lease alive with the keys a process publishes on it (and the planner
//!   election); [`membership`] builds node and router registrations on it and reads the
//!   cluster's live members, drain requests and suspect reports in one snapshot.
//! - [`placement`] is the expert placement: which node holds which `(layer, expert)`, under a
//!   monotonically increasing epoch, planned by the router and written in a guarded transaction.
//! - [`frames`] encodes and validates the data-plane messages (`DispatchBatch`,
//!   `CombineBatch`): tensors as little-endian bytes, every length checked before use.

pub mod collective;
pub mod config;
pub mod error;
pub mod frames;
pub mod keys;
pub mod lease;
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
