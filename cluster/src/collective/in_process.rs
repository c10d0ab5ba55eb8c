//! Expert nodes as threads of this process, reached through the layer exchange over the
//! in-process transport ([`super::mailbox`]): the same protocol, checks and (with device
//! buffers) the same device-resident router side as a cluster, with no etcd and no sockets.
//! `moe generate` and `moe bench` take it with `--in-process-nodes N`, so one GPU runs a
//! layer's rows gathered per node, handed over by pointer, run in place and placed back in
//! pair order, end to end; on the CPU it checks that the exchange changes no token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use moe_model::experts::{ExpertBackend, ExpertSet};
use moe_model::routes::ExpertRoutes;
use moe_model::{ModelConfig, ModelError, Result};

use super::exchange::{dispatch_layer, serve_layer, ExchangeError, NodeShare};
use super::mailbox::{group, Carrier, MailboxComm};
use super::row_encoding::RowEncoding;
use super::row_plane::{split_by_holder, RowShare};
use crate::dispatch_rules::DispatchRules;

/// Rows a node takes in one layer: far above any step of `moe bench`.
const MAX_ROWS: usize = 1 << 20;

/// How long one layer may wait on an in-process node (they share the process: only a bug
/// makes one late).
const TIMEOUT: Duration = Duration::from_secs(120);

/// The router side of a layer on device rows (device buffers only): `None` when the rows
/// are on another GPU.
#[cfg(feature = "cuda")]
type DevicePath = Box<
    dyn Fn(
            usize,
            &moe_model::cudarc::driver::CudaSlice<f32>,
            &[RowShare],
            usize,
        ) -> Option<Result<moe_model::cudarc::driver::CudaSlice<f32>>>
        + Send
        + Sync,
>;

/// How many in-process node threads have ended without being asked to (a failed exchange, a
/// panic). Every later layer fails once one has, so a server stops serving then.
#[derive(Debug, Clone, Default)]
pub struct NodeLiveness(Arc<AtomicUsize>);

impl NodeLiveness {
    pub fn stopped(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Held by a node thread: counts it in its [`NodeLiveness`] when it ends, unless it was asked
/// to stop (a drop runs on a panic too).
struct EndWatch {
    liveness: NodeLiveness,
    asked: Arc<AtomicBool>,
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        if !self.asked.load(Ordering::Relaxed) {
            self.liveness.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// In-process nodes as a backend, and whether their threads are alive.
pub struct InProcessReach {
    pub backend: Box<dyn ExpertBackend + Send + Sync>,
    pub liveness: NodeLiveness,
}

pub struct InProcessNodes<C: Carrier> {
    router: Arc<Mutex<MailboxComm<C>>>,
    /// `(layer, expert)` to the node holding it.
    holder: HashMap<(u32, u32), usize>,
    nodes: usize,
    /// How each node takes its rows: bf16 where its experts round them to bf16 anyway.
    rows_on_wire: Vec<RowEncoding>,
    hidden: usize,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    liveness: NodeLiveness,
    #[cfg(feature = "cuda")]
    device_path: Option<DevicePath>,
}

/// `experts` dealt round-robin over `nodes` sets (expert `e` of every layer to node
/// `e % nodes`), sharing the weights already loaded.
pub fn deal(experts: &ExpertSet, nodes: usize) -> Vec<ExpertSet> {
    let nodes = nodes.max(1);
    (0..nodes)
        .map(|n| experts.subset(|_, e| e % nodes == n))
        .collect()
}

/// The routed experts of `experts` dealt round-robin over `nodes` in-process nodes: over host
/// bytes on the CPU; on a GPU over device buffers of its context, so that a dense part on the
/// same context takes the device-resident path.
pub fn reach(
    config: &ModelConfig,
    experts: &ExpertSet,
    nodes: usize,
    device: &moe_model::experts::ExpertDevice,
) -> Result<InProcessReach> {
    let sets = deal(experts, nodes);
    Ok(match device {
        moe_model::experts::ExpertDevice::Cpu => {
            InProcessNodes::start(config, sets, super::mailbox::HostBytes).into_reach()
        }
        #[cfg(feature = "cuda")]
        moe_model::experts::ExpertDevice::Gpu(gpu) => {
            InProcessNodes::start_on_device(config, sets, Arc::clone(gpu))?.into_reach()
        }
        // moe-model built with its `cuda` feature and this crate without (features unify per
        // crate): experts on a GPU, and no device exchange compiled here.
        #[cfg(not(feature = "cuda"))]
        #[allow(unreachable_patterns)]
        _ => {
            return Err(ModelError::InvalidRequest(
                "in-process nodes on a GPU need moe-cluster's `cuda` feature".into(),
            ))
        }
    })
}

impl<C: Carrier + Clone> InProcessNodes<C> {
    /// A thread per set, each serving layers until this value is dropped.
    pub fn start(config: &ModelConfig, sets: Vec<ExpertSet>, carrier: C) -> Self {
        let nodes = sets.len();
        let mut holder = HashMap::new();
        for (n, set) in sets.iter().enumerate() {
            for (layer, expert) in set.ids() {
                holder.entry((layer as u32, expert as u32)).or_insert(n);
            }
        }
        let rows_on_wire = sets
            .iter()
            .map(|set| RowEncoding::for_experts(set))
            .collect();
        let (mut comms, _) = group(nodes + 1, carrier);
        let node_comms = comms.split_off(1);
        let router = comms.pop().expect("rank 0");
        let stop = Arc::new(AtomicBool::new(false));
        let liveness = NodeLiveness::default();
        let rules = DispatchRules::for_model(config, MAX_ROWS);
        let threads = node_comms
            .into_iter()
            .zip(sets)
            .enumerate()
            .map(|(n, (comm, set))| {
                let (rules, stop) = (rules.clone(), Arc::clone(&stop));
                let watch = EndWatch {
                    liveness: liveness.clone(),
                    asked: Arc::clone(&stop),
                };
                std::thread::Builder::new()
                    .name(format!("in-process-node-{}", n + 1))
                    .spawn(move || {
                        let _watch = watch;
                        serve_until_stopped(comm, &set, &rules, &stop)
                    })
                    .expect("spawning a node thread")
            })
            .collect();
        Self {
            router: Arc::new(Mutex::new(router)),
            holder,
            nodes,
            rows_on_wire,
            hidden: config.hidden_size,
            stop,
            threads,
            liveness,
            #[cfg(feature = "cuda")]
            device_path: None,
        }
    }

    fn into_reach(self) -> InProcessReach {
        InProcessReach {
            liveness: self.liveness.clone(),
            backend: Box::new(self),
        }
    }

    /// Each node's share of a layer: a row once per node that holds any of its experts. A
    /// node whose thread has stopped (its exchange failed) would leave the layer waiting out
    /// the timeout: the layer fails at once instead.
    fn shares(&self, layer: usize, routes: &ExpertRoutes) -> Result<Vec<RowShare>> {
        if let Some(n) = self.threads.iter().position(|t| t.is_finished()) {
            return Err(ModelError::ExpertBackend(format!(
                "in-process node {} has stopped",
                n + 1
            )));
        }
        split_by_holder(routes, self.nodes, |expert| {
            self.holder.get(&(layer as u32, expert)).copied()
        })
        .map_err(|expert| ModelError::ExpertNotLoaded {
            layer,
            expert: expert as usize,
        })
    }
}

fn serve_until_stopped<C: Carrier>(
    mut comm: MailboxComm<C>,
    experts: &ExpertSet,
    rules: &DispatchRules,
    stop: &AtomicBool,
) {
    loop {
        let served = serve_layer(
            &mut comm,
            experts,
            rules,
            || !stop.load(Ordering::Relaxed),
            |_| tracing::Span::none(),
            TIMEOUT,
        );
        match served {
            Ok(_) => {}
            Err(ExchangeError::Stopped) => return,
            Err(e) => {
                tracing::error!(error = %e, "in-process expert node failed");
                return;
            }
        }
    }
}

fn exchange_error(e: ExchangeError) -> ModelError {
    ModelError::ExpertBackend(format!("in-process exchange: {e}"))
}

impl<C: Carrier + Clone> ExpertBackend for InProcessNodes<C> {
    fn run_experts(&self, layer: usize, rows: &[f32], routes: &ExpertRoutes) -> Result<Vec<f32>> {
        let h = self.hidden;
        if rows.len() != routes.rows() * h {
            return Err(ModelError::InvalidRequest(format!(
                "{} values for {} rows of {h}",
                rows.len(),
                routes.rows()
            )));
        }
        let shares = self.shares(layer, routes)?;
        let host: Vec<NodeShare> = shares
            .iter()
            .map(|s| NodeShare {
                rows: s
                    .rows
                    .iter()
                    .flat_map(|&r| rows[r as usize * h..(r as usize + 1) * h].iter().copied())
                    .collect(),
                routes: s.routes.clone(),
            })
            .collect();
        let answers = {
            let mut router = self
                .router
                .lock()
                .map_err(|_| ModelError::ExpertBackend("in-process router poisoned".into()))?;
            let wire = &self.rows_on_wire;
            dispatch_layer(&mut *router, layer as u32, &host, wire, h, TIMEOUT, None)
                .map_err(exchange_error)?
        };
        let mut pair_out = vec![0.0f32; routes.pairs() * h];
        for (share, answer) in shares.iter().zip(&answers) {
            for (&p, row) in share.pairs.iter().zip(answer.outputs.chunks_exact(h)) {
                pair_out[p as usize * h..(p as usize + 1) * h].copy_from_slice(row);
            }
        }
        Ok(pair_out)
    }

    fn holds(&self, layer: usize, expert: usize) -> bool {
        self.holder.contains_key(&(layer as u32, expert as u32))
    }

    #[cfg(feature = "cuda")]
    fn run_experts_on_device(
        &self,
        layer: usize,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        routes: &ExpertRoutes,
    ) -> Option<Result<moe_model::cudarc::driver::CudaSlice<f32>>> {
        let device_path = self.device_path.as_ref()?;
        let shares = match self.shares(layer, routes) {
            Ok(shares) => shares,
            Err(e) => return Some(Err(e)),
        };
        device_path(layer, rows, &shares, routes.pairs())
    }
}

#[cfg(feature = "cuda")]
impl InProcessNodes<super::mailbox::DeviceBuffers> {
    /// Nodes whose rows and outputs stay on `gpu`: the router side gathers each node's rows
    /// and places their outputs there, on `carrier`'s stream.
    pub fn start_on_device(
        config: &ModelConfig,
        sets: Vec<ExpertSet>,
        gpu: Arc<moe_model::gpu::GpuContext>,
    ) -> std::result::Result<Self, ModelError> {
        let stream = gpu
            .stream()
            .context()
            .new_stream()
            .map_err(|e| ModelError::ExpertBackend(format!("CUDA: {e}")))?;
        let carrier = super::mailbox::DeviceBuffers {
            stream: Arc::clone(&stream),
        };
        let mut nodes = Self::start(config, sets, carrier);
        let plane = super::row_plane::DeviceRowPlane { gpu, stream };
        let router = Arc::clone(&nodes.router);
        let hidden = nodes.hidden;
        let rows_on_wire = nodes.rows_on_wire.clone();
        nodes.device_path = Some(Box::new(move |layer, rows, shares, pairs| {
            if rows.context().cu_ctx() != plane.stream.context().cu_ctx() {
                return None;
            }
            let Ok(mut router) = router.lock() else {
                return Some(Err(ModelError::ExpertBackend(
                    "in-process router poisoned".into(),
                )));
            };
            let placed = super::row_plane::dispatch_layer_in_place(
                &mut *router,
                &plane,
                layer as u32,
                rows,
                shares,
                &rows_on_wire,
                pairs,
                hidden,
                TIMEOUT,
                None,
            );
            Some(placed.map(|p| p.pair_out).map_err(exchange_error))
        }));
        Ok(nodes)
    }
}

impl<C: Carrier> Drop for InProcessNodes<C> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use moe_model::experts::ExpertBackend;

    use super::super::communicator::Communicator;
    use super::super::mailbox::HostBytes;
    use super::super::test_nodes::{fixture, rows};
    use super::*;

    /// Experts dealt over three in-process nodes answer every pair as the whole set does,
    /// bitwise, layer after layer; an expert nobody holds is a typed error.
    #[test]
    fn in_process_nodes_answer_as_the_whole_set() {
        let (ckpt, config) = fixture("qwen3-moe-tiny");
        let all = ExpertSet::load_all(&ckpt, &config).unwrap();
        let nodes = InProcessNodes::start(&config, deal(&all, 3), HostBytes);
        let hidden = config.hidden_size;
        let experts = config.moe.num_experts as u32;
        let x = rows(4, hidden, 5);
        let mut routes = ExpertRoutes::with_capacity(4, 8);
        for r in 0..4u32 {
            routes.push_row(&mut [(r % experts, 0.7), ((r * 3 + 1) % experts, 0.3)]);
        }
        for layer in config.moe_layer_indices() {
            let want = all.run_experts(layer, &x, &routes).unwrap();
            assert_eq!(nodes.run_experts(layer, &x, &routes).unwrap(), want);
        }
        assert!(nodes.holds(config.moe_layer_indices().next().unwrap(), 0));
        assert!(matches!(
            nodes.run_experts(1000, &x, &routes),
            Err(ModelError::ExpertNotLoaded { .. })
        ));
        drop(nodes);
    }

    /// Once a node's thread has stopped, a layer fails at once with a typed error rather than
    /// waiting for a node that will never answer.
    #[test]
    fn a_stopped_node_fails_the_layer_at_once() {
        let (ckpt, config) = fixture("qwen3-moe-tiny");
        let all = ExpertSet::load_all(&ckpt, &config).unwrap();
        let nodes = InProcessNodes::start(&config, deal(&all, 2), HostBytes);
        nodes.stop.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !nodes.threads.iter().all(|t| t.is_finished()) {
            assert!(
                std::time::Instant::now() < deadline,
                "node threads did not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let x = rows(2, config.hidden_size, 3);
        let mut routes = ExpertRoutes::with_capacity(2, 8);
        routes.push_row(&mut [(0, 1.0)]);
        routes.push_row(&mut [(1, 1.0)]);
        let layer = config.moe_layer_indices().next().unwrap();
        let started = std::time::Instant::now();
        match nodes.run_experts(layer, &x, &routes) {
            Err(ModelError::ExpertBackend(why)) => assert!(why.contains("stopped"), "{why}"),
            other => panic!("expected a stopped node, got {other:?}"),
        }
        assert!(started.elapsed() < TIMEOUT / 2);
        // Asked to stop: not a node that died.
        assert_eq!(nodes.liveness.stopped(), 0);
    }

    /// A node thread that ends on its own (here: a header it cannot read fails its exchange)
    /// is counted, so that a server can stop serving; the other node is not.
    #[test]
    fn a_node_that_ends_on_its_own_is_counted() {
        let (ckpt, config) = fixture("qwen3-moe-tiny");
        let all = ExpertSet::load_all(&ckpt, &config).unwrap();
        let nodes = InProcessNodes::start(&config, deal(&all, 2), HostBytes);
        let liveness = nodes.liveness.clone();
        {
            let mut router = nodes.router.lock().unwrap();
            let garbage = router
                .upload(vec![0xff; super::super::exchange::HEADER_BYTES])
                .unwrap();
            router
                .post(super::super::communicator::Pending {
                    sends: vec![(1, garbage)],
                    recvs: vec![],
                })
                .unwrap();
            router.wait(Duration::from_secs(5)).unwrap();
        }
        // The count goes up just before the thread returns: wait for both.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while liveness.stopped() == 0 || !nodes.threads[0].is_finished() {
            assert!(std::time::Instant::now() < deadline, "the node did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(liveness.stopped(), 1);
        assert!(!nodes.threads[1].is_finished());
        drop(nodes);
        assert_eq!(liveness.stopped(), 1);
    }
}
