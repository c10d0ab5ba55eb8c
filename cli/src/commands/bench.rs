//! `moe bench`: offline throughput and latency of the engine, per batch size (through a router
//! with `--router`: `bench_remote`).
//!
//! For each batch size B: B prompts of `--prompt-len` random tokens are prefilled in one step
//! (time to first token), then decoded together for `--gen` tokens (inter-token latency).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use moe_cluster::DeviceArgs;
use moe_model::dense::StepSequence;
use moe_model::dense_step::{Pick, StepOutput};
use moe_model::sampling::{Rng, Sampler};
use moe_model::Engine;

use super::bench_report::{BatchResult, BenchReport, Percentiles, Workload};

#[derive(Args)]
pub struct BenchArgs {
    /// Checkpoint directory, for the offline engine.
    #[arg(long, env = "MOE_MODEL", required_unless_present = "router")]
    model: Option<PathBuf>,
    /// A router's gRPC address: measure the cluster instead (B concurrent streams; the
    /// cluster's processes have their own device: `--device` is then ignored).
    #[arg(long, env = "MOE_ROUTER", conflicts_with = "model")]
    router: Option<String>,
    #[command(flatten)]
    workload: Workload,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: DeviceArgs,
    #[command(flatten)]
    in_process: super::in_process_nodes::InProcessNodesArgs,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = match (&args.router, &args.model) {
        (Some(router), _) => super::bench_remote::run(router, &args.workload)?,
        (None, Some(model)) => offline(model, &args.engine, &args.in_process, &args.workload)?,
        (None, None) => anyhow::bail!("give --model or --router"),
    };
    report.print(args.json)
}

fn offline(
    model: &Path,
    device: &DeviceArgs,
    in_process: &super::in_process_nodes::InProcessNodesArgs,
    workload: &Workload,
) -> anyhow::Result<BenchReport> {
    let opened = device.open()?;
    let engine = in_process.apply(Engine::load_on(model, &opened)?, &opened)?;
    let vocab = engine.config().vocab_size as u64;
    let mut rng = Rng::seeded(42);
    warm_up(&engine)?;
    let mut results = Vec::new();
    let prefix = workload.prefix(vocab, &mut rng);
    for &batch in &workload.batch {
        let prompts = workload.prompts(&prefix, batch, vocab, &mut rng);
        results.push(one_batch(&engine, &prompts, &workload.measured())?);
    }
    Ok(BenchReport {
        model: model.display().to_string(),
        model_type: engine.config().family.model_type().to_string(),
        device: match in_process.in_process_nodes {
            0 => device.describe(),
            n => format!("{}, experts behind {n} in-process nodes", device.describe()),
        },
        sampling: workload.describe_sampling(),
        threads: rayon::current_num_threads(),
        results,
    })
}

/// Prefills `prompts` in one step, then decodes them together, timing each step.
fn one_batch(
    engine: &Engine,
    prompts: &[Vec<u32>],
    workload: &Workload,
) -> anyhow::Result<BatchResult> {
    let batch = prompts.len();
    let mut caches: Vec<_> = (0..batch).map(|_| engine.new_cache()).collect();
    let mut samplers = (0..batch)
        .map(|i| workload.sampling(i).map(Sampler::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = Instant::now();
    let first = {
        let mut step: Vec<StepSequence<'_>> = caches
            .iter_mut()
            .zip(prompts)
            .map(|(cache, p)| StepSequence {
                cache,
                tokens: p,
                all_logits: false,
            })
            .collect();
        pick_next(engine, &mut step, &mut samplers)?
    };
    let mut next: Vec<u32> = first;
    let ttft = start.elapsed().as_secs_f64();
    let mut step_times = Vec::with_capacity(workload.gen);
    let decode_start = Instant::now();
    for _ in 1..workload.gen {
        let t = Instant::now();
        let picked = {
            let mut step: Vec<StepSequence<'_>> = caches
                .iter_mut()
                .zip(&next)
                .map(|(cache, tok)| StepSequence {
                    cache,
                    tokens: std::slice::from_ref(tok),
                    all_logits: false,
                })
                .collect();
            pick_next(engine, &mut step, &mut samplers)?
        };
        next = picked;
        step_times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let decode = decode_start.elapsed().as_secs_f64();
    Ok(BatchResult {
        batch,
        prompt_len: workload.prompt_len,
        gen: workload.gen,
        prefill_tok_s: (batch * workload.prompt_len) as f64 / ttft,
        time_to_first_token_ms: ttft * 1e3,
        decode_tok_s: (batch * workload.gen.saturating_sub(1)) as f64 / decode.max(1e-9),
        inter_token_latency_ms: Percentiles::of(step_times),
    })
}

/// One step, each sequence's next token drawn by its sampler: greedy picks and races run
/// where the dense part runs (on a GPU, only the ids come back).
fn pick_next(
    engine: &Engine,
    step: &mut [StepSequence<'_>],
    samplers: &mut [Sampler],
) -> anyhow::Result<Vec<u32>> {
    let picks: Vec<Pick> = samplers
        .iter()
        .map(|s| s.next_race().map_or(Pick::Argmax, Pick::Race))
        .collect();
    let vocab = engine.config().vocab_size;
    let outputs = engine.step_picking(step, &picks)?;
    samplers
        .iter_mut()
        .zip(outputs)
        .map(|(sampler, output)| match output {
            StepOutput::Argmax(id) => Ok(sampler.take_argmax(id)),
            StepOutput::Drawn(id) => Ok(sampler.take_draw(id)),
            StepOutput::RankedTopK(ranked) => Ok(sampler.sample_ranked(&ranked)),
            StepOutput::Logits(rows) => match rows.len().checked_sub(vocab) {
                Some(last) => Ok(sampler.sample(&rows[last..])),
                None => anyhow::bail!("a step without logits"),
            },
        })
        .collect()
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
