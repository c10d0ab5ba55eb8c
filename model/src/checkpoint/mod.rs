//! Checkpoint loading: a Hugging Face model directory (`config.json`, `model.safetensors` or a
//! sharded `model.safetensors.index.json`), read by tensor name into f32.
//!
//! Layers ask for the tensors they need, by name and expected shape; nothing else is read, so an
//! expert node holding 4 of 256 experts maps the files but touches only those 4 experts' bytes.

/// The FP8 codec lives with the math that widens it; checkpoints read and write it.
pub use crate::backend::fp8;
pub mod safetensors;
pub mod synthetic;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::{self, NativeWeight};
use crate::error::{ModelError, Result};
pub use safetensors::{Dtype, SafetensorsFile, SafetensorsWriter, TensorInfo};
use synthetic::SyntheticWeights;

/// The precision weights are held in on the CPU, whatever the checkpoint stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightsDtype {
    /// As the checkpoint stores them: bf16 stays bf16, FP8 stays FP8 with its block scales
    /// (the GEMM widens both exactly), other precisions are widened to f32.
    #[default]
    AsStored,
    /// Every weight widened to f32 at load (FP8 dequantized): for comparison; the same
    /// products, bit for bit, as `as-stored`.
    F32,
    /// Every weight rounded to bf16 (FP8 and f32 change numerics; bf16 stays as is).
    Bf16,
}

impl std::fmt::Display for WeightsDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightsDtype::AsStored => "as-stored",
            WeightsDtype::F32 => "f32",
            WeightsDtype::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for WeightsDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "as-stored" => Ok(WeightsDtype::AsStored),
            "f32" => Ok(WeightsDtype::F32),
            "bf16" => Ok(WeightsDtype::Bf16),
            other => Err(format!(
                "unknown weights dtype {other:?} (as-stored, f32 or bf16)"
            )),
        }
    }
}

/// The process's choice (`--weights-dtype`), which every checkpoint it opens follows.
static PROCESS_WEIGHTS_DTYPE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets the precision every checkpoint this process opens afterwards holds its weights in.
pub fn set_process_weights_dtype(dtype: WeightsDtype) {
    PROCESS_WEIGHTS_DTYPE.store(dtype as u8, std::sync::atomic::Ordering::Relaxed);
}

fn process_weights_dtype() -> WeightsDtype {
    match PROCESS_WEIGHTS_DTYPE.load(std::sync::atomic::Ordering::Relaxed) {
        1 => WeightsDtype::F32,
        2 => WeightsDtype::Bf16,
        _ => WeightsDtype::AsStored,
    }
}

/// Where a checkpoint's tensors come from.
enum TensorStore {
    /// Memory-mapped safetensors files.
    Files {
        files: Vec<SafetensorsFile>,
        /// Tensor name to index in `files`.
        index: HashMap<String, usize>,
    },
    /// Generated from a seed when asked for (`synthetic_weights.json`).
    Synthetic(SyntheticWeights),
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    store: TensorStore,
    /// FP8 block size (rows, cols) from `quantization_config.weight_block_size`.
    fp8_block: (usize, usize),
    /// The precision [`Self::load_native`] gives.
    weights: WeightsDtype,
}

impl Checkpoint {
    /// A checkpoint of safetensors files (`model.safetensors` or a sharded index);
    /// [`Checkpoint::open`] also opens synthetic ones.
    pub fn open_files(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let bad = |message: String| ModelError::Safetensors {
                path: index_path.clone(),
                message,
            };
            let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            for (name, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    bad(format!("weight_map entry for {name} is not a file name"))
                })?;
                if shard.contains('/') || shard.contains("..") {
                    return Err(bad(format!(
                        "shard name {shard:?} must be a plain file name"
                    )));
                }
                let id = match shard_ids.get(shard) {
                    Some(id) => *id,
                    None => {
                        files.push(SafetensorsFile::open(&dir.join(shard))?);
                        shard_ids.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[id].info(name).is_none() {
                    return Err(bad(format!(
                        "{name} is mapped to {shard} but that shard does not hold it"
                    )));
                }
                index.insert(name.clone(), id);
            }
        } else if single.exists() {
            let file = SafetensorsFile::open(&single)?;
            for name in file.names() {
                index.insert(name.to_string(), 0);
            }
            files.push(file);
        } else {
            return Err(ModelError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json exists",
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            store: TensorStore::Files { files, index },
            fp8_block: read_fp8_block(dir),
            weights: process_weights_dtype(),
        })
    }

    /// A checkpoint whose tensors are generated by `weights`; its config and tokenizer are
    /// read from `dir` as for files.
    pub fn synthetic(dir: &Path, weights: SyntheticWeights) -> Self {
        Self {
            dir: dir.to_path_buf(),
            store: TensorStore::Synthetic(weights),
            fp8_block: read_fp8_block(dir),
            weights: process_weights_dtype(),
        }
    }

    /// Whether the tensors are generated rather than read from files.
    pub fn is_synthetic(&self) -> bool {
        matches!(self.store, TensorStore::Synthetic(_))
    }

    /// Calls `read` with the stored bytes of a tensor `info` describes: the mapped file's
    /// pages (dropped from memory afterwards), or freshly generated ones, handed over owned
    /// so that a reader keeping them as they are (FP8 codes) copies nothing.
    fn with_bytes<R>(
        &self,
        name: &str,
        info: &TensorInfo,
        read: impl FnOnce(Cow<'_, [u8]>) -> R,
    ) -> R {
        match &self.store {
            TensorStore::Files { files, index } => {
                let file = &files[index[name]];
                let result = read(Cow::Borrowed(file.bytes(info)));
                file.release(info);
                result
            }
            TensorStore::Synthetic(weights) => {
                read(Cow::Owned(weights.bytes(name).unwrap_or_default()))
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        match &self.store {
            TensorStore::Files { files, index } => {
                index.get(name).and_then(|&i| files[i].info(name))
            }
            TensorStore::Synthetic(weights) => weights.info(name),
        }
    }

    /// Whether two names hold the same tensor, bit for bit (dtype, shape, bytes and, for FP8,
    /// block scales): where a checkpoint stores one tensor twice (DeepSeek's MTP layer repeats
    /// the embedding and lm_head), one copy in memory serves both. False if either is absent.
    pub fn same_values(&self, a: &str, b: &str) -> bool {
        if a == b {
            return self.contains(a);
        }
        let (Some(ia), Some(ib)) = (self.info(a), self.info(b)) else {
            return false;
        };
        if ia.dtype != ib.dtype || ia.shape != ib.shape {
            return false;
        }
        let (scale_a, scale_b) = (format!("{a}_scale_inv"), format!("{b}_scale_inv"));
        if ia.dtype == Dtype::F8E4M3
            && (self.contains(&scale_a) || self.contains(&scale_b))
            && !self.same_values(&scale_a, &scale_b)
        {
            return false;
        }
        match &self.store {
            TensorStore::Files { files, index } => {
                let (fa, fb) = (&files[index[a]], &files[index[b]]);
                let equal = fa.bytes(ia) == fb.bytes(ib);
                fa.release(ia);
                fb.release(ib);
                equal
            }
            TensorStore::Synthetic(weights) => weights.same_values(a, b),
        }
    }

    /// Whether a bf16 copy of the tensor holds exactly what the checkpoint does: bf16 tensors
    /// only. f16 and f32 tensors are wider, and so are FP8 ones once scaled: `f32(e4m3) *
    /// scale` carries the scale's 24-bit mantissa, which bf16 rounds (on the FP8 fixture that
    /// rounding moves logits by 4.9, as `tests/golden.rs::bf16_device_numerics` shows).
    pub fn narrow_as_bf16(&self, name: &str) -> bool {
        self.info(name).is_some_and(|i| i.dtype == Dtype::BF16)
    }

    pub fn tensor_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.store {
            TensorStore::Files { index, .. } => Box::new(index.keys().map(String::as_str)),
            TensorStore::Synthetic(weights) => Box::new(weights.tensors().map(|(name, _)| name)),
        }
    }

    /// Loads a tensor as f32, checking its shape. FP8 weights are dequantised with their
    /// `weight_scale_inv` companion.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let info = self.info(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            expected: expected.to_vec(),
        })?;
        if info.shape != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let scales = if info.dtype == Dtype::F8E4M3 {
            if expected.len() != 2 {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: "F8_E4M3 (only 2-D weights with block scales)".into(),
                });
            }
            Some(self.load_fp8_scales(name, expected[0], expected[1])?)
        } else {
            None
        };
        self.with_bytes(name, info, |bytes| match info.dtype {
            Dtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Dtype::BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Dtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Dtype::F8E4M3 => {
                let (rows, cols) = (expected[0], expected[1]);
                let scales = scales.as_deref().unwrap_or_default();
                Ok(fp8::dequantize_blocks(
                    &bytes,
                    rows,
                    cols,
                    scales,
                    self.fp8_block,
                ))
            }
            other => Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: other.name().to_string(),
            }),
        })
    }

    /// The `weight_scale_inv` blocks of an FP8 weight of `rows x cols`.
    fn load_fp8_scales(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let (br, bc) = self.fp8_block;
        let scale_shape = [rows.div_ceil(br), cols.div_ceil(bc)];
        self.load_f32(&format!("{name}_scale_inv"), &scale_shape)
    }

    /// This checkpoint, holding its weights in `weights` (instead of the process's choice).
    pub fn with_weights_dtype(mut self, weights: WeightsDtype) -> Self {
        self.weights = weights;
        self
    }

    pub fn weights_dtype(&self) -> WeightsDtype {
        self.weights
    }

    /// Loads a weight in the precision [`WeightsDtype`] asks for: as stored, bf16 and FP8 (with
    /// its block scales) stay as they are, since the CPU GEMM widens them exactly; the shape is
    /// checked as in [`Self::load_f32`].
    pub fn load_native(&self, name: &str, expected: &[usize]) -> Result<NativeWeight> {
        let stored = self
            .info(name)
            .filter(|info| info.shape == expected)
            .map(|info| (info.dtype, info));
        match (self.weights, stored) {
            (WeightsDtype::AsStored | WeightsDtype::Bf16, Some((Dtype::BF16, info))) => Ok(
                NativeWeight::Bf16(self.with_bytes(name, info, |b| bf16_from_le_bytes(&b))),
            ),
            (WeightsDtype::AsStored, Some((Dtype::F8E4M3, info))) if expected.len() == 2 => {
                let scales = self.load_fp8_scales(name, expected[0], expected[1])?;
                self.with_bytes(name, info, |bytes| {
                    self.load_fp8(name, bytes, expected[0], expected[1], &scales)
                })
            }
            (WeightsDtype::Bf16, _) => {
                let wide = self.load_f32(name, expected)?;
                Ok(NativeWeight::Bf16(
                    wide.into_iter().map(half::bf16::from_f32).collect(),
                ))
            }
            // Other precisions, and every error (missing tensor, wrong shape), as load_f32 has them.
            _ => self.load_f32(name, expected).map(NativeWeight::F32),
        }
    }

    /// An FP8 weight of a synthetic checkpoint, for a device that generates its codes where
    /// they will lie (DeepSeek-V3's experts are 11 GB a layer): the key the codes are drawn
    /// from ([`SyntheticWeights::fp8_codes_key`]) and the matrix's scales and segments, its
    /// `values` left empty. `None` for weights in files, other tensors, or weights not held
    /// as stored.
    pub fn generated_fp8(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<(u64, backend::weight::Fp8Matrix)>> {
        let TensorStore::Synthetic(weights) = &self.store else {
            return Ok(None);
        };
        let shaped = weights.info(name).is_some_and(|i| i.shape == expected);
        let key = weights.fp8_codes_key(name);
        let (Some(key), true, WeightsDtype::AsStored, &[rows, cols]) =
            (key, shaped, self.weights, expected)
        else {
            return Ok(None);
        };
        let scales = self.load_fp8_scales(name, rows, cols)?;
        let matrix = backend::weight::Fp8Matrix::from_blocks(
            Vec::new(),
            rows,
            cols,
            &scales,
            self.fp8_block,
        );
        Ok(Some((key, matrix)))
    }

    /// An FP8 weight kept as FP8 with its `weight_scale_inv` blocks; NaN bytes (which no
    /// quantizer writes) are refused rather than carried into every product.
    fn load_fp8(
        &self,
        name: &str,
        bytes: Cow<'_, [u8]>,
        rows: usize,
        cols: usize,
        scales: &[f32],
    ) -> Result<NativeWeight> {
        if let Some(at) = bytes.iter().position(|&b| b & 0x7f == 0x7f) {
            return Err(ModelError::InvalidTensor {
                name: name.to_string(),
                message: format!("FP8 value {at} is NaN"),
            });
        }
        Ok(NativeWeight::Fp8(backend::weight::Fp8Matrix::from_blocks(
            bytes.into_owned(),
            rows,
            cols,
            scales,
            self.fp8_block,
        )))
    }

    /// Loads an optional tensor: `Ok(None)` when absent.
    pub fn load_f32_opt(&self, name: &str, expected: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.contains(name) {
            self.load_f32(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Little-endian bf16 values; one copy on little-endian machines (loading a node's experts
/// moves gigabytes through here).
fn bf16_from_le_bytes(bytes: &[u8]) -> Vec<half::bf16> {
    let len = bytes.len() / 2;
    #[cfg(target_endian = "little")]
    {
        let mut values = Vec::<half::bf16>::with_capacity(len);
        // SAFETY: bf16 is a plain 2-byte value (repr(transparent) over u16) and every bit
        // pattern is valid; on a little-endian machine its bytes are the file's bytes. The
        // capacity holds `len` values, all initialised by the copy before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                values.as_mut_ptr().cast::<u8>(),
                len * 2,
            );
            values.set_len(len);
        }
        values
    }
    #[cfg(not(target_endian = "little"))]
    {
        bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
}

fn read_fp8_block(dir: &Path) -> (usize, usize) {
    fp8_block_of(dir).unwrap_or(DEFAULT_FP8_BLOCK)
}

/// DeepSeek's block, where a config names none.
const DEFAULT_FP8_BLOCK: (usize, usize) = (128, 128);

/// The FP8 block size (rows, cols) of the checkpoint in `dir` when its `config.json` says it
/// is FP8 (`quantization_config.quant_method` `fp8`; DeepSeek's 128 x 128 where it names no
/// block); `None` for other checkpoints.
pub fn fp8_block_of(dir: &Path) -> Option<(usize, usize)> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json = serde_json::from_str::<Value>(&text).ok()?;
    let quantization = json.get("quantization_config")?;
    if quantization.get("quant_method").and_then(Value::as_str) != Some("fp8") {
        return None;
    }
    let block = quantization
        .get("weight_block_size")
        .and_then(Value::as_array);
    Some(
        match block.map(|b| b.iter().filter_map(Value::as_u64).collect::<Vec<_>>()) {
            Some(b) if b.len() == 2 && b[0] > 0 && b[1] > 0 => (b[0] as usize, b[1] as usize),
            _ => DEFAULT_FP8_BLOCK,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `same_values` compares the stored bits: a copy under another name is the same, a tensor
    /// one value or one dimension apart is not, nor is an absent name.
    #[test]
    fn same_values_compares_stored_bits() {
        let dir = std::env::temp_dir().join(format!("moe-same-values-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let mut apart = values.clone();
        apart[17] += 1.0;
        let mut writer = SafetensorsWriter::default();
        writer.add_bf16("a", vec![4, 6], &values);
        writer.add_bf16("copy_of_a", vec![4, 6], &values);
        writer.add_bf16("one_value_apart", vec![4, 6], &apart);
        writer.add_bf16("reshaped", vec![6, 4], &values);
        writer.add_f32("wider", vec![4, 6], &values);
        writer.write(&dir.join("model.safetensors")).unwrap();
        let ckpt = Checkpoint::open_files(&dir).unwrap();
        assert!(ckpt.same_values("a", "copy_of_a"));
        assert!(ckpt.same_values("a", "a"));
        for other in ["one_value_apart", "reshaped", "wider", "absent"] {
            assert!(!ckpt.same_values("a", other), "{other}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
