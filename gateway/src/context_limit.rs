//! The context the gateway's OpenAI API admits: its own (`--max-model-len`, or the
//! checkpoint's) cut to the shortest any registered router publishes, so that a request it
//! sizes itself (a chat without `max_tokens` runs up to the context) fits whichever router
//! serves it, and a prompt no router could take is refused here in vLLM's words.

use std::sync::Arc;

use moe_cluster::shutdown::Shutdown;
use moe_openai::ContextLimit;

use crate::router_set::RouterSet;

/// The context for `own` beside the routers registered now (those that publish one).
pub fn context_for(own: usize, routers: &RouterSet) -> usize {
    routers
        .all()
        .values()
        .map(|r| r.record.max_model_len)
        .filter(|&len| len > 0)
        .map(|len| usize::try_from(len).unwrap_or(usize::MAX))
        .fold(own, usize::min)
}

/// Keeps `limit` at [`context_for`] as routers come and go, until `shutdown`.
pub async fn follow_context_limit(
    own: usize,
    routers: Arc<RouterSet>,
    limit: ContextLimit,
    mut shutdown: Shutdown,
) {
    let mut changes = routers.changes();
    loop {
        let tokens = context_for(own, &routers);
        if tokens != limit.get() {
            tracing::info!(max_model_len = tokens, "context length from the routers");
            limit.set(tokens);
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_cluster::discovery::RouterRecord;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn record(port: u16, max_model_len: u64) -> RouterRecord {
        RouterRecord {
            address: format!("127.0.0.1:{port}"),
            serving_epoch: 1,
            http_address: String::new(),
            model: "m".into(),
            max_model_len,
            load: Default::default(),
        }
    }

    #[tokio::test]
    async fn the_shortest_published_context_wins_below_the_gateways_own() {
        let routers = RouterSet::new(Duration::from_secs(1), None);
        assert_eq!(context_for(4096, &routers), 4096);
        let set = |records: &[(&str, RouterRecord)]| {
            routers.replace(
                records
                    .iter()
                    .map(|(id, r)| (id.to_string(), r.clone()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        // A router that predates the field (0) leaves the gateway's own.
        set(&[("a", record(1, 0))]);
        assert_eq!(context_for(4096, &routers), 4096);
        set(&[
            ("a", record(1, 0)),
            ("b", record(2, 2048)),
            ("c", record(3, 3000)),
        ]);
        assert_eq!(context_for(4096, &routers), 2048);
        // Never above the gateway's own, and back up when the short one leaves.
        set(&[("c", record(3, 8192))]);
        assert_eq!(context_for(4096, &routers), 4096);
        set(&[("c", record(3, 3000))]);
        assert_eq!(context_for(4096, &routers), 3000);
    }
}
