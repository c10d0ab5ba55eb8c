//! OpenAI (and vLLM) request parameters that would change the output and that this server
//! does not implement: a 400 naming the parameter, never a silent ignore (a client that asks
//! for a function call must not get prose it believes was constrained). A parameter at its
//! no-op value (`null`, `0`, `false`, `{}`, `[]`, ...) passes, since clients and frameworks
//! send those by default. Bookkeeping fields (`user`, `metadata`, `store`, `service_tier`,
//! `parallel_tool_calls`) and unknown vendor extensions are ignored, as OpenAI-compatible
//! servers do.

use serde_json::{Map, Value};

use crate::error::RouterError;

/// Parameters that change what is generated and are not implemented.
const NOT_IMPLEMENTED: [&str; 16] = [
    "functions",
    "function_call",
    "best_of",
    "suffix",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    // vLLM's per-request template: refused (vLLM too, unless trusted), not silently replaced
    // by the server's own.
    "chat_template",
    // vLLM's extensions that change the answer or its shape.
    "use_beam_search",
    "length_penalty",
    "logits_processors",
    "guided_whitespace_pattern",
    "spaces_between_special_tokens",
    // On chat (completions read it): the last message echoed in front of the answer.
    "echo",
];

/// The first field of `extra` (the request's fields this server does not read) that asks for
/// something not implemented, as a 400 naming it.
pub fn refuse_unimplemented(extra: &Map<String, Value>) -> Result<(), RouterError> {
    for &name in &NOT_IMPLEMENTED {
        if let Some(value) = extra.get(name) {
            if !is_no_op(name, value) {
                return Err(RouterError::invalid(
                    name,
                    format!("`{name}` is not supported by this server"),
                ));
            }
        }
    }
    Ok(())
}

/// Whether `value` leaves the output as if `name` were absent.
fn is_no_op(name: &str, value: &Value) -> bool {
    // vLLM's default for this one is true: false is the change.
    if name == "spaces_between_special_tokens" {
        return matches!(value, Value::Null | Value::Bool(true));
    }
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => {
            let neutral = if matches!(name, "best_of" | "length_penalty") {
                1.0
            } else {
                0.0
            };
            n.as_f64() == Some(neutral)
        }
        Value::String(s) => s.is_empty(),
        Value::Array(items) => {
            items.is_empty() || (name == "modalities" && items == &[Value::from("text")])
        }
        Value::Object(fields) => fields.is_empty(),
        Value::Bool(true) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: Value) -> Result<(), RouterError> {
        refuse_unimplemented(body.as_object().expect("an object"))
    }

    #[test]
    fn output_changing_parameters_are_refused_by_name() {
        for (body, param) in [
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"chat_template": "{{ 'x' }}"}), "chat_template"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"suffix": "x"}), "suffix"),
            (json!({"best_of": 3}), "best_of"),
            (json!({"use_beam_search": true}), "use_beam_search"),
            (json!({"length_penalty": 0.5}), "length_penalty"),
            (
                json!({"spaces_between_special_tokens": false}),
                "spaces_between_special_tokens",
            ),
            (json!({"echo": true}), "echo"),
        ] {
            match check(body.clone()) {
                Err(RouterError::Invalid { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn no_op_values_and_bookkeeping_fields_pass() {
        check(json!({
            "chat_template": "",
            "best_of": 1,
            "length_penalty": 1.0,
            "use_beam_search": false,
            "spaces_between_special_tokens": true,
            "echo": false,
            "modalities": ["text"],
            "functions": null,
            "user": "u-1",
            "metadata": {"k": "v"},
            "store": true,
            "parallel_tool_calls": true,
            "some_vendor_extension": 7
        }))
        .unwrap();
    }
}
