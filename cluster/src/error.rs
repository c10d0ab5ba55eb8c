//! Errors of the shared cluster layer.

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("malformed record at {key}: {message}")]
    Record { key: String, message: String },
    #[error("malformed data-plane frame: {0}")]
    Frame(String),
    #[error("placement conflict: another planner wrote epoch {0} first")]
    PlacementConflict(u64),
    #[error("etcd did not answer in time")]
    Timeout,
    #[error("no live expert nodes to place experts on")]
    NoNodes,
}
