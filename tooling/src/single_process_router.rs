//! A router that serves the whole model by itself (`moe-router --in-process-nodes N`): its
//! routed experts run on expert nodes that are threads of it, so there is no etcd and no
//! expert-node process. The process-level tests start one with it; dropping it stops it.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::local_cluster::read_listening;
use crate::member_logs::MemberLogs;

pub struct SingleProcessRouter {
    child: Option<Child>,
    /// gRPC `host:port`.
    pub grpc_addr: String,
    /// OpenAI HTTP `host:port`, when started with `--http-listen`.
    pub http_addr: Option<String>,
    /// Its stderr (printed if dropped during a panic), unless `show_logs`.
    logs: MemberLogs,
}

const LOG: &str = "router";

impl SingleProcessRouter {
    /// Starts `router_bin` on `model` with `nodes` in-process nodes, gRPC on a free loopback
    /// port, and `extra` flags; returns once it listens.
    pub fn start(
        router_bin: &Path,
        model: &Path,
        nodes: usize,
        extra: &[String],
        show_logs: bool,
    ) -> std::io::Result<Self> {
        let logs = MemberLogs::create()?;
        let mut child = Command::new(router_bin)
            .args(["--model", &model.display().to_string()])
            .args(["--in-process-nodes", &nodes.to_string()])
            .args(["--grpc-listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(if show_logs {
                Stdio::inherit()
            } else {
                Stdio::from(logs.file(LOG)?)
            })
            .spawn()?;
        let (grpc_addr, http_addr) = match read_listening(&mut child, (&logs, LOG)) {
            Ok(addrs) => addrs,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            child: Some(child),
            grpc_addr,
            http_addr,
            logs,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `keep` lines of its log (empty with `show_logs`).
    pub fn log_tail(&self, keep: usize) -> Vec<String> {
        self.logs.tail(LOG, keep)
    }
}

impl Drop for SingleProcessRouter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
