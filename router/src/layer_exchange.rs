//! One MoE layer's exchange with the nodes of a placement, behind one interface: each node's
//! share goes out and its answer comes back, over the nodes' gRPC streams ([`GrpcExchange`],
//! a share cut to the node's batch bound) or over the epoch's collective
//! ([`CollectiveExchange`]); [`with_fallback`] tries the collective first and the streams after
//! it fails. What to send comes from [`crate::dispatch_plan`], and so does what the answers mean.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_cluster::collective::exchange::NodeShare;
use moe_cluster::collective::{EpochLink, RowEncoding};
use moe_cluster::frames::{self, CombineFailure, DispatchTag};
use moe_model::routes::ExpertRoutes;
use moe_proto::v1::DispatchBatch;

use crate::node_link::{LinkReply, NodeLink};

/// One layer to exchange: each node's share (empty for nodes with nothing to do), in the
/// order of the placement's nodes, and the layer's span (disabled when not traced).
pub struct LayerCall<'a> {
    pub tag: DispatchTag,
    pub hidden: usize,
    pub shares: &'a [NodeShare],
    pub span: &'a tracing::Span,
}

/// What one node answered for its share.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeReply {
    /// Nothing was sent to it.
    Idle,
    /// `[pairs, hidden]` weighted outputs in the share's pair order, and its expert compute.
    Outputs {
        values: Vec<f32>,
        compute_micros: u64,
    },
    /// It does not serve the epoch: the router is behind or ahead, the node is fine.
    StaleEpoch(String),
    /// It failed (stream broken, timeout, refusal, an answer that does not fit).
    Failed(String),
}

/// A layer's answers, node by node, and when the sending ended and the answers were in.
#[derive(Debug)]
pub struct Exchanged {
    pub replies: Vec<NodeReply>,
    pub sent: Instant,
    pub answered: Instant,
}

/// Sends one layer and collects every node's reply. An `Err` means the transport failed as a
/// whole without saying which node (the caller falls back to the gRPC streams, which tell).
pub trait LayerExchange {
    fn exchange(&self, call: &LayerCall<'_>) -> Result<Exchanged, String>;
}

/// A node's share cut into pieces of at most `max_rows` rows (the node's batch bound), in
/// order: their pairs, concatenated, are the share's pairs. A share within the bound is
/// borrowed as it is (the usual case: no copy).
pub fn split_share(share: &NodeShare, hidden: usize, max_rows: usize) -> Vec<Cow<'_, NodeShare>> {
    let rows = share.routes.rows();
    let max_rows = max_rows.max(1);
    if rows <= max_rows {
        return vec![Cow::Borrowed(share)];
    }
    let mut pieces = Vec::with_capacity(rows.div_ceil(max_rows));
    for start in (0..rows).step_by(max_rows) {
        let end = (start + max_rows).min(rows);
        let first = share.routes.offsets[start] as usize;
        let last = share.routes.offsets[end] as usize;
        pieces.push(Cow::Owned(NodeShare {
            rows: share.rows[start * hidden..end * hidden].to_vec(),
            routes: ExpertRoutes {
                offsets: share.routes.offsets[start..=end]
                    .iter()
                    .map(|&o| o - first as u32)
                    .collect(),
                experts: share.routes.experts[first..last].to_vec(),
                weights: share.routes.weights[first..last].to_vec(),
            },
        }));
    }
    pieces
}

/// The nodes' gRPC streams: each busy node's share, cut to the node's batch bound, goes
/// over its [`NodeLink`]; the answers are awaited together.
pub struct GrpcExchange<'a> {
    pub links: &'a [Arc<NodeLink>],
    pub runtime: &'a tokio::runtime::Handle,
    /// Guards against a vanished link task (each link bounds its own round trips).
    pub guard: Duration,
}

/// A node's batches queued on its link, with what is needed to read the answers.
struct Pending {
    node: usize,
    reply: tokio::sync::oneshot::Receiver<LinkReply>,
    pairs: Vec<usize>,
    span: tracing::Span,
}

impl GrpcExchange<'_> {
    /// The node's share as dispatch batches within its bound, counted in the link's stats.
    fn batches(
        &self,
        call: &LayerCall<'_>,
        node: usize,
        traceparent: &str,
    ) -> Vec<(DispatchBatch, usize)> {
        let link = &self.links[node];
        let share = &call.shares[node];
        let batches: Vec<(DispatchBatch, usize)> = split_share(share, call.hidden, link.max_rows)
            .iter()
            .map(|piece| {
                let mut batch =
                    frames::encode_dispatch(call.tag, call.hidden, &piece.rows, &piece.routes);
                batch.traceparent = traceparent.to_string();
                (batch, piece.routes.pairs())
            })
            .collect();
        let bytes: usize = batches
            .iter()
            .map(|(b, _)| {
                b.hidden_states.len()
                    + b.pair_offsets.len()
                    + b.pair_experts.len()
                    + b.pair_weights.len()
            })
            .sum();
        link.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        link.rows_sent
            .fetch_add(share.routes.rows() as u64, Ordering::Relaxed);
        link.count_pairs(call.tag.layer, share.routes.pairs() as u64);
        batches
    }

    /// The `dispatch` span of one node's share, when the layer is traced.
    fn node_span(call: &LayerCall<'_>, link: &NodeLink, share: &NodeShare) -> tracing::Span {
        if call.span.is_none() {
            return tracing::Span::none();
        }
        tracing::info_span!(
            target: "moe_router",
            parent: call.span,
            "dispatch",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            node_compute_us = tracing::field::Empty,
            node_id = %link.node_id,
            epoch = call.tag.epoch,
            rows = share.routes.rows() as u64,
            pairs = share.routes.pairs() as u64,
        )
    }

    /// Decodes a node's answers to its batches into one reply.
    fn reply(&self, call: &LayerCall<'_>, pending: &Pending, answers: LinkReply) -> NodeReply {
        let link = &self.links[pending.node];
        let combines = match answers {
            Ok(c) => c,
            Err(e) => return NodeReply::Failed(e),
        };
        if combines.len() != pending.pairs.len() {
            return NodeReply::Failed("fewer answers than batches".into());
        }
        let mut values = Vec::new();
        let mut compute_micros = 0u64;
        for (combine, &pairs) in combines.iter().zip(&pending.pairs) {
            link.bytes_received
                .fetch_add(combine.outputs.len() as u64, Ordering::Relaxed);
            compute_micros = compute_micros.saturating_add(combine.compute_micros);
            match frames::decode_combine(combine, call.tag, pairs, call.hidden) {
                // Usually the share's only batch: its values are taken as decoded.
                Ok(piece) if values.is_empty() => values = piece,
                Ok(piece) => values.extend_from_slice(&piece),
                Err(e @ CombineFailure::StaleEpoch(_)) => {
                    return NodeReply::StaleEpoch(e.to_string())
                }
                Err(e) => return NodeReply::Failed(e.to_string()),
            }
        }
        pending.span.record("node_compute_us", compute_micros);
        NodeReply::Outputs {
            values,
            compute_micros,
        }
    }
}

impl LayerExchange for GrpcExchange<'_> {
    fn exchange(&self, call: &LayerCall<'_>) -> Result<Exchanged, String> {
        let mut replies = vec![NodeReply::Idle; call.shares.len()];
        let mut pending = Vec::new();
        for (node, share) in call.shares.iter().enumerate() {
            if share.routes.rows() == 0 {
                continue;
            }
            let span = Self::node_span(call, &self.links[node], share);
            let traceparent = moe_cluster::telemetry::traceparent(&span).unwrap_or_default();
            let (batches, pairs): (Vec<DispatchBatch>, Vec<usize>) =
                self.batches(call, node, &traceparent).into_iter().unzip();
            match self.links[node].send(batches) {
                Ok(reply) => pending.push(Pending {
                    node,
                    reply,
                    pairs,
                    span,
                }),
                Err(e) => replies[node] = NodeReply::Failed(e),
            }
        }
        let sent = Instant::now();
        let guard = self.guard;
        let answers: Vec<(Pending, LinkReply)> = self.runtime.block_on(async move {
            let mut answers = Vec::with_capacity(pending.len());
            for mut p in pending {
                let answer = match tokio::time::timeout(guard, &mut p.reply).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err("link task ended".to_string()),
                    Err(_) => Err(format!("no answer within {guard:?}")),
                };
                answers.push((p, answer));
            }
            answers
        });
        let answered = Instant::now();
        for (p, answer) in answers {
            let reply = self.reply(call, &p, answer);
            if !matches!(reply, NodeReply::Outputs { .. }) {
                p.span.record("otel.status_code", "ERROR");
            }
            replies[p.node] = reply;
        }
        Ok(Exchanged {
            replies,
            sent,
            answered,
        })
    }
}

/// The epoch's collective (TCP or NCCL): every node gets its header, the busy ones their rows,
/// in one all-to-all per step of the layer protocol.
pub struct CollectiveExchange<'a> {
    pub collective: &'a Mutex<EpochLink>,
    pub links: &'a [Arc<NodeLink>],
    /// Bound on each step of the layer's exchange.
    pub timeout: Duration,
}

impl LayerExchange for CollectiveExchange<'_> {
    fn exchange(&self, call: &LayerCall<'_>) -> Result<Exchanged, String> {
        // One all-to-all: the whole exchange counts as waiting for the nodes.
        let sent = Instant::now();
        let span = if call.span.is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                target: "moe_router",
                parent: call.span,
                "collective_exchange",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                transport = tracing::field::Empty,
                epoch = call.tag.epoch,
                nodes = call.shares.len() as u64,
                busy_nodes = call.shares.iter().filter(|s| s.routes.rows() > 0).count() as u64,
            )
        };
        let _in_span = span.enter();
        let mut link = self
            .collective
            .lock()
            .map_err(|_| "collective lock poisoned".to_string())?;
        span.record("transport", link.transport().as_str());
        let traceparent = moe_cluster::telemetry::traceparent(&span);
        let rows_on_wire: Vec<RowEncoding> = self.links.iter().map(|l| l.rows_on_wire).collect();
        let answers = link
            .dispatch_layer(
                call.tag.layer,
                call.shares,
                &rows_on_wire,
                call.hidden,
                self.timeout,
                traceparent.as_deref(),
            )
            .map_err(|e| {
                span.record("otel.status_code", "ERROR");
                e.to_string()
            })?;
        drop(link);
        let mut replies = Vec::with_capacity(answers.len());
        for ((node, share), answer) in self.links.iter().zip(call.shares).zip(answers) {
            if share.routes.rows() == 0 {
                replies.push(NodeReply::Idle);
                continue;
            }
            let elem_bytes = node.rows_on_wire.elem_bytes() as u64;
            node.bytes_sent
                .fetch_add(elem_bytes * share.rows.len() as u64, Ordering::Relaxed);
            node.bytes_received
                .fetch_add(4 * answer.outputs.len() as u64, Ordering::Relaxed);
            node.rows_sent
                .fetch_add(share.routes.rows() as u64, Ordering::Relaxed);
            node.count_pairs(call.tag.layer, share.routes.pairs() as u64);
            replies.push(NodeReply::Outputs {
                values: answer.outputs,
                compute_micros: answer.compute_micros,
            });
        }
        Ok(Exchanged {
            replies,
            sent,
            answered: Instant::now(),
        })
    }
}

/// The layer over `collective` when given, else (and after the collective fails as a whole)
/// over `streams`. A collective failure is handed to `failed` before the streams are tried,
/// so it is on record (and the collective retired) while they run.
pub fn with_fallback(
    collective: Option<&dyn LayerExchange>,
    streams: &dyn LayerExchange,
    call: &LayerCall<'_>,
    failed: impl FnOnce(String),
) -> Exchanged {
    if let Some(collective) = collective {
        match collective.exchange(call) {
            Ok(exchanged) => return exchanged,
            Err(e) => failed(e),
        }
    }
    streams.exchange(call).unwrap_or_else(|e| Exchanged {
        replies: vec![NodeReply::Failed(e); call.shares.len()],
        sent: Instant::now(),
        answered: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIDDEN: usize = 2;

    fn layer() -> (Vec<f32>, ExpertRoutes) {
        let mut routes = ExpertRoutes::with_capacity(3, 6);
        routes.push_row(&mut [(0, 0.5), (3, 0.5)]);
        routes.push_row(&mut [(1, 0.25), (2, 0.75)]);
        routes.push_row(&mut [(3, 0.9), (2, 0.1)]);
        ((0..3 * HIDDEN).map(|v| v as f32).collect(), routes)
    }

    /// A share over the node's bound is cut into pieces whose pairs, concatenated, are the
    /// share's, each with offsets from 0; one within it is borrowed.
    #[test]
    fn shares_are_split_to_the_node_bound() {
        let (rows, routes) = layer();
        let share = NodeShare { rows, routes };
        assert!(matches!(split_share(&share, HIDDEN, 3)[..], [Cow::Borrowed(s)] if *s == share));
        let pieces = split_share(&share, HIDDEN, 2);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].routes.offsets, [0, 2, 4]);
        assert_eq!(pieces[1].routes.offsets, [0, 2]);
        assert_eq!(pieces[1].routes.experts, [2, 3]);
        assert_eq!(pieces[1].rows, [4.0, 5.0]);
        let experts: Vec<u32> = pieces
            .iter()
            .flat_map(|p| p.routes.experts.clone())
            .collect();
        assert_eq!(experts, share.routes.experts);
        let ones = split_share(&share, HIDDEN, 1);
        assert_eq!(ones.len(), 3);
        assert!(ones.iter().all(|p| p.routes.rows() == 1));
    }

    /// A transport that answers every busy node with its share's pair count, or fails.
    struct Fake {
        fails: bool,
        calls: std::cell::Cell<usize>,
    }

    impl LayerExchange for Fake {
        fn exchange(&self, call: &LayerCall<'_>) -> Result<Exchanged, String> {
            self.calls.set(self.calls.get() + 1);
            if self.fails {
                return Err("collective aborted".into());
            }
            let replies = call
                .shares
                .iter()
                .map(|s| NodeReply::Outputs {
                    values: vec![1.0; s.routes.pairs() * call.hidden],
                    compute_micros: 1,
                })
                .collect();
            Ok(Exchanged {
                replies,
                sent: Instant::now(),
                answered: Instant::now(),
            })
        }
    }

    #[test]
    fn a_failed_collective_falls_back_to_the_streams() {
        let (rows, routes) = layer();
        let shares = [NodeShare { rows, routes }];
        let span = tracing::Span::none();
        let call = LayerCall {
            tag: DispatchTag {
                epoch: 1,
                step: 1,
                layer: 1,
                micro_batch: 0,
            },
            hidden: HIDDEN,
            shares: &shares,
            span: &span,
        };
        let fake = |fails| Fake {
            fails,
            calls: Default::default(),
        };
        let (broken, streams) = (fake(true), fake(false));
        let mut failure = None;
        let exchanged = with_fallback(Some(&broken), &streams, &call, |e| {
            // On record before the streams run.
            assert_eq!(streams.calls.get(), 0);
            failure = Some(e);
        });
        assert_eq!(failure.as_deref(), Some("collective aborted"));
        assert_eq!((broken.calls.get(), streams.calls.get()), (1, 1));
        assert!(
            matches!(&exchanged.replies[0], NodeReply::Outputs { values, .. } if values.len() == 6 * HIDDEN)
        );
        let (working, streams) = (fake(false), fake(false));
        with_fallback(Some(&working), &streams, &call, |e| panic!("{e}"));
        assert_eq!(
            streams.calls.get(),
            0,
            "the streams are not used when the collective works"
        );
        with_fallback(None, &streams, &call, |e| panic!("{e}"));
        assert_eq!(streams.calls.get(), 1);
    }
}
