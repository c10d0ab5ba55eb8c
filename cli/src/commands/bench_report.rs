//! What `moe bench` measured, offline or through a router, and how it prints it.

use serde::Serialize;

/// The sizes one bench run measures, offline or through a router: for each batch size B, B
/// prompts of `--prompt-len` random tokens, each generating `--gen` tokens.
#[derive(clap::Args, Clone)]
pub struct Workload {
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    pub gen: usize,
    /// Tokens of one prefix every prompt starts with (a system prompt), in front of its own
    /// `--prompt-len`. With `--router`, one untimed request with the prefix goes first, so a
    /// router with prefix caching holds it, as after earlier traffic.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// Temperature of the generated tokens' draws (0: greedy). Above 0 each sequence draws as a
    /// request with a seed would (a race without top-k, on the device where the dense part
    /// runs on one), so the sampling's cost is in the figures.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Top-p of those draws.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
}

impl Workload {
    /// `batch` prompts of random ids below `vocab`: the shared prefix, then each one's own.
    pub fn prompts(
        &self,
        prefix: &[u32],
        batch: usize,
        vocab: u64,
        rng: &mut moe_model::sampling::Rng,
    ) -> Vec<Vec<u32>> {
        (0..batch)
            .map(|_| {
                let mut p = prefix.to_vec();
                p.extend((0..self.prompt_len).map(|_| (rng.next_u64() % vocab) as u32));
                p
            })
            .collect()
    }

    /// The prefix every prompt shares.
    pub fn prefix(&self, vocab: u64, rng: &mut moe_model::sampling::Rng) -> Vec<u32> {
        (0..self.shared_prefix)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect()
    }

    /// How sequence `index` draws its tokens (seeded by its index); an error for a
    /// temperature or top-p a request could not ask for.
    pub fn sampling(&self, index: usize) -> anyhow::Result<moe_model::SamplingParams> {
        let params = moe_model::SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: Some(index as u64),
            ..Default::default()
        };
        params.validate()?;
        Ok(params)
    }

    /// What the report says of the draws.
    pub fn describe_sampling(&self) -> String {
        if self.temperature == 0.0 {
            "greedy".into()
        } else {
            format!("temperature {}, top-p {}", self.temperature, self.top_p)
        }
    }

    /// The shape each batch reports: prompts as long as prefix + own tokens.
    pub fn measured(&self) -> Workload {
        Workload {
            prompt_len: self.shared_prefix + self.prompt_len,
            ..self.clone()
        }
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    /// The percentiles of `samples` (sorted here).
    pub fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&samples, 0.5),
            p90: percentile(&samples, 0.9),
            p99: percentile(&samples, 0.99),
        }
    }
}

/// The nearest-rank `q` quantile of `sorted` (0 when empty).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx]
}

/// One batch size's figures.
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

/// A whole run: what was measured, where, and each batch size's figures.
#[derive(Serialize)]
pub struct BenchReport {
    pub model: String,
    pub model_type: String,
    /// `cpu`, `cuda:N (dtype)`, or `router` for a cluster.
    pub device: String,
    /// `greedy`, or the draws' temperature and top-p.
    pub sampling: String,
    pub threads: usize,
    pub results: Vec<BatchResult>,
}

impl BenchReport {
    /// A table, or with `json` one JSON object.
    pub fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string(self)?);
            return Ok(());
        }
        println!(
            "{} ({}), {}, {} threads, {}",
            self.model, self.model_type, self.device, self.threads, self.sampling
        );
        println!("batch  prefill tok/s  TTFT ms  decode tok/s  ITL p50/p90/p99 ms");
        for r in &self.results {
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
        Ok(())
    }
}
