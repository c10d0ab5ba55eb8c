//! Data-plane frames: building a `DispatchBatch` from rows and routes, and turning one back into
//! typed slices with every length validated against the header before the payload is read.

use bytes::Bytes;
use moe_model::routes::ExpertRoutes;
use moe_proto::v1::{CombineBatch, DispatchBatch, Refusal};

use crate::error::ClusterError;

fn f32_bytes(values: &[f32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

fn u32_bytes(values: &[u32]) -> Bytes {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

fn read_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_u32(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Payload bytes of the dispatch [`encode_dispatch`] builds for `rows` rows carrying `pairs`
/// (row, expert) pairs: each row once (f32), its pair offsets, and each pair's expert id and
/// weight. The capacity planner counts the wire with it.
pub fn dispatch_payload_bytes(rows: usize, pairs: usize, hidden: usize) -> usize {
    rows * hidden * 4 + (rows + 1) * 4 + pairs * 4 + pairs * 4
}

/// Payload bytes of the combine [`encode_combine`] builds: one f32 output row per pair.
pub fn combine_payload_bytes(pairs: usize, hidden: usize) -> usize {
    pairs * hidden * 4
}

/// Where a dispatch sits in the step loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchTag {
    pub epoch: u64,
    pub step: u64,
    pub layer: u32,
    pub micro_batch: u32,
}

/// Encodes rows `[rows, hidden]` and their routes (local expert ids per row).
pub fn encode_dispatch(
    tag: DispatchTag,
    hidden: usize,
    rows: &[f32],
    routes: &ExpertRoutes,
) -> DispatchBatch {
    DispatchBatch {
        epoch: tag.epoch,
        step: tag.step,
        layer: tag.layer,
        micro_batch: tag.micro_batch,
        hidden: hidden as u32,
        rows: routes.rows() as u32,
        hidden_states: f32_bytes(rows),
        pair_offsets: u32_bytes(&routes.offsets),
        pair_experts: u32_bytes(&routes.experts),
        pair_weights: f32_bytes(&routes.weights),
        traceparent: String::new(),
    }
}

/// A validated dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedDispatch {
    pub tag: DispatchTag,
    pub hidden: usize,
    pub rows: Vec<f32>,
    pub routes: ExpertRoutes,
}

/// Validates and decodes a dispatch; `max_hidden` bounds the row width a node accepts.
pub fn decode_dispatch(
    batch: &DispatchBatch,
    max_hidden: usize,
) -> Result<DecodedDispatch, ClusterError> {
    let bad = |m: String| ClusterError::Frame(m);
    let hidden = batch.hidden as usize;
    let rows = batch.rows as usize;
    if hidden == 0 || hidden > max_hidden {
        return Err(bad(format!("hidden {hidden} is not in 1..={max_hidden}")));
    }
    let expected = rows
        .checked_mul(hidden)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| bad("rows x hidden overflows".into()))?;
    if batch.hidden_states.len() != expected {
        return Err(bad(format!(
            "hidden_states has {} bytes, header says {rows} x {hidden} f32 ({expected} bytes)",
            batch.hidden_states.len()
        )));
    }
    if batch.pair_offsets.len() != (rows + 1) * 4 {
        return Err(bad(format!(
            "pair_offsets has {} bytes, want {}",
            batch.pair_offsets.len(),
            (rows + 1) * 4
        )));
    }
    let offsets = read_u32(&batch.pair_offsets);
    if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[0] > w[1]) {
        return Err(bad("pair_offsets must start at 0 and never decrease".into()));
    }
    let pairs = *offsets.last().unwrap_or(&0) as usize;
    if batch.pair_experts.len() != pairs * 4 || batch.pair_weights.len() != pairs * 4 {
        return Err(bad(format!(
            "{pairs} pairs need {} bytes of experts and weights, got {} and {}",
            pairs * 4,
            batch.pair_experts.len(),
            batch.pair_weights.len()
        )));
    }
    Ok(DecodedDispatch {
        tag: DispatchTag {
            epoch: batch.epoch,
            step: batch.step,
            layer: batch.layer,
            micro_batch: batch.micro_batch,
        },
        hidden,
        rows: read_f32(&batch.hidden_states),
        routes: ExpertRoutes {
            offsets,
            experts: read_u32(&batch.pair_experts),
            weights: read_f32(&batch.pair_weights),
        },
    })
}

pub fn encode_combine(tag: DispatchTag, pairs: usize, outputs: &[f32]) -> CombineBatch {
    CombineBatch {
        epoch: tag.epoch,
        step: tag.step,
        layer: tag.layer,
        micro_batch: tag.micro_batch,
        pairs: pairs as u32,
        outputs: f32_bytes(outputs),
        error: String::new(),
        compute_micros: 0,
        refusal: Refusal::Unspecified as i32,
    }
}

/// Text a stale-epoch refusal starts with: what routers before the `refusal` field look for,
/// so that during a rolling upgrade (nodes first) an old router still understands a new node.
/// New routers read only the typed field.
const STALE_EPOCH_TEXT: &str = "FAILED_PRECONDITION";

/// A refusal of a well-formed batch, typed in `refusal` and explained in `error`.
pub fn combine_refusal(tag: DispatchTag, refusal: Refusal, message: &str) -> CombineBatch {
    let error = match refusal {
        Refusal::StaleEpoch => format!("{STALE_EPOCH_TEXT}: {message}"),
        _ => message.to_string(),
    };
    CombineBatch {
        epoch: tag.epoch,
        step: tag.step,
        layer: tag.layer,
        micro_batch: tag.micro_batch,
        pairs: 0,
        outputs: Bytes::new(),
        error,
        compute_micros: 0,
        refusal: refusal as i32,
    }
}

/// Why a combine gave no outputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CombineFailure {
    /// The node does not serve the dispatch's epoch: the router is behind or ahead, the node
    /// is fine.
    #[error("the node does not serve this epoch: {0}")]
    StaleEpoch(String),
    #[error("the node refused the batch: {0}")]
    Refused(String),
    #[error("malformed combine: {0}")]
    Malformed(String),
}

/// Validates a combine against what was dispatched and returns `[pairs, hidden]`.
pub fn decode_combine(
    batch: &CombineBatch,
    tag: DispatchTag,
    pairs: usize,
    hidden: usize,
) -> Result<Vec<f32>, CombineFailure> {
    if !batch.error.is_empty() || batch.refusal != Refusal::Unspecified as i32 {
        return Err(if batch.refusal == Refusal::StaleEpoch as i32 {
            CombineFailure::StaleEpoch(batch.error.clone())
        } else {
            CombineFailure::Refused(batch.error.clone())
        });
    }
    if batch.epoch != tag.epoch
        || batch.step != tag.step
        || batch.layer != tag.layer
        || batch.micro_batch != tag.micro_batch
    {
        return Err(CombineFailure::Malformed(format!(
            "combine for epoch {} step {} layer {} answers dispatch epoch {} step {} layer {}",
            batch.epoch, batch.step, batch.layer, tag.epoch, tag.step, tag.layer
        )));
    }
    if batch.pairs as usize != pairs || batch.outputs.len() != pairs * hidden * 4 {
        return Err(CombineFailure::Malformed(format!(
            "combine carries {} pairs / {} bytes, expected {pairs} pairs of width {hidden}",
            batch.pairs,
            batch.outputs.len()
        )));
    }
    Ok(read_f32(&batch.outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the planner counts are those of the frames the data plane sends.
    #[test]
    fn payload_sizes_are_those_of_the_encoded_frames() {
        let (rows, routes) = sample();
        let hidden = rows.len() / routes.rows();
        let tag = DispatchTag {
            epoch: 1,
            step: 2,
            layer: 3,
            micro_batch: 0,
        };
        let d = encode_dispatch(tag, hidden, &rows, &routes);
        let sent = d.hidden_states.len()
            + d.pair_offsets.len()
            + d.pair_experts.len()
            + d.pair_weights.len();
        assert_eq!(
            sent,
            dispatch_payload_bytes(routes.rows(), routes.pairs(), hidden)
        );
        let outputs = vec![0.5f32; routes.pairs() * hidden];
        let c = encode_combine(tag, routes.pairs(), &outputs);
        assert_eq!(
            c.outputs.len(),
            combine_payload_bytes(routes.pairs(), hidden)
        );
    }

    fn sample() -> (Vec<f32>, ExpertRoutes) {
        let mut routes = ExpertRoutes::with_capacity(2, 3);
        routes.push_row(&mut [(3, 0.5), (1, 0.25)]);
        routes.push_row(&mut [(2, 1.0)]);
        ((0..8).map(|v| v as f32).collect(), routes)
    }

    const TAG: DispatchTag = DispatchTag {
        epoch: 2,
        step: 9,
        layer: 1,
        micro_batch: 0,
    };

    #[test]
    fn dispatch_round_trips() {
        let (rows, routes) = sample();
        let decoded = decode_dispatch(&encode_dispatch(TAG, 4, &rows, &routes), 64).unwrap();
        assert_eq!(decoded.rows, rows);
        assert_eq!(decoded.routes, routes);
        assert_eq!(decoded.tag, TAG);
    }

    #[test]
    fn malformed_dispatches_are_rejected() {
        let (rows, routes) = sample();
        let good = encode_dispatch(TAG, 4, &rows, &routes);
        let mut cases = Vec::new();
        let mut b = good.clone();
        b.rows = 3;
        cases.push(b);
        let mut b = good.clone();
        b.hidden = 0;
        cases.push(b);
        let mut b = good.clone();
        b.hidden_states = b.hidden_states.slice(1..);
        cases.push(b);
        let mut b = good.clone();
        b.pair_offsets = u32_bytes(&[0, 5, 3]);
        cases.push(b);
        let mut b = good.clone();
        b.pair_weights = Bytes::new();
        cases.push(b);
        let mut b = good.clone();
        b.rows = u32::MAX;
        cases.push(b);
        for (i, c) in cases.iter().enumerate() {
            assert!(decode_dispatch(c, 64).is_err(), "case {i}");
        }
    }

    #[test]
    fn combine_must_answer_its_dispatch() {
        let out = vec![1.0f32; 3 * 4];
        let c = encode_combine(TAG, 3, &out);
        assert_eq!(decode_combine(&c, TAG, 3, 4).unwrap(), out);
        assert!(decode_combine(&c, DispatchTag { layer: 2, ..TAG }, 3, 4).is_err());
        assert!(decode_combine(&c, TAG, 2, 4).is_err());
    }

    /// A stale epoch is typed in `refusal` (read as a value), and spelled in `error` the way
    /// routers from before the field recognise it.
    #[test]
    fn refusals_are_typed_and_old_routers_understood() {
        let stale = combine_refusal(TAG, Refusal::StaleEpoch, "epoch 2 is not served here");
        assert_eq!(
            stale.error,
            format!("{STALE_EPOCH_TEXT}: epoch 2 is not served here")
        );
        assert!(matches!(
            decode_combine(&stale, TAG, 0, 4),
            Err(CombineFailure::StaleEpoch(_))
        ));
        // Without the typed field (a node from before it), the text is just a refusal.
        let untyped = CombineBatch {
            refusal: Refusal::Unspecified as i32,
            ..stale
        };
        assert!(matches!(
            decode_combine(&untyped, TAG, 0, 4),
            Err(CombineFailure::Refused(_))
        ));
        let failed = combine_refusal(TAG, Refusal::ExpertFailure, "out of memory");
        assert!(matches!(
            decode_combine(&failed, TAG, 0, 4),
            Err(CombineFailure::Refused(m)) if m == "out of memory"
        ));
    }
}
