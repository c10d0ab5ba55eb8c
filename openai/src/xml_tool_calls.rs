//! XML-like tool calls whose parameter values are raw text, typed by the function's JSON
//! schema when read back: Qwen3-Coder's (vLLM's `qwen3_coder` parser) and MiniMax-M2's
//! (`minimax_m2`), the same structure under other tags.
//!
//! ```text
//! <tool_call>                        <minimax:tool_call>
//! <function=NAME>                    <invoke name="NAME">
//! <parameter=KEY>                    <parameter name="KEY">VALUE</parameter>
//! VALUE                              </invoke>
//! </parameter>                       </minimax:tool_call>
//! </function>
//! </tool_call>
//! ```
//!
//! A block may hold several calls (MiniMax-M2 writes parallel calls so). A value becomes JSON
//! as vLLM's parsers make it: `null` (any case) is null; a key the schema does not name, or a
//! `string`-like type, stays text; integer, number and boolean types are parsed (text where
//! that fails); objects, arrays and other types are read as JSON (text where that fails). The
//! arguments are written as Python's `json.dumps` writes them, as vLLM returns them; a stream
//! sends `{`, then each parameter as its close arrives, then `}`: fragments that add up to the
//! whole answer's arguments.

use serde_json::{Map, Value};

use crate::function_calls::{FunctionSpec, ParsedCall, PartialCall};
use crate::tagged_call_grammar::{self, TaggedCallSyntax};

/// Where one syntax puts its tags.
pub struct XmlTags {
    /// Opens and closes a block of calls.
    pub block_open: &'static str,
    block_close: &'static str,
    /// Opens a call up to its name; `name_end` ends the name; `function_close` the call.
    function_open: &'static str,
    name_end: &'static str,
    function_close: &'static str,
    /// The same for a parameter and its key.
    parameter_open: &'static str,
    key_end: &'static str,
    parameter_close: &'static str,
    /// The tags again, for the grammar that forces a call.
    syntax: TaggedCallSyntax,
}

/// Qwen3-Coder's tags.
pub const QWEN3_CODER: XmlTags = XmlTags {
    block_open: "<tool_call>",
    block_close: "</tool_call>",
    function_open: "<function=",
    name_end: ">",
    function_close: "</function>",
    parameter_open: "<parameter=",
    key_end: ">",
    parameter_close: "</parameter>",
    syntax: TaggedCallSyntax {
        call_open: |name| format!("<tool_call>\n<function={name}>\n"),
        call_close: "</function>\n</tool_call>",
        pair_open: |key| format!("<parameter={key}>\n"),
        value_close: "\n</parameter>\n",
        // Any text up to the first "\n</parameter>\n": a value that is text.
        text_value: r#"/(?s:.*)\n<\/parameter>\n/"#,
        any_pair: r#""<parameter=" /[A-Za-z0-9_.\-]+/ ">\n" text_value"#,
    },
};

/// MiniMax-M2's tags.
pub const MINIMAX_M2: XmlTags = XmlTags {
    block_open: "<minimax:tool_call>",
    block_close: "</minimax:tool_call>",
    function_open: "<invoke name=\"",
    name_end: "\">",
    function_close: "</invoke>",
    parameter_open: "<parameter name=\"",
    key_end: "\">",
    parameter_close: "</parameter>",
    syntax: TaggedCallSyntax {
        call_open: |name| format!("<minimax:tool_call>\n<invoke name=\"{name}\">\n"),
        call_close: "</invoke>\n</minimax:tool_call>",
        pair_open: |key| format!("<parameter name=\"{key}\">"),
        value_close: "</parameter>\n",
        text_value: r#"/(?s:.*)<\/parameter>\n/"#,
        any_pair: r#""<parameter name=\"" /[A-Za-z0-9_.\-]+/ "\">" text_value"#,
    },
};

/// The text before the first call and the calls, when `text` holds at least one call inside
/// a block; `None` when it is plain content.
pub fn parse(
    tags: &XmlTags,
    text: &str,
    functions: &[FunctionSpec],
) -> Option<(String, Vec<ParsedCall>)> {
    let first = text.find(tags.block_open)?;
    let mut calls = Vec::new();
    for block in text[first..].split(tags.block_open).skip(1) {
        let block = block.split(tags.block_close).next().unwrap_or(block);
        for call in block.split(tags.function_open).skip(1) {
            if let Some(call) = read_function(tags, call, functions, true) {
                calls.push(ParsedCall::from(call));
            }
        }
    }
    (!calls.is_empty()).then(|| (text[..first].trim_end().to_string(), calls))
}

/// The calls `text` (an answer so far) has started, as far as they go: a call counts from its
/// complete name, its arguments grow a parameter at a time.
pub fn partial_calls(tags: &XmlTags, text: &str, functions: &[FunctionSpec]) -> Vec<PartialCall> {
    let mut calls = Vec::new();
    let Some(first) = text.find(tags.block_open) else {
        return calls;
    };
    for block in text[first..].split(tags.block_open).skip(1) {
        let block = block.split(tags.block_close).next().unwrap_or(block);
        for call in block.split(tags.function_open).skip(1) {
            let Some(call) = read_function(tags, call, functions, false) else {
                return calls;
            };
            let complete = call.complete;
            calls.push(call);
            if !complete {
                return calls;
            }
        }
    }
    calls
}

/// One call from just after its function tag's opening: its name once `name_end` closes it,
/// and its parameters: all of them once the function's close came (or, with `whole`, the
/// block ended), else those a parameter close ended before the first that is still open.
fn read_function(
    tags: &XmlTags,
    call: &str,
    functions: &[FunctionSpec],
    whole: bool,
) -> Option<PartialCall> {
    let (name, body) = call.split_once(tags.name_end)?;
    let name = name.trim().to_string();
    let (body, complete) = match body.find(tags.function_close) {
        Some(end) => (&body[..end], true),
        None => (body, whole),
    };
    let properties = functions
        .iter()
        .find(|f| f.name == name)
        .and_then(|f| f.parameters.as_ref())
        .map(|p| p.get("properties").unwrap_or(p));
    let mut arguments = String::from("{");
    for (i, (key, raw, closed)) in parameters(tags, body).into_iter().enumerate() {
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
        id: None,
    })
}

/// A function body's parameters in order: key, value (one newline trimmed each side) and
/// whether a parameter close ended it (else the next parameter, the function's close or the
/// end did, as vLLM's parser reads a malformed one).
fn parameters<'a>(tags: &XmlTags, body: &'a str) -> Vec<(&'a str, &'a str, bool)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find(tags.parameter_open) {
        let after = &rest[at + tags.parameter_open.len()..];
        let Some((key, value)) = after.split_once(tags.key_end) else {
            break;
        };
        let close = value.find(tags.parameter_close);
        let next = value.find(tags.parameter_open);
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

/// A Lark grammar (llguidance's dialect) for one call to one of `functions` in `tags`' syntax
/// (several, a newline apart, when `parallel`): the function's name, its parameters in the
/// schema's order, each value as its type allows (`tagged_call_grammar.rs`).
pub fn grammar(tags: &XmlTags, functions: &[FunctionSpec], parallel: bool) -> String {
    tagged_call_grammar::grammar(&tags.syntax, functions, parallel)
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
        let (content, calls) = parse(&QWEN3_CODER, ANSWER, &functions()).unwrap();
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
            parse(&QWEN3_CODER, odd, &functions()).unwrap().1[0].arguments,
            "{\"limit\": \"ten\"}"
        );
        assert_eq!(
            parse(&QWEN3_CODER, odd, &[]).unwrap().1[0].arguments,
            "{\"limit\": \"ten\"}"
        );
        assert!(parse(
            &QWEN3_CODER,
            "plain text, <tool_call> never used",
            &functions()
        )
        .is_none());
        assert!(parse(&QWEN3_CODER, "no calls at all", &functions()).is_none());
    }

    #[test]
    fn several_calls_and_a_malformed_parameter_are_read_as_vllm_reads_them() {
        let text = "<tool_call>\n<function=a>\n<parameter=x>\n1\n<parameter=y>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=b>\n</function>\n</tool_call>";
        let (content, calls) = parse(&QWEN3_CODER, text, &[]).unwrap();
        assert_eq!(content, "");
        let got: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(got, [("a", "{\"x\": \"1\", \"y\": \"2\"}"), ("b", "{}")]);
    }

    /// MiniMax-M2's layout: several calls in one block, keys and names in quotes, values typed
    /// as Qwen3-Coder's; streamed, each call's arguments grow as prefixes of the whole.
    #[test]
    fn minimax_m2_calls_are_read_whole_and_streamed() {
        let text = "Checking.\n<minimax:tool_call>\n<invoke name=\"search\">\n<parameter name=\"query\">rust \"moe\"</parameter>\n<parameter name=\"limit\">3</parameter>\n</invoke>\n<invoke name=\"search\">\n<parameter name=\"exact\">false</parameter>\n</invoke>\n</minimax:tool_call>";
        let (content, calls) = parse(&MINIMAX_M2, text, &functions()).unwrap();
        assert_eq!(content, "Checking.");
        let got: Vec<&str> = calls.iter().map(|c| c.arguments.as_str()).collect();
        assert_eq!(
            got,
            [
                "{\"query\": \"rust \\\"moe\\\"\", \"limit\": 3}",
                "{\"exact\": false}"
            ]
        );
        assert!(parse(
            &MINIMAX_M2,
            "<tool_call>\n<function=search>\n</function>\n</tool_call>",
            &functions()
        )
        .is_none());
        for (i, whole) in calls.iter().enumerate() {
            let seen = crate::function_calls::streamed_arguments(text, &whole.arguments, |t| {
                partial_calls(&MINIMAX_M2, t, &functions())
                    .into_iter()
                    .skip(i)
                    .take(1)
                    .collect()
            });
            assert_eq!(seen.last(), Some(&whole.arguments), "call {i}: {seen:#?}");
        }
        assert!(partial_calls(
            &MINIMAX_M2,
            "<minimax:tool_call>\n<invoke name=\"sea",
            &functions()
        )
        .is_empty());
    }

    /// Streamed, a call shows its name once complete and its arguments a parameter at a time,
    /// always a prefix of the whole answer's.
    #[test]
    fn partial_calls_grow_a_parameter_at_a_time() {
        let whole = parse(&QWEN3_CODER, ANSWER, &functions()).unwrap().1;
        assert_eq!(whole[0].name, "search");
        let seen = crate::function_calls::streamed_arguments(ANSWER, &whole[0].arguments, |text| {
            partial_calls(&QWEN3_CODER, text, &functions())
        });
        assert_eq!(seen.first().map(String::as_str), Some("{"));
        assert_eq!(seen.last(), Some(&whole[0].arguments));
        assert_eq!(seen.len(), 1 + 8 + 1, "{seen:#?}");
        assert!(partial_calls(&QWEN3_CODER, "<tool_call>\n<function=sea", &functions()).is_empty());
    }
}
