//! The fuzzed entry points, shared by the cargo-fuzz targets (`fuzz/`, nightly) and the stable
//! replay test (`tests/fuzz_corpus.rs`, in CI): each takes arbitrary bytes and must return
//! without panicking, whatever they hold.

use std::sync::OnceLock;

use bytes::Bytes;
use moe_cluster::frames::{self, DispatchTag};
use moe_model::chat_template::ChatTemplate;
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;
use moe_openai::reasoning::ReasoningParser;
use moe_openai::tool_calls::ToolCallFormat;
use moe_openai::{parse_chat, parse_chat_body, parse_completion, render_chat};
use moe_proto::v1::{CombineBatch, DispatchBatch};
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
    /// Qwen3's real chat template (tools through `tojson`, reasoning, `enable_thinking`).
    qwen3: ChatTemplate,
    /// Stored responses `resp_1` and `resp_2` (which follows it), for `previous_response_id`.
    responses: moe_openai::response_store::ResponseStore,
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
        let qwen3 = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/templates/hub/qwen3.jinja"),
        )
        .expect("Qwen3's template");
        let responses = moe_openai::response_store::ResponseStore::new(1 << 20);
        let answer = |id: &str| {
            serde_json::json!({"id": id, "output": [
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
            ]})
        };
        let asked = || vec![serde_json::json!({"type": "message", "role": "user", "content": "q"})];
        responses.put(None, asked(), answer("resp_1"));
        responses.put(Some("resp_1".into()), asked(), answer("resp_2"));
        HttpFixture {
            responses,
            config: ModelConfig::from_dir(&dir).expect("fixture config"),
            tokenizer,
            template,
            qwen3: ChatTemplate::new(&qwen3, None, Some("<|im_end|>")).expect("Qwen3's template"),
        }
    })
}

/// An HTTP request body for `/v1/completions`, `/v1/chat/completions`, `/tokenize` and
/// `/detokenize`, through parsing, the chat template, tokenization and validation.
pub fn http_request(data: &[u8]) {
    let f = http_fixture();
    let limits = RequestLimits::default();
    // Also through Qwen3's real template with a reasoning parser: tools written by `tojson`,
    // the template's fields, reasoning and the grammar's start after it.
    let render_qwen3 = |chat| {
        render_chat(
            chat,
            Some(&f.qwen3),
            &f.tokenizer,
            f.config.max_position_embeddings,
            None,
            ToolCallFormat::Hermes,
            Some(ReasoningParser::Qwen3),
        )
    };
    let qwen3 = parse_chat_body(data, "m", true).and_then(render_qwen3);
    // And read as a Responses body, through the chat request it means.
    let response = moe_openai::responses::chat_body_of(data, "m", Some(&f.responses))
        .and_then(|(chat, _)| parse_chat_body(&chat, "m", true))
        .and_then(render_qwen3);
    let parsed = [
        parse_completion(data, "m"),
        parse_chat(
            data,
            "m",
            f.template.as_ref(),
            &f.tokenizer,
            f.config.max_position_embeddings,
        ),
        qwen3,
        response,
    ];
    for p in parsed.into_iter().flatten() {
        let _ = validate(p.generate, &f.config, &f.tokenizer, &limits);
    }
    // The same body to vLLM's `/tokenize` and `/detokenize`.
    let max_model_len = f.config.max_position_embeddings;
    if let Ok(request) = moe_openai::tokenization::parse_tokenize(data, "m", true) {
        let _ = request.tokenize(
            &f.tokenizer,
            Some(&f.qwen3),
            ToolCallFormat::Hermes,
            max_model_len,
        );
    }
    let vocab = f.tokenizer.vocab_size();
    if let Ok(request) = moe_openai::tokenization::parse_detokenize(data, "m", vocab, max_model_len)
    {
        let _ = request.detokenize(&f.tokenizer);
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
    // Sometimes bf16 rows, which these experts (reading f32) must refuse.
    let encoding = if byte(7) % 4 == 0 {
        moe_cluster::collective::RowEncoding::Bf16
    } else {
        moe_cluster::collective::RowEncoding::F32
    };
    let mut header = LayerHeader::new(layer_id, PeerCounts { rows, pairs }, encoding, None)
        .encode()
        .to_vec();
    if byte(4) % 8 == 0 {
        header = data.iter().copied().cycle().take(HEADER_BYTES).collect();
    }
    let mut row_bytes: Vec<u8> = (0..rows as usize * hidden * encoding.elem_bytes())
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
        &moe_cluster::dispatch_rules::DispatchRules::for_model(config, 64),
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

/// A collective socket's bytes from a hostile peer, through the TCP frame reader, with a
/// small bound taken from the first two bytes: no frame above the bound ever comes out, a
/// refused length costs exactly its 8-byte prefix, and nothing panics.
pub fn collective_frames(data: &[u8]) {
    use moe_cluster::collective::tcp::{read_frame, FrameReadError};

    let max = u64::from(u16::from_le_bytes([
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    ]));
    let mut stream = data.get(2..).unwrap_or(&[]);
    loop {
        let before = stream.len();
        match read_frame(&mut stream, max) {
            Ok(frame) => {
                assert!(frame.len() as u64 <= max, "{} > {max}", frame.len());
                assert_eq!(before - stream.len(), 8 + frame.len());
            }
            Err(FrameReadError::TooLarge { len, max: bound }) => {
                assert!(len > max && bound == max, "{len} refused under {bound}");
                assert_eq!(before - stream.len(), 8, "read past a refused prefix");
                break;
            }
            Err(_) => break,
        }
    }
}

/// The node-side validator ([`moe_cluster::dispatch_rules`]) on a dispatch whose header,
/// routes and weights come from the bytes, against fixed rules: hidden 4, at most 6 rows,
/// top-k 3, MoE layers 1 and 2, and this node holding the even experts of layer 1 and experts
/// 0..4 of layer 2. Whatever the bytes, the validator returns; whatever it accepts keeps every
/// invariant, checked here independently on the decoded batch.
pub fn node_dispatch(data: &[u8]) {
    let _ = node_dispatch_accepts(data);
}

/// [`node_dispatch`], saying whether the validator accepted the batch.
pub fn node_dispatch_accepts(data: &[u8]) -> bool {
    use moe_cluster::dispatch_rules::DispatchRules;

    const HIDDEN: usize = 4;
    const MAX_ROWS: usize = 6;
    const TOP_K: usize = 3;
    let rules = DispatchRules::new(HIDDEN, MAX_ROWS, TOP_K, [1, 2]);
    let holds = |layer: usize, expert: usize| match layer {
        1 => expert.is_multiple_of(2) && expert < 16,
        2 => expert < 4,
        _ => false,
    };
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u32::from_le_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
    // Header: rows, layer, hidden; mostly plausible, sometimes anything.
    let rows = if byte(0) % 8 == 0 {
        word(1) as usize % 4096
    } else {
        usize::from(byte(1) % 8)
    };
    let layer = if byte(2) % 8 == 0 {
        word(3)
    } else {
        u32::from(byte(3) % 4)
    };
    let hidden = if byte(4) % 16 == 0 {
        usize::from(byte(5))
    } else {
        HIDDEN
    };
    // Routes: per row a pair count and that many (expert, weight), from the rest of the bytes.
    let mut offsets = vec![0u32];
    let mut experts = Vec::new();
    let mut weights = Vec::new();
    let mut at = 8;
    for _ in 0..rows.min(64) {
        let count = usize::from(byte(at) % 6);
        at += 1;
        for _ in 0..count {
            experts.push(u32::from(byte(at) % 20));
            weights.push(match byte(at + 1) {
                255 => f32::NAN,
                254 => f32::INFINITY,
                w => f32::from(w) / 64.0,
            });
            at += 2;
        }
        offsets.push(experts.len() as u32);
    }
    let le = |v: &[u32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut batch = DispatchBatch {
        epoch: 1,
        step: 0,
        layer,
        micro_batch: 0,
        hidden: hidden as u32,
        rows: rows as u32,
        hidden_states: Bytes::from(vec![0u8; rows.min(64) * hidden * 4]),
        pair_offsets: Bytes::from(le(&offsets)),
        pair_experts: Bytes::from(le(&experts)),
        pair_weights: Bytes::from(
            weights
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect::<Vec<u8>>(),
        ),
        traceparent: String::new(),
    };
    if byte(6) % 8 == 0 {
        // Raw payloads: lengths and contents straight from the bytes.
        let [a, b, c, _] = split4(data);
        batch.pair_offsets = Bytes::copy_from_slice(a);
        batch.pair_experts = Bytes::copy_from_slice(b);
        batch.pair_weights = Bytes::copy_from_slice(c);
    }
    let checked = match rules.check_frame(&batch) {
        Ok(c) => c,
        Err(_) => return false,
    };
    if checked.check_experts(&rules, holds).is_err() {
        return false;
    }
    let d = checked.decode();
    assert_eq!(d.hidden, HIDDEN);
    assert!(d.routes.rows() <= MAX_ROWS);
    assert_eq!(d.rows.len(), d.routes.rows() * HIDDEN);
    assert!(rules
        .check_counts(layer, d.routes.rows(), d.routes.pairs())
        .is_ok());
    assert_eq!(d.routes.offsets.first(), Some(&0));
    assert_eq!(
        d.routes.offsets.last().copied(),
        Some(d.routes.pairs() as u32)
    );
    for r in 0..d.routes.rows() {
        let pairs = d.routes.row_pairs(r);
        assert!((1..=TOP_K).contains(&pairs.len()), "row {r}: {pairs:?}");
        let mut seen = Vec::new();
        for p in pairs {
            let e = d.routes.experts[p];
            assert!(!seen.contains(&e), "row {r} repeats expert {e}");
            seen.push(e);
            assert!(holds(layer as usize, e as usize), "expert {e} not held");
            assert!(d.routes.weights[p].is_finite());
        }
    }
    true
}

/// The structured-output compiler over the fixture's vocabulary (built once).
fn grammar_compiler() -> &'static moe_router::structured::GrammarCompiler {
    static COMPILER: OnceLock<moe_router::structured::GrammarCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| {
        let path = crate::fixture_dir("deepseek-v3-tiny").join("tokenizer.json");
        let text = std::fs::read_to_string(path).expect("fixture tokenizer.json");
        let json = serde_json::from_str(&text).expect("fixture tokenizer.json is JSON");
        moe_router::structured::GrammarCompiler::from_tokenizer_json(&json, 1)
            .expect("fixture vocabulary")
    })
}

/// A request's grammar (the first byte picks a JSON schema, a regex, a Lark grammar or a
/// choice among the lines; the rest is its text) compiled as a request's is, on a stack of
/// the router's size, then walked a few tokens over a vocabulary padded past the
/// tokenizer's, with an id it does not have tried at each step. A panic anywhere is a crash
/// (the router would answer it as an internal error; the fuzzer wants to see it).
pub fn structured_output(data: &[u8]) {
    use moe_proto::v1::structured_output::Kind;
    use moe_proto::v1::{ChoiceList, StructuredOutput};

    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let kind = match selector % 4 {
        0 => Kind::JsonSchema(text),
        1 => Kind::Regex(text),
        2 => Kind::Grammar(text),
        _ => Kind::Choice(ChoiceList {
            choices: text.lines().map(String::from).collect(),
        }),
    };
    let spec = StructuredOutput { kind: Some(kind) };
    let compiler = grammar_compiler();
    let walked = std::thread::Builder::new()
        .stack_size(moe_router::structured::COMPILE_STACK_BYTES)
        .spawn(move || {
            let Ok(mut constraint) = compiler.compile(&spec) else {
                return;
            };
            let known = compiler.tokenizer_vocab();
            let vocab = known + 40;
            for _ in 0..8 {
                let Ok(allowed) = constraint.allowed(vocab) else {
                    return;
                };
                assert_eq!(allowed.len(), vocab);
                assert!(!allowed[known..].iter().any(|&a| a), "a padding id allowed");
                assert!(constraint.consume((known + 1) as u32).is_err());
                let Some(token) = allowed.iter().position(|&a| a) else {
                    return;
                };
                if constraint.consume(token as u32).is_err() || constraint.is_finished() {
                    return;
                }
            }
        })
        .expect("a thread for the compiler")
        .join();
    if let Err(panic) = walked {
        std::panic::resume_unwind(panic);
    }
}

/// A model's answer (the first byte picks the tool-call syntax, the rest is the text) read for
/// tool calls as a chat answer is: whole, and at prefixes as a stream reads it. A panic is a
/// crash; so is a Qwen3-Coder, GLM or MiniMax-M2 stream whose arguments are not a prefix of
/// the whole answer's (its fragments would not add up).
pub fn tool_call_text(data: &[u8]) {
    use moe_openai::tool_calls::{partial_calls, FunctionSpec, ToolCallFormat};

    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = [
        ToolCallFormat::Hermes,
        ToolCallFormat::DeepSeekV3,
        ToolCallFormat::DeepSeekV31,
        ToolCallFormat::Qwen3Coder,
        ToolCallFormat::Glm45,
        ToolCallFormat::Glm47,
        ToolCallFormat::MinimaxM2,
        ToolCallFormat::KimiK2,
    ][usize::from(selector) % 8];
    let text = String::from_utf8_lossy(rest);
    let functions = [FunctionSpec {
        name: "f".into(),
        description: None,
        parameters: Some(serde_json::json!({"type": "object", "properties": {
            "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"},
            "b": {"type": "boolean"}, "o": {"type": "object"}, "a": {"type": ["array", "null"]},
        }})),
    }];
    let whole = format.parse(&text, &functions);
    let ends: Vec<usize> = (0..=text.len())
        .filter(|&e| text.is_char_boundary(e))
        .step_by(text.len() / 64 + 1)
        .chain([text.len()])
        .collect();
    for end in ends {
        let calls = partial_calls(format, &text[..end], &functions);
        let tagged = [
            ToolCallFormat::Qwen3Coder,
            ToolCallFormat::Glm45,
            ToolCallFormat::Glm47,
            ToolCallFormat::MinimaxM2,
        ];
        if !tagged.contains(&format) {
            continue;
        }
        let Some((_, whole)) = &whole else {
            continue;
        };
        for (call, done) in calls.iter().zip(whole) {
            assert!(
                done.arguments.starts_with(&call.arguments),
                "{:?} then {:?}",
                call.arguments,
                done.arguments
            );
        }
    }
}

/// A prompt through Kimi-K2's tokenizer (tiktoken ranks, `tests/fixtures/kimi-k2-tiny`): any
/// text encodes without panicking, every id is in the vocabulary, and the ids decode back to
/// the text (special tokens included) whatever regex pieces, special tokens or long runs it
/// holds.
pub fn tiktoken_text(data: &[u8]) {
    static KIMI: OnceLock<Tokenizer> = OnceLock::new();
    let tokenizer = KIMI.get_or_init(|| {
        Tokenizer::from_dir(&crate::fixture_dir(crate::KIMI_FIXTURE)).expect("Kimi's tokenizer")
    });
    let text = String::from_utf8_lossy(data);
    let ids = tokenizer.encode_raw(&text).expect("any text encodes");
    let vocab = tokenizer.vocab_size() as u32;
    assert!(ids.iter().all(|&id| id < vocab), "{ids:?}");
    let back = tokenizer.decode_with_special(&ids).expect("ids decode");
    assert_eq!(back, text, "{ids:?}");
}
