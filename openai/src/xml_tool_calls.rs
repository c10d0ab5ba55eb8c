//! Qwen3-Coder's tool calls (vLLM's `qwen3_coder` parser): XML-like blocks whose parameter
//! values are raw text, typed by the function's JSON schema when read back.
//!
//! ```text
//! <tool_call>
//! <function=NAME>
//! <parameter=KEY>
//! VALUE
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! A value becomes JSON as vLLM's parser makes it: `null` (any case) is null; a key the schema
//! does not name, or a `string`-like type, stays text; integer, number and boolean types are
//! parsed (text where that fails); objects, arrays and other types are read as JSON (text
//! where that fails). The arguments are written as Python's `json.dumps` writes them, as
//! vLLM returns them; a stream sends `{`, then each parameter as its `</parameter>` arrives,
//! then `}`: fragments that add up to the whole answer's arguments.

use serde_json::{Map, Value};

use crate::function_calls::{FunctionSpec, ParsedCall, PartialCall};
use crate::tagged_call_grammar::{self, TaggedCallSyntax};

pub const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const FUNCTION_OPEN: &str = "<function=";
const FUNCTION_CLOSE: &str = "</function>";
const PARAMETER_OPEN: &str = "<parameter=";
const PARAMETER_CLOSE: &str = "</parameter>";

/// The text before the first call and the calls, when `text` holds at least one
/// `<function=...>` inside a `<tool_call>`; `None` when it is plain content.
pub fn parse(text: &str, functions: &[FunctionSpec]) -> Option<(String, Vec<ParsedCall>)> {
    let first = text.find(CALL_OPEN)?;
    let mut calls = Vec::new();
    for block in text[first..].split(CALL_OPEN).skip(1) {
        let block = block.split(CALL_CLOSE).next().unwrap_or(block);
        let Some(call) = read_function(block, functions, true) else {
            continue;
        };
        calls.push(ParsedCall {
            name: call.name,
            arguments: call.arguments,
        });
    }
    (!calls.is_empty()).then(|| (text[..first].trim_end().to_string(), calls))
}

/// The calls `text` (an answer so far) has started, as far as they go: a call counts from its
/// complete `<function=NAME>`, its arguments grow a parameter at a time.
pub fn partial_calls(text: &str, functions: &[FunctionSpec]) -> Vec<PartialCall> {
    let mut calls = Vec::new();
    let Some(first) = text.find(CALL_OPEN) else {
        return calls;
    };
    for block in text[first..].split(CALL_OPEN).skip(1) {
        let block = block.split(CALL_CLOSE).next().unwrap_or(block);
        let Some(call) = read_function(block, functions, false) else {
            break;
        };
        let complete = call.complete;
        calls.push(call);
        if !complete {
            break;
        }
    }
    calls
}

/// One call's function: its name once `>` closes it, and its parameters: all of them once
/// `</function>` came (or, with `whole`, the block ended), else those a `</parameter>` closed
/// before the first that is still open.
fn read_function(block: &str, functions: &[FunctionSpec], whole: bool) -> Option<PartialCall> {
    let named = &block[block.find(FUNCTION_OPEN)? + FUNCTION_OPEN.len()..];
    let (name, body) = named.split_once('>')?;
    let name = name.trim().to_string();
    let (body, complete) = match body.find(FUNCTION_CLOSE) {
        Some(end) => (&body[..end], true),
        None => (body, whole),
    };
    let properties = functions
        .iter()
        .find(|f| f.name == name)
        .and_then(|f| f.parameters.as_ref())
        .map(|p| p.get("properties").unwrap_or(p));
    let mut arguments = String::from("{");
    for (i, (key, raw, closed)) in parameters(body).into_iter().enumerate() {
        if !closed && !complete {
            break;
        }
        if i > 0 {
            arguments.push_str(", ");
        }
        arguments.push_str(&dumps(&Value::String(key.to_string())));
        arguments.push_str(": ");
        arguments.push_str(&dumps(&typed_value(key, raw, properties)));
    }
    if complete {
        arguments.push('}');
    }
    Some(PartialCall {
        name,
        arguments,
        complete,
    })
}

/// A function body's parameters in order: key, value (one newline trimmed each side) and
/// whether a `</parameter>` closed it (else the next parameter, `</function>` or the end did,
/// as vLLM's parser reads a malformed one).
fn parameters(body: &str) -> Vec<(&str, &str, bool)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find(PARAMETER_OPEN) {
        let after = &rest[at + PARAMETER_OPEN.len()..];
        let Some((key, value)) = after.split_once('>') else {
            break;
        };
        let close = value.find(PARAMETER_CLOSE);
        let next = value.find(PARAMETER_OPEN);
        let (end, closed) = match (close, next) {
            (Some(c), Some(n)) if n < c => (n, false),
            (Some(c), _) => (c, true),
            (None, Some(n)) => (n, false),
            (None, None) => (value.len(), false),
        };
        let raw = &value[..end];
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        out.push((key.trim(), raw, closed));
        rest = &value[end..];
    }
    out
}

/// A parameter's value as JSON, by its type in the function's `properties`.
fn typed_value(key: &str, raw: &str, properties: Option<&Value>) -> Value {
    if raw.eq_ignore_ascii_case("null") {
        return Value::Null;
    }
    let text = || Value::String(raw.to_string());
    let Some(schema) = properties.and_then(|p| p.get(key)) else {
        return text();
    };
    let kind = match schema.get("type") {
        Some(Value::String(t)) => t.trim().to_lowercase(),
        // ["integer", "null"]: the first type that is not null.
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("string")
            .to_lowercase(),
        _ => "string".into(),
    };
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| kind.starts_with(p));
    if ["string", "str", "text", "varchar", "char", "enum"].contains(&kind.as_str()) {
        text()
    } else if starts(&["int", "uint", "long", "short", "unsigned"]) {
        raw.trim()
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| text())
    } else if starts(&["num", "float"]) {
        match raw.trim().parse::<f64>() {
            Ok(x) if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.0e15 => Value::from(x as i64),
            Ok(x) => serde_json::Number::from_f64(x).map_or_else(text, Value::Number),
            Err(_) => text(),
        }
    } else if ["boolean", "bool", "binary"].contains(&kind.as_str()) {
        Value::Bool(raw.trim().eq_ignore_ascii_case("true"))
    } else {
        serde_json::from_str(raw).unwrap_or_else(|_| text())
    }
}

/// `json.dumps(value, ensure_ascii=False)`: Python's `", "` and `": "` separators.
pub fn dumps(value: &Value) -> String {
    let mut out = String::new();
    write_python(&mut out, value);
    out
}

fn write_python(out: &mut String, value: &Value) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python(out, item);
            }
            out.push(']');
        }
        Value::Object(fields) => write_object(out, fields),
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn write_object(out: &mut String, fields: &Map<String, Value>) {
    out.push('{');
    for (i, (key, item)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&Value::String(key.clone()).to_string());
        out.push_str(": ");
        write_python(out, item);
    }
    out.push('}');
}

/// Qwen3-Coder's tags, for the grammar that forces a call.
const SYNTAX: TaggedCallSyntax = TaggedCallSyntax {
    call_open: |name| format!("{CALL_OPEN}\n{FUNCTION_OPEN}{name}>\n"),
    call_close: "</function>\n</tool_call>",
    pair_open: |key| format!("{PARAMETER_OPEN}{key}>\n"),
    value_close: "\n</parameter>\n",
    // Any text up to the first "\n</parameter>\n": a value that is text.
    text_value: r#"/(?s:.*)\n<\/parameter>\n/"#,
    any_pair: r#""<parameter=" /[A-Za-z0-9_.\-]+/ ">\n" text_value"#,
};

/// A Lark grammar (llguidance's dialect) for one call to one of `functions` in this syntax
/// (several, a newline apart, when `parallel`): the function's name, its parameters in the
/// schema's order, each value as its type allows (`tagged_call_grammar.rs`).
pub fn grammar(functions: &[FunctionSpec], parallel: bool) -> String {
    tagged_call_grammar::grammar(&SYNTAX, functions, parallel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn functions() -> Vec<FunctionSpec> {
        vec![FunctionSpec {
            name: "search".into(),
            description: None,
            parameters: Some(json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "exact": {"type": "boolean"},
                    "filters": {"type": "object"},
                    "tags": {"type": "array"},
                    "note": {"type": ["string", "null"]}
                },
                "required": ["query"]
            })),
        }]
    }

    const ANSWER: &str = "Let me look.\n<tool_call>\n<function=search>\n<parameter=query>\nfn main() {\n    println!(\"</p>\");\n}\n</parameter>\n<parameter=limit>\n10\n</parameter>\n<parameter=ratio>\n2.50\n</parameter>\n<parameter=exact>\nTrue\n</parameter>\n<parameter=filters>\n{\"lang\": \"rust\"}\n</parameter>\n<parameter=tags>\n[1, \"a\"]\n</parameter>\n<parameter=note>\nNULL\n</parameter>\n<parameter=extra>\n7\n</parameter>\n</function>\n</tool_call>";

    #[test]
    fn values_are_typed_by_the_schema_and_written_as_python_does() {
        let (content, calls) = parse(ANSWER, &functions()).unwrap();
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "search");
        assert_eq!(
            calls[0].arguments,
            "{\"query\": \"fn main() {\\n    println!(\\\"</p>\\\");\\n}\", \"limit\": 10, \
             \"ratio\": 2.5, \"exact\": true, \"filters\": {\"lang\": \"rust\"}, \
             \"tags\": [1, \"a\"], \"note\": null, \"extra\": \"7\"}"
        );
        // Values that do not parse as their type stay text; an unknown function's are text.
        let odd = "<tool_call>\n<function=search>\n<parameter=limit>\nten\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(
            parse(odd, &functions()).unwrap().1[0].arguments,
            "{\"limit\": \"ten\"}"
        );
        assert_eq!(
            parse(odd, &[]).unwrap().1[0].arguments,
            "{\"limit\": \"ten\"}"
        );
        assert!(parse("plain text, <tool_call> never used", &functions()).is_none());
        assert!(parse("no calls at all", &functions()).is_none());
    }

    #[test]
    fn several_calls_and_a_malformed_parameter_are_read_as_vllm_reads_them() {
        let text = "<tool_call>\n<function=a>\n<parameter=x>\n1\n<parameter=y>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=b>\n</function>\n</tool_call>";
        let (content, calls) = parse(text, &[]).unwrap();
        assert_eq!(content, "");
        let got: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(got, [("a", "{\"x\": \"1\", \"y\": \"2\"}"), ("b", "{}")]);
    }

    /// Streamed, a call shows its name once complete and its arguments a parameter at a time,
    /// always a prefix of the whole answer's.
    #[test]
    fn partial_calls_grow_a_parameter_at_a_time() {
        let whole = parse(ANSWER, &functions()).unwrap().1;
        assert_eq!(whole[0].name, "search");
        let seen = crate::function_calls::streamed_arguments(ANSWER, &whole[0].arguments, |text| {
            partial_calls(text, &functions())
        });
        assert_eq!(seen.first().map(String::as_str), Some("{"));
        assert_eq!(seen.last(), Some(&whole[0].arguments));
        assert_eq!(seen.len(), 1 + 8 + 1, "{seen:#?}");
        assert!(partial_calls("<tool_call>\n<function=sea", &functions()).is_empty());
    }
}
