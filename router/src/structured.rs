//! Structured outputs: a request's grammar (a JSON schema, any JSON object, a regex, one of a
//! list of strings, a Lark grammar) compiled by llguidance over the tokenizer's vocabulary,
//! and, at each step, the set of tokens that keep the output inside it. The mask depends only
//! on the request's own tokens, so a constrained request's output stays independent of its
//! batch-mates.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use moe_proto::v1::structured_output::Kind;
use moe_proto::v1::StructuredOutput;
use serde_json::Value;

use crate::error::RouterError;

/// Compiles grammars for one tokenizer (built once at start: it indexes the vocabulary).
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrammarCompiler")
    }
}

/// The HTTP parameter a grammar of this kind came from (vLLM's names), for errors.
fn param(kind: &Kind) -> &'static str {
    match kind {
        Kind::JsonSchema(_) | Kind::JsonObject(_) => "response_format",
        Kind::Regex(_) | Kind::Choice(_) | Kind::Grammar(_) => "structured_outputs",
    }
}

impl GrammarCompiler {
    /// From a Hugging Face `tokenizer.json` (the token bytes) and the end-of-sequence id.
    pub fn from_tokenizer_json(json: &Value, eos: u32) -> Result<Self, String> {
        let words = llguidance::token_bytes_from_tokenizer_json(json).map_err(|e| e.to_string())?;
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory })
    }

    /// The request's grammar, ready to constrain it; a grammar that does not compile is an
    /// invalid request naming the parameter it came from.
    pub fn compile(&self, spec: &StructuredOutput) -> Result<TokenConstraint, RouterError> {
        let Some(kind) = &spec.kind else {
            return Err(RouterError::invalid(
                "structured_outputs",
                "structured_output names no kind",
            ));
        };
        let invalid = |e: String| RouterError::invalid(param(kind), e);
        let grammar = match kind {
            Kind::JsonSchema(text) => {
                let schema: Value = serde_json::from_str(text)
                    .map_err(|e| invalid(format!("the JSON schema is not JSON: {e}")))?;
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(invalid("the JSON schema must be an object".into()));
                }
                TopLevelGrammar::from_json_schema(compact(schema))
            }
            Kind::JsonObject(_) => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Kind::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Kind::Choice(list) => {
                if list.choices.is_empty() {
                    return Err(invalid("choice needs at least one string".into()));
                }
                let alternatives: Vec<String> = list
                    .choices
                    .iter()
                    .map(|c| serde_json::to_string(c).unwrap_or_default())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Kind::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| invalid(format!("the grammar does not compile: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(format!("the grammar does not compile: {e}")));
        }
        Ok(TokenConstraint { matcher })
    }
}

/// JSON without optional whitespace between tokens (as OpenAI's strict mode writes it): every
/// token the model spends goes to content.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(fields) = &mut schema {
        fields
            .entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
    }
    schema
}

/// One request's grammar state: which tokens may come next, advanced by each sampled token.
#[derive(Clone)]
pub struct TokenConstraint {
    matcher: Matcher,
}

impl std::fmt::Debug for TokenConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConstraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl TokenConstraint {
    /// The tokens allowed next, one flag per vocabulary entry (`vocab` long; ids the
    /// tokenizer does not have are never allowed).
    pub fn allowed(&mut self, vocab: usize) -> Result<Vec<bool>, String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok((0..vocab as u32).map(|t| mask.is_allowed(t)).collect())
    }

    /// Advances over the sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete: nothing more may be generated.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::ChoiceList;

    fn compiler() -> GrammarCompiler {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny/tokenizer.json");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        GrammarCompiler::from_tokenizer_json(&json, 1).unwrap()
    }

    fn spec(kind: Kind) -> StructuredOutput {
        StructuredOutput { kind: Some(kind) }
    }

    /// Walks the grammar taking the lowest allowed token each time; the bytes it spells.
    fn walk(c: &mut TokenConstraint, words: &[Vec<u8>]) -> String {
        let mut out = Vec::new();
        for _ in 0..64 {
            let allowed = c.allowed(words.len()).unwrap();
            let Some(t) = allowed.iter().position(|&a| a) else {
                break;
            };
            if t == 1 {
                break;
            }
            out.extend_from_slice(&words[t]);
            c.consume(t as u32).unwrap();
            if c.is_finished() {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn each_kind_constrains_what_can_be_generated() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny/tokenizer.json");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let words = llguidance::token_bytes_from_tokenizer_json(&json).unwrap();
        let c = compiler();
        let choice = spec(Kind::Choice(ChoiceList {
            choices: vec!["yes".into(), "no".into()],
        }));
        let got = walk(&mut c.compile(&choice).unwrap(), &words);
        assert!(got == "yes" || got == "no", "{got:?}");
        let got = walk(
            &mut c.compile(&spec(Kind::Regex("[0-9]{3}".into()))).unwrap(),
            &words,
        );
        assert!(
            got.len() == 3 && got.bytes().all(|b| b.is_ascii_digit()),
            "{got:?}"
        );
        let schema = r#"{"type":"object","properties":{"k":{"enum":["a","b"]}},"required":["k"],"additionalProperties":false}"#;
        let got = walk(
            &mut c.compile(&spec(Kind::JsonSchema(schema.into()))).unwrap(),
            &words,
        );
        let value: Value = serde_json::from_str(&got).unwrap();
        assert!(value == serde_json::json!({"k": "a"}) || value == serde_json::json!({"k": "b"}));
    }

    #[test]
    fn grammars_that_do_not_compile_name_their_parameter() {
        let c = compiler();
        for (kind, name) in [
            (Kind::JsonSchema("{not json".into()), "response_format"),
            (Kind::JsonSchema("[1, 2]".into()), "response_format"),
            (Kind::Regex("(unclosed".into()), "structured_outputs"),
            (
                Kind::Grammar("start: undefined_rule".into()),
                "structured_outputs",
            ),
            (
                Kind::Choice(ChoiceList { choices: vec![] }),
                "structured_outputs",
            ),
        ] {
            match c.compile(&spec(kind.clone())) {
                Err(RouterError::Invalid { param: Some(p), .. }) => assert_eq!(p, name, "{kind:?}"),
                other => panic!("{kind:?}: {other:?}"),
            }
        }
    }

    /// A weather function whose one argument is an enum, for the forced-call grammar.
    fn weather() -> Vec<moe_openai::tool_calls::FunctionSpec> {
        vec![moe_openai::tool_calls::FunctionSpec {
            name: "get_weather".into(),
            description: None,
            parameters: Some(serde_json::json!({
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": false
            })),
        }]
    }

    /// Walking each format's grammar gives text its parser reads back as a valid call.
    #[test]
    fn forced_calls_parse_back() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny/tokenizer.json");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let words = llguidance::token_bytes_from_tokenizer_json(&json).unwrap();
        let compiler = GrammarCompiler::from_tokenizer_json(&json, 1).unwrap();
        use moe_openai::tool_calls::ToolCallFormat;
        use moe_proto::v1::structured_output::Kind;
        for format in [ToolCallFormat::Hermes, ToolCallFormat::DeepSeekV3] {
            let grammar = format.grammar(&weather()[..1], false);
            let mut c = compiler
                .compile(&StructuredOutput {
                    kind: Some(Kind::Grammar(grammar.clone())),
                })
                .unwrap_or_else(|e| panic!("{format:?}: {e:?}\n{grammar}"));
            let mut out = Vec::new();
            for _ in 0..400 {
                let allowed = c.allowed(words.len()).unwrap();
                // The longest allowed token: the walk reaches the end quickly.
                let Some(t) = (0..words.len())
                    .filter(|&t| allowed[t] && t != 1)
                    .max_by_key(|&t| words[t].len())
                else {
                    break;
                };
                out.extend_from_slice(&words[t]);
                c.consume(t as u32).unwrap();
                if c.is_finished() {
                    break;
                }
            }
            let text = String::from_utf8(out).unwrap();
            let (_, calls) = format
                .parse(&text)
                .unwrap_or_else(|| panic!("{format:?}: {text:?}"));
            assert_eq!(calls[0].name, "get_weather", "{text}");
            let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
            assert!(args["city"] == "Paris" || args["city"] == "Oslo", "{text}");
        }
    }
}
