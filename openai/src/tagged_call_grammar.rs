//! The grammar that forces a call whose arguments are tagged key and value pairs, as
//! Qwen3-Coder (`xml_tool_calls.rs`) and GLM-4.5 (`glm_tool_calls.rs`) write them: each
//! function's pairs in its schema's order (the required ones present), each value as its
//! type allows (an enum's values; integers, numbers, booleans, objects and arrays as their
//! JSON schema allows, bounds included; text otherwise, lazily up to the value's close).

use serde_json::{Map, Value};

use crate::function_calls::FunctionSpec;

/// Where one syntax puts its tags.
pub struct TaggedCallSyntax {
    /// A call's text before its pairs, for a function's name.
    pub call_open: fn(&str) -> String,
    /// A call's text after its pairs.
    pub call_close: &'static str,
    /// A pair's text before its value, for a key.
    pub pair_open: fn(&str) -> String,
    /// A pair's text after its value.
    pub value_close: &'static str,
    /// The Lark rule `text_value`: any text up to (and with) `value_close`.
    pub text_value: &'static str,
    /// A pair with any key, for functions without a schema: the Lark rule's body.
    pub any_pair: &'static str,
}

fn literal(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// A Lark grammar (llguidance's dialect) for one call to one of `functions` in `syntax`
/// (several, a newline apart, when `parallel`).
pub fn grammar(syntax: &TaggedCallSyntax, functions: &[FunctionSpec], parallel: bool) -> String {
    let mut rules = vec![format!("text_value[lazy]: {}", syntax.text_value)];
    let mut alternatives = Vec::new();
    for (i, f) in functions.iter().enumerate() {
        let empty = Map::new();
        let schema = f.parameters.as_ref();
        let properties = schema
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let required: Vec<&str> = schema
            .and_then(|s| s.get("required"))
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut body = Vec::new();
        for (j, (key, property)) in properties.iter().enumerate() {
            let rule = format!("f{i}p{j}");
            let open = literal(&(syntax.pair_open)(key));
            let value = value_rule(property, syntax.value_close);
            rules.push(format!("{rule}: {open} {value}"));
            body.push(if required.contains(&key.as_str()) {
                rule
            } else {
                format!("{rule}?")
            });
        }
        if properties.is_empty() {
            // Any arguments: keys as the model writes them, values as text.
            rules.push(format!("f{i}any: {}", syntax.any_pair));
            body.push(format!("f{i}any*"));
        }
        let open = literal(&(syntax.call_open)(&f.name));
        let close = literal(syntax.call_close);
        rules.push(format!("f{i}: {open} {} {close}", body.join(" ")));
        alternatives.push(format!("f{i}"));
    }
    let start = if parallel {
        "start: call (\"\\n\" call)*"
    } else {
        "start: call"
    };
    std::iter::once(start.to_string())
        .chain(std::iter::once(format!(
            "call: {}",
            alternatives.join(" | ")
        )))
        .chain(rules)
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a value of `property`'s type may be, then `close`; text values are the grammar's
/// `text_value` rule (which ends with the close).
fn value_rule(property: &Value, close: &str) -> String {
    let close = literal(close);
    if let Some(values) = property.get("enum").and_then(Value::as_array) {
        let choices: Vec<String> = values
            .iter()
            .map(|v| match v {
                Value::String(s) => literal(s),
                other => literal(&other.to_string()),
            })
            .collect();
        if !choices.is_empty() {
            return format!("({}) {close}", choices.join(" | "));
        }
    }
    let kind = property.get("type").and_then(Value::as_str).unwrap_or("");
    if ["integer", "number", "boolean", "object", "array"].contains(&kind) {
        // Their JSON is the text the parsers read back (`5`, `2.5`, `true`, `{...}`), and
        // JSON schema bounds them (an integer's minimum, an object's properties).
        let mut schema = property.clone();
        if let Value::Object(fields) = &mut schema {
            fields
                .entry("x-guidance")
                .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
        }
        return format!("%json {schema} {close}");
    }
    "text_value".to_string()
}
