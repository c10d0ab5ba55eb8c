//! The two backends behind one set of calls: etcd for the cluster, memory for tests. The
//! discovery logic (snapshots, registrations, the guarded write) is written once above them.

use std::sync::Arc;
use std::time::Duration;

use super::error::{DiscoveryError, Result};
use super::etcd::lease::EtcdLease;
use super::etcd::EtcdStore;
use super::kv::{GuardedPut, Listing};
use super::memory::MemoryStore;
use super::watch::KeyRange;

#[derive(Clone)]
pub(crate) enum Store {
    Etcd(Arc<EtcdStore>),
    Memory(MemoryStore),
}

impl Store {
    pub(crate) async fn list(&self, prefix: &str) -> Result<Listing> {
        match self {
            Store::Etcd(etcd) => etcd.list(prefix).await,
            Store::Memory(memory) => Ok(memory.list(prefix)),
        }
    }

    /// Every key in `ranges`, read at one revision.
    pub(crate) async fn list_ranges(&self, ranges: &[KeyRange]) -> Result<Listing> {
        match self {
            Store::Etcd(etcd) => etcd.list_ranges(ranges).await,
            Store::Memory(memory) => Ok(memory.list_ranges(ranges)),
        }
    }

    /// Puts `key` durably (on no lease).
    pub(crate) async fn put(&self, key: &str, value: Vec<u8>) -> Result<()> {
        match self {
            Store::Etcd(etcd) => etcd.put(key, value).await,
            Store::Memory(memory) => {
                memory.put(key, value);
                Ok(())
            }
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Store::Etcd(etcd) => etcd.delete(key).await,
            Store::Memory(memory) => {
                memory.delete(key);
                Ok(())
            }
        }
    }

    /// Whether the guarded write committed.
    pub(crate) async fn put_guarded(&self, put: GuardedPut) -> Result<bool> {
        match self {
            Store::Etcd(etcd) => etcd.put_guarded(put).await,
            Store::Memory(memory) => Ok(memory.put_guarded(put)),
        }
    }

    /// A client for one registration's lease (over etcd, a connection of its own).
    pub(crate) async fn lease_client(&self) -> Result<LeaseClient> {
        match self {
            Store::Etcd(etcd) => {
                let client = etcd.connection().connect_for_streams().await?;
                Ok(LeaseClient::Etcd(Box::new(EtcdLease::new(client))))
            }
            Store::Memory(memory) => Ok(LeaseClient::Memory(memory.clone())),
        }
    }
}

/// What a lease's keep-alive task needs of the store.
pub(crate) enum LeaseClient {
    /// Boxed: an etcd client and keep-alive stream are some kilobytes.
    Etcd(Box<EtcdLease>),
    Memory(MemoryStore),
}

impl LeaseClient {
    pub(crate) async fn grant(&mut self, ttl: Duration) -> Result<i64> {
        match self {
            LeaseClient::Etcd(etcd) => etcd.grant(ttl).await,
            LeaseClient::Memory(memory) => Ok(memory.grant(ttl)),
        }
    }

    /// Keeps `lease` alive; false when it is lost (expired, or etcd unreachable within
    /// `interval`).
    pub(crate) async fn renew(&mut self, lease: i64, interval: Duration) -> bool {
        match self {
            LeaseClient::Etcd(etcd) => etcd.renew(lease, interval).await,
            LeaseClient::Memory(memory) => memory.renew(lease),
        }
    }

    pub(crate) async fn put(&mut self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        match self {
            LeaseClient::Etcd(etcd) => etcd.put(key, value, lease).await,
            LeaseClient::Memory(memory) if memory.put_leased(key, value, lease) => Ok(()),
            LeaseClient::Memory(_) => Err(DiscoveryError::LeaseLost(lease)),
        }
    }

    pub(crate) async fn delete(&mut self, key: &str) -> Result<()> {
        match self {
            LeaseClient::Etcd(etcd) => etcd.delete(key).await,
            LeaseClient::Memory(memory) => {
                memory.delete(key);
                Ok(())
            }
        }
    }

    pub(crate) async fn revoke(&mut self, lease: i64) {
        match self {
            LeaseClient::Etcd(etcd) => etcd.revoke(lease).await,
            LeaseClient::Memory(memory) => memory.revoke(lease),
        }
    }

    /// Holds `key` = `id` on `lease` if nobody else does; whether it is ours.
    pub(crate) async fn campaign(&mut self, key: &str, id: &str, lease: i64) -> Result<bool> {
        match self {
            LeaseClient::Etcd(etcd) => etcd.campaign(key, id, lease).await,
            LeaseClient::Memory(memory) => Ok(memory.campaign(key, id, lease)),
        }
    }
}
