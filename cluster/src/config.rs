//! Settings every cluster process shares: where etcd is, which cluster, how often to re-read it,
//! which device the math runs on, and the logging setup. Flattened into each binary's clap
//! struct.

use std::path::PathBuf;

use clap::Args;

use crate::discovery::{Discovery, EtcdConnection};

#[derive(Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "MOE_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// Cluster name: the etcd prefix `/moe/<cluster>/`.
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Interval at which membership and placement are re-read.
    #[arg(long, env = "MOE_POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,
    /// CA (PEM) that signed etcd's server certificate: talk to etcd over TLS
    /// (`http://` endpoints become `https://`).
    #[arg(long, env = "MOE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd servers started with `--client-cert-auth`.
    #[arg(long, env = "MOE_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of `--etcd-cert`.
    #[arg(long, env = "MOE_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user, for clusters with authentication enabled.
    #[arg(long, env = "MOE_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (first line). The variable `MOE_ETCD_PASSWORD`
    /// may hold it instead; it is never taken from the command line, where `ps` would show it.
    #[arg(long, env = "MOE_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// Whether etcd is reached with credentials of its own (a client certificate, or a user).
    pub fn authenticates(&self) -> bool {
        self.etcd_cert.is_some() || self.etcd_user.is_some()
    }

    /// Reads the TLS files and the password once, at start-up.
    pub fn connection(&self) -> Result<EtcdConnection, EtcdSettingsError> {
        let identity = crate::tls::identity_from_flags(
            self.etcd_cert.as_deref(),
            self.etcd_key.as_deref(),
            ("--etcd-cert", "--etcd-key"),
        )?;
        let tls = crate::tls::client_tls(self.etcd_ca.as_deref(), identity)?;
        let password = match &self.etcd_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| EtcdSettingsError::Password {
                        path: path.clone(),
                        source,
                    })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            None => std::env::var("MOE_ETCD_PASSWORD").ok(),
        };
        let user = match (&self.etcd_user, password) {
            (Some(user), Some(password)) => Some((user.clone(), password)),
            (Some(_), None) => return Err(EtcdSettingsError::NoPassword),
            (None, _) => None,
        };
        let mut endpoints = self.etcd.clone();
        if tls.is_some() {
            for endpoint in &mut endpoints {
                *endpoint = match endpoint.strip_prefix("http://") {
                    Some(rest) => format!("https://{rest}"),
                    None if !endpoint.contains("://") => format!("https://{endpoint}"),
                    None => endpoint.clone(),
                };
            }
        }
        Ok(EtcdConnection::new(endpoints, tls, user))
    }

    /// Discovery over the etcd these flags name, for cluster `--cluster`.
    pub fn discovery(&self) -> Result<Discovery, EtcdSettingsError> {
        Ok(Discovery::etcd(self.connection()?, &self.cluster))
    }
}

/// Where a process's math runs: a router's dense part, a node's experts, the offline engine's
/// whole model. The same two flags on every binary.
#[derive(Args, Debug, Clone, Copy)]
pub struct DeviceArgs {
    /// Where the math runs: `cpu`, or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    pub device: moe_model::device::Device,
    /// Numerics on a GPU: `bf16x2` (bf16 weights, activations as two bf16 terms: the
    /// reference's results), `bf16` (fastest, not the reference's numerics) or `f32`; the MoE
    /// gate stays f32 either way.
    #[arg(long, env = "MOE_GPU_DTYPE", default_value = "bf16x2")]
    pub gpu_dtype: moe_model::device::GpuDtype,
    /// How the CPU holds weights: `as-stored` (bf16 stays bf16, FP8 stays FP8 with its block
    /// scales; the same products as `f32`, bit for bit), `f32` (widened at load), or `bf16`
    /// (rounded: other numerics for f32 and FP8 checkpoints).
    #[arg(long, env = "MOE_WEIGHTS_DTYPE", default_value = "as-stored")]
    pub weights_dtype: moe_model::checkpoint::WeightsDtype,
    /// How a GPU holds an FP8 checkpoint's matrices (routed experts, and the dense part's
    /// projections): `widen` (f32 at load) or `keep` (FP8 bytes and scales, widened inside the
    /// GEMM kernel, bitwise the CPU's products; experimental: not yet run on a GPU by
    /// `ops/gpu-check.sh`).
    #[arg(long, env = "MOE_GPU_FP8", default_value = "widen")]
    pub gpu_fp8: moe_model::device::GpuFp8,
    /// On a GPU, run every GEMM batch-invariant: the CPU GEMM's chain of multiply-adds (f32
    /// inputs, no split of k), so a token's logits do not depend on its batch-mates, as on the
    /// CPU (which always is). Off by default on GPUs until `ops/gpu-check.sh` has run it and
    /// measured its cost; `--deterministic` (or `=true`) to turn it on.
    #[arg(
        long,
        env = "MOE_DETERMINISTIC",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub deterministic: bool,
    /// On a GPU, run the dense part's decode steps as CUDA graphs: each stretch of a step
    /// between two reads by the host (a MoE layer's routes) captured once per batch size and
    /// replayed, instead of launching every kernel anew (the same results: the same launches
    /// on the same buffers). Off by default until `ops/gpu-check.sh` has run it on a GPU;
    /// `--cuda-graphs` (or `=true`) to turn it on.
    #[arg(
        long,
        env = "MOE_CUDA_GRAPHS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub cuda_graphs: bool,
    /// How a GPU runs a MoE layer's expert GEMMs (bf16 and f32 experts; FP8 kept as FP8 and
    /// `--deterministic` use their own kernels): `lanes` (one cuBLAS GEMM per expert, spread
    /// over streams), `grouped` (all experts of a pass in one `cublasGemmGroupedBatchedEx`
    /// call, cuBLAS 12.5 or later) or `tensor-cores` (bf16 experts, and FP8 ones kept as FP8,
    /// in the `bf16` and `bf16x2` modes through our own tensor-core kernel, one launch a pass,
    /// batch-invariant, inside a decode step's CUDA graph; with `--gpu-fp8 keep` the dense
    /// part's FP8 projections too; compute capability 8.0 or later). The last two are
    /// experimental until `ops/gpu-check.sh` has run them on a GPU.
    #[arg(long, env = "MOE_GPU_EXPERT_GEMM", default_value = "lanes")]
    pub gpu_expert_gemm: moe_model::device::ExpertGemm,
}

impl DeviceArgs {
    /// Opens the device (an error saying why where the GPU, its driver or CUDA support is
    /// missing), and makes every checkpoint this process opens hold its weights as
    /// `--weights-dtype` says.
    pub fn open(&self) -> Result<moe_model::experts::ExpertDevice, moe_model::device::DeviceError> {
        moe_model::checkpoint::set_process_weights_dtype(self.weights_dtype);
        moe_model::device::set_process_gpu_fp8(self.gpu_fp8);
        moe_model::device::set_process_gpu_deterministic(self.deterministic);
        moe_model::device::set_process_gpu_cuda_graphs(self.cuda_graphs);
        moe_model::device::set_process_gpu_expert_gemm(self.gpu_expert_gemm);
        self.device.open_experts(self.gpu_dtype)
    }

    /// `cpu`, or the GPU with its numerics (`cuda:0 (bf16x2)`).
    pub fn describe(&self) -> String {
        match self.device {
            moe_model::device::Device::Cpu => "cpu".into(),
            gpu => {
                let mut modes = vec![self.gpu_dtype.to_string()];
                if self.deterministic {
                    modes.push("deterministic".into());
                }
                if self.cuda_graphs {
                    modes.push("CUDA graphs".into());
                }
                if self.gpu_expert_gemm != moe_model::device::ExpertGemm::Lanes {
                    modes.push(format!("expert GEMMs {}", self.gpu_expert_gemm));
                }
                format!("{gpu} ({})", modes.join(", "))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdSettingsError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("reading the etcd password from {path}: {source}")]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--etcd-user needs a password: --etcd-password-file or MOE_ETCD_PASSWORD")]
    NoPassword,
}

/// Logs to stderr, filtered by `MOE_LOG` (default `default_filter`).
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOE_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Accepted connections of a gRPC server, with Nagle's algorithm off: the data plane sends small
/// frames back and forth, and Nagle plus delayed ACKs would add up to 40 ms to each round trip.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    fn args(flags: &[&str]) -> EtcdArgs {
        let mut argv = vec!["test"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().etcd
    }

    #[test]
    fn plaintext_by_default_and_password_never_printed() {
        let dir = std::env::temp_dir().join(format!("moe-etcd-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = dir.join("password");
        std::fs::write(&password, "hunter2\nignored second line\n").unwrap();
        let connection = args(&[
            "--etcd",
            "http://a:2379,b:2379",
            "--etcd-user",
            "root",
            "--etcd-password-file",
            password.to_str().unwrap(),
        ])
        .connection()
        .unwrap();
        assert_eq!(connection.endpoints(), ["http://a:2379", "b:2379"]);
        assert_eq!(connection.password(), Some("hunter2"));
        assert!(!format!("{connection:?}").contains("hunter2"));
    }

    #[test]
    fn a_user_without_password_and_missing_files_are_errors() {
        if std::env::var_os("MOE_ETCD_PASSWORD").is_none() {
            let err = args(&["--etcd-user", "root"]).connection().unwrap_err();
            assert!(matches!(err, EtcdSettingsError::NoPassword), "{err}");
        }
        let err = args(&["--etcd-ca", "/nonexistent/ca.pem"])
            .connection()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = args(&["--etcd-cert", "/x.pem"]).connection().unwrap_err();
        assert!(err.to_string().contains("--etcd-key"), "{err}");
    }
}
