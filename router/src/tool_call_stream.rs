//! Tool calls read while they are being generated, so a stream can send each call's name as
//! soon as it is complete and its arguments as they grow (OpenAI's `delta.tool_calls`), as
//! vLLM's streaming tool parsers do. Only the layouts the grammars generate are read this way
//! (Hermes: `{"name": ..., "arguments": ...}` in that order; DeepSeek-V3's fenced JSON); a call
//! written otherwise is left to the parser that runs on the whole answer.

use crate::tool_calls::{ToolCallFormat, DS_CALL_BEGIN, DS_SEP, HERMES_OPEN};

/// One call as far as it has been generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialCall {
    pub name: String,
    /// The arguments' JSON text so far (never past its end).
    pub arguments: String,
    /// The arguments' text is whole.
    pub complete: bool,
}

/// How much of `s` (after leading whitespace) is a JSON object or array, and whether it is
/// whole: `(start, end, complete)`, byte offsets into `s`. `None` when `s` starts with something
/// else.
pub fn json_container_prefix(s: &str) -> Option<(usize, usize, bool)> {
    let start = s.len() - s.trim_start().len();
    let body = &s[start..];
    if !(body.starts_with('{') || body.starts_with('[')) {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in body.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some((start, start + i + 1, true));
                }
            }
            _ => {}
        }
    }
    Some((start, s.len(), false))
}

/// The text after `prefix` once `s` holds all of it; `None` while `s` is shorter (or differs).
fn after<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.strip_prefix(prefix)
}

/// A complete JSON string literal at the start of `s` (after whitespace): its value and the
/// rest.
fn string_literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    let body = s.strip_prefix('"')?;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => {
                let literal = &s[..i + 2];
                let value = serde_json::from_str(literal).ok()?;
                return Some((value, &body[i + 1..]));
            }
            _ => {}
        }
    }
    None
}

/// `"key":` at the start of `s` (after whitespace); the rest.
fn key<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let (k, rest) = string_literal(s)?;
    (k == name).then_some(())?;
    rest.trim_start().strip_prefix(':')
}

/// The arguments as far as `s` (starting at the arguments' value) holds them.
fn arguments(name: String, s: &str) -> Option<PartialCall> {
    let (start, end, complete) = json_container_prefix(s)?;
    Some(PartialCall {
        name,
        arguments: s[start..end].to_string(),
        complete,
    })
}

fn hermes_call(s: &str) -> Option<PartialCall> {
    let s = s.trim_start().strip_prefix('{')?;
    let (name, rest) = string_literal(key(s, "name")?)?;
    let rest = rest.trim_start().strip_prefix(',')?;
    arguments(name, key(rest, "arguments")?)
}

fn deepseek_call(s: &str) -> Option<PartialCall> {
    let named = after(s, &format!("function{DS_SEP}"))?;
    let (name, rest) = named.split_once('\n')?;
    let args = after(rest, "```json\n")?;
    arguments(name.trim().to_string(), args)
}

/// The calls `text` (an answer so far) has started, in order, as far as they go; empty when
/// no call has begun or one is written in another layout.
pub fn partial_calls(format: ToolCallFormat, text: &str) -> Vec<PartialCall> {
    let (marker, read): (&str, fn(&str) -> Option<PartialCall>) = match format {
        ToolCallFormat::Hermes => (HERMES_OPEN.trim_end(), hermes_call),
        ToolCallFormat::DeepSeekV3 => (DS_CALL_BEGIN, deepseek_call),
    };
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        let Some(call) = read(rest) else { break };
        let complete = call.complete;
        calls.push(call);
        if !complete {
            break;
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tool_calls::{DS_CALLS_BEGIN, DS_CALL_END};

    #[test]
    fn json_prefixes_follow_strings_and_nesting() {
        assert_eq!(json_container_prefix(r#" {"a": "}"#), Some((1, 9, false)));
        assert_eq!(
            json_container_prefix(r#"{"a": "}\"", "b": [1, {}]}, tail"#),
            Some((0, 26, true))
        );
        assert_eq!(json_container_prefix("  "), None);
        assert_eq!(json_container_prefix("3"), None);
    }

    #[test]
    fn hermes_calls_grow_name_first_then_arguments() {
        let whole = "Ok.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let mut seen = Vec::new();
        for end in 0..=whole.len() {
            if whole.is_char_boundary(end) {
                seen.push(partial_calls(ToolCallFormat::Hermes, &whole[..end]));
            }
        }
        // The name only once it is whole; arguments only ever grow.
        assert!(seen
            .iter()
            .all(|calls| calls.first().is_none_or(|c| c.name == "get_weather")));
        for pair in seen.windows(2) {
            if let (Some(a), Some(b)) = (pair[0].first(), pair[1].first()) {
                assert!(b.arguments.starts_with(&a.arguments));
            }
        }
        let last = seen.last().unwrap();
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].arguments, r#"{"city": "Oslo"}"#);
        assert!(last[0].complete && last[1].complete);
        assert_eq!(last[1].name, "now");
    }

    #[test]
    fn deepseek_calls_are_read_as_they_come() {
        let head = format!(
            "{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{\"city\": \"Pa"
        );
        let calls = partial_calls(ToolCallFormat::DeepSeekV3, &head);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city": "Pa"#);
        assert!(!calls[0].complete);
        let whole = format!("{head}ris\"}}\n```{DS_CALL_END}");
        let calls = partial_calls(ToolCallFormat::DeepSeekV3, &whole);
        assert_eq!(calls[0].arguments, r#"{"city": "Paris"}"#);
        assert!(calls[0].complete);
        // Not yet past the name: nothing.
        let early = format!("{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_wea");
        assert!(partial_calls(ToolCallFormat::DeepSeekV3, &early).is_empty());
    }
}
