//! Host side of the NCCL data plane (the GPU transport; the gRPC stream stays for CPU nodes).
//!
//! One communicator per (router, placement epoch): the router is rank 0, the epoch's nodes are
//! ranks 1..=n in node-id order. The router makes the `ncclUniqueId` and publishes it under
//! [`crate::ClusterKeys::nccl_id`]; each node joins with `ncclCommInitRank`. Per MoE layer the
//! router first sends each node its row and pair counts, then the rows and routes with grouped
//! send/recv (the all-to-all), and receives one output row per pair back.
//!
//! - [`plan`]: counts and byte layouts of one layer's exchange (what goes to and from each rank).
//! - [`communicator`]: the [`Communicator`] seam (NCCL on a GPU, an in-memory fake in tests)
//!   and the deadline that turns a dead peer into an abort instead of a hang.
//! - [`exchange`]: one layer's protocol on both sides (headers, rows and routes, outputs),
//!   checked end to end over the in-memory fake with real expert math.
//! - [`epochs`]: which communicator serves which epoch; new epoch, new communicator; old ones
//!   are aborted once no dispatch can use them.
//! - `nccl` (`--features cuda`): the NCCL communicator itself, non-blocking and abortable.

pub mod communicator;
pub mod epochs;
pub mod exchange;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plan;

pub use communicator::{run_bounded, CommError, Communicator, Pending};
pub use epochs::EpochCommunicators;
pub use plan::{ExchangePlan, PeerCounts};
