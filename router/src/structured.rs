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
    /// The tokenizer's ids (`0..vocab`), which the masks cover.
    vocab: usize,
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
        let vocab = words.len();
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self { factory, vocab })
    }

    /// The tokenizer's ids: masks allow none at or past it.
    pub fn tokenizer_vocab(&self) -> usize {
        self.vocab
    }

    /// [`Self::compile`] on a thread of its own with a stack of [`COMPILE_STACK_BYTES`] (the
    /// caller's thread waits: call it off the async runtime). A panic inside the compiler is
    /// this request's error, not the caller's.
    pub fn compile_on_own_stack(
        &self,
        spec: &StructuredOutput,
    ) -> Result<TokenConstraint, RouterError> {
        std::thread::scope(|scope| {
            let compiling = std::thread::Builder::new()
                .name("grammar".into())
                .stack_size(COMPILE_STACK_BYTES)
                .spawn_scoped(scope, || self.compile(spec))
                .map_err(|e| {
                    RouterError::Internal(format!("no thread to compile a grammar: {e}"))
                })?;
            compiling.join().unwrap_or_else(|_| {
                Err(RouterError::Internal(
                    "the grammar compiler panicked".into(),
                ))
            })
        })
    }

    /// The request's grammar, ready to constrain it; a grammar that does not compile is an
    /// invalid request naming the parameter it came from. The compiler recurses once per
    /// rule of a chain of rules (a Lark rule naming the next) or of `$ref`s (a schema's
    /// definition referring to the next), a few KiB of stack each: grammars with more rules
    /// or references than [`MAX_GRAMMAR_RULES`] are refused before it runs.
    pub fn compile(&self, spec: &StructuredOutput) -> Result<TokenConstraint, RouterError> {
        let Some(kind) = &spec.kind else {
            return Err(RouterError::invalid(
                "structured_outputs",
                "structured_output names no kind",
            ));
        };
        let invalid = |e: String| RouterError::invalid(param(kind), e);
        check_rule_count(kind).map_err(invalid)?;
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
        Ok(TokenConstraint {
            matcher,
            tokenizer_vocab: self.vocab,
        })
    }
}

/// Rules a Lark grammar may define, and `$ref`s a JSON schema (or a Lark grammar's inline
/// `%json` schemas) may hold. A chain of that many `$ref`s compiled in 11 MiB of stack (not
/// in 8), one of that many Lark rules in 4 MiB; chains of 2,000 Lark rules or 500 references
/// overflowed a default 2 MiB thread stack, which aborts the process.
pub const MAX_GRAMMAR_RULES: usize = 1000;

/// The stack of the thread that compiles a grammar: about six times what a chain at
/// [`MAX_GRAMMAR_RULES`] needs, for recursion of shapes not bounded here (reserved, and
/// touched only as deep as the compiler goes).
pub const COMPILE_STACK_BYTES: usize = 64 << 20;

/// Refuses a grammar with more rule definitions or `$ref`s than [`MAX_GRAMMAR_RULES`]: an
/// upper bound on the longest chain the compiler recurses along. References are counted in
/// the parsed JSON (a key spelled `"\u0024ref"` is one too), a Lark grammar's in each of
/// its `%json` schemas.
fn check_rule_count(kind: &Kind) -> Result<(), String> {
    let (rules, refs) = match kind {
        Kind::JsonSchema(text) => match serde_json::from_str::<Value>(text) {
            Ok(schema) => (0, count_refs(&schema)),
            Err(_) => return Ok(()), // refused as not JSON where it is parsed for the compiler
        },
        Kind::Grammar(text) => (lark_rule_definitions(text), lark_inline_schema_refs(text)),
        Kind::JsonObject(_) | Kind::Regex(_) | Kind::Choice(_) => return Ok(()),
    };
    if rules > MAX_GRAMMAR_RULES {
        return Err(format!(
            "the grammar defines {rules} rules; at most {MAX_GRAMMAR_RULES} are accepted"
        ));
    }
    if refs > MAX_GRAMMAR_RULES {
        return Err(format!(
            "the schema holds {refs} $ref; at most {MAX_GRAMMAR_RULES} are accepted"
        ));
    }
    Ok(())
}

/// `$ref` keys anywhere in `schema` (a walk with its own stack: serde_json bounds nesting at
/// 128, but this need not rely on it).
fn count_refs(schema: &Value) -> usize {
    let mut count = 0;
    let mut pending = vec![schema];
    while let Some(value) = pending.pop() {
        match value {
            Value::Object(fields) => {
                count += usize::from(fields.contains_key("$ref"));
                pending.extend(fields.values());
            }
            Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    count
}

/// `$ref`s in the JSON schemas a Lark grammar holds inline (`%json { ... }`), each parsed as
/// the compiler will parse it.
fn lark_inline_schema_refs(text: &str) -> usize {
    text.match_indices("%json")
        .filter_map(|(at, directive)| {
            let rest = &text[at + directive.len()..];
            serde_json::Deserializer::from_str(rest)
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .map(|schema| count_refs(&schema))
        .sum()
}

/// Rule and terminal definitions in a Lark grammar (`name:`, `?name:`, `name.2:`), nested
/// `%lark` grammars' too, counted generously: every name followed by a colon, wherever it
/// stands (in a string, on a line with others), counts.
fn lark_rule_definitions(text: &str) -> usize {
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut count = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !is_name(bytes[i]) {
            i += 1;
            continue;
        }
        while i < bytes.len() && (is_name(bytes[i]) || bytes[i] == b'.' || bytes[i] == b'-') {
            i += 1;
        }
        let mut j = i;
        while j < bytes.len() && (bytes[j] == b' ' || bytes[j] == b'\t') {
            j += 1;
        }
        count += usize::from(bytes.get(j) == Some(&b':'));
    }
    count
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
    tokenizer_vocab: usize,
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
    /// tokenizer does not have are never allowed). A model's `vocab_size` is often padded past
    /// its tokenizer's last id (DeepSeek-V3: 129280 rows for 128815 tokens), and the mask
    /// holds the tokenizer's ids only.
    pub fn allowed(&mut self, vocab: usize) -> Result<Vec<bool>, String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let known = mask.len().min(vocab);
        let mut allowed: Vec<bool> = (0..known as u32).map(|t| mask.is_allowed(t)).collect();
        allowed.resize(vocab, false);
        Ok(allowed)
    }

    /// Advances over the sampled token (an id the tokenizer does not have is refused: a
    /// resumed answer's ids come from the client).
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        if token as usize >= self.tokenizer_vocab {
            return Err(format!(
                "token {token} is not in the tokenizer's {} ids",
                self.tokenizer_vocab
            ));
        }
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

    /// A Lark grammar whose rules form one chain of `rules` (each naming the next).
    fn lark_chain(rules: usize) -> String {
        let mut g = String::from("start: r1\n");
        for i in 1..rules - 1 {
            g.push_str(&format!("r{i}: \"x\" r{} | \"y\"\n", i + 1));
        }
        g.push_str(&format!("r{}: \"z\"\n", rules - 1));
        g
    }

    /// A JSON schema whose definitions form one chain of `refs` references, the key spelled
    /// `ref_key`.
    fn ref_chain(refs: usize, ref_key: &str) -> String {
        let link = |i: usize| format!("{{{ref_key}:\"#/$defs/d{i}\"}}");
        let mut defs: Vec<String> = (0..refs - 1)
            .map(|i| {
                format!(
                    "\"d{i}\":{{\"type\":\"object\",\"properties\":{{\"n\":{}}}}}",
                    link(i + 1)
                )
            })
            .collect();
        defs.push(format!("\"d{}\":{{\"type\":\"string\"}}", refs - 1));
        format!(
            "{{\"$defs\":{{{}}},\"allOf\":[{}]}}",
            defs.join(","),
            link(0)
        )
    }

    /// Chains of rules or references make the compiler recurse once per link (a few KiB of
    /// stack each): 2,000 Lark rules or 500 `$ref`s overflowed a 2 MiB thread, which aborts
    /// the process. At the limit they compile on the compiler's own stack; past it they are
    /// refused before it runs, however the key is spelled.
    #[test]
    fn chains_of_rules_at_the_limit_compile_and_longer_ones_are_refused() {
        let c = compiler();
        let at_limit = [
            Kind::Grammar(lark_chain(MAX_GRAMMAR_RULES)),
            Kind::JsonSchema(ref_chain(MAX_GRAMMAR_RULES, "\"$ref\"")),
        ];
        for kind in at_limit {
            c.compile_on_own_stack(&spec(kind.clone()))
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        let past = MAX_GRAMMAR_RULES * 20;
        let schema = |key: &str| Kind::JsonSchema(ref_chain(past, key));
        let refused = [
            (Kind::Grammar(lark_chain(past)), "rules"),
            (schema("\"$ref\""), "$ref"),
            (schema("\"\\u0024ref\""), "$ref"),
            (schema("\"\\u0024\\u0072ef\""), "$ref"),
            (
                Kind::Grammar(format!("start: %json {}\n", ref_chain(past, "\"$ref\""))),
                "$ref",
            ),
            (
                Kind::Grammar(format!(
                    "start: %json {}\n",
                    ref_chain(past, "\"\\u0024ref\"")
                )),
                "$ref",
            ),
            // Rules on one line (nested `%lark`) count too.
            (
                Kind::Grammar(format!(
                    "start: %lark {{ {} }}\n",
                    lark_chain(past).replace('\n', " ")
                )),
                "rules",
            ),
        ];
        for (kind, what) in refused {
            let short = format!("{kind:?}").chars().take(60).collect::<String>();
            match c.compile_on_own_stack(&spec(kind)) {
                Err(RouterError::Invalid { message, .. }) => assert!(
                    message.contains(what) && message.contains("at most 1000"),
                    "{short}: {message}"
                ),
                other => panic!("{short}: {other:?}"),
            }
        }
    }

    /// A model's vocabulary padded past its tokenizer's ids (DeepSeek-V3's 129280 rows for
    /// 128815 tokens): the mask covers every row, the padding never allowed, and an id past
    /// the tokenizer (a resumed answer's, from the client) is refused, not a panic.
    #[test]
    fn a_vocabulary_padded_past_the_tokenizer_is_masked_and_its_ids_refused() {
        let c = compiler();
        let tokenizer_ids = c.vocab;
        for kind in [
            Kind::Regex("[a-z]+".into()),
            Kind::JsonSchema(r#"{"type":"object"}"#.into()),
        ] {
            let mut t = c.compile(&spec(kind)).unwrap();
            // Past the mask's last 32-bit word too (the panic was an index out of range there).
            let padded = tokenizer_ids + 100;
            let allowed = t.allowed(padded).unwrap();
            assert_eq!(allowed.len(), padded);
            assert!(allowed[..tokenizer_ids].iter().any(|&a| a));
            assert!(!allowed[tokenizer_ids..].iter().any(|&a| a));
            let shorter = t.allowed(10).unwrap();
            assert_eq!(shorter[..], allowed[..10]);
            for id in [tokenizer_ids as u32, padded as u32 - 1, u32::MAX] {
                let err = t.consume(id).unwrap_err();
                assert!(err.contains("not in the tokenizer"), "{err}");
            }
            // The refusals changed nothing: an allowed id still advances it.
            let first = allowed.iter().position(|&a| a).unwrap() as u32;
            t.consume(first).unwrap();
        }
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
