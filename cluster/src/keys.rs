//! The etcd key layout (see docs/design: prefix `/moe/<cluster>/`).

/// Keys of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterKeys {
    prefix: String,
}

impl ClusterKeys {
    pub fn new(cluster: &str) -> Self {
        Self {
            prefix: format!("/moe/{cluster}/"),
        }
    }

    /// Prefix of every node record.
    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    /// A node's record (on the node's lease).
    pub fn node(&self, node_id: &str) -> String {
        format!("{}nodes/{node_id}", self.prefix)
    }

    /// Prefix of the nodes' readiness keys.
    pub fn ready_prefix(&self) -> String {
        format!("{}ready/", self.prefix)
    }

    /// The latest epoch whose experts the node has loaded (on the node's lease).
    pub fn ready(&self, node_id: &str) -> String {
        format!("{}ready/{node_id}", self.prefix)
    }

    /// The current placement (durable, no lease).
    pub fn placement(&self) -> String {
        format!("{}placement", self.prefix)
    }

    /// Node id from a key under `nodes/` or `ready/`.
    pub fn node_id_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix).and_then(|rest| {
            rest.strip_prefix("nodes/")
                .or_else(|| rest.strip_prefix("ready/"))
        })
    }
}
