//! DeepSeek-V3's multi-token-prediction module as a draft head ([`MtpHead`]): the layer its
//! checkpoints ship after the main ones (`num_nextn_predict_layers`), which reads the main
//! model's last hidden state at a position and the token after it, and guesses the token after
//! that. vLLM and SGLang serve it as speculative decoding's `deepseek_mtp` method; here the
//! router does, and its guesses are checked like any draft, so they never change a token
//! (only how many steps an answer takes).
//!
//! The module (as DeepSeek's report and vLLM's `deepseek_mtp.py` describe it): the token's
//! embedding (zero at position 0) and the hidden state, each RMS-normed (`enorm`, `hnorm`),
//! concatenated `[embedding, hidden]` and projected back to the hidden width (`eh_proj`), then
//! one decoder layer (MLA attention with a KV cache layer of its own, a MoE with routed and
//! shared experts), then `shared_head.norm` and `shared_head.head` for logits. A second draft
//! token reuses the layer on its own output and the first draft, as vLLM does.
//!
//! The head holds its own routed experts (one layer's, on the CPU: about 1/61 of DeepSeek-V3's),
//! so a cluster's placement stays the main layers'.
//!
//! GLM-4.5's MTP layer is the same module around its own decoder layer (GQA attention; vLLM's
//! `glm4_moe_mtp.py`), so the same head drafts for it.

use crate::backend::{ops, NativeWeight, PackedMatrix};
use crate::batch::BatchLayout;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::dense::{DecoderLayer, LayerStep};
use crate::dense_step::VocabWeights;
use crate::error::{ModelError, Result};
use crate::experts::ExpertSet;
use crate::families;
use crate::kv_cache::{LayerCache, SequenceCache};
use crate::layers::rope::Rope;
use std::sync::Arc;

/// The first multi-token-prediction layer of a DeepSeek-V3 checkpoint, ready to draft.
pub struct MtpHead {
    /// The main config with the head as one more MoE layer ([`ModelConfig::with_mtp_layer`]).
    config: ModelConfig,
    /// Its layer index: the main model's layer count.
    index: usize,
    embed: Arc<NativeWeight>,
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    /// `[hidden, 2 * hidden]`: the normed embedding and hidden state, concatenated, to one row.
    eh_proj: PackedMatrix,
    layer: DecoderLayer,
    experts: ExpertSet,
    head_norm: Vec<f32>,
    head: Arc<PackedMatrix>,
    rope: Rope,
    shared: SharedVocab,
}

/// Which of the main model's vocabulary weights the head uses in place of its own copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedVocab {
    pub embed: bool,
    pub lm_head: bool,
}

/// One sequence's rows for the head: positions `start..start + next.len()`.
pub struct MtpRows<'a> {
    /// The sequence's cache, whose layer [`MtpHead::kv_layer`] the head fills.
    pub cache: &'a mut SequenceCache,
    /// The position of its first row.
    pub start: usize,
    /// The main model's output rows at those positions, after its final norm (`[rows,
    /// hidden]`, as [`SequenceCache::kept_hidden_mut`] holds them; vLLM and SGLang hand the
    /// layer the same).
    pub hidden: Vec<f32>,
    /// The token at the position after each row.
    pub next: &'a [u32],
    /// Tokens to draft after the last row (0: its rows only fill the head's cache).
    pub drafts: usize,
}

impl MtpHead {
    /// Loads the head of a checkpoint whose config names one. An error names what is missing:
    /// a config without `num_nextn_predict_layers`, another family, or absent tensors (the
    /// bundled fixtures, written by transformers, carry none; `moe gen-checkpoint --mtp-layers
    /// 1` writes them). The layer's embedding and head are the main model's where its copies
    /// hold the same bits (DeepSeek's do: its MTP module shares them), `main_vocab` then
    /// serving both rather than a second copy.
    pub fn load(
        ckpt: &Checkpoint,
        main: &ModelConfig,
        main_vocab: Option<&VocabWeights>,
    ) -> Result<Self> {
        if !main.family.ships_mtp_layers() {
            return Err(ModelError::InvalidRequest(
                "multi-token prediction is DeepSeek-V3's and GLM-4.5's: this checkpoint is another family"
                    .into(),
            ));
        }
        let config = main.with_mtp_layer().ok_or_else(|| {
            ModelError::InvalidRequest(
                "the checkpoint's config.json has no num_nextn_predict_layers: no MTP layer".into(),
            )
        })?;
        let index = main.num_layers;
        let p = families::layer_prefix(index);
        let (h, v) = (main.hidden_size, main.vocab_size);
        let eh_name = format!("{p}.eh_proj.weight");
        if !ckpt.contains(&eh_name) {
            return Err(ModelError::MissingTensor {
                name: format!("{eh_name} (the multi-token-prediction layer's weights)"),
                expected: vec![h, 2 * h],
            });
        }
        let vocab = vocab_tensors(ckpt, main, &p);
        let (embed, shared_embed) = match (main_vocab, vocab.embed_is_main) {
            (Some(main), true) => (Arc::clone(&main.embed), true),
            _ => (Arc::new(ckpt.load_native(&vocab.embed, &[v, h])?), false),
        };
        let (head, shared_head) = match (main_vocab, vocab.head_is_main) {
            (Some(main), true) => (Arc::clone(&main.lm_head), true),
            _ => (
                Arc::new(PackedMatrix::from_native(
                    &[&ckpt.load_native(&vocab.head, &[v, h])?],
                    h,
                )),
                false,
            ),
        };
        let experts = ExpertSet::load(
            ckpt,
            &config,
            (0..config.moe.num_experts).map(|e| (index, e)),
        )?;
        Ok(Self {
            index,
            embed,
            enorm: ckpt.load_f32(&format!("{p}.enorm.weight"), &[h])?,
            hnorm: ckpt.load_f32(&format!("{p}.hnorm.weight"), &[h])?,
            eh_proj: PackedMatrix::from_native(&[&ckpt.load_native(&eh_name, &[h, 2 * h])?], 2 * h),
            layer: DecoderLayer::load(ckpt, &config, index)?,
            experts,
            head_norm: ckpt.load_f32(&format!("{p}.shared_head.norm.weight"), &[h])?,
            head,
            rope: Rope::new(&config.rope),
            config,
            shared: SharedVocab {
                embed: shared_embed,
                lm_head: shared_head,
            },
        })
    }

    /// Which of the main model's vocabulary weights it shares.
    pub fn shared_vocab(&self) -> SharedVocab {
        self.shared
    }

    /// The main config with the head's layer after the main ones: what the caches it fills
    /// are laid out for.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The KV cache layer it fills: the one after the main model's.
    pub fn kv_layer(&self) -> usize {
        self.index
    }

    /// Runs the head over every sequence's rows (filling its cache layer at their positions),
    /// then drafts each sequence's `drafts` tokens after its last row, greedily: the head's
    /// argmax, then the head again on its own output and that token. Returns the drafts, in
    /// order. Checks every input before anything changes.
    pub fn propose(&self, seqs: &mut [MtpRows<'_>]) -> Result<Vec<Vec<u32>>> {
        self.validate(seqs)?;
        let h = self.config.hidden_size;
        let spans: Vec<(usize, usize)> = seqs.iter().map(|s| (s.start, s.next.len())).collect();
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.next.iter().copied()).collect();
        let hidden: Vec<f32> = seqs.iter().flat_map(|s| s.hidden.iter().copied()).collect();
        let mut caches: Vec<&mut SequenceCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let mut out = self.run(&mut caches, &spans, &tokens, &hidden)?;
        let mut drafts: Vec<Vec<u32>> = vec![Vec::new(); seqs.len()];
        // The drafting sequences, in order: (index, its last row in `out`, its next position).
        let mut chain: Vec<(usize, usize, usize)> = Vec::new();
        let mut end = 0;
        for (i, &(start, n)) in spans.iter().enumerate() {
            end += n;
            if seqs[i].drafts > 0 && n > 0 {
                chain.push((i, end - 1, start + n));
            }
        }
        while !chain.is_empty() {
            let mut rows = Vec::with_capacity(chain.len() * h);
            for &(_, r, _) in &chain {
                rows.extend_from_slice(&out[r * h..(r + 1) * h]);
            }
            let picks = self.greedy(&rows, chain.len());
            let mut next_tokens = Vec::new();
            let mut next_chain = Vec::new();
            for (&(i, r, pos), &token) in chain.iter().zip(&picks) {
                drafts[i].push(token);
                if drafts[i].len() < seqs[i].drafts {
                    next_tokens.push(token);
                    next_chain.push((i, r, pos));
                }
            }
            if next_chain.is_empty() {
                break;
            }
            // One more row each, at its next position: the head's own output as the hidden
            // state, and the token it just drafted.
            let mut prev = Vec::with_capacity(next_chain.len() * h);
            for &(_, r, _) in &next_chain {
                prev.extend_from_slice(&out[r * h..(r + 1) * h]);
            }
            let chain_spans: Vec<(usize, usize)> =
                next_chain.iter().map(|&(_, _, pos)| (pos, 1)).collect();
            let mut chain_caches: Vec<&mut SequenceCache> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(j, _)| next_chain.iter().any(|c| c.0 == *j))
                .map(|(_, s)| &mut *s.cache)
                .collect();
            out = self.run(&mut chain_caches, &chain_spans, &next_tokens, &prev)?;
            chain = next_chain
                .into_iter()
                .enumerate()
                .map(|(k, (i, _, pos))| (i, k, pos + 1))
                .collect();
        }
        Ok(drafts)
    }

    fn validate(&self, seqs: &[MtpRows<'_>]) -> Result<()> {
        let h = self.config.hidden_size;
        for s in seqs {
            let rows = s.next.len();
            if s.hidden.len() != rows * h {
                return Err(ModelError::InvalidRequest(format!(
                    "MTP: {} hidden values for {rows} rows of {h}",
                    s.hidden.len()
                )));
            }
            if let Some(&id) = s
                .next
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab_size: self.config.vocab_size,
                });
            }
            let end = s.start + rows + s.drafts.saturating_sub(1);
            if end > self.config.max_position_embeddings {
                return Err(ModelError::SequenceTooLong {
                    len: end,
                    max: self.config.max_position_embeddings,
                });
            }
            if s.cache.num_layers() <= self.index {
                return Err(ModelError::InvalidRequest(
                    "MTP: the sequence's cache has no layer for the draft head".into(),
                ));
            }
        }
        Ok(())
    }

    /// The head's layer over rows (`spans`: each cache's first position and row count; one
    /// token and one hidden row each): its output before `shared_head.norm`.
    fn run(
        &self,
        caches: &mut [&mut SequenceCache],
        spans: &[(usize, usize)],
        tokens: &[u32],
        hidden: &[f32],
    ) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let eps = self.config.rms_norm_eps;
        let layout = BatchLayout::new(spans.iter().copied());
        let rows = layout.num_rows();
        let mut embedded = Vec::with_capacity(rows * h);
        for (&t, &pos) in tokens.iter().zip(&layout.row_pos) {
            if pos == 0 {
                // Position 0 has no token before it to have predicted from (vLLM's mask).
                embedded.resize(embedded.len() + h, 0.0);
            } else {
                self.embed
                    .extend_widened(t as usize * h..(t as usize + 1) * h, &mut embedded);
            }
        }
        ops::rms_norm_rows(&mut embedded, &self.enorm, eps);
        let normed_hidden = ops::rms_norm(hidden, &self.hnorm, eps);
        let mut joined = Vec::with_capacity(rows * 2 * h);
        for (e, x) in embedded.chunks_exact(h).zip(normed_hidden.chunks_exact(h)) {
            joined.extend_from_slice(e);
            joined.extend_from_slice(x);
        }
        let mut x = self.eh_proj.matmul(&joined, rows);
        for (cache, &(start, n)) in caches.iter_mut().zip(spans) {
            cache.ensure_capacity(start + n);
        }
        let rope = self.rope.table(&layout.row_pos);
        let mut layer_caches: Vec<LayerCache<'_>> =
            caches.iter_mut().map(|c| c.layer(self.index)).collect();
        let step = LayerStep {
            index: self.index,
            layout: &layout,
            rope: &rope,
            config: &self.config,
            experts: &self.experts,
        };
        self.layer.forward(&mut x, &step, &mut layer_caches)?;
        Ok(x)
    }

    /// Each row's likeliest next token under the shared head.
    fn greedy(&self, rows: &[f32], n: usize) -> Vec<u32> {
        let mut normed = rows.to_vec();
        ops::rms_norm_rows(&mut normed, &self.head_norm, self.config.rms_norm_eps);
        let logits = self.head.matmul(&normed, n);
        logits
            .chunks_exact(self.config.vocab_size)
            .map(|row| ops::argmax(row) as u32)
            .collect()
    }
}

/// The tensors the head reads its embedding and head from, and whether each is the main
/// model's (absent under the layer, or stored there bit for bit).
struct VocabTensors {
    embed: String,
    embed_is_main: bool,
    head: String,
    head_is_main: bool,
}

fn vocab_tensors(ckpt: &Checkpoint, main: &ModelConfig, prefix: &str) -> VocabTensors {
    let main_embed = "model.embed_tokens.weight";
    let main_head = if main.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
        main_embed
    } else {
        "lm_head.weight"
    };
    let own_or_main = |own: String, main_name: &str| {
        if ckpt.contains(&own) {
            let same = ckpt.same_values(&own, main_name);
            (own, same)
        } else {
            (main_name.to_string(), true)
        }
    };
    let (embed, embed_is_main) = own_or_main(format!("{prefix}.embed_tokens.weight"), main_embed);
    let (head, head_is_main) = own_or_main(format!("{prefix}.shared_head.head.weight"), main_head);
    VocabTensors {
        embed,
        embed_is_main,
        head,
        head_is_main,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Family;
    use crate::dense::{DenseModel, StepSequence};
    use crate::dense_step::DenseStep;
    use crate::generator::{CheckpointPlan, Preset, WeightDtype};
    use crate::kv_cache::{KvLayout, KvPool};
    use std::sync::Arc;

    struct Loaded {
        dense: DenseModel,
        experts: ExpertSet,
        head: MtpHead,
        pool: Arc<KvPool>,
    }

    /// A tiny DeepSeek-V3 with its MTP layer (a synthetic checkpoint: weights from a seed).
    fn load(name: &str) -> Loaded {
        load_family(name, Family::DeepseekV3)
    }

    /// A tiny checkpoint of `family` with its MTP layer.
    fn load_family(name: &str, family: Family) -> Loaded {
        let dir = std::env::temp_dir().join(format!(
            "moe-mtp-{}-{name}-{}",
            std::process::id(),
            family.model_type()
        ));
        let mut plan = CheckpointPlan::new(family, Preset::Tiny, WeightDtype::F32, 9);
        plan.mtp_layers = 1;
        plan.write_synthetic(&dir).unwrap();
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let dense = DenseModel::load(&ckpt, &config).unwrap();
        let head = MtpHead::load(&ckpt, &config, dense.vocab_weights().as_ref()).unwrap();
        let loaded = Loaded {
            dense,
            experts: ExpertSet::load_all(&ckpt, &config).unwrap(),
            pool: KvPool::new(KvLayout::for_config(head.config(), 16)),
            head,
        };
        let _ = std::fs::remove_dir_all(&dir);
        loaded
    }

    impl Loaded {
        /// A sequence's cache after the main model fed `tokens`, and the hidden rows it kept.
        fn prefilled(&self, tokens: &[u32]) -> (SequenceCache, Vec<f32>) {
            let mut cache = SequenceCache::new(&self.pool);
            cache.keep_hidden();
            let mut step = [StepSequence {
                cache: &mut cache,
                tokens,
                all_logits: false,
            }];
            self.dense.forward(&mut step, &self.experts).unwrap();
            let hidden = std::mem::take(cache.kept_hidden_mut().unwrap());
            (cache, hidden)
        }
    }

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 37 + seed * 11 + 5) % 512)
            .collect()
    }

    /// The head's guesses depend on a sequence's own rows only: all at once, in two chunks (its
    /// cache layer carried between them) or beside another sequence, the same drafts; and a
    /// chain of three reuses the layer on its own output.
    #[test]
    fn guesses_are_the_same_at_once_in_chunks_or_beside_another_sequence() {
        for family in [Family::DeepseekV3, Family::Glm4Moe, Family::Glm4MoeLite] {
            guesses_do_not_depend_on_chunks_or_batch_mates(&load_family("chunks", family));
        }
    }

    fn guesses_do_not_depend_on_chunks_or_batch_mates(m: &Loaded) {
        let h = m.head.config().hidden_size;
        assert_eq!(m.head.kv_layer(), 3);
        let prompt = tokens(40, 1);
        let next: Vec<u32> = prompt[1..].iter().copied().chain([7]).collect();

        let (mut cache, hidden) = m.prefilled(&prompt);
        assert_eq!(hidden.len(), 40 * h);
        let at_once = m
            .head
            .propose(&mut [MtpRows {
                cache: &mut cache,
                start: 0,
                hidden: hidden.clone(),
                next: &next,
                drafts: 3,
            }])
            .unwrap();
        assert_eq!(at_once[0].len(), 3);

        let (mut cache, _) = m.prefilled(&prompt);
        let first = m
            .head
            .propose(&mut [MtpRows {
                cache: &mut cache,
                start: 0,
                hidden: hidden[..25 * h].to_vec(),
                next: &next[..25],
                drafts: 0,
            }])
            .unwrap();
        assert_eq!(first, vec![Vec::<u32>::new()]);
        let chunked = m
            .head
            .propose(&mut [MtpRows {
                cache: &mut cache,
                start: 25,
                hidden: hidden[25 * h..].to_vec(),
                next: &next[25..],
                drafts: 3,
            }])
            .unwrap();
        assert_eq!(chunked, at_once);

        let other = tokens(23, 2);
        let other_next: Vec<u32> = other[1..].iter().copied().chain([9]).collect();
        let (mut other_cache, other_hidden) = m.prefilled(&other);
        let (mut cache, _) = m.prefilled(&prompt);
        let beside = m
            .head
            .propose(&mut [
                MtpRows {
                    cache: &mut other_cache,
                    start: 0,
                    hidden: other_hidden,
                    next: &other_next,
                    drafts: 1,
                },
                MtpRows {
                    cache: &mut cache,
                    start: 0,
                    hidden,
                    next: &next,
                    drafts: 3,
                },
            ])
            .unwrap();
        assert_eq!(beside[1], at_once[0]);
        assert_eq!(beside[0].len(), 1);
    }

    #[test]
    fn bad_rows_are_refused_before_anything_changes() {
        let m = load("bad");
        let prompt = tokens(8, 3);
        let (mut cache, hidden) = m.prefilled(&prompt);
        let short = MtpRows {
            cache: &mut cache,
            start: 0,
            hidden: hidden[..5].to_vec(),
            next: &prompt,
            drafts: 1,
        };
        assert!(m.head.propose(&mut [short]).is_err());
        let (mut cache, hidden) = m.prefilled(&prompt);
        let out_of_vocab = [512u32; 8];
        let bad_token = MtpRows {
            cache: &mut cache,
            start: 0,
            hidden,
            next: &out_of_vocab,
            drafts: 1,
        };
        assert!(matches!(
            m.head.propose(&mut [bad_token]),
            Err(ModelError::TokenOutOfRange { id: 512, .. })
        ));
        // A cache without the head's layer (the main model's layout).
        let mut plain = m.dense.new_cache();
        let (_, hidden) = m.prefilled(&prompt);
        let rows = MtpRows {
            cache: &mut plain,
            start: 0,
            hidden,
            next: &prompt,
            drafts: 1,
        };
        assert!(m.head.propose(&mut [rows]).is_err());
    }

    /// DeepSeek's files repeat the embedding and lm_head under the layer: the head uses the
    /// main model's (no second copy) and guesses what a head with its own copies does.
    #[test]
    fn the_head_shares_the_main_models_embedding_and_lm_head() {
        let dir = std::env::temp_dir().join(format!("moe-mtp-{}-files", std::process::id()));
        let mut plan = CheckpointPlan::new(Family::DeepseekV3, Preset::Tiny, WeightDtype::Bf16, 4);
        plan.mtp_layers = 1;
        plan.write(&dir).unwrap();
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert!(ckpt.contains("model.layers.3.shared_head.head.weight"));
        assert!(ckpt.contains("model.layers.3.embed_tokens.weight"));
        let dense = DenseModel::load(&ckpt, &config).unwrap();
        let main = dense.vocab_weights().unwrap();
        let shared = MtpHead::load(&ckpt, &config, Some(&main)).unwrap();
        let own = MtpHead::load(&ckpt, &config, None).unwrap();
        let both = SharedVocab {
            embed: true,
            lm_head: true,
        };
        assert_eq!(shared.shared_vocab(), both);
        assert!(Arc::ptr_eq(&shared.embed, &main.embed));
        assert!(Arc::ptr_eq(&shared.head, &main.lm_head));
        assert_eq!(
            own.shared_vocab(),
            SharedVocab {
                embed: false,
                lm_head: false
            }
        );
        let experts = ExpertSet::load_all(&ckpt, &config).unwrap();
        let pool = KvPool::new(KvLayout::for_config(shared.config(), 16));
        let h = config.hidden_size;
        let tokens = [3u32, 9, 27, 81, 243, 5];
        let guesses = |head: &MtpHead| {
            let mut cache = SequenceCache::new(&pool);
            cache.keep_hidden();
            let mut step = [StepSequence {
                cache: &mut cache,
                tokens: &tokens,
                all_logits: false,
            }];
            dense.forward(&mut step, &experts).unwrap();
            let hidden = std::mem::take(cache.kept_hidden_mut().unwrap());
            assert_eq!(hidden.len(), tokens.len() * h);
            let next = [9u32, 27, 81, 243, 5, 7];
            head.propose(&mut [MtpRows {
                cache: &mut cache,
                start: 0,
                hidden,
                next: &next,
                drafts: 3,
            }])
            .unwrap()
        };
        assert_eq!(guesses(&shared), guesses(&own));
        drop(ckpt);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_checkpoint_without_the_layer_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("moe-mtp-{}-none", std::process::id()));
        let plan = CheckpointPlan::new(Family::DeepseekV3, Preset::Tiny, WeightDtype::F32, 9);
        plan.write_synthetic(&dir).unwrap();
        let config = ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let err = MtpHead::load(&ckpt, &config, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("num_nextn_predict_layers"), "{err}");
        let mut with_layer = config.clone();
        with_layer.mtp_layers = 1;
        let err = MtpHead::load(&ckpt, &with_layer, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("model.layers.3.eh_proj.weight"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
