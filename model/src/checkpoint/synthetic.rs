//! Weights generated from a seed instead of read from files. A checkpoint directory whose
//! `synthetic_weights.json` stands where the safetensors files would holds no tensors: every
//! process that opens it (the offline engine, a router, each expert node) generates the same
//! bytes for the same tensor name, wherever and in whatever order it asks. This is how a
//! benchmark serves DeepSeek-V3's real dimensions (hundreds of gigabytes) from a machine whose
//! disk holds a few of its layers. `moe gen-checkpoint` writes its files from this generator,
//! so a written checkpoint and a synthetic one of the same seed hold the same bytes.
//!
//! Each value is a pure function of (seed, tensor name, index): a counter-based hash, no
//! sequential state, so tensors are generated in parallel chunks and independently of each
//! other.

use std::collections::HashMap;

use rayon::prelude::*;

use super::fp8::e4m3_to_f32;
use super::safetensors::{Dtype, TensorInfo};
use crate::counter_hash::mix64 as mix;

/// The file that marks a synthetic checkpoint directory.
pub const MARKER: &str = "synthetic_weights.json";

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// RMSNorm weight: uniform in [0.9, 1.1].
    Norm,
    /// Selection bias: uniform in [-0.05, 0.05].
    Bias,
    /// Uniform with standard deviation `gain / sqrt(fan_in)`, the fan-in being the last dim.
    Linear { gain: f32 },
    /// The e4m3 codes of an FP8 weight: random sign, exponent in [-3, 0], mantissa; never
    /// NaN, never subnormal. The weight is code x its block's scale.
    Fp8Codes,
    /// The `weight_scale_inv` blocks of an FP8 weight with `fan_in` columns: each block's scale
    /// varies by up to ±25% around the one that gives the weight `gain / sqrt(fan_in)` standard
    /// deviation (distinct scales, so a block read with another block's scale shows).
    Fp8Scales { gain: f32, fan_in: usize },
    /// The packed words of an INT4 weight with `cols` columns: uniform nibbles (each value
    /// in [-8, 7]), zero past `cols` in a row's last word.
    Int4Words { cols: usize },
    /// The bf16 `weight_scale` of an INT4 weight: per group, ±25% around the scale that gives
    /// the weight `gain / sqrt(fan_in)` standard deviation.
    Int4Scales { gain: f32, fan_in: usize },
    /// An INT4 weight's `weight_shape`: `[rows, cols]` as i64.
    Int4Shape { rows: usize, cols: usize },
}

/// One tensor of a synthetic checkpoint: where it would live in a file, and how it is drawn.
#[derive(Debug, Clone)]
pub struct SyntheticTensor {
    pub info: TensorInfo,
    pub init: Init,
    /// The stream its values are drawn from: its own name's, or (a copy, as DeepSeek's files
    /// repeat the embedding under the MTP layer) the source tensor's.
    key: u64,
}

/// A tensor to generate: name, shape, stored dtype, init.
pub type SyntheticSpec = (String, Vec<usize>, Dtype, Init);

/// The tensors of one synthetic checkpoint, in the order a writer lays them out.
pub struct SyntheticWeights {
    seed: u64,
    tensors: Vec<(String, SyntheticTensor)>,
    index: HashMap<String, usize>,
}

/// Elements generated per parallel task.
const CHUNK: usize = 1 << 16;

impl SyntheticWeights {
    pub fn new(seed: u64, specs: impl IntoIterator<Item = SyntheticSpec>) -> Self {
        let mut tensors = Vec::new();
        let mut index = HashMap::new();
        for (name, shape, dtype, init) in specs {
            let bytes = shape.iter().product::<usize>() * dtype.size();
            index.insert(name.clone(), tensors.len());
            let info = TensorInfo {
                dtype,
                shape,
                begin: 0,
                end: bytes,
            };
            let key = tensor_key(seed, &name);
            tensors.push((name, SyntheticTensor { info, init, key }));
        }
        Self {
            seed,
            tensors,
            index,
        }
    }

    /// Adds `(copy, source)` tensors holding their source's values, bit for bit: what a
    /// checkpoint that stores one tensor under two names holds. A source it lacks is skipped.
    pub fn with_copies(mut self, copies: &[(String, String)]) -> Self {
        for (copy, source) in copies {
            if let Some(&i) = self.index.get(source) {
                let tensor = self.tensors[i].1.clone();
                self.index.insert(copy.clone(), self.tensors.len());
                self.tensors.push((copy.clone(), tensor));
            }
        }
        self
    }

    /// Whether two names hold the same values (one a copy of the other, or the same name),
    /// known without generating either.
    pub fn same_values(&self, a: &str, b: &str) -> bool {
        match (self.index.get(a), self.index.get(b)) {
            (Some(&a), Some(&b)) => {
                let (a, b) = (&self.tensors[a].1, &self.tensors[b].1);
                a.key == b.key
                    && a.init == b.init
                    && a.info.dtype == b.info.dtype
                    && a.info.shape == b.info.shape
            }
            _ => false,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i].1.info)
    }

    /// The key a tensor of FP8 codes is drawn from, for a device that generates them itself
    /// (element `i` is byte `i % 8` of the hash of `(key, i / 8)`, made a code as
    /// [`fill_fp8_codes`] makes it); `None` for any other tensor.
    pub fn fp8_codes_key(&self, name: &str) -> Option<u64> {
        let tensor = &self.tensors[*self.index.get(name)?].1;
        (tensor.init == Init::Fp8Codes && tensor.info.dtype == Dtype::F8E4M3).then_some(tensor.key)
    }

    /// Tensors in layout order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &SyntheticTensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The tensor's little-endian bytes in its stored dtype, as a file would hold them;
    /// `None` for a name this checkpoint does not have.
    pub fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        let tensor = &self.tensors[*self.index.get(name)?].1;
        Some(self.generate(tensor))
    }

    /// Generates one tensor (in parallel chunks: a DeepSeek-V3 expert is 44M values).
    pub fn generate(&self, tensor: &SyntheticTensor) -> Vec<u8> {
        let info = &tensor.info;
        let key = tensor.key;
        let size = info.dtype.size();
        let mut bytes = vec![0u8; info.end - info.begin];
        match (tensor.init, info.dtype) {
            (Init::Fp8Codes, _) => {
                bytes
                    .par_chunks_mut(CHUNK)
                    .enumerate()
                    .for_each(|(c, out)| {
                        fill_fp8_codes(key, c * CHUNK, out);
                    });
            }
            (Init::Int4Words { cols }, _) => fill_int4_words(key, cols, &mut bytes),
            (Init::Int4Scales { gain, fan_in }, _) => {
                // Root mean square of uniform integers in [-8, 7]: sqrt(344 / 16).
                let base = gain / (fan_in.max(1) as f32).sqrt() / 21.5f32.sqrt();
                for (i, out) in bytes.chunks_exact_mut(2).enumerate() {
                    let scale = base * (0.75 + 0.5 * unit(draw(key, i as u64)));
                    out.copy_from_slice(&half::bf16::from_f32(scale).to_le_bytes());
                }
            }
            (Init::Int4Shape { rows, cols }, _) => {
                for (out, dim) in bytes.chunks_exact_mut(8).zip([rows, cols]) {
                    out.copy_from_slice(&(dim as i64).to_le_bytes());
                }
            }
            (Init::Fp8Scales { gain, fan_in }, _) => {
                let base = gain / (fan_in.max(1) as f32).sqrt() / fp8_code_rms();
                for (i, out) in bytes.chunks_exact_mut(4).enumerate() {
                    let scale = base * (0.75 + 0.5 * unit(draw(key, i as u64)));
                    out.copy_from_slice(&scale.to_le_bytes());
                }
            }
            (init, dtype) => {
                let fan_in = *info.shape.last().unwrap_or(&1);
                let draw = ValueDraw::of(init, fan_in);
                let encode = |value: f32, out: &mut [u8]| match dtype {
                    Dtype::BF16 => out.copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
                    Dtype::F16 => out.copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
                    _ => out.copy_from_slice(&value.to_le_bytes()),
                };
                // CHUNK is even: each pair of values shares one hash.
                bytes
                    .par_chunks_mut(CHUNK * size)
                    .enumerate()
                    .for_each(|(c, out)| {
                        let first = (c * CHUNK / 2) as u64;
                        for (p, pair) in out.chunks_mut(2 * size).enumerate() {
                            let bits = draw_pair(key, first + p as u64);
                            for (half, out) in pair.chunks_exact_mut(size).enumerate() {
                                encode(draw.value(bits[half]), out);
                            }
                        }
                    });
            }
        }
        bytes
    }
}

/// An f32-valued init, `offset + width * uniform(-1, 1)`, its constants computed once per
/// tensor.
#[derive(Clone, Copy)]
struct ValueDraw {
    offset: f32,
    width: f32,
}

impl ValueDraw {
    fn of(init: Init, fan_in: usize) -> Self {
        let (offset, width) = match init {
            Init::Norm => (1.0, 0.1),
            Init::Bias => (0.0, 0.05),
            Init::Linear { gain } => (0.0, gain * 3f32.sqrt() / (fan_in.max(1) as f32).sqrt()),
            // Not value inits; drawn as unit-width noise if ever asked for as one.
            Init::Fp8Codes
            | Init::Fp8Scales { .. }
            | Init::Int4Words { .. }
            | Init::Int4Scales { .. }
            | Init::Int4Shape { .. } => (0.0, 1.0),
        };
        ValueDraw { offset, width }
    }

    /// The value 24 random bits draw.
    fn value(self, bits: u64) -> f32 {
        // 2u - 1 is exact in f32 (u has 24 bits), so every machine draws the same values.
        self.offset + self.width * (2.0 * unit(bits) - 1.0)
    }
}

/// e4m3 codes for elements `first..first + out.len()` (`first` a multiple of 8): element i
/// takes byte `i % 8` of hash `i / 8`.
fn fill_fp8_codes(key: u64, first: usize, out: &mut [u8]) {
    for (g, group) in out.chunks_mut(8).enumerate() {
        let bits = draw(key, (first / 8 + g) as u64).to_le_bytes();
        for (code, bits) in group.iter_mut().zip(bits) {
            *code = fp8_code(bits);
        }
    }
}

/// Packed INT4 rows of `cols` values: random bytes (two uniform nibbles each), the nibbles past
/// `cols` in a row's last word left zero as compressed-tensors pads them.
fn fill_int4_words(key: u64, cols: usize, out: &mut [u8]) {
    let row_bytes = crate::checkpoint::packed_int4::packed_cols(cols) * 4;
    out.par_chunks_mut(row_bytes.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            for (g, group) in row.chunks_mut(8).enumerate() {
                let bits = draw(key, ((r as u64) << 32) | g as u64).to_le_bytes();
                group.copy_from_slice(&bits[..group.len()]);
            }
            let used = cols.div_ceil(2);
            row[used..].fill(0);
            if cols % 2 == 1 {
                row[cols / 2] &= 0x0f;
            }
        });
}

/// Sign from bit 7, exponent 2^-3..2^0 from bits 3-4, mantissa from bits 0-2.
fn fp8_code(bits: u8) -> u8 {
    (bits & 0x80) | ((4 + ((bits >> 3) & 3)) << 3) | (bits & 7)
}

/// Root mean square of the values [`fp8_code`] draws (uniform over its 64 codes).
fn fp8_code_rms() -> f32 {
    let sum: f32 = (0..=255u8)
        .filter(|b| b & 0x60 == 0)
        .map(|b| e4m3_to_f32(fp8_code(b)).powi(2))
        .sum();
    (sum / 64.0).sqrt()
}

/// Uniform in [0, 1) from the low 24 bits: exact in f32.
fn unit(bits: u64) -> f32 {
    (bits & 0xff_ffff) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// The random bits of values `2p` and `2p + 1`: the two halves of hash `p`.
fn draw_pair(key: u64, p: u64) -> [u64; 2] {
    let bits = draw(key, p);
    [bits & 0xffff_ffff, bits >> 32]
}

fn draw(key: u64, i: u64) -> u64 {
    mix(key.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

/// The tensor's stream: FNV-1a of its name, mixed with the seed.
fn tensor_key(seed: u64, name: &str) -> u64 {
    let fnv = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    mix(fnv ^ mix(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(seed: u64) -> SyntheticWeights {
        SyntheticWeights::new(
            seed,
            [
                (
                    "w".to_string(),
                    vec![300, 1024],
                    Dtype::BF16,
                    Init::Linear { gain: 1.0 },
                ),
                ("n".to_string(), vec![1024], Dtype::F32, Init::Norm),
                (
                    "q".to_string(),
                    vec![300, 1000],
                    Dtype::F8E4M3,
                    Init::Fp8Codes,
                ),
                (
                    "q_scale_inv".to_string(),
                    vec![3, 8],
                    Dtype::F32,
                    Init::Fp8Scales {
                        gain: 1.0,
                        fan_in: 1000,
                    },
                ),
            ],
        )
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Same seed and name, same bytes (whatever the chunking); another seed or name, others.
    #[test]
    fn a_tensor_is_a_function_of_seed_and_name() {
        let (a, b, c) = (weights(7), weights(7), weights(8));
        for name in ["w", "n", "q", "q_scale_inv"] {
            let bytes = a.bytes(name).unwrap();
            assert_eq!(bytes.len(), a.info(name).unwrap().end);
            assert_eq!(bytes, b.bytes(name).unwrap(), "{name}");
            assert_ne!(bytes, c.bytes(name).unwrap(), "{name}");
        }
        assert_ne!(a.bytes("w").unwrap()[..600], a.bytes("q").unwrap()[..600]);
        assert!(a.bytes("missing").is_none());
        let names: Vec<&str> = a.tensors().map(|(n, _)| n).collect();
        assert_eq!(names, ["w", "n", "q", "q_scale_inv"]);
    }

    /// A copy holds its source's bytes, known without generating them; nothing else does.
    #[test]
    fn a_copy_holds_its_sources_values() {
        let copies = [
            ("w_again".to_string(), "w".to_string()),
            ("q_again".to_string(), "q".to_string()),
            ("ghost".to_string(), "absent".to_string()),
        ];
        let w = weights(3).with_copies(&copies);
        assert_eq!(w.bytes("w_again"), w.bytes("w"));
        assert_eq!(w.bytes("q_again"), w.bytes("q"));
        assert_eq!(w.fp8_codes_key("q_again"), w.fp8_codes_key("q"));
        assert!(w.same_values("w", "w_again"));
        assert!(w.same_values("q_again", "q"));
        assert!(!w.same_values("w", "q"));
        assert!(!w.same_values("w", "ghost"));
        assert!(w.info("ghost").is_none());
    }

    /// Values have the spread the init asks for; FP8 codes are never NaN and their scaled
    /// values have the same spread as a linear init's.
    #[test]
    fn values_have_the_inits_spread() {
        let w = weights(1);
        let bf16: Vec<f32> = w
            .bytes("w")
            .unwrap()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let std = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let target = 1.0 / 1024f32.sqrt();
        assert!((std(&bf16) / target - 1.0).abs() < 0.05, "{}", std(&bf16));
        let norm = f32s(&w.bytes("n").unwrap());
        assert!(norm.iter().all(|x| (0.9..=1.1).contains(x)));

        let codes = w.bytes("q").unwrap();
        assert!(codes.iter().all(|&b| b & 0x7f != 0x7f && b & 0x78 != 0));
        let scales = f32s(&w.bytes("q_scale_inv").unwrap());
        assert!(scales.iter().all(|s| *s > 0.0));
        assert!(scales.windows(2).any(|p| p[0] != p[1]));
        let values =
            crate::checkpoint::fp8::dequantize_blocks(&codes, 300, 1000, &scales, (128, 128));
        let target = 1.0 / 1000f32.sqrt();
        assert!(
            (std(&values) / target - 1.0).abs() < 0.15,
            "{}",
            std(&values)
        );
    }
}
