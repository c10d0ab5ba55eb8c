//! Errors of the shared cluster layer.

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("malformed data-plane frame: {0}")]
    Frame(String),
    #[error("no live expert nodes to place experts on")]
    NoNodes,
}
