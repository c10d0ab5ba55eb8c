//! The routers a gateway can send to: their etcd records (address, model, published load),
//! followed through discovery, each with one lazily connected gRPC channel and what this
//! gateway sent it. A router whose call failed is avoided for a while, so one that was
//! SIGKILLed is not retried until its lease expires.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moe_cluster::discovery::{RouterRecord, Topic};
use moe_cluster::shutdown::Shutdown;
use moe_cluster::Discovery;
use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// What this gateway did with one router (kept across its record's refreshes).
#[derive(Debug, Default)]
pub struct RouterCounters {
    /// Streams open on it now.
    pub in_flight: AtomicU32,
    /// Requests (and resumed requests) it was sent.
    pub requests: AtomicU64,
    /// Streams moved away from it.
    pub migrations_from: AtomicU64,
    /// Health checks it failed (`probes`).
    pub probe_failures: AtomicU64,
    /// Woken on each failed health check: the streams open on it check whether they are
    /// silent too (a hung router), and move.
    pub health_failed: tokio::sync::Notify,
    avoid_until: Mutex<Option<Instant>>,
}

impl RouterCounters {
    fn avoided(&self, now: Instant) -> bool {
        let until = self.avoid_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| t > now)
    }
}

/// One registered router.
#[derive(Debug)]
pub struct RouterEntry {
    pub id: String,
    pub record: RouterRecord,
    pub channel: Channel,
    pub counters: Arc<RouterCounters>,
}

impl RouterEntry {
    /// Running and waiting requests: what it last published, or what this gateway has open
    /// on it when that is more (the record lags by up to a second).
    pub fn load(&self) -> u32 {
        let published = self.record.load.running + self.record.load.waiting;
        published.max(self.counters.in_flight.load(Ordering::Relaxed))
    }

    pub fn healthy(&self) -> bool {
        !self.counters.avoided(Instant::now())
    }
}

/// Counts a stream open on a router while it lives.
pub struct InFlight(Arc<RouterCounters>);

impl InFlight {
    pub fn on(router: &RouterEntry) -> Self {
        router.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        router.counters.requests.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(&router.counters))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct RouterSet {
    routers: RwLock<Arc<BTreeMap<String, Arc<RouterEntry>>>>,
    /// Counters by router id: a router restarted under its id keeps its history.
    counters: Mutex<BTreeMap<String, Arc<RouterCounters>>>,
    /// Bumped on every change of the set (and on each avoided router's release).
    generation: watch::Sender<u64>,
    backoff: Duration,
    /// TLS to the routers' public ports (`--router-tls-ca`), or plaintext.
    tls: Option<ClientTlsConfig>,
}

impl RouterSet {
    pub fn new(backoff: Duration, tls: Option<ClientTlsConfig>) -> Self {
        Self {
            routers: RwLock::default(),
            counters: Mutex::default(),
            generation: watch::channel(0).0,
            backoff,
            tls,
        }
    }

    /// A lazily connected channel to `address`, over TLS when the gateway has a CA for it.
    fn channel_to(&self, address: &str) -> Option<Channel> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}")).ok()?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).ok()?;
        }
        Some(
            endpoint
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .connect_lazy(),
        )
    }

    /// Every registered router, by id.
    pub fn all(&self) -> Arc<BTreeMap<String, Arc<RouterEntry>>> {
        Arc::clone(&self.routers.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Routers a request may go to now, sorted by id: not avoided, and serving a placement
    /// (unless none is yet).
    pub fn available(&self) -> Vec<Arc<RouterEntry>> {
        let now = Instant::now();
        let healthy: Vec<Arc<RouterEntry>> = self
            .all()
            .values()
            .filter(|r| !r.counters.avoided(now))
            .cloned()
            .collect();
        if healthy.iter().any(|r| r.record.serving_epoch > 0) {
            healthy
                .into_iter()
                .filter(|r| r.record.serving_epoch > 0)
                .collect()
        } else {
            healthy
        }
    }

    /// Keeps requests off `router_id` for the backoff.
    pub fn avoid(&self, router_id: &str) {
        let Some(router) = self.all().get(router_id).cloned() else {
            return;
        };
        *router
            .counters
            .avoid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + self.backoff);
        tracing::warn!(router_id, backoff = ?self.backoff, "avoiding a failing router");
        let generation = self.generation.clone();
        let backoff = self.backoff;
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            generation.send_modify(|g| *g += 1);
        });
    }

    /// A receiver that wakes on every change of the set.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Takes the registered routers from etcd: channels are kept for unchanged addresses,
    /// and a router registered anew (its record changed address) is no longer avoided.
    pub fn replace(&self, records: BTreeMap<String, RouterRecord>) {
        let old = self.all();
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = BTreeMap::new();
        for (id, record) in records {
            let counters = Arc::clone(counters.entry(id.clone()).or_default());
            let channel = match old.get(&id) {
                Some(entry) if entry.record.address == record.address => entry.channel.clone(),
                _ => {
                    *counters
                        .avoid_until
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                    match self.channel_to(&record.address) {
                        Some(channel) => channel,
                        None => {
                            tracing::warn!(
                                router_id = id,
                                address = record.address,
                                "unusable router address"
                            );
                            continue;
                        }
                    }
                }
            };
            next.insert(
                id.clone(),
                Arc::new(RouterEntry {
                    id,
                    record,
                    channel,
                    counters,
                }),
            );
        }
        let changed = next.len() != old.len() || next.keys().ne(old.keys());
        if changed {
            tracing::info!(routers = ?next.keys().collect::<Vec<_>>(), "routers changed");
        }
        *self.routers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.generation.send_modify(|g| *g += 1);
    }
}

/// Keeps `routers` up to date with etcd until `shutdown`: re-read on every change of the
/// routers' keys, and every `poll` anyway.
pub async fn follow_routers(
    routers: Arc<RouterSet>,
    discovery: Discovery,
    poll: Duration,
    mut shutdown: Shutdown,
) {
    let changes = discovery.watch(&[Topic::Routers]);
    let mut failing = false;
    loop {
        match discovery.snapshot().await {
            Ok(snapshot) => {
                failing = false;
                routers.replace(snapshot.members.routers);
            }
            // The routers last read stay: they are still the best guess.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the routers from etcd");
            }
            Err(_) => {}
        }
        tokio::select! {
            () = changes.changed() => {}
            () = tokio::time::sleep(poll) => {}
            () = shutdown.wait() => return,
        }
    }
}
