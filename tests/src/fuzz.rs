//! The fuzzed entry points, shared by the cargo-fuzz targets (`fuzz/`, nightly) and the stable
//! replay test (`tests/fuzz_corpus.rs`, in CI): each takes arbitrary bytes and must return
//! without panicking, whatever they hold.

use std::sync::OnceLock;

use bytes::Bytes;
use moe_cluster::frames::{self, DispatchTag};
use moe_model::chat_template::ChatTemplate;
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_proto::v1::{CombineBatch, DispatchBatch};
use moe_router::http::{parse_chat, parse_completion};
use moe_router::validation::{validate, RequestLimits};
use prost::Message;

/// Splits `data` into four slices at offsets taken from its first bytes.
fn split4(data: &[u8]) -> [&[u8]; 4] {
    let mut cut = [0usize; 3];
    for (i, c) in cut.iter_mut().enumerate() {
        *c = data.get(i).copied().unwrap_or(0) as usize * data.len() / 256;
    }
    cut.sort_unstable();
    let body = data;
    [
        &body[..cut[0]],
        &body[cut[0]..cut[1]],
        &body[cut[1]..cut[2]],
        &body[cut[2]..],
    ]
}

/// A data-plane frame: as protobuf bytes, and as a structured batch whose header and payloads
/// come from the bytes (so the length checks see every combination).
pub fn dispatch_frame(data: &[u8]) {
    if let Ok(batch) = DispatchBatch::decode(data) {
        let _ = frames::decode_dispatch(&batch, 1 << 12);
    }
    if let Ok(combine) = CombineBatch::decode(data) {
        let tag = DispatchTag {
            epoch: combine.epoch,
            step: combine.step,
            layer: combine.layer,
            micro_batch: combine.micro_batch,
        };
        let _ = frames::decode_combine(&combine, tag, combine.pairs as usize, 8);
    }
    let header = |i: usize| data.get(i).copied().unwrap_or(0) as u32;
    let [states, offsets, experts, weights] = split4(data.get(5..).unwrap_or(&[]));
    let batch = DispatchBatch {
        epoch: 1,
        step: 1,
        layer: header(3),
        micro_batch: 0,
        hidden: header(3) % 9,
        rows: header(4) % 17,
        hidden_states: Bytes::copy_from_slice(states),
        pair_offsets: Bytes::copy_from_slice(offsets),
        pair_experts: Bytes::copy_from_slice(experts),
        pair_weights: Bytes::copy_from_slice(weights),
        traceparent: String::new(),
    };
    if let Ok(decoded) = frames::decode_dispatch(&batch, 8) {
        // What passed validation must be consistent.
        assert_eq!(decoded.rows.len(), decoded.routes.rows() * decoded.hidden);
    }
}

/// A safetensors file's bytes.
pub fn safetensors_header(data: &[u8]) {
    let _ = moe_model::checkpoint::safetensors::parse_header(data);
}

struct HttpFixture {
    tokenizer: Tokenizer,
    config: ModelConfig,
    template: Option<ChatTemplate>,
}

fn http_fixture() -> &'static HttpFixture {
    static FIXTURE: OnceLock<HttpFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = crate::fixture_dir("deepseek-v3-tiny");
        let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
        let template = tokenizer.chat_template().map(|t| {
            ChatTemplate::new(
                t,
                tokenizer.bos_token().as_deref(),
                tokenizer.eos_token().as_deref(),
            )
            .expect("fixture template")
        });
        HttpFixture {
            config: ModelConfig::from_dir(&dir).expect("fixture config"),
            tokenizer,
            template,
        }
    })
}

/// An HTTP request body for `/v1/completions` and `/v1/chat/completions`, through parsing,
/// the chat template, tokenization and validation.
pub fn http_request(data: &[u8]) {
    let f = http_fixture();
    let limits = RequestLimits::default();
    let parsed = [
        parse_completion(data, "m"),
        parse_chat(
            data,
            "m",
            f.template.as_ref(),
            &f.tokenizer,
            f.config.max_position_embeddings,
        ),
    ];
    for p in parsed.into_iter().flatten() {
        let _ = validate(p.generate, &f.config, &f.tokenizer, &limits);
    }
}
