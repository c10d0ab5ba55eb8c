//! One registration's lease in etcd: its own client without a request timeout (it would cut
//! the keep-alive stream), the keep-alive stream itself, and the create-if-absent campaign.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};

use crate::discovery::error::Result;

pub(crate) struct EtcdLease {
    client: Client,
    /// The keep-alive stream of the lease it was opened for.
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdLease {
    pub(crate) fn new(client: Client) -> Self {
        Self {
            client,
            keeper: None,
        }
    }

    pub(crate) async fn grant(&mut self, ttl: Duration) -> Result<i64> {
        self.keeper = None;
        let ttl = ttl.as_secs().max(1) as i64;
        Ok(self.client.lease_grant(ttl, None).await?.id())
    }

    /// One keep-alive, each step bounded by `interval`. A keep-alive answered with TTL 0 means
    /// the lease already expired.
    pub(crate) async fn renew(&mut self, lease: i64, interval: Duration) -> bool {
        if self.keeper.as_ref().map(|k| k.0) != Some(lease) {
            let opened = tokio::time::timeout(interval, self.client.lease_keep_alive(lease)).await;
            self.keeper = opened
                .ok()
                .and_then(Result::ok)
                .map(|(keeper, stream)| (lease, keeper, stream));
        }
        let Some((_, keeper, stream)) = self.keeper.as_mut() else {
            return false;
        };
        let alive = match tokio::time::timeout(interval, keeper.keep_alive()).await {
            Ok(Ok(())) => matches!(
                tokio::time::timeout(interval, stream.message()).await,
                Ok(Ok(Some(r))) if r.ttl() > 0
            ),
            _ => false,
        };
        if !alive {
            self.keeper = None;
        }
        alive
    }

    pub(crate) async fn put(&mut self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        let options = PutOptions::new().with_lease(lease);
        self.client.put(key, value, Some(options)).await?;
        Ok(())
    }

    pub(crate) async fn delete(&mut self, key: &str) -> Result<()> {
        self.client.delete(key, None).await?;
        Ok(())
    }

    pub(crate) async fn revoke(&mut self, lease: i64) {
        let _ = self.client.lease_revoke(lease).await;
    }

    /// Takes the campaign key if it is free (or already ours from an older lease of this
    /// process).
    pub(crate) async fn campaign(&mut self, key: &str, id: &str, lease: i64) -> Result<bool> {
        let put = TxnOp::put(key, id, Some(PutOptions::new().with_lease(lease)));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client.txn(txn).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.lease())),
            _ => None,
        });
        match holder {
            Some((value, held_on)) if value == id.as_bytes() => {
                if held_on != lease {
                    // Ours from before a re-grant: move it onto the live lease.
                    let txn = Txn::new()
                        .when([Compare::value(key, CompareOp::Equal, id)])
                        .and_then([put]);
                    return Ok(self.client.txn(txn).await?.succeeded());
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
