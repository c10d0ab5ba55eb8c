//! Decode steps as replayed segments (CUDA graphs, `--cuda-graphs`): a step of single-token
//! sequences is padded to a batch-size bucket and cut where the host must read something (each
//! MoE layer's routes), and each piece runs through [`DenseOps::run_segment`], which a GPU
//! captures once per bucket and replays after. What a segment reads or leaves for the next
//! lies in [`DecodeBuffers`], one set per bucket at the same device addresses at every step:
//! the step's inputs are written there before the first segment, the routed experts' outputs
//! between segments.
//!
//! Padding rows (token 0 at position 0 of a sink sequence whose one block is the pool's sink,
//! [`super::super::pool::DeviceKvPool::sink_block`]) are computed like the others and thrown
//! away: every step of a segment is row by row, so they change no other row's result; they
//! have no routed pairs, so no expert sees them. A segment's recording depends on the chunks
//! of the KV pool (the kernels' tables of chunks) and on the buffers' places, both in the
//! [`SegmentKey`]'s generation.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{ChoiceBuffers, DeviceDenseModel, DeviceFfn, DeviceMoe};
use crate::dense_step::StepSequence;
use crate::device::shapes::HeadView;
use crate::device_dense::ops::{CacheBlocks, DenseOps, DeviceStep, SegmentKey};
use crate::device_dense::pool::CHUNK_BLOCKS;
use crate::error::{ModelError, Result};
use crate::expert_backend::ExpertBackend;
use crate::routes::ExpertRoutes;

/// Batch sizes decode steps are padded to (as vLLM captures its graphs): 1, 2, 4, then every
/// multiple of 8 up to [`MAX_REPLAYED_ROWS`]. Larger steps launch their kernels one by one
/// (their launches are a small part of their time).
pub const MAX_REPLAYED_ROWS: usize = 512;

/// The bucket a decode step of `rows` sequences is padded to, if any.
pub fn decode_bucket(rows: usize) -> Option<usize> {
    match rows {
        0 => None,
        1 | 2 | 4 => Some(rows),
        3 => Some(4),
        r if r <= MAX_REPLAYED_ROWS => Some(r.div_ceil(8) * 8),
        _ => None,
    }
}

/// The buffers of replayed decode steps, sized for the largest bucket seen so far: a step of
/// a smaller bucket uses their first rows (one set for every bucket, as vLLM's graphs share
/// theirs, so the device memory is that of the largest bucket only).
pub(super) struct DecodeBuffers<O: DenseOps> {
    /// Changes whenever a buffer here is replaced (more rows, a longer block table) or the
    /// KV pool's chunks change (another pool, a chunk added).
    generation: u64,
    /// The pool and chunk count the segments last ran with.
    pool: (u64, usize),
    /// Rows the buffers hold.
    capacity: usize,
    /// The step's row layout and block tables (`rows` = the step's bucket).
    step: DeviceStep<O>,
    table_capacity: usize,
    ids: O::Index,
    hidden: O::F32,
    /// A layer's feed-forward input (the routed experts read it).
    normed: O::F32,
    /// The gate's choices, `[rows, top_k]`.
    chosen: O::Index,
    chosen_weights: O::F32,
    /// The routed experts' outputs, `[pairs, hidden]`, and each row's first pair.
    pair_out: O::F32,
    offsets: O::Index,
    /// Row r's first pair at `r * top_k` for every row the buffers hold: the pairs of a layer
    /// whose experts follow the gate's choices on the device (padding rows included).
    every_row_offsets: O::Index,
    /// Which MoE layers' experts followed the choices on the device when the segments were
    /// last cut (another answer cuts them elsewhere: a new generation).
    following: Vec<bool>,
    /// The shared experts' outputs.
    shared: O::F32,
    /// `[rows, vocab]`.
    logits: O::F32,
}

/// The decode buffers, made at the first replayed step (a step that finds them in use by
/// another, a concurrent micro-batch, launches its kernels one by one), and the gate steps
/// pass while the device replays segments ([`DeviceDenseModel::hold_step`]).
pub(super) struct DecodeState<O: DenseOps> {
    buffers: Mutex<Option<DecodeBuffers<O>>>,
    generations: std::sync::atomic::AtomicU64,
    gate: RwLock<()>,
}

impl<O: DenseOps> Default for DecodeState<O> {
    fn default() -> Self {
        Self {
            buffers: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            gate: RwLock::new(()),
        }
    }
}

/// A step's hold ([`DeviceDenseModel::hold_step`]), released when the step ends.
pub(super) struct StepHold<'a, O: DenseOps> {
    buffers: Option<MutexGuard<'a, Option<DecodeBuffers<O>>>>,
    _gate: StepGate<'a>,
}

/// A step's place at the gate.
enum StepGate<'a> {
    /// The device does not replay segments: no gate.
    Open,
    Shared {
        _held: RwLockReadGuard<'a, ()>,
    },
    /// A step that captures graphs.
    Alone {
        _held: RwLockWriteGuard<'a, ()>,
    },
}

impl<O: DenseOps> DecodeState<O> {
    fn next_generation(&self) -> u64 {
        self.generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

impl<O> DeviceDenseModel<O>
where
    O: DenseOps,
    O::F32: Send + 'static,
    ModelError: From<O::Error>,
{
    /// What a step holds while it runs, taken before it starts: the decode buffers when it
    /// can replay (a decode step of a bucket's size whose buffers are free), and its place
    /// at the model's step gate where the device replays segments. A step that will capture
    /// graphs holds the gate alone: while a stream captures, no other step may queue anything
    /// on it, not even the free of a buffer it drops (that would join the capture, or break
    /// it). Others share it. The buffers are taken first and only ever tried, so a step
    /// waiting for the gate alone holds nothing another waits for.
    pub(super) fn hold_step(&self, seqs: &[StepSequence<'_>]) -> StepHold<'_, O> {
        if !self.ops.replays_segments() {
            return StepHold {
                buffers: None,
                _gate: StepGate::Open,
            };
        }
        let bucket = match seqs.iter().all(|s| s.tokens.len() == 1) {
            true => decode_bucket(seqs.len()),
            false => None,
        };
        let buffers = bucket.and_then(|_| self.decode.buffers.try_lock().ok());
        let captures = match (bucket, buffers.as_ref().and_then(|b| b.as_ref())) {
            (Some(rows), Some(held)) if held.capacity >= rows => {
                self.ops.will_capture(SegmentKey {
                    rows,
                    segment: 0,
                    generation: held.generation,
                })
            }
            _ => false,
        };
        let gate = &self.decode.gate;
        let _gate = match captures {
            true => StepGate::Alone {
                _held: gate.write().unwrap_or_else(|p| p.into_inner()),
            },
            false => StepGate::Shared {
                _held: gate.read().unwrap_or_else(|p| p.into_inner()),
            },
        };
        StepHold { buffers, _gate }
    }

    /// The step as replayed segments, when it holds the decode buffers: the logits of its
    /// rows (`[seqs, vocab]`); `None` to run it as launched.
    pub(super) fn replayed_decode(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
        hold: &mut StepHold<'_, O>,
    ) -> Result<Option<O::F32>> {
        let Some(held) = hold.buffers.as_mut() else {
            return Ok(None);
        };
        let Some(bucket) = decode_bucket(seqs.len()) else {
            return Ok(None);
        };
        if held.as_ref().is_none_or(|b| b.capacity < bucket) {
            // Dropped first: the device memory of the smaller set is not held twice.
            **held = None;
            **held = Some(self.decode_buffers(bucket)?);
        }
        let Some(buffers) = held.as_mut() else {
            return Ok(None);
        };
        buffers.step.rows = bucket;
        self.decode_segments(seqs, experts, buffers).map(Some)
    }

    fn decode_buffers(&self, rows: usize) -> Result<DecodeBuffers<O>> {
        let ops = &self.ops;
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let top_k = self.config.moe.top_k.max(1);
        let half = self.rope.table(&[0]).half;
        let index = |n: usize| ops.upload_index(&vec![0; n.max(1)]);
        let table_capacity = rows * 4;
        Ok(DecodeBuffers {
            generation: self.decode.next_generation(),
            pool: (0, 0),
            capacity: rows,
            step: DeviceStep {
                rows,
                row_seq: index(rows)?,
                row_pos: index(rows)?,
                cos: ops.scratch(rows * half)?,
                sin: ops.scratch(rows * half)?,
                rope_half: half,
                blocks: CacheBlocks {
                    table: index(table_capacity)?,
                    table_start: index(rows + 1)?,
                    block_tokens: 1,
                    chunk_blocks: CHUNK_BLOCKS,
                },
            },
            table_capacity,
            ids: index(rows)?,
            hidden: ops.scratch(rows * h)?,
            normed: ops.scratch(rows * h)?,
            chosen: index(rows * top_k)?,
            chosen_weights: ops.scratch(rows * top_k)?,
            pair_out: ops.scratch(rows * top_k * h)?,
            offsets: index(rows + 1)?,
            every_row_offsets: ops
                .upload_index(&(0..=rows).map(|r| (r * top_k) as u32).collect::<Vec<_>>())?,
            following: Vec::new(),
            shared: ops.scratch(rows * h)?,
            logits: ops.scratch(rows * vocab)?,
        })
    }

    /// Writes the step's inputs (padded to the bucket) into `buffers`, then runs its segments:
    /// embeddings and layers up to the first MoE layer's gate; that layer's shared experts;
    /// the combine of its routed and shared outputs and the layers up to the next gate; ...;
    /// the last combine, the remaining layers, the final norm and lm_head.
    fn decode_segments(
        &self,
        seqs: &mut [StepSequence<'_>],
        experts: &dyn ExpertBackend,
        buffers: &mut DecodeBuffers<O>,
    ) -> Result<O::F32> {
        let ops = &self.ops;
        let (n, rows) = (seqs.len(), buffers.step.rows);
        let (h, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let mut reserved = self.reserve_blocks(seqs)?;
        // Padding rows: sequence `n`, whose one block is the pool's sink, position 0.
        reserved.table_start.push(reserved.table.len() as u32);
        reserved.table.push(reserved.sink_block as u32);
        if reserved.table.len() > buffers.table_capacity {
            let capacity = reserved.table.len().next_power_of_two();
            buffers.step.blocks.table = ops.upload_index(&vec![0; capacity])?;
            buffers.table_capacity = capacity;
            buffers.generation = self.decode.next_generation();
        }
        if reserved.pool != buffers.pool {
            buffers.pool = reserved.pool;
            buffers.generation = self.decode.next_generation();
        }
        // Asked before any segment runs (a device may upload its tables here).
        let following = self
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| match &layer.ffn {
                DeviceFfn::Moe(moe) => self.experts_follow_choices(l, moe, experts),
                DeviceFfn::Dense(_) => Ok(false),
            })
            .collect::<Result<Vec<bool>>>()?;
        if following != buffers.following {
            buffers.following = following;
            buffers.generation = self.decode.next_generation();
        }
        buffers.step.blocks.block_tokens = reserved.block_tokens;
        let mut ids: Vec<u32> = seqs.iter().map(|s| s.tokens[0]).collect();
        let mut row_pos: Vec<usize> = seqs.iter().map(|s| s.cache.len).collect();
        let mut row_seq: Vec<u32> = (0..n as u32).collect();
        ids.resize(rows, 0);
        row_pos.resize(rows, 0);
        row_seq.resize(rows, n as u32);
        let rope = self.rope.table(&row_pos);
        let row_pos: Vec<u32> = row_pos.iter().map(|&p| p as u32).collect();
        ops.write_index(&ids, &mut buffers.ids)?;
        ops.write_index(&row_seq, &mut buffers.step.row_seq)?;
        ops.write_index(&row_pos, &mut buffers.step.row_pos)?;
        ops.write_f32(&rope.cos, &mut buffers.step.cos)?;
        ops.write_f32(&rope.sin, &mut buffers.step.sin)?;
        ops.write_index(&reserved.table, &mut buffers.step.blocks.table)?;
        ops.write_index(&reserved.table_start, &mut buffers.step.blocks.table_start)?;
        let generation = buffers.generation;
        let key = |segment| SegmentKey {
            rows,
            segment,
            generation,
        };

        let layers = self.layers.len();
        let mut segment = 0;
        let mut first = 0;
        // The MoE layer whose routed and shared outputs the next segment adds first.
        let mut combine: Option<&DeviceMoe<O>> = None;
        loop {
            // This segment ends with the gate of the next MoE layer whose routes the host
            // reads, or with the logits.
            let gate = (first..layers).find_map(|l| match &self.layers[l].ffn {
                DeviceFfn::Moe(moe) if !buffers.following[l] => Some((l, moe)),
                _ => None,
            });
            let last = gate.map_or(layers, |(l, _)| l);
            let b = &mut *buffers;
            // The pool is locked for the whole segment, before the device's lock (which a
            // capture holds throughout): the order every step takes them in.
            let mut kv = self.lock_kv()?;
            ops.run_segment(key(segment), &mut || {
                if first == 0 {
                    ops.embed_rows(&self.embed, &b.ids, &mut b.hidden, rows, h)?;
                }
                if let Some(moe) = combine {
                    let shared = moe.shared.as_ref().map(|_| &b.shared);
                    ops.combine_add(&mut b.hidden, &b.pair_out, &b.offsets, shared, rows, h)?;
                }
                for l in first..last {
                    let pool = &mut kv.pool;
                    self.attention_half_in(pool, l, &mut b.hidden, &mut b.normed, &b.step)?;
                    match &self.layers[l].ffn {
                        DeviceFfn::Dense(mlp) => {
                            let out = self.mlp(mlp, &b.normed, rows)?;
                            ops.add(&mut b.hidden, &out, rows * h)?;
                        }
                        DeviceFfn::Moe(moe) => {
                            // Padding rows too: they change no other row's result.
                            let buffers = ChoiceBuffers {
                                chosen: &mut b.chosen,
                                weights: &mut b.chosen_weights,
                                pair_out: &mut b.pair_out,
                                offsets: &b.every_row_offsets,
                            };
                            let (normed, hidden) = (&b.normed, &mut b.hidden);
                            self.moe_following(l, moe, normed, hidden, rows, experts, buffers)?
                        }
                    }
                }
                match gate {
                    Some((l, moe)) => {
                        let pool = &mut kv.pool;
                        self.attention_half_in(pool, l, &mut b.hidden, &mut b.normed, &b.step)?;
                        let (rule, bias) = (&moe.rule, moe.correction_bias.as_ref());
                        let logits = ops.linear(&b.normed, rows, h, &moe.gate, rule.num_experts)?;
                        let chosen = (&mut b.chosen, &mut b.chosen_weights);
                        ops.top_k_into(&logits, bias, rule, rows, chosen.0, chosen.1)?;
                    }
                    None => {
                        let row = HeadView::packed(0, 1, h);
                        let eps = self.config.rms_norm_eps;
                        let (hidden, normed) = (&b.hidden, &mut b.normed);
                        ops.rms_norm(hidden, row, &self.final_norm, normed, row, rows, 1, h, eps)?;
                        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed);
                        let logits = ops.linear(&b.normed, rows, h, lm_head, vocab)?;
                        ops.copy_prefix(&logits, &mut b.logits, rows * vocab)?;
                    }
                }
                Ok(())
            })?;
            drop(kv);
            segment += 1;
            let Some((l, moe)) = gate else { break };
            let top_k = moe.rule.top_k;
            let (chosen, weights) =
                ops.read_choices(&buffers.chosen, &buffers.chosen_weights, n * top_k)?;
            let routes = super::routes_from_choices(&chosen, &weights, top_k, n)?;
            // Over every row the buffers hold (the expert set reads them all): the padding
            // rows, and those past the bucket, have no pairs.
            let padded = padded_routes(&routes, buffers.capacity);
            // On this device the routed experts run first (the shared ones follow on the same
            // queue); elsewhere the shared experts are queued before the routed ones are
            // awaited, so the device computes them while the expert nodes compute theirs.
            let routed = match ops.experts_in_place(experts, l, &buffers.normed, &padded) {
                Some(pair_out) => Routed::OnDevice(pair_out),
                None => Routed::Elsewhere(ops.download(&buffers.normed, n * h)?),
            };
            if let Some(mlp) = &moe.shared {
                let b = &mut *buffers;
                ops.run_segment(key(segment), &mut || {
                    let out = self.mlp(mlp, &b.normed, rows)?;
                    ops.copy_prefix(&out, &mut b.shared, rows * h)?;
                    Ok(())
                })?;
                segment += 1;
            }
            let values = routes.pairs() * h;
            match routed {
                Routed::OnDevice(pair_out) => {
                    let pair_out = pair_out?;
                    super::check_pair_values(ops.len_of(&pair_out), &routes, h)?;
                    ops.copy_prefix(&pair_out, &mut buffers.pair_out, values)?;
                }
                Routed::Elsewhere(host_rows) => {
                    let pair_out = experts.run_experts(l, &host_rows, &routes)?;
                    super::check_pair_values(pair_out.len(), &routes, h)?;
                    ops.write_f32(&pair_out[..values], &mut buffers.pair_out)?;
                }
            }
            ops.write_index(&padded.offsets, &mut buffers.offsets)?;
            combine = Some(moe);
            first = l + 1;
        }
        let mut logits = ops.scratch(n * vocab)?;
        ops.copy_prefix(&buffers.logits, &mut logits, n * vocab)?;
        Ok(logits)
    }
}

/// A MoE layer's routed experts: run on this device (their outputs, there), or to be run
/// elsewhere on these rows.
enum Routed<B> {
    OnDevice(Result<B>),
    Elsewhere(Vec<f32>),
}

/// `routes` over `rows` rows: the padding rows after its own have no pairs.
fn padded_routes(routes: &ExpertRoutes, rows: usize) -> ExpertRoutes {
    let mut padded = routes.clone();
    let end = routes.offsets.last().copied().unwrap_or(0);
    padded.offsets.resize(rows + 1, end);
    padded
}
