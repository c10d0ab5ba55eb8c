//! The router's public API with real clients: Python grpcio and the standard health checker,
//! every bad input with its status code, queue limits, disconnects, streaming text, and what
//! crosses the data plane.

use std::time::{Duration, Instant};

use moe_model::Engine;
use moe_proto::v1::GenerateRequest;
use moe_tests::harness::{self, generate, metric_value, python_grpc_client, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES};
use moe_tooling::{greedy, LocalCluster};
use tonic::Code;

/// A cluster of one node on `fixture`, serving, and a client of its router (keep the cluster
/// alive while the client is used).
async fn one_node(
    fixture: &str,
) -> (
    LocalCluster,
    moe_proto::v1::inference_client::InferenceClient<tonic::transport::Channel>,
) {
    let cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), 1)).unwrap();
    wait_serving(&cluster, 1).await;
    let client = harness::inference(&cluster).await;
    (cluster, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_and_health_checks() {
    let fixture = FIXTURES[0];
    let mut cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), 0)).unwrap();
    // No expert node yet: no placement, so not serving.
    let health = python_grpc_client(&["health", &cluster.router_addr]);
    assert_eq!(health["overall"], "NOT_SERVING");
    assert_eq!(health["inference"], "NOT_SERVING");
    cluster.add_node().unwrap();
    wait_serving(&cluster, 1).await;
    let health = python_grpc_client(&["health", &cluster.router_addr]);
    assert_eq!(health["overall"], "SERVING");
    assert_eq!(health["inference"], "SERVING");

    let case = &golden_cases(fixture)[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let spec = serde_json::json!({"prompt": case.prompt, "max_new_tokens": 24});
    let got = python_grpc_client(&["generate", &cluster.router_addr, &spec.to_string()]);
    let ids: Vec<u32> = got["output_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let offline = engine
        .generate(&moe_model::GenerateRequest {
            input_ids: case.input_ids.clone(),
            max_new_tokens: 24,
            sampling: Default::default(),
            ignore_eos: true,
            emit_logits: false,
        })
        .unwrap();
    assert_eq!(ids, offline.output_ids);
    let logprobs: Vec<f32> = got["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (a, b) in logprobs.iter().zip(&offline.logprobs) {
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
    assert_eq!(got["finish_reason"], "length");
    assert_eq!(got["usage"], serde_json::json!([case.input_ids.len(), 24]));
    assert_eq!(got["model_type"], "deepseek_v3");
}

fn request() -> GenerateRequest {
    greedy(&[0, 5, 7, 9], 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_statuses_and_cost_nothing() {
    let cluster = LocalCluster::start(harness::spec(fixture_dir(FIXTURES[1]), 1)).unwrap();
    wait_serving(&cluster, 1).await;
    let mut client = harness::inference(&cluster).await;
    let cases: Vec<(&str, GenerateRequest, &str)> = vec![
        (
            "empty prompt",
            GenerateRequest {
                prompt: Some(String::new()),
                input_ids: vec![],
                ..request()
            },
            "empty",
        ),
        (
            "both",
            GenerateRequest {
                prompt: Some("hi".into()),
                ..request()
            },
            "not both",
        ),
        (
            "neither",
            GenerateRequest {
                input_ids: vec![],
                ..request()
            },
            "exactly one",
        ),
        (
            "token id",
            GenerateRequest {
                input_ids: vec![0, 512],
                ..request()
            },
            "512",
        ),
        (
            "zero tokens",
            GenerateRequest {
                max_new_tokens: 0,
                ..request()
            },
            "max_new_tokens",
        ),
        (
            "too long",
            GenerateRequest {
                max_new_tokens: 1021,
                ..request()
            },
            "maximum context length",
        ),
        (
            "temperature",
            GenerateRequest {
                temperature: Some(-0.5),
                ..request()
            },
            "temperature",
        ),
        (
            "top_p zero",
            GenerateRequest {
                top_p: Some(0.0),
                ..request()
            },
            "top_p",
        ),
        (
            "top_p above one",
            GenerateRequest {
                top_p: Some(1.5),
                ..request()
            },
            "top_p",
        ),
    ];
    for (name, req, needle) in cases {
        let err = generate(&mut client, req).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{name}: {:?} should mention {needle:?}",
            err.message()
        );
    }
    // The server still answers normally.
    let ok = generate(&mut client, request()).await.unwrap();
    assert_eq!(ok.ids.len(), 4);
    let status = harness::settled_status(&cluster.router_addr).await;
    assert_eq!(status.kv_blocks_used, status.kv_blocks_cached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored() {
    use prost::Message;
    let cluster = LocalCluster::start(harness::spec(fixture_dir(FIXTURES[1]), 1)).unwrap();
    wait_serving(&cluster, 1).await;
    // A newer client's request: an extra field 99 the router does not know.
    let mut bytes = request().encode_to_vec();
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint 1
    let decoded = GenerateRequest::decode(bytes.as_slice()).unwrap();
    let mut client = harness::inference(&cluster).await;
    assert_eq!(generate(&mut client, decoded).await.unwrap().ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_resource_exhausted() {
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args
        .extend(["--max-running", "1", "--max-waiting", "1"].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = harness::inference(&cluster).await;
        tasks.push(tokio::spawn(async move {
            generate(&mut client, greedy(&[0, 5, 7], 200)).await
        }));
    }
    let mut exhausted = 0;
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.ids.len(), 200);
                served += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                exhausted += 1;
            }
        }
    }
    assert!(
        exhausted > 0,
        "8 requests against 1 running + 1 waiting must refuse some"
    );
    assert!(served > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_slot_and_cache() {
    let cluster = LocalCluster::start(harness::spec(fixture_dir(FIXTURES[0]), 1)).unwrap();
    wait_serving(&cluster, 1).await;
    let mut client = harness::inference(&cluster).await;
    let mut stream = client
        .generate(greedy(&[0, 5, 7], 1000))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let during = harness::status(&cluster).await;
    assert!(
        during.kv_blocks_used > during.kv_blocks_cached && during.requests_running == 1,
        "{during:?}"
    );
    drop(stream);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = harness::status(&cluster).await;
        if s.kv_blocks_used == s.kv_blocks_cached && s.requests_running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks not freed after disconnect: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_korean_text_is_never_broken_utf8() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let case = &golden_cases(fixture)[1];
    assert!(case.prompt.starts_with('딥'));
    let cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), 2)).unwrap();
    wait_serving(&cluster, 2).await;
    let mut client = harness::inference(&cluster).await;
    let req = GenerateRequest {
        prompt: Some(case.prompt.clone()),
        input_ids: vec![],
        ..greedy(&[], 24)
    };
    let got = generate(&mut client, req).await.unwrap();
    let full = engine.tokenizer().decode(&got.ids).unwrap();
    assert_eq!(got.pieces.concat(), full);
    assert_eq!(got.prompt_tokens as usize, case.input_ids.len());
}

/// A two-character ASCII stop string whose prefix decodes cleanly (lossy U+FFFD renderings of
/// partial byte sequences may differ mid-stream, so they make a poor oracle).
fn clean_stop(text: &str) -> Option<(String, usize)> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for w in chars.windows(2).skip(2) {
        let (at, a) = w[0];
        let b = w[1].1;
        if a.is_ascii_alphanumeric()
            && b.is_ascii_alphanumeric()
            && !text[..at].contains('\u{FFFD}')
        {
            let stop: String = [a, b].iter().collect();
            if text.find(&stop) == Some(at) {
                return Some((stop, at));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_text_before_them() {
    let fixture = FIXTURES[2];
    let (_cluster, mut client) = one_node(fixture).await;
    let mut checked = 0;
    for case in golden_cases(fixture) {
        let full = generate(&mut client, greedy(&case.input_ids, 24))
            .await
            .unwrap();
        let text = full.pieces.concat();
        let Some((stop, cut)) = clean_stop(&text) else {
            continue;
        };
        let req = GenerateRequest {
            stop: vec![stop.clone()],
            ..greedy(&case.input_ids, 24)
        };
        let got = generate(&mut client, req.clone()).await.unwrap();
        assert_eq!(got.finish_reason, "stop", "stop {stop:?} in {text:?}");
        assert_eq!(got.pieces.concat(), text[..cut], "stop {stop:?}");
        assert!(got.ids.len() < 24);
        // vLLM's include_stop_str_in_output: the same answer, the stop string kept.
        let kept = GenerateRequest {
            include_stop_str_in_output: true,
            ..req
        };
        let kept = generate(&mut client, kept).await.unwrap();
        assert_eq!(
            kept.pieces.concat(),
            text[..cut + stop.len()],
            "stop {stop:?}"
        );
        assert_eq!((kept.ids, kept.finish_reason), (got.ids, got.finish_reason));
        checked += 1;
    }
    assert!(checked > 0, "no case had a usable stop string");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_hold_disjoint_slices_and_tokens_cross_once_per_node() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cfg = engine.config();
    let moe_layers = cfg.moe_layer_indices().count() as u64;
    for nodes in [1usize, 3] {
        let cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), nodes)).unwrap();
        let status = wait_serving(&cluster, nodes).await;
        let mut all: Vec<(u32, u32)> = status
            .nodes
            .iter()
            .flat_map(|n| n.experts.iter().map(|e| (e.layer, e.expert)))
            .collect();
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), total, "an expert is held by two nodes");
        assert_eq!(total as u64, moe_layers * cfg.moe.num_experts as u64);
        let mut client = harness::inference(&cluster).await;
        let ids = &golden_cases(fixture)[0].input_ids;
        generate(&mut client, greedy(ids, 8)).await.unwrap();
        let tokens = (ids.len() + 7) as u64; // prompt rows plus 7 decode steps feed the model
        let s = harness::status(&cluster).await;
        let rows: u64 = s.nodes.iter().map(|n| n.dispatched_rows).sum();
        let pairs: u64 = s.nodes.iter().map(|n| n.dispatched_pairs).sum();
        assert_eq!(pairs, tokens * moe_layers * cfg.moe.top_k as u64);
        if nodes == 1 {
            // All of a token's experts are on one node: it crosses the wire once per layer.
            assert_eq!(rows, tokens * moe_layers);
        } else {
            assert!(
                rows < pairs && rows >= tokens * moe_layers,
                "rows {rows} pairs {pairs}"
            );
        }
        let counted: u64 = s
            .nodes
            .iter()
            .flat_map(|n| n.experts.iter().map(|e| e.tokens))
            .sum();
        assert_eq!(counted, pairs);
    }
}

/// `prompt_logprobs` over gRPC with the prompt cut into several prefill chunks
/// (`--max-batch-tokens 5`): every prompt token's logprob is the offline forward pass's, bit
/// for bit (and its rank), whether nothing is generated after it (`max_new_tokens` 0, the scores in the one
/// message) or tokens are (the scores on the first message, the tokens the offline ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_logprobs_across_prefill_chunks_equal_the_offline_forward_pass() {
    let fixture = FIXTURES[0];
    let dir = fixture_dir(fixture);
    let engine = Engine::load(&dir).unwrap();
    let vocab = engine.config().vocab_size;
    let case = &golden_cases(fixture)[1];
    let logits = engine.prompt_logits(&case.input_ids).unwrap();
    let (expected, ranks): (Vec<f32>, Vec<u32>) = case.input_ids[1..]
        .iter()
        .zip(logits.chunks_exact(vocab))
        .map(|(&t, row)| {
            use moe_model::backend::ops::{log_softmax_at, rank_at};
            (log_softmax_at(row, t as usize), rank_at(row, t as usize))
        })
        .unzip();
    assert!(
        ranks.iter().any(|&r| r > 1),
        "some prompt token is not the likeliest"
    );
    let mut spec = harness::spec(dir, 1);
    spec.router_args
        .extend(["--max-batch-tokens", "5"].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let mut client = harness::inference(&cluster).await;
    for new_tokens in [0u32, 3] {
        let mut req = greedy(&case.input_ids, new_tokens);
        req.prompt_logprobs = Some(2);
        let mut stream = client.generate(req).await.unwrap().into_inner();
        let mut messages = Vec::new();
        while let Some(msg) = stream.message().await.unwrap() {
            messages.push(msg);
        }
        let first = &messages[0];
        assert_eq!(first.prompt_token_ids, case.input_ids);
        assert_eq!(first.prompt_logprobs, expected, "{new_tokens} new tokens");
        assert_eq!(first.prompt_ranks, ranks, "{new_tokens} new tokens");
        assert_eq!(first.prompt_top_logprobs.len(), expected.len());
        assert!(first
            .prompt_top_logprobs
            .iter()
            .zip(&expected)
            .all(|(top, &lp)| top.logprobs.len() == 2 && top.logprobs[0] >= lp));
        assert!(messages[1..].iter().all(|m| m.prompt_logprobs.is_empty()));
        let ids: Vec<u32> = messages.iter().flat_map(|m| m.token_ids.clone()).collect();
        let last = messages.last().unwrap();
        assert_eq!(last.finish_reason, "length");
        assert_eq!(last.usage.as_ref().unwrap().completion_tokens, new_tokens);
        let offline = engine
            .generate(&moe_model::GenerateRequest {
                input_ids: case.input_ids.clone(),
                max_new_tokens: new_tokens as usize,
                sampling: Default::default(),
                ignore_eos: true,
                emit_logits: false,
            })
            .unwrap();
        assert_eq!(ids, offline.output_ids);
    }
    // Without prompt_logprobs, max_new_tokens 0 is still refused.
    let err = client
        .generate(greedy(&case.input_ids, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// vLLM's `stop_token_ids`: a greedy answer ends at the first of the ids it reaches, that id
/// kept, `finish_reason` "stop", exactly the unstopped answer's ids up to there; with
/// `ignore_eos` too; `min_tokens` holds them back (the answer then never ends early at
/// one); an id outside the vocabulary is refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_token_ids_end_the_answer_at_the_token() {
    let fixture = FIXTURES[1];
    let (_cluster, mut client) = one_node(fixture).await;
    let case = &golden_cases(fixture)[0];
    let full = generate(&mut client, greedy(&case.input_ids, 24))
        .await
        .unwrap();
    assert!(full.ids.len() >= 6, "{:?}", full.ids);
    // The fifth id, or an earlier one it repeats: the answer must stop at its first place.
    let stop_id = full.ids[4];
    let first = full.ids.iter().position(|&t| t == stop_id).unwrap();
    for ignore_eos in [false, true] {
        let req = GenerateRequest {
            stop_token_ids: vec![stop_id],
            ignore_eos,
            ..greedy(&case.input_ids, 24)
        };
        let got = generate(&mut client, req).await.unwrap();
        assert_eq!(got.finish_reason, "stop");
        assert_eq!(got.ids, full.ids[..=first], "ignore_eos {ignore_eos}");
        assert_eq!(got.completion_tokens as usize, first + 1);
    }
    let held = GenerateRequest {
        stop_token_ids: vec![stop_id],
        min_tokens: 12,
        ..greedy(&case.input_ids, 12)
    };
    let got = generate(&mut client, held).await.unwrap();
    assert_eq!(
        got.ids.len(),
        12,
        "min_tokens holds the stop id back: {:?}",
        got.ids
    );
    assert!(!got.ids.contains(&stop_id), "{:?}", got.ids);
    let bad = GenerateRequest {
        stop_token_ids: vec![1 << 30],
        ..greedy(&case.input_ids, 4)
    };
    let err = generate(&mut client, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("stop_token_ids"),
        "{}",
        err.message()
    );
}

/// An end token's text: left out of the answer by default (the id is returned), kept with
/// `include_stop_str_in_output`, as vLLM does; special tokens write their text only with
/// `skip_special_tokens: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_tokens_and_special_tokens_write_text_only_on_request() {
    let fixture = FIXTURES[1];
    let tokenizer = moe_model::tokenizer::Tokenizer::from_dir(&fixture_dir(fixture)).unwrap();
    let (_cluster, mut client) = one_node(fixture).await;
    let case = &golden_cases(fixture)[0];
    let full = generate(&mut client, greedy(&case.input_ids, 24))
        .await
        .unwrap();
    // A stop id whose text is not empty, at its first place in the answer.
    let (first, stop_id) = full
        .ids
        .iter()
        .enumerate()
        .skip(2)
        .find(|(i, &t)| {
            full.ids.iter().position(|&u| u == t) == Some(*i)
                && tokenizer.decode(&[t]).is_ok_and(|x| !x.trim().is_empty())
        })
        .map(|(i, &t)| (i, t))
        .expect("a token with text");
    let ended = GenerateRequest {
        stop_token_ids: vec![stop_id],
        ..greedy(&case.input_ids, 24)
    };
    let got = generate(&mut client, ended.clone()).await.unwrap();
    assert_eq!(got.ids, full.ids[..=first]);
    assert_eq!(
        got.pieces.concat(),
        tokenizer.decode(&full.ids[..first]).unwrap()
    );
    let kept = GenerateRequest {
        include_stop_str_in_output: true,
        ..ended
    };
    let kept = generate(&mut client, kept).await.unwrap();
    assert_eq!(kept.ids, got.ids);
    assert_eq!(
        kept.pieces.concat(),
        tokenizer.decode(&full.ids[..=first]).unwrap()
    );
    // The end-of-sequence token forced three times (not ending the answer, with ignore_eos):
    // no text by default, its own with skip_special_tokens false.
    let eos = tokenizer.eos_id().unwrap();
    let forced = GenerateRequest {
        logit_bias: [(eos, 100.0)].into(),
        ..greedy(&case.input_ids, 3)
    };
    let skipped = generate(&mut client, forced.clone()).await.unwrap();
    assert_eq!(skipped.ids, [eos; 3]);
    assert_eq!(skipped.pieces.concat(), "");
    let written = GenerateRequest {
        skip_special_tokens: Some(false),
        ..forced
    };
    let written = generate(&mut client, written).await.unwrap();
    assert_eq!(
        written.pieces.concat(),
        tokenizer.eos_token().unwrap().repeat(3)
    );
}

/// `structured_output_after`: the grammar starts once the answer has written the text (a
/// reasoning model's `</think>`; here the first tokens of the free greedy answer, so the
/// answer up to there is exactly the unconstrained one), then the rest is in the grammar and
/// the answer stops with it. A resumed answer (a gateway's move) continues bitwise, cut before
/// or after the start text. The field alone, or over 64 bytes, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grammar_after_a_start_text_leaves_the_answer_free_until_then() {
    use moe_proto::v1::structured_output::Kind;
    use moe_proto::v1::{Resume, StructuredOutput};
    let fixture = FIXTURES[0];
    let (_cluster, mut client) = one_node(fixture).await;
    let ids = &golden_cases(fixture)[0].input_ids;
    let free = generate(&mut client, greedy(ids, 12)).await.unwrap();
    let marker: String = free.pieces[..4].concat();
    assert!(!marker.is_empty(), "{:?}", free.pieces);
    let digits = || StructuredOutput {
        kind: Some(Kind::Regex("[0-9]{3}".into())),
    };
    let gated = GenerateRequest {
        structured_output: Some(digits()),
        structured_output_after: marker.clone(),
        ..greedy(ids, 40)
    };
    let got = generate(&mut client, gated.clone()).await.unwrap();
    let text = got.pieces.concat();
    assert_eq!(got.finish_reason, "stop", "{text:?}");
    let rest = text
        .strip_prefix(&marker)
        .unwrap_or_else(|| panic!("{text:?} after {marker:?}"));
    assert!(
        rest.len() == 3 && rest.bytes().all(|b| b.is_ascii_digit()),
        "{text:?}"
    );
    // The tokens that wrote the start text are the free answer's (the grammar then differs).
    let same = got
        .ids
        .iter()
        .zip(&free.ids)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        same >= 1 && same < got.ids.len(),
        "{:?} / {:?}",
        got.ids,
        free.ids
    );
    // Without the start text the grammar holds from the first token.
    let whole = GenerateRequest {
        structured_output: Some(digits()),
        ..greedy(ids, 40)
    };
    let constrained = generate(&mut client, whole).await.unwrap();
    assert!(constrained
        .pieces
        .concat()
        .bytes()
        .all(|b| b.is_ascii_digit()));
    for cut in [2, 4, got.ids.len() - 1] {
        let resumed = GenerateRequest {
            resume: Some(Resume {
                generated_ids: got.ids[..cut].to_vec(),
            }),
            ..gated.clone()
        };
        let rest = generate(&mut client, resumed).await.unwrap();
        assert_eq!(rest.ids, got.ids[cut..], "resumed after {cut} ids");
    }
    for (bad, what) in [
        (
            GenerateRequest {
                structured_output_after: "</think>".into(),
                ..greedy(ids, 4)
            },
            "needs a structured output",
        ),
        (
            GenerateRequest {
                structured_output: Some(digits()),
                structured_output_after: "x".repeat(65),
                ..greedy(ids, 4)
            },
            "at most 64 bytes",
        ),
    ] {
        let err = generate(&mut client, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(what), "{}", err.message());
    }
}

/// vLLM's `allowed_token_ids`: greedy and sampled answers draw only those ids (the greedy one
/// is the argmax among them: the free answer's first id when it is allowed), the same picked
/// where the dense part keeps the row (no logprobs: masked there) as sampled from the row;
/// an id outside the vocabulary is refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_token_ids_are_the_only_ids_drawn() {
    let fixture = FIXTURES[2];
    let (_cluster, mut client) = one_node(fixture).await;
    let ids = &golden_cases(fixture)[0].input_ids;
    let free = generate(&mut client, greedy(ids, 8)).await.unwrap();
    let allowed = vec![free.ids[0], 7, 42, 300];
    let only = |req: GenerateRequest| GenerateRequest {
        allowed_token_ids: allowed.clone(),
        ..req
    };
    let got = generate(&mut client, only(greedy(ids, 8))).await.unwrap();
    assert_eq!(got.ids[0], free.ids[0], "the argmax, allowed");
    assert!(got.ids.iter().all(|t| allowed.contains(t)), "{:?}", got.ids);
    let sampled = GenerateRequest {
        temperature: Some(1.5),
        seed: Some(3),
        ..greedy(ids, 24)
    };
    let got = generate(&mut client, only(sampled.clone())).await.unwrap();
    assert!(got.ids.iter().all(|t| allowed.contains(t)), "{:?}", got.ids);
    for request in [greedy(ids, 8), sampled.clone()] {
        let with_logprobs = generate(&mut client, only(request.clone())).await.unwrap();
        let in_place = GenerateRequest {
            logprobs: false,
            ..only(request)
        };
        let in_place = generate(&mut client, in_place).await.unwrap();
        assert_eq!(in_place.ids, with_logprobs.ids, "picked in place");
    }
    // With a grammar: only the ids both allow, masked together where the row is kept.
    let tokenizer = moe_model::tokenizer::Tokenizer::from_dir(&fixture_dir(fixture)).unwrap();
    let digit_ids: Vec<u32> = ["1", "2", "7"]
        .iter()
        .map(|d| match tokenizer.encode_raw(d).unwrap()[..] {
            [id] => id,
            ref other => panic!("{d:?} is {other:?}"),
        })
        .collect();
    let digits = GenerateRequest {
        structured_output: Some(moe_proto::v1::StructuredOutput {
            kind: Some(moe_proto::v1::structured_output::Kind::Regex(
                "[0-9]+".into(),
            )),
        }),
        allowed_token_ids: digit_ids.clone(),
        ..sampled.clone()
    };
    let with_logprobs = generate(&mut client, digits.clone()).await.unwrap();
    let in_place = GenerateRequest {
        logprobs: false,
        ..digits
    };
    let in_place = generate(&mut client, in_place).await.unwrap();
    assert_eq!(
        in_place.ids, with_logprobs.ids,
        "picked in place, with a grammar"
    );
    assert!(
        with_logprobs.ids.len() > 1 && with_logprobs.ids.iter().all(|t| digit_ids.contains(t)),
        "{:?}",
        with_logprobs.ids
    );
    let unrestricted = generate(&mut client, sampled).await.unwrap();
    assert!(
        !unrestricted.ids.iter().all(|t| allowed.contains(t)),
        "the check can fail: {:?}",
        unrestricted.ids
    );
    let bad = GenerateRequest {
        allowed_token_ids: vec![1 << 30],
        ..greedy(ids, 4)
    };
    let err = generate(&mut client, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("allowed_token_ids"),
        "{}",
        err.message()
    );
}

/// vLLM's `truncate_prompt_tokens`: the prompt's last k tokens are kept, so the answer is
/// bitwise the one to those k tokens alone and `prompt_tokens` counts k.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_prompt_tokens_keeps_the_prompts_end() {
    let fixture = FIXTURES[0];
    let (_cluster, mut client) = one_node(fixture).await;
    let ids = &golden_cases(fixture)[0].input_ids;
    assert!(ids.len() > 3, "{ids:?}");
    let keep = ids.len() - 2;
    let truncated = GenerateRequest {
        truncate_prompt_tokens: Some(keep as u32),
        ..greedy(ids, 8)
    };
    let got = generate(&mut client, truncated).await.unwrap();
    let tail = generate(&mut client, greedy(&ids[2..], 8)).await.unwrap();
    assert_eq!(got.ids, tail.ids);
    assert_eq!(got.logprobs, tail.logprobs);
    assert_eq!(got.prompt_tokens as usize, keep);
    let whole = GenerateRequest {
        truncate_prompt_tokens: Some(u32::MAX),
        ..greedy(ids, 8)
    };
    assert_eq!(
        generate(&mut client, whole).await.unwrap().prompt_tokens as usize,
        ids.len()
    );
}

/// vLLM's `bad_words`: the free greedy answer's own first word, and a two-token piece of it,
/// never appear in the answer (as any of the token sequences vLLM bans for them), which then
/// differs from the free one, greedy or sampled, picked where the dense part keeps the row
/// (no logprobs) or from the row; a word of spaces only is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_words_never_appear() {
    let fixture = FIXTURES[2];
    let tokenizer = moe_model::tokenizer::Tokenizer::from_dir(&fixture_dir(fixture)).unwrap();
    let (_cluster, mut client) = one_node(fixture).await;
    let ids = &golden_cases(fixture)[0].input_ids;
    let free = generate(&mut client, greedy(ids, 16)).await.unwrap();
    // Pieces of the answer whose text reads back as the same tokens: one token, then two.
    let clean = |span: &[u32]| {
        let text = tokenizer.decode(span).unwrap();
        let ascii =
            text.trim().len() >= 2 && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        (ascii && tokenizer.encode_raw(&text).unwrap() == span).then_some(text)
    };
    let one = (0..free.ids.len()).find_map(|i| clean(&free.ids[i..=i]));
    let two = (0..free.ids.len() - 1).find_map(|i| clean(&free.ids[i..i + 2]));
    let words: Vec<String> = [one, two].into_iter().flatten().collect();
    assert_eq!(words.len(), 2, "{:?}", free.ids);
    let banned =
        moe_router::validation::bad_word_ids(&words, |w| Ok(tokenizer.encode_raw(w).unwrap()))
            .unwrap();
    assert!(banned.iter().any(|s| s.len() >= 2), "{words:?}: {banned:?}");
    let req = GenerateRequest {
        bad_words: words.clone(),
        ..greedy(ids, 16)
    };
    let got = generate(&mut client, req.clone()).await.unwrap();
    assert_ne!(got.ids, free.ids, "{words:?}: {banned:?}");
    let sampled_request = GenerateRequest {
        temperature: Some(1.2),
        seed: Some(8),
        min_p: Some(0.02),
        ..req.clone()
    };
    let sampled = generate(&mut client, sampled_request.clone())
        .await
        .unwrap();
    for answer in [&got, &sampled] {
        for seq in &banned {
            assert!(
                !answer.ids.windows(seq.len()).any(|w| w == seq.as_slice()),
                "{seq:?} in {:?} ({words:?})",
                answer.ids
            );
        }
    }
    for (with_logprobs, request) in [(&got, req.clone()), (&sampled, sampled_request)] {
        let in_place = GenerateRequest {
            logprobs: false,
            ..request
        };
        let in_place = generate(&mut client, in_place).await.unwrap();
        assert_eq!(in_place.ids, with_logprobs.ids, "picked in place");
    }
    let bad = GenerateRequest {
        bad_words: vec!["   ".into()],
        ..greedy(ids, 4)
    };
    let err = generate(&mut client, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("bad_words"), "{}", err.message());
}

/// Seeded draws in a cluster are the offline engine's, token for token, for every kind of
/// draw (the race, top-p, min-p, min-p then top-p, top-k with min-p), whether the router
/// picks in place (no logprobs) or from the row it keeps for them, several requests at a
/// time (so each shares its steps with the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_draws_in_a_cluster_are_the_offline_engines() {
    let fixture = FIXTURES[0];
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let cluster = LocalCluster::start(harness::spec(fixture_dir(fixture), 2)).unwrap();
    wait_serving(&cluster, 2).await;
    let ids = golden_cases(fixture)[0].input_ids.clone();
    let n = 24u32;
    // (temperature, top_p, top_k, min_p)
    let draws = [
        (0.9f32, 1.0f32, 0u32, 0.0f32),
        (0.9, 0.9, 0, 0.0),
        (1.3, 1.0, 0, 0.05),
        (1.3, 0.8, 0, 0.1),
        (1.1, 1.0, 20, 0.2),
    ];
    let mut pending = Vec::new();
    for (i, &(temperature, top_p, top_k, min_p)) in draws.iter().enumerate() {
        for logprobs in [false, true] {
            let request = GenerateRequest {
                temperature: Some(temperature),
                top_p: Some(top_p),
                top_k: Some(top_k),
                min_p: Some(min_p),
                seed: Some(70 + i as u64),
                logprobs,
                ..greedy(&ids, n)
            };
            let mut client = harness::inference(&cluster).await;
            pending.push(tokio::spawn(async move {
                (i, logprobs, generate(&mut client, request).await.unwrap())
            }));
        }
    }
    let mut distinct = std::collections::BTreeSet::new();
    for task in pending {
        let (i, logprobs, got) = task.await.unwrap();
        let (temperature, top_p, top_k, min_p) = draws[i];
        let offline = engine
            .generate(&moe_model::GenerateRequest {
                input_ids: ids.clone(),
                max_new_tokens: n as usize,
                sampling: moe_model::SamplingParams {
                    temperature,
                    top_p,
                    top_k: (top_k > 0).then_some(top_k as usize),
                    min_p,
                    seed: Some(70 + i as u64),
                    ..Default::default()
                },
                ignore_eos: true,
                emit_logits: false,
            })
            .unwrap();
        assert_eq!(got.ids, offline.output_ids, "draw {i}, logprobs {logprobs}");
        if logprobs {
            assert_eq!(got.logprobs, offline.logprobs, "draw {i}");
        }
        distinct.insert(got.ids);
    }
    // The seeds and the cuts make each draw its own.
    assert_eq!(distinct.len(), draws.len());
}

/// `--scheduling-policy priority` (vLLM's): with one sequence running at a time, a request
/// sent later with a lower `priority` runs before an earlier one with a higher value; the
/// default policy refuses a non-zero priority by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_orders_the_waiting_queue() {
    let case = &golden_cases(FIXTURES[0])[0];
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args
        .extend(["--scheduling-policy", "priority", "--max-running", "1"].map(String::from));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let mut client = harness::inference(&cluster).await;
    let request = |max_new: u32, priority: i32| {
        let mut req = greedy(&case.input_ids, max_new);
        req.ignore_eos = true;
        req.priority = priority;
        req
    };
    // A long request runs; two more wait behind it, the second more urgent.
    let mut running = client.generate(request(300, 0)).await.unwrap().into_inner();
    running
        .message()
        .await
        .unwrap()
        .expect("the first request runs");
    let later = client.generate(request(4, 5)).await.unwrap().into_inner();
    let urgent = client.generate(request(4, -5)).await.unwrap().into_inner();
    let finish_time = |mut stream: tonic::Streaming<moe_proto::v1::GenerateResponse>| async move {
        let mut first = None;
        while let Some(msg) = stream.message().await.unwrap() {
            first.get_or_insert_with(Instant::now);
            if !msg.finish_reason.is_empty() {
                return (first.unwrap(), Instant::now());
            }
        }
        panic!("the answer ended without a finish reason")
    };
    let later = tokio::spawn(finish_time(later));
    let urgent = tokio::spawn(finish_time(urgent));
    while running.message().await.unwrap().is_some() {}
    let (later_first, _) = later.await.unwrap();
    let (_, urgent_done) = urgent.await.unwrap();
    assert!(
        urgent_done <= later_first,
        "the more urgent request ran first, though it came later"
    );

    // Under the default policy, a priority is refused by name.
    let (_default, mut client) = one_node(FIXTURES[0]).await;
    let status = client.generate(request(2, 3)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("--scheduling-policy priority"),
        "{status:?}"
    );
    client.generate(request(2, 0)).await.unwrap();
}

/// Tokens of the less urgent request: enough that it is still running when the urgent one
/// arrives.
const LOW_TOKENS: u32 = 300;

/// Under `--scheduling-policy priority`, a more urgent request that does not fit (no running
/// slot left, or no KV budget) preempts a less urgent running one, as vLLM's scheduler does:
/// the urgent answer ends first, the preempted one goes on where it stopped, and every answer
/// is token for token and logprob for logprob what it is without a preemption (greedy, and
/// seeded with a repetition penalty: the sampler resumes too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_more_urgent_request_preempts_and_changes_no_token() {
    let fixture = FIXTURES[0];
    let cases = golden_cases(fixture);
    let engine = Engine::load(&fixture_dir(fixture)).unwrap();
    let (low_prompt, urgent_prompt) = (&cases[0].input_ids, &cases[2].input_ids);
    let low_request = |seeded: bool| {
        let mut req = greedy(low_prompt, LOW_TOKENS);
        req.priority = 5;
        if seeded {
            req.temperature = Some(0.9);
            req.seed = Some(17);
            req.repetition_penalty = Some(1.2);
        }
        req
    };
    let mut urgent_request = greedy(urgent_prompt, 6);
    urgent_request.priority = -5;

    // The KV bytes of one block, from the default budget's block count: a budget of the low
    // request's blocks and half a block leaves no room for the urgent one beside it.
    let probe = start_with(&["--http-listen", "127.0.0.1:0"]).await;
    let total = metric_of(&probe, "moe_kv_cache_blocks_total").await;
    let block_bytes = ((1u64 << 30) as f64 / total).floor() as u64;
    drop(probe);
    let low_blocks = (low_prompt.len() + LOW_TOKENS as usize).div_ceil(16) as u64;
    let budget = (block_bytes * low_blocks + block_bytes / 2).to_string();

    for (how, flags) in [
        ("no running slot", vec!["--max-running", "1"]),
        ("no KV budget", vec!["--kv-cache-bytes", budget.as_str()]),
    ] {
        let mut flags = flags;
        flags.extend(["--http-listen", "127.0.0.1:0"]);
        let cluster = start_with(&flags).await;
        let mut client = harness::inference(&cluster).await;
        for seeded in [false, true] {
            // Alone first: the answer a preemption must not change.
            let alone = generate(&mut client, low_request(seeded)).await.unwrap();
            let preempted_before = metric_of(&cluster, "moe_requests_preempted_total").await;
            let mut low = client
                .generate(low_request(seeded))
                .await
                .unwrap()
                .into_inner();
            // Read on its own task, so that its end is timed as it happens.
            let (started, running) = tokio::sync::oneshot::channel();
            let low = tokio::spawn(async move {
                let (mut ids, mut logprobs, mut finish) = (Vec::new(), Vec::new(), String::new());
                let mut started = Some(started);
                while let Some(msg) = low.message().await.unwrap() {
                    ids.extend(msg.token_ids);
                    logprobs.extend(msg.logprobs);
                    finish = msg.finish_reason;
                    if ids.len() >= 3 {
                        if let Some(started) = started.take() {
                            let _ = started.send(());
                        }
                    }
                }
                (ids, logprobs, finish, Instant::now())
            });
            running.await.expect("the low request runs");
            let urgent = generate(&mut client, urgent_request.clone()).await.unwrap();
            let urgent_done = Instant::now();
            let (low_ids, low_logprobs, low_finish, low_done) = low.await.unwrap();
            assert!(
                urgent_done < low_done,
                "{how}: the urgent request ended first, though the other ran before it"
            );
            let want = harness::offline_greedy(&engine, urgent_prompt, 6);
            assert_eq!(urgent.ids, want.output_ids, "{how}");
            assert_eq!(urgent.logprobs, want.logprobs, "{how}");
            assert_eq!(
                low_ids, alone.ids,
                "{how}, seeded {seeded}: the preempted answer"
            );
            assert_eq!(low_logprobs, alone.logprobs, "{how}, seeded {seeded}");
            assert_eq!(low_finish, "length");
            if !seeded {
                let want = harness::offline_greedy(&engine, low_prompt, LOW_TOKENS as usize);
                assert_eq!(low_ids, want.output_ids, "{how}");
            }
            let preempted = metric_of(&cluster, "moe_requests_preempted_total").await;
            assert!(
                preempted > preempted_before,
                "{how}, seeded {seeded}: no preemption counted"
            );
        }
        let status = harness::settled_status(&cluster.router_addr).await;
        assert_eq!(status.requests_running, 0, "{how}");
        assert_eq!(
            status.kv_blocks_used, status.kv_blocks_cached,
            "{how}: every block back, but the cached ones"
        );
    }
}

async fn start_with(flags: &[&str]) -> LocalCluster {
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args
        .extend(["--scheduling-policy", "priority"].map(String::from));
    spec.router_args.extend(flags.iter().map(|f| f.to_string()));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    cluster
}

async fn metric_of(cluster: &LocalCluster, name: &str) -> f64 {
    let http = cluster.router_http_addr.as_deref().expect("--http-listen");
    metric_value(&harness::scrape(http).await, name)
}
