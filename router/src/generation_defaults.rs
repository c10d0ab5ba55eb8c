//! What `--generation-config` and `--override-generation-config` make of a request's unset
//! fields, as vLLM's server does: sampling where the request gives none, a default
//! `max_tokens`, and in two cases a cap on every request's output.
//!
//! - `auto` (the default): the checkpoint's `generation_config.json`; its `max_new_tokens`
//!   is the default for chat requests without `max_tokens`, not a cap.
//! - a folder: its file, and its `max_new_tokens` also caps every request (vLLM's
//!   `override_max_tokens` for a generation config that is not `auto` or `vllm`).
//! - `vllm`: none of it.
//!
//! `--override-generation-config` (JSON) then sets fields over either; its `max_new_tokens`
//! is a default and a cap whatever the source.

use std::path::{Path, PathBuf};

use moe_model::generation_config::{GenerationConfig, SamplingDefaults, FILE};

/// The defaults a router serves with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub sampling: SamplingDefaults,
    /// `max_tokens` of a chat request that gives none (else: the rest of the context).
    pub default_max_tokens: Option<u32>,
    /// No request generates more (every API).
    pub max_tokens_cap: Option<u32>,
}

/// Why the flags could not be served.
#[derive(Debug, thiserror::Error)]
pub enum GenerationDefaultsError {
    #[error("--generation-config {source_flag}: no {} there", file.display())]
    NoFile { source_flag: String, file: PathBuf },
    #[error("--generation-config {source_flag}: {message}")]
    Unreadable {
        source_flag: String,
        message: String,
    },
    #[error("--override-generation-config: {0}")]
    Override(String),
}

impl GenerationDefaults {
    /// The defaults for `--generation-config source` over the checkpoint at `model`, with
    /// `overrides` (`--override-generation-config`) set over them.
    pub fn resolve(
        source: &str,
        overrides: Option<&str>,
        model: &Path,
    ) -> Result<Self, GenerationDefaultsError> {
        let (config, capped) = match source {
            "vllm" => (GenerationConfig::default(), false),
            "auto" => (read(source, model)?, false),
            folder => {
                let dir = PathBuf::from(folder);
                if !dir.join(FILE).is_file() {
                    return Err(GenerationDefaultsError::NoFile {
                        source_flag: source.to_string(),
                        file: dir.join(FILE),
                    });
                }
                (read(source, &dir)?, true)
            }
        };
        let mut defaults = GenerationDefaults {
            sampling: config.sampling,
            default_max_tokens: config.max_new_tokens,
            max_tokens_cap: config.max_new_tokens.filter(|_| capped),
        };
        if let Some(text) = overrides {
            // Starts without a max_new_tokens, so the merged one is the override's.
            let mut merged = GenerationConfig {
                sampling: defaults.sampling,
                ..Default::default()
            };
            merged
                .override_with(text)
                .map_err(GenerationDefaultsError::Override)?;
            defaults.sampling = merged.sampling;
            if let Some(n) = merged.max_new_tokens {
                defaults.default_max_tokens = Some(n);
                defaults.max_tokens_cap = Some(n);
            }
        }
        Ok(defaults)
    }
}

fn read(source: &str, dir: &Path) -> Result<GenerationConfig, GenerationDefaultsError> {
    GenerationConfig::from_dir(dir).map_err(|e| GenerationDefaultsError::Unreadable {
        source_flag: source.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(name: &str, json: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("moe-gen-defaults-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), json).unwrap();
        dir
    }

    #[test]
    fn the_checkpoints_max_new_tokens_is_a_default_a_folders_also_a_cap() {
        let model = folder("model", r#"{"temperature": 0.6, "max_new_tokens": 100}"#);
        let auto = GenerationDefaults::resolve("auto", None, &model).unwrap();
        assert_eq!(auto.sampling.temperature, Some(0.6));
        assert_eq!(
            (auto.default_max_tokens, auto.max_tokens_cap),
            (Some(100), None)
        );

        let other = folder("other", r#"{"max_new_tokens": 50}"#);
        let dir = GenerationDefaults::resolve(other.to_str().unwrap(), None, &model).unwrap();
        assert_eq!(dir.sampling.temperature, None, "the folder's file only");
        assert_eq!(
            (dir.default_max_tokens, dir.max_tokens_cap),
            (Some(50), Some(50))
        );

        assert_eq!(
            GenerationDefaults::resolve("vllm", None, &model).unwrap(),
            GenerationDefaults::default()
        );
        assert!(matches!(
            GenerationDefaults::resolve("/nonexistent-folder", None, &model),
            Err(GenerationDefaultsError::NoFile { .. })
        ));
    }

    #[test]
    fn overrides_set_fields_over_any_source_and_their_max_new_tokens_caps() {
        let model = folder(
            "model2",
            r#"{"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 100}"#,
        );
        let over = r#"{"top_p": 0.5, "max_new_tokens": 8}"#;
        let auto = GenerationDefaults::resolve("auto", Some(over), &model).unwrap();
        assert_eq!(
            (auto.sampling.temperature, auto.sampling.top_p),
            (Some(0.6), Some(0.5))
        );
        assert_eq!(
            (auto.default_max_tokens, auto.max_tokens_cap),
            (Some(8), Some(8))
        );
        let vllm =
            GenerationDefaults::resolve("vllm", Some(r#"{"temperature": 0}"#), &model).unwrap();
        assert_eq!(vllm.sampling.temperature, Some(0.0));
        assert_eq!((vllm.default_max_tokens, vllm.max_tokens_cap), (None, None));
        let err =
            GenerationDefaults::resolve("auto", Some(r#"{"stop": ["x"]}"#), &model).unwrap_err();
        assert!(
            err.to_string()
                .contains("--override-generation-config: `stop`"),
            "{err}"
        );
    }
}
