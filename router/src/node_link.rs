//! One long-lived `ExpertData.Exchange` stream per expert node, owned by a task: a layer's
//! batches for the node go in order, each answered before the next is sent, and a failure
//! (a broken stream, a timeout, an answer that does not fit) drops the stream so the next
//! request opens a fresh one. With a cluster token each stream opens with a proof of the token
//! bound to the node it is meant for, and the node must answer with its own proof before any
//! row is sent to it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_proto::v1::expert_data_client::ExpertDataClient;
use moe_proto::v1::{CombineBatch, DispatchBatch};
use tokio::sync::{mpsc, oneshot};

/// The answers to a request's batches, in order, or why the link failed.
pub type LinkReply = Result<Vec<CombineBatch>, String>;
type Reply = oneshot::Sender<LinkReply>;

/// How the router reaches expert nodes.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// Largest dispatch sent and combine accepted (from the batch bound and the model).
    pub max_dispatch_bytes: usize,
    pub max_combine_bytes: usize,
    /// A round trip (or connecting) longer than this fails and the stream is reopened.
    pub timeout: Duration,
    /// Mutual TLS with the cluster CA; `None` for a plaintext data plane.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The cluster token: streams prove it, and nodes must prove it back.
    pub token: Option<moe_cluster::auth::ClusterToken>,
}

/// One long-lived `Exchange` stream to a node, owned by a task; requests are answered in order.
pub struct NodeLink {
    pub node_id: String,
    pub address: String,
    /// Most rows the node accepts in one dispatch (its `--max-batch-rows`).
    pub max_rows: usize,
    /// How the node takes rows over a collective (its record's `rows_on_wire`); the gRPC
    /// streams always carry f32.
    pub rows_on_wire: moe_cluster::collective::RowEncoding,
    requests: mpsc::Sender<(Vec<DispatchBatch>, Reply)>,
    /// Bytes sent and received, for status and metrics.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub rows_sent: AtomicU64,
    pub pairs_sent: AtomicU64,
    /// Dispatch-to-combine time of each round trip.
    pub round_trip: moe_cluster::metrics::Histogram,
    /// Pairs sent per MoE layer (for the per-layer imbalance), updated once per dispatch.
    pairs_per_layer: std::sync::Mutex<BTreeMap<u32, u64>>,
}

impl NodeLink {
    /// A link whose round trips fail after `timeout` (the stream is then reopened), so a hung
    /// node costs one timeout, never a hung step.
    pub fn connect(
        node_id: String,
        address: String,
        max_rows: usize,
        rows_on_wire: moe_cluster::collective::RowEncoding,
        settings: &LinkSettings,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(16);
        let link = Arc::new(Self {
            node_id: node_id.clone(),
            address: address.clone(),
            max_rows: max_rows.max(1),
            rows_on_wire,
            requests: tx,
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            rows_sent: AtomicU64::new(0),
            pairs_sent: AtomicU64::new(0),
            pairs_per_layer: Default::default(),
            round_trip: moe_cluster::metrics::Histogram::new(moe_cluster::metrics::LATENCY_BUCKETS),
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(run_link(node_id, address, rx, settings.clone(), weak));
        link
    }
}

impl NodeLink {
    /// Queues a node's batches for one layer; the receiver gets their answers in order, or
    /// why the link failed. Refused at once when the link's queue is full or its task is gone
    /// (the node is then treated as failed for this layer).
    pub fn send(
        &self,
        batches: Vec<DispatchBatch>,
    ) -> Result<oneshot::Receiver<LinkReply>, String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .try_send((batches, tx))
            .map_err(|e| format!("link not accepting: {e}"))?;
        Ok(rx)
    }

    pub fn pairs_by_layer(&self) -> BTreeMap<u32, u64> {
        self.pairs_per_layer
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Counts pairs sent to the node in `layer`, for status and the load window.
    pub(crate) fn count_pairs(&self, layer: u32, pairs: u64) {
        self.pairs_sent.fetch_add(pairs, Ordering::Relaxed);
        if let Ok(mut m) = self.pairs_per_layer.lock() {
            *m.entry(layer).or_default() += pairs;
        }
    }
}

/// One stream for the node, opened on first use and again after any failure. Each request
/// is a node's share for a layer, cut to its batch bound: its batches go one at a time, each
/// answered before the next is sent.
async fn run_link(
    node_id: String,
    address: String,
    mut requests: mpsc::Receiver<(Vec<DispatchBatch>, Reply)>,
    settings: LinkSettings,
    link: std::sync::Weak<NodeLink>,
) {
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!("{scheme}://{address}");
    let mut stream: Option<(mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>)> = None;
    while let Some((batches, reply)) = requests.recv().await {
        let mut answers = Vec::with_capacity(batches.len());
        let mut failure = None;
        for batch in batches {
            match round_trip(&mut stream, batch, &uri, &node_id, &address, &settings).await {
                Ok(combine) => {
                    if let Some(link) = link.upgrade() {
                        link.round_trip.observe(combine.1.as_secs_f64());
                    }
                    answers.push(combine.0);
                }
                Err(e) => {
                    // The stream is dropped: a fresh one keeps later answers in order.
                    stream = None;
                    failure = Some(e);
                    break;
                }
            }
        }
        let _ = reply.send(match failure {
            Some(e) => Err(e),
            None => Ok(answers),
        });
    }
}

type LinkStream = (mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>);

/// One batch and its answer on `stream` (opened first if there is none), with its time.
async fn round_trip(
    stream: &mut Option<LinkStream>,
    batch: DispatchBatch,
    uri: &str,
    node_id: &str,
    address: &str,
    settings: &LinkSettings,
) -> Result<(CombineBatch, Duration), String> {
    let timeout = settings.timeout;
    if stream.is_none() {
        match tokio::time::timeout(timeout, open(uri, node_id, settings)).await {
            Ok(Ok(s)) => *stream = Some(s),
            Err(_) => return Err(format!("cannot reach {address} within {timeout:?}")),
            Ok(Err(e)) => return Err(format!("cannot reach {address}: {e}")),
        }
    }
    let Some((out, inbound)) = stream.as_mut() else {
        return Err(format!("no stream to {address}"));
    };
    let sent_at = Instant::now();
    if out.send(batch).await.is_err() {
        return Err(format!("stream to {address} closed"));
    }
    match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(Ok(Some(combine))) => Ok((combine, sent_at.elapsed())),
        Ok(Ok(None)) => Err(format!("{address} closed the stream")),
        Ok(Err(status)) => Err(format!("{address}: {status}")),
        Err(_) => Err(format!("{address}: no answer within {timeout:?}")),
    }
}

async fn open(
    uri: &str,
    node_id: &str,
    settings: &LinkSettings,
) -> Result<(mpsc::Sender<DispatchBatch>, tonic::Streaming<CombineBatch>), String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri.to_string())
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    if let Some(tls) = &settings.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut client = ExpertDataClient::new(channel)
        .max_decoding_message_size(settings.max_combine_bytes)
        .max_encoding_message_size(settings.max_dispatch_bytes);
    let (tx, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let opening = settings
        .token
        .as_ref()
        .map(|token| moe_cluster::auth::StreamOpening::new(token, node_id));
    if let Some(opening) = &opening {
        opening.apply(request.metadata_mut());
    }
    let response = client.exchange(request).await.map_err(|s| s.to_string())?;
    // No row goes to a process that cannot prove the token, whatever it registered as.
    if let (Some(opening), Some(token)) = (&opening, &settings.token) {
        opening
            .check_answer(token, response.metadata())
            .map_err(|e| format!("{node_id} did not prove cluster membership: {e}"))?;
    }
    Ok((tx, response.into_inner()))
}
