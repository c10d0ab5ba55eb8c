//! What can go wrong talking to the discovery store.

/// What every discovery call returns.
pub type Result<T, E = DiscoveryError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer in time")]
    Timeout,
    /// A key was put on a lease that had already ended.
    #[error("lease {0} is gone")]
    LeaseLost(i64),
    #[error("malformed record at {key}: {message}")]
    Record { key: String, message: String },
    /// The guarded placement write was refused: the placement moved past the revision it was
    /// planned from, or the writer does not hold the planner key.
    #[error("placement conflict: another planner wrote epoch {0} first")]
    PlacementConflict(u64),
}

/// Serialises a record for the store, naming its key if that fails.
pub(crate) fn encode<T: serde::Serialize>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| DiscoveryError::Record {
        key: key.to_string(),
        message: e.to_string(),
    })
}
