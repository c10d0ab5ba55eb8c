//! [`DeviceDenseModel`]: the router's dense part with every weight (the embedding table too),
//! the KV cache and every activation on a device, written once over [`DenseOps`]. Same
//! mathematics and the same combine order as [`crate::dense::DenseModel`]; a step uploads its
//! token ids and block tables, and only the routed experts' rows leave the device (the expert
//! backend takes and returns host rows), unless the experts are on the same device. The KV
//! cache is a pool of blocks numbered as the host pool's ([`super::pool`]): a shared prefix is
//! shared on the device too.

mod replayed;

pub use replayed::{decode_bucket, MAX_REPLAYED_ROWS};

use super::attention::DeviceAttention;
use super::ops::{CacheBlocks, DenseOps, DeviceStep};
use super::pool::{DeviceKvPool, CHUNK_BLOCKS};
use super::weights::upload_stacked;
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::{Gating, ModelConfig};
use crate::dense_step::{
    logit_rows, pick_for, split_logits, validate_step, Pick, StepOutput, StepSequence,
};
use crate::device::route_plan::MAX_PLANNED_TOP_K;
use crate::device::shapes::HeadView;
use crate::device::MatrixPrecision;
use crate::error::{ModelError, Result};
use crate::expert_backend::ExpertBackend;
use crate::families;
use crate::kv_cache::{KvLayout, KvPool, SequenceCache, DEFAULT_BLOCK_TOKENS};
use crate::layers::gate::GateRule;
use crate::layers::mlp::MlpNames;
use crate::layers::rope::Rope;
use crate::logit_adjust::RowEdits;
use crate::race::RowRace;
use crate::routes::ExpertRoutes;
use crate::token_mask::{MaskSlot, RowMask};

/// Gated SiLU MLP (dense layers, shared experts) on the device.
struct DeviceMlp<O: DenseOps> {
    /// `[2 * inter, hidden]`: gate rows then up rows.
    gate_up: O::Matrix,
    down: O::Matrix,
    inter: usize,
}

/// The MoE half of a layer: the gate and the shared experts run here, the routed experts
/// wherever the [`ExpertBackend`] runs them.
struct DeviceMoe<O: DenseOps> {
    /// `[num_experts, hidden]`, always f32.
    gate: O::Matrix,
    correction_bias: Option<O::F32>,
    rule: GateRule,
    shared: Option<DeviceMlp<O>>,
}

enum DeviceFfn<O: DenseOps> {
    Dense(DeviceMlp<O>),
    Moe(DeviceMoe<O>),
}

struct DeviceLayer<O: DenseOps> {
    input_norm: O::F32,
    attention: DeviceAttention<O>,
    post_attention_norm: O::F32,
    ffn: DeviceFfn<O>,
}

pub struct DeviceDenseModel<O: DenseOps> {
    ops: O,
    /// Decode steps' buffers, for replayed segments.
    decode: replayed::DecodeState<O>,
    config: ModelConfig,
    /// `[vocab, hidden]`, in the checkpoint tensor's precision: a lookup of exact values (a
    /// bf16 copy only in plain bf16 mode, as for every matrix there).
    embed: O::Matrix,
    layers: Vec<DeviceLayer<O>>,
    final_norm: O::F32,
    /// `None` where the model ties it to `embed`.
    lm_head: Option<O::Matrix>,
    rope: Rope,
    /// The KV cache on the device, and the host pool whose block numbers it follows.
    kv: std::sync::Mutex<DeviceKv<O::F32>>,
    /// The pool of caches made by [`Self::new_cache`] (an owner with a pool of its own, as the
    /// router, passes caches from that one: the first step's pool is the one followed).
    host_pool: std::sync::Arc<KvPool>,
}

/// A step's block tables, as [`DeviceDenseModel::reserve_blocks`] made them.
struct ReservedBlocks {
    table: Vec<u32>,
    table_start: Vec<u32>,
    block_tokens: usize,
    /// Which device pool this is and how many chunks it holds: a replayed segment's tables of
    /// chunks depend on both.
    pool: (u64, usize),
    /// The pool's sink block, for a decode step's padding rows.
    sink_block: usize,
}

/// The device pool, and the host pool (the first step's) whose block numbers it follows:
/// caches from another pool would name other blocks by the same numbers.
struct DeviceKv<B> {
    pool: DeviceKvPool<B>,
    host: Option<std::sync::Weak<KvPool>>,
    /// Pools made so far: which one `pool` is (a replayed segment's tables of chunks name
    /// its buffers).
    pools_made: u64,
}

impl<O> DeviceDenseModel<O>
where
    O: DenseOps,
    O::F32: Send + 'static,
    ModelError: From<O::Error>,
{
    /// The primitive steps it runs on (tests read the host reference's counters).
    pub fn ops(&self) -> &O {
        &self.ops
    }

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
            let attention = DeviceAttention::load(&ops, ckpt, config, layer)?;
            let ffn = load_ffn(&ops, ckpt, config, layer)?;
            let norm = |name: &str| -> Result<O::F32> {
                let weight = ckpt.load_f32(&format!("{p}.{name}"), &[h])?;
                Ok(ops.upload_f32(&weight)?)
            };
            layers.push(DeviceLayer {
                input_norm: norm("input_layernorm.weight")?,
                attention,
                post_attention_norm: norm("post_attention_layernorm.weight")?,
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
        let widths = layers.iter().map(|l| l.attention.cache_widths()).collect();
        let host_layout = KvLayout::for_config(config, DEFAULT_BLOCK_TOKENS);
        Ok(Self {
            ops,
            decode: Default::default(),
            config: config.clone(),
            rope: Rope::new(&config.rope),
            embed,
            layers,
            final_norm,
            lm_head,
            kv: std::sync::Mutex::new(DeviceKv {
                pool: DeviceKvPool::new(widths, DEFAULT_BLOCK_TOKENS),
                host: None,
                pools_made: 0,
            }),
            host_pool: KvPool::new(host_layout),
        })
    }

    /// An empty cache whose blocks come from this model's own host pool.
    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(&self.host_pool)
    }

    /// Device bytes the KV pool holds.
    pub fn kv_bytes(&self) -> usize {
        self.kv.lock().map(|kv| kv.pool.bytes()).unwrap_or(0)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// One batched step, as [`crate::dense::DenseModel::forward`].
    pub fn forward(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>> {
        let mut hold = self.hold_step(seqs);
        let Some((logits, wanted)) = self.step_logits(seqs, experts, &mut hold)? else {
            return Ok(Vec::new());
        };
        let vocab = self.config.vocab_size;
        let logits = self.ops.download(&logits, wanted.len() * vocab)?;
        Ok(split_logits(seqs, &logits, vocab))
    }

    /// [`crate::dense_step::DenseStep::forward_picking`]: argmaxes and ranked top-k lists
    /// found here, and only they and the other sequences' logit rows downloaded.
    pub fn forward_picking(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
        picks: &[Pick<'_>],
    ) -> Result<Vec<StepOutput>> {
        let mut hold = self.hold_step(seqs);
        let Some((mut logits, wanted)) = self.step_logits(seqs, experts, &mut hold)? else {
            return Ok(Vec::new());
        };
        let vocab = self.config.vocab_size;
        let rows_of = |s: &StepSequence<'_>| if s.all_logits { s.tokens.len() } else { 1 };
        // Changed picks have their last row masked and edited in place first (no other pick
        // reads it); a grammar's mask is waited for only now, after the layers.
        let (mut masked, mut edited) = (Vec::new(), Vec::new());
        let mut offset = 0;
        let picks: Vec<Pick<'_>> = (0..seqs.len())
            .map(|i| {
                let n = rows_of(&seqs[i]);
                let (changes, pick) = pick_for(&seqs[i], picks, i).parts();
                let row = (offset + n - 1) as u32;
                offset += n;
                match changes.mask.map(MaskSlot::wait) {
                    // No mask to apply: the row goes back whole, for the sampler to report.
                    Some(None) => return Pick::Logits,
                    Some(Some(mask)) => masked.push(RowMask { row, mask }),
                    None => {}
                }
                if let Some(edits) = changes.edits {
                    edited.push(RowEdits { row, edits });
                }
                pick
            })
            .collect();
        if !masked.is_empty() {
            self.ops
                .mask_rows(&mut logits, wanted.len(), vocab, &masked)?;
        }
        if !edited.is_empty() {
            self.ops
                .edit_rows(&mut logits, wanted.len(), vocab, &edited)?;
        }
        let ids = if picks.contains(&Pick::Argmax) {
            self.ops.argmax_rows(&logits, wanted.len(), vocab)?
        } else {
            Vec::new()
        };
        // One ranked list per logit row, as long as the longest asked for (each sequence
        // keeps its own `k` first: the ranking does not depend on the length).
        let deepest = picks
            .iter()
            .filter_map(|p| match p {
                Pick::RankedTopK(k) => Some((*k).min(vocab)),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let ranked = if deepest > 0 {
            self.ops
                .ranked_top_k_rows(&logits, wanted.len(), vocab, deepest)?
        } else {
            Vec::new()
        };
        // Each race's row is its sequence's last.
        let mut races = Vec::new();
        let mut offset = 0;
        for (s, pick) in seqs.iter().zip(&picks) {
            let n = rows_of(s);
            if let Pick::Race(race) = *pick {
                let row = (offset + n - 1) as u32;
                races.push(RowRace { row, race });
            }
            offset += n;
        }
        let drawn = if races.is_empty() {
            Vec::new()
        } else {
            self.ops.race_rows(&logits, wanted.len(), vocab, &races)?
        };
        let mut drawn = drawn.into_iter();
        // The logit rows of the sequences that want them, in step order, downloaded at once.
        let mut kept: Vec<u32> = Vec::new();
        let mut offset = 0;
        for (s, pick) in seqs.iter().zip(&picks) {
            let n = rows_of(s);
            if *pick == Pick::Logits {
                kept.extend((offset..offset + n).map(|r| r as u32));
            }
            offset += n;
        }
        let mut rows = Vec::new();
        if !kept.is_empty() {
            let index = self.ops.upload_index(&kept)?;
            let mut compact = self.ops.scratch(kept.len() * vocab)?;
            self.ops
                .gather_rows(&logits, &index, &mut compact, kept.len(), vocab)?;
            rows = self.ops.download(&compact, kept.len() * vocab)?;
        }
        let missing = || ModelError::InvalidRequest("a pick the step did not compute".into());
        let mut out = Vec::with_capacity(seqs.len());
        let (mut offset, mut taken) = (0, 0);
        for (s, pick) in seqs.iter().zip(&picks) {
            let n = rows_of(s);
            let last = offset + n - 1;
            out.push(match *pick {
                Pick::Argmax => StepOutput::Argmax(*ids.get(last).ok_or_else(missing)?),
                Pick::RankedTopK(k) => {
                    let from = last * deepest;
                    let list = ranked.get(from..from + k.min(vocab)).ok_or_else(missing)?;
                    StepOutput::RankedTopK(list.to_vec())
                }
                Pick::Race(_) => StepOutput::Drawn(drawn.next().ok_or_else(missing)?),
                Pick::Logits | Pick::Edited(..) => {
                    taken += n;
                    StepOutput::Logits(rows[(taken - n) * vocab..taken * vocab].to_vec())
                }
            });
            offset += n;
        }
        Ok(out)
    }

    /// Checks the step, runs every layer over it and moves the caches on: the logits of the
    /// rows [`logit_rows`] names (`[wanted, vocab]`, on the device), and those rows (`None`
    /// for an empty step). A decode step runs as replayed segments where the device replays
    /// them ([`DenseOps::replays_segments`]).
    fn step_logits(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
        hold: &mut replayed::StepHold<'_, O>,
    ) -> Result<Option<(O::F32, Vec<usize>)>> {
        validate_step(&self.config, seqs)?;
        if seqs.is_empty() {
            return Ok(None);
        }
        let layout = BatchLayout::new(seqs.iter().map(|s| (s.cache.len, s.tokens.len())));
        let wanted = logit_rows(seqs, &layout);
        let logits = match self.replayed_decode(seqs, experts, hold)? {
            Some(logits) => logits,
            None => {
                let (step, mut hidden) = self.begin_step(seqs, &layout)?;
                // Made at the step's first MoE layer that follows the gate's choices, then
                // shared by the others (each writes them in full before reading them).
                let mut choices = None;
                for l in 0..self.layers.len() {
                    self.layer_forward(l, &mut hidden, &step, experts, &mut choices)?;
                }
                self.logits_here(&hidden, &wanted)?
            }
        };
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens.len();
        }
        Ok(Some((logits, wanted)))
    }

    /// Takes host blocks for every sequence's new tokens (their numbers say where the rows go
    /// on the device; the host rows themselves stay untouched), grows the device pool to hold
    /// them, and uploads the step's block tables.
    fn cache_blocks(&self, seqs: &mut [StepSequence<'_>]) -> Result<CacheBlocks<O>> {
        let reserved = self.reserve_blocks(seqs)?;
        Ok(CacheBlocks {
            table: self.ops.upload_index(&reserved.table)?,
            table_start: self.ops.upload_index(&reserved.table_start)?,
            block_tokens: reserved.block_tokens,
            chunk_blocks: CHUNK_BLOCKS,
        })
    }

    /// The host side of [`Self::cache_blocks`]: blocks taken, the device pool grown, and the
    /// step's block tables.
    fn reserve_blocks(&self, seqs: &mut [StepSequence<'_>]) -> Result<ReservedBlocks> {
        let mut kv = self
            .kv
            .lock()
            .map_err(|_| ModelError::InvalidRequest("device KV pool poisoned".into()))?;
        let host = std::sync::Arc::clone(seqs[0].cache.pool());
        let followed = kv.host.as_ref().and_then(std::sync::Weak::upgrade);
        match &followed {
            Some(pool)
                if !seqs
                    .iter()
                    .all(|s| std::sync::Arc::ptr_eq(s.cache.pool(), pool)) =>
            {
                return Err(ModelError::InvalidRequest(
                    "sequence caches from another KV pool than this device's".into(),
                ))
            }
            Some(_) => {}
            None => {
                if !seqs
                    .iter()
                    .all(|s| std::sync::Arc::ptr_eq(s.cache.pool(), &host))
                {
                    return Err(ModelError::InvalidRequest(
                        "sequence caches of one step from several KV pools".into(),
                    ));
                }
                // The first step (or the old pool is gone): follow this pool's numbers.
                kv.pool = DeviceKvPool::new(
                    self.layers
                        .iter()
                        .map(|l| l.attention.cache_widths())
                        .collect(),
                    host.layout().block_tokens,
                );
                kv.host = Some(std::sync::Arc::downgrade(&host));
                kv.pools_made += 1;
            }
        }
        let mut table = Vec::new();
        let mut table_start = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            s.cache.ensure_capacity(s.cache.len + s.tokens.len());
            // Shared blocks are full ones and writes go past them; a partial one would be
            // written under its other holder.
            if !s.tokens.is_empty() && s.cache.is_shared_at(s.cache.len) {
                return Err(ModelError::InvalidRequest(
                    "a shared KV block would be written on the device".into(),
                ));
            }
            table_start.push(table.len() as u32);
            table.extend(s.cache.block_indices().map(|b| b as u32));
        }
        let needed = table.iter().map(|&b| b as usize + 1).max().unwrap_or(0);
        let ops = &self.ops;
        kv.pool
            .ensure_blocks(needed, |floats| ops.scratch(floats))?;
        Ok(ReservedBlocks {
            table,
            table_start,
            block_tokens: kv.pool.block_tokens(),
            pool: (kv.pools_made, kv.pool.chunks()),
            sink_block: kv.pool.sink_block(),
        })
    }

    /// Makes room in every sequence's cache for its new tokens, uploads the step's row layout
    /// and rotary table, and looks up the new tokens' embeddings (`[rows, hidden]`).
    fn begin_step(
        &self,
        seqs: &mut [StepSequence<'_>],
        layout: &BatchLayout,
    ) -> Result<(DeviceStep<O>, O::F32)> {
        let ops = &self.ops;
        let h = self.config.hidden_size;
        let rows = layout.num_rows();
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let blocks = self.cache_blocks(seqs)?;
        let table = self.rope.table(&layout.row_pos);
        let as_u32 = |v: &[usize]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        let step = DeviceStep::<O> {
            rows,
            row_seq: ops.upload_index(&as_u32(&layout.row_seq))?,
            row_pos: ops.upload_index(&as_u32(&layout.row_pos))?,
            cos: ops.upload_f32(&table.cos)?,
            sin: ops.upload_f32(&table.sin)?,
            rope_half: table.half,
            blocks,
        };
        // Token ids were checked against the vocabulary (`validate_step`).
        let mut hidden = ops.scratch(rows * h)?;
        ops.embed_rows(&self.embed, &ops.upload_index(&ids)?, &mut hidden, rows, h)?;
        Ok((step, hidden))
    }

    /// Decoder layer `l` on `hidden` in place: attention, then the dense MLP or the MoE block,
    /// each behind its RMSNorm and added back.
    fn layer_forward(
        &self,
        l: usize,
        hidden: &mut O::F32,
        step: &DeviceStep<O>,
        experts: &dyn ExpertBackend,
        choices: &mut Option<StepChoices<O>>,
    ) -> Result<()> {
        let ops = &self.ops;
        let (rows, h) = (step.rows, self.config.hidden_size);
        let mut normed = ops.scratch(rows * h)?;
        self.attention_half(l, hidden, &mut normed, step)?;
        match &self.layers[l].ffn {
            DeviceFfn::Dense(mlp) => {
                let out = self.mlp(mlp, &normed, rows)?;
                ops.add(hidden, &out, rows * h)?;
            }
            DeviceFfn::Moe(moe) => self.moe(l, moe, &normed, hidden, rows, experts, choices)?,
        }
        Ok(())
    }

    /// The attention half of layer `l` on `hidden` in place (behind its RMSNorm, added back),
    /// and the feed-forward half's input, normalised, in `normed` (`[rows, hidden]`).
    fn attention_half(
        &self,
        l: usize,
        hidden: &mut O::F32,
        normed: &mut O::F32,
        step: &DeviceStep<O>,
    ) -> Result<()> {
        // Held for this layer only: another micro-batch's step may run its own layers
        // meanwhile (its blocks are its own).
        let mut kv = self.lock_kv()?;
        self.attention_half_in(&mut kv.pool, l, hidden, normed, step)
    }

    /// The device KV pool, locked. Taken before the device's own lock wherever both are held
    /// (a step's launches take the device's lock inside).
    fn lock_kv(&self) -> Result<std::sync::MutexGuard<'_, DeviceKv<O::F32>>> {
        self.kv
            .lock()
            .map_err(|_| ModelError::InvalidRequest("device KV pool poisoned".into()))
    }

    /// [`Self::attention_half`] with the pool already locked.
    fn attention_half_in(
        &self,
        pool: &mut DeviceKvPool<O::F32>,
        l: usize,
        hidden: &mut O::F32,
        normed: &mut O::F32,
        step: &DeviceStep<O>,
    ) -> Result<()> {
        let ops = &self.ops;
        let layer = &self.layers[l];
        let (rows, h, eps) = (step.rows, self.config.hidden_size, self.config.rms_norm_eps);
        let row = HeadView::packed(0, 1, h);
        ops.rms_norm(hidden, row, &layer.input_norm, normed, row, rows, 1, h, eps)?;
        let attn = layer
            .attention
            .forward(ops, normed, step, &mut pool.layers[l])?;
        ops.add(hidden, &attn, rows * h)?;
        ops.rms_norm(
            hidden,
            row,
            &layer.post_attention_norm,
            normed,
            row,
            rows,
            1,
            h,
            eps,
        )?;
        Ok(())
    }

    /// The MoE block of layer `l` added to `hidden`: the gate's choices on the device, the
    /// routed experts where the backend runs them (on these rows in place when it holds its
    /// experts on this device, through host memory otherwise), the shared experts here,
    /// combined in [`crate::routes::combine`]'s order.
    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        l: usize,
        moe: &DeviceMoe<O>,
        normed: &O::F32,
        hidden: &mut O::F32,
        rows: usize,
        experts: &dyn ExpertBackend,
        choices: &mut Option<StepChoices<O>>,
    ) -> Result<()> {
        let ops = &self.ops;
        let h = self.config.hidden_size;
        let rule = &moe.rule;
        if self.experts_follow_choices(l, moe, experts)? {
            let top_k = rule.top_k;
            let b = match choices {
                Some(b) if b.top_k == top_k => b,
                _ => choices.insert(StepChoices::new(ops, rows, top_k, h)?),
            };
            let buffers = ChoiceBuffers {
                chosen: &mut b.chosen,
                weights: &mut b.weights,
                pair_out: &mut b.pair_out,
                offsets: &b.offsets,
            };
            return self.moe_following(l, moe, normed, hidden, rows, experts, buffers);
        }
        let logits = ops.linear(normed, rows, h, &moe.gate, rule.num_experts)?;
        let (chosen, weights) = ops.top_k(&logits, moe.correction_bias.as_ref(), rule, rows)?;
        let routes = routes_from_choices(&chosen, &weights, rule.top_k, rows)?;
        let (pair_out, shared_out) = match ops.experts_in_place(experts, l, normed, &routes) {
            Some(pair_out) => {
                // The experts ran on this device's queue: the shared experts follow them.
                let pair_out = pair_out?;
                let shared_out = self.shared_out(moe, normed, rows)?;
                (pair_out, shared_out)
            }
            None => {
                let host_rows = ops.download(normed, rows * h)?;
                // Queued before the routed experts are awaited, so the device computes the
                // shared experts while the expert nodes compute theirs.
                let shared_out = self.shared_out(moe, normed, rows)?;
                let pair_out = experts.run_experts(l, &host_rows, &routes)?;
                check_pair_values(pair_out.len(), &routes, h)?;
                (ops.upload_f32(&pair_out)?, shared_out)
            }
        };
        check_pair_values(ops.len_of(&pair_out), &routes, h)?;
        let offsets = ops.upload_index(&routes.offsets)?;
        ops.combine_add(hidden, &pair_out, &offsets, shared_out.as_ref(), rows, h)?;
        Ok(())
    }

    /// Whether layer `l`'s routed experts can follow the gate's choices on this device
    /// ([`DenseOps::experts_follow_choices`]; at most [`MAX_PLANNED_TOP_K`] choices a row).
    fn experts_follow_choices(
        &self,
        l: usize,
        moe: &DeviceMoe<O>,
        experts: &dyn ExpertBackend,
    ) -> Result<bool> {
        let rule = &moe.rule;
        Ok(rule.top_k <= MAX_PLANNED_TOP_K
            && self
                .ops
                .experts_follow_choices(experts, l, rule.num_experts)?)
    }

    /// [`Self::moe`] with the routed experts following the gate's choices on the device
    /// ([`Self::experts_follow_choices`]): the gate, its top-k, the routed experts of every
    /// row, the shared experts and the combine in pair order, with nothing read on the host,
    /// so a launched step synchronises only for its logits and a replayed one is one graph.
    #[allow(clippy::too_many_arguments)]
    fn moe_following(
        &self,
        l: usize,
        moe: &DeviceMoe<O>,
        normed: &O::F32,
        hidden: &mut O::F32,
        rows: usize,
        experts: &dyn ExpertBackend,
        b: ChoiceBuffers<'_, O>,
    ) -> Result<()> {
        let ops = &self.ops;
        let (h, rule) = (self.config.hidden_size, &moe.rule);
        let logits = ops.linear(normed, rows, h, &moe.gate, rule.num_experts)?;
        let bias = moe.correction_bias.as_ref();
        ops.top_k_into(&logits, bias, rule, rows, b.chosen, b.weights)?;
        let (chosen, weights, top_k) = (&*b.chosen, &*b.weights, rule.top_k);
        ops.run_chosen_experts(
            experts, l, normed, chosen, weights, rows, top_k, h, b.pair_out,
        )?;
        let shared_out = self.shared_out(moe, normed, rows)?;
        ops.combine_add(hidden, b.pair_out, b.offsets, shared_out.as_ref(), rows, h)?;
        Ok(())
    }

    fn shared_out(
        &self,
        moe: &DeviceMoe<O>,
        normed: &O::F32,
        rows: usize,
    ) -> Result<Option<O::F32>> {
        match &moe.shared {
            Some(mlp) => Ok(Some(self.mlp(mlp, normed, rows)?)),
            None => Ok(None),
        }
    }

    /// The final norm and lm_head for the rows in `wanted` only: `[wanted, vocab]` logits,
    /// on the device.
    fn logits_here(&self, hidden: &O::F32, wanted: &[usize]) -> Result<O::F32> {
        let ops = &self.ops;
        let h = self.config.hidden_size;
        let wanted: Vec<u32> = wanted.iter().map(|&r| r as u32).collect();
        let n = wanted.len();
        let index = ops.upload_index(&wanted)?;
        let mut selected = ops.scratch(n * h)?;
        ops.gather_rows(hidden, &index, &mut selected, n, h)?;
        let mut normed = ops.scratch(n * h)?;
        let row = HeadView::packed(0, 1, h);
        ops.rms_norm(
            &selected,
            row,
            &self.final_norm,
            &mut normed,
            row,
            n,
            1,
            h,
            self.config.rms_norm_eps,
        )?;
        let vocab = self.config.vocab_size;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
        Ok(ops.linear(&normed, n, h, lm_head, vocab)?)
    }

    fn mlp(&self, mlp: &DeviceMlp<O>, x: &O::F32, rows: usize) -> Result<O::F32> {
        let h = self.config.hidden_size;
        let gate_up = self.ops.linear(x, rows, h, &mlp.gate_up, 2 * mlp.inter)?;
        let mut act = self.ops.scratch(rows * mlp.inter)?;
        self.ops.silu_mul(&gate_up, &mut act, rows, mlp.inter)?;
        Ok(self.ops.linear(&act, rows, mlp.inter, &mlp.down, h)?)
    }
}

/// A launched step's [`ChoiceBuffers`], owned: made once per step, so its MoE layers upload
/// nothing (the offsets go up once) and allocate nothing for their choices.
struct StepChoices<O: DenseOps> {
    top_k: usize,
    chosen: O::Index,
    weights: O::F32,
    pair_out: O::F32,
    offsets: O::Index,
}

impl<O: DenseOps> StepChoices<O>
where
    ModelError: From<O::Error>,
{
    fn new(ops: &O, rows: usize, top_k: usize, hidden: usize) -> Result<Self> {
        let pairs = rows * top_k;
        let offsets: Vec<u32> = (0..=rows).map(|r| (r * top_k) as u32).collect();
        Ok(Self {
            top_k,
            // The gate's top-k writes every choice before anything reads one.
            chosen: ops.upload_index(&vec![0; pairs])?,
            weights: ops.scratch(pairs)?,
            pair_out: ops.scratch(pairs * hidden)?,
            offsets: ops.upload_index(&offsets)?,
        })
    }
}

/// Where [`DeviceDenseModel::moe_following`] leaves the gate's choices (`[rows, top_k]`) and
/// the routed experts' outputs (`[rows * top_k, hidden]`), and each row's first pair
/// (`r * top_k`).
struct ChoiceBuffers<'a, O: DenseOps> {
    chosen: &'a mut O::Index,
    weights: &'a mut O::F32,
    pair_out: &'a mut O::F32,
    offsets: &'a O::Index,
}

/// The feed-forward half of `layer`: a dense MLP, or the MoE gate with its shared experts.
fn load_ffn<O: DenseOps>(
    ops: &O,
    ckpt: &Checkpoint,
    config: &ModelConfig,
    layer: usize,
) -> Result<DeviceFfn<O>>
where
    ModelError: From<O::Error>,
{
    let h = config.hidden_size;
    if !config.is_moe_layer(layer) {
        let names = families::dense_mlp_names(layer);
        let mlp = load_mlp(ops, ckpt, &names, h, config.dense_intermediate_size)?;
        return Ok(DeviceFfn::Dense(mlp));
    }
    let names = families::moe_names(config, layer);
    let gate = ckpt.load_f32(&names.gate, &[config.moe.num_experts, h])?;
    let correction_bias = match &names.correction_bias {
        Some(n) => Some(ops.upload_f32(&ckpt.load_f32(n, &[config.moe.num_experts])?)?),
        None => None,
    };
    let shared = match &names.shared {
        Some(n) => {
            let width = config.moe.intermediate_size * config.moe.n_shared_experts;
            Some(load_mlp(ops, ckpt, n, h, width)?)
        }
        None => None,
    };
    let rule = GateRule::new(&config.moe);
    if let Gating::SigmoidGroupLimited { n_group, .. } = rule.gating {
        if n_group == 0 || n_group > 64 || !rule.num_experts.is_multiple_of(n_group) {
            return Err(ModelError::InvalidRequest(format!(
                "the device gate supports 1..=64 expert groups dividing the experts, not \
                 {n_group}"
            )));
        }
    }
    Ok(DeviceFfn::Moe(DeviceMoe {
        gate: ops.upload_matrix(&gate, MatrixPrecision::F32)?,
        correction_bias,
        rule,
        shared,
    }))
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
    let gate_up = [(names.gate.as_str(), inter), (names.up.as_str(), inter)];
    Ok(DeviceMlp {
        gate_up: upload_stacked(ops, ckpt, &gate_up, hidden)?,
        down: upload_stacked(ops, ckpt, &[(names.down.as_str(), hidden)], inter)?,
        inter,
    })
}

/// A backend's answer must hold a `[pairs, hidden]` row per pair before the combine reads it.
fn check_pair_values(values: usize, routes: &ExpertRoutes, hidden: usize) -> Result<()> {
    if values < routes.pairs() * hidden {
        return Err(ModelError::ExpertBackend(format!(
            "{values} values back for {} pairs",
            routes.pairs()
        )));
    }
    Ok(())
}
