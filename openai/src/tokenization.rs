//! vLLM's `POST /tokenize` and `POST /detokenize`: clients count a prompt's tokens, check
//! what a chat template makes of a conversation, or read ids back as text, with the server's
//! own tokenizer and template (so the ids are the ones generation would see). The bodies and
//! answers are vLLM's: `{"prompt" | "messages", "add_special_tokens", "return_token_strs",
//! ...}` gives `{"count", "max_model_len", "tokens", "token_strs"}`, and `{"tokens"}` gives
//! `{"prompt"}`.

use serde::{Deserialize, Serialize};

use moe_model::chat_template::ChatTemplate;
use moe_model::tokenizer::Tokenizer;

use crate::error::RouterError;
use crate::tool_calls::ToolCallFormat;
use crate::{check_model, parse, parse_chat_body, ChatBody};

/// A `/tokenize` body: a prompt as `/v1/completions` reads it, or a conversation as
/// `/v1/chat/completions` renders it.
#[derive(Debug)]
pub struct TokenizeRequest {
    input: TokenizeInput,
    /// Whether the tokenizer adds its special tokens (BOS) as it does for a prompt: vLLM's
    /// default is yes for a prompt, no for a conversation, whose template writes its own.
    add_special_tokens: bool,
    /// Each token's string in the vocabulary as well (`convert_ids_to_tokens`).
    return_token_strs: bool,
}

#[derive(Debug)]
enum TokenizeInput {
    Prompt(String),
    Chat(Box<ChatBody>),
}

#[derive(Deserialize)]
struct PromptBody {
    model: Option<String>,
    prompt: String,
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

/// The fields of a conversation's body that `/v1/chat/completions` does not read.
#[derive(Deserialize)]
struct ChatOptions {
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

/// Only whether the body holds `messages`.
#[derive(Deserialize)]
struct Shape {
    messages: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// `null` unless `return_token_strs` asked for them.
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// Parses and checks a `/tokenize` body (nothing tokenized yet): pure, so it can be fuzzed.
pub fn parse_tokenize(
    body: &[u8],
    served_model: &str,
    has_template: bool,
) -> Result<TokenizeRequest, RouterError> {
    let shape: Shape = parse(body)?;
    if shape.messages.is_none() {
        let req: PromptBody = parse(body)?;
        check_model(served_model, &req.model)?;
        return Ok(TokenizeRequest {
            input: TokenizeInput::Prompt(req.prompt),
            add_special_tokens: req.add_special_tokens.unwrap_or(true),
            return_token_strs: req.return_token_strs,
        });
    }
    let options: ChatOptions = parse(body)?;
    let chat = parse_chat_body(body, served_model, has_template)?;
    Ok(TokenizeRequest {
        input: TokenizeInput::Chat(Box::new(chat)),
        add_special_tokens: options.add_special_tokens.unwrap_or(false),
        return_token_strs: options.return_token_strs,
    })
}

impl TokenizeRequest {
    /// The text bytes `--max-prompt-bytes` bounds, and the field they are in.
    pub fn text_bytes(&self) -> (usize, &'static str) {
        match &self.input {
            TokenizeInput::Prompt(prompt) => (prompt.len(), "prompt"),
            TokenizeInput::Chat(chat) => (chat.text_bytes(), "messages"),
        }
    }

    /// The ids (CPU-heavy: the server runs it on the tokenizer's pool): the prompt's, or the
    /// rendered conversation's (its tools shown as a chat request with them shows them).
    pub fn tokenize(
        self,
        tokenizer: &Tokenizer,
        template: Option<&ChatTemplate>,
        tool_format: ToolCallFormat,
        max_model_len: usize,
    ) -> Result<TokenizeResponse, RouterError> {
        let (text, field) = match self.input {
            TokenizeInput::Prompt(prompt) => (prompt, "prompt"),
            TokenizeInput::Chat(chat) => {
                let template = template.ok_or_else(crate::no_chat_template)?;
                let plan = chat.tool_plan(tool_format)?;
                (
                    chat.prompt(template, plan.template_tools.as_ref())?,
                    "messages",
                )
            }
        };
        let tokens = if self.add_special_tokens {
            tokenizer.encode_prompt(&text)
        } else {
            tokenizer.encode_raw(&text)
        }
        .map_err(|e| RouterError::invalid(field, e.to_string()))?;
        let token_strs = self.return_token_strs.then(|| {
            tokens
                .iter()
                .map(|&id| tokenizer.token_piece(id).unwrap_or_default())
                .collect()
        });
        Ok(TokenizeResponse {
            count: tokens.len(),
            max_model_len,
            tokens,
            token_strs,
        })
    }
}

/// Parses and checks a `/detokenize` body: at most `max_model_len` ids (what a model reads
/// or writes at most), each in the vocabulary of `vocab` ids.
pub fn parse_detokenize(
    body: &[u8],
    served_model: &str,
    vocab: usize,
    max_model_len: usize,
) -> Result<DetokenizeRequest, RouterError> {
    let req: DetokenizeRequest = parse(body)?;
    check_model(served_model, &req.model)?;
    if req.tokens.len() > max_model_len {
        return Err(RouterError::invalid(
            "tokens",
            format!(
                "at most {max_model_len} tokens (the model's context), got {}",
                req.tokens.len()
            ),
        ));
    }
    if let Some(id) = req.tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(RouterError::invalid(
            "tokens",
            format!("token id {id} is out of range (vocab_size {vocab})"),
        ));
    }
    Ok(req)
}

impl DetokenizeRequest {
    /// The ids' text, special tokens included (as vLLM's `/detokenize` decodes).
    pub fn detokenize(self, tokenizer: &Tokenizer) -> Result<DetokenizeResponse, RouterError> {
        let prompt = tokenizer
            .decode_with_special(&self.tokens)
            .map_err(|e| RouterError::invalid("tokens", e.to_string()))?;
        Ok(DetokenizeResponse { prompt })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (Tokenizer, ChatTemplate) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny");
        let tokenizer = Tokenizer::from_dir(&dir).expect("fixture tokenizer");
        let template = ChatTemplate::new(
            tokenizer.chat_template().expect("the fixture has one"),
            tokenizer.bos_token().as_deref(),
            tokenizer.eos_token().as_deref(),
        )
        .unwrap();
        (tokenizer, template)
    }

    fn tokenize(body: &str) -> Result<TokenizeResponse, RouterError> {
        let (tokenizer, template) = fixture();
        parse_tokenize(body.as_bytes(), "m", true)?.tokenize(
            &tokenizer,
            Some(&template),
            ToolCallFormat::Hermes,
            1024,
        )
    }

    /// A prompt's ids are the ones `/v1/completions` generates from (BOS and all), without
    /// special tokens when asked; a conversation's are the rendered template's, as
    /// `/v1/chat/completions` tokenizes it.
    #[test]
    fn ids_are_the_ones_generation_sees() {
        let (tokenizer, template) = fixture();
        let got = tokenize(r#"{"model": "m", "prompt": "Hello world"}"#).unwrap();
        assert_eq!(got.tokens, tokenizer.encode_prompt("Hello world").unwrap());
        assert_eq!((got.count, got.max_model_len), (got.tokens.len(), 1024));
        assert_eq!(got.token_strs, None);
        let raw = tokenize(r#"{"prompt": "Hello world", "add_special_tokens": false}"#).unwrap();
        assert_eq!(raw.tokens, tokenizer.encode_raw("Hello world").unwrap());
        let body =
            r#"{"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": true}"#;
        let chat = tokenize(body).unwrap();
        let parsed = crate::parse_chat(
            br#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
            "m",
            Some(&template),
            &tokenizer,
            1024,
        )
        .unwrap();
        assert_eq!(chat.tokens, parsed.generate.input_ids);
        let strs = chat.token_strs.unwrap();
        assert_eq!(strs.len(), chat.tokens.len());
        assert_eq!(
            strs,
            chat.tokens
                .iter()
                .map(|&id| tokenizer.token_piece(id).unwrap())
                .collect::<Vec<_>>()
        );
        // Without the generation prompt the conversation is shorter.
        let body =
            r#"{"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": false}"#;
        assert!(tokenize(body).unwrap().count < chat.count);
    }

    #[test]
    fn bad_bodies_are_400s_naming_the_field() {
        let field = |body: &str| match tokenize(body) {
            Err(RouterError::Invalid { param, .. }) => param,
            other => panic!("{body}: {other:?}"),
        };
        assert!(matches!(
            tokenize(r#"{"prompt": "x", "model": "other"}"#),
            Err(RouterError::ModelNotFound { .. })
        ));
        assert_eq!(field(r#"{"messages": []}"#), Some("messages"));
        assert_eq!(
            field(
                r#"{"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}"#
            ),
            Some("chat_template")
        );
        assert_eq!(field("[1, 2]"), None);
        let (tokenizer, _) = fixture();
        let vocab = tokenizer.vocab_size();
        let detok = |body: &str| parse_detokenize(body.as_bytes(), "m", vocab, 8);
        assert!(detok(&format!(r#"{{"tokens": [1, {vocab}]}}"#)).is_err());
        assert!(detok(r#"{"tokens": [1, 2, 3, 4, 5, 6, 7, 8, 9]}"#).is_err());
        assert!(detok(r#"{"tokens": [-1]}"#).is_err());
        assert!(detok(r#"{"tokens": [1, 2]}"#).is_ok());
    }

    /// Detokenizing gives the text back, special tokens included.
    #[test]
    fn detokenized_ids_read_back_as_the_text() {
        let (tokenizer, _) = fixture();
        let ids = tokenizer.encode_prompt("Hello world").unwrap();
        let body = serde_json::json!({ "tokens": ids }).to_string();
        let got = parse_detokenize(body.as_bytes(), "m", tokenizer.vocab_size(), 1024)
            .unwrap()
            .detokenize(&tokenizer)
            .unwrap();
        assert!(got.prompt.ends_with("Hello world"), "{:?}", got.prompt);
        if let Some(bos) = tokenizer.bos_token() {
            assert_eq!(ids[0], tokenizer.bos_id().unwrap());
            assert!(got.prompt.starts_with(&bos), "{:?}", got.prompt);
        }
    }
}
