//! Why the router refuses or fails a request: one enum for every library module, turned into a
//! `tonic::Status` here, once, and into OpenAI's HTTP error once, in [`crate::ApiError`].
//! Handlers only convert at the edge, so a client sees the same refusal (and the same message)
//! on either API.

use tonic::{Code, Status};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    /// A request field fails a check; `param` names it where both APIs spell it the same
    /// (the message always does).
    #[error("{message}")]
    Invalid {
        param: Option<&'static str>,
        message: String,
    },

    /// `--max-waiting` requests already wait.
    #[error("{limit} requests are already waiting (the limit)")]
    QueueFull { limit: usize },
    /// The request alone needs more KV cache than the whole budget, so it can never start.
    #[error("the request needs more KV cache than the router's whole budget")]
    KvBudget,

    #[error("no expert placement is ready yet")]
    NoPlacement,
    #[error("the scheduler has stopped")]
    SchedulerStopped,
    #[error("the tokenizer pool is closed")]
    TokenizerClosed,
    /// Steps kept failing on the cluster past `--recovery-timeout-ms` (or failed for good).
    #[error("expert dispatch failed: {0}")]
    DispatchFailed(String),
    /// The cluster's store (etcd) could not be reached or refused a write; the message says
    /// which.
    #[error("{0}")]
    Store(String),

    #[error("the request ran past its deadline (--request-timeout-ms)")]
    Deadline,
    #[error("the planner did not write an epoch without the node in time")]
    DrainTimedOut,

    #[error("the model `{requested}` does not exist; this server serves `{served}`")]
    ModelNotFound { requested: String, served: String },
    #[error("no such route")]
    RouteNotFound,
    #[error("no live node {0:?}")]
    NodeNotFound(String),
    #[error("this is not router {0:?}")]
    RouterNotFound(String),
    /// `GET`/`DELETE /v1/responses/{id}` of an id not stored (or no longer).
    #[error("no stored response has id `{0}` (never stored, deleted, or evicted for room)")]
    ResponseNotFound(String),

    /// No valid key; the message says which key and how to send it.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A valid key that may not do this (drains need an admin key).
    #[error("{0}")]
    PermissionDenied(&'static str),

    #[error("{0}")]
    Internal(String),

    /// A status a router answered, passed on by a gateway as it was.
    #[error("{message}")]
    Upstream { code: Code, message: String },
}

impl RouterError {
    /// A failed check of the field `param`.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: Some(param),
            message: message.into(),
        }
    }

    /// A failed check that names no single field.
    pub fn unnamed(message: impl Into<String>) -> Self {
        Self::Invalid {
            param: None,
            message: message.into(),
        }
    }

    /// The gRPC code clients get.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::QueueFull { .. } | Self::KvBudget => Code::ResourceExhausted,
            Self::NoPlacement
            | Self::SchedulerStopped
            | Self::TokenizerClosed
            | Self::DispatchFailed(_)
            | Self::Store(_) => Code::Unavailable,
            Self::Deadline | Self::DrainTimedOut => Code::DeadlineExceeded,
            Self::ModelNotFound { .. }
            | Self::RouteNotFound
            | Self::NodeNotFound(_)
            | Self::RouterNotFound(_)
            | Self::ResponseNotFound(_) => Code::NotFound,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Internal(_) => Code::Internal,
            Self::Upstream { code, .. } => *code,
        }
    }
}

impl From<RouterError> for Status {
    fn from(error: RouterError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

impl From<Status> for RouterError {
    fn from(status: Status) -> Self {
        Self::Upstream {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl From<moe_cluster::api_keys::AccessDenied> for RouterError {
    fn from(denied: moe_cluster::api_keys::AccessDenied) -> Self {
        use moe_cluster::api_keys::AccessDenied;
        match denied {
            AccessDenied::Unauthenticated(m) => RouterError::Unauthenticated(m),
            AccessDenied::PermissionDenied(m) => RouterError::PermissionDenied(m),
        }
    }
}
