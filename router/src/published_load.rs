//! What a router publishes beside its address in `routers/<id>`: its OpenAI address, model
//! name, context length and load, which a gateway reads to route requests (least load, or to the router that
//! holds a prompt's prefix unless it is much busier).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_cluster::discovery::{RouterLoad, RouterProfile, RouterRegistration};

use crate::kv_blocks::KvBlocks;
use crate::scheduler::SchedulerStats;

/// How often the load is republished (each a write to etcd).
pub const LOAD_PERIOD: Duration = Duration::from_secs(1);

pub struct PublishedProfile {
    pub profile: RouterProfile,
    pub stats: Arc<SchedulerStats>,
    pub kv: Arc<KvBlocks>,
    last: Option<Instant>,
}

impl PublishedProfile {
    pub fn new(profile: RouterProfile, stats: Arc<SchedulerStats>, kv: Arc<KvBlocks>) -> Self {
        Self {
            profile,
            stats,
            kv,
            last: None,
        }
    }

    pub fn load(&self) -> RouterLoad {
        let cached = self.stats.prefix_cache_blocks.load(Ordering::Relaxed) as u64;
        let (total, used) = (self.kv.total() as u64, self.kv.used() as u64);
        RouterLoad {
            running: self.stats.running.load(Ordering::Relaxed) as u32,
            waiting: self.stats.waiting.load(Ordering::Relaxed) as u32,
            kv_blocks_free: total.saturating_sub(used),
            kv_blocks_cached: cached,
            kv_blocks_total: total,
        }
    }

    /// Publishes the profile on a new registration.
    pub fn register(&mut self, registration: &RouterRegistration) {
        registration.set_profile(&self.profile);
        self.last = None;
        self.refresh(registration);
    }

    /// Republishes the load when [`LOAD_PERIOD`] has passed since the last time.
    pub fn refresh(&mut self, registration: &RouterRegistration) {
        if self.last.is_some_and(|t| t.elapsed() < LOAD_PERIOD) {
            return;
        }
        self.last = Some(Instant::now());
        registration.set_load(self.load());
    }
}
