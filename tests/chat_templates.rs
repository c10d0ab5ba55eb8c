//! Real models' chat templates (Qwen3, Qwen3-Coder, DeepSeek-V3-0324, DeepSeek-V3.1, GLM-4.5,
//! Kimi-K2-Thinking, Mixtral-8x7B-Instruct, in `tests/fixtures/templates/hub/`; and the Kimi-K2
//! fixture's template) render exactly as transformers
//! renders them: every case of `cases.json` goes through the server's own parsing of a chat
//! body and its template, and must give `golden.json`'s prompt (made by transformers with `make_golden.py`), or be refused
//! where transformers fails. The prompt is the model's input: a space, a key order or a float's
//! spelling that differs is a different conversation from the one it was trained on.

use std::path::PathBuf;

use moe_model::chat_template::ChatTemplate;
use moe_openai::parse_chat_body;
use serde_json::Value;

fn hub_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/templates/hub")
}

fn render(case: &Value) -> Result<String, String> {
    let text = |key: &str| case[key].as_str().unwrap_or_default().to_string();
    let source = std::fs::read_to_string(hub_dir().join(text("template"))).expect("template");
    let template = ChatTemplate::new(&source, Some(&text("bos_token")), Some(&text("eos_token")))
        .expect("the template compiles");
    let mut body = case["request"].clone();
    body["model"] = "m".into();
    let body = serde_json::to_vec(&body).expect("json");
    let chat = parse_chat_body(&body, "m", true).map_err(|e| e.to_string())?;
    chat.prompt_with_request_tools(&template)
        .map_err(|e| e.to_string())
}

#[test]
fn real_chat_templates_render_as_transformers_renders_them() {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(hub_dir().join("golden.json")).expect("golden.json"),
    )
    .expect("golden.json parses");
    let cases = golden["cases"].as_array().expect("cases");
    assert!(cases.len() >= 28, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let expected = &case["expected"];
        match (render(case), expected["prompt"].as_str()) {
            (Ok(prompt), Some(want)) if prompt == want => {}
            (Err(_), None) => {}
            (got, _) => failures.push(format!(
                "{name}:\n  transformers: {expected}\n  ours:         {got:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
