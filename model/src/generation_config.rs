//! A checkpoint's `generation_config.json`: the sampling its creators recommend (DeepSeek-V3's
//! temperature 0.6 and top-p 0.95, Qwen3's 0.6, 0.95 and top-k 20), which vLLM applies to
//! every request that leaves a field unset (`--generation-config auto`, its default), and the
//! end-of-sequence ids generation stops at besides `config.json`'s (Qwen3's `<|endoftext|>`
//! beside `<|im_end|>`), as transformers' `generate` stops at them.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};

pub const FILE: &str = "generation_config.json";

/// Sampling defaults for requests that leave a field unset; `None`: the API's own default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0: off.
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What generation reads from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub sampling: SamplingDefaults,
    /// Its `eos_token_id` (one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Its `max_new_tokens`: vLLM's default `max_tokens` for requests that give none.
    pub max_new_tokens: Option<u32>,
}

/// The fields `--override-generation-config` may set: the sampling ones and `max_new_tokens`
/// (those vLLM's server takes from a generation config).
pub const OVERRIDABLE: [&str; 6] = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
];

impl GenerationConfig {
    /// `dir/generation_config.json`; the default (nothing) when the checkpoint has none. A
    /// file that does not parse, or holds a value no request could ask for, is an error
    /// naming it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(ModelError::io(&path, e)),
        };
        Self::from_json_str(&text).map_err(|message| ModelError::Config { path, message })
    }

    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let raw: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        // A field given must be a number in the range a request could ask for.
        let number = |name: &str, ok: fn(f64) -> bool, range: &str| match raw.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
                _ => Err(format!("{name} {v} is not a number {range}")),
            },
        };
        let float = |name, ok, range| number(name, ok, range).map(|v| v.map(|x| x as f32));
        let sampling = SamplingDefaults {
            temperature: float("temperature", |t| t >= 0.0, ">= 0")?,
            top_p: float("top_p", |p| p > 0.0 && p <= 1.0, "in (0, 1]")?,
            // HF's -1 or 0 is off.
            top_k: number("top_k", |k| k.fract() == 0.0, "(an integer)")?
                .map(|k| k.clamp(0.0, f64::from(u32::MAX)) as u32),
            min_p: float("min_p", |p| (0.0..=1.0).contains(&p), "in [0, 1]")?,
            repetition_penalty: float(
                "repetition_penalty",
                |r| r > 0.0 && r <= 10.0,
                "in (0, 10]",
            )?,
        };
        let eos_token_ids = match raw.get("eos_token_id") {
            None | Some(Value::Null) => Some(Vec::new()),
            Some(Value::Array(ids)) => ids.iter().map(token_id).collect::<Option<_>>(),
            Some(id) => token_id(id).map(|id| vec![id]),
        }
        .ok_or_else(|| "eos_token_id is not a token id or a list of them".to_string())?;
        let max_new_tokens = number("max_new_tokens", |n| n >= 1.0 && n.fract() == 0.0, ">= 1")?
            .map(|n| n.min(f64::from(u32::MAX)) as u32);
        Ok(Self {
            sampling,
            eos_token_ids,
            max_new_tokens,
        })
    }

    /// Sets the fields a JSON object gives (vLLM's `--override-generation-config`), checked
    /// as the file's are; a field outside [`OVERRIDABLE`] is refused by name.
    pub fn override_with(&mut self, text: &str) -> std::result::Result<(), String> {
        let raw: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let Some(fields) = raw.as_object() else {
            return Err("not a JSON object".into());
        };
        if let Some(other) = fields.keys().find(|k| !OVERRIDABLE.contains(&k.as_str())) {
            return Err(format!(
                "`{other}` cannot be overridden; these can: {}",
                OVERRIDABLE.join(", ")
            ));
        }
        let given = Self::from_json_str(text)?;
        let (s, g) = (&mut self.sampling, given.sampling);
        s.temperature = g.temperature.or(s.temperature);
        s.top_p = g.top_p.or(s.top_p);
        s.top_k = g.top_k.or(s.top_k);
        s.min_p = g.min_p.or(s.min_p);
        s.repetition_penalty = g.repetition_penalty.or(s.repetition_penalty);
        self.max_new_tokens = given.max_new_tokens.or(self.max_new_tokens);
        Ok(())
    }
}

fn token_id(value: &Value) -> Option<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_published_checkpoints_files() {
        // DeepSeek-V3's and Qwen3-30B-A3B's, as published.
        let deepseek = r#"{"_from_model_config": true, "bos_token_id": 0, "eos_token_id": 1,
            "do_sample": true, "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}"#;
        let got = GenerationConfig::from_json_str(deepseek).unwrap();
        assert_eq!(got.eos_token_ids, [1]);
        assert_eq!(
            got.sampling,
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.95),
                ..Default::default()
            }
        );
        let qwen3 = r#"{"bos_token_id": 151643, "do_sample": true, "eos_token_id": [151645, 151643],
            "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
            "transformers_version": "4.51.0"}"#;
        let got = GenerationConfig::from_json_str(qwen3).unwrap();
        assert_eq!(got.eos_token_ids, [151645, 151643]);
        assert_eq!(got.sampling.top_k, Some(20));
        assert!(GenerationConfig::from_json_str("{}")
            .unwrap()
            .sampling
            .is_empty());
    }

    #[test]
    fn values_no_request_could_ask_for_are_refused_by_name() {
        for (text, name) in [
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"min_p": 2}"#, "min_p"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"eos_token_id": "x"}"#, "eos_token_id"),
            (r#"{"eos_token_id": [1, -2]}"#, "eos_token_id"),
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"max_new_tokens": 0}"#, "max_new_tokens"),
            (r#"{"max_new_tokens": 2.5}"#, "max_new_tokens"),
        ] {
            let err = GenerationConfig::from_json_str(text).unwrap_err();
            assert!(err.contains(name), "{text}: {err}");
        }
        let dir = std::env::temp_dir().join(format!("moe-gen-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            GenerationConfig::from_dir(&dir).unwrap(),
            Default::default()
        );
        std::fs::write(dir.join(FILE), "{not json").unwrap();
        let err = GenerationConfig::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains(FILE), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn max_new_tokens_is_read_and_overrides_replace_only_what_they_give() {
        let mut config = GenerationConfig::from_json_str(
            r#"{"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 2048, "eos_token_id": 1}"#,
        )
        .unwrap();
        assert_eq!(config.max_new_tokens, Some(2048));
        config
            .override_with(r#"{"temperature": 0.3, "max_new_tokens": 64}"#)
            .unwrap();
        assert_eq!(config.sampling.temperature, Some(0.3));
        assert_eq!(config.sampling.top_p, Some(0.95), "kept");
        assert_eq!(config.max_new_tokens, Some(64));
        assert_eq!(config.eos_token_ids, [1], "not overridable, kept");
        for (text, name) in [
            (r#"{"eos_token_id": 2}"#, "eos_token_id"),
            (r#"{"max_tokens": 5}"#, "max_tokens"),
            (r#"{"top_k": 1.5}"#, "top_k"),
            ("[1]", "object"),
        ] {
            let err = config.override_with(text).unwrap_err();
            assert!(err.contains(name), "{text}: {err}");
        }
        assert_eq!(
            config.max_new_tokens,
            Some(64),
            "a refused override changes nothing"
        );
    }
}
