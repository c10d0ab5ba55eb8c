//! The NVRTC-compiled kernels (routed experts and the router's dense part) and their launch
//! shapes.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, LaunchConfig};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

use super::error::GpuError;

/// Kept in the repository and compiled for the device's own architecture at start-up.
pub const SOURCE: &str = include_str!("kernels.cu");

pub struct Kernels {
    pub gather_rows_bf16: CudaFunction,
    pub gather_rows_f32: CudaFunction,
    pub silu_mul_bf16: CudaFunction,
    pub silu_mul_f32: CudaFunction,
    pub scatter_weighted: CudaFunction,
    pub fill_uniform_bf16: CudaFunction,
    pub fill_uniform_f32: CudaFunction,
    pub fill_e4m3: CudaFunction,
    pub convert_f32_to_bf16: CudaFunction,
    pub gather_bf16_rows: CudaFunction,
    pub add_f32: CudaFunction,
    pub add_bias_rows: CudaFunction,
    pub rms_norm_heads: CudaFunction,
    pub rope_heads: CudaFunction,
    pub append_rows: CudaFunction,
    pub attention_rows: CudaFunction,
    pub moe_gate_topk: CudaFunction,
    pub combine_add: CudaFunction,
    pub gather_rows_bf16x2: CudaFunction,
    pub silu_mul_bf16x2: CudaFunction,
    pub convert_f32_to_bf16x2: CudaFunction,
    pub embed_rows_bf16: CudaFunction,
    pub gemm_rows_fp8: CudaFunction,
    pub grouped_gemm_rows_fp8: CudaFunction,
    pub gemm_rows_fp8_batched: CudaFunction,
    pub gemm_rows_exact_f32: CudaFunction,
    pub gemm_rows_exact_bf16: CudaFunction,
    pub grouped_gemm_rows_exact_f32: CudaFunction,
    pub grouped_gemm_rows_exact_bf16: CudaFunction,
    pub grouped_gate_up_silu_fp8: CudaFunction,
    pub grouped_gate_up_silu_exact_f32: CudaFunction,
    pub grouped_gate_up_silu_exact_bf16: CudaFunction,
    pub place_rows_f32: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub ranked_top_k_rows: CudaFunction,
    pub race_rows: CudaFunction,
    pub edit_logit_rows: CudaFunction,
    pub mask_logit_rows: CudaFunction,
    pub synthetic_e4m3: CudaFunction,
    pub plan_routes: CudaFunction,
    pub tensor_core_grouped_gemm_rows: CudaFunction,
    pub tensor_core_grouped_gate_up_silu: CudaFunction,
    pub tensor_core_grouped_gemm_rows_fp8: CudaFunction,
    pub tensor_core_grouped_gate_up_silu_fp8: CudaFunction,
    pub tensor_core_gemm_rows_fp8: CudaFunction,
}

/// Every kernel in [`SOURCE`], as loaded into [`Kernels`].
pub const KERNEL_NAMES: [&str; 45] = [
    "gather_rows_bf16",
    "gather_bf16_rows",
    "gather_rows_f32",
    "silu_mul_bf16",
    "silu_mul_f32",
    "scatter_weighted",
    "fill_uniform_bf16",
    "fill_uniform_f32",
    "fill_e4m3",
    "convert_f32_to_bf16",
    "add_f32",
    "add_bias_rows",
    "rms_norm_heads",
    "rope_heads",
    "append_rows",
    "attention_rows",
    "moe_gate_topk",
    "combine_add",
    "gather_rows_bf16x2",
    "silu_mul_bf16x2",
    "convert_f32_to_bf16x2",
    "embed_rows_bf16",
    "gemm_rows_fp8",
    "grouped_gemm_rows_fp8",
    "gemm_rows_fp8_batched",
    "gemm_rows_exact_f32",
    "gemm_rows_exact_bf16",
    "grouped_gemm_rows_exact_f32",
    "grouped_gemm_rows_exact_bf16",
    "grouped_gate_up_silu_fp8",
    "grouped_gate_up_silu_exact_f32",
    "grouped_gate_up_silu_exact_bf16",
    "place_rows_f32",
    "argmax_rows",
    "ranked_top_k_rows",
    "race_rows",
    "edit_logit_rows",
    "mask_logit_rows",
    "synthetic_e4m3",
    "plan_routes",
    "tensor_core_grouped_gemm_rows",
    "tensor_core_grouped_gate_up_silu",
    "tensor_core_grouped_gemm_rows_fp8",
    "tensor_core_grouped_gate_up_silu_fp8",
    "tensor_core_gemm_rows_fp8",
];

/// Compiles [`SOURCE`] to PTX for compute capability `capability` (NVRTC needs no GPU).
pub fn compile_ptx(capability: (i32, i32)) -> Result<Ptx, GpuError> {
    let (major, minor) = capability;
    compile_for(&format!("compute_{major}{minor}"))
}

/// Compiles [`SOURCE`] for `architecture` (`compute_90`: PTX only; `sm_90`: through the
/// assembler too, which is what checks the inline PTX of the tensor-core kernel).
fn compile_for(architecture: &str) -> Result<Ptx, GpuError> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::MissingLibrary("libnvrtc"));
    }
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture={architecture}")],
        name: Some("moe_kernels.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, options).map_err(|e| GpuError::Compile(e.to_string()))
}

impl Kernels {
    pub fn compile(ctx: &Arc<CudaContext>, capability: (i32, i32)) -> Result<Self, GpuError> {
        let module = ctx.load_module(compile_ptx(capability)?).map_err(|e| {
            if format!("{e:?}").contains("UNSUPPORTED_PTX_VERSION") {
                GpuError::Compile(format!(
                    "{e}: libnvrtc is newer than the driver; put the NVRTC of the driver's CUDA \
                     version first on LD_LIBRARY_PATH"
                ))
            } else {
                GpuError::Driver(e)
            }
        })?;
        let f = |name: &str| module.load_function(name);
        Ok(Self {
            gather_rows_bf16: f("gather_rows_bf16")?,
            gather_rows_f32: f("gather_rows_f32")?,
            silu_mul_bf16: f("silu_mul_bf16")?,
            silu_mul_f32: f("silu_mul_f32")?,
            scatter_weighted: f("scatter_weighted")?,
            fill_uniform_bf16: f("fill_uniform_bf16")?,
            fill_uniform_f32: f("fill_uniform_f32")?,
            fill_e4m3: f("fill_e4m3")?,
            convert_f32_to_bf16: f("convert_f32_to_bf16")?,
            gather_bf16_rows: f("gather_bf16_rows")?,
            add_f32: f("add_f32")?,
            add_bias_rows: f("add_bias_rows")?,
            rms_norm_heads: f("rms_norm_heads")?,
            rope_heads: f("rope_heads")?,
            append_rows: f("append_rows")?,
            attention_rows: f("attention_rows")?,
            moe_gate_topk: f("moe_gate_topk")?,
            combine_add: f("combine_add")?,
            gather_rows_bf16x2: f("gather_rows_bf16x2")?,
            silu_mul_bf16x2: f("silu_mul_bf16x2")?,
            convert_f32_to_bf16x2: f("convert_f32_to_bf16x2")?,
            embed_rows_bf16: f("embed_rows_bf16")?,
            gemm_rows_fp8: f("gemm_rows_fp8")?,
            grouped_gemm_rows_fp8: f("grouped_gemm_rows_fp8")?,
            gemm_rows_fp8_batched: f("gemm_rows_fp8_batched")?,
            gemm_rows_exact_f32: f("gemm_rows_exact_f32")?,
            gemm_rows_exact_bf16: f("gemm_rows_exact_bf16")?,
            grouped_gemm_rows_exact_f32: f("grouped_gemm_rows_exact_f32")?,
            grouped_gemm_rows_exact_bf16: f("grouped_gemm_rows_exact_bf16")?,
            grouped_gate_up_silu_fp8: f("grouped_gate_up_silu_fp8")?,
            grouped_gate_up_silu_exact_f32: f("grouped_gate_up_silu_exact_f32")?,
            grouped_gate_up_silu_exact_bf16: f("grouped_gate_up_silu_exact_bf16")?,
            place_rows_f32: f("place_rows_f32")?,
            argmax_rows: f("argmax_rows")?,
            ranked_top_k_rows: f("ranked_top_k_rows")?,
            race_rows: f("race_rows")?,
            edit_logit_rows: f("edit_logit_rows")?,
            mask_logit_rows: f("mask_logit_rows")?,
            synthetic_e4m3: f("synthetic_e4m3")?,
            plan_routes: f("plan_routes")?,
            tensor_core_grouped_gemm_rows: f("tensor_core_grouped_gemm_rows")?,
            tensor_core_grouped_gate_up_silu: f("tensor_core_grouped_gate_up_silu")?,
            tensor_core_grouped_gemm_rows_fp8: f("tensor_core_grouped_gemm_rows_fp8")?,
            tensor_core_grouped_gate_up_silu_fp8: f("tensor_core_grouped_gate_up_silu_fp8")?,
            tensor_core_gemm_rows_fp8: f("tensor_core_gemm_rows_fp8")?,
        })
    }
}

/// Threads per block of the grid-stride kernels.
const BLOCK: u32 = 256;
/// Enough blocks to fill any current GPU; the kernels stride over the rest.
const MAX_BLOCKS: usize = 65_536;

/// Launch shape of a grid-stride kernel over `total` elements.
pub fn grid(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks of a row kernel (`ROW_STRIDE` in kernels.cu) at most; more rows are strided over.
const MAX_ROW_BLOCKS: usize = 1 << 20;

/// Launch shape of a row kernel over `rows` rows: a block per row, `BLOCK` threads across it.
pub fn row_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, MAX_ROW_BLOCKS) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Kernel arguments are `int`; refuses sizes that do not fit instead of wrapping.
pub fn as_int(value: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(value).map_err(|_| GpuError::Shape(format!("{what} = {value} exceeds i32")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::PushKernelArg;

    /// NVRTC runs without a GPU, so the kernel source is checked wherever libnvrtc is: CI
    /// installs it (pip `nvidia-cuda-nvrtc`) and sets `MOE_REQUIRE_NVRTC=1`, so there a missing
    /// library fails the test instead of skipping it.
    #[test]
    fn kernels_compile_for_hopper_and_ampere() {
        if std::env::var_os("MOE_REQUIRE_NVRTC").is_none()
            // SAFETY: only tries to open the library.
            && !unsafe { cudarc::nvrtc::sys::is_culib_present() }
        {
            crate::test_support::report_skip(
                "libnvrtc not found, the kernels were not compiled (MOE_REQUIRE_NVRTC=1 makes this a failure)",
            );
            return;
        }
        for capability in [(9, 0), (8, 0)] {
            // Assembled as well: the driver would assemble the PTX only on a GPU.
            let (major, minor) = capability;
            compile_for(&format!("sm_{major}{minor}"))
                .unwrap_or_else(|e| panic!("assembling for {capability:?}: {e}"));
            let ptx = compile_ptx(capability).unwrap_or_else(|e| panic!("{capability:?}: {e}"));
            let text = ptx.to_src();
            for name in KERNEL_NAMES {
                assert!(
                    text.contains(&format!(".entry {name}(")),
                    "{name} missing from the PTX for {capability:?}"
                );
            }
        }
        // Below 8.0 the tensor-core kernel compiles to a trap (the host never picks it there).
        compile_for("sm_75").unwrap_or_else(|e| panic!("assembling for (7, 5): {e}"));
    }

    /// CUDA graphs through cudarc on this driver (the groundwork for decode steps as graphs):
    /// launches queued while the stream captures do not run; the instantiated graph runs them
    /// on the buffers as they are when it is launched, each launch again.
    #[test]
    fn a_captured_launch_replays_on_the_buffers_of_the_moment() {
        let Some(ctx) = crate::test_support::test_context(crate::device::GpuDtype::F32) else {
            return;
        };
        let _serial = ctx.lock().unwrap();
        let stream = ctx.stream();
        let n = 1000usize;
        let mut acc = stream.clone_htod(&vec![0f32; n]).unwrap();
        let x = stream.clone_htod(&vec![1.5f32; n]).unwrap();
        let n_i = n as i64;
        let graph = ctx
            .capture_graph::<GpuError>(|| {
                for _ in 0..2 {
                    // SAFETY: acc and x hold n values.
                    unsafe {
                        stream
                            .launch_builder(&ctx.kernels().add_f32)
                            .arg(&mut acc)
                            .arg(&x)
                            .arg(&n_i)
                            .launch(grid(n))?;
                    }
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(
            stream.clone_dtoh(&acc).unwrap(),
            vec![0.0; n],
            "ran while captured"
        );
        for launch in 1..=3 {
            graph.launch().unwrap();
            let want = vec![3.0 * launch as f32; n];
            assert_eq!(stream.clone_dtoh(&acc).unwrap(), want, "launch {launch}");
        }
    }

    #[test]
    fn launch_shapes_cover_every_element_within_the_grid_limit() {
        assert_eq!(grid(0).grid_dim.0, 1);
        assert_eq!(grid(256).grid_dim.0, 1);
        assert_eq!(grid(257).grid_dim.0, 2);
        // DeepSeek-V3 at 8192 tokens x top-8: 65536 x 7168 elements, strided by the kernels.
        assert_eq!(grid(65_536 * 7168).grid_dim.0, MAX_BLOCKS as u32);
        assert_eq!(row_grid(0).grid_dim.0, 1);
        assert_eq!(row_grid(65_536).grid_dim.0, 65_536);
        assert_eq!(row_grid(usize::MAX).grid_dim.0, MAX_ROW_BLOCKS as u32);
        assert!(as_int(usize::MAX, "x").is_err());
        assert_eq!(as_int(7168, "hidden").unwrap(), 7168);
    }
}
