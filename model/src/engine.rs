//! The offline engine: the dense part ([`crate::dense_step::DenseStep`], on the CPU or a GPU) plus
//! an [`ExpertSet`] holding every expert, a tokenizer, and a generation loop that batches many
//! requests into each step.

use std::path::Path;

use serde::Serialize;

use crate::backend::ops;
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::dense::load_dense;
use crate::dense_step::{DenseStep, StepSequence};
use crate::error::{ModelError, Result};
use crate::expert_backend::ExpertBackend;
use crate::experts::{ExpertDevice, ExpertSet};
use crate::kv_cache::SequenceCache;
use crate::offline_drafts::{DraftCounts, DraftingSeq, MtpPart, OfflineDrafts};
use crate::sampling::{Sampler, SamplingParams};
use crate::speculative::SpeculativeConfig;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub input_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
    /// Keep the full logits that produced each output token.
    pub emit_logits: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Length,
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOutput {
    pub input_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    /// Log-softmax of each chosen token under the raw logits.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    pub step_logits: Option<Vec<Vec<f32>>>,
    /// How its drafts went (all zero but the steps when the engine does not speculate).
    pub drafts: DraftCounts,
}

pub struct Engine {
    config: ModelConfig,
    dense: Box<dyn DenseStep>,
    experts: ExpertSet,
    /// Where the routed experts are reached instead of `experts` (in-process nodes behind the
    /// layer exchange); `experts` still holds their weights.
    reach: Option<Box<dyn ExpertBackend + Send + Sync>>,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    /// How the checkpoint's weights are held (an MTP head loaded later holds its own alike).
    weights: crate::checkpoint::WeightsDtype,
    /// `--speculative-config`: drafts fed and checked in each decode step.
    drafts: Option<OfflineDrafts>,
}

impl Engine {
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, &ExpertDevice::Cpu)
    }

    /// Loads the whole model on `device`: the dense part (attention and its KV cache, gate,
    /// shared experts, lm_head) and the routed experts.
    pub fn load_on(dir: &Path, device: &ExpertDevice) -> Result<Self> {
        Self::load_checkpoint(dir, None, device)
    }

    /// Loads the whole model on the CPU with its weights held as `weights` says (instead of
    /// the process's `--weights-dtype`).
    pub fn load_holding(dir: &Path, weights: crate::checkpoint::WeightsDtype) -> Result<Self> {
        Self::load_checkpoint(dir, Some(weights), &ExpertDevice::Cpu)
    }

    /// The config first, so that a directory without one says so before anything else.
    fn load_checkpoint(
        dir: &Path,
        weights: Option<crate::checkpoint::WeightsDtype>,
        device: &ExpertDevice,
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let mut ckpt = Checkpoint::open(dir)?;
        if let Some(weights) = weights {
            ckpt = ckpt.with_weights_dtype(weights);
        }
        let dense = load_dense(&ckpt, &config, device)?;
        let experts = ExpertSet::load_all_on(&ckpt, &config, device)?;
        let eos_ids = config.stop_ids(tokenizer.eos_id());
        Ok(Self {
            config,
            dense,
            experts,
            reach: None,
            tokenizer,
            eos_ids,
            weights: ckpt.weights_dtype(),
            drafts: None,
        })
    }

    /// Speculates as `config` says (vLLM's `--speculative-config`), loading the MTP layer of
    /// the checkpoint in `dir` for `deepseek_mtp`: the same tokens and logprobs, in fewer steps
    /// where drafts agree.
    pub fn speculating(mut self, dir: &Path, config: SpeculativeConfig) -> Result<Self> {
        let ckpt = Checkpoint::open(dir)?.with_weights_dtype(self.weights);
        self.drafts = Some(OfflineDrafts::load(
            config,
            &ckpt,
            &self.config,
            self.dense.as_ref(),
        )?);
        Ok(self)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn dense(&self) -> &dyn DenseStep {
        self.dense.as_ref()
    }

    pub fn experts(&self) -> &ExpertSet {
        &self.experts
    }

    pub fn new_cache(&self) -> SequenceCache {
        self.dense.new_cache()
    }

    /// Steps reach the routed experts through `backend` (for instance expert nodes in this
    /// process behind the layer exchange) instead of calling the set held here.
    pub fn reaching_experts_through(
        mut self,
        backend: Box<dyn ExpertBackend + Send + Sync>,
    ) -> Self {
        self.reach = Some(backend);
        self
    }

    fn routed_experts(&self) -> &dyn ExpertBackend {
        match &self.reach {
            Some(backend) => backend.as_ref(),
            None => &self.experts,
        }
    }

    /// One batched forward step over the given sequences (see
    /// [`crate::dense::DenseModel::forward`]), run on a thread of the math pool: see
    /// [`crate::backend::in_math_pool`].
    pub fn step(&self, seqs: &mut [StepSequence<'_>]) -> Result<Vec<Vec<f32>>> {
        crate::backend::in_math_pool(|| self.dense.forward(seqs, self.routed_experts()))
    }

    /// [`Self::step`] for greedy decoding: each sequence's next token (its last row's argmax),
    /// found where the dense part runs (on a GPU only the ids are downloaded).
    pub fn step_greedy(&self, seqs: &mut [StepSequence<'_>]) -> Result<Vec<u32>> {
        let picks = vec![crate::dense_step::Pick::Argmax; seqs.len()];
        let outputs = self.step_picking(seqs, &picks)?;
        outputs
            .into_iter()
            .map(|output| match output {
                crate::dense_step::StepOutput::Argmax(id)
                | crate::dense_step::StepOutput::Drawn(id) => Ok(id),
                crate::dense_step::StepOutput::RankedTopK(ranked) => ranked
                    .first()
                    .map(|&(id, _)| id)
                    .ok_or_else(|| ModelError::InvalidRequest("an empty ranking".into())),
                crate::dense_step::StepOutput::Logits(rows) => rows
                    .len()
                    .checked_sub(self.config.vocab_size)
                    .map(|last| ops::argmax(&rows[last..]) as u32)
                    .ok_or_else(|| ModelError::InvalidRequest("a step without logits".into())),
            })
            .collect()
    }

    /// [`Self::step`], each sequence coming back as much as its pick asks
    /// ([`DenseStep::forward_picking`]: on a GPU, argmaxes and draws are found there).
    pub fn step_picking(
        &self,
        seqs: &mut [StepSequence<'_>],
        picks: &[crate::dense_step::Pick],
    ) -> Result<Vec<crate::dense_step::StepOutput>> {
        crate::backend::in_math_pool(|| {
            self.dense
                .forward_picking(seqs, self.routed_experts(), picks)
        })
    }

    /// Logits at every position of a prompt, `[len, vocab]`.
    pub fn prompt_logits(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache();
        let mut seqs = [StepSequence {
            cache: &mut cache,
            tokens: ids,
            all_logits: true,
        }];
        Ok(self.step(&mut seqs)?.remove(0))
    }

    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        if req.input_ids.is_empty() {
            return Err(ModelError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&id) = req
            .input_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab_size: self.config.vocab_size,
            });
        }
        if req.input_ids.len() > self.config.max_position_embeddings {
            return Err(ModelError::SequenceTooLong {
                len: req.input_ids.len(),
                max: self.config.max_position_embeddings,
            });
        }
        req.sampling.validate()
    }

    pub fn generate(&self, req: &GenerateRequest) -> Result<GenerateOutput> {
        let mut out = self.generate_batch(std::slice::from_ref(req))?;
        Ok(out.remove(0))
    }

    /// Generates for several requests at once: one prefill step for all prompts, then decode
    /// steps over the requests still running (each feeding its draft after its token when the
    /// engine speculates). Each request's tokens are what it would get alone.
    pub fn generate_batch(&self, reqs: &[GenerateRequest]) -> Result<Vec<GenerateOutput>> {
        for r in reqs {
            self.validate(r)?;
        }
        let mut states: Vec<SeqState> = reqs.iter().map(|r| self.start_state(r)).collect();
        loop {
            let active: Vec<usize> = (0..states.len()).filter(|&i| !states[i].done).collect();
            if active.is_empty() {
                break;
            }
            if let Some(drafts) = &self.drafts {
                for &i in &active {
                    let room = self.draft_room(&reqs[i], &states[i]);
                    let state = &mut states[i];
                    if !state.out.output_ids.is_empty() {
                        drafts.propose(&mut state.drafting, &state.history, active.len(), room);
                        state.pending.extend_from_slice(&state.drafting.draft);
                    }
                }
            }
            let starts: Vec<usize> = active.iter().map(|&i| states[i].cache.len).collect();
            let logits = {
                let mut step: Vec<StepSequence<'_>> = Vec::with_capacity(active.len());
                for state in states.iter_mut().filter(|s| !s.done) {
                    step.push(StepSequence {
                        cache: &mut state.cache,
                        tokens: &state.pending,
                        all_logits: !state.drafting.draft.is_empty(),
                    });
                }
                self.step(&mut step)?
            };
            for (&i, logits) in active.iter().zip(logits) {
                self.take_rows(&reqs[i], &mut states[i], &logits);
            }
            self.guess_drafts(reqs, &mut states, &active, &starts);
        }
        Ok(states.into_iter().map(|s| s.out).collect())
    }

    fn start_state(&self, r: &GenerateRequest) -> SeqState {
        let cache = self
            .drafts
            .as_ref()
            .and_then(OfflineDrafts::new_cache)
            .unwrap_or_else(|| self.new_cache());
        SeqState {
            cache,
            sampler: Sampler::for_request(
                r.sampling.clone(),
                &r.input_ids,
                if r.ignore_eos { &[] } else { &self.eos_ids },
            ),
            pending: r.input_ids.clone(),
            history: r.input_ids.clone(),
            out: GenerateOutput {
                input_ids: r.input_ids.clone(),
                output_ids: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
                step_logits: r.emit_logits.then(Vec::new),
                drafts: DraftCounts::default(),
            },
            done: r.max_new_tokens == 0,
            drafting: DraftingSeq::default(),
        }
    }

    /// Draft tokens a decoding sequence may feed after its token: what its answer and the
    /// model's positions have room for past the token it samples anyway.
    fn draft_room(&self, req: &GenerateRequest, state: &SeqState) -> usize {
        let answer = req
            .max_new_tokens
            .saturating_sub(state.out.output_ids.len() + 1);
        let positions = self
            .config
            .max_position_embeddings
            .saturating_sub(state.history.len());
        answer.min(positions)
    }

    /// Samples a step's rows for one sequence in turn (one row, or one per fed token when it
    /// drafted), while the picks agree with its draft; what was fed past the first
    /// disagreement leaves its cache.
    fn take_rows(&self, req: &GenerateRequest, state: &mut SeqState, logits: &[f32]) {
        let vocab = self.config.vocab_size;
        let drafted = state.drafting.draft.len();
        let mut accepted = 0;
        for (j, row) in logits.chunks_exact(vocab).enumerate() {
            let token = state.sampler.sample(row);
            state
                .out
                .logprobs
                .push(ops::log_softmax_at(row, token as usize));
            state.out.output_ids.push(token);
            state.history.push(token);
            if let Some(all) = state.out.step_logits.as_mut() {
                all.push(row.to_vec());
            }
            if !req.ignore_eos && self.eos_ids.contains(&token) {
                state.out.finish_reason = FinishReason::Stop;
                state.done = true;
            } else if state.out.output_ids.len() >= req.max_new_tokens
                || state.history.len() > self.config.max_position_embeddings
            {
                state.done = true;
            }
            let agrees = j < drafted && state.drafting.draft[j] == token;
            if state.done || !agrees {
                break;
            }
            accepted += 1;
        }
        state.drafting.record(accepted);
        state.drafting.draft.clear();
        state.out.drafts = DraftCounts {
            steps: state.out.drafts.steps + 1,
            ..state.drafting.counts
        };
        // Every token but the last sampled is in the cache.
        state.cache.truncate(state.history.len() - 1);
        state.pending = vec![*state.history.last().unwrap_or(&0)];
    }

    /// Under MTP drafting: the head over the rows this step kept for each sequence that goes
    /// on (from `starts`, its cache length before the step), for their next drafts.
    fn guess_drafts(
        &self,
        reqs: &[GenerateRequest],
        states: &mut [SeqState],
        active: &[usize],
        starts: &[usize],
    ) {
        let Some(drafts) = &self.drafts else {
            return;
        };
        let rooms: Vec<usize> = active
            .iter()
            .map(|&i| self.draft_room(&reqs[i], &states[i]))
            .collect();
        let going_on = active.iter().filter(|&&i| !states[i].done).count();
        let mut slot = vec![None; states.len()];
        for (k, &i) in active.iter().enumerate() {
            slot[i] = Some(k);
        }
        let mut parts = Vec::with_capacity(going_on);
        for (state, k) in states.iter_mut().zip(slot) {
            let Some(k) = k.filter(|&k| !state.done && state.cache.len > starts[k]) else {
                continue;
            };
            // Row p holds position starts[k] + p; the token after it is at position + 1.
            let next = &state.history[starts[k] + 1..=state.cache.len];
            parts.push(MtpPart {
                seq: &mut state.drafting,
                cache: &mut state.cache,
                start: starts[k],
                next,
                room: rooms[k],
            });
        }
        drafts.guess(&mut parts, going_on);
    }
}

struct SeqState {
    cache: SequenceCache,
    sampler: Sampler,
    /// Tokens to feed at the next step (the prompt, then each sampled token and its draft).
    pending: Vec<u32>,
    /// The prompt and the answer so far (what prompt lookup searches).
    history: Vec<u32>,
    out: GenerateOutput,
    done: bool,
    drafting: DraftingSeq,
}
