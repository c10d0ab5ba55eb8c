//! The checkpoint's tokenizer (`tokenizer.json`, or tiktoken ranks: [`tiktoken`]) plus the
//! settings of `tokenizer_config.json` that change encoding: whether BOS is added, the special
//! tokens, the chat template (or `chat_template.jinja` beside it, as transformers saves it).

mod tiktoken;

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `add_bos_token` from tokenizer_config.json, when present.
    add_bos: Option<bool>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    chat_template: Option<String>,
    /// For tiktoken ranks, the encoder that encodes as tiktoken does (Kimi's class, which also
    /// encodes a long text in pieces: `tiktoken::encode_pieces`).
    tiktoken: Option<tiktoken::TiktokenEncoder>,
}

fn special_token_content(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", config_path.display())))?,
            Err(_) => Value::Null,
        };
        let path = dir.join("tokenizer.json");
        let (inner, tiktoken) = if !path.exists() && tiktoken::present(dir) {
            let (inner, encoder) = tiktoken::load(dir, &config)?;
            (inner, Some(encoder))
        } else if path.exists() {
            let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
                ModelError::Tokenizer(format!("cannot load {}: {e}", path.display()))
            })?;
            (inner, None)
        } else {
            return Err(ModelError::Tokenizer(format!(
                "{} does not exist (nor {})",
                path.display(),
                tiktoken::RANKS_FILE
            )));
        };
        let id_of =
            |key: &str| special_token_content(&config, key).and_then(|t| inner.token_to_id(&t));
        let template_file = dir.join("chat_template.jinja");
        let chat_template = match std::fs::read_to_string(&template_file) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            Err(e) => {
                return Err(ModelError::Tokenizer(format!(
                    "{}: {e}",
                    template_file.display()
                )))
            }
        };
        Ok(Self {
            add_bos: config.get("add_bos_token").and_then(Value::as_bool),
            bos_id: id_of("bos_token"),
            eos_id: id_of("eos_token"),
            chat_template,
            tiktoken,
            inner,
        })
    }

    /// The ids of `text`, encoded whole, or piece by piece where the tokenizer's own class
    /// does so (Kimi's, for texts of tens of thousands of characters).
    fn encode_ids(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let Some(encoder) = &self.tiktoken else {
            return self
                .inner
                .encode(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| ModelError::Tokenizer(format!("cannot encode: {e}")));
        };
        let mut ids = Vec::new();
        for piece in tiktoken::encode_pieces(text) {
            ids.extend(encoder.encode(piece)?);
        }
        Ok(ids)
    }

    /// Encodes text as a prompt: the post-processor's special tokens, with BOS added or removed
    /// as `add_bos_token` says.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_ids(text, true)?;
        if let (Some(add), Some(bos)) = (self.add_bos, self.bos_id) {
            let has = ids.first() == Some(&bos);
            if add && !has {
                ids.insert(0, bos);
            } else if !add && has {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    /// Encodes text exactly as written: no special tokens added (what transformers does with a
    /// rendered chat template, which writes its own).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_ids(text, false)
    }

    /// The text of one token, special tokens included (for logprobs listings).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// A token's string in the vocabulary, as transformers' `convert_ids_to_tokens` gives it
    /// (`Ġhello` for a byte-level BPE); `None` outside it.
    pub fn token_piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The BOS and EOS tokens' text, for chat templates.
    pub fn bos_token(&self) -> Option<String> {
        self.bos_id.and_then(|id| self.inner.id_to_token(id))
    }

    pub fn eos_token(&self) -> Option<String> {
        self.eos_id.and_then(|id| self.inner.id_to_token(id))
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode: {e}")))
    }

    /// Decodes ids to text, special tokens included (vLLM's `/detokenize`).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode: {e}")))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` would hold it (what llguidance reads
    /// token bytes from), also for tokenizers built from tiktoken ranks.
    pub fn hub_json(&self) -> Result<Value> {
        serde_json::to_value(&self.inner)
            .map_err(|e| ModelError::Tokenizer(format!("cannot write the tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
