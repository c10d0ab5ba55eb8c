//! The etcd backend: unary reads and writes on one lazily connected client, a lease client per
//! registration ([`lease`]), and the process's one watch stream ([`watch`]).

pub mod connection;
pub(crate) mod lease;
pub(crate) mod watch;

use std::sync::Mutex;

use etcd_client::{Client, Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};

use super::error::Result;
use super::kv::{GuardedPut, Kv, Listing};
use super::watch::KeyRange;
use connection::EtcdConnection;

/// Unary calls to etcd. The client is made on first use and dropped after a failed call, so
/// the next call reconnects (etcd restarted, or came back after an outage).
pub(crate) struct EtcdStore {
    connection: EtcdConnection,
    client: Mutex<Option<Client>>,
}

impl EtcdStore {
    pub(crate) fn new(connection: EtcdConnection) -> Self {
        Self {
            connection,
            client: Mutex::new(None),
        }
    }

    pub(crate) fn connection(&self) -> &EtcdConnection {
        &self.connection
    }

    async fn client(&self) -> Result<Client> {
        if let Some(client) = self.client.lock().ok().and_then(|c| c.clone()) {
            return Ok(client);
        }
        let client = self.connection.connect().await?;
        if let Ok(mut slot) = self.client.lock() {
            *slot = Some(client.clone());
        }
        Ok(client)
    }

    /// Passes `result` on, forgetting the client when the call failed.
    fn checked<T>(&self, result: std::result::Result<T, etcd_client::Error>) -> Result<T> {
        if result.is_err() {
            if let Ok(mut slot) = self.client.lock() {
                *slot = None;
            }
        }
        Ok(result?)
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Listing> {
        let mut client = self.client().await?;
        let options = GetOptions::new().with_prefix();
        let resp = self.checked(client.get(prefix, Some(options)).await)?;
        Ok(Listing {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            kvs: resp.kvs().iter().map(stored).collect(),
        })
    }

    /// One read-only transaction with a range read per key range: every key at one revision,
    /// and nothing outside the ranges (the routers' load reports stay out of the snapshots).
    pub(crate) async fn list_ranges(&self, ranges: &[KeyRange]) -> Result<Listing> {
        let mut client = self.client().await?;
        let reads: Vec<TxnOp> = ranges
            .iter()
            .map(|r| {
                let options = r.prefix.then(|| GetOptions::new().with_prefix());
                TxnOp::get(r.key.clone(), options)
            })
            .collect();
        let resp = self.checked(client.txn(Txn::new().and_then(reads)).await)?;
        let mut kvs = Vec::new();
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                kvs.extend(get.kvs().iter().map(stored));
            }
        }
        Ok(Listing {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            kvs,
        })
    }

    pub(crate) async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let mut client = self.client().await?;
        self.checked(client.put(key, value, None).await)?;
        Ok(())
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<()> {
        let mut client = self.client().await?;
        self.checked(client.delete(key, None).await)?;
        Ok(())
    }

    /// One transaction comparing the key's mod revision and the holder's value.
    pub(crate) async fn put_guarded(&self, put: GuardedPut) -> Result<bool> {
        let mut client = self.client().await?;
        let (holder_key, holder_value) = put.holder;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(put.key.clone(), CompareOp::Equal, put.expected_revision),
                Compare::value(holder_key, CompareOp::Equal, holder_value),
            ])
            .and_then([TxnOp::put(put.key, put.value, None)]);
        Ok(self.checked(client.txn(txn).await)?.succeeded())
    }
}

/// A key as etcd returned it.
fn stored(kv: &KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
    }
}
