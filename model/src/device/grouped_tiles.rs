//! The row tiles of a grouped GEMM: one launch for every expert of a layer, each block one
//! tile of one expert's rows. The experts' runs of slots (an `ExpertRuns` in expert order)
//! are cut in tiles of `tile_rows`, so that no tile holds two experts' rows; the tables live
//! on the device and each block finds its expert from them (the kernel's `tile_owner`), so the
//! row counts never make a trip to the host. Host-only: the CUDA launch reads these tables,
//! and the tests here check them without a GPU.

use crate::routes::ExpertRun;

/// Per expert run: its first tile, its first slot and its row count; `first_tile` has one
/// more entry, the total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupedRowTiles {
    pub tile_rows: u32,
    /// `first_tile[e]..first_tile[e + 1]`: run e's tiles (empty for an empty run).
    pub first_tile: Vec<u32>,
    pub run_start: Vec<u32>,
    pub run_len: Vec<u32>,
}

/// Where one tile lies: the run (index into the plan's runs), its first slot and its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowTile {
    pub run: usize,
    pub first_slot: usize,
    pub rows: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a grouped GEMM of {0} slots does not fit the device's 32-bit tables")]
pub struct TooManySlots(pub usize);

impl GroupedRowTiles {
    /// Tiles of at most `tile_rows` (> 0) rows over `runs`, in run order.
    pub fn plan(runs: &[ExpertRun], tile_rows: usize) -> Result<Self, TooManySlots> {
        let tile_rows = tile_rows.max(1);
        let slots = runs.iter().map(|r| r.start + r.len).max().unwrap_or(0);
        let tiles: usize = runs.iter().map(|r| r.len.div_ceil(tile_rows)).sum();
        if u32::try_from(slots).is_err() || u32::try_from(tiles).is_err() {
            return Err(TooManySlots(slots));
        }
        let mut first_tile = Vec::with_capacity(runs.len() + 1);
        let mut next = 0u32;
        for run in runs {
            first_tile.push(next);
            next += run.len.div_ceil(tile_rows) as u32;
        }
        first_tile.push(next);
        Ok(Self {
            tile_rows: tile_rows as u32,
            first_tile,
            run_start: runs.iter().map(|r| r.start as u32).collect(),
            run_len: runs.iter().map(|r| r.len as u32).collect(),
        })
    }

    pub fn tiles(&self) -> usize {
        self.first_tile.last().copied().unwrap_or(0) as usize
    }

    /// Slots the runs cover (rows of the launch's input and output).
    pub fn slots(&self) -> usize {
        self.run_start
            .iter()
            .zip(&self.run_len)
            .map(|(&s, &l)| (s + l) as usize)
            .max()
            .unwrap_or(0)
    }

    /// Tile `t`, found as the kernel finds it: the last run whose first tile is at most `t`
    /// (runs without rows share their first tile with the next run, so the last wins).
    pub fn tile(&self, t: usize) -> Option<RowTile> {
        if t >= self.tiles() {
            return None;
        }
        let t = t as u32;
        let runs = self.run_len.len();
        let run = self.first_tile[..runs].partition_point(|&first| first <= t) - 1;
        let within = (t - self.first_tile[run]) * self.tile_rows;
        Some(RowTile {
            run,
            first_slot: (self.run_start[run] + within) as usize,
            rows: (self.run_len[run] - within).min(self.tile_rows) as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::{ExpertRoutes, ExpertRuns};

    fn runs(lens: &[usize]) -> Vec<ExpertRun> {
        crate::test_support::expert_runs(lens)
    }

    /// Every slot lies in exactly one tile, each tile within one run, runs in order; runs
    /// without rows get no tile.
    #[test]
    fn tiles_cover_every_slot_once_and_never_two_experts() {
        for lens in [
            vec![1],
            vec![8],
            vec![9, 0, 3, 17],
            vec![0, 0, 5],
            vec![16, 1, 0, 0, 8],
        ] {
            let plan = GroupedRowTiles::plan(&runs(&lens), 8).unwrap();
            let want: usize = lens.iter().map(|l| l.div_ceil(8)).sum();
            assert_eq!(plan.tiles(), want, "{lens:?}");
            let mut owner = Vec::new();
            for t in 0..plan.tiles() {
                let tile = plan.tile(t).unwrap();
                assert!(
                    tile.rows >= 1 && tile.rows <= 8,
                    "{lens:?} tile {t}: {tile:?}"
                );
                for _ in 0..tile.rows {
                    owner.push(tile.run);
                }
                let run = &runs(&lens)[tile.run];
                assert!(tile.first_slot >= run.start);
                assert!(tile.first_slot + tile.rows <= run.start + run.len);
            }
            let expected: Vec<usize> = lens
                .iter()
                .enumerate()
                .flat_map(|(e, &l)| std::iter::repeat_n(e, l))
                .collect();
            assert_eq!(owner, expected, "{lens:?}");
            assert_eq!(plan.tile(plan.tiles()), None);
        }
        assert_eq!(GroupedRowTiles::plan(&[], 8).unwrap().tiles(), 0);
    }

    /// A routed batch's runs, as the expert FFN plans them.
    #[test]
    fn a_routed_batch_is_tiled_by_expert() {
        let mut routes = ExpertRoutes::with_capacity(20, 40);
        for r in 0..20u32 {
            routes.push_row(&mut [(r % 3, 0.5), (7, 0.5)]);
        }
        let plan = ExpertRuns::from_routes(&routes);
        let tiles = GroupedRowTiles::plan(&plan.runs, 8).unwrap();
        // Experts 0, 1, 2 take 7, 7, 6 rows (one tile each); expert 7 takes all 20 (three).
        assert_eq!(tiles.first_tile, [0, 1, 2, 3, 6]);
        let last = tiles.tile(5).unwrap();
        assert_eq!((last.run, last.rows), (3, 4));
    }
}
