//! `moe-tooling`: what drives a cluster from outside, for `moe` and the tests; no serving
//! binary links it.
//!
//! - [`LocalCluster`] starts real processes on loopback: a [`LocalEtcd`], expert nodes and
//!   routers sharing a fresh [`ClusterTokenFile`]; dropping it stops them all. `moe up`,
//!   `moe chaos` and the process-level tests start their clusters with it.
//! - [`SingleProcessRouter`] starts a router that serves the whole model by itself
//!   (`--in-process-nodes`: no etcd, no expert-node processes).
//! - [`GreedyLoad`] drives routers with greedy requests whose answers the offline engine
//!   computed ([`ExpectedAnswer`]) and counts every answer that failed or differed in any bit.
//! - [`greedy`] is the greedy Generate request that the load, `moe bench --router` and the
//!   tests send.
//! - [`fixture_dir`] and [`find_in_path`] say where the bundled checkpoints and the programs
//!   a cluster runs are.

mod etcd;
mod load;
mod local_cluster;
mod locate;
mod member_logs;
mod ports;
mod request;
mod single_process_router;
mod token_file;

pub use etcd::{EtcdServerTls, LocalEtcd};
pub use load::{ExpectedAnswer, GreedyLoad, LoadProgress, LoadReport};
pub use local_cluster::{GatewayAddrs, LocalCluster, LocalClusterSpec};
pub use locate::{find_in_path, fixture_dir};
pub use ports::free_port;
pub use request::greedy;
pub use single_process_router::SingleProcessRouter;
pub use token_file::ClusterTokenFile;
