//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and a bounded batch of random inputs
//! through the fuzzed entry points on stable Rust, so CI keeps what `cargo fuzz` found fixed.

use std::path::PathBuf;

use moe_model::sampling::Rng;
use moe_tests::fuzz;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus")).join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Random inputs: mutations of the corpus (bytes flipped, cut, repeated) and pure noise.
fn mutations(seeds: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::seeded(7);
    (0..n)
        .map(|i| {
            let mut bytes = if i % 4 == 0 {
                (0..rng.next_u64() % 256)
                    .map(|_| rng.next_u64() as u8)
                    .collect()
            } else {
                seeds[i % seeds.len()].clone()
            };
            for _ in 0..1 + rng.next_u64() % 4 {
                if bytes.is_empty() {
                    break;
                }
                let at = (rng.next_u64() % bytes.len() as u64) as usize;
                match rng.next_u64() % 3 {
                    0 => bytes[at] ^= 1 << (rng.next_u64() % 8),
                    1 => bytes.truncate(at),
                    _ => {
                        let tail = bytes[at..].to_vec();
                        bytes.extend(tail);
                    }
                }
            }
            bytes
        })
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    let seeds = corpus(target);
    for input in seeds.iter().chain(mutations(&seeds, 3000).iter()) {
        run(input);
    }
}

#[test]
fn dispatch_frames_never_panic() {
    replay("dispatch_frame", fuzz::dispatch_frame);
}

#[test]
fn safetensors_headers_never_panic() {
    replay("safetensors_header", fuzz::safetensors_header);
}

#[test]
fn http_requests_never_panic() {
    replay("http_request", fuzz::http_request);
}

#[test]
fn collective_frames_never_panic() {
    replay("collective_layer", fuzz::collective_layer);
}

#[test]
fn structured_outputs_never_panic() {
    replay("structured_output", fuzz::structured_output);
}

#[test]
fn tool_call_text_never_panics_and_qwen3_coder_streams_add_up() {
    replay("tool_call_text", fuzz::tool_call_text);
}

#[test]
fn kimi_prompts_encode_and_decode_back() {
    replay("tiktoken_text", fuzz::tiktoken_text);
}

#[test]
fn collective_frame_streams_never_panic() {
    replay("collective_frames", fuzz::collective_frames);
}

#[test]
fn node_dispatch_validator_keeps_its_invariants() {
    replay("node_dispatch", fuzz::node_dispatch);
    // The seeds reach both sides: the valid one is accepted (so the invariants are checked),
    // each abuse refused.
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/corpus/node_dispatch"
    ));
    let seed = |name: &str| std::fs::read(dir.join(name)).unwrap();
    assert!(fuzz::node_dispatch_accepts(&seed("valid_two_rows")));
    for abuse in [
        "duplicate",
        "too_many_pairs",
        "nan_weight",
        "not_held",
        "dense_layer",
        "over_bound",
        "huge_rows",
    ] {
        assert!(
            !fuzz::node_dispatch_accepts(&seed(abuse)),
            "{abuse} was accepted"
        );
    }
}
