//! What the request path records for `/metrics`: how requests ended, their latencies and token
//! counts, the tokenizer's time. Atomics only, so the scheduler thread and the API handlers
//! record without a lock; [`crate::metrics`] renders them with the rest of the page, and the
//! scheduler, which records them, never depends on the page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use moe_cluster::metrics::{Histogram, LATENCY_BUCKETS, SIZE_BUCKETS};

/// Why a request ended, as the `finish_reason` label.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Stop,
    Length,
    Error,
    Cancelled,
    Deadline,
}

/// Every outcome with its `finish_reason` label, in the order `/metrics` lists them.
pub const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Stop, "stop"),
    (Outcome::Length, "length"),
    (Outcome::Error, "error"),
    (Outcome::Cancelled, "cancelled"),
    (Outcome::Deadline, "deadline"),
];

#[derive(Debug)]
pub struct RequestMetrics {
    /// Requests ended, indexed by [`Outcome`].
    finished: [AtomicU64; 5],
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub step_tokens: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Tokenizer calls on the request path (chat template included), on the blocking pool:
    /// count = calls, sum = time.
    /// Shared with the tokenizer pool, which records into it.
    pub tokenize_seconds: Arc<Histogram>,
    /// Prompts refused by `--max-prompt-bytes` (before any tokenizer call).
    pub prompt_bytes_refused: AtomicU64,
    /// Prompt tokens of requests that looked up the prefix cache, and those it held.
    pub prefix_cache_queried_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Speculative decoding (`--speculative-config`): decode feeds that carried a draft, the
    /// draft tokens fed, and those the sampler then picked (accepted).
    pub spec_drafts: AtomicU64,
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    /// Accepted draft tokens by their place in the draft (index 0: a draft's first token), as
    /// vLLM's `spec_decode_num_accepted_tokens_per_pos`: how far drafts hold, to choose
    /// `num_speculative_tokens` by; and the longest draft fed, which bounds the places shown.
    pub spec_accepted_at: [AtomicU64; crate::speculative::MAX_SPECULATIVE_TOKENS],
    pub spec_longest_draft: AtomicU64,
    /// Running requests put back in the queue for a more urgent one
    /// (`--scheduling-policy priority`).
    pub preemptions: AtomicU64,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        Self {
            finished: Default::default(),
            time_to_first_token: Histogram::new(LATENCY_BUCKETS),
            inter_token_latency: Histogram::new(LATENCY_BUCKETS),
            e2e_latency: Histogram::new(LATENCY_BUCKETS),
            step_tokens: Histogram::new(SIZE_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            tokenize_seconds: Arc::new(Histogram::new(LATENCY_BUCKETS)),
            prompt_bytes_refused: AtomicU64::new(0),
            prefix_cache_queried_tokens: AtomicU64::new(0),
            prefix_cache_hit_tokens: AtomicU64::new(0),
            spec_drafts: AtomicU64::new(0),
            spec_draft_tokens: AtomicU64::new(0),
            spec_accepted_tokens: AtomicU64::new(0),
            spec_accepted_at: std::array::from_fn(|_| AtomicU64::new(0)),
            spec_longest_draft: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
        }
    }
}

impl RequestMetrics {
    pub fn finished(&self, outcome: Outcome) {
        self.finished[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that ended with `outcome` so far.
    pub fn finished_count(&self, outcome: Outcome) -> u64 {
        self.finished[outcome as usize].load(Ordering::Relaxed)
    }
}
