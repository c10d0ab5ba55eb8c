//! What the OpenAI API's handlers share: the served model (name, tokenizer, chat template,
//! tool-call syntax), where requests go, and the keys.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use moe_model::chat_template::ChatTemplate;

use crate::reasoning::ReasoningParser;
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelConfig;

use super::{unix_now, Generator};
use crate::tool_calls::ToolCallFormat;
use moe_cluster::api_keys::ApiKeys;

/// The model the API serves.
pub struct ServedModel<'a> {
    pub tokenizer: Arc<Tokenizer>,
    pub config: &'a ModelConfig,
    /// `/v1/models`' id, which requests' `model` must name.
    pub name: String,
    /// `--chat-template FILE`.
    pub chat_template: Option<&'a Path>,
    /// `--reasoning-parser`: chat answers' reasoning sent apart from their content.
    pub reasoning_parser: Option<ReasoningParser>,
    /// `--tool-call-parser`: the tool-call syntax, when not the one the model and its
    /// template imply.
    pub tool_call_parser: Option<ToolCallFormat>,
    /// `max_tokens` of a chat request that gives none (the generation config's
    /// `max_new_tokens`); None: the rest of the context.
    pub default_max_tokens: Option<u32>,
    /// vLLM's `--enable-prompt-tokens-details`: usage shows the prompt tokens served from the
    /// prefix cache (`prompt_tokens_details.cached_tokens`).
    pub prompt_tokens_details: bool,
}

impl ServedModel<'_> {
    /// The name served: `--served-model-name`, else the checkpoint directory's name.
    pub fn name_for(flag: Option<&str>, model_dir: &Path) -> String {
        flag.map(str::to_string).unwrap_or_else(|| {
            model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("reading --chat-template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the chat template: {0}")]
    Compile(#[from] moe_model::ModelError),
}

/// `max_tokens` of a chat or Responses request that gives none (None: the rest of the
/// context). A router's stays as its generation config set it; a gateway's follows what its
/// routers publish, so that a chat sized here is sized as the router would size it.
#[derive(Debug, Clone)]
pub struct DefaultMaxTokens(Arc<AtomicU64>);

impl DefaultMaxTokens {
    /// Stored for None: no `u32` reaches it.
    const NONE: u64 = u64::MAX;

    pub fn new(tokens: Option<u32>) -> Self {
        Self(Arc::new(AtomicU64::new(
            tokens.map_or(Self::NONE, u64::from),
        )))
    }

    pub fn get(&self) -> Option<u32> {
        u32::try_from(self.0.load(Ordering::Relaxed)).ok()
    }

    pub fn set(&self, tokens: Option<u32>) {
        self.0
            .store(tokens.map_or(Self::NONE, u64::from), Ordering::Relaxed);
    }
}

/// The context a request may use, prompt and answer together (`--max-model-len`). A router's
/// stays as it started; a gateway's follows its routers', so that a request it sizes (a chat
/// without `max_tokens`) fits whichever router serves it.
#[derive(Debug, Clone)]
pub struct ContextLimit(Arc<AtomicUsize>);

impl ContextLimit {
    pub fn new(tokens: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(tokens)))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, tokens: usize) {
        self.0.store(tokens, Ordering::Relaxed);
    }
}

pub struct HttpState {
    /// Where parsed requests go: this router's admission, or a gateway's routers.
    pub generator: Arc<dyn Generator>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    /// How this model family writes tool calls.
    pub tool_format: ToolCallFormat,
    /// How chat answers' reasoning is read, if at all.
    pub reasoning_parser: Option<ReasoningParser>,
    pub model_name: String,
    pub max_model_len: ContextLimit,
    /// See [`ServedModel::default_max_tokens`].
    pub default_max_tokens: DefaultMaxTokens,
    /// See [`ServedModel::prompt_tokens_details`].
    pub prompt_tokens_details: bool,
    /// Unix time the server started (the model card's `created`).
    pub created: u64,
    pub api_keys: ApiKeys,
    /// Numbers the response ids.
    pub next_id: AtomicU64,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`
    /// (`--responses-store-bytes`; none when 0).
    pub responses: Option<crate::response_store::ResponseStore>,
}

impl HttpState {
    /// The state for `model`, its chat template read from `model.chat_template` when given
    /// (it replaces the checkpoint's, as vLLM's `--chat-template` does).
    pub fn new(
        model: ServedModel<'_>,
        generator: Arc<dyn Generator>,
        api_keys: ApiKeys,
    ) -> Result<Self, ChatTemplateError> {
        let tokenizer = model.tokenizer;
        let own_template =
            match model.chat_template {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|source| {
                    ChatTemplateError::Read {
                        path: path.to_path_buf(),
                        source,
                    }
                })?),
                None => None,
            };
        let template_source = own_template.as_deref().or(tokenizer.chat_template());
        let tool_format = model.tool_call_parser.unwrap_or_else(|| {
            ToolCallFormat::for_model_and_template(
                model.config.family.model_type(),
                template_source,
            )
        });
        let chat_template = match template_source {
            Some(source) => Some(ChatTemplate::new(
                source,
                tokenizer.bos_token().as_deref(),
                tokenizer.eos_token().as_deref(),
            )?),
            None => None,
        };
        Ok(Self {
            generator,
            chat_template,
            tool_format,
            reasoning_parser: model.reasoning_parser,
            model_name: model.name,
            max_model_len: ContextLimit::new(model.config.max_position_embeddings),
            default_max_tokens: DefaultMaxTokens::new(model.default_max_tokens),
            prompt_tokens_details: model.prompt_tokens_details,
            created: unix_now(),
            api_keys,
            next_id: Default::default(),
            responses: None,
            tokenizer,
        })
    }

    /// Keeps up to `capacity_bytes` of responses (`--responses-store-bytes`); 0 keeps none.
    pub fn storing_responses(mut self, capacity_bytes: usize) -> Self {
        self.responses =
            (capacity_bytes > 0).then(|| crate::response_store::ResponseStore::new(capacity_bytes));
        self
    }

    /// A Responses API id: random, since holding one is what reading, continuing or deleting
    /// a stored response takes.
    pub(super) fn response_id(&self) -> String {
        use moe_cluster::auth::{hex, random_bytes};
        format!("resp_{}", hex(&random_bytes::<16>()))
    }

    pub(super) fn request_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }
}
