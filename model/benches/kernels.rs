//! `cargo bench -p moe-model --bench kernels`: GFLOP/s of the expert FFN at DeepSeek-like
//! shapes, the whole ExpertSet on a routed batch, a decode step of the `small` preset, and a
//! sampled draw over DeepSeek-V3's vocabulary.
//!
//! A plain harness (no criterion): each case runs a warm-up, then repeats until it has run for
//! about a second, and reports the median. Output: one line per case, and with `--json` (or
//! `MOE_BENCH_JSON=1`) a JSON line that `docs/bench/compare.py` reads.

use std::time::Instant;

use moe_model::backend::{ops, NativeWeight, PackedMatrix};
use moe_model::checkpoint::{Checkpoint, SafetensorsWriter};
use moe_model::config::ModelConfig;
use moe_model::experts::{ExpertBackend, ExpertSet};
use moe_model::layers::mlp::Mlp;
use moe_model::routes::ExpertRoutes;
use moe_model::sampling::Rng;

/// The same kind of matrix held as bf16 panels (how a bf16 checkpoint's weights are held).
fn random_bf16_matrix(n: usize, k: usize, rng: &mut Rng) -> PackedMatrix {
    let values = random(n * k, rng)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    PackedMatrix::from_native(&[&NativeWeight::Bf16(values)], k)
}

/// The same kind of matrix held as FP8 panels with 128x128 block scales.
fn random_fp8_matrix(n: usize, k: usize, rng: &mut Rng) -> PackedMatrix {
    let values = random(n * k, rng)
        .into_iter()
        .map(|x| moe_model::backend::fp8::f32_to_e4m3(x * 4000.0))
        .collect();
    let scales = vec![1.0 / 4000.0; n.div_ceil(128) * k.div_ceil(128)];
    let fp8 = moe_model::backend::weight::Fp8Matrix::from_blocks(values, n, k, &scales, (128, 128));
    PackedMatrix::from_native(&[&NativeWeight::Fp8(fp8)], k)
}

/// The same kind of matrix as Kimi-K2-Thinking's INT4 experts: integers in [-8, 7], one scale
/// per 32 columns of each row (packed as nibbles).
fn random_int4_matrix(n: usize, k: usize, rng: &mut Rng) -> PackedMatrix {
    let q: Vec<i8> = (0..n * k)
        .map(|_| (rng.next_f64() * 16.0).floor() as i8 - 8)
        .collect();
    let words = moe_model::checkpoint::packed_int4::pack(&q, n, k);
    let values = moe_model::checkpoint::packed_int4::unpack_to_e4m3(&words, n, k);
    let scales = vec![0.006; n * k.div_ceil(32)];
    let int4 = moe_model::backend::weight::Fp8Matrix::from_blocks(values, n, k, &scales, (1, 32));
    PackedMatrix::from_native(&[&NativeWeight::Fp8(int4)], k)
}

fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32 * 0.05)
        .collect()
}

/// Median seconds per call of `f`.
fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut samples = Vec::new();
    let budget = Instant::now();
    while samples.len() < 5 || (budget.elapsed().as_secs_f64() < 1.0 && samples.len() < 1000) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to measure.
        println!("kernels: run with `cargo bench -p moe-model --bench kernels`");
        return;
    }
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let json = std::env::args().any(|a| a == "--json") || std::env::var("MOE_BENCH_JSON").is_ok();
    let wants = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let mut rng = Rng::seeded(1);
    let mut results = Vec::new();
    let (hidden, inter) = (2048, 1408);

    for tokens in [64usize, 1] {
        let name = format!("gemm_{tokens}x{hidden}x{inter}");
        if wants(&name) {
            let w = PackedMatrix::from_rows(&random(inter * hidden, &mut rng), inter, hidden);
            let a = random(tokens * hidden, &mut rng);
            let mut c = vec![0.0f32; tokens * inter];
            let s = time(|| w.matmul_into(&a, tokens, &mut c));
            results.push((name, s, 2.0 * (tokens * hidden * inter) as f64));
        }
        let name = format!("gemm_bf16_{tokens}x{hidden}x{inter}");
        if wants(&name) {
            let w = random_bf16_matrix(inter, hidden, &mut rng);
            let a = random(tokens * hidden, &mut rng);
            let mut c = vec![0.0f32; tokens * inter];
            let s = time(|| w.matmul_into(&a, tokens, &mut c));
            results.push((name, s, 2.0 * (tokens * hidden * inter) as f64));
        }
        let name = format!("expert_ffn_{tokens}x{hidden}x{inter}");
        if wants(&name) {
            let mlp = Mlp::from_weights(
                &random(inter * hidden, &mut rng),
                &random(inter * hidden, &mut rng),
                &random(hidden * inter, &mut rng),
                hidden,
                inter,
            );
            let x = random(tokens * hidden, &mut rng);
            let s = time(|| {
                std::hint::black_box(mlp.forward(&x, tokens));
            });
            results.push((name, s, 2.0 * 3.0 * (tokens * hidden * inter) as f64));
        }
    }

    // The router's dense GEMMs at decode batch sizes (small preset's o_proj shape).
    for tokens in [1usize, 8, 32, 64, 128] {
        let name = format!("gemm_{tokens}x1024x1024");
        if wants(&name) {
            let w = PackedMatrix::from_rows(&random(1024 * 1024, &mut rng), 1024, 1024);
            let a = random(tokens * 1024, &mut rng);
            let mut c = vec![0.0f32; tokens * 1024];
            let s = time(|| w.matmul_into(&a, tokens, &mut c));
            results.push((name, s, 2.0 * (tokens * 1024 * 1024) as f64));
        }
    }

    // A decode step's projections at batch 32 and 8: every weight comes from DRAM (48 distinct
    // 4 MiB matrices, 192 MiB, cycled), so weight streaming and the tile's compute both count.
    for tokens in [8usize, 32] {
        let name = format!("gemm_cold_{tokens}x1024x1024");
        if wants(&name) {
            let weights: Vec<PackedMatrix> = (0..48)
                .map(|_| PackedMatrix::from_rows(&random(1024 * 1024, &mut rng), 1024, 1024))
                .collect();
            let a = random(tokens * 1024, &mut rng);
            let mut c = vec![0.0f32; tokens * 1024];
            let s = time(|| {
                for w in &weights {
                    w.matmul_into(&a, tokens, &mut c);
                }
            });
            results.push((name, s, 48.0 * 2.0 * (tokens * 1024 * 1024) as f64));
        }
    }

    // MLA attention over a 1024-token latent cache (rows of 256 floats, 1 MiB): one decode
    // row's heads scored against every cached row, then the weighted sum of the rows; 16 heads
    // (a batch's task), 8 and 4 (a batch-1 decode's task on 2 and 4 threads, `head_tasks`).
    for heads in [16usize, 8, 4] {
        let name = format!("attention_scores_{heads}x1024x256");
        if wants(&name) {
            let (ctx, width) = (1024usize, 256usize);
            let queries = random(heads * width, &mut rng);
            let cache = random(ctx * width, &mut rng);
            let cache: Vec<&[f32]> = cache.chunks_exact(width).collect();
            let mut scores = vec![0.0f32; heads * ctx];
            let s = time(|| ops::dot_rows_many(&queries, width, &cache, 0, &mut scores));
            results.push((name, s, 2.0 * (heads * ctx * width) as f64));
            let name = format!("attention_values_{heads}x1024x256");
            let mut out = vec![0.0f32; heads * width];
            let s = time(|| ops::weighted_sum_rows_many(&scores, &cache, 0, width, &mut out));
            results.push((name, s, 2.0 * (heads * ctx * width) as f64));
        }
    }

    // Prefill shapes (compute-bound): a 4096-token step's dense projection, and one expert of
    // the small preset over its ~384 routed rows (gate/up, then down).
    for (m, n, k) in [
        (4096usize, 1024usize, 1024usize),
        (384, 256, 1024),
        (384, 1024, 256),
    ] {
        let name = format!("gemm_prefill_{m}x{k}x{n}");
        if wants(&name) {
            let w = PackedMatrix::from_rows(&random(n * k, &mut rng), n, k);
            let a = random(m * k, &mut rng);
            let mut c = vec![0.0f32; m * n];
            let s = time(|| w.matmul_into(&a, m, &mut c));
            results.push((name, s, 2.0 * (m * n * k) as f64));
        }
    }

    // The register tile's ceiling: one thread, A and the panel both in L1.
    let name = "gemm_l1_serial_12x256x16".to_string();
    if wants(&name) {
        let w = PackedMatrix::from_rows(&random(16 * 256, &mut rng), 16, 256);
        let a = random(12 * 256, &mut rng);
        let s = time(|| {
            for _ in 0..100 {
                std::hint::black_box(w.matmul_serial(std::hint::black_box(&a), 12));
            }
        });
        results.push((name, s, 100.0 * 2.0 * (12 * 16 * 256) as f64));
    }

    // Weight streaming from DRAM: a 512 MiB matrix times 1 and 4 rows (memory-bound, far above L3).
    for tokens in [1usize, 4] {
        let name = format!("stream_{tokens}x8192x16384");
        if wants(&name) {
            let (n, k) = (16384usize, 8192usize);
            let w = PackedMatrix::from_rows(&random(n * k, &mut rng), n, k);
            let a = random(tokens * k, &mut rng);
            let mut c = vec![0.0f32; tokens * n];
            let s = time(|| w.matmul_into(&a, tokens, &mut c));
            // Work reported as bytes of weights streamed.
            results.push((name, s, (n * k * 4) as f64));
        }
        let name = format!("stream_bf16_{tokens}x8192x16384");
        if wants(&name) {
            let (n, k) = (16384usize, 8192usize);
            let w = random_bf16_matrix(n, k, &mut rng);
            let a = random(tokens * k, &mut rng);
            let mut c = vec![0.0f32; tokens * n];
            let s = time(|| w.matmul_into(&a, tokens, &mut c));
            results.push((name, s, (n * k * 2) as f64));
        }
    }

    // One row times a 1024x1024 matrix that stays in L2 (1 MiB in FP8), 100 times: what the
    // one-row tile computes when memory does not bind it (on Zen 4, splitting 512-bit
    // operations in two, FP8's widening and scaling make it slower per weight than bf16).
    for (name, fp8) in [("l2_fp8_1x1024x1024", true), ("l2_bf16_1x1024x1024", false)] {
        if wants(name) {
            let (n, k) = (1024usize, 1024usize);
            let w = if fp8 {
                random_fp8_matrix(n, k, &mut rng)
            } else {
                random_bf16_matrix(n, k, &mut rng)
            };
            let a = random(k, &mut rng);
            let mut c = vec![0.0f32; n];
            let s = time(|| {
                for _ in 0..100 {
                    w.matmul_into(&a, 1, &mut c)
                }
            });
            let bytes = if fp8 { n * k } else { n * k * 2 };
            results.push((format!("stream_{name}"), s, (100 * bytes) as f64));
        }
    }

    // Quantized matrices: FP8 with 128x128 block scales (a DeepSeek FP8 checkpoint's layout)
    // and INT4 nibbles with a scale per 32 columns (Kimi-K2-Thinking's experts). Streamed by
    // one and four rows over 8192x16384, and a Kimi-K2 expert's gate projection (7168 -> 2048)
    // over 64 rows, where compute binds. Stream figures count a weight as one byte in both.
    let cases = [("fp8", 1usize), ("fp8", 4), ("int4", 1), ("int4", 4)]
        .map(|(kind, tokens)| (kind, tokens, format!("stream_{kind}_{tokens}x8192x16384")))
        .into_iter()
        .chain(["fp8", "int4"].map(|kind| (kind, 64, format!("gemm_{kind}_64x7168x2048"))));
    for (kind, tokens, name) in cases {
        if wants(&name) {
            let streams = name.starts_with("stream");
            let (n, k) = if streams { (16384, 8192) } else { (2048, 7168) };
            let w = if kind == "fp8" {
                random_fp8_matrix(n, k, &mut rng)
            } else {
                random_int4_matrix(n, k, &mut rng)
            };
            let a = random(tokens * k, &mut rng);
            let mut c = vec![0.0f32; tokens * n];
            let s = time(|| w.matmul_into(&a, tokens, &mut c));
            let work = if streams { n * k } else { 2 * tokens * n * k };
            results.push((name, s, work as f64));
        }
    }

    if wants("expert_set") {
        // DeepSeek small-preset experts (hidden 1024, moe_intermediate 256) on one MoE layer:
        // 256 tokens (a prefill chunk) and 32 tokens (a batch-32 decode step).
        let (h, i, experts, top_k) = (1024usize, 256usize, 64usize, 6usize);
        let dir = std::env::temp_dir().join(format!("moe-bench-experts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": h, "intermediate_size": 4 * h,
            "moe_intermediate_size": i, "num_hidden_layers": 1, "num_attention_heads": 8,
            "num_key_value_heads": 8, "num_experts": experts, "num_experts_per_tok": top_k, "vocab_size": 16
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut writer = SafetensorsWriter::default();
        for e in 0..experts {
            let p = format!("model.layers.0.mlp.experts.{e}");
            writer.add_f32(
                format!("{p}.gate_proj.weight"),
                vec![i, h],
                &random(i * h, &mut rng),
            );
            writer.add_f32(
                format!("{p}.up_proj.weight"),
                vec![i, h],
                &random(i * h, &mut rng),
            );
            writer.add_f32(
                format!("{p}.down_proj.weight"),
                vec![h, i],
                &random(h * i, &mut rng),
            );
        }
        writer.write(&dir.join("model.safetensors")).unwrap();
        let cfg = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let set = ExpertSet::load_all(&ckpt, &cfg).unwrap();
        for tokens in [256usize, 32] {
            let rows = random(tokens * h, &mut rng);
            let mut routes = ExpertRoutes::with_capacity(tokens, tokens * top_k);
            for _ in 0..tokens {
                let mut chosen: Vec<(u32, f32)> = Vec::new();
                while chosen.len() < top_k {
                    let e = (rng.next_u64() % experts as u64) as u32;
                    if !chosen.iter().any(|c| c.0 == e) {
                        chosen.push((e, 1.0 / top_k as f32));
                    }
                }
                routes.push_row(&mut chosen);
            }
            let s = time(|| {
                std::hint::black_box(set.run_experts(0, &rows, &routes).unwrap());
            });
            results.push((
                format!("expert_set_{tokens}tok_64exp_top6"),
                s,
                2.0 * 3.0 * (tokens * top_k * h * i) as f64,
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    if wants("decode_step_small") {
        if let Ok(model) = std::env::var("MOE_BENCH_SMALL") {
            // A checkpoint written by `moe gen-checkpoint --arch deepseek_v3 --preset small`.
            let engine = moe_model::Engine::load(std::path::Path::new(&model)).unwrap();
            let vocab = engine.config().vocab_size as u32;
            // `MOE_BENCH_BATCHES=1` runs one batch size alone (for a profiler).
            let batches: Vec<usize> = std::env::var("MOE_BENCH_BATCHES")
                .ok()
                .map(|v| v.split(',').filter_map(|b| b.trim().parse().ok()).collect())
                .unwrap_or_else(|| vec![1, 32]);
            for batch in batches {
                let mut caches: Vec<_> = (0..batch).map(|_| engine.new_cache()).collect();
                // Each sequence its own prompt and next token, so a batch routes to as many
                // experts as real traffic does (identical rows would all pick the same few).
                let mut pick = Rng::seeded(batch as u64);
                let mut token = || (pick.next_u64() % u64::from(vocab)) as u32;
                for cache in caches.iter_mut() {
                    let prompt: Vec<u32> = (0..16).map(|_| token()).collect();
                    let mut step = [moe_model::dense::StepSequence {
                        cache,
                        tokens: &prompt,
                        all_logits: false,
                    }];
                    engine.step(&mut step).unwrap();
                }
                // Each step feeds the tokens the last one chose (greedy), as decoding does: a
                // token repeated every step would route to the same experts, whose weights then
                // stay in the caches (a batch-1 step ran ~12% faster so).
                let mut next: Vec<[u32; 1]> = (0..batch).map(|_| [token()]).collect();
                let s = time(|| {
                    let mut step: Vec<_> = caches
                        .iter_mut()
                        .zip(&next)
                        .map(|(cache, token)| moe_model::dense::StepSequence {
                            cache,
                            tokens: token,
                            all_logits: false,
                        })
                        .collect();
                    let logits = engine.step(&mut step).unwrap();
                    for (token, row) in next.iter_mut().zip(&logits) {
                        token[0] = ops::argmax(row) as u32;
                    }
                });
                results.push((format!("decode_step_small_batch{batch}"), s, batch as f64));
            }
        } else {
            eprintln!("decode_step_small: set MOE_BENCH_SMALL to a small-preset checkpoint directory to run it");
        }
    }

    // One draw at temperature 1 over DeepSeek-V3's vocabulary: a plain temperature draw (the
    // race), a top-p 0.95 draw (the race among its nucleus) and a top-k 20, top-p 0.8 draw (the
    // ranked top 20), on logits spread over 20 units (a trained model's row) and over 0.1 (a
    // flat row: every token near the lead).
    for (spread, label) in [(20.0f64, "spread"), (0.1, "flat")] {
        let vocab = 129_280;
        let logits: Vec<f32> = (0..vocab)
            .map(|_| ((rng.next_f64() - 0.25) * spread) as f32)
            .collect();
        let params = |top_k, top_p, min_p| moe_model::SamplingParams {
            temperature: 1.0,
            top_k,
            top_p,
            min_p,
            seed: Some(1),
            ..Default::default()
        };
        // A min-p 0.05 draw is a race among the tokens near the lead; `sorted` (top-k = the
        // whole vocabulary) ranks every token, what a ranked draw costs at worst.
        for (kind, top_k, top_p, min_p) in [
            ("race", None, 1.0, 0.0),
            ("top_p", None, 0.95, 0.0),
            ("top_k", Some(20), 0.8, 0.0),
            ("min_p", None, 1.0, 0.05),
            ("sorted", Some(vocab), 1.0, 0.0),
        ] {
            let name = format!("sample_{kind}_{label}_129280");
            if wants(&name) {
                let mut sampler = moe_model::sampling::Sampler::new(params(top_k, top_p, min_p));
                let s = time(|| {
                    std::hint::black_box(sampler.sample(&logits));
                });
                results.push((name, s, 1.0));
            }
        }
    }

    for (name, secs, work) in &results {
        if name.starts_with("sample") {
            println!("{name:<34} {:>9.3} ms per draw", secs * 1e3);
        } else if name.starts_with("stream") {
            println!(
                "{name:<34} {:>9.3} ms {:>9.1} GB/s of weights",
                secs * 1e3,
                work / secs / 1e9
            );
        } else if name.starts_with("decode_step") {
            println!(
                "{name:<34} {:>9.3} ms/step {:>9.1} tok/s",
                secs * 1e3,
                work / secs
            );
        } else {
            println!(
                "{name:<34} {:>9.3} ms {:>9.1} GFLOP/s",
                secs * 1e3,
                work / secs / 1e9
            );
        }
    }
    if json {
        let items: Vec<serde_json::Value> = results
            .iter()
            .map(|(name, secs, work)| serde_json::json!({"name": name, "seconds": secs, "work": work}))
            .collect();
        println!("{}", serde_json::Value::Array(items));
    }
}
