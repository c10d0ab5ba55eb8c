//! Attention of the dense part on a device, written once over [`DenseOps`]: grouped-query
//! attention (Qwen3-MoE, Mixtral) and DeepSeek's absorbed MLA, each loading its own weights by
//! name and running as the CPU's `layers::attention` computes it. Each appends the step's rows
//! to every sequence's cache, then lets every row attend to its own sequence up to its own
//! position.

use super::ops::{DenseOps, DeviceStep};
use super::pool::PooledLayer;
use super::weights::upload_stacked;
use crate::backend::NativeWeight;
use crate::checkpoint::Checkpoint;
use crate::config::{AttentionConfig, ModelConfig, QkNorm};
use crate::device::shapes::{AttentionSpec, HeadView, StridedGemm};
use crate::device::MatrixPrecision;
use crate::error::{ModelError, Result};
use crate::families;
use crate::layers::attention::mla::MlaShape;
use crate::layers::attention::GqaShape;
use crate::layers::attention_shapes::{gqa_shape, mla_shape};

/// One layer's attention on the device.
pub(super) enum DeviceAttention<O: DenseOps> {
    Gqa(DeviceGqa<O>),
    Mla(DeviceMla<O>),
}

/// Grouped-query attention with optional per-head q/k RMSNorm (Qwen3), q/k/v biases and
/// partial rotary (GLM-4.5).
pub(super) struct DeviceGqa<O: DenseOps> {
    /// `[(heads + 2 * kv_heads) * d, hidden]`.
    qkv: O::Matrix,
    /// q, k and v biases stacked as `qkv`'s rows.
    qkv_bias: Option<O::F32>,
    o: O::Matrix,
    q_norm: Option<O::F32>,
    k_norm: Option<O::F32>,
    shape: GqaShape,
    scale: f32,
    eps: f32,
}

/// Absorbed MLA, as the CPU computes it: the cache holds `[latent | rotated rope key]`.
pub(super) struct DeviceMla<O: DenseOps> {
    shape: MlaShape,
    /// `[q_a; kv_a]` (or `[q; kv_a]`) stacked.
    input_proj: O::Matrix,
    input_width: usize,
    q_a_norm: Option<O::F32>,
    q_b: Option<O::Matrix>,
    kv_a_norm: O::F32,
    /// Per head `W_ukᵀ` (`[lora, nope]`), heads stacked.
    uk_t: O::Matrix,
    /// Per head `W_uv` (`[v, lora]`), heads stacked.
    uv: O::Matrix,
    o: O::Matrix,
    interleaved: bool,
    scale: f32,
    eps: f32,
}

/// Each row's `width` values of `src` (at `view`) appended to its sequence's buffer, whose rows
/// are `width` wide.
fn append_to<O: DenseOps>(
    ops: &O,
    src: &O::F32,
    view: HeadView,
    width: usize,
    chunks: &mut [O::F32],
    step: &DeviceStep<O>,
) -> std::result::Result<(), O::Error> {
    ops.append_rows(src, view, width, chunks, width, 0, step)
}

impl<O> DeviceAttention<O>
where
    O: DenseOps,
    ModelError: From<O::Error>,
{
    /// Loads the attention of `layer`, by the names its family gives it.
    pub fn load(ops: &O, ckpt: &Checkpoint, config: &ModelConfig, layer: usize) -> Result<Self> {
        let prefix = format!("{}.self_attn", families::layer_prefix(layer));
        match config.attention {
            AttentionConfig::Gqa { .. } => {
                DeviceGqa::load(ops, ckpt, config, &prefix).map(Self::Gqa)
            }
            AttentionConfig::Mla { .. } => {
                DeviceMla::load(ops, ckpt, config, &prefix).map(Self::Mla)
            }
        }
    }

    /// Values per cached token: (key buffer, value buffer or none when the values live in the
    /// key rows).
    pub fn cache_widths(&self) -> (usize, Option<usize>) {
        match self {
            Self::Gqa(a) => {
                let width = a.shape.kv_heads * a.shape.head_dim;
                (width, Some(width))
            }
            Self::Mla(a) => (a.shape.kv_lora_rank + a.shape.rope, None),
        }
    }

    /// `x` is `[rows, hidden]` (already normalised); `cache` is this layer's part of the KV
    /// pool, the step's block tables saying which rows are whose. Returns `[rows, hidden]`.
    pub fn forward(
        &self,
        ops: &O,
        x: &O::F32,
        step: &DeviceStep<O>,
        cache: &mut PooledLayer<O::F32>,
    ) -> Result<O::F32> {
        match self {
            Self::Gqa(a) => a.forward(ops, x, step, cache),
            Self::Mla(a) => a.forward(ops, x, step, cache),
        }
    }
}

/// A matrix made of tensors under the layer's `self_attn` (`names` relative to `prefix`), in
/// their precision.
fn upload_matrix<O: DenseOps>(
    ops: &O,
    ckpt: &Checkpoint,
    prefix: &str,
    values: &[f32],
    names: &[&str],
) -> std::result::Result<O::Matrix, O::Error> {
    let names: Vec<String> = names.iter().map(|n| format!("{prefix}.{n}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ops.upload_matrix(values, MatrixPrecision::of(ckpt, &names))
}

impl<O> DeviceGqa<O>
where
    O: DenseOps,
    ModelError: From<O::Error>,
{
    fn load(ops: &O, ckpt: &Checkpoint, config: &ModelConfig, prefix: &str) -> Result<Self> {
        let shape = gqa_shape(config).ok_or_else(|| {
            ModelError::InvalidRequest("grouped-query attention settings expected".into())
        })?;
        let (hidden, d) = (shape.hidden, shape.head_dim);
        let name = |n: &str| format!("{prefix}.{n}.weight");
        let (q, k, v, o) = (
            name("q_proj"),
            name("k_proj"),
            name("v_proj"),
            name("o_proj"),
        );
        let qkv = [
            (q.as_str(), shape.heads * d),
            (k.as_str(), shape.kv_heads * d),
            (v.as_str(), shape.kv_heads * d),
        ];
        let norm = |name: &str, heads: usize| -> Result<Option<O::F32>> {
            let width = match shape.qk_norm {
                QkNorm::None => return Ok(None),
                QkNorm::PerHead => d,
                QkNorm::AllHeads => heads * d,
            };
            let w = ckpt.load_f32(&format!("{prefix}.{name}.weight"), &[width])?;
            Ok(Some(ops.upload_f32(&w)?))
        };
        let qkv_bias = if shape.bias {
            let mut stacked = Vec::new();
            for (name, rows) in qkv {
                let name = name.replace(".weight", ".bias");
                stacked.extend(ckpt.load_f32(&name, &[rows])?);
            }
            Some(ops.upload_f32(&stacked)?)
        } else {
            None
        };
        Ok(Self {
            qkv: upload_stacked(ops, ckpt, &qkv, hidden)?,
            qkv_bias,
            o: upload_stacked(ops, ckpt, &[(o.as_str(), hidden)], shape.heads * d)?,
            q_norm: norm("q_norm", shape.heads)?,
            k_norm: norm("k_norm", shape.kv_heads)?,
            shape,
            scale: config.softmax_scale(),
            eps: config.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        ops: &O,
        x: &O::F32,
        step: &DeviceStep<O>,
        cache: &mut PooledLayer<O::F32>,
    ) -> Result<O::F32> {
        let rows = step.rows;
        let GqaShape {
            hidden,
            heads,
            kv_heads,
            head_dim: d,
            ..
        } = self.shape;
        let (q_width, kv_width) = (heads * d, kv_heads * d);
        let width = q_width + 2 * kv_width;
        let mut qkv_out = ops.linear(x, rows, hidden, &self.qkv, width)?;
        if let Some(bias) = &self.qkv_bias {
            ops.add_bias(&mut qkv_out, bias, rows, width)?;
        }
        let view = |offset| HeadView {
            offset,
            row_stride: width,
            head_stride: d,
        };
        let q = self.rotate(ops, &qkv_out, view(0), heads, &self.q_norm, step)?;
        let k = self.rotate(ops, &qkv_out, view(q_width), kv_heads, &self.k_norm, step)?;
        let key_rows = HeadView::packed(0, 1, kv_width);
        append_to(ops, &k, key_rows, kv_width, &mut cache.keys, step)?;
        let values = cache
            .values
            .as_mut()
            .ok_or_else(|| ModelError::InvalidRequest("GQA cache without values".into()))?;
        let new_values = HeadView::columns(q_width + kv_width, width);
        append_to(ops, &qkv_out, new_values, kv_width, values, step)?;
        let spec = AttentionSpec {
            heads,
            kv_heads,
            dk: d,
            dv: d,
            key_stride: kv_width,
            value_stride: kv_width,
            key_head_stride: d,
            value_head_stride: d,
            scale: self.scale,
        };
        let values = cache.values.as_deref().unwrap_or(&cache.keys);
        let mut out = ops.scratch(rows * q_width)?;
        ops.attention(&q, &spec, &cache.keys, values, &mut out, step)?;
        Ok(ops.linear(&out, rows, q_width, &self.o, hidden)?)
    }

    /// `n_heads` heads of the projection at `from`, normalised (per head as Qwen3, or over all
    /// of them as MiniMax-M2) and then rotated, both out of place: `[rows, n_heads, head_dim]`.
    fn rotate(
        &self,
        ops: &O,
        qkv_out: &O::F32,
        from: HeadView,
        n_heads: usize,
        norm: &Option<O::F32>,
        step: &DeviceStep<O>,
    ) -> Result<O::F32> {
        let (rows, d) = (step.rows, self.shape.head_dim);
        let mut rotated = ops.scratch(rows * n_heads * d)?;
        let packed = HeadView::packed(0, n_heads, d);
        match norm {
            Some(w) => {
                let mut normed = ops.scratch(rows * n_heads * d)?;
                // Over all heads: one "head" as wide as all of them.
                let (from_norm, to_norm, norm_heads, norm_width) = match self.shape.qk_norm {
                    QkNorm::AllHeads => (
                        HeadView::columns(from.offset, from.row_stride),
                        HeadView::packed(0, 1, n_heads * d),
                        1,
                        n_heads * d,
                    ),
                    _ => (from, packed, n_heads, d),
                };
                ops.rms_norm(
                    qkv_out,
                    from_norm,
                    w,
                    &mut normed,
                    to_norm,
                    rows,
                    norm_heads,
                    norm_width,
                    self.eps,
                )?;
                ops.rope(
                    &normed,
                    packed,
                    &mut rotated,
                    packed,
                    n_heads,
                    d,
                    false,
                    step,
                )?;
            }
            None => ops.rope(qkv_out, from, &mut rotated, packed, n_heads, d, false, step)?,
        }
        Ok(rotated)
    }
}

impl<O> DeviceMla<O>
where
    O: DenseOps,
    ModelError: From<O::Error>,
{
    fn load(ops: &O, ckpt: &Checkpoint, config: &ModelConfig, prefix: &str) -> Result<Self> {
        let (
            Some(shape),
            AttentionConfig::Mla {
                rope_interleave, ..
            },
        ) = (mla_shape(config), &config.attention)
        else {
            return Err(ModelError::InvalidRequest(
                "deepseek_v3 needs MLA attention settings".into(),
            ));
        };
        let MlaShape {
            hidden,
            heads,
            q_lora_rank,
            kv_lora_rank: lora,
            nope,
            rope,
            v,
        } = shape;
        let q_head = nope + rope;
        let load = |name: &str, shape: &[usize]| ckpt.load_f32(&format!("{prefix}.{name}"), shape);
        let matrix =
            |values: &[f32], names: &[&str]| upload_matrix(ops, ckpt, prefix, values, names);
        let name = |n: &str| format!("{prefix}.{n}");
        let (q_in, q_in_rows) = match q_lora_rank {
            Some(rank) => (name("q_a_proj.weight"), rank),
            None => (name("q_proj.weight"), heads * q_head),
        };
        let kv_a = name("kv_a_proj_with_mqa.weight");
        let input = [(q_in.as_str(), q_in_rows), (kv_a.as_str(), lora + rope)];
        let (q_a_norm, q_b) = match q_lora_rank {
            Some(rank) => {
                let q_b = name("q_b_proj.weight");
                (
                    Some(ops.upload_f32(&load("q_a_layernorm.weight", &[rank])?)?),
                    Some(upload_stacked(
                        ops,
                        ckpt,
                        &[(q_b.as_str(), heads * q_head)],
                        rank,
                    )?),
                )
            }
            None => (None, None),
        };
        // Split per head and transposed for the absorbed products: widened (f32 or bf16 as
        // its precision says), FP8 or not.
        let (uk_t, uv) = match fp8_kv_b_halves(ops, ckpt, &name("kv_b_proj.weight"), shape)? {
            Some(halves) => halves,
            None => {
                let kv_b = load("kv_b_proj.weight", &[heads * (nope + v), lora])?;
                let (uk_t, uv) = split_kv_b(&kv_b, shape);
                (
                    matrix(&uk_t, &["kv_b_proj.weight"])?,
                    matrix(&uv, &["kv_b_proj.weight"])?,
                )
            }
        };
        let o = name("o_proj.weight");
        Ok(Self {
            shape,
            input_proj: upload_stacked(ops, ckpt, &input, hidden)?,
            input_width: q_in_rows + lora + rope,
            q_a_norm,
            q_b,
            kv_a_norm: ops.upload_f32(&load("kv_a_layernorm.weight", &[lora])?)?,
            uk_t,
            uv,
            o: upload_stacked(ops, ckpt, &[(o.as_str(), hidden)], heads * v)?,
            interleaved: *rope_interleave,
            scale: config.softmax_scale(),
            eps: config.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        ops: &O,
        x: &O::F32,
        step: &DeviceStep<O>,
        cache: &mut PooledLayer<O::F32>,
    ) -> Result<O::F32> {
        let MlaShape {
            hidden,
            heads,
            kv_lora_rank: lora,
            rope,
            v,
            ..
        } = self.shape;
        let rows = step.rows;
        let proj = ops.linear(x, rows, hidden, &self.input_proj, self.input_width)?;
        let query = self.query(ops, &proj, step)?;
        // This step's cache rows: `[normalised latent | rotated rope key]`.
        let qk = lora + rope;
        let new_rows = self.cache_rows(ops, &proj, step)?;
        let packed = HeadView::packed(0, 1, qk);
        append_to(ops, &new_rows, packed, qk, &mut cache.keys, step)?;
        let attn = self.attend(ops, &query, &cache.keys, step)?;
        Ok(ops.linear(&attn, rows, heads * v, &self.o, hidden)?)
    }

    /// The attention query per head, `[rows, heads, lora + rope]`: `[q_nope · W_ukᵀ | rotated
    /// q_rope]`.
    fn query(&self, ops: &O, proj: &O::F32, step: &DeviceStep<O>) -> Result<O::F32> {
        let MlaShape {
            heads,
            kv_lora_rank: lora,
            nope,
            rope,
            ..
        } = self.shape;
        let rows = step.rows;
        let q_head = nope + rope;
        let proj_width = self.input_width;
        let q_in = proj_width - lora - rope;
        // Queries: `[rows, heads, q_head]` at (buffer, row stride).
        let q_low_rank;
        let (q_buf, q_stride) = match (&self.q_b, &self.q_a_norm) {
            (Some(q_b), Some(norm)) => {
                let mut q_a = ops.scratch(rows * q_in)?;
                ops.rms_norm(
                    proj,
                    HeadView::columns(0, proj_width),
                    norm,
                    &mut q_a,
                    HeadView::packed(0, 1, q_in),
                    rows,
                    1,
                    q_in,
                    self.eps,
                )?;
                q_low_rank = ops.linear(&q_a, rows, q_in, q_b, heads * q_head)?;
                (&q_low_rank, heads * q_head)
            }
            _ => (proj, proj_width),
        };
        let qk = lora + rope;
        let mut query = ops.scratch(rows * heads * qk)?;
        let q_in_gemm = ops.gemm_input(q_buf, rows * q_stride, &self.uk_t)?;
        let absorb = StridedGemm::per_head(
            rows,
            heads,
            lora,
            nope,
            (q_stride, q_head),
            (heads * qk, qk),
        );
        ops.gemm(&absorb, &self.uk_t, 0, &q_in_gemm, 0, &mut query, 0)?;
        let q_rope = HeadView {
            offset: nope,
            row_stride: q_stride,
            head_stride: q_head,
        };
        let query_rope = HeadView {
            offset: lora,
            row_stride: heads * qk,
            head_stride: qk,
        };
        ops.rope(
            q_buf,
            q_rope,
            &mut query,
            query_rope,
            heads,
            self.shape.rope,
            self.interleaved,
            step,
        )?;
        Ok(query)
    }

    /// This step's cache rows, `[rows, lora + rope]`: the normalised latent and the rotated
    /// rope key.
    fn cache_rows(&self, ops: &O, proj: &O::F32, step: &DeviceStep<O>) -> Result<O::F32> {
        let (lora, rope) = (self.shape.kv_lora_rank, self.shape.rope);
        let rows = step.rows;
        let proj_width = self.input_width;
        let q_in = proj_width - lora - rope;
        let qk = lora + rope;
        let mut new_rows = ops.scratch(rows * qk)?;
        ops.rms_norm(
            proj,
            HeadView::columns(q_in, proj_width),
            &self.kv_a_norm,
            &mut new_rows,
            HeadView::columns(0, qk),
            rows,
            1,
            lora,
            self.eps,
        )?;
        ops.rope(
            proj,
            HeadView::columns(q_in + lora, proj_width),
            &mut new_rows,
            HeadView::columns(lora, qk),
            1,
            rope,
            self.interleaved,
            step,
        )?;
        Ok(new_rows)
    }

    /// Attention in latent space over the cached rows (each the key and, its latent part, the
    /// value), then per head `W_uv · context`, heads side by side: `[rows, heads * v]`.
    fn attend(
        &self,
        ops: &O,
        query: &O::F32,
        keys: &[O::F32],
        step: &DeviceStep<O>,
    ) -> Result<O::F32> {
        let MlaShape {
            heads,
            kv_lora_rank: lora,
            rope,
            v,
            ..
        } = self.shape;
        let rows = step.rows;
        let qk = lora + rope;
        let spec = AttentionSpec {
            heads,
            kv_heads: 1,
            dk: qk,
            dv: lora,
            key_stride: qk,
            value_stride: qk,
            key_head_stride: 0,
            value_head_stride: 0,
            scale: self.scale,
        };
        let mut context = ops.scratch(rows * heads * lora)?;
        ops.attention(query, &spec, keys, keys, &mut context, step)?;
        let context_in = ops.gemm_input(&context, rows * heads * lora, &self.uv)?;
        let expand =
            StridedGemm::per_head(rows, heads, v, lora, (heads * lora, lora), (heads * v, v));
        let mut attn = ops.scratch(rows * heads * v)?;
        ops.gemm(&expand, &self.uv, 0, &context_in, 0, &mut attn, 0)?;
        Ok(attn)
    }
}

/// `kv_b_proj` kept as FP8 where the device keeps FP8 (`--gpu-fp8 keep`) and the checkpoint
/// holds it so: [`split_kv_b`]'s halves as per-head FP8 matrices, each half's heads stacked
/// (`None`: widened instead, as when they do not share their segments).
fn fp8_kv_b_halves<O: DenseOps>(
    ops: &O,
    ckpt: &Checkpoint,
    name: &str,
    shape: MlaShape,
) -> Result<Option<(O::Matrix, O::Matrix)>>
where
    ModelError: From<O::Error>,
{
    let MlaShape {
        heads,
        kv_lora_rank: lora,
        nope,
        v,
        ..
    } = shape;
    if !ops.keeps_fp8() || ckpt.weights_dtype() != crate::checkpoint::WeightsDtype::AsStored {
        return Ok(None);
    }
    let kv_b = ckpt.load_native(name, &[heads * (nope + v), lora])?;
    if !matches!(kv_b, NativeWeight::Fp8(_)) {
        return Ok(None);
    }
    let fp8 = |w: NativeWeight| match w {
        NativeWeight::Fp8(m) => Some(m),
        _ => None,
    };
    let per_head = |half: &dyn Fn(usize) -> NativeWeight| -> Option<Vec<_>> {
        let heads: Option<Vec<_>> = (0..heads).map(|h| fp8(half(h))).collect();
        heads.filter(|hs| {
            hs.windows(2)
                .all(|w| w[0].segment_starts == w[1].segment_starts)
        })
    };
    let first = |h: usize| h * (nope + v);
    let uk_t = per_head(&|h| kv_b.transposed_rows(first(h), nope, lora));
    let uv = per_head(&|h| kv_b.row_block(first(h) + nope, v, lora));
    match (uk_t, uv) {
        (Some(uk_t), Some(uv)) => Ok(Some((
            ops.upload_fp8_heads(&uk_t)?,
            ops.upload_fp8_heads(&uv)?,
        ))),
        _ => Ok(None),
    }
}

/// `kv_b_proj` (`[heads * (nope + v), lora]`) split per head into `W_ukᵀ` (`[lora, nope]`,
/// absorbed into the query) and `W_uv` (`[v, lora]`), heads stacked.
fn split_kv_b(kv_b: &[f32], shape: MlaShape) -> (Vec<f32>, Vec<f32>) {
    let MlaShape {
        heads,
        kv_lora_rank: lora,
        nope,
        v,
        ..
    } = shape;
    let mut uk_t = Vec::with_capacity(heads * lora * nope);
    let mut uv = Vec::with_capacity(heads * v * lora);
    for head in 0..heads {
        let base = head * (nope + v) * lora;
        let uk = &kv_b[base..base + nope * lora];
        for c in 0..lora {
            uk_t.extend((0..nope).map(|i| uk[i * lora + c]));
        }
        uv.extend_from_slice(&kv_b[base + nope * lora..base + (nope + v) * lora]);
    }
    (uk_t, uv)
}
