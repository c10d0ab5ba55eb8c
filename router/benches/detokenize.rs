//! Streaming text per output token: the incremental detokenizer and tail-only stop search
//! against the whole-output re-decode and search it replaced (kept here only, to show its
//! quadratic cost). Each reported `time` is per output token (a stream's time divided by its
//! length), at 100 and 4,000 tokens, with the deepseek-v3-tiny fixture's tokenizer.
//!
//! `cargo bench -p moe-router --bench detokenize`

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use moe_model::tokenizer::Tokenizer;
use moe_router::detokenize::IncrementalText;

const LENGTHS: [usize; 2] = [100, 4000];

fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek-v3-tiny");
    Tokenizer::from_dir(&dir).expect("the fixture's tokenizer loads")
}

/// A plausible output: prose with some multi-byte characters, split into byte tokens.
fn output(tok: &Tokenizer, n: usize) -> Vec<u32> {
    let para = "The router streams each token's text as soon as it is final. Mixture-of-experts \
                layers dispatch tokens to expert nodes; naïve re-decoding costs O(n²) — 딥러닝 \
                and 🦀 included.\n\n";
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tok.encode_raw(para).expect("the text encodes"));
    }
    ids.truncate(n);
    ids
}

fn stops() -> Vec<String> {
    vec!["<|im_end|>".into(), "\n\nUser:".into()]
}

/// The scheduler's per-token work now: decode the new token in its window, search the tail.
fn incremental(tok: &Tokenizer, ids: &[u32], stops: &[String]) -> usize {
    let mut text = IncrementalText::default();
    let mut sent = 0;
    for n in 1..=ids.len() {
        text.update(tok, &ids[..n]);
        let (piece, stopped) = text.next_piece(stops, n == ids.len(), false);
        sent += piece.len();
        assert!(!stopped);
    }
    sent
}

/// The old per-token work: decode the whole output, search all of it.
fn re_decoding(tok: &Tokenizer, ids: &[u32], stops: &[String]) -> usize {
    let mut emitted = 0;
    for n in 1..=ids.len() {
        let text = tok.decode(&ids[..n]).unwrap_or_default();
        assert!(stops.iter().all(|s| !text.contains(s.as_str())));
        let end = if n == ids.len() {
            text.len()
        } else if text.ends_with('\u{FFFD}') {
            emitted
        } else {
            let hold = stops.iter().map(String::len).max().unwrap_or(1) - 1;
            let mut end = text.len().saturating_sub(hold);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            end
        };
        emitted = emitted.max(end);
    }
    emitted
}

/// Times whole streams and reports the time per output token.
fn per_token(
    iters: u64,
    n: usize,
    f: impl Fn(&Tokenizer, &[u32], &[String]) -> usize,
    tok: &Tokenizer,
    ids: &[u32],
    stops: &[String],
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        black_box(f(tok, black_box(ids), stops));
    }
    start.elapsed() / n as u32
}

fn bench(c: &mut Criterion) {
    let tok = tokenizer();
    let stops = stops();
    let mut group = c.benchmark_group("streaming text per token");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(12));
    for n in LENGTHS {
        let ids = output(&tok, n);
        assert_eq!(
            incremental(&tok, &ids, &stops),
            tok.decode(&ids).unwrap().len()
        );
        group.bench_function(BenchmarkId::new("incremental", n), |b| {
            b.iter_custom(|iters| per_token(iters, n, incremental, &tok, &ids, &stops))
        });
        group.bench_function(BenchmarkId::new("re-decode (old)", n), |b| {
            b.iter_custom(|iters| per_token(iters, n, re_decoding, &tok, &ids, &stops))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
