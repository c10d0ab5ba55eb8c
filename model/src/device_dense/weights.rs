//! A dense-part matrix made of checkpoint tensors, as the device holds it: FP8 tensors kept as
//! FP8 (bytes and block scales) where the device keeps them ([`DenseOps::keeps_fp8`]), every
//! other tensor widened to f32 and uploaded in its [`MatrixPrecision`].

use super::ops::DenseOps;
use crate::backend::weight::Fp8Matrix;
use crate::backend::NativeWeight;
use crate::checkpoint::{Checkpoint, WeightsDtype};
use crate::device::MatrixPrecision;
use crate::error::{ModelError, Result};

/// `parts` (checkpoint names, each `[rows, cols]`) stacked row-wise into one `[Σ rows, cols]`
/// matrix: a fused projection (gate with up, MLA's query input with its KV input).
pub fn upload_stacked<O: DenseOps>(
    ops: &O,
    ckpt: &Checkpoint,
    parts: &[(&str, usize)],
    cols: usize,
) -> Result<O::Matrix>
where
    ModelError: From<O::Error>,
{
    let names: Vec<&str> = parts.iter().map(|&(name, _)| name).collect();
    // `load_native` follows the process's `--weights-dtype`; only "as stored" means FP8 bytes.
    if ops.keeps_fp8() && ckpt.weights_dtype() == WeightsDtype::AsStored {
        let natives = parts
            .iter()
            .map(|&(name, rows)| ckpt.load_native(name, &[rows, cols]))
            .collect::<Result<Vec<_>>>()?;
        let fp8: Option<Vec<&Fp8Matrix>> = natives
            .iter()
            .map(|w| match w {
                NativeWeight::Fp8(m) => Some(m),
                _ => None,
            })
            .collect();
        if let Some(stack) = fp8.and_then(|parts| Fp8Matrix::stacked(&parts)) {
            return Ok(ops.upload_fp8(&stack)?);
        }
        // Not all FP8, or FP8 on other column blocks: widened, as without `keeps_fp8`.
        let values: Vec<f32> = natives.iter().flat_map(NativeWeight::to_f32).collect();
        return Ok(ops.upload_matrix(&values, MatrixPrecision::of(ckpt, &names))?);
    }
    let mut values = Vec::new();
    for &(name, rows) in parts {
        values.extend(ckpt.load_f32(name, &[rows, cols])?);
    }
    Ok(ops.upload_matrix(&values, MatrixPrecision::of(ckpt, &names))?)
}
