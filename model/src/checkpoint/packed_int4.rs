//! INT4 weights as `compressed-tensors` packs them (Kimi-K2-Thinking's routed experts, vLLM's
//! `pack-quantized` format): symmetric 4-bit integers, one scale per `group_size` columns of a
//! row, eight values per little-endian int32 (`weight_packed` `[rows, ceil(cols / 8)]`, value
//! `c` of a row in bits `4 * (c % 8)` of word `c / 8`, stored plus 8), the scales in
//! `weight_scale` `[rows, ceil(cols / group_size)]` and the shape in `weight_shape`.
//!
//! Every integer in [-8, 7] is exactly an e4m3 value, so a loaded matrix is an FP8 one whose
//! scale segments are the groups: every path that takes FP8 weights takes it (the GPU's, the
//! f32 widening), with `q * scale` as each weight, the very f32 that dequantizing computes. The
//! CPU GEMM packs such a matrix back into nibbles (`backend/gemm/int4.rs`), so the one byte a
//! weight lives only while one matrix is packed.

use serde_json::Value;

use crate::backend::fp8::E4M3_OF_STORED_INT4 as E4M3_OF_STORED;

/// A checkpoint's INT4 scheme, read from `quantization_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Scheme {
    /// Columns sharing one scale.
    pub group_size: usize,
}

impl Int4Scheme {
    /// The INT4 scheme a `quantization_config` describes; `Ok(None)` when it is not
    /// `compressed-tensors`; an error naming what is not supported (other formats, bit
    /// widths, asymmetric or activation quantization, reordered groups).
    pub fn from_quantization_config(q: &Value) -> Result<Option<Self>, String> {
        if q.get("quant_method").and_then(Value::as_str) != Some("compressed-tensors") {
            return Ok(None);
        }
        let format = q.get("format").and_then(Value::as_str).unwrap_or("");
        if format != "pack-quantized" {
            return Err(format!(
                "compressed-tensors format {format:?} is not supported: only \"pack-quantized\" \
                 (Kimi-K2-Thinking's INT4)"
            ));
        }
        let groups = q
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or("compressed-tensors: no config_groups")?;
        let mut group_size = None;
        for (name, group) in groups {
            let size = Self::group_size_of(group).map_err(|e| format!("{name}: {e}"))?;
            if group_size.is_some_and(|g| g != size) {
                return Err("compressed-tensors: config groups of different group sizes".into());
            }
            group_size = Some(size);
        }
        Ok(group_size.map(|group_size| Self { group_size }))
    }

    /// The group size of one weight-only, symmetric, 4-bit integer, grouped scheme.
    fn group_size_of(group: &Value) -> Result<usize, String> {
        let present = |key: &str| group.get(key).is_some_and(|v| !v.is_null());
        if present("input_activations") || present("output_activations") {
            return Err("activation quantization is not supported (weights only)".into());
        }
        let w = group.get("weights").ok_or("no \"weights\" scheme")?;
        let field = |key: &str| w.get(key).cloned().unwrap_or(Value::Null);
        let expect = |key: &str, want: Value| {
            if field(key) == want {
                Ok(())
            } else {
                Err(format!(
                    "weights.{key} {} is not supported (only {want})",
                    field(key)
                ))
            }
        };
        expect("num_bits", Value::from(4))?;
        expect("type", Value::from("int"))?;
        expect("symmetric", Value::from(true))?;
        expect("strategy", Value::from("group"))?;
        if !matches!(field("dynamic"), Value::Null | Value::Bool(false)) {
            return Err("weights.dynamic is not supported".into());
        }
        // Activation order ("group") stores a g_idx permutation this loader does not apply.
        if !matches!(field("actorder"), Value::Null) && field("actorder") != "static" {
            return Err(format!(
                "weights.actorder {} is not supported",
                field("actorder")
            ));
        }
        match field("group_size").as_u64() {
            Some(g) if (1..=1 << 20).contains(&g) => Ok(g as usize),
            _ => Err(format!(
                "weights.group_size {} must be a positive integer",
                field("group_size")
            )),
        }
    }
}

/// The three tensors standing for weight `name` (`X.weight`) in a packed checkpoint, or `None`
/// for a name that is not a weight.
pub fn packed_names(name: &str) -> Option<PackedNames> {
    let base = name.strip_suffix(".weight")?;
    Some(PackedNames {
        packed: format!("{base}.weight_packed"),
        scale: format!("{base}.weight_scale"),
        shape: format!("{base}.weight_shape"),
    })
}

pub struct PackedNames {
    pub packed: String,
    pub scale: String,
    pub shape: String,
}

/// int32 words per row of `cols` 4-bit values.
pub fn packed_cols(cols: usize) -> usize {
    cols.div_ceil(8)
}

/// The e4m3 bytes of a `[rows, cols]` matrix from its packed words' little-endian bytes
/// (`rows * packed_cols(cols) * 4` of them: the caller checked the shape).
pub fn unpack_to_e4m3(words: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = packed_cols(cols) * 4;
    let mut out = Vec::with_capacity(rows * cols);
    for row in words.chunks_exact(row_bytes).take(rows) {
        // Byte b of a row holds values 2b (low nibble) and 2b + 1 (high nibble).
        for &byte in &row[..cols / 2] {
            out.push(E4M3_OF_STORED[(byte & 0xf) as usize]);
            out.push(E4M3_OF_STORED[(byte >> 4) as usize]);
        }
        if cols % 2 == 1 {
            out.push(E4M3_OF_STORED[(row[cols / 2] & 0xf) as usize]);
        }
    }
    out
}

/// Packs `[rows, cols]` integers in [-8, 7] as `compressed-tensors` does (for writing
/// checkpoints and tests): little-endian int32 bytes, `rows * packed_cols(cols) * 4` of them.
pub fn pack(values: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = packed_cols(cols) * 4;
    let mut out = vec![0u8; rows * row_bytes];
    for r in 0..rows {
        for c in 0..cols {
            let stored = (values[r * cols + c].clamp(-8, 7) + 8) as u8;
            out[r * row_bytes + c / 2] |= stored << (4 * (c % 2));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fp8::e4m3_to_f32;

    #[test]
    fn every_stored_nibble_is_its_integer_in_e4m3() {
        for stored in 0..16u8 {
            assert_eq!(
                e4m3_to_f32(E4M3_OF_STORED[stored as usize]),
                stored as f32 - 8.0
            );
        }
    }

    /// Odd column counts and rows that end inside a word: unpacking gives back what was packed.
    #[test]
    fn pack_and_unpack_round_trip() {
        for (rows, cols) in [(3, 1), (2, 7), (4, 8), (3, 13), (2, 48)] {
            let values: Vec<i8> = (0..rows * cols)
                .map(|i| ((i * 7 + 3) % 16) as i8 - 8)
                .collect();
            let words = pack(&values, rows, cols);
            assert_eq!(words.len(), rows * cols.div_ceil(8) * 4);
            let back: Vec<f32> = unpack_to_e4m3(&words, rows, cols)
                .into_iter()
                .map(e4m3_to_f32)
                .collect();
            let want: Vec<f32> = values.iter().map(|&v| v as f32).collect();
            assert_eq!(back, want, "{rows}x{cols}");
        }
    }

    /// The layout compressed-tensors 0.20 writes: value c at bits 4 * (c % 8) of word c / 8.
    #[test]
    fn word_layout_is_compressed_tensors() {
        let values: Vec<i8> = vec![-8, -7, 0, 1, 2, 3, 4, 7, -1];
        let words = pack(&values, 1, 9);
        let first = u32::from_le_bytes(words[0..4].try_into().unwrap());
        assert_eq!(first, 0xfcba_9810);
        assert_eq!(u32::from_le_bytes(words[4..8].try_into().unwrap()), 7);
    }

    fn kimi_thinking() -> Value {
        serde_json::json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "kv_cache_scheme": null,
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                       "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
            "config_groups": {"group_0": {"input_activations": null, "output_activations": null,
                "targets": ["Linear"], "weights": {"actorder": null, "block_structure": null,
                "dynamic": false, "group_size": 32, "num_bits": 4, "observer": "minmax",
                "observer_kwargs": {}, "strategy": "group", "symmetric": true, "type": "int"}}}
        })
    }

    #[test]
    fn kimi_k2_thinkings_scheme_reads_and_others_are_named() {
        assert_eq!(
            Int4Scheme::from_quantization_config(&kimi_thinking()),
            Ok(Some(Int4Scheme { group_size: 32 }))
        );
        let fp8 = serde_json::json!({"quant_method": "fp8"});
        assert_eq!(Int4Scheme::from_quantization_config(&fp8), Ok(None));
        let cases: [(&str, Value, &str); 6] = [
            ("/format", "float-quantized".into(), "float-quantized"),
            (
                "/config_groups/group_0/weights/num_bits",
                8.into(),
                "num_bits",
            ),
            (
                "/config_groups/group_0/weights/symmetric",
                false.into(),
                "symmetric",
            ),
            (
                "/config_groups/group_0/weights/actorder",
                "group".into(),
                "actorder",
            ),
            (
                "/config_groups/group_0/weights/group_size",
                0.into(),
                "group_size",
            ),
            (
                "/config_groups/group_0/input_activations",
                serde_json::json!({"num_bits": 8}),
                "activation",
            ),
        ];
        for (pointer, value, named) in cases {
            let mut q = kimi_thinking();
            *q.pointer_mut(pointer).unwrap() = value;
            let err = Int4Scheme::from_quantization_config(&q).unwrap_err();
            assert!(err.contains(named), "{pointer}: {err}");
        }
    }
}
