//! [`DenseModel`]: everything but the routed experts — embeddings, attention with the KV cache,
//! norms, dense MLPs, the MoE gate, shared experts, the final norm and lm_head. This is what the
//! router runs; routed experts are reached through an [`ExpertBackend`].

use crate::backend::{ops, NativeWeight, PackedMatrix};
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::dense_step::{logit_rows, split_logits, validate_step, VocabWeights};
use crate::error::Result;
use crate::expert_backend::ExpertBackend;
use crate::families;
use crate::kv_cache::{KvLayout, KvPool, LayerCache, SequenceCache, DEFAULT_BLOCK_TOKENS};
use crate::layers::attention::Attention;
use crate::layers::gate::MoeGate;
use crate::layers::mlp::Mlp;
use crate::layers::rope::{Rope, RopeTable};
use crate::routes::{combine, ExpertRoutes};
use std::sync::Arc;

/// The crates above name these here; they live in their own module so that the device and GPU
/// dense parts depend on them alone, not on the CPU model.
pub use crate::dense_step::{DenseStep, Pick, StepOutput, StepSequence};

/// The feed-forward half of a decoder layer.
#[derive(Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Moe {
        gate: MoeGate,
        /// Shared experts, fused as one MLP of width `moe_intermediate * n_shared_experts`.
        shared: Option<Mlp>,
    },
}

#[derive(Debug)]
pub struct DecoderLayer {
    input_norm: Vec<f32>,
    attention: Attention,
    post_attention_norm: Vec<f32>,
    ffn: FeedForward,
}

/// What a decoder layer's step needs besides its rows and caches.
pub(crate) struct LayerStep<'a> {
    /// The layer's index: its tensors', its KV cache layer's and its routed experts'.
    pub index: usize,
    pub layout: &'a BatchLayout,
    pub rope: &'a RopeTable,
    pub config: &'a ModelConfig,
    pub experts: &'a dyn ExpertBackend,
}

impl DecoderLayer {
    /// Layer `layer` of `config` (a MoE layer where `config` says so).
    pub(crate) fn load(ckpt: &Checkpoint, config: &ModelConfig, layer: usize) -> Result<Self> {
        let h = config.hidden_size;
        let p = families::layer_prefix(layer);
        let ffn = if config.is_moe_layer(layer) {
            let names = families::moe_names(config, layer);
            let gate = MoeGate::load(
                ckpt,
                &names.gate,
                names.correction_bias.as_deref(),
                &config.moe,
                h,
            )?;
            let shared = match &names.shared {
                Some(n) => Some(Mlp::load(
                    ckpt,
                    n,
                    h,
                    config.moe.intermediate_size * config.moe.n_shared_experts,
                )?),
                None => None,
            };
            FeedForward::Moe { gate, shared }
        } else {
            FeedForward::Dense(Mlp::load(
                ckpt,
                &families::dense_mlp_names(layer),
                h,
                config.dense_intermediate_size,
            )?)
        };
        Ok(DecoderLayer {
            input_norm: ckpt.load_f32(&format!("{p}.input_layernorm.weight"), &[h])?,
            attention: families::load_attention(ckpt, config, layer)?,
            post_attention_norm: ckpt
                .load_f32(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
            ffn,
        })
    }

    /// Adds the layer's attention and then its feed-forward to `hidden` (`[rows, hidden]`),
    /// appending the step's keys to `caches`.
    pub(crate) fn forward(
        &self,
        hidden: &mut [f32],
        step: &LayerStep<'_>,
        caches: &mut [LayerCache<'_>],
    ) -> Result<()> {
        let eps = step.config.rms_norm_eps;
        let rows = step.layout.num_rows();
        let normed = ops::rms_norm(hidden, &self.input_norm, eps);
        let attn = self
            .attention
            .forward(&normed, step.layout, step.rope, caches);
        add_in_place(hidden, &attn);
        let normed = ops::rms_norm(hidden, &self.post_attention_norm, eps);
        let ffn_out = match &self.ffn {
            FeedForward::Dense(mlp) => mlp.forward(&normed, rows),
            FeedForward::Moe { gate, shared } => {
                let routes = gate.route(&normed, rows);
                moe_combine(step, &normed, &routes, shared.as_ref())?
            }
        };
        add_in_place(hidden, &ffn_out);
        Ok(())
    }
}

/// Routed experts through the backend, shared experts here, summed in canonical order.
fn moe_combine(
    step: &LayerStep<'_>,
    normed: &[f32],
    routes: &ExpertRoutes,
    shared: Option<&Mlp>,
) -> Result<Vec<f32>> {
    let rows = routes.rows();
    let (pair_out, shared_out) = rayon::join(
        || step.experts.run_experts(step.index, normed, routes),
        || shared.map(|m| m.forward(normed, rows)),
    );
    Ok(combine(
        routes,
        &pair_out?,
        shared_out.as_deref(),
        step.config.hidden_size,
    ))
}

/// Hands each sequence that keeps them ([`SequenceCache::keep_hidden`]) its rows of the
/// model's output, after the final norm (what lm_head reads): what a draft head (MTP) reads
/// next, as vLLM and SGLang hand DeepSeek's MTP layer the target model's hidden states.
fn keep_hidden(
    seqs: &mut [StepSequence<'_>],
    layout: &BatchLayout,
    hidden: &[f32],
    final_norm: &[f32],
    eps: f32,
) {
    let h = final_norm.len();
    for (s, span) in seqs.iter_mut().zip(&layout.seqs) {
        if let Some(kept) = s.cache.kept_hidden_mut() {
            kept.clear();
            kept.extend_from_slice(&hidden[span.first_row * h..(span.first_row + span.len) * h]);
            ops::rms_norm_rows(kept, final_norm, eps);
        }
    }
}

pub struct DenseModel {
    config: ModelConfig,
    /// `[vocab, hidden]`, row-major (looked up, never multiplied).
    /// `[vocab, hidden]`, in the checkpoint's precision (bf16 widens exactly on lookup).
    embed: Arc<NativeWeight>,
    layers: Vec<DecoderLayer>,
    final_norm: Vec<f32>,
    lm_head: Arc<PackedMatrix>,
    rope: Rope,
    /// Every sequence's KV blocks.
    kv_pool: Arc<KvPool>,
}

impl DenseModel {
    pub fn load(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Self> {
        let h = config.hidden_size;
        let v = config.vocab_size;
        let embed = ckpt.load_native("model.embed_tokens.weight", &[v, h])?;
        let layers = (0..config.num_layers)
            .map(|layer| DecoderLayer::load(ckpt, config, layer))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = ckpt.load_f32("model.norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            PackedMatrix::from_native(&[&embed], h)
        } else {
            PackedMatrix::from_native(&[&ckpt.load_native("lm_head.weight", &[v, h])?], h)
        };
        Ok(Self {
            config: config.clone(),
            embed: Arc::new(embed),
            layers,
            final_norm,
            lm_head: Arc::new(lm_head),
            rope: Rope::new(&config.rope),
            kv_pool: KvPool::new(KvLayout::for_config(config, DEFAULT_BLOCK_TOKENS)),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Checks a step's inputs before any state changes.
    pub fn validate(&self, seqs: &[StepSequence<'_>]) -> Result<()> {
        validate_step(&self.config, seqs)
    }

    /// Runs one batched step. Returns, per sequence, logits `[n, vocab]` for its last new token
    /// (or for all new tokens when `all_logits`). Every row's result is independent of the
    /// other rows in the step.
    pub fn forward(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>> {
        self.validate(seqs)?;
        let h = self.config.hidden_size;
        let eps = self.config.rms_norm_eps;
        let layout = BatchLayout::new(seqs.iter().map(|s| (s.cache.len, s.tokens.len())));
        let rows = layout.num_rows();
        let rope = self.rope.table(&layout.row_pos);
        for s in seqs.iter_mut() {
            s.cache.ensure_capacity(s.cache.len + s.tokens.len());
        }

        let mut hidden = Vec::with_capacity(rows * h);
        for s in seqs.iter() {
            for &t in s.tokens {
                self.embed
                    .extend_widened(t as usize * h..(t as usize + 1) * h, &mut hidden);
            }
        }

        for (l, layer) in self.layers.iter().enumerate() {
            let mut caches: Vec<LayerCache<'_>> =
                seqs.iter_mut().map(|s| s.cache.layer(l)).collect();
            let step = LayerStep {
                index: l,
                layout: &layout,
                rope: &rope,
                config: &self.config,
                experts,
            };
            layer.forward(&mut hidden, &step, &mut caches)?;
        }
        keep_hidden(seqs, &layout, &hidden, &self.final_norm, eps);
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }

        // Final norm and lm_head only for the rows whose logits are wanted.
        let wanted = logit_rows(seqs, &layout);
        let mut selected = Vec::with_capacity(wanted.len() * h);
        for &r in &wanted {
            selected.extend_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        ops::rms_norm_rows(&mut selected, &self.final_norm, eps);
        let logits = self.lm_head.matmul(&selected, wanted.len());
        Ok(split_logits(seqs, &logits, self.config.vocab_size))
    }

    /// An empty cache, its blocks from this model's pool.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(&self.kv_pool)
    }
}

impl DenseStep for DenseModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn forward(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>> {
        DenseModel::forward(self, seqs, experts)
    }

    fn placement(&self) -> String {
        "cpu".into()
    }

    fn new_cache(&self) -> SequenceCache {
        DenseModel::new_cache(self)
    }

    fn vocab_weights(&self) -> Option<VocabWeights> {
        Some(VocabWeights {
            embed: Arc::clone(&self.embed),
            lm_head: Arc::clone(&self.lm_head),
        })
    }
}

/// Loads the dense part onto `device` (the routed experts' device type is reused: a GPU
/// context when it is a GPU).
pub fn load_dense(
    ckpt: &Checkpoint,
    config: &ModelConfig,
    device: &crate::experts::ExpertDevice,
) -> Result<Box<dyn DenseStep>> {
    match device {
        crate::experts::ExpertDevice::Cpu => Ok(Box::new(DenseModel::load(ckpt, config)?)),
        #[cfg(feature = "cuda")]
        crate::experts::ExpertDevice::Gpu(ctx) => Ok(Box::new(crate::gpu::GpuDenseModel::load(
            std::sync::Arc::clone(ctx),
            ckpt,
            config,
        )?)),
    }
}

fn add_in_place(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
