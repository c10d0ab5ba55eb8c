//! How a layer's hidden rows travel to a node over the collective: f32, or bf16 for a node
//! whose experts round every input row to bf16 before their first GEMM anyway (a GPU node in
//! `--gpu-dtype bf16`). The router rounds as the node's kernel would (to nearest, ties to even),
//! so the node's GEMMs see the same bf16 values and its outputs are bitwise those of f32 rows,
//! for half the bytes. Outputs always come back in f32 (they are sums the router adds in f32).

use serde::{Deserialize, Serialize};

/// The element type of the rows one node receives (published by the node, in its
/// [`crate::NodeRecord`], as `rows_on_wire`; nodes that predate it take f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowEncoding {
    #[default]
    F32,
    Bf16,
}

impl RowEncoding {
    /// Every node takes f32 rows; bf16 only where its experts round their inputs to bf16.
    pub fn for_experts(experts: &dyn moe_model::experts::ExpertBackend) -> Self {
        if experts.reads_rows_as_bf16() {
            RowEncoding::Bf16
        } else {
            RowEncoding::F32
        }
    }

    /// What a node on `device` publishes before it holds any experts of the checkpoint in
    /// `model_dir`, FP8 held as `fp8` says (see
    /// [`moe_model::experts::ExpertDevice::rounds_expert_rows_to_bf16`]); it checks its held
    /// experts again for every layer that comes in bf16.
    pub fn for_device(
        device: &moe_model::experts::ExpertDevice,
        fp8: moe_model::device::GpuFp8,
        model_dir: &std::path::Path,
    ) -> Self {
        let fp8_block_cols = moe_model::checkpoint::fp8_block_of(model_dir).map(|(_, cols)| cols);
        if device.rounds_expert_rows_to_bf16(fp8, fp8_block_cols) {
            RowEncoding::Bf16
        } else {
            RowEncoding::F32
        }
    }

    pub fn elem_bytes(self) -> usize {
        match self {
            RowEncoding::F32 => 4,
            RowEncoding::Bf16 => 2,
        }
    }

    /// The byte a layer header carries for it.
    pub fn code(self) -> u8 {
        match self {
            RowEncoding::F32 => 0,
            RowEncoding::Bf16 => 1,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(RowEncoding::F32),
            1 => Some(RowEncoding::Bf16),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RowEncoding::F32 => "f32",
            RowEncoding::Bf16 => "bf16",
        }
    }

    /// Appends `values` in this encoding, little-endian (bf16: rounded to nearest even, NaN
    /// kept a NaN, as the GPU's conversion kernel does).
    pub fn extend_bytes(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.elem_bytes());
        match self {
            RowEncoding::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            RowEncoding::Bf16 => out.extend(
                values
                    .iter()
                    .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()),
            ),
        }
    }

    /// The f32 values of bytes in this encoding (bf16 widens exactly); `None` when the length
    /// is not a whole number of elements.
    pub fn decode(self, bytes: &[u8]) -> Option<Vec<f32>> {
        if !bytes.len().is_multiple_of(self.elem_bytes()) {
            return None;
        }
        Some(match self {
            RowEncoding::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            RowEncoding::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
                .collect(),
        })
    }
}

impl std::fmt::Display for RowEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_and_bf16_rounds_to_nearest_even() {
        let values = [1.0f32, -2.5, 1.0 + f32::EPSILON, 3.0e-39, f32::MAX, 0.1];
        let mut f32_bytes = Vec::new();
        RowEncoding::F32.extend_bytes(&values, &mut f32_bytes);
        assert_eq!(RowEncoding::F32.decode(&f32_bytes).unwrap(), values);

        let mut bf16_bytes = Vec::new();
        RowEncoding::Bf16.extend_bytes(&values, &mut bf16_bytes);
        assert_eq!(bf16_bytes.len(), 2 * values.len());
        let back = RowEncoding::Bf16.decode(&bf16_bytes).unwrap();
        for (v, b) in values.iter().zip(&back) {
            // The GPU kernel's rounding: add 0x7fff plus the kept lowest bit, truncate.
            let u = v.to_bits();
            let want = f32::from_bits(((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16);
            assert_eq!(b.to_bits(), want.to_bits(), "{v}");
        }
        // Ties go to even: 1 + 2^-8 lies halfway between two bf16 values and rounds down.
        let tie = [1.0f32 + 1.0 / 256.0];
        let mut tie_bytes = Vec::new();
        RowEncoding::Bf16.extend_bytes(&tie, &mut tie_bytes);
        assert_eq!(RowEncoding::Bf16.decode(&tie_bytes).unwrap(), [1.0]);
        let mut nan = Vec::new();
        RowEncoding::Bf16.extend_bytes(&[f32::NAN], &mut nan);
        assert!(RowEncoding::Bf16.decode(&nan).unwrap()[0].is_nan());
    }

    #[test]
    fn codes_and_lengths_are_checked() {
        for e in [RowEncoding::F32, RowEncoding::Bf16] {
            assert_eq!(RowEncoding::from_code(e.code()), Some(e));
        }
        assert_eq!(RowEncoding::from_code(2), None);
        assert_eq!(RowEncoding::Bf16.decode(&[0; 3]), None);
        assert_eq!(RowEncoding::F32.decode(&[0; 6]), None);
        let json = serde_json::to_string(&RowEncoding::Bf16).unwrap();
        assert_eq!(json, "\"bf16\"");
    }
}
