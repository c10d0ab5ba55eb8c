//! [`DeviceDenseModel`]: the router's dense part with every weight (the embedding table too),
//! the KV cache and every activation on a device, written once over [`DenseOps`]. Same
//! mathematics and the same combine order as [`crate::dense::DenseModel`]; a step uploads its
//! token ids, and only the routed experts' rows leave the device (the expert backend takes and
//! returns host rows).

use super::cache::{DeviceLayerCache, DeviceSequenceCache};
use super::ops::{AttentionSpec, DenseOps, DeviceStep, HeadView, MatrixPrecision, StridedGemm};
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::{AttentionConfig, ModelConfig};
use crate::dense::{logit_rows, split_logits, validate_step, StepSequence};
use crate::error::{ModelError, Result};
use crate::experts::ExpertBackend;
use crate::families;
use crate::grouped_ffn::ColumnMajorGemm;
use crate::layers::attention::mla::MlaShape;
use crate::layers::attention_shapes::mla_shape;
use crate::layers::gate::GateRule;
use crate::layers::mlp::MlpNames;
use crate::layers::rope::Rope;
use crate::routes::ExpertRoutes;

/// Gated SiLU MLP (dense layers, shared experts) on the device.
struct DeviceMlp<O: DenseOps> {
    /// `[2 * inter, hidden]`: gate rows then up rows.
    gate_up: O::Matrix,
    down: O::Matrix,
    inter: usize,
}

enum DeviceAttention<O: DenseOps> {
    Gqa {
        /// `[(heads + 2 * kv_heads) * d, hidden]`.
        qkv: O::Matrix,
        o: O::Matrix,
        q_norm: Option<O::F32>,
        k_norm: Option<O::F32>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    },
    /// Absorbed MLA, as the CPU computes it: the cache holds `[latent | rotated rope key]`.
    Mla {
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
    },
}

enum DeviceFfn<O: DenseOps> {
    Dense(DeviceMlp<O>),
    Moe {
        /// `[num_experts, hidden]`, always f32.
        gate: O::Matrix,
        correction_bias: Option<O::F32>,
        rule: GateRule,
        shared: Option<DeviceMlp<O>>,
    },
}

struct DeviceLayer<O: DenseOps> {
    input_norm: O::F32,
    attention: DeviceAttention<O>,
    post_attention_norm: O::F32,
    ffn: DeviceFfn<O>,
}

pub struct DeviceDenseModel<O: DenseOps> {
    ops: O,
    config: ModelConfig,
    /// `[vocab, hidden]`, in the checkpoint tensor's precision: a lookup of exact values (a
    /// bf16 copy only in plain bf16 mode, as for every matrix there).
    embed: O::Matrix,
    layers: Vec<DeviceLayer<O>>,
    final_norm: O::F32,
    /// `None` where the model ties it to `embed`.
    lm_head: Option<O::Matrix>,
    rope: Rope,
    scale: f32,
}

/// `c[rows, n_out] = x[rows, k] · w[n_out, k]ᵀ`, all row-major and packed.
fn rows_times(rows: usize, n_out: usize, k: usize) -> StridedGemm {
    StridedGemm::single(ColumnMajorGemm::rows_times_weights(rows, n_out, k))
}

impl<O> DeviceDenseModel<O>
where
    O: DenseOps,
    O::F32: Send + 'static,
    ModelError: From<O::Error>,
{
    pub fn load(ops: O, ckpt: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let h = config.hidden_size;
        let v = config.vocab_size;
        let embed = ops.upload_matrix(
            &ckpt.load_f32("model.embed_tokens.weight", &[v, h])?,
            MatrixPrecision::of(ckpt, &["model.embed_tokens.weight"]),
        )?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for layer in 0..config.num_layers {
            let p = families::layer_prefix(layer);
            let attention = load_attention(&ops, ckpt, config, layer)?;
            let ffn = if config.is_moe_layer(layer) {
                let names = families::moe_names(config, layer);
                let gate = ckpt.load_f32(&names.gate, &[config.moe.num_experts, h])?;
                let correction_bias = match &names.correction_bias {
                    Some(n) => Some(ops.upload_f32(&ckpt.load_f32(n, &[config.moe.num_experts])?)?),
                    None => None,
                };
                let shared = match &names.shared {
                    Some(n) => Some(load_mlp(
                        &ops,
                        ckpt,
                        n,
                        h,
                        config.moe.intermediate_size * config.moe.n_shared_experts,
                    )?),
                    None => None,
                };
                let rule = GateRule::new(&config.moe);
                if let crate::config::Gating::SigmoidGroupLimited { n_group, .. } = rule.gating {
                    if n_group == 0 || n_group > 64 || !rule.num_experts.is_multiple_of(n_group) {
                        return Err(ModelError::InvalidRequest(format!(
                            "the device gate supports 1..=64 expert groups dividing the experts, \
                             not {n_group}"
                        )));
                    }
                }
                DeviceFfn::Moe {
                    gate: ops.upload_matrix(&gate, MatrixPrecision::F32)?,
                    correction_bias,
                    rule,
                    shared,
                }
            } else {
                DeviceFfn::Dense(load_mlp(
                    &ops,
                    ckpt,
                    &families::dense_mlp_names(layer),
                    h,
                    config.dense_intermediate_size,
                )?)
            };
            layers.push(DeviceLayer {
                input_norm: ops
                    .upload_f32(&ckpt.load_f32(&format!("{p}.input_layernorm.weight"), &[h])?)?,
                attention,
                post_attention_norm: ops.upload_f32(
                    &ckpt.load_f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                )?,
                ffn,
            });
        }
        let final_norm = ops.upload_f32(&ckpt.load_f32("model.norm.weight", &[h])?)?;
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(ops.upload_matrix(
                &ckpt.load_f32("lm_head.weight", &[v, h])?,
                MatrixPrecision::of(ckpt, &["lm_head.weight"]),
            )?)
        };
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            final_norm,
            lm_head,
            rope: Rope::new(&config.rope),
            scale: config.softmax_scale(),
            ops,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Values per cached token of layer `l`: (key buffer, value buffer or none when the
    /// values live in the key rows).
    fn cache_widths(&self, l: usize) -> (usize, Option<usize>) {
        match &self.layers[l].attention {
            DeviceAttention::Gqa {
                kv_heads, head_dim, ..
            } => (kv_heads * head_dim, Some(kv_heads * head_dim)),
            DeviceAttention::Mla { shape, .. } => (shape.kv_lora_rank + shape.rope, None),
        }
    }

    /// Makes room for `needed` tokens, keeping the first `cached`: at the first step the
    /// sequence's whole reservation (`reserved`, when its owner gave one), later by doubling
    /// (so a decode past its reservation, or without one, grows its cache rarely).
    fn reserve(
        &self,
        slot: &mut Option<Box<dyn crate::kv_cache::DeviceCacheSlot>>,
        cached: usize,
        needed: usize,
        reserved: usize,
    ) -> Result<()> {
        let fresh = slot.is_none();
        let cache = match slot {
            Some(boxed) => boxed
                .as_any_mut()
                .downcast_mut::<DeviceSequenceCache<O::F32>>()
                .ok_or_else(|| {
                    ModelError::InvalidRequest("sequence cache belongs to another device".into())
                })?,
            None => slot
                .insert(Box::new(DeviceSequenceCache::<O::F32>::default()))
                .as_any_mut()
                .downcast_mut::<DeviceSequenceCache<O::F32>>()
                .ok_or_else(|| ModelError::InvalidRequest("device cache type".into()))?,
        };
        if !fresh && needed <= cache.capacity {
            return Ok(());
        }
        let capacity = if fresh {
            needed.max(reserved).max(16)
        } else {
            needed.max(cache.capacity * 2)
        }
        .min(self.config.max_position_embeddings.max(needed));
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut bytes = 0;
        for l in 0..self.layers.len() {
            let (kw, vw) = self.cache_widths(l);
            let mut keys = self.ops.scratch(capacity * kw)?;
            let mut values = match vw {
                Some(vw) => Some(self.ops.scratch(capacity * vw)?),
                None => None,
            };
            if let Some(old) = cache.layers.get(l) {
                self.ops.copy_prefix(&old.keys, &mut keys, cached * kw)?;
                if let (Some(old), Some(new), Some(vw)) = (&old.values, &mut values, vw) {
                    self.ops.copy_prefix(old, new, cached * vw)?;
                }
            }
            bytes += capacity * (kw + vw.unwrap_or(0)) * 4;
            layers.push(DeviceLayerCache { keys, values });
        }
        cache.layers = layers;
        cache.capacity = capacity;
        cache.bytes = bytes;
        Ok(())
    }

    /// One batched step, as [`crate::dense::DenseModel::forward`].
    pub fn forward(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>> {
        validate_step(&self.config, seqs)?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let ops = &self.ops;
        let h = self.config.hidden_size;
        let eps = self.config.rms_norm_eps;
        let layout = BatchLayout::new(seqs.iter().map(|s| (s.cache.len, s.tokens.len())));
        let rows = layout.num_rows();

        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        for s in seqs.iter_mut() {
            let (cached, needed) = (s.cache.len, s.cache.len + s.tokens.len());
            self.reserve(&mut s.cache.device, cached, needed, s.cache.reserved)?;
        }
        let table = self.rope.table(&layout.row_pos);
        let as_u32 = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        let step = DeviceStep::<O> {
            rows,
            row_seq: ops.upload_index(&as_u32(&layout.row_seq))?,
            row_pos: ops.upload_index(&as_u32(&layout.row_pos))?,
            cos: ops.upload_f32(&table.cos)?,
            sin: ops.upload_f32(&table.sin)?,
            rope_half: table.half,
        };
        // Token ids were checked against the vocabulary (`validate_step`).
        let mut hidden = ops.scratch(rows * h)?;
        ops.embed_rows(&self.embed, &ops.upload_index(&ids)?, &mut hidden, rows, h)?;
        let mut caches: Vec<&mut DeviceSequenceCache<O::F32>> = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let cache = s
                .cache
                .device
                .as_mut()
                .and_then(|b| b.as_any_mut().downcast_mut::<DeviceSequenceCache<O::F32>>())
                .ok_or_else(|| ModelError::InvalidRequest("device cache missing".into()))?;
            caches.push(cache);
        }

        let row = HeadView::packed(0, 1, h);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut normed = ops.scratch(rows * h)?;
            ops.rms_norm(
                &hidden,
                row,
                &layer.input_norm,
                &mut normed,
                row,
                rows,
                1,
                h,
                eps,
            )?;
            let mut layer_caches: Vec<&mut DeviceLayerCache<O::F32>> =
                caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            let attn = self.attention(&layer.attention, &normed, &step, &mut layer_caches)?;
            ops.add(&mut hidden, &attn, rows * h)?;
            ops.rms_norm(
                &hidden,
                row,
                &layer.post_attention_norm,
                &mut normed,
                row,
                rows,
                1,
                h,
                eps,
            )?;
            match &layer.ffn {
                DeviceFfn::Dense(mlp) => {
                    let out = self.mlp(mlp, &normed, rows)?;
                    ops.add(&mut hidden, &out, rows * h)?;
                }
                DeviceFfn::Moe {
                    gate,
                    correction_bias,
                    rule,
                    shared,
                } => {
                    let logits = self.linear(&normed, rows, h, gate, rule.num_experts)?;
                    let (chosen, weights) =
                        ops.top_k(&logits, correction_bias.as_ref(), rule, rows)?;
                    let routes = routes_from_choices(&chosen, &weights, rule.top_k, rows)?;
                    let host_rows = ops.download(&normed, rows * h)?;
                    // Queued before the routed experts are awaited, so the device computes
                    // the shared experts while the expert nodes compute theirs.
                    let shared_out = match shared {
                        Some(mlp) => Some(self.mlp(mlp, &normed, rows)?),
                        None => None,
                    };
                    let pair_out = experts.run_experts(l, &host_rows, &routes)?;
                    if pair_out.len() < routes.pairs() * h {
                        return Err(ModelError::ExpertBackend(format!(
                            "{} values back for {} pairs",
                            pair_out.len(),
                            routes.pairs()
                        )));
                    }
                    let pair_out = ops.upload_f32(&pair_out)?;
                    let offsets = ops.upload_index(&routes.offsets)?;
                    ops.combine_add(
                        &mut hidden,
                        &pair_out,
                        &offsets,
                        shared_out.as_ref(),
                        rows,
                        h,
                    )?;
                }
            }
        }
        drop(caches);
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }

        let wanted: Vec<u32> = logit_rows(seqs, &layout)
            .into_iter()
            .map(|r| r as u32)
            .collect();
        let n = wanted.len();
        let index = ops.upload_index(&wanted)?;
        let mut selected = ops.scratch(n * h)?;
        ops.gather_rows(&hidden, &index, &mut selected, n, h)?;
        let mut normed = ops.scratch(n * h)?;
        ops.rms_norm(
            &selected,
            row,
            &self.final_norm,
            &mut normed,
            row,
            n,
            1,
            h,
            eps,
        )?;
        let vocab = self.config.vocab_size;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = self.linear(&normed, n, h, lm_head, vocab)?;
        let logits = ops.download(&logits, n * vocab)?;
        Ok(split_logits(seqs, &logits, vocab))
    }

    fn linear(
        &self,
        x: &O::F32,
        rows: usize,
        k: usize,
        w: &O::Matrix,
        n_out: usize,
    ) -> Result<O::F32> {
        let input = self.ops.gemm_input(x, rows * k, w)?;
        let mut out = self.ops.scratch(rows * n_out)?;
        self.ops
            .gemm(&rows_times(rows, n_out, k), w, 0, &input, 0, &mut out, 0)?;
        Ok(out)
    }

    fn mlp(&self, mlp: &DeviceMlp<O>, x: &O::F32, rows: usize) -> Result<O::F32> {
        let h = self.config.hidden_size;
        let gate_up = self.linear(x, rows, h, &mlp.gate_up, 2 * mlp.inter)?;
        let mut act = self.ops.scratch(rows * mlp.inter)?;
        self.ops.silu_mul(&gate_up, &mut act, rows, mlp.inter)?;
        self.linear(&act, rows, mlp.inter, &mlp.down, h)
    }

    fn attention(
        &self,
        attention: &DeviceAttention<O>,
        x: &O::F32,
        step: &DeviceStep<O>,
        caches: &mut [&mut DeviceLayerCache<O::F32>],
    ) -> Result<O::F32> {
        let ops = &self.ops;
        let rows = step.rows;
        let h = self.config.hidden_size;
        let eps = self.config.rms_norm_eps;
        match attention {
            DeviceAttention::Gqa {
                qkv,
                o,
                q_norm,
                k_norm,
                heads,
                kv_heads,
                head_dim,
            } => {
                let (heads, kv_heads, d) = (*heads, *kv_heads, *head_dim);
                let (q_width, kv_width) = (heads * d, kv_heads * d);
                let width = q_width + 2 * kv_width;
                let qkv_out = self.linear(x, rows, h, qkv, width)?;
                // Per-head norms (Qwen3) first, then rotation: both out of place.
                let rotate = |from: HeadView, n_heads: usize, norm: &Option<O::F32>| {
                    let mut rotated = ops.scratch(rows * n_heads * d)?;
                    let packed = HeadView::packed(0, n_heads, d);
                    match norm {
                        Some(w) => {
                            let mut normed = ops.scratch(rows * n_heads * d)?;
                            ops.rms_norm(
                                &qkv_out,
                                from,
                                w,
                                &mut normed,
                                packed,
                                rows,
                                n_heads,
                                d,
                                eps,
                            )?;
                            ops.rope(&normed, packed, &mut rotated, packed, n_heads, false, step)?;
                        }
                        None => {
                            ops.rope(&qkv_out, from, &mut rotated, packed, n_heads, false, step)?
                        }
                    }
                    Ok::<_, ModelError>(rotated)
                };
                let view = |offset| HeadView {
                    offset,
                    row_stride: width,
                    head_stride: d,
                };
                let q = rotate(view(0), heads, q_norm)?;
                let k = rotate(view(q_width), kv_heads, k_norm)?;
                {
                    let mut keys: Vec<&mut O::F32> =
                        caches.iter_mut().map(|c| &mut c.keys).collect();
                    ops.append_rows(
                        &k,
                        HeadView::packed(0, 1, kv_width),
                        kv_width,
                        &mut keys,
                        kv_width,
                        0,
                        step,
                    )?;
                }
                {
                    let mut values = Vec::with_capacity(caches.len());
                    for c in caches.iter_mut() {
                        values.push(c.values.as_mut().ok_or_else(|| {
                            ModelError::InvalidRequest("GQA cache without values".into())
                        })?);
                    }
                    ops.append_rows(
                        &qkv_out,
                        HeadView::columns(q_width + kv_width, width),
                        kv_width,
                        &mut values,
                        kv_width,
                        0,
                        step,
                    )?;
                }
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
                let keys: Vec<&O::F32> = caches.iter().map(|c| &c.keys).collect();
                let values: Vec<&O::F32> = caches
                    .iter()
                    .map(|c| c.values.as_ref().unwrap_or(&c.keys))
                    .collect();
                let mut out = ops.scratch(rows * q_width)?;
                ops.attention(&q, &spec, &keys, &values, &mut out, step)?;
                self.linear(&out, rows, q_width, o, h)
            }
            DeviceAttention::Mla {
                shape,
                input_proj,
                input_width,
                q_a_norm,
                q_b,
                kv_a_norm,
                uk_t,
                uv,
                o,
                interleaved,
            } => {
                let MlaShape {
                    heads,
                    kv_lora_rank: lora,
                    nope,
                    rope,
                    v,
                    ..
                } = *shape;
                let q_head = nope + rope;
                let proj_width = *input_width;
                let q_in = proj_width - lora - rope;
                let proj = self.linear(x, rows, h, input_proj, proj_width)?;
                // Queries: `[rows, heads, q_head]` at (buffer, row stride).
                let q_low_rank;
                let (q_buf, q_stride) = match (q_b, q_a_norm) {
                    (Some(q_b), Some(norm)) => {
                        let mut q_a = ops.scratch(rows * q_in)?;
                        ops.rms_norm(
                            &proj,
                            HeadView::columns(0, proj_width),
                            norm,
                            &mut q_a,
                            HeadView::packed(0, 1, q_in),
                            rows,
                            1,
                            q_in,
                            eps,
                        )?;
                        q_low_rank = self.linear(&q_a, rows, q_in, q_b, heads * q_head)?;
                        (&q_low_rank, heads * q_head)
                    }
                    _ => (&proj, proj_width),
                };
                // The attention query per head: `[q_nope · W_ukᵀ | rotated q_rope]`.
                let qk = lora + rope;
                let mut query = ops.scratch(rows * heads * qk)?;
                let q_in_gemm = ops.gemm_input(q_buf, rows * q_stride, uk_t)?;
                let mut absorb = ColumnMajorGemm::rows_times_weights(rows, lora, nope);
                absorb.ldb = q_stride;
                absorb.ldc = heads * qk;
                ops.gemm(
                    &StridedGemm {
                        gemm: absorb,
                        batch: heads,
                        stride_a: lora * nope,
                        stride_b: q_head,
                        stride_c: qk,
                    },
                    uk_t,
                    0,
                    &q_in_gemm,
                    0,
                    &mut query,
                    0,
                )?;
                ops.rope(
                    q_buf,
                    HeadView {
                        offset: nope,
                        row_stride: q_stride,
                        head_stride: q_head,
                    },
                    &mut query,
                    HeadView {
                        offset: lora,
                        row_stride: heads * qk,
                        head_stride: qk,
                    },
                    heads,
                    *interleaved,
                    step,
                )?;
                // This step's cache rows: `[normalised latent | rotated rope key]`.
                let mut new_rows = ops.scratch(rows * qk)?;
                ops.rms_norm(
                    &proj,
                    HeadView::columns(q_in, proj_width),
                    kv_a_norm,
                    &mut new_rows,
                    HeadView::columns(0, qk),
                    rows,
                    1,
                    lora,
                    eps,
                )?;
                ops.rope(
                    &proj,
                    HeadView::columns(q_in + lora, proj_width),
                    &mut new_rows,
                    HeadView::columns(lora, qk),
                    1,
                    *interleaved,
                    step,
                )?;
                {
                    let mut keys: Vec<&mut O::F32> =
                        caches.iter_mut().map(|c| &mut c.keys).collect();
                    ops.append_rows(
                        &new_rows,
                        HeadView::packed(0, 1, qk),
                        qk,
                        &mut keys,
                        qk,
                        0,
                        step,
                    )?;
                }
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
                let keys: Vec<&O::F32> = caches.iter().map(|c| &c.keys).collect();
                let mut context = ops.scratch(rows * heads * lora)?;
                ops.attention(&query, &spec, &keys, &keys, &mut context, step)?;
                // Per head `W_uv · context`, heads side by side.
                let context_in = ops.gemm_input(&context, rows * heads * lora, uv)?;
                let mut expand = ColumnMajorGemm::rows_times_weights(rows, v, lora);
                expand.ldb = heads * lora;
                expand.ldc = heads * v;
                let mut attn = ops.scratch(rows * heads * v)?;
                ops.gemm(
                    &StridedGemm {
                        gemm: expand,
                        batch: heads,
                        stride_a: v * lora,
                        stride_b: lora,
                        stride_c: v,
                    },
                    uv,
                    0,
                    &context_in,
                    0,
                    &mut attn,
                    0,
                )?;
                self.linear(&attn, rows, heads * v, o, h)
            }
        }
    }
}

/// Per-row top-k choices (in the rule's order) as routes in ascending expert id.
pub(crate) fn routes_from_choices(
    experts: &[u32],
    weights: &[f32],
    top_k: usize,
    rows: usize,
) -> Result<ExpertRoutes> {
    if experts.len() != rows * top_k || weights.len() != rows * top_k {
        return Err(ModelError::InvalidRequest(format!(
            "the device gate returned {} choices for {rows} rows of top-{top_k}",
            experts.len()
        )));
    }
    let mut routes = ExpertRoutes::with_capacity(rows, rows * top_k);
    let mut row = Vec::with_capacity(top_k);
    for r in 0..rows {
        row.clear();
        row.extend(
            experts[r * top_k..(r + 1) * top_k]
                .iter()
                .copied()
                .zip(weights[r * top_k..(r + 1) * top_k].iter().copied()),
        );
        routes.push_row(&mut row);
    }
    Ok(routes)
}

fn load_mlp<O: DenseOps>(
    ops: &O,
    ckpt: &Checkpoint,
    names: &MlpNames,
    hidden: usize,
    inter: usize,
) -> Result<DeviceMlp<O>>
where
    ModelError: From<O::Error>,
{
    let mut gate_up = ckpt.load_f32(&names.gate, &[inter, hidden])?;
    gate_up.extend(ckpt.load_f32(&names.up, &[inter, hidden])?);
    let down = ckpt.load_f32(&names.down, &[hidden, inter])?;
    Ok(DeviceMlp {
        gate_up: ops.upload_matrix(
            &gate_up,
            MatrixPrecision::of(ckpt, &[&names.gate, &names.up]),
        )?,
        down: ops.upload_matrix(&down, MatrixPrecision::of(ckpt, &[&names.down]))?,
        inter,
    })
}

fn load_attention<O: DenseOps>(
    ops: &O,
    ckpt: &Checkpoint,
    config: &ModelConfig,
    layer: usize,
) -> Result<DeviceAttention<O>>
where
    ModelError: From<O::Error>,
{
    let prefix = format!("{}.self_attn", families::layer_prefix(layer));
    let hidden = config.hidden_size;
    // A matrix made of these tensors (names under the layer's `self_attn`).
    let matrix = |values: &[f32], names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| format!("{prefix}.{n}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        ops.upload_matrix(values, MatrixPrecision::of(ckpt, &names))
    };
    match config.attention {
        AttentionConfig::Gqa {
            num_heads,
            num_kv_heads,
            head_dim,
            qk_norm,
        } => {
            let load = |name: &str, rows: usize, cols: usize| {
                ckpt.load_f32(&format!("{prefix}.{name}.weight"), &[rows, cols])
            };
            let mut qkv = load("q_proj", num_heads * head_dim, hidden)?;
            qkv.extend(load("k_proj", num_kv_heads * head_dim, hidden)?);
            qkv.extend(load("v_proj", num_kv_heads * head_dim, hidden)?);
            let o = load("o_proj", hidden, num_heads * head_dim)?;
            let norm = |name: &str| -> Result<Option<O::F32>> {
                if !qk_norm {
                    return Ok(None);
                }
                let w = ckpt.load_f32(&format!("{prefix}.{name}.weight"), &[head_dim])?;
                Ok(Some(ops.upload_f32(&w)?))
            };
            Ok(DeviceAttention::Gqa {
                qkv: matrix(&qkv, &["q_proj.weight", "k_proj.weight", "v_proj.weight"])?,
                o: matrix(&o, &["o_proj.weight"])?,
                q_norm: norm("q_norm")?,
                k_norm: norm("k_norm")?,
                heads: num_heads,
                kv_heads: num_kv_heads,
                head_dim,
            })
        }
        AttentionConfig::Mla {
            rope_interleave, ..
        } => {
            let shape = mla_shape(config).ok_or_else(|| {
                ModelError::InvalidRequest("deepseek_v3 needs MLA attention settings".into())
            })?;
            let MlaShape {
                heads,
                q_lora_rank,
                kv_lora_rank: lora,
                nope,
                rope,
                v,
                ..
            } = shape;
            let q_head = nope + rope;
            let load =
                |name: &str, shape: &[usize]| ckpt.load_f32(&format!("{prefix}.{name}"), shape);
            let kv_a = load("kv_a_proj_with_mqa.weight", &[lora + rope, hidden])?;
            let (mut input, q_a_norm, q_b) = match q_lora_rank {
                Some(rank) => (
                    load("q_a_proj.weight", &[rank, hidden])?,
                    Some(ops.upload_f32(&load("q_a_layernorm.weight", &[rank])?)?),
                    Some(matrix(
                        &load("q_b_proj.weight", &[heads * q_head, rank])?,
                        &["q_b_proj.weight"],
                    )?),
                ),
                None => (
                    load("q_proj.weight", &[heads * q_head, hidden])?,
                    None,
                    None,
                ),
            };
            input.extend_from_slice(&kv_a);
            let input_width = input.len() / hidden;
            let kv_b = load("kv_b_proj.weight", &[heads * (nope + v), lora])?;
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
            let q_in = match q_lora_rank {
                Some(_) => "q_a_proj.weight",
                None => "q_proj.weight",
            };
            Ok(DeviceAttention::Mla {
                shape,
                input_proj: matrix(&input, &[q_in, "kv_a_proj_with_mqa.weight"])?,
                input_width,
                q_a_norm,
                q_b,
                kv_a_norm: ops.upload_f32(&load("kv_a_layernorm.weight", &[lora])?)?,
                uk_t: matrix(&uk_t, &["kv_b_proj.weight"])?,
                uv: matrix(&uv, &["kv_b_proj.weight"])?,
                o: matrix(
                    &load("o_proj.weight", &[hidden, heads * v])?,
                    &["o_proj.weight"],
                )?,
                interleaved: rope_interleave,
            })
        }
    }
}
