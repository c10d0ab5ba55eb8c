//! The checkpoint's tokenizer (`tokenizer.json`) plus the settings of `tokenizer_config.json`
//! that change encoding: whether BOS is added, the special tokens, the chat template.

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
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", config_path.display())))?,
            Err(_) => Value::Null,
        };
        let id_of =
            |key: &str| special_token_content(&config, key).and_then(|t| inner.token_to_id(&t));
        Ok(Self {
            add_bos: config.get("add_bos_token").and_then(Value::as_bool),
            bos_id: id_of("bos_token"),
            eos_id: id_of("eos_token"),
            chat_template: config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            inner,
        })
    }

    /// Encodes text as a prompt: the post-processor's special tokens, with BOS added or removed
    /// as `add_bos_token` says.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode prompt: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
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
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(encoding.get_ids().to_vec())
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

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
