//! Continuous batching: one thread owns every running sequence and runs the model step loop.
//!
//! Each step takes one token from every decoding sequence, then fills the rest of the token
//! budget with prefill chunks, so a long prompt never stalls running decodes. New requests join
//! at the next step when their KV blocks can be reserved; finished or abandoned ones leave at
//! once and free their blocks.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::backend::ops;
use moe_model::dense::{DenseStep, Pick, StepOutput, StepSequence};
use moe_model::dense_step::{EditedPick, RowChanges};
use moe_model::kv_cache::{KvPool, SequenceCache};
use moe_model::logit_adjust::LogitEdits;
use moe_model::sampling::Sampler;
use moe_model::token_mask::{FillOnDrop, MaskSlot, TokenMask};
use moe_model::tokenizer::Tokenizer;
use moe_model::ModelError;
use moe_proto::v1::{GenerateResponse, TopLogprobs, Usage};
use tokio::sync::mpsc;

use crate::detokenize::IncrementalText;
use crate::error::RouterError;
use crate::expert_reach::ExpertReach;
use crate::kv_blocks::{KvBlocks, KvReservation};
use crate::prefix_cache::{PrefixCache, PrefixHit};
use crate::request_metrics::{Outcome, RequestMetrics};
use crate::request_trace::RequestTrace;
use crate::structured::TokenConstraint;
use crate::validation::ValidRequest;
use moe_model::mtp::{MtpHead, MtpRows};
use moe_model::speculative::{DraftBackoff, DraftMethod, SpeculativeConfig};

/// Links from a step span to the other requests of its batch, at most.
const MAX_STEP_LINKS: usize = 64;

pub type ResponseSender = mpsc::Sender<Result<GenerateResponse, RouterError>>;

/// A validated request and where to stream its answer.
pub struct Submission {
    pub request: ValidRequest,
    pub responses: ResponseSender,
    pub trace: RequestTrace,
    /// Its place under `--max-waiting` (see [`crate::admission::WaitingLimit`]): released when
    /// the request starts running, or when it is dropped while waiting. None for a request
    /// put back in the queue by a preemption (it was admitted once).
    pub waiting_slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A submission in the waiting queue, and where it stands there.
struct Queued {
    submission: Submission,
    place: QueuePlace,
}

/// What orders a request in the queue and what it keeps across a preemption: its arrival
/// (the order among equal priorities, kept when it is preempted, so it goes back in front of
/// later arrivals, a request's first choice in front of its other choices), how often it was
/// preempted, and when its last token went out (so its latencies run on).
#[derive(Debug, Clone, Copy)]
struct QueuePlace {
    arrival: u64,
    preemptions: u32,
    last_token_at: Option<Instant>,
    /// Prompt tokens the prefix cache held when it was first admitted (its usage's
    /// `cached_tokens`; a preempted sequence's own blocks found again do not count).
    cached_tokens: u32,
}

/// The waiting queue's order: priority (lowest first), then arrival.
fn queue_order(q: &Queued) -> (i32, u64) {
    (q.submission.request.priority, q.place.arrival)
}

/// Gauges shared with the API and Admin services.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Steps run as more than one micro-batch at once (`--micro-batches`).
    pub micro_batched_steps: std::sync::atomic::AtomicU64,
    /// KV blocks the prefix cache holds.
    pub prefix_cache_blocks: AtomicUsize,
}

pub struct SchedulerConfig {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    /// Micro-batches each step runs as, at once (see [`crate::micro_batch`]).
    pub micro_batches: usize,
    /// How long steps may keep failing on the cluster (no placement, nodes failing) before the
    /// requests in them are failed; until then they are retried, caches rolled back.
    pub recovery_timeout: Duration,
    /// Drafts each decoding sequence feeds to be checked in its step (`--speculative-config`).
    pub speculation: Option<SpeculativeConfig>,
    /// Whether a waiting request that does not fit preempts less urgent running ones
    /// (`--scheduling-policy priority`).
    pub preemption: bool,
}

struct Sequence {
    request: ValidRequest,
    responses: ResponseSender,
    cache: SequenceCache,
    /// What the prefill feeds: the prompt, then any ids a resumed request generated before.
    feed: Vec<u32>,
    /// Tokens of `feed` already fed to the model.
    prefilled: usize,
    output: Vec<u32>,
    sampler: Sampler,
    text: IncrementalText,
    /// Its place in the queue it came from, when its last token went out (for inter-token
    /// latency) included.
    place: QueuePlace,
    trace: RequestTrace,
    /// The prompt's token logprobs so far, when the request asked for them (sent with the
    /// first message).
    prompt_scores: Option<PromptScores>,
    /// Its grammar's mask for the token this step samples, computed during the forward pass.
    next_mask: Option<Result<Vec<bool>, String>>,
    /// The KV blocks this sequence adds (its shared prefix is counted by the prefix cache).
    blocks: KvReservation,
    /// Its tokens so far, prompt then output, where drafts are looked up (empty when the
    /// router does not speculate).
    history: Vec<u32>,
    /// The draft this step feeds after its last token (see [`Scheduler::propose_drafts`]).
    draft: Vec<u32>,
    /// When its drafts last missed entirely, and how often in a row (see [`DraftBackoff`]).
    backoff: DraftBackoff,
    /// What the MTP head guessed after its last step, for the next (`deepseek_mtp`).
    mtp_guess: Vec<u32>,
}

/// Logprobs of the prompt's tokens (each given the ones before it), filled chunk by chunk.
#[derive(Default)]
struct PromptScores {
    logprobs: Vec<f32>,
    ranks: Vec<u32>,
    top: Vec<TopLogprobs>,
}

impl Sequence {
    /// Scores the prompt tokens that the rows of a chunk fed at `first` predict: row j (the
    /// logits after position first + j) gives the logprob of prompt token first + j + 1.
    fn score_prompt(&mut self, first: usize, rows: &[f32], vocab: usize) {
        let (Some(scores), Some(k)) = (self.prompt_scores.as_mut(), self.request.prompt_logprobs)
        else {
            return;
        };
        let ids = &self.request.input_ids;
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let Some(&target) = ids.get(first + j + 1) else {
                break;
            };
            scores
                .logprobs
                .push(ops::log_softmax_at(row, target as usize));
            scores.ranks.push(ops::rank_at(row, target as usize));
            if k > 0 {
                scores.top.push(top_logprobs(row, k));
            }
        }
    }

    /// Puts the prompt's scores (once, on the first message) into `response`.
    fn attach_prompt_scores(&mut self, response: &mut GenerateResponse) {
        if let Some(scores) = self.prompt_scores.take() {
            response.prompt_token_ids = self.request.input_ids.clone();
            response.prompt_logprobs = scores.logprobs;
            response.prompt_ranks = scores.ranks;
            response.prompt_top_logprobs = scores.top;
        }
    }

    fn prefill_done(&self) -> bool {
        self.prefilled == self.feed.len()
    }

    /// The `n` tokens a step feeds it: its next prompt chunk, or the token it sampled last and
    /// the first `n - 1` of its draft.
    fn next_tokens(&self, n: usize) -> Vec<u32> {
        if self.prefilled < self.feed.len() {
            self.feed[self.prefilled..self.prefilled + n].to_vec()
        } else {
            let last = *self
                .output
                .last()
                .expect("a decoding sequence has sampled a token");
            std::iter::once(last)
                .chain(self.draft.iter().take(n - 1).copied())
                .collect()
        }
    }

    /// Positions its cache holds once every token but the last one sampled is fed: where a
    /// decode stands, whether or not a step's drafts ran ahead of it.
    fn positions(&self) -> usize {
        (self.request.input_ids.len() + self.output.len()).saturating_sub(1)
    }

    /// Takes a sampled token into its output (and the history drafts are looked up in).
    fn push_output(&mut self, token: u32, speculating: bool) {
        self.output.push(token);
        if speculating {
            self.history.push(token);
        }
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
struct Feed {
    /// Its index in the running batch.
    seq: usize,
    /// Tokens fed: 1 for a decode, a chunk of the prompt for a prefill.
    tokens: usize,
    /// Whether a token is sampled after them (a decode, or the prompt's last chunk).
    samples: bool,
    /// Draft tokens fed after a decode's token (`tokens - 1` of them), each position then
    /// sampled in turn while the picks agree with the draft.
    drafts: usize,
}

pub struct Scheduler {
    pub dense: Arc<dyn DenseStep>,
    pub experts: ExpertReach,
    pub tokenizer: Arc<Tokenizer>,
    pub kv: Arc<KvBlocks>,
    /// Where sequences' (and cached prefixes') KV blocks live; `kv` bounds how many are taken.
    pub kv_pool: Arc<KvPool>,
    pub stats: Arc<SchedulerStats>,
    pub config: SchedulerConfig,
    pub eos_ids: Vec<u32>,
    /// Since when steps have been failing, if they are.
    pub stalled_since: Cell<Option<Instant>>,
    pub metrics: Arc<RequestMetrics>,
    /// Full prompt blocks kept for later requests (`--prefix-caching`, dense part on the CPU).
    pub prefix_cache: Option<RefCell<PrefixCache>>,
    /// The checkpoint's multi-token-prediction layer, when it drafts (`deepseek_mtp`); then
    /// every sequence's cache has its layer after the main ones, and keeps the main model's
    /// last hidden rows for it.
    pub mtp: Option<Arc<MtpHead>>,
}

/// Puts `item` in the waiting queue after every item that orders before it or equal (by
/// [`queue_order`]: lower priorities are admitted first, as vLLM orders `priority`, equal
/// ones in arrival order).
fn enqueue<T, K: Ord>(queue: &mut VecDeque<T>, item: T, order: impl Fn(&T) -> K) {
    let own = order(&item);
    let at = queue.partition_point(|waiting| order(waiting) <= own);
    queue.insert(at, item);
}

impl Scheduler {
    /// Runs until the submission channel closes.
    pub fn run(self, mut submissions: mpsc::Receiver<Submission>) {
        let mut waiting: VecDeque<Queued> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        let mut arrivals = 0u64;
        let mut arrive = |waiting: &mut VecDeque<Queued>, submission: Submission| {
            let place = QueuePlace {
                arrival: arrivals,
                preemptions: 0,
                last_token_at: None,
                cached_tokens: 0,
            };
            arrivals += 1;
            enqueue(waiting, Queued { submission, place }, queue_order);
        };
        loop {
            // Block only when there is nothing to do.
            if running.is_empty() && waiting.is_empty() {
                self.stats.waiting.store(0, Ordering::Relaxed);
                self.stats.running.store(0, Ordering::Relaxed);
                match submissions.blocking_recv() {
                    Some(s) => arrive(&mut waiting, s),
                    None => return,
                }
            }
            while let Ok(s) = submissions.try_recv() {
                arrive(&mut waiting, s);
            }
            let metrics = &self.metrics;
            let keep =
                |request: &ValidRequest, responses: &ResponseSender, trace: &mut RequestTrace| {
                    if responses.is_closed() {
                        metrics.finished(Outcome::Cancelled);
                        trace.failed("cancelled by the client");
                        false
                    } else if expired(request, responses) {
                        metrics.finished(Outcome::Deadline);
                        trace.failed("deadline exceeded");
                        false
                    } else {
                        true
                    }
                };
            running.retain_mut(|s| keep(&s.request, &s.responses, &mut s.trace));
            waiting.retain_mut(|q| {
                let s = &mut q.submission;
                keep(&s.request, &s.responses, &mut s.trace)
            });
            self.admit(&mut waiting, &mut running);
            self.stats.waiting.store(waiting.len(), Ordering::Relaxed);
            self.stats.running.store(running.len(), Ordering::Relaxed);
            if running.is_empty() {
                if !waiting.is_empty() {
                    // Blocks are held by nobody and the head still does not fit: refuse it.
                    if let Some(Queued {
                        submission: mut s, ..
                    }) = waiting.pop_front()
                    {
                        let error = RouterError::KvBudget;
                        s.trace.failed(&error.to_string());
                        let _ = s.responses.try_send(Err(error));
                    }
                }
                continue;
            }
            self.step(&mut running);
            // Finished sequences left in the step: a scrape now does not count them.
            self.stats.running.store(running.len(), Ordering::Relaxed);
        }
    }

    fn admit(&self, waiting: &mut VecDeque<Queued>, running: &mut Vec<Sequence>) {
        while let Some(front) = waiting.front() {
            let request = &front.submission.request;
            let priority = request.priority;
            // A request's later choices wait for its first one's prefill, then share its blocks
            // through the prefix cache (the first is running, so this wait is a few steps at
            // most; nothing is preempted for them meanwhile).
            if self.prefix_cache.is_some() && request.sibling.as_ref().is_some_and(|s| s.waiting())
            {
                break;
            }
            if running.len() >= self.config.max_running {
                if self.preempt_for(priority, waiting, running) {
                    continue;
                }
                break;
            }
            let tokens = request.input_ids.len() + request.max_new_tokens;
            // The cached prefix first: its blocks are then held, so making room below cannot
            // evict them, and the reservation counts only the blocks this sequence adds.
            let mut cache = SequenceCache::new(&self.kv_pool);
            if self.mtp.is_some() {
                cache.keep_hidden();
            }
            let feed: Vec<u32> = request
                .input_ids
                .iter()
                .chain(&request.resumed_ids)
                .copied()
                .collect();
            let hit = self.restore_prefix(request, &feed, &mut cache);
            let Some(blocks) = self.reserve(self.kv.blocks_for(tokens) - hit.blocks) else {
                drop(cache);
                if self.preempt_for(priority, waiting, running) {
                    continue;
                }
                break;
            };
            let Some(Queued {
                submission: mut s,
                mut place,
            }) = waiting.pop_front()
            else {
                break;
            };
            s.trace.scheduled(s.request.input_ids.len());
            // No longer waiting: another request may be admitted.
            drop(s.waiting_slot);
            if place.preemptions == 0 {
                self.count_prefix_hit(&s.request, feed.len(), hit);
                place.cached_tokens = hit.tokens.min(s.request.input_ids.len()) as u32;
                self.metrics
                    .prompt_tokens
                    .fetch_add(s.request.input_ids.len() as u64, Ordering::Relaxed);
            }
            let prompt_scores = s.request.prompt_logprobs.map(|_| PromptScores::default());
            let prefilled = hit.tokens;
            let sampler = Sampler::for_request(
                s.request.sampling.clone(),
                &s.request.input_ids,
                &s.request.end_tokens(&self.eos_ids),
            )
            .resumed_after(&s.request.resumed_ids);
            let text = self.resumed_text(&s.request);
            let history = match self.config.speculation {
                Some(_) => feed.clone(),
                None => Vec::new(),
            };
            running.push(Sequence {
                history,
                draft: Vec::new(),
                backoff: DraftBackoff::default(),
                mtp_guess: Vec::new(),
                prompt_scores,
                next_mask: None,
                sampler,
                feed,
                output: s.request.resumed_ids.clone(),
                text,
                request: s.request,
                responses: s.responses,
                cache,
                prefilled,
                place,
                trace: s.trace,
                blocks,
            });
        }
    }

    /// Makes room for a waiting request of `priority` (`--scheduling-policy priority`, as
    /// vLLM's preempts): puts the least urgent running request that is less urgent than it
    /// (the latest to arrive among equals) back in the queue. Its full KV blocks stay as a
    /// cached prefix, and it comes back as a resumed request (its tokens so far fed again,
    /// through the cache where it still holds them; sampler, text and grammar where they
    /// were), so its answer goes on exactly where it stopped, token for token. False when no
    /// running request is less urgent.
    fn preempt_for(
        &self,
        priority: i32,
        waiting: &mut VecDeque<Queued>,
        running: &mut Vec<Sequence>,
    ) -> bool {
        if !self.config.preemption {
            return false;
        }
        let victim = running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.request.priority > priority)
            .max_by_key(|(_, s)| (s.request.priority, s.place.arrival))
            .map(|(i, _)| i);
        let Some(i) = victim else {
            return false;
        };
        let mut s = running.remove(i);
        self.cache_blocks(&mut s);
        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
        s.trace.preempted(s.output.len());
        let mut request = s.request;
        // Its prompt's logprobs went out with its first token, if one did.
        if !s.output.is_empty() {
            request.prompt_logprobs = None;
        }
        request.resumed_ids = s.output;
        let place = QueuePlace {
            preemptions: s.place.preemptions + 1,
            ..s.place
        };
        let submission = Submission {
            request,
            responses: s.responses,
            trace: s.trace,
            waiting_slot: None,
        };
        enqueue(waiting, Queued { submission, place }, queue_order);
        true
    }

    /// `want` KV blocks, evicting cached prefixes nobody is using while the budget has no room.
    fn reserve(&self, want: usize) -> Option<KvReservation> {
        loop {
            if let Some(r) = self.kv.reserve_blocks(want) {
                return Some(r);
            }
            let evicted = self
                .prefix_cache
                .as_ref()
                .is_some_and(|pc| pc.borrow_mut().evict_one());
            self.count_cached_blocks();
            if !evicted {
                return None;
            }
        }
    }

    /// The text state after a resumed request's ids, as the router that sent them had it: the
    /// same updates and pieces, so what it held back (a character not yet whole, a tail that
    /// may begin a stop string) goes out here and nothing it sent goes out again.
    fn resumed_text(&self, request: &ValidRequest) -> IncrementalText {
        let mut text = IncrementalText::default();
        let ids = &request.resumed_ids;
        for i in 1..=ids.len() {
            text.update_with(
                self.tokenizer.as_ref(),
                request.skip_special_tokens,
                &ids[..i],
            );
            let stops: &[String] = if i < request.sampling.adjust.min_tokens {
                &[]
            } else {
                &request.stop
            };
            let _already_sent = text.next_piece(stops, false, request.include_stop_text);
        }
        text
    }

    /// Starts `cache` with the cached blocks of `feed` (the request's prompt and resumed ids),
    /// shared. A request that scores its prompt computes every position itself.
    fn restore_prefix(
        &self,
        request: &ValidRequest,
        feed: &[u32],
        cache: &mut SequenceCache,
    ) -> PrefixHit {
        let miss = PrefixHit {
            tokens: 0,
            blocks: 0,
        };
        match &self.prefix_cache {
            Some(pc) if request.prompt_logprobs.is_none() => {
                pc.borrow_mut().restore(feed, &request.cache_salt, cache)
            }
            _ => miss,
        }
    }

    fn count_prefix_hit(&self, request: &ValidRequest, fed: usize, hit: PrefixHit) {
        if self.prefix_cache.is_none() || request.prompt_logprobs.is_some() {
            return;
        }
        let m = &self.metrics;
        m.prefix_cache_queried_tokens
            .fetch_add(fed as u64, Ordering::Relaxed);
        m.prefix_cache_hit_tokens
            .fetch_add(hit.tokens as u64, Ordering::Relaxed);
    }

    /// Keeps the full blocks of a sequence's cache (its prompt once prefilled; prompt and
    /// answer when it finishes, for the next turn of a conversation), shared with it.
    fn cache_blocks(&self, s: &mut Sequence) {
        if let Some(pc) = &self.prefix_cache {
            let held = s.cache.len;
            let prompt = &s.request.input_ids;
            let tokens: Vec<u32> = prompt.iter().chain(&s.output).take(held).copied().collect();
            pc.borrow_mut().insert(
                &tokens,
                &s.request.cache_salt,
                &s.cache,
                &mut s.blocks,
                &self.kv,
            );
            self.count_cached_blocks();
        }
    }

    fn count_cached_blocks(&self) {
        if let Some(pc) = &self.prefix_cache {
            self.stats
                .prefix_cache_blocks
                .store(pc.borrow().blocks(), Ordering::Relaxed);
        }
    }

    /// One model step over the running sequences.
    fn step(&self, running: &mut Vec<Sequence>) {
        self.propose_drafts(running);
        let plan = self.plan(running);
        if plan.is_empty() {
            return;
        }
        // Where each feed's rows start: the MTP head's rows after the step start there too.
        let starts: Vec<usize> = plan.iter().map(|f| running[f.seq].cache.len).collect();
        let step_span = self.step_span(running, &plan);
        let _in_step = step_span.enter();
        self.experts.next_step(step_span.clone());
        self.metrics
            .step_tokens
            .observe(plan.iter().map(|f| f.tokens).sum::<usize>() as f64);
        match self.forward_with_masks(running, &plan) {
            Ok(logits) => {
                if let Some(since) = self.stalled_since.take() {
                    tracing::info!(stalled_for = ?since.elapsed(), "steps succeed again");
                }
                self.advance(running, &plan, &logits, &starts);
            }
            Err(e) => self.step_failed(running, &plan, e),
        }
    }

    /// [`Self::forward`], with the grammar masks of the constrained sequences that sample
    /// this step computed on another thread meanwhile (each depends only on its own request's
    /// tokens, so the overlap changes no result).
    fn forward_with_masks(
        &self,
        running: &mut [Sequence],
        plan: &[Feed],
    ) -> moe_model::Result<Vec<StepOutput>> {
        let vocab = self.dense.config().vocab_size;
        // What each sampling feed's pick is made after: its mask (its grammar's, computed
        // below while the step runs, and its `allowed_token_ids` and `bad_words`) and its
        // logit edits. Before the constraints are taken out.
        let restrictions: Vec<Option<TokenMask>> = plan
            .iter()
            .map(|f| {
                let s = &running[f.seq];
                picked_in_place(s, f).then(|| restriction_mask_of(s, vocab))?
            })
            .collect();
        let slots: Vec<Option<MaskSlot>> = plan
            .iter()
            .zip(&restrictions)
            .map(|(f, restriction)| {
                let s = &running[f.seq];
                let slot = mask_slot_of(s, f, restriction.is_some())?;
                if s.request.constraint.is_none() {
                    // Known now: no grammar to wait for.
                    slot.fill(restriction.clone());
                }
                Some(slot)
            })
            .collect();
        let edits: Vec<Option<LogitEdits>> = plan
            .iter()
            .map(|f| edits_of(&running[f.seq], f, vocab))
            .collect();
        let picks: Vec<Pick<'_>> = plan
            .iter()
            .zip(slots.iter().zip(&edits))
            .map(|(f, (mask, edits))| {
                let changes = RowChanges {
                    mask: mask.as_ref(),
                    edits: edits.as_ref(),
                };
                pick_of(&running[f.seq], f, changes)
            })
            .collect();
        let mut constraints: Vec<(usize, usize, TokenConstraint)> = plan
            .iter()
            .enumerate()
            .filter(|(_, f)| f.samples)
            .filter_map(|(i, f)| {
                let constraint = running[f.seq].request.constraint.take();
                constraint.map(|c| (i, f.seq, c))
            })
            .collect();
        if constraints.is_empty() {
            return self.forward(running, plan, &picks);
        }
        let count = constraints.len();
        let (logits, masks) = std::thread::scope(|scope| {
            let masks = scope.spawn(|| {
                // A slot this thread leaves empty (a grammar that panicked) is filled with
                // `None`: the step never waits for it in vain.
                let _fill = FillOnDrop(&slots);
                constraints
                    .iter_mut()
                    .map(|(feed, _, c)| {
                        let allowed = c.allowed(vocab);
                        if let Some(slot) = &slots[*feed] {
                            let mask = allowed.as_ref().ok().map(|allowed| {
                                let mut mask = TokenMask::from_allowed(allowed);
                                if let Some(restriction) = &restrictions[*feed] {
                                    mask.and_with(restriction);
                                }
                                mask
                            });
                            slot.fill(mask);
                        }
                        allowed
                    })
                    .collect::<Vec<_>>()
            });
            let logits = self.forward(running, plan, &picks);
            let masks = masks
                .join()
                .unwrap_or_else(|_| vec![Err("the grammar panicked".into()); count]);
            (logits, masks)
        });
        for ((_, seq, constraint), mask) in constraints.into_iter().zip(masks) {
            running[seq].request.constraint = Some(constraint);
            running[seq].next_mask = logits.is_ok().then_some(mask);
        }
        logits
    }

    /// Each decoding sequence's draft for this step (none without `--speculative-config`,
    /// or with more sequences running than it drafts for): at most what its answer and the
    /// model's positions have room for after the token it samples anyway.
    fn propose_drafts(&self, running: &mut [Sequence]) {
        let max_positions = self.dense.config().max_position_embeddings;
        let speculation = self
            .config
            .speculation
            .filter(|spec| spec.drafts_at(running.len()));
        for s in running.iter_mut() {
            s.draft.clear();
            let Some(spec) = speculation.filter(|_| s.prefill_done()) else {
                continue;
            };
            if !s.backoff.may_draft() {
                continue;
            }
            let answer_room = s.request.max_new_tokens.saturating_sub(s.output.len() + 1);
            let position_room = max_positions.saturating_sub(s.positions() + 1);
            let limit = answer_room.min(position_room);
            match spec.method {
                DraftMethod::Ngram(drafter) => drafter.propose(&s.history, limit, &mut s.draft),
                DraftMethod::Mtp { .. } => s.draft.extend(s.mtp_guess.iter().take(limit)),
            }
        }
    }

    /// The MTP head over what the step fed each sequence that goes on (the rows its cache
    /// kept, each with the token after it: the prompt's next, or what was sampled), filling
    /// the head's cache layer, and its guesses for each decoding sequence's next step. A head
    /// that fails leaves no guesses: drafts are optional, never a request's failure.
    fn guess_with_mtp(
        &self,
        head: &MtpHead,
        running: &mut [Sequence],
        plan: &[Feed],
        starts: &[usize],
        finished: &[usize],
    ) {
        let Some(spec) = self.config.speculation else {
            return;
        };
        let DraftMethod::Mtp { tokens } = spec.method else {
            return;
        };
        let drafting = spec.drafts_at(running.len() - finished.len());
        let max_positions = self.dense.config().max_position_embeddings;
        // Per feed that goes on: (sequence, first position, tokens after each row, drafts).
        let mut parts: Vec<(usize, usize, Vec<u32>, usize)> = Vec::new();
        for (f, &start) in plan.iter().zip(starts) {
            let s = &mut running[f.seq];
            s.mtp_guess.clear();
            if finished.contains(&f.seq) || s.cache.len <= start {
                continue;
            }
            let prompt = &s.request.input_ids;
            let next: Option<Vec<u32>> = (start + 1..=s.cache.len)
                .map(|pos| match pos.checked_sub(prompt.len()) {
                    None => prompt.get(pos).copied(),
                    Some(at) => s.output.get(at).copied(),
                })
                .collect();
            let Some(next) = next else {
                continue;
            };
            // Guesses only for a sequence that drafts next step (not waiting out a backoff):
            // past the first, each guess is one more pass of the layer.
            let drafts = if drafting && s.prefill_done() && s.backoff.drafts_next() {
                let answer_room = s.request.max_new_tokens.saturating_sub(s.output.len() + 1);
                let position_room = max_positions.saturating_sub(s.positions() + 1);
                tokens.min(answer_room).min(position_room)
            } else {
                0
            };
            parts.push((f.seq, start, next, drafts));
        }
        let mut part_of = vec![None; running.len()];
        for (k, part) in parts.iter().enumerate() {
            part_of[part.0] = Some(k);
        }
        let h = head.config().hidden_size;
        let mut which = Vec::with_capacity(parts.len());
        let mut rows: Vec<MtpRows<'_>> = Vec::with_capacity(parts.len());
        for (seq, s) in running.iter_mut().enumerate() {
            let Some(k) = part_of[seq] else {
                continue;
            };
            let (_, start, next, drafts) = &parts[k];
            let mut hidden = s
                .cache
                .kept_hidden_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            hidden.truncate(next.len() * h);
            which.push(seq);
            rows.push(MtpRows {
                cache: &mut s.cache,
                start: *start,
                hidden,
                next,
                drafts: *drafts,
            });
        }
        match head.propose(&mut rows) {
            Ok(guesses) => {
                drop(rows);
                for (seq, guess) in which.into_iter().zip(guesses) {
                    running[seq].mtp_guess = guess;
                }
            }
            Err(e) => tracing::warn!(error = %e, "the MTP head drafted nothing this step"),
        }
    }

    /// What this step feeds: one token of every decoding sequence, then their drafts, then
    /// prefill chunks while the token budget lasts.
    fn plan(&self, running: &[Sequence]) -> Vec<Feed> {
        let mut budget = self.config.max_batch_tokens.max(1);
        let mut plan = Vec::new();
        for (seq, s) in running.iter().enumerate() {
            if s.prefill_done() && budget > 0 {
                plan.push(Feed {
                    seq,
                    tokens: 1,
                    samples: true,
                    drafts: 0,
                });
                budget -= 1;
            }
        }
        for f in plan.iter_mut() {
            let drafts = running[f.seq].draft.len().min(budget);
            f.tokens += drafts;
            f.drafts = drafts;
            budget -= drafts;
        }
        for (seq, s) in running.iter().enumerate() {
            let remaining = s.feed.len() - s.prefilled;
            if remaining > 0 && budget > 0 {
                let chunk = remaining.min(budget);
                plan.push(Feed {
                    seq,
                    tokens: chunk,
                    samples: chunk == remaining && s.request.max_new_tokens > 0,
                    drafts: 0,
                });
                budget -= chunk;
            }
        }
        plan
    }

    /// Runs the model over the planned tokens, as micro-batches when `--micro-batches` cuts
    /// the step; one output per feed: its logits, or only what its sampler reads of them
    /// ([`pick_of`]: a GPU dense part then downloads an id or a short ranking, not a row).
    /// On an error every cache is as before the step.
    fn forward(
        &self,
        running: &mut [Sequence],
        plan: &[Feed],
        picks: &[Pick<'_>],
    ) -> moe_model::Result<Vec<StepOutput>> {
        let feeds: Vec<Vec<u32>> = plan
            .iter()
            .map(|f| running[f.seq].next_tokens(f.tokens))
            .collect();
        let mut chosen: Vec<Option<&mut Sequence>> = running.iter_mut().map(Some).collect();
        let mut step: Vec<StepSequence<'_>> = plan
            .iter()
            .zip(&feeds)
            .map(|(f, tokens)| {
                let s = chosen[f.seq]
                    .take()
                    .expect("each sequence appears once in a step");
                // A prompt being scored needs the logits of every position it feeds, a draft
                // those of each position it is checked at.
                let all_logits = (s.prompt_scores.is_some() && !s.prefill_done()) || f.drafts > 0;
                StepSequence {
                    cache: &mut s.cache,
                    tokens,
                    all_logits,
                }
            })
            .collect();
        let tokens: Vec<usize> = plan.iter().map(|f| f.tokens).collect();
        let cuts = crate::micro_batch::split_points(&tokens, self.config.micro_batches);
        if !cuts.is_empty() {
            self.stats
                .micro_batched_steps
                .fetch_add(1, Ordering::Relaxed);
        }
        let logits = crate::micro_batch::forward(
            self.dense.as_ref(),
            &self.experts,
            &mut step,
            picks,
            &cuts,
        );
        self.experts.end_step();
        logits
    }

    /// Moves prefills on, samples where the plan says, streams the new tokens, and lets the
    /// sequences that finished go.
    fn advance(
        &self,
        running: &mut Vec<Sequence>,
        plan: &[Feed],
        outputs: &[StepOutput],
        starts: &[usize],
    ) {
        let mut finished = Vec::new();
        // Prompts fed to the end this step whose blocks go to the prefix cache once the MTP
        // head has written its rows in them (a cached block would be copied on that write).
        let mut prompts_done = Vec::new();
        let vocab = self.dense.config().vocab_size;
        for (f, output) in plan.iter().zip(outputs) {
            let s = &mut running[f.seq];
            let rows: &[f32] = match output {
                StepOutput::Logits(rows) => rows,
                StepOutput::Argmax(_) | StepOutput::RankedTopK(_) | StepOutput::Drawn(_) => &[],
            };
            let prompt_len = s.feed.len();
            if s.prefilled < prompt_len {
                if rows.len() == f.tokens * vocab {
                    s.score_prompt(s.prefilled, rows, vocab);
                }
                s.prefilled += f.tokens;
                if s.prefilled == prompt_len {
                    if self.mtp.is_some() && s.request.max_new_tokens > 0 {
                        prompts_done.push(f.seq);
                    } else {
                        self.prompt_fed(s, true);
                    }
                }
                if s.prefilled == prompt_len && s.request.max_new_tokens == 0 {
                    self.emit_prompt_only(s);
                    finished.push(f.seq);
                    continue;
                }
            }
            if !f.samples {
                continue;
            }
            if f.drafts > 0 {
                if self.check_draft(s, f, rows, vocab) {
                    finished.push(f.seq);
                }
                continue;
            }
            // The last position's logits (the only row unless the prompt is being scored).
            let row = &rows[rows.len() - vocab.min(rows.len())..];
            let sampled = match output {
                StepOutput::Argmax(id) => consume_pick(s, |sampler| sampler.take_argmax(*id)),
                StepOutput::RankedTopK(ranked) => {
                    consume_pick(s, |sampler| sampler.sample_ranked(ranked))
                }
                StepOutput::Drawn(id) => consume_pick(s, |sampler| sampler.take_draw(*id)),
                StepOutput::Logits(_) => sample_token(s, row),
            };
            let token = match sampled {
                Ok(token) => token,
                Err(why) => {
                    self.fail_pick(s, &why);
                    finished.push(f.seq);
                    continue;
                }
            };
            s.push_output(token, self.config.speculation.is_some());
            if self.emit(s, token, row) {
                self.cache_blocks(s);
                finished.push(f.seq);
            }
        }
        if let Some(head) = &self.mtp {
            self.guess_with_mtp(head, running, plan, starts, &finished);
        }
        for seq in prompts_done {
            // One that already finished cached its prompt and answer then.
            let keep = !finished.contains(&seq);
            self.prompt_fed(&mut running[seq], keep);
        }
        remove(running, &finished);
    }

    /// A sequence's prompt is all fed: its blocks (when `cache`) go to the prefix cache, and
    /// its later choices, waiting for them, may go.
    fn prompt_fed(&self, s: &mut Sequence, cache: bool) {
        if cache {
            self.cache_blocks(s);
        }
        if let Some(sibling) = &s.request.sibling {
            sibling.announce();
        }
    }

    /// Samples a drafting feed's positions in turn, each row after the picks before it (the
    /// rows are bitwise a decode's, so each pick is the one decoding would make), while the
    /// picks agree with the draft fed; what was fed past the first disagreement leaves the
    /// cache. True when the sequence finished.
    fn check_draft(&self, s: &mut Sequence, f: &Feed, rows: &[f32], vocab: usize) -> bool {
        let m = &self.metrics;
        m.spec_drafts.fetch_add(1, Ordering::Relaxed);
        m.spec_draft_tokens
            .fetch_add(f.drafts as u64, Ordering::Relaxed);
        if rows.len() != f.tokens * vocab {
            let error = RouterError::Internal("a draft's logits did not come back".into());
            self.fail(s, error);
            return true;
        }
        let mut finished = false;
        let mut accepted = 0;
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let token = match sample_token(s, row) {
                Ok(token) => token,
                Err(why) => {
                    self.fail_pick(s, &why);
                    return true;
                }
            };
            let agrees = j < f.drafts && s.draft.get(j) == Some(&token);
            accepted += usize::from(agrees);
            s.push_output(token, true);
            if self.emit(s, token, row) {
                finished = true;
                break;
            }
            if !agrees {
                break;
            }
        }
        m.spec_accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
        m.spec_longest_draft
            .fetch_max(f.drafts as u64, Ordering::Relaxed);
        for at in m.spec_accepted_at.iter().take(accepted) {
            at.fetch_add(1, Ordering::Relaxed);
        }
        s.backoff.record(accepted);
        s.cache.truncate(s.positions());
        if finished {
            self.cache_blocks(s);
        }
        finished
    }

    /// Fails a request whose next token could not be picked (its grammar broke).
    fn fail_pick(&self, s: &mut Sequence, why: &str) {
        self.fail(
            s,
            RouterError::Internal(format!("structured output: {why}")),
        );
    }

    /// Ends a running request with `error`.
    fn fail(&self, s: &mut Sequence, error: RouterError) {
        self.metrics.finished(Outcome::Error);
        s.trace.failed(&error.to_string());
        let _ = s.responses.try_send(Err(error));
    }

    /// A step that failed left the caches as they were, so it can run again once the cluster
    /// recovers (a new epoch without the failed node): the requests just wait. Past
    /// `recovery_timeout`, or for an error that is not the cluster's, its requests fail.
    fn step_failed(&self, running: &mut Vec<Sequence>, plan: &[Feed], e: ModelError) {
        let since = self.stalled_since.get().unwrap_or_else(Instant::now);
        self.stalled_since.set(Some(since));
        let retryable = matches!(e, ModelError::ExpertBackend(_));
        if retryable && since.elapsed() < self.config.recovery_timeout {
            tracing::warn!(error = %e, "step failed; retrying it");
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
        tracing::error!(error = %e, stalled_for = ?since.elapsed(), "step failed; failing its requests");
        self.stalled_since.set(None);
        let failed: Vec<usize> = plan.iter().map(|f| f.seq).collect();
        for &i in &failed {
            let error = RouterError::DispatchFailed(e.to_string());
            self.metrics.finished(Outcome::Error);
            running[i].trace.failed(&error.to_string());
            let _ = running[i].responses.try_send(Err(error));
        }
        remove(running, &failed);
    }

    /// A `step` span for a sampled step (else a disabled one): the child of the first request
    /// in the batch, linked to the others, so each request's trace reaches the step.
    fn step_span(&self, running: &[Sequence], plan: &[Feed]) -> tracing::Span {
        if !moe_cluster::telemetry::sample_step() {
            return tracing::Span::none();
        }
        let tokens: usize = plan.iter().map(|f| f.tokens).sum();
        let decodes = plan
            .iter()
            .filter(|f| running[f.seq].prefill_done())
            .count();
        let span = tracing::info_span!(
            target: "moe_router",
            parent: running[plan[0].seq].trace.span(),
            "step",
            batch_size = plan.len() as u64,
            tokens = tokens as u64,
            decode_sequences = decodes as u64,
        );
        for f in plan.iter().skip(1).take(MAX_STEP_LINKS) {
            moe_cluster::telemetry::add_link(&span, running[f.seq].trace.span());
        }
        span
    }

    /// The answer of a request that only scores its prompt (`max_new_tokens` 0).
    fn emit_prompt_only(&self, s: &mut Sequence) {
        let prompt_tokens = s.request.input_ids.len() as u32;
        let mut response = GenerateResponse {
            finish_reason: "length".into(),
            prompt_tokens,
            usage: Some(Usage {
                prompt_tokens,
                completion_tokens: 0,
                cached_tokens: s.place.cached_tokens,
            }),
            ..Default::default()
        };
        s.attach_prompt_scores(&mut response);
        if s.responses.try_send(Ok(response)).is_err() {
            self.metrics.finished(Outcome::Cancelled);
            s.trace.failed("cancelled by the client");
            return;
        }
        s.trace.finished("length", 0);
        self.metrics
            .e2e_latency
            .observe(s.request.received.elapsed().as_secs_f64());
        self.metrics.finished(Outcome::Length);
    }

    /// Streams the new token; returns true when the sequence is finished.
    fn emit(&self, s: &mut Sequence, token: u32, logits: &[f32]) -> bool {
        let logprob = s
            .request
            .logprobs
            .then(|| ops::log_softmax_at(logits, token as usize));
        let top =
            (s.request.top_logprobs > 0).then(|| top_logprobs(logits, s.request.top_logprobs));
        // An end token's own text is left out unless the request keeps it (vLLM's rule).
        let ends = s.request.ends_at(token, &self.eos_ids);
        let shown = if ends && !s.request.include_stop_text {
            &s.output[..s.output.len().saturating_sub(1)]
        } else {
            &s.output[..]
        };
        s.text.update_with(
            self.tokenizer.as_ref(),
            s.request.skip_special_tokens,
            shown,
        );
        // A grammar waiting for its start text (a reasoning model's `</think>`) starts with
        // the next token once the answer has written it.
        let started = s
            .request
            .pending_constraint
            .as_ref()
            .is_some_and(|p| p.reached_at_end(self.tokenizer.as_ref(), &s.output));
        if started {
            s.request.constraint = s.request.pending_constraint.take().map(|p| p.constraint);
        }
        let grammar_done = s
            .request
            .constraint
            .as_ref()
            .is_some_and(|c| c.is_finished());
        let mut finish = if grammar_done || ends {
            Some("stop")
        } else if s.output.len() >= s.request.max_new_tokens
            || s.positions() >= self.dense.config().max_position_embeddings
        {
            Some("length")
        } else {
            None
        };
        // A stop string wins; it and anything after it are not returned. A last piece sends
        // the rest; otherwise what could still begin a stop string is kept back.
        // `min_tokens` holds stop strings back too (as vLLM does).
        let stop: &[String] = if s.output.len() < s.request.sampling.adjust.min_tokens {
            &[]
        } else {
            &s.request.stop
        };
        let (piece, stopped) =
            s.text
                .next_piece(stop, finish.is_some(), s.request.include_stop_text);
        if stopped {
            finish = Some("stop");
        }
        let response = GenerateResponse {
            prompt_tokens: s.request.input_ids.len() as u32,
            token_ids: vec![token],
            text: piece,
            logprobs: logprob.into_iter().collect(),
            finish_reason: finish.unwrap_or_default().to_string(),
            usage: finish.map(|_| Usage {
                prompt_tokens: s.request.input_ids.len() as u32,
                completion_tokens: s.output.len() as u32,
                cached_tokens: s.place.cached_tokens,
            }),
            top_logprobs: top.into_iter().collect(),
            ..Default::default()
        };
        let mut response = response;
        s.attach_prompt_scores(&mut response);
        let now = Instant::now();
        let m = &self.metrics;
        match s.place.last_token_at {
            None => m
                .time_to_first_token
                .observe((now - s.request.received).as_secs_f64()),
            Some(last) => m.inter_token_latency.observe((now - last).as_secs_f64()),
        }
        s.place.last_token_at = Some(now);
        m.generation_tokens.fetch_add(1, Ordering::Relaxed);
        // The channel holds a whole answer (sized at submission), so it is never full: an error
        // means the client went away, and the sequence is dropped with its cache.
        if s.responses.try_send(Ok(response)).is_err() {
            m.finished(Outcome::Cancelled);
            s.trace.failed("cancelled by the client");
            return true;
        }
        if s.output.len() == s.request.resumed_ids.len() + 1 {
            s.trace.first_token();
        }
        if let Some(reason) = finish {
            s.trace.finished(reason, s.output.len());
            m.e2e_latency
                .observe((now - s.request.received).as_secs_f64());
            m.finished(if reason == "stop" {
                Outcome::Stop
            } else {
                Outcome::Length
            });
        }
        finish.is_some()
    }
}

/// How much of its logits a feed's sampler reads: nothing when it samples nothing this step
/// (a prefill chunk; a prompt being scored keeps its logits anyway), the argmax for a greedy
/// pick, the race's draw for a draw at a temperature without top-k, the ranked top-k for a
/// top-k draw (up to [`moe_model::dense_step::MAX_RANKED_TOP_K`]), each from the row as the
/// request's grammar mask and logit adjustments change it (`changes`: a slot from
/// [`mask_slot_of`], edits from [`edits_of`]), as long as nothing else reads the row (no
/// logprobs: they are the model's own logits).
fn pick_of<'c>(s: &Sequence, f: &Feed, changes: RowChanges<'c>) -> Pick<'c> {
    if !f.samples {
        return Pick::Argmax;
    }
    // A row changed without its changes at hand (edits too many to send) is read where the
    // sampler changes it.
    let unsent_edits = changes.edits.is_none() && !s.sampler.params().adjust.is_neutral();
    let unsent_mask = changes.mask.is_none() && (s.request.constraint.is_some() || restricts(s));
    if row_read_elsewhere(s) || unsent_edits || unsent_mask || !picked_in_place(s, f) {
        return Pick::Logits;
    }
    let pick = if s.sampler.params().is_greedy() {
        EditedPick::Argmax
    } else if let Some(race) = s.sampler.next_race() {
        EditedPick::Race(race)
    } else {
        match s
            .sampler
            .ranked_draw_k(moe_model::dense_step::MAX_RANKED_TOP_K)
        {
            Some(k) => EditedPick::RankedTopK(k),
            None => return Pick::Logits,
        }
    };
    match (changes == RowChanges::default(), pick) {
        (false, pick) => Pick::Edited(changes, pick),
        (true, EditedPick::Argmax) => Pick::Argmax,
        (true, EditedPick::Race(race)) => Pick::Race(race),
        (true, EditedPick::RankedTopK(k)) => Pick::RankedTopK(k),
    }
}

/// Whether the sampler reads the row for more than its pick: logprobs.
fn row_read_elsewhere(s: &Sequence) -> bool {
    s.request.logprobs || s.request.top_logprobs > 0
}

/// Whether a feed's pick can be made where the dense part keeps its row ([`pick_of`]): it
/// samples, nothing else reads the row, and its draw is one a device makes.
fn picked_in_place(s: &Sequence, f: &Feed) -> bool {
    let sampler = &s.sampler;
    let device_draw = sampler.params().is_greedy()
        || sampler.next_race().is_some()
        || sampler
            .ranked_draw_k(moe_model::dense_step::MAX_RANKED_TOP_K)
            .is_some();
    // A draft's rows are sampled one after another, each after the picks before it.
    f.samples && f.drafts == 0 && !row_read_elsewhere(s) && device_draw
}

/// Where a feed's mask will arrive, so the dense part can mask the row it keeps
/// ([`pick_of`]): a constrained feed's grammar mask, made while the step runs, and the
/// `restricted` tokens of [`restriction_of`]. A mask is a bit a token up, the row it saves
/// four bytes a token down.
fn mask_slot_of(s: &Sequence, f: &Feed, restricted: bool) -> Option<MaskSlot> {
    (picked_in_place(s, f) && (s.request.constraint.is_some() || restricted)).then(MaskSlot::new)
}

/// The tokens a request lets its next pick be, grammar aside: its `allowed_token_ids`, less
/// the ids its `bad_words` ban after its output so far (flags over `vocab` ids); `None` when
/// that is every token.
fn restriction_of(s: &Sequence, vocab: usize) -> Option<Vec<bool>> {
    let banned = s.request.banned_next(&s.output);
    if s.request.allowed_tokens.is_none() && banned.is_empty() {
        return None;
    }
    let mut allowed = s
        .request
        .allowed_tokens
        .clone()
        .unwrap_or_else(|| vec![true; vocab]);
    allowed.resize(vocab, true);
    for id in banned {
        if let Some(flag) = allowed.get_mut(id as usize) {
            *flag = false;
        }
    }
    Some(allowed)
}

/// [`restriction_of`] as bits, from the request's mask made at admission (what the device
/// path sends; no flag per token is built).
fn restriction_mask_of(s: &Sequence, vocab: usize) -> Option<TokenMask> {
    let banned = s.request.banned_next(&s.output);
    if s.request.allowed_mask.is_none() && banned.is_empty() {
        return None;
    }
    let mut mask = match &s.request.allowed_mask {
        Some(allowed) if allowed.len() >= vocab => allowed.clone(),
        // A mask shorter than the vocabulary (never made so) leaves the rest allowed, as
        // `restriction_of` does.
        Some(allowed) => {
            let flags: Vec<bool> = (0..vocab)
                .map(|i| i >= allowed.len() || allowed.allows(i))
                .collect();
            TokenMask::from_allowed(&flags)
        }
        None => TokenMask::all(vocab),
    };
    for id in banned {
        mask.forbid(id as usize);
    }
    Some(mask)
}

/// Whether [`restriction_of`] restricts anything, without building it.
fn restricts(s: &Sequence) -> bool {
    s.request.allowed_tokens.is_some() || !s.request.banned_next(&s.output).is_empty()
}

/// The tokens both flag sets allow (`a`'s tail past `b`'s end as it is).
fn both(mut a: Vec<bool>, b: &[bool]) -> Vec<bool> {
    for (flag, &also) in a.iter_mut().zip(b) {
        *flag &= also;
    }
    a
}

/// The logit edits a feed's pick is made after ([`pick_of`]): its request's adjustments, when
/// it has some and they are few enough to send instead of the row they change, as a bound
/// found before building them says (a repetition penalty over a long prompt edits more logits
/// than a device would download: the row is then picked from where the sampler reads it,
/// which edits it itself).
fn edits_of(s: &Sequence, f: &Feed, vocab: usize) -> Option<LogitEdits> {
    if !picked_in_place(s, f) {
        return None;
    }
    s.sampler.logit_edits_at_most(vocab / MAX_EDITS_PER_VOCAB)
}

/// Edits of more than one logit in this many are not sent: each edit is 24 bytes up, the row
/// they save 4 bytes a logit down.
const MAX_EDITS_PER_VOCAB: usize = 8;

/// A token the dense part picked from the row as the request changed it, counted by the
/// sampler (`take`); the grammar, when there is one, advances over it (its mask, made for
/// this pick, is spent).
fn consume_pick(s: &mut Sequence, take: impl FnOnce(&mut Sampler) -> u32) -> Result<u32, String> {
    let token = take(&mut s.sampler);
    if let Some(constraint) = s.request.constraint.as_mut() {
        s.next_mask = None;
        constraint.consume(token)?;
    }
    Ok(token)
}

/// The sequence's next token from `logits`: within its grammar's mask, its
/// `allowed_token_ids` and its `bad_words` when it has them (the grammar then advances over
/// it).
fn sample_token(s: &mut Sequence, logits: &[f32]) -> Result<u32, String> {
    let restriction = restriction_of(s, logits.len());
    let request = &mut s.request;
    if request.constraint.is_none() && restriction.is_none() {
        return Ok(s.sampler.sample(logits));
    }
    let mut allowed = match request.constraint.as_mut() {
        Some(constraint) => match s.next_mask.take() {
            Some(mask) => mask?,
            None => constraint.allowed(logits.len())?,
        },
        None => vec![true; logits.len()],
    };
    if let Some(restriction) = &restriction {
        allowed = both(allowed, restriction);
    }
    if !allowed.iter().any(|&a| a) {
        return Err("no token is allowed here (grammar, allowed_token_ids, bad_words)".into());
    }
    let token = s.sampler.sample_allowed(logits, &allowed);
    if let Some(constraint) = request.constraint.as_mut() {
        constraint.consume(token)?;
    }
    Ok(token)
}

/// Lets the sequences at `indices` of `running` go (their KV blocks with them).
fn remove(running: &mut Vec<Sequence>, indices: &[usize]) {
    let mut index = 0;
    running.retain(|_| {
        let keep = !indices.contains(&index);
        index += 1;
        keep
    });
}

/// Ends a request past its deadline (telling the client); true when it did.
fn expired(request: &ValidRequest, responses: &ResponseSender) -> bool {
    if Instant::now() < request.deadline {
        return false;
    }
    let _ = responses.try_send(Err(RouterError::Deadline));
    true
}

/// The `k` most likely tokens and their log-probabilities, most likely first (ties by id).
fn top_logprobs(logits: &[f32], k: usize) -> TopLogprobs {
    // The same arithmetic as the chosen token's logprob, so the two agree bit for bit.
    let log_sum = ops::log_sum_exp(logits);
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < ids.len() {
        ids.select_nth_unstable_by(k, order);
        ids.truncate(k);
    }
    ids.sort_by(order);
    TopLogprobs {
        logprobs: ids
            .iter()
            .map(|&i| (logits[i as usize] as f64 - log_sum) as f32)
            .collect(),
        token_ids: ids,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lower priorities first; equal ones in arrival order, wherever they arrive.
    #[test]
    fn the_waiting_queue_is_ordered_by_priority_then_arrival() {
        let mut queue = VecDeque::new();
        for (arrival, priority) in [(0, 0), (1, 5), (2, -5), (3, 0), (4, 5), (5, -5), (6, 0)] {
            enqueue(&mut queue, (arrival, priority), |&(a, p)| (p, a));
        }
        let order: Vec<i32> = queue.iter().map(|&(arrival, _)| arrival).collect();
        assert_eq!(order, [2, 5, 0, 3, 6, 1, 4]);
        // A preempted request goes back by its own arrival: before later ones of its priority.
        enqueue(&mut queue, (-1, 0), |&(a, p)| (p, a));
        let order: Vec<i32> = queue.iter().map(|&(arrival, _)| arrival).collect();
        assert_eq!(order, [2, 5, -1, 0, 3, 6, 1, 4]);
    }
}
