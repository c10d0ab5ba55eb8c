//! `moe bench`: offline throughput and latency of the engine, per batch size.
//!
//! For each batch size B: B prompts of `--prompt-len` random tokens are prefilled in one step
//! (time to first token), then decoded together for `--gen` tokens (inter-token latency).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use moe_model::backend::ops::argmax;
use moe_model::dense::StepSequence;
use moe_model::sampling::Rng;
use moe_model::Engine;
use serde::Serialize;

#[derive(Args)]
pub struct BenchArgs {
    /// Checkpoint directory, for the offline engine.
    #[arg(long, env = "MOE_MODEL", required_unless_present = "router")]
    model: Option<PathBuf>,
    /// A router's gRPC address: measure the cluster instead (B concurrent streams).
    #[arg(long, env = "MOE_ROUTER", conflicts_with = "model")]
    router: Option<String>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    pub gen: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: super::engine_device::EngineDeviceArgs,
}

#[derive(Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Serialize)]
pub struct BatchResult {
    pub batch: usize,
    pub prompt_len: usize,
    pub gen: usize,
    pub prefill_tok_s: f64,
    pub time_to_first_token_ms: f64,
    pub decode_tok_s: f64,
    pub inter_token_latency_ms: Percentiles,
}

#[derive(Serialize)]
pub struct BenchReport {
    pub model: String,
    pub model_type: String,
    /// `cpu`, `cuda:N (dtype)`, or `router` for a cluster.
    pub device: String,
    pub threads: usize,
    pub results: Vec<BatchResult>,
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx]
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(router) = args.router.clone() {
        let report = super::bench_remote::run(&router, &args)?;
        return print(&report, args.json);
    }
    let Some(model) = args.model.clone() else {
        anyhow::bail!("give --model or --router")
    };
    let device = args.engine.open()?;
    let engine = Engine::load_on(&model, &device)?;
    let vocab = engine.config().vocab_size as u64;
    let mut rng = Rng::seeded(42);
    warm_up(&engine)?;
    let mut results = Vec::new();
    for &batch in &args.batch {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..args.prompt_len)
                    .map(|_| (rng.next_u64() % vocab) as u32)
                    .collect()
            })
            .collect();
        let mut caches: Vec<_> = (0..batch).map(|_| engine.new_cache()).collect();
        let start = Instant::now();
        let logits = {
            let mut step: Vec<StepSequence<'_>> = caches
                .iter_mut()
                .zip(&prompts)
                .map(|(cache, p)| StepSequence {
                    cache,
                    tokens: p,
                    all_logits: false,
                })
                .collect();
            engine.step(&mut step)?
        };
        let mut next: Vec<u32> = logits.iter().map(|l| argmax(l) as u32).collect();
        let ttft = start.elapsed().as_secs_f64();
        let mut step_times = Vec::with_capacity(args.gen);
        let decode_start = Instant::now();
        for _ in 1..args.gen {
            let t = Instant::now();
            let logits = {
                let mut step: Vec<StepSequence<'_>> = caches
                    .iter_mut()
                    .zip(&next)
                    .map(|(cache, tok)| StepSequence {
                        cache,
                        tokens: std::slice::from_ref(tok),
                        all_logits: false,
                    })
                    .collect();
                engine.step(&mut step)?
            };
            next = logits.iter().map(|l| argmax(l) as u32).collect();
            step_times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let decode = decode_start.elapsed().as_secs_f64();
        step_times.sort_by(f64::total_cmp);
        results.push(BatchResult {
            batch,
            prompt_len: args.prompt_len,
            gen: args.gen,
            prefill_tok_s: (batch * args.prompt_len) as f64 / ttft,
            time_to_first_token_ms: ttft * 1e3,
            decode_tok_s: (batch * args.gen.saturating_sub(1)) as f64 / decode.max(1e-9),
            inter_token_latency_ms: Percentiles {
                p50: percentile(&step_times, 0.5),
                p90: percentile(&step_times, 0.9),
                p99: percentile(&step_times, 0.99),
            },
        });
    }
    let report = BenchReport {
        model: model.display().to_string(),
        model_type: engine.config().family.model_type().to_string(),
        device: args.engine.describe(),
        threads: rayon::current_num_threads(),
        results,
    };
    print(&report, args.json)
}

/// One short prefill and decode step before anything is timed: the first batch would otherwise
/// pay one-time costs (a GPU's library handles and first allocations, the CPU's page faults).
fn warm_up(engine: &Engine) -> anyhow::Result<()> {
    let mut cache = engine.new_cache();
    for tokens in [&[2u32, 3, 4, 5][..], &[6]] {
        engine.step(&mut [StepSequence {
            cache: &mut cache,
            tokens,
            all_logits: false,
        }])?;
    }
    Ok(())
}

fn print(report: &BenchReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "{} ({}), {}, {} threads",
            report.model, report.model_type, report.device, report.threads
        );
        println!("batch  prefill tok/s  TTFT ms  decode tok/s  ITL p50/p90/p99 ms");
        for r in &report.results {
            println!(
                "{:>5}  {:>13.1}  {:>7.1}  {:>12.1}  {:.2}/{:.2}/{:.2}",
                r.batch,
                r.prefill_tok_s,
                r.time_to_first_token_ms,
                r.decode_tok_s,
                r.inter_token_latency_ms.p50,
                r.inter_token_latency_ms.p90,
                r.inter_token_latency_ms.p99
            );
        }
    }
    Ok(())
}
