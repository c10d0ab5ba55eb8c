//! The gated SiLU MLP used for dense layers, shared experts and routed experts:
//! `down(silu(gate(x)) * up(x))`, with gate and up fused into one GEMM.

use crate::backend::{ops, InputRows, PackedMatrix};
use crate::checkpoint::Checkpoint;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Mlp {
    /// `[2 * intermediate, hidden]`: gate rows then up rows.
    gate_up: PackedMatrix,
    /// `[hidden, intermediate]`.
    down: PackedMatrix,
    intermediate: usize,
}

/// The checkpoint names of one MLP's three projections.
pub struct MlpNames {
    pub gate: String,
    pub up: String,
    pub down: String,
}

impl MlpNames {
    /// `{prefix}.gate_proj.weight` etc. (DeepSeek, Qwen3 and Llama-style names).
    pub fn proj(prefix: &str) -> Self {
        Self {
            gate: format!("{prefix}.gate_proj.weight"),
            up: format!("{prefix}.up_proj.weight"),
            down: format!("{prefix}.down_proj.weight"),
        }
    }

    /// Mixtral's `w1` (gate), `w3` (up), `w2` (down).
    pub fn mixtral(prefix: &str) -> Self {
        Self {
            gate: format!("{prefix}.w1.weight"),
            up: format!("{prefix}.w3.weight"),
            down: format!("{prefix}.w2.weight"),
        }
    }
}

impl Mlp {
    pub fn load(
        ckpt: &Checkpoint,
        names: &MlpNames,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let gate = ckpt.load_native(&names.gate, &[intermediate, hidden])?;
        let up = ckpt.load_native(&names.up, &[intermediate, hidden])?;
        let down = ckpt.load_native(&names.down, &[hidden, intermediate])?;
        Ok(Self {
            gate_up: PackedMatrix::from_native(&[&gate, &up], hidden),
            down: PackedMatrix::from_native(&[&down], intermediate),
            intermediate,
        })
    }

    pub fn from_weights(
        gate: &[f32],
        up: &[f32],
        down: &[f32],
        hidden: usize,
        intermediate: usize,
    ) -> Self {
        Self {
            gate_up: PackedMatrix::from_stacked(&[gate, up], hidden),
            down: PackedMatrix::from_rows(down, hidden, intermediate),
            intermediate,
        }
    }

    /// `x` is `[m, hidden]`; returns `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let hidden = self.gate_up.cols();
        assert_eq!(
            x.len(),
            m * hidden,
            "input length does not match [m, hidden]"
        );
        self.forward_rows(InputRows::contiguous(x, hidden), m)
    }

    /// [`Self::forward`] on `m` rows read where they lie (an expert's rows of a whole batch).
    pub fn forward_rows(&self, x: InputRows<'_>, m: usize) -> Vec<f32> {
        let gate_up = self.gate_up.matmul_rows(x, m);
        let act = ops::silu_and_mul(&gate_up, self.intermediate);
        self.down.matmul(&act, m)
    }

    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}
