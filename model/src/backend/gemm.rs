//! Packed GEMM: `C[m, n] = sum_k A[m, k] * W[n, k]`, with `W` a Hugging Face `Linear` weight
//! (`[out_features, in_features]`, row-major) packed once at load time into column panels, in
//! f32 or, for bf16 checkpoints, in bf16 (widened exactly to f32 as the kernel loads it), or,
//! for FP8 checkpoints, in e4m3 with each column's scale per k segment (widened to
//! `f32(e4m3) * scale`, the value dequantizing at load computes).
//!
//! Each output element is a chain of fused multiply-adds over k in ascending order, starting from
//! zero. K blocking stores and reloads the partial sum without changing that chain, and M tiling
//! only decides which rows share a register tile, so the result of a row is bitwise the same
//! whether it is computed alone, in a batch of 256, on one thread or on many, and whether the
//! panels hold a bf16 or FP8 weight or its f32 widening. The portable path uses `f32::mul_add` in the
//! same order, so it agrees bitwise with the AVX2/FMA path.

use rayon::prelude::*;

use super::weight::Fp8Matrix;
use super::NativeWeight;

/// Output columns per packed panel (two 8-lane vectors).
pub const NR: usize = 16;
/// Rows per register tile.
const MR: usize = 6;
/// K block: a `KC x NR` slice of a panel (16 KiB in f32) stays in L1 while all row tiles use it.
const KC: usize = 256;
/// Floats of A kept hot per row block (384 KiB of a 512 KiB L2).
const A_SLAB_FLOATS: usize = 96 * 1024;
/// Row blocks never go below this: splitting small batches costs more fork-joins than it saves.
const MIN_ROW_BLOCK: usize = 132;
/// K-rows packed at a time (see `pack`).
const PACK_KB: usize = 64;
/// Below this many multiply-adds a GEMM runs on the calling thread (fork-join costs more).
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// A weight matrix `[n, k]` packed as `ceil(n / NR)` panels of `[k][NR]`, zero-padded.
#[derive(Clone)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    panels: Panels,
}

#[derive(Clone)]
enum Panels {
    F32(Vec<f32>),
    /// Each k-row of a panel holds its 16 columns interleaved (0, 8, 1, 9, ..., 7, 15), so that
    /// one 32-bit lane carries columns j and j + 8: a shift widens the first, a mask the second.
    Bf16(Vec<half::bf16>),
    /// Each k-row of a panel holds its 16 columns' e4m3 bytes in order, or, when `grouped`,
    /// every four whole k-rows are interleaved, each column's four bytes side by side, for
    /// widening within 32-bit lanes (see [`fp8_position`]; the last `k % 4` rows stay in
    /// order). The k axis is cut in segments (`segment_starts`,
    /// shared by every panel) within which a column has one scale:
    /// `scales[(panel * segments + segment) * NR + column]`.
    Fp8 {
        values: Vec<E4m3>,
        segment_starts: Vec<usize>,
        scales: Vec<f32>,
        grouped: bool,
    },
    /// Integers in [-8, 7] (compressed-tensors' INT4) as nibbles, two k-rows a byte, with a
    /// scale per column and k segment as FP8's (`int4.rs`).
    Int4 {
        values: Vec<u8>,
        segment_starts: Vec<usize>,
        scales: Vec<f32>,
    },
    /// Parts that share no panel type (an FP8 part beside a bf16 or f32 one, or FP8 parts cut
    /// on other k segments), each held in its own, their columns side by side: widening them
    /// all to f32 would hold a copy two to four times the checkpoint's bytes.
    Stacked(Vec<PackedMatrix>),
}

/// The SIMD tiles widen an e4m3 byte to the f32 2^120 times smaller by moving its bits into
/// an f32's (`E4M3_IN_F32_MASK` keeps them after a sign-extend and a shift by 20), and multiply
/// it by its scale times 2^120: exact, so each weight is the one rounding of `e4m3 * scale`.
/// Scales at or above `FP8_MAX_KERNEL_SCALE` would overflow there, and such matrices are
/// widened to f32 at load instead (no real checkpoint comes near: DeepSeek's are ~1e-4).
const FP8_SCALE_UP: f32 = f32::from_bits((127 + 120) << 23);
const E4M3_IN_F32_MASK: u32 = 0x87F0_0000;
const FP8_MAX_KERNEL_SCALE: f32 = 256.0;

/// One float8 e4m3fn weight (finite: checkpoints with NaN weights are refused at load).
#[derive(Clone, Copy, Default, Debug, PartialEq)]
#[repr(transparent)]
pub struct E4m3(pub u8);

/// e4m3 byte to f32, exactly (`fp8::e4m3_to_f32` as a table).
fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0.0f32; 256];
        for (b, v) in t.iter_mut().enumerate() {
            *v = super::fp8::e4m3_to_f32(b as u8);
        }
        t
    })
}

/// Whether every scale of `m` times 2^120 is a finite f32 (see `FP8_SCALE_UP`).
fn scales_fit_the_kernel(m: &Fp8Matrix) -> bool {
    m.scales.iter().all(|s| s.abs() < FP8_MAX_KERNEL_SCALE)
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = match self.panels {
            Panels::F32(_) => "f32",
            Panels::Bf16(_) => "bf16",
            Panels::Fp8 { .. } => "fp8",
            Panels::Int4 { .. } => "int4",
            Panels::Stacked(_) => "stacked",
        };
        write!(f, "PackedMatrix[{} x {}, {dtype}]", self.n, self.k)
    }
}

/// What a packed panel holds, and where column `j` of a k-row lies.
trait PanelElement: Copy + Default + Send + Sync {
    const BF16: bool;
    /// Widened values are multiplied by their column's scale of the k segment.
    const FP8: bool = false;
    fn widen(self) -> f32;
    fn slot(column: usize) -> usize;
}

impl PanelElement for E4m3 {
    const BF16: bool = false;
    const FP8: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        e4m3_table()[self.0 as usize]
    }
    #[inline(always)]
    fn slot(column: usize) -> usize {
        column
    }
}

impl PanelElement for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[inline(always)]
    fn slot(column: usize) -> usize {
        column
    }
}

impl PanelElement for half::bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn slot(column: usize) -> usize {
        if column < NR / 2 {
            2 * column
        } else {
            2 * (column - NR / 2) + 1
        }
    }
}

/// Packs row-major parts (each `[n_i, k]`) stacked into one `[sum n_i, k]` panel array.
///
/// Every cell is written once, padding included, so the buffer needs no zero-fill first; a
/// panel is filled in blocks of `PACK_KB` k-rows (2 KiB of bf16, in L1) while each source row is
/// read sequentially. Loading a node's experts is mostly this loop (docs/performance.md).
fn pack<E: PanelElement>(parts: &[&[E]], k: usize) -> (usize, Vec<E>) {
    for part in parts {
        assert_eq!(
            part.len() % k.max(1),
            0,
            "weight length is not a multiple of k"
        );
    }
    let n = parts
        .iter()
        .map(|p| p.len())
        .sum::<usize>()
        .checked_div(k)
        .unwrap_or(0);
    let padding = vec![E::default(); k];
    let mut rows = parts
        .iter()
        .flat_map(|part| part.chunks_exact(k.max(1)))
        .take(n);
    let total = n.div_ceil(NR) * k * NR;
    let mut panels: Vec<E> = Vec::with_capacity(total);
    super::prefault_for_write(panels.as_mut_ptr().cast(), total * std::mem::size_of::<E>());
    if total > 0 {
        let out = &mut panels.spare_capacity_mut()[..total];
        for panel in out.chunks_exact_mut(k * NR) {
            let mut sources: [&[E]; NR] = [padding.as_slice(); NR];
            for source in sources.iter_mut() {
                match rows.next() {
                    Some(row) => *source = row,
                    None => break,
                }
            }
            for k0 in (0..k).step_by(PACK_KB) {
                let k1 = (k0 + PACK_KB).min(k);
                let block = &mut panel[k0 * NR..k1 * NR];
                for (column, row) in sources.iter().enumerate() {
                    let slot = E::slot(column);
                    for (cells, &value) in block.chunks_exact_mut(NR).zip(&row[k0..k1]) {
                        cells[slot].write(value);
                    }
                }
            }
        }
    }
    // SAFETY: the loop above wrote every one of the `total` cells (each panel's k rows of NR).
    unsafe { panels.set_len(total) };
    (n, panels)
}

impl PackedMatrix {
    /// Packs a row-major `[n, k]` weight (`weight.len() == n * k`).
    pub fn from_rows(weight: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            weight.len(),
            n * k,
            "weight length does not match its shape"
        );
        let (_, panels) = pack(&[weight], k);
        Self {
            n,
            k,
            panels: Panels::F32(panels),
        }
    }

    /// Stacks several `[n_i, k]` weights into one `[sum n_i, k]` matrix, so that projections
    /// sharing an input run as one GEMM.
    pub fn from_stacked(parts: &[&[f32]], k: usize) -> Self {
        let (n, panels) = pack(parts, k);
        Self {
            n,
            k,
            panels: Panels::F32(panels),
        }
    }

    /// Like [`Self::from_stacked`] for weights as their checkpoint holds them: bf16 panels when
    /// every part is bf16 (half the bytes, bitwise the same products), FP8 panels when every
    /// part is FP8 with the same k segments (a quarter of the bytes, bitwise the products of
    /// the dequantized weights), f32 otherwise.
    pub fn from_native(parts: &[&NativeWeight], k: usize) -> Self {
        let fp8: Option<Vec<&Fp8Matrix>> = parts
            .iter()
            .map(|p| match p {
                NativeWeight::Fp8(m) if m.cols == k => Some(m),
                _ => None,
            })
            .collect();
        if let Some(fp8) = fp8.filter(|f| {
            f.first()
                .is_some_and(|first| f.iter().all(|m| m.segment_starts == first.segment_starts))
        }) {
            if fp8.iter().all(|m| int4::holds_only_int4(m)) {
                return Self::from_int4(&fp8, k);
            }
            if fp8.iter().all(|m| scales_fit_the_kernel(m)) {
                return Self::from_fp8(&fp8, k);
            }
        }
        let bf16: Option<Vec<&[half::bf16]>> = parts
            .iter()
            .map(|p| match p {
                NativeWeight::Bf16(v) => Some(v.as_slice()),
                NativeWeight::F32(_) | NativeWeight::Fp8(_) => None,
            })
            .collect();
        if let Some(parts) = bf16 {
            let (n, panels) = pack(&parts, k);
            return Self {
                n,
                k,
                panels: Panels::Bf16(panels),
            };
        }
        let f32_parts: Option<Vec<&[f32]>> = parts
            .iter()
            .map(|p| match p {
                NativeWeight::F32(v) => Some(v.as_slice()),
                NativeWeight::Bf16(_) | NativeWeight::Fp8(_) => None,
            })
            .collect();
        if let Some(parts) = f32_parts {
            return Self::from_stacked(&parts, k);
        }
        if let [NativeWeight::Fp8(m)] = parts {
            // Only here when its scales do not fit the kernel (else it is FP8 panels above).
            return Self::from_rows(&m.to_f32(), m.rows, k);
        }
        let parts: Vec<PackedMatrix> = parts.iter().map(|p| Self::from_native(&[p], k)).collect();
        Self {
            n: parts.iter().map(|p| p.n).sum(),
            k,
            panels: Panels::Stacked(parts),
        }
    }

    /// FP8 parts stacked into one matrix (same k segments, scales that fit the kernel).
    fn from_fp8(parts: &[&Fp8Matrix], k: usize) -> Self {
        let bytes: Vec<&[E4m3]> = parts
            .iter()
            .map(|m| {
                // SAFETY: E4m3 is repr(transparent) over u8.
                unsafe {
                    std::slice::from_raw_parts(m.values.as_ptr().cast::<E4m3>(), m.values.len())
                }
            })
            .collect();
        let (n, mut values) = pack(&bytes, k);
        let segment_starts = parts[0].segment_starts.clone();
        // Every K block must start a group: blocks start at multiples of KC and at segments.
        let grouped =
            fp8_groups_pay() && segment_starts.iter().all(|s| s.is_multiple_of(FP8_GROUP));
        if grouped && k > 0 {
            for panel in values.chunks_exact_mut(k * NR) {
                group_fp8_panel(panel);
            }
        }
        let scales = panel_scales(parts, segment_starts.len());
        Self {
            n,
            k,
            panels: Panels::Fp8 {
                values,
                segment_starts,
                scales,
                grouped,
            },
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Whether the panels hold bf16 (all of them, when parts are stacked).
    pub fn is_bf16(&self) -> bool {
        match &self.panels {
            Panels::Bf16(_) => true,
            Panels::Stacked(parts) => parts.iter().all(Self::is_bf16),
            _ => false,
        }
    }

    /// Whether the panels hold FP8 with scales (all of them, when parts are stacked).
    pub fn is_fp8(&self) -> bool {
        match &self.panels {
            Panels::Fp8 { .. } => true,
            Panels::Stacked(parts) => parts.iter().all(Self::is_fp8),
            _ => false,
        }
    }

    /// Whether the panels hold INT4 nibbles with scales (all of them, when parts are stacked).
    pub fn is_int4(&self) -> bool {
        match &self.panels {
            Panels::Int4 { .. } => true,
            Panels::Stacked(parts) => parts.iter().all(Self::is_int4),
            _ => false,
        }
    }

    /// Bytes held by the packed panels.
    pub fn bytes(&self) -> usize {
        match &self.panels {
            Panels::F32(p) => p.len() * 4,
            Panels::Bf16(p) => p.len() * 2,
            Panels::Fp8 { values, scales, .. } => values.len() + scales.len() * 4,
            Panels::Int4 { values, scales, .. } => values.len() + scales.len() * 4,
            Panels::Stacked(parts) => parts.iter().map(Self::bytes).sum(),
        }
    }

    /// `a` is `[m, k]` row-major; returns `[m, n]`.
    pub fn matmul(&self, a: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(a.len(), m * self.k, "input length does not match [m, k]");
        self.matmul_rows(InputRows::contiguous(a, self.k), m)
    }

    /// `a * W^T` for the `m` rows `rows` names, read where they lie (no gather copy).
    pub fn matmul_rows(&self, rows: InputRows<'_>, m: usize) -> Vec<f32> {
        self.fresh_product(rows, m, self.worth_parallel(m))
    }

    /// Like [`Self::matmul`] but on the calling thread only: for callers that already run many
    /// small GEMMs in parallel (per head, per expert). Bitwise the same result.
    pub fn matmul_serial(&self, a: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(a.len(), m * self.k, "input length does not match [m, k]");
        self.matmul_rows_serial(InputRows::contiguous(a, self.k), m)
    }

    /// [`Self::matmul_rows`] on the calling thread only.
    pub fn matmul_rows_serial(&self, rows: InputRows<'_>, m: usize) -> Vec<f32> {
        self.fresh_product(rows, m, false)
    }

    /// Writes `a * W^T` into `c` (`[m, n]`), overwriting it.
    pub fn matmul_into(&self, a: &[f32], m: usize, c: &mut [f32]) {
        assert_eq!(a.len(), m * self.k, "input length does not match [m, k]");
        self.product(
            InputRows::contiguous(a, self.k),
            m,
            c,
            self.worth_parallel(m),
        );
    }

    fn worth_parallel(&self, m: usize) -> bool {
        m * self.n * self.k >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1
    }

    fn product(&self, rows: InputRows<'_>, m: usize, c: &mut [f32], parallel: bool) {
        assert_eq!(c.len(), m * self.n, "output length does not match [m, n]");
        if self.k == 0 {
            c.fill(0.0);
            return;
        }
        rows.check(m, self.k);
        // SAFETY: `c` holds the m * n values the product writes; the rows were checked.
        unsafe { self.product_at(rows, m, OutPtr::rows_of(c.as_mut_ptr(), self.n), parallel) }
    }

    /// A new `[m, n]` product in a buffer that is never zeroed: with k > 0 the first K block
    /// stores every element without reading it, and a prefill GEMM's output is tens of MB (a
    /// memset per GEMM otherwise).
    fn fresh_product(&self, rows: InputRows<'_>, m: usize, parallel: bool) -> Vec<f32> {
        let len = m * self.n;
        if self.k == 0 {
            return vec![0.0; len];
        }
        rows.check(m, self.k);
        let mut c = Vec::with_capacity(len);
        // SAFETY: the spare capacity holds `len` values and the rows were checked.
        unsafe {
            let out = OutPtr::rows_of(c.spare_capacity_mut().as_mut_ptr().cast(), self.n);
            self.product_at(rows, m, out, parallel);
            // Every one of the `len` values was stored by its row tile's first K block.
            c.set_len(len);
        }
        c
    }

    /// SAFETY: `c` points to `m * n` writable values; `rows` passed `check(m, k)`; k > 0.
    unsafe fn product_at(&self, rows: InputRows<'_>, m: usize, c: OutPtr, parallel: bool) {
        if m == 0 || self.n == 0 {
            return;
        }
        match &self.panels {
            Panels::F32(panels) => self.product_of(panels, &[], rows, m, c, parallel),
            Panels::Bf16(panels) => self.product_of(panels, &[], rows, m, c, parallel),
            Panels::Fp8 {
                values,
                segment_starts,
                scales,
                grouped,
            } => {
                let scaled = Scaled {
                    segment_starts,
                    scales,
                    grouped: *grouped,
                };
                self.product_of(values, &[scaled], rows, m, c, parallel)
            }
            Panels::Int4 {
                values,
                segment_starts,
                scales,
            } => {
                let scaled = Scaled {
                    segment_starts,
                    scales,
                    grouped: false,
                };
                self.int4_product(values, &scaled, rows, m, c, parallel)
            }
            Panels::Stacked(parts) => {
                let mut first = 0;
                for part in parts {
                    part.product_at(rows, m, c.columns_from(first), parallel);
                    first += part.n;
                }
            }
        }
    }

    /// SAFETY: as [`Self::product_at`]. `scaled` holds the FP8 scales (one entry) or nothing.
    unsafe fn product_of<E: PanelElement>(
        &self,
        panels: &[E],
        scaled: &[Scaled<'_>],
        a: InputRows<'_>,
        m: usize,
        out: OutPtr,
        parallel: bool,
    ) {
        self.row_blocks(m, E::BF16 || E::FP8, parallel, |panels_here, m0, rows| {
            // SAFETY: these panels write only their columns of rows m0..m0+rows of c,
            // disjoint across groups; `product` checked that every row of A lies in A.
            unsafe { self.panel_product(panels, scaled.first(), panels_here, &a, m0, rows, out) }
        });
    }

    /// Calls `run` over the product's row blocks, each with the groups of panels one tile
    /// covers (in parallel when asked): row blocks small enough that their `[rows, k]` slab
    /// of A stays in L2 while every panel passes over it.
    fn row_blocks(
        &self,
        m: usize,
        widens: bool,
        parallel: bool,
        run: impl Fn(PanelRange, usize, usize) + Sync,
    ) {
        let num_panels = self.n.div_ceil(NR);
        let block = (A_SLAB_FLOATS / self.k.max(1)).max(MIN_ROW_BLOCK) / MR * MR;
        let mut m0 = 0;
        while m0 < m {
            let rows = block.min(m - m0);
            let group = panels_per_tile(rows, widens);
            let run = |g: usize| {
                let panels_here = PanelRange {
                    first: g * group,
                    count: group.min(num_panels - g * group),
                };
                run(panels_here, m0, rows)
            };
            let groups = num_panels.div_ceil(group);
            if parallel {
                (0..groups)
                    .into_par_iter()
                    .with_min_len(2usize.div_ceil(group))
                    .for_each(run);
            } else {
                (0..groups).for_each(run);
            }
            m0 += rows;
        }
    }

    /// Computes columns of `panels_here` for rows `first..first + rows`. FP8 panels also cut
    /// the K blocks at their scale segments (the chain of multiply-adds is the same).
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel_product<E: PanelElement>(
        &self,
        panels: &[E],
        scaled: Option<&Scaled<'_>>,
        panels_here: PanelRange,
        a: &InputRows<'_>,
        first: usize,
        rows: usize,
        c: OutPtr,
    ) {
        let p = panels_here.first;
        let last = p + panels_here.count - 1;
        let cols = NR.min(self.n - last * NR);
        let panel = &panels[p * self.k * NR..(last + 1) * self.k * NR];
        // Rows in whole groups of four (grouped FP8 panels): a block's first rows.
        let grouped_k = match scaled {
            Some(s) if s.grouped => self.k / FP8_GROUP * FP8_GROUP,
            _ => 0,
        };
        if let (true, Some(scaled)) = (E::FP8 && rows > MR, scaled) {
            let panel = panel.as_ptr().cast::<E4m3>();
            let stride = self.k * NR;
            let widen =
                |j: usize, piece: usize, kc: usize, scales: *const f32, into: &mut [f32]| {
                    let grouped = grouped_k.saturating_sub(piece).min(kc);
                    // SAFETY: panel j of the tile holds k-rows piece..piece + kc (`widened_product`).
                    unsafe {
                        widen_fp8_block(
                            panel.add(j * stride + piece * NR),
                            scales,
                            kc,
                            grouped,
                            into,
                        )
                    }
                };
            return self.widened_product(scaled, panels_here, widen, a, first, rows, c);
        }
        for kb in KBlocks::new(self.k, scaled) {
            let scales = scaled.map_or(std::ptr::null(), |s| s.panel_scales(p, kb.segment));
            let block = panel.as_ptr().add(kb.k0 * NR);
            let block_rows = BlockRows {
                k0: kb.k0,
                kc: kb.kc,
                grouped_rows: grouped_k.saturating_sub(kb.k0).min(kb.kc),
                cols,
                accumulate: kb.k0 > 0,
                panels: panels_here.count,
                panel_stride: self.k * NR,
                scales_stride: scaled.map_or(0, |s| s.segment_starts.len() * NR),
                scale_rows: 0,
            };
            self.row_tiles(block, scales, &block_rows, a, first, rows, p, c, micro_tile);
        }
    }

    /// FP8 panels under several row tiles: each K block is widened once into L1 (the same f32
    /// values each tile would compute, every scale segment inside it with its own scales) and
    /// the tiles run over f32, the panels' blocks side by side. The blocks are `KC` long
    /// whatever the segments (an INT4 checkpoint's are 32 columns): the widened values carry
    /// their scales, and the chain of multiply-adds over k is the same.
    #[allow(clippy::too_many_arguments)]
    unsafe fn widened_product(
        &self,
        scaled: &Scaled<'_>,
        panels_here: PanelRange,
        widen: impl Fn(usize, usize, usize, *const f32, &mut [f32]),
        a: &InputRows<'_>,
        first: usize,
        rows: usize,
        c: OutPtr,
    ) {
        let p = panels_here.first;
        let last = p + panels_here.count - 1;
        let count = panels_here.count;
        let starts = scaled.segment_starts;
        WIDENED.with(|widened| {
            let mut widened = widened.borrow_mut();
            debug_assert!(widened.len() >= count * KC * NR, "a tile's panels fit");
            let mut segment = 0;
            for kb in KBlocks::new(self.k, None) {
                let end = kb.k0 + kb.kc;
                for (j, out) in widened.chunks_exact_mut(KC * NR).take(count).enumerate() {
                    // The block's pieces, one per scale segment it meets.
                    let mut piece = kb.k0;
                    let mut s = segment;
                    while piece < end {
                        while starts.get(s + 1).is_some_and(|&next| next <= piece) {
                            s += 1;
                        }
                        let piece_end = starts.get(s + 1).map_or(end, |&next| next.min(end));
                        let into = &mut out[(piece - kb.k0) * NR..(piece_end - kb.k0) * NR];
                        widen(
                            j,
                            piece,
                            piece_end - piece,
                            scaled.panel_scales(p + j, s),
                            into,
                        );
                        piece = piece_end;
                    }
                    if j + 1 == count {
                        segment = s;
                    }
                }
                let widened_rows = BlockRows {
                    k0: kb.k0,
                    kc: kb.kc,
                    grouped_rows: 0,
                    cols: NR.min(self.n - last * NR),
                    accumulate: kb.k0 > 0,
                    panels: count,
                    panel_stride: KC * NR,
                    scales_stride: 0,
                    scale_rows: 0,
                };
                let null = std::ptr::null();
                let tile = micro_tile::<f32>;
                self.row_tiles(
                    widened.as_ptr(),
                    null,
                    &widened_rows,
                    a,
                    first,
                    rows,
                    p,
                    c,
                    tile,
                );
            }
        });
    }

    /// Every row tile of rows `first..first + rows` over one K block `b` of panel `p`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_tiles<E>(
        &self,
        b: *const E,
        scales: *const f32,
        block: &BlockRows,
        a: &InputRows<'_>,
        first: usize,
        rows: usize,
        p: usize,
        c: OutPtr,
        tile_product: unsafe fn(usize, &Tile<E>),
    ) {
        let mut m0 = first;
        while m0 < first + rows {
            let mr = MR.min(first + rows - m0);
            let mut a_rows = [std::ptr::null(); MR];
            for (r, row) in a_rows.iter_mut().enumerate().take(mr) {
                *row = a.row_ptr(m0 + r).add(block.k0);
            }
            let tile = Tile {
                a: a_rows,
                b,
                scales,
                c: c.ptr.add(m0 * c.ldc + p * NR),
                ldc: c.ldc,
                kc: block.kc,
                grouped_rows: block.grouped_rows,
                cols: block.cols,
                accumulate: block.accumulate,
                prefetch: m0 == first,
                panels: block.panels,
                panel_stride: block.panel_stride,
                scales_stride: block.scales_stride,
                scale_rows: block.scale_rows,
            };
            tile_product(mr, &tile);
            m0 += mr;
        }
    }
}

/// Where one K block of a group of adjacent panels lies.
struct BlockRows {
    k0: usize,
    kc: usize,
    /// The first rows, in whole groups of four of a grouped FP8 panel (0 otherwise).
    grouped_rows: usize,
    /// Valid columns of the group's last panel (the others are whole).
    cols: usize,
    accumulate: bool,
    panels: usize,
    /// Elements from one panel's K block to the next panel's.
    panel_stride: usize,
    /// Scales from one FP8 panel's to the next panel's (same segment).
    scales_stride: usize,
    /// k-rows per scale segment inside the block, whose next segment's scales follow NR
    /// floats on (INT4 nibble tiles reload them); 0: one segment for the whole block.
    scale_rows: usize,
}

/// Adjacent panels computed together.
#[derive(Clone, Copy)]
struct PanelRange {
    first: usize,
    count: usize,
}

/// The most panels [`panels_per_tile`] puts in one tile.
const MAX_TILE_PANELS: usize = 4;

/// Panels side by side in one register tile for a row block of `rows` rows: a tile needs
/// about four independent multiply-add chains to hide the FMA's latency, and one or two rows
/// over one panel have one or two (a batch-1 decode's FP8 tile ran at one k-row per FMA
/// latency, ~4 cycles, until it took four panels at once).
///
/// On AVX-512 a panel row is one zmm, so a 6-row tile over one panel has six chains and takes
/// seven loads (the panel row, six broadcasts) for six FMAs; over two panels it has twelve
/// chains and eight loads for twelve FMAs. AVX2 spends two ymm per panel row and has its
/// twelve chains with one panel, and one row over two panels already has four. A row that
/// widens its panels (bf16, FP8) takes two there: over four its eight sums beside the
/// widening's registers (and FP8's eight scales) overflow AVX2's 16 and the widened rows spill
/// (a one-row tile whose matrix stays in L2 ran 1.65x faster over two panels in bf16, 1.1x in
/// FP8); an f32 row streamed 6% faster over four.
fn panels_per_tile(rows: usize, widens: bool) -> usize {
    match rows {
        1 if super::has_avx512() || !widens => 4,
        1 => 2,
        2 => 2,
        _ if super::has_avx512() => 2,
        _ => 1,
    }
}

thread_local! {
    /// One K block of each FP8 panel of a tile widened to f32 (`KC x NR` each, 16 KiB: two
    /// stay in L1).
    static WIDENED: std::cell::RefCell<Vec<f32>> =
        std::cell::RefCell::new(vec![0.0; MAX_TILE_PANELS * KC * NR]);
}

/// The scales of stacked parts (each row's per segment) laid out as the panels read them:
/// `scales[(panel * segments + segment) * NR + column]`, zero for padding columns.
fn panel_scales(parts: &[&Fp8Matrix], segments: usize) -> Vec<f32> {
    let n: usize = parts.iter().map(|m| m.rows).sum();
    let mut scales = vec![0.0f32; n.div_ceil(NR) * segments * NR];
    let mut row = 0;
    for m in parts {
        for r in 0..m.rows {
            let (panel, column) = (row / NR, row % NR);
            for s in 0..segments {
                scales[(panel * segments + s) * NR + column] = m.scales[r * segments + s];
            }
            row += 1;
        }
    }
    scales
}

/// Widens `kc` k-rows of an FP8 panel into `out`, each value `f32(e4m3) * scale` of its
/// column, as the tiles would.
///
/// SAFETY: `b` points to `kc * NR` bytes and `scales` to NR values.
unsafe fn widen_fp8_block(
    b: *const E4m3,
    scales: *const f32,
    kc: usize,
    grouped_rows: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if grouped_rows > 0 && super::has_fp8_groups() {
            return if super::has_avx512() {
                avx512::widen_fp8_groups(b, scales, kc, grouped_rows, out)
            } else {
                avx2::widen_fp8_groups(b, scales, kc, grouped_rows, out)
            };
        }
        if grouped_rows == 0 && super::has_avx512() {
            return avx512::widen_fp8_block(b, scales, kc, out);
        }
        if grouped_rows == 0 && super::has_avx2_fma() {
            return avx2::widen_fp8_block(b, scales, kc, out);
        }
    }
    let table = e4m3_table();
    for kk in 0..kc {
        for j in 0..NR {
            let byte = *b.add(fp8_position(kk, j, grouped_rows));
            out[kk * NR + j] = table[byte.0 as usize] * *scales.add(j);
        }
    }
}

/// k-rows per group of a grouped FP8 panel.
const FP8_GROUP: usize = 4;

/// Whether FP8 panels are grouped for the in-lane widening: on CPUs whose tiles run it
/// (decided once per process, so packing and tiles agree).
fn fp8_groups_pay() -> bool {
    super::has_fp8_groups()
}

/// Where column `column` of k-row `kk` lies from a K block's start, the block's first
/// `grouped_rows` rows in groups of four: a group's 64 bytes hold 16 four-byte lanes, lane
/// `c` column `c`'s four rows, the first lowest, so that shifts and masks within 32-bit lanes
/// give each row's columns in order (AVX-512: the 16 of a zmm; AVX2: eight per ymm). Rows
/// past the groups are in order, as in an ungrouped panel.
#[inline(always)]
fn fp8_position(kk: usize, column: usize, grouped_rows: usize) -> usize {
    if kk < grouped_rows {
        let (group, row) = (kk / FP8_GROUP, kk % FP8_GROUP);
        group * FP8_GROUP * NR + FP8_GROUP * column + row
    } else {
        kk * NR + column
    }
}

/// Interleaves a packed panel's whole groups of four k-rows (see [`fp8_position`]): each
/// group, four rows of 16 bytes, transposed into 16 columns of four.
fn group_fp8_panel(panel: &mut [E4m3]) {
    let k = panel.len() / NR;
    let grouped_rows = k / FP8_GROUP * FP8_GROUP;
    for group in panel[..grouped_rows * NR].chunks_exact_mut(FP8_GROUP * NR) {
        transpose_fp8_group(group.try_into().expect("a group is 64 bytes"));
    }
}

/// Four rows of 16 bytes into 16 columns of four, with byte and word unpacks (SSE2, which
/// every x86-64 CPU has: a byte at a time made loading an FP8 checkpoint a third slower).
#[cfg(target_arch = "x86_64")]
fn transpose_fp8_group(group: &mut [E4m3; FP8_GROUP * NR]) {
    use std::arch::x86_64::*;
    const _: () = assert!(FP8_GROUP == 4 && NR == 16);
    let at = group.as_mut_ptr().cast::<__m128i>();
    // SAFETY: SSE2 is part of x86-64; the group is 64 bytes, read and written as four
    // unaligned 16-byte vectors.
    unsafe {
        let [r0, r1, r2, r3] = [0, 1, 2, 3].map(|q| _mm_loadu_si128(at.add(q)));
        let (low01, high01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
        let (low23, high23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
        _mm_storeu_si128(at, _mm_unpacklo_epi16(low01, low23));
        _mm_storeu_si128(at.add(1), _mm_unpackhi_epi16(low01, low23));
        _mm_storeu_si128(at.add(2), _mm_unpacklo_epi16(high01, high23));
        _mm_storeu_si128(at.add(3), _mm_unpackhi_epi16(high01, high23));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn transpose_fp8_group(group: &mut [E4m3; FP8_GROUP * NR]) {
    let rows = *group;
    for (i, byte) in rows.iter().enumerate() {
        group[fp8_position(i / NR, i % NR, FP8_GROUP)] = *byte;
    }
}

/// The scales of FP8 panels, as [`Panels::Fp8`] holds them, and their layout.
struct Scaled<'a> {
    segment_starts: &'a [usize],
    scales: &'a [f32],
    grouped: bool,
}

impl Scaled<'_> {
    /// The NR column scales of panel `p` in k segment `segment`.
    fn panel_scales(&self, p: usize, segment: usize) -> *const f32 {
        self.scales[(p * self.segment_starts.len() + segment) * NR..].as_ptr()
    }
}

/// One K block of a panel: `kc` k-rows from `k0`, inside scale segment `segment`.
struct KBlock {
    k0: usize,
    kc: usize,
    segment: usize,
}

/// The K blocks of a panel in ascending k: `KC` k-rows at most, and for FP8 panels cut where
/// a scale segment starts (the chain of multiply-adds over k is the same either way).
struct KBlocks<'a> {
    k: usize,
    k0: usize,
    segment: usize,
    segment_starts: &'a [usize],
}

impl<'a> KBlocks<'a> {
    fn new(k: usize, scaled: Option<&Scaled<'a>>) -> Self {
        Self {
            k,
            k0: 0,
            segment: 0,
            segment_starts: scaled.map_or(&[], |s| s.segment_starts),
        }
    }
}

impl Iterator for KBlocks<'_> {
    type Item = KBlock;

    fn next(&mut self) -> Option<KBlock> {
        if self.k0 >= self.k {
            return None;
        }
        let k0 = self.k0;
        let starts = self.segment_starts;
        while starts.get(self.segment + 1).is_some_and(|&next| next <= k0) {
            self.segment += 1;
        }
        let mut kc = KC.min(self.k - k0);
        if let Some(&next) = starts.get(self.segment + 1) {
            kc = kc.min(next - k0);
        }
        self.k0 += kc;
        Some(KBlock {
            k0,
            kc,
            segment: self.segment,
        })
    }
}

/// Where a product's `[m, n]` values go: row i's first column at `ptr + i * ldc` (`ldc` is
/// more than n for a stacked part's columns).
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    ldc: usize,
}

impl OutPtr {
    fn rows_of(ptr: *mut f32, n: usize) -> Self {
        Self { ptr, ldc: n }
    }

    /// SAFETY: `first` lies within a row.
    unsafe fn columns_from(self, first: usize) -> Self {
        Self {
            ptr: self.ptr.add(first),
            ldc: self.ldc,
        }
    }
}

// SAFETY: used only to write disjoint column ranges from different threads.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Where the `m` rows of a GEMM's input lie: row i holds `k` values from `data[start(i)..]`.
/// Lets a GEMM read one head's columns of a wider row, or an expert's rows of a whole batch,
/// in place instead of from a copy.
#[derive(Clone, Copy, Debug)]
pub struct InputRows<'a> {
    data: &'a [f32],
    stride: usize,
    /// Row i is `data[index[i] * stride..]`; without it, `data[i * stride..]`.
    index: Option<&'a [u32]>,
}

impl<'a> InputRows<'a> {
    /// Row-major `[m, k]`.
    pub fn contiguous(data: &'a [f32], k: usize) -> Self {
        Self::strided(data, k)
    }

    /// Row i starts at `data[i * stride]` (a column block of wider rows: pass the slice that
    /// starts at the block's first column).
    pub fn strided(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            stride,
            index: None,
        }
    }

    /// Row i is row `index[i]` of `data` (rows `stride` apart): a gather without the copy.
    pub fn gathered(data: &'a [f32], stride: usize, index: &'a [u32]) -> Self {
        Self {
            data,
            stride,
            index: Some(index),
        }
    }

    /// Panics unless all `m` rows of `k` values lie inside `data`.
    fn check(&self, m: usize, k: usize) {
        if m == 0 || k == 0 {
            return;
        }
        let last = match self.index {
            Some(index) => {
                assert_eq!(index.len(), m, "row index length does not match m");
                index.iter().copied().max().unwrap_or(0) as usize
            }
            None => m - 1,
        };
        assert!(
            last * self.stride + k <= self.data.len(),
            "input rows do not fit in their buffer (m {m}, k {k}, stride {})",
            self.stride
        );
    }

    /// SAFETY: `i` is below the `m` that [`Self::check`] accepted.
    unsafe fn row_ptr(&self, i: usize) -> *const f32 {
        let row = match self.index {
            Some(index) => *index.get_unchecked(i) as usize,
            None => i,
        };
        self.data.as_ptr().add(row * self.stride)
    }
}

/// One register tile: up to MR rows of A times the NR-wide slices of one to four adjacent
/// panels (`panels`).
struct Tile<E> {
    /// Each row's first value of this K block (only the first `mr` are used).
    a: [*const f32; MR],
    b: *const E,
    /// FP8 panels: the NR columns' scales of this K block's segment (null otherwise).
    scales: *const f32,
    c: *mut f32,
    ldc: usize,
    kc: usize,
    /// The first k-rows that lie in whole groups of four of a grouped FP8 panel (a multiple
    /// of four; 0 for other panels): the rest are in order.
    grouped_rows: usize,
    /// Valid columns in this panel (the rest is padding and is not stored).
    cols: usize,
    /// Add to the partial sums already in C (a later K block) instead of starting from zero.
    accumulate: bool,
    /// Prefetch the panel ahead of the k-row being multiplied: set for the first row tile of a
    /// K block, the one that brings the slice in from memory (the others find it in L1).
    /// Decode-sized GEMMs stream every weight from DRAM, and the hardware prefetcher stops at
    /// each 4 KiB page: 8-row GEMMs on cold weights ran ~20% faster with it, a batch-32
    /// decode's routed experts ~10% (docs/performance.md).
    prefetch: bool,
    /// Adjacent panels in this tile (see `panels_per_tile`): panel j's K block is at
    /// `b + j * panel_stride`, its scales at `scales + j * scales_stride`, its columns at
    /// `c + j * NR`; only the last may have fewer than NR valid columns (`cols`).
    panels: usize,
    panel_stride: usize,
    scales_stride: usize,
    /// As [`BlockRows::scale_rows`].
    scale_rows: usize,
}

impl<E> Tile<E> {
    /// The first `R` rows of A (the SIMD tiles' const row count), as an array.
    #[inline(always)]
    fn a_rows<const R: usize>(&self) -> [*const f32; R] {
        std::array::from_fn(|r| self.a[r])
    }

    /// Panel `j` of this tile as a one-panel tile.
    ///
    /// SAFETY: `j < self.panels`.
    unsafe fn panel(&self, j: usize) -> Tile<E> {
        let last = j + 1 == self.panels;
        Tile {
            a: self.a,
            b: self.b.add(j * self.panel_stride),
            scales: if self.scales.is_null() {
                self.scales
            } else {
                self.scales.add(j * self.scales_stride)
            },
            c: self.c.add(j * NR),
            ldc: self.ldc,
            kc: self.kc,
            grouped_rows: self.grouped_rows,
            cols: if last { self.cols } else { NR },
            accumulate: self.accumulate,
            prefetch: self.prefetch,
            panels: 1,
            panel_stride: 0,
            scales_stride: 0,
            scale_rows: self.scale_rows,
        }
    }
}

/// How far ahead the first row tile prefetches: about what one core has in flight from DRAM
/// (~100 ns at ~10 GB/s). 512 and 2048 measured no better.
const PREFETCH_AHEAD_BYTES: usize = 1024;

/// The weight streams of a tile's panels, for software prefetch: one hint per cache line of
/// each panel, `PREFETCH_AHEAD_BYTES` ahead of the k-row being multiplied, and at a panel's
/// first K block its first lines too (until then nothing has asked for them; a batch-1 FP8
/// decode step ran ~5% faster with them).
#[cfg(target_arch = "x86_64")]
struct PanelLines<E> {
    b: *const E,
    panels: usize,
    stride: usize,
    krows_per_line: usize,
}

#[cfg(target_arch = "x86_64")]
impl<E> PanelLines<E> {
    fn new(b: *const E, panels: usize, stride: usize) -> Self {
        Self {
            b,
            panels,
            stride,
            krows_per_line: (64 / (NR * std::mem::size_of::<E>())).max(1),
        }
    }

    /// A tile's panel streams, their first lines hinted where the tile is the row tile that
    /// brings a panel's first K block in (`Tile::prefetch`, not `Tile::accumulate`). `panels`
    /// is the SIMD tile's const count (`Tile::panels`), so that the hints' loops unroll: over
    /// the runtime count the AVX2 one-row tile ran a quarter slower.
    #[inline(always)]
    fn of_tile(t: &Tile<E>, panels: usize) -> Self {
        debug_assert_eq!(panels, t.panels);
        let lines = Self::new(t.b, panels, t.panel_stride);
        if t.prefetch && !t.accumulate {
            lines.prefetch_starts();
        }
        lines
    }

    fn line(&self, panel: usize, kk: usize) -> *const i8 {
        self.b.wrapping_add(panel * self.stride + kk * NR) as *const i8
    }

    #[inline(always)]
    fn prefetch_starts(&self) {
        for j in 0..self.panels {
            for offset in (0..PREFETCH_AHEAD_BYTES).step_by(64) {
                // SAFETY: a prefetch hint never faults, whatever the address.
                unsafe { prefetch(self.line(j, 0).wrapping_add(offset)) };
            }
        }
    }

    #[inline(always)]
    fn prefetch_ahead_of(&self, kk: usize) {
        if kk.is_multiple_of(self.krows_per_line) {
            for j in 0..self.panels {
                // SAFETY: as above.
                unsafe { prefetch(self.line(j, kk).wrapping_add(PREFETCH_AHEAD_BYTES)) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(at: *const i8) {
    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at);
}

unsafe fn micro_tile<E: PanelElement>(mr: usize, t: &Tile<E>) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! dispatch {
            ($isa:ident) => {
                match (mr, t.panels) {
                    (6, 1) => return $isa::tile::<6, 1, E>(t),
                    (6, 2) => return $isa::tile::<6, 2, E>(t),
                    (5, 2) => return $isa::tile::<5, 2, E>(t),
                    (4, 2) => return $isa::tile::<4, 2, E>(t),
                    (3, 2) => return $isa::tile::<3, 2, E>(t),
                    (5, 1) => return $isa::tile::<5, 1, E>(t),
                    (4, 1) => return $isa::tile::<4, 1, E>(t),
                    (3, 1) => return $isa::tile::<3, 1, E>(t),
                    (2, 1) => return $isa::tile::<2, 1, E>(t),
                    (2, 2) => return $isa::tile::<2, 2, E>(t),
                    (1, 1) => return $isa::tile::<1, 1, E>(t),
                    (1, 2) => return $isa::tile::<1, 2, E>(t),
                    (1, 3) => return $isa::tile::<1, 3, E>(t),
                    (1, 4) => return $isa::tile::<1, 4, E>(t),
                    _ => {}
                }
            };
        }
        if E::FP8 && t.grouped_rows > 0 {
            // SAFETY: E is E4m3, the only FP8 panel element.
            let t = &*(t as *const Tile<E>).cast::<Tile<E4m3>>();
            macro_rules! dispatch_groups {
                ($isa:ident) => {
                    match (mr, t.panels) {
                        (1, 4) => return $isa::tile_fp8_groups::<1, 4>(t),
                        (1, 3) => return $isa::tile_fp8_groups::<1, 3>(t),
                        (1, 2) => return $isa::tile_fp8_groups::<1, 2>(t),
                        (1, 1) => return $isa::tile_fp8_groups::<1, 1>(t),
                        (2, 2) => return $isa::tile_fp8_groups::<2, 2>(t),
                        (2, 1) => return $isa::tile_fp8_groups::<2, 1>(t),
                        (3, 2) => return $isa::tile_fp8_groups::<3, 2>(t),
                        (3, 1) => return $isa::tile_fp8_groups::<3, 1>(t),
                        (4, 2) => return $isa::tile_fp8_groups::<4, 2>(t),
                        (4, 1) => return $isa::tile_fp8_groups::<4, 1>(t),
                        (5, 2) => return $isa::tile_fp8_groups::<5, 2>(t),
                        (5, 1) => return $isa::tile_fp8_groups::<5, 1>(t),
                        (6, 2) => return $isa::tile_fp8_groups::<6, 2>(t),
                        (6, 1) => return $isa::tile_fp8_groups::<6, 1>(t),
                        _ => {}
                    }
                };
            }
            if super::has_fp8_groups() {
                if super::has_avx512() {
                    dispatch_groups!(avx512);
                } else {
                    dispatch_groups!(avx2);
                }
            }
            // Grouped panels are made only where the tiles above run (`fp8_groups_pay`).
            debug_assert!(false, "no grouped FP8 tile for {mr} rows over {}", t.panels);
            for j in 0..t.panels {
                portable_tile(mr, &t.panel(j));
            }
            return;
        }
        if super::has_avx512() {
            dispatch!(avx512);
        } else if super::has_avx2_fma() {
            dispatch!(avx2);
        }
        // Every shape `panels_per_tile` makes has an arm above: the portable tile gives the
        // same values at a tenth of the speed, so a missing arm would only show as slowness.
        debug_assert!(
            !super::has_avx2_fma(),
            "no SIMD tile for {mr} rows over {} panels",
            t.panels
        );
    }
    for j in 0..t.panels {
        portable_tile(mr, &t.panel(j));
    }
}

/// The same FMA chain as the SIMD path, one element at a time.
unsafe fn portable_tile<E: PanelElement>(mr: usize, t: &Tile<E>) {
    for r in 0..mr {
        for j in 0..t.cols {
            let c = t.c.add(r * t.ldc + j);
            let mut acc = if t.accumulate { *c } else { 0.0 };
            let scale = if E::FP8 { *t.scales.add(j) } else { 1.0 };
            for kk in 0..t.kc {
                let at = if E::FP8 {
                    fp8_position(kk, j, t.grouped_rows)
                } else {
                    kk * NR + E::slot(j)
                };
                let mut w = (*t.b.add(at)).widen();
                if E::FP8 {
                    w *= scale;
                }
                acc = (*t.a[r].add(kk)).mul_add(w, acc);
            }
            *c = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

mod int4;

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fp8_matrix, pseudo_random};

    fn reference(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn matches_reference_on_ragged_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (6, 16, 256),
            (1, 40, 513),
        ] {
            let a = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let c = PackedMatrix::from_rows(&w, n, k).matmul(&a, m);
            let r = reference(&a, &w, m, n, k);
            for (x, y) in c.iter().zip(&r) {
                assert!((x - y).abs() < 1e-4, "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn rows_are_batch_invariant_bitwise() {
        let (n, k) = (70, 600);
        let w = PackedMatrix::from_rows(&pseudo_random(n * k, 3), n, k);
        let a = pseudo_random(37 * k, 4);
        let batched = w.matmul(&a, 37);
        for row in [0, 5, 6, 36] {
            let alone = w.matmul(&a[row * k..(row + 1) * k], 1);
            assert_eq!(alone, batched[row * n..(row + 1) * n].to_vec(), "row {row}");
        }
    }

    /// Every batch size from 1 to 14 (one row over four panels, two over two, several row
    /// tiles) gives each row bitwise its product alone, on every panel type, with a partial
    /// last panel.
    #[test]
    fn every_batch_size_tiles_rows_as_alone() {
        let (n, k) = (70, 300);
        let wide = pseudo_random(n * k, 5);
        let bf16 = NativeWeight::Bf16(wide.iter().map(|&x| half::bf16::from_f32(x)).collect());
        let fp8 = NativeWeight::Fp8(fp8_matrix(n, k, (128, 128), 6));
        let matrices = [
            PackedMatrix::from_rows(&wide, n, k),
            PackedMatrix::from_native(&[&bf16], k),
            PackedMatrix::from_native(&[&fp8], k),
        ];
        let a = pseudo_random(14 * k, 7);
        for w in &matrices {
            let alone: Vec<Vec<f32>> = a.chunks_exact(k).map(|row| w.matmul(row, 1)).collect();
            for m in 1..=14 {
                let batched = w.matmul_serial(&a[..m * k], m);
                for (row, expected) in alone.iter().take(m).enumerate() {
                    assert_eq!(
                        &batched[row * n..(row + 1) * n],
                        &expected[..],
                        "{w:?} m {m}"
                    );
                }
            }
        }
    }

    /// Rows read in place (a column block of wider rows, or a gather by index) give bitwise
    /// the product of the same rows copied out first, serial and parallel.
    #[test]
    fn strided_and_gathered_rows_match_copied_rows_bitwise() {
        let (n, k, width, offset) = (40, 300, 420, 70);
        let w = PackedMatrix::from_rows(&pseudo_random(n * k, 11), n, k);
        let wide = pseudo_random(50 * width, 12);
        let copied: Vec<f32> = wide
            .chunks_exact(width)
            .flat_map(|row| row[offset..offset + k].iter().copied())
            .collect();
        let strided = InputRows::strided(&wide[offset..], width);
        assert_eq!(w.matmul_rows(strided, 50), w.matmul(&copied, 50));
        assert_eq!(w.matmul_rows_serial(strided, 50), w.matmul(&copied, 50));

        let index: Vec<u32> = vec![7, 3, 3, 49, 0, 12, 31, 8, 20];
        let gathered: Vec<f32> = index
            .iter()
            .flat_map(|&r| copied[r as usize * k..(r as usize + 1) * k].iter().copied())
            .collect();
        let rows = InputRows::gathered(&copied, k, &index);
        assert_eq!(
            w.matmul_rows(rows, index.len()),
            w.matmul(&gathered, index.len())
        );
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn rows_outside_their_buffer_are_refused() {
        let w = PackedMatrix::from_rows(&pseudo_random(8 * 16, 1), 8, 16);
        let data = pseudo_random(3 * 16, 2);
        w.matmul_rows(InputRows::gathered(&data, 16, &[0, 3]), 2);
    }

    /// Runs the portable tile over every panel and K block, as `product` tiles them.
    fn portable_product<E: PanelElement>(
        panels: &[E],
        a: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for p in 0..n.div_ceil(NR) {
            let cols = NR.min(n - p * NR);
            let mut k0 = 0;
            while k0 < k {
                let kc = KC.min(k - k0);
                for m0 in (0..m).step_by(MR) {
                    let mut rows = [std::ptr::null(); MR];
                    for (r, row) in rows.iter_mut().enumerate().take(MR.min(m - m0)) {
                        *row = a[(m0 + r) * k + k0..].as_ptr();
                    }
                    let t = Tile {
                        a: rows,
                        b: panels[p * k * NR + k0 * NR..].as_ptr(),
                        scales: std::ptr::null(),
                        c: out[m0 * n + p * NR..].as_mut_ptr(),
                        ldc: n,
                        kc,
                        grouped_rows: 0,
                        cols,
                        accumulate: k0 > 0,
                        prefetch: false,
                        panels: 1,
                        panel_stride: 0,
                        scales_stride: 0,
                        scale_rows: 0,
                    };
                    unsafe { portable_tile(MR.min(m - m0), &t) };
                }
                k0 += kc;
            }
        }
        out
    }

    /// Row tiles of several sizes, partial panels, one and two rows, serial and parallel,
    /// against the portable tile.
    #[test]
    fn simd_and_portable_paths_agree_bitwise() {
        for (m, n, k) in [(9, 20, 300), (1, 90, 300), (2, 90, 300), (1, 20, 40)] {
            let a = pseudo_random(m * k, 5);
            let weight = pseudo_random(n * k, 6);
            let w = PackedMatrix::from_rows(&weight, n, k);
            let Panels::F32(panels) = &w.panels else {
                panic!("f32 weights pack as f32")
            };
            assert_eq!(w.matmul(&a, m), portable_product(panels, &a, m, n, k));
            assert_eq!(
                w.matmul_serial(&a, m),
                portable_product(panels, &a, m, n, k)
            );
            let bf16: Vec<half::bf16> = weight.iter().map(|&x| half::bf16::from_f32(x)).collect();
            let w = PackedMatrix::from_native(&[&NativeWeight::Bf16(bf16)], k);
            let Panels::Bf16(panels) = &w.panels else {
                panic!("bf16 weights pack as bf16")
            };
            assert_eq!(w.matmul(&a, m), portable_product(panels, &a, m, n, k));
        }
    }

    /// bf16 panels must give bitwise the products of the same weights widened to f32, on shapes
    /// with partial panels, several K blocks and partial row tiles, serial and parallel.
    #[test]
    fn bf16_panels_match_their_f32_widening_bitwise() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (6, 16, 256),
            (40, 70, 600),
        ] {
            let bf16: Vec<half::bf16> = pseudo_random(n * k, 7)
                .iter()
                .map(|&x| half::bf16::from_f32(x * 3.0))
                .collect();
            let widened: Vec<f32> = bf16.iter().map(|x| x.to_f32()).collect();
            let narrow = PackedMatrix::from_native(&[&NativeWeight::Bf16(bf16)], k);
            let wide = PackedMatrix::from_rows(&widened, n, k);
            assert!(narrow.is_bf16() && !wide.is_bf16());
            assert_eq!(narrow.bytes() * 2, wide.bytes());
            let a = pseudo_random(m * k, 8);
            assert_eq!(narrow.matmul(&a, m), wide.matmul(&a, m), "{m}x{n}x{k}");
            assert_eq!(
                narrow.matmul_serial(&a, m),
                wide.matmul(&a, m),
                "{m}x{n}x{k} serial"
            );
        }
    }

    #[test]
    fn stacked_parts_pack_like_one_matrix() {
        let k = 40;
        let (gate, up) = (pseudo_random(24 * k, 9), pseudo_random(24 * k, 10));
        let to_bf16 =
            |v: &[f32]| -> Vec<half::bf16> { v.iter().map(|&x| half::bf16::from_f32(x)).collect() };
        let (gate16, up16) = (
            NativeWeight::Bf16(to_bf16(&gate)),
            NativeWeight::Bf16(to_bf16(&up)),
        );
        let stacked = PackedMatrix::from_native(&[&gate16, &up16], k);
        let whole: Vec<f32> = gate16.to_f32().into_iter().chain(up16.to_f32()).collect();
        let a = pseudo_random(5 * k, 11);
        assert_eq!(stacked.rows(), 48);
        assert_eq!(
            stacked.matmul(&a, 5),
            PackedMatrix::from_rows(&whole, 48, k).matmul(&a, 5)
        );
        // A part in another type keeps each part in its own: bitwise the same products.
        let mixed = PackedMatrix::from_native(&[&gate16, &NativeWeight::F32(up16.to_f32())], k);
        assert!(!mixed.is_bf16());
        assert_eq!(mixed.matmul(&a, 5), stacked.matmul(&a, 5));
    }

    /// FP8 panels give bitwise the products of the dequantized f32 weights: shapes with
    /// partial panels, partial 128-blocks, several K blocks, row tiles, serial and parallel,
    /// stacked parts, and the transposed per-head slices MLA makes of kv_b.
    #[test]
    fn fp8_panels_match_their_dequantized_weights_bitwise() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (6, 16, 256),
            (40, 70, 600),
        ] {
            // INT4 checkpoints' groups: a row's scale changes every 32 columns (grouped
            // panels) or every 30 (not grouped), several times inside one K block.
            for block in [(1, 32), (1, 30)] {
                let int4 = NativeWeight::Fp8(fp8_matrix(n, k, block, 27));
                let narrow = PackedMatrix::from_native(&[&int4], k);
                let wide = PackedMatrix::from_rows(&int4.to_f32(), n, k);
                let a = pseudo_random(m * k, 28);
                assert_eq!(
                    narrow.matmul(&a, m),
                    wide.matmul(&a, m),
                    "{m}x{n}x{k} {block:?}"
                );
            }
            let fp8 = NativeWeight::Fp8(fp8_matrix(n, k, (128, 128), 21));
            let narrow = PackedMatrix::from_native(&[&fp8], k);
            let wide = PackedMatrix::from_rows(&fp8.to_f32(), n, k);
            assert!(narrow.is_fp8());
            if k >= 128 {
                assert!(narrow.bytes() * 3 < wide.bytes());
            }
            let a = pseudo_random(m * k, 22);
            assert_eq!(narrow.matmul(&a, m), wide.matmul(&a, m), "{m}x{n}x{k}");
            assert_eq!(
                narrow.matmul_serial(&a, m),
                wide.matmul(&a, m),
                "{m}x{n}x{k} serial"
            );
        }
        // Stacked (q_a with kv_a): one GEMM, scales per part.
        let (k, a) = (200, pseudo_random(5 * 200, 23));
        let (x, y) = (
            NativeWeight::Fp8(fp8_matrix(40, k, (128, 128), 24)),
            NativeWeight::Fp8(fp8_matrix(24, k, (128, 128), 25)),
        );
        let stacked = PackedMatrix::from_native(&[&x, &y], k);
        let whole: Vec<f32> = x.to_f32().into_iter().chain(y.to_f32()).collect();
        assert!(stacked.is_fp8());
        assert_eq!(
            stacked.matmul(&a, 5),
            PackedMatrix::from_rows(&whole, 64, k).matmul(&a, 5)
        );
        // FP8 stacked with bf16 (a checkpoint with kv_a in bf16), and with FP8 cut on other k
        // segments: each part stays in its own type, the products are the f32 widening's.
        let bf16 = NativeWeight::Bf16(
            pseudo_random(24 * k, 31)
                .iter()
                .map(|&x| half::bf16::from_f32(x))
                .collect(),
        );
        let other_grid = NativeWeight::Fp8(fp8_matrix(24, k, (128, 64), 32));
        for second in [&bf16, &other_grid] {
            let mixed = PackedMatrix::from_native(&[&x, second], k);
            let whole: Vec<f32> = x.to_f32().into_iter().chain(second.to_f32()).collect();
            let wide = PackedMatrix::from_rows(&whole, 64, k);
            assert!(mixed.bytes() * 2 < wide.bytes(), "{mixed:?} is not widened");
            assert_eq!(mixed.matmul(&a, 5), wide.matmul(&a, 5));
            assert_eq!(mixed.matmul(&a[..k], 1), wide.matmul(&a[..k], 1));
            assert_eq!(mixed.matmul_serial(&a, 5), wide.matmul(&a, 5));
        }
        // kv_b's per-head slice, transposed: its k segments start mid-block (rows 96..288 of a
        // 128-row-blocked matrix).
        let kv_b = NativeWeight::Fp8(fp8_matrix(384, 48, (128, 128), 26));
        let slice = kv_b.transposed_rows(96, 192, 48);
        let packed = PackedMatrix::from_native(&[&slice], 192);
        assert!(packed.is_fp8());
        let a = pseudo_random(9 * 192, 27);
        assert_eq!(
            packed.matmul(&a, 9),
            PackedMatrix::from_rows(&slice.to_f32(), 48, 192).matmul(&a, 9)
        );
    }

    /// The SIMD paths widen e4m3 by moving its bits into an f32's exactly as the table does:
    /// all 254 finite bytes, both signs, against the portable tile, with scales from a
    /// subnormal one to just under the kernel's limit (products rounded into f32 subnormals
    /// too), on every row count of a tile and one to four panels side by side, over K blocks
    /// of 128 and 126 k-rows (whole groups of four and a tail) and, with scale segments of 6
    /// k-rows, panels that cannot be grouped.
    #[test]
    fn fp8_simd_and_portable_paths_agree_bitwise() {
        let k = 254;
        for (n, block_k) in [(300usize, 128usize), (40, 128), (16, 128), (40, 6)] {
            let values: Vec<u8> = (0..n * k)
                .map(|i| ((i * 7) % 254) as u8 ^ ((i & 1) as u8 * 0x80))
                .collect();
            let values: Vec<u8> = values
                .into_iter()
                .map(|b| if b & 0x7f == 0x7f { 0 } else { b })
                .collect();
            let some = [1e-39, 3.7e-5, 0.5, 1e-30, 255.9, 0.013];
            let scales: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(block_k))
                .map(|i| some[i % some.len()])
                .collect();
            let w = NativeWeight::Fp8(Fp8Matrix::from_blocks(
                values,
                n,
                k,
                &scales,
                (128, block_k),
            ));
            let packed = PackedMatrix::from_native(&[&w], k);
            let Panels::Fp8 { grouped, .. } = packed.panels else {
                panic!("FP8 weights pack as FP8")
            };
            assert_eq!(grouped, block_k == 128 && fp8_groups_pay());
            let reference = PackedMatrix::from_rows(&w.to_f32(), n, k);
            let Panels::F32(panels) = &reference.panels else {
                panic!("f32 weights pack as f32")
            };
            for m in [7, 1, 2, 3, 4, 5, 6] {
                let a = pseudo_random(m * k, 28);
                let product = packed.matmul(&a, m);
                let expected = portable_product(panels, &a, m, n, k);
                assert_eq!(product, expected, "{m}x{n}, segments of {block_k}");
            }
        }
    }

    /// Grouping moves each of a panel's whole groups of four k-rows to the positions the
    /// tiles read, and leaves the tail in order.
    #[test]
    fn grouped_panels_hold_each_weight_where_the_tiles_read_it() {
        let k = 10;
        let in_order: Vec<E4m3> = (0..k * NR).map(|i| E4m3(i as u8)).collect();
        let mut grouped = in_order.clone();
        group_fp8_panel(&mut grouped);
        for kk in 0..k {
            for column in 0..NR {
                let at = fp8_position(kk, column, 8);
                assert_eq!(
                    grouped[at],
                    in_order[kk * NR + column],
                    "row {kk}, column {column}"
                );
            }
        }
        assert_eq!(
            grouped[8 * NR..],
            in_order[8 * NR..],
            "the tail stays in order"
        );
        // Column 5's four rows lie in the group's sixth 32-bit lane, the first row lowest.
        assert_eq!(fp8_position(1, 5, 8), 4 * 5 + 1);
        assert_eq!(fp8_position(6, 15, 8), 64 + 4 * 15 + 2);
    }

    /// INT4 matrices (integers in [-8, 7], a scale per group of columns) pack as nibbles at
    /// half FP8's bytes and give bitwise the products of their f32 widening: one to six rows
    /// (the nibble tiles, K blocks cut at every group) and 40 (widened once per K block), odd
    /// k (a last pair with one row), partial panels, groups of 32, 30 and 128, stacked parts,
    /// serial and parallel, and against the portable nibble tile.
    #[test]
    fn int4_panels_match_their_f32_widening_bitwise() {
        use crate::test_support::int4_matrix;
        for &(n, k) in &[
            (17, 45),
            (70, 600),
            (33, 301),
            (40, 64),
            (17, 33),
            (20, 289),
        ] {
            for group in [32, 30, 128] {
                let int4 = NativeWeight::Fp8(int4_matrix(n, k, group, 41));
                let narrow = PackedMatrix::from_native(&[&int4], k);
                let wide = PackedMatrix::from_rows(&int4.to_f32(), n, k);
                assert!(narrow.is_int4(), "{n}x{k} in groups of {group}");
                if k >= 300 {
                    assert!(narrow.bytes() * 5 < wide.bytes(), "{}", narrow.bytes());
                }
                for m in [1, 2, 3, 5, 6, 7, 40] {
                    let a = pseudo_random(m * k, 42);
                    let want = wide.matmul(&a, m);
                    let shape = format!("{m}x{n}x{k} in groups of {group}");
                    assert_eq!(narrow.matmul(&a, m), want, "{shape}");
                    assert_eq!(narrow.matmul_serial(&a, m), want, "{shape} serial");
                }
            }
        }
        // Stacked parts (an expert's gate and up), and the portable tile on one K block.
        let (k, a) = (96, pseudo_random(3 * 96, 43));
        let (x, y) = (
            NativeWeight::Fp8(int4_matrix(20, k, 32, 44)),
            NativeWeight::Fp8(int4_matrix(12, k, 32, 45)),
        );
        let stacked = PackedMatrix::from_native(&[&x, &y], k);
        let whole: Vec<f32> = x.to_f32().into_iter().chain(y.to_f32()).collect();
        assert!(stacked.is_int4());
        let want = PackedMatrix::from_rows(&whole, 32, k).matmul(&a, 3);
        assert_eq!(stacked.matmul(&a, 3), want);
        let Panels::Int4 { values, scales, .. } = &stacked.panels else {
            panic!("INT4 parts stack as INT4")
        };
        let mut portable = vec![0.0f32; 3 * 32];
        for p in 0..2 {
            // SAFETY: panel p's first group (32 k-rows) and its scales, three rows of A.
            unsafe {
                let tile = Tile {
                    a: std::array::from_fn(|r| a[(r % 3) * k..].as_ptr()),
                    b: values[p * (k / 2) * NR..].as_ptr(),
                    scales: scales[p * 3 * NR..].as_ptr(),
                    c: portable[p * NR..].as_mut_ptr(),
                    ldc: 32,
                    kc: 32,
                    grouped_rows: 0,
                    cols: NR,
                    accumulate: false,
                    prefetch: false,
                    panels: 1,
                    panel_stride: 0,
                    scales_stride: 0,
                    scale_rows: 0,
                };
                int4::portable_int4_tile(3, &tile);
            }
        }
        let first_group: Vec<f32> = whole
            .chunks_exact(k)
            .flat_map(|row| {
                row[..32]
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0.0, k - 32))
            })
            .collect();
        let want = PackedMatrix::from_rows(&first_group, 32, k).matmul(&a, 3);
        assert_eq!(portable, want);
    }

    /// A real FP8 matrix (values other than small integers) keeps its FP8 panels.
    #[test]
    fn fp8_matrices_that_are_not_int4_stay_fp8() {
        let fp8 = NativeWeight::Fp8(fp8_matrix(20, 64, (1, 32), 46));
        assert!(PackedMatrix::from_native(&[&fp8], 64).is_fp8());
    }

    /// A scale too large for the kernel's exact widening (2^120 times it overflows) packs the
    /// matrix as its f32 widening instead: the products are the same, bitwise.
    #[test]
    fn fp8_scales_beyond_the_kernel_widen_at_load() {
        let (n, k) = (20, 130);
        let values: Vec<u8> = (0..n * k).map(|i| (i % 119) as u8).collect();
        let w = NativeWeight::Fp8(Fp8Matrix::from_blocks(
            values,
            n,
            k,
            &[0.25, 300.0],
            (128, 128),
        ));
        let packed = PackedMatrix::from_native(&[&w], k);
        assert!(!packed.is_fp8());
        let a = pseudo_random(3 * k, 29);
        let wide = PackedMatrix::from_rows(&w.to_f32(), n, k);
        assert_eq!(packed.matmul(&a, 3), wide.matmul(&a, 3));
        assert_eq!(packed.matmul(&a[..k], 1), wide.matmul(&a[..k], 1));
    }
}
