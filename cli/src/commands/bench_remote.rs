//! `moe bench --router`: the offline bench's figures, measured through a router with B
//! concurrent Generate streams of random prompts.

use std::time::Instant;

use anyhow::Context;
use moe_model::sampling::Rng;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{GenerateRequest, ModelInfoRequest};
use tonic::transport::Channel;

use super::bench_report::{BatchResult, BenchReport, Percentiles, Workload};
use crate::router_client::{channel, rpc_error, runtime, with_key};

pub fn run(router: &str, workload: &Workload) -> anyhow::Result<BenchReport> {
    runtime()?.block_on(async {
        let mut client = channel(router)
            .await
            .map(InferenceClient::new)
            .with_context(|| format!("connecting to {router}"))?;
        let info = client.model_info(ModelInfoRequest {}).await?.into_inner();
        let mut rng = Rng::seeded(42);
        let vocab = info.vocab_size as u64;
        let prefix = workload.prefix(vocab, &mut rng);
        if !prefix.is_empty() {
            // Untimed: leaves the prefix in a prefix-caching router, as earlier traffic would.
            let mut warm = prefix.clone();
            warm.push(1);
            one_stream(
                client.clone(),
                moe_tooling::greedy(&warm, 1),
                Instant::now(),
            )
            .await?;
        }
        let mut results = Vec::new();
        for &batch in &workload.batch {
            let prompts = workload.prompts(&prefix, batch, vocab, &mut rng);
            results.push(one_batch(&client, &prompts, &workload.measured()).await?);
        }
        Ok(BenchReport {
            model: format!("router {router} ({})", info.model_dir),
            model_type: info.model_type,
            device: "router".into(),
            sampling: workload.describe_sampling(),
            threads: 0,
            results,
        })
    })
}

/// Streams `prompts` at once and derives the offline bench's figures from when each token came.
async fn one_batch(
    client: &InferenceClient<Channel>,
    prompts: &[Vec<u32>],
    workload: &Workload,
) -> anyhow::Result<BatchResult> {
    let batch = prompts.len();
    let start = Instant::now();
    let tasks: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let sampling = (workload.temperature > 0.0).then_some(i as u64);
            let request = GenerateRequest {
                // Timed, not checked: no logprobs to compute and send.
                logprobs: false,
                temperature: Some(workload.temperature),
                top_p: sampling.map(|_| workload.top_p),
                seed: sampling,
                ..moe_tooling::greedy(ids, workload.gen as u32)
            };
            tokio::spawn(one_stream(client.clone(), request, start))
        })
        .collect();
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
    let gaps: Vec<f64> = all
        .iter()
        .flat_map(|t| t.windows(2).map(|w| (w[1] - w[0]) * 1e3))
        .collect();
    Ok(BatchResult {
        batch,
        prompt_len: workload.prompt_len,
        gen: workload.gen,
        prefill_tok_s: (batch * workload.prompt_len) as f64 / last_first.max(1e-9),
        time_to_first_token_ms: first.iter().sum::<f64>() / first.len().max(1) as f64 * 1e3,
        decode_tok_s: decoded as f64
            / (end - first.iter().copied().fold(f64::INFINITY, f64::min)).max(1e-9),
        inter_token_latency_ms: Percentiles::of(gaps),
    })
}

/// Arrival time (seconds from the batch start) of each streamed token of one request.
async fn one_stream(
    mut client: InferenceClient<Channel>,
    request: GenerateRequest,
    start: Instant,
) -> anyhow::Result<Vec<f64>> {
    let mut stream = client
        .generate(with_key(request))
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut times = Vec::new();
    while let Some(msg) = stream.message().await.map_err(rpc_error)? {
        for _ in &msg.token_ids {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
