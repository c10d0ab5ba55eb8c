//! A host reference of every [`DenseOps`] step, written from the steps' definitions (GEMMs by
//! cuBLAS's column-major rules, f64 accumulation), and the tests that run the device
//! orchestration over it against the CPU model on the bundled fixtures. It is the definition
//! the CUDA steps are tested against on a GPU, and with [`HostDenseOps::with_numerics`] it
//! predicts, on any machine, what the GPU's bf16 modes do to the logits (weights rounded to
//! bf16, GEMM inputs to bf16 or to `hi + lo` bf16 terms, f32 accumulation and outputs, the gate
//! in f32).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::ops::{DenseOps, DeviceStep, SegmentKey};
use crate::backend::weight::Fp8Matrix;
use crate::device::shapes::{AttentionSpec, HeadView, StridedGemm};
use crate::device::{GpuDtype, MatrixPrecision};
use crate::error::ModelError;
use crate::expert_backend::ExpertBackend;
use crate::layers::gate::GateRule;
use crate::logit_adjust::RowEdits;
use crate::race::RowRace;
use crate::routes::ExpertRoutes;
use crate::token_mask::RowMask;

pub struct HostDenseOps {
    numerics: GpuDtype,
    /// Hand MoE rows to the expert backend where they lie, as a GPU does for an expert set on
    /// the same device ([`DenseOps::experts_in_place`]); otherwise they go through "host"
    /// copies, as to expert nodes.
    experts_in_place: bool,
    /// Values copied to the "host", so tests can see which path a step took.
    downloaded: AtomicUsize,
    /// Index buffers copied from the "host" (each a copy a GPU would queue).
    index_uploads: AtomicUsize,
    /// Hold FP8 checkpoint matrices as FP8 (`--gpu-fp8 keep`): exactly dequantized here, as
    /// the GPU's FP8 kernel widens each weight.
    keeps_fp8: bool,
    fp8_matrices: AtomicUsize,
    /// Decode steps run as segments ([`DenseOps::run_segment`]), as with CUDA graphs: each
    /// segment's key, in the order run.
    segments: Option<std::sync::Mutex<Vec<SegmentKey>>>,
    /// Run routed experts from the gate's choices, planned as the device plans them
    /// ([`crate::device::route_plan`]), inside segments ([`DenseOps::run_chosen_experts`]).
    experts_follow_choices: bool,
}

impl HostDenseOps {
    /// f32 throughout (the GPU's f32 mode, and the CPU model's precision).
    pub fn exact() -> Self {
        Self::with_numerics(GpuDtype::F32)
    }

    /// The numerics of a GPU mode: bf16 weights and bf16 (or `hi + lo` bf16) GEMM inputs.
    pub fn with_numerics(numerics: GpuDtype) -> Self {
        Self {
            numerics,
            experts_in_place: false,
            downloaded: AtomicUsize::new(0),
            index_uploads: AtomicUsize::new(0),
            keeps_fp8: false,
            fp8_matrices: AtomicUsize::new(0),
            segments: None,
            experts_follow_choices: false,
        }
    }

    /// FP8 checkpoint matrices held as FP8, as `--gpu-fp8 keep` holds them on a GPU.
    pub fn with_fp8_kept(mut self) -> Self {
        self.keeps_fp8 = true;
        self
    }

    /// Matrices uploaded as FP8 so far.
    pub fn fp8_matrices(&self) -> usize {
        self.fp8_matrices.load(Ordering::Relaxed)
    }

    /// MoE rows go to the expert backend in place, as to an expert set on the same GPU.
    pub fn with_experts_in_place(mut self) -> Self {
        self.experts_in_place = true;
        self
    }

    /// Decode steps run as replayed segments (the orchestration CUDA graphs take), their keys
    /// kept ([`Self::segments_run`]).
    pub fn with_segments(mut self) -> Self {
        self.segments = Some(std::sync::Mutex::new(Vec::new()));
        self
    }

    /// Routed experts from the gate's choices inside segments
    /// ([`DenseOps::experts_follow_choices`]), as a GPU with FP8 or exact expert kernels.
    pub fn with_experts_following_choices(mut self) -> Self {
        self.experts_follow_choices = true;
        self
    }

    /// The keys of the segments run so far, in order.
    pub fn segments_run(&self) -> Vec<SegmentKey> {
        self.segments
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Values downloaded so far.
    pub fn downloaded(&self) -> usize {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Index buffers uploaded so far.
    pub fn index_uploads(&self) -> usize {
        self.index_uploads.load(Ordering::Relaxed)
    }
}

/// A matrix as the device holds it (already rounded when bf16), and how GEMM inputs against
/// it are rounded.
pub struct HostMatrix {
    values: Vec<f32>,
    inputs: GpuDtype,
}

/// Round to nearest even bf16, back in f32 (the GPU's conversion kernel).
pub fn round_bf16(values: &mut [f32]) {
    for v in values {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}

/// `hi + lo` with both terms bf16 (the GPU's bf16x2 conversion), summed back in f32.
pub fn split_bf16x2(values: &mut [f32]) {
    for v in values {
        let hi = half::bf16::from_f32(*v).to_f32();
        *v = hi + half::bf16::from_f32(*v - hi).to_f32();
    }
}

/// What a GEMM input goes through in the `numerics` mode.
pub fn round_gemm_input(values: &mut [f32], numerics: GpuDtype) {
    match numerics {
        GpuDtype::F32 => {}
        GpuDtype::Bf16 => round_bf16(values),
        GpuDtype::Bf16x2 => split_bf16x2(values),
    }
}

fn at(view: HeadView, r: usize, h: usize) -> usize {
    view.offset + r * view.row_stride + h * view.head_stride
}

/// `dst[..values.len()] = values`.
fn write_prefix<T: Copy>(values: &[T], dst: &mut [T]) -> Result<(), ModelError> {
    let Some(d) = dst.get_mut(..values.len()) else {
        return Err(ModelError::InvalidRequest("a write past its buffer".into()));
    };
    d.copy_from_slice(values);
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<(), ModelError> {
    if ok {
        Ok(())
    } else {
        Err(ModelError::InvalidRequest(format!("out of bounds: {what}")))
    }
}

impl DenseOps for HostDenseOps {
    type F32 = Vec<f32>;
    type Matrix = HostMatrix;
    type Index = Vec<u32>;
    type Error = ModelError;

    fn upload_f32(&self, values: &[f32]) -> Result<Vec<f32>, ModelError> {
        Ok(values.to_vec())
    }
    fn upload_index(&self, values: &[u32]) -> Result<Vec<u32>, ModelError> {
        self.index_uploads.fetch_add(1, Ordering::Relaxed);
        Ok(values.to_vec())
    }
    fn upload_matrix(
        &self,
        values: &[f32],
        precision: MatrixPrecision,
    ) -> Result<HostMatrix, ModelError> {
        let inputs = if precision.in_bf16(self.numerics) {
            self.numerics
        } else {
            GpuDtype::F32
        };
        let mut values = values.to_vec();
        if inputs.bf16_weights() {
            round_bf16(&mut values);
        }
        Ok(HostMatrix { values, inputs })
    }
    fn keeps_fp8(&self) -> bool {
        self.keeps_fp8
    }
    fn upload_fp8(&self, matrix: &Fp8Matrix) -> Result<HostMatrix, ModelError> {
        self.upload_fp8_heads(std::slice::from_ref(matrix))
    }
    fn upload_fp8_heads(&self, heads: &[Fp8Matrix]) -> Result<HostMatrix, ModelError> {
        self.fp8_matrices.fetch_add(1, Ordering::Relaxed);
        let values: Vec<f32> = heads.iter().flat_map(Fp8Matrix::to_f32).collect();
        self.upload_matrix(&values, MatrixPrecision::F32)
    }
    fn len_of(&self, buffer: &Vec<f32>) -> usize {
        buffer.len()
    }
    fn download(&self, buffer: &Vec<f32>, len: usize) -> Result<Vec<f32>, ModelError> {
        check(len <= buffer.len(), "download")?;
        self.downloaded.fetch_add(len, Ordering::Relaxed);
        Ok(buffer[..len].to_vec())
    }
    fn experts_in_place(
        &self,
        experts: &dyn ExpertBackend,
        layer: usize,
        rows: &Vec<f32>,
        routes: &ExpertRoutes,
    ) -> Option<crate::error::Result<Vec<f32>>> {
        self.experts_in_place
            .then(|| experts.run_experts(layer, rows, routes))
    }
    fn experts_follow_choices(
        &self,
        _experts: &dyn ExpertBackend,
        _layer: usize,
        _num_experts: usize,
    ) -> crate::error::Result<bool> {
        Ok(self.experts_follow_choices)
    }
    fn run_chosen_experts(
        &self,
        experts: &dyn ExpertBackend,
        layer: usize,
        normed: &Vec<f32>,
        chosen: &Vec<u32>,
        chosen_weights: &Vec<f32>,
        rows: usize,
        top_k: usize,
        hidden: usize,
        pair_out: &mut Vec<f32>,
    ) -> crate::error::Result<()> {
        let pairs = rows * top_k;
        let (Some(chosen), Some(weights)) = (chosen.get(..pairs), chosen_weights.get(..pairs))
        else {
            return Err(ModelError::InvalidRequest(
                "choices past their buffers".into(),
            ));
        };
        let num_experts = chosen.iter().max().map_or(0, |&e| e as usize + 1);
        let planned =
            crate::device::route_plan::plan_choices(chosen, weights, rows, top_k, num_experts, 8)
                .map_err(|e| ModelError::InvalidRequest(e.to_string()))?;
        let routes = ExpertRoutes {
            offsets: (0..=rows).map(|r| (r * top_k) as u32).collect(),
            experts: planned.pair_expert,
            weights: planned.pair_weight,
        };
        let Some(own_rows) = normed.get(..rows * hidden) else {
            return Err(ModelError::InvalidRequest("rows past their buffer".into()));
        };
        let out = experts.run_experts(layer, own_rows, &routes)?;
        match pair_out.get_mut(..out.len()) {
            Some(dst) => dst.copy_from_slice(&out),
            None => return Err(ModelError::InvalidRequest("pairs past their buffer".into())),
        }
        Ok(())
    }
    fn scratch(&self, len: usize) -> Result<Vec<f32>, ModelError> {
        Ok(vec![f32::NAN; len])
    }
    fn copy_prefix(
        &self,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        len: usize,
    ) -> Result<(), ModelError> {
        check(len <= src.len() && len <= dst.len(), "copy")?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }
    fn gemm_input(
        &self,
        x: &Vec<f32>,
        len: usize,
        like: &HostMatrix,
    ) -> Result<HostMatrix, ModelError> {
        check(len <= x.len(), "gemm input")?;
        let mut values = x[..len].to_vec();
        round_gemm_input(&mut values, like.inputs);
        Ok(HostMatrix {
            values,
            inputs: like.inputs,
        })
    }
    fn gemm(
        &self,
        s: &StridedGemm,
        a: &HostMatrix,
        a_offset: usize,
        b: &HostMatrix,
        b_offset: usize,
        c: &mut Vec<f32>,
        c_offset: usize,
    ) -> Result<(), ModelError> {
        let (a, b) = (&a.values, &b.values);
        let (a_end, b_end, c_end) = s.extents();
        check(a_offset + a_end <= a.len(), "A")?;
        check(b_offset + b_end <= b.len(), "B")?;
        check(c_offset + c_end <= c.len(), "C")?;
        let g = &s.gemm;
        for batch in 0..s.batch {
            let (ao, bo, co) = (
                a_offset + batch * s.stride_a,
                b_offset + batch * s.stride_b,
                c_offset + batch * s.stride_c,
            );
            for j in 0..g.n {
                for i in 0..g.m {
                    let mut acc = 0.0f64;
                    for l in 0..g.k {
                        let x = if g.transpose_a {
                            a[ao + l + i * g.lda]
                        } else {
                            a[ao + i + l * g.lda]
                        };
                        let y = if g.transpose_b {
                            b[bo + j + l * g.ldb]
                        } else {
                            b[bo + l + j * g.ldb]
                        };
                        acc += x as f64 * y as f64;
                    }
                    c[co + i + j * g.ldc] = acc as f32;
                }
            }
        }
        Ok(())
    }
    fn rms_norm(
        &self,
        x: &Vec<f32>,
        x_view: HeadView,
        weight: &Vec<f32>,
        out: &mut Vec<f32>,
        out_view: HeadView,
        rows: usize,
        heads: usize,
        width: usize,
        eps: f32,
    ) -> Result<(), ModelError> {
        check(x_view.end(rows, heads, width) <= x.len(), "norm in")?;
        check(out_view.end(rows, heads, width) <= out.len(), "norm out")?;
        check(weight.len() == width, "norm weight")?;
        for r in 0..rows {
            for h in 0..heads {
                let (xi, oi) = (at(x_view, r, h), at(out_view, r, h));
                let v = &x[xi..xi + width];
                let mean = v.iter().map(|&a| a as f64 * a as f64).sum::<f64>() / width as f64;
                let inv = 1.0 / (mean + eps as f64).sqrt();
                for c in 0..width {
                    out[oi + c] = (v[c] as f64 * inv * weight[c] as f64) as f32;
                }
            }
        }
        Ok(())
    }
    fn rope(
        &self,
        x: &Vec<f32>,
        x_view: HeadView,
        out: &mut Vec<f32>,
        out_view: HeadView,
        heads: usize,
        width: usize,
        interleaved: bool,
        step: &DeviceStep<Self>,
    ) -> Result<(), ModelError> {
        let half = step.rope_half;
        check(2 * half <= width, "rope width")?;
        check(x_view.end(step.rows, heads, width) <= x.len(), "rope in")?;
        check(
            out_view.end(step.rows, heads, width) <= out.len(),
            "rope out",
        )?;
        for r in 0..step.rows {
            for h in 0..heads {
                let (xi, oi) = (at(x_view, r, h), at(out_view, r, h));
                for i in 0..half {
                    let (x1, x2) = if interleaved {
                        (x[xi + 2 * i], x[xi + 2 * i + 1])
                    } else {
                        (x[xi + i], x[xi + half + i])
                    };
                    let (cos, sin) = (step.cos[r * half + i], step.sin[r * half + i]);
                    out[oi + i] = x1 * cos - x2 * sin;
                    out[oi + half + i] = x2 * cos + x1 * sin;
                }
                let pass = 2 * half..width;
                out[oi + pass.start..oi + pass.end]
                    .copy_from_slice(&x[xi + pass.start..xi + pass.end]);
            }
        }
        Ok(())
    }
    fn silu_mul(
        &self,
        gate_up: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        inter: usize,
    ) -> Result<(), ModelError> {
        let done = crate::backend::ops::silu_and_mul(&gate_up[..rows * 2 * inter], inter);
        out[..rows * inter].copy_from_slice(&done);
        Ok(())
    }
    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>, len: usize) -> Result<(), ModelError> {
        for (a, b) in acc[..len].iter_mut().zip(&x[..len]) {
            *a += b;
        }
        Ok(())
    }
    fn add_bias(
        &self,
        acc: &mut Vec<f32>,
        bias: &Vec<f32>,
        rows: usize,
        width: usize,
    ) -> Result<(), ModelError> {
        check(acc.len() >= rows * width && bias.len() >= width, "bias")?;
        for row in acc[..rows * width].chunks_exact_mut(width.max(1)) {
            for (a, b) in row.iter_mut().zip(bias) {
                *a += b;
            }
        }
        Ok(())
    }
    fn append_rows(
        &self,
        src: &Vec<f32>,
        src_view: HeadView,
        width: usize,
        chunks: &mut [Vec<f32>],
        cache_stride: usize,
        cache_offset: usize,
        step: &DeviceStep<Self>,
    ) -> Result<(), ModelError> {
        let blocks = &step.blocks;
        for r in 0..step.rows {
            let start = blocks.table_start[step.row_seq[r] as usize] as usize;
            let pos = step.row_pos[r] as usize;
            let (chunk, row) = blocks.locate(&blocks.table, start, pos, cache_stride);
            let chunk = chunks
                .get_mut(chunk)
                .ok_or_else(|| ModelError::InvalidRequest("out of bounds: cache chunk".into()))?;
            let at_cache = row + cache_offset;
            check(at_cache + width <= chunk.len(), "append")?;
            let at_src = at(src_view, r, 0);
            chunk[at_cache..at_cache + width].copy_from_slice(&src[at_src..at_src + width]);
        }
        Ok(())
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        spec: &AttentionSpec,
        key_chunks: &[Vec<f32>],
        value_chunks: &[Vec<f32>],
        out: &mut Vec<f32>,
        step: &DeviceStep<Self>,
    ) -> Result<(), ModelError> {
        let group = spec.heads / spec.kv_heads;
        let blocks = &step.blocks;
        // Position j's key row and value row of the sequence whose blocks start at `start`.
        let key_row = |start: usize, j: usize| {
            let (chunk, row) = blocks.locate(&blocks.table, start, j, spec.key_stride);
            &key_chunks[chunk][row..]
        };
        let value_row = |start: usize, j: usize| {
            let (chunk, row) = blocks.locate(&blocks.table, start, j, spec.value_stride);
            &value_chunks[chunk][row..]
        };
        for r in 0..step.rows {
            let start = blocks.table_start[step.row_seq[r] as usize] as usize;
            let visible = step.row_pos[r] as usize + 1;
            for h in 0..spec.heads {
                let kvh = h / group;
                let qh = &q[(r * spec.heads + h) * spec.dk..][..spec.dk];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let k = &key_row(start, j)[kvh * spec.key_head_stride..][..spec.dk];
                        qh.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * spec.scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exp: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = exp.iter().sum();
                let o = &mut out[(r * spec.heads + h) * spec.dv..][..spec.dv];
                for (c, o) in o.iter_mut().enumerate() {
                    let mut acc = 0.0f64;
                    for (j, p) in exp.iter().enumerate() {
                        acc += p * value_row(start, j)[kvh * spec.value_head_stride + c] as f64;
                    }
                    *o = (acc / sum) as f32;
                }
            }
        }
        Ok(())
    }
    fn top_k(
        &self,
        logits: &Vec<f32>,
        correction_bias: Option<&Vec<f32>>,
        rule: &GateRule,
        rows: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), ModelError> {
        let routes = rule.select(
            &logits[..rows * rule.num_experts],
            correction_bias.map(|b| b.as_slice()),
        );
        Ok((routes.experts, routes.weights))
    }
    fn top_k_into(
        &self,
        logits: &Vec<f32>,
        correction_bias: Option<&Vec<f32>>,
        rule: &GateRule,
        rows: usize,
        experts: &mut Vec<u32>,
        weights: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let (chosen, chosen_weights) = self.top_k(logits, correction_bias, rule, rows)?;
        self.write_index(&chosen, experts)?;
        self.write_f32(&chosen_weights, weights)
    }
    fn read_choices(
        &self,
        experts: &Vec<u32>,
        weights: &Vec<f32>,
        len: usize,
    ) -> Result<(Vec<u32>, Vec<f32>), ModelError> {
        match (experts.get(..len), weights.get(..len)) {
            (Some(e), Some(w)) => Ok((e.to_vec(), w.to_vec())),
            _ => Err(ModelError::InvalidRequest(
                "choices past their buffers".into(),
            )),
        }
    }
    fn write_f32(&self, values: &[f32], dst: &mut Vec<f32>) -> Result<(), ModelError> {
        write_prefix(values, dst)
    }
    fn write_index(&self, values: &[u32], dst: &mut Vec<u32>) -> Result<(), ModelError> {
        write_prefix(values, dst)
    }
    fn replays_segments(&self) -> bool {
        self.segments.is_some()
    }
    fn run_segment(
        &self,
        key: SegmentKey,
        work: &mut dyn FnMut() -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        if let Some(seen) = &self.segments {
            seen.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        }
        work()
    }
    fn combine_add(
        &self,
        hidden: &mut Vec<f32>,
        pair_out: &Vec<f32>,
        row_offsets: &Vec<u32>,
        shared: Option<&Vec<f32>>,
        rows: usize,
        width: usize,
    ) -> Result<(), ModelError> {
        for r in 0..rows {
            for c in 0..width {
                let mut acc = 0.0f32;
                for p in row_offsets[r] as usize..row_offsets[r + 1] as usize {
                    acc += pair_out[p * width + c];
                }
                if let Some(shared) = shared {
                    acc += shared[r * width + c];
                }
                hidden[r * width + c] += acc;
            }
        }
        Ok(())
    }
    fn embed_rows(
        &self,
        table: &HostMatrix,
        ids: &Vec<u32>,
        out: &mut Vec<f32>,
        n: usize,
        width: usize,
    ) -> Result<(), ModelError> {
        self.gather_rows(&table.values, ids, out, n, width)
    }
    fn argmax_rows(&self, x: &Vec<f32>, rows: usize, width: usize) -> Result<Vec<u32>, ModelError> {
        check(rows * width <= x.len() && width > 0, "argmax")?;
        // One id per row crosses.
        self.downloaded.fetch_add(rows, Ordering::Relaxed);
        Ok(x[..rows * width]
            .chunks_exact(width)
            .map(|row| crate::backend::ops::argmax(row) as u32)
            .collect())
    }

    fn ranked_top_k_rows(
        &self,
        x: &Vec<f32>,
        rows: usize,
        width: usize,
        k: usize,
    ) -> Result<Vec<(u32, f32)>, ModelError> {
        check(rows * width <= x.len() && k <= width, "ranked top-k")?;
        // Two values (id and logit) per pair cross.
        self.downloaded.fetch_add(2 * rows * k, Ordering::Relaxed);
        Ok(x[..rows * width]
            .chunks_exact(width.max(1))
            .flat_map(|row| crate::sampling::ranked_top_k(row, k))
            .collect())
    }

    fn race_rows(
        &self,
        x: &Vec<f32>,
        rows: usize,
        width: usize,
        races: &[RowRace],
    ) -> Result<Vec<u32>, ModelError> {
        check(rows * width <= x.len() && width > 0, "race")?;
        check(
            races
                .iter()
                .all(|r| (r.row as usize) < rows && r.race.is_valid()),
            "race",
        )?;
        // One id per race crosses.
        self.downloaded.fetch_add(races.len(), Ordering::Relaxed);
        Ok(races
            .iter()
            .map(|r| {
                let row = &x[r.row as usize * width..(r.row as usize + 1) * width];
                r.race.draw(row)
            })
            .collect())
    }

    fn mask_rows(
        &self,
        x: &mut Vec<f32>,
        rows: usize,
        width: usize,
        masks: &[RowMask<'_>],
    ) -> Result<(), ModelError> {
        check(rows * width <= x.len(), "mask")?;
        check(masks.iter().all(|m| (m.row as usize) < rows), "mask")?;
        for m in masks {
            let at = m.row as usize * width;
            m.mask.apply(&mut x[at..at + width]);
        }
        Ok(())
    }

    fn edit_rows(
        &self,
        x: &mut Vec<f32>,
        rows: usize,
        width: usize,
        edits: &[RowEdits<'_>],
    ) -> Result<(), ModelError> {
        check(rows * width <= x.len(), "edit")?;
        check(edits.iter().all(|e| (e.row as usize) < rows), "edit")?;
        for e in edits {
            let at = e.row as usize * width;
            e.edits.apply(&mut x[at..at + width]);
        }
        Ok(())
    }

    fn gather_rows(
        &self,
        x: &Vec<f32>,
        index: &Vec<u32>,
        out: &mut Vec<f32>,
        n: usize,
        width: usize,
    ) -> Result<(), ModelError> {
        for i in 0..n {
            let r = index[i] as usize;
            check((r + 1) * width <= x.len(), "gather")?;
            out[i * width..(i + 1) * width].copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }
}

/// One step of `inputs` (a token list per cache, in order) on `model`: each sequence's last
/// logits. For tests of the device orchestration, here and on a GPU.
#[cfg(test)]
pub(crate) fn step_inputs<O>(
    model: &super::DeviceDenseModel<O>,
    caches: &mut [crate::kv_cache::SequenceCache],
    inputs: &[Vec<u32>],
    experts: &dyn ExpertBackend,
) -> Vec<Vec<f32>>
where
    O: DenseOps,
    O::F32: Send + 'static,
    ModelError: From<O::Error>,
{
    let mut seqs: Vec<crate::dense_step::StepSequence<'_>> = caches
        .iter_mut()
        .zip(inputs)
        .map(|(cache, tokens)| crate::dense_step::StepSequence {
            cache,
            tokens,
            all_logits: false,
        })
        .collect();
    model.forward(&mut seqs, experts).unwrap()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::config::ModelConfig;
    use crate::dense::DenseModel;
    use crate::dense_step::{DenseStep, Pick, StepOutput, StepSequence};
    use crate::device_dense::DeviceDenseModel;
    use crate::experts::ExpertSet;
    use crate::kv_cache::SequenceCache;

    fn fixture(name: &str) -> PathBuf {
        crate::test_support::fixture_dir(name)
    }

    fn assert_close(device: &[Vec<f32>], cpu: &[Vec<f32>], what: &str) {
        assert_eq!(device.len(), cpu.len(), "{what}: sequences");
        for (s, (d, c)) in device.iter().zip(cpu).enumerate() {
            assert_eq!(d.len(), c.len(), "{what}: seq {s} logits");
            let worst = crate::compare::max_abs_diff(d, c);
            assert!(
                worst.is_finite() && worst < 1e-3,
                "{what}: seq {s} differs by {worst}"
            );
        }
    }

    /// Prefill of two prompts of different lengths in one step (all logits), then decode
    /// steps of both together and one alone (so rows sit at different cache positions and
    /// the caches grow past their first capacity): the device orchestration over the host
    /// reference gives the CPU model's logits at every step.
    fn device_matches_cpu(name: &str) {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let cpu = DenseModel::load(&ckpt, &config).unwrap();
        let device = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
        let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        let vocab = config.vocab_size as u32;
        let prompt_a: Vec<u32> = (0..7).map(|i| (i * 37 + 11) % vocab).collect();
        let prompt_b: Vec<u32> = (0..3).map(|i| (i * 53 + 5) % vocab).collect();
        let (mut cpu_a, mut cpu_b) = (cpu.new_cache(), cpu.new_cache());
        let (mut dev_a, mut dev_b) = (device.new_cache(), device.new_cache());
        let mut step = |tokens_a: &[u32], tokens_b: Option<&[u32]>, all: bool| {
            let run = |a: &mut SequenceCache, b: &mut SequenceCache, on_device: bool| {
                let mut seqs = vec![StepSequence {
                    cache: a,
                    tokens: tokens_a,
                    all_logits: all,
                }];
                if let Some(tb) = tokens_b {
                    seqs.push(StepSequence {
                        cache: b,
                        tokens: tb,
                        all_logits: all,
                    });
                }
                if on_device {
                    device.forward(&mut seqs, &experts).unwrap()
                } else {
                    cpu.forward(&mut seqs, &experts).unwrap()
                }
            };
            let c = run(&mut cpu_a, &mut cpu_b, false);
            let d = run(&mut dev_a, &mut dev_b, true);
            (c, d)
        };
        let (c, d) = step(&prompt_a, Some(&prompt_b), true);
        assert_close(&d, &c, &format!("{name} prefill"));
        for t in 0..12u32 {
            let (ta, tb) = ([(t * 7 + 3) % vocab], [(t * 11 + 1) % vocab]);
            let alone = t % 4 == 3;
            let (c, d) = step(&ta, (!alone).then_some(&tb[..]), false);
            assert_close(&d, &c, &format!("{name} decode {t}"));
        }
        assert_eq!(dev_a.len, cpu_a.len);
        assert!(dev_a.bytes() > 0, "the device cache is accounted");
    }

    #[test]
    fn deepseek_v3_mla_on_the_device_path_matches_the_cpu_model() {
        device_matches_cpu("deepseek-v3-tiny");
    }

    #[test]
    fn qwen3_moe_gqa_on_the_device_path_matches_the_cpu_model() {
        device_matches_cpu("qwen3-moe-tiny");
    }

    #[test]
    fn mixtral_on_the_device_path_matches_the_cpu_model() {
        device_matches_cpu("mixtral-tiny");
    }

    /// GLM-4.5's q/k/v biases and half-rotary heads.
    #[test]
    fn glm4_moe_on_the_device_path_matches_the_cpu_model() {
        device_matches_cpu("glm4-moe-tiny");
    }

    /// GLM-4.7-Flash's latent attention with v heads wider than the no-rope part, no yarn.
    #[test]
    fn glm4_moe_lite_on_the_device_path_matches_the_cpu_model() {
        device_matches_cpu("glm4-moe-lite-tiny");
    }

    /// MiniMax-M2's q/k norms over all heads and partial rotary.
    #[test]
    fn minimax_m2_on_the_device_path_matches_the_cpu_model() {
        device_matches_cpu("minimax-m2-tiny");
    }

    /// With its experts on the same device (an expert set on the GPU of the dense part), a MoE
    /// layer's rows go to them in place and their outputs are combined where they come back:
    /// the same logits bit for bit as through host copies, and a step downloads only its
    /// logits (through host copies it downloads each MoE layer's rows too).
    fn experts_in_place_download_only_logits(name: &str) {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        let through_host = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
        let ops = HostDenseOps::exact().with_experts_in_place();
        let in_place = DeviceDenseModel::load(ops, &ckpt, &config).unwrap();
        let vocab = config.vocab_size as u32;
        let (h, moe_layers) = (config.hidden_size, config.moe_layer_indices().count());
        assert!(moe_layers > 0);
        let prompts: [Vec<u32>; 2] = [
            (0..6).map(|i| (i * 29 + 3) % vocab).collect(),
            (0..2).map(|i| (i * 41 + 7) % vocab).collect(),
        ];
        let mut caches = [
            [through_host.new_cache(), through_host.new_cache()],
            [in_place.new_cache(), in_place.new_cache()],
        ];
        let mut inputs: Vec<Vec<u32>> = prompts.to_vec();
        for step in 0..4 {
            let rows: usize = inputs.iter().map(Vec::len).sum();
            let before = [through_host.ops().downloaded(), in_place.ops().downloaded()];
            let mut logits = Vec::new();
            for (model, pair) in [&through_host, &in_place]
                .into_iter()
                .zip(caches.iter_mut())
            {
                let mut seqs: Vec<StepSequence<'_>> = pair
                    .iter_mut()
                    .zip(&inputs)
                    .map(|(cache, tokens)| StepSequence {
                        cache,
                        tokens,
                        all_logits: false,
                    })
                    .collect();
                logits.push(model.forward(&mut seqs, &experts).unwrap());
            }
            assert_eq!(
                logits[0], logits[1],
                "{name} step {step}: same logits bitwise"
            );
            let logit_values = inputs.len() * config.vocab_size;
            let downloaded = [
                through_host.ops().downloaded() - before[0],
                in_place.ops().downloaded() - before[1],
            ];
            assert_eq!(
                downloaded[1], logit_values,
                "{name} step {step}: only logits"
            );
            assert_eq!(
                downloaded[0],
                logit_values + moe_layers * rows * h,
                "{name} step {step}: through the host, each MoE layer's rows too"
            );
            inputs = logits[1]
                .iter()
                .map(|row| vec![crate::backend::ops::argmax(row) as u32])
                .collect();
        }
    }

    #[test]
    fn deepseek_v3_experts_on_the_same_device_take_rows_in_place() {
        experts_in_place_download_only_logits("deepseek-v3-tiny");
    }

    #[test]
    fn qwen3_moe_experts_on_the_same_device_take_rows_in_place() {
        experts_in_place_download_only_logits("qwen3-moe-tiny");
    }

    /// `--gpu-fp8 keep` on the dense part: the FP8 fixture's matrices (MLA's q_b, o and kv_b's
    /// per-head halves, the dense layer's MLP, the shared experts) are held as FP8, its query
    /// input widened as before (stacked with a bf16 kv_a), and
    /// the logits are bitwise those of the widened matrices (each FP8 weight becomes the f32
    /// that dequantizing computes) at prefill and decode, and the CPU model's within 1e-3.
    #[test]
    fn fp8_matrices_kept_as_fp8_give_the_widened_logits() {
        let dir = fixture("deepseek-v3-fp8-tiny");
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        let cpu = DenseModel::load(&ckpt, &config).unwrap();
        let widened = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
        let kept = HostDenseOps::exact().with_fp8_kept();
        let kept = DeviceDenseModel::load(kept, &ckpt, &config).unwrap();
        assert_eq!(widened.ops().fp8_matrices(), 0);
        // Per layer q_b, o and kv_b's two halves (per head, stacked), and one MLP each (a
        // dense layer's, or the shared experts').
        assert_eq!(kept.ops().fp8_matrices(), config.num_layers * (4 + 2));
        let vocab = config.vocab_size as u32;
        let mut caches: Vec<SequenceCache> = (0..3).map(|_| cpu.new_cache()).collect();
        let mut tokens: Vec<u32> = (0..9).map(|i| (i * 31 + 2) % vocab).collect();
        for step in 0..5 {
            let mut logits = Vec::new();
            for (i, cache) in caches.iter_mut().enumerate() {
                let mut seqs = [StepSequence {
                    cache,
                    tokens: &tokens,
                    all_logits: true,
                }];
                logits.push(match i {
                    0 => widened.forward(&mut seqs, &experts).unwrap(),
                    1 => kept.forward(&mut seqs, &experts).unwrap(),
                    _ => cpu.forward(&mut seqs, &experts).unwrap(),
                });
            }
            assert_eq!(
                logits[1], logits[0],
                "step {step}: kept FP8 = widened, bitwise"
            );
            assert_close(&logits[1], &logits[2], &format!("FP8 kept, step {step}"));
            let last = &logits[1][0][logits[1][0].len() - config.vocab_size..];
            tokens = vec![crate::backend::ops::argmax(last) as u32];
        }
    }

    /// The Qwen3 fixture's dense part over the host reference, and all its experts.
    fn qwen_over_the_reference() -> (ModelConfig, DeviceDenseModel<HostDenseOps>, ExpertSet) {
        let dir = fixture("qwen3-moe-tiny");
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let device = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
        let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        (config, device, experts)
    }

    /// The CPU model of the same fixture.
    fn qwen_on_the_cpu(config: &ModelConfig) -> crate::dense::DenseModel {
        let ckpt = Checkpoint::open(&fixture("qwen3-moe-tiny")).unwrap();
        crate::dense::DenseModel::load(&ckpt, config).unwrap()
    }

    /// One step of one sequence: its last row's logits.
    fn step_alone(
        device: &DeviceDenseModel<HostDenseOps>,
        experts: &ExpertSet,
        cache: &mut SequenceCache,
        tokens: &[u32],
    ) -> Vec<Vec<f32>> {
        let mut seqs = [StepSequence {
            cache,
            tokens,
            all_logits: false,
        }];
        device.forward(&mut seqs, experts).unwrap()
    }

    /// Picking on the device: a sequence asking for its argmax gets the argmax of the logits
    /// `forward` gives, one asking for a ranked top-k gets those logits' ranking, a prompt
    /// being scored keeps its logits whatever it asks, the others their logits bitwise; a
    /// step downloads the ids, the rankings and the kept rows only; the CPU model's default
    /// picking agrees.
    #[test]
    fn picks_on_the_device_are_the_logits_argmax_or_ranking_and_download_only_them() {
        let (config, device, experts) = qwen_over_the_reference();
        let cpu = qwen_on_the_cpu(&config);
        let vocab = config.vocab_size;
        let prompts: [Vec<u32>; 5] = [
            vec![3, 9, 27],
            vec![5],
            vec![11, 2, 7, 1],
            vec![8, 4],
            vec![6, 1],
        ];
        let all_logits = [false, false, true, false, false];
        let race = crate::race::Race {
            temperature: 0.7,
            top_p: 0.9,
            min_p: 0.0,
            key: crate::race::race_key(4, 0),
        };
        let picks = [
            Pick::Argmax,
            Pick::Logits,
            Pick::Argmax,
            Pick::RankedTopK(7),
            Pick::Race(race),
        ];
        let drawn_from = |logits: &StepOutput| {
            let StepOutput::Logits(row) = logits else {
                panic!("forward gives logits")
            };
            StepOutput::Drawn(race.draw(row))
        };
        // The GPU-shaped model's methods are its own; the CPU model's are DenseStep's.
        macro_rules! step {
            ($model:expr, $picking:expr) => {{
                let mut caches: Vec<SequenceCache> = (0..5).map(|_| $model.new_cache()).collect();
                let mut seqs: Vec<StepSequence<'_>> = caches
                    .iter_mut()
                    .zip(&prompts)
                    .zip(all_logits)
                    .map(|((cache, tokens), all_logits)| StepSequence {
                        cache,
                        tokens,
                        all_logits,
                    })
                    .collect();
                if $picking {
                    $model.forward_picking(&mut seqs, &experts, &picks).unwrap()
                } else {
                    $model
                        .forward(&mut seqs, &experts)
                        .unwrap()
                        .into_iter()
                        .map(StepOutput::Logits)
                        .collect::<Vec<_>>()
                }
            }};
        }
        let full = step!(device, false);
        let before = device.ops().downloaded();
        let picked = step!(device, true);
        let downloaded = device.ops().downloaded() - before;
        let StepOutput::Logits(first) = &full[0] else {
            panic!("forward gives logits")
        };
        assert_eq!(
            picked[0],
            StepOutput::Argmax(crate::backend::ops::argmax(first) as u32)
        );
        assert_eq!(picked[1], full[1]);
        assert_eq!(picked[2], full[2], "a scored prompt keeps its logits");
        let StepOutput::Logits(fourth) = &full[3] else {
            panic!("forward gives logits")
        };
        assert_eq!(
            picked[3],
            StepOutput::RankedTopK(crate::sampling::ranked_top_k(fourth, 7))
        );
        assert_eq!(picked[4], drawn_from(&full[4]), "the race's draw");
        // Ids of every wanted row's argmax (one row each for four sequences, four for the
        // scored prompt), their rankings (7 ids and 7 logits each), the race's one id, then
        // the kept rows: the second sequence's and the scored prompt's; besides, each MoE
        // layer's 12 rows (the experts are reached through host memory here).
        let moe_rows = config.moe_layer_indices().count() * 12 * config.hidden_size;
        assert_eq!(downloaded, 8 + 2 * 8 * 7 + 1 + (1 + 4) * vocab + moe_rows);
        // The CPU model's default picks from its own logits (close to the device path's,
        // not bitwise: another order of operations).
        let (cpu_full, cpu_picked) = (step!(cpu, false), step!(cpu, true));
        let StepOutput::Logits(cpu_first) = &cpu_full[0] else {
            panic!("forward gives logits")
        };
        let cpu_id = crate::backend::ops::argmax(cpu_first) as u32;
        assert!(cpu_picked[0] == StepOutput::Argmax(cpu_id), "CPU pick");
        assert!(cpu_picked[1..3] == cpu_full[1..3], "CPU kept logits");
        let StepOutput::Logits(cpu_fourth) = &cpu_full[3] else {
            panic!("forward gives logits")
        };
        let cpu_ranked = crate::sampling::ranked_top_k(cpu_fourth, 7);
        assert!(
            cpu_picked[3] == StepOutput::RankedTopK(cpu_ranked),
            "CPU ranking"
        );
        assert!(cpu_picked[4] == drawn_from(&cpu_full[4]), "CPU race");
    }

    /// A step of one sequence per cache, feeding each its prompt, last rows' logits only.
    fn last_rows_of<'a>(
        caches: &'a mut [SequenceCache],
        prompts: &'a [Vec<u32>],
    ) -> Vec<StepSequence<'a>> {
        caches
            .iter_mut()
            .zip(prompts)
            .map(|(cache, tokens)| StepSequence {
                cache,
                tokens,
                all_logits: false,
            })
            .collect()
    }

    /// Picks after a request's changes: the device masks (a grammar's mask, waited for while
    /// another thread fills it) and edits (penalties, biases) the last rows where they lie and
    /// picks from them, giving the argmax, ranking and draw of the logits changed on the host
    /// (the sampler's own path), downloading only the picks; a sequence whose mask came back
    /// empty gets its row unchanged; an unchanged neighbour is as before; the CPU model's
    /// default picking changes its rows alike.
    #[test]
    fn changed_picks_are_the_picks_of_the_changed_logits_and_download_only_them() {
        use crate::dense_step::{EditedPick, RowChanges};
        use crate::logit_adjust::{LogitAdjustments, LogitEdits, TokenHistory};
        use crate::token_mask::{MaskSlot, TokenMask};
        let (config, device, experts) = qwen_over_the_reference();
        let cpu = qwen_on_the_cpu(&config);
        let vocab = config.vocab_size;
        let prompts: [Vec<u32>; 5] = [
            vec![3, 9, 27],
            vec![5, 5],
            vec![11, 2, 7, 1],
            vec![8],
            vec![6, 1],
        ];
        let unchanged = |model_full: &[StepOutput], i: usize| -> Vec<f32> {
            let StepOutput::Logits(row) = &model_full[i] else {
                panic!("forward gives logits")
            };
            row.clone()
        };
        let full = {
            let mut caches: Vec<SequenceCache> = (0..5).map(|_| device.new_cache()).collect();
            let rows = device.forward(&mut last_rows_of(&mut caches, &prompts), &experts);
            rows.unwrap()
                .into_iter()
                .map(StepOutput::Logits)
                .collect::<Vec<_>>()
        };
        // Each sequence's adjustments: the argmax's token biased away, so the pick moves.
        let edits: Vec<LogitEdits> = (0..3)
            .map(|i| {
                let top = crate::backend::ops::argmax(&unchanged(&full, i)) as u32;
                let adjust = LogitAdjustments {
                    logit_bias: vec![(top, -30.0)],
                    presence_penalty: 0.5,
                    frequency_penalty: 0.25,
                    repetition_penalty: 1.2,
                    min_tokens: 2,
                };
                let mut history = TokenHistory::new(&prompts[i]);
                history.record(4);
                LogitEdits::of(&adjust, &history, &[0, top + 1])
            })
            .collect();
        // The second sequence's grammar allows one token in three (its best one not among
        // them); the fourth's allows none.
        let best = crate::backend::ops::argmax(&unchanged(&full, 1));
        let allowed: Vec<bool> = (0..vocab).map(|i| i % 3 == 1 && i != best).collect();
        let mask = TokenMask::from_allowed(&allowed);
        let race = crate::race::Race {
            temperature: 0.8,
            top_p: 0.9,
            min_p: 0.0,
            key: crate::race::race_key(9, 2),
        };
        let changed = |full: &[StepOutput], i: usize| {
            let mut row = unchanged(full, i);
            if i == 1 {
                mask.apply(&mut row);
            }
            edits[i].apply(&mut row);
            row
        };
        let want = |full: &[StepOutput]| {
            vec![
                StepOutput::Argmax(crate::backend::ops::argmax(&changed(full, 0)) as u32),
                StepOutput::RankedTopK(crate::sampling::ranked_top_k(&changed(full, 1), 5)),
                StepOutput::Drawn(race.draw(&changed(full, 2))),
                StepOutput::Logits(unchanged(full, 3)),
                StepOutput::Argmax(crate::backend::ops::argmax(&unchanged(full, 4)) as u32),
            ]
        };
        // The GPU-shaped model's methods are its own; the CPU model's are DenseStep's.
        macro_rules! picked {
            ($model:expr) => {{
                let (late, empty) = (MaskSlot::new(), MaskSlot::new());
                let changes = |mask, edits| RowChanges { mask, edits };
                let picks = [
                    Pick::Edited(changes(None, Some(&edits[0])), EditedPick::Argmax),
                    Pick::Edited(
                        changes(Some(&late), Some(&edits[1])),
                        EditedPick::RankedTopK(5),
                    ),
                    Pick::Edited(changes(None, Some(&edits[2])), EditedPick::Race(race)),
                    Pick::Edited(changes(Some(&empty), None), EditedPick::Argmax),
                    Pick::Argmax,
                ];
                let mut caches: Vec<SequenceCache> = (0..5).map(|_| $model.new_cache()).collect();
                let mut seqs = last_rows_of(&mut caches, &prompts);
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        std::thread::sleep(std::time::Duration::from_millis(30));
                        late.fill(Some(mask.clone()));
                        empty.fill(Some(TokenMask::from_allowed(&vec![false; vocab])));
                    });
                    $model.forward_picking(&mut seqs, &experts, &picks).unwrap()
                })
            }};
        }
        let before = device.ops().downloaded();
        let on_device = picked!(device);
        let downloaded = device.ops().downloaded() - before;
        assert_eq!(on_device, want(&full));
        let StepOutput::Argmax(first) = on_device[0] else {
            panic!("an argmax")
        };
        assert_ne!(
            first as usize,
            crate::backend::ops::argmax(&unchanged(&full, 0)),
            "the edits move the pick"
        );
        let StepOutput::RankedTopK(ranked) = &on_device[1] else {
            panic!("a ranking")
        };
        assert!(ranked.iter().all(|&(id, _)| allowed[id as usize]), "masked");
        // An argmax id and a ranking of 5 (ids and logits) per row, one drawn id, and the
        // row of the sequence whose mask allowed nothing.
        let moe_rows = config.moe_layer_indices().count() * 12 * config.hidden_size;
        assert_eq!(downloaded, 5 + 2 * 5 * 5 + 1 + vocab + moe_rows);
        // The CPU model picks the same way from its own logits.
        let cpu_full = {
            let mut caches: Vec<SequenceCache> = (0..5).map(|_| cpu.new_cache()).collect();
            let rows = cpu.forward(&mut last_rows_of(&mut caches, &prompts), &experts);
            rows.unwrap()
                .into_iter()
                .map(StepOutput::Logits)
                .collect::<Vec<_>>()
        };
        assert!(picked!(cpu) == want(&cpu_full), "CPU picks");
    }

    /// The device pool follows the host pool's block numbers: it grows by whole chunks, only
    /// when a block number needs one, and a sequence's cache bytes are its host blocks' (the
    /// same count of rows the device holds for it).
    #[test]
    fn the_device_pool_grows_with_block_numbers() {
        let (config, device, experts) = qwen_over_the_reference();
        let mut a = device.new_cache();
        step_alone(&device, &experts, &mut a, &[5, 6, 7]);
        let first = device.kv_bytes();
        assert!(first > 0, "a chunk for the first blocks");
        for t in 0..40u32 {
            let token = [(t * 13 + 2) % config.vocab_size as u32];
            step_alone(&device, &experts, &mut a, &token);
        }
        // 43 tokens in blocks of 16 are 3 blocks: still the first chunk.
        assert_eq!(device.kv_bytes(), first);
        assert_eq!(a.bytes(), 3 * a.layout().block_bytes());
        let blocks_per_chunk = super::super::pool::CHUNK_BLOCKS;
        let mut many: Vec<SequenceCache> =
            (0..blocks_per_chunk).map(|_| device.new_cache()).collect();
        let prompts: Vec<Vec<u32>> = (0..many.len() as u32)
            .map(|i| vec![i % 50 + 1, 3])
            .collect();
        let mut seqs: Vec<StepSequence<'_>> = many
            .iter_mut()
            .zip(&prompts)
            .map(|(cache, tokens)| StepSequence {
                cache,
                tokens,
                all_logits: false,
            })
            .collect();
        device.forward(&mut seqs, &experts).unwrap();
        // A chunk of blocks, and the sink block after the chunks.
        let block = first / (blocks_per_chunk + 1);
        assert_eq!(first, (blocks_per_chunk + 1) * block);
        assert_eq!(
            device.kv_bytes(),
            (2 * blocks_per_chunk + 1) * block,
            "block numbers past the first chunk"
        );
        let mut other = SequenceCache::for_config(&config);
        let mut seqs = [StepSequence {
            cache: &mut other,
            tokens: &[1],
            all_logits: false,
        }];
        assert!(
            device.forward(&mut seqs, &experts).is_err(),
            "a cache of another host pool would name other blocks by the same numbers"
        );
    }

    /// Prefix caching on the device: a sequence that starts with another's full blocks
    /// (shared, not copied: the host pool's numbers name the same device rows) gives bitwise
    /// the logits of computing the prefix itself, alone and in a batch, and writes nothing
    /// into the shared blocks (the first sequence's next step is unchanged too).
    #[test]
    fn a_shared_prefix_gives_the_logits_of_computing_it() {
        for name in ["qwen3-moe-tiny", "deepseek-v3-tiny"] {
            let dir = fixture(name);
            let config = ModelConfig::from_dir(&dir).unwrap();
            let ckpt = Checkpoint::open(&dir).unwrap();
            let device = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
            let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
            let vocab = config.vocab_size as u32;
            let prefix: Vec<u32> = (0..32).map(|i| (i * 7 + 3) % vocab).collect();
            let tail: Vec<u32> = vec![11 % vocab, 29 % vocab, 5];
            let whole: Vec<u32> = prefix.iter().chain(&tail).copied().collect();
            // Computed from scratch.
            let mut fresh = device.new_cache();
            let expected = step_alone(&device, &experts, &mut fresh, &whole);
            let expected_next = step_alone(&device, &experts, &mut fresh, &[7]);
            // The prefix's owner, then a sequence on its blocks.
            let mut owner = device.new_cache();
            step_alone(&device, &experts, &mut owner, &prefix);
            let owner_next_alone = {
                let mut again = device.new_cache();
                step_alone(&device, &experts, &mut again, &prefix);
                step_alone(&device, &experts, &mut again, &[9])
            };
            let mut hit = device.new_cache();
            assert!(hit.share_prefix(owner.full_blocks()));
            assert_eq!(hit.len, prefix.len());
            assert_eq!(
                step_alone(&device, &experts, &mut hit, &tail),
                expected,
                "{name}: prefix from the cache, alone"
            );
            assert_eq!(step_alone(&device, &experts, &mut hit, &[7]), expected_next);
            // In a batch: another hit beside the owner's next token and a stranger's prompt.
            let mut hit2 = device.new_cache();
            assert!(hit2.share_prefix(owner.full_blocks()));
            let mut stranger = device.new_cache();
            let stranger_prompt = [3u32, 1, 4, 1, 5];
            let inputs: [&[u32]; 3] = [&tail, &[9], &stranger_prompt];
            let mut caches = [&mut hit2, &mut owner, &mut stranger];
            let mut seqs: Vec<StepSequence<'_>> = caches
                .iter_mut()
                .zip(inputs)
                .map(|(cache, tokens)| StepSequence {
                    cache,
                    tokens,
                    all_logits: false,
                })
                .collect();
            let out = device.forward(&mut seqs, &experts).unwrap();
            assert_eq!(
                out[0], expected[0],
                "{name}: prefix from the cache, in a batch"
            );
            assert_eq!(
                out[1], owner_next_alone[0],
                "{name}: the owner's blocks untouched"
            );
        }
    }

    /// A write that would land in a block another holder shares (here: a cache rolled back
    /// into a shared prefix's last block) is refused, not made under the other holder's rows.
    #[test]
    fn a_write_into_a_shared_block_is_refused() {
        let (config, device, experts) = qwen_over_the_reference();
        let vocab = config.vocab_size as u32;
        let prefix: Vec<u32> = (0..32).map(|i| (i * 5 + 1) % vocab).collect();
        let mut owner = device.new_cache();
        step_alone(&device, &experts, &mut owner, &prefix);
        let mut at_20 = device.new_cache();
        step_alone(&device, &experts, &mut at_20, &prefix[..20]);
        let mut hit = device.new_cache();
        assert!(hit.share_prefix(owner.full_blocks()));
        hit.rollback(&at_20.mark());
        assert_eq!(hit.len, 20);
        let mut seqs = [StepSequence {
            cache: &mut hit,
            tokens: &[1],
            all_logits: false,
        }];
        assert!(device.forward(&mut seqs, &experts).is_err());
        // The owner's next step is as if nothing had been tried.
        let mut again = device.new_cache();
        step_alone(&device, &experts, &mut again, &prefix);
        assert_eq!(
            step_alone(&device, &experts, &mut owner, &[3]),
            step_alone(&device, &experts, &mut again, &[3])
        );
    }

    /// A failed step is undone by the owner's rollback alone: the device rows written past
    /// `len` are never read, and the next step gives the same logits as if it had not run.
    #[test]
    fn rollback_needs_nothing_from_the_device_cache() {
        let (_, device, experts) = qwen_over_the_reference();
        let forward = |cache: &mut SequenceCache, tokens: &[u32]| {
            step_alone(&device, &experts, cache, tokens)
        };
        let mut straight = device.new_cache();
        forward(&mut straight, &[1, 2, 3]);
        let expected = forward(&mut straight, &[4]);
        let mut undone = device.new_cache();
        forward(&mut undone, &[1, 2, 3]);
        let mark = undone.mark();
        forward(&mut undone, &[9, 9, 9, 9, 9]);
        undone.rollback(&mark);
        assert_eq!(forward(&mut undone, &[4]), expected);
    }

    /// A speculative step (the last sampled token and a draft after it, every row's logits)
    /// gives each row bitwise the logits decoding those tokens one by one gives, and cutting
    /// the cache back to the part of the draft that agreed goes on exactly as decoding
    /// would: the device dense part's half of the router's `--speculative-config`.
    #[test]
    fn a_draft_step_gives_the_decodes_logits_and_truncates_like_one() {
        let (config, device, experts) = qwen_over_the_reference();
        let vocab = config.vocab_size;
        let mut decoded = device.new_cache();
        step_alone(&device, &experts, &mut decoded, &[1, 2, 3]);
        let one_by_one: Vec<f32> = [4, 5, 6]
            .iter()
            .flat_map(|&t| step_alone(&device, &experts, &mut decoded, &[t]).remove(0))
            .collect();
        let mut drafted = device.new_cache();
        step_alone(&device, &experts, &mut drafted, &[1, 2, 3]);
        let mut seqs = [StepSequence {
            cache: &mut drafted,
            tokens: &[4, 5, 6],
            all_logits: true,
        }];
        let rows = device.forward(&mut seqs, &experts).unwrap();
        assert_eq!(rows[0].len(), 3 * vocab);
        assert_eq!(rows[0], one_by_one);
        // The pick after 4 agreed with 5, the one after 5 did not: 6 goes, the pick (9) is fed.
        drafted.truncate(5);
        let mut straight = device.new_cache();
        step_alone(&device, &experts, &mut straight, &[1, 2, 3, 4, 5]);
        assert_eq!(
            step_alone(&device, &experts, &mut drafted, &[9]),
            step_alone(&device, &experts, &mut straight, &[9])
        );
    }

    /// Decode steps as replayed segments (the orchestration CUDA graphs take: inputs written
    /// into a bucket's buffers, padded to the bucket, cut at each MoE layer's routes) give the
    /// logits of launching each step as is, bit for bit, through host copies and with the
    /// experts in place, at batch sizes that pad (3 to 4, 5 to 8) and that do not; the padding
    /// rows touch no sequence's cache (the later steps of every sequence still agree). Each
    /// step runs one segment, plus per MoE layer one (and one more for its shared experts);
    /// prefills run as before. With the routed experts following the gate's choices on the
    /// device (planned as the `plan_routes` kernel plans them, padding rows routed too), a
    /// step is one segment.
    fn segments_give_the_launched_logits(name: &str, in_place: bool, following: bool) {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        let ops = || match in_place {
            true => HostDenseOps::exact().with_experts_in_place(),
            false => HostDenseOps::exact(),
        };
        let launched = DeviceDenseModel::load(ops(), &ckpt, &config).unwrap();
        let segmenting = match following {
            true => ops().with_segments().with_experts_following_choices(),
            false => ops().with_segments(),
        };
        let segmented = DeviceDenseModel::load(segmenting, &ckpt, &config).unwrap();
        let vocab = config.vocab_size as u32;
        let models = [&launched, &segmented];
        let mut caches: Vec<Vec<SequenceCache>> = models
            .iter()
            .map(|m| (0..5).map(|_| m.new_cache()).collect())
            .collect();
        let shared = usize::from(config.moe.n_shared_experts > 0);
        let per_step = match following {
            true => 1,
            false => 1 + config.moe_layer_indices().count() * (1 + shared),
        };
        let mut next: Vec<u32> = (0..5).map(|i| (i * 19 + 2) % vocab).collect();
        let prompts: Vec<Vec<u32>> = (0..5u32)
            .map(|i| (0..2 + i).map(|t| (t * 23 + i * 7 + 1) % vocab).collect())
            .collect();
        // 3 then 5: the buffers grow from the bucket of 4 to that of 8.
        for (step, batch) in [0usize, 3, 5, 1, 2, 5, 4, 3].into_iter().enumerate() {
            let inputs: Vec<Vec<u32>> = match batch {
                0 => prompts.clone(),
                n => next[..n].iter().map(|&t| vec![t]).collect(),
            };
            let before = segmented.ops().segments_run().len();
            let logits: Vec<_> = models
                .iter()
                .zip(caches.iter_mut())
                .map(|(model, caches)| step_inputs(model, caches, &inputs, &experts))
                .collect();
            let what = format!(
                "{name} (in place: {in_place}, following the choices: {following}) step {step}, \
                 batch {batch}"
            );
            assert!(logits[0] == logits[1], "{what}: the same logits bitwise");
            let keys = segmented.ops().segments_run()[before..].to_vec();
            match batch {
                0 => assert!(keys.is_empty(), "{what}: a prefill runs as launched"),
                n => {
                    assert_eq!(keys.len(), per_step, "{what}: segments");
                    let bucket = super::super::model::decode_bucket(n).unwrap();
                    assert!(
                        bucket >= n && keys.iter().all(|k| k.rows == bucket),
                        "{what}"
                    );
                    let order: Vec<usize> = keys.iter().map(|k| k.segment).collect();
                    assert_eq!(order, (0..per_step).collect::<Vec<_>>(), "{what}");
                }
            }
            for (i, row) in logits[1].iter().enumerate() {
                next[i] = crate::backend::ops::argmax(row) as u32;
            }
        }
    }

    /// Launched steps (no segments) whose routed experts follow the gate's choices on the
    /// device (planned as `plan_routes` plans them, no routes read on the host) give the
    /// logits of routing on the host, bit for bit: a prefill of over 600 rows and decode steps
    /// of one to five sequences.
    #[test]
    fn launched_steps_following_the_choices_give_the_host_routed_logits() {
        for name in [
            "deepseek-v3-tiny",
            "qwen3-moe-tiny",
            "mixtral-tiny",
            "glm4-moe-tiny",
            "glm4-moe-lite-tiny",
            "minimax-m2-tiny",
        ] {
            let dir = fixture(name);
            let config = ModelConfig::from_dir(&dir).unwrap();
            let ckpt = Checkpoint::open(&dir).unwrap();
            let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
            let routed = DeviceDenseModel::load(HostDenseOps::exact(), &ckpt, &config).unwrap();
            let ops = HostDenseOps::exact().with_experts_following_choices();
            let following = DeviceDenseModel::load(ops, &ckpt, &config).unwrap();
            let models = [&routed, &following];
            let mut caches: Vec<Vec<SequenceCache>> = models
                .iter()
                .map(|m| (0..5).map(|_| m.new_cache()).collect())
                .collect();
            let vocab = config.vocab_size as u32;
            let mut next: Vec<u32> = (0..5).map(|i| (i * 13 + 5) % vocab).collect();
            // One prompt long enough that the prefill's step has more rows than a replayed
            // step may (its plan spread over every warp of the planning kernel).
            let prompts: Vec<Vec<u32>> = (0..5u32)
                .map(|i| {
                    let len = if i == 4 { 600 } else { 3 + i };
                    (0..len).map(|t| (t * 31 + i * 11 + 2) % vocab).collect()
                })
                .collect();
            let rows: usize = prompts.iter().map(Vec::len).sum();
            assert!(rows > super::super::model::MAX_REPLAYED_ROWS);
            let moe_layers = config.moe_layer_indices().count();
            for (step, batch) in [0usize, 5, 2, 1, 4].into_iter().enumerate() {
                let inputs: Vec<Vec<u32>> = match batch {
                    0 => prompts.clone(),
                    n => next[..n].iter().map(|&t| vec![t]).collect(),
                };
                let uploads_before = models.map(|m| m.ops().index_uploads());
                let logits: Vec<_> = models
                    .iter()
                    .zip(caches.iter_mut())
                    .map(|(model, caches)| step_inputs(model, caches, &inputs, &experts))
                    .collect();
                assert!(
                    logits[0] == logits[1],
                    "{name} step {step}, batch {batch}: the same logits bitwise"
                );
                // Routed on the host, each MoE layer uploads its routes' offsets; following the
                // choices, the step uploads its offsets and choice buffer once, whatever the
                // number of MoE layers.
                let uploads = [0, 1].map(|i| models[i].ops().index_uploads() - uploads_before[i]);
                assert_eq!(
                    uploads[1],
                    uploads[0] - moe_layers + 2,
                    "{name} step {step}"
                );
                if step == 0 {
                    // No MoE layer of the long prefill read its routes on the host.
                    let logits_only = inputs.len() * config.vocab_size;
                    assert_eq!(following.ops().downloaded(), logits_only, "{name}");
                    assert!(routed.ops().downloaded() > logits_only, "{name}");
                }
                for (i, row) in logits[1].iter().enumerate() {
                    next[i] = crate::backend::ops::argmax(row) as u32;
                }
            }
        }
    }

    #[test]
    fn deepseek_v3_decode_segments_give_the_launched_logits() {
        segments_give_the_launched_logits("deepseek-v3-tiny", false, false);
        segments_give_the_launched_logits("deepseek-v3-tiny", true, false);
        segments_give_the_launched_logits("deepseek-v3-tiny", true, true);
    }

    #[test]
    fn qwen3_moe_decode_segments_give_the_launched_logits() {
        segments_give_the_launched_logits("qwen3-moe-tiny", true, false);
        segments_give_the_launched_logits("qwen3-moe-tiny", false, true);
    }

    #[test]
    fn mixtral_decode_segments_give_the_launched_logits() {
        segments_give_the_launched_logits("mixtral-tiny", false, false);
        segments_give_the_launched_logits("mixtral-tiny", true, true);
    }

    /// A decode segment's key names the device pool it reads: the same pool keeps its key
    /// from step to step, another pool (the first one gone) or a chunk added makes a new one,
    /// so a graph recorded over old chunks is never replayed over new ones.
    #[test]
    fn decode_segment_keys_follow_the_device_pool() {
        let dir = fixture("qwen3-moe-tiny");
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let experts = ExpertSet::load_all_on(&ckpt, &config, &Default::default()).unwrap();
        let ops = HostDenseOps::exact().with_segments();
        let model = DeviceDenseModel::load(ops, &ckpt, &config).unwrap();
        let step = |caches: &mut [SequenceCache], token: u32| {
            let inputs = vec![vec![token]; caches.len()];
            step_inputs(&model, caches, &inputs, &experts);
            model.ops().segments_run().last().unwrap().generation
        };
        // Caches from a pool of their own (SequenceCache::for_config).
        let mut first = vec![SequenceCache::for_config(&config)];
        let (g1, g2) = (step(&mut first, 3), step(&mut first, 4));
        assert_eq!(g1, g2, "the same pool, the same chunks");
        drop(first);
        let mut second = vec![SequenceCache::for_config(&config)];
        let g3 = step(&mut second, 3);
        assert_ne!(g3, g2, "another pool");
        // Steps whose blocks reach past the first chunk: a chunk is added.
        let blocks = super::super::pool::CHUNK_BLOCKS;
        let pool = std::sync::Arc::clone(second[0].pool());
        let mut many: Vec<SequenceCache> = (1..blocks).map(|_| SequenceCache::new(&pool)).collect();
        // Blocks 1 to 63: still the first chunk (a larger bucket: larger buffers, a new key).
        let g4 = step(&mut many, 5);
        assert_ne!(g4, g3);
        assert_eq!(step(&mut many, 6), g4, "the same pool, the same chunks");
        many.push(SequenceCache::new(&pool));
        let g5 = step(&mut many, 7);
        assert_ne!(g5, g4, "a chunk added");
        assert_eq!(step(&mut many, 8), g5);
    }
}
