//! The flags that shape the OpenAI API, the same on routers and gateways (both serve it
//! through this crate): flattened into each binary's arguments.

use std::path::PathBuf;

use crate::reasoning::ReasoningParser;
use crate::tool_calls::ToolCallFormat;

#[derive(Debug, Clone, clap::Args)]
pub struct OpenAiFlags {
    /// The model name `/v1/models` lists and requests must name (default: the checkpoint
    /// directory's name).
    #[arg(long, env = "MOE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file to use instead of the checkpoint's (`tokenizer_config.json`).
    #[arg(long, env = "MOE_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Send chat answers' reasoning (`<think>...</think>`) apart from their content, as
    /// `reasoning_content` (vLLM's and SGLang's `--reasoning-parser`): `deepseek-r1`
    /// (DeepSeek-R1, QwQ; `minimax-m2` too), `qwen3` (`glm45` too: GLM-4.5 follows Qwen3's
    /// rule), or `deepseek-v3` (DeepSeek-V3.1 when a request sets
    /// `chat_template_kwargs.thinking`), `kimi-k2` (Kimi-K2-Thinking: as `deepseek-r1`, a
    /// tool-call section ending the thinking too); `minimax-m2-append-think` keeps MiniMax-M2's
    /// thinking in the content, after the `<think>` its template opened. Off by default:
    /// answers are returned whole.
    #[arg(long, env = "MOE_REASONING_PARSER")]
    pub reasoning_parser: Option<ReasoningParser>,
    /// The tool-call syntax answers are read in and forced calls are written in (vLLM's
    /// `--tool-call-parser`): `hermes` (Qwen3), `deepseek-v3`, `deepseek-v31`, `qwen3-coder`
    /// (`qwen3_xml` too), `glm45`, `glm47`, `minimax-m2`, `kimi-k2`. Default: the model's
    /// family, DeepSeek-V3.1 and Kimi-K2 told from V3, Qwen3-Coder from Qwen3 and GLM-4.7 from
    /// GLM-4.5 by their chat templates (GLM-4.7-Flash and MiniMax-M2 by their `model_type`).
    #[arg(long, env = "MOE_TOOL_CALL_PARSER")]
    pub tool_call_parser: Option<ToolCallFormat>,
    /// Memory for stored Responses API answers (`store`, `previous_response_id`,
    /// `GET`/`DELETE /v1/responses/{id}`), in bytes: the least recently used go first when it
    /// is full; 0 stores none (`previous_response_id` is then refused). A gateway stores the
    /// answers sent through it.
    #[arg(long, env = "MOE_RESPONSES_STORE_BYTES", default_value_t = 64 << 20)]
    pub responses_store_bytes: usize,
    /// vLLM's `--enable-prompt-tokens-details`: OpenAI usage shows
    /// `prompt_tokens_details.cached_tokens`, the prompt tokens served from the prefix cache
    /// (the Responses API's `input_tokens_details` always does).
    #[arg(
        long,
        env = "MOE_ENABLE_PROMPT_TOKENS_DETAILS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub enable_prompt_tokens_details: bool,
}
