//! One epoch's communicator, whichever transport it uses, and how each side gets one: the
//! router opens rank 0 and publishes a [`CollectiveRecord`]; each node of the epoch joins from
//! that record. Both then run the layer protocol of [`super::exchange`] on it.

use std::time::Duration;

use moe_model::experts::ExpertBackend;

use super::communicator::{CommError, Communicator};
use super::exchange::{self, ExchangeError, LayerHeader, NodeAnswer, NodeShare, Served};
use super::record::{CollectiveRecord, Transport};
use super::row_encoding::RowEncoding;
use super::tcp::{TcpCommunicator, TcpLimits, TcpRoot, TcpSettings};
use crate::auth::ClusterToken;

/// A live communicator of one epoch.
pub enum EpochLink {
    Tcp(TcpCommunicator),
    #[cfg(feature = "cuda")]
    Nccl(super::nccl::NcclCommunicator),
}

impl EpochLink {
    pub fn transport(&self) -> Transport {
        match self {
            EpochLink::Tcp(_) => Transport::Tcp,
            #[cfg(feature = "cuda")]
            EpochLink::Nccl(_) => Transport::Nccl,
        }
    }

    /// The router's side of one MoE layer (see [`exchange::dispatch_layer`]).
    pub fn dispatch_layer(
        &mut self,
        layer: u32,
        shares: &[NodeShare],
        rows_on_wire: &[RowEncoding],
        hidden: usize,
        timeout: Duration,
        traceparent: Option<&str>,
    ) -> Result<Vec<NodeAnswer>, ExchangeError> {
        let wire = rows_on_wire;
        match self {
            EpochLink::Tcp(c) => {
                exchange::dispatch_layer(c, layer, shares, wire, hidden, timeout, traceparent)
            }
            #[cfg(feature = "cuda")]
            EpochLink::Nccl(c) => {
                exchange::dispatch_layer(c, layer, shares, wire, hidden, timeout, traceparent)
            }
        }
    }

    /// A node's side of one MoE layer (see [`exchange::serve_layer`]).
    pub fn serve_layer(
        &mut self,
        experts: &dyn ExpertBackend,
        rules: &crate::dispatch_rules::DispatchRules,
        keep_waiting: impl Fn() -> bool,
        batch_span: impl Fn(&LayerHeader) -> tracing::Span,
        timeout: Duration,
    ) -> Result<Served, ExchangeError> {
        match self {
            EpochLink::Tcp(c) => {
                exchange::serve_layer(c, experts, rules, keep_waiting, batch_span, timeout)
            }
            #[cfg(feature = "cuda")]
            EpochLink::Nccl(c) => {
                exchange::serve_layer(c, experts, rules, keep_waiting, batch_span, timeout)
            }
        }
    }

    /// The router's side of one MoE layer on rows in device memory, answered there (see
    /// [`super::row_plane::dispatch_layer_in_place`]): `None` when this link cannot (not NCCL,
    /// or the rows are on another GPU than the collective's), so the caller goes through host
    /// memory.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch_layer_on_device(
        &mut self,
        layer: u32,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        shares: &[super::row_plane::RowShare],
        rows_on_wire: &[RowEncoding],
        pairs: usize,
        hidden: usize,
        timeout: Duration,
        traceparent: Option<&str>,
    ) -> Option<
        Result<
            super::row_plane::PlacedOutputs<moe_model::cudarc::driver::CudaSlice<f32>>,
            ExchangeError,
        >,
    > {
        let EpochLink::Nccl(c) = self else {
            return None;
        };
        let plane = super::row_plane::DeviceRowPlane {
            gpu: std::sync::Arc::clone(c.rows_on()?),
            stream: std::sync::Arc::clone(c.stream()),
        };
        if rows.context().cu_ctx() != plane.stream.context().cu_ctx() {
            return None;
        }
        Some(super::row_plane::dispatch_layer_in_place(
            c,
            &plane,
            layer,
            rows,
            shares,
            rows_on_wire,
            pairs,
            hidden,
            timeout,
            traceparent,
        ))
    }

    pub fn abort(&mut self) {
        match self {
            EpochLink::Tcp(c) => c.abort(),
            #[cfg(feature = "cuda")]
            EpochLink::Nccl(c) => c.abort(),
        }
    }
}

/// Where the router's rank 0 listens or which GPU stream it uses.
#[derive(Clone)]
pub struct RootSettings {
    /// TCP: bind address (port 0 picks one) and the host to publish instead of the bound IP.
    pub tcp_bind: String,
    pub tcp_advertise_host: Option<String>,
    /// TCP: members must prove this token, and rank 0 proves it back; `None` checks the
    /// epoch's nonce only (a cluster on loopback without a token).
    pub token: Option<ClusterToken>,
    /// TCP: the largest frame rank 0 accepts from a node ([`super::FrameBounds::to_router`]).
    pub max_frame_bytes: u64,
    /// NCCL: the router's GPU and the stream NCCL runs on.
    #[cfg(feature = "cuda")]
    pub nccl_gpu: Option<NcclGpu>,
}

impl RootSettings {
    /// Settings without a GPU for NCCL (set `nccl_gpu` after, where CUDA is built in): a
    /// constructor, so that crates built without the `cuda` feature still build when a
    /// workspace build turns it on here.
    pub fn new(
        tcp_bind: String,
        tcp_advertise_host: Option<String>,
        token: Option<ClusterToken>,
        max_frame_bytes: u64,
    ) -> Self {
        Self {
            tcp_bind,
            tcp_advertise_host,
            token,
            max_frame_bytes,
            #[cfg(feature = "cuda")]
            nccl_gpu: None,
        }
    }
}

/// The router's GPU for NCCL: the stream the collective runs on, and the context whose
/// kernels gather a layer's rows and place its outputs there (the device-resident dispatch).
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct NcclGpu {
    pub gpu: std::sync::Arc<moe_model::gpu::GpuContext>,
    pub stream: std::sync::Arc<moe_model::cudarc::driver::CudaStream>,
}

/// Rank 0 of an epoch's communicator, published but not yet joined by every node.
pub enum RootJoining {
    Tcp(TcpRoot),
    #[cfg(feature = "cuda")]
    Nccl {
        unique_id: [u8; super::nccl::UNIQUE_ID_BYTES],
        gpu: NcclGpu,
        size: usize,
    },
}

/// Opens rank 0 of the communicator of `epoch` over `nodes` (in rank order) and returns the
/// record to publish; [`RootJoining::complete`] then waits for the nodes.
pub fn open_root(
    transport: Transport,
    settings: &RootSettings,
    epoch: u64,
    nodes: Vec<String>,
    timeout: Duration,
) -> Result<(RootJoining, CollectiveRecord), CommError> {
    let size = nodes.len() + 1;
    match transport {
        Transport::Grpc => Err(CommError::Failed(
            "gRPC is not a collective transport".into(),
        )),
        Transport::Tcp => {
            let root = TcpRoot::bind(
                &settings.tcp_bind,
                settings.tcp_advertise_host.as_deref(),
                size,
                TcpSettings {
                    limits: TcpLimits::for_frames(settings.max_frame_bytes),
                    token: settings.token.clone(),
                },
            )?;
            let record = CollectiveRecord::tcp(epoch, nodes, root.rendezvous(), timeout);
            Ok((RootJoining::Tcp(root), record))
        }
        #[cfg(feature = "cuda")]
        Transport::Nccl => {
            let gpu = settings.nccl_gpu.clone().ok_or_else(|| {
                CommError::Failed("NCCL needs a GPU on the router (--collective-gpu)".into())
            })?;
            let unique_id = super::nccl::new_unique_id()?;
            let record = CollectiveRecord::nccl(epoch, nodes, &unique_id, timeout);
            Ok((
                RootJoining::Nccl {
                    unique_id,
                    gpu,
                    size,
                },
                record,
            ))
        }
        #[cfg(not(feature = "cuda"))]
        Transport::Nccl => Err(CommError::Failed(
            "NCCL needs a build with --features cuda".into(),
        )),
    }
}

impl RootJoining {
    /// Waits at most `timeout` for every node to join.
    pub fn complete(self, timeout: Duration) -> Result<EpochLink, CommError> {
        match self {
            RootJoining::Tcp(root) => root.accept_all(timeout).map(EpochLink::Tcp),
            #[cfg(feature = "cuda")]
            RootJoining::Nccl {
                unique_id,
                gpu,
                size,
            } => super::nccl::NcclCommunicator::join(gpu.stream, &unique_id, 0, size, timeout)
                .map(|c| EpochLink::Nccl(c.with_row_plane(gpu.gpu))),
        }
    }
}

/// What a node needs to join a TCP collective.
#[derive(Debug, Clone)]
pub struct MemberSettings {
    /// Proved to rank 0, which must prove it back; `None` checks the nonce only. Rank 0 must
    /// agree.
    pub token: Option<ClusterToken>,
    /// The largest frame the node accepts from rank 0 ([`super::FrameBounds::to_node`]).
    pub max_frame_bytes: u64,
}

/// A node joins the communicator `record` describes, as its rank in it. `gpu` is the stream
/// NCCL runs on (the node's expert GPU); TCP needs none.
/// The stream a GPU member runs NCCL on; without CUDA built in here, a type with no value
/// (callers pass `None`), so the signature is the same whatever features a build turns on.
#[cfg(feature = "cuda")]
pub type MemberGpu = std::sync::Arc<moe_model::cudarc::driver::CudaStream>;
#[cfg(not(feature = "cuda"))]
pub type MemberGpu = std::convert::Infallible;

pub fn join_member(
    record: &CollectiveRecord,
    node_id: &str,
    settings: &MemberSettings,
    gpu: Option<MemberGpu>,
    timeout: Duration,
) -> Result<EpochLink, CommError> {
    let (rank, size) = record.rank_of(node_id).ok_or_else(|| {
        CommError::Failed(format!(
            "{node_id} is not a member of epoch {}",
            record.epoch
        ))
    })?;
    if record.layer_protocol != exchange::LAYER_PROTOCOL {
        return Err(CommError::Failed(format!(
            "the router speaks layer protocol {}, this node {}: upgrade every member (gRPC until then)",
            record.layer_protocol,
            exchange::LAYER_PROTOCOL
        )));
    }
    let malformed = |e: super::record::RecordError| CommError::Failed(e.to_string());
    match record.transport() {
        Transport::Tcp => {
            let at = record.tcp_rendezvous().map_err(malformed)?;
            let tcp = TcpSettings {
                limits: TcpLimits::for_frames(settings.max_frame_bytes),
                token: settings.token.clone(),
            };
            TcpCommunicator::connect(&at, rank, size, timeout, &tcp).map(EpochLink::Tcp)
        }
        #[cfg(feature = "cuda")]
        Transport::Nccl => {
            let id = record.nccl_unique_id().map_err(malformed)?;
            let id: [u8; super::nccl::UNIQUE_ID_BYTES] = id
                .try_into()
                .map_err(|_| CommError::Failed("an NCCL id of the wrong size".into()))?;
            let stream = gpu.ok_or_else(|| {
                CommError::Failed("NCCL needs this node's experts on a GPU".into())
            })?;
            super::nccl::NcclCommunicator::join(stream, &id, rank, size, timeout)
                .map(EpochLink::Nccl)
        }
        #[cfg(not(feature = "cuda"))]
        Transport::Nccl => {
            // No value exists without CUDA: nothing to use.
            let _ = gpu;
            Err(CommError::Failed(
                "NCCL needs a build with --features cuda".into(),
            ))
        }
        Transport::Grpc => Err(CommError::Failed("not a collective record".into())),
    }
}
