//! The GPU kinds the planner knows, as data: datasheet peaks per GPU. What kernels reach of
//! these peaks is in [`crate::efficiency`].

use serde::Serialize;

/// One GPU's peaks. Rates are per direction for links; FLOP/s are dense (no sparsity).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuKind {
    pub name: String,
    pub memory_bytes: f64,
    pub hbm_bytes_per_s: f64,
    pub bf16_flops: f64,
    pub fp8_flops: f64,
    /// NVLink, one direction, to the other GPUs of the machine.
    pub nvlink_bytes_per_s: f64,
    /// The GPU's network card (one per GPU in these machines), one direction.
    pub network_bytes_per_s: f64,
    /// Where the figures come from.
    pub source: &'static str,
}

const GB: f64 = 1e9;
const TERA: f64 = 1e12;

/// The GPU kinds `--gpu` accepts.
pub fn known() -> Vec<GpuKind> {
    vec![
        GpuKind {
            name: "h100".into(),
            memory_bytes: 80.0 * GB,
            hbm_bytes_per_s: 3350.0 * GB,
            bf16_flops: 989.0 * TERA,
            fp8_flops: 1979.0 * TERA,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            source: "NVIDIA H100 SXM datasheet (80 GB HBM3, 3.35 TB/s, 989/1979 dense bf16/FP8 \
                     TFLOP/s, NVLink 900 GB/s both directions); one ConnectX-7 400 Gb/s per GPU \
                     as in DGX H100",
        },
        GpuKind {
            name: "h200".into(),
            memory_bytes: 141.0 * GB,
            hbm_bytes_per_s: 4800.0 * GB,
            bf16_flops: 989.0 * TERA,
            fp8_flops: 1979.0 * TERA,
            nvlink_bytes_per_s: 450.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            source: "NVIDIA H200 SXM datasheet (141 GB HBM3e, 4.8 TB/s, same tensor cores and \
                     NVLink as H100); one ConnectX-7 400 Gb/s per GPU as in DGX H200",
        },
        GpuKind {
            name: "h800".into(),
            memory_bytes: 80.0 * GB,
            hbm_bytes_per_s: 3350.0 * GB,
            bf16_flops: 989.0 * TERA,
            fp8_flops: 1979.0 * TERA,
            nvlink_bytes_per_s: 200.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            source: "NVIDIA H800 SXM (H100 compute and memory, NVLink cut to 400 GB/s both \
                     directions); DeepSeek-V3 technical report 3.1 and DeepEP's README: one \
                     CX7 400 Gb/s InfiniBand card (about 50 GB/s) per GPU",
        },
        GpuKind {
            name: "b200".into(),
            memory_bytes: 180.0 * GB,
            hbm_bytes_per_s: 8000.0 * GB,
            bf16_flops: 2250.0 * TERA,
            fp8_flops: 4500.0 * TERA,
            nvlink_bytes_per_s: 900.0 * GB,
            network_bytes_per_s: 50.0 * GB,
            source: "NVIDIA HGX B200 datasheet (1.44 TB HBM3e and 64 TB/s per 8 GPUs; 2.25/4.5 \
                     dense bf16/FP8 PFLOP/s per GPU, half the sparse figures; NVLink 5 1.8 TB/s \
                     both directions); one ConnectX-7 400 Gb/s per GPU as in DGX B200",
        },
    ]
}

/// The GPU kind named `name` (case-insensitive).
pub fn by_name(name: &str) -> Option<GpuKind> {
    known()
        .into_iter()
        .find(|g| g.name.eq_ignore_ascii_case(name))
}

/// Flag values replacing a kind's figures (units as the flags give them).
#[derive(Debug, Clone, Default)]
pub struct GpuOverrides {
    pub memory_gb: Option<f64>,
    pub hbm_gb_s: Option<f64>,
    pub bf16_tflops: Option<f64>,
    pub fp8_tflops: Option<f64>,
    pub nvlink_gb_s: Option<f64>,
    pub network_gb_s: Option<f64>,
}

impl GpuKind {
    pub fn with(mut self, o: &GpuOverrides) -> Self {
        let set = |field: &mut f64, value: Option<f64>, unit: f64| {
            if let Some(v) = value {
                *field = v * unit;
            }
        };
        set(&mut self.memory_bytes, o.memory_gb, GB);
        set(&mut self.hbm_bytes_per_s, o.hbm_gb_s, GB);
        set(&mut self.bf16_flops, o.bf16_tflops, TERA);
        set(&mut self.fp8_flops, o.fp8_tflops, TERA);
        set(&mut self.nvlink_bytes_per_s, o.nvlink_gb_s, GB);
        set(&mut self.network_bytes_per_s, o.network_gb_s, GB);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_by_name_and_overridden_by_flags() {
        assert!(by_name("H200").is_some());
        assert!(by_name("a100").is_none());
        let g = by_name("h800").unwrap().with(&GpuOverrides {
            network_gb_s: Some(25.0),
            ..Default::default()
        });
        assert_eq!(g.network_bytes_per_s, 25e9);
        assert_eq!(g.hbm_bytes_per_s, 3350e9);
    }
}
