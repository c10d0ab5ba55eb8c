//! A router's dispatch counts (value of `load/<router_id>`), published so that the elected
//! planner balances the load of every router, not only its own.
//!
//! Counts are cumulative since the router started, so the planner takes the difference of two
//! reports it read: a report it missed or read late loses no pair and counts none twice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Largest report written or read: DeepSeek-V3's 58 MoE layers of 256 counts take ~150 KB,
/// and etcd refuses requests over 1.5 MiB.
pub const MAX_LOAD_REPORT_BYTES: usize = 1 << 20;

/// What one router dispatched since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Random per router process start (see [`super::new_instance_id`]): a restarted router
    /// counts from zero again, so its first report is a new baseline, not a negative window.
    pub instance: String,
    /// Per MoE layer: node id to the (token, expert) pairs dispatched to it.
    pub node_pairs: BTreeMap<u32, BTreeMap<String, u64>>,
    /// Per MoE layer: tokens routed to each expert, indexed by expert id.
    pub expert_tokens: BTreeMap<u32, Vec<u64>>,
}

/// Why a stored report was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadReportError {
    #[error("{0} bytes, over the {MAX_LOAD_REPORT_BYTES}-byte bound")]
    TooLarge(usize),
    #[error("malformed: {0}")]
    Malformed(String),
}

impl LoadReport {
    /// The JSON stored in etcd, or why it may not be stored.
    pub fn encode(&self) -> Result<Vec<u8>, LoadReportError> {
        let bytes =
            serde_json::to_vec(self).map_err(|e| LoadReportError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_LOAD_REPORT_BYTES {
            return Err(LoadReportError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Reads a stored report, refusing an oversized one before parsing it.
    pub fn decode(bytes: &[u8]) -> Result<Self, LoadReportError> {
        if bytes.len() > MAX_LOAD_REPORT_BYTES {
            return Err(LoadReportError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| LoadReportError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_and_an_oversized_or_malformed_one_is_refused() {
        let report = LoadReport {
            instance: "r1".into(),
            node_pairs: [(3, [("n1".to_string(), 7u64)].into())].into(),
            expert_tokens: [(3, vec![0, 5, 2])].into(),
        };
        let bytes = report.encode().unwrap();
        assert_eq!(LoadReport::decode(&bytes).unwrap(), report);
        let huge = vec![b' '; MAX_LOAD_REPORT_BYTES + 1];
        assert_eq!(
            LoadReport::decode(&huge),
            Err(LoadReportError::TooLarge(MAX_LOAD_REPORT_BYTES + 1))
        );
        assert!(matches!(
            LoadReport::decode(br#"{"instance": 3}"#),
            Err(LoadReportError::Malformed(_))
        ));
        assert!(matches!(
            LoadReport::decode(
                br#"{"instance": "r", "node_pairs": {}, "expert_tokens": {"1": [-1]}}"#
            ),
            Err(LoadReportError::Malformed(_))
        ));
    }

    #[test]
    fn deepseek_v3_sized_counts_fit_the_bound() {
        let report = LoadReport {
            instance: "0123456789abcdef".into(),
            node_pairs: (3..61)
                .map(|l| {
                    (
                        l,
                        (0..32).map(|n| (format!("node-{n}"), u64::MAX)).collect(),
                    )
                })
                .collect(),
            expert_tokens: (3..61).map(|l| (l, vec![u64::MAX; 256])).collect(),
        };
        let bytes = report.encode().expect("fits");
        assert!(bytes.len() < MAX_LOAD_REPORT_BYTES / 2, "{}", bytes.len());
    }
}
