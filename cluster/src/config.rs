//! Settings every cluster process shares: where etcd is, which cluster, how often to re-read it,
//! and the logging setup. Flattened into each binary's clap struct.

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "MOE_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// Cluster name: the etcd prefix `/moe/<cluster>/`.
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Interval at which membership and placement are re-read.
    #[arg(long, env = "MOE_POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,
}

/// Logs to stderr, filtered by `MOE_LOG` (default `default_filter`).
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOE_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Accepted connections of a gRPC server, with Nagle's algorithm off: the data plane sends small
/// frames back and forth, and Nagle plus delayed ACKs would add up to 40 ms to each round trip.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Deadline for reaching etcd and for each unary etcd call: an etcd that vanished costs a
/// bounded wait, never a hung planner or follower.
pub const ETCD_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// An etcd client whose unary calls time out (do not use it for long-lived streams).
pub async fn connect_etcd(endpoints: &[String]) -> Result<etcd_client::Client, etcd_client::Error> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(2))
        .with_timeout(ETCD_CALL_TIMEOUT);
    etcd_client::Client::connect(endpoints, Some(options)).await
}

/// Logs an etcd outage once when it starts and once when it ends, instead of at every retry.
#[derive(Debug, Default)]
pub struct EtcdOutage {
    since: Option<std::time::Instant>,
}

impl EtcdOutage {
    pub fn failed(&mut self, who: &str, error: &dyn std::fmt::Display) {
        if self.since.is_none() {
            tracing::warn!(who, %error, "etcd unreachable; serving the last placement, retrying");
            self.since = Some(std::time::Instant::now());
        } else {
            tracing::debug!(who, %error, "etcd still unreachable");
        }
    }

    pub fn ok(&mut self, who: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(who, down_for = ?since.elapsed(), "etcd reachable again");
        }
    }

    pub fn is_down(&self) -> bool {
        self.since.is_some()
    }
}
