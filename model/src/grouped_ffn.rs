//! The grouped expert FFN as a sequence of primitive steps, written once over [`FfnOps`]: the
//! GPU implements the steps with cuBLAS and NVRTC kernels (`gpu::expert_ffn`), and the tests
//! below with a host reference that follows cuBLAS's column-major definition to the letter.
//! So the orchestration (slot offsets, GEMM shapes and leading dimensions, the order of
//! steps) is checked on every machine, and only the primitives need a GPU to be checked.
//!
//! A batch goes: rows (f32) -> gathered into expert order in the GEMM dtype -> per expert one
//! gate+up GEMM (f32 out) -> SiLU(gate) * up (GEMM dtype) -> per expert one down GEMM (f32 out)
//! -> scattered back to pair order, each row times its routing weight.

use crate::device::shapes::ColumnMajorGemm;
use crate::routes::ExpertRuns;

/// The primitive steps, on some device. Buffers are element-addressed.
pub trait FfnOps {
    /// A buffer in the GEMM dtype (bf16 or f32 on a GPU).
    type Act;
    type F32;
    type Index;
    type Error;

    fn f32_len(&self, buffer: &Self::F32) -> usize;
    fn upload_index(&self, values: &[u32]) -> Result<Self::Index, Self::Error>;
    fn upload_f32(&self, values: &[f32]) -> Result<Self::F32, Self::Error>;
    /// A buffer of `len` elements that the next step writes in full before anything reads
    /// it: its contents are unspecified (uninitialised on a GPU; NaN in the host reference, so
    /// a step that misses an element shows).
    fn scratch_act(&self, len: usize) -> Result<Self::Act, Self::Error>;
    fn scratch_f32(&self, len: usize) -> Result<Self::F32, Self::Error>;
    /// `out[s, :] = rows[index[s], :]`, converted to the GEMM dtype (rows already in bf16 go
    /// only to a bf16 GEMM input, copied as they are).
    fn gather(
        &self,
        rows: GroupedRows<'_, Self::F32>,
        index: &Self::Index,
        out: &mut Self::Act,
        slots: usize,
        hidden: usize,
    ) -> Result<(), Self::Error>;
    /// Lets the GEMMs that follow run concurrently with each other (after the work queued so
    /// far); a device with one queue does nothing.
    fn fork(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// Waits (on the device) for the GEMMs since [`FfnOps::fork`].
    fn join(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    /// `C = op(A) · op(B)` from element offsets into A, B and C (alpha 1, beta 0), on `lane`
    /// (GEMMs of different lanes between a fork and a join may run at once; they never share
    /// an output range).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        lane: usize,
        shape: &ColumnMajorGemm,
        a: &Self::Act,
        a_offset: usize,
        b: &Self::Act,
        b_offset: usize,
        c: &mut Self::F32,
        c_offset: usize,
    ) -> Result<(), Self::Error>;
    /// `act[s, j] = silu(gate_up[s, j]) * gate_up[s, inter + j]`.
    fn silu_mul(
        &self,
        gate_up: &Self::F32,
        act: &mut Self::Act,
        slots: usize,
        inter: usize,
    ) -> Result<(), Self::Error>;
    /// `pair_out[pair[s], :] = out[s, :] * weight[pair[s]]`.
    fn scatter_weighted(
        &self,
        out: &Self::F32,
        pair: &Self::Index,
        weight: &Self::F32,
        pair_out: &mut Self::F32,
        slots: usize,
        hidden: usize,
    ) -> Result<(), Self::Error>;
    /// The gate/up pass and SiLU-and-multiply in one step, writing `act` (`[slots, inter]`)
    /// with no `[slots, 2 * inter]` intermediate, where the device has such a kernel for these
    /// experts: `Ok(false)` (the default) leaves it to [`FfnOps::expert_pass`] then
    /// [`FfnOps::silu_mul`], whose results it must equal bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn fused_gate_up_silu(
        &self,
        _experts: &[ExpertMatrices<'_, Self::Act>],
        _plan: &ExpertRuns,
        _input: &Self::Act,
        _act: &mut Self::Act,
        _hidden: usize,
        _inter: usize,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }
    /// One pass of every run: by default one [`FfnOps::gemm`] per expert ([`expert_gemms`]);
    /// a device may run them all in one launch.
    #[allow(clippy::too_many_arguments)]
    fn expert_pass(
        &self,
        experts: &[ExpertMatrices<'_, Self::Act>],
        plan: &ExpertRuns,
        pass: FfnPass,
        input: &Self::Act,
        output: &mut Self::F32,
        hidden: usize,
        inter: usize,
    ) -> Result<(), Self::Error>
    where
        Self: Sized,
    {
        expert_gemms(self, experts, plan, pass, input, output, hidden, inter)
    }
}

/// The rows a grouped run reads: f32, or already rounded to bf16 (`values` of them, two to a
/// word as a collective carries them) for experts whose GEMMs read bf16 rows, which then go
/// to the GEMM as they are instead of being widened and rounded again.
pub enum GroupedRows<'a, F: ?Sized> {
    F32(&'a F),
    Bf16 { words: &'a F, values: usize },
}

impl<F: ?Sized> Clone for GroupedRows<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: ?Sized> Copy for GroupedRows<'_, F> {}

/// One expert's matrices: `gate_up` `[2 * inter, hidden]` (gate rows then up rows) and `down`
/// `[hidden, inter]`, row-major.
pub struct ExpertMatrices<'a, A> {
    pub gate_up: &'a A,
    pub down: &'a A,
}

/// What [`run_grouped`] refuses before touching a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grouped FFN: {0}")]
pub struct GroupedShapeError(pub String);

/// Runs one routed batch: `rows` is `[n_rows, hidden]`, `plan` the batch in expert order with
/// `experts[i]` serving `plan.runs[i]`, `weights` one routing weight per pair. Returns
/// `[pairs, hidden]` (at least one element): each pair's output times its weight.
pub fn run_grouped<O: FfnOps>(
    ops: &O,
    experts: &[ExpertMatrices<'_, O::Act>],
    rows: GroupedRows<'_, O::F32>,
    plan: &ExpertRuns,
    weights: &[f32],
    hidden: usize,
    inter: usize,
) -> Result<O::F32, O::Error>
where
    O::Error: From<GroupedShapeError>,
{
    let slots = plan.slots();
    let pairs = weights.len();
    let shape_error = |m: String| O::Error::from(GroupedShapeError(m));
    let values = match rows {
        GroupedRows::F32(rows) => ops.f32_len(rows),
        GroupedRows::Bf16 { words, values } => {
            if values.div_ceil(2) > ops.f32_len(words) {
                return Err(shape_error(format!(
                    "{values} bf16 values in {} words",
                    ops.f32_len(words)
                )));
            }
            values
        }
    };
    let n_rows = values / hidden.max(1);
    if experts.len() != plan.runs.len() {
        return Err(shape_error(format!(
            "{} experts for {} runs",
            experts.len(),
            plan.runs.len()
        )));
    }
    let mut next_slot = 0;
    let runs_tile_the_slots = plan.runs.iter().all(|r| {
        let contiguous = r.start == next_slot;
        next_slot = r.start + r.len;
        contiguous
    }) && next_slot == slots;
    if plan.pair_of_slot.len() != slots
        || slots != pairs
        || !runs_tile_the_slots
        || plan.pair_of_slot.iter().any(|&p| p as usize >= pairs)
        || plan.row_of_slot.iter().any(|&r| r as usize >= n_rows)
    {
        return Err(shape_error(format!(
            "a plan of {slots} slots does not fit {n_rows} rows and {pairs} pairs"
        )));
    }
    let row_of_slot = ops.upload_index(&plan.row_of_slot)?;
    let pair_of_slot = ops.upload_index(&plan.pair_of_slot)?;
    let pair_weights = ops.upload_f32(weights)?;

    let mut x = ops.scratch_act(slots * hidden)?;
    ops.gather(rows, &row_of_slot, &mut x, slots, hidden)?;

    let mut act = ops.scratch_act(slots * inter)?;
    if !ops.fused_gate_up_silu(experts, plan, &x, &mut act, hidden, inter)? {
        let mut gate_up = ops.scratch_f32(slots * 2 * inter)?;
        let up = FfnPass::GateUp;
        ops.expert_pass(experts, plan, up, &x, &mut gate_up, hidden, inter)?;
        ops.silu_mul(&gate_up, &mut act, slots, inter)?;
    }

    let mut out = ops.scratch_f32(slots * hidden)?;
    ops.expert_pass(experts, plan, FfnPass::Down, &act, &mut out, hidden, inter)?;

    let mut pair_out = ops.scratch_f32(pairs * hidden)?;
    ops.scatter_weighted(
        &out,
        &pair_of_slot,
        &pair_weights,
        &mut pair_out,
        slots,
        hidden,
    )?;
    Ok(pair_out)
}

/// The two GEMM passes of the expert FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnPass {
    /// `[slots, hidden]` activations times each expert's gate and up rows: `[slots, 2 * inter]`.
    GateUp,
    /// `[slots, inter]` activations times each expert's down matrix: `[slots, hidden]`.
    Down,
}

/// One expert's GEMM of a pass: `experts[run]`'s matrix times the run's slots of the input,
/// from element offsets `input_at` into the pass's input and `output_at` into its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGemmCall {
    pub run: usize,
    pub shape: ColumnMajorGemm,
    pub input_at: usize,
    pub output_at: usize,
}

/// The GEMMs of one pass, one per run with slots, in run order: what [`expert_gemms`] issues
/// one at a time and a grouped call issues at once.
pub fn expert_gemm_calls(
    plan: &ExpertRuns,
    pass: FfnPass,
    hidden: usize,
    inter: usize,
) -> Vec<ExpertGemmCall> {
    let (k, n_out) = match pass {
        FfnPass::GateUp => (hidden, 2 * inter),
        FfnPass::Down => (inter, hidden),
    };
    plan.runs
        .iter()
        .enumerate()
        .filter(|(_, run)| run.len > 0)
        .map(|(i, run)| ExpertGemmCall {
            run: i,
            shape: ColumnMajorGemm::rows_times_weights(run.len, n_out, k),
            input_at: run.start * k,
            output_at: run.start * n_out,
        })
        .collect()
}

impl<A> ExpertMatrices<'_, A> {
    /// The matrix `pass` multiplies by.
    pub fn of(&self, pass: FfnPass) -> &A {
        match pass {
            FfnPass::GateUp => self.gate_up,
            FfnPass::Down => self.down,
        }
    }
}

/// One pass: for each run of `plan`, one GEMM of its expert over all its slots, the GEMMs of
/// different experts on different lanes between a fork and a join.
#[allow(clippy::too_many_arguments)]
pub fn expert_gemms<O: FfnOps>(
    ops: &O,
    experts: &[ExpertMatrices<'_, O::Act>],
    plan: &ExpertRuns,
    pass: FfnPass,
    input: &O::Act,
    output: &mut O::F32,
    hidden: usize,
    inter: usize,
) -> Result<(), O::Error> {
    ops.fork()?;
    // `run_grouped` checked one expert per run.
    for call in expert_gemm_calls(plan, pass, hidden, inter) {
        let Some(expert) = experts.get(call.run) else {
            break;
        };
        let weights = expert.of(pass);
        let (input_at, output_at) = (call.input_at, call.output_at);
        ops.gemm(
            call.run,
            &call.shape,
            weights,
            0,
            input,
            input_at,
            output,
            output_at,
        )?;
    }
    ops.join()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ops;
    use crate::expert_backend::ExpertBackend;
    use crate::experts::ExpertSet;
    use crate::layers::mlp::Mlp;
    use crate::routes::ExpertRoutes;

    /// The host reference: plain vectors, and `gemm` exactly as cuBLAS defines it
    /// (column-major, `op` by the transpose flags, leading dimensions honoured).
    struct HostOps;

    /// Value `i` of bf16 values two to a word (the lower half first, as a device buffer of
    /// bf16 read as f32 words holds them), widened.
    fn bf16_value(words: &[f32], i: usize) -> f32 {
        let half = (words[i / 2].to_bits() >> (16 * (i % 2))) & 0xffff;
        f32::from_bits(half << 16)
    }

    /// `values` rounded to bf16 (nearest even) and packed two to a word.
    fn bf16_words(values: &[f32]) -> Vec<f32> {
        values
            .chunks(2)
            .map(|pair| {
                let half = |i: usize| {
                    pair.get(i)
                        .map_or(0u32, |&v| u32::from(half::bf16::from_f32(v).to_bits()))
                };
                f32::from_bits(half(0) | (half(1) << 16))
            })
            .collect()
    }

    impl FfnOps for HostOps {
        type Act = Vec<f32>;
        type F32 = Vec<f32>;
        type Index = Vec<u32>;
        type Error = GroupedShapeError;

        fn f32_len(&self, buffer: &Vec<f32>) -> usize {
            buffer.len()
        }
        fn upload_index(&self, values: &[u32]) -> Result<Vec<u32>, Self::Error> {
            Ok(values.to_vec())
        }
        fn upload_f32(&self, values: &[f32]) -> Result<Vec<f32>, Self::Error> {
            Ok(values.to_vec())
        }
        fn scratch_act(&self, len: usize) -> Result<Vec<f32>, Self::Error> {
            Ok(vec![f32::NAN; len])
        }
        fn scratch_f32(&self, len: usize) -> Result<Vec<f32>, Self::Error> {
            Ok(vec![f32::NAN; len])
        }
        fn gather(
            &self,
            rows: GroupedRows<'_, Vec<f32>>,
            index: &Vec<u32>,
            out: &mut Vec<f32>,
            slots: usize,
            hidden: usize,
        ) -> Result<(), Self::Error> {
            for s in 0..slots {
                let r = index[s] as usize;
                let dst = &mut out[s * hidden..(s + 1) * hidden];
                match rows {
                    GroupedRows::F32(rows) => {
                        dst.copy_from_slice(&rows[r * hidden..(r + 1) * hidden])
                    }
                    GroupedRows::Bf16 { words, .. } => {
                        for (c, d) in dst.iter_mut().enumerate() {
                            *d = bf16_value(words, r * hidden + c);
                        }
                    }
                }
            }
            Ok(())
        }
        fn gemm(
            &self,
            _lane: usize,
            g: &ColumnMajorGemm,
            a: &Vec<f32>,
            a_offset: usize,
            b: &Vec<f32>,
            b_offset: usize,
            c: &mut Vec<f32>,
            c_offset: usize,
        ) -> Result<(), Self::Error> {
            let (a_len, b_len, c_len) = g.extents();
            assert!(a_offset + a_len <= a.len(), "A out of bounds");
            assert!(b_offset + b_len <= b.len(), "B out of bounds");
            assert!(c_offset + c_len <= c.len(), "C out of bounds");
            // Column-major element (i, j) of a matrix with leading dimension ld: i + j * ld.
            let op_a = |i: usize, l: usize| {
                if g.transpose_a {
                    a[a_offset + l + i * g.lda]
                } else {
                    a[a_offset + i + l * g.lda]
                }
            };
            let op_b = |l: usize, j: usize| {
                if g.transpose_b {
                    b[b_offset + j + l * g.ldb]
                } else {
                    b[b_offset + l + j * g.ldb]
                }
            };
            for j in 0..g.n {
                for i in 0..g.m {
                    let mut acc = 0.0f64;
                    for l in 0..g.k {
                        acc += op_a(i, l) as f64 * op_b(l, j) as f64;
                    }
                    c[c_offset + i + j * g.ldc] = acc as f32;
                }
            }
            Ok(())
        }
        fn silu_mul(
            &self,
            gate_up: &Vec<f32>,
            act: &mut Vec<f32>,
            slots: usize,
            inter: usize,
        ) -> Result<(), Self::Error> {
            let done = ops::silu_and_mul(&gate_up[..slots * 2 * inter], inter);
            act[..done.len()].copy_from_slice(&done);
            Ok(())
        }
        fn scatter_weighted(
            &self,
            out: &Vec<f32>,
            pair: &Vec<u32>,
            weight: &Vec<f32>,
            pair_out: &mut Vec<f32>,
            slots: usize,
            hidden: usize,
        ) -> Result<(), Self::Error> {
            for s in 0..slots {
                let p = pair[s] as usize;
                for c in 0..hidden {
                    pair_out[p * hidden + c] = out[s * hidden + c] * weight[p];
                }
            }
            Ok(())
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
            })
            .collect()
    }

    /// A pass's calls: one per run with slots (an empty run is skipped), each over its own
    /// slots of the input and output, with the pass's shape.
    #[test]
    fn expert_gemm_calls_cover_each_run_once() {
        let plan = ExpertRuns {
            runs: vec![
                crate::routes::ExpertRun {
                    expert: 4,
                    start: 0,
                    len: 3,
                },
                crate::routes::ExpertRun {
                    expert: 9,
                    start: 3,
                    len: 0,
                },
                crate::routes::ExpertRun {
                    expert: 2,
                    start: 3,
                    len: 5,
                },
            ],
            ..ExpertRuns::default()
        };
        let (hidden, inter) = (8, 6);
        let up = expert_gemm_calls(&plan, FfnPass::GateUp, hidden, inter);
        assert_eq!(up.iter().map(|c| c.run).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(
            up[1].shape,
            ColumnMajorGemm::rows_times_weights(5, 2 * inter, hidden)
        );
        assert_eq!(
            (up[1].input_at, up[1].output_at),
            (3 * hidden, 3 * 2 * inter)
        );
        let down = expert_gemm_calls(&plan, FfnPass::Down, hidden, inter);
        assert_eq!(
            down[0].shape,
            ColumnMajorGemm::rows_times_weights(3, hidden, inter)
        );
        assert_eq!(
            (down[1].input_at, down[1].output_at),
            (3 * inter, 3 * hidden)
        );
    }

    #[test]
    fn rows_times_weights_is_x_times_w_transposed() {
        let (rows, n_out, k) = (3, 5, 4);
        let w = pseudo_random(n_out * k, 1);
        let x = pseudo_random(rows * k, 2);
        let mut c = vec![0.0; rows * n_out];
        let shape = ColumnMajorGemm::rows_times_weights(rows, n_out, k);
        HostOps.gemm(0, &shape, &w, 0, &x, 0, &mut c, 0).unwrap();
        for r in 0..rows {
            for o in 0..n_out {
                let want: f32 = (0..k).map(|l| x[r * k + l] * w[o * k + l]).sum();
                assert!((c[r * n_out + o] - want).abs() < 1e-6, "({r}, {o})");
            }
        }
    }

    /// The grouped orchestration over the reference primitives gives what the CPU expert set
    /// gives (itself checked against transformers by the golden tests).
    #[test]
    fn grouped_run_matches_the_cpu_expert_set() {
        let (hidden, inter, experts) = (16, 8, 5);
        let weights: Vec<[Vec<f32>; 3]> = (0..experts)
            .map(|e| {
                let seed = 10 + 3 * e as u64;
                [
                    pseudo_random(inter * hidden, seed),
                    pseudo_random(inter * hidden, seed + 1),
                    pseudo_random(hidden * inter, seed + 2),
                ]
            })
            .collect();
        let mut set = ExpertSet::empty(hidden);
        for (e, [gate, up, down]) in weights.iter().enumerate() {
            set.insert_cpu((0, e), Mlp::from_weights(gate, up, down, hidden, inter));
        }
        let rows = 7;
        let x = pseudo_random(rows * hidden, 99);
        let mut routes = ExpertRoutes::with_capacity(rows, rows * 2);
        for r in 0..rows {
            // Expert 3 gets no rows; expert 0 gets several.
            let e1 = [0, 1, 4, 0, 2, 0, 4][r];
            let e2 = [2, 0, 1, 4, 0, 1, 2][r];
            routes.push_row(&mut [(e1, 0.25 + r as f32 * 0.1), (e2, 0.5)]);
        }
        let cpu = set.run_experts(0, &x, &routes).unwrap();

        let plan = ExpertRuns::from_routes(&routes);
        let stacked: Vec<(Vec<f32>, &Vec<f32>)> = weights
            .iter()
            .map(|[gate, up, down]| ([gate.as_slice(), up.as_slice()].concat(), down))
            .collect();
        let matrices: Vec<ExpertMatrices<'_, Vec<f32>>> = plan
            .runs
            .iter()
            .map(|run| {
                let (gate_up, down) = &stacked[run.expert as usize];
                ExpertMatrices { gate_up, down }
            })
            .collect();
        let grouped = run_grouped(
            &HostOps,
            &matrices,
            GroupedRows::F32(&x),
            &plan,
            &routes.weights,
            hidden,
            inter,
        )
        .unwrap();
        assert_eq!(grouped.len(), cpu.len());
        let diff = crate::compare::max_abs_diff(&grouped, &cpu);
        assert!(diff < 1e-5, "grouped vs CPU: {diff}");

        // The same rows rounded to bf16 and handed over two to a word: the outputs of those
        // rounded values as f32 rows, bit for bit.
        let rounded: Vec<f32> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        let words = bf16_words(&x);
        let run = |rows| {
            run_grouped(
                &HostOps,
                &matrices,
                rows,
                &plan,
                &routes.weights,
                hidden,
                inter,
            )
            .unwrap()
        };
        let (from_words, from_rounded) = (
            run(GroupedRows::Bf16 {
                words: &words,
                values: x.len(),
            }),
            run(GroupedRows::F32(&rounded)),
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&from_words), bits(&from_rounded));
    }

    #[test]
    fn plans_that_do_not_fit_are_refused() {
        let mut routes = ExpertRoutes::with_capacity(1, 1);
        routes.push_row(&mut [(0, 1.0)]);
        let plan = ExpertRuns::from_routes(&routes);
        let w = vec![0.0; 8];
        let matrices = [ExpertMatrices {
            gate_up: &w,
            down: &w,
        }];
        // One row of width 2 is needed; none given.
        let none = GroupedRows::F32(&vec![]);
        let err = run_grouped(&HostOps, &matrices, none, &plan, &routes.weights, 2, 2);
        assert!(err.is_err());
        // Two bf16 values promised in no word.
        let words = GroupedRows::Bf16 {
            words: &vec![],
            values: 2,
        };
        let err = run_grouped(&HostOps, &matrices, words, &plan, &routes.weights, 2, 2);
        assert!(err.is_err());
        // Two experts for one run.
        let two = [
            ExpertMatrices {
                gate_up: &w,
                down: &w,
            },
            ExpertMatrices {
                gate_up: &w,
                down: &w,
            },
        ];
        let two_values = vec![0.0; 2];
        let rows = GroupedRows::F32(&two_values);
        let err = run_grouped(&HostOps, &two, rows, &plan, &routes.weights, 2, 2);
        assert!(err.is_err());
        // A run that does not start where the previous one ended.
        let mut gap = plan.clone();
        gap.runs[0].start = 1;
        let err = run_grouped(
            &HostOps,
            &matrices,
            GroupedRows::F32(&two_values),
            &gap,
            &routes.weights,
            2,
            2,
        );
        assert!(err.is_err());
        // The well-formed plan runs.
        assert!(run_grouped(
            &HostOps,
            &matrices,
            GroupedRows::F32(&two_values),
            &plan,
            &routes.weights,
            2,
            2
        )
        .is_ok());
    }
}
