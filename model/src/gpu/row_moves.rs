//! Rows moved between a dense part's buffer and a transport's buffers on the device: each
//! node's rows gathered for sending, its outputs placed back in the layer's pair order (the
//! router's device-resident dispatch). Launched on the caller's stream (the transport's);
//! cudarc orders them after the writes of the buffers they read, on any stream of the context.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, PushKernelArg};

use super::context::GpuContext;
use super::error::GpuError;
use super::kernels::{as_int, row_grid};

fn bounds(what: &str) -> GpuError {
    GpuError::Shape(format!("row move out of bounds: {what}"))
}

/// Rows `index` of `rows` (`[n, hidden]`), in that order, in a new `[index.len(), hidden]`.
pub fn gather_rows(
    ctx: &GpuContext,
    stream: &Arc<CudaStream>,
    rows: &CudaSlice<f32>,
    index: &[u32],
    hidden: usize,
) -> Result<CudaSlice<f32>, GpuError> {
    let n = rows.len().checked_div(hidden).unwrap_or(0);
    if index.iter().any(|&r| r as usize >= n) {
        return Err(bounds("a gathered row beyond the rows"));
    }
    let mut out = stream.alloc_zeros::<f32>((index.len() * hidden).max(1))?;
    if index.is_empty() || hidden == 0 {
        return Ok(out);
    }
    let index_dev = stream.clone_htod(index)?;
    let (count, width) = (as_int(index.len(), "rows")?, as_int(hidden, "hidden")?);
    // SAFETY: every index is a row of `rows` (checked above) and `out` holds `index.len()`
    // rows of `hidden`.
    unsafe {
        stream
            .launch_builder(&ctx.kernels().gather_rows_f32)
            .arg(rows)
            .arg(&index_dev)
            .arg(&mut out)
            .arg(&count)
            .arg(&width)
            .launch(row_grid(index.len()))?;
    }
    Ok(out)
}

/// `dst[index[i]] = src[i]` for every row `i` of `src`'s first `index.len()` rows.
pub fn place_rows(
    ctx: &GpuContext,
    stream: &Arc<CudaStream>,
    src: &CudaSlice<f32>,
    index: &[u32],
    hidden: usize,
    dst: &mut CudaSlice<f32>,
) -> Result<(), GpuError> {
    let n = dst.len().checked_div(hidden).unwrap_or(0);
    if src.len() < index.len() * hidden || index.iter().any(|&r| r as usize >= n) {
        return Err(bounds("a placed row beyond the outputs"));
    }
    if index.is_empty() || hidden == 0 {
        return Ok(());
    }
    let index_dev = stream.clone_htod(index)?;
    let (count, width) = (as_int(index.len(), "rows")?, as_int(hidden, "hidden")?);
    // SAFETY: `src` holds `index.len()` rows and every index is a row of `dst` (checked above).
    unsafe {
        stream
            .launch_builder(&ctx.kernels().place_rows_f32)
            .arg(src)
            .arg(&index_dev)
            .arg(dst)
            .arg(&count)
            .arg(&width)
            .launch(row_grid(index.len()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::GpuDtype;

    /// Gathered rows come out in index order, placed rows land at their index, on a stream
    /// other than the context's own (as the transport's is). Needs a GPU (skipped without
    /// one; `MOE_REQUIRE_GPU=1` fails instead).
    #[test]
    fn gpu_rows_gather_and_place_on_another_stream() {
        let Some(ctx) = crate::test_support::test_context(GpuDtype::F32) else {
            return;
        };
        let side = ctx.stream().context().new_stream().unwrap();
        let hidden = 3;
        let host: Vec<f32> = (0..4 * hidden).map(|v| v as f32).collect();
        let rows = ctx.stream().clone_htod(&host).unwrap();
        let gathered = gather_rows(&ctx, &side, &rows, &[3, 1], hidden).unwrap();
        let got = side.clone_dtoh(&gathered).unwrap();
        assert_eq!(got, [9.0, 10.0, 11.0, 3.0, 4.0, 5.0]);
        let mut out = side.alloc_zeros::<f32>(3 * hidden).unwrap();
        place_rows(&ctx, &side, &gathered, &[2, 0], hidden, &mut out).unwrap();
        let got = side.clone_dtoh(&out).unwrap();
        assert_eq!(got, [3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 9.0, 10.0, 11.0]);
        assert!(gather_rows(&ctx, &side, &rows, &[4], hidden).is_err());
        assert!(place_rows(&ctx, &side, &gathered, &[3], hidden, &mut out).is_err());
    }
}
