//! `moe bench --router`: the offline bench's figures, measured through a router with B
//! concurrent Generate streams of random prompts.

use std::time::Instant;

use anyhow::Context;
use moe_model::sampling::Rng;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, ModelInfoRequest};

use super::bench::{percentile, BatchResult, BenchArgs, BenchReport, Percentiles};
use super::remote::runtime;

/// Arrival time (seconds from the batch start) of each streamed token of one request.
async fn one_stream(
    mut client: InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
    start: Instant,
) -> anyhow::Result<Vec<f64>> {
    let mut stream = client
        .generate(super::remote::with_key(req))
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut times = Vec::new();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
    {
        for _ in &msg.token_ids {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

pub fn run(router: &str, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    runtime()?.block_on(async {
        let mut client = super::remote::channel(router)
            .await
            .map(InferenceClient::new)
            .with_context(|| format!("connecting to {router}"))?;
        let info = client.model_info(ModelInfoRequest {}).await?.into_inner();
        let mut rng = Rng::seeded(42);
        let mut results = Vec::new();
        for &batch in &args.batch {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..batch {
                let ids: Vec<u32> = (0..args.prompt_len)
                    .map(|_| (rng.next_u64() % info.vocab_size as u64) as u32)
                    .collect();
                let req = GenerateRequest {
                    top_logprobs: None,
                    prompt: None,
                    input_ids: ids,
                    max_new_tokens: args.gen as u32,
                    temperature: Some(0.0),
                    top_p: None,
                    top_k: None,
                    seed: None,
                    stop: vec![],
                    ignore_eos: true,
                    logprobs: false,
                };
                tasks.push(tokio::spawn(one_stream(client.clone(), req, start)));
            }
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await??);
            }
            let first: Vec<f64> = all.iter().filter_map(|t| t.first().copied()).collect();
            let last_first = first.iter().copied().fold(0.0, f64::max);
            let end = all
                .iter()
                .filter_map(|t| t.last().copied())
                .fold(0.0, f64::max);
            // Decode throughput once every stream is decoding: the router interleaves chunked
            // prefills with decodes, so earlier tokens overlap other requests' prefill.
            let decoded: usize = all
                .iter()
                .map(|t| t.iter().filter(|&&x| x > last_first).count())
                .sum();
            let mut gaps: Vec<f64> = all
                .iter()
                .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]) * 1e3))
                .collect();
            gaps.sort_by(f64::total_cmp);
            results.push(BatchResult {
                batch,
                prompt_len: args.prompt_len,
                gen: args.gen,
                prefill_tok_s: (batch * args.prompt_len) as f64 / last_first.max(1e-9),
                time_to_first_token_ms: first.iter().sum::<f64>() / first.len().max(1) as f64 * 1e3,
                decode_tok_s: decoded as f64
                    / (end - first.iter().copied().fold(f64::INFINITY, f64::min)).max(1e-9),
                inter_token_latency_ms: Percentiles {
                    p50: percentile(&gaps, 0.5),
                    p90: percentile(&gaps, 0.9),
                    p99: percentile(&gaps, 0.99),
                },
            });
        }
        Ok(BenchReport {
            model: format!("router {router} ({})", info.model_dir),
            model_type: info.model_type,
            device: "router".into(),
            threads: 0,
            results,
        })
    })
}
