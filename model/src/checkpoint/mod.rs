//! Checkpoint loading: a Hugging Face model directory (`config.json`, `model.safetensors` or a
//! sharded `model.safetensors.index.json`), read by tensor name into f32.
//!
//! Layers ask for the tensors they need, by name and expected shape; nothing else is read, so an
//! expert node holding 4 of 256 experts maps the files but touches only those 4 experts' bytes.

/// The FP8 codec lives with the math that widens it; checkpoints read and write it.
pub use crate::backend::fp8;
pub mod packed_int4;
pub mod safetensors;
pub mod synthetic;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::backend::{self, NativeWeight};
use crate::error::{ModelError, Result};
use packed_int4::Int4Scheme;
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
    /// The INT4 scheme of a `compressed-tensors` checkpoint: its weights named `X.weight` are
    /// stored as `X.weight_packed` and `X.weight_scale`.
    int4: Option<Int4Scheme>,
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
            int4: int4_scheme_of(dir),
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
            int4: int4_scheme_of(dir),
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
        if let Some(matrix) = self.load_int4(name, expected)? {
            return Ok(matrix.to_f32());
        }
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
        if self.weights == WeightsDtype::AsStored {
            if let Some(matrix) = self.load_int4(name, expected)? {
                return Ok(NativeWeight::Fp8(matrix));
            }
        }
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

    /// Weight `name` of an INT4 checkpoint, held as FP8 values on its groups (see
    /// [`packed_int4`]); `Ok(None)` where the checkpoint stores `name` itself (the parts
    /// `compressed-tensors` leaves unquantized) or is not INT4. The packed words, scales and
    /// recorded shape are all checked against `expected` before anything is allocated.
    fn load_int4(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<backend::weight::Fp8Matrix>> {
        let (Some(scheme), Some(names)) = (self.int4, packed_int4::packed_names(name)) else {
            return Ok(None);
        };
        if self.contains(name) {
            return Ok(None);
        }
        let Some(info) = self.info(&names.packed) else {
            return Ok(None);
        };
        let &[rows, cols] = expected else {
            return Err(ModelError::InvalidTensor {
                name: names.packed,
                message: format!("packed INT4 weights must be 2-D, expected {expected:?}"),
            });
        };
        let packed_shape = [rows, packed_int4::packed_cols(cols)];
        if info.dtype != Dtype::I32 || info.shape != packed_shape {
            return Err(ModelError::InvalidTensor {
                name: names.packed,
                message: format!(
                    "{} {:?}, expected I32 {packed_shape:?} for a [{rows}, {cols}] weight",
                    info.dtype.name(),
                    info.shape
                ),
            });
        }
        if let Some(shape) = self.info(&names.shape) {
            let recorded = self.load_ints(&names.shape, shape)?;
            if recorded != [rows as i64, cols as i64] {
                return Err(ModelError::TensorShape {
                    name: names.shape,
                    expected: expected.to_vec(),
                    actual: recorded.iter().map(|&d| d.max(0) as usize).collect(),
                });
            }
        }
        let scales = self.load_f32(&names.scale, &[rows, cols.div_ceil(scheme.group_size)])?;
        if let Some(at) = scales.iter().position(|s| !s.is_finite()) {
            return Err(ModelError::InvalidTensor {
                name: names.scale,
                message: format!("scale {at} is not finite"),
            });
        }
        let values = self.with_bytes(&names.packed, info, |words| {
            packed_int4::unpack_to_e4m3(&words, rows, cols)
        });
        Ok(Some(backend::weight::Fp8Matrix::from_blocks(
            values,
            rows,
            cols,
            &scales,
            (1, scheme.group_size),
        )))
    }

    /// A small integer tensor (a recorded shape) as i64s.
    pub(crate) fn load_ints(&self, name: &str, info: &TensorInfo) -> Result<Vec<i64>> {
        if info.shape.iter().product::<usize>() > 8 {
            return Err(ModelError::InvalidTensor {
                name: name.to_string(),
                message: format!("{:?} is not a shape", info.shape),
            });
        }
        self.with_bytes(name, info, |bytes| match info.dtype {
            Dtype::I64 => Ok(bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect()),
            Dtype::I32 => Ok(bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
                .collect()),
            other => Err(ModelError::UnsupportedDtype {
                name: name.to_string(),
                dtype: other.name().to_string(),
            }),
        })
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

/// The INT4 scheme of the checkpoint in `dir` (its config was checked when read: a scheme
/// that does not parse here is refused there).
fn int4_scheme_of(dir: &Path) -> Option<Int4Scheme> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json = serde_json::from_str::<Value>(&text).ok()?;
    Int4Scheme::from_quantization_config(json.get("quantization_config")?)
        .ok()
        .flatten()
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

    const INT4_CONFIG: &str = r#"{"quantization_config": {"quant_method": "compressed-tensors",
        "format": "pack-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": true, "strategy": "group",
        "group_size": 32}}}}}"#;

    /// What [`int4_checkpoint`] writes wrong.
    #[derive(Clone, Copy)]
    enum Int4Fault {
        None,
        PackedShape,
        PackedDtype,
        RecordedShape,
        NoScales,
    }

    /// A [5, 45] INT4 weight (a partial group of 13 columns, a row ending inside a word) and
    /// its bf16 scales, written as compressed-tensors packs them; returns its `q * scale`.
    fn int4_checkpoint(dir: &Path, fault: Int4Fault) -> Vec<f32> {
        let (rows, cols, groups) = (5, 45, 2);
        let q: Vec<i8> = (0..rows * cols)
            .map(|i| ((i * 11 + 5) % 16) as i8 - 8)
            .collect();
        let scales: Vec<f32> = (0..rows * groups)
            .map(|i| half::bf16::from_f32(0.0123 * (i + 1) as f32).to_f32())
            .collect();
        let mut writer = SafetensorsWriter::default();
        let words = packed_int4::pack(&q, rows, cols);
        match fault {
            Int4Fault::PackedShape => {
                writer.add("e.weight_packed", Dtype::I32, vec![rows, 5], vec![0; 100])
            }
            Int4Fault::PackedDtype => {
                writer.add("e.weight_packed", Dtype::U8, vec![rows, 24], words)
            }
            _ => writer.add("e.weight_packed", Dtype::I32, vec![rows, 6], words),
        }
        if !matches!(fault, Int4Fault::NoScales) {
            writer.add_bf16("e.weight_scale", vec![rows, groups], &scales);
        }
        let recorded = if matches!(fault, Int4Fault::RecordedShape) {
            cols - 1
        } else {
            cols
        };
        let shape: Vec<u8> = [rows as i64, recorded as i64]
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect();
        writer.add("e.weight_shape", Dtype::I64, vec![2], shape);
        writer.add_bf16("dense.weight", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), INT4_CONFIG).unwrap();
        writer.write(&dir.join("model.safetensors")).unwrap();
        (0..rows * cols)
            .map(|i| q[i] as f32 * scales[(i / cols) * groups + (i % cols) / 32])
            .collect()
    }

    /// INT4 weights load as FP8 values on their groups: widened, they are `q * scale`
    /// exactly; the GEMM over them gives the f32 copy's products bit for bit; weights the
    /// scheme leaves unquantized load as stored.
    #[test]
    fn int4_weights_load_as_their_dequantized_values() {
        let dir = std::env::temp_dir().join(format!("moe-int4-{}", std::process::id()));
        let want = int4_checkpoint(&dir, Int4Fault::None);
        let ckpt = Checkpoint::open_files(&dir).unwrap();
        let held = ckpt.load_native("e.weight", &[5, 45]).unwrap();
        let NativeWeight::Fp8(m) = &held else {
            panic!("INT4 is held as FP8 values, not {held:?}")
        };
        assert_eq!(m.segment_starts, vec![0, 32]);
        assert_eq!(held.to_f32(), want);
        assert_eq!(ckpt.load_f32("e.weight", &[5, 45]).unwrap(), want);
        let wide = ckpt.with_weights_dtype(WeightsDtype::F32);
        assert_eq!(
            wide.load_native("e.weight", &[5, 45]).unwrap(),
            NativeWeight::F32(want.clone())
        );
        // One row tile, and enough rows that the K block is widened once for all tiles.
        let packed = backend::PackedMatrix::from_native(&[&held], 45);
        let reference = backend::PackedMatrix::from_rows(&want, 5, 45);
        for m in [3, 40] {
            let a: Vec<f32> = (0..m * 45)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            assert_eq!(packed.matmul(&a, m), reference.matmul(&a, m), "{m} rows");
        }
        let dense = wide.load_native("dense.weight", &[2, 3]).unwrap();
        assert_eq!(dense.to_f32(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Packed words of another shape or dtype, a recorded shape that disagrees, missing scales:
    /// each a typed error naming the tensor, before anything is unpacked.
    #[test]
    fn malformed_int4_weights_are_refused_by_name() {
        let base = std::env::temp_dir().join(format!("moe-int4-bad-{}", std::process::id()));
        let cases = [
            ("weight_packed", Int4Fault::PackedShape),
            ("weight_packed", Int4Fault::PackedDtype),
            ("weight_shape", Int4Fault::RecordedShape),
            ("weight_scale", Int4Fault::NoScales),
        ];
        for (i, (named, fault)) in cases.into_iter().enumerate() {
            let dir = base.join(i.to_string());
            int4_checkpoint(&dir, fault);
            let ckpt = Checkpoint::open_files(&dir).unwrap();
            let err = ckpt
                .load_native("e.weight", &[5, 45])
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "case {i}: {err}");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
