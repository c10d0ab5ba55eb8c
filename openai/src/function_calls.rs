//! The functions a request offers and the calls an answer makes, whichever syntax the model
//! writes them in (`tool_calls.rs`, `xml_tool_calls.rs`).

use serde::Deserialize;
use serde_json::Value;

use crate::partial_json::json_container_prefix;

/// A function the request offers (`tools[i].function`).
#[derive(Debug, Clone, Deserialize)]
pub struct FunctionSpec {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// The arguments' JSON schema (absent: any object).
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// A call found in the generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments` is a string), as generated
    /// (so a stream's argument fragments add up to it).
    pub arguments: String,
    /// The id the model wrote for the call (Kimi-K2's `functions.NAME:IDX`, which its
    /// template writes back into the conversation); the server makes one where it wrote none.
    pub id: Option<String>,
}

impl From<PartialCall> for ParsedCall {
    fn from(call: PartialCall) -> Self {
        Self {
            name: call.name,
            arguments: call.arguments,
            id: call.id,
        }
    }
}

/// One call as far as it has been generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialCall {
    pub name: String,
    /// The arguments' JSON text so far (never past its end).
    pub arguments: String,
    /// The arguments' text is whole.
    pub complete: bool,
    /// The id the model wrote for the call ([`ParsedCall::id`]).
    pub id: Option<String>,
}

/// A call named `name` whose JSON arguments `s` (starting at their value) holds as far as it
/// goes.
pub(crate) fn arguments(name: String, s: &str) -> Option<PartialCall> {
    let (start, end, complete) = json_container_prefix(s)?;
    Some(PartialCall {
        name,
        arguments: s[start..end].to_string(),
        complete,
        id: None,
    })
}

/// The distinct arguments a stream of `answer` shows for its one call, prefix by prefix
/// (each asserted a prefix of the whole answer's `whole` arguments), for the tagged syntaxes'
/// tests.
#[cfg(test)]
pub(crate) fn streamed_arguments(
    answer: &str,
    whole: &str,
    partial: impl Fn(&str) -> Vec<PartialCall>,
) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for end in (0..=answer.len()).filter(|&e| answer.is_char_boundary(e)) {
        let calls = partial(&answer[..end]);
        for call in &calls {
            assert!(
                whole.starts_with(&call.arguments),
                "{:?} is not a prefix",
                call.arguments
            );
        }
        if let Some(call) = calls.last() {
            if seen.last() != Some(&call.arguments) {
                seen.push(call.arguments.clone());
            }
        }
    }
    seen
}
