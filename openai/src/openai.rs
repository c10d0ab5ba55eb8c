//! The OpenAI API's request and response shapes (the subset this server implements). Fields
//! not read here land in `extra`: those that would change the output are refused
//! (`unimplemented.rs`), the rest are ignored, as OpenAI-compatible servers do.

use crate::prompt_logprobs::PositionLogprobs;
use serde::{Deserialize, Serialize};

/// `prompt`: a string, token ids, or a one-element list of either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    /// Legacy completions: this many alternatives per token (0 = only the chosen token's).
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
    /// Extension (as in vLLM): keep generating after the end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: bool,
    pub top_k: Option<i64>,
    pub stream_options: Option<StreamOptions>,
    /// Token ids (as strings, OpenAI's JSON keys) to biases.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's extension.
    pub repetition_penalty: Option<f32>,
    /// vLLM's extension.
    pub min_tokens: Option<u32>,
    /// vLLM's extension: ids that end the answer (kept in it).
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's extension.
    pub min_p: Option<f32>,
    /// vLLM's extension: only these ids are drawn.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's extension: keep the prompt's last k tokens (-1: as many as the model holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's extension: words never generated.
    pub bad_words: Option<Vec<String>>,
    /// vLLM's extension: the stop string (or end token's text) that ended the answer stays.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's extension: false writes special tokens' text.
    pub skip_special_tokens: Option<bool>,
    /// vLLM's extension: logprobs name tokens `token_id:N` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's extension: the prompt's tokens scored, with this many alternatives each.
    pub prompt_logprobs: Option<i64>,
    /// vLLM's extension: the waiting queue's order under `--scheduling-policy priority`.
    pub priority: Option<i64>,
    /// vLLM's extension: prefix-cache hits only among requests with the same salt.
    pub cache_salt: Option<String>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": ...}`.
    pub structured_outputs: Option<serde_json::Value>,
    /// Every other field of the body.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `stream_options`: `include_usage` asks for a last chunk with the usage (and no choices).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// vLLM's: every chunk carries the usage so far (its choice's tokens).
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// A chat message's `content`: a string or a list of parts (only text parts are supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant's earlier calls.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    /// An assistant's earlier reasoning, as vLLM answers it (`reasoning` in newer vLLM).
    pub reasoning_content: Option<String>,
    pub reasoning: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub top_k: Option<i64>,
    pub stream_options: Option<StreamOptions>,
    /// Token ids (as strings, OpenAI's JSON keys) to biases.
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// vLLM's extension.
    pub repetition_penalty: Option<f32>,
    /// vLLM's extension.
    pub min_tokens: Option<u32>,
    /// vLLM's extension: ids that end the answer (kept in it).
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's extension.
    pub min_p: Option<f32>,
    /// vLLM's extension: only these ids are drawn.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's extension: keep the prompt's last k tokens (-1: as many as the model holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's extension: words never generated.
    pub bad_words: Option<Vec<String>>,
    /// vLLM's extension: the stop string (or end token's text) that ended the answer stays.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM's extension: false writes special tokens' text.
    pub skip_special_tokens: Option<bool>,
    /// vLLM's extension: logprobs name tokens `token_id:N` instead of by their text.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM's extension: the rendered prompt's tokens scored, with this many alternatives each.
    pub prompt_logprobs: Option<i64>,
    /// vLLM's extension: the waiting queue's order under `--scheduling-policy priority`.
    pub priority: Option<i64>,
    /// vLLM's extension: prefix-cache hits only among requests with the same salt.
    pub cache_salt: Option<String>,
    /// OpenAI's `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": ...}`.
    pub structured_outputs: Option<serde_json::Value>,
    pub tools: Option<Vec<super::tools::ToolIn>>,
    pub tool_choice: Option<serde_json::Value>,
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's: more variables for the chat template (Qwen3's `enable_thinking`, DeepSeek-V3.1's
    /// `thinking`).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// vLLM's: open the assistant's turn after the messages (the default).
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: end the prompt inside the last message, for the model to go on writing it.
    pub continue_final_message: Option<bool>,
    /// vLLM's: documents for templates that cite them.
    pub documents: Option<serde_json::Value>,
    /// vLLM's: with a reasoning parser, whether the reasoning is sent (default true).
    pub include_reasoning: Option<bool>,
    /// Every other field of the body.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    /// OpenAI's, shown under vLLM's `--enable-prompt-tokens-details`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// Legacy completions logprobs. With `echo`, the prompt's first token has none (`null`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    /// vLLM's, when the request asked for `prompt_logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// With `--reasoning-parser`: the answer's reasoning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's, when the request asked for `prompt_logprobs`: the rendered prompt's scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PositionLogprobs>>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}
