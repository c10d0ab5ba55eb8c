//! OpenAI's `tools` and `tool_choice` on chat completions: what the chat template sees, the
//! grammar that forces a call (`required`, or a named function), and the `tool_calls` an
//! answer turns into (`tool_calls.rs` knows each family's syntax).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::RouterError;
use crate::tool_calls::{FunctionSpec, ParsedCall, ToolCallFormat};

/// One entry of `tools`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Value,
}

/// How a chat request's answer is read: for tool calls in `format`, when the request offers
/// tools and does not say `tool_choice: "none"`; `functions` type the values of a format that
/// writes them as text (Qwen3-Coder's).
#[derive(Debug, Clone)]
pub struct ToolAnswers {
    pub format: ToolCallFormat,
    pub functions: Vec<FunctionSpec>,
}

impl ToolAnswers {
    /// The text before the calls and the calls, if the answer made any.
    pub fn parse(&self, text: &str) -> Option<(String, Vec<ParsedCall>)> {
        self.format.parse(text, &self.functions)
    }

    /// The calls an answer so far has started, as far as they go.
    pub fn partial_calls(&self, text: &str) -> Vec<crate::tool_calls::PartialCall> {
        crate::tool_calls::partial_calls(self.format, text, &self.functions)
    }
}

/// What a request's tools mean for it.
#[derive(Debug)]
pub struct ToolPlan {
    /// The tools as the chat template sees them (`None`: none offered).
    pub template_tools: Option<Value>,
    /// A grammar that forces a call (`required` or a named function).
    pub forced: Option<String>,
    /// Whether answers are read for tool calls.
    pub answers: Option<ToolAnswers>,
}

fn functions(tools: &[ToolIn]) -> Result<Vec<FunctionSpec>, RouterError> {
    tools
        .iter()
        .map(|t| {
            if t.kind != "function" {
                return Err(RouterError::invalid(
                    "tools",
                    format!("tools of type `{}` are not supported", t.kind),
                ));
            }
            serde_json::from_value::<FunctionSpec>(t.function.clone()).map_err(|e| {
                RouterError::invalid("tools", format!("a tool's function is malformed: {e}"))
            })
        })
        .collect()
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls` (OpenAI's defaults: `auto` when
/// tools are given, parallel calls allowed).
pub fn plan(
    tools: Option<&[ToolIn]>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
    format: ToolCallFormat,
) -> Result<ToolPlan, RouterError> {
    let tools = tools.unwrap_or_default();
    let specs = functions(tools)?;
    let choice = match tool_choice {
        None | Some(Value::Null) => "auto".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    RouterError::invalid("tool_choice", "a named tool_choice needs function.name")
                })?;
            format!("function:{name}")
        }
        Some(_) => {
            return Err(RouterError::invalid(
                "tool_choice",
                "tool_choice is none, auto, required or a named function",
            ))
        }
    };
    if specs.is_empty() {
        return match choice.as_str() {
            "auto" | "none" => Ok(ToolPlan {
                template_tools: None,
                forced: None,
                answers: None,
            }),
            _ => Err(RouterError::invalid(
                "tool_choice",
                "tool_choice needs tools to choose from",
            )),
        };
    }
    let template_tools = Some(serde_json::to_value(tools).unwrap_or(Value::Null));
    let parallel = parallel.unwrap_or(true);
    let answers = ToolAnswers {
        format,
        functions: specs.clone(),
    };
    let (forced, answers) = match choice.as_str() {
        "none" => (None, None),
        "auto" => (None, Some(answers)),
        "required" => (Some(format.grammar(&specs, parallel)), Some(answers)),
        named => {
            let name = named.trim_start_matches("function:");
            let chosen: Vec<FunctionSpec> =
                specs.iter().filter(|f| f.name == name).cloned().collect();
            if chosen.is_empty() || !named.starts_with("function:") {
                return Err(RouterError::invalid(
                    "tool_choice",
                    format!("tool_choice names `{name}`, which is not among the tools"),
                ));
            }
            (Some(format.grammar(&chosen, false)), Some(answers))
        }
    };
    Ok(ToolPlan {
        template_tools,
        forced,
        answers,
    })
}

/// A message as the chat template sees it: OpenAI's fields, and its reasoning under the
/// names transformers gives it (`thinking` first, `reasoning_content` last).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    pub role: String,
    pub content: String,
    /// As the client sent them (`arguments` a JSON string); see [`with_parsed_arguments`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

/// The messages with every tool call's `arguments` string parsed into JSON, as transformers
/// documents and vLLM passes them (templates `tojson` or iterate them); `None` when no call
/// has arguments to parse.
pub fn with_parsed_arguments(messages: &[TemplateMessage]) -> Option<Vec<TemplateMessage>> {
    let mut parsed_any = false;
    let parsed = messages
        .iter()
        .map(|message| {
            let mut message = message.clone();
            for call in message.tool_calls.iter_mut().flatten() {
                if let Some(args) = call.pointer_mut("/function/arguments") {
                    if let Some(value) = args.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                        *args = value;
                        parsed_any = true;
                    }
                }
            }
            message
        })
        .collect();
    parsed_any.then_some(parsed)
}

/// OpenAI's `tool_calls` entries for `calls`: the id the model wrote, or one made from the
/// response id.
/// A call's id: the same in a stream's deltas and in the whole answer.
pub fn tool_call_id(response_id: &str, choice: u32, call: usize) -> String {
    format!("call-{response_id}-{choice}-{call}")
}

pub fn tool_calls_json(response_id: &str, choice: u32, calls: &[ParsedCall]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            serde_json::json!({
                "id": c.id.clone().unwrap_or_else(|| tool_call_id(response_id, choice, i)),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<ToolIn> {
        vec![ToolIn {
            kind: "function".into(),
            function: json!({"name": "f", "parameters": {"type": "object"}}),
        }]
    }

    #[test]
    fn tool_choice_decides_the_grammar_and_the_reading() {
        let t = tools();
        let auto = plan(Some(&t), None, None, ToolCallFormat::Hermes).unwrap();
        assert!(auto.forced.is_none() && auto.answers.is_some());
        let none = plan(Some(&t), Some(&json!("none")), None, ToolCallFormat::Hermes).unwrap();
        assert!(none.forced.is_none() && none.answers.is_none() && none.template_tools.is_some());
        let required = plan(
            Some(&t),
            Some(&json!("required")),
            None,
            ToolCallFormat::Hermes,
        )
        .unwrap();
        assert!(required.forced.is_some());
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert!(
            plan(Some(&t), Some(&named), None, ToolCallFormat::DeepSeekV3)
                .unwrap()
                .forced
                .is_some()
        );
    }

    #[test]
    fn bad_choices_are_refused_by_name() {
        let t = tools();
        let other = json!({"type": "function", "function": {"name": "g"}});
        for (tools, choice, param) in [
            (Some(&t[..]), other, "tool_choice"),
            (None, json!("required"), "tool_choice"),
            (Some(&t[..]), json!(5), "tool_choice"),
        ] {
            match plan(tools, Some(&choice), None, ToolCallFormat::Hermes) {
                Err(RouterError::Invalid { param: Some(p), .. }) => assert_eq!(p, param),
                other => panic!("{choice}: {other:?}"),
            }
        }
        let bad = vec![ToolIn {
            kind: "retrieval".into(),
            function: json!({}),
        }];
        assert!(plan(Some(&bad), None, None, ToolCallFormat::Hermes).is_err());
    }
}
