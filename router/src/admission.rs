//! Admission, shared by the gRPC and HTTP APIs: validate a request, check that the cluster can
//! serve, bound the queue, and hand it to the scheduler. Returns the stream of its answers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use moe_model::ModelConfig;
use moe_proto::v1::GenerateRequest;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::cluster_view::ClusterView;
use crate::error::RouterError;
use crate::request_metrics::RequestMetrics;
use crate::request_trace::{RequestTrace, TraceOrigin};
use crate::scheduler::{SchedulerStats, Submission};
use crate::structured::{GrammarCompiler, PendingConstraint, TokenConstraint};
use crate::validation::{
    bad_word_ids, check_prompt, check_prompt_bytes, validate_ids, RequestLimits, SiblingPrefill,
};

pub use moe_openai::generator::Answers;
pub use moe_openai::tokenizing::Tokenizing;

/// The exact bound on requests admitted but not yet running (`--max-waiting`): a slot is a
/// semaphore permit, taken without waiting at admission and carried by the [`Submission`]
/// until the scheduler moves the request to the running batch or drops it.
pub struct WaitingLimit {
    slots: Arc<Semaphore>,
    max: usize,
}

impl WaitingLimit {
    pub fn new(max: usize) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, or [`RouterError::QueueFull`] when all are taken.
    pub fn try_take(&self) -> Result<OwnedSemaphorePermit, RouterError> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| RouterError::QueueFull { limit: self.max })
    }
}

/// Where a request's grammar stands at admission: started (from the first token, or a resumed
/// answer already past its start text), or waiting for its start text.
enum Gate {
    Started(TokenConstraint),
    Pending(PendingConstraint),
}

/// Longest `structured_output_after` taken (it is searched for at every token until found).
pub const MAX_STRUCTURED_OUTPUT_AFTER: usize = 64;

pub struct Admission {
    pub config: ModelConfig,
    /// The tokenizer, behind its blocking pool.
    pub tokenizing: Tokenizing,
    pub submissions: mpsc::Sender<Submission>,
    pub stats: Arc<SchedulerStats>,
    pub view: Arc<ClusterView>,
    pub waiting: WaitingLimit,
    pub limits: RequestLimits,
    /// The served model name (trace attributes).
    pub model_name: String,
    pub metrics: Arc<RequestMetrics>,
    /// Compiles structured-output grammars (`None`: the tokenizer could not be indexed).
    pub grammar: Option<Arc<GrammarCompiler>>,
}

impl Admission {
    /// Refuses a text over `--max-prompt-bytes` (counted in
    /// `moe_router_prompt_bytes_refused_total`), naming `field`; call it before tokenizing.
    pub fn check_prompt_bytes(&self, bytes: usize, field: &'static str) -> Result<(), RouterError> {
        check_prompt_bytes(bytes, self.limits.max_prompt_bytes, field).inspect_err(|_| {
            self.metrics
                .prompt_bytes_refused
                .fetch_add(1, Ordering::Relaxed);
        })
    }

    pub async fn submit(
        &self,
        request: GenerateRequest,
        origin: TraceOrigin,
    ) -> Result<Answers, RouterError> {
        self.submit_choice(request, origin, None).await
    }

    /// [`Self::submit`] for one of a request's `n` choices, which share the prompt's prefill.
    pub async fn submit_choice(
        &self,
        mut request: GenerateRequest,
        origin: TraceOrigin,
        sibling: Option<SiblingPrefill>,
    ) -> Result<Answers, RouterError> {
        // `validate`, with its tokenizer call on the blocking pool.
        if let Some(text) = &request.prompt {
            self.check_prompt_bytes(text.len(), "prompt")?;
        }
        check_prompt(&request, &self.limits)?;
        let input_ids = match request.prompt.take() {
            Some(text) => self
                .tokenizing
                .tokenize(move |t| t.encode_prompt(&text))
                .await?
                .map_err(|e| RouterError::invalid("prompt", e.to_string()))?,
            None => std::mem::take(&mut request.input_ids),
        };
        let structured = request.structured_output.take();
        let after = std::mem::take(&mut request.structured_output_after);
        let bad_words = request.bad_words.clone();
        if after.len() > MAX_STRUCTURED_OUTPUT_AFTER {
            return Err(RouterError::invalid(
                "structured_output_after",
                format!("structured_output_after: at most {MAX_STRUCTURED_OUTPUT_AFTER} bytes"),
            ));
        }
        if !after.is_empty() && structured.is_none() {
            return Err(RouterError::invalid(
                "structured_output_after",
                "structured_output_after needs a structured output",
            ));
        }
        let mut valid = validate_ids(request, input_ids, &self.config, &self.limits)?;
        valid.sibling = sibling;
        if let Some(spec) = structured {
            let compiler = Arc::clone(self.grammar.as_ref().ok_or_else(|| {
                RouterError::invalid(
                    "response_format",
                    "structured outputs are not available: this tokenizer's vocabulary could not be indexed",
                )
            })?);
            let resumed = valid.resumed_ids.clone();
            let tokenizer = self.tokenizing.tokenizer();
            // A grammar compiles in up to a second (a schema of thousands of properties): on
            // the blocking pool, under the tokenizer's bound, so the runtime keeps driving
            // every other request's stream meanwhile.
            let constraint = self
                .tokenizing
                .run(move || {
                    let constraint = compiler.compile_on_own_stack(&spec)?;
                    let mut pending = PendingConstraint { constraint, after };
                    // A resumed answer's grammar state: replayed over the ids already
                    // generated since it started (all of them, or those after `after`).
                    let start = if pending.after.is_empty() {
                        Some(0)
                    } else {
                        pending.start_in(tokenizer.as_ref(), &resumed)
                    };
                    let Some(start) = start else {
                        return Ok::<_, RouterError>(Gate::Pending(pending));
                    };
                    for &id in &resumed[start..] {
                        pending.constraint.consume(id).map_err(|e| {
                            RouterError::unnamed(format!(
                                "resume: the ids do not fit the grammar: {e}"
                            ))
                        })?;
                    }
                    Ok(Gate::Started(pending.constraint))
                })
                .await??;
            match constraint {
                Gate::Started(constraint) => valid.constraint = Some(constraint),
                Gate::Pending(pending) => valid.pending_constraint = Some(pending),
            }
        }
        if !bad_words.is_empty() {
            valid.bad_words = self
                .tokenizing
                .tokenize(move |t| {
                    bad_word_ids(&bad_words, |w| {
                        t.encode_raw(w)
                            .map_err(|e| RouterError::invalid("bad_words", e.to_string()))
                    })
                })
                .await??;
        }
        let trace = RequestTrace::start(&origin, &self.model_name, &valid);
        if !self.view.can_serve() {
            return Err(RouterError::NoPlacement);
        }
        let waiting_slot = self.waiting.try_take()?;
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        // Room for every message of the answer, so the step loop never waits on a slow reader.
        let (tx, rx) = mpsc::channel(valid.max_new_tokens + 2);
        self.submissions
            .send(Submission {
                request: valid,
                responses: tx,
                trace,
                waiting_slot: Some(waiting_slot),
            })
            .await
            .map_err(|_| RouterError::SchedulerStopped)?;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicUsize;

    use moe_cluster::placement::Placement;
    use moe_model::tokenizer::Tokenizer;

    use super::*;
    use crate::cluster_view::ServingPlacement;

    /// An Admission on the fixture's config and tokenizer, a placement with no nodes, and a
    /// scheduler channel nobody drains (returned, so that it stays open).
    fn admission(max_waiting: usize) -> (Admission, mpsc::Receiver<Submission>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny");
        let view = Arc::new(ClusterView::new("test".into()));
        view.set_serving(ServingPlacement::new(
            Placement {
                epoch: 1,
                fingerprint: String::new(),
                nodes: BTreeMap::new(),
            },
            vec![],
        ));
        let metrics = Arc::new(RequestMetrics::default());
        let (tx, rx) = mpsc::channel(1024);
        let admission = Admission {
            config: ModelConfig::from_dir(&dir).expect("fixture config"),
            tokenizing: Tokenizing::new(
                Arc::new(Tokenizer::from_dir(&dir).expect("fixture tokenizer")),
                2,
                Arc::clone(&metrics.tokenize_seconds),
            ),
            submissions: tx,
            stats: Arc::new(SchedulerStats::default()),
            view,
            waiting: WaitingLimit::new(max_waiting),
            limits: RequestLimits {
                max_prompt_bytes: 64,
                ..Default::default()
            },
            model_name: "m".into(),
            metrics,
            grammar: None,
        };
        (admission, rx)
    }

    fn request() -> GenerateRequest {
        GenerateRequest {
            input_ids: vec![0, 5, 7],
            max_new_tokens: 4,
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_submits_admit_exactly_the_waiting_limit() {
        const LIMIT: usize = 5;
        const SUBMITS: usize = 64;
        let (admission, mut scheduler) = admission(LIMIT);
        let admission = Arc::new(admission);
        let start = Arc::new(tokio::sync::Barrier::new(SUBMITS));
        let tasks: Vec<_> = (0..SUBMITS)
            .map(|_| {
                let (admission, start) = (Arc::clone(&admission), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    admission
                        .submit(request(), TraceOrigin::default())
                        .await
                        .map(|_answers| ())
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => admitted += 1,
                Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}"),
            }
        }
        assert_eq!(admitted, LIMIT);
        // The scheduler starting (or dropping) a request frees its slot, and only then.
        let first = scheduler.recv().await.expect("an admitted request");
        let full = admission.submit(request(), TraceOrigin::default()).await;
        assert_eq!(full.unwrap_err().code(), tonic::Code::ResourceExhausted);
        drop(first.waiting_slot);
        assert!(admission
            .submit(request(), TraceOrigin::default())
            .await
            .is_ok());
    }

    /// A grammar compiles off the runtime: on a runtime of one thread, a task ticking every
    /// millisecond keeps ticking while a schema of 3,000 properties (a few hundred
    /// milliseconds of compiling) is admitted. Compiled inline, it could not tick at all.
    #[tokio::test(flavor = "current_thread")]
    async fn a_grammar_compiles_while_the_runtime_drives_other_tasks() {
        let (mut admission, _scheduler) = admission(8);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny/tokenizer.json");
        let json = serde_json::from_str(&std::fs::read_to_string(dir).unwrap()).unwrap();
        admission.grammar = Some(Arc::new(
            GrammarCompiler::from_tokenizer_json(&json, 1).unwrap(),
        ));
        let properties: serde_json::Map<String, serde_json::Value> = (0..3000)
            .map(|i| {
                (
                    format!("p{i}"),
                    serde_json::json!({"type": "string", "pattern": "[a-z]{1,20}"}),
                )
            })
            .collect();
        let schema = serde_json::json!({"type": "object", "properties": properties});
        let request = GenerateRequest {
            structured_output: Some(moe_proto::v1::StructuredOutput {
                kind: Some(moe_proto::v1::structured_output::Kind::JsonSchema(
                    schema.to_string(),
                )),
            }),
            ..request()
        };
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = tokio::spawn({
            let ticks = Arc::clone(&ticks);
            async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        admission
            .submit(request, TraceOrigin::default())
            .await
            .expect("the schema compiles");
        let took = started.elapsed();
        let during = ticks.load(Ordering::Relaxed) - before;
        ticker.abort();
        assert!(during >= 10, "{during} ticks in {took:?} of admission");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_over_long_prompt_is_refused_before_the_tokenizer() {
        let (admission, _scheduler) = admission(8);
        let prompt = |bytes| GenerateRequest {
            prompt: Some("x".repeat(bytes)),
            max_new_tokens: 4,
            ..Default::default()
        };
        let err = admission
            .submit(prompt(65), TraceOrigin::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.to_string()
                .contains("prompt is 65 bytes; the limit is 64 bytes"),
            "{err:?}"
        );
        assert_eq!(admission.metrics.tokenize_seconds.count(), 0);
        assert_eq!(
            admission
                .metrics
                .prompt_bytes_refused
                .load(Ordering::Relaxed),
            1
        );
        admission
            .submit(prompt(64), TraceOrigin::default())
            .await
            .unwrap();
        assert_eq!(admission.metrics.tokenize_seconds.count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_tokenizer_pool_runs_at_most_its_permits_at_once() {
        let metrics = Arc::new(RequestMetrics::default());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/deepseek-v3-tiny");
        let pool = Arc::new(Tokenizing::new(
            Arc::new(Tokenizer::from_dir(&dir).expect("fixture tokenizer")),
            3,
            Arc::clone(&metrics.tokenize_seconds),
        ));
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..24)
            .map(|_| {
                let (pool, now, most) = (Arc::clone(&pool), Arc::clone(&now), Arc::clone(&most));
                tokio::spawn(async move {
                    pool.tokenize(move |t| {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        let ids = t.encode_prompt("hello").unwrap();
                        now.fetch_sub(1, Ordering::SeqCst);
                        ids
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert!(!t.await.unwrap().is_empty());
        }
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?}");
        assert_eq!(metrics.tokenize_seconds.count(), 24);
    }
}
