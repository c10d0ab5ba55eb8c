//! Active health checks of the routers. A router that crashed is noticed when a call to it
//! fails, but one that hangs (stopped, swapping, wedged in a step) accepts connections and
//! answers nothing: a new request sent there would wait for its first token until the
//! client's deadline. Every `--health-check-interval-ms` each router's `grpc.health.v1`
//! is asked, and one that errs or does not answer within `--health-check-timeout-ms` is
//! avoided for `--router-backoff-ms`, as if a request to it had failed; the streams open on it
//! that have been silent as long move to another router (`relay`), before their first token
//! too, where the stall timeout does not reach.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use moe_cluster::shutdown::Shutdown;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::router_set::RouterSet;

/// How often routers are checked, and how long one may take to answer.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTiming {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Why a router failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("health check failed: {0}")]
    Failed(tonic::Code),
}

/// Checks every registered router each interval until `shutdown` (nothing when the interval
/// is zero). The checks of one round run side by side: a hung router delays no other's.
pub async fn probe_routers(routers: Arc<RouterSet>, timing: ProbeTiming, mut shutdown: Shutdown) {
    if timing.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(timing.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        let mut round = tokio::task::JoinSet::new();
        for router in routers.all().values() {
            let (id, channel) = (router.id.clone(), router.channel.clone());
            round.spawn(async move { (id, check(channel, timing.timeout).await) });
        }
        while let Some(done) = round.join_next().await {
            let Ok((id, Err(failure))) = done else {
                continue;
            };
            if let Some(router) = routers.all().get(&id) {
                router
                    .counters
                    .probe_failures
                    .fetch_add(1, Ordering::Relaxed);
                router.counters.health_failed.notify_waiters();
            }
            tracing::warn!(router_id = id, %failure, "router failed its health check");
            routers.avoid(&id);
        }
    }
}

/// One `grpc.health.v1.Health/Check` of the router's whole server. NOT_SERVING passes: a
/// router waiting for its first placement is alive, and its etcd record says whether it
/// serves.
pub async fn check(channel: Channel, timeout: Duration) -> Result<(), ProbeFailure> {
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(timeout, client.check(request)).await {
        Err(_) => Err(ProbeFailure::Timeout(timeout)),
        Ok(Err(status)) => Err(ProbeFailure::Failed(status.code())),
        Ok(Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use moe_cluster::discovery::RouterRecord;

    use super::*;

    /// A real `grpc.health.v1` server on a free loopback port.
    async fn live_router() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    /// A port whose process is alive but answers nothing (as a SIGSTOPped router's): the
    /// kernel completes connections, nobody reads them.
    async fn hung_router() -> (String, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (listener.local_addr().unwrap().to_string(), listener)
    }

    fn record(address: &str) -> RouterRecord {
        RouterRecord {
            address: address.to_string(),
            serving_epoch: 1,
            http_address: String::new(),
            model: "m".into(),
            max_model_len: 0,
            load: Default::default(),
            generation: None,
        }
    }

    fn channel(address: &str) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy()
    }

    #[tokio::test]
    async fn a_check_passes_a_live_router_and_fails_a_hung_or_absent_one() {
        let timeout = Duration::from_millis(300);
        let live = live_router().await;
        assert_eq!(check(channel(&live), timeout).await, Ok(()));
        let (hung, _held) = hung_router().await;
        assert_eq!(
            check(channel(&hung), timeout).await,
            Err(ProbeFailure::Timeout(timeout))
        );
        let gone = {
            let (address, listener) = hung_router().await;
            drop(listener);
            address
        };
        assert_eq!(
            check(channel(&gone), timeout).await,
            Err(ProbeFailure::Failed(tonic::Code::Unavailable))
        );
    }

    /// Within a round or two a hung router is avoided and counted; the live one is not.
    #[tokio::test]
    async fn probing_keeps_requests_off_a_hung_router() {
        let live = live_router().await;
        let (hung, _held) = hung_router().await;
        let routers = Arc::new(RouterSet::new(Duration::from_secs(60), None));
        routers.replace(BTreeMap::from([
            ("live".to_string(), record(&live)),
            ("hung".to_string(), record(&hung)),
        ]));
        assert_eq!(routers.available().len(), 2);
        let (stopper, shutdown) = Shutdown::new();
        let timing = ProbeTiming {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(200),
        };
        let probing = tokio::spawn(probe_routers(Arc::clone(&routers), timing, shutdown));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while routers.available().len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the hung router is still used"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let available: Vec<String> = routers.available().iter().map(|r| r.id.clone()).collect();
        assert_eq!(available, ["live"]);
        let all = routers.all();
        assert!(all["hung"].counters.probe_failures.load(Ordering::Relaxed) >= 1);
        assert_eq!(
            all["live"].counters.probe_failures.load(Ordering::Relaxed),
            0
        );
        stopper.stop();
        probing.await.unwrap();
    }
}
