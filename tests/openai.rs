//! The OpenAI-compatible HTTP API with the official `openai` Python client: a completion, a
//! streamed chat completion and logprobs requests give the offline engine's tokens; errors
//! come back in OpenAI's shape with the right status. And the chat template renders exactly as
//! transformers' `apply_chat_template`.

use std::process::Command;

use moe_model::chat_template::{ChatMessage, ChatTemplate};
use moe_model::tokenizer::Tokenizer;
use moe_model::{Engine, LogitAdjustments, SamplingParams};
use moe_tests::harness::{self, wait_serving};
use moe_tests::{fixture_dir, golden_cases, FIXTURES, KIMI_FIXTURE, KIMI_INT4_FIXTURE};
use moe_tooling::LocalCluster;
use serde_json::{json, Value};

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

fn template(tokenizer: &Tokenizer) -> ChatTemplate {
    ChatTemplate::new(
        tokenizer
            .chat_template()
            .expect("the fixture has a chat template"),
        tokenizer.bos_token().as_deref(),
        tokenizer.eos_token().as_deref(),
    )
    .unwrap()
}

/// transformers 4.57 `AutoTokenizer.from_pretrained("tests/fixtures/deepseek-v3-tiny")`,
/// `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` and with
/// `tokenize=True` (no BOS: the template would write it), computed once.
const THREE_MESSAGES: &str =
    "<|system|>\nYou are terse.\n<|user|>\nName a prime.\n<|assistant|>\nSeven.\n<|assistant|>\n";
const FOUR_MESSAGE_IDS: [u32; 75] = [
    30, 94, 85, 91, 336, 71, 79, 94, 32, 201, 399, 462, 259, 263, 274, 16, 201, 30, 94, 87, 85,
    263, 94, 32, 201, 48, 350, 71, 262, 281, 296, 79, 71, 16, 201, 30, 94, 448, 85, 272, 86, 405,
    94, 32, 201, 53, 71, 88, 268, 16, 201, 30, 94, 87, 85, 263, 94, 32, 201, 35, 80, 81, 374, 33,
    201, 30, 94, 448, 85, 272, 86, 405, 94, 32, 201,
];

#[test]
fn chat_template_renders_as_transformers_does() {
    let tokenizer = Tokenizer::from_dir(&fixture_dir(FIXTURES[0])).unwrap();
    let t = template(&tokenizer);
    let three = [
        msg("system", "You are terse."),
        msg("user", "Name a prime."),
        msg("assistant", "Seven."),
    ];
    assert_eq!(t.render(&three, true).unwrap(), THREE_MESSAGES);
    let mut four = three.to_vec();
    four.push(msg("user", "Another?"));
    let rendered = t.render(&four, true).unwrap();
    assert_eq!(tokenizer.encode_raw(&rendered).unwrap(), FOUR_MESSAGE_IDS);
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// vLLM's `prompt_logprobs` as the official client read them: `[null, {id: {logprob, rank,
/// decoded_token}}, ...]`, each position's own token first with the offline forward pass's
/// logprob and rank, then the `k` likeliest others with ranks 1, 2, ... (on a completion
/// asking for 3 alongside echo's 1, and on a chat asking for 0).
fn check_prompt_logprobs(got: &Value, engine: &Engine, completion_ids: &[u32], chat_ids: &[u32]) {
    let vocab = engine.config().vocab_size;
    let check = |scores: &Value, ids: &[u32], k: usize| {
        let logits = engine.prompt_logits(ids).unwrap();
        let positions = scores.as_array().expect("a list of positions");
        assert_eq!(positions.len(), ids.len());
        assert_eq!(
            positions[0],
            Value::Null,
            "the first token has nothing before it"
        );
        for (j, (position, &id)) in positions[1..].iter().zip(&ids[1..]).enumerate() {
            let row = &logits[j * vocab..(j + 1) * vocab];
            let entries = position.as_object().expect("a map of token ids");
            let (first_id, own) = entries.iter().next().expect("the prompt's token");
            assert_eq!(
                first_id,
                &id.to_string(),
                "the prompt's own token comes first"
            );
            assert_eq!(
                own["logprob"].as_f64().unwrap() as f32,
                moe_model::backend::ops::log_softmax_at(row, id as usize)
            );
            let rank = moe_model::backend::ops::rank_at(row, id as usize);
            assert_eq!(own["rank"], json!(rank));
            assert!(own["decoded_token"].is_string());
            let others: Vec<&Value> = entries.values().skip(1).collect();
            let expected_others = if (rank as usize) <= k { k - 1 } else { k };
            assert_eq!(others.len(), expected_others, "position {j}: {position}");
            let mut last = f64::INFINITY;
            for other in others {
                let lp = other["logprob"].as_f64().unwrap();
                assert!(lp <= last, "alternatives most likely first");
                assert!(other["rank"].as_u64().unwrap() <= k as u64);
                last = lp;
            }
        }
    };
    check(&got["completion"], completion_ids, 3);
    check(&got["chat"], chat_ids, 0);
    let echo_top = got["echo_top"].as_array().unwrap();
    assert_eq!(echo_top.len(), completion_ids.len() + 2);
    assert_eq!(echo_top[0], Value::Null);
    assert!(
        echo_top[1..].iter().all(|t| t == &json!(1)),
        "echo shows its own one alternative: {echo_top:?}"
    );
    for case in ["stream", "too_many", "whole_vocabulary"] {
        assert_eq!(got[case], json!([400, "prompt_logprobs"]), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client_gets_the_offline_tokens() {
    let fixture = FIXTURES[0];
    let dir = fixture_dir(fixture);
    let engine = Engine::load(&dir).unwrap();
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let mut spec = harness::spec(dir.clone(), 2);
    spec.router_args.extend(
        [
            "--http-listen",
            "127.0.0.1:0",
            "--served-model-name",
            "tiny-ds",
        ]
        .map(String::from),
    );
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 2).await;
    let http = cluster
        .router_http_addr
        .clone()
        .expect("HTTP address printed");

    let case = &golden_cases(fixture)[1];
    let messages = vec![msg("system", "You are terse."), msg("user", &case.prompt)];
    let n = 12;
    let offline = |ids: &[u32]| harness::offline_greedy(&engine, ids, n);
    let completion = offline(&case.input_ids);
    let chat_ids = tokenizer
        .encode_raw(&template(&tokenizer).render(&messages, true).unwrap())
        .unwrap();
    let chat = offline(&chat_ids);
    let with_adjust = |adjust: LogitAdjustments, ignore_eos: bool| {
        engine
            .generate(&moe_model::GenerateRequest {
                input_ids: case.input_ids.clone(),
                max_new_tokens: n,
                sampling: SamplingParams {
                    adjust,
                    ..Default::default()
                },
                ignore_eos,
                emit_logits: false,
            })
            .unwrap()
    };
    let adjust = LogitAdjustments {
        logit_bias: vec![(7, 3.0), (40, -5.0)],
        presence_penalty: 0.5,
        frequency_penalty: 1.0,
        repetition_penalty: 1.3,
        min_tokens: 0,
    };
    let adjusted = with_adjust(adjust.clone(), true);
    let eos = engine
        .tokenizer()
        .eos_id()
        .expect("the fixture has an end token");
    let held = with_adjust(
        LogitAdjustments {
            logit_bias: vec![(eos, 100.0)],
            min_tokens: 3,
            ..Default::default()
        },
        false,
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_client.py");
    let bias: serde_json::Map<String, Value> = adjust
        .logit_bias
        .iter()
        .map(|&(id, b)| (id.to_string(), json!(b)))
        .collect();
    let other = &golden_cases(fixture)[0];
    assert_ne!(other.input_ids, case.input_ids);
    let request = json!({
        "prompt": case.prompt,
        "prompt_ids": case.input_ids,
        "other_prompt": other.prompt,
        "other_ids": other.input_ids,
        "messages": messages,
        "max_tokens": n,
        "eos": eos,
        "adjust": {
            "logit_bias": bias,
            "presence_penalty": adjust.presence_penalty,
            "frequency_penalty": adjust.frequency_penalty,
            "repetition_penalty": adjust.repetition_penalty,
        },
    });
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &http, "tiny-ds", &request.to_string()])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();

    assert_eq!(got["models"], json!(["tiny-ds"]));
    // A batch of two prompts: each prompt's offline answer at its choices' indices (echoed
    // behind its own prompt), usage each prompt once.
    let other_completion = offline(&other.input_ids);
    let texts = [
        tokenizer.decode(&completion.output_ids).unwrap(),
        tokenizer.decode(&other_completion.output_ids).unwrap(),
    ];
    let prompts = [&case.prompt, &other.prompt];
    let whole: Vec<Value> = (0..4)
        .map(|i| json!([i, format!("{}{}", prompts[i / 2], texts[i / 2])]))
        .collect();
    assert_eq!(got["batch"]["whole"], json!(whole));
    let prompt_tokens = case.input_ids.len() + other.input_ids.len();
    assert_eq!(got["batch"]["usage"], json!([prompt_tokens, 4 * n]));
    assert_eq!(got["batch"]["streamed"], json!(texts));
    assert_eq!(
        got["batch"]["streamed_usage"],
        json!([prompt_tokens, 2 * n])
    );
    assert_eq!(got["batch"]["too_many"], json!([400, "prompt"]));
    assert_eq!(got["retrieved"], "tiny-ds");
    assert_eq!(got["retrieve_missing"], 404);
    // vLLM's `/tokenize`: a prompt's ids are the ones a completion generates from, a
    // conversation's the rendered template's (`chat_ids`, what the chat answers below are
    // checked against), with each token's vocabulary string on request; `/detokenize` reads
    // them back as the rendered text.
    let tokenized = &got["tokenize"];
    assert_eq!(tokenized["prompt"][0], 200);
    assert_eq!(tokenized["prompt"][1]["tokens"], json!(case.input_ids));
    assert_eq!(tokenized["prompt"][1]["count"], case.input_ids.len());
    assert_eq!(
        tokenized["prompt"][1]["max_model_len"],
        engine.config().max_position_embeddings
    );
    assert_eq!(tokenized["prompt"][1]["token_strs"], Value::Null);
    assert_eq!(tokenized["chat"][1]["tokens"], json!(chat_ids));
    let strs: Vec<String> = chat_ids
        .iter()
        .map(|&id| tokenizer.token_piece(id).unwrap())
        .collect();
    assert_eq!(tokenized["chat"][1]["token_strs"], json!(strs));
    assert_eq!(tokenized["bad_model"], 404);
    let rendered = template(&tokenizer).render(&messages, true).unwrap();
    assert_eq!(got["detokenize"], json!([200, {"prompt": rendered}]));
    assert_eq!(got["detokenize_bad"][0], 400);
    assert_eq!(got["detokenize_bad"][1]["error"]["param"], "tokens");
    assert_eq!(got["version"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        got["completion"]["text"],
        tokenizer.decode(&completion.output_ids).unwrap()
    );
    assert_eq!(got["completion"]["finish_reason"], "length");
    let p = case.input_ids.len() as u64;
    assert_eq!(got["completion"]["usage"], json!([p, n, p + n as u64]));
    assert_eq!(got["completion_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(floats(&got["completion_logprobs"]), completion.logprobs);

    let named = |ids: &[u32]| {
        json!(ids
            .iter()
            .map(|id| format!("token_id:{id}"))
            .collect::<Vec<_>>())
    };
    assert_eq!(got["chat_token_ids"], named(&chat.output_ids));
    assert_eq!(got["completion_token_ids"], named(&completion.output_ids));
    let chat_text = tokenizer.decode(&chat.output_ids).unwrap();
    assert_eq!(got["chat_stream"]["text"], chat_text);
    assert_eq!(got["chat_stream"]["finish_reason"], "length");
    assert_eq!(got["chat_stream"]["usage"], json!([chat_ids.len(), n]));
    // With tools offered, streamed logprobs are every token's, the whole answer's.
    let with_tools = &got["tools_logprobs"];
    assert_eq!(with_tools["streamed"], with_tools["whole"]);
    assert_eq!(with_tools["whole"].as_array().unwrap().len(), n);
    assert_eq!(with_tools["tokens"], n);
    // Continuous usage: the prompt's tokens and the tokens so far in every chunk, rising by
    // one a token to the whole answer's.
    let running = got["continuous_usage"].as_array().unwrap();
    assert_eq!(running.len(), n, "{running:?}");
    for (i, u) in running.iter().enumerate() {
        let p = chat_ids.len();
        assert_eq!(u, &json!([p, i + 1, p + i + 1]));
    }
    assert_eq!(got["chat_logprobs"]["text"], chat_text);
    assert_eq!(floats(&got["chat_logprobs"]["logprobs"]), chat.logprobs);
    for (top, chosen) in got["chat_logprobs"]["top"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&chat.logprobs)
    {
        let top = floats(top);
        assert_eq!(top.len(), 3);
        assert!(
            top.windows(2).all(|w| w[0] >= w[1]),
            "most likely first: {top:?}"
        );
        assert_eq!(top[0], *chosen, "greedy picks the most likely token");
    }

    assert_eq!(
        got["plain_stream"]["text"],
        tokenizer.decode(&completion.output_ids).unwrap()
    );
    assert_eq!(
        got["plain_stream"]["usage_chunks"], 0,
        "usage only with stream_options.include_usage"
    );
    // `tool_choice` without tools to choose from; the legacy `functions` is not implemented.
    for param in ["functions", "prediction", "tool_choice"] {
        assert_eq!(got["errors"][param], json!([400, param]), "{param}");
    }
    for param in ["logit_bias", "presence_penalty", "min_tokens"] {
        assert_eq!(
            got["errors"][format!("bad_{param}")],
            json!([400, param]),
            "{param}"
        );
    }
    assert_eq!(
        got["adjusted"]["text"],
        tokenizer.decode(&adjusted.output_ids).unwrap()
    );
    assert_eq!(floats(&got["adjusted"]["logprobs"]), adjusted.logprobs);
    assert_eq!(
        got["adjusted"]["picked_text"],
        tokenizer.decode(&adjusted.output_ids).unwrap(),
        "picked from the edited row (no logprobs asked)"
    );
    assert_ne!(
        adjusted.output_ids, completion.output_ids,
        "the adjustments change the greedy tokens"
    );
    let texts = &got["n"]["texts"];
    assert_eq!(texts.as_array().unwrap().len(), 3);
    assert_eq!(texts, &got["n"]["again"], "seeded choices are reproducible");
    assert_eq!(
        texts, &got["n"]["streamed"],
        "streamed choices are the same"
    );
    assert_eq!(texts[0], got["n"]["one"], "choice 0 is what n = 1 gives");
    assert!(
        texts[0] != texts[1] && texts[1] != texts[2],
        "choices differ: {texts}"
    );
    let p = case.input_ids.len() as u64;
    assert_eq!(got["n"]["usage"], json!([p, 3 * n as u64]));
    assert_eq!(got["n"]["streamed_usage"], json!([p, 3 * n as u64]));
    assert_eq!(got["n"]["chat_indices"], json!([0, 1]));
    // echo, max_tokens 0: the prompt's token logprobs are the offline forward pass's.
    let vocab = engine.config().vocab_size;
    let prompt_logits = engine.prompt_logits(&case.input_ids).unwrap();
    let expected: Vec<f32> = case.input_ids[1..]
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let row = &prompt_logits[i * vocab..(i + 1) * vocab];
            moe_model::backend::ops::log_softmax_at(row, t as usize)
        })
        .collect();
    let echo = &got["echo"];
    let scored = echo["token_logprobs"].as_array().unwrap();
    assert_eq!(
        scored[0],
        Value::Null,
        "the first token has nothing before it"
    );
    assert_eq!(floats(&Value::Array(scored[1..].to_vec())), expected);
    assert_eq!(
        echo["text"],
        tokenizer.decode(&case.input_ids).unwrap(),
        "echo of prompt ids: their text"
    );
    assert_eq!(
        echo["tokens"].as_array().unwrap().len(),
        case.input_ids.len()
    );
    assert_eq!(echo["top"][0], Value::Null);
    for (top, chosen) in echo["top"].as_array().unwrap()[1..].iter().zip(&expected) {
        let top = floats(top);
        assert_eq!(top.len(), 1);
        assert!(
            top[0] >= *chosen,
            "the most likely token is at least as likely"
        );
    }
    assert_eq!(echo["usage"], json!([case.input_ids.len(), 0]));
    let generated = tokenizer.decode(&completion.output_ids[..4]).unwrap();
    assert_eq!(
        echo["with_tokens"],
        json!(format!("{}{generated}", case.prompt)),
        "echo of a text prompt: as given, then the completion"
    );
    assert_eq!(echo["streamed"], echo["with_tokens"]);
    assert_eq!(echo["with_tokens_logprobs"], case.input_ids.len() + 4);
    check_prompt_logprobs(&got["prompt_logprobs"], &engine, &case.input_ids, &chat_ids);
    let invoked = &got["invocations"];
    assert_eq!(
        invoked["chat"],
        json!([200, got["chat_stream"]["text"]]),
        "{invoked}"
    );
    assert_eq!(
        invoked["completion"],
        json!([200, got["completion"]["text"]]),
        "{invoked}"
    );
    assert_eq!(invoked["response"], json!([200, "response"]), "{invoked}");
    assert_eq!(invoked["neither"], 400, "{invoked}");
    assert_eq!(got["priority"], json!([400, "priority"]));
    assert_eq!(got["min_tokens"], json!([held.output_ids.len(), "stop"]));
    assert_eq!(held.output_ids.len(), 4, "three tokens, then the end token");
    assert_eq!(got["errors"]["no_op_values"], "length");

    assert_eq!(got["errors"]["n"], json!([400, "invalid_request_error"]));
    assert_eq!(got["errors"]["model"], json!([404, "not_found_error"]));
    assert_eq!(got["errors"]["temperature"][0], 400);
    assert!(got["errors"]["temperature"][1]
        .as_str()
        .unwrap()
        .contains("temperature"));
}

/// Structured outputs with the official client: 20 seeds at temperature 1 for each of a bounded
/// JSON schema (nested objects, enums, strings with maxLength, arrays with maxItems,
/// additionalProperties false; validated with the `jsonschema` package), any JSON object, a
/// regex and a choice: every answer valid and ended by the grammar ("stop"); invalid grammars
/// are a 400 naming their parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_always_validate() {
    let mut spec = harness::spec(fixture_dir(FIXTURES[0]), 1);
    spec.router_args.extend(
        [
            "--http-listen",
            "127.0.0.1:0",
            "--served-model-name",
            "tiny-ds",
        ]
        .map(String::from),
    );
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http = cluster.router_http_addr.clone().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/structured_outputs.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &http, "tiny-ds", "20"])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    for kind in ["json_schema", "regex", "choice"] {
        assert_eq!(
            got[kind]["ok"], 20,
            "{kind}: {}",
            got[kind]["first_failure"]
        );
    }
    // Any JSON object is unbounded: on this random-weight model an answer may still be inside
    // a string when the context ends (finish "length", counted as `cut`); every answer that
    // ended is a valid object, and most end.
    let (ok, cut) = (&got["json_object"]["ok"], &got["json_object"]["cut"]);
    assert_eq!(
        ok.as_u64().unwrap() + cut.as_u64().unwrap(),
        20,
        "json_object: {}",
        got["json_object"]["first_failure"]
    );
    assert!(
        ok.as_u64().unwrap() >= 18,
        "json_object: {ok} ended, {cut} cut"
    );
    assert_eq!(got["streamed_equals_whole"], true);
    assert_eq!(
        got["picked_equals_sampled"],
        json!(vec![true; 12]),
        "picked from the masked row where it lies = sampled from the row taken back"
    );
    assert_eq!(got["errors"]["bad_schema"], json!([400, "response_format"]));
    assert_eq!(
        got["errors"]["bad_regex"],
        json!([400, "structured_outputs"])
    );
    // Grammars the compiler would recurse through past its stack: refused, and the router
    // (which they aborted) answers the next request.
    assert_eq!(
        got["errors"]["deep_grammar"],
        json!([400, "structured_outputs"])
    );
    assert_eq!(got["errors"]["deep_refs"], json!([400, "response_format"]));
    assert_eq!(got["answers_after_errors"], true);
}

/// A one-node cluster of `fixture` serving the OpenAI API (as model `tiny`, with the router's
/// `args` more), and the JSON object `script` (a Python client) printed last against it.
async fn script_against_http(fixture: &str, args: &[&str], script: &'static str) -> Value {
    let mut spec = harness::spec(fixture_dir(fixture), 1);
    spec.router_args.extend(
        [
            "--http-listen",
            "127.0.0.1:0",
            "--served-model-name",
            "tiny",
        ]
        .map(String::from),
    );
    spec.router_args.extend(args.iter().map(|a| a.to_string()));
    let cluster = LocalCluster::start(spec).unwrap();
    wait_serving(&cluster, 1).await;
    let http = cluster.router_http_addr.clone().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &http, "tiny"])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap()
}

/// `script` against the Qwen3 fixture served with Qwen3's real chat template (from
/// `tests/fixtures/templates/hub/`) and `--reasoning-parser qwen3`.
async fn qwen3_thinking_script(script: &'static str) -> Value {
    let template = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/templates/hub/qwen3.jinja"
    );
    let args = ["--chat-template", template, "--reasoning-parser", "qwen3"];
    script_against_http(FIXTURES[1], &args, script).await
}

/// Tool calls with the official client, in the families' formats (test chat templates in
/// `tests/fixtures/templates/`, Qwen3-Coder's and GLM-4.5's layouts among them, and DeepSeek-V3.1's real one, given with
/// `--chat-template`): `tool_choice: "required"` and
/// a named function give a call whose arguments validate against the function's schema,
/// finish reason `tool_calls`, whole and streamed; the tool's result then goes back through
/// the template and the conversation continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_calls_validate_in_both_families_formats() {
    let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/templates");
    for (fixture, template) in [
        (FIXTURES[0], "deepseek_v3_tools.jinja"),
        (FIXTURES[1], "qwen3_tools.jinja"),
        // DeepSeek-V3.1's real template: its own call layout, told from V3's by the template.
        (FIXTURES[0], "hub/deepseek_v3_1.jinja"),
        // Qwen3-Coder's: XML-like calls whose values are text, typed by the schema.
        (FIXTURES[1], "qwen3_coder_tools.jinja"),
        // GLM-4.5's: key and value pairs, strings raw (its family's format, by model_type).
        (FIXTURES[3], "glm45_tools.jinja"),
        // GLM-4.7's: the same pairs back to back, told from GLM-4.5's by the template.
        (FIXTURES[3], "glm47_tools.jinja"),
        // GLM-4.7-Flash: GLM-4.7's calls by its model_type.
        (FIXTURES[4], "glm47_tools.jinja"),
        // MiniMax-M2's: <invoke> calls with text values typed by the schema, by model_type.
        (FIXTURES[5], "minimax_m2_tools.jinja"),
        // Kimi-K2's (the checkpoint's own template): call sections whose ids the model writes.
        (KIMI_FIXTURE, "kimi_k2_tools.jinja"),
    ] {
        let template = format!("{templates}/{template}");
        let got = script_against_http(
            fixture,
            &["--chat-template", &template],
            concat!(env!("CARGO_MANIFEST_DIR"), "/python/tool_calls.py"),
        )
        .await;
        let required = &got["required"];
        assert_eq!(required["finish_reason"], "tool_calls", "{template}: {got}");
        assert_eq!(required["calls"].as_array().unwrap().len(), 1, "{got}");
        assert_eq!(got["named"]["finish_reason"], "tool_calls", "{got}");
        assert_eq!(got["named"]["calls"][0][0], "get_weather", "{got}");
        assert_eq!(got["streamed"]["finish_reason"], "tool_calls", "{got}");
        assert_eq!(
            got["streamed"]["calls"], got["named"]["calls"],
            "streamed = whole"
        );
        let streamed = &got["streamed"];
        assert_eq!(streamed["arguments_equal"], true, "{template}: {got}");
        assert_eq!(streamed["have_ids"], true, "{got}");
        assert!(
            streamed["argument_deltas"][0].as_u64() > Some(2),
            "the arguments arrive piece by piece: {got}"
        );
        if ["qwen3_coder", "glm45", "glm47", "minimax_m2"]
            .iter()
            .any(|t| template.contains(t))
        {
            // A parameter at a time: `{`, the three parameters, `}` (JSON formats stream their
            // arguments as generated, in many more pieces).
            assert_eq!(streamed["argument_deltas"][0], 5, "{got}");
        }
        if template.contains("kimi_k2") {
            // The model's own ids (`functions.NAME:IDX`), the same whole and streamed.
            let id = got["named"]["ids"][0].as_str().unwrap_or("");
            let index = id.strip_prefix("functions.get_weather:").unwrap_or("");
            assert!(
                !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()),
                "{got}"
            );
            assert_eq!(got["streamed"]["ids"], got["named"]["ids"], "{got}");
        }
        assert_eq!(got["auto"]["same"], true, "auto, streamed = whole: {got}");
        if got["auto"]["has_calls"] == false {
            assert!(
                got["auto"]["content_chunks"].as_u64() > Some(1),
                "text streams in pieces: {got}"
            );
        }
        let follow = &got["follow_up"];
        assert_eq!(follow["content_is_text"], true, "{got}");
        assert!(
            follow["prompt_tokens"].as_u64() > follow["first_prompt_tokens"].as_u64(),
            "the call and its result were rendered into the prompt: {got}"
        );
    }
}

/// MiniMax-M2's template opens `<think>` in the prompt and the model writes only `</think>`:
/// under `--reasoning-parser minimax_m2` an answer cut off while thinking is all
/// `reasoning_content`; under `minimax_m2_append_think` (what MiniMax's guide runs, so
/// clients send the thinking back) it is all content, the prompt's `<think>` before the
/// model's own text, whole and streamed alike, the first streamed piece opening with it.
/// Kimi-K2-Thinking's real template under `--reasoning-parser kimi_k2` splits as `minimax_m2`
/// does (the model opens its own `<think>`, which the tiny one never writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimax_m2_and_kimi_k2_thinking_split_or_kept_in_the_content() {
    let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/templates");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/thinking_against_raw.py"
    );
    for (fixture, template, parser) in [
        (FIXTURES[5], "minimax_m2_tools.jinja", "minimax_m2"),
        (
            FIXTURES[5],
            "minimax_m2_tools.jinja",
            "minimax_m2_append_think",
        ),
        // Kimi-K2-Thinking's INT4 checkpoint, whose own template this is.
        (KIMI_INT4_FIXTURE, "hub/kimi_k2_thinking.jinja", "kimi_k2"),
    ] {
        let template = format!("{templates}/{template}");
        let args = ["--chat-template", &template, "--reasoning-parser", parser];
        let got = script_against_http(fixture, &args, script).await;
        let raw = got["raw"].as_str().expect("raw text");
        assert!(!raw.is_empty() && !raw.contains("</think>"), "{got}");
        let (whole, streamed) = (&got["whole"], &got["streamed"]);
        assert_eq!(whole["finish_reason"], "length", "{got}");
        if parser != "minimax_m2_append_think" {
            assert_eq!(whole["reasoning"], raw, "all thinking: {got}");
            assert_eq!(whole["content"], Value::Null, "{got}");
            assert_eq!(streamed["reasoning"], raw, "streamed = whole: {got}");
            assert_eq!(streamed["content"], "", "{got}");
        } else {
            let kept = format!("<think>{raw}");
            assert_eq!(whole["content"], kept.as_str(), "{got}");
            assert_eq!(whole["reasoning"], Value::Null, "nothing split off: {got}");
            assert_eq!(
                streamed["content"],
                kept.as_str(),
                "streamed = whole: {got}"
            );
            assert_eq!(streamed["reasoning"], "", "{got}");
            let first = streamed["first_content"].as_str().unwrap_or("");
            assert!(first.starts_with("<think>") && first.len() > 7, "{got}");
        }
    }
}

/// `--reasoning-parser qwen3` with Qwen3's real chat template (`--chat-template`, from
/// `tests/fixtures/templates/hub/`) through the official client: an answer forced (by a regex)
/// to think first comes back with its reasoning apart, whole and streamed alike, and hidden
/// with `include_reasoning: false`; a structured output starts after the answer's `</think>`
/// while the model may think, from the first token once the prompt closed the thinking; `chat_template_kwargs.enable_thinking = false` reaches the
/// template (a longer prompt: the empty thinking block); `continue_final_message` is served,
/// and the fields' misuses are 400s naming them (`stop_token_ids` too, which completions
/// serve); vLLM's `min_p` at 1 leaves a draw at temperature 1 only the greedy token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_apart_and_template_fields_through_the_official_client() {
    let got =
        qwen3_thinking_script(concat!(env!("CARGO_MANIFEST_DIR"), "/python/reasoning.py")).await;
    let whole = &got["whole"];
    assert_eq!(
        whole["matches"], true,
        "reasoning and content rebuild the answer: {got}"
    );
    assert!(
        whole["reasoning"].as_str().is_some_and(|r| r.len() >= 3),
        "{got}"
    );
    assert!(
        !whole["content"].as_str().unwrap_or("").contains("think"),
        "{got}"
    );
    let streamed = &got["streamed"];
    assert_eq!(
        streamed["reasoning"], whole["reasoning"],
        "streamed = whole: {got}"
    );
    assert_eq!(
        streamed["content"], whole["content"],
        "streamed = whole: {got}"
    );
    assert_eq!(
        streamed["empty_chunks"], 0,
        "no chunk carries nothing: {got}"
    );
    assert!(
        streamed["reasoning_chunks"].as_u64() > Some(1),
        "reasoning streams: {got}"
    );
    assert_eq!(got["hidden"]["has_reasoning"], false, "{got}");
    // A structured output waits for the thinking to end: free while the model may think,
    // from the first token once the prompt closed the thinking.
    let gate = &got["gate"];
    assert_eq!(gate["off"][1], "stop", "{got}");
    let off = gate["off"][0].as_str().unwrap_or("");
    assert!(
        off.len() == 3 && off.bytes().all(|b| b.is_ascii_digit()),
        "{got}"
    );
    assert_eq!(gate["on"][1], "length", "{got}");
    let on = gate["on"][0].as_str().unwrap_or("");
    assert!(
        !on.bytes().all(|b| b.is_ascii_digit()),
        "free before `</think>`: {got}"
    );
    assert_eq!(got["hidden"]["content"], whole["content"], "{got}");
    let tokens = &got["prompt_tokens"];
    assert!(
        tokens["not_thinking"].as_u64() > tokens["thinking"].as_u64(),
        "enable_thinking = false reached the template: {got}"
    );
    assert_eq!(got["continued"], json!([200, null]), "{got}");
    let errors = &got["errors"];
    assert_eq!(
        errors["continue_with_generation_prompt"],
        json!([400, "continue_final_message"]),
        "{got}"
    );
    assert_eq!(
        errors["reserved_kwarg"],
        json!([400, "chat_template_kwargs"]),
        "{got}"
    );
    assert_eq!(
        errors["request_template"],
        json!([400, "chat_template"]),
        "{got}"
    );
}

/// OpenAI's Responses API through the official client (`client.responses.create`), on Qwen3's
/// real template with its reasoning parser: each response is the chat completion its body
/// means (text, usage, reasoning apart, whole and as typed events numbered from 0), an answer
/// cut by `max_output_tokens` is `incomplete`, a forced function call is a `function_call`
/// item whose arguments validate and whose output goes back as input, `text.format` holds a
/// JSON schema, and what needs storage or is not served is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_through_the_official_client() {
    let got = qwen3_thinking_script(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/responses_client.py"
    ))
    .await;
    let plain = &got["plain"];
    assert_eq!(plain["text"], plain["chat_text"], "{got}");
    assert_eq!(plain["usage"], plain["chat_usage"], "{got}");
    assert_eq!(plain["status"], "incomplete", "{got}");
    assert_eq!(plain["incomplete_reason"], "max_output_tokens", "{got}");
    assert_eq!(plain["object"], "response");
    assert_eq!(plain["kinds"], json!(["message"]), "{got}");
    assert_eq!(plain["reasoning_tokens"], 0, "no thinking: {got}");
    let streamed = &got["plain_streamed"];
    assert_eq!(streamed["text"], plain["text"], "streamed = whole: {got}");
    assert_eq!(streamed["last_text"], plain["text"], "{got}");
    assert_eq!(streamed["last_status"], "incomplete", "{got}");
    assert_eq!(streamed["numbered"], true, "{got}");
    let types = streamed["types"].as_array().unwrap();
    assert_eq!(types[0], "response.created");
    assert_eq!(types[1], "response.in_progress");
    assert!(
        types
            .iter()
            .filter(|t| *t == "response.output_text.delta")
            .count()
            > 1,
        "text streams in pieces: {got}"
    );

    let logprobs = &got["logprobs"];
    assert_eq!(logprobs["whole"], logprobs["chat"], "{got}");
    assert_eq!(logprobs["streamed"], logprobs["whole"], "{got}");
    assert_eq!(logprobs["whole"].as_array().unwrap().len(), 6, "{got}");
    assert_eq!(
        logprobs["whole"][0][2].as_array().unwrap().len(),
        2,
        "{got}"
    );
    assert_eq!(
        logprobs["delta_count"], 6,
        "every token's logprobs once: {got}"
    );

    let reasoning = &got["reasoning"];
    assert_eq!(reasoning["kinds"], json!(["reasoning", "message"]), "{got}");
    assert_eq!(reasoning["reasoning"], reasoning["chat_reasoning"], "{got}");
    assert_eq!(reasoning["text"], reasoning["chat_text"], "{got}");
    // The thinking's tokens: its text's and its two tags', fewer than the answer's.
    let thinking = reasoning["tokens"][0].as_u64().unwrap_or(0);
    assert!(
        thinking >= 3 && thinking < reasoning["tokens"][1].as_u64().unwrap_or(0),
        "{got}"
    );
    let reasoning_streamed = &got["reasoning_streamed"];
    assert_eq!(
        reasoning_streamed["reasoning_tokens"], reasoning["tokens"][0],
        "streamed = whole: {got}"
    );
    assert_eq!(
        reasoning_streamed["reasoning"], reasoning["reasoning"],
        "{got}"
    );
    assert_eq!(reasoning_streamed["text"], reasoning["text"], "{got}");

    let call = &got["call"];
    assert_eq!(call["name"], "get_weather", "{got}");
    assert_eq!(call["valid"], true, "{got}");
    assert!(
        call["kinds"]
            .as_array()
            .unwrap()
            .contains(&json!("function_call")),
        "{got}"
    );
    let call_streamed = &got["call_streamed"];
    assert_eq!(call_streamed["has_arguments_done"], true, "{got}");
    assert_eq!(
        call_streamed["calls"], call["calls"],
        "streamed = whole: {got}"
    );
    assert_eq!(
        call_streamed["streamed_arguments"][0], call["calls"][0][1],
        "the deltas add up to the arguments: {got}"
    );
    assert!(
        call_streamed["argument_deltas"].as_u64() > Some(2),
        "the arguments arrive piece by piece: {got}"
    );
    let follow = &got["follow_up"];
    assert!(
        follow["input_tokens"].as_u64() > follow["first_input_tokens"].as_u64(),
        "the call and its output were rendered into the prompt: {got}"
    );
    assert_eq!(got["formatted"], true, "{got}");
    let errors = &got["errors"];
    assert_eq!(
        errors["previous_response_id"],
        json!([400, "previous_response_id"])
    );
    assert_eq!(errors["hosted_tool"], json!([400, "tools"]));
    assert_eq!(errors["image"], json!([400, "input"]));

    let stored = &got["stored"];
    assert_eq!(stored["second"], stored["chat"], "{got}");
    assert_eq!(
        stored["second_input_tokens"], stored["chat_input_tokens"],
        "the conversation so far is the prompt: {got}"
    );
    assert!(
        stored["third_input_tokens"].as_u64() > stored["second_input_tokens"].as_u64(),
        "a streamed third turn sees the first two: {got}"
    );
    assert_eq!(stored["third_text"][0], stored["third_text"][1], "{got}");
    assert!(
        stored["previous"]
            .as_str()
            .unwrap_or("")
            .starts_with("resp_"),
        "{got}"
    );
    assert_eq!(stored["store"], json!([true, false]), "{got}");
    assert_eq!(stored["retrieved"], json!([true, true]), "{got}");
    assert_eq!(
        stored["input_items"],
        json!([["message", "user", "Again."]]),
        "{got}"
    );
    assert_eq!(stored["gone"], json!([404, 404, 404]), "{got}");
    assert_eq!(
        stored["after_delete"],
        json!([400, "previous_response_id"]),
        "{got}"
    );
}
