//! Speculative decoding in the offline engine (`moe generate` / `moe bench --model` with
//! `--speculative-config`), as vLLM's `LLM(speculative_config=...)` runs it: each decoding
//! sequence feeds a draft after its token (prompt lookup, or DeepSeek-V3's MTP layer's
//! guesses), every fed row's logits come back, and the sampler picks row by row while its
//! picks agree. A verify row is bitwise a decode's, so tokens and logprobs are those without
//! drafts; what changes is how many steps an answer takes.

use std::sync::Arc;

use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::dense_step::DenseStep;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvLayout, KvPool, SequenceCache, DEFAULT_BLOCK_TOKENS};
use crate::mtp::{MtpHead, MtpRows};
use crate::speculative::{DraftBackoff, DraftMethod, SpeculativeConfig};

/// How an answer's drafts went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DraftCounts {
    /// Steps that fed a draft.
    pub drafts: usize,
    /// Draft tokens fed.
    pub draft_tokens: usize,
    /// Draft tokens the picks agreed with.
    pub accepted_tokens: usize,
    /// Steps the answer took (prefill included).
    pub steps: usize,
}

/// An engine's drafting: the config, and the MTP head with the KV layout that holds its layer.
pub struct OfflineDrafts {
    config: SpeculativeConfig,
    mtp: Option<(MtpHead, Arc<KvPool>)>,
}

impl OfflineDrafts {
    /// Drafting as `config` says; `deepseek_mtp` loads the checkpoint's MTP layer beside a CPU
    /// dense part (whose embedding and lm_head it shares).
    pub fn load(
        config: SpeculativeConfig,
        ckpt: &Checkpoint,
        model: &ModelConfig,
        dense: &dyn DenseStep,
    ) -> Result<Self> {
        let mtp = if config.uses_mtp() {
            let vocab = dense.vocab_weights().ok_or_else(|| {
                ModelError::InvalidRequest(
                    "deepseek_mtp drafts beside a CPU dense part only (not on a GPU)".into(),
                )
            })?;
            let head = MtpHead::load(ckpt, model, Some(&vocab))?;
            let pool = KvPool::new(KvLayout::for_config(head.config(), DEFAULT_BLOCK_TOKENS));
            Some((head, pool))
        } else {
            None
        };
        Ok(Self { config, mtp })
    }

    /// A cache for a sequence: with the head's layer, keeping the rows it reads, under MTP.
    pub fn new_cache(&self) -> Option<SequenceCache> {
        self.mtp.as_ref().map(|(_, pool)| {
            let mut cache = SequenceCache::new(pool);
            cache.keep_hidden();
            cache
        })
    }

    /// Fills `draft` for a decoding sequence's next step (`running` sequences in the batch,
    /// `room` tokens it may still add past the one it samples anyway).
    pub fn propose(&self, seq: &mut DraftingSeq, history: &[u32], running: usize, room: usize) {
        seq.draft.clear();
        if !self.config.drafts_at(running) || !seq.backoff.may_draft() {
            return;
        }
        match self.config.method {
            DraftMethod::Ngram(drafter) => drafter.propose(history, room, &mut seq.draft),
            DraftMethod::Mtp { .. } => seq.draft.extend(seq.mtp_guess.iter().take(room)),
        }
    }

    /// The MTP head over the rows a step kept for each sequence that goes on, filling its
    /// cache layer, and its guesses for their next drafts. A head that fails guesses nothing
    /// (drafts are optional, never an answer's failure).
    pub fn guess(&self, parts: &mut [MtpPart<'_>], running: usize) {
        let Some((head, _)) = &self.mtp else {
            return;
        };
        let DraftMethod::Mtp { tokens } = self.config.method else {
            return;
        };
        let drafting = self.config.drafts_at(running);
        let h = head.config().hidden_size;
        let mut rows: Vec<MtpRows<'_>> = Vec::with_capacity(parts.len());
        for part in parts.iter_mut() {
            part.seq.mtp_guess.clear();
            let mut hidden = part
                .cache
                .kept_hidden_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            hidden.truncate(part.next.len() * h);
            let drafts = if drafting && part.seq.backoff.drafts_next() {
                tokens.min(part.room)
            } else {
                0
            };
            rows.push(MtpRows {
                cache: &mut *part.cache,
                start: part.start,
                hidden,
                next: part.next,
                drafts,
            });
        }
        match head.propose(&mut rows) {
            Ok(guesses) => {
                drop(rows);
                for (part, guess) in parts.iter_mut().zip(guesses) {
                    part.seq.mtp_guess = guess;
                }
            }
            Err(e) => tracing::warn!(error = %e, "the MTP head drafted nothing this step"),
        }
    }
}

/// One sequence's drafting state.
#[derive(Debug, Default)]
pub struct DraftingSeq {
    /// What this step feeds after its token.
    pub draft: Vec<u32>,
    pub backoff: DraftBackoff,
    /// The MTP head's guesses after its last step.
    pub mtp_guess: Vec<u32>,
    pub counts: DraftCounts,
}

impl DraftingSeq {
    /// Counts a verified draft of which `accepted` tokens agreed.
    pub fn record(&mut self, accepted: usize) {
        if self.draft.is_empty() {
            return;
        }
        self.counts.drafts += 1;
        self.counts.draft_tokens += self.draft.len();
        self.counts.accepted_tokens += accepted;
        self.backoff.record(accepted);
    }
}

/// A sequence's rows of a step for the MTP head: positions `start..start + next.len()` of its
/// cache, each with the token after it.
pub struct MtpPart<'a> {
    pub seq: &'a mut DraftingSeq,
    pub cache: &'a mut SequenceCache,
    pub start: usize,
    pub next: &'a [u32],
    /// Tokens it may draft at its next step.
    pub room: usize,
}

#[cfg(test)]
mod tests {
    use crate::config::Family;
    use crate::engine::{Engine, GenerateOutput, GenerateRequest};
    use crate::generator::{CheckpointPlan, Preset, WeightDtype};
    use crate::logit_adjust::LogitAdjustments;
    use crate::sampling::SamplingParams;
    use std::path::{Path, PathBuf};

    /// A tiny checkpoint of `family` with its MTP layer (weights from a seed).
    fn checkpoint(name: &str, family: Family) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "moe-drafts-{}-{name}-{}",
            std::process::id(),
            family.model_type()
        ));
        let mut plan = CheckpointPlan::new(family, Preset::Tiny, WeightDtype::F32, 5);
        plan.mtp_layers = 1;
        plan.write_synthetic(&dir).unwrap();
        dir
    }

    /// Greedy held to three tokens by a bias (an answer that loops, which lookup drafts catch),
    /// then greedy, seeded, and seeded with penalties, for a prompt that repeats itself and one
    /// that does not.
    fn requests() -> Vec<GenerateRequest> {
        let repeating: Vec<u32> = [7, 8, 9, 10, 11].repeat(4);
        let plain: Vec<u32> = (0..12).map(|i| 3 + i * 37 % 500).collect();
        let penalised = SamplingParams {
            temperature: 0.8,
            seed: Some(11),
            adjust: LogitAdjustments {
                frequency_penalty: 0.5,
                repetition_penalty: 1.1,
                ..Default::default()
            },
            ..Default::default()
        };
        let seeded = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: Some(3),
            ..Default::default()
        };
        let looping = SamplingParams {
            adjust: LogitAdjustments {
                logit_bias: vec![(20, 100.0), (21, 100.0), (22, 100.0)],
                ..Default::default()
            },
            ..Default::default()
        };
        let mut out = vec![GenerateRequest {
            input_ids: plain.clone(),
            max_new_tokens: 40,
            sampling: looping,
            ignore_eos: true,
            emit_logits: false,
        }];
        for prompt in [repeating, plain] {
            for sampling in [SamplingParams::default(), seeded.clone(), penalised.clone()] {
                out.push(GenerateRequest {
                    input_ids: prompt.clone(),
                    max_new_tokens: 40,
                    sampling,
                    ignore_eos: true,
                    emit_logits: false,
                });
            }
        }
        out
    }

    fn answers(outputs: &[GenerateOutput]) -> Vec<(Vec<u32>, Vec<u32>)> {
        outputs
            .iter()
            .map(|o| {
                let bits = o.logprobs.iter().map(|l| l.to_bits()).collect();
                (o.output_ids.clone(), bits)
            })
            .collect()
    }

    fn speculating(dir: &Path, config: &str) -> Engine {
        Engine::load(dir)
            .unwrap()
            .speculating(dir, config.parse().unwrap())
            .unwrap()
    }

    /// Prompt lookup and MTP drafts change no token and no logprob, in a batch or alone, and
    /// lookup drafts save steps where answers repeat.
    #[test]
    fn offline_drafts_change_no_answer() {
        drafts_change_no_answer(
            Family::DeepseekV3,
            &[
                r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#,
                r#"{"method": "deepseek_mtp", "num_speculative_tokens": 2}"#,
            ],
        );
        // GLM-4.5's MTP layer: the same module around its GQA decoder layer.
        drafts_change_no_answer(
            Family::Glm4Moe,
            &[r#"{"method": "mtp", "num_speculative_tokens": 2}"#],
        );
        // GLM-4.7-Flash's: DeepSeek-V3's module under GLM's config.
        drafts_change_no_answer(
            Family::Glm4MoeLite,
            &[r#"{"method": "mtp", "num_speculative_tokens": 2}"#],
        );
    }

    fn drafts_change_no_answer(family: Family, configs: &[&str]) {
        let dir = checkpoint("answers", family);
        let reqs = requests();
        let plain = Engine::load(&dir).unwrap();
        let want = plain.generate_batch(&reqs).unwrap();
        for &config in configs {
            let engine = speculating(&dir, config);
            let batch = engine.generate_batch(&reqs).unwrap();
            assert_eq!(answers(&batch), answers(&want), "{config}");
            let alone: Vec<GenerateOutput> =
                reqs.iter().map(|r| engine.generate(r).unwrap()).collect();
            assert_eq!(answers(&alone), answers(&want), "{config} alone");
            let drafted: usize = batch.iter().map(|o| o.drafts.draft_tokens).sum();
            assert!(drafted > 0, "{config}: nothing drafted");
            if config.contains("ngram") {
                let first = &batch[0].drafts;
                assert!(first.accepted_tokens > 0, "{config}: {first:?}");
                assert!(first.steps < want[0].drafts.steps, "{first:?}");
                assert_eq!(
                    first.steps + first.accepted_tokens,
                    want[0].drafts.steps,
                    "each accepted draft token saves a step"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mtp_drafts_need_the_layer() {
        let dir = std::env::temp_dir().join(format!("moe-drafts-{}-none", std::process::id()));
        CheckpointPlan::new(Family::DeepseekV3, Preset::Tiny, WeightDtype::F32, 5)
            .write_synthetic(&dir)
            .unwrap();
        let config = r#"{"method": "deepseek_mtp", "num_speculative_tokens": 1}"#;
        let err = Engine::load(&dir)
            .unwrap()
            .speculating(&dir, config.parse().unwrap())
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("num_nextn_predict_layers"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
