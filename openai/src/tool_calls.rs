//! Tool calls in each model family's own syntax: the grammar that forces a call (OpenAI's
//! `tool_choice: "required"` or a named function), with each function's arguments constrained
//! by its JSON schema, and the parser that turns generated text back into OpenAI's
//! `tool_calls`.
//!
//! - Hermes style (Qwen3, and the default): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//!   one block per call.
//! - DeepSeek-V3: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`.
//! - DeepSeek-V3.1 (the same `model_type`; its chat template tells it apart):
//!   `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`.
//! - Qwen3-Coder (Qwen3-MoE's `model_type`; its chat template tells it apart): XML-like
//!   `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>...` blocks whose
//!   values are raw text (`xml_tool_calls.rs`).
//! - GLM-4.5: `<tool_call>NAME\n<arg_key>KEY</arg_key>\n<arg_value>VALUE</arg_value>\n...</tool_call>`,
//!   string values raw, others JSON (`glm_tool_calls.rs`).
//! - Kimi-K2 (DeepSeek-V3's `model_type` `kimi_k2`; its chat template tells it apart):
//!   `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS<|tool_call_end|>...`,
//!   the model's id kept as the call's (`kimi_tool_calls.rs`).
//!
//! The grammars spell the markers as text: on the real checkpoints they are single special
//! tokens, which these grammars reach byte by byte only (the bundled test vocabulary has no
//! special tokens for them).

use serde_json::Value;

use crate::function_calls::arguments;
pub use crate::function_calls::{FunctionSpec, ParsedCall, PartialCall};
use crate::kimi_tool_calls as kimi;
use crate::partial_json::{key, string_literal};
use crate::{glm_tool_calls, xml_tool_calls};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    DeepSeekV3,
    DeepSeekV31,
    Qwen3Coder,
    Glm45,
    /// GLM-4.7: GLM-4.5's tags without the newlines between them.
    Glm47,
    /// MiniMax-M2: `<invoke name="NAME">` calls with `<parameter name="KEY">` text values.
    MinimaxM2,
    /// Kimi-K2: a section of calls, each the model's own id (`functions.NAME:IDX`) and JSON.
    KimiK2,
}

impl std::str::FromStr for ToolCallFormat {
    type Err = String;

    /// vLLM's `--tool-call-parser` names (and kebab-case ones).
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "hermes" | "qwen3" => Ok(Self::Hermes),
            "deepseek_v3" | "deepseek-v3" => Ok(Self::DeepSeekV3),
            "deepseek_v31" | "deepseek-v31" | "deepseek-v3.1" => Ok(Self::DeepSeekV31),
            "qwen3_coder" | "qwen3-coder" | "qwen3_xml" => Ok(Self::Qwen3Coder),
            "glm45" | "glm4_moe" | "glm-4.5" => Ok(Self::Glm45),
            "glm47" | "glm-4.7" => Ok(Self::Glm47),
            "minimax_m2" | "minimax-m2" => Ok(Self::MinimaxM2),
            "kimi_k2" | "kimi-k2" => Ok(Self::KimiK2),
            other => Err(format!(
                "unknown tool-call parser `{other}`: hermes, deepseek-v3, deepseek-v31, qwen3-coder, glm45, glm47, minimax-m2 or kimi-k2"
            )),
        }
    }
}

const HERMES_OPEN: &str = "<tool_call>\n";
/// GLM-4.7's template tells the model its call layout so (GLM-4.5's puts a newline after the
/// name).
const GLM47_INSTRUCTION: &str = "<tool_call>{function-name}<arg_key>";
const HERMES_CLOSE: &str = "\n</tool_call>";
const DS_CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const DS_CALLS_END: &str = "<｜tool▁calls▁end｜>";
const DS_CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const DS_CALL_END: &str = "<｜tool▁call▁end｜>";
const DS_SEP: &str = "<｜tool▁sep｜>";

/// A Lark string literal for `text`.
fn literal(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// The arguments' schema (any object when the function gives none), compact.
fn arguments_schema(f: &FunctionSpec) -> Value {
    let mut schema = f
        .parameters
        .clone()
        .unwrap_or_else(|| serde_json::json!({"type": "object"}));
    if let Value::Object(fields) = &mut schema {
        fields
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

impl ToolCallFormat {
    /// The family's format, by `config.json`'s `model_type`.
    pub fn for_model(model_type: &str) -> Self {
        match model_type {
            "deepseek_v3" | "deepseek_v2" => ToolCallFormat::DeepSeekV3,
            "glm4_moe" => ToolCallFormat::Glm45,
            // GLM-4.7-Flash: a GLM-4.7 model, whatever its template says.
            "glm4_moe_lite" => ToolCallFormat::Glm47,
            "minimax_m2" => ToolCallFormat::MinimaxM2,
            _ => ToolCallFormat::Hermes,
        }
    }

    /// The format the model writes, by its `model_type` and the chat template it is served
    /// with: DeepSeek-V3.1 shares V3's `model_type`, and its template writes earlier calls
    /// as `NAME<｜tool▁sep｜>ARGS`, with no `function` type and no fenced JSON; Qwen3-Coder
    /// shares Qwen3-MoE's, and its template writes `<function=NAME>` and `<parameter=KEY>`;
    /// GLM-4.7 shares GLM-4.5's, and its template shows the call's tags back to back;
    /// Kimi-K2 is DeepSeek-V3's architecture, and its template writes call sections.
    pub fn for_model_and_template(model_type: &str, template: Option<&str>) -> Self {
        let family = Self::for_model(model_type);
        let kimi = template.is_some_and(|t| t.contains(kimi::SECTION_BEGIN));
        let v31 = template.is_some_and(|t| t.contains(DS_SEP) && !t.contains("```json"));
        let xml = template.is_some_and(|t| t.contains("<function=") && t.contains("<parameter="));
        let compact = template.is_some_and(|t| t.contains(GLM47_INSTRUCTION));
        match family {
            ToolCallFormat::DeepSeekV3 if kimi => ToolCallFormat::KimiK2,
            ToolCallFormat::DeepSeekV3 if v31 => ToolCallFormat::DeepSeekV31,
            ToolCallFormat::Hermes if xml => ToolCallFormat::Qwen3Coder,
            ToolCallFormat::Glm45 if compact => ToolCallFormat::Glm47,
            _ => family,
        }
    }

    /// The text a call starts with (content before it can stream).
    pub fn start_marker(&self) -> &'static str {
        match self {
            ToolCallFormat::Hermes => "<tool_call>",
            ToolCallFormat::DeepSeekV3 | ToolCallFormat::DeepSeekV31 => DS_CALLS_BEGIN,
            ToolCallFormat::Qwen3Coder => xml_tool_calls::QWEN3_CODER.block_open,
            ToolCallFormat::MinimaxM2 => xml_tool_calls::MINIMAX_M2.block_open,
            ToolCallFormat::Glm45 | ToolCallFormat::Glm47 => glm_tool_calls::CALL_OPEN,
            ToolCallFormat::KimiK2 => kimi::SECTION_BEGIN,
        }
    }

    /// A Lark grammar (llguidance's dialect) that generates one call to one of `functions`
    /// (several in a row when `parallel`), arguments per each one's schema.
    pub fn grammar(&self, functions: &[FunctionSpec], parallel: bool) -> String {
        match self {
            ToolCallFormat::Qwen3Coder => {
                return xml_tool_calls::grammar(&xml_tool_calls::QWEN3_CODER, functions, parallel)
            }
            ToolCallFormat::MinimaxM2 => {
                return xml_tool_calls::grammar(&xml_tool_calls::MINIMAX_M2, functions, parallel)
            }
            ToolCallFormat::Glm45 => {
                return glm_tool_calls::grammar(glm_tool_calls::Layout::Lines, functions, parallel)
            }
            ToolCallFormat::Glm47 => {
                return glm_tool_calls::grammar(
                    glm_tool_calls::Layout::Compact,
                    functions,
                    parallel,
                )
            }
            _ => {}
        }
        let mut rules = Vec::new();
        let alternatives: Vec<String> = functions
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let rule = format!("f{i}");
                let body = match self {
                    ToolCallFormat::Hermes => {
                        let schema = serde_json::json!({
                            "type": "object",
                            "properties": {
                                "name": {"const": f.name},
                                "arguments": arguments_schema(f),
                            },
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                            "x-guidance": {"whitespace_flexible": false},
                        });
                        format!("%json {schema}")
                    }
                    ToolCallFormat::DeepSeekV3 => {
                        rules.push(format!("a{i}: %json {}", arguments_schema(f)));
                        format!(
                            "{} a{i} {}",
                            literal(&format!(
                                "{DS_CALL_BEGIN}function{DS_SEP}{}\n```json\n",
                                f.name
                            )),
                            literal(&format!("\n```{DS_CALL_END}"))
                        )
                    }
                    ToolCallFormat::KimiK2 => {
                        rules.push(format!("a{i}: %json {}", arguments_schema(f)));
                        format!(
                            "{} IDX {} a{i} {}",
                            literal(&format!("{}functions.{}:", kimi::CALL_BEGIN, f.name)),
                            literal(kimi::ARGUMENTS_BEGIN),
                            literal(kimi::CALL_END)
                        )
                    }
                    // (Qwen3-Coder's, MiniMax-M2's and GLM's are their modules', returned above.)
                    ToolCallFormat::DeepSeekV31
                    | ToolCallFormat::Qwen3Coder
                    | ToolCallFormat::MinimaxM2
                    | ToolCallFormat::Glm45
                    | ToolCallFormat::Glm47 => {
                        rules.push(format!("a{i}: %json {}", arguments_schema(f)));
                        format!(
                            "{} a{i} {}",
                            literal(&format!("{DS_CALL_BEGIN}{}{DS_SEP}", f.name)),
                            literal(DS_CALL_END)
                        )
                    }
                };
                rules.push(format!("{rule}: {body}"));
                rule
            })
            .collect();
        let call = alternatives.join(" | ");
        let repeat = if parallel { "+" } else { "" };
        let start = match self {
            ToolCallFormat::Hermes => format!(
                "start: call{repeat}\ncall: {} ({call}) {}",
                literal(HERMES_OPEN),
                literal(HERMES_CLOSE)
            ),
            ToolCallFormat::DeepSeekV3
            | ToolCallFormat::DeepSeekV31
            | ToolCallFormat::Qwen3Coder
            | ToolCallFormat::MinimaxM2
            | ToolCallFormat::Glm45
            | ToolCallFormat::Glm47 => format!(
                "start: {} call{repeat} {}\ncall: {call}",
                literal(DS_CALLS_BEGIN),
                literal(DS_CALLS_END)
            ),
            // The call's index: what the model writes (Kimi's template numbers calls).
            ToolCallFormat::KimiK2 => format!(
                "start: {} call{repeat} {}\ncall: {call}\nIDX: /[0-9]{{1,3}}/",
                literal(kimi::SECTION_BEGIN),
                literal(kimi::SECTION_END)
            ),
        };
        std::iter::once(start)
            .chain(rules)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The text before any call and the calls, when `text` holds at least one well-formed
    /// call; `None` when it is plain content. `functions` (the request's) type Qwen3-Coder's
    /// text values; the JSON formats carry their own types.
    pub fn parse(
        &self,
        text: &str,
        functions: &[FunctionSpec],
    ) -> Option<(String, Vec<ParsedCall>)> {
        match self {
            ToolCallFormat::Hermes => parse_hermes(text),
            ToolCallFormat::DeepSeekV3 => parse_deepseek(text, split_v3_call),
            ToolCallFormat::DeepSeekV31 => parse_deepseek(text, split_v31_call),
            ToolCallFormat::Qwen3Coder => {
                xml_tool_calls::parse(&xml_tool_calls::QWEN3_CODER, text, functions)
            }
            ToolCallFormat::MinimaxM2 => {
                xml_tool_calls::parse(&xml_tool_calls::MINIMAX_M2, text, functions)
            }
            ToolCallFormat::Glm45 | ToolCallFormat::Glm47 => glm_tool_calls::parse(text, functions),
            ToolCallFormat::KimiK2 => kimi::parse(text),
        }
    }
}

fn call_from_json(body: &str) -> Option<ParsedCall> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = value
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    Some(ParsedCall {
        name,
        arguments: arguments.to_string(),
        id: None,
    })
}

fn parse_hermes(text: &str) -> Option<(String, Vec<ParsedCall>)> {
    let open = HERMES_OPEN.trim_end();
    let first = text.find(open)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(open) {
        let after = &rest[start + open.len()..];
        let end = after.find("</tool_call>")?;
        let mut call = call_from_json(&after[..end])?;
        if let Some(raw) = partial_calls(
            ToolCallFormat::Hermes,
            &rest[start..start + open.len() + end],
            &[],
        )
        .pop()
        .filter(|c| c.complete)
        {
            call.arguments = raw.arguments;
        }
        calls.push(call);
        rest = &after[end + "</tool_call>".len()..];
    }
    Some((text[..first].trim_end().to_string(), calls))
}

/// A V3 call's name and arguments: `function<｜tool▁sep｜>NAME\n```json\nARGS\n````.
fn split_v3_call(call: &str) -> Option<(&str, &str)> {
    let (_, named) = call.split_once(DS_SEP)?;
    let (name, args) = named.split_once('\n')?;
    let args = args
        .trim()
        .trim_start_matches("```json")
        .trim_end_matches("```")
        .trim();
    Some((name, args))
}

/// A V3.1 call's name and arguments: `NAME<｜tool▁sep｜>ARGS`.
fn split_v31_call(call: &str) -> Option<(&str, &str)> {
    let (name, args) = call.split_once(DS_SEP)?;
    Some((name, args.trim()))
}

fn parse_deepseek(
    text: &str,
    split: fn(&str) -> Option<(&str, &str)>,
) -> Option<(String, Vec<ParsedCall>)> {
    let first = text
        .find(DS_CALLS_BEGIN)
        .or_else(|| text.find(DS_CALL_BEGIN))?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(start) = rest.find(DS_CALL_BEGIN) {
        let after = &rest[start + DS_CALL_BEGIN.len()..];
        let end = after.find(DS_CALL_END)?;
        let (name, args) = split(&after[..end])?;
        serde_json::from_str::<Value>(args).ok()?;
        calls.push(ParsedCall {
            name: name.trim().to_string(),
            arguments: args.to_string(),
            id: None,
        });
        rest = &after[end + DS_CALL_END.len()..];
    }
    (!calls.is_empty()).then(|| (text[..first].trim_end().to_string(), calls))
}

// Calls read while they are being generated, so a stream can send each call's name as soon as
// it is complete and its arguments as they grow (OpenAI's `delta.tool_calls`), as vLLM's
// streaming tool parsers do. Only the layouts the grammars generate are read this way (Hermes:
// `{"name": ..., "arguments": ...}` in that order; DeepSeek-V3's fenced JSON); a call written
// otherwise is left to the parser that runs on the whole answer.

/// The text after `prefix` once `s` holds all of it; `None` while `s` is shorter (or differs).
fn after<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.strip_prefix(prefix)
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

fn deepseek_v31_call(s: &str) -> Option<PartialCall> {
    let (name, args) = s.split_once(DS_SEP)?;
    arguments(name.trim().to_string(), args)
}

/// The calls `text` (an answer so far) has started, in order, as far as they go; empty when
/// no call has begun or one is written in another layout.
pub fn partial_calls(
    format: ToolCallFormat,
    text: &str,
    functions: &[FunctionSpec],
) -> Vec<PartialCall> {
    let mut text = text;
    let (marker, read): (&str, fn(&str) -> Option<PartialCall>) = match format {
        ToolCallFormat::Hermes => (HERMES_OPEN.trim_end(), hermes_call),
        ToolCallFormat::DeepSeekV3 => (DS_CALL_BEGIN, deepseek_call),
        ToolCallFormat::DeepSeekV31 => (DS_CALL_BEGIN, deepseek_v31_call),
        ToolCallFormat::Qwen3Coder => {
            return xml_tool_calls::partial_calls(&xml_tool_calls::QWEN3_CODER, text, functions)
        }
        ToolCallFormat::MinimaxM2 => {
            return xml_tool_calls::partial_calls(&xml_tool_calls::MINIMAX_M2, text, functions)
        }
        ToolCallFormat::Glm45 | ToolCallFormat::Glm47 => {
            return glm_tool_calls::partial_calls(text, functions)
        }
        // Calls count only inside a section, as vLLM reads them.
        ToolCallFormat::KimiK2 => match text.find(kimi::SECTION_BEGIN) {
            Some(at) => {
                text = &text[at..];
                (kimi::CALL_BEGIN, kimi::read_call)
            }
            None => return Vec::new(),
        },
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

    fn kimi_calls(text: &str) -> Vec<PartialCall> {
        partial_calls(ToolCallFormat::KimiK2, text, &[])
    }

    /// Kimi-K2's calls as a stream reads them (`kimi_tool_calls.rs`).
    #[test]
    fn a_stream_sees_each_call_once_its_id_is_whole_and_its_arguments_grow() {
        let answer = kimi::tests::ANSWER;
        let cut = answer.find("Oslo").unwrap();
        let calls = kimi_calls(&answer[..cut]);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].id.as_deref(), Some("functions.get_weather:0"));
        assert_eq!(calls[0].arguments, "{\"city\": \"");
        assert!(!calls[0].complete);
        let name_only = &answer[..answer.find(kimi::ARGUMENTS_BEGIN).unwrap()];
        assert!(kimi_calls(name_only).is_empty(), "the id may still grow");
        let outside = answer.replace(kimi::SECTION_BEGIN, "");
        assert!(
            kimi_calls(&outside).is_empty(),
            "calls count inside a section"
        );
        let all = kimi_calls(answer);
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|c| c.complete));
        let whole = kimi::parse(answer).unwrap().1;
        let streamed =
            crate::function_calls::streamed_arguments(answer, &whole[0].arguments, |t| {
                kimi_calls(t).into_iter().take(1).collect()
            });
        assert_eq!(streamed.last(), Some(&whole[0].arguments));
    }

    #[test]
    fn calls_are_parsed_from_each_format() {
        let hermes = "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let (content, calls) = ToolCallFormat::Hermes.parse(hermes, &[]).unwrap();
        assert_eq!(content, "Sure.");
        assert_eq!(
            calls,
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: r#"{"city": "Oslo"}"#.into(),
                id: None,
            }]
        );
        let ds = format!(
            "{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}now\n```json\n{{}}\n```{DS_CALL_END}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{\"city\": \"Paris\"}}\n```{DS_CALL_END}{DS_CALLS_END}"
        );
        let (content, calls) = ToolCallFormat::DeepSeekV3.parse(&ds, &[]).unwrap();
        assert_eq!(content, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments, r#"{"city": "Paris"}"#);
        assert!(ToolCallFormat::Hermes.parse("just text", &[]).is_none());
    }

    /// DeepSeek-V3.1 writes `NAME<｜tool▁sep｜>ARGS`: parsed whole and as it streams, forced by
    /// its own grammar, and told from V3 (same `model_type`) by the real chat templates.
    #[test]
    fn deepseek_v31_calls_are_read_and_told_from_v3_by_the_template() {
        let v31 = ToolCallFormat::DeepSeekV31;
        let whole = format!(
            "Checking.{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{\"city\": \"Paris\"}}{DS_CALL_END}{DS_CALL_BEGIN}now{DS_SEP}{{}}{DS_CALL_END}{DS_CALLS_END}"
        );
        let (content, calls) = v31.parse(&whole, &[]).unwrap();
        assert_eq!(content, "Checking.");
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city": "Paris"}"#);
        assert_eq!(calls[1].name, "now");
        assert!(
            ToolCallFormat::DeepSeekV3.parse(&whole, &[]).is_none(),
            "V3 reads another layout"
        );
        let head = format!("{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{\"ci");
        let partial = partial_calls(v31, &head, &[]);
        assert_eq!(
            (partial[0].name.as_str(), partial[0].arguments.as_str()),
            ("get_weather", "{\"ci")
        );
        assert!(partial_calls(v31, &format!("{DS_CALL_BEGIN}get_wea"), &[]).is_empty());
        let grammar = v31.grammar(
            &[FunctionSpec {
                name: "now".into(),
                description: None,
                parameters: None,
            }],
            false,
        );
        assert!(
            grammar.contains(&literal(&format!("{DS_CALL_BEGIN}now{DS_SEP}"))),
            "{grammar}"
        );
        let hub = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/templates/hub/"
        );
        let template = |name: &str| std::fs::read_to_string(format!("{hub}{name}")).unwrap();
        let detect = |model_type, name: &str| {
            ToolCallFormat::for_model_and_template(model_type, Some(&template(name)))
        };
        assert_eq!(detect("deepseek_v3", "deepseek_v3_1.jinja"), v31);
        assert_eq!(
            detect("deepseek_v3", "deepseek_v3_0324.jinja"),
            ToolCallFormat::DeepSeekV3
        );
        assert_eq!(detect("qwen3_moe", "qwen3.jinja"), ToolCallFormat::Hermes);
        assert_eq!(
            detect("qwen3_moe", "qwen3_coder.jinja"),
            ToolCallFormat::Qwen3Coder
        );
        assert_eq!("qwen3_coder".parse(), Ok(ToolCallFormat::Qwen3Coder));
        assert_eq!("qwen3_xml".parse(), Ok(ToolCallFormat::Qwen3Coder));
        assert_eq!(detect("glm4_moe", "glm45.jinja"), ToolCallFormat::Glm45);
        assert_eq!("glm45".parse(), Ok(ToolCallFormat::Glm45));
        // GLM-4.7's template: GLM-4.5's with the layout shown back to back.
        let glm47 = template("glm45.jinja").replace(
            "<tool_call>{function-name}\n<arg_key>",
            "<tool_call>{function-name}<arg_key>",
        );
        assert_ne!(glm47, template("glm45.jinja"));
        assert_eq!(
            ToolCallFormat::for_model_and_template("glm4_moe", Some(&glm47)),
            ToolCallFormat::Glm47
        );
        assert_eq!("glm47".parse(), Ok(ToolCallFormat::Glm47));
        assert_eq!("glm-4.7".parse(), Ok(ToolCallFormat::Glm47));
        // MiniMax-M2 by its model_type, or by name.
        assert_eq!(
            ToolCallFormat::for_model("minimax_m2"),
            ToolCallFormat::MinimaxM2
        );
        assert_eq!("minimax-m2".parse(), Ok(ToolCallFormat::MinimaxM2));
        // GLM-4.7-Flash is a GLM-4.7 model under any template.
        assert_eq!(
            detect("glm4_moe_lite", "glm45.jinja"),
            ToolCallFormat::Glm47
        );
        assert_eq!(
            ToolCallFormat::for_model_and_template("deepseek_v3", None),
            ToolCallFormat::DeepSeekV3
        );
        assert_eq!("deepseek_v31".parse(), Ok(v31));
        assert!("llama3_json".parse::<ToolCallFormat>().is_err());
    }

    #[test]
    fn hermes_calls_grow_name_first_then_arguments() {
        let whole = "Ok.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let mut seen = Vec::new();
        for end in 0..=whole.len() {
            if whole.is_char_boundary(end) {
                seen.push(partial_calls(ToolCallFormat::Hermes, &whole[..end], &[]));
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
        let calls = partial_calls(ToolCallFormat::DeepSeekV3, &head, &[]);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city": "Pa"#);
        assert!(!calls[0].complete);
        let whole = format!("{head}ris\"}}\n```{DS_CALL_END}");
        let calls = partial_calls(ToolCallFormat::DeepSeekV3, &whole, &[]);
        assert_eq!(calls[0].arguments, r#"{"city": "Paris"}"#);
        assert!(calls[0].complete);
        // Not yet past the name: nothing.
        let early = format!("{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_wea");
        assert!(partial_calls(ToolCallFormat::DeepSeekV3, &early, &[]).is_empty());
    }
}
