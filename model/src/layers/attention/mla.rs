//! DeepSeek's Multi-head Latent Attention, computed in the "absorbed" form for every token:
//! the cache holds only the normalised latent `c` and the rotated shared rope key, and
//! `q_nope . (W_uk c) = (W_uk^T q_nope) . c`, `out = W_uv (sum_j p_j c_j)`.
//! Same mathematics as transformers' expanded form; a 576-float cache row on DeepSeek-V3.

use rayon::prelude::*;

use crate::backend::{for_each_row, ops, InputRows, PackedMatrix};
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::kv_cache::{KvRows, LayerCache};
use crate::layers::rope::{apply_rope, RopeTable};

/// Shapes of one MLA layer.
#[derive(Debug, Clone, Copy)]
pub struct MlaShape {
    pub hidden: usize,
    pub heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
}

#[derive(Debug)]
pub struct MlaAttention {
    shape: MlaShape,
    /// Projections of the hidden state: `[q_a; kv_a]` stacked when q is low-rank, else `[q; kv_a]`.
    input_proj: PackedMatrix,
    q_a_norm: Option<Vec<f32>>,
    q_b: Option<PackedMatrix>,
    kv_a_norm: Vec<f32>,
    /// Per head, `W_uk^T` as a `[kv_lora, nope]` matrix: maps q_nope into latent space.
    uk_t: Vec<PackedMatrix>,
    /// Per head, `W_uv` as `[v, kv_lora]`.
    uv: Vec<PackedMatrix>,
    o: PackedMatrix,
    interleaved: bool,
    scale: f32,
    eps: f32,
}

impl MlaAttention {
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        shape: MlaShape,
        interleaved: bool,
        scale: f32,
        eps: f32,
    ) -> Result<Self> {
        let MlaShape {
            hidden,
            heads,
            q_lora_rank,
            kv_lora_rank,
            nope,
            rope,
            v,
        } = shape;
        let q_head = nope + rope;
        let kv_a = ckpt.load_native(
            &format!("{prefix}.kv_a_proj_with_mqa.weight"),
            &[kv_lora_rank + rope, hidden],
        )?;
        let (input_proj, q_a_norm, q_b) = match q_lora_rank {
            Some(rank) => {
                let q_a =
                    ckpt.load_native(&format!("{prefix}.q_a_proj.weight"), &[rank, hidden])?;
                let norm = ckpt.load_f32(&format!("{prefix}.q_a_layernorm.weight"), &[rank])?;
                let q_b = ckpt.load_native(
                    &format!("{prefix}.q_b_proj.weight"),
                    &[heads * q_head, rank],
                )?;
                (
                    PackedMatrix::from_native(&[&q_a, &kv_a], hidden),
                    Some(norm),
                    Some(PackedMatrix::from_native(&[&q_b], rank)),
                )
            }
            None => {
                let q = ckpt.load_native(
                    &format!("{prefix}.q_proj.weight"),
                    &[heads * q_head, hidden],
                )?;
                (PackedMatrix::from_native(&[&q, &kv_a], hidden), None, None)
            }
        };
        let kv_a_norm =
            ckpt.load_f32(&format!("{prefix}.kv_a_layernorm.weight"), &[kv_lora_rank])?;
        let kv_b = ckpt.load_native(
            &format!("{prefix}.kv_b_proj.weight"),
            &[heads * (nope + v), kv_lora_rank],
        )?;
        // Per head: W_UK transposed (absorbed into the query) and W_UV, in the checkpoint's
        // precision.
        let mut uk_t = Vec::with_capacity(heads);
        let mut uv = Vec::with_capacity(heads);
        for h in 0..heads {
            let first = h * (nope + v);
            uk_t.push(PackedMatrix::from_native(
                &[&kv_b.transposed_rows(first, nope, kv_lora_rank)],
                nope,
            ));
            uv.push(PackedMatrix::from_native(
                &[&kv_b.row_block(first + nope, v, kv_lora_rank)],
                kv_lora_rank,
            ));
        }
        let o = ckpt.load_native(&format!("{prefix}.o_proj.weight"), &[hidden, heads * v])?;
        Ok(Self {
            shape,
            input_proj,
            q_a_norm,
            q_b,
            kv_a_norm,
            uk_t,
            uv,
            o: PackedMatrix::from_native(&[&o], heads * v),
            interleaved,
            scale,
            eps,
        })
    }

    pub fn forward(
        &self,
        x: &[f32],
        layout: &BatchLayout,
        rope_table: &RopeTable,
        caches: &mut [LayerCache<'_>],
    ) -> Vec<f32> {
        let rows = layout.num_rows();
        let proj = self.input_proj.matmul(x, rows);
        let q = self.queries(&proj, rope_table, rows);
        self.append_to_caches(&proj, layout, rope_table, caches);
        let cached: Vec<KvRows<'_>> = caches
            .iter()
            .zip(&layout.seqs)
            .map(|(c, span)| c.rows(span.start_pos + span.len))
            .collect();
        let ctx = self.attend_latent(&q, layout, &cached);
        let attn = self.expand_values(&ctx, rows);
        self.o.matmul(&attn, rows)
    }

    /// Columns of the input projection before the latent and the rope key: the low-rank query
    /// (or the query itself).
    fn q_in_width(&self) -> usize {
        self.input_proj.rows() - self.shape.kv_lora_rank - self.shape.rope
    }

    /// The queries, `[rows, heads, nope + rope]`, with their rope part rotated.
    fn queries(&self, proj: &[f32], rope_table: &RopeTable, rows: usize) -> Vec<f32> {
        let MlaShape {
            heads, nope, rope, ..
        } = self.shape;
        let q_head = nope + rope;
        let proj_width = self.input_proj.rows();
        let q_in_width = self.q_in_width();
        let mut q_in = Vec::with_capacity(rows * q_in_width);
        for row in proj.chunks_exact(proj_width) {
            q_in.extend_from_slice(&row[..q_in_width]);
        }
        let mut q = match (&self.q_b, &self.q_a_norm) {
            (Some(q_b), Some(norm)) => {
                ops::rms_norm_rows(&mut q_in, norm, self.eps);
                q_b.matmul(&q_in, rows)
            }
            _ => q_in,
        };
        for (r, row) in q.chunks_exact_mut(heads * q_head).enumerate() {
            let (cos, sin) = rope_table.row(r);
            for head in row.chunks_exact_mut(q_head) {
                apply_rope(&mut head[nope..], cos, sin, self.interleaved);
            }
        }
        q
    }

    /// Appends this step's normalised latents (as values) and rotated rope keys (as keys) to
    /// each sequence's cache.
    fn append_to_caches(
        &self,
        proj: &[f32],
        layout: &BatchLayout,
        rope_table: &RopeTable,
        caches: &mut [LayerCache<'_>],
    ) {
        let lora = self.shape.kv_lora_rank;
        let proj_width = self.input_proj.rows();
        let q_in_width = self.q_in_width();
        for (cache, span) in caches.iter_mut().zip(&layout.seqs) {
            for r in span.first_row..span.first_row + span.len {
                let row = &proj[r * proj_width + q_in_width..(r + 1) * proj_width];
                let (keys, values) = cache.row_mut(layout.row_pos[r]);
                values.copy_from_slice(&row[..lora]);
                ops::rms_norm_rows(values, &self.kv_a_norm, self.eps);
                keys.copy_from_slice(&row[lora..]);
                let (cos, sin) = rope_table.row(r);
                apply_rope(keys, cos, sin, self.interleaved);
            }
        }
    }

    /// Attention in latent space, `[rows, heads, lora]`: the queries with `W_uk` absorbed,
    /// scored against the cached latents and rope keys, summed over the cached latents.
    fn attend_latent(&self, q: &[f32], layout: &BatchLayout, caches: &[KvRows<'_>]) -> Vec<f32> {
        let MlaShape {
            heads,
            kv_lora_rank: lora,
            nope,
            rope,
            ..
        } = self.shape;
        let rows = layout.num_rows();
        let q_head = nope + rope;
        // Absorb W_uk into the queries: q_lat[h] = [rows, lora].
        let q_lat: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let q_nope =
                    InputRows::strided(q.get(h * q_head..).unwrap_or_default(), heads * q_head);
                self.uk_t[h].matmul_rows_serial(q_nope, rows)
            })
            .collect();
        let mut ctx = vec![0.0f32; rows * heads * lora];
        let (group, parallel) = super::head_tasks(layout, heads);
        let groups = heads / group;
        let attend = |(task, ctx_part): (usize, &mut [f32])| {
            let (r, first_head) = (task / groups, (task % groups) * group);
            let cache = &caches[layout.row_seq[r]];
            let visible = layout.row_pos[r] + 1;
            // This task's queries, contiguous: the latent and the rope part of each head.
            let mut q_latent = Vec::with_capacity(group * lora);
            let mut q_rope = Vec::with_capacity(group * rope);
            for h in first_head..first_head + group {
                q_latent.extend_from_slice(&q_lat[h][r * lora..(r + 1) * lora]);
                q_rope.extend_from_slice(&q[r * heads * q_head + h * q_head + nope..][..rope]);
            }
            let mut scores = vec![0.0f32; group * visible];
            let mut rope_scores = vec![0.0f32; group * visible];
            ops::dot_rows_many(&q_latent, lora, &cache.values[..visible], 0, &mut scores);
            ops::dot_rows_many(&q_rope, rope, &cache.keys[..visible], 0, &mut rope_scores);
            for (score, r) in scores.iter_mut().zip(&rope_scores) {
                *score = (*score + r) * self.scale;
            }
            for head_scores in scores.chunks_exact_mut(visible) {
                ops::softmax_in_place(head_scores);
            }
            ops::weighted_sum_rows_many(&scores, &cache.values[..visible], 0, lora, ctx_part);
        };
        for_each_row(&mut ctx, group * lora, parallel, attend);
        ctx
    }

    /// Values up-projected per head (`W_uv · ctx`) and heads concatenated: `[rows, heads * v]`.
    fn expand_values(&self, ctx: &[f32], rows: usize) -> Vec<f32> {
        let MlaShape {
            heads,
            kv_lora_rank: lora,
            v,
            ..
        } = self.shape;
        let per_head: Vec<Vec<f32>> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let ctx_h =
                    InputRows::strided(ctx.get(h * lora..).unwrap_or_default(), heads * lora);
                self.uv[h].matmul_rows_serial(ctx_h, rows)
            })
            .collect();
        let mut attn = vec![0.0f32; rows * heads * v];
        let concat_row = |(r, row): (usize, &mut [f32])| {
            for (h, out_h) in per_head.iter().enumerate() {
                row[h * v..(h + 1) * v].copy_from_slice(&out_h[r * v..(r + 1) * v]);
            }
        };
        let parallel = attn.len() >= crate::backend::PARALLEL_MIN_VALUES;
        for_each_row(&mut attn, heads * v, parallel, concat_row);
        attn
    }
}
