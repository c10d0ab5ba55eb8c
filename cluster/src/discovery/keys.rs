//! The etcd key layout (see docs/cluster.md: prefix `/moe/<cluster>/`).

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

    /// The cluster's prefix, `/moe/<cluster>/`.
    pub fn root(&self) -> &str {
        &self.prefix
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

    /// Prefix of the router records.
    pub fn routers(&self) -> String {
        format!("{}routers/", self.prefix)
    }

    /// A router's record: its address and the epoch it serves (on the router's lease).
    pub fn router(&self, router_id: &str) -> String {
        format!("{}routers/{router_id}", self.prefix)
    }

    /// Prefix of the collective records.
    pub fn collectives(&self) -> String {
        format!("{}collective/", self.prefix)
    }

    /// Where a router's communicator of `epoch` with that epoch's nodes can be joined (a
    /// `CollectiveRecord`: a TCP address and nonce, or an `ncclUniqueId`), on the router's lease.
    pub fn collective(&self, epoch: u64, router_id: &str) -> String {
        format!("{}collective/{epoch}/{router_id}", self.prefix)
    }

    /// The elected planner's router id (created if absent, on the planner's lease).
    pub fn planner(&self) -> String {
        format!("{}planner", self.prefix)
    }

    /// Prefix of the drain requests.
    pub fn drains(&self) -> String {
        format!("{}drain/", self.prefix)
    }

    /// An operator's request that a node leave (durable until the node is gone).
    pub fn drain(&self, node_id: &str) -> String {
        format!("{}drain/{node_id}", self.prefix)
    }

    /// Prefix of the suspect reports.
    pub fn suspects(&self) -> String {
        format!("{}suspect/", self.prefix)
    }

    /// A router's report that a node's data plane failed (on the reporting router's lease).
    pub fn suspect(&self, node_id: &str, router_id: &str) -> String {
        format!("{}suspect/{node_id}/{router_id}", self.prefix)
    }

    /// Prefix of the routers' load reports.
    pub fn load_reports(&self) -> String {
        format!("{}load/", self.prefix)
    }

    /// A router's `LoadReport`: what it dispatched since it started, per (layer, node) and
    /// per (layer, expert), for the planner (on the router's lease; outside the snapshots).
    pub fn load_report(&self, router_id: &str) -> String {
        format!("{}load/{router_id}", self.prefix)
    }

    /// The id under `prefix` (one of the prefixes above) of `key`: the first path segment.
    pub fn id_under<'a>(&self, prefix: &str, key: &'a str) -> Option<&'a str> {
        let rest = key.get(prefix.len()..)?;
        if !key.starts_with(prefix) {
            return None;
        }
        rest.split('/').next().filter(|s| !s.is_empty())
    }

    /// Node id from a key under `nodes/` or `ready/`.
    pub fn node_id_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(&self.prefix).and_then(|rest| {
            rest.strip_prefix("nodes/")
                .or_else(|| rest.strip_prefix("ready/"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_under_prefixes() {
        let k = ClusterKeys::new("c");
        assert_eq!(
            k.id_under(&k.suspects(), &k.suspect("n1", "r1")),
            Some("n1")
        );
        assert_eq!(k.id_under(&k.routers(), &k.router("r1")), Some("r1"));
        assert_eq!(k.id_under(&k.drains(), &k.node("n1")), None);
        assert_eq!(k.id_under(&k.drains(), "/moe/c/drain/"), None);
    }
}
