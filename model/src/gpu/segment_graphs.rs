//! The dense part's decode steps as CUDA graphs: each segment of a step (the launches between
//! two reads by the host, [`DenseOps::run_segment`](crate::device_dense::DenseOps::run_segment))
//! runs once as launched, is captured the next time its key comes, and is replayed from then
//! on: one graph launch instead of tens of kernel launches. A new generation of the key (a
//! step buffer grown, a KV pool chunk added) starts over; a segment whose capture fails runs as
//! launched from then on, with a warning, so a capture problem costs speed, never a step.
//!
//! Temporaries a segment allocates and frees are the graph's own memory (stream-ordered
//! allocations in a capture become its memory nodes); everything it reads or leaves behind
//! lies in buffers that keep their place from step to step (the model's decode buffers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cudarc::driver::CudaGraph;

use super::context::GpuContext;
use super::error::GpuError;
use crate::device_dense::ops::SegmentKey;
use crate::error::Result;

enum SegmentState {
    /// Not yet run at this generation.
    Fresh,
    /// Ran once as launched: captured the next time.
    Warm,
    Captured(HeldGraph),
    /// Its capture failed: launched as is.
    Launched,
}

/// A captured graph. cudarc's graphs are not `Send` (the driver's graph objects are not
/// synchronised internally): this one is only touched, launched or dropped with the segments'
/// lock held, one thread at a time.
struct HeldGraph(CudaGraph);

// SAFETY: see above: every use is serialised by `SegmentGraphs::segments`.
unsafe impl Send for HeldGraph {}

struct Segment {
    generation: u64,
    state: SegmentState,
}

/// Every segment seen, by batch size and place in the step.
#[derive(Default)]
pub struct SegmentGraphs {
    segments: Mutex<HashMap<(usize, usize), Segment>>,
    captured: AtomicUsize,
    replayed: AtomicUsize,
    failed: AtomicUsize,
}

impl SegmentGraphs {
    /// Graphs captured so far.
    pub fn captured(&self) -> usize {
        self.captured.load(Ordering::Relaxed)
    }

    /// Graph launches so far (the first launch of each captured graph included).
    pub fn replayed(&self) -> usize {
        self.replayed.load(Ordering::Relaxed)
    }

    /// Captures that failed (those segments are launched kernel by kernel).
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Graphs held now.
    pub fn held(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s.state, SegmentState::Captured(_)))
            .count()
    }

    /// Whether [`Self::run`] would capture one of the segments of `key`'s step (its batch
    /// size and generation, any place in the step) now.
    pub fn will_capture(&self, key: SegmentKey) -> bool {
        self.lock().iter().any(|(&(rows, _), s)| {
            rows == key.rows
                && s.generation == key.generation
                && matches!(s.state, SegmentState::Warm)
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, usize), Segment>> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the segment `key` names: as launched the first time, captured and launched the
    /// second, replayed after.
    pub fn run(
        &self,
        ctx: &GpuContext,
        key: SegmentKey,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        let mut segments = self.lock();
        let fresh = Segment {
            generation: key.generation,
            state: SegmentState::Fresh,
        };
        let segment = segments.entry((key.rows, key.segment)).or_insert(fresh);
        if segment.generation != key.generation {
            // Its graph read buffers since replaced: start over.
            *segment = Segment {
                generation: key.generation,
                state: SegmentState::Fresh,
            };
        }
        match segment.state {
            SegmentState::Fresh => {
                // Launched as is once first (lazy set-up such as cuBLAS's workspace or a
                // cached pointer table happens outside any capture), captured next time.
                segment.state = SegmentState::Warm;
                drop(segments);
                return work();
            }
            SegmentState::Launched => {
                drop(segments);
                return work();
            }
            SegmentState::Warm | SegmentState::Captured(_) => {}
        }
        if let SegmentState::Captured(HeldGraph(graph)) = &segment.state {
            let _serial = ctx.lock()?;
            graph.launch().map_err(GpuError::from)?;
            self.replayed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Warm: capture it, holding the context's lock throughout so that no other thread's
        // launch joins the capture.
        let captured = {
            let _serial = ctx.lock()?;
            ctx.capture_graph(&mut *work)
        };
        match captured {
            Ok(graph) => {
                let launched = {
                    let _serial = ctx.lock()?;
                    graph.launch().map_err(GpuError::from)
                };
                self.captured.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    rows = key.rows,
                    segment = key.segment,
                    "a decode segment captured as a CUDA graph"
                );
                segment.state = SegmentState::Captured(HeldGraph(graph));
                launched?;
                self.replayed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Nothing ran in the capture; an error the driver recorded meanwhile (a free
                // refused in it) belongs to the capture, not to what follows.
                let _ = ctx.stream().context().check_err();
                tracing::warn!(
                    rows = key.rows,
                    segment = key.segment,
                    "a decode segment could not be captured as a CUDA graph ({e}); it is \
                     launched kernel by kernel from now on"
                );
                segment.state = SegmentState::Launched;
                self.failed.fetch_add(1, Ordering::Relaxed);
                drop(segments);
                work()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::grid;
    use cudarc::driver::PushKernelArg;

    /// A segment runs as launched at its first step, is captured and launched at its second
    /// and replayed after (its work not called again); a new generation starts over, and a
    /// capture that fails (a host copy inside) leaves the segment launched as is, with the
    /// work done once either way.
    #[test]
    fn segments_run_then_capture_then_replay_and_start_over_per_generation() {
        let Some(ctx) = crate::test_support::test_context(crate::device::GpuDtype::F32) else {
            return;
        };
        let stream = ctx.stream();
        let n = 300usize;
        let (mut acc, x) = {
            let _serial = ctx.lock().unwrap();
            (
                stream.clone_htod(&vec![0f32; n]).unwrap(),
                stream.clone_htod(&vec![1f32; n]).unwrap(),
            )
        };
        let graphs = SegmentGraphs::default();
        let calls = std::cell::Cell::new(0);
        let add = |acc: &mut cudarc::driver::CudaSlice<f32>, copy_in: bool| -> Result<()> {
            calls.set(calls.get() + 1);
            let _serial = ctx.lock()?;
            if copy_in {
                // Refused in a capture, as on a GPU.
                stream
                    .memcpy_htod(&[0f32], &mut acc.slice_mut(..1))
                    .map_err(GpuError::from)?;
            }
            let n_i = n as i64;
            // SAFETY: acc and x hold n values.
            unsafe {
                stream
                    .launch_builder(&ctx.kernels().add_f32)
                    .arg(acc)
                    .arg(&x)
                    .arg(&n_i)
                    .launch(grid(n))
                    .map_err(GpuError::from)?;
            }
            Ok(())
        };
        let key = |generation| SegmentKey {
            rows: 4,
            segment: 0,
            generation,
        };
        let mut sum = 0.0;
        let mut expect = |acc: &cudarc::driver::CudaSlice<f32>, what: &str| {
            sum += 1.0;
            let _serial = ctx.lock().unwrap();
            assert_eq!(stream.clone_dtoh(acc).unwrap(), vec![sum; n], "{what}");
        };
        for (step, generation, captured, replayed, calls_after) in [
            (0, 1, 0, 0, 1),
            (1, 1, 1, 1, 2),
            (2, 1, 1, 2, 2),
            (3, 2, 1, 2, 3),
            (4, 2, 2, 3, 4),
            (5, 2, 2, 4, 4),
        ] {
            graphs
                .run(&ctx, key(generation), &mut || add(&mut acc, false))
                .unwrap();
            expect(&acc, &format!("step {step}"));
            assert_eq!(graphs.captured(), captured, "step {step}: captured");
            assert_eq!(graphs.replayed(), replayed, "step {step}: replayed");
            assert_eq!(calls.get(), calls_after, "step {step}: work called");
        }
        // Another segment whose capture fails: launched every time, counted once.
        let other = SegmentKey {
            segment: 1,
            ..key(2)
        };
        let mut ones = {
            let _serial = ctx.lock().unwrap();
            stream.clone_htod(&vec![0f32; n]).unwrap()
        };
        for step in 0..3 {
            graphs
                .run(&ctx, other, &mut || add(&mut ones, true))
                .unwrap();
            let _serial = ctx.lock().unwrap();
            let got = stream.clone_dtoh(&ones).unwrap();
            assert_eq!(got[1..], vec![(step + 1) as f32; n - 1], "step {step}");
        }
        assert_eq!(graphs.failed(), 1);
        assert_eq!(graphs.held(), 1);
    }
}
