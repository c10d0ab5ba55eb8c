//! What `moe bench` measured, offline or through a router, and how it prints it.

use serde::Serialize;

/// The sizes one bench run measures, offline or through a router: for each batch size B, B
/// prompts of `--prompt-len` random tokens, each generating `--gen` tokens.
#[derive(clap::Args)]
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
            "{} ({}), {}, {} threads",
            self.model, self.model_type, self.device, self.threads
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
