//! One error type for everything the model crate can refuse: bad checkpoints, bad configs, bad requests.
//! Each variant names the offending thing so that a user can fix it without reading code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "unsupported model_type {0:?} (supported: deepseek_v3, kimi_k2, qwen3_moe, mixtral, \
         glm4_moe, glm4_moe_lite, minimax_m2)"
    )]
    UnsupportedModelType(String),
    #[error("missing tensor {name} (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tensor {name} is invalid: {message}")]
    InvalidTensor { name: String, message: String },
    #[error("tensor {name} has unknown or unsupported dtype {dtype:?}")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("malformed safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} entries")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("sequence of {len} tokens exceeds the model's max_position_embeddings ({max})")]
    SequenceTooLong { len: usize, max: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("expert backend: {0}")]
    ExpertBackend(String),
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("expert ({layer}, {expert}) is not held by this ExpertSet")]
    ExpertNotLoaded { layer: usize, expert: usize },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
