//! The router's side of a MoE layer on rows that stay where the dense part wrote them: each
//! node's rows gathered into a transfer buffer there, sent, and each node's outputs placed
//! back in the layer's pair order there ([`dispatch_layer_in_place`]). On a GPU ([`RowPlane`]
//! over device buffers) a layer then moves no row through host memory: only routes, headers
//! and the compute trailers, which are small, cross. [`HostRows`] is the same plane over host
//! memory: the tests check the in-place path against the host path with it.

use std::time::Duration;

use moe_model::routes::ExpertRoutes;

use super::communicator::{CommError, Communicator};
use super::exchange::{dispatch_layer_buffers, BufferShare, ExchangeError};
use super::row_encoding::RowEncoding;

/// Where a layer's rows lie and how a transport's buffers are made from them and placed back.
pub trait RowPlane {
    /// `[n, hidden]` f32 rows where they lie.
    type Rows;
    /// The transport's buffer.
    type Buffer;
    /// Rows `index` of `rows`, in that order, as one buffer to send in `encoding`.
    fn gather(
        &self,
        rows: &Self::Rows,
        index: &[u32],
        hidden: usize,
        encoding: RowEncoding,
    ) -> Result<Self::Buffer, CommError>;
    /// `[pairs, hidden]` rows for the layer's outputs (every row is written by [`Self::place`]).
    fn pair_rows(&self, pairs: usize, hidden: usize) -> Result<Self::Rows, CommError>;
    /// `out[pairs[i]] = outputs[i]` for every row of a node's outputs.
    fn place(
        &self,
        out: &mut Self::Rows,
        outputs: &Self::Buffer,
        pairs: &[u32],
        hidden: usize,
    ) -> Result<(), CommError>;
}

/// One node's part of a layer on the in-place path: which of the layer's rows it takes (in
/// the order of its routes' rows), its routes, and which of the layer's pairs each of its
/// pairs is.
#[derive(Debug, Clone, PartialEq)]
pub struct RowShare {
    pub rows: Vec<u32>,
    pub routes: ExpertRoutes,
    pub pairs: Vec<u32>,
}

impl RowShare {
    /// A share with no rows (`ExpertRoutes::default()` lacks the leading offset).
    pub fn empty() -> Self {
        Self {
            rows: Vec::new(),
            routes: ExpertRoutes::with_capacity(0, 0),
            pairs: Vec::new(),
        }
    }
}

/// A layer's pairs split among `nodes` by the node `holder` names for each expert: each row
/// goes once to each node with any of its pairs, with those pairs in the row's order. An
/// expert no node holds (`None`, or a node out of range) is the error.
pub fn split_by_holder(
    routes: &ExpertRoutes,
    nodes: usize,
    holder: impl Fn(u32) -> Option<usize>,
) -> Result<Vec<RowShare>, u32> {
    let mut shares = vec![RowShare::empty(); nodes];
    let mut mine: Vec<Vec<(u32, f32, u32)>> = vec![Vec::new(); nodes];
    for r in 0..routes.rows() {
        for m in mine.iter_mut() {
            m.clear();
        }
        for p in routes.row_pairs(r) {
            let expert = routes.experts[p];
            let node = holder(expert).filter(|&n| n < nodes).ok_or(expert)?;
            mine[node].push((expert, routes.weights[p], p as u32));
        }
        for (share, pairs) in shares.iter_mut().zip(&mine) {
            if pairs.is_empty() {
                continue;
            }
            let mut local: Vec<(u32, f32)> = pairs.iter().map(|&(e, w, _)| (e, w)).collect();
            share.routes.push_row(&mut local);
            share.rows.push(r as u32);
            share.pairs.extend(pairs.iter().map(|&(_, _, p)| p));
        }
    }
    Ok(shares)
}

/// What the nodes answered: `[pairs, hidden]` weighted outputs in the layer's pair order
/// where the rows lie, and the slowest node's own compute.
#[derive(Debug)]
pub struct PlacedOutputs<R> {
    pub pair_out: R,
    pub slowest_compute_micros: u64,
}

/// One layer to the nodes (`shares[i]` to rank `i + 1`, its rows encoded as `rows_on_wire[i]`
/// says, f32 where it is missing) from `rows` where they lie, answers placed there. Every one of the layer's `pairs` must be in exactly one share: the caller
/// takes the in-place path only for a layer whose pairs all have a node, and any failure is
/// the whole layer's (the caller then sends it the host way, which settles node by node).
#[allow(clippy::too_many_arguments)]
pub fn dispatch_layer_in_place<C, P>(
    comm: &mut C,
    plane: &P,
    layer: u32,
    rows: &P::Rows,
    shares: &[RowShare],
    rows_on_wire: &[RowEncoding],
    pairs: usize,
    hidden: usize,
    timeout: Duration,
    traceparent: Option<&str>,
) -> Result<PlacedOutputs<P::Rows>, ExchangeError>
where
    C: Communicator,
    P: RowPlane<Buffer = C::Buffer>,
{
    let mut covered = vec![false; pairs];
    for share in shares {
        let consistent =
            share.rows.len() == share.routes.rows() && share.pairs.len() == share.routes.pairs();
        if !consistent {
            return Err(ExchangeError::Malformed(format!(
                "a share of {} rows and {} pairs for routes of {} rows and {} pairs",
                share.rows.len(),
                share.pairs.len(),
                share.routes.rows(),
                share.routes.pairs()
            )));
        }
        for &p in &share.pairs {
            match covered.get_mut(p as usize) {
                Some(seen @ false) => *seen = true,
                _ => {
                    return Err(ExchangeError::Malformed(format!(
                        "pair {p} of {pairs} placed twice or out of range"
                    )))
                }
            }
        }
    }
    if covered.iter().any(|c| !c) {
        return Err(ExchangeError::Malformed(
            "a pair of the layer is in no share".into(),
        ));
    }
    let mut buffered = Vec::with_capacity(shares.len());
    for (i, share) in shares.iter().enumerate() {
        let encoding = rows_on_wire.get(i).copied().unwrap_or_default();
        let gathered = if share.rows.is_empty() {
            None
        } else {
            Some(plane.gather(rows, &share.rows, hidden, encoding)?)
        };
        buffered.push(BufferShare {
            rows: gathered,
            encoding,
            routes: &share.routes,
        });
    }
    let answers = dispatch_layer_buffers(comm, layer, buffered, hidden, timeout, traceparent)?;
    let mut pair_out = plane.pair_rows(pairs, hidden)?;
    let mut slowest = 0;
    for (share, answer) in shares.iter().zip(&answers) {
        if let Some(outputs) = &answer.outputs {
            plane.place(&mut pair_out, outputs, &share.pairs, hidden)?;
            slowest = slowest.max(answer.compute_micros);
        }
    }
    Ok(PlacedOutputs {
        pair_out,
        slowest_compute_micros: slowest,
    })
}

/// Host memory as a row plane, over host-byte transports (the in-memory fake, TCP): the
/// definition the device planes are tested against.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostRows;

impl RowPlane for HostRows {
    type Rows = Vec<f32>;
    type Buffer = Vec<u8>;

    fn gather(
        &self,
        rows: &Vec<f32>,
        index: &[u32],
        hidden: usize,
        encoding: RowEncoding,
    ) -> Result<Vec<u8>, CommError> {
        let mut out = Vec::with_capacity(index.len() * hidden * encoding.elem_bytes());
        for &r in index {
            let at = r as usize * hidden;
            let row = rows.get(at..at + hidden).ok_or_else(|| {
                CommError::Failed(format!("row {r} beyond {} values", rows.len()))
            })?;
            encoding.extend_bytes(row, &mut out);
        }
        Ok(out)
    }

    fn pair_rows(&self, pairs: usize, hidden: usize) -> Result<Vec<f32>, CommError> {
        Ok(vec![0.0; pairs * hidden])
    }

    fn place(
        &self,
        out: &mut Vec<f32>,
        outputs: &Vec<u8>,
        pairs: &[u32],
        hidden: usize,
    ) -> Result<(), CommError> {
        if outputs.len() != pairs.len() * hidden * 4 {
            return Err(CommError::Failed(format!(
                "{} output bytes for {} pairs of {hidden}",
                outputs.len(),
                pairs.len()
            )));
        }
        for (&p, row) in pairs.iter().zip(outputs.chunks_exact(hidden * 4)) {
            let at = p as usize * hidden;
            let dst = out
                .get_mut(at..at + hidden)
                .ok_or_else(|| CommError::Failed(format!("pair {p} beyond the layer's outputs")))?;
            for (d, v) in dst.iter_mut().zip(row.chunks_exact(4)) {
                *d = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            }
        }
        Ok(())
    }
}

/// Rows in device memory, over device buffers (NCCL, the in-process device transport): the
/// gather and place kernels run on the transport's stream.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct DeviceRowPlane {
    pub gpu: std::sync::Arc<moe_model::gpu::GpuContext>,
    pub stream: std::sync::Arc<moe_model::cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl RowPlane for DeviceRowPlane {
    type Rows = moe_model::cudarc::driver::CudaSlice<f32>;
    type Buffer = super::nccl::NcclBuffer;

    fn gather(
        &self,
        rows: &Self::Rows,
        index: &[u32],
        hidden: usize,
        encoding: RowEncoding,
    ) -> Result<Self::Buffer, CommError> {
        use moe_model::gpu::row_moves::{gather_rows, GatheredAs};
        let form = match encoding {
            RowEncoding::F32 => GatheredAs::F32,
            RowEncoding::Bf16 => GatheredAs::Bf16,
        };
        let gathered = gather_rows(&self.gpu, &self.stream, rows, index, hidden, form);
        Ok(super::nccl::NcclBuffer::Words {
            words: gathered.map_err(|e| CommError::Failed(e.to_string()))?,
            bytes: index.len() * hidden * encoding.elem_bytes(),
        })
    }

    fn pair_rows(&self, pairs: usize, hidden: usize) -> Result<Self::Rows, CommError> {
        self.stream
            .alloc_zeros::<f32>((pairs * hidden).max(1))
            .map_err(|e| CommError::Failed(format!("CUDA: {e}")))
    }

    fn place(
        &self,
        out: &mut Self::Rows,
        outputs: &Self::Buffer,
        pairs: &[u32],
        hidden: usize,
    ) -> Result<(), CommError> {
        let words = outputs
            .words()
            .filter(|_| outputs.bytes() == pairs.len() * hidden * 4)
            .ok_or_else(|| {
                CommError::Failed(format!(
                    "{} output bytes for {} pairs of {hidden}",
                    outputs.bytes(),
                    pairs.len()
                ))
            })?;
        moe_model::gpu::row_moves::place_rows(&self.gpu, &self.stream, words, pairs, hidden, out)
            .map_err(|e| CommError::Failed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use moe_model::experts::{ExpertBackend, ExpertSet};

    use super::super::communicator::CommError;
    use super::super::exchange::Served;
    use super::super::mailbox::host_group;
    use super::super::test_nodes::{fixture, rows, serve_one_layer_each};
    use super::*;
    use crate::dispatch_rules::DispatchRules;

    /// Rows gathered per node where they lie, sent, and the outputs placed back in pair
    /// order give, bitwise, every pair's output of one process holding all experts; an idle
    /// node gets its header only.
    #[test]
    fn in_place_dispatch_gives_the_outputs_of_one_process() {
        let (ckpt, config) = fixture("qwen3-moe-tiny");
        let hidden = config.hidden_size;
        let layer = config.moe_layer_indices().next().unwrap();
        let experts = config.moe.num_experts as u32;
        let all =
            ExpertSet::load(&ckpt, &config, (0..experts as usize).map(|e| (layer, e))).unwrap();
        let half = experts / 2;
        let owner = |e: u32| usize::from(e >= half);
        let sets = [
            ExpertSet::load(&ckpt, &config, (0..half as usize).map(|e| (layer, e))).unwrap(),
            ExpertSet::load(
                &ckpt,
                &config,
                (half as usize..experts as usize).map(|e| (layer, e)),
            )
            .unwrap(),
            ExpertSet::empty(hidden),
        ];
        let x = rows(5, hidden, 0);
        let mut routes = ExpertRoutes::with_capacity(5, 9);
        for row in [
            vec![(0, 0.6), (experts - 1, 0.4)],
            vec![(1, 1.0)],
            vec![(half, 0.3), (2, 0.7)],
            vec![(half + 1, 0.5), (experts - 1, 0.5)],
            vec![(3, 0.1), (half, 0.9)],
        ] {
            routes.push_row(&mut row.clone());
        }
        let want = all.run_experts(layer, &x, &routes).unwrap();
        let shares = split_by_holder(&routes, 3, |e| Some(owner(e))).unwrap();
        assert!(shares[2].rows.is_empty());

        let (mut comms, _) = host_group(4);
        let nodes = comms.split_off(1);
        let mut router = comms.pop().unwrap();
        let timeout = Duration::from_secs(10);
        let rules = DispatchRules::for_model(&config, 1024);
        let handles = serve_one_layer_each(nodes, sets, &rules, timeout);
        let placed = dispatch_layer_in_place(
            &mut router,
            &HostRows,
            layer as u32,
            &x,
            &shares,
            &[],
            routes.pairs(),
            hidden,
            timeout,
            None,
        )
        .unwrap();
        assert_eq!(placed.pair_out, want);
        let served: Vec<Served> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        assert!(matches!(
            served[0],
            Served::Ran {
                rows: 4,
                pairs: 4,
                ..
            }
        ));
        assert!(matches!(
            served[1],
            Served::Ran {
                rows: 4,
                pairs: 5,
                ..
            }
        ));
        assert_eq!(
            served[2],
            Served::Idle {
                layer: layer as u32
            }
        );
    }

    /// A pair in no share, or in two, is refused before anything is sent; a node that never
    /// answers costs one timeout and an aborted communicator.
    #[test]
    fn uncovered_pairs_are_refused_and_a_dead_node_times_out() {
        let hidden = 4;
        let mut routes = ExpertRoutes::with_capacity(2, 3);
        routes.push_row(&mut [(0, 0.5), (1, 0.5)]);
        routes.push_row(&mut [(1, 1.0)]);
        let x = vec![1.0f32; 2 * hidden];
        let whole = split_by_holder(&routes, 1, |_| Some(0)).unwrap();
        let mut missing = whole.clone();
        missing[0].pairs[2] = 1;
        let (mut comms, dead) = host_group(2);
        let mut router = comms.remove(0);
        let timeout = Duration::from_millis(200);
        let err = dispatch_layer_in_place(
            &mut router,
            &HostRows,
            1,
            &x,
            &missing,
            &[],
            3,
            hidden,
            timeout,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ExchangeError::Malformed(_)), "{err:?}");
        assert!(!router.aborted, "refused before anything was sent");

        dead.lock().unwrap()[1] = true;
        let started = Instant::now();
        let err = dispatch_layer_in_place(
            &mut router,
            &HostRows,
            1,
            &x,
            &whole,
            &[],
            3,
            hidden,
            timeout,
            None,
        )
        .unwrap_err();
        assert_eq!(err, ExchangeError::Comm(CommError::Timeout(timeout)));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(router.aborted);
    }

    /// Each row goes once to each node with its pairs there, in the row's order; an expert
    /// nobody holds, or a holder out of range, is named.
    #[test]
    fn a_layer_splits_by_holder() {
        let mut routes = ExpertRoutes::with_capacity(3, 5);
        routes.push_row(&mut [(4, 0.5), (1, 0.5)]);
        routes.push_row(&mut [(2, 1.0)]);
        routes.push_row(&mut [(5, 0.25), (3, 0.75)]);
        // Rows keep their experts ascending: pairs 0..5 are experts 1, 4, 2, 3, 5.
        assert_eq!(routes.experts, [1, 4, 2, 3, 5]);
        let shares = split_by_holder(&routes, 2, |e| Some((e % 2) as usize)).unwrap();
        assert_eq!(shares[0].rows, [0, 1]);
        assert_eq!(shares[0].pairs, [1, 2]);
        assert_eq!(shares[0].routes.experts, [4, 2]);
        assert_eq!(shares[1].rows, [0, 2]);
        assert_eq!(shares[1].pairs, [0, 3, 4]);
        assert_eq!(shares[1].routes.offsets, [0, 1, 3]);
        assert_eq!(
            split_by_holder(&routes, 2, |e| (e != 2).then_some(0)),
            Err(2)
        );
        assert_eq!(split_by_holder(&routes, 2, |_| Some(2)), Err(1));
    }

    #[test]
    fn host_rows_gather_and_place_by_index() {
        let hidden = 2;
        let rows: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let gathered = HostRows
            .gather(&rows, &[2, 0], hidden, RowEncoding::F32)
            .unwrap();
        let mut out = HostRows.pair_rows(3, hidden).unwrap();
        HostRows
            .place(&mut out, &gathered, &[1, 2], hidden)
            .unwrap();
        assert_eq!(out, [0.0, 0.0, 4.0, 5.0, 0.0, 1.0]);
        assert!(HostRows
            .gather(&rows, &[3], hidden, RowEncoding::F32)
            .is_err());
        // bf16: the same rows, two bytes a value, rounded to nearest even.
        let halves = [1.0f32, 1.0 + 1.0 / 128.0, 1.0 + 3.0 / 512.0, 2.0];
        let bf16 = HostRows
            .gather(&halves.to_vec(), &[1, 0], hidden, RowEncoding::Bf16)
            .unwrap();
        let back = RowEncoding::Bf16.decode(&bf16).unwrap();
        assert_eq!(back, [1.0 + 1.0 / 128.0, 2.0, 1.0, 1.0 + 1.0 / 128.0]);
        assert!(HostRows
            .place(&mut out, &gathered, &[1, 3], hidden)
            .is_err());
        assert!(HostRows.place(&mut out, &gathered, &[1], hidden).is_err());
    }
}

/// The device-resident path end to end on one GPU, through the in-process device transport.
/// Needs a GPU: `ops/gpu-check.sh` runs it.
#[cfg(all(test, feature = "cuda"))]
mod gpu_tests {
    use std::sync::Arc;

    use moe_model::checkpoint::Checkpoint;
    use moe_model::device::GpuDtype;
    use moe_model::experts::{ExpertBackend, ExpertDevice, ExpertSet};
    use moe_model::gpu::GpuContext;
    use moe_model::ModelConfig;

    use super::super::exchange::Served;
    use super::super::mailbox::{group, DeviceBuffers};
    use super::super::test_nodes::{fixture, rows, serve_one_layer_each};
    use super::*;
    use crate::dispatch_rules::DispatchRules;

    /// Half of `layer`'s experts on each of two in-process nodes on `gpu`.
    fn two_sets(ckpt: &Checkpoint, config: &ModelConfig, gpu: &Arc<GpuContext>) -> [ExpertSet; 2] {
        let layer = config.moe_layer_indices().next().expect("a MoE layer");
        let experts = config.moe.num_experts;
        let on_gpu = ExpertDevice::Gpu(Arc::clone(gpu));
        [0..experts / 2, experts / 2..experts]
            .map(|ids| ExpertSet::load_on(ckpt, config, ids.map(|e| (layer, e)), &on_gpu))
            .map(|s| s.expect("experts"))
    }

    /// `n` rows choosing two distinct experts each, one on each half.
    fn two_node_routes(config: &ModelConfig, n: usize) -> ExpertRoutes {
        let half = config.moe.num_experts as u32 / 2;
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            let first = r % half;
            routes.push_row(&mut [(first, 0.75), (first + half, 0.25)]);
        }
        routes
    }

    /// One layer from rows on `gpu` to `sets` (each in its own rank, on its own stream) over
    /// the in-process device transport, rows sent as `rows_on_wire` says: the outputs placed
    /// in pair order, downloaded.
    fn layer_in_place(
        config: &ModelConfig,
        gpu: &Arc<GpuContext>,
        sets: [ExpertSet; 2],
        host_rows: &[f32],
        routes: &ExpertRoutes,
        rows_on_wire: &[RowEncoding],
    ) -> Vec<f32> {
        let hidden = config.hidden_size;
        let layer = config.moe_layer_indices().next().expect("a MoE layer");
        let half = config.moe.num_experts as u32 / 2;
        let router_stream = gpu.stream().context().new_stream().expect("stream");
        let carriers = DeviceBuffers {
            stream: Arc::clone(&router_stream),
        };
        let (mut comms, _) = group(3, carriers);
        let nodes = comms.split_off(1);
        let mut router = comms.pop().expect("rank 0");
        let timeout = Duration::from_secs(30);
        let rules = DispatchRules::for_model(config, 1024);
        let handles = serve_one_layer_each(nodes, sets, &rules, timeout);
        let shares = split_by_holder(routes, 2, |e| Some(usize::from(e >= half))).unwrap();
        let on_device = gpu.stream().clone_htod(host_rows).expect("rows on the GPU");
        let plane = DeviceRowPlane {
            gpu: Arc::clone(gpu),
            stream: router_stream,
        };
        let placed = dispatch_layer_in_place(
            &mut router,
            &plane,
            layer as u32,
            &on_device,
            &shares,
            rows_on_wire,
            routes.pairs(),
            hidden,
            timeout,
            None,
        );
        let placed = match placed {
            Ok(placed) => placed,
            Err(e) => {
                // What the nodes answered says why the router waited in vain.
                let nodes: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
                panic!("in-place layer: {e:?}; nodes: {nodes:?}");
            }
        };
        for h in handles {
            assert!(matches!(h.join().expect("node"), Ok(Served::Ran { .. })));
        }
        plane.stream.clone_dtoh(&placed.pair_out).expect("download")
    }

    /// A router's rows on the GPU go to two expert sets on the same GPU (each in its own
    /// rank, on its own stream) and come back placed in pair order, never downloaded: the
    /// outputs equal the same experts run from host rows on the CPU (f32, 1e-5).
    #[test]
    #[ignore = "needs an NVIDIA GPU (ops/gpu-check.sh runs it)"]
    fn device_rows_go_to_in_process_expert_sets_and_come_back_in_pair_order() {
        let (ckpt, config) = fixture("qwen3-moe-tiny");
        let gpu = GpuContext::open(0, GpuDtype::F32).expect("GPU 0");
        let layer = config.moe_layer_indices().next().expect("a MoE layer");
        let experts = config.moe.num_experts;
        let cpu =
            ExpertSet::load(&ckpt, &config, (0..experts).map(|e| (layer, e))).expect("CPU experts");
        let n = 7;
        let host_rows = rows(n, config.hidden_size, 0);
        let routes = two_node_routes(&config, n);
        let want = cpu.run_experts(layer, &host_rows, &routes).expect("CPU");
        let sets = two_sets(&ckpt, &config, &gpu);
        let got = layer_in_place(&config, &gpu, sets, &host_rows, &routes, &[]);
        let worst = moe_model::compare::max_abs_diff(&got, &want);
        assert!(worst <= 1e-5, "device-resident layer differs by {worst}");
        println!(
            "device-resident dispatch, in-process transport: {} pairs, max difference {worst:e}",
            routes.pairs()
        );
    }

    /// In `bf16` numerics the router gathers each node's rows as bf16 on the device (half the
    /// bytes) and the nodes widen them there: bitwise the outputs of f32 rows; a node of
    /// another mode says it reads f32.
    #[test]
    #[ignore = "needs an NVIDIA GPU (ops/gpu-check.sh runs it)"]
    fn bf16_rows_on_the_device_give_the_outputs_of_f32_rows() {
        let (ckpt, config) = fixture("qwen3-moe-tiny");
        let gpu = GpuContext::open(0, GpuDtype::Bf16).expect("GPU 0");
        let (n, hidden) = (9, config.hidden_size);
        let host_rows = rows(n, hidden, 3);
        let routes = two_node_routes(&config, n);
        let sets = two_sets(&ckpt, &config, &gpu);
        assert!(sets.iter().all(|s| s.reads_rows_as_bf16()));
        let f32_rows = layer_in_place(&config, &gpu, sets, &host_rows, &routes, &[]);
        let sets = two_sets(&ckpt, &config, &gpu);
        let bf16 = [RowEncoding::Bf16; 2];
        let bf16_rows = layer_in_place(&config, &gpu, sets, &host_rows, &routes, &bf16);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&bf16_rows), bits(&f32_rows));

        let plane = DeviceRowPlane {
            gpu: Arc::clone(&gpu),
            stream: Arc::clone(gpu.stream()),
        };
        let on_device = gpu.stream().clone_htod(&host_rows).expect("rows");
        let gathered = plane
            .gather(&on_device, &[4, 1, 8], hidden, RowEncoding::Bf16)
            .expect("gather");
        assert_eq!(gathered.bytes(), 3 * hidden * 2);

        let exact = GpuContext::open(0, GpuDtype::Bf16x2).expect("GPU 0");
        assert!(!two_sets(&ckpt, &config, &exact)[0].reads_rows_as_bf16());
        println!(
            "bf16 rows on the device: {} pairs, bitwise the f32 rows' outputs",
            routes.pairs()
        );
    }
}
