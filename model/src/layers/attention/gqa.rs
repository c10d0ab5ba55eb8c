//! Grouped-query attention with optional q/k RMSNorm (Qwen3's per head, MiniMax-M2's over all
//! heads), q/k/v biases and rotary embeddings on part of each head (GLM-4.5, MiniMax-M2).

use crate::backend::{for_each_row, ops, PackedMatrix};
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::QkNorm;
use crate::error::Result;
use crate::kv_cache::{KvRows, LayerCache};
use crate::layers::rope::{apply_rope, RopeTable};

/// Shapes of one GQA layer.
#[derive(Debug, Clone, Copy)]
pub struct GqaShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The RMSNorm of queries and keys, if any.
    pub qk_norm: QkNorm,
    /// GLM's q/k/v projection biases.
    pub bias: bool,
}

#[derive(Debug)]
pub struct GqaAttention {
    /// q, k and v projections stacked: `[(heads + 2 * kv_heads) * head_dim, hidden]`.
    qkv: PackedMatrix,
    o: PackedMatrix,
    /// q, k and v biases stacked as `qkv`'s rows.
    qkv_bias: Option<Vec<f32>>,
    /// `head_dim` wide (per head), or all heads' width (MiniMax-M2).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    eps: f32,
}

impl GqaAttention {
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        shape: GqaShape,
        scale: f32,
        eps: f32,
    ) -> Result<Self> {
        let GqaShape {
            hidden,
            heads,
            kv_heads,
            head_dim,
            qk_norm,
            bias,
        } = shape;
        let q = ckpt.load_native(
            &format!("{prefix}.q_proj.weight"),
            &[heads * head_dim, hidden],
        )?;
        let k = ckpt.load_native(
            &format!("{prefix}.k_proj.weight"),
            &[kv_heads * head_dim, hidden],
        )?;
        let v = ckpt.load_native(
            &format!("{prefix}.v_proj.weight"),
            &[kv_heads * head_dim, hidden],
        )?;
        let o = ckpt.load_native(
            &format!("{prefix}.o_proj.weight"),
            &[hidden, heads * head_dim],
        )?;
        let norm_widths = match qk_norm {
            QkNorm::None => None,
            QkNorm::PerHead => Some((head_dim, head_dim)),
            QkNorm::AllHeads => Some((heads * head_dim, kv_heads * head_dim)),
        };
        let (q_norm, k_norm) = match norm_widths {
            Some((q, k)) => (
                Some(ckpt.load_f32(&format!("{prefix}.q_norm.weight"), &[q])?),
                Some(ckpt.load_f32(&format!("{prefix}.k_norm.weight"), &[k])?),
            ),
            None => (None, None),
        };
        let qkv_bias = if bias {
            let mut stacked = Vec::with_capacity((heads + 2 * kv_heads) * head_dim);
            for (name, rows) in [("q", heads), ("k", kv_heads), ("v", kv_heads)] {
                stacked.extend(
                    ckpt.load_f32(&format!("{prefix}.{name}_proj.bias"), &[rows * head_dim])?,
                );
            }
            Some(stacked)
        } else {
            None
        };
        Ok(Self {
            qkv: PackedMatrix::from_native(&[&q, &k, &v], hidden),
            o: PackedMatrix::from_native(&[&o], heads * head_dim),
            qkv_bias,
            q_norm,
            k_norm,
            heads,
            kv_heads,
            head_dim,
            scale,
            eps,
        })
    }

    pub fn forward(
        &self,
        x: &[f32],
        layout: &BatchLayout,
        rope: &RopeTable,
        caches: &mut [LayerCache<'_>],
    ) -> Vec<f32> {
        let rows = layout.num_rows();
        let d = self.head_dim;
        let q_width = self.heads * d;
        let kv_width = self.kv_heads * d;
        let qkv_width = q_width + 2 * kv_width;
        let mut qkv = self.qkv.matmul(x, rows);
        for (r, row) in qkv.chunks_exact_mut(qkv_width).enumerate() {
            if let Some(bias) = &self.qkv_bias {
                for (x, b) in row.iter_mut().zip(bias) {
                    *x += b;
                }
            }
            let (cos, sin) = rope.row(r);
            // The first `2 * cos.len()` dimensions of each head turn; GLM's other half does not.
            let rotated = 2 * cos.len();
            let (q, kv) = row.split_at_mut(q_width);
            let k = &mut kv[..kv_width];
            for (part, norm) in [(q, &self.q_norm), (k, &self.k_norm)] {
                // Per head, or over all heads at once: the weight's width says which.
                if let Some(w) = norm {
                    ops::rms_norm_rows(part, w, self.eps);
                }
                for head in part.chunks_exact_mut(d) {
                    apply_rope(&mut head[..rotated], cos, sin, false);
                }
            }
        }
        for (cache, span) in caches.iter_mut().zip(&layout.seqs) {
            for r in span.first_row..span.first_row + span.len {
                let row = &qkv[r * qkv_width..(r + 1) * qkv_width];
                let (keys, values) = cache.row_mut(layout.row_pos[r]);
                keys.copy_from_slice(&row[q_width..q_width + kv_width]);
                values.copy_from_slice(&row[q_width + kv_width..]);
            }
        }
        let cached: Vec<KvRows<'_>> = caches
            .iter()
            .zip(&layout.seqs)
            .map(|(c, span)| c.rows(span.start_pos + span.len))
            .collect();
        let mut out = vec![0.0f32; rows * q_width];
        // One task per row and KV head: the query heads that share a KV head are contiguous in
        // a row's output, scored together so that each cached row is read once per KV head.
        let group = self.heads / self.kv_heads;
        let attend = |(task, out_heads): (usize, &mut [f32])| {
            let (r, kvh) = (task / self.kv_heads, task % self.kv_heads);
            let cache = &cached[layout.row_seq[r]];
            let visible = layout.row_pos[r] + 1;
            let q = &qkv[r * qkv_width + kvh * group * d..][..group * d];
            let mut scores = vec![0.0f32; group * visible];
            ops::dot_rows_many(q, d, &cache.keys[..visible], kvh * d, &mut scores);
            for score in scores.iter_mut() {
                *score *= self.scale;
            }
            for head_scores in scores.chunks_exact_mut(visible) {
                ops::softmax_in_place(head_scores);
            }
            ops::weighted_sum_rows_many(&scores, &cache.values[..visible], kvh * d, d, out_heads);
        };
        let parallel = super::parallel_heads(layout, self.heads);
        for_each_row(&mut out, group * d, parallel, attend);
        self.o.matmul(&out, rows)
    }
}
