//! The gateway's Prometheus page: requests and open streams per router, stream moves by
//! reason and how long a moved stream waited for its next token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moe_cluster::metrics::{escape, family, sample, Histogram, LATENCY_BUCKETS};

use crate::router_set::{RouterEntry, RouterSet};

/// Why a stream moved to another router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationReason {
    /// Its router's stream broke or ended before the answer (a crash, a lost connection).
    Died,
    /// Its router drained (SIGTERM, `DrainRouter`).
    Drained,
    /// Its router sent nothing for `--stall-timeout-ms`.
    Stalled,
}

impl MigrationReason {
    pub const ALL: [MigrationReason; 3] = [Self::Died, Self::Drained, Self::Stalled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Died => "died",
            Self::Drained => "drained",
            Self::Stalled => "stalled",
        }
    }
}

/// A per-router family: name, kind, help, and how to read its value.
type PerRouterFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&RouterEntry) -> u64,
);

#[derive(Debug)]
pub struct GatewayMetrics {
    /// Stream moves, by [`MigrationReason::ALL`]'s order.
    migrations: [AtomicU64; 3],
    /// From a stream's interruption to the next token it got from another router.
    migration_seconds: Histogram,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self {
            migrations: Default::default(),
            migration_seconds: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl GatewayMetrics {
    pub fn migration_started(&self, reason: MigrationReason) {
        let i = MigrationReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.migrations[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn migrated(&self, waited: Duration) {
        self.migration_seconds.observe(waited.as_secs_f64());
    }

    pub fn migrations_total(&self) -> u64 {
        self.migrations
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .sum()
    }

    pub fn render(&self, routers: &RouterSet) -> String {
        let mut out = String::with_capacity(2048);
        let all = routers.all();
        let per_router: [PerRouterFamily; 5] = [
            (
                "moe_gateway_requests_total",
                "counter",
                "Requests (and resumed requests) the gateway sent each router.",
                |r| r.counters.requests.load(Ordering::Relaxed),
            ),
            (
                "moe_gateway_streams_in_flight",
                "gauge",
                "Streams the gateway has open on each router.",
                |r| u64::from(r.counters.in_flight.load(Ordering::Relaxed)),
            ),
            (
                "moe_gateway_migrations_from_total",
                "counter",
                "Streams moved away from each router.",
                |r| r.counters.migrations_from.load(Ordering::Relaxed),
            ),
            (
                "moe_gateway_router_load",
                "gauge",
                "Running and waiting requests of each router (as published, or open here when more).",
                |r| u64::from(r.load()),
            ),
            (
                "moe_gateway_health_check_failures_total",
                "counter",
                "Health checks each router failed (no answer in time, or an error).",
                |r| r.counters.probe_failures.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in per_router {
            family(&mut out, name, kind, help);
            for router in all.values() {
                let labels = format!("router=\"{}\"", escape(&router.id));
                sample(&mut out, name, &labels, value(router));
            }
        }
        family(
            &mut out,
            "moe_gateway_routers",
            "gauge",
            "Routers registered in etcd.",
        );
        sample(&mut out, "moe_gateway_routers", "", all.len());
        family(
            &mut out,
            "moe_gateway_migrations_total",
            "counter",
            "Streams moved to another router, by why.",
        );
        for (reason, count) in MigrationReason::ALL.iter().zip(&self.migrations) {
            let labels = format!("reason=\"{}\"", reason.as_str());
            sample(
                &mut out,
                "moe_gateway_migrations_total",
                &labels,
                count.load(Ordering::Relaxed),
            );
        }
        family(
            &mut out,
            "moe_gateway_migration_seconds",
            "histogram",
            "From a stream's interruption to its next token from another router.",
        );
        self.migration_seconds
            .render(&mut out, "moe_gateway_migration_seconds", "");
        out
    }
}
