//! Kimi-K2's tool calls (vLLM's and SGLang's `kimi_k2` parsers): a section of calls, each an
//! id the model writes (`functions.NAME:IDX`: the name is read from it) and JSON arguments.
//!
//! ```text
//! <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Oslo"}<|tool_call_end|><|tool_calls_section_end|>
//! ```
//!
//! The model's id becomes the call's OpenAI id, as vLLM returns it: Kimi's chat template writes
//! it back into the conversation (`## Return of functions.get_weather:0`), so a client that
//! sends the call and its result back gives the model the ids it wrote.

use serde_json::Value;

use crate::function_calls::{arguments, ParsedCall, PartialCall};

pub const SECTION_BEGIN: &str = "<|tool_calls_section_begin|>";
pub const SECTION_END: &str = "<|tool_calls_section_end|>";
pub const CALL_BEGIN: &str = "<|tool_call_begin|>";
pub const ARGUMENTS_BEGIN: &str = "<|tool_call_argument_begin|>";
pub const CALL_END: &str = "<|tool_call_end|>";

/// The function's name in a call id (`functions.NAME:IDX`, or `NAME:IDX`): the last dotted
/// part before the colon, as vLLM reads it; `None` when the id does not end in `:DIGITS`.
fn name_in(id: &str) -> Option<&str> {
    let (head, index) = id.rsplit_once(':')?;
    let digits = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
    let name = head.rsplit('.').next()?;
    (digits && !name.is_empty() && !head.contains('<')).then_some(name)
}

/// The text before the section and the calls, when `text` holds at least one whole call with
/// a well-formed id and JSON arguments; `None` when it is plain content.
pub fn parse(text: &str) -> Option<(String, Vec<ParsedCall>)> {
    let first = text.find(SECTION_BEGIN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first + SECTION_BEGIN.len()..];
    while let Some(start) = rest.find(CALL_BEGIN) {
        let after = &rest[start + CALL_BEGIN.len()..];
        let end = after.find(CALL_END)?;
        let (id, args) = after[..end].split_once(ARGUMENTS_BEGIN)?;
        let (id, args) = (id.trim(), args.trim());
        let name = name_in(id)?;
        serde_json::from_str::<Value>(args).ok()?;
        calls.push(ParsedCall {
            name: name.to_string(),
            arguments: args.to_string(),
            id: Some(id.to_string()),
        });
        rest = &after[end + CALL_END.len()..];
    }
    (!calls.is_empty()).then(|| (text[..first].trim_end().to_string(), calls))
}

/// One call as far as `s` (after its `<|tool_call_begin|>`) holds it: it counts once its id is
/// whole (its arguments' marker written), its arguments grow as generated.
pub fn read_call(s: &str) -> Option<PartialCall> {
    let (id, args) = s.split_once(ARGUMENTS_BEGIN)?;
    let id = id.trim();
    let mut call = arguments(name_in(id)?.to_string(), args)?;
    call.id = Some(id.to_string());
    Some(call)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ANSWER: &str = "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Oslo\", \"days\": 2}<|tool_call_end|><|tool_call_begin|> functions.now:1 <|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";

    #[test]
    fn calls_keep_the_models_ids_and_read_the_name_from_them() {
        let (content, calls) = parse(ANSWER).unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].id.as_deref(), Some("functions.get_weather:0"));
        assert_eq!(calls[0].arguments, r#"{"city": "Oslo", "days": 2}"#);
        assert_eq!(
            (calls[1].name.as_str(), calls[1].id.as_deref()),
            ("now", Some("functions.now:1"))
        );
        assert!(parse("no calls here").is_none());
        // An id without its index, or arguments that are not JSON: not a call.
        let bad_id = ANSWER.replace("get_weather:0", "get_weather");
        assert!(parse(&bad_id).is_none());
        let bad_args = ANSWER.replace("\"days\": 2}", "\"days\": ");
        assert!(parse(&bad_args).is_none());
        assert_eq!(name_in("get_weather:12"), Some("get_weather"));
        assert_eq!(name_in("functions.get_weather:x"), None);
    }
}
