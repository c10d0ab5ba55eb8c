//! What the gateway's OpenAI API takes from its routers' records, so that a request it sizes
//! itself is sized as the router that serves it would size it:
//! - the context it admits: its own (`--max-model-len`, or the checkpoint's) cut to the
//!   shortest any registered router publishes, so that a chat without `max_tokens` (run up to
//!   the context) fits whichever router serves it, and a prompt no router could take is
//!   refused here in vLLM's words;
//! - the `max_tokens` of a chat without one: what the routers' `--generation-config` and
//!   `--override-generation-config` made of it, not the gateway's own checkpoint file.

use std::sync::Arc;

use moe_cluster::shutdown::Shutdown;
use moe_openai::{ContextLimit, DefaultMaxTokens};

use crate::router_set::RouterSet;

/// What the gateway serves with no router publishing: its own context and its checkpoint's
/// generation default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnLimits {
    pub context: usize,
    pub default_max_tokens: Option<u32>,
}

/// Where the gateway's OpenAI API reads the limits it serves with.
#[derive(Debug, Clone)]
pub struct ServedLimits {
    pub context: ContextLimit,
    pub default_max_tokens: DefaultMaxTokens,
}

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

/// A chat's default `max_tokens` beside the routers registered now: `own` when none publishes
/// its defaults (routers that predate them), else the smallest default they publish, or none
/// (the rest of the context) when none of them has one. Routers of one deployment share their
/// flags; where they differ, the smallest default fits every one.
pub fn default_max_tokens_for(own: Option<u32>, routers: &RouterSet) -> Option<u32> {
    let published: Vec<Option<u32>> = routers
        .all()
        .values()
        .filter_map(|r| r.record.generation.map(|g| g.default_max_tokens))
        .collect();
    if published.is_empty() {
        return own;
    }
    published.into_iter().flatten().min()
}

/// Keeps `served` at [`context_for`] and [`default_max_tokens_for`] as routers come, go and
/// republish, until `shutdown`.
pub async fn follow_published_limits(
    own: OwnLimits,
    routers: Arc<RouterSet>,
    served: ServedLimits,
    mut shutdown: Shutdown,
) {
    let mut changes = routers.changes();
    loop {
        let tokens = context_for(own.context, &routers);
        if tokens != served.context.get() {
            tracing::info!(max_model_len = tokens, "context length from the routers");
            served.context.set(tokens);
        }
        let default = default_max_tokens_for(own.default_max_tokens, &routers);
        if default != served.default_max_tokens.get() {
            tracing::info!(default_max_tokens = ?default, "chats' default max_tokens from the routers");
            served.default_max_tokens.set(default);
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
            generation: None,
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

    /// The routers' published default wins over the gateway's checkpoint file; routers that
    /// predate it leave the gateway's own; none published means the rest of the context.
    #[tokio::test]
    async fn a_chats_default_max_tokens_is_the_routers() {
        use moe_cluster::discovery::PublishedGeneration;
        let routers = RouterSet::new(Duration::from_secs(1), None);
        let with = |default: Option<Option<u32>>| RouterRecord {
            generation: default.map(|d| PublishedGeneration {
                default_max_tokens: d,
            }),
            ..record(1, 0)
        };
        let set = |records: Vec<(&str, RouterRecord)>| {
            routers.replace(
                records
                    .into_iter()
                    .map(|(id, r)| (id.to_string(), r))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        assert_eq!(default_max_tokens_for(Some(100), &routers), Some(100));
        set(vec![("a", with(None))]);
        assert_eq!(default_max_tokens_for(Some(100), &routers), Some(100));
        // `--generation-config vllm` on the router: no default, whatever the file says.
        set(vec![("a", with(None)), ("b", with(Some(None)))]);
        assert_eq!(default_max_tokens_for(Some(100), &routers), None);
        set(vec![("b", with(Some(None))), ("c", with(Some(Some(7))))]);
        assert_eq!(default_max_tokens_for(Some(100), &routers), Some(7));
        set(vec![
            ("c", with(Some(Some(7)))),
            ("d", with(Some(Some(300)))),
        ]);
        assert_eq!(default_max_tokens_for(None, &routers), Some(7));
    }
}
