//! A MoE layer's routes planned on the device, from the gate's choices where they lie: so a
//! decode step's routed experts need no trip to the host between the gate and the combine,
//! and can be part of a CUDA graph. The `plan_routes` kernel (gpu/kernels.cu) writes exactly
//! what [`plan_choices`] computes here, step for step: each row's choices in ascending expert
//! id (as [`ExpertRoutes::push_row`] orders them), one run of slots per expert of the layer
//! (empty runs included, so the tables have the same size at every step), slots in pair order
//! within a run (as [`crate::routes::ExpertRuns::from_routes`]), and the grouped GEMM's row
//! tiles ([`GroupedRowTiles`]). Host-only: the tests here check it against the host planning
//! every other path uses.
//!
//! [`ExpertRoutes::push_row`]: crate::routes::ExpertRoutes::push_row

use super::grouped_tiles::GroupedRowTiles;

/// The most choices per row the kernel sorts (in registers).
pub const MAX_PLANNED_TOP_K: usize = 16;

/// The most experts a layer may have for the kernel to plan its routes (its per-warp run
/// counters live in shared memory: 16 warps of 512 counters, 32 KiB); a layer with more
/// keeps the host's routes.
pub const MAX_PLANNED_EXPERTS: usize = 512;

/// What the `plan_routes` kernel writes.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedChoices {
    /// Pair `r * top_k + j`: row r's j-th choice in ascending expert id.
    pub pair_expert: Vec<u32>,
    pub pair_weight: Vec<f32>,
    pub row_of_slot: Vec<u32>,
    pub pair_of_slot: Vec<u32>,
    /// One run per expert of the layer, in expert order.
    pub tiles: GroupedRowTiles,
}

/// Why a layer's choices cannot be planned on the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutePlanError {
    #[error("{choices} choices are not {rows} rows of top-{top_k} (at most {MAX_PLANNED_TOP_K})")]
    Shape {
        choices: usize,
        rows: usize,
        top_k: usize,
    },
    #[error("a choice of expert {expert} in a layer of {experts}")]
    Expert { expert: u32, experts: usize },
}

/// Plans `rows` rows of `top_k` choices each (`chosen[r * top_k + j]`, weights beside them)
/// over the `experts` experts of a layer, in tiles of `tile_rows` rows, as the kernel does.
pub fn plan_choices(
    chosen: &[u32],
    weights: &[f32],
    rows: usize,
    top_k: usize,
    experts: usize,
    tile_rows: usize,
) -> Result<PlannedChoices, RoutePlanError> {
    let pairs = rows * top_k;
    if chosen.len() != pairs || weights.len() != pairs || top_k > MAX_PLANNED_TOP_K {
        return Err(RoutePlanError::Shape {
            choices: chosen.len(),
            rows,
            top_k,
        });
    }
    if let Some(&expert) = chosen.iter().find(|&&e| e as usize >= experts) {
        return Err(RoutePlanError::Expert { expert, experts });
    }
    let tile_rows = tile_rows.max(1);
    // Each row sorted by insertion, moving only past larger ids (stable, as the kernel).
    let (mut pair_expert, mut pair_weight) = (chosen.to_vec(), weights.to_vec());
    for r in 0..rows {
        let row = r * top_k..(r + 1) * top_k;
        let (e, w) = (&mut pair_expert[row.clone()], &mut pair_weight[row]);
        for j in 1..top_k {
            let (ej, wj) = (e[j], w[j]);
            let mut i = j;
            while i > 0 && e[i - 1] > ej {
                e[i] = e[i - 1];
                w[i] = w[i - 1];
                i -= 1;
            }
            e[i] = ej;
            w[i] = wj;
        }
    }
    let mut run_len = vec![0u32; experts];
    for &e in &pair_expert {
        run_len[e as usize] += 1;
    }
    let (mut run_start, mut first_tile) = (Vec::with_capacity(experts), Vec::new());
    let (mut start, mut tile) = (0u32, 0u32);
    for &len in &run_len {
        run_start.push(start);
        first_tile.push(tile);
        start += len;
        tile += len.div_ceil(tile_rows as u32);
    }
    first_tile.push(tile);
    let mut row_of_slot = vec![0u32; pairs];
    let mut pair_of_slot = vec![0u32; pairs];
    let mut next = run_start.clone();
    for (p, &e) in pair_expert.iter().enumerate() {
        let s = next[e as usize] as usize;
        next[e as usize] += 1;
        row_of_slot[s] = (p / top_k.max(1)) as u32;
        pair_of_slot[s] = p as u32;
    }
    Ok(PlannedChoices {
        pair_expert,
        pair_weight,
        row_of_slot,
        pair_of_slot,
        tiles: GroupedRowTiles {
            tile_rows: tile_rows as u32,
            first_tile,
            run_start,
            run_len,
        },
    })
}

/// The most row tiles `slots` slots over `runs` runs can need (each run's last tile may be
/// partial, and at most `min(runs, slots)` runs have slots): a grouped launch over tiles
/// planned on the device is sized for it, its blocks past the plan's tiles doing nothing.
pub fn tile_bound(slots: usize, runs: usize, tile_rows: usize) -> usize {
    slots / tile_rows.max(1) + runs.min(slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{ExpertRoutes, ExpertRun, ExpertRuns};

    /// Pseudo-random top-k choices (distinct experts per row) and weights.
    fn choices(rows: usize, top_k: usize, experts: usize, seed: u64) -> (Vec<u32>, Vec<f32>) {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut chosen, mut weights) = (Vec::new(), Vec::new());
        for _ in 0..rows {
            let mut row: Vec<u32> = Vec::new();
            while row.len() < top_k {
                let e = (next() % experts as u64) as u32;
                if !row.contains(&e) {
                    row.push(e);
                }
            }
            for e in row {
                chosen.push(e);
                weights.push((next() % 1000) as f32 / 1000.0);
            }
        }
        (chosen, weights)
    }

    /// The host planning every other path uses, with an empty run for each expert no row
    /// chose.
    fn host_plan(chosen: &[u32], weights: &[f32], top_k: usize, experts: usize) -> PlannedChoices {
        let rows = chosen.len() / top_k;
        let mut routes = ExpertRoutes::with_capacity(rows, chosen.len());
        for r in 0..rows {
            let mut row: Vec<(u32, f32)> = (r * top_k..(r + 1) * top_k)
                .map(|p| (chosen[p], weights[p]))
                .collect();
            routes.push_row(&mut row);
        }
        let runs = ExpertRuns::from_routes(&routes);
        let mut all = Vec::new();
        let mut start = 0;
        for e in 0..experts as u32 {
            let len = runs
                .runs
                .iter()
                .find(|r| r.expert == e)
                .map_or(0, |r| r.len);
            all.push(ExpertRun {
                expert: e,
                start,
                len,
            });
            start += len;
        }
        PlannedChoices {
            pair_expert: routes.experts,
            pair_weight: routes.weights,
            row_of_slot: runs.row_of_slot,
            pair_of_slot: runs.pair_of_slot,
            tiles: GroupedRowTiles::plan(&all, 8).unwrap(),
        }
    }

    /// The device's plan = the host's routes, runs and tiles, on shapes from one row to a
    /// large decode step, with many experts unchosen and with every expert chosen.
    #[test]
    fn the_device_plan_is_the_host_plan() {
        for (rows, top_k, experts, seed) in [
            (1, 8, 256, 1),
            (4, 2, 8, 2),
            (37, 8, 64, 3),
            (512, 8, 256, 4),
            (8, 6, 6, 5),
            (3, 1, 4, 6),
        ] {
            let (chosen, weights) = choices(rows, top_k, experts, seed);
            let planned = plan_choices(&chosen, &weights, rows, top_k, experts, 8).unwrap();
            let host = host_plan(&chosen, &weights, top_k, experts);
            assert_eq!(planned, host, "{rows} rows of top-{top_k} over {experts}");
            let bound = tile_bound(rows * top_k, experts, 8);
            assert!(planned.tiles.tiles() <= bound, "{rows}x{top_k}/{experts}");
        }
    }

    /// The bound is reached where every expert takes one slot more than whole tiles.
    #[test]
    fn the_tile_bound_holds_at_its_worst() {
        // 4 experts of 9 slots each: 2 tiles each, 8 in all; 36 / 8 + 4 = 8.
        let chosen: Vec<u32> = (0..36).map(|p| p % 4).collect();
        let weights = vec![1.0; 36];
        let planned = plan_choices(&chosen, &weights, 36, 1, 4, 8).unwrap();
        assert_eq!(planned.tiles.tiles(), 8);
        assert_eq!(tile_bound(36, 4, 8), 8);
        for slots in 0..200 {
            for runs in 1..12 {
                // Worst case: slots spread so that as many runs as possible end in a partial
                // tile.
                let worst: usize = (0..runs)
                    .map(|i| slots / runs + usize::from(i < slots % runs))
                    .map(|l| l.div_ceil(8))
                    .sum();
                assert!(worst <= tile_bound(slots, runs, 8), "{slots} over {runs}");
            }
        }
    }

    #[test]
    fn choices_that_do_not_fit_are_refused() {
        let refused = plan_choices(&[1, 2, 3], &[0.5; 3], 2, 2, 4, 8);
        assert!(matches!(refused, Err(RoutePlanError::Shape { .. })));
        let refused = plan_choices(&[1, 9], &[0.5; 2], 1, 2, 4, 8);
        assert_eq!(
            refused,
            Err(RoutePlanError::Expert {
                expert: 9,
                experts: 4
            })
        );
        let wide = vec![0u32; 17];
        let refused = plan_choices(&wide, &[0.0; 17], 1, 17, 32, 8);
        assert!(matches!(refused, Err(RoutePlanError::Shape { .. })));
    }
}
