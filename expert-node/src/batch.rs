//! The one place a node computes a batch, whichever transport brought it: a gRPC dispatch
//! ([`crate::data_plane`]) or a collective layer ([`crate::collective_member`]) both hand a
//! checked batch to [`NodeBatch`], which runs the experts of its epoch on the math threads and
//! counts it.

use std::sync::atomic::Ordering;

use moe_model::experts::{ExpertBackend, ExpertSet};
use moe_model::routes::ExpertRoutes;

use crate::metrics::NodeMetrics;

/// The experts of one epoch, as the transports see them.
pub struct NodeBatch<'a> {
    pub experts: &'a ExpertSet,
    pub metrics: &'a NodeMetrics,
    /// Whether the rows came over a collective (counted apart from gRPC batches).
    pub collective: bool,
}

impl NodeBatch<'_> {
    fn count(&self, routes: &ExpertRoutes, started: std::time::Instant) {
        let m = self.metrics;
        m.batches.fetch_add(1, Ordering::Relaxed);
        if self.collective {
            m.collective_batches.fetch_add(1, Ordering::Relaxed);
        }
        m.rows.fetch_add(routes.rows() as u64, Ordering::Relaxed);
        m.pairs.fetch_add(routes.pairs() as u64, Ordering::Relaxed);
        m.compute.observe(started.elapsed().as_secs_f64());
    }
}

impl ExpertBackend for NodeBatch<'_> {
    fn holds(&self, layer: usize, expert: usize) -> bool {
        self.experts.holds(layer, expert)
    }

    fn reads_rows_as_bf16(&self) -> bool {
        self.experts.reads_rows_as_bf16()
    }

    fn run_bf16_host_rows(
        &self,
        layer: usize,
        bytes: &[u8],
        routes: &ExpertRoutes,
    ) -> Option<moe_model::Result<Vec<f32>>> {
        let started = std::time::Instant::now();
        let outputs = self.experts.run_bf16_host_rows(layer, bytes, routes)?;
        if outputs.is_ok() {
            self.count(routes, started);
        }
        Some(outputs)
    }

    fn run_experts(
        &self,
        layer: usize,
        rows: &[f32],
        routes: &ExpertRoutes,
    ) -> moe_model::Result<Vec<f32>> {
        let started = std::time::Instant::now();
        let outputs =
            moe_model::backend::in_math_pool(|| self.experts.run_experts(layer, rows, routes));
        if outputs.is_ok() {
            self.count(routes, started);
        }
        outputs
    }

    #[cfg(feature = "cuda")]
    fn run_experts_on_device(
        &self,
        layer: usize,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        routes: &ExpertRoutes,
    ) -> Option<moe_model::Result<moe_model::cudarc::driver::CudaSlice<f32>>> {
        let started = std::time::Instant::now();
        let outputs = self.experts.run_experts_on_device(layer, rows, routes)?;
        if outputs.is_ok() {
            self.count(routes, started);
        }
        Some(outputs)
    }

    #[cfg(feature = "cuda")]
    fn run_bf16_rows_on_device(
        &self,
        layer: usize,
        rows: &moe_model::cudarc::driver::CudaSlice<f32>,
        values: usize,
        routes: &ExpertRoutes,
    ) -> Option<moe_model::Result<moe_model::cudarc::driver::CudaSlice<f32>>> {
        let started = std::time::Instant::now();
        let outputs = self
            .experts
            .run_bf16_rows_on_device(layer, rows, values, routes)?;
        if outputs.is_ok() {
            self.count(routes, started);
        }
        Some(outputs)
    }
}
