//! Turns a request's stream of `GenerateResponse`s into OpenAI answers: whole JSON bodies, or
//! server-sent events (one chunk per piece of text, a last chunk with `usage` when
//! `stream_options.include_usage` asks for it, then `data: [DONE]`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, KeepAliveStream, Sse};
use moe_proto::v1::GenerateResponse;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::openai::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatLogprobs, ChatMessageOut, ChatResponse,
    CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, PromptTokensDetails,
    TokenLogprob, TopLogprob, Usage,
};
use super::tools::{tool_call_id, tool_calls_json, ToolAnswers};
use super::{ApiError, HttpState, Parsed};
use crate::error::RouterError;
use crate::generator::Answers;
use crate::prompt_logprobs::{self, PositionLogprobs};
use crate::reasoning::{split_whole, ReasoningSplit, ReasoningStream};
use crate::responses::{self, ResponseEvent, ResponseEvents, ResponseShape};
use serde_json::Value;

fn usage(msg: &GenerateResponse) -> Option<Usage> {
    msg.usage.as_ref().map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details: Some(PromptTokensDetails {
            cached_tokens: u.cached_tokens,
        }),
    })
}

/// `usage` as the API shows it: the prompt tokens' details only under
/// `--enable-prompt-tokens-details`, as vLLM.
fn shown(details: bool, mut usage: Usage) -> Usage {
    if !details {
        usage.prompt_tokens_details = None;
    }
    usage
}

fn finish(msg: &GenerateResponse) -> Option<String> {
    (!msg.finish_reason.is_empty()).then(|| msg.finish_reason.clone())
}

/// How logprobs name a token: its text, or `token_id:N` (vLLM's
/// `return_tokens_as_token_ids`, for clients that must know the exact ids).
fn token_name(state: &HttpState, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        state.tokenizer.token_text(id)
    }
}

/// Chat-style logprobs of the tokens in `msg`.
fn chat_logprobs(state: &HttpState, msg: &GenerateResponse, as_ids: bool) -> Vec<TokenLogprob> {
    msg.token_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let token = token_name(state, id, as_ids);
            let top_logprobs = msg
                .top_logprobs
                .get(i)
                .map(|top| {
                    top.token_ids
                        .iter()
                        .zip(&top.logprobs)
                        .map(|(&t, &lp)| {
                            let token = token_name(state, t, as_ids);
                            TopLogprob {
                                bytes: token.as_bytes().to_vec(),
                                token,
                                logprob: lp,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            TokenLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob: msg.logprobs.get(i).copied().unwrap_or(0.0),
                top_logprobs,
            }
        })
        .collect()
}

/// Legacy completions logprobs of the tokens in `msg`; `offset` is the text length so far.
fn completion_logprobs(
    state: &HttpState,
    msg: &GenerateResponse,
    as_ids: bool,
    into: &mut CompletionLogprobs,
    offset: &mut usize,
) {
    for entry in chat_logprobs(state, msg, as_ids) {
        into.text_offset.push(*offset);
        *offset += entry.token.len();
        into.token_logprobs.push(Some(entry.logprob));
        into.top_logprobs.push(Some(
            entry
                .top_logprobs
                .into_iter()
                .map(|t| (t.token, t.logprob))
                .collect::<BTreeMap<_, _>>(),
        ));
        into.tokens.push(entry.token);
    }
}

/// With `echo`, the prompt's tokens before the generated ones: the first has no logprob (no
/// token before it), each other one its logprob given the ones before and its `shown` likeliest
/// alternatives (`msg` is a choice's first message, which carries the prompt's scores, with
/// more alternatives when `prompt_logprobs` asked for more).
fn echoed_prompt_logprobs(
    state: &HttpState,
    msg: &GenerateResponse,
    (as_ids, shown): (bool, u32),
    into: &mut CompletionLogprobs,
    offset: &mut usize,
) {
    for (i, &id) in msg.prompt_token_ids.iter().enumerate() {
        let token = token_name(state, id, as_ids);
        into.text_offset.push(*offset);
        *offset += token.len();
        let scored = i.checked_sub(1);
        into.token_logprobs
            .push(scored.and_then(|j| msg.prompt_logprobs.get(j).copied()));
        into.top_logprobs.push(scored.map(|j| {
            msg.prompt_top_logprobs
                .get(j)
                .map(|top| {
                    top.token_ids
                        .iter()
                        .zip(&top.logprobs)
                        .take(shown as usize)
                        .map(|(&t, &lp)| (token_name(state, t, as_ids), lp))
                        .collect()
                })
                .unwrap_or_default()
        }));
        into.tokens.push(token);
    }
}

/// With `echo`, the prompt's text in front of a choice's first message: as given, or its ids
/// decoded.
fn echoed_text(state: &HttpState, echo: &Option<String>, msg: &GenerateResponse) -> String {
    match echo {
        Some(text) => text.clone(),
        None => state
            .tokenizer
            .decode(&msg.prompt_token_ids)
            .unwrap_or_default(),
    }
}

/// vLLM's `prompt_logprobs` of the answer whose first message is `first`, when asked for.
fn prompt_scores(
    state: &HttpState,
    first: Option<&GenerateResponse>,
    k: Option<u32>,
    as_ids: bool,
) -> Option<Vec<Option<PositionLogprobs>>> {
    let (k, first) = (k?, first?);
    Some(prompt_logprobs::from_first_message(
        first,
        k as usize,
        |id| token_name(state, id, as_ids),
    ))
}

/// Everything a request produced, once it finished.
struct Collected {
    text: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    messages: Vec<GenerateResponse>,
}

async fn collect(mut answers: Answers) -> Result<Collected, ApiError> {
    let mut out = Collected {
        text: String::new(),
        finish_reason: None,
        usage: None,
        messages: Vec::new(),
    };
    while let Some(msg) = answers.recv().await {
        let msg = msg?;
        out.text.push_str(&msg.text);
        out.finish_reason = finish(&msg).or(out.finish_reason);
        out.usage = usage(&msg).or(out.usage);
        out.messages.push(msg);
    }
    if out.finish_reason.is_none() {
        return Err(
            RouterError::Internal("the answer ended without a finish reason".into()).into(),
        );
    }
    Ok(out)
}

/// Every choice's answer, in choice order (they run at once: each answer's channel holds all
/// its messages, so waiting on one never holds the others back).
async fn collect_all(answers: Vec<Answers>) -> Result<Vec<Collected>, ApiError> {
    let mut out = Vec::with_capacity(answers.len());
    for a in answers {
        out.push(collect(a).await?);
    }
    Ok(out)
}

/// The request's usage over its choices: the prompt once, every choice's tokens.
fn total_usage<'a>(usages: impl IntoIterator<Item = &'a Option<Usage>>) -> Option<Usage> {
    let mut total: Option<Usage> = None;
    for u in usages.into_iter().flatten() {
        // The prompt once: the first choice's count, and its cached part.
        let t = total.get_or_insert(Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: 0,
            total_tokens: u.prompt_tokens,
            prompt_tokens_details: u.prompt_tokens_details,
        });
        t.completion_tokens += u.completion_tokens;
        t.total_tokens += u.completion_tokens;
    }
    total
}

/// A completion's choices, prompt by prompt (one prompt unless batched): each choice's
/// index (its prompt's place times `n`, plus its own), its prompt's echo, and the prompt each
/// choice belongs to.
struct CompletionChoices {
    answers: Vec<Answers>,
    echoes: Vec<Option<Option<String>>>,
    prompt_of: Vec<usize>,
    logprobs: bool,
    include_usage: bool,
    continuous_usage: bool,
    tokens_as_ids: bool,
    prompt_logprobs: Option<u32>,
    top_logprobs: u32,
}

impl CompletionChoices {
    fn new(submitted: Vec<(Vec<Answers>, Parsed)>) -> Self {
        let mut out = Self {
            answers: Vec::new(),
            echoes: Vec::new(),
            prompt_of: Vec::new(),
            logprobs: false,
            include_usage: false,
            continuous_usage: false,
            tokens_as_ids: false,
            prompt_logprobs: None,
            top_logprobs: 0,
        };
        if let Some((_, p)) = submitted.first() {
            out.logprobs = p.logprobs;
            out.include_usage = p.include_usage;
            out.continuous_usage = p.continuous_usage;
            out.tokens_as_ids = p.tokens_as_ids;
            out.prompt_logprobs = p.prompt_logprobs;
            out.top_logprobs = p.top_logprobs;
        }
        for (prompt, (answers, parsed)) in submitted.into_iter().enumerate() {
            for a in answers {
                out.answers.push(a);
                out.echoes.push(parsed.echo.clone());
                out.prompt_of.push(prompt);
            }
        }
        out
    }
}

/// A batched request's usage: each prompt once with its choices' tokens, summed over prompts.
fn usage_by_prompt(usages: &[Option<Usage>], prompt_of: &[usize]) -> Option<Usage> {
    let prompts = prompt_of.iter().max().map_or(0, |&p| p + 1);
    let mut total: Option<Usage> = None;
    for prompt in 0..prompts {
        let mine = usages
            .iter()
            .zip(prompt_of)
            .filter(|(_, &p)| p == prompt)
            .map(|(u, _)| u);
        if let Some(u) = total_usage(mine) {
            let t = total.get_or_insert(Usage {
                prompt_tokens_details: Some(PromptTokensDetails::default()),
                ..Usage::default()
            });
            t.prompt_tokens += u.prompt_tokens;
            t.completion_tokens += u.completion_tokens;
            t.total_tokens += u.total_tokens;
            if let (Some(sum), Some(d)) = (&mut t.prompt_tokens_details, u.prompt_tokens_details) {
                sum.cached_tokens += d.cached_tokens;
            }
        }
    }
    total
}

pub async fn whole_completion(
    state: &HttpState,
    submitted: Vec<(Vec<Answers>, Parsed)>,
    id: String,
) -> Result<CompletionResponse, ApiError> {
    let CompletionChoices {
        answers,
        echoes,
        prompt_of,
        logprobs,
        tokens_as_ids,
        prompt_logprobs,
        top_logprobs,
        ..
    } = CompletionChoices::new(submitted);
    let collected = collect_all(answers).await?;
    let usages: Vec<Option<Usage>> = collected.iter().map(|c| c.usage.clone()).collect();
    let usage = usage_by_prompt(&usages, &prompt_of);
    let choices = collected
        .into_iter()
        .zip(&echoes)
        .enumerate()
        .map(|(index, (c, echo))| {
            let first = c.messages.first();
            let logprobs = logprobs.then(|| {
                let mut lp = CompletionLogprobs::default();
                let mut offset = 0;
                if let (Some(_), Some(first)) = (echo, first) {
                    let shown = (tokens_as_ids, top_logprobs);
                    echoed_prompt_logprobs(state, first, shown, &mut lp, &mut offset);
                }
                for m in &c.messages {
                    completion_logprobs(state, m, tokens_as_ids, &mut lp, &mut offset);
                }
                lp
            });
            let text = match (echo, first) {
                (Some(echo), Some(first)) => echoed_text(state, echo, first) + &c.text,
                _ => c.text,
            };
            CompletionChoice {
                index: index as u32,
                text,
                logprobs,
                finish_reason: c.finish_reason,
                prompt_logprobs: prompt_scores(state, first, prompt_logprobs, tokens_as_ids),
            }
        })
        .collect();
    Ok(CompletionResponse {
        id,
        object: "text_completion",
        created: super::unix_now(),
        model: state.model_name.clone(),
        choices,
        usage: usage.map(|u| shown(state.prompt_tokens_details, u)),
    })
}

/// A chat answer's message: its text, or, when the request offered tools and the text holds
/// calls, the calls (and any text before them), with finish reason `tool_calls`; with a
/// reasoning split, the reasoning apart (calls are looked for in the rest).
fn chat_message(
    tools: Option<&ToolAnswers>,
    reasoning: Option<ReasoningSplit>,
    id: &str,
    index: u32,
    text: String,
    finish_reason: Option<String>,
) -> (ChatMessageOut, Option<String>) {
    let (reasoning_content, content) = match reasoning {
        Some(split) => split_whole(split, &text),
        None => (None, Some(text)),
    };
    let parsed = content
        .as_deref()
        .and_then(|text| tools.and_then(|t| t.parse(text)));
    if let Some((content, calls)) = parsed {
        return (
            ChatMessageOut {
                role: "assistant",
                content: (!content.is_empty()).then_some(content),
                reasoning_content,
                tool_calls: Some(tool_calls_json(id, index, &calls)),
            },
            Some("tool_calls".into()),
        );
    }
    (
        ChatMessageOut {
            role: "assistant",
            content,
            reasoning_content,
            tool_calls: None,
        },
        finish_reason,
    )
}

pub async fn whole_chat(
    state: &HttpState,
    answers: Vec<Answers>,
    id: String,
    parsed: &Parsed,
) -> Result<ChatResponse, ApiError> {
    let logprobs = parsed.logprobs;
    let collected = collect_all(answers).await?;
    let usage = total_usage(collected.iter().map(|c| &c.usage));
    // Every choice scored the same prompt: the first one's scores stand for all.
    let first = collected.first().and_then(|c| c.messages.first());
    let prompt_logprobs = prompt_scores(state, first, parsed.prompt_logprobs, parsed.tokens_as_ids);
    let choices = collected
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = logprobs.then(|| ChatLogprobs {
                content: c
                    .messages
                    .iter()
                    .flat_map(|m| chat_logprobs(state, m, parsed.tokens_as_ids))
                    .collect(),
            });
            let (message, finish_reason) = chat_message(
                parsed.tools.as_ref(),
                parsed.reasoning,
                &id,
                index as u32,
                c.text,
                c.finish_reason,
            );
            ChatChoice {
                index: index as u32,
                logprobs,
                message,
                finish_reason,
            }
        })
        .collect();
    Ok(ChatResponse {
        id,
        object: "chat.completion",
        created: super::unix_now(),
        model: state.model_name.clone(),
        choices,
        usage: shown(state.prompt_tokens_details, usage.unwrap_or_default()),
        prompt_logprobs,
    })
}

type EventStream = Sse<KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>;

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|e| {
        format!("{{\"error\":{{\"message\":\"cannot encode a chunk: {e}\",\"type\":\"internal_error\"}}}}")
    }))
}

/// One choice's message, with the choice's index.
type ChoiceMessage = (u32, Result<GenerateResponse, RouterError>);

/// The choices' answers as one channel, each message with its choice's index, in the order
/// they come. Dropping the receiver ends the forwarders, which drop the answers and so free
/// the sequences.
fn merge(answers: Vec<Answers>) -> mpsc::Receiver<ChoiceMessage> {
    let (tx, rx) = mpsc::channel(16);
    for (index, mut a) in answers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(msg) = a.recv().await {
                if tx.send((index as u32, msg)).await.is_err() {
                    return;
                }
            }
        });
    }
    rx
}

/// Relays the choices' answers as events made by `chunk`, then `data: [DONE]` (the chat and
/// completions streams' end; the Responses stream ends with its last typed event); an error
/// mid-stream becomes an error event. A client that goes away drops the receiver, which ends
/// the task and frees the sequences.
fn relay<F>(
    answers: Vec<Answers>,
    first: Vec<Event>,
    done_marker: bool,
    mut chunk: F,
) -> EventStream
where
    F: FnMut(u32, &GenerateResponse) -> Vec<Event> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let mut answers = merge(answers);
    tokio::spawn(async move {
        for event in first {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        while let Some((index, msg)) = answers.recv().await {
            let events = match msg {
                Ok(msg) => chunk(index, &msg),
                Err(error) => vec![json_event(&ApiError::from(error).body())],
            };
            for event in events {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
        if done_marker {
            let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// vLLM's continuous usage: every chunk of a choice carries its prompt's tokens and the tokens
/// that choice has streamed so far.
struct RunningUsage {
    streamed: Vec<u32>,
}

impl RunningUsage {
    fn new(choices: usize) -> Self {
        Self {
            streamed: vec![0; choices],
        }
    }

    /// The usage after `msg`, choice `index`'s latest message.
    fn after(&mut self, index: u32, msg: &GenerateResponse) -> Usage {
        let completion_tokens = match self.streamed.get_mut(index as usize) {
            Some(n) => {
                *n += msg.token_ids.len() as u32;
                *n
            }
            None => msg.token_ids.len() as u32,
        };
        Usage {
            prompt_tokens: msg.prompt_tokens,
            completion_tokens,
            total_tokens: msg.prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
        }
    }
}

/// Streams' usage: each choice's, summed once the last choice finished (each choice's
/// prompt once: `prompt_of` says which prompt a choice answers).
struct UsageTally {
    usages: Vec<Option<Usage>>,
    prompt_of: Vec<usize>,
}

impl UsageTally {
    fn new(choices: usize) -> Self {
        Self::by_prompt(vec![0; choices])
    }

    fn by_prompt(prompt_of: Vec<usize>) -> Self {
        Self {
            usages: vec![None; prompt_of.len()],
            prompt_of,
        }
    }

    /// Records `msg`'s usage for choice `index`; the request's total once every choice has one.
    fn add(&mut self, index: u32, msg: &GenerateResponse) -> Option<Usage> {
        let slot = self.usages.get_mut(index as usize)?;
        *slot = Some(usage(msg)?);
        if self.usages.iter().all(Option::is_some) {
            usage_by_prompt(&self.usages, &self.prompt_of)
        } else {
            None
        }
    }
}

pub fn stream_completion(
    state: Arc<HttpState>,
    submitted: Vec<(Vec<Answers>, Parsed)>,
    id: String,
) -> EventStream {
    let CompletionChoices {
        answers,
        echoes,
        prompt_of,
        logprobs,
        include_usage,
        continuous_usage,
        tokens_as_ids,
        top_logprobs,
        ..
    } = CompletionChoices::new(submitted);
    let created = super::unix_now();
    let model = state.model_name.clone();
    let mut offsets = vec![0; answers.len()];
    let mut running = RunningUsage::new(answers.len());
    let mut tally = UsageTally::by_prompt(prompt_of);
    relay(answers, vec![], true, move |index, msg| {
        // A choice's first message carries the prompt's scores: echo goes in front of it.
        let echo = echoes.get(index as usize).and_then(Option::as_ref);
        let echoing = echo.filter(|_| !msg.prompt_token_ids.is_empty());
        let lp = logprobs.then(|| {
            let mut lp = CompletionLogprobs::default();
            if let Some(offset) = offsets.get_mut(index as usize) {
                if echoing.is_some() {
                    let shown = (tokens_as_ids, top_logprobs);
                    echoed_prompt_logprobs(&state, msg, shown, &mut lp, offset);
                }
                completion_logprobs(&state, msg, tokens_as_ids, &mut lp, offset);
            }
            lp
        });
        let text = match echoing {
            Some(echo) => echoed_text(&state, echo, msg) + &msg.text,
            None => msg.text.clone(),
        };
        let mut events = vec![json_event(&CompletionResponse {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices: vec![CompletionChoice {
                index,
                text,
                logprobs: lp,
                finish_reason: finish(msg),
                // Refused on streams (no chunk has a place for them).
                prompt_logprobs: None,
            }],
            usage: continuous_usage.then(|| running.after(index, msg)),
        })];
        if let Some(usage) = tally.add(index, msg).filter(|_| include_usage) {
            events.push(json_event(&CompletionResponse {
                id: id.clone(),
                object: "text_completion",
                created,
                model: model.clone(),
                choices: vec![],
                usage: Some(shown(state.prompt_tokens_details, usage)),
            }));
        }
        events
    })
}

/// A call as a stream announces it: its name and id, and its arguments so far.
#[derive(Clone, Copy)]
struct CallSoFar<'a> {
    name: &'a str,
    arguments: &'a str,
    id: Option<&'a str>,
}

/// A tool-enabled choice's streamed text: what went out as content, what is held because a
/// tool call may be starting there, and how far each call went out (`delta.tool_calls`: a
/// call's id and name once its name is whole, then its arguments as they grow).
#[derive(Clone, Default)]
struct HeldText {
    text: String,
    /// Bytes of `text` already sent as content.
    sent: usize,
    /// Per call already announced, the bytes of its arguments sent.
    calls: Vec<usize>,
}

impl HeldText {
    /// How far `text` can go out as content: up to a call's marker, or, without one, up to a
    /// tail that could still grow into it.
    fn safe_end(&self, marker: &str) -> usize {
        if let Some(at) = self.text[self.sent..].find(marker) {
            return self.sent + at;
        }
        let tail_start = self
            .text
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= self.sent)
            .find(|&i| marker.starts_with(&self.text[i..]))
            .unwrap_or(self.text.len());
        tail_start.max(self.sent)
    }

    /// The `delta.tool_calls` entries for what the calls gained since the last message.
    fn call_deltas(&mut self, tools: &ToolAnswers, response_id: &str, choice: u32) -> Vec<Value> {
        let mut entries = Vec::new();
        for (i, call) in tools.partial_calls(&self.text).iter().enumerate() {
            let announced = CallSoFar {
                name: &call.name,
                arguments: &call.arguments,
                id: call.id.as_deref(),
            };
            entries.extend(self.call_delta(response_id, choice, i, announced));
        }
        entries
    }

    /// Call `i`'s entry: id, type and name the first time, then the arguments not yet sent.
    fn call_delta(
        &mut self,
        response_id: &str,
        choice: u32,
        i: usize,
        call: CallSoFar<'_>,
    ) -> Option<Value> {
        let CallSoFar {
            name,
            arguments,
            id,
        } = call;
        let announced = i < self.calls.len();
        if !announced {
            self.calls.resize(i + 1, 0);
        }
        let fragment = arguments.get(self.calls[i]..).unwrap_or("");
        self.calls[i] = self.calls[i].max(arguments.len());
        if announced && fragment.is_empty() {
            return None;
        }
        let mut entry = serde_json::json!({"index": i, "function": {"arguments": fragment}});
        if !announced {
            entry["id"] = id
                .map_or_else(|| tool_call_id(response_id, choice, i), str::to_string)
                .into();
            entry["type"] = "function".into();
            entry["function"]["name"] = name.into();
        }
        Some(entry)
    }

    /// The delta (and finish reason) for this message of the choice, if any goes out now.
    fn next(
        &mut self,
        tools: &ToolAnswers,
        response_id: &str,
        index: u32,
        piece: &str,
        finish_reason: Option<String>,
    ) -> Option<(Delta, Option<String>)> {
        self.text.push_str(piece);
        let Some(reason) = finish_reason else {
            let end = self.safe_end(tools.format.start_marker());
            let content = self.text[self.sent..end].to_string();
            self.sent = end;
            let calls = self.call_deltas(tools, response_id, index);
            if content.is_empty() && calls.is_empty() {
                return None;
            }
            return Some((
                Delta {
                    content: (!content.is_empty()).then_some(content),
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    ..Delta::default()
                },
                None,
            ));
        };
        let whole = std::mem::take(&mut self.text);
        let sent = std::mem::take(&mut self.sent);
        let parsed = tools.parse(&whole);
        let (_, reason) = chat_message(
            Some(tools),
            None,
            response_id,
            index,
            whole.clone(),
            Some(reason),
        );
        // The content not yet sent (the text before the calls, or all of it), and what the
        // calls have not sent yet.
        let (rest, calls) = match &parsed {
            Some((content, calls)) => {
                let entries: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .filter_map(|(i, c)| {
                        let call = CallSoFar {
                            name: &c.name,
                            arguments: &c.arguments,
                            id: c.id.as_deref(),
                        };
                        self.call_delta(response_id, index, i, call)
                    })
                    .collect();
                (content.get(sent..).unwrap_or("").to_string(), Some(entries))
            }
            None => (whole.get(sent..).unwrap_or("").to_string(), None),
        };
        let calls = calls.filter(|c| !c.is_empty());
        Some((
            Delta {
                content: (!rest.is_empty() || parsed.is_none()).then_some(rest),
                tool_calls: calls,
                ..Delta::default()
            },
            reason,
        ))
    }
}

pub fn stream_chat(
    state: Arc<HttpState>,
    answers: Vec<Answers>,
    id: String,
    parsed: &Parsed,
) -> EventStream {
    let (logprobs, include_usage, tokens_as_ids) =
        (parsed.logprobs, parsed.include_usage, parsed.tokens_as_ids);
    let continuous_usage = parsed.continuous_usage;
    let details = state.prompt_tokens_details;
    let tools = parsed.tools.clone();
    // With tools, a choice's text streams as content until a call may be starting; the rest
    // is held until the choice ends, then sent as content or as calls.
    let mut held: Vec<HeldText> = vec![HeldText::default(); answers.len()];
    // With a reasoning parser, each choice's text is split first; only its content part is
    // read for calls.
    let split = parsed.reasoning;
    let mut splitters: Vec<Option<ReasoningStream>> =
        vec![split.map(ReasoningStream::new); answers.len()];
    let response_id = id.clone();
    let created = super::unix_now();
    let model = state.model_name.clone();
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    // Each choice opens with the assistant's role, as OpenAI streams it.
    let first = (0..answers.len() as u32)
        .map(|index| {
            json_event(&chunk(
                vec![ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        ..Delta::default()
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            ))
        })
        .collect();
    let mut tally = UsageTally::new(answers.len());
    let mut running = RunningUsage::new(answers.len());
    // Each choice's logprobs not sent yet: a message whose text is held (a tool call may be
    // starting) sends no chunk, and its tokens' logprobs go with the next one.
    let mut unsent_logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); answers.len()];
    relay(answers, first, true, move |index, msg| {
        if logprobs {
            if let Some(unsent) = unsent_logprobs.get_mut(index as usize) {
                unsent.extend(chat_logprobs(&state, msg, tokens_as_ids));
            }
        }
        let (reasoning, text) = match splitters.get_mut(index as usize) {
            Some(Some(splitter)) => {
                let piece = splitter.push(&msg.text, finish(msg).is_some());
                (
                    Some(piece.reasoning).filter(|r| !r.is_empty()),
                    piece.content,
                )
            }
            _ => (None, msg.text.clone()),
        };
        let mut delta = match &tools {
            None => {
                let content = (split.is_none() || !text.is_empty()).then_some(text);
                // A message whose text the reasoning split holds back (a tag's beginning)
                // sends nothing, unless it ends the choice or carries a token's logprobs.
                let nothing =
                    content.is_none() && reasoning.is_none() && finish(msg).is_none() && !logprobs;
                (!nothing).then(|| {
                    (
                        Delta {
                            content,
                            ..Delta::default()
                        },
                        finish(msg),
                    )
                })
            }
            Some(t) => held
                .get_mut(index as usize)
                .and_then(|h| h.next(t, &response_id, index, &text, finish(msg))),
        };
        if let Some(reasoning) = reasoning {
            let (delta, _) = delta.get_or_insert_with(|| (Delta::default(), None));
            delta.reasoning_content = Some(reasoning);
        }
        let mut events = Vec::new();
        if let Some((delta, finish_reason)) = delta {
            events.push(json_event(&chunk(
                vec![ChatChunkChoice {
                    index,
                    delta,
                    logprobs: logprobs.then(|| ChatLogprobs {
                        content: unsent_logprobs
                            .get_mut(index as usize)
                            .map(std::mem::take)
                            .unwrap_or_default(),
                    }),
                    finish_reason,
                }],
                continuous_usage.then(|| running.after(index, msg)),
            )));
        } else if continuous_usage {
            // Nothing sent for this message: its tokens count in the next chunk's usage.
            running.after(index, msg);
        }
        if let Some(usage) = tally.add(index, msg).filter(|_| include_usage) {
            events.push(json_event(&chunk(vec![], Some(shown(details, usage)))));
        }
        events
    })
}

/// A Responses API answer, whole: the chat answer's parts as output items.
pub async fn whole_response(
    state: &HttpState,
    answers: Vec<Answers>,
    id: String,
    parsed: &Parsed,
    shape: &ResponseShape,
) -> Result<Value, ApiError> {
    let Some(c) = collect_all(answers).await?.into_iter().next() else {
        return Err(RouterError::Internal("a response without an answer".into()).into());
    };
    let finish_reason = c.finish_reason.clone();
    let logprobs = response_logprobs(state, parsed, &c.messages);
    // The thinking's tokens, counted message by message as a stream counts them.
    let reasoning_tokens = parsed.reasoning.map_or(0, |split| {
        let mut stream = ReasoningStream::new(split);
        let last = c.messages.len().saturating_sub(1);
        for (i, m) in c.messages.iter().enumerate() {
            stream.push_tokens(&m.text, m.token_ids.len() as u32, i == last);
        }
        stream.reasoning_tokens()
    });
    let (message, _) = chat_message(
        parsed.tools.as_ref(),
        parsed.reasoning,
        &id,
        0,
        c.text,
        c.finish_reason,
    );
    let items = responses::output_items(&id, &message, &logprobs);
    let usage = c.usage.unwrap_or_else(no_usage);
    let created = (id.as_str(), super::unix_now());
    Ok(responses::response_object(
        shape,
        created,
        items,
        Some((&usage, reasoning_tokens)),
        finish_reason.as_deref(),
    ))
}

/// The tokens' logprobs in `messages` as output text logprobs, when the request asked for them.
fn response_logprobs(
    state: &HttpState,
    parsed: &Parsed,
    messages: &[GenerateResponse],
) -> Vec<Value> {
    if !parsed.logprobs {
        return Vec::new();
    }
    messages
        .iter()
        .flat_map(|m| chat_logprobs(state, m, parsed.tokens_as_ids))
        .filter_map(|lp| logprob_value(&lp))
        .collect()
}

/// A token's logprobs as JSON with its floats written as f32 (as the chat answer writes them:
/// `-2.1383862`, not the f64 widening `-2.1383862495422363` that `to_value` would keep).
fn logprob_value(lp: &TokenLogprob) -> Option<Value> {
    serde_json::from_str(&serde_json::to_string(lp).ok()?).ok()
}

fn no_usage() -> Usage {
    Usage::default()
}

/// A Responses API answer as its typed events (each SSE event named by its type): the text
/// split from its reasoning and, with tools offered, read for calls as the chat stream reads
/// it ([`HeldText`]: text goes out until a call may be starting, then each call's arguments
/// as they are generated).
pub fn stream_response(
    state: Arc<HttpState>,
    answers: Vec<Answers>,
    id: String,
    parsed: &Parsed,
    shape: ResponseShape,
) -> EventStream {
    let (logprobs, as_ids) = (parsed.logprobs, parsed.tokens_as_ids);
    let mut splitter = parsed.reasoning.map(ReasoningStream::new);
    let tools = parsed.tools.clone();
    let mut held = HeldText::default();
    // What the finished response is stored with, when it is kept.
    let mut shape = shape;
    let mut keep = shape.store.then(|| {
        let input = std::mem::take(&mut shape.input_items);
        (shape.previous_response_id.clone(), input)
    });
    let mut events = ResponseEvents::new(id.clone(), super::unix_now(), shape);
    let typed = |(kind, body): ResponseEvent| {
        Event::default().event(kind).data(serde_json::to_string(&body).unwrap_or_else(|e| {
            format!("{{\"error\":{{\"message\":\"cannot encode an event: {e}\",\"type\":\"internal_error\"}}}}")
        }))
    };
    let first = events.start().into_iter().map(typed).collect();
    relay(answers, first, false, move |_, msg| {
        let reason = finish(msg);
        let tokens = msg.token_ids.len() as u32;
        let (reasoning, text) = match splitter.as_mut() {
            Some(s) => {
                let piece = s.push_tokens(&msg.text, tokens, reason.is_some());
                (piece.reasoning, piece.content)
            }
            None => (String::new(), msg.text.clone()),
        };
        if logprobs {
            let entries = chat_logprobs(&state, msg, as_ids);
            events.add_logprobs(entries.iter().filter_map(logprob_value));
        }
        let mut out = Vec::new();
        events.reasoning(&reasoning, &mut out);
        match &tools {
            None => events.text(&text, &mut out),
            Some(t) => {
                if let Some((delta, _)) = held.next(t, &id, 0, &text, reason.clone()) {
                    events.text(delta.content.as_deref().unwrap_or(""), &mut out);
                    for entry in delta.tool_calls.iter().flatten() {
                        events.call(entry, &mut out);
                    }
                }
            }
        }
        if let Some(reason) = reason {
            let usage = usage(msg).unwrap_or_else(no_usage);
            let thinking = splitter
                .as_ref()
                .map_or(0, ReasoningStream::reasoning_tokens);
            let response = events.finish(&reason, (&usage, thinking), &mut out);
            if let (Some((previous, input)), Some(store)) = (keep.take(), &state.responses) {
                store.put(previous, input, response);
            }
        }
        out.into_iter().map(typed).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch's usage counts each prompt once, with all its choices' tokens, and each
    /// prompt's cached tokens once.
    #[test]
    fn a_batch_counts_each_prompt_once() {
        let u = |prompt_tokens, completion_tokens| {
            Some(Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
                prompt_tokens_details: Some(PromptTokensDetails {
                    cached_tokens: prompt_tokens / 2,
                }),
            })
        };
        // Two prompts (7 and 3 tokens), two choices each.
        let usages = [u(7, 4), u(7, 5), u(3, 1), u(3, 2)];
        let total = usage_by_prompt(&usages, &[0, 0, 1, 1]).unwrap();
        assert_eq!(
            (
                total.prompt_tokens,
                total.completion_tokens,
                total.total_tokens
            ),
            (10, 12, 22)
        );
        assert_eq!(total.prompt_tokens_details.unwrap().cached_tokens, 3 + 1);
        assert!(shown(false, total.clone()).prompt_tokens_details.is_none());
        assert!(shown(true, total).prompt_tokens_details.is_some());
        let mut tally = UsageTally::by_prompt(vec![0, 1]);
        let msg = |prompt_tokens, completion_tokens| GenerateResponse {
            usage: Some(moe_proto::v1::Usage {
                prompt_tokens,
                completion_tokens,
                cached_tokens: 0,
            }),
            ..Default::default()
        };
        assert!(tally.add(0, &msg(7, 4)).is_none());
        let total = tally.add(1, &msg(3, 1)).unwrap();
        assert_eq!((total.prompt_tokens, total.completion_tokens), (10, 5));
    }
    use crate::tool_calls::ToolCallFormat;

    /// What a tool-enabled choice streamed: content deltas, `tool_calls` entries (the last
    /// message's included), the last delta and the finish reason.
    struct Streamed {
        contents: Vec<String>,
        calls: Vec<Value>,
        last: Delta,
        reason: Option<String>,
    }

    fn stream(pieces: &[&str]) -> Streamed {
        let tools = ToolAnswers {
            format: ToolCallFormat::Hermes,
            functions: Vec::new(),
        };
        let mut held = HeldText::default();
        let (mut contents, mut calls) = (Vec::new(), Vec::new());
        for piece in &pieces[..pieces.len() - 1] {
            if let Some((delta, None)) = held.next(&tools, "id", 0, piece, None) {
                contents.extend(delta.content);
                calls.extend(delta.tool_calls.unwrap_or_default());
            }
        }
        let last = pieces[pieces.len() - 1];
        let (last, reason) = held
            .next(&tools, "id", 0, last, Some("stop".into()))
            .unwrap();
        calls.extend(last.tool_calls.clone().unwrap_or_default());
        Streamed {
            contents,
            calls,
            last,
            reason,
        }
    }

    #[test]
    fn content_streams_until_a_call_may_start() {
        let s = stream(&["Hello", " there", "."]);
        assert_eq!(s.contents, ["Hello", " there"]);
        assert_eq!(s.last.content.as_deref(), Some("."));
        assert_eq!(s.reason.as_deref(), Some("stop"));

        // "<tool" could begin a call: held back, then sent as a call.
        let s = stream(&[
            "Let me check. <tool",
            "_call>\n{\"name\": \"f\", \"arguments\": {}}\n",
            "</tool_call>",
        ]);
        assert_eq!(s.contents, ["Let me check. "]);
        assert_eq!(
            s.last.content, None,
            "the content before the call went out already"
        );
        assert_eq!(s.calls.len(), 1);
        assert_eq!(s.calls[0]["function"]["name"], "f");
        assert_eq!(s.calls[0]["function"]["arguments"], "{}");
        assert_eq!(s.reason.as_deref(), Some("tool_calls"));

        // A "<" that turns out not to start a call goes out once it cannot.
        let s = stream(&["a <", "b", "c"]);
        assert_eq!(s.contents, ["a ", "<b"]);
        assert_eq!(s.last.content.as_deref(), Some("c"));
    }

    /// A call's id and name go out once the name is whole, then its arguments piece by piece;
    /// the pieces add up to the whole answer's arguments, and each call is announced once.
    #[test]
    fn arguments_stream_as_they_are_generated() {
        let s = stream(&[
            "<tool_call>\n{\"name\": \"get_",
            "weather\", \"arguments\": {\"ci",
            "ty\": \"Os",
            "lo\"}}\n</tool_call><tool_call>\n{\"name\": \"now\", \"arguments\": {",
            "}}\n</tool_call>",
        ]);
        assert!(s.contents.is_empty());
        let first: Vec<&Value> = s.calls.iter().filter(|c| c["index"] == 0).collect();
        assert_eq!(first[0]["function"]["name"], "get_weather");
        assert_eq!(first[0]["id"], "call-id-0-0");
        assert!(first[1..].iter().all(|c| c.get("id").is_none()));
        let args: String = first
            .iter()
            .map(|c| c["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(args, r#"{"city": "Oslo"}"#);
        assert!(first.len() >= 3, "arguments came in pieces: {first:?}");
        let second: String = s
            .calls
            .iter()
            .filter(|c| c["index"] == 1)
            .map(|c| c["function"]["arguments"].as_str().unwrap())
            .collect();
        assert_eq!(second, "{}");
        assert_eq!(s.reason.as_deref(), Some("tool_calls"));
    }
}
