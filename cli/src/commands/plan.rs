//! `moe plan`: how a checkpoint would be laid out on GPU machines and how fast it would serve.
//! Flags have no `MOE_*` variables on purpose: a deployment's settings must not leak into a
//! plan for another one.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use moe_capacity::deployment::Split;
use moe_capacity::kernels::Seconds;
use moe_capacity::plan::{DecodePlan, PrefillPlan};
use moe_capacity::{Deployment, Efficiency, GpuOverrides, Layout, Plan, WeightFormat};
use moe_model::ModelConfig;

#[derive(Args)]
pub struct PlanArgs {
    /// Checkpoint directory; only its config.json is read.
    #[arg(long)]
    model: PathBuf,
    /// GPU kind: h100, h200, h800 or b200.
    #[arg(long)]
    gpu: String,
    #[arg(long)]
    machines: usize,
    #[arg(long, default_value_t = 8)]
    gpus_per_machine: usize,
    #[arg(long, value_enum, default_value_t = LayoutArg::Disaggregated)]
    layout: LayoutArg,
    #[arg(long, value_enum, default_value_t = FormatArg::Fp8)]
    weight_format: FormatArg,
    /// Extra copies of hot experts per MoE layer, spread over the expert GPUs.
    #[arg(long, default_value_t = 0)]
    redundant_experts: usize,
    /// Average tokens in a decoding sequence's cache (and the prompt length for prefill).
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Time per output token each sequence must get, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    tpot_ms: f64,
    /// Share of prompt tokens served from a prefix cache (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    prefix_hit_rate: f64,
    /// Draft with the checkpoint's MTP layers, accepted with this probability (DeepSeek
    /// reports 0.85 to 0.9). Our cluster does not run MTP; for comparisons.
    #[arg(long)]
    mtp_acceptance: Option<f64>,
    /// Micro-batches per step (1 to 4); by default the planner chooses.
    #[arg(long)]
    micro_batches: Option<usize>,
    /// Evaluate this many sequences per attention GPU instead of the most that meet
    /// --tpot-ms.
    #[arg(long)]
    decode_batch: Option<usize>,
    /// What-if for our layout: rows and answers on the wire in this type (today: f32).
    #[arg(long, value_enum)]
    wire_dtype: Option<ValueType>,
    /// What-if for our layout: the router's KV cache in this type (today: f32).
    #[arg(long, value_enum)]
    kv_dtype: Option<ValueType>,
    /// Replace the GPU kind's memory, in GB.
    #[arg(long)]
    gpu_memory_gb: Option<f64>,
    /// Replace its HBM bandwidth, in GB/s.
    #[arg(long)]
    hbm_gb_s: Option<f64>,
    /// Replace its dense bf16 TFLOP/s.
    #[arg(long)]
    bf16_tflops: Option<f64>,
    /// Replace its dense FP8 TFLOP/s.
    #[arg(long)]
    fp8_tflops: Option<f64>,
    /// Replace its NVLink bandwidth, GB/s in one direction.
    #[arg(long)]
    nvlink_gb_s: Option<f64>,
    /// Replace its network card's bandwidth, GB/s in one direction.
    #[arg(long)]
    network_gb_s: Option<f64>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum LayoutArg {
    Disaggregated,
    Colocated,
}

#[derive(Clone, Copy, ValueEnum)]
enum ValueType {
    F32,
    Bf16,
    Fp8,
}

impl ValueType {
    fn bytes(self) -> usize {
        match self {
            ValueType::F32 => 4,
            ValueType::Bf16 => 2,
            ValueType::Fp8 => 1,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Fp8,
    Bf16,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let deployment = deployment(&args)?;
    let plan = moe_capacity::plan(&deployment);
    if args.json {
        println!("{}", serde_json::to_string(&json(&deployment, &plan))?);
    } else {
        print!("{}", text(&deployment, &plan));
    }
    Ok(())
}

fn deployment(args: &PlanArgs) -> anyhow::Result<Deployment> {
    let config = ModelConfig::from_dir(&args.model)
        .with_context(|| format!("reading {}/config.json", args.model.display()))?;
    let names = moe_capacity::gpu::known()
        .iter()
        .map(|g| g.name.clone())
        .collect::<Vec<_>>()
        .join(", ");
    let gpu = moe_capacity::gpu::by_name(&args.gpu)
        .with_context(|| format!("unknown --gpu {:?} (known: {names})", args.gpu))?
        .with(&GpuOverrides {
            memory_gb: args.gpu_memory_gb,
            hbm_gb_s: args.hbm_gb_s,
            bf16_tflops: args.bf16_tflops,
            fp8_tflops: args.fp8_tflops,
            nvlink_gb_s: args.nvlink_gb_s,
            network_gb_s: args.network_gb_s,
        });
    anyhow::ensure!(
        args.machines > 0 && args.gpus_per_machine > 0,
        "--machines and --gpus-per-machine must be positive"
    );
    anyhow::ensure!(args.context > 0, "--context must be positive");
    anyhow::ensure!(args.tpot_ms > 0.0, "--tpot-ms must be positive");
    anyhow::ensure!(
        (0.0..1.0).contains(&args.prefix_hit_rate),
        "--prefix-hit-rate must be in [0, 1)"
    );
    if let Some(a) = args.mtp_acceptance {
        anyhow::ensure!(
            (0.0..=1.0).contains(&a),
            "--mtp-acceptance must be in [0, 1]"
        );
        anyhow::ensure!(
            config.mtp_layers > 0,
            "--mtp-acceptance: the checkpoint has no MTP layers"
        );
    }
    if args.layout == LayoutArg::Colocated {
        anyhow::ensure!(
            args.wire_dtype.is_none() && args.kv_dtype.is_none(),
            "--wire-dtype and --kv-dtype are what-ifs for the disaggregated layout (colocated uses DeepEP's formats and a bf16 cache)"
        );
    }
    if let Some(m) = args.micro_batches {
        anyhow::ensure!((1..=4).contains(&m), "--micro-batches must be 1 to 4");
    }
    Ok(Deployment {
        config,
        gpu,
        machines: args.machines,
        gpus_per_machine: args.gpus_per_machine,
        layout: match args.layout {
            LayoutArg::Disaggregated => Layout::Disaggregated,
            LayoutArg::Colocated => Layout::Colocated,
        },
        format: match args.weight_format {
            FormatArg::Fp8 => WeightFormat::Fp8,
            FormatArg::Bf16 => WeightFormat::Bf16,
        },
        redundant_experts: args.redundant_experts,
        context: args.context,
        tpot_ms: args.tpot_ms,
        prefix_hit_rate: args.prefix_hit_rate,
        mtp_acceptance: args.mtp_acceptance,
        micro_batches: args.micro_batches,
        decode_batch: args.decode_batch,
        wire_value_bytes: args.wire_dtype.map(ValueType::bytes),
        kv_value_bytes: args.kv_dtype.map(ValueType::bytes),
        efficiency: Efficiency::PUBLISHED,
    })
}

/// The contract's fields at the top, the whole plan and its inputs beside them.
fn json(d: &Deployment, plan: &Plan) -> serde_json::Value {
    let decode = plan.decode.as_ref();
    serde_json::json!({
        "fits": plan.fits,
        "weights_bytes_per_gpu": plan.weights_bytes_per_gpu,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "routed_experts_per_gpu": plan.routed_experts_per_gpu,
        "decode_batch_per_gpu": decode.map(|p| p.batch_per_attention_gpu).unwrap_or(0),
        "decode_tok_s_per_gpu": decode.map(|p| p.tok_s_per_gpu).unwrap_or(0.0),
        "decode_tok_s_per_node": decode.map(|p| p.tok_s_per_node).unwrap_or(0.0),
        "bound": decode.map(|p| p.bound),
        "prefill_input_tok_s_per_node": plan.prefill.as_ref().map(|p| p.input_tok_s_per_node),
        "plan": plan,
        "inputs": {
            "gpu": d.gpu,
            "machines": d.machines,
            "gpus_per_machine": d.gpus_per_machine,
            "layout": d.layout,
            "weight_format": d.format,
            "redundant_experts": d.redundant_experts,
            "context": d.context,
            "tpot_ms": d.tpot_ms,
            "prefix_hit_rate": d.prefix_hit_rate,
            "mtp_acceptance": d.mtp_acceptance,
            "micro_batches": d.micro_batches,
            "decode_batch": d.decode_batch,
            "wire_value_bytes": d.wire_value_bytes,
            "kv_value_bytes": d.kv_value_bytes,
            "efficiency": d.efficiency,
        },
    })
}

const GB: f64 = 1e9;

fn text(d: &Deployment, plan: &Plan) -> String {
    let f = d.footprint();
    let mut out = format!(
        "{} x {} x {} ({} layout, {} weights)\n",
        d.machines,
        d.gpus_per_machine,
        d.gpu.name,
        serde_name(&d.layout),
        d.format.name()
    );
    out += &format!(
        "model: {:.1}B parameters ({:.1}B with MTP layers), {:.1}B active per token; {:.0} GB of weights\n",
        f.main_params(&d.config) / 1e9,
        f.total().params / 1e9,
        f.active_params(&d.config) / 1e9,
        f.total().bytes / GB
    );
    out += &format!(
        "KV cache: {:.1} KB per token, {:.2} GB per sequence at {} tokens\n",
        plan.kv_bytes_per_token / 1e3,
        plan.kv_bytes_per_sequence_at_context / GB,
        d.context
    );
    if !plan.fits {
        out += &format!("fits: no: {}\n", plan.why_not.clone().unwrap_or_default());
        return out;
    }
    out += "fits: yes\n";
    if let Some(split) = &plan.split {
        out += &placement_text(d, split);
    }
    for (name, m) in [
        ("attention GPU", plan.attention_gpu_memory),
        ("expert GPU", plan.expert_gpu_memory),
    ] {
        if let Some(m) = m {
            out += &format!(
                "  {name}: weights {:.1} GB, KV cache {:.1} GB, activations {:.1} GB, reserve {:.1} GB of {:.0} GB\n",
                m.weights / GB,
                m.kv_cache / GB,
                m.activations / GB,
                m.reserve / GB,
                m.capacity / GB
            );
        }
    }
    match &plan.decode {
        Some(p) => out += &decode_text(d, p),
        None => out += &format!("decode: {}\n", plan.why_not.clone().unwrap_or_default()),
    }
    if let Some(p) = &plan.prefill {
        out += &prefill_text(d, p);
    }
    out
}

fn serde_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn placement_text(d: &Deployment, s: &Split) -> String {
    let experts = d.config.moe.num_experts + d.redundant_experts;
    match d.layout {
        Layout::Colocated => format!(
            "placement: every GPU runs attention and holds {} routed-expert slots per MoE layer ({experts} over {} GPUs)\n",
            s.routed_experts_per_gpu, s.expert_gpus
        ),
        Layout::Disaggregated => format!(
            "placement: {} router GPUs (attention and the dense part), {} expert GPUs with {} routed-expert slots per MoE layer ({experts} over {})\n",
            s.attention_gpus, s.expert_gpus, s.routed_experts_per_gpu, s.expert_gpus
        ),
    }
}

fn ms(s: Seconds) -> String {
    format!("{:.1} ms", s.total() * 1e3)
}

fn decode_text(d: &Deployment, p: &DecodePlan) -> String {
    let c = &p.cost;
    format!(
        "decode: {} sequences per attention GPU ({} micro-batches, limited by {}), step {:.1} ms, {:.1} ms per output token\n  \
         {:.0} tokens/s per GPU, {:.0} per node; bound: {}\n  \
         per step: attention {}, dense kernels {}, routed experts {} (busiest GPU), exchange {:.1} ms \
         ({:.1} MB over the network, {:.1} MB over NVLink per GPU)\n",
        p.batch_per_attention_gpu,
        c.micro_batches,
        p.batch_limited_by,
        p.step_ms,
        p.tpot_ms,
        p.tok_s_per_gpu,
        p.tok_s_per_node,
        p.bound,
        ms(c.attention),
        ms(c.dense),
        ms(c.experts),
        c.exchange.seconds * 1e3,
        c.exchange.network_bytes / 1e6,
        c.exchange.nvlink_bytes / 1e6,
    ) + if d.mtp_acceptance.is_some() { "  (with MTP drafting)\n" } else { "" }
}

fn prefill_text(d: &Deployment, p: &PrefillPlan) -> String {
    let c = &p.cost;
    format!(
        "prefill: {} prompt tokens per attention GPU per step, step {:.0} ms; {:.0} computed tokens/s per GPU, \
         {:.0} input tokens/s per node ({:.0}% prefix-cache hits); bound: {}\n  \
         per step: attention {}, dense kernels {}, routed experts {}, exchange {:.1} ms\n",
        p.tokens_per_attention_gpu,
        p.step_ms,
        p.computed_tok_s_per_gpu,
        p.input_tok_s_per_node,
        d.prefix_hit_rate * 100.0,
        p.bound,
        ms(c.attention),
        ms(c.dense),
        ms(c.experts),
        c.exchange.seconds * 1e3,
    )
}
