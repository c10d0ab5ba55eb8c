//! Bytes each MoE layer moves between attention and expert GPUs, in the format each layout
//! sends: ours (the data plane's f32 frames, a row once per expert node, an answer per pair)
//! or DeepSeek's (DeepEP: FP8 rows with 128-wide scales out, bf16 answers back).

use moe_cluster::frames::{combine_payload_bytes, dispatch_payload_bytes};

use crate::deployment::{Deployment, Layout, Split};
use crate::kernels::Traffic;

/// Which phase: decode sends few rows (DeepEP's low-latency kernels, pure RDMA), prefill
/// many (its normal kernels, forwarding over NVLink inside a machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Decode,
    Prefill,
}

/// One MoE layer's exchange for `rows` rows on each attention GPU; the busier end's time.
/// `busiest` scales what the busiest expert GPU receives.
pub fn layer_exchange(
    d: &Deployment,
    split: &Split,
    phase: Phase,
    rows: f64,
    busiest: f64,
) -> Traffic {
    match d.layout {
        Layout::Colocated => deepep(d, phase, rows, busiest),
        Layout::Disaggregated => data_plane(d, split, phase, rows, busiest),
    }
}

fn efficiencies(d: &Deployment, phase: Phase) -> (f64, f64) {
    let net = match phase {
        Phase::Decode => d.efficiency.network_decode,
        Phase::Prefill => d.efficiency.network_prefill,
    };
    (net, d.efficiency.nvlink)
}

/// DeepSeek's deployment: every GPU sends its rows to the GPUs of their experts.
fn deepep(d: &Deployment, phase: Phase, rows: f64, busiest: f64) -> Traffic {
    let h = d.config.hidden_size as f64;
    let k = d.config.moe.top_k as f64;
    let fp8_row = h + h / 128.0 * 4.0;
    let bf16_row = 2.0 * h;
    let (net, nvl) = efficiencies(d, phase);
    match phase {
        // Low-latency kernels: one copy per routed expert, over RDMA, or NVLink for the GPUs
        // of the same machine (DeepEP since its June 2025 change, #173).
        Phase::Decode => {
            let local = 1.0 / d.machines.max(1) as f64;
            let out = rows * k * fp8_row * busiest;
            let back = rows * k * bf16_row * busiest;
            Traffic::over(&d.gpu, net, nvl, out * (1.0 - local), out * local)
                + Traffic::over(&d.gpu, net, nvl, back * (1.0 - local), back * local)
        }
        // Normal kernels: one copy per remote machine over RDMA, then NVLink to the GPUs.
        Phase::Prefill => {
            let machines = d.machines.max(1);
            let remote = d.distinct_targets(machines) * (machines - 1) as f64 / machines as f64;
            let out = Traffic::over(
                &d.gpu,
                net,
                nvl,
                rows * remote * fp8_row * busiest,
                rows * k * fp8_row * busiest,
            );
            let back = Traffic::over(
                &d.gpu,
                net,
                nvl,
                rows * remote * bf16_row * busiest,
                rows * k * bf16_row * busiest,
            );
            out + back
        }
    }
}

/// Ours: each attention GPU (a router) sends a row once to each expert node holding one of
/// its experts, with the pairs' expert ids and weights; each node answers one f32 row per
/// pair. Traffic to GPUs of the same machine rides NVLink.
fn data_plane(d: &Deployment, split: &Split, phase: Phase, rows: f64, busiest: f64) -> Traffic {
    let h = d.config.hidden_size;
    let k = d.config.moe.top_k as f64;
    let (net, nvl) = efficiencies(d, phase);
    let local = split.local_expert_share(d);
    let targets = d.distinct_targets(split.expert_gpus);
    // The frames' own sizes (f32 values); a what-if width scales their hidden-sized parts.
    let narrowing = d.wire_value_bytes.map_or(0.0, |b| 1.0 - b as f64 / 4.0);
    let frames = |rows_sent: f64, pairs: f64| {
        let (rows_sent, pairs) = (rows_sent.ceil() as usize, pairs.ceil() as usize);
        let hidden_part = |values: usize| (values * h * 4) as f64 * narrowing;
        (
            dispatch_payload_bytes(rows_sent, pairs, h) as f64 - hidden_part(rows_sent),
            combine_payload_bytes(pairs, h) as f64 - hidden_part(pairs),
        )
    };
    let side = |out: f64, back: f64| {
        Traffic::over(&d.gpu, net, nvl, out * (1.0 - local), out * local)
            + Traffic::over(&d.gpu, net, nvl, back * (1.0 - local), back * local)
    };
    let (out, back) = frames(rows * targets, rows * k);
    let router = side(out, back);
    let per_expert = split.attention_gpus as f64 / split.expert_gpus as f64 * busiest;
    let (out, back) = frames(rows * targets * per_expert, rows * k * per_expert);
    let expert = side(out, back);
    if router.seconds >= expert.seconds {
        router
    } else {
        expert
    }
}
