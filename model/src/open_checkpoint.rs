//! Opening a checkpoint directory: safetensors files, or a synthetic checkpoint whose tensors
//! are generated from the seed in its `synthetic_weights.json`. It sits above both the loader
//! (`checkpoint`) and the generator (which knows every tensor a config has and imports the
//! loader's writer), which is why [`Checkpoint::open`] is defined here and not beside the type.

use std::path::Path;

use crate::checkpoint::{synthetic, Checkpoint};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::generator::{synthetic_weights, SyntheticMarker, WeightDtype};

/// Bytes of a `synthetic_weights.json` worth reading (it holds a seed and a dtype).
const MARKER_LIMIT: u64 = 4096;

impl Checkpoint {
    /// Opens `dir`: its safetensors files, or, with no files and a `synthetic_weights.json`,
    /// the weights that file's seed generates for the directory's config.
    pub fn open(dir: &Path) -> Result<Self> {
        let marker = dir.join(synthetic::MARKER);
        let has_files = dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists();
        if has_files || !marker.exists() {
            return Self::open_files(dir);
        }
        let bad = |message: String| ModelError::Config {
            path: marker.clone(),
            message,
        };
        let size = std::fs::metadata(&marker)
            .map_err(|e| ModelError::io(&marker, e))?
            .len();
        if size > MARKER_LIMIT {
            return Err(bad(format!(
                "{size} bytes: a synthetic checkpoint's marker holds only a seed and a dtype"
            )));
        }
        let text = std::fs::read_to_string(&marker).map_err(|e| ModelError::io(&marker, e))?;
        let parsed: SyntheticMarker =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let dtype = WeightDtype::parse(&parsed.dtype).ok_or_else(|| {
            bad(format!(
                "unknown dtype {:?} (f32, bf16 or fp8)",
                parsed.dtype
            ))
        })?;
        let config = ModelConfig::from_dir(dir)?;
        Ok(Self::synthetic(
            dir,
            synthetic_weights(&config, parsed.seed, dtype),
        ))
    }
}
