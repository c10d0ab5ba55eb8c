//! A checking load generator: workers send greedy requests whose answers are known (from the
//! offline engine) to one or more routers, and count every request that failed or came back
//! with other tokens or other logprobs (compared bit for bit: a stream that crossed a node's
//! death must be exactly the uninterrupted one). The elastic-cluster tests and `moe chaos`
//! drive the cluster with it while they kill, add and drain nodes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_model::{Engine, GenerateRequest, ModelError, SamplingParams};
use moe_proto::v1::inference_client::InferenceClient;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::request::greedy;

/// A request and the tokens it must produce, with the log-probability of each (the offline
/// engine's `GenerateOutput::logprobs`), which the answer must match bit for bit.
#[derive(Debug, Clone)]
pub struct ExpectedAnswer {
    /// The prompt, sent as a [`greedy`] request.
    pub input_ids: Vec<u32>,
    /// Tokens the request generates (past end-of-sequence).
    pub max_new_tokens: u32,
    /// The tokens it must stream.
    pub output_ids: Vec<u32>,
    /// The logprob of each, as the offline engine computed it.
    pub logprobs: Vec<f32>,
}

impl ExpectedAnswer {
    /// The offline engine's greedy answer to `input_ids`: what a cluster on the same checkpoint
    /// must stream, bit for bit.
    pub fn from_engine(
        engine: &Engine,
        input_ids: Vec<u32>,
        max_new_tokens: u32,
    ) -> Result<Self, ModelError> {
        let out = engine.generate(&GenerateRequest {
            input_ids: input_ids.clone(),
            max_new_tokens: max_new_tokens as usize,
            sampling: SamplingParams::default(),
            ignore_eos: true,
            emit_logits: false,
        })?;
        Ok(Self {
            input_ids,
            max_new_tokens,
            output_ids: out.output_ids,
            logprobs: out.logprobs,
        })
    }

    /// Why `ids` and `logprobs` are not this answer (`None`: they are, bit for bit).
    pub fn mismatch(&self, ids: &[u32], logprobs: &[f32]) -> Option<String> {
        if ids != self.output_ids {
            return Some(format!(
                "mismatch for {:?}: got {ids:?}, expected {:?}",
                self.input_ids, self.output_ids
            ));
        }
        if logprobs.len() != self.logprobs.len() {
            return Some(format!(
                "logprobs for {:?}: got {} values, expected {}",
                self.input_ids,
                logprobs.len(),
                self.logprobs.len()
            ));
        }
        let step = logprobs
            .iter()
            .zip(&self.logprobs)
            .position(|(got, want)| got.to_bits() != want.to_bits())?;
        let (got, want) = (logprobs[step], self.logprobs[step]);
        Some(format!(
            "logprob differs for {:?} at step {step} (token {}): got {got:e} ({:#010x}), expected {want:e} ({:#010x})",
            self.input_ids,
            ids[step],
            got.to_bits(),
            want.to_bits()
        ))
    }
}

/// Counters, readable while the load runs.
#[derive(Debug, Default)]
pub struct LoadProgress {
    /// Requests sent.
    pub sent: AtomicU64,
    /// Requests answered exactly as expected.
    pub completed: AtomicU64,
    /// Requests that ended in an error.
    pub failed: AtomicU64,
    /// Requests answered with other tokens or other logprobs.
    pub mismatched: AtomicU64,
    /// Tokens streamed back, by all requests.
    pub tokens: AtomicU64,
    /// When each token arrived, in order (to find stalls).
    pub token_times: Mutex<Vec<Instant>>,
    /// The first few failures and mismatches, for the report.
    pub problems: Mutex<Vec<String>>,
}

/// What a load run did: [`LoadProgress`]'s counters, read once.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LoadReport {
    pub sent: u64,
    pub completed: u64,
    pub failed: u64,
    pub mismatched: u64,
    pub tokens: u64,
    pub problems: Vec<String>,
}

impl LoadProgress {
    pub fn report(&self) -> LoadReport {
        LoadReport {
            sent: self.sent.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            mismatched: self.mismatched.load(Ordering::Relaxed),
            tokens: self.tokens.load(Ordering::Relaxed),
            problems: self.problems.lock().map(|p| p.clone()).unwrap_or_default(),
        }
    }

    /// The longest wait for a token (across all streams) that began in `[from, to]`.
    pub fn longest_stall(&self, from: Instant, to: Instant) -> Option<Duration> {
        let times = self.token_times.lock().ok()?;
        let mut longest = None;
        for pair in times.windows(2) {
            if pair[0] >= from && pair[0] <= to {
                let gap = pair[1].duration_since(pair[0]);
                if longest.is_none_or(|l| gap > l) {
                    longest = Some(gap);
                }
            }
        }
        longest
    }

    /// The first token that arrived after `at`.
    pub fn first_token_after(&self, at: Instant) -> Option<Instant> {
        let times = self.token_times.lock().ok()?;
        times.iter().copied().find(|t| *t > at)
    }

    fn problem(&self, what: String) {
        if let Ok(mut p) = self.problems.lock() {
            if p.len() < 10 {
                p.push(what);
            }
        }
    }
}

/// Running workers; [`GreedyLoad::stop`] lets each finish its current request.
pub struct GreedyLoad {
    /// Set to make every worker stop after its current request.
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// The counters the workers update, readable while they run.
    pub progress: Arc<LoadProgress>,
}

impl GreedyLoad {
    /// Starts `workers` workers; worker `w` sends to `routers[w % len]`, cycling through
    /// `answers` from a different offset each. `rounds` bounds the requests per worker.
    pub fn start(
        routers: Vec<String>,
        answers: Arc<Vec<ExpectedAnswer>>,
        workers: usize,
        rounds: Option<usize>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(LoadProgress::default());
        let workers = (0..workers)
            .map(|w| {
                let router = routers[w % routers.len().max(1)].clone();
                tokio::spawn(worker(
                    router,
                    Arc::clone(&answers),
                    w,
                    rounds,
                    Arc::clone(&stop),
                    Arc::clone(&progress),
                ))
            })
            .collect();
        Self {
            stop,
            workers,
            progress,
        }
    }

    /// Waits until every worker finished its rounds (or was stopped).
    pub async fn finish(self) -> LoadReport {
        for w in self.workers {
            let _ = w.await;
        }
        self.progress.report()
    }

    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.finish().await
    }
}

async fn worker(
    router: String,
    answers: Arc<Vec<ExpectedAnswer>>,
    index: usize,
    rounds: Option<usize>,
    stop: Arc<AtomicBool>,
    progress: Arc<LoadProgress>,
) {
    let mut i = index;
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) && rounds.is_none_or(|r| done < r) && !answers.is_empty() {
        let answer = &answers[i % answers.len()];
        i += 1;
        done += 1;
        progress.sent.fetch_add(1, Ordering::Relaxed);
        match one_request(&router, answer, &progress).await {
            Ok((ids, logprobs)) => match answer.mismatch(&ids, &logprobs) {
                None => {
                    progress.completed.fetch_add(1, Ordering::Relaxed);
                }
                Some(what) => {
                    progress.mismatched.fetch_add(1, Ordering::Relaxed);
                    progress.problem(what);
                }
            },
            Err(e) => {
                progress.failed.fetch_add(1, Ordering::Relaxed);
                progress.problem(format!("request to {router} failed: {e}"));
            }
        }
    }
}

async fn one_request(
    router: &str,
    answer: &ExpectedAnswer,
    progress: &LoadProgress,
) -> Result<(Vec<u32>, Vec<f32>), String> {
    let mut client = InferenceClient::connect(format!("http://{router}"))
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = client
        .generate(greedy(&answer.input_ids, answer.max_new_tokens))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
    while let Some(msg) = stream.message().await.map_err(|s| s.to_string())? {
        let now = Instant::now();
        progress
            .tokens
            .fetch_add(msg.token_ids.len() as u64, Ordering::Relaxed);
        if let Ok(mut t) = progress.token_times.lock() {
            t.extend(std::iter::repeat_n(now, msg.token_ids.len()));
        }
        ids.extend(msg.token_ids);
        logprobs.extend(msg.logprobs);
    }
    Ok((ids, logprobs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> ExpectedAnswer {
        ExpectedAnswer {
            input_ids: vec![1, 2],
            max_new_tokens: 3,
            output_ids: vec![7, 8, 9],
            logprobs: vec![-0.5, 0.0, -1.25],
        }
    }

    #[test]
    fn an_answer_matches_only_bit_for_bit() {
        let a = answer();
        assert_eq!(a.mismatch(&[7, 8, 9], &[-0.5, 0.0, -1.25]), None);
        let ids = a.mismatch(&[7, 8, 10], &[-0.5, 0.0, -1.25]).unwrap();
        assert!(ids.starts_with("mismatch for [1, 2]"), "{ids}");
        // One ulp off at step 2: same tokens, different bits.
        let off = f32::from_bits((-1.25f32).to_bits() + 1);
        let lp = a.mismatch(&[7, 8, 9], &[-0.5, 0.0, off]).unwrap();
        assert!(lp.contains("at step 2 (token 9)"), "{lp}");
        assert!(
            lp.contains("0xbfa00001") && lp.contains("0xbfa00000"),
            "{lp}"
        );
        // -0.0 == 0.0 as floats, but not as bits.
        let zero = a.mismatch(&[7, 8, 9], &[-0.5, -0.0, -1.25]).unwrap();
        assert!(zero.contains("at step 1"), "{zero}");
        // A router that did not stream logprobs does not pass.
        assert!(a
            .mismatch(&[7, 8, 9], &[])
            .unwrap()
            .contains("got 0 values"));
    }
}
