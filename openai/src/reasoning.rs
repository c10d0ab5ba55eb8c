//! A thinking model's reasoning kept apart from its answer (`--reasoning-parser`, as vLLM's and
//! SGLang's): the text inside `<think>...</think>` goes out as `reasoning_content` (DeepSeek's
//! own API's name, which SGLang and vLLM's clients read), the rest as `content`, where tool
//! calls are then looked for. A stream splits exactly as the whole answer does: the same rule
//! runs over the pieces as they come, holding back only a tail that could still grow into a
//! tag. MiniMax-M2's clients keep the thinking in the conversation instead (its template
//! expects it back in later turns): `minimax_m2_append_think` leaves it in the content, with
//! the opening tag the prompt wrote.

use std::str::FromStr;

use serde_json::{Map, Value};

const START: &str = "<think>";
const END: &str = "</think>";

/// Which models' reasoning format the server reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParser {
    /// DeepSeek-R1 (and QwQ, Qwen3's thinking-only models): the template opens `<think>` in
    /// the prompt, so the answer is reasoning from its first token (an opening tag it writes
    /// anyway is dropped) until `</think>`; an answer cut off before it is all reasoning.
    DeepSeekR1,
    /// Qwen3: reasoning when the answer opens with `<think>` (the hybrid models' template
    /// leaves it to the model; with `enable_thinking` false it closes an empty block in the
    /// prompt and the answer is all content), or from the first token when the prompt ends
    /// inside an open `<think>` (the thinking-only 2507 models' template), until `</think>`.
    /// GLM-4.5 (`glm45`) too: its answers open with `<think>`, and with `enable_thinking`
    /// false its template closes an empty block in the prompt; GLM-4.7's template opens the
    /// block in the prompt, as Qwen3's thinking-only ones do.
    Qwen3,
    /// DeepSeek-V3.1: as DeepSeek-R1 when the request asks the template to think
    /// (`chat_template_kwargs.thinking`), otherwise no reasoning at all.
    DeepSeekV3,
    /// MiniMax-M2 as its own guide serves it (vLLM's `minimax_m2_append_think`): nothing is
    /// split off; the answer is all content, opened with the `<think>` its template put at
    /// the end of the prompt, so a client that sends the message back gives the model its
    /// thinking whole. (`minimax_m2`, which splits, is DeepSeek-R1's rule: M2 writes only the
    /// closing tag, M2.5 both.)
    MinimaxM2AppendThink,
    /// Kimi-K2-Thinking (vLLM's and SGLang's `kimi_k2`): as DeepSeek-R1 (reasoning from the
    /// first token, an opening `<think>` dropped), and a tool-call section the model starts
    /// ends the reasoning too (the section goes to the content, where calls are read);
    /// `chat_template_kwargs.thinking: false` turns the split off.
    KimiK2,
}

impl FromStr for ReasoningParser {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "deepseek-r1" | "deepseek_r1" => Ok(Self::DeepSeekR1),
            "qwen3" | "glm45" | "glm4_moe" | "glm4_moe_lite" => Ok(Self::Qwen3),
            "deepseek-v3" | "deepseek_v3" => Ok(Self::DeepSeekV3),
            "minimax_m2" | "minimax-m2" => Ok(Self::DeepSeekR1),
            "kimi_k2" | "kimi-k2" => Ok(Self::KimiK2),
            "minimax_m2_append_think" | "minimax-m2-append-think" => Ok(Self::MinimaxM2AppendThink),
            other => Err(format!(
                "unknown reasoning parser `{other}`: deepseek-r1, qwen3, deepseek-v3, glm45, \
                 minimax-m2, minimax-m2-append-think or kimi-k2"
            )),
        }
    }
}

impl ReasoningParser {
    /// How one request's answer splits (`None`: it does not), given its rendered `prompt`,
    /// its `chat_template_kwargs` and vLLM's `include_reasoning`.
    pub fn for_request(
        self,
        prompt: &str,
        template_kwargs: Option<&Map<String, Value>>,
        include_reasoning: bool,
    ) -> Option<ReasoningSplit> {
        let asked = |name: &str| {
            template_kwargs
                .and_then(|k| k.get(name))
                .is_some_and(|v| v.as_bool() == Some(true))
        };
        let refused = |name: &str| {
            template_kwargs
                .and_then(|k| k.get(name))
                .is_some_and(|v| v.as_bool() == Some(false))
        };
        let opens_in_prompt = match self {
            Self::KimiK2 if refused("thinking") => return None,
            Self::DeepSeekR1 | Self::KimiK2 => true,
            Self::Qwen3 | Self::MinimaxM2AppendThink => prompt.trim_end().ends_with(START),
            Self::DeepSeekV3 if asked("thinking") || asked("enable_thinking") => true,
            Self::DeepSeekV3 => return None,
        };
        Some(ReasoningSplit {
            opens_in_prompt,
            include: include_reasoning,
            kept_in_content: self == Self::MinimaxM2AppendThink,
            also_ends_at: (self == Self::KimiK2).then_some(crate::kimi_tool_calls::SECTION_BEGIN),
        })
    }
}

impl ReasoningSplit {
    /// Where a structured output (or a forced tool call) starts in an answer to `prompt`:
    /// after `</think>`, so the model thinks freely and then answers in the grammar (as vLLM
    /// does with a reasoning parser); from the first token when the prompt already closed the
    /// thinking (Qwen3's template with `enable_thinking: false` ends with an empty block).
    pub fn grammar_start(&self, prompt: &str) -> Option<&'static str> {
        (!prompt.trim_end().ends_with(END)).then_some(END)
    }
}

/// One request's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasoningSplit {
    /// The answer starts inside the reasoning (without an opening tag of its own).
    opens_in_prompt: bool,
    /// Whether the reasoning is sent at all (vLLM's `include_reasoning`).
    include: bool,
    /// The thinking stays in the content, tags and all (the split only counts its tokens
    /// and tells where a grammar starts).
    kept_in_content: bool,
    /// Text that ends the reasoning as `</think>` does, itself kept for the content (Kimi's
    /// tool-call section).
    also_ends_at: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing but whitespace and maybe the start of `<think>` seen yet.
    Opening,
    Reasoning,
    Content,
}

/// What a piece of the answer adds to each part.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SplitPiece {
    pub reasoning: String,
    pub content: String,
}

/// One choice's answer being split as it streams.
#[derive(Debug, Clone)]
pub struct ReasoningStream {
    split: ReasoningSplit,
    phase: Phase,
    /// Text not yet given out.
    held: String,
    /// Whether any reasoning was seen (a whole answer then has `reasoning_content`).
    reasoned: bool,
    /// Tokens of the thinking so far (its tags included), and those of pieces not yet told
    /// apart (whitespace, a tag's beginning).
    reasoning_tokens: u32,
    undecided_tokens: u32,
    /// Whether any text was given out yet (where a kept thinking's opening tag goes).
    started: bool,
}

/// Where in `text` a tail starts that could still grow into `tag` (its length when none).
fn open_tail(text: &str, tag: &str) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| tag.starts_with(&text[i..]))
        .unwrap_or(text.len())
}

impl ReasoningStream {
    pub fn new(split: ReasoningSplit) -> Self {
        Self {
            split,
            phase: Phase::Opening,
            held: String::new(),
            reasoned: false,
            reasoning_tokens: 0,
            undecided_tokens: 0,
            started: false,
        }
    }

    /// [`Self::push`] of a piece of `tokens` tokens, counting them as reasoning when the piece
    /// falls inside the thinking or closes it (a piece that also starts the content counts
    /// whole: pieces are a token or two).
    pub fn push_tokens(&mut self, piece: &str, tokens: u32, last: bool) -> SplitPiece {
        let before = self.phase;
        let out = self.push(piece, last);
        match (before, self.phase) {
            (_, Phase::Opening) => self.undecided_tokens += tokens,
            (Phase::Content, _) => {}
            (Phase::Opening, Phase::Content) if !self.reasoned => self.undecided_tokens = 0,
            _ => {
                self.reasoning_tokens += std::mem::take(&mut self.undecided_tokens) + tokens;
            }
        }
        out
    }

    /// The thinking's tokens so far (usage's `reasoning_tokens`), counted by
    /// [`Self::push_tokens`].
    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    /// Splits the next piece; with `last`, gives out everything held. A thinking kept in
    /// the content is followed all the same (for its tokens) while the piece goes out as it
    /// came, the first one after the prompt's opening tag.
    pub fn push(&mut self, piece: &str, last: bool) -> SplitPiece {
        let split = self.split_piece(piece, last);
        if !self.split.kept_in_content {
            return split;
        }
        let opening = !std::mem::replace(&mut self.started, true) && self.split.opens_in_prompt;
        SplitPiece {
            reasoning: String::new(),
            content: if opening {
                format!("{START}{piece}")
            } else {
                piece.to_string()
            },
        }
    }

    fn split_piece(&mut self, piece: &str, last: bool) -> SplitPiece {
        self.held.push_str(piece);
        let mut out = SplitPiece::default();
        loop {
            match self.phase {
                Phase::Opening => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(START) {
                        self.held = rest.to_string();
                        self.phase = Phase::Reasoning;
                    } else if START.starts_with(trimmed) && !last {
                        // Whitespace and maybe the tag's beginning: wait for more.
                        break;
                    } else {
                        self.phase = if self.split.opens_in_prompt {
                            Phase::Reasoning
                        } else {
                            Phase::Content
                        };
                    }
                }
                Phase::Reasoning => {
                    self.reasoned = true;
                    if let Some((at, tag_len)) = self.reasoning_end() {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held.drain(..at + tag_len);
                        self.phase = Phase::Content;
                        continue;
                    }
                    let end = if last {
                        self.held.len()
                    } else {
                        let other = self
                            .split
                            .also_ends_at
                            .map_or(self.held.len(), |tag| open_tail(&self.held, tag));
                        open_tail(&self.held, END).min(other)
                    };
                    out.reasoning.push_str(&self.held[..end]);
                    self.held.drain(..end);
                    break;
                }
                Phase::Content => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    break;
                }
            }
        }
        if !self.split.include {
            out.reasoning.clear();
        }
        out
    }

    /// Where the held text's reasoning ends, and how much of it to drop there: `</think>`,
    /// or the other end tag (kept), whichever comes first.
    fn reasoning_end(&self) -> Option<(usize, usize)> {
        let think = self.held.find(END).map(|at| (at, END.len()));
        let other = self
            .split
            .also_ends_at
            .and_then(|tag| self.held.find(tag))
            .map(|at| (at, 0));
        match (think, other) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Whether the answer had a reasoning part to report (`reasoning_content` present).
    pub fn reasoned(&self) -> bool {
        self.reasoned && self.split.include && !self.split.kept_in_content
    }
}

/// A whole answer split: `(reasoning_content, content)`, each `None` when absent or empty
/// (as vLLM gives `content: null` when the answer ends with its reasoning).
pub fn split_whole(split: ReasoningSplit, text: &str) -> (Option<String>, Option<String>) {
    let mut stream = ReasoningStream::new(split);
    let piece = stream.push(text, true);
    let reasoning = stream.reasoned().then_some(piece.reasoning);
    let content = (!piece.content.is_empty()).then_some(piece.content);
    (reasoning, content)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens inside the thinking count, its tags and the piece closing it included; an
    /// answer that never thinks counts none, and neither does content after the thinking.
    #[test]
    fn reasoning_tokens_are_the_thinkings_own() {
        let split = ReasoningSplit {
            opens_in_prompt: false,
            include: true,
            kept_in_content: false,
            also_ends_at: None,
        };
        let count = |pieces: &[&str]| {
            let mut s = ReasoningStream::new(split);
            for (i, p) in pieces.iter().enumerate() {
                s.push_tokens(p, 1, i + 1 == pieces.len());
            }
            s.reasoning_tokens()
        };
        assert_eq!(
            count(&["\n", "<think>", "a", "b", "</think>", "Hi", "!"]),
            5
        );
        assert_eq!(count(&["<th", "ink>", "a", "</th", "ink>", "Hi"]), 5);
        assert_eq!(
            count(&["\n", "Hi", "<think>"]),
            0,
            "no thinking at the start"
        );
        assert_eq!(count(&["<think>a</think>Hi"]), 1);
        let opened = ReasoningSplit {
            opens_in_prompt: true,
            include: false,
            kept_in_content: false,
            also_ends_at: None,
        };
        let mut s = ReasoningStream::new(opened);
        for p in ["a", "b", "</think>", "c"] {
            s.push_tokens(p, 1, false);
        }
        assert_eq!(s.reasoning_tokens(), 3, "counted when hidden too");
    }

    fn rule(parser: ReasoningParser) -> ReasoningSplit {
        parser.for_request("", None, true).expect("splits")
    }

    fn some(text: &str) -> Option<String> {
        Some(text.to_string())
    }

    #[test]
    fn whole_answers_split_at_the_tags() {
        let r1 = rule(ReasoningParser::DeepSeekR1);
        let qwen = rule(ReasoningParser::Qwen3);
        assert_eq!(
            split_whole(r1, "hmm\n</think>\n\n42"),
            (some("hmm\n"), some("\n\n42"))
        );
        assert_eq!(
            split_whole(r1, "<think>\nhmm</think>42"),
            (some("\nhmm"), some("42"))
        );
        assert_eq!(
            split_whole(r1, "cut off mid-thought"),
            (some("cut off mid-thought"), None)
        );
        assert_eq!(split_whole(r1, "thought</think>"), (some("thought"), None));
        assert_eq!(
            split_whole(qwen, "<think>\nhmm\n</think>\n\n42"),
            (some("\nhmm\n"), some("\n\n42"))
        );
        assert_eq!(
            split_whole(qwen, "42, no thinking"),
            (None, some("42, no thinking"))
        );
        assert_eq!(
            split_whole(qwen, "a </think> b"),
            (None, some("a </think> b"))
        );
        assert_eq!(split_whole(qwen, "  <think>x"), (some("x"), None));
        assert_eq!(split_whole(qwen, ""), (None, None));
        assert_eq!(split_whole(qwen, "<thin"), (None, some("<thin")));
        let hidden = ReasoningParser::DeepSeekR1
            .for_request("", None, false)
            .expect("splits");
        assert_eq!(split_whole(hidden, "why</think>so"), (None, some("so")));
    }

    /// Qwen3's thinking-only models (2507) open `<think>` in the prompt: their answer is
    /// reasoning from its first token; the hybrid ones' answer opens the block itself.
    #[test]
    fn qwen3_reads_where_the_prompt_left_the_thinking() {
        let qwen = ReasoningParser::Qwen3;
        let open = qwen
            .for_request("<|im_start|>assistant\n<think>\n", None, true)
            .expect("splits");
        assert_eq!(
            split_whole(open, "hmm\n</think>\n\n42"),
            (some("hmm\n"), some("\n\n42"))
        );
        let hybrid = qwen
            .for_request("<|im_start|>assistant\n", None, true)
            .expect("splits");
        assert_eq!(
            split_whole(hybrid, "hmm</think>42"),
            (None, some("hmm</think>42"))
        );
        let closed = qwen
            .for_request("<|im_start|>assistant\n<think>\n\n</think>\n\n", None, true)
            .expect("splits");
        assert_eq!(split_whole(closed, "42"), (None, some("42")));
    }

    /// GLM-4.5's answers open `<think>` themselves; GLM-4.7's template opens it in the
    /// generation prompt (`<|assistant|><think>`), and closes an empty block there with
    /// `enable_thinking: false`: the one rule reads all three (`--reasoning-parser glm45`).
    #[test]
    fn glm_45_and_47_read_where_their_templates_leave_the_thinking() {
        let glm: ReasoningParser = "glm45".parse().unwrap();
        let glm45 = glm
            .for_request("<|user|>\nhi<|assistant|>", None, true)
            .unwrap();
        assert_eq!(
            split_whole(glm45, "<think>hmm</think>\n42"),
            (some("hmm"), some("\n42"))
        );
        let glm47 = glm
            .for_request("<|user|>hi<|assistant|><think>", None, true)
            .unwrap();
        assert_eq!(
            split_whole(glm47, "hmm</think>42"),
            (some("hmm"), some("42"))
        );
        assert_eq!(
            split_whole(glm47, "cut off while thinking"),
            (some("cut off while thinking"), None)
        );
        let off = glm
            .for_request("<|user|>hi<|assistant|><think></think>", None, true)
            .unwrap();
        assert_eq!(split_whole(off, "42"), (None, some("42")));
    }

    /// MiniMax-M2's two parsers: `minimax_m2` splits as DeepSeek-R1 does (M2 writes only the
    /// closing tag, M2.5 both); `minimax_m2_append_think` gives the answer whole as content,
    /// after the `<think>` its template opened, streamed as whole, its thinking's tokens
    /// still counted and a grammar still waiting for `</think>`.
    #[test]
    fn minimax_m2_splits_or_keeps_the_thinking_in_the_content() {
        let prompt = "<|im_start|>assistant\n<think>\n";
        let split: ReasoningParser = "minimax_m2".parse().unwrap();
        let split = split.for_request(prompt, None, true).unwrap();
        assert_eq!(
            split_whole(split, "hmm\n</think>\n\n42"),
            (some("hmm\n"), some("\n\n42"))
        );
        assert_eq!(
            split_whole(split, "<think>hmm</think>42"),
            (some("hmm"), some("42"))
        );
        let kept: ReasoningParser = "minimax-m2-append-think".parse().unwrap();
        assert_eq!(kept, ReasoningParser::MinimaxM2AppendThink);
        let keep = kept.for_request(prompt, None, true).unwrap();
        assert_eq!(
            split_whole(keep, "hmm\n</think>\n\n42"),
            (None, some("<think>hmm\n</think>\n\n42"))
        );
        assert_eq!(split_whole(keep, ""), (None, some("<think>")));
        // A template that did not open the thinking: the answer's own tags, nothing added.
        let unopened = kept.for_request("assistant\n", None, true).unwrap();
        assert_eq!(
            split_whole(unopened, "<think>a</think>b"),
            (None, some("<think>a</think>b"))
        );
        let mut stream = ReasoningStream::new(keep);
        let mut content = String::new();
        for (i, piece) in ["hm", "m", "</th", "ink>", "42"].iter().enumerate() {
            let out = stream.push_tokens(piece, 1, i == 4);
            assert_eq!(out.reasoning, "");
            content.push_str(&out.content);
        }
        assert_eq!(content, "<think>hmm</think>42");
        assert!(!stream.reasoned(), "no reasoning_content");
        assert_eq!(
            stream.reasoning_tokens(),
            4,
            "the thinking's tokens still count"
        );
        assert_eq!(keep.grammar_start(prompt), Some("</think>"));
    }

    /// Kimi-K2-Thinking: reasoning from the first token (its own `<think>` dropped), ended by
    /// `</think>` or by a tool-call section, which stays in the content; streamed as whole;
    /// off with `thinking: false`.
    #[test]
    fn kimi_k2_reasoning_ends_at_think_or_at_a_tool_section() {
        let kimi: ReasoningParser = "kimi_k2".parse().unwrap();
        let split = kimi.for_request("<|im_assistant|>assistant<|im_middle|>", None, true);
        let split = split.unwrap();
        assert_eq!(
            split_whole(split, "<think>hmm</think>42"),
            (some("hmm"), some("42"))
        );
        let section = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0";
        assert_eq!(
            split_whole(split, &format!("call f{section}")),
            (some("call f"), some(section))
        );
        assert_eq!(
            split_whole(split, &format!("a</think>b{section}")),
            (some("a"), some(&format!("b{section}")))
        );
        let answer = format!("<think>need a tool{section}<|tool_call_argument_begin|>{{}}");
        let mut stream = ReasoningStream::new(split);
        let (mut reasoning, mut content) = (String::new(), String::new());
        let chars: Vec<char> = answer.chars().collect();
        for (i, piece) in chars.chunks(3).enumerate() {
            let piece: String = piece.iter().collect();
            let out = stream.push(&piece, (i + 1) * 3 >= chars.len());
            reasoning.push_str(&out.reasoning);
            content.push_str(&out.content);
        }
        assert_eq!(reasoning, "need a tool");
        assert!(content.starts_with(section), "{content}");
        let off = serde_json::json!({"thinking": false});
        assert_eq!(kimi.for_request("", off.as_object(), true), None);
    }

    #[test]
    fn a_grammar_starts_after_the_thinking_unless_the_prompt_closed_it() {
        let split = rule(ReasoningParser::Qwen3);
        assert_eq!(
            split.grammar_start("<|im_start|>assistant\n"),
            Some("</think>")
        );
        assert_eq!(
            split.grammar_start("<｜Assistant｜><think>\n"),
            Some("</think>")
        );
        assert_eq!(
            split.grammar_start("assistant\n<think>\n\n</think>\n\n"),
            None
        );
    }

    #[test]
    fn deepseek_v3_thinks_only_when_asked() {
        let kwargs = |v: Value| v.as_object().cloned();
        let v3 = ReasoningParser::DeepSeekV3;
        assert_eq!(v3.for_request("", None, true), None);
        assert_eq!(
            v3.for_request(
                "",
                kwargs(serde_json::json!({"thinking": false})).as_ref(),
                true
            ),
            None
        );
        let on = v3.for_request(
            "",
            kwargs(serde_json::json!({"thinking": true})).as_ref(),
            true,
        );
        assert_eq!(on, Some(rule(ReasoningParser::DeepSeekR1)));
        assert_eq!("deepseek_r1".parse(), Ok(ReasoningParser::DeepSeekR1));
        assert!("llama".parse::<ReasoningParser>().is_err());
    }

    /// Answers made of tag fragments, cut at random places: the streamed split is the
    /// whole answer's, for both rules.
    #[test]
    fn random_answers_in_random_pieces_split_as_whole() {
        const PARTS: [&str; 11] = [
            "<think>",
            "</think>",
            "<th",
            "ink>",
            "</",
            "a",
            " ",
            "\n",
            "é",
            "<|tool_calls_section_begin|>",
            "<|tool_calls_",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        };
        for _ in 0..2000 {
            let answer: String = (0..next(12)).map(|_| PARTS[next(PARTS.len())]).collect();
            for parser in [
                ReasoningParser::DeepSeekR1,
                ReasoningParser::Qwen3,
                ReasoningParser::MinimaxM2AppendThink,
                ReasoningParser::KimiK2,
            ] {
                let split = rule(parser);
                let mut stream = ReasoningStream::new(split);
                let (mut reasoning, mut content) = (String::new(), String::new());
                let mut rest = answer.as_str();
                loop {
                    let cut = rest
                        .char_indices()
                        .map(|(i, _)| i)
                        .nth(next(4) + 1)
                        .unwrap_or(rest.len());
                    let (piece, after) = rest.split_at(cut);
                    let out = stream.push(piece, after.is_empty());
                    reasoning.push_str(&out.reasoning);
                    content.push_str(&out.content);
                    rest = after;
                    if rest.is_empty() {
                        break;
                    }
                }
                let streamed = (
                    stream.reasoned().then_some(reasoning),
                    (!content.is_empty()).then_some(content),
                );
                assert_eq!(
                    streamed,
                    split_whole(split, &answer),
                    "{parser:?} {answer:?}"
                );
            }
        }
    }

    /// Every way of cutting an answer into pieces streams the whole answer's split.
    #[test]
    fn streams_split_as_the_whole_answer_does() {
        let answers = [
            "<think>\nlet me see</think>\n\nThe answer: 42",
            "reasoning only, cut off <",
            "  <think>a</thi</think>b</think>c",
            "plain answer <think> inside",
            "<th",
            "",
        ];
        for parser in [ReasoningParser::DeepSeekR1, ReasoningParser::Qwen3] {
            let split = rule(parser);
            for answer in answers {
                let whole = split_whole(split, answer);
                let chars: Vec<char> = answer.chars().collect();
                for size in 1..=4 {
                    let mut stream = ReasoningStream::new(split);
                    let (mut reasoning, mut content) = (String::new(), String::new());
                    let pieces: Vec<String> =
                        chars.chunks(size).map(|c| c.iter().collect()).collect();
                    for (i, piece) in pieces.iter().enumerate() {
                        let out = stream.push(piece, i + 1 == pieces.len());
                        reasoning.push_str(&out.reasoning);
                        content.push_str(&out.content);
                    }
                    if pieces.is_empty() {
                        let out = stream.push("", true);
                        reasoning.push_str(&out.reasoning);
                        content.push_str(&out.content);
                    }
                    let streamed = (
                        stream.reasoned().then_some(reasoning),
                        (!content.is_empty()).then_some(content),
                    );
                    assert_eq!(streamed, whole, "{parser:?} {answer:?} in pieces of {size}");
                }
            }
        }
    }
}
