//! OpenAI's Responses API (`POST /v1/responses`, the official clients' `responses.create`), as
//! vLLM and SGLang serve it, without storage: a body is turned into the chat request it means
//! (`instructions` as the system message, `input` as the conversation, function tools and
//! their calls and outputs, `text.format` as the response format, `max_output_tokens`), so it
//! is checked, rendered and generated exactly as `/v1/chat/completions` would; the answer comes
//! back as output items (reasoning, a message, function calls), whole or as the typed stream
//! of events (`response.created` ... `response.completed`). What needs a stored response
//! (`previous_response_id`, `conversation`, `background`, item references) or is not
//! implemented (hosted tools, `include`d logprobs) is a 400 naming it.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::RouterError;
use crate::openai::{ChatMessageOut, Usage};
use crate::reasoning::ReasoningStream;
use crate::tools::ToolAnswers;

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
    previous_response_id: Option<Value>,
    conversation: Option<Value>,
    background: Option<bool>,
    prompt: Option<Value>,
    include: Option<Vec<String>>,
    top_logprobs: Option<u32>,
    truncation: Option<String>,
    max_tool_calls: Option<Value>,
    // Bookkeeping: read so they are not handed on, never acted on.
    #[allow(dead_code)]
    store: Option<bool>,
    #[allow(dead_code)]
    user: Option<String>,
    #[allow(dead_code)]
    service_tier: Option<Value>,
    #[allow(dead_code)]
    safety_identifier: Option<Value>,
    #[allow(dead_code)]
    prompt_cache_key: Option<Value>,
    #[allow(dead_code)]
    stream_options: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

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
}

fn refuse(param: &'static str, why: &str) -> RouterError {
    RouterError::invalid(param, format!("`{param}` {why}"))
}

/// The chat body a Responses body means (JSON, for the chat parser), and what its answer
/// repeats. Pure: the server parses the result as any chat body.
pub fn chat_body_of(
    body: &[u8],
    served_model: &str,
) -> Result<(Vec<u8>, ResponseShape), RouterError> {
    let req: ResponsesRequest = serde_json::from_slice(body)
        .map_err(|e| RouterError::unnamed(format!("invalid JSON body: {e}")))?;
    refuse_stored_and_unimplemented(&req)?;
    let mut messages = Vec::new();
    if let Some(instructions) = req.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match req.input.clone() {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => push_items(&mut messages, items)?,
        None | Some(Value::Null) => {}
        Some(_) => return Err(refuse("input", "must be a string or a list of items")),
    }
    let tools = req.tools.clone().unwrap_or_default();
    let mut chat = req.extra.clone();
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
    };
    let body = serde_json::to_vec(&Value::Object(chat))
        .map_err(|e| RouterError::Internal(format!("cannot encode a chat body: {e}")))?;
    Ok((body, shape))
}

/// What needs a stored response or is not implemented: a 400 naming it (at a no-op value it
/// passes, as clients send those by default).
fn refuse_stored_and_unimplemented(req: &ResponsesRequest) -> Result<(), RouterError> {
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let stored = "needs a stored response: this server stores none";
    if set(&req.previous_response_id) {
        return Err(refuse("previous_response_id", stored));
    }
    if set(&req.conversation) {
        return Err(refuse("conversation", stored));
    }
    if req.background == Some(true) {
        return Err(refuse("background", stored));
    }
    if set(&req.prompt) {
        return Err(refuse(
            "prompt",
            "(a stored prompt template) is not supported",
        ));
    }
    if req.include.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(refuse("include", "is not supported by this server"));
    }
    if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(refuse("top_logprobs", "is not supported on /v1/responses"));
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
/// turn after it.
fn push_items(messages: &mut Vec<Value>, items: Vec<Value>) -> Result<(), RouterError> {
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
    usage: Option<&Usage>,
    finish_reason: Option<&str>,
) -> Value {
    let status = match (usage, incomplete(finish_reason)) {
        (None, _) => "in_progress",
        (Some(_), true) => "incomplete",
        (Some(_), false) => "completed",
    };
    let usage = usage.map(|u| {
        json!({
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
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
        "tool_choice": shape.tool_choice,
        "tools": shape.tools,
        "text": shape.text,
        "reasoning": {"effort": null, "summary": null},
        "store": false,
        "background": false,
        "truncation": "disabled",
        "previous_response_id": null,
    })
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": format!("rs-{id}"), "summary": [],
           "content": [{"type": "reasoning_text", "text": text}], "status": "completed"})
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn message_item(id: &str, text: Option<&str>, status: &str) -> Value {
    json!({"type": "message", "id": format!("msg-{id}"), "status": status, "role": "assistant",
           "content": text.map(|t| vec![text_part(t)]).unwrap_or_default()})
}

/// A chat tool call (`{id, function: {name, arguments}}`) as a function call item.
fn function_call_item(id: &str, i: usize, call: &Value, status: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc-{id}-{i}"), "call_id": call["id"],
           "name": call["function"]["name"], "arguments": call["function"]["arguments"],
           "status": status})
}

/// The output items of a finished answer, in order: its reasoning, its text, its calls.
pub fn output_items(id: &str, message: &ChatMessageOut) -> Vec<Value> {
    let mut items = Vec::new();
    if let Some(reasoning) = &message.reasoning_content {
        items.push(reasoning_item(id, reasoning));
    }
    if let Some(text) = message.content.as_deref() {
        if !text.is_empty() || message.tool_calls.is_none() {
            items.push(message_item(id, Some(text), "completed"));
        }
    }
    for (i, call) in message.tool_calls.iter().flatten().enumerate() {
        items.push(function_call_item(id, i, call, "completed"));
    }
    items
}

/// The item streaming now.
enum OpenItem {
    Reasoning { index: usize, text: String },
    Message { index: usize, text: String },
}

/// One stream's events: what is open, what finished, and the running sequence number. Fed
/// the answer's pieces (already split from its reasoning where a parser is on); with tools
/// offered the text is held until the answer ends, then read for calls.
pub struct ResponseEvents {
    id: String,
    created: u64,
    shape: ResponseShape,
    tools: Option<ToolAnswers>,
    splitter: Option<ReasoningStream>,
    open: Option<OpenItem>,
    done: Vec<Value>,
    held: String,
    sequence: u64,
}

/// An event: its type, and its JSON (with `type` and `sequence_number`).
pub type ResponseEvent = (&'static str, Value);

impl ResponseEvents {
    pub fn new(
        id: String,
        created: u64,
        shape: ResponseShape,
        tools: Option<ToolAnswers>,
        splitter: Option<ReasoningStream>,
    ) -> Self {
        Self {
            id,
            created,
            shape,
            tools,
            splitter,
            open: None,
            done: Vec::new(),
            held: String::new(),
            sequence: 0,
        }
    }

    fn event(&mut self, kind: &'static str, mut body: Value) -> ResponseEvent {
        body["type"] = kind.into();
        body["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        (kind, body)
    }

    fn object(&self, usage: Option<&Usage>, finish_reason: Option<&str>) -> Value {
        let output = match usage {
            Some(_) => self.done.clone(),
            None => Vec::new(),
        };
        let id = (self.id.as_str(), self.created);
        response_object(&self.shape, id, output, usage, finish_reason)
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<ResponseEvent> {
        let response = self.object(None, None);
        vec![
            self.event("response.created", json!({"response": response.clone()})),
            self.event("response.in_progress", json!({"response": response})),
        ]
    }

    /// The events for one more piece of the answer; with `finish` (its finish reason and
    /// usage) the last ones, ending with `response.completed` or `response.incomplete`.
    pub fn next(&mut self, piece: &str, finish: Option<(&str, &Usage)>) -> Vec<ResponseEvent> {
        let mut out = Vec::new();
        let (reasoning, content) = match self.splitter.as_mut() {
            Some(s) => {
                let p = s.push(piece, finish.is_some());
                (p.reasoning, p.content)
            }
            None => (String::new(), piece.to_string()),
        };
        if !reasoning.is_empty() {
            self.stream_reasoning(&reasoning, &mut out);
        }
        if !content.is_empty() {
            match self.tools.is_some() {
                true => self.held.push_str(&content),
                false => self.stream_text(&content, &mut out),
            }
        }
        if let Some((reason, usage)) = finish {
            self.close(&mut out);
            if let Some(tools) = self.tools.take() {
                self.emit_held(&tools, &mut out);
            }
            let kind = match incomplete(Some(reason)) {
                true => "response.incomplete",
                false => "response.completed",
            };
            let response = self.object(Some(usage), Some(reason));
            out.push(self.event(kind, json!({"response": response})));
        }
        out
    }

    fn stream_reasoning(&mut self, text: &str, out: &mut Vec<ResponseEvent>) {
        if !matches!(self.open, Some(OpenItem::Reasoning { .. })) {
            self.close(out);
            let index = self.done.len();
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

    fn stream_text(&mut self, text: &str, out: &mut Vec<ResponseEvent>) {
        if !matches!(self.open, Some(OpenItem::Message { .. })) {
            self.close(out);
            let index = self.done.len();
            let item = message_item(&self.id, None, "in_progress");
            let item_id = format!("msg-{}", self.id);
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            ));
            out.push(self.event(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": index, "content_index": 0,
                       "part": text_part("")}),
            ));
            self.open = Some(OpenItem::Message {
                index,
                text: String::new(),
            });
        }
        let Some(OpenItem::Message { index, text: all }) = self.open.as_mut() else {
            return;
        };
        all.push_str(text);
        let index = *index;
        let item_id = format!("msg-{}", self.id);
        out.push(self.event(
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0,
                   "delta": text, "logprobs": []}),
        ));
    }

    /// Ends the open item: its `.done` events, and it joins the finished output.
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
                self.done.push(item);
            }
            Some(OpenItem::Message { index, text }) => {
                let item = message_item(&self.id, Some(&text), "completed");
                let ids = json!({"item_id": item["id"], "output_index": index, "content_index": 0});
                let mut done = ids.clone();
                done["text"] = text.as_str().into();
                done["logprobs"] = json!([]);
                out.push(self.event("response.output_text.done", done));
                let mut part = ids;
                part["part"] = text_part(&text);
                out.push(self.event("response.content_part.done", part));
                out.push(self.event(
                    "response.output_item.done",
                    json!({"output_index": index, "item": item.clone()}),
                ));
                self.done.push(item);
            }
        }
    }

    /// With tools: the held text read for calls, its text and each call as whole items.
    fn emit_held(&mut self, tools: &ToolAnswers, out: &mut Vec<ResponseEvent>) {
        let held = std::mem::take(&mut self.held);
        let (content, calls) = match tools.format.parse(&held) {
            Some((content, calls)) => (content, crate::tools::tool_calls_json(&self.id, 0, &calls)),
            None => (held, Vec::new()),
        };
        if !content.is_empty() || calls.is_empty() {
            self.stream_text(&content, out);
            self.close(out);
        }
        for (i, call) in calls.iter().enumerate() {
            let index = self.done.len();
            let item = function_call_item(&self.id, i, call, "completed");
            let mut added = item.clone();
            added["arguments"] = "".into();
            added["status"] = "in_progress".into();
            out.push(self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": added}),
            ));
            let ids = json!({"item_id": item["id"], "output_index": index});
            let mut delta = ids.clone();
            delta["delta"] = item["arguments"].clone();
            out.push(self.event("response.function_call_arguments.delta", delta));
            let mut done = ids;
            done["arguments"] = item["arguments"].clone();
            done["name"] = item["name"].clone();
            out.push(self.event("response.function_call_arguments.done", done));
            out.push(self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item.clone()}),
            ));
            self.done.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reasoning::ReasoningParser;

    fn chat_of(body: Value) -> Result<Value, RouterError> {
        let (chat, _) = chat_body_of(body.to_string().as_bytes(), "m")?;
        Ok(serde_json::from_slice(&chat).unwrap())
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
    fn what_needs_storage_or_is_not_served_is_refused_by_name() {
        for (body, param) in [
            (
                json!({"input": "x", "previous_response_id": "resp-1"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "conversation": "c"}), "conversation"),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "include": ["message.output_text.logprobs"]}),
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
        ] {
            match chat_of(body.clone()) {
                Err(RouterError::Invalid { param: Some(p), .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        // Defaults clients send pass.
        chat_of(
            json!({"input": "x", "previous_response_id": null, "include": [],
                       "reasoning": {"effort": null}, "truncation": "disabled",
                       "background": false, "store": false}),
        )
        .unwrap();
    }

    fn kinds(events: &[ResponseEvent]) -> Vec<&'static str> {
        events.iter().map(|(k, _)| *k).collect()
    }

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 5,
            completion_tokens: 3,
            total_tokens: 8,
        }
    }

    /// The streamed events: numbered in order, items opened and closed around their deltas,
    /// the last event holding what the deltas built (as the whole answer's items).
    #[test]
    fn a_stream_opens_each_item_before_its_deltas_and_ends_with_the_whole_response() {
        let split = ReasoningParser::Qwen3.for_request("", None, true);
        let mut events = ResponseEvents::new(
            "r".into(),
            1,
            ResponseShape::default(),
            None,
            split.map(ReasoningStream::new),
        );
        let mut all = events.start();
        for piece in ["<think>ab", "c</think>", "Hel", "lo"] {
            all.extend(events.next(piece, None));
        }
        all.extend(events.next("!", Some(("stop", &usage()))));
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
        assert_eq!(last["output"][0]["content"][0]["text"], "abc");
        assert_eq!(last["output"][1]["content"][0]["text"], "Hello!");
        assert_eq!(last["output"][1]["id"], all[9].1["item_id"]);
        assert_eq!(last["usage"]["total_tokens"], 8);
        let whole = output_items(
            "r",
            &ChatMessageOut {
                role: "assistant",
                content: Some("Hello!".into()),
                reasoning_content: Some("abc".into()),
                tool_calls: None,
            },
        );
        assert_eq!(last["output"], Value::Array(whole), "streamed = whole");
    }

    #[test]
    fn an_answer_cut_by_its_budget_is_incomplete() {
        let mut events = ResponseEvents::new("r".into(), 1, ResponseShape::default(), None, None);
        let all = events.next("abc", Some(("length", &usage())));
        let (kind, last) = all.last().unwrap();
        assert_eq!(*kind, "response.incomplete");
        assert_eq!(last["response"]["status"], "incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }
}
