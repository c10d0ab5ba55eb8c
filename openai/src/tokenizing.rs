//! The tokenizer (and the chat template, and the JSON parsing of large bodies) on tokio's
//! blocking pool, bounded: shared by the router's admission and the gateway's OpenAI API.

use std::sync::Arc;
use std::time::Instant;

use moe_cluster::metrics::Histogram;
use moe_model::tokenizer::Tokenizer;
use tokio::sync::Semaphore;

use crate::error::RouterError;

/// Bodies at most this large are parsed on the runtime thread; larger ones on the blocking pool.
const INLINE_PARSE_BYTES: usize = 64 << 10;

/// Runs the tokenizer (and the chat template, and the JSON parsing of large bodies) on tokio's
/// blocking pool, at most `permits` at once, so that the runtime threads, which also drive
/// the data-plane links, never tokenize and a burst cannot start hundreds of threads. A
/// request waiting for a permit waits asynchronously.
pub struct Tokenizing {
    tokenizer: Arc<Tokenizer>,
    permits: Arc<Semaphore>,
    /// Each tokenizer call's time (the router's `moe_router_tokenize_seconds`).
    seconds: Arc<Histogram>,
}

impl Tokenizing {
    pub fn new(tokenizer: Arc<Tokenizer>, permits: usize, seconds: Arc<Histogram>) -> Self {
        Self {
            tokenizer,
            permits: Arc::new(Semaphore::new(permits.max(1))),
            seconds,
        }
    }

    /// The tokenizer, for work [`Self::run`] does that calls it among other things.
    pub fn tokenizer(&self) -> Arc<Tokenizer> {
        Arc::clone(&self.tokenizer)
    }

    /// How many run at once by default: the CPUs, at least 2.
    pub fn default_permits() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    }

    /// Runs `f`, which calls the tokenizer once, on the blocking pool; its time goes into
    /// `moe_router_tokenize_seconds` (whose count is thus the tokenizer calls).
    pub async fn tokenize<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tokenizer) -> T + Send + 'static,
    ) -> Result<T, RouterError> {
        let tokenizer = Arc::clone(&self.tokenizer);
        let seconds = Arc::clone(&self.seconds);
        self.run(move || {
            let start = Instant::now();
            let out = f(&tokenizer);
            seconds.observe(start.elapsed().as_secs_f64());
            out
        })
        .await
    }

    /// Runs `f` on the blocking pool, under the same bound.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, RouterError> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| RouterError::TokenizerClosed)?;
        // The permit is held by the task, so a request that goes away while its text is being
        // tokenized does not let another start before that work ends.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|e| RouterError::Internal(format!("tokenizing failed: {e}")))
    }

    /// Parses a request body with `f`: on the runtime thread when it is small, else on the
    /// blocking pool (a 4 MiB body is milliseconds of JSON).
    pub async fn parse<T: Send + 'static>(
        &self,
        body_bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, RouterError> {
        if body_bytes <= INLINE_PARSE_BYTES {
            Ok(f())
        } else {
            self.run(f).await
        }
    }
}
