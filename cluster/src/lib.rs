//! `moe-cluster`: what the router and the expert nodes share.
//!
//! - [`discovery`] is how processes find each other, behind one small API: registrations on
//!   leases, snapshots of the members and the placement, watches by topic, the guarded
//!   placement write, drains. Over etcd (the only module that talks to it), or in memory for
//!   tests.
//! - [`placement`] is the expert placement: which node holds which `(layer, expert)`, under a
//!   monotonically increasing epoch, planned by the router and written through discovery.
//! - [`auth`] is the cluster token (`--cluster-token-file`) and the proofs members exchange.
//! - [`dispatch_rules`] is what a node accepts in a dispatch (batch bound, top-k, held experts),
//!   checked on the frame's bytes before anything is allocated for it.
//! - [`exposure`] holds the cluster-credential flags and refuses to start a process that
//!   would serve beyond loopback without them.
//! - [`frames`] encodes and validates the data-plane messages (`DispatchBatch`,
//!   `CombineBatch`): tensors as little-endian bytes, every length checked before use.
//! - [`shutdown`] is the one `Shutdown` every binary passes to its tasks, and the signals and
//!   deadlines that trigger it.

pub mod api_keys;
pub mod auth;
pub mod collective;
pub mod config;
pub mod discovery;
pub mod dispatch_rules;
pub mod error;
pub mod exposure;
pub mod frames;
pub mod listener;
pub mod metrics;
pub mod placement;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use config::{DeviceArgs, EtcdArgs};
pub use discovery::{ClusterKeys, Discovery, NodeRecord, NodeState, RouterRegistration};
pub use error::ClusterError;
pub use placement::Placement;
