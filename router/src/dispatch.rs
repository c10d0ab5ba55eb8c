//! Dispatch and combine over the data plane: the router's [`ExpertBackend`].
//!
//! For one MoE layer, each token goes once to each node that holds any of its chosen experts,
//! with the CSR list of those experts; the nodes answer one weighted row per pair, and the rows
//! are put back in the layer's global pair order, so the dense model combines them exactly as
//! the offline engine does (ascending expert id, then shared experts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moe_cluster::frames::{self, DispatchTag};
use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;
use moe_model::{ModelError, Result};
use moe_proto::v1::expert_data_client::ExpertDataClient;
use moe_proto::v1::{CombineBatch, DispatchBatch};
use tokio::sync::{mpsc, oneshot};

use crate::cluster_view::ClusterView;

type Reply = oneshot::Sender<std::result::Result<CombineBatch, String>>;

/// One long-lived `Exchange` stream to a node, owned by a task; requests are answered in order.
pub struct NodeLink {
    pub node_id: String,
    pub address: String,
    requests: mpsc::Sender<(DispatchBatch, Reply)>,
    /// Bytes sent and received, for status and metrics.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub rows_sent: AtomicU64,
    pub pairs_sent: AtomicU64,
}

impl NodeLink {
    pub fn connect(node_id: String, address: String, max_message_bytes: usize) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(16);
        let link = Arc::new(Self {
            node_id,
            address: address.clone(),
            requests: tx,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            rows_sent: AtomicU64::new(0),
            pairs_sent: AtomicU64::new(0),
        });
        tokio::spawn(run_link(address, rx, max_message_bytes));
        link
    }
}

async fn run_link(
    address: String,
    mut requests: mpsc::Receiver<(DispatchBatch, Reply)>,
    max_message_bytes: usize,
) {
    let uri = format!("http://{address}");
    let mut stream: Option<(mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>)> = None;
    while let Some((batch, reply)) = requests.recv().await {
        if stream.is_none() {
            match open(&uri, max_message_bytes).await {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    let _ = reply.send(Err(format!("cannot reach {address}: {e}")));
                    continue;
                }
            }
        }
        let Some((out, inbound)) = stream.as_mut() else {
            continue;
        };
        if out.send(batch).await.is_err() {
            stream = None;
            let _ = reply.send(Err(format!("stream to {address} closed")));
            continue;
        }
        match inbound.message().await {
            Ok(Some(combine)) => {
                let _ = reply.send(Ok(combine));
            }
            Ok(None) => {
                stream = None;
                let _ = reply.send(Err(format!("{address} closed the stream")));
            }
            Err(status) => {
                stream = None;
                let _ = reply.send(Err(format!("{address}: {status}")));
            }
        }
    }
}

async fn open(
    uri: &str,
    max_message_bytes: usize,
) -> std::result::Result<(mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>), String> {
    let channel = tonic::transport::Endpoint::from_shared(uri.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut client = ExpertDataClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let (tx, rx) = mpsc::channel(4);
    let response = client
        .exchange(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.to_string())?;
    Ok((tx, response.into_inner()))
}

/// The routed experts, reached through the expert nodes of the serving placement.
pub struct RemoteExperts {
    pub view: Arc<ClusterView>,
    pub runtime: tokio::runtime::Handle,
    pub hidden: usize,
    pub timeout: Duration,
    step: AtomicU64,
}

impl RemoteExperts {
    pub fn new(
        view: Arc<ClusterView>,
        runtime: tokio::runtime::Handle,
        hidden: usize,
        timeout: Duration,
    ) -> Self {
        Self {
            view,
            runtime,
            hidden,
            timeout,
            step: AtomicU64::new(0),
        }
    }

    /// Called once per model step, so dispatches carry the step number.
    pub fn next_step(&self) {
        self.step.fetch_add(1, Ordering::Relaxed);
    }
}

/// One node's share of a layer: its rows, their routes, and where its pairs go globally.
struct NodeShare {
    rows: Vec<f32>,
    routes: ExpertRoutes,
    global_pairs: Vec<usize>,
}

impl ExpertBackend for RemoteExperts {
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        let hidden = self.hidden;
        let started = std::time::Instant::now();
        let serving = self
            .view
            .serving()
            .ok_or_else(|| ModelError::ExpertBackend("no placement is ready yet".into()))?;
        let n_nodes = serving.links.len();
        let mut shares: Vec<NodeShare> = (0..n_nodes)
            .map(|_| NodeShare {
                rows: Vec::new(),
                routes: ExpertRoutes::with_capacity(0, 0),
                global_pairs: Vec::new(),
            })
            .collect();
        let mut choices: Vec<Vec<(u32, f32, usize)>> = vec![Vec::new(); n_nodes];
        for r in 0..routes.rows() {
            for c in choices.iter_mut() {
                c.clear();
            }
            for p in routes.row_pairs(r) {
                let expert = routes.experts[p];
                let node = *serving.owners.get(&(layer as u32, expert)).ok_or_else(|| {
                    ModelError::ExpertBackend(format!(
                        "expert ({layer}, {expert}) has no node in epoch {}",
                        serving.placement.epoch
                    ))
                })?;
                choices[node].push((expert, routes.weights[p], p));
            }
            for (node, chosen) in choices.iter().enumerate() {
                if chosen.is_empty() {
                    continue;
                }
                // A token crosses the wire once per node, however many of its experts the node holds.
                let share = &mut shares[node];
                share
                    .rows
                    .extend_from_slice(&rows[r * hidden..(r + 1) * hidden]);
                let mut local: Vec<(u32, f32)> = chosen.iter().map(|&(e, w, _)| (e, w)).collect();
                share.routes.push_row(&mut local);
                // push_row sorts by expert id; chosen is already ascending (routes are), so the
                // global pair indices line up.
                share.global_pairs.extend(chosen.iter().map(|&(_, _, p)| p));
            }
        }
        for r in 0..routes.rows() {
            for p in routes.row_pairs(r) {
                self.view.count_tokens((layer as u32, routes.experts[p]), 1);
            }
        }
        let tag = DispatchTag {
            epoch: serving.placement.epoch,
            step: self.step.load(Ordering::Relaxed),
            layer: layer as u32,
            micro_batch: 0,
        };
        let mut waits = Vec::new();
        for (node, share) in shares.iter().enumerate() {
            if share.routes.rows() == 0 {
                continue;
            }
            let batch = frames::encode_dispatch(tag, hidden, &share.rows, &share.routes);
            let link = Arc::clone(&serving.links[node]);
            link.bytes_sent.fetch_add(
                (batch.hidden_states.len()
                    + batch.pair_offsets.len()
                    + batch.pair_experts.len()
                    + batch.pair_weights.len()) as u64,
                Ordering::Relaxed,
            );
            link.rows_sent
                .fetch_add(share.routes.rows() as u64, Ordering::Relaxed);
            link.pairs_sent
                .fetch_add(share.routes.pairs() as u64, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            link.requests.try_send((batch, tx)).map_err(|e| {
                ModelError::ExpertBackend(format!("link to {} is not accepting: {e}", link.node_id))
            })?;
            waits.push((node, rx));
        }
        let timeout = self.timeout;
        let encoded = std::time::Instant::now();
        let replies = self.runtime.block_on(async move {
            let mut replies = Vec::with_capacity(waits.len());
            for (node, rx) in waits {
                let reply = match tokio::time::timeout(timeout, rx).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err("link task ended".to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                replies.push((node, reply));
            }
            replies
        });
        let answered = std::time::Instant::now();
        let mut slowest_compute = 0u64;
        let mut pair_out = vec![0.0f32; routes.pairs() * hidden];
        for (node, reply) in replies {
            let link = &serving.links[node];
            let combine = reply
                .map_err(|e| ModelError::ExpertBackend(format!("node {}: {e}", link.node_id)))?;
            link.bytes_received
                .fetch_add(combine.outputs.len() as u64, Ordering::Relaxed);
            slowest_compute = slowest_compute.max(combine.compute_micros * 1000);
            let share = &shares[node];
            let outputs = frames::decode_combine(&combine, tag, share.routes.pairs(), hidden)
                .map_err(|e| ModelError::ExpertBackend(format!("node {}: {e}", link.node_id)))?;
            for (i, &p) in share.global_pairs.iter().enumerate() {
                pair_out[p * hidden..(p + 1) * hidden]
                    .copy_from_slice(&outputs[i * hidden..(i + 1) * hidden]);
            }
        }
        let times = &self.view.layer_times;
        let nanos =
            |a: std::time::Instant, b: std::time::Instant| b.duration_since(a).as_nanos() as u64;
        times.calls.fetch_add(1, Ordering::Relaxed);
        times
            .encode_nanos
            .fetch_add(nanos(started, encoded), Ordering::Relaxed);
        times
            .wait_nanos
            .fetch_add(nanos(encoded, answered), Ordering::Relaxed);
        times
            .compute_nanos
            .fetch_add(slowest_compute, Ordering::Relaxed);
        times.combine_nanos.fetch_add(
            nanos(answered, std::time::Instant::now()),
            Ordering::Relaxed,
        );
        Ok(pair_out)
    }
}
