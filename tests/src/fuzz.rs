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

/// The first MoE layer's experts of the Qwen3 fixture (real math for the collective target).
fn collective_experts() -> &'static (moe_model::experts::ExpertSet, ModelConfig, usize) {
    static EXPERTS: OnceLock<(moe_model::experts::ExpertSet, ModelConfig, usize)> = OnceLock::new();
    EXPERTS.get_or_init(|| {
        let dir = crate::fixture_dir("qwen3-moe-tiny");
        let config = ModelConfig::from_dir(&dir).expect("fixture config");
        let ckpt = moe_model::checkpoint::Checkpoint::open(&dir).expect("fixture checkpoint");
        let layer = config.moe_layer_indices().next().expect("a MoE layer");
        let set = moe_model::experts::ExpertSet::load(
            &ckpt,
            &config,
            (0..config.moe.num_experts).map(|e| (layer, e)),
        )
        .expect("fixture experts");
        (set, config, layer)
    })
}

/// A node's side of one collective layer fed arbitrary frames "from the router": the header,
/// rows and routes come from the bytes, mostly with the lengths the header announces and a
/// well-formed CSR (so the checks after the length checks are reached too), sometimes raw.
/// Whatever arrives, the node must answer or refuse with an error, never panic.
pub fn collective_layer(data: &[u8]) {
    use std::time::Duration;

    use moe_cluster::collective::communicator::{fake, Communicator, Pending};
    use moe_cluster::collective::exchange::{serve_layer, LayerHeader, HEADER_BYTES};
    use moe_cluster::collective::PeerCounts;

    let _ = LayerHeader::decode(data, 64);
    let (set, config, layer) = collective_experts();
    let hidden = config.hidden_size;
    let experts = config.moe.num_experts as u32;
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let noise = |i: usize| data.get(i % data.len().max(1)).copied().unwrap_or(0);
    let rows = u32::from(byte(0) % 5);
    let pairs = if rows == 0 {
        0
    } else {
        rows + u32::from(byte(1) % 4)
    };
    let exact = byte(2) % 8 != 0;
    let layer_id = if byte(3) % 4 == 0 {
        u32::from(byte(3))
    } else {
        *layer as u32
    };
    let mut header = LayerHeader::new(layer_id, PeerCounts { rows, pairs }, None)
        .encode()
        .to_vec();
    if byte(4) % 8 == 0 {
        header = data.iter().copied().cycle().take(HEADER_BYTES).collect();
    }
    let mut row_bytes: Vec<u8> = (0..rows as usize * hidden * 4)
        .map(|i| noise(i + 7))
        .collect();
    let mut routes: Vec<u8> = Vec::new();
    if byte(5) % 2 == 0 {
        // A well-formed CSR: every row gets at least one pair.
        let mut offsets = vec![0u32];
        let extra = pairs - rows;
        for r in 0..rows {
            let add = 1 + u32::from(r == 0) * extra;
            offsets.push(offsets[r as usize] + add);
        }
        routes.extend(offsets.iter().flat_map(|o| o.to_le_bytes()));
        for p in 0..pairs as usize {
            let e = u32::from(noise(p + 11)) % (experts + 1);
            routes.extend(e.to_le_bytes());
        }
        for p in 0..pairs as usize {
            routes.extend((f32::from(noise(p + 13)) / 64.0).to_le_bytes());
        }
    } else {
        routes = (0..4 * (rows as usize + 1) + 8 * pairs as usize)
            .map(|i| noise(i + 3))
            .collect();
    }
    if !exact {
        let cut = usize::from(byte(6));
        row_bytes.truncate(row_bytes.len().saturating_sub(cut));
        routes.extend(std::iter::repeat_n(0u8, cut % 9));
    }
    let (mut comms, _) = fake::group(2);
    let mut node = comms.pop().expect("two ranks");
    let mut router = comms.pop().expect("two ranks");
    let sent = router.post(Pending {
        sends: vec![(1, header), (1, row_bytes), (1, routes)],
        recvs: vec![],
    });
    assert!(sent.is_ok());
    let served = serve_layer(
        &mut node,
        set,
        hidden,
        64,
        || false,
        |_| tracing::Span::none(),
        Duration::from_millis(20),
    );
    if let Ok(moe_cluster::collective::exchange::Served::Ran { pairs, .. }) = served {
        // What the node ran, it answered: one row per pair, then the compute time.
        let answer = router.post(Pending {
            sends: vec![],
            recvs: vec![(1, pairs as usize * hidden * 4), (1, 8)],
        });
        assert!(answer.is_ok());
        assert!(matches!(router.poll(), Ok(Some(_))));
    }
}
