//! GLM-4.5's tool calls (vLLM's `glm45` parser): the function's name on the call's first
//! line, then key and value pairs; a value is raw text where the function's schema types the
//! key as a string, JSON otherwise (raw text where it does not parse).
//!
//! ```text
//! <tool_call>NAME
//! <arg_key>KEY</arg_key>
//! <arg_value>VALUE</arg_value>
//! </tool_call>
//! ```
//!
//! GLM-4.7 (vLLM's `glm47`) writes the same tags with nothing between them
//! (`<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>`, and
//! `<tool_call>NAME</tool_call>` without arguments): the parser reads both layouts; only the
//! grammar that forces a call differs ([`Layout`]).
//!
//! The arguments are written as vLLM writes them (Python's `json.dumps`, `ensure_ascii=False`);
//! a stream sends `{`, then each pair as its `</arg_value>` arrives, then `}` once the call
//! closes: fragments that add up to the whole answer's arguments. A value that is not JSON is
//! read as a Python literal next (`True`, `'text'`, `(1, 2)`), as vLLM's `ast.literal_eval`
//! fallback reads it (`python_literal.rs`).

use serde_json::Value;

use crate::function_calls::{FunctionSpec, ParsedCall, PartialCall};
use crate::python_literal;
use crate::tagged_call_grammar::{self, TaggedCallSyntax};
use crate::xml_tool_calls::dumps;

pub const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const KEY_OPEN: &str = "<arg_key>";
const KEY_CLOSE: &str = "</arg_key>";
const VALUE_OPEN: &str = "<arg_value>";
const VALUE_CLOSE: &str = "</arg_value>";

/// The text before the first call and the calls, when `text` holds at least one named call;
/// `None` when it is plain content. A last call the answer left open counts with the pairs
/// it closed (as a stream showed it).
pub fn parse(text: &str, functions: &[FunctionSpec]) -> Option<(String, Vec<ParsedCall>)> {
    let first = text.find(CALL_OPEN)?;
    let calls: Vec<ParsedCall> = blocks(&text[first..])
        .filter_map(|(block, _)| read_call(block, functions, true))
        .map(ParsedCall::from)
        .collect();
    (!calls.is_empty()).then(|| (text[..first].trim_end().to_string(), calls))
}

/// The calls `text` (an answer so far) has started, as far as they go: a call counts once its
/// name line is complete, its arguments grow a pair at a time.
pub fn partial_calls(text: &str, functions: &[FunctionSpec]) -> Vec<PartialCall> {
    let mut calls = Vec::new();
    let Some(first) = text.find(CALL_OPEN) else {
        return calls;
    };
    for (block, closed) in blocks(&text[first..]) {
        let Some(call) = read_call(block, functions, closed) else {
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

/// Each call's text after `<tool_call>`, up to its close (or the end), and whether it closed.
fn blocks(text: &str) -> impl Iterator<Item = (&str, bool)> {
    text.split(CALL_OPEN)
        .skip(1)
        .map(|block| match block.find(CALL_CLOSE) {
            Some(end) => (&block[..end], true),
            None => (block, false),
        })
}

/// One call: its name once a newline, the first pair or the call's close ends it, and the
/// pairs a `</arg_value>` closed; complete when `closed`.
fn read_call(block: &str, functions: &[FunctionSpec], closed: bool) -> Option<PartialCall> {
    let name_end = [block.find('\n'), block.find(KEY_OPEN)]
        .into_iter()
        .flatten()
        .min()
        .or(closed.then_some(block.len()))?;
    let name = block[..name_end].trim().to_string();
    if name.is_empty() {
        return None;
    }
    let properties = functions
        .iter()
        .find(|f| f.name == name)
        .and_then(|f| f.parameters.as_ref())
        .and_then(|p| p.get("properties"));
    let mut arguments = String::from("{");
    for (i, (key, raw)) in pairs(&block[name_end..]).into_iter().enumerate() {
        if i > 0 {
            arguments.push_str(", ");
        }
        arguments.push_str(&dumps(&Value::String(key.to_string())));
        arguments.push_str(": ");
        arguments.push_str(&dumps(&typed_value(key, raw, properties)));
    }
    if closed {
        arguments.push('}');
    }
    Some(PartialCall {
        name,
        arguments,
        complete: closed,
        id: None,
    })
}

/// The closed `<arg_key>K</arg_key>` (whitespace) `<arg_value>V</arg_value>` pairs, in order,
/// keys trimmed, values as written.
fn pairs(body: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find(KEY_OPEN) {
        let after = &rest[at + KEY_OPEN.len()..];
        let Some((key, tail)) = after.split_once(KEY_CLOSE) else {
            break;
        };
        let Some(value) = tail.trim_start().strip_prefix(VALUE_OPEN) else {
            rest = tail;
            continue;
        };
        let Some((raw, next)) = value.split_once(VALUE_CLOSE) else {
            break;
        };
        out.push((key.trim(), raw));
        rest = next;
    }
    out
}

/// A value as vLLM's parser reads it: as written when the key's schema type is `string`,
/// else trimmed and read as JSON, then as a Python literal (trimmed text where both fail).
fn typed_value(key: &str, raw: &str, properties: Option<&Value>) -> Value {
    let is_string = properties
        .and_then(|p| p.get(key))
        .and_then(|schema| schema.get("type"))
        .and_then(Value::as_str)
        == Some("string");
    if is_string {
        return Value::String(raw.to_string());
    }
    let raw = raw.trim();
    serde_json::from_str(raw)
        .ok()
        .or_else(|| python_literal::parse(raw))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

/// How a version's chat template lays a call out, for the grammar that forces one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// GLM-4.5 and 4.6: a newline after the name and after each tag pair.
    Lines,
    /// GLM-4.7: the tags back to back.
    Compact,
}

/// GLM-4.5's tags.
const LINES: TaggedCallSyntax = TaggedCallSyntax {
    call_open: |name| format!("{CALL_OPEN}{name}\n"),
    call_close: CALL_CLOSE,
    pair_open: |key| format!("{KEY_OPEN}{key}{KEY_CLOSE}\n{VALUE_OPEN}"),
    value_close: "</arg_value>\n",
    text_value: r#"/(?s:.*)<\/arg_value>\n/"#,
    any_pair: r#""<arg_key>" /[A-Za-z0-9_.\-]+/ "</arg_key>\n<arg_value>" text_value"#,
};

/// GLM-4.7's.
const COMPACT: TaggedCallSyntax = TaggedCallSyntax {
    call_open: |name| format!("{CALL_OPEN}{name}"),
    call_close: CALL_CLOSE,
    pair_open: |key| format!("{KEY_OPEN}{key}{KEY_CLOSE}{VALUE_OPEN}"),
    value_close: "</arg_value>",
    text_value: r#"/(?s:.*)<\/arg_value>/"#,
    any_pair: r#""<arg_key>" /[A-Za-z0-9_.\-]+/ "</arg_key><arg_value>" text_value"#,
};

/// A Lark grammar (llguidance's dialect) for one call to one of `functions` in `layout`
/// (several, a newline apart, when `parallel`): the name, then the pairs in the schema's
/// order (`tagged_call_grammar.rs`).
pub fn grammar(layout: Layout, functions: &[FunctionSpec], parallel: bool) -> String {
    let syntax = match layout {
        Layout::Lines => &LINES,
        Layout::Compact => &COMPACT,
    };
    tagged_call_grammar::grammar(syntax, functions, parallel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn functions() -> Vec<FunctionSpec> {
        vec![FunctionSpec {
            name: "edit_file".into(),
            description: None,
            parameters: Some(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "line": {"type": "integer"},
                    "dry_run": {"type": "boolean"},
                    "options": {"type": "object"},
                    "notes": {"type": "array"},
                    "text": {"type": "string"}
                },
                "required": ["path", "line"]
            })),
        }]
    }

    /// As GLM-4.5's chat template writes a call (`tests/fixtures/templates/hub/glm45.jinja`).
    const ANSWER: &str = "Looking first.\n<tool_call>edit_file\n<arg_key>path</arg_key>\n<arg_value> README.md </arg_value>\n<arg_key>line</arg_key>\n<arg_value> 3 </arg_value>\n<arg_key>dry_run</arg_key>\n<arg_value>true</arg_value>\n<arg_key>options</arg_key>\n<arg_value>{\"indent\": 4}</arg_value>\n<arg_key>notes</arg_key>\n<arg_value>[\"a\", 1.5, null]</arg_value>\n<arg_key>text</arg_key>\n<arg_value>line one\n<p>two</p></arg_value>\n<arg_key>extra</arg_key>\n<arg_value>seven</arg_value>\n</tool_call>";

    #[test]
    fn values_are_raw_for_strings_and_json_otherwise() {
        let (content, calls) = parse(ANSWER, &functions()).unwrap();
        assert_eq!(content, "Looking first.");
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "edit_file");
        assert_eq!(
            calls[0].arguments,
            "{\"path\": \" README.md \", \"line\": 3, \"dry_run\": true, \
             \"options\": {\"indent\": 4}, \"notes\": [\"a\", 1.5, null], \
             \"text\": \"line one\\n<p>two</p>\", \"extra\": \"seven\"}"
        );
        // Python's literals where JSON fails, as vLLM's `ast.literal_eval` fallback.
        let python = "<tool_call>f\n<arg_key>a</arg_key><arg_value>['x', True, None]</arg_value>\n</tool_call>";
        assert_eq!(
            parse(python, &[]).unwrap().1[0].arguments,
            "{\"a\": [\"x\", true, null]}"
        );
        // Without the request's schema every value is read as JSON where it parses.
        let text =
            "<tool_call>edit_file\n<arg_key>path</arg_key>\n<arg_value>7</arg_value>\n</tool_call>";
        assert_eq!(parse(text, &[]).unwrap().1[0].arguments, "{\"path\": 7}");
        assert_eq!(
            parse(text, &functions()).unwrap().1[0].arguments,
            "{\"path\": \"7\"}"
        );
        assert!(parse("no calls at all", &functions()).is_none());
        assert!(parse("<tool_call>", &functions()).is_none());
    }

    /// GLM-4.7's layout: the same calls with nothing between the tags, and a call without
    /// arguments closed right after its name.
    #[test]
    fn glm47_compact_calls_read_as_glm45_ones() {
        let compact = ANSWER
            .replace("edit_file\n", "edit_file")
            .replace("</arg_key>\n", "</arg_key>")
            .replace("</arg_value>\n", "</arg_value>");
        assert!(!compact.contains("</arg_value>\n"));
        assert_eq!(parse(&compact, &functions()), parse(ANSWER, &functions()));
        let text = "<tool_call>get_time</tool_call><tool_call>edit_file<arg_key>line</arg_key><arg_value>2</arg_value></tool_call>";
        let (_, calls) = parse(text, &functions()).unwrap();
        let got: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(got, [("get_time", "{}"), ("edit_file", "{\"line\": 2}")]);
        // Streamed: the name counts once a pair or the close ends it.
        let whole = parse(&compact, &functions()).unwrap().1;
        let seen = crate::function_calls::streamed_arguments(&compact, &whole[0].arguments, |t| {
            partial_calls(t, &functions())
        });
        assert_eq!(seen.len(), 1 + 7 + 1, "{seen:#?}");
        assert!(partial_calls("<tool_call>get_time", &functions()).is_empty());
        assert_eq!(
            partial_calls("<tool_call>get_time</tool_call>", &functions())[0].arguments,
            "{}"
        );
    }

    #[test]
    fn several_calls_and_a_call_without_arguments() {
        let text = "<tool_call>list_dir\n</tool_call>\n<tool_call>edit_file\n<arg_key>line</arg_key><arg_value>2</arg_value>\n</tool_call>";
        let (content, calls) = parse(text, &functions()).unwrap();
        assert_eq!(content, "");
        let got: Vec<(&str, &str)> = calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(got, [("list_dir", "{}"), ("edit_file", "{\"line\": 2}")]);
    }

    /// Streamed, a call shows its name once its line is complete and its arguments a pair at
    /// a time, always a prefix of the whole answer's.
    #[test]
    fn partial_calls_grow_a_pair_at_a_time() {
        let whole = parse(ANSWER, &functions()).unwrap().1;
        assert_eq!(whole[0].name, "edit_file");
        let seen = crate::function_calls::streamed_arguments(ANSWER, &whole[0].arguments, |text| {
            partial_calls(text, &functions())
        });
        assert_eq!(seen.first().map(String::as_str), Some("{"));
        assert_eq!(seen.last(), Some(&whole[0].arguments));
        assert_eq!(seen.len(), 1 + 7 + 1, "{seen:#?}");
        assert!(partial_calls("<tool_call>edit_fi", &functions()).is_empty());
    }
}
