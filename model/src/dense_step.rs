//! What one batched step of a dense part takes and gives, whatever device runs it: the
//! sequences of a step ([`StepSequence`]), the [`DenseStep`] trait the router's scheduler and
//! the offline engine drive, and the checks and bookkeeping every implementation shares (the
//! CPU's [`crate::dense::DenseModel`], the device-generic
//! [`crate::device_dense::DeviceDenseModel`] and the GPU's).

use crate::backend::{ops, NativeWeight, PackedMatrix};
use crate::batch::BatchLayout;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::expert_backend::ExpertBackend;
use crate::kv_cache::{KvLayout, SequenceCache};
use crate::logit_adjust::LogitEdits;
use crate::token_mask::MaskSlot;
use std::sync::Arc;

/// What a step needs from each sequence: its cache and new tokens.
pub struct StepSequence<'a> {
    pub cache: &'a mut SequenceCache,
    pub tokens: &'a [u32],
    /// Return logits for every new token (prefill scoring), not just the last one.
    pub all_logits: bool,
}

/// The rows whose logits a step returns: each sequence's last row, or all its rows when it
/// asked for all logits.
pub fn logit_rows(seqs: &[StepSequence<'_>], layout: &BatchLayout) -> Vec<usize> {
    let mut wanted = Vec::new();
    for (s, span) in seqs.iter().zip(&layout.seqs) {
        let first = if s.all_logits {
            span.first_row
        } else {
            span.first_row + span.len - 1
        };
        wanted.extend(first..span.first_row + span.len);
    }
    wanted
}

/// `[logit_rows, vocab]` logits, per sequence.
pub fn split_logits(seqs: &[StepSequence<'_>], logits: &[f32], vocab: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(seqs.len());
    let mut offset = 0;
    for s in seqs {
        let n = if s.all_logits { s.tokens.len() } else { 1 };
        out.push(logits[offset * vocab..(offset + n) * vocab].to_vec());
        offset += n;
    }
    out
}

/// Checks a step's inputs against the model before any state changes (every dense backend).
pub fn validate_step(config: &ModelConfig, seqs: &[StepSequence<'_>]) -> Result<()> {
    for s in seqs {
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab_size: config.vocab_size,
            });
        }
        let len = s.cache.len + s.tokens.len();
        if len > config.max_position_embeddings {
            return Err(ModelError::SequenceTooLong {
                len,
                max: config.max_position_embeddings,
            });
        }
        // A cache may hold layers past the model's: a draft head's (MTP), after the main ones.
        let expected = KvLayout {
            num_layers: s.cache.layout().num_layers.max(config.num_layers),
            ..KvLayout::for_config(config, s.cache.layout().block_tokens)
        };
        if *s.cache.layout() != expected {
            return Err(ModelError::InvalidRequest(
                "sequence cache belongs to another model".into(),
            ));
        }
    }
    Ok(())
}

/// How much of its logits a sequence's sampler reads this step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Pick<'a> {
    /// The logits themselves (to sample from a distribution the device does not draw from,
    /// constrain to a grammar, report logprobs).
    #[default]
    Logits,
    /// The last row's argmax: a greedy pick, or a prefill chunk that samples nothing.
    Argmax,
    /// The last row's `k` best-ranked logits ([`crate::sampling::ranked_top_k`]): a top-k
    /// draw reads nothing else.
    RankedTopK(usize),
    /// The token the race draws from the last row: a draw at a temperature without top-k.
    Race(crate::race::Race),
    /// One of the picks above from the last row as the request changes it (a grammar's mask,
    /// logit adjustments): the row is changed where it lies, so a device still sends back
    /// only the pick.
    Edited(RowChanges<'a>, EditedPick),
}

/// What a request changes in its last row before its pick, in this order: the tokens its
/// grammar does not allow become -inf, then its logit edits (penalties, `logit_bias`,
/// `min_tokens`): the order of [`crate::sampling::Sampler::sample_allowed`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RowChanges<'a> {
    /// Filled while the step runs; a slot filled with `None` makes the pick [`Pick::Logits`].
    pub mask: Option<&'a MaskSlot>,
    pub edits: Option<&'a LogitEdits>,
}

impl RowChanges<'_> {
    /// The changes applied to `row` on the host: `None` when the mask came back empty (the
    /// row then goes back whole).
    pub fn apply(&self, row: &mut [f32]) -> Option<()> {
        if let Some(slot) = self.mask {
            slot.wait()?.apply(row);
        }
        if let Some(edits) = self.edits {
            edits.apply(row);
        }
        Some(())
    }
}

/// What an [`Pick::Edited`] row gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EditedPick {
    Argmax,
    RankedTopK(usize),
    Race(crate::race::Race),
}

impl<'a> Pick<'a> {
    /// The changes this pick asks for before it, and the pick itself.
    pub fn parts(self) -> (RowChanges<'a>, Pick<'static>) {
        let none = RowChanges::default();
        match self {
            Pick::Logits => (none, Pick::Logits),
            Pick::Argmax => (none, Pick::Argmax),
            Pick::RankedTopK(k) => (none, Pick::RankedTopK(k)),
            Pick::Race(race) => (none, Pick::Race(race)),
            Pick::Edited(changes, pick) => (
                changes,
                match pick {
                    EditedPick::Argmax => Pick::Argmax,
                    EditedPick::RankedTopK(k) => Pick::RankedTopK(k),
                    EditedPick::Race(race) => Pick::Race(race),
                },
            ),
        }
    }
}

/// The most logits a [`Pick::RankedTopK`] asks for (the device ranks them in `k` passes).
pub const MAX_RANKED_TOP_K: usize = 64;

/// What a step gives back for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// Its logits, as [`DenseStep::forward`] returns them.
    Logits(Vec<f32>),
    /// The index of its last row's largest logit, the lowest on a tie ([`ops::argmax`]): all a
    /// greedy pick needs, so a device sends one id instead of a vocabulary of logits.
    Argmax(u32),
    /// Its last row's best-ranked `(id, logit)` pairs, best first.
    RankedTopK(Vec<(u32, f32)>),
    /// The token its last row's race drew.
    Drawn(u32),
}

/// [`DenseStep::forward_picking`] from the logits [`DenseStep::forward`] returned; the
/// sequences' picks in parallel (a batch of races or rankings over a large vocabulary is
/// milliseconds each).
pub fn pick_on_host(
    logits: Vec<Vec<f32>>,
    seqs: &[StepSequence<'_>],
    picks: &[Pick<'_>],
    vocab: usize,
) -> Vec<StepOutput> {
    use rayon::prelude::*;
    let picks: Vec<Pick<'_>> = (0..seqs.len())
        .map(|i| pick_for(&seqs[i], picks, i))
        .collect();
    logits
        .into_par_iter()
        .zip(picks)
        .map(|(rows, pick)| {
            let (changes, pick) = pick.parts();
            let Some(at) = rows.len().checked_sub(vocab) else {
                return StepOutput::Logits(rows);
            };
            let changed;
            let row = if changes == RowChanges::default() {
                &rows[at..]
            } else {
                let mut row = rows[at..].to_vec();
                if changes.apply(&mut row).is_none() {
                    return StepOutput::Logits(rows);
                }
                changed = row;
                &changed[..]
            };
            match pick {
                Pick::Argmax => StepOutput::Argmax(ops::argmax(row) as u32),
                Pick::RankedTopK(k) => {
                    StepOutput::RankedTopK(crate::sampling::ranked_top_k(row, k))
                }
                Pick::Race(race) => StepOutput::Drawn(race.draw(row)),
                _ => StepOutput::Logits(rows),
            }
        })
        .collect()
}

/// What sequence `i` of a step gets: what `picks` asks, except that a prompt being scored
/// keeps its logits (it needs every row's), and a top-k of 0 or over [`MAX_RANKED_TOP_K`],
/// or a race a device cannot run (see [`crate::race::Race::is_valid`]), sends the logits
/// (unchanged: the sampler masks and edits them itself).
pub fn pick_for<'p>(s: &StepSequence<'_>, picks: &[Pick<'p>], i: usize) -> Pick<'p> {
    let pick = picks.get(i).copied().unwrap_or_default();
    match pick.parts().1 {
        _ if s.all_logits => Pick::Logits,
        Pick::RankedTopK(k) if k == 0 || k > MAX_RANKED_TOP_K => Pick::Logits,
        Pick::Race(race) if !race.is_valid() => Pick::Logits,
        _ => pick,
    }
}

/// The dense part on whatever device it runs: what the router's scheduler and the offline
/// engine step.
pub trait DenseStep: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// One batched step; see [`crate::dense::DenseModel::forward`].
    fn forward(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
    ) -> Result<Vec<Vec<f32>>>;
    /// [`Self::forward`], each sequence coming back as much as its sampler reads ([`Pick`],
    /// [`pick_for`]): the same ids and logits as picked from [`Self::forward`]'s logits; a GPU
    /// dense part finds argmaxes and top-k lists on the device and downloads only them and
    /// the other sequences' logits.
    fn forward_picking(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
        picks: &[Pick<'_>],
    ) -> Result<Vec<StepOutput>> {
        let logits = self.forward(seqs, experts)?;
        Ok(pick_on_host(logits, seqs, picks, self.config().vocab_size))
    }
    fn new_cache(&self) -> SequenceCache {
        SequenceCache::for_config(self.config())
    }
    /// Where it runs, for logs and status (`cpu`, `cuda:0 (NVIDIA H200, bf16)`).
    fn placement(&self) -> String;
    /// Its embedding and lm_head in host memory, for a draft head that shares them (DeepSeek's
    /// MTP layer); `None` where they live on a device.
    fn vocab_weights(&self) -> Option<VocabWeights> {
        None
    }
}

/// The embedding and lm_head of a model held on the host, shared rather than copied by a draft
/// head whose checkpoint repeats them (DeepSeek-V3's are 3.7 GB in bf16).
#[derive(Clone)]
pub struct VocabWeights {
    /// `[vocab, hidden]`, looked up.
    pub embed: Arc<NativeWeight>,
    /// `[vocab, hidden]` packed for the GEMM.
    pub lm_head: Arc<PackedMatrix>,
}
