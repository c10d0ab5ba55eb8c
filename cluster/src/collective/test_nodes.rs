//! What the collective's tests share: the fixture, test rows, and nodes serving one layer
//! each on their own thread.

use std::thread::JoinHandle;
use std::time::Duration;

use moe_model::checkpoint::Checkpoint;
use moe_model::experts::{ExpertBackend, ExpertSet};
use moe_model::routes::ExpertRoutes;
use moe_model::ModelConfig;

use super::communicator::Communicator;
use super::exchange::{serve_layer, ExchangeError, Served};
use crate::dispatch_rules::DispatchRules;

/// A bundled fixture (`MOE_FIXTURES_DIR` where the GPU check runs from unpacked binaries).
pub fn fixture(name: &str) -> (Checkpoint, ModelConfig) {
    let dir = std::env::var_os("MOE_FIXTURES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
        })
        .join(name);
    (
        Checkpoint::open(&dir).expect("fixture"),
        ModelConfig::from_dir(&dir).expect("config"),
    )
}

/// `[n, hidden]` values in [-1, 1), varied by `seed`.
pub fn rows(n: usize, hidden: usize, seed: u32) -> Vec<f32> {
    (0..n * hidden)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Each rank of `comms` serves one layer with the matching expert set, on a thread of its own.
pub fn serve_one_layer_each<C: Communicator + 'static>(
    comms: Vec<C>,
    sets: impl IntoIterator<Item = ExpertSet>,
    rules: &DispatchRules,
    timeout: Duration,
) -> Vec<JoinHandle<Result<Served, ExchangeError>>> {
    comms
        .into_iter()
        .zip(sets)
        .map(|(mut comm, set)| {
            let rules = rules.clone();
            std::thread::spawn(move || {
                serve_layer(
                    &mut comm,
                    &set,
                    &rules,
                    || true,
                    |_| tracing::Span::none(),
                    timeout,
                )
            })
        })
        .collect()
}

/// Experts as GPU experts in `--gpu-dtype bf16` compute on the host: every input row rounded
/// to bf16 (to nearest even) before the experts run, and saying so.
pub struct Bf16Experts(pub ExpertSet);

impl ExpertBackend for Bf16Experts {
    fn run_experts(
        &self,
        layer: usize,
        rows: &[f32],
        routes: &ExpertRoutes,
    ) -> moe_model::Result<Vec<f32>> {
        let rounded: Vec<f32> = rows
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        self.0.run_experts(layer, &rounded, routes)
    }

    fn holds(&self, layer: usize, expert: usize) -> bool {
        self.0.holds(layer, expert)
    }

    fn reads_rows_as_bf16(&self) -> bool {
        true
    }
}

/// [`Bf16Experts`] that also take bf16 rows as the bytes that came (as a GPU set uploads
/// them), counting the layers taken so.
pub struct Bf16ByteExperts {
    pub experts: Bf16Experts,
    pub taken: std::sync::atomic::AtomicUsize,
}

impl ExpertBackend for Bf16ByteExperts {
    fn run_experts(
        &self,
        layer: usize,
        rows: &[f32],
        routes: &ExpertRoutes,
    ) -> moe_model::Result<Vec<f32>> {
        self.experts.run_experts(layer, rows, routes)
    }

    fn holds(&self, layer: usize, expert: usize) -> bool {
        self.experts.holds(layer, expert)
    }

    fn reads_rows_as_bf16(&self) -> bool {
        true
    }

    fn run_bf16_host_rows(
        &self,
        layer: usize,
        bytes: &[u8],
        routes: &ExpertRoutes,
    ) -> Option<moe_model::Result<Vec<f32>>> {
        self.taken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rows: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        Some(self.experts.0.run_experts(layer, &rows, routes))
    }
}
