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
    CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, TokenLogprob, TopLogprob,
    Usage,
};
use super::{ApiError, HttpState};
use crate::admission::Answers;
use crate::error::RouterError;

fn usage(msg: &GenerateResponse) -> Option<Usage> {
    msg.usage.as_ref().map(|u| Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u.prompt_tokens + u.completion_tokens,
    })
}

fn finish(msg: &GenerateResponse) -> Option<String> {
    (!msg.finish_reason.is_empty()).then(|| msg.finish_reason.clone())
}

/// Chat-style logprobs of the tokens in `msg`.
fn chat_logprobs(state: &HttpState, msg: &GenerateResponse) -> Vec<TokenLogprob> {
    msg.token_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let token = state.tokenizer.token_text(id);
            let top_logprobs = msg
                .top_logprobs
                .get(i)
                .map(|top| {
                    top.token_ids
                        .iter()
                        .zip(&top.logprobs)
                        .map(|(&t, &lp)| {
                            let token = state.tokenizer.token_text(t);
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
    into: &mut CompletionLogprobs,
    offset: &mut usize,
) {
    for entry in chat_logprobs(state, msg) {
        into.text_offset.push(*offset);
        *offset += entry.token.len();
        into.token_logprobs.push(entry.logprob);
        into.top_logprobs.push(
            entry
                .top_logprobs
                .into_iter()
                .map(|t| (t.token, t.logprob))
                .collect::<BTreeMap<_, _>>(),
        );
        into.tokens.push(entry.token);
    }
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

pub async fn whole_completion(
    state: &HttpState,
    answers: Answers,
    id: String,
    logprobs: bool,
) -> Result<CompletionResponse, ApiError> {
    let c = collect(answers).await?;
    let logprobs = logprobs.then(|| {
        let mut lp = CompletionLogprobs::default();
        let mut offset = 0;
        for m in &c.messages {
            completion_logprobs(state, m, &mut lp, &mut offset);
        }
        lp
    });
    Ok(CompletionResponse {
        id,
        object: "text_completion",
        created: super::unix_now(),
        model: state.model_name.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text: c.text,
            logprobs,
            finish_reason: c.finish_reason,
        }],
        usage: c.usage,
    })
}

pub async fn whole_chat(
    state: &HttpState,
    answers: Answers,
    id: String,
    logprobs: bool,
) -> Result<ChatResponse, ApiError> {
    let c = collect(answers).await?;
    let logprobs = logprobs.then(|| ChatLogprobs {
        content: c
            .messages
            .iter()
            .flat_map(|m| chat_logprobs(state, m))
            .collect(),
    });
    Ok(ChatResponse {
        id,
        object: "chat.completion",
        created: super::unix_now(),
        model: state.model_name.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessageOut {
                role: "assistant",
                content: c.text,
            },
            logprobs,
            finish_reason: c.finish_reason,
        }],
        usage: c.usage.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
        }),
    })
}

type EventStream = Sse<KeepAliveStream<ReceiverStream<Result<Event, Infallible>>>>;

fn json_event<T: serde::Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_else(|e| {
        format!("{{\"error\":{{\"message\":\"cannot encode a chunk: {e}\",\"type\":\"internal_error\"}}}}")
    }))
}

/// Relays `answers` as events made by `chunk`; an error mid-stream becomes an error event.
/// A client that goes away drops the receiver, which ends the task and frees the sequence.
fn relay<F>(mut answers: Answers, first: Option<Event>, mut chunk: F) -> EventStream
where
    F: FnMut(&GenerateResponse) -> Vec<Event> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        if let Some(event) = first {
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
        while let Some(msg) = answers.recv().await {
            let events = match msg {
                Ok(msg) => chunk(&msg),
                Err(error) => vec![json_event(&ApiError::from(error).body())],
            };
            for event in events {
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

pub fn stream_completion(
    state: Arc<HttpState>,
    answers: Answers,
    id: String,
    logprobs: bool,
    include_usage: bool,
) -> EventStream {
    let created = super::unix_now();
    let model = state.model_name.clone();
    let mut offset = 0;
    relay(answers, None, move |msg| {
        let lp = logprobs.then(|| {
            let mut lp = CompletionLogprobs::default();
            completion_logprobs(&state, msg, &mut lp, &mut offset);
            lp
        });
        let mut events = vec![json_event(&CompletionResponse {
            id: id.clone(),
            object: "text_completion",
            created,
            model: model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text: msg.text.clone(),
                logprobs: lp,
                finish_reason: finish(msg),
            }],
            usage: None,
        })];
        if let Some(usage) = usage(msg).filter(|_| include_usage) {
            events.push(json_event(&CompletionResponse {
                id: id.clone(),
                object: "text_completion",
                created,
                model: model.clone(),
                choices: vec![],
                usage: Some(usage),
            }));
        }
        events
    })
}

pub fn stream_chat(
    state: Arc<HttpState>,
    answers: Answers,
    id: String,
    logprobs: bool,
    include_usage: bool,
) -> EventStream {
    let created = super::unix_now();
    let model = state.model_name.clone();
    let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices,
        usage,
    };
    let first = json_event(&chunk(
        vec![ChatChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            logprobs: None,
            finish_reason: None,
        }],
        None,
    ));
    let (id2, model2) = (id.clone(), model.clone());
    relay(answers, Some(first), move |msg| {
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatChunk {
            id: id2.clone(),
            object: "chat.completion.chunk",
            created,
            model: model2.clone(),
            choices,
            usage,
        };
        let mut events = vec![json_event(&chunk(
            vec![ChatChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: Some(msg.text.clone()),
                },
                logprobs: logprobs.then(|| ChatLogprobs {
                    content: chat_logprobs(&state, msg),
                }),
                finish_reason: finish(msg),
            }],
            None,
        ))];
        if let Some(usage) = usage(msg).filter(|_| include_usage) {
            events.push(json_event(&chunk(vec![], Some(usage))));
        }
        events
    })
}
