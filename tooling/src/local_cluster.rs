//! A local cluster of real processes on loopback: an etcd server, N expert nodes and routers.
//! `moe up`, `moe chaos` and the process-level tests start clusters with it; dropping it stops
//! every process and removes etcd's data directory. Its members share a freshly generated
//! cluster token (`--cluster-token-file`), as a deployment's would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::{EtcdServerTls, LocalEtcd};
use crate::member_logs::MemberLogs;
use crate::token_file::ClusterTokenFile;

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterSpec {
    /// The `etcd` program (found on `PATH`, say).
    pub etcd_bin: PathBuf,
    /// The `moe-router` program.
    pub router_bin: PathBuf,
    /// The `moe-expert-node` program.
    pub node_bin: PathBuf,
    /// Checkpoint directory every member loads (`--model`).
    pub model: PathBuf,
    /// Expert nodes started with the cluster.
    pub nodes: usize,
    /// Cluster name (`--cluster`), the etcd prefix its members share.
    pub cluster: String,
    /// Extra flags for the router, e.g. `--max-waiting 2`.
    pub router_args: Vec<String>,
    /// Extra flags for every node.
    pub node_args: Vec<String>,
    /// Inherit the children's stderr (logs) instead of keeping it in files (whose last lines
    /// are printed when the cluster is dropped during a panic).
    pub show_logs: bool,
    /// Serve etcd over TLS (router and nodes then need `--etcd-ca` among their args).
    pub etcd_tls: Option<EtcdServerTls>,
}

/// Where a gateway started by [`LocalCluster::add_gateway`] listens.
#[derive(Debug, Clone)]
pub struct GatewayAddrs {
    /// gRPC `host:port`.
    pub grpc: String,
    /// OpenAI HTTP `host:port`, when started with `--http-listen`.
    pub http: Option<String>,
}

/// A running local cluster; dropping it stops every process it started.
pub struct LocalCluster {
    /// What it was started from (new nodes and routers get the same flags).
    spec: LocalClusterSpec,
    /// The cluster token every router and node is started with (removed on drop).
    token: ClusterTokenFile,
    etcd: LocalEtcd,
    /// Where etcd listens, as the members' `--etcd` flag gives it.
    pub etcd_url: String,
    /// `(node id, process)`; `None` once killed.
    nodes: Vec<(String, Option<Child>)>,
    /// `(gRPC address, process)`; `None` once killed.
    routers: Vec<(String, Option<Child>)>,
    /// The first router's gRPC `host:port`.
    pub router_addr: String,
    /// The first router's HTTP `host:port`, when started with `--http-listen`.
    pub router_http_addr: Option<String>,
    /// `(gRPC address, process)` of each gateway; `None` once killed.
    gateways: Vec<(String, Option<Child>)>,
    /// The members' stderr when not shown (printed if the cluster is dropped in a panic).
    logs: MemberLogs,
}

/// Sends SIGTERM (the polite stop every node treats as a drain).
fn terminate(pid: u32) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a pid of a child we own and a valid signal number.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// Waits up to `timeout` for the child in `slot` to exit, then empties the slot; its exit
/// code (-1 for a signal), or `None` if it still runs or was already gone.
fn wait_exit(slot: &mut Option<Child>, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    let child = slot.as_mut()?;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            *slot = None;
            return Some(status.code().unwrap_or(-1));
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a router and reads the address it printed.
fn start_router(
    spec: &LocalClusterSpec,
    etcd_url: &str,
    token: &Path,
    extra: &[String],
    log: (&MemberLogs, &str),
) -> std::io::Result<(Child, String, Option<String>)> {
    let (logs, name) = log;
    let mut router = Command::new(&spec.router_bin)
        .args(["--model", &spec.model.display().to_string()])
        .args(["--cluster-token-file", &token.display().to_string()])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--etcd",
            etcd_url,
            "--cluster",
            &spec.cluster,
        ])
        .args(&spec.router_args)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(if spec.show_logs {
            Stdio::inherit()
        } else {
            Stdio::from(logs.file(name)?)
        })
        .spawn()?;
    let (addr, http) = read_listening(&mut router, log)?;
    Ok((router, addr, http))
}

/// Reads the addresses a router started with a piped stdout prints: its gRPC `host:port`, and
/// its HTTP one with `--http-listen`. A router that exits first is waited for, and the error
/// quotes the last lines of its log `name` in `logs`.
pub(crate) fn read_listening(
    router: &mut Child,
    (logs, name): (&MemberLogs, &str),
) -> std::io::Result<(String, Option<String>)> {
    let stdout = router
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("router has no stdout"))?;
    // An HTTP line (with `--http-listen`) comes first, then the gRPC one.
    let mut reader = BufReader::new(stdout);
    let mut http = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            let _ = router.wait();
            // Without `show_logs`, the last lines say why a router that stops at start did
            // (a bad flag, a device it cannot open).
            let why = logs.tail(name, 5).join(" | ");
            return Err(std::io::Error::other(format!(
                "router exited before listening{}{why}",
                if why.is_empty() { "" } else { ": " }
            )));
        }
        if let Some(addr) = line.trim().strip_prefix("moe-router http listening on ") {
            http = Some(addr.to_string());
            continue;
        }
        let addr = line
            .trim()
            .strip_prefix("moe-router listening on ")
            .ok_or_else(|| std::io::Error::other(format!("unexpected router output {line:?}")))?;
        return Ok((addr.to_string(), http));
    }
}

impl LocalCluster {
    pub fn start(spec: LocalClusterSpec) -> std::io::Result<Self> {
        let etcd = LocalEtcd::start_with(&spec.etcd_bin, spec.etcd_tls.as_ref())?;
        Self::start_on(spec, etcd)
    }

    /// Starts the nodes and the router on an etcd already running (one the caller prepared,
    /// e.g. with authentication enabled).
    pub fn start_on(spec: LocalClusterSpec, etcd: LocalEtcd) -> std::io::Result<Self> {
        let mut cluster = LocalCluster {
            token: ClusterTokenFile::generate()?,
            etcd_url: etcd.url(),
            etcd,
            nodes: Vec::new(),
            routers: Vec::new(),
            router_addr: String::new(),
            router_http_addr: None,
            gateways: Vec::new(),
            logs: MemberLogs::create()?,
            spec,
        };
        for _ in 0..cluster.spec.nodes {
            cluster.add_node()?;
        }
        cluster.router_addr = cluster.add_router(&[])?;
        Ok(cluster)
    }

    /// Starts one more router on the same etcd and nodes (data-parallel attention); returns
    /// its gRPC address.
    pub fn add_router(&mut self, extra_args: &[String]) -> std::io::Result<String> {
        let name = format!("router-{}", self.routers.len());
        let (child, addr, http) = start_router(
            &self.spec,
            &self.etcd_url,
            self.token.path(),
            extra_args,
            (&self.logs, &name),
        )?;
        self.routers.push((addr.clone(), Some(child)));
        if self.router_http_addr.is_none() {
            self.router_http_addr = http;
        }
        Ok(addr)
    }

    /// SIGKILLs the router listening on `addr`.
    pub fn kill_router(&mut self, addr: &str) {
        if let Some((_, slot)) = self.routers.iter_mut().find(|r| r.0 == addr) {
            if let Some(mut child) = slot.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// SIGSTOPs (`pause: true`) or SIGCONTs the router listening on `addr`: a stopped
    /// router keeps its sockets and answers nothing, as a hung process does.
    pub fn pause_router(&self, addr: &str, pause: bool) {
        #[cfg(unix)]
        if let Some(pid) = self.router_pid_at(addr) {
            let signal = if pause { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: kill(2) with a pid of a child we own and a valid signal number.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    /// SIGTERMs the router listening on `addr` (it finishes its open calls, gives up its
    /// registration, then exits by itself).
    pub fn terminate_router(&mut self, addr: &str) {
        if let Some(pid) = self.router_pid_at(addr) {
            terminate(pid);
        }
    }

    /// The pid of the running router listening on `addr`.
    fn router_pid_at(&self, addr: &str) -> Option<u32> {
        self.routers
            .iter()
            .find(|r| r.0 == addr)
            .and_then(|r| r.1.as_ref())
            .map(|c| c.id())
    }

    /// Waits up to `timeout` for the router on `addr` to exit; its exit code, once it has.
    pub fn wait_router_exit(&mut self, addr: &str, timeout: Duration) -> Option<i32> {
        let (_, slot) = self.routers.iter_mut().find(|r| r.0 == addr)?;
        wait_exit(slot, timeout)
    }

    /// Stops etcd (SIGKILL); [`LocalCluster::restart_etcd`] brings it back with its data.
    pub fn stop_etcd(&mut self) {
        self.etcd.stop();
    }

    pub fn restart_etcd(&mut self) -> std::io::Result<()> {
        let bin = self.spec.etcd_bin.clone();
        self.etcd.restart(&bin)
    }

    /// Starts one more expert node; returns its id.
    pub fn add_node(&mut self) -> std::io::Result<String> {
        self.add_node_with(&[])
    }

    /// Starts one more expert node with flags of its own besides the spec's (e.g. its own
    /// `--metrics-listen` port); returns its id.
    pub fn add_node_with(&mut self, extra_args: &[String]) -> std::io::Result<String> {
        let id = format!("node-{}", self.nodes.len());
        let child = Command::new(&self.spec.node_bin)
            .args(["--model", &self.spec.model.display().to_string()])
            .args([
                "--cluster-token-file",
                &self.token.path().display().to_string(),
            ])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--etcd",
                &self.etcd_url,
                "--cluster",
                &self.spec.cluster,
                "--node-id",
                &id,
            ])
            .args(&self.spec.node_args)
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(if self.spec.show_logs {
                Stdio::inherit()
            } else {
                Stdio::from(self.logs.file(&id)?)
            })
            .spawn()?;
        self.nodes.push((id.clone(), Some(child)));
        Ok(id)
    }

    pub fn node_ids(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.1.is_some())
            .map(|n| n.0.clone())
            .collect()
    }

    /// OS process id of a node (for resident-memory checks).
    pub fn node_pid(&self, node_id: &str) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.0 == node_id)
            .and_then(|n| n.1.as_ref())
            .map(|c| c.id())
    }

    pub fn router_pid(&self) -> u32 {
        self.routers
            .first()
            .and_then(|r| r.1.as_ref())
            .map(|c| c.id())
            .unwrap_or(0)
    }

    /// SIGTERMs a node (it drains, then exits by itself).
    pub fn terminate_node(&mut self, node_id: &str) {
        if let Some(pid) = self.node_pid(node_id) {
            terminate(pid);
        }
    }

    /// Waits up to `timeout` for a node to exit; its exit code, once it has.
    pub fn wait_node_exit(&mut self, node_id: &str, timeout: Duration) -> Option<i32> {
        let (_, slot) = self.nodes.iter_mut().find(|n| n.0 == node_id)?;
        wait_exit(slot, timeout)
    }

    /// Forgets nodes that exited by themselves (after a drain); returns their ids.
    pub fn reap_nodes(&mut self) -> Vec<String> {
        let mut gone = Vec::new();
        for (id, slot) in self.nodes.iter_mut() {
            if let Some(child) = slot.as_mut() {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    *slot = None;
                    gone.push(id.clone());
                }
            }
        }
        gone
    }

    /// SIGKILLs a node.
    pub fn kill_node(&mut self, node_id: &str) {
        if let Some((_, slot)) = self.nodes.iter_mut().find(|n| n.0 == node_id) {
            if let Some(mut child) = slot.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn model(&self) -> &Path {
        &self.spec.model
    }

    /// The gRPC addresses of the routers still running (started here, not killed).
    pub fn router_addrs(&self) -> Vec<String> {
        self.routers
            .iter()
            .filter(|r| r.1.is_some())
            .map(|r| r.0.clone())
            .collect()
    }

    /// Starts a `moe-gateway` (program `gateway_bin`) in front of this cluster's routers,
    /// with the cluster token and `extra` flags; returns its addresses.
    pub fn add_gateway(
        &mut self,
        gateway_bin: &Path,
        extra: &[String],
    ) -> std::io::Result<GatewayAddrs> {
        let name = format!("gateway-{}", self.gateways.len());
        let mut gateway = Command::new(gateway_bin)
            .args(["--model", &self.spec.model.display().to_string()])
            .args([
                "--cluster-token-file",
                &self.token.path().display().to_string(),
            ])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--etcd",
                &self.etcd_url,
                "--cluster",
                &self.spec.cluster,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(if self.spec.show_logs {
                Stdio::inherit()
            } else {
                Stdio::from(self.logs.file(&name)?)
            })
            .spawn()?;
        let stdout = gateway
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("gateway has no stdout"))?;
        let mut reader = BufReader::new(stdout);
        let mut http = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                let _ = gateway.wait();
                let why = self.logs.tail(&name, 5).join(" | ");
                return Err(std::io::Error::other(format!(
                    "gateway exited before listening: {why}"
                )));
            }
            if let Some(addr) = line.trim().strip_prefix("moe-gateway http listening on ") {
                http = Some(addr.to_string());
            }
            if let Some(addr) = line.trim().strip_prefix("moe-gateway listening on ") {
                self.gateways.push((addr.to_string(), Some(gateway)));
                return Ok(GatewayAddrs {
                    grpc: addr.to_string(),
                    http,
                });
            }
        }
    }

    /// The cluster token file the members were started with.
    pub fn token_file(&self) -> &ClusterTokenFile {
        &self.token
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let members = self.routers.iter_mut().chain(self.nodes.iter_mut());
        for (_, child) in self.gateways.iter_mut().chain(members) {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
