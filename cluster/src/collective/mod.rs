//! The collective data plane: one communicator per (router, placement epoch), over NCCL on
//! GPUs or TCP sockets on CPUs; the gRPC streams stay for mixed clusters and as the fallback.
//!
//! The router is rank 0, the epoch's nodes are ranks 1..=n in node-id order. The router opens
//! rank 0 (an `ncclUniqueId`, or a listening socket and a nonce) and publishes a
//! [`CollectiveRecord`] under [`crate::ClusterKeys::collective`]; each node joins from it. Per MoE layer the
//! router first sends each node its row and pair counts, then the rows and routes with grouped
//! send/recv (the all-to-all), and receives one output row per pair back.
//!
//! - [`plan`]: counts and byte layouts of one layer's exchange (what goes to and from each rank).
//! - [`communicator`]: the [`Communicator`] seam (NCCL on a GPU, an in-memory fake in tests)
//!   and the deadline that turns a dead peer into an abort instead of a hang.
//! - [`exchange`]: one layer's protocol on both sides (headers, rows and routes, outputs),
//!   checked end to end over the in-memory fake with real expert math.
//! - [`in_process`]: expert nodes as threads of this process behind the exchange
//!   (`--in-process-nodes`), the device-resident path end to end on one GPU.
//! - [`mailbox`]: ranks in one process (the in-memory fake of the tests; with device buffers,
//!   the in-process device transport of a router and an expert set on one GPU).
//! - [`row_encoding`]: f32 rows, or bf16 rows for nodes whose experts round to bf16 anyway.
//! - [`row_plane`]: a layer's rows gathered per node where they lie and the outputs placed
//!   back in pair order there (the device-resident router side).
//! - [`tcp`]: the same collective over TCP sockets, for CPU clusters (and to run the whole
//!   lifecycle without GPUs).
//! - `nccl` (`--features cuda`): the NCCL communicator itself, non-blocking and abortable.

pub mod communicator;
pub mod exchange;
pub mod in_process;
pub mod link;
pub mod mailbox;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod plan;
pub mod record;
pub mod row_encoding;
pub mod row_plane;
pub mod tcp;
#[cfg(test)]
mod test_nodes;

pub use communicator::{run_bounded, CommError, Communicator, Pending};
#[cfg(feature = "cuda")]
pub use link::NcclGpu;
pub use link::{
    join_member, open_root, EpochLink, MemberGpu, MemberSettings, RootJoining, RootSettings,
};
pub use plan::{ExchangePlan, FrameBounds, PeerCounts};
pub use record::{CollectiveRecord, Transport};
pub use row_encoding::RowEncoding;
