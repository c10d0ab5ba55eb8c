//! What nodes and routers publish about themselves (JSON values of `nodes/<id>` and
//! `routers/<id>`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    #[default]
    Joining,
    Ready,
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Joining => "joining",
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
        }
    }
}

/// What a node publishes about itself (the default: a node joining, at no address yet).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// `host:port` of its data-plane gRPC server.
    pub address: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Bytes of memory it offers for expert weights.
    pub memory_bytes: u64,
    pub state: NodeState,
    /// Fingerprint of the checkpoint it serves; nodes of another model are not placed.
    pub fingerprint: String,
    /// Random per process start: a suspect report names the instance it saw fail, so a node
    /// restarted under the same id is not held suspect for its predecessor's crash.
    #[serde(default)]
    pub instance: String,
    /// Collective transports it can join (`tcp`, `nccl`); gRPC always works.
    #[serde(default)]
    pub collectives: Vec<crate::collective::Transport>,
    /// Most token rows one dispatch may bring (`--max-batch-rows`): routers split larger
    /// layers. 0 from nodes that predate it (routers then use their own batch bound).
    #[serde(default)]
    pub max_batch_rows: u32,
    /// How it takes a layer's rows over a collective: `bf16` where its experts round them to
    /// bf16 anyway (half the bytes, the same outputs), else `f32` (also from nodes that
    /// predate it).
    #[serde(default)]
    pub rows_on_wire: crate::collective::RowEncoding,
}

/// What a router publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// Its public gRPC address.
    pub address: String,
    /// The placement epoch it dispatches on (0 before the first).
    pub serving_epoch: u64,
    /// Its OpenAI HTTP address ("" when it serves none).
    #[serde(default)]
    pub http_address: String,
    /// The model name it serves (`/v1/models`).
    #[serde(default)]
    pub model: String,
    /// The context a request may use there, prompt and answer (`--max-model-len`); 0 from
    /// routers that predate it.
    #[serde(default)]
    pub max_model_len: u64,
    /// How loaded it is, refreshed about once a second: what a gateway balances on.
    #[serde(default)]
    pub load: RouterLoad,
    /// The defaults it generates with, which a gateway rendering chats for it must apply as
    /// it would; absent from routers that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<PublishedGeneration>,
}

/// A router's generation defaults as it publishes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedGeneration {
    /// `max_tokens` of a chat or Responses request that gives none (`--generation-config`,
    /// `--override-generation-config`); none: the rest of the context.
    pub default_max_tokens: Option<u32>,
}

/// What a router serves, published once per registration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterProfile {
    /// Its OpenAI HTTP address ("" when it serves none).
    pub http_address: String,
    pub model: String,
    pub max_model_len: u64,
    pub generation: PublishedGeneration,
}

/// A router's load as it publishes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterLoad {
    pub running: u32,
    pub waiting: u32,
    /// KV blocks neither reserved by requests nor held by the prefix cache.
    pub kv_blocks_free: u64,
    /// Held by the prefix cache (those no request uses are given up on demand).
    pub kv_blocks_cached: u64,
    pub kv_blocks_total: u64,
}

/// A random id for one process start (a node's `NodeRecord::instance`, a router's
/// `LoadReport::instance`): a restart under the same id is then told apart.
pub fn new_instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}
