//! `moe-openai`: the OpenAI-compatible HTTP API (`--http-listen`) that routers and gateways
//! both serve: `GET /v1/models` (and `/v1/models/{model}`), `POST /v1/completions`,
//! `POST /v1/chat/completions` (both streamed as server-sent events ending in `data: [DONE]`,
//! or whole), vLLM's `POST /tokenize`, `POST /detokenize` and `GET /version`, and
//! `GET /health` (and vLLM's `/ping`):
//! parsing, chat templates, tool calls, structured-output parameters, the rendering of
//! answers. A parsed request goes to a [`Generator`]: a router's admission (the same as its
//! gRPC API's, so the same request gives the same tokens on both), or a gateway's relay.
//! Also here, because both sides need them: the request error ([`error::RouterError`]) and the
//! tokenizer's bounded pool ([`tokenizing`]).

mod answers;
mod api_error;
pub mod error;
pub mod function_calls;
pub mod generator;
pub mod glm_tool_calls;
pub mod kimi_tool_calls;
pub mod listener;
pub mod openai;
pub mod partial_json;
pub mod prompt_bytes;
pub mod prompt_logprobs;
pub mod python_literal;
pub mod reasoning;
pub mod response_store;
pub mod responses;
pub mod serving_flags;
pub mod sibling;
mod state;
mod structured_params;
pub mod tagged_call_grammar;
pub mod tokenization;
pub mod tokenizing;
pub mod tool_calls;
pub mod tools;
pub mod trace_origin;
mod unimplemented;
pub mod xml_tool_calls;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moe_model::chat_template::{ChatTemplate, RenderOptions, RESERVED_VARIABLES};
use moe_model::tokenizer::Tokenizer;
use moe_proto::v1::GenerateRequest;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::RouterError;
use crate::generator::Answers;
use crate::response_store::ResponseStore;
use crate::responses::ResponseShape;
use crate::sibling::SiblingPrefill;
use crate::tool_calls::ToolCallFormat;
use crate::trace_origin::TraceOrigin;
pub use api_error::ApiError;
pub use generator::Generator;
use openai::{ChatRequest, CompletionRequest, Content, ModelCard, ModelList, Prompt};
pub use state::{ContextLimit, DefaultMaxTokens, HttpState, ServedModel};
use tools::TemplateMessage;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn app(state: Arc<HttpState>) -> Router {
    // Every route but `/health` (for load balancers) needs the key when keys are on;
    // `--metrics-listen` serves `/metrics` without one, for a private network.
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*model}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(responses_create))
        .route(
            "/v1/responses/{id}",
            get(responses_retrieve).delete(responses_delete),
        )
        .route("/v1/responses/{id}/input_items", get(responses_input_items))
        .route("/invocations", post(invocations))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_key,
        ));
    // `/ping` is vLLM's (SageMaker's) name for the same check.
    api.route("/health", get(health))
        .route("/ping", get(health).post(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// 401 in OpenAI's shape unless the request carries a valid key (when keys are on).
async fn require_key(
    State(state): State<Arc<HttpState>>,
    request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if state.api_keys.allows(header) {
        return next.run(request).await;
    }
    ApiError::from(RouterError::Unauthenticated(
        "a valid API key is required: `Authorization: Bearer <key>`",
    ))
    .into_response()
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouterError> {
    serde_json::from_slice(body)
        .map_err(|e| RouterError::unnamed(format!("invalid JSON body: {e}")))
}

async fn not_found() -> ApiError {
    RouterError::RouteNotFound.into()
}

/// Only `/metrics`, for `--metrics-listen`: `render` writes the page at each scrape.
pub fn metrics_app(render: impl Fn() -> String + Clone + Send + Sync + 'static) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let body = render();
            async move { prometheus_text(body) }
        }),
    )
}

fn prometheus_text(body: String) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    prometheus_text(state.generator.metrics())
}

async fn health(State(state): State<Arc<HttpState>>) -> Response {
    if state.generator.ready() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no expert placement is ready yet",
        )
            .into_response()
    }
}

fn model_card(state: &HttpState) -> ModelCard {
    ModelCard {
        id: state.model_name.clone(),
        object: "model",
        created: state.created,
        owned_by: "moe-cluster",
        max_model_len: state.max_model_len.get(),
    }
}

async fn models(State(state): State<Arc<HttpState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![model_card(&state)],
    })
}

/// OpenAI's model retrieval (`client.models.retrieve`): the served model's card, or 404.
async fn model(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    check_model(&state.model_name, &Some(name))?;
    Ok(Json(model_card(&state)))
}

/// vLLM's `GET /version`.
async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn tokenize(
    State(state): State<Arc<HttpState>>,
    body: Bytes,
) -> Result<Json<tokenization::TokenizeResponse>, ApiError> {
    let model = state.model_name.clone();
    let has_template = state.chat_template.is_some();
    let tokenizing = state.generator.tokenizing();
    let request = tokenizing
        .parse(body.len(), move || {
            tokenization::parse_tokenize(&body, &model, has_template)
        })
        .await??;
    // Before the text reaches the template and the tokenizer, as for generation.
    let (bytes, field) = request.text_bytes();
    state.generator.check_prompt_bytes(bytes, field)?;
    let render_state = Arc::clone(&state);
    let response = tokenizing
        .tokenize(move |tokenizer| {
            request.tokenize(
                tokenizer,
                render_state.chat_template.as_ref(),
                render_state.tool_format,
                render_state.max_model_len.get(),
            )
        })
        .await??;
    Ok(Json(response))
}

async fn detokenize(
    State(state): State<Arc<HttpState>>,
    body: Bytes,
) -> Result<Json<tokenization::DetokenizeResponse>, ApiError> {
    let (model, vocab, max_model_len) = (
        state.model_name.clone(),
        state.tokenizer.vocab_size(),
        state.max_model_len.get(),
    );
    let tokenizing = state.generator.tokenizing();
    let request = tokenizing
        .parse(body.len(), move || {
            tokenization::parse_detokenize(&body, &model, vocab, max_model_len)
        })
        .await??;
    let response = tokenizing
        .tokenize(move |tokenizer| request.detokenize(tokenizer))
        .await??;
    Ok(Json(response))
}

fn check_model(served_model: &str, model: &Option<String>) -> Result<(), RouterError> {
    match model {
        Some(m) if !m.is_empty() && m != served_model => Err(RouterError::ModelNotFound {
            requested: m.clone(),
            served: served_model.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u32 = 16;

fn choices(n: Option<u32>) -> Result<u32, RouterError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n),
        n => Err(RouterError::invalid(
            "n",
            format!("n must be 1 to {MAX_CHOICES}, got {n}"),
        )),
    }
}

fn seed(seed: Option<i64>) -> Result<Option<u64>, RouterError> {
    seed.map(|s| u64::try_from(s).map_err(|_| RouterError::invalid("seed", "seed must be >= 0")))
        .transpose()
}

/// OpenAI's `logit_bias` keys are token ids written as strings.
fn logit_bias(
    bias: Option<std::collections::HashMap<String, f32>>,
) -> Result<std::collections::HashMap<u32, f32>, RouterError> {
    bias.unwrap_or_default()
        .into_iter()
        .map(|(id, b)| {
            id.trim().parse::<u32>().map(|id| (id, b)).map_err(|_| {
                RouterError::invalid("logit_bias", format!("`{id}` is not a token id"))
            })
        })
        .collect()
}

/// vLLM's `priority`, as the request's 32-bit one (the router refuses it unless its
/// scheduling policy is `priority`).
fn priority(p: Option<i64>) -> Result<i32, RouterError> {
    i32::try_from(p.unwrap_or(0))
        .map_err(|_| RouterError::invalid("priority", "priority must fit in 32 bits"))
}

/// vLLM's `cache_salt`: a string when given, and not an empty one (its length is the
/// router's to bound).
fn cache_salt(salt: Option<String>) -> Result<String, RouterError> {
    match salt {
        Some(s) if s.is_empty() => Err(RouterError::invalid(
            "cache_salt",
            "cache_salt must be a non-empty string if provided",
        )),
        salt => Ok(salt.unwrap_or_default()),
    }
}

/// vLLM's `top_k`: -1 or 0 is off (kept as 0, so that a router's `--generation-config` default
/// does not replace a request's explicit "off").
fn top_k(k: Option<i64>) -> Option<u32> {
    k.map(|k| k.clamp(0, u32::MAX as i64) as u32)
}

/// A request body turned into the generic request, before admission.
#[derive(Debug)]
pub struct Parsed {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub logprobs: bool,
    /// A stream ends with a chunk holding the usage (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Every streamed chunk carries the usage so far (vLLM's
    /// `stream_options.continuous_usage_stats`).
    pub continuous_usage: bool,
    /// Choices to generate (`n`).
    pub n: u32,
    /// Completions with `echo`: the prompt's text when it came as text (`None` inside: decode
    /// the prompt's ids).
    pub echo: Option<Option<String>>,
    /// Chat with tools: answers are read for tool calls.
    pub tools: Option<tools::ToolAnswers>,
    /// Chat with a reasoning parser: how answers' reasoning is split off.
    pub reasoning: Option<reasoning::ReasoningSplit>,
    /// A batched completion's prompts after the first (`prompt` as a list, as vLLM takes it):
    /// each is answered as its own request with the same settings, its `n` choices numbered
    /// after the previous prompt's ([`Parsed::into_prompts`]).
    pub more_prompts: Vec<CompletionPrompt>,
    /// vLLM's `return_tokens_as_token_ids`: logprobs name tokens `token_id:N`.
    pub tokens_as_ids: bool,
    /// vLLM's `prompt_logprobs`: the prompt's scores with this many alternatives a token, in
    /// the answer ([`prompt_logprobs`]).
    pub prompt_logprobs: Option<u32>,
    /// Alternatives shown a token in the logprobs (`logprobs` on completions, `top_logprobs`
    /// on chat): an echoed prompt's are cut to it when `prompt_logprobs` asked for more.
    pub top_logprobs: u32,
}

/// One prompt of a batched completion.
#[derive(Debug, Clone)]
pub struct CompletionPrompt {
    pub prompt: Option<String>,
    pub input_ids: Vec<u32>,
    /// As [`Parsed::echo`], for this prompt.
    pub echo: Option<Option<String>>,
}

/// Most prompts one completion request may batch, and most choices over all of them.
pub const MAX_BATCH_PROMPTS: usize = 64;
pub const MAX_BATCH_CHOICES: usize = 128;

impl Parsed {
    /// One request per prompt of a batched completion (this one alone otherwise), each
    /// with its own prompt and echo and the rest of this one's settings.
    pub fn into_prompts(mut self) -> Vec<Parsed> {
        let more = std::mem::take(&mut self.more_prompts);
        let mut out = Vec::with_capacity(1 + more.len());
        for p in more {
            let generate = GenerateRequest {
                prompt: p.prompt,
                input_ids: p.input_ids,
                ..self.generate.clone()
            };
            out.push(Parsed {
                generate,
                stream: self.stream,
                logprobs: self.logprobs,
                include_usage: self.include_usage,
                continuous_usage: self.continuous_usage,
                n: self.n,
                echo: p.echo,
                tools: self.tools.clone(),
                reasoning: self.reasoning,
                more_prompts: Vec::new(),
                tokens_as_ids: self.tokens_as_ids,
                prompt_logprobs: self.prompt_logprobs,
                top_logprobs: self.top_logprobs,
            });
        }
        out.insert(0, self);
        out
    }
}

/// Submits the `n` choices of `parsed`: choice i is the request with seed `seed + i` (as vLLM
/// seeds its choices, so choice 0 is what `n = 1` gives), its prompt tokenized once and, with
/// prefix caching, prefilled once (the others wait for choice 0's prefill and copy it). A
/// choice that cannot be admitted fails the request; those already admitted are cancelled
/// with it.
async fn submit_choices(
    state: &HttpState,
    mut parsed: Parsed,
    origin: TraceOrigin,
) -> Result<(Vec<Answers>, Parsed), RouterError> {
    let n = parsed.n;
    if n == 1 {
        let request = std::mem::take(&mut parsed.generate);
        let answers = state.generator.submit(request, origin, None).await?;
        return Ok((vec![answers], parsed));
    }
    if let Some(text) = parsed.generate.prompt.take() {
        parsed.generate.input_ids = state
            .generator
            .tokenizing()
            .tokenize(move |t| t.encode_prompt(&text))
            .await?
            .map_err(|e| RouterError::invalid("prompt", e.to_string()))?;
    }
    let mut answers = Vec::with_capacity(n as usize);
    let (leader, followers) = SiblingPrefill::group(n as usize - 1);
    for (i, sibling) in std::iter::once(leader).chain(followers).enumerate() {
        let mut request = parsed.generate.clone();
        request.seed = request.seed.map(|s| s.wrapping_add(i as u64));
        let choice = state
            .generator
            .submit(request, origin.clone(), Some(sibling));
        answers.push(choice.await?);
    }
    Ok((answers, parsed))
}

/// `stream_options` is for streams only (as OpenAI and vLLM answer otherwise).
fn include_usage(
    stream: bool,
    options: &Option<openai::StreamOptions>,
) -> Result<bool, RouterError> {
    match options {
        Some(_) if !stream => Err(RouterError::invalid(
            "stream_options",
            "stream_options is only allowed with stream = true",
        )),
        Some(o) => Ok(o.include_usage),
        None => Ok(false),
    }
}

/// vLLM's `stream_options.continuous_usage_stats` (streams only: checked with `include_usage`).
fn continuous_usage(options: &Option<openai::StreamOptions>) -> bool {
    options.as_ref().is_some_and(|o| o.continuous_usage_stats)
}

/// Parses and checks a `/v1/completions` body (everything but admission): pure, so it can be
/// fuzzed.
pub fn parse_completion(body: &[u8], served_model: &str) -> Result<Parsed, RouterError> {
    let req: CompletionRequest = parse(body)?;
    check_model(served_model, &req.model)?;
    let n = choices(req.n)?;
    unimplemented::refuse_unimplemented(&req.extra)?;
    let include_usage = include_usage(req.stream, &req.stream_options)?;
    let prompt_logprobs = prompt_logprobs::requested(req.prompt_logprobs, req.stream)?;
    let mut prompts = completion_prompts(req.prompt, req.echo, n)?.into_iter();
    let Some(CompletionPrompt {
        prompt,
        input_ids,
        echo,
    }) = prompts.next()
    else {
        return Err(RouterError::invalid("prompt", "prompt must not be empty"));
    };
    Ok(Parsed {
        generate: GenerateRequest {
            prompt,
            input_ids,
            max_new_tokens: req.max_tokens.unwrap_or(16),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: top_k(req.top_k),
            seed: seed(req.seed)?,
            stop: req.stop.map(openai::Stop::into_vec).unwrap_or_default(),
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs.is_some(),
            top_logprobs: req.logprobs.filter(|&k| k > 0),
            // With echo the prompt is scored too (its logprobs shown when `logprobs` is set),
            // and max_tokens may be 0; scored once for both when `prompt_logprobs` asks too.
            prompt_logprobs: req
                .echo
                .then(|| req.logprobs.unwrap_or(0))
                .max(prompt_logprobs),
            structured_output: structured_params::structured_output(
                req.response_format.as_ref(),
                req.structured_outputs.as_ref(),
                &req.extra,
            )?,
            logit_bias: logit_bias(req.logit_bias)?,
            resume: None,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            repetition_penalty: req.repetition_penalty,
            min_tokens: req.min_tokens.unwrap_or(0),
            stop_token_ids: req.stop_token_ids.unwrap_or_default(),
            min_p: req.min_p,
            allowed_token_ids: req.allowed_token_ids.unwrap_or_default(),
            bad_words: req.bad_words.unwrap_or_default(),
            truncate_prompt_tokens: truncate_prompt_tokens(req.truncate_prompt_tokens)?,
            structured_output_after: String::new(),
            include_stop_str_in_output: req.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: req.skip_special_tokens,
            priority: priority(req.priority)?,
            cache_salt: cache_salt(req.cache_salt)?,
        },
        stream: req.stream,
        logprobs: req.logprobs.is_some(),
        include_usage,
        continuous_usage: continuous_usage(&req.stream_options),
        n,
        echo,
        tools: None,
        reasoning: None,
        more_prompts: prompts.collect(),
        tokens_as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        prompt_logprobs,
        top_logprobs: req.logprobs.unwrap_or(0),
    })
}

/// A completion's prompts: one (a string or a list of ids), or a batch (a list of strings or
/// of id lists), at most [`MAX_BATCH_PROMPTS`], with `n` choices each, at most
/// [`MAX_BATCH_CHOICES`] in all. Echo gives back each prompt's text as given, or its ids
/// decoded.
fn completion_prompts(
    prompt: Prompt,
    echo: bool,
    n: u32,
) -> Result<Vec<CompletionPrompt>, RouterError> {
    let text = |t: String| CompletionPrompt {
        echo: echo.then(|| Some(t.clone())),
        prompt: Some(t),
        input_ids: Vec::new(),
    };
    let ids = |ids: Vec<u32>| CompletionPrompt {
        echo: echo.then_some(None),
        prompt: None,
        input_ids: ids,
    };
    let prompts: Vec<CompletionPrompt> = match prompt {
        Prompt::Text(t) => vec![text(t)],
        Prompt::Ids(v) => vec![ids(v)],
        Prompt::Texts(v) => v.into_iter().map(text).collect(),
        Prompt::IdLists(v) => v.into_iter().map(ids).collect(),
    };
    if prompts.is_empty() {
        return Err(RouterError::invalid(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    if prompts.len() > MAX_BATCH_PROMPTS {
        return Err(RouterError::invalid(
            "prompt",
            format!(
                "at most {MAX_BATCH_PROMPTS} prompts in one request, got {}",
                prompts.len()
            ),
        ));
    }
    if prompts.len() * n as usize > MAX_BATCH_CHOICES {
        return Err(RouterError::invalid(
            "n",
            format!(
                "at most {MAX_BATCH_CHOICES} choices in one request ({} prompts, n = {n})",
                prompts.len()
            ),
        ));
    }
    Ok(prompts)
}

async fn completions(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let model = state.model_name.clone();
    let tokenizing = state.generator.tokenizing();
    let parsed = tokenizing
        .parse(body.len(), move || parse_completion(&body, &model))
        .await??;
    let prompts = parsed.into_prompts();
    // Before the prompts reach the tokenizer (in admission, on the blocking pool).
    for p in &prompts {
        if let Some(prompt) = &p.generate.prompt {
            state.generator.check_prompt_bytes(prompt.len(), "prompt")?;
        }
    }
    let origin = TraceOrigin::from_http(&headers, "text_completion");
    // Each prompt's choices, admitted in order; one that fails drops (and so cancels) those
    // admitted before it.
    let mut submitted = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        submitted.push(submit_choices(&state, prompt, origin.clone()).await?);
    }
    let id = state.request_id("cmpl");
    if submitted.first().is_some_and(|(_, p)| p.stream) {
        Ok(answers::stream_completion(state, submitted, id).into_response())
    } else {
        Ok(Json(answers::whole_completion(&state, submitted, id).await?).into_response())
    }
}

/// Parses and checks a `/v1/chat/completions` body and renders its messages (everything but
/// admission): pure, so it can be fuzzed. The server runs its two parts apart:
/// [`parse_chat_body`], the byte limit on [`ChatBody::text_bytes`], then [`render_chat`] (the
/// template and the tokenizer) on the blocking pool.
pub fn parse_chat(
    body: &[u8],
    served_model: &str,
    template: Option<&ChatTemplate>,
    tokenizer: &Tokenizer,
    max_model_len: usize,
) -> Result<Parsed, RouterError> {
    let chat = parse_chat_body(body, served_model, template.is_some())?;
    render_chat(
        chat,
        template,
        tokenizer,
        max_model_len,
        None,
        ToolCallFormat::Hermes,
        None,
    )
}

/// A chat body parsed and checked, its messages not yet rendered.
#[derive(Debug)]
pub struct ChatBody {
    /// The request, its `messages` moved to `messages`.
    req: ChatRequest,
    messages: Vec<TemplateMessage>,
}

impl ChatBody {
    /// Bytes of the messages' roles and contents together (what `--max-prompt-bytes` bounds
    /// before the template renders them).
    pub fn text_bytes(&self) -> usize {
        self.messages
            .iter()
            .map(|m| {
                let calls = m
                    .tool_calls
                    .as_ref()
                    .map_or(0, |c| c.iter().map(|v| v.to_string().len()).sum::<usize>());
                let reasoning = m.reasoning_content.as_ref().map_or(0, String::len);
                m.role.len() + m.content.len() + calls + 2 * reasoning
            })
            .sum::<usize>()
            + json_bytes(&self.req.tools)
            + json_bytes(&self.req.chat_template_kwargs)
            + json_bytes(&self.req.documents)
    }
}

impl ChatBody {
    /// The prompt text the template makes of this conversation (`tools`: as the template sees
    /// them).
    pub fn prompt(
        &self,
        template: &ChatTemplate,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, RouterError> {
        let req = &self.req;
        render_prompt(
            template,
            &self.messages,
            &RenderOptions {
                tools,
                documents: req.documents.as_ref(),
                add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
                continue_final_message: req.continue_final_message.unwrap_or(false),
                variables: req.chat_template_kwargs.as_ref(),
            },
        )
    }

    /// [`Self::prompt`] with the tools as the request's plan shows them to the template
    /// (what the server renders).
    pub fn prompt_with_request_tools(
        &self,
        template: &ChatTemplate,
    ) -> Result<String, RouterError> {
        let plan = self.tool_plan(ToolCallFormat::Hermes)?;
        self.prompt(template, plan.template_tools.as_ref())
    }

    /// How the request's tools are shown to the template and its answers read, in `format`.
    fn tool_plan(&self, format: ToolCallFormat) -> Result<tools::ToolPlan, RouterError> {
        tools::plan(
            self.req.tools.as_deref(),
            self.req.tool_choice.as_ref(),
            self.req.parallel_tool_calls,
            format,
        )
    }
}

/// vLLM's `truncate_prompt_tokens`: -1 (the model's context), 0 or absent (off), or a count.
fn truncate_prompt_tokens(value: Option<i64>) -> Result<Option<u32>, RouterError> {
    match value {
        None | Some(0) => Ok(None),
        Some(-1) => Ok(Some(u32::MAX)),
        Some(k) if k > 0 => Ok(Some(k.min(u32::MAX as i64 - 1) as u32)),
        Some(k) => Err(RouterError::invalid(
            "truncate_prompt_tokens",
            format!("truncate_prompt_tokens must be -1, 0 or more, got {k}"),
        )),
    }
}

fn json_bytes<T: serde::Serialize>(value: &Option<T>) -> usize {
    value
        .as_ref()
        .map_or(0, |v| serde_json::to_string(v).map_or(0, |s| s.len()))
}

/// Checks vLLM's template fields before anything renders.
fn template_fields(req: &ChatRequest) -> Result<(), RouterError> {
    if req.continue_final_message == Some(true) && req.add_generation_prompt != Some(false) {
        return Err(RouterError::invalid(
            "continue_final_message",
            "continue_final_message needs add_generation_prompt = false",
        ));
    }
    if let Some(kwargs) = &req.chat_template_kwargs {
        if let Some(name) = RESERVED_VARIABLES.iter().find(|n| kwargs.contains_key(**n)) {
            return Err(RouterError::invalid(
                "chat_template_kwargs",
                format!("`{name}` is set by the server; it cannot be a chat_template_kwargs entry"),
            ));
        }
    }
    if let Some(documents) = &req.documents {
        let is_objects = documents
            .as_array()
            .is_some_and(|items| items.iter().all(serde_json::Value::is_object));
        if !is_objects {
            return Err(RouterError::invalid(
                "documents",
                "documents must be a list of objects",
            ));
        }
    }
    Ok(())
}

/// The prompt `template` makes of the conversation. Tool-call arguments go in parsed (as
/// transformers documents and vLLM does); a template that fails on them (DeepSeek-V3's joins
/// them to strings with `+`) gets them again as the client sent them, strings, and only if
/// that fails too is the request refused, with the first error.
pub fn render_prompt(
    template: &ChatTemplate,
    messages: &[TemplateMessage],
    options: &RenderOptions<'_>,
) -> Result<String, RouterError> {
    let as_sent = || template.render_conversation(messages, options);
    let first = match tools::with_parsed_arguments(messages) {
        Some(parsed) => template.render_conversation(&parsed, options),
        None => return as_sent().map_err(|e| RouterError::invalid("messages", e.to_string())),
    };
    first
        .or_else(|first_error| as_sent().map_err(|_| first_error))
        .map_err(|e| RouterError::invalid("messages", e.to_string()))
}

fn no_chat_template() -> RouterError {
    RouterError::invalid(
        "messages",
        "this model has no chat template: use /v1/completions",
    )
}

/// The part of [`parse_chat`] before the template: JSON, model, `n`, the messages' shape.
pub fn parse_chat_body(
    body: &[u8],
    served_model: &str,
    has_template: bool,
) -> Result<ChatBody, RouterError> {
    let mut req: ChatRequest = parse(body)?;
    check_model(served_model, &req.model)?;
    choices(req.n)?;
    unimplemented::refuse_unimplemented(&req.extra)?;
    include_usage(req.stream, &req.stream_options)?;
    if !has_template {
        return Err(no_chat_template());
    }
    if req.messages.is_empty() {
        return Err(RouterError::invalid(
            "messages",
            "messages must not be empty",
        ));
    }
    template_fields(&req)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in std::mem::take(&mut req.messages) {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                // Text parts joined by a newline, as vLLM hands them to a text template.
                let mut texts = Vec::with_capacity(parts.len());
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => texts.push(t),
                        (kind, _) => {
                            return Err(RouterError::invalid(
                                "messages",
                                format!("content parts of type `{kind}` are not supported"),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
        };
        let reasoning = m.reasoning_content.or(m.reasoning);
        messages.push(TemplateMessage {
            thinking: reasoning.clone(),
            role: m.role,
            content,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
            reasoning_content: reasoning,
        });
    }
    Ok(ChatBody { req, messages })
}

/// The part of [`parse_chat`] that renders the template and tokenizes (CPU-heavy: the server
/// runs it on the blocking pool).
///
/// A request without `max_tokens` (or `max_completion_tokens`) gets `default_max_tokens`
/// (the generation config's `max_new_tokens`), else the rest of the context.
pub fn render_chat(
    chat: ChatBody,
    template: Option<&ChatTemplate>,
    tokenizer: &Tokenizer,
    max_model_len: usize,
    default_max_tokens: Option<u32>,
    tool_format: ToolCallFormat,
    reasoning_parser: Option<reasoning::ReasoningParser>,
) -> Result<Parsed, RouterError> {
    let template = template.ok_or_else(no_chat_template)?;
    let prompt_logprobs = prompt_logprobs::requested(chat.req.prompt_logprobs, chat.req.stream)?;
    let plan = chat.tool_plan(tool_format)?;
    let rendered = chat.prompt(template, plan.template_tools.as_ref())?;
    let req = chat.req;
    let reasoning = reasoning_parser.and_then(|p| {
        p.for_request(
            &rendered,
            req.chat_template_kwargs.as_ref(),
            req.include_reasoning.unwrap_or(true),
        )
    });
    let mut structured_output = structured_params::structured_output(
        req.response_format.as_ref(),
        req.structured_outputs.as_ref(),
        &req.extra,
    )?;
    if let Some(grammar) = plan.forced {
        if structured_output.is_some() {
            return Err(RouterError::invalid(
                "tool_choice",
                "a forced tool call and a structured output cannot both constrain one answer",
            ));
        }
        structured_output = Some(moe_proto::v1::StructuredOutput {
            kind: Some(moe_proto::v1::structured_output::Kind::Grammar(grammar)),
        });
    }
    // As transformers' apply_chat_template: the template writes any special tokens itself.
    // With a reasoning parser, the grammar constrains the answer after its thinking.
    let grammar_after = match (&reasoning, &structured_output) {
        (Some(split), Some(_)) => split
            .grammar_start(&rendered)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    };
    let mut input_ids = tokenizer
        .encode_raw(&rendered)
        .map_err(|e| RouterError::invalid("messages", e.to_string()))?;
    // Truncated here too, so the default `max_tokens` counts what is kept.
    let truncate = truncate_prompt_tokens(req.truncate_prompt_tokens)?;
    if let Some(keep) = truncate.map(|k| (k as usize).min(max_model_len)) {
        let cut = input_ids.len().saturating_sub(keep);
        input_ids.drain(..cut);
    }
    if input_ids.is_empty() {
        return Err(RouterError::invalid(
            "messages",
            "the rendered conversation is empty",
        ));
    }
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or_else(|| {
            let rest = max_model_len.saturating_sub(input_ids.len()).max(1) as u32;
            default_max_tokens.map_or(rest, |d| d.min(rest))
        });
    if req.top_logprobs.is_some_and(|k| k > 0) && !req.logprobs {
        return Err(RouterError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs = true",
        ));
    }
    Ok(Parsed {
        generate: GenerateRequest {
            prompt: None,
            input_ids,
            max_new_tokens: max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: top_k(req.top_k),
            seed: seed(req.seed)?,
            stop: req.stop.map(openai::Stop::into_vec).unwrap_or_default(),
            ignore_eos: req.ignore_eos,
            logprobs: req.logprobs,
            top_logprobs: req.top_logprobs.filter(|&k| k > 0),
            prompt_logprobs,
            structured_output,
            logit_bias: logit_bias(req.logit_bias)?,
            resume: None,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            repetition_penalty: req.repetition_penalty,
            min_tokens: req.min_tokens.unwrap_or(0),
            stop_token_ids: req.stop_token_ids.unwrap_or_default(),
            min_p: req.min_p,
            allowed_token_ids: req.allowed_token_ids.unwrap_or_default(),
            bad_words: req.bad_words.unwrap_or_default(),
            truncate_prompt_tokens: truncate,
            structured_output_after: grammar_after,
            include_stop_str_in_output: req.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: req.skip_special_tokens,
            priority: priority(req.priority)?,
            cache_salt: cache_salt(req.cache_salt)?,
        },
        stream: req.stream,
        logprobs: req.logprobs,
        include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        continuous_usage: continuous_usage(&req.stream_options),
        n: choices(req.n)?,
        echo: None,
        tools: plan.answers,
        reasoning,
        more_prompts: Vec::new(),
        tokens_as_ids: req.return_tokens_as_token_ids.unwrap_or(false),
        prompt_logprobs,
        top_logprobs: req.top_logprobs.unwrap_or(0),
    })
}

async fn chat_completions(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let read = |body: &[u8], state: &HttpState| {
        let has_template = state.chat_template.is_some();
        Ok((parse_chat_body(body, &state.model_name, has_template)?, ()))
    };
    let origin = TraceOrigin::from_http(&headers, "chat");
    let (answers, parsed, ()) = admit_chat(&state, body, read, origin).await?;
    let id = state.request_id("chatcmpl");
    if parsed.stream {
        Ok(answers::stream_chat(state, answers, id, &parsed).into_response())
    } else {
        Ok(Json(answers::whole_chat(&state, answers, id, &parsed).await?).into_response())
    }
}

/// OpenAI's Responses API: the body read as the chat request it means ([`responses`]), then
/// served as one.
async fn responses_create(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let read = |body: &[u8], state: &HttpState| {
        let model = &state.model_name;
        let (chat, shape) = responses::chat_body_of(body, model, state.responses.as_ref())?;
        let has_template = state.chat_template.is_some();
        Ok((parse_chat_body(&chat, model, has_template)?, shape))
    };
    // gen_ai semantic conventions have no operation of its own for the Responses API: a chat.
    let origin = TraceOrigin::from_http(&headers, "chat");
    let (answers, parsed, shape) = admit_chat(&state, body, read, origin).await?;
    let id = state.response_id();
    if parsed.stream {
        Ok(answers::stream_response(state, answers, id, &parsed, shape).into_response())
    } else {
        let response = answers::whole_response(&state, answers, id, &parsed, &shape).await?;
        keep_response(&state, shape, &response);
        Ok(Json(response).into_response())
    }
}

/// Keeps a finished response when its request asked for it (and the server stores them).
fn keep_response(state: &HttpState, shape: ResponseShape, response: &Value) {
    if let (true, Some(store)) = (shape.store, &state.responses) {
        store.put(
            shape.previous_response_id,
            shape.input_items,
            response.clone(),
        );
    }
}

/// The store, or a 404 naming the id when the server keeps none.
fn response_store<'s>(state: &'s HttpState, id: &str) -> Result<&'s ResponseStore, ApiError> {
    state
        .responses
        .as_ref()
        .ok_or_else(|| RouterError::ResponseNotFound(id.to_string()).into())
}

/// `GET /v1/responses/{id}` (`client.responses.retrieve`): a stored response.
async fn responses_retrieve(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = response_store(&state, &id)?;
    let response = store.get(&id).ok_or(RouterError::ResponseNotFound(id))?;
    Ok(Json(response))
}

/// `DELETE /v1/responses/{id}` (`client.responses.delete`).
async fn responses_delete(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !response_store(&state, &id)?.delete(&id) {
        return Err(RouterError::ResponseNotFound(id).into());
    }
    Ok(Json(
        serde_json::json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// `GET /v1/responses/{id}/input_items` (`client.responses.input_items.list`): the items that
/// response answered (its own turn's), in order, as one page.
async fn responses_input_items(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = response_store(&state, &id)?;
    let items = store
        .input_items(&id)
        .ok_or(RouterError::ResponseNotFound(id))?;
    let id_of = |item: Option<&Value>| item.and_then(|i| i.get("id")).cloned();
    Ok(Json(serde_json::json!({
        "object": "list",
        "first_id": id_of(items.first()),
        "last_id": id_of(items.last()),
        "has_more": false,
        "data": items,
    })))
}

/// Which API a SageMaker `/invocations` body is for, told by its fields as vLLM tells them:
/// `messages` a chat, `prompt` a completion, `input` a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InvocationKind {
    Chat,
    Completion,
    Response,
}

/// Reads only which of the three fields a body has (no value is kept).
fn invocation_kind(body: &[u8]) -> Result<InvocationKind, RouterError> {
    #[derive(serde::Deserialize)]
    struct Fields {
        messages: Option<serde::de::IgnoredAny>,
        prompt: Option<serde::de::IgnoredAny>,
        input: Option<serde::de::IgnoredAny>,
    }
    let fields: Fields = parse(body)?;
    match (fields.messages, fields.prompt, fields.input) {
        (Some(_), _, _) => Ok(InvocationKind::Chat),
        (None, Some(_), _) => Ok(InvocationKind::Completion),
        (None, None, Some(_)) => Ok(InvocationKind::Response),
        (None, None, None) => Err(RouterError::unnamed(
            "cannot tell the request's API: expected a chat (`messages`), completion (`prompt`) \
             or responses (`input`) body",
        )),
    }
}

/// SageMaker's single route (vLLM's `/invocations`): the body served by the API its fields
/// name.
async fn invocations(
    state: State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let read = body.clone();
    let kind = state
        .generator
        .tokenizing()
        .parse(body.len(), move || invocation_kind(&read))
        .await??;
    match kind {
        InvocationKind::Chat => chat_completions(state, headers, body).await,
        InvocationKind::Completion => completions(state, headers, body).await,
        InvocationKind::Response => responses_create(state, headers, body).await,
    }
}

/// How a chat-shaped body is read (a chat body, or a Responses body as the chat body it
/// means): into the chat body, and what its answer needs besides.
type ChatReader<T> = fn(&[u8], &HttpState) -> Result<(ChatBody, T), RouterError>;

/// A chat-shaped request read by `read` on the tokenizer's pool, its messages bounded, then
/// rendered there and admitted.
async fn admit_chat<T: Send + 'static>(
    state: &Arc<HttpState>,
    body: Bytes,
    read: ChatReader<T>,
    origin: TraceOrigin,
) -> Result<(Vec<Answers>, Parsed, T), RouterError> {
    let tokenizing = state.generator.tokenizing();
    let read_state = Arc::clone(state);
    let (chat, extra) = tokenizing
        .parse(body.len(), move || read(&body, &read_state))
        .await??;
    // The messages are bounded before the template renders them.
    state
        .generator
        .check_prompt_bytes(chat.text_bytes(), "messages")?;
    let render_state = Arc::clone(state);
    let parsed = tokenizing
        .tokenize(move |tokenizer| {
            render_chat(
                chat,
                render_state.chat_template.as_ref(),
                tokenizer,
                render_state.max_model_len.get(),
                render_state.default_max_tokens.get(),
                render_state.tool_format,
                render_state.reasoning_parser,
            )
        })
        .await??;
    let (answers, parsed) = submit_choices(state, parsed, origin).await?;
    Ok((answers, parsed, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer() -> Tokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny");
        Tokenizer::from_dir(&dir).expect("fixture tokenizer")
    }

    #[test]
    fn an_invocation_goes_to_the_api_its_fields_name() {
        for (body, kind) in [
            (r#"{"messages": [], "prompt": "x"}"#, InvocationKind::Chat),
            (
                r#"{"prompt": [1, 2], "max_tokens": 3}"#,
                InvocationKind::Completion,
            ),
            (
                r#"{"input": "hi", "instructions": "x"}"#,
                InvocationKind::Response,
            ),
        ] {
            assert_eq!(invocation_kind(body.as_bytes()).unwrap(), kind, "{body}");
        }
        for body in [r#"{"model": "m"}"#, "not json", "[1]"] {
            assert!(invocation_kind(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn continuous_usage_stats_are_read_from_the_stream_options() {
        let body = br#"{"prompt": "x", "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}}"#;
        let parsed = parse_completion(body, "m").unwrap();
        assert!(parsed.include_usage && parsed.continuous_usage);
        let body = br#"{"prompt": "x", "stream": true, "stream_options": {"include_usage": true}}"#;
        assert!(!parse_completion(body, "m").unwrap().continuous_usage);
    }

    /// A list of prompts is a batch: one request per prompt, each with its own echo and the
    /// rest of the settings; the batch and its choices are bounded.
    #[test]
    fn a_list_of_prompts_is_a_batch_of_requests() {
        let body = br#"{"model": "m", "prompt": ["one", "two", "three"], "n": 2, "echo": true,
            "max_tokens": 5, "temperature": 0.5, "seed": 9}"#;
        let prompts = parse_completion(body, "m").unwrap().into_prompts();
        let texts: Vec<_> = prompts.iter().map(|p| p.generate.prompt.clone()).collect();
        assert_eq!(
            texts,
            [Some("one".into()), Some("two".into()), Some("three".into())]
        );
        for (p, text) in prompts.iter().zip(["one", "two", "three"]) {
            assert_eq!(p.echo, Some(Some(text.to_string())));
            assert_eq!((p.n, p.generate.max_new_tokens), (2, 5));
            assert_eq!(
                (p.generate.temperature, p.generate.seed),
                (Some(0.5), Some(9))
            );
            assert!(p.more_prompts.is_empty());
        }
        let ids = parse_completion(br#"{"prompt": [[1, 2], [3]], "echo": true}"#, "m").unwrap();
        let ids: Vec<_> = ids
            .into_prompts()
            .into_iter()
            .map(|p| (p.generate.input_ids, p.echo))
            .collect();
        assert_eq!(ids, [(vec![1, 2], Some(None)), (vec![3], Some(None))]);
        // One prompt, as a string or ids, is one request.
        assert_eq!(
            parse_completion(br#"{"prompt": [4, 5]}"#, "m")
                .unwrap()
                .into_prompts()
                .len(),
            1
        );
        let param = |body: String| match parse_completion(body.as_bytes(), "m") {
            Err(RouterError::Invalid { param, .. }) => param,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(param(r#"{"prompt": []}"#.into()), Some("prompt"));
        let many = |k: usize| serde_json::to_string(&vec!["x"; k]).unwrap();
        assert_eq!(
            param(format!(r#"{{"prompt": {}}}"#, many(65))),
            Some("prompt")
        );
        assert_eq!(
            param(format!(r#"{{"prompt": {}, "n": 3}}"#, many(64))),
            Some("n")
        );
        assert!(parse_completion(
            format!(r#"{{"prompt": {}, "n": 2}}"#, many(64)).as_bytes(),
            "m"
        )
        .is_ok());
    }

    #[test]
    fn chat_on_a_checkpoint_without_a_template_is_a_400_pointing_at_completions() {
        let tokenizer = fixture_tokenizer();
        let body = br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#;
        let Err(err) = parse_chat(body, "m", None, &tokenizer, 1024) else {
            panic!("a chat request without a template was accepted");
        };
        let err = ApiError::from(err);
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.kind, "invalid_request_error");
        assert_eq!(err.param, Some("messages"));
        assert!(err.message.contains("/v1/completions"), "{}", err.message);
        let template = ChatTemplate::new(
            tokenizer.chat_template().expect("the fixture has one"),
            None,
            None,
        )
        .unwrap();
        assert!(parse_chat(body, "m", Some(&template), &tokenizer, 1024).is_ok());
    }
}
