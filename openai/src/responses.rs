//! OpenAI's Responses API (`POST /v1/responses`, the official clients' `responses.create`), as
//! vLLM and SGLang serve it: a body is turned into the chat request it means (`instructions`
//! as the system message, the stored conversation `previous_response_id` names, then `input`,
//! function tools and their calls and outputs, `text.format` as the response format,
//! `max_output_tokens`, `include`d logprobs), so it is checked, rendered and generated exactly
//! as `/v1/chat/completions` would; the answer comes back as output items (reasoning, a
//! message, function calls), whole or as the typed stream of events (`response.created` ...
//! `response.completed`), and is kept (`store`, by default) in the server's
//! [`crate::response_store`]. What is not implemented (`conversation` objects, `background`,
//! hosted tools, images, other `include`s) is a 400 naming it.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::RouterError;
use crate::openai::{ChatMessageOut, Usage};
use crate::response_store::ResponseStore;

/// A Responses body: the fields read here; every other one is handed to the chat request
/// (vLLM's sampling extensions, `seed`, `chat_template_kwargs`, ...), whose checks refuse what
/// it does not serve.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    model: Option<String>,
    input: Option<Value>,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    text: Option<Value>,
    reasoning: Option<Value>,
    metadata: Option<Value>,
    store: Option<bool>,
    previous_response_id: Option<Value>,
    conversation: Option<Value>,
    background: Option<bool>,
    prompt: Option<Value>,
    include: Option<Vec<String>>,
    top_logprobs: Option<u32>,
    truncation: Option<String>,
    max_tool_calls: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Responses fields that change nothing here and are not handed to the chat request
/// (`stream_options` means other things there).
const BOOKKEEPING: [&str; 5] = [
    "user",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "stream_options",
];

/// What the response object repeats of its request.
#[derive(Debug, Clone, Default)]
pub struct ResponseShape {
    pub model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    tools: Vec<Value>,
    tool_choice: Value,
    parallel_tool_calls: bool,
    text: Value,
    metadata: Value,
    top_logprobs: Option<u32>,
    /// The stored response this one follows.
    pub previous_response_id: Option<String>,
    /// Whether the answer is kept (asked for, and the server stores responses).
    pub store: bool,
    /// This turn's input as items, what a stored response keeps of its request.
    pub input_items: Vec<Value>,
}

/// What `include` names to have each output text's token logprobs.
const LOGPROBS_INCLUDE: &str = "message.output_text.logprobs";

fn refuse(param: &'static str, why: &str) -> RouterError {
    RouterError::invalid(param, format!("`{param}` {why}"))
}

/// The chat body a Responses body means (JSON, for the chat parser), and what its answer
/// repeats. The server parses the result as any chat body; `store`, when the server keeps
/// responses, holds the conversations `previous_response_id` continues.
pub fn chat_body_of(
    body: &[u8],
    served_model: &str,
    store: Option<&ResponseStore>,
) -> Result<(Vec<u8>, ResponseShape), RouterError> {
    let mut req: ResponsesRequest = serde_json::from_slice(body)
        .map_err(|e| RouterError::unnamed(format!("invalid JSON body: {e}")))?;
    refuse_unimplemented(&req, store.is_some())?;
    let previous_response_id = match req.previous_response_id.take() {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(refuse("previous_response_id", "must be a string")),
    };
    // The earlier turns (their instructions are not carried over, as OpenAI's are not).
    let earlier = match (&previous_response_id, store) {
        (Some(id), Some(store)) => store
            .conversation(id)
            .map_err(|e| RouterError::invalid("previous_response_id", e.to_string()))?,
        _ => Vec::new(),
    };
    let input_items = match req.input.take() {
        // As OpenAI lists a text input among a response's input items.
        Some(Value::String(text)) => vec![json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]})],
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(refuse("input", "must be a string or a list of items")),
    };
    if input_items.is_empty() {
        return Err(refuse("input", "must not be empty"));
    }
    let mut messages = Vec::new();
    if let Some(instructions) = req.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    push_items(
        &mut messages,
        earlier.into_iter().chain(input_items.iter().cloned()),
    )?;
    if messages.is_empty() {
        return Err(refuse("input", "must not be empty"));
    }
    let tools = req.tools.take().unwrap_or_default();
    let mut chat = std::mem::take(&mut req.extra);
    for field in BOOKKEEPING {
        chat.remove(field);
    }
    let mut set = |key: &str, value: Value| {
        if !value.is_null() {
            chat.insert(key.to_string(), value);
        }
    };
    set("model", json!(req.model));
    set("messages", Value::Array(messages));
    set("max_completion_tokens", json!(req.max_output_tokens));
    set("temperature", json!(req.temperature));
    set("top_p", json!(req.top_p));
    set("stream", json!(req.stream));
    if !tools.is_empty() {
        set("tools", Value::Array(chat_tools(&tools)?));
    }
    if let Some(choice) = &req.tool_choice {
        set("tool_choice", chat_tool_choice(choice)?);
    }
    set("parallel_tool_calls", json!(req.parallel_tool_calls));
    // Logprobs when `include` asks for them (or alternatives are asked for), each token with
    // `top_logprobs` alternatives; the chat checks bound them.
    let logprobs = req.include.iter().flatten().any(|i| i == LOGPROBS_INCLUDE)
        || req.top_logprobs.is_some_and(|k| k > 0);
    if logprobs {
        set("logprobs", json!(true));
        set("top_logprobs", json!(req.top_logprobs.filter(|&k| k > 0)));
    }
    set("response_format", response_format(req.text.as_ref())?);
    let shape = ResponseShape {
        model: served_model.to_string(),
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        tools,
        tool_choice: req.tool_choice.unwrap_or_else(|| json!("auto")),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        text: req
            .text
            .unwrap_or_else(|| json!({"format": {"type": "text"}})),
        metadata: req.metadata.unwrap_or(Value::Null),
        top_logprobs: req.top_logprobs,
        previous_response_id,
        store: store.is_some() && req.store != Some(false),
        input_items,
    };
    let body = serde_json::to_vec(&Value::Object(chat))
        .map_err(|e| RouterError::Internal(format!("cannot encode a chat body: {e}")))?;
    Ok((body, shape))
}

/// What is not implemented, or needs a store this server does not keep: a 400 naming it (at
/// a no-op value it passes, as clients send those by default).
fn refuse_unimplemented(req: &ResponsesRequest, storing: bool) -> Result<(), RouterError> {
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    if set(&req.previous_response_id) && !storing {
        return Err(refuse(
            "previous_response_id",
            "needs a stored response: this server stores none (--responses-store-bytes 0)",
        ));
    }
    if set(&req.conversation) {
        return Err(refuse(
            "conversation",
            "(a conversation object) is not supported: continue one with previous_response_id",
        ));
    }
    if req.background == Some(true) {
        return Err(refuse("background", "is not supported by this server"));
    }
    if set(&req.prompt) {
        return Err(refuse(
            "prompt",
            "(a stored prompt template) is not supported",
        ));
    }
    // Encrypted reasoning is for stateless clients to send back: this server's reasoning
    // items come back as text, so asking for it changes nothing.
    let served = [LOGPROBS_INCLUDE, "reasoning.encrypted_content"];
    if let Some(other) = req
        .include
        .iter()
        .flatten()
        .find(|i| !served.contains(&i.as_str()))
    {
        return Err(RouterError::invalid(
            "include",
            format!("`include` of `{other}` is not supported by this server"),
        ));
    }
    if req.truncation.as_deref().is_some_and(|t| t != "disabled") {
        return Err(refuse(
            "truncation",
            "other than \"disabled\" is not supported",
        ));
    }
    if set(&req.max_tool_calls) {
        return Err(refuse("max_tool_calls", "is not supported by this server"));
    }
    let effort = req.reasoning.as_ref().and_then(|r| r.get("effort"));
    if effort.is_some_and(|e| !e.is_null()) {
        return Err(refuse(
            "reasoning",
            "effort is not supported by this server",
        ));
    }
    Ok(())
}

/// Input items as chat messages: messages (`developer` read as `system`), function calls
/// (consecutive ones one assistant turn) and their outputs, reasoning kept with the assistant
/// turn after it (a stored response's output items read the same way).
fn push_items(
    messages: &mut Vec<Value>,
    items: impl IntoIterator<Item = Value>,
) -> Result<(), RouterError> {
    let mut reasoning: Option<String> = None;
    for item in items {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") => "system",
                    Some(role @ ("system" | "user" | "assistant")) => role,
                    _ => return Err(refuse("input", "has a message of an unknown role")),
                };
                let mut message = json!({"role": role, "content": text_of(item.get("content"))?});
                if role == "assistant" {
                    if let Some(r) = reasoning.take() {
                        message["reasoning_content"] = r.into();
                    }
                }
                messages.push(message);
            }
            "function_call" => {
                let field = |name: &str| item.get(name).and_then(Value::as_str);
                let (Some(call_id), Some(name)) = (field("call_id"), field("name")) else {
                    return Err(refuse(
                        "input",
                        "has a function call without call_id or name",
                    ));
                };
                let call = json!({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": field("arguments").unwrap_or("{}")}});
                // A call right after the assistant's text (or another call) is the same turn.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        if !last["tool_calls"].is_array() {
                            last["tool_calls"] = json!([]);
                        }
                        if let Some(calls) = last["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    _ => {
                        let mut turn =
                            json!({"role": "assistant", "content": "", "tool_calls": [call]});
                        if let Some(r) = reasoning.take() {
                            turn["reasoning_content"] = r.into();
                        }
                        messages.push(turn);
                    }
                }
            }
            "function_call_output" => {
                let Some(call_id) = item.get("call_id").and_then(Value::as_str) else {
                    return Err(refuse(
                        "input",
                        "has a function call output without call_id",
                    ));
                };
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => text_of(other)?,
                };
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            "reasoning" => {
                let text: Vec<&str> = ["content", "summary"]
                    .iter()
                    .filter_map(|f| item.get(*f).and_then(Value::as_array))
                    .flatten()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                reasoning = Some(text.join("\n"));
            }
            other => {
                return Err(RouterError::invalid(
                    "input",
                    format!("input items of type `{other}` are not supported by this server"),
                ))
            }
        }
    }
    Ok(())
}

/// A message's content: a string, or text parts (`input_text`, `output_text`) joined by a
/// newline as the chat API joins its parts.
fn text_of(content: Option<&Value>) -> Result<String, RouterError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(t)) => texts.push(t),
                    _ => {
                        return Err(RouterError::invalid(
                            "input",
                            format!("content parts of type `{kind}` are not supported"),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(refuse(
            "input",
            "has content that is neither text nor parts",
        )),
    }
}

/// Function tools as the chat API writes them; hosted tools (web search, files, ...) refused.
fn chat_tools(tools: &[Value]) -> Result<Vec<Value>, RouterError> {
    tools
        .iter()
        .map(|t| {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(refuse("tools", "other than functions are not supported"));
            }
            let mut function = Map::new();
            for field in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(field).filter(|v| !v.is_null()) {
                    function.insert(field.to_string(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect()
}

fn chat_tool_choice(choice: &Value) -> Result<Value, RouterError> {
    match choice {
        Value::String(_) | Value::Null => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            Ok(json!({"type": "function", "function": {"name": o.get("name")}}))
        }
        _ => Err(refuse(
            "tool_choice",
            "other than a function is not supported",
        )),
    }
}

/// `text.format` as the chat API's `response_format`.
fn response_format(text: Option<&Value>) -> Result<Value, RouterError> {
    let Some(format) = text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) else {
        return Ok(Value::Null);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Value::Null),
        Some("json_object") => Ok(json!({"type": "json_object"})),
        Some("json_schema") => {
            let mut schema = Map::new();
            for field in ["name", "schema", "strict", "description"] {
                if let Some(v) = format.get(field).filter(|v| !v.is_null()) {
                    schema.insert(field.to_string(), v.clone());
                }
            }
            Ok(json!({"type": "json_schema", "json_schema": schema}))
        }
        _ => Err(refuse(
            "text",
            "format must be text, json_object or json_schema",
        )),
    }
}

/// Whether an answer ended by its token budget (the response is then `incomplete`).
fn incomplete(finish_reason: Option<&str>) -> bool {
    finish_reason == Some("length")
}

/// The response object: `output` and `usage` once finished, empty while in progress.
pub fn response_object(
    shape: &ResponseShape,
    (id, created): (&str, u64),
    output: Vec<Value>,
    usage: Option<(&Usage, u32)>,
    finish_reason: Option<&str>,
) -> Value {
    let status = match (usage, incomplete(finish_reason)) {
        (None, _) => "in_progress",
        (Some(_), true) => "incomplete",
        (Some(_), false) => "completed",
    };
    let usage = usage.map(|(u, reasoning_tokens)| {
        json!({
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            },
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": u.total_tokens,
        })
    });
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": shape.model,
        "output": output,
        "usage": usage,
        "error": null,
        "incomplete_details": (status == "incomplete").then(|| json!({"reason": "max_output_tokens"})),
        "instructions": shape.instructions,
        "max_output_tokens": shape.max_output_tokens,
        "metadata": shape.metadata,
        "parallel_tool_calls": shape.parallel_tool_calls,
        "temperature": shape.temperature,
        "top_p": shape.top_p,
        "top_logprobs": shape.top_logprobs,
        "tool_choice": shape.tool_choice,
        "tools": shape.tools,
        "text": shape.text,
        "reasoning": {"effort": null, "summary": null},
        "store": shape.store,
        "background": false,
        "truncation": "disabled",
        "previous_response_id": shape.previous_response_id,
    })
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": format!("rs-{id}"), "summary": [],
           "content": [{"type": "reasoning_text", "text": text}], "status": "completed"})
}

fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

fn message_item(id: &str, text: Option<(&str, &[Value])>, status: &str) -> Value {
    let content: Vec<Value> = text.map(|(t, lp)| text_part(t, lp)).into_iter().collect();
    json!({"type": "message", "id": format!("msg-{id}"), "status": status, "role": "assistant",
           "content": content})
}

/// A chat tool call (`{id, function: {name, arguments}}`) as a function call item.
fn function_call_item(id: &str, i: usize, call: &Value) -> Value {
    json!({"type": "function_call", "id": format!("fc-{id}-{i}"), "call_id": call["id"],
           "name": call["function"]["name"], "arguments": call["function"]["arguments"],
           "status": "completed"})
}

/// The output items of a finished answer, in order: its reasoning, its text (with every
/// token's logprobs when asked for, as vLLM gives them), its calls.
pub fn output_items(id: &str, message: &ChatMessageOut, logprobs: &[Value]) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(reasoning) = &message.reasoning_content {
        items.push(reasoning_item(id, reasoning));
    }
    if let Some(text) = message.content.as_deref() {
        if !text.is_empty() || message.tool_calls.is_none() {
            items.push(message_item(id, Some((text, logprobs)), "completed"));
        }
    }
    for (i, call) in message.tool_calls.iter().flatten().enumerate() {
        items.push(function_call_item(id, i, call));
    }
    items
}

/// The reasoning or message item streaming now.
enum OpenItem {
    Reasoning { index: usize, text: String },
    Message { index: usize, text: String },
}

/// A function call streaming now: open until the answer ends (its arguments may grow while
/// the next call starts).
struct OpenCall {
    index: usize,
    /// The call's place in the answer (`delta.tool_calls[].index` of the chat stream).
    call: u64,
    item: Value,
}

/// One stream's events: what is open, what finished (with its output index), and the running
/// sequence number. Fed the answer's reasoning and text as they are split from it, and its
/// calls as the chat stream announces them (`HeldText`'s `delta.tool_calls` entries).
pub struct ResponseEvents {
    id: String,
    created: u64,
    shape: ResponseShape,
    open: Option<OpenItem>,
    calls: Vec<OpenCall>,
    done: Vec<(usize, Value)>,
    sequence: u64,
    /// Every token's logprobs so far (the message's, as the whole answer's), and those not
    /// yet sent with a text delta.
    logprobs: Vec<Value>,
    unsent_logprobs: Vec<Value>,
}

/// An event: its type, and its JSON (with `type` and `sequence_number`).
pub type ResponseEvent = (&'static str, Value);

impl ResponseEvents {
    pub fn new(id: String, created: u64, shape: ResponseShape) -> Self {
        Self {
            id,
            created,
            shape,
            open: None,
            calls: Vec::new(),
            done: Vec::new(),
            sequence: 0,
            logprobs: Vec::new(),
            unsent_logprobs: Vec::new(),
        }
    }

    /// More tokens' logprobs (when asked for): they go out with the next text delta, and
    /// the message holds them all.
    pub fn add_logprobs(&mut self, entries: impl IntoIterator<Item = Value>) {
        for entry in entries {
            self.logprobs.push(entry.clone());
            self.unsent_logprobs.push(entry);
        }
    }

    fn event(&mut self, kind: &'static str, mut body: Value) -> ResponseEvent {
        body["type"] = kind.into();
        body["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        (kind, body)
    }

    fn object(&self, usage: Option<(&Usage, u32)>, finish_reason: Option<&str>) -> Value {
        let output = match usage {
            Some(_) => self.done.iter().map(|(_, item)| item.clone()).collect(),
            None => Vec::new(),
        };
        let id = (self.id.as_str(), self.created);
        response_object(&self.shape, id, output, usage, finish_reason)
    }

    /// The next item's output index.
    fn next_index(&self) -> usize {
        self.done.len() + self.calls.len() + usize::from(self.open.is_some())
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<ResponseEvent> {
        let response = self.object(None, None);
        vec![
            self.event("response.created", json!({"response": response.clone()})),
            self.event("response.in_progress", json!({"response": response})),
        ]
    }

    /// More of the answer's reasoning.
    pub fn reasoning(&mut self, text: &str, out: &mut Vec<ResponseEvent>) {
        if text.is_empty() {
            return;
        }
        if !matches!(self.open, Some(OpenItem::Reasoning { .. })) {
            self.close(out);
            let index = self.next_index();
            let item = json!({"type": "reasoning", "id": format!("rs-{}", self.id),
                              "summary": [], "content": [], "status": "in_progress"});
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            ));
            self.open = Some(OpenItem::Reasoning {
                index,
                text: String::new(),
            });
        }
        let Some(OpenItem::Reasoning { index, text: all }) = self.open.as_mut() else {
            return;
        };
        all.push_str(text);
        let index = *index;
        let item_id = format!("rs-{}", self.id);
        out.push(self.event(
            "response.reasoning_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": text}),
        ));
    }

    /// More of the answer's text.
    pub fn text(&mut self, text: &str, out: &mut Vec<ResponseEvent>) {
        if text.is_empty() {
            return;
        }
        self.open_message(out);
        let Some(OpenItem::Message { index, text: all }) = self.open.as_mut() else {
            return;
        };
        all.push_str(text);
        let index = *index;
        let item_id = format!("msg-{}", self.id);
        let logprobs = std::mem::take(&mut self.unsent_logprobs);
        out.push(self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                   "delta": text, "logprobs": logprobs}),
        ));
    }

    fn open_message(&mut self, out: &mut Vec<ResponseEvent>) {
        if matches!(self.open, Some(OpenItem::Message { .. })) {
            return;
        }
        self.close(out);
        let index = self.next_index();
        let item = message_item(&self.id, None, "in_progress");
        let item_id = format!("msg-{}", self.id);
        out.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        out.push(self.event(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                   "part": text_part("", &[])}),
        ));
        self.open = Some(OpenItem::Message {
            index,
            text: String::new(),
        });
    }

    /// A call's piece as the chat stream gives it (`{"index", "id"?, "function": {"name"?,
    /// "arguments"}}`): its item opened the first time, then its arguments' delta.
    pub fn call(&mut self, entry: &Value, out: &mut Vec<ResponseEvent>) {
        let call = entry["index"].as_u64().unwrap_or(0);
        if !self.calls.iter().any(|c| c.call == call) {
            self.close(out);
            let index = self.next_index();
            let item = json!({"type": "function_call", "id": format!("fc-{}-{call}", self.id),
                              "call_id": entry["id"], "name": entry["function"]["name"],
                              "arguments": "", "status": "in_progress"});
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item.clone()}),
            ));
            self.calls.push(OpenCall { index, call, item });
        }
        let fragment = entry["function"]["arguments"].as_str().unwrap_or("");
        let Some(open) = self.calls.iter_mut().find(|c| c.call == call) else {
            return;
        };
        if fragment.is_empty() {
            return;
        }
        let arguments = open.item["arguments"].as_str().unwrap_or("").to_string() + fragment;
        open.item["arguments"] = arguments.into();
        let ids =
            json!({"item_id": open.item["id"], "output_index": open.index, "delta": fragment});
        out.push(self.event("response.function_call_arguments.delta", ids));
    }

    /// The answer's end: every open item's `.done` events, then `response.completed` (or
    /// `response.incomplete` when the token budget cut it); `usage` with the thinking's tokens.
    /// Returns the whole response, as that last event carries it.
    pub fn finish(
        &mut self,
        reason: &str,
        usage: (&Usage, u32),
        out: &mut Vec<ResponseEvent>,
    ) -> Value {
        // An answer of nothing is still a message, as the whole answer gives it.
        if self.open.is_none() && self.calls.is_empty() && self.done.is_empty() {
            self.open_message(out);
        }
        self.close(out);
        for mut open in std::mem::take(&mut self.calls) {
            open.item["status"] = "completed".into();
            let done = json!({"item_id": open.item["id"], "output_index": open.index,
                              "arguments": open.item["arguments"], "name": open.item["name"]});
            out.push(self.event("response.function_call_arguments.done", done));
            out.push(self.event(
                "response.output_item.done",
                json!({"output_index": open.index, "item": open.item.clone()}),
            ));
            self.done.push((open.index, open.item));
        }
        self.done.sort_by_key(|(index, _)| *index);
        let kind = match incomplete(Some(reason)) {
            true => "response.incomplete",
            false => "response.completed",
        };
        let response = self.object(Some(usage), Some(reason));
        out.push(self.event(kind, json!({"response": response.clone()})));
        response
    }

    /// Ends the open reasoning or message: its `.done` events, and it joins the finished output.
    fn close(&mut self, out: &mut Vec<ResponseEvent>) {
        match self.open.take() {
            None => {}
            Some(OpenItem::Reasoning { index, text }) => {
                let item = reasoning_item(&self.id, &text);
                out.push(self.event(
                    "response.reasoning_text.done",
                    json!({"item_id": item["id"], "output_index": index, "content_index": 0,
                           "text": text}),
                ));
                out.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                ));
                self.done.push((index, item));
            }
            Some(OpenItem::Message { index, text }) => {
                // The message holds every token's logprobs, as the whole answer's does.
                let item = message_item(&self.id, Some((&text, &self.logprobs)), "completed");
                let ids = json!({"item_id": item["id"], "output_index": index, "content_index": 0});
                let mut done = ids.clone();
                done["text"] = text.as_str().into();
                done["logprobs"] = self.logprobs.clone().into();
                out.push(self.event("response.output_text.done", done));
                let mut part = ids;
                part["part"] = text_part(&text, &self.logprobs);
                out.push(self.event("response.content_part.done", part));
                out.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                ));
                self.done.push((index, item));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_of(body: Value) -> Result<Value, RouterError> {
        let (chat, _) = chat_body_of(body.to_string().as_bytes(), "m", None)?;
        Ok(serde_json::from_slice(&chat).unwrap())
    }

    /// A stored conversation comes before the new input, each turn's input then its output
    /// (reasoning with the assistant turn after it); the earlier instructions are not carried
    /// over; the shape says what to store and what the answer follows.
    #[test]
    fn previous_response_id_continues_the_stored_conversation() {
        let store = ResponseStore::new(1 << 20);
        let first = json!({"id": "resp_1", "output": [
            {"type": "reasoning", "id": "rs", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
            {"type": "message", "id": "msg", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Hi!", "annotations": [], "logprobs": []}]}
        ]});
        let first_input = vec![json!({"type": "message", "role": "user", "content": "Hello"})];
        store.put(None, first_input, first);
        let body = json!({"model": "m", "instructions": "Be terse.", "previous_response_id": "resp_1",
                          "input": "And now?"});
        let (chat, shape) = chat_body_of(body.to_string().as_bytes(), "m", Some(&store)).unwrap();
        let chat: Value = serde_json::from_slice(&chat).unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!", "reasoning_content": "hmm"},
                {"role": "user", "content": "And now?"},
            ])
        );
        assert_eq!(shape.previous_response_id.as_deref(), Some("resp_1"));
        assert!(shape.store);
        assert_eq!(
            shape.input_items,
            [json!({"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "And now?"}]})]
        );
        // `store: false` answers without keeping; an unknown id is a 400 naming the field.
        let body = json!({"previous_response_id": "resp_1", "input": "x", "store": false});
        let (_, shape) = chat_body_of(body.to_string().as_bytes(), "m", Some(&store)).unwrap();
        assert!(!shape.store);
        let body = json!({"previous_response_id": "resp_404", "input": "x"});
        match chat_body_of(body.to_string().as_bytes(), "m", Some(&store)) {
            Err(RouterError::Invalid {
                param: Some("previous_response_id"),
                message,
            }) => {
                assert!(message.contains("resp_404"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_responses_body_is_the_chat_request_it_means() {
        let chat = chat_of(json!({
            "model": "m",
            "instructions": "Be terse.",
            "input": [
                {"role": "developer", "content": "Use metric units."},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "look it up"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
                {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "12 C"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "It is 12 C."}]},
                {"role": "user", "content": "Thanks"}
            ],
            "max_output_tokens": 20,
            "temperature": 0.5,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "store": true,
            "metadata": {"k": "v"},
            "top_k": 5,
            "seed": 7
        }))
        .unwrap();
        let messages = chat["messages"].as_array().unwrap();
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            [
                "system",
                "system",
                "user",
                "assistant",
                "tool",
                "assistant",
                "user"
            ]
        );
        assert_eq!(messages[0]["content"], "Be terse.");
        assert_eq!(messages[2]["content"], "Weather?");
        let calls = messages[3]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2, "consecutive calls are one turn");
        assert_eq!(calls[1]["function"]["name"], "get_time");
        assert_eq!(messages[3]["reasoning_content"], "look it up");
        assert_eq!(messages[4]["tool_call_id"], "c1");
        assert_eq!(chat["max_completion_tokens"], 20);
        assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(chat["tool_choice"]["function"]["name"], "get_weather");
        assert_eq!(chat["response_format"]["json_schema"]["name"], "w");
        // vLLM's extensions pass on; bookkeeping does not.
        assert_eq!(
            (chat["top_k"].clone(), chat["seed"].clone()),
            (json!(5), json!(7))
        );
        assert!(chat.get("store").is_none() && chat.get("metadata").is_none());
    }

    #[test]
    fn what_is_not_served_is_refused_by_name() {
        for (body, param) in [
            (
                json!({"input": "x", "previous_response_id": "resp-1"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "conversation": "c"}), "conversation"),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "include": ["file_search_call.results"]}),
                "include",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"input": [{"type": "item_reference", "id": "i"}]}),
                "input",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input",
            ),
            (
                json!({"input": "x", "reasoning": {"effort": "high"}}),
                "reasoning",
            ),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (
                json!({"input": "x", "text": {"format": {"type": "xml"}}}),
                "text",
            ),
            (json!({"input": []}), "input"),
            (json!({"model": "m"}), "input"),
        ] {
            match chat_of(body.clone()) {
                Err(RouterError::Invalid { param: Some(p), .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        // Defaults and bookkeeping clients send pass, and the chat body they become parses.
        let body = json!({"input": "x", "previous_response_id": null, "include": [],
                          "reasoning": {"effort": null}, "truncation": "disabled",
                          "background": false, "store": true, "user": "u",
                          "stream_options": {"include_obfuscation": false}});
        let (chat, _) = chat_body_of(body.to_string().as_bytes(), "m", None).unwrap();
        crate::parse_chat_body(&chat, "m", true).unwrap();
    }

    #[test]
    fn included_logprobs_are_the_chat_requests_logprobs() {
        let chat = chat_of(
            json!({"input": "x", "include": ["message.output_text.logprobs",
                                   "reasoning.encrypted_content"], "top_logprobs": 3}),
        )
        .unwrap();
        assert_eq!(
            (chat["logprobs"].clone(), chat["top_logprobs"].clone()),
            (json!(true), json!(3))
        );
        let chat =
            chat_of(json!({"input": "x", "include": ["message.output_text.logprobs"]})).unwrap();
        assert_eq!(chat["logprobs"], true);
        assert!(chat.get("top_logprobs").is_none());
        assert!(chat_of(json!({"input": "x"}))
            .unwrap()
            .get("logprobs")
            .is_none());
    }

    /// Each text delta carries the logprobs of the tokens since the last one; the message
    /// holds them all.
    #[test]
    fn logprobs_go_out_with_the_text_and_the_message_holds_them_all() {
        let mut events = ResponseEvents::new("r".into(), 1, ResponseShape::default());
        let mut all = Vec::new();
        let token = |t: &str| json!({"token": t, "logprob": -0.5, "bytes": t.as_bytes(), "top_logprobs": []});
        events.add_logprobs([token("<think>"), token("a")]);
        events.reasoning("a", &mut all);
        events.add_logprobs([token("</think>"), token("Hi")]);
        events.text("Hi", &mut all);
        events.add_logprobs([token("!")]);
        events.text("!", &mut all);
        events.finish("stop", (&usage(), 0), &mut all);
        let deltas: Vec<usize> = all
            .iter()
            .filter(|(k, _)| *k == "response.output_text.delta")
            .map(|(_, e)| e["logprobs"].as_array().unwrap().len())
            .collect();
        assert_eq!(deltas, [4, 1]);
        let last = &all.last().unwrap().1["response"];
        assert_eq!(
            last["output"][1]["content"][0]["logprobs"]
                .as_array()
                .unwrap()
                .len(),
            5
        );
    }

    fn kinds(events: &[ResponseEvent]) -> Vec<&'static str> {
        events.iter().map(|(k, _)| *k).collect()
    }

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 5,
            completion_tokens: 3,
            total_tokens: 8,
            prompt_tokens_details: None,
        }
    }

    /// The streamed events: numbered in order, items opened and closed around their deltas,
    /// the last event holding what the deltas built (as the whole answer's items).
    #[test]
    fn a_stream_opens_each_item_before_its_deltas_and_ends_with_the_whole_response() {
        let mut events = ResponseEvents::new("r".into(), 1, ResponseShape::default());
        let mut all = events.start();
        events.reasoning("ab", &mut all);
        events.reasoning("c", &mut all);
        for piece in ["Hel", "lo", "!"] {
            events.text(piece, &mut all);
        }
        events.finish("stop", (&usage(), 0), &mut all);
        assert_eq!(
            kinds(&all),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (_, e)) in all.iter().enumerate() {
            assert_eq!(e["sequence_number"], i as u64);
        }
        let last = &all.last().unwrap().1["response"];
        assert_eq!(last["status"], "completed");
        assert_eq!(last["usage"]["total_tokens"], 8);
        assert_eq!(last["output"][1]["id"], all[9].1["item_id"]);
        let whole = output_items(
            "r",
            &ChatMessageOut {
                role: "assistant",
                content: Some("Hello!".into()),
                reasoning_content: Some("abc".into()),
                tool_calls: None,
            },
            &[],
        );
        assert_eq!(last["output"], Value::Array(whole), "streamed = whole");
    }

    /// Calls as the chat stream announces them: text first, then each call's item with its
    /// arguments growing, closed at the end in their order; the same items as the whole answer.
    #[test]
    fn calls_stream_their_arguments_and_end_as_the_whole_answers_items() {
        let mut events = ResponseEvents::new("r".into(), 1, ResponseShape::default());
        let mut all = Vec::new();
        events.text("Let me look.", &mut all);
        let first = json!({"index": 0, "id": "call-r-0-0", "type": "function",
                           "function": {"name": "f", "arguments": "{\"a\""}});
        events.call(&first, &mut all);
        events.call(
            &json!({"index": 0, "function": {"arguments": ": 1}"}}),
            &mut all,
        );
        let second = json!({"index": 1, "id": "call-r-0-1", "type": "function",
                            "function": {"name": "g", "arguments": "{}"}});
        events.call(&second, &mut all);
        events.finish("tool_calls", (&usage(), 0), &mut all);
        let deltas: Vec<&Value> = all
            .iter()
            .filter(|(k, _)| *k == "response.function_call_arguments.delta")
            .map(|(_, e)| &e["delta"])
            .collect();
        assert_eq!(deltas, [&json!("{\"a\""), &json!(": 1}"), &json!("{}")]);
        let last = &all.last().unwrap().1["response"];
        let calls = [
            json!({"id": "call-r-0-0", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}),
            json!({"id": "call-r-0-1", "type": "function", "function": {"name": "g", "arguments": "{}"}}),
        ];
        let whole = output_items(
            "r",
            &ChatMessageOut {
                role: "assistant",
                content: Some("Let me look.".into()),
                reasoning_content: None,
                tool_calls: Some(calls.to_vec()),
            },
            &[],
        );
        assert_eq!(last["output"], Value::Array(whole), "streamed = whole");
        // Every item's index is its place in the output.
        for (kind, e) in &all {
            if *kind == "response.output_item.done" {
                let at = e["output_index"].as_u64().unwrap() as usize;
                assert_eq!(last["output"][at], e["item"]);
            }
        }
    }

    #[test]
    fn an_answer_cut_by_its_budget_is_incomplete_and_an_empty_one_a_message() {
        let mut events = ResponseEvents::new("r".into(), 1, ResponseShape::default());
        let mut all = Vec::new();
        events.finish("length", (&usage(), 0), &mut all);
        let (kind, last) = all.last().unwrap();
        assert_eq!(*kind, "response.incomplete");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["output"][0]["content"][0]["text"], "");
    }
}
