//! What a router publishes in etcd so that the nodes of an epoch can join its communicator
//! (`collective/<epoch>/<router>`, on the router's lease), and the transports a node can join.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::tcp::{TcpRendezvous, NONCE_BYTES};

/// How the router reaches the expert nodes of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The gRPC `ExpertData.Exchange` streams only.
    #[default]
    Grpc,
    /// One collective per epoch over TCP sockets (CPU clusters).
    Tcp,
    /// One NCCL communicator per epoch (every node on a GPU; needs `--features cuda`).
    Nccl,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Tcp => "tcp",
            Transport::Nccl => "nccl",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where to join, per transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum Rendezvous {
    Tcp { address: String, nonce: String },
    Nccl { unique_id: String },
}

/// One router's communicator for one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectiveRecord {
    pub epoch: u64,
    /// The epoch's nodes in rank order: rank `i + 1` is `nodes[i]`; the router is rank 0.
    pub nodes: Vec<String>,
    pub rendezvous: Rendezvous,
    /// The router's bound on each step of a layer; a node uses the same for its side.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The layer protocol the router speaks ([`super::exchange::LAYER_PROTOCOL`]; 0 from
    /// routers that predate it): a node of another one stays on gRPC instead of joining.
    #[serde(default)]
    pub layer_protocol: u32,
}

fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordError {
    #[error("collective record: {0}")]
    Malformed(String),
}

impl CollectiveRecord {
    pub fn tcp(epoch: u64, nodes: Vec<String>, at: &TcpRendezvous, timeout: Duration) -> Self {
        Self {
            epoch,
            nodes,
            timeout_ms: timeout.as_millis() as u64,
            layer_protocol: super::exchange::LAYER_PROTOCOL,
            rendezvous: Rendezvous::Tcp {
                address: at.address.clone(),
                nonce: to_hex(&at.nonce),
            },
        }
    }

    pub fn nccl(epoch: u64, nodes: Vec<String>, unique_id: &[u8], timeout: Duration) -> Self {
        Self {
            epoch,
            nodes,
            timeout_ms: timeout.as_millis() as u64,
            layer_protocol: super::exchange::LAYER_PROTOCOL,
            rendezvous: Rendezvous::Nccl {
                unique_id: to_hex(unique_id),
            },
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    pub fn transport(&self) -> Transport {
        match self.rendezvous {
            Rendezvous::Tcp { .. } => Transport::Tcp,
            Rendezvous::Nccl { .. } => Transport::Nccl,
        }
    }

    /// This node's rank and the communicator's size, if the node is a member.
    pub fn rank_of(&self, node_id: &str) -> Option<(usize, usize)> {
        let at = self.nodes.iter().position(|n| n == node_id)?;
        Some((at + 1, self.nodes.len() + 1))
    }

    pub fn tcp_rendezvous(&self) -> Result<TcpRendezvous, RecordError> {
        let Rendezvous::Tcp { address, nonce } = &self.rendezvous else {
            return Err(RecordError::Malformed("not a tcp rendezvous".into()));
        };
        let bytes = from_hex(nonce)?;
        let nonce: [u8; NONCE_BYTES] = bytes.try_into().map_err(|b: Vec<u8>| {
            RecordError::Malformed(format!("a nonce of {} bytes", b.len()))
        })?;
        Ok(TcpRendezvous {
            address: address.clone(),
            nonce,
        })
    }

    pub fn nccl_unique_id(&self) -> Result<Vec<u8>, RecordError> {
        match &self.rendezvous {
            Rendezvous::Nccl { unique_id } => from_hex(unique_id),
            Rendezvous::Tcp { .. } => Err(RecordError::Malformed("not an nccl rendezvous".into())),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Result<Vec<u8>, RecordError> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return Err(RecordError::Malformed("odd-length or non-ASCII hex".into()));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16)
                .map_err(|_| RecordError::Malformed(format!("bad hex {:?}", &text[i..i + 2])))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_name_ranks() {
        let at = TcpRendezvous {
            address: "10.0.0.1:4000".into(),
            nonce: [0xab; NONCE_BYTES],
        };
        let r = CollectiveRecord::tcp(
            7,
            vec!["a".into(), "b".into()],
            &at,
            Duration::from_millis(250),
        );
        let back = CollectiveRecord::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.tcp_rendezvous().unwrap(), at);
        assert_eq!(back.transport(), Transport::Tcp);
        assert_eq!(back.rank_of("b"), Some((2, 3)));
        assert_eq!(back.rank_of("z"), None);
        assert_eq!(back.timeout(), Duration::from_millis(250));
        let json = String::from_utf8(r.encode()).unwrap();
        assert!(json.contains("\"transport\":\"tcp\""), "{json}");

        let n = CollectiveRecord::nccl(8, vec!["a".into()], &[1, 2, 255], Duration::from_secs(1));
        let back = CollectiveRecord::decode(&n.encode()).unwrap();
        assert_eq!(back.nccl_unique_id().unwrap(), vec![1, 2, 255]);
        assert!(back.tcp_rendezvous().is_err());
        assert_eq!(back.layer_protocol, super::super::exchange::LAYER_PROTOCOL);
    }

    /// A router of another layer protocol (or one that predates the field) is not joined: the
    /// node stays on gRPC, where headers of another size would have failed every layer.
    #[test]
    fn a_record_of_another_layer_protocol_is_not_joined() {
        let legacy = br#"{"epoch":1,"nodes":["a"],"rendezvous":{"transport":"tcp","address":"127.0.0.1:9","nonce":"00000000000000000000000000000000"}}"#;
        let record = CollectiveRecord::decode(legacy).unwrap();
        assert_eq!(record.layer_protocol, 0);
        let settings = super::super::MemberSettings {
            token: None,
            max_frame_bytes: 1 << 20,
        };
        let refused =
            super::super::join_member(&record, "a", &settings, None, Duration::from_millis(100));
        let err = refused.err().expect("another layer protocol is refused");
        assert!(err.to_string().contains("layer protocol 0"), "{err}");
    }

    #[test]
    fn bad_records_are_typed_errors() {
        assert!(CollectiveRecord::decode(b"{").is_err());
        let bad = br#"{"epoch":1,"nodes":[],"rendezvous":{"transport":"tcp","address":"x","nonce":"zz"}}"#;
        let r = CollectiveRecord::decode(bad).unwrap();
        assert!(r.tcp_rendezvous().is_err());
        let short = br#"{"epoch":1,"nodes":[],"rendezvous":{"transport":"tcp","address":"x","nonce":"00"}}"#;
        assert!(CollectiveRecord::decode(short)
            .unwrap()
            .tcp_rendezvous()
            .is_err());
    }
}
