//! The layout of one MoE layer's all-to-all between the router (rank 0) and the nodes.
//!
//! Dispatch: for each node, `rows` hidden states (f32, or bf16: [`RowEncoding`]) and its routes (`rows + 1`
//! offsets, `pairs` expert ids and weights), packed back to back per node so that each peer's
//! share is one contiguous slice of one send buffer. Combine: `pairs` output rows per node, in
//! the order the pairs were sent. The counts go first (a small fixed-size message per node), so
//! each node can size its receive buffers before the data arrives.

use super::row_encoding::RowEncoding;

/// What the router sends one node in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerCounts {
    pub rows: u32,
    pub pairs: u32,
}

impl PeerCounts {
    /// The count message: rows then pairs, little-endian u32.
    pub fn encode(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.rows.to_le_bytes());
        out[4..].copy_from_slice(&self.pairs.to_le_bytes());
        out
    }

    /// Reads a count message; a node checks it against its limits before allocating.
    pub fn decode(bytes: &[u8; 8], max_rows: u32) -> Result<Self, PlanError> {
        let rows = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let pairs = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if rows > max_rows {
            return Err(PlanError::TooManyRows { rows, max_rows });
        }
        if pairs < rows {
            return Err(PlanError::Inconsistent(format!(
                "{pairs} pairs for {rows} rows (each row has at least one)"
            )));
        }
        Ok(Self { rows, pairs })
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{rows} rows exceed the limit of {max_rows}")]
    TooManyRows { rows: u32, max_rows: u32 },
    #[error("inconsistent counts: {0}")]
    Inconsistent(String),
}

/// The largest frame each side of a layer's exchange can legitimately send, from the same
/// batch bound on both sides; each receiver refuses more before allocating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameBounds {
    /// Rank 0 to a node: rows (`rows * hidden * 4`), routes (`4 * (rows + 1) + 8 * pairs`)
    /// or a header.
    pub to_node: u64,
    /// A node to rank 0: outputs (`pairs * hidden * 4`) or the compute trailer.
    pub to_router: u64,
}

impl FrameBounds {
    /// Covers headers and trailers, which are a few dozen bytes.
    pub const MIN: u64 = 4096;

    /// At most `max_rows` rows of `hidden` f32 per layer, each with at most `top_k` pairs.
    pub fn new(max_rows: usize, hidden: usize, top_k: usize) -> Self {
        let (rows, hidden, top_k) = (max_rows as u64, hidden as u64, top_k.max(1) as u64);
        let pairs = rows.saturating_mul(top_k);
        let row_bytes = rows.saturating_mul(hidden).saturating_mul(4);
        let route_bytes = rows
            .saturating_add(1)
            .saturating_mul(4)
            .saturating_add(pairs.saturating_mul(8));
        let output_bytes = pairs.saturating_mul(hidden).saturating_mul(4);
        Self {
            to_node: row_bytes.max(route_bytes).max(Self::MIN),
            to_router: output_bytes.max(Self::MIN),
        }
    }
}

/// Byte ranges of one peer's share in the packed buffers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerSlices {
    pub rank: usize,
    pub counts: PeerCounts,
    /// Hidden states: `rows * hidden * elem` bytes (elem: the peer's [`RowEncoding`]).
    pub hidden: std::ops::Range<usize>,
    /// Route offsets (`rows + 1` u32), experts (`pairs` u32), weights (`pairs` f32).
    pub offsets: std::ops::Range<usize>,
    pub experts: std::ops::Range<usize>,
    pub weights: std::ops::Range<usize>,
    /// Combine outputs coming back: `pairs * hidden * 4` bytes (f32).
    pub outputs: std::ops::Range<usize>,
}

/// One layer's exchange from the router's side: a slice per node (ranks 1..), in rank order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExchangePlan {
    pub peers: Vec<PeerSlices>,
    pub hidden_bytes: usize,
    pub route_bytes: usize,
    pub output_bytes: usize,
}

impl ExchangePlan {
    /// `counts[i]` is what rank `i + 1` gets, its rows encoded as `rows_on_wire[i]` (f32
    /// where it is missing); nodes with nothing to do are skipped (no zero-length send/recv is
    /// posted for them).
    pub fn new(counts: &[PeerCounts], hidden: usize, rows_on_wire: &[RowEncoding]) -> Self {
        let output_row_bytes = hidden * 4;
        let mut plan = Self::default();
        let (mut h, mut r, mut o) = (0usize, 0usize, 0usize);
        for (i, &c) in counts.iter().enumerate() {
            if c.rows == 0 {
                continue;
            }
            let (rows, pairs) = (c.rows as usize, c.pairs as usize);
            let row_bytes = hidden
                * rows_on_wire
                    .get(i)
                    .copied()
                    .unwrap_or_default()
                    .elem_bytes();
            let offsets = r..r + 4 * (rows + 1);
            let experts = offsets.end..offsets.end + 4 * pairs;
            let weights = experts.end..experts.end + 4 * pairs;
            plan.peers.push(PeerSlices {
                rank: i + 1,
                counts: c,
                hidden: h..h + rows * row_bytes,
                offsets,
                experts,
                weights: weights.clone(),
                outputs: o..o + pairs * output_row_bytes,
            });
            h += rows * row_bytes;
            r = weights.end;
            o += pairs * output_row_bytes;
        }
        plan.hidden_bytes = h;
        plan.route_bytes = r;
        plan.output_bytes = o;
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_contiguous_and_skip_idle_nodes() {
        let counts = [
            PeerCounts { rows: 2, pairs: 3 },
            PeerCounts { rows: 0, pairs: 0 },
            PeerCounts { rows: 1, pairs: 1 },
        ];
        // Rank 1 gets bf16 rows, rank 3 f32 ones; outputs are f32 for both.
        let encodings = [RowEncoding::Bf16, RowEncoding::Bf16, RowEncoding::F32];
        let plan = ExchangePlan::new(&counts, 4, &encodings);
        assert_eq!(plan.peers.len(), 2);
        let (a, b) = (&plan.peers[0], &plan.peers[1]);
        assert_eq!((a.rank, b.rank), (1, 3));
        assert_eq!(a.hidden, 0..16);
        assert_eq!(b.hidden, 16..32);
        assert_eq!(plan.hidden_bytes, 32);
        assert_eq!(a.offsets, 0..12);
        assert_eq!(a.experts, 12..24);
        assert_eq!(a.weights, 24..36);
        assert_eq!(b.offsets, 36..44);
        assert_eq!(b.weights.end, plan.route_bytes);
        assert_eq!(a.outputs, 0..48);
        assert_eq!(b.outputs, 48..64);
        assert_eq!(plan.output_bytes, 64);
        // Without encodings every peer's rows are f32.
        assert_eq!(ExchangePlan::new(&counts, 4, &[]).peers[0].hidden, 0..32);
    }

    #[test]
    fn frame_bounds_cover_the_largest_layer() {
        let (rows, hidden, top_k) = (512, 2048, 8);
        let b = FrameBounds::new(rows, hidden, top_k);
        let full = vec![
            PeerCounts {
                rows: rows as u32,
                pairs: (rows * top_k) as u32,
            };
            1
        ];
        let plan = ExchangePlan::new(&full, hidden, &[RowEncoding::F32]);
        assert_eq!(b.to_node, plan.hidden_bytes as u64);
        assert!(b.to_node >= plan.route_bytes as u64);
        assert_eq!(b.to_router, plan.output_bytes as u64);
        // Tiny layers still fit a header or a trailer; huge ones saturate, never wrap.
        assert_eq!(FrameBounds::new(0, 4, 1).to_node, FrameBounds::MIN);
        assert_eq!(
            FrameBounds::new(usize::MAX, usize::MAX, 9).to_router,
            u64::MAX
        );
        // Few rows of a narrow model: the routes are the larger frame.
        let narrow = FrameBounds::new(4, 2, 8);
        let plan = ExchangePlan::new(&[PeerCounts { rows: 4, pairs: 32 }], 2, &[]);
        assert!(narrow.to_node >= plan.route_bytes as u64);
    }

    #[test]
    fn count_messages_round_trip_and_are_checked() {
        let c = PeerCounts { rows: 7, pairs: 9 };
        assert_eq!(PeerCounts::decode(&c.encode(), 8), Ok(c));
        assert!(matches!(
            PeerCounts::decode(&c.encode(), 6),
            Err(PlanError::TooManyRows { .. })
        ));
        let bad = PeerCounts { rows: 5, pairs: 2 };
        assert!(matches!(
            PeerCounts::decode(&bad.encode(), 8),
            Err(PlanError::Inconsistent(_))
        ));
    }
}
