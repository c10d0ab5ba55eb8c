//! What an expert node accepts in one dispatch, checked on the frame's borrowed bytes before
//! anything that grows with the frame is allocated.
//!
//! [`crate::frames`] checks that a frame is self-consistent; these rules check it against what
//! the node knows: its batch bound, the model's hidden size, top-k and MoE layers, and the
//! experts it holds in the dispatch's epoch. A router that follows the placement never breaks
//! one, so a violation means a broken or hostile peer: the node ends that stream with
//! INVALID_ARGUMENT and keeps serving every other one. The gRPC stream and the collectives
//! share these checks.

use moe_model::routes::ExpertRoutes;
use moe_model::ModelConfig;
use moe_proto::v1::DispatchBatch;

use crate::frames::{DecodedDispatch, DispatchTag};

/// A node's bounds for one dispatch, fixed at start from the model and its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchRules {
    hidden: usize,
    max_rows: usize,
    top_k: usize,
    /// Indexed by layer: whether it is a MoE layer (routed experts to run).
    moe_layers: Vec<bool>,
}

/// Why a dispatch was refused. Each names only what the router needs to find its own bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("rows of width {got}; this model's hidden size is {want}")]
    Hidden { got: usize, want: usize },
    #[error("{rows} rows exceed this node's batch bound of {max_rows} (--max-batch-rows)")]
    TooManyRows { rows: usize, max_rows: usize },
    #[error("layer {layer} is not a MoE layer of this model")]
    NotMoeLayer { layer: u32 },
    #[error("{field} has {got} bytes; the header implies {want}")]
    Length {
        field: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{pairs} (token, expert) pairs for {rows} rows exceed rows x top-k ({top_k})")]
    TooManyPairs {
        pairs: usize,
        rows: usize,
        top_k: usize,
    },
    #[error("route offsets must start at 0, never decrease and end at the pair count")]
    Offsets,
    #[error("row {row} has {pairs} pairs; a row has 1 to top-k ({top_k})")]
    PairsPerRow {
        row: usize,
        pairs: usize,
        top_k: usize,
    },
    #[error("row {row} names expert {expert} twice")]
    DuplicateExpert { row: usize, expert: u32 },
    #[error("rows sent as bf16 to experts that do not round their inputs to bf16")]
    Bf16Rows,
    #[error("expert {expert} of layer {layer} is not held here in this epoch")]
    ExpertNotHeld { layer: u32, expert: u32 },
    #[error("row {row} has a routing weight that is not finite")]
    NonFiniteWeight { row: usize },
}

impl Violation {
    /// A short label for the refusal counter (`moe_node_invalid_frames_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Violation::Hidden { .. } => "hidden",
            Violation::TooManyRows { .. } => "rows",
            Violation::NotMoeLayer { .. } => "layer",
            Violation::Length { .. } => "length",
            Violation::TooManyPairs { .. } | Violation::PairsPerRow { .. } => "pairs",
            Violation::Offsets => "offsets",
            Violation::DuplicateExpert { .. } => "duplicate_expert",
            Violation::ExpertNotHeld { .. } => "expert_not_held",
            Violation::NonFiniteWeight { .. } => "weight",
            Violation::Bf16Rows => "row_encoding",
        }
    }

    /// Every reason label, for metrics that list each one from the start; the last,
    /// `message_size`, is a message the transport refused before it was read (over the limit
    /// the batch bound implies).
    pub const REASONS: [&'static str; 11] = [
        "hidden",
        "rows",
        "layer",
        "length",
        "pairs",
        "offsets",
        "duplicate_expert",
        "expert_not_held",
        "weight",
        "row_encoding",
        "message_size",
    ];
}

/// Little-endian u32s of a byte slice whose length is a multiple of 4.
fn words(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Bytes a `DispatchBatch` message adds around its payloads (fields, tags, a traceparent).
const MESSAGE_OVERHEAD: usize = 4096;

/// Largest data-plane message a process sizes itself for. A batch bound whose messages would
/// be larger is refused at start (gRPC itself cannot carry more than 4 GiB, and one layer's
/// rows of that size would be a configuration mistake, not a batch).
pub const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// A batch bound too large for the data plane, found at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{flag} {rows} makes data-plane messages of {bytes} bytes with this model (hidden size \
     {hidden}, top-k {top_k}), over the limit of {MAX_MESSAGE_BYTES} bytes: lower {flag}"
)]
pub struct BoundTooLarge {
    pub flag: &'static str,
    pub rows: usize,
    pub hidden: usize,
    pub top_k: usize,
    pub bytes: usize,
}

impl DispatchRules {
    pub fn new(
        hidden: usize,
        max_rows: usize,
        top_k: usize,
        moe_layers: impl IntoIterator<Item = usize>,
    ) -> Self {
        let mut flags = Vec::new();
        for layer in moe_layers {
            if flags.len() <= layer {
                flags.resize(layer + 1, false);
            }
            flags[layer] = true;
        }
        Self {
            hidden,
            max_rows,
            top_k: top_k.max(1),
            moe_layers: flags,
        }
    }

    /// The rules for `config`'s model with a batch bound of `max_rows` rows.
    pub fn for_model(config: &ModelConfig, max_rows: usize) -> Self {
        Self::new(
            config.hidden_size,
            max_rows,
            config.moe.top_k,
            config.moe_layer_indices(),
        )
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Bytes of the largest `DispatchBatch` these rules accept (rows as f32, the routes of
    /// every row at top-k), with room for the message's other fields.
    pub fn max_dispatch_bytes(&self) -> usize {
        let rows = self.max_rows;
        rows.saturating_mul(self.hidden)
            .saturating_mul(4)
            .saturating_add(rows.saturating_add(1).saturating_mul(4))
            .saturating_add(rows.saturating_mul(self.top_k).saturating_mul(8))
            .saturating_add(MESSAGE_OVERHEAD)
    }

    /// Bytes of the largest `CombineBatch` answering such a dispatch (one f32 row per pair).
    pub fn max_combine_bytes(&self) -> usize {
        self.max_rows
            .saturating_mul(self.top_k)
            .saturating_mul(self.hidden)
            .saturating_mul(4)
            .saturating_add(MESSAGE_OVERHEAD)
    }

    /// The message limits these rules imply, or why the bound (given by `flag`) is too large.
    pub fn check_message_limit(&self, flag: &'static str) -> Result<(), BoundTooLarge> {
        let bytes = self.max_dispatch_bytes().max(self.max_combine_bytes());
        if bytes > MAX_MESSAGE_BYTES || self.max_rows > u32::MAX as usize {
            return Err(BoundTooLarge {
                flag,
                rows: self.max_rows,
                hidden: self.hidden,
                top_k: self.top_k,
                bytes,
            });
        }
        Ok(())
    }

    /// A layer's counts, as a header announces them: the layer is a MoE layer, the rows are
    /// within the bound and the pairs within rows x top-k.
    pub fn check_counts(&self, layer: u32, rows: usize, pairs: usize) -> Result<(), Violation> {
        if !self
            .moe_layers
            .get(layer as usize)
            .copied()
            .unwrap_or(false)
        {
            return Err(Violation::NotMoeLayer { layer });
        }
        if rows > self.max_rows {
            return Err(Violation::TooManyRows {
                rows,
                max_rows: self.max_rows,
            });
        }
        if pairs > rows.saturating_mul(self.top_k) {
            return Err(Violation::TooManyPairs {
                pairs,
                rows,
                top_k: self.top_k,
            });
        }
        Ok(())
    }

    /// Routes as raw little-endian payloads for `rows` rows: offsets (`rows + 1` u32) start at
    /// 0 and end at the pair count, each row has 1 to top-k pairs, its experts are distinct and
    /// `holds(layer, expert)`, and every weight is finite. Reads the bytes in place.
    pub fn check_routes(
        &self,
        layer: u32,
        rows: usize,
        offsets: &[u8],
        experts: &[u8],
        weights: &[u8],
        holds: impl Fn(usize, usize) -> bool,
    ) -> Result<(), Violation> {
        let want_offsets = rows.saturating_add(1).saturating_mul(4);
        if offsets.len() != want_offsets {
            return Err(Violation::Length {
                field: "pair_offsets",
                got: offsets.len(),
                want: want_offsets,
            });
        }
        if !experts.len().is_multiple_of(4) {
            return Err(Violation::Length {
                field: "pair_experts",
                got: experts.len(),
                want: experts.len() / 4 * 4,
            });
        }
        if weights.len() != experts.len() {
            return Err(Violation::Length {
                field: "pair_weights",
                got: weights.len(),
                want: experts.len(),
            });
        }
        let pairs = experts.len() / 4;
        self.check_counts(layer, rows, pairs)?;
        let mut bounds = words(offsets);
        if bounds.next() != Some(0) {
            return Err(Violation::Offsets);
        }
        let mut start = 0usize;
        for (row, end) in bounds.enumerate() {
            let end = end as usize;
            if end < start || end > pairs {
                return Err(Violation::Offsets);
            }
            let count = end - start;
            if count == 0 || count > self.top_k {
                return Err(Violation::PairsPerRow {
                    row,
                    pairs: count,
                    top_k: self.top_k,
                });
            }
            let row_experts = &experts[4 * start..4 * end];
            for (i, expert) in words(row_experts).enumerate() {
                // Rows hold at most top-k pairs: comparing with the earlier ones is cheap.
                if words(&row_experts[..4 * i]).any(|e| e == expert) {
                    return Err(Violation::DuplicateExpert { row, expert });
                }
                if !holds(layer as usize, expert as usize) {
                    return Err(Violation::ExpertNotHeld { layer, expert });
                }
            }
            let finite = weights[4 * start..4 * end]
                .chunks_exact(4)
                .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
            if !finite {
                return Err(Violation::NonFiniteWeight { row });
            }
            start = end;
        }
        if start != pairs {
            return Err(Violation::Offsets);
        }
        Ok(())
    }

    /// The structure of a gRPC dispatch: hidden size, rows, layer and every payload length.
    /// Nothing is allocated; [`CheckedDispatch::check_experts`] then checks the routes against
    /// the experts of the epoch, which the caller finds from the returned tag.
    pub fn check_frame<'a>(
        &self,
        batch: &'a DispatchBatch,
    ) -> Result<CheckedDispatch<'a>, Violation> {
        let hidden = batch.hidden as usize;
        if hidden != self.hidden {
            return Err(Violation::Hidden {
                got: hidden,
                want: self.hidden,
            });
        }
        let rows = batch.rows as usize;
        if rows > self.max_rows {
            return Err(Violation::TooManyRows {
                rows,
                max_rows: self.max_rows,
            });
        }
        let want = rows.saturating_mul(hidden).saturating_mul(4);
        if batch.hidden_states.len() != want {
            return Err(Violation::Length {
                field: "hidden_states",
                got: batch.hidden_states.len(),
                want,
            });
        }
        let pairs = batch.pair_experts.len() / 4;
        self.check_counts(batch.layer, rows, pairs)?;
        Ok(CheckedDispatch {
            batch,
            tag: DispatchTag {
                epoch: batch.epoch,
                step: batch.step,
                layer: batch.layer,
                micro_batch: batch.micro_batch,
            },
            rows,
        })
    }
}

/// A dispatch whose structure passed [`DispatchRules::check_frame`].
#[derive(Debug)]
pub struct CheckedDispatch<'a> {
    batch: &'a DispatchBatch,
    pub tag: DispatchTag,
    pub rows: usize,
}

impl CheckedDispatch<'_> {
    /// The routes against the rules and the experts the node holds in the dispatch's epoch.
    pub fn check_experts(
        &self,
        rules: &DispatchRules,
        holds: impl Fn(usize, usize) -> bool,
    ) -> Result<(), Violation> {
        rules.check_routes(
            self.batch.layer,
            self.rows,
            &self.batch.pair_offsets,
            &self.batch.pair_experts,
            &self.batch.pair_weights,
            holds,
        )
    }

    /// The rows and routes as owned values: the first allocation that grows with the frame,
    /// made only once every check has passed.
    pub fn decode(&self) -> DecodedDispatch {
        let floats = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        DecodedDispatch {
            tag: self.tag,
            hidden: self.batch.hidden as usize,
            rows: floats(&self.batch.hidden_states),
            routes: ExpertRoutes {
                offsets: words(&self.batch.pair_offsets).collect(),
                experts: words(&self.batch.pair_experts).collect(),
                weights: floats(&self.batch.pair_weights),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::encode_dispatch;

    const HIDDEN: usize = 4;
    /// Layers 1 and 3 are MoE layers; experts 0..8 of each, top-2, at most 3 rows.
    fn rules() -> DispatchRules {
        DispatchRules::new(HIDDEN, 3, 2, [1, 3])
    }

    fn holds(layer: usize, expert: usize) -> bool {
        (layer == 1 || layer == 3) && expert < 8
    }

    fn batch(layer: u32, rows: &[&[(u32, f32)]]) -> DispatchBatch {
        let routes = ExpertRoutes::from_rows_as_given(rows);
        let tag = DispatchTag {
            epoch: 1,
            step: 0,
            layer,
            micro_batch: 0,
        };
        let values = vec![0.5f32; rows.len() * HIDDEN];
        encode_dispatch(tag, HIDDEN, &values, &routes)
    }

    const ONE_PAIR: &[(u32, f32)] = &[(1, 1.0)];

    fn check(b: &DispatchBatch) -> Result<DecodedDispatch, Violation> {
        let r = rules();
        let checked = r.check_frame(b)?;
        checked.check_experts(&r, holds)?;
        Ok(checked.decode())
    }

    #[test]
    fn a_valid_dispatch_decodes() {
        let b = batch(1, &[&[(0, 0.5), (7, 0.5)], &[(3, 1.0)]]);
        let d = check(&b).unwrap();
        assert_eq!(d.routes.offsets, [0, 2, 3]);
        assert_eq!(d.routes.experts, [0, 7, 3]);
        assert_eq!(d.rows.len(), 2 * HIDDEN);
    }

    #[test]
    fn each_abuse_has_its_violation() {
        let cases: Vec<(DispatchBatch, &str)> = vec![
            (batch(1, &[&[(0, 0.3), (1, 0.3), (2, 0.4)]]), "pairs"),
            (batch(1, &[&[(4, 0.5), (4, 0.5)]]), "duplicate_expert"),
            (batch(1, &[&[(8, 1.0)]]), "expert_not_held"),
            (batch(0, &[&[(1, 1.0)]]), "layer"),
            (batch(9, &[&[(1, 1.0)]]), "layer"),
            (batch(1, &[&[(1, f32::NAN)]]), "weight"),
            (batch(1, &[&[(1, f32::INFINITY)]]), "weight"),
            (batch(1, &[ONE_PAIR; 4]), "rows"),
            (batch(1, &[&[]]), "pairs"),
        ];
        for (i, (b, reason)) in cases.iter().enumerate() {
            let err = check(b).expect_err(&format!("case {i} passed"));
            assert_eq!(err.reason(), *reason, "case {i}: {err}");
        }
        let mut truncated = batch(1, &[&[(1, 1.0)]]);
        truncated.hidden_states = truncated.hidden_states.slice(..7);
        assert_eq!(check(&truncated).unwrap_err().reason(), "length");
        let mut short_weights = batch(1, &[&[(1, 1.0), (2, 1.0)]]);
        short_weights.pair_weights = short_weights.pair_weights.slice(..4);
        assert_eq!(check(&short_weights).unwrap_err().reason(), "length");
        let mut wide = batch(1, &[&[(1, 1.0)]]);
        wide.hidden = 5;
        assert_eq!(check(&wide).unwrap_err().reason(), "hidden");
    }

    /// One row with a million pairs is refused from the header counts alone, before any
    /// pair is read, whatever the payload holds.
    #[test]
    fn a_million_pairs_are_refused_before_any_pair_is_read() {
        let mut b = batch(1, &[&[(1, 1.0)]]);
        let pairs = 1_000_000u32;
        let mut offsets = Vec::new();
        offsets.extend_from_slice(&0u32.to_le_bytes());
        offsets.extend_from_slice(&pairs.to_le_bytes());
        b.pair_offsets = offsets.into();
        b.pair_experts = vec![0u8; pairs as usize * 4].into();
        b.pair_weights = vec![0u8; pairs as usize * 4].into();
        let r = rules();
        let err = r.check_frame(&b).unwrap_err();
        assert_eq!(
            err,
            Violation::TooManyPairs {
                pairs: pairs as usize,
                rows: 1,
                top_k: 2
            }
        );
    }

    /// By construction, the checks read the frame in place: a frame that passes allocates
    /// only in `decode`, and the holds callback is asked once per pair at most.
    #[test]
    fn checks_ask_each_pair_once() {
        let b = batch(3, &[&[(0, 0.5), (1, 0.5)], &[(2, 1.0)]]);
        let r = rules();
        let asked = std::cell::Cell::new(0);
        r.check_frame(&b)
            .unwrap()
            .check_experts(&r, |l, e| {
                asked.set(asked.get() + 1);
                holds(l, e)
            })
            .unwrap();
        assert_eq!(asked.get(), 3);
    }

    #[test]
    fn message_bounds_follow_the_batch_bound() {
        let r = DispatchRules::new(7168, 512, 8, [3]);
        assert_eq!(r.max_rows(), 512);
        assert!(r.max_dispatch_bytes() >= 512 * 7168 * 4 + 513 * 4 + 512 * 8 * 8);
        assert!(r.max_combine_bytes() >= 512 * 8 * 7168 * 4);
        assert_eq!(r.check_message_limit("--max-batch-rows"), Ok(()));
        let huge = DispatchRules::new(7168, 1 << 20, 8, [3]);
        let err = huge.check_message_limit("--max-batch-rows").unwrap_err();
        assert!(err.to_string().contains("lower --max-batch-rows"), "{err}");
    }
}
