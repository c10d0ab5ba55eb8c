//! One MoE layer's all-to-all over a [`Communicator`], both sides: the router's
//! [`dispatch_layer`] and a node's [`serve_layer`]. Three groups per layer:
//!
//! 1. headers: the router sends every node of the epoch a [`LayerHeader`] (layer, rows,
//!    pairs, the W3C traceparent of a traced layer), idle nodes included, so that each node
//!    knows whether data follows;
//! 2. data: to each node with rows, its rows (f32, or bf16 for a node whose experts round
//!    them to bf16 anyway: [`RowEncoding`], named in the header) and routes (CSR offsets,
//!    experts, weights), laid out by [`ExchangePlan`];
//! 3. outputs: each such node sends back one weighted output row per pair, in pair order,
//!    and then, as a second message, its expert compute time (u64 microseconds), as over
//!    gRPC. Apart, so that outputs the experts wrote in device memory go out as they are.
//!
//! Every wait on the router is bounded ([`run_bounded`]: a dead node costs one timeout and an
//! aborted communicator, then the router re-plans). A node waits for headers as long as its
//! epoch lives, then bounds the rest of the layer the same way.

use std::time::{Duration, Instant};

use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;

use super::communicator::{run_bounded, CommError, Communicator, Pending};
use super::plan::{ExchangePlan, PeerCounts, PlanError};
use super::row_encoding::RowEncoding;
use crate::dispatch_rules::{DispatchRules, Violation};

/// Bytes of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); zeros when not traced.
pub const TRACEPARENT_BYTES: usize = 55;
/// Bytes of a [`LayerHeader`] on the wire.
pub const HEADER_BYTES: usize = 13 + TRACEPARENT_BYTES;
/// The layer protocol this build speaks, named in every [`super::CollectiveRecord`]: a node
/// joins only a router's communicator that speaks it (2: the header names the row encoding).
pub const LAYER_PROTOCOL: u32 = 2;
/// After a node's outputs: its expert compute time in microseconds (u64).
const COMPUTE_TRAILER_BYTES: usize = 8;

/// What the router tells a node before each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerHeader {
    pub layer: u32,
    pub counts: PeerCounts,
    /// How the rows that follow are encoded.
    pub rows_on_wire: RowEncoding,
    /// The traceparent of the router's span for this layer, so the node's span joins the
    /// request's trace as over gRPC; all zeros when the layer is not traced.
    pub trace: [u8; TRACEPARENT_BYTES],
}

impl LayerHeader {
    pub fn new(
        layer: u32,
        counts: PeerCounts,
        rows_on_wire: RowEncoding,
        traceparent: Option<&str>,
    ) -> Self {
        let mut trace = [0u8; TRACEPARENT_BYTES];
        if let Some(tp) = traceparent.filter(|tp| tp.len() == TRACEPARENT_BYTES) {
            trace.copy_from_slice(tp.as_bytes());
        }
        Self {
            layer,
            counts,
            rows_on_wire,
            trace,
        }
    }

    /// The traceparent, if the layer is traced (what the peer sent is only ever parsed as
    /// a W3C header, which rejects anything malformed).
    pub fn traceparent(&self) -> Option<&str> {
        if self.trace[0] == 0 {
            return None;
        }
        std::str::from_utf8(&self.trace).ok()
    }

    pub fn encode(self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..4].copy_from_slice(&self.layer.to_le_bytes());
        out[4..12].copy_from_slice(&self.counts.encode());
        out[12] = self.rows_on_wire.code();
        out[13..].copy_from_slice(&self.trace);
        out
    }

    pub fn decode(bytes: &[u8], max_rows: u32) -> Result<Self, ExchangeError> {
        let bytes: &[u8; HEADER_BYTES] = bytes
            .try_into()
            .map_err(|_| ExchangeError::Malformed(format!("a header of {} bytes", bytes.len())))?;
        let layer = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let mut counts = [0u8; 8];
        counts.copy_from_slice(&bytes[4..12]);
        let counts = PeerCounts::decode(&counts, max_rows)?;
        let rows_on_wire = RowEncoding::from_code(bytes[12]).ok_or_else(|| {
            ExchangeError::Malformed(format!("row encoding {} in a header", bytes[12]))
        })?;
        let mut trace = [0u8; TRACEPARENT_BYTES];
        trace.copy_from_slice(&bytes[13..]);
        Ok(Self {
            layer,
            counts,
            rows_on_wire,
            trace,
        })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("malformed exchange: {0}")]
    Malformed(String),
    #[error("experts: {0}")]
    Experts(String),
    #[error("the epoch ended while waiting for the router")]
    Stopped,
    /// The layer broke the node's rules (see [`DispatchRules`]).
    #[error("refused: {0}")]
    Refused(#[from] Violation),
}

/// What the router sends one node in one layer: its rows and their routes (row indices
/// relative to these rows).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeShare {
    pub rows: Vec<f32>,
    pub routes: ExpertRoutes,
}

fn f32_bytes(values: &[f32]) -> impl Iterator<Item = u8> + '_ {
    values.iter().flat_map(|v| v.to_le_bytes())
}

fn u32_bytes(values: &[u32]) -> impl Iterator<Item = u8> + '_ {
    values.iter().flat_map(|v| v.to_le_bytes())
}

fn read_u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// What one node answered for one layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeAnswer {
    /// `[pairs, hidden]`, weighted, in the order of the node's pairs (empty for idle nodes).
    pub outputs: Vec<f32>,
    /// The node's own expert math for the layer.
    pub compute_micros: u64,
}

/// The router's side of one layer. `shares[i]` goes to rank `i + 1` (every node of the epoch,
/// idle ones with no rows), its rows encoded as `rows_on_wire[i]` says (f32 where it is
/// missing). Returns each node's answer, in `shares` order.
pub fn dispatch_layer<C: Communicator>(
    comm: &mut C,
    layer: u32,
    shares: &[NodeShare],
    rows_on_wire: &[RowEncoding],
    hidden: usize,
    timeout: Duration,
    traceparent: Option<&str>,
) -> Result<Vec<NodeAnswer>, ExchangeError> {
    let mut buffered = Vec::with_capacity(shares.len());
    for (i, share) in shares.iter().enumerate() {
        let encoding = rows_on_wire.get(i).copied().unwrap_or_default();
        let rows = share.routes.rows();
        if share.rows.len() != rows * hidden {
            return Err(ExchangeError::Malformed(format!(
                "a share of {} values for {rows} rows of {hidden}",
                share.rows.len()
            )));
        }
        let rows = if rows == 0 {
            None
        } else {
            let mut bytes = Vec::new();
            encoding.extend_bytes(&share.rows, &mut bytes);
            Some(comm.upload(bytes)?)
        };
        buffered.push(BufferShare {
            rows,
            encoding,
            routes: &share.routes,
        });
    }
    let answers = dispatch_layer_buffers(comm, layer, buffered, hidden, timeout, traceparent)?;
    let mut out = Vec::with_capacity(answers.len());
    for answer in answers {
        let outputs = match answer.outputs {
            Some(buffer) => read_f32s(&comm.download(buffer)?),
            None => Vec::new(),
        };
        out.push(NodeAnswer {
            outputs,
            compute_micros: answer.compute_micros,
        });
    }
    Ok(out)
}

/// A node's share whose rows are already a transfer buffer (gathered where they lie, e.g. on
/// the router's GPU).
pub struct BufferShare<'a, B> {
    /// `[routes.rows(), hidden]` in `encoding`; `None` for a node with nothing to do.
    pub rows: Option<B>,
    pub encoding: RowEncoding,
    pub routes: &'a ExpertRoutes,
}

/// What one node answered, still in the transport's buffer.
pub struct BufferAnswer<B> {
    /// `[pairs, hidden]` f32, weighted, in the share's pair order (its length checked);
    /// `None` for an idle node.
    pub outputs: Option<B>,
    pub compute_micros: u64,
}

/// [`dispatch_layer`] on rows already in the transport's buffers, answering in them: the
/// router's side of a layer whose rows never leave the device.
pub fn dispatch_layer_buffers<C: Communicator>(
    comm: &mut C,
    layer: u32,
    shares: Vec<BufferShare<'_, C::Buffer>>,
    hidden: usize,
    timeout: Duration,
    traceparent: Option<&str>,
) -> Result<Vec<BufferAnswer<C::Buffer>>, ExchangeError> {
    if shares.len() + 1 != comm.size() {
        return Err(ExchangeError::Malformed(format!(
            "{} shares for a communicator of {} ranks",
            shares.len(),
            comm.size()
        )));
    }
    let mut counts = Vec::with_capacity(shares.len());
    let mut encodings = Vec::with_capacity(shares.len());
    for share in &shares {
        let rows = share.routes.rows();
        let bytes = share.rows.as_ref().map_or(0, |b| comm.buffer_bytes(b));
        let rows_present = share.rows.is_some() == (rows > 0);
        let row_bytes = rows * hidden * share.encoding.elem_bytes();
        if !rows_present || bytes != row_bytes || share.routes.pairs() < rows {
            return Err(ExchangeError::Malformed(format!(
                "a share of {bytes} row bytes for {rows} rows of {hidden} and {} pairs",
                share.routes.pairs()
            )));
        }
        counts.push(PeerCounts {
            rows: rows as u32,
            pairs: share.routes.pairs() as u32,
        });
        encodings.push(share.encoding);
    }
    let plan = ExchangePlan::new(&counts, hidden, &encodings);

    // 1. Headers, to every node.
    let mut headers = Vec::with_capacity(shares.len());
    for (i, (&c, &encoding)) in counts.iter().zip(&encodings).enumerate() {
        let header = LayerHeader::new(layer, c, encoding, traceparent).encode();
        headers.push((i + 1, comm.upload(header.to_vec())?));
    }
    run_bounded(
        comm,
        Pending {
            sends: headers,
            recvs: vec![],
        },
        timeout,
    )?;

    // 2. Rows and routes, to the nodes with rows.
    let mut shares: Vec<Option<BufferShare<'_, C::Buffer>>> =
        shares.into_iter().map(Some).collect();
    let mut sends = Vec::with_capacity(2 * plan.peers.len());
    for peer in &plan.peers {
        let Some(BufferShare {
            rows: Some(rows),
            routes,
            ..
        }) = shares.get_mut(peer.rank - 1).and_then(Option::take)
        else {
            return Err(ExchangeError::Malformed(format!(
                "no rows for rank {}",
                peer.rank
            )));
        };
        let mut route_bytes: Vec<u8> = Vec::with_capacity(peer.weights.end - peer.offsets.start);
        route_bytes.extend(u32_bytes(&routes.offsets));
        route_bytes.extend(u32_bytes(&routes.experts));
        route_bytes.extend(f32_bytes(&routes.weights));
        sends.push((peer.rank, rows));
        sends.push((peer.rank, comm.upload(route_bytes)?));
    }
    run_bounded(
        comm,
        Pending {
            sends,
            recvs: vec![],
        },
        timeout,
    )?;

    // 3. Outputs back, then each node's compute time.
    let recvs = plan
        .peers
        .iter()
        .flat_map(|p| [(p.rank, p.outputs.len()), (p.rank, COMPUTE_TRAILER_BYTES)])
        .collect();
    let received = run_bounded(
        comm,
        Pending {
            sends: vec![],
            recvs,
        },
        timeout,
    )?;
    let mut answers: Vec<BufferAnswer<C::Buffer>> = (0..counts.len())
        .map(|_| BufferAnswer {
            outputs: None,
            compute_micros: 0,
        })
        .collect();
    let mut received = received.into_iter();
    for peer in &plan.peers {
        let (Some(outputs), Some(trailer)) = (received.next(), received.next()) else {
            return Err(ExchangeError::Malformed(format!(
                "no outputs from rank {}",
                peer.rank
            )));
        };
        let output_bytes = comm.buffer_bytes(&outputs);
        let trailer = comm.download(trailer)?;
        if trailer.len() != COMPUTE_TRAILER_BYTES || output_bytes != peer.outputs.len() {
            return Err(ExchangeError::Malformed(format!(
                "rank {} answered {output_bytes} output bytes and a {}-byte trailer",
                peer.rank,
                trailer.len()
            )));
        }
        let mut micros = [0u8; COMPUTE_TRAILER_BYTES];
        micros.copy_from_slice(&trailer);
        answers[peer.rank - 1] = BufferAnswer {
            outputs: Some(outputs),
            compute_micros: u64::from_le_bytes(micros),
        };
    }
    Ok(answers)
}

/// What a node did for one header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The router had nothing for this node in this layer.
    Idle { layer: u32 },
    Ran {
        layer: u32,
        rows: u32,
        pairs: u32,
        /// The expert math, as reported to the router.
        compute_micros: u64,
    },
}

/// A node's side of one layer: waits for the router's header while `keep_waiting()` holds
/// (the epoch is live), then receives its rows and routes, runs `experts` (inside the span
/// `batch_span` makes for the header) and sends the outputs back, each step bounded by
/// `timeout`. The header and the routes are checked against `rules` (the node's batch bound,
/// top-k, MoE layers, the experts it holds) before anything is allocated for them, as on the
/// gRPC stream. On a stop or an error the communicator is aborted (a router waiting on this
/// node then times out and re-plans).
pub fn serve_layer<C: Communicator>(
    comm: &mut C,
    experts: &dyn ExpertBackend,
    rules: &DispatchRules,
    keep_waiting: impl Fn() -> bool,
    batch_span: impl Fn(&LayerHeader) -> tracing::Span,
    timeout: Duration,
) -> Result<Served, ExchangeError> {
    comm.post(Pending {
        sends: vec![],
        recvs: vec![(0, HEADER_BYTES)],
    })?;
    let header = loop {
        // Short waits, so that the end of the epoch is noticed within milliseconds.
        if let Some(mut got) = comm.wait(Duration::from_millis(5))? {
            let buffer = got.pop().ok_or(CommError::Failed("no header".into()))?;
            let max_rows = u32::try_from(rules.max_rows()).unwrap_or(u32::MAX);
            break LayerHeader::decode(&comm.download(buffer)?, max_rows).and_then(|h| {
                rules
                    .check_counts(h.layer, h.counts.rows as usize, h.counts.pairs as usize)
                    .and_then(|()| match h.rows_on_wire {
                        // Rounded rows would change the outputs of experts that read f32.
                        RowEncoding::Bf16 if !experts.reads_rows_as_bf16() => {
                            Err(Violation::Bf16Rows)
                        }
                        _ => Ok(()),
                    })
                    .map(|()| h)
                    .map_err(ExchangeError::Refused)
            });
        }
        if !keep_waiting() {
            comm.abort();
            return Err(ExchangeError::Stopped);
        }
    };
    let header = match header {
        Ok(h) => h,
        Err(e) => {
            comm.abort();
            return Err(e);
        }
    };
    let (rows, pairs) = (header.counts.rows as usize, header.counts.pairs as usize);
    let hidden = rules.hidden();
    if rows == 0 {
        return Ok(Served::Idle {
            layer: header.layer,
        });
    }
    let plan = ExchangePlan::new(&[header.counts], hidden, &[header.rows_on_wire]);
    let peer = &plan.peers[0];
    let received = run_bounded(
        comm,
        Pending {
            sends: vec![],
            recvs: vec![(0, peer.hidden.len()), (0, plan.route_bytes)],
        },
        timeout,
    )?;
    let mut received = received.into_iter();
    let (Some(row_buffer), Some(route_buffer)) = (received.next(), received.next()) else {
        comm.abort();
        return Err(ExchangeError::Malformed("missing rows or routes".into()));
    };
    let route_bytes = comm.download(route_buffer)?;
    let route_len = 4 * (rows + 1) + 8 * pairs;
    if route_bytes.len() == route_len {
        // Checked in place, before the routes are decoded (their length is checked below).
        let (offsets, rest) = route_bytes.split_at(4 * (rows + 1));
        let (pair_experts, weights) = rest.split_at(4 * pairs);
        let holds = |layer: usize, expert: usize| experts.holds(layer, expert);
        if let Err(v) =
            rules.check_routes(header.layer, rows, offsets, pair_experts, weights, holds)
        {
            comm.abort();
            return Err(ExchangeError::Refused(v));
        }
    }
    let routes = match decode_routes(&route_bytes, rows, pairs) {
        Ok(r) => r,
        Err(e) => {
            comm.abort();
            return Err(e);
        }
    };
    let started = Instant::now();
    let span = batch_span(&header);
    let in_span = span.enter();
    let ran = run_layer_experts(
        comm,
        experts,
        header.layer as usize,
        row_buffer,
        header.rows_on_wire,
        &routes,
    );
    drop(in_span);
    let outputs = match ran {
        Ok((outputs, values)) if values == pairs * hidden => outputs,
        Ok((_, values)) => {
            comm.abort();
            return Err(ExchangeError::Experts(format!(
                "{values} output values for {pairs} pairs of {hidden}"
            )));
        }
        Err(e) => {
            comm.abort();
            return Err(e);
        }
    };
    let micros = started.elapsed().as_micros() as u64;
    let trailer = comm.upload(micros.to_le_bytes().to_vec())?;
    run_bounded(
        comm,
        Pending {
            sends: vec![(0, outputs), (0, trailer)],
            recvs: vec![],
        },
        timeout.saturating_sub(started.elapsed()).max(timeout / 2),
    )?;
    Ok(Served::Ran {
        layer: header.layer,
        rows: header.counts.rows,
        pairs: header.counts.pairs,
        compute_micros: micros,
    })
}

/// The experts on a layer's received rows: where the transport put them when it can (NCCL
/// rows on the experts' GPU), else through host memory. Returns the outputs to send and how
/// many values they hold.
fn run_layer_experts<C: Communicator>(
    comm: &C,
    experts: &dyn ExpertBackend,
    layer: usize,
    rows: C::Buffer,
    encoding: RowEncoding,
    routes: &ExpertRoutes,
) -> Result<(C::Buffer, usize), ExchangeError> {
    if let Some(ran) = comm.run_in_place(experts, layer, &rows, encoding, routes) {
        return ran.map_err(ExchangeError::Experts);
    }
    let bytes = comm.download(rows)?;
    // bf16 rows to experts on a GPU go up as they came (the serving side checked that these
    // experts read bf16); others are widened here.
    let ran = match encoding {
        RowEncoding::Bf16 => experts.run_bf16_host_rows(layer, &bytes, routes),
        RowEncoding::F32 => None,
    };
    let outputs = match ran {
        Some(ran) => ran,
        None => {
            let rows = encoding.decode(&bytes).ok_or_else(|| {
                ExchangeError::Malformed(format!("rows not a whole number of {encoding} values"))
            })?;
            experts.run_experts(layer, &rows, routes)
        }
    }
    .map_err(|e| ExchangeError::Experts(e.to_string()))?;
    let values = outputs.len();
    Ok((comm.upload(f32_bytes(&outputs).collect())?, values))
}

/// Routes as laid out by [`dispatch_layer`], checked: offsets start at 0, never decrease, give
/// every row at least one pair and end at `pairs`.
fn decode_routes(bytes: &[u8], rows: usize, pairs: usize) -> Result<ExpertRoutes, ExchangeError> {
    let expected = 4 * (rows + 1) + 8 * pairs;
    if bytes.len() != expected {
        return Err(ExchangeError::Malformed(format!(
            "{} bytes of routes, {expected} expected",
            bytes.len()
        )));
    }
    let (offsets, rest) = bytes.split_at(4 * (rows + 1));
    let (experts, weights) = rest.split_at(4 * pairs);
    let offsets = read_u32s(offsets);
    let valid = offsets.first() == Some(&0)
        && offsets.last() == Some(&(pairs as u32))
        && offsets.windows(2).all(|w| w[0] < w[1]);
    if !valid {
        return Err(ExchangeError::Malformed(
            "route offsets must start at 0, grow by at least 1 per row and end at the pair count"
                .into(),
        ));
    }
    Ok(ExpertRoutes {
        offsets,
        experts: read_u32s(experts),
        weights: read_f32s(weights),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use moe_model::checkpoint::Checkpoint;
    use moe_model::experts::ExpertSet;
    use moe_model::ModelConfig;

    use super::super::communicator::fake::group;
    use super::super::test_nodes::{rows, serve_one_layer_each};
    use super::*;

    fn fixture() -> (Checkpoint, ModelConfig) {
        super::super::test_nodes::fixture("qwen3-moe-tiny")
    }

    /// The router splits a batch between two nodes holding disjoint halves of a layer's
    /// experts; every pair's output comes back equal to running all experts in one process.
    #[test]
    fn a_layer_over_the_fake_communicator_matches_one_process() {
        let (ckpt, config) = fixture();
        let hidden = config.hidden_size;
        let layer = config.moe_layer_indices().next().unwrap();
        let experts = config.moe.num_experts;
        let all = ExpertSet::load(&ckpt, &config, (0..experts).map(|e| (layer, e))).unwrap();
        let halves = [
            ExpertSet::load(&ckpt, &config, (0..experts / 2).map(|e| (layer, e))).unwrap(),
            ExpertSet::load(&ckpt, &config, (experts / 2..experts).map(|e| (layer, e))).unwrap(),
        ];
        // Three rows; row 1 uses only the first half's experts, so node 2 gets two rows.
        let x = rows(3, hidden, 7);
        let choices: [Vec<(u32, f32)>; 3] = [
            vec![(0, 0.6), (experts as u32 - 1, 0.4)],
            vec![(1, 1.0)],
            vec![(2, 0.3), (experts as u32 / 2, 0.7)],
        ];
        let mut routes = ExpertRoutes::with_capacity(3, 5);
        for c in &choices {
            routes.push_row(&mut c.clone());
        }
        let want = all.run_experts(layer, &x, &routes).unwrap();

        // Split by owner: node 1 holds experts < half, node 2 the rest.
        let owner = |e: u32| usize::from(e as usize >= experts / 2);
        let mut shares = vec![NodeShare::default(), NodeShare::default()];
        let mut back: Vec<Vec<usize>> = vec![vec![], vec![]]; // node -> global pair index
        for (share, node) in shares.iter_mut().zip(0..) {
            share.routes = ExpertRoutes::with_capacity(3, 5);
            for r in 0..routes.rows() {
                let mut mine: Vec<(u32, f32)> = routes
                    .row_pairs(r)
                    .filter(|&p| owner(routes.experts[p]) == node)
                    .map(|p| (routes.experts[p], routes.weights[p]))
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                share
                    .rows
                    .extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
                back[node].extend(
                    routes
                        .row_pairs(r)
                        .filter(|&p| owner(routes.experts[p]) == node),
                );
                share.routes.push_row(&mut mine);
            }
        }

        let (mut comms, _) = group(3);
        let nodes = comms.split_off(1);
        let mut router = comms.pop().unwrap();
        let timeout = Duration::from_secs(10);
        let rules = DispatchRules::for_model(&config, 1024);
        let handles = serve_one_layer_each(nodes, halves, &rules, timeout);
        let outputs = dispatch_layer(
            &mut router,
            layer as u32,
            &shares,
            &[],
            hidden,
            timeout,
            None,
        )
        .unwrap();
        let served: Vec<(u32, u32, u32)> = handles
            .into_iter()
            .map(|h| match h.join().unwrap().unwrap() {
                Served::Ran {
                    layer, rows, pairs, ..
                } => (layer, rows, pairs),
                idle => panic!("{idle:?}"),
            })
            .collect();
        assert_eq!(served, [(layer as u32, 3, 3), (layer as u32, 2, 2)]);
        for (node, answer) in outputs.iter().enumerate() {
            let out = &answer.outputs;
            for (i, &p) in back[node].iter().enumerate() {
                assert_eq!(
                    out[i * hidden..(i + 1) * hidden],
                    want[p * hidden..(p + 1) * hidden],
                    "pair {p} from node {}",
                    node + 1
                );
            }
        }
    }

    /// A node with nothing to do gets only its header; a node that stopped answering costs
    /// the router one timeout and an aborted communicator, never a hang.
    #[test]
    fn idle_nodes_get_a_header_and_a_dead_node_times_out() {
        let (ckpt, config) = fixture();
        let hidden = config.hidden_size;
        let layer = config.moe_layer_indices().next().unwrap();
        let set = ExpertSet::load(&ckpt, &config, [(layer, 0)]).unwrap();
        let mut routes = ExpertRoutes::with_capacity(1, 1);
        routes.push_row(&mut [(0, 1.0)]);
        let busy = NodeShare {
            rows: rows(1, hidden, 1),
            routes,
        };

        let (mut comms, dead) = group(3);
        let mut nodes = comms.split_off(1);
        let mut router = comms.pop().unwrap();
        let mut idle_node = nodes.remove(0);
        let idle = std::thread::spawn(move || {
            serve_layer(
                &mut idle_node,
                &ExpertSet::empty(hidden),
                &DispatchRules::for_model(&config, 1024),
                || true,
                |_| tracing::Span::none(),
                Duration::from_secs(5),
            )
        });
        dead.lock().unwrap()[2] = true;
        let started = Instant::now();
        let err = dispatch_layer(
            &mut router,
            layer as u32,
            &[NodeShare::default(), busy],
            &[],
            hidden,
            Duration::from_millis(200),
            None,
        )
        .unwrap_err();
        assert_eq!(
            err,
            ExchangeError::Comm(CommError::Timeout(Duration::from_millis(200)))
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(router.aborted);
        assert_eq!(
            idle.join().unwrap().unwrap(),
            Served::Idle {
                layer: layer as u32
            }
        );
        drop(set);
    }

    /// Outputs of the wrong length, or a short compute trailer, are an error, not a panic or
    /// rows of the wrong width.
    #[test]
    fn a_short_answer_is_refused() {
        let hidden = 4;
        let mut routes = ExpertRoutes::with_capacity(1, 2);
        routes.push_row(&mut [(0, 0.5), (1, 0.5)]);
        let share = NodeShare {
            rows: rows(1, hidden, 3),
            routes,
        };
        for (output_values, trailer_bytes) in [(2 * hidden - 1, 8), (2 * hidden, 4)] {
            let (mut comms, _) = group(2);
            let mut node = comms.pop().unwrap();
            let mut router = comms.pop().unwrap();
            let answering = std::thread::spawn(move || {
                let wait = Duration::from_secs(5);
                let header = run_bounded(
                    &mut node,
                    Pending {
                        sends: vec![],
                        recvs: vec![(0, HEADER_BYTES)],
                    },
                    wait,
                )
                .unwrap();
                let counts = LayerHeader::decode(&header[0], 16).unwrap().counts;
                let plan = ExchangePlan::new(&[counts], hidden, &[]);
                run_bounded(
                    &mut node,
                    Pending {
                        sends: vec![],
                        recvs: vec![(0, plan.peers[0].hidden.len()), (0, plan.route_bytes)],
                    },
                    wait,
                )
                .unwrap();
                let outputs = f32_bytes(&vec![0.5; output_values]).collect();
                run_bounded(
                    &mut node,
                    Pending {
                        sends: vec![(0, outputs), (0, vec![0; trailer_bytes])],
                        recvs: vec![],
                    },
                    wait,
                )
                .unwrap();
            });
            let err = dispatch_layer(
                &mut router,
                0,
                std::slice::from_ref(&share),
                &[],
                hidden,
                Duration::from_secs(5),
                None,
            )
            .unwrap_err();
            // The transport refuses the wrong length (NCCL, TCP and the fake all do);
            // `dispatch_layer` checks again in case one does not.
            assert!(
                matches!(err, ExchangeError::Malformed(_) | ExchangeError::Comm(_)),
                "{err:?}"
            );
            answering.join().unwrap();
        }
    }

    /// bf16 rows to a node whose experts round their inputs to bf16 give bitwise the outputs
    /// of f32 rows (in half the bytes); a node whose experts read f32 refuses them, counted as
    /// `row_encoding`, so a router that sent them falls back instead of changing a token.
    #[test]
    fn bf16_rows_go_only_to_experts_that_round_them() {
        use super::super::test_nodes::Bf16Experts;
        use std::sync::atomic::AtomicU8;

        let (ckpt, config) = fixture();
        let hidden = config.hidden_size;
        let layer = config.moe_layer_indices().next().unwrap();
        let experts = config.moe.num_experts;
        let set = ExpertSet::load(&ckpt, &config, (0..experts).map(|e| (layer, e))).unwrap();
        let mut routes = ExpertRoutes::with_capacity(4, 8);
        for r in 0..4u32 {
            routes.push_row(&mut [(r, 0.25), (r + 3, 0.75)]);
        }
        let share = NodeShare {
            rows: rows(4, hidden, 11),
            routes: routes.clone(),
        };
        let rules = DispatchRules::for_model(&config, 1024);
        let timeout = Duration::from_secs(5);
        // One layer to one node serving `experts`: the router's result, the node's, and the
        // row encoding its header named.
        let layer_to = |experts: &(dyn ExpertBackend + Sync), wire: RowEncoding| {
            let (mut comms, _) = group(2);
            let mut node = comms.pop().unwrap();
            let mut router = comms.pop().unwrap();
            let named = AtomicU8::new(u8::MAX);
            std::thread::scope(|scope| {
                let serving = scope.spawn(|| {
                    serve_layer(
                        &mut node,
                        experts,
                        &rules,
                        || true,
                        |h| {
                            named.store(h.rows_on_wire.code(), Ordering::Relaxed);
                            tracing::Span::none()
                        },
                        timeout,
                    )
                });
                let share = std::slice::from_ref(&share);
                let sent = dispatch_layer(
                    &mut router,
                    layer as u32,
                    share,
                    &[wire],
                    hidden,
                    timeout,
                    None,
                );
                (sent, serving.join().unwrap(), named.load(Ordering::Relaxed))
            })
        };
        let rounding = Bf16Experts(set.subset(|_, _| true));
        let (f32_sent, f32_served, _) = layer_to(&rounding, RowEncoding::F32);
        let (bf16_sent, bf16_served, named) = layer_to(&rounding, RowEncoding::Bf16);
        assert!(
            matches!(f32_served, Ok(Served::Ran { rows: 4, .. })),
            "{f32_served:?}"
        );
        assert!(
            matches!(bf16_served, Ok(Served::Ran { rows: 4, .. })),
            "{bf16_served:?}"
        );
        assert_eq!(named, RowEncoding::Bf16.code());
        let (f32_out, bf16_out) = (f32_sent.unwrap(), bf16_sent.unwrap());
        assert_eq!(f32_out[0].outputs.len(), 8 * hidden);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&f32_out[0].outputs), bits(&bf16_out[0].outputs));
        // Rounding is not a no-op on these rows: experts that read f32 answer otherwise.
        let exact = set.run_experts(layer, &share.rows, &routes).unwrap();
        assert_ne!(bits(&exact), bits(&bf16_out[0].outputs));

        // Experts that take the bytes as they came (a GPU set) get bf16 layers so, and give
        // the same outputs; f32 layers still go through `run_experts`.
        let taking = super::super::test_nodes::Bf16ByteExperts {
            experts: Bf16Experts(set.subset(|_, _| true)),
            taken: std::sync::atomic::AtomicUsize::new(0),
        };
        let (taken_sent, _, _) = layer_to(&taking, RowEncoding::Bf16);
        assert_eq!(taking.taken.load(Ordering::Relaxed), 1);
        assert_eq!(
            bits(&taken_sent.unwrap()[0].outputs),
            bits(&f32_out[0].outputs)
        );
        let (_, f32_taken, _) = layer_to(&taking, RowEncoding::F32);
        assert!(matches!(f32_taken, Ok(Served::Ran { rows: 4, .. })));
        assert_eq!(
            taking.taken.load(Ordering::Relaxed),
            1,
            "f32 rows are not bf16 bytes"
        );

        let (refused_sent, refused_served, _) = layer_to(&set, RowEncoding::Bf16);
        assert_eq!(
            refused_served,
            Err(ExchangeError::Refused(Violation::Bf16Rows))
        );
        assert!(refused_sent.is_err());
        assert_eq!(Violation::Bf16Rows.reason(), "row_encoding");
    }

    /// A node waiting for a header leaves when its epoch ends.
    #[test]
    fn a_waiting_node_stops_with_its_epoch() {
        let (mut comms, _) = group(2);
        let mut node = comms.pop().unwrap();
        let live = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&live);
        let waiting = std::thread::spawn(move || {
            serve_layer(
                &mut node,
                &ExpertSet::empty(4),
                &DispatchRules::new(4, 1024, 2, [0]),
                || flag.load(Ordering::Relaxed),
                |_| tracing::Span::none(),
                Duration::from_secs(1),
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        live.store(false, Ordering::Relaxed);
        assert_eq!(waiting.join().unwrap(), Err(ExchangeError::Stopped));
    }

    #[test]
    fn headers_and_routes_are_checked() {
        let traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let counts = PeerCounts { rows: 2, pairs: 5 };
        let h = LayerHeader::new(3, counts, RowEncoding::Bf16, Some(traced));
        assert_eq!(LayerHeader::decode(&h.encode(), 16), Ok(h));
        assert_eq!(h.traceparent(), Some(traced));
        assert!(LayerHeader::decode(&h.encode(), 1).is_err());
        assert!(LayerHeader::decode(&h.encode()[..8], 16).is_err());
        let idle = LayerHeader::new(1, PeerCounts::default(), RowEncoding::F32, None);
        assert_eq!(LayerHeader::decode(&idle.encode(), 16), Ok(idle));
        assert_eq!(idle.traceparent(), None);
        // An encoding this build does not know is refused, not guessed.
        let mut unknown = h.encode();
        unknown[12] = 7;
        assert!(matches!(
            LayerHeader::decode(&unknown, 16),
            Err(ExchangeError::Malformed(_))
        ));
        // A traceparent of the wrong length is not sent (it could not be a W3C one).
        assert_eq!(
            LayerHeader::new(1, PeerCounts::default(), RowEncoding::F32, Some("00-short"))
                .traceparent(),
            None
        );

        let mut good = Vec::new();
        good.extend(u32_bytes(&[0, 1, 3]));
        good.extend(u32_bytes(&[4, 1, 2]));
        good.extend(f32_bytes(&[1.0, 0.5, 0.5]));
        assert!(decode_routes(&good, 2, 3).is_ok());
        assert!(decode_routes(&good[..good.len() - 1], 2, 3).is_err());
        let mut empty_row = Vec::new();
        empty_row.extend(u32_bytes(&[0, 0, 3]));
        empty_row.extend(u32_bytes(&[4, 1, 2]));
        empty_row.extend(f32_bytes(&[1.0, 0.5, 0.5]));
        assert!(decode_routes(&empty_row, 2, 3).is_err());
    }
}
