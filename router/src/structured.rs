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
    /// invalid request naming the parameter it came from. The compiler recurses along chains
    /// of rules (a Lark rule naming the next) and of schema objects (through `$ref`s), a few
    /// KiB of stack each: grammars with more rules and groups than
    /// [`MAX_GRAMMAR_RULES_AND_GROUPS`] or objects than [`MAX_SCHEMA_OBJECTS`] are refused
    /// before it runs.
    pub fn compile(&self, spec: &StructuredOutput) -> Result<TokenConstraint, RouterError> {
        let Some(kind) = &spec.kind else {
            return Err(RouterError::invalid(
                "structured_outputs",
                "structured_output names no kind",
            ));
        };
        let invalid = |e: String| RouterError::invalid(param(kind), e);
        check_grammar_size(kind).map_err(invalid)?;
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

/// Rule definitions plus bracketed groups a Lark grammar may hold. The compiler recurses
/// along a chain of rules (each naming the next), and within a rule once per group around the
/// reference, about 2 KiB of stack a level: a chain of 2,000 plain rules overflowed a default
/// 2 MiB thread stack, which aborts the process, and one of 1,000 rules each naming the next
/// 28 parentheses deep needed over 56 MiB. Each rule and each group stands at most once on a
/// path, so their count bounds its length.
pub const MAX_GRAMMAR_RULES_AND_GROUPS: usize = 4000;

/// JSON objects a schema (or all of a Lark grammar's inline `%json` schemas) may hold. The
/// compiler recurses once per object along a path that `$ref`s can chain through the whole
/// schema (a definition nested 60 objects deep referring to the next, and so on), about
/// 3.7 KiB of stack an object: 500 chained references overflowed a 2 MiB thread, 300 of them
/// each 60 objects deep a 64 MiB one. Counting objects, not references, bounds every such
/// path (OpenAI's structured outputs allow 5,000 properties in all).
pub const MAX_SCHEMA_OBJECTS: usize = 5000;

/// The stack of the thread that compiles a grammar: over 2.6 times what the deepest paths at
/// the limits needed here (24 MiB: a schema's chain through `items`, or a Lark chain whose
/// last rule is such a schema; a Lark chain alone 16), reserved, and touched only as deep as
/// the compiler goes.
pub const COMPILE_STACK_BYTES: usize = 64 << 20;

/// Refuses a grammar with more rule definitions and groups than
/// [`MAX_GRAMMAR_RULES_AND_GROUPS`] or schema objects than [`MAX_SCHEMA_OBJECTS`]: bounds on
/// the longest path the compiler recurses along.
/// Objects are counted in the parsed JSON, a Lark grammar's in each of its `%json` schemas.
fn check_grammar_size(kind: &Kind) -> Result<(), String> {
    let (rules, objects) = match kind {
        Kind::JsonSchema(text) => match serde_json::from_str::<Value>(text) {
            Ok(schema) => (0, count_objects(&schema)),
            Err(_) => return Ok(()), // refused as not JSON where it is parsed for the compiler
        },
        Kind::Grammar(text) => (
            lark_rules_and_groups(text),
            lark_inline_schema_objects(text),
        ),
        Kind::JsonObject(_) | Kind::Regex(_) | Kind::Choice(_) => return Ok(()),
    };
    if rules > MAX_GRAMMAR_RULES_AND_GROUPS {
        return Err(format!(
            "the grammar holds {rules} rules and bracketed groups; at most \
             {MAX_GRAMMAR_RULES_AND_GROUPS} are accepted"
        ));
    }
    if objects > MAX_SCHEMA_OBJECTS {
        return Err(format!(
            "the schema holds {objects} JSON objects; at most {MAX_SCHEMA_OBJECTS} are accepted"
        ));
    }
    Ok(())
}

/// JSON objects anywhere in `schema`, itself included (a walk with its own stack: serde_json
/// bounds nesting at 128, but this need not rely on it).
fn count_objects(schema: &Value) -> usize {
    let mut count = 0;
    let mut pending = vec![schema];
    while let Some(value) = pending.pop() {
        match value {
            Value::Object(fields) => {
                count += 1;
                pending.extend(fields.values());
            }
            Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    count
}

/// Objects in the JSON schemas a Lark grammar holds inline (`%json { ... }`), each parsed as
/// the compiler will parse it.
fn lark_inline_schema_objects(text: &str) -> usize {
    text.match_indices("%json")
        .filter_map(|(at, directive)| {
            let rest = &text[at + directive.len()..];
            serde_json::Deserializer::from_str(rest)
                .into_iter::<Value>()
                .next()?
                .ok()
        })
        .map(|schema| count_objects(&schema))
        .sum()
}

/// Rule and terminal definitions in a Lark grammar (`name:`, `?name:`, `name.2:`), nested
/// `%lark` grammars' too, and its bracketed groups (`(` and `[`), counted generously: every
/// name followed by a colon and every bracket, wherever they stand (in a string, on a line
/// with others), count.
fn lark_rules_and_groups(text: &str) -> usize {
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut count = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !is_name(bytes[i]) {
            count += usize::from(bytes[i] == b'(' || bytes[i] == b'[');
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

/// A grammar that starts only once the answer has written `after` (a reasoning model's
/// `</think>`): until then the answer is free.
#[derive(Debug, Clone)]
pub struct PendingConstraint {
    pub constraint: TokenConstraint,
    pub after: String,
}

impl PendingConstraint {
    /// Whether `output`'s last tokens (the answer so far, its newest token last) hold
    /// `after` (asked at every token until it is: the first yes is the token completing it). Only a window of them is decoded: each token is at least a byte of the text
    /// (and a few may end in half a character), so `after` fits in its length plus four.
    pub fn reached_at_end<D: crate::detokenize::Decode + ?Sized>(
        &self,
        tokenizer: &D,
        output: &[u32],
    ) -> bool {
        let window = (self.after.len() + 4).min(output.len());
        let tail = &output[output.len() - window..];
        tokenizer
            .decode_text(tail)
            .is_some_and(|text| text.contains(self.after.as_str()))
    }

    /// How many of `ids` (an answer's first tokens) come before the grammar starts: the
    /// shortest prefix whose text holds `after` (`None` when none does). Decoding prefixes is
    /// monotone in their length, so a bisection finds it.
    pub fn start_in<D: crate::detokenize::Decode + ?Sized>(
        &self,
        tokenizer: &D,
        ids: &[u32],
    ) -> Option<usize> {
        let holds = |n: usize| {
            tokenizer
                .decode_text(&ids[..n])
                .is_some_and(|text| text.contains(self.after.as_str()))
        };
        if !holds(ids.len()) {
            return None;
        }
        let (mut lo, mut hi) = (0, ids.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if holds(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(lo)
    }
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

    /// Each id decodes to its own letters: id `i` to `TEXTS[i]`.
    struct Letters;
    const TEXTS: [&str; 6] = ["ab", "</th", "ink>", "x", "</think>", "y"];
    impl crate::detokenize::Decode for Letters {
        fn decode_text(&self, ids: &[u32]) -> Option<String> {
            Some(ids.iter().map(|&i| TEXTS[i as usize]).collect())
        }
    }

    /// The start text is found when its last token comes (split over two tokens or whole),
    /// and in a resumed answer the grammar starts right after it.
    #[test]
    fn a_pending_grammar_starts_after_its_text() {
        let pending = PendingConstraint {
            constraint: compiler()
                .compile(&StructuredOutput {
                    kind: Some(Kind::Regex("[0-9]".into())),
                })
                .unwrap(),
            after: "</think>".into(),
        };
        assert!(!pending.reached_at_end(&Letters, &[0, 1]));
        assert!(pending.reached_at_end(&Letters, &[0, 1, 2]));
        assert!(pending.reached_at_end(&Letters, &[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4]));
        assert_eq!(pending.start_in(&Letters, &[0, 1, 2, 3, 5]), Some(3));
        assert_eq!(pending.start_in(&Letters, &[0, 3, 4]), Some(3));
        assert_eq!(pending.start_in(&Letters, &[0, 1, 3]), None);
        assert_eq!(pending.start_in(&Letters, &[]), None);
    }
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

    /// A Lark grammar whose rules form one chain of `rules`, each naming the next `nest`
    /// parentheses deep.
    fn lark_chain(rules: usize, nest: usize) -> String {
        let (open, close) = ("(".repeat(nest), ")".repeat(nest));
        let mut g = String::from("start: r1\n");
        for i in 1..rules - 1 {
            g.push_str(&format!("r{i}: {open}\"x\" r{}{close} | \"y\"\n", i + 1));
        }
        g.push_str(&format!("r{}: \"z\"\n", rules - 1));
        g
    }

    /// The longest chain [`lark_chain`] of `nest` that fits the limit.
    fn longest_lark_chain(nest: usize) -> String {
        let fits = |rules: usize| {
            lark_rules_and_groups(&lark_chain(rules, nest)) <= MAX_GRAMMAR_RULES_AND_GROUPS
        };
        let rules = (3..MAX_GRAMMAR_RULES_AND_GROUPS)
            .take_while(|&r| fits(r))
            .last()
            .unwrap();
        assert!(rules > MAX_GRAMMAR_RULES_AND_GROUPS / (nest + 2));
        lark_chain(rules, nest)
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

    /// The deepest path of at most [`MAX_SCHEMA_OBJECTS`] objects: definitions each
    /// wrapping the reference to the next `depth` times in `wrap`, as many as fit.
    fn deep_ref_chain(wrap: fn(Value) -> Value, depth: usize) -> Value {
        let link = |links: usize| {
            let mut defs = serde_json::Map::new();
            for i in 0..links {
                let mut v = serde_json::json!({"$ref": format!("#/$defs/d{}", i + 1)});
                for _ in 0..depth {
                    v = wrap(v);
                }
                defs.insert(format!("d{i}"), v);
            }
            defs.insert(format!("d{links}"), serde_json::json!({"type": "string"}));
            serde_json::json!({"$defs": defs, "allOf": [{"$ref": "#/$defs/d0"}]})
        };
        let per_link = count_objects(&link(2)) - count_objects(&link(1));
        let links = (MAX_SCHEMA_OBJECTS - count_objects(&link(0))) / per_link;
        let schema = link(links);
        assert!(count_objects(&schema) <= MAX_SCHEMA_OBJECTS);
        assert!(count_objects(&link(links + 1)) > MAX_SCHEMA_OBJECTS);
        schema
    }

    /// Chains of rules or schema objects make the compiler recurse once per link (a few KiB
    /// of stack each): 2,000 Lark rules or 500 `$ref`s overflowed a 2 MiB thread, which
    /// aborts the process, and 300 references each 60 objects deep a 64 MiB one, as did
    /// 1,000 rules each naming the next 28 parentheses deep. At the limits the deepest such
    /// paths compile on the compiler's own stack; past them they are refused before it runs,
    /// however the key is spelled and wherever the schema stands.
    #[test]
    fn chains_of_rules_at_the_limit_compile_and_longer_ones_are_refused() {
        let c = compiler();
        let properties: fn(Value) -> Value =
            |v| serde_json::json!({"type": "object", "properties": {"n": v}, "required": ["n"]});
        let items: fn(Value) -> Value = |v| serde_json::json!({"type": "array", "items": v});
        let any_of: fn(Value) -> Value = |v| serde_json::json!({"anyOf": [v, {"type": "null"}]});
        let mut at_limit: Vec<Kind> = [0, 8, 28]
            .into_iter()
            .map(|nest| Kind::Grammar(longest_lark_chain(nest)))
            .collect();
        for (wrap, depth) in [
            (properties, 0),
            (properties, 60),
            (items, 120),
            (any_of, 60),
        ] {
            at_limit.push(Kind::JsonSchema(deep_ref_chain(wrap, depth).to_string()));
        }
        // A Lark chain at its limit whose last rule is a schema at its own.
        let lark = longest_lark_chain(28);
        let last = lark.trim_end().rsplit('\n').next().unwrap().to_string();
        let name = last.split(':').next().unwrap();
        let schema = deep_ref_chain(items, 120);
        at_limit.push(Kind::Grammar(
            lark.replace(&last, &format!("{name}: %json {schema}")),
        ));
        for kind in at_limit {
            let short = format!("{kind:?}").chars().take(80).collect::<String>();
            c.compile_on_own_stack(&spec(kind))
                .unwrap_or_else(|e| panic!("{short}: {e:?}"));
        }
        let past = 20_000;
        let schema = |key: &str| Kind::JsonSchema(ref_chain(past, key));
        let refused = [
            (Kind::Grammar(lark_chain(past, 0)), "rules"),
            (Kind::Grammar(lark_chain(1000, 28)), "rules"),
            (schema("\"$ref\""), "objects"),
            (schema("\"\\u0024ref\""), "objects"),
            (schema("\"\\u0024\\u0072ef\""), "objects"),
            (
                Kind::Grammar(format!("start: %json {}\n", ref_chain(past, "\"$ref\""))),
                "objects",
            ),
            (
                Kind::Grammar(format!(
                    "start: %json {}\n",
                    ref_chain(past, "\"\\u0024ref\"")
                )),
                "objects",
            ),
            // Rules on one line (nested `%lark`) count too.
            (
                Kind::Grammar(format!(
                    "start: %lark {{ {} }}\n",
                    lark_chain(past, 0).replace('\n', " ")
                )),
                "rules",
            ),
        ];
        for (kind, what) in refused {
            let short = format!("{kind:?}").chars().take(60).collect::<String>();
            match c.compile_on_own_stack(&spec(kind)) {
                Err(RouterError::Invalid { message, .. }) => assert!(
                    message.contains(what) && message.contains("at most"),
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
        for format in [
            ToolCallFormat::Hermes,
            ToolCallFormat::DeepSeekV3,
            ToolCallFormat::Qwen3Coder,
            ToolCallFormat::Glm45,
            ToolCallFormat::Glm47,
            ToolCallFormat::MinimaxM2,
            ToolCallFormat::KimiK2,
        ] {
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
                .parse(&text, &weather())
                .unwrap_or_else(|| panic!("{format:?}: {text:?}"));
            assert_eq!(calls[0].name, "get_weather", "{text}");
            let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
            assert!(args["city"] == "Paris" || args["city"] == "Oslo", "{text}");
        }
    }

    /// Qwen3-Coder's forced call: the answer it writes for a function with every kind of
    /// parameter is accepted to the end (a text value holding `</p>` and newlines included),
    /// a wrong name or a missing required parameter is not.
    /// A function with a parameter of every kind, for the forced-call tests.
    fn edit_function() -> Vec<moe_openai::tool_calls::FunctionSpec> {
        vec![moe_openai::tool_calls::FunctionSpec {
            name: "edit".into(),
            description: None,
            parameters: Some(serde_json::json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "line": {"type": "integer", "minimum": -5},
                    "dry_run": {"type": "boolean"},
                    "mode": {"enum": ["insert", "replace"]},
                    "options": {"type": "object", "properties": {"indent": {"type": "integer"}}}
                },
                "required": ["path", "line"]
            })),
        }]
    }

    /// Whether `format`'s grammar forcing parallel calls to `functions` takes a text whole,
    /// the answer then allowed to end.
    fn forced_call_acceptor(
        format: moe_openai::tool_calls::ToolCallFormat,
        functions: &[moe_openai::tool_calls::FunctionSpec],
    ) -> impl Fn(&str) -> bool {
        use moe_proto::v1::structured_output::Kind;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
                .unwrap();
        let compiler = GrammarCompiler::from_tokenizer_json(&json, 1).unwrap();
        let tokenizer = moe_model::tokenizer::Tokenizer::from_dir(&dir).unwrap();
        let grammar = format.grammar(functions, true);
        move |text: &str| -> bool {
            let mut c = compiler
                .compile(&StructuredOutput {
                    kind: Some(Kind::Grammar(grammar.clone())),
                })
                .unwrap_or_else(|e| panic!("{e:?}\n{grammar}"));
            let ids = tokenizer.encode_raw(text).unwrap();
            // Every token taken, and the answer may end there (the end token, id 1, allowed).
            ids.iter().all(|&t| c.consume(t).is_ok())
                && (c.is_finished() || c.allowed(2).is_ok_and(|a| a[1]))
        }
    }

    #[test]
    fn a_forced_qwen3_coder_call_takes_its_own_syntax_only() {
        use moe_openai::tool_calls::ToolCallFormat;
        let functions = edit_function();
        let accepts = forced_call_acceptor(ToolCallFormat::Qwen3Coder, &functions);
        let call = |path: &str, rest: &str| {
            format!(
                "<tool_call>\n<function=edit>\n<parameter=path>\n{path}\n</parameter>\n{rest}</function>\n</tool_call>"
            )
        };
        let full = call(
            "src/a.html\n<p>x</p>",
            "<parameter=line>\n12\n</parameter>\n<parameter=dry_run>\ntrue\n</parameter>\n<parameter=mode>\nreplace\n</parameter>\n<parameter=options>\n{\"indent\":4}\n</parameter>\n",
        );
        assert!(accepts(&full), "{full}");
        let minimal = call("a.rs", "<parameter=line>\n-3\n</parameter>\n");
        assert!(accepts(&minimal));
        assert!(accepts(&format!("{minimal}\n{full}")), "parallel calls");
        let (_, calls) = ToolCallFormat::Qwen3Coder.parse(&full, &functions).unwrap();
        let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args["path"], "src/a.html\n<p>x</p>");
        assert_eq!(
            (args["line"].clone(), args["dry_run"].clone()),
            (12.into(), true.into())
        );
        assert_eq!(args["options"]["indent"], 4);
        for wrong in [
            call("a.rs", ""),
            call("a.rs", "<parameter=line>\ntwelve\n</parameter>\n"),
            call("a.rs", "<parameter=line>\n-6\n</parameter>\n"),
            call(
                "a.rs",
                "<parameter=line>\n1\n</parameter>\n<parameter=mode>\ndelete\n</parameter>\n",
            ),
            minimal.replace("function=edit", "function=remove"),
        ] {
            assert!(!accepts(&wrong), "{wrong}");
        }
    }

    /// MiniMax-M2's forced call: its `<invoke>` layout accepted to the end, values as their
    /// types allow; Qwen3-Coder's tags, a wrong name or a value outside its type refused.
    #[test]
    fn a_forced_minimax_m2_call_takes_its_own_syntax_only() {
        use moe_openai::tool_calls::ToolCallFormat;
        let functions = edit_function();
        let accepts = forced_call_acceptor(ToolCallFormat::MinimaxM2, &functions);
        let call = |path: &str, rest: &str| {
            format!(
                "<minimax:tool_call>\n<invoke name=\"edit\">\n<parameter name=\"path\">{path}</parameter>\n{rest}</invoke>\n</minimax:tool_call>"
            )
        };
        let full = call(
            "src/a.html\n<p>x</p>",
            "<parameter name=\"line\">12</parameter>\n<parameter name=\"dry_run\">true</parameter>\n<parameter name=\"mode\">replace</parameter>\n<parameter name=\"options\">{\"indent\":4}</parameter>\n",
        );
        assert!(accepts(&full), "{full}");
        let minimal = call("a.rs", "<parameter name=\"line\">-3</parameter>\n");
        assert!(accepts(&minimal));
        assert!(accepts(&format!("{minimal}\n{full}")), "parallel calls");
        let (_, calls) = ToolCallFormat::MinimaxM2.parse(&full, &functions).unwrap();
        let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args["path"], "src/a.html\n<p>x</p>");
        assert_eq!(
            (args["line"].clone(), args["dry_run"].clone()),
            (12.into(), true.into())
        );
        assert_eq!(args["options"]["indent"], 4);
        for wrong in [
            call("a.rs", ""),
            call("a.rs", "<parameter name=\"line\">twelve</parameter>\n"),
            call("a.rs", "<parameter name=\"line\">-6</parameter>\n"),
            minimal.replace("name=\"edit\"", "name=\"remove\""),
            "<tool_call>\n<function=edit>\n<parameter=path>\na.rs\n</parameter>\n<parameter=line>\n1\n</parameter>\n</function>\n</tool_call>".to_string(),
        ] {
            assert!(!accepts(&wrong), "{wrong}");
        }
    }

    /// GLM-4.5's forced call: its template's layout accepted to the end (string values raw,
    /// the others JSON), a wrong name, a missing required pair or a value outside its type
    /// or bounds not.
    #[test]
    fn a_forced_glm45_call_takes_its_own_syntax_only() {
        forced_glm_calls(moe_openai::tool_calls::ToolCallFormat::Glm45, "\n");
    }

    /// GLM-4.7's: the same with the tags back to back, and GLM-4.5's layout refused.
    #[test]
    fn a_forced_glm47_call_takes_its_own_syntax_only() {
        use moe_openai::tool_calls::ToolCallFormat;
        forced_glm_calls(ToolCallFormat::Glm47, "");
        let accepts = forced_call_acceptor(ToolCallFormat::Glm47, &edit_function());
        let lines = "<tool_call>edit\n<arg_key>path</arg_key>\n<arg_value>a</arg_value>\n<arg_key>line</arg_key>\n<arg_value>1</arg_value>\n</tool_call>";
        assert!(!accepts(lines));
        assert!(accepts(&lines.replace('\n', "")));
    }

    /// A GLM call in `format`, `gap` between its name and tags.
    fn forced_glm_calls(format: moe_openai::tool_calls::ToolCallFormat, gap: &str) {
        let functions = edit_function();
        let accepts = forced_call_acceptor(format, &functions);
        let pair = |k: &str, v: &str| {
            format!("<arg_key>{k}</arg_key>{gap}<arg_value>{v}</arg_value>{gap}")
        };
        let call = |path: &str, rest: &str| {
            format!(
                "<tool_call>edit{gap}{}{rest}</tool_call>",
                pair("path", path)
            )
        };
        let full = call(
            "src/a.html\n<p>x</p>",
            &[
                pair("line", "12"),
                pair("dry_run", "true"),
                pair("mode", "replace"),
                pair("options", "{\"indent\":4}"),
            ]
            .concat(),
        );
        assert!(accepts(&full), "{full}");
        let minimal = call("a.rs", &pair("line", "-3"));
        assert!(accepts(&minimal));
        assert!(accepts(&format!("{minimal}\n{full}")), "parallel calls");
        let (_, calls) = format.parse(&full, &functions).unwrap();
        let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args["path"], "src/a.html\n<p>x</p>");
        assert_eq!(
            (
                args["line"].clone(),
                args["dry_run"].clone(),
                args["mode"].clone()
            ),
            (12.into(), true.into(), "replace".into())
        );
        assert_eq!(args["options"]["indent"], 4);
        for wrong in [
            call("a.rs", ""),
            call("a.rs", &pair("line", "twelve")),
            call("a.rs", &pair("line", "-6")),
            call(
                "a.rs",
                &[pair("line", "1"), pair("mode", "delete")].concat(),
            ),
            minimal.replace("<tool_call>edit", "<tool_call>remove"),
        ] {
            assert!(!accepts(&wrong), "{wrong}");
        }
    }
}
