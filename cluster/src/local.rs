//! A local cluster of real processes on loopback: an etcd server, N expert nodes and a router.
//! `moe up` and the integration tests start clusters with it; dropping it stops every process
//! and removes etcd's data directory.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalClusterSpec {
    pub etcd_bin: PathBuf,
    pub router_bin: PathBuf,
    pub node_bin: PathBuf,
    pub model: PathBuf,
    pub nodes: usize,
    pub cluster: String,
    /// Extra flags for the router, e.g. `--max-waiting 2`.
    pub router_args: Vec<String>,
    /// Extra flags for every node.
    pub node_args: Vec<String>,
    /// Inherit the children's stderr (logs) instead of discarding it.
    pub show_logs: bool,
}

pub struct LocalCluster {
    spec: LocalClusterSpec,
    etcd: Child,
    etcd_dir: PathBuf,
    pub etcd_url: String,
    /// `(node id, process)`; `None` once killed.
    nodes: Vec<(String, Option<Child>)>,
    router: Child,
    /// The router's gRPC `host:port`.
    pub router_addr: String,
}

/// A free loopback port (bound then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `port` accepts connections; false if `child` exits first or time runs out.
fn wait_for_port(port: u16, child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts a throwaway etcd on free ports. A port picked free can be taken by someone else
/// before etcd binds it (tests start clusters in parallel), so a failed start is retried on
/// new ports.
fn start_etcd(bin: &Path) -> std::io::Result<(Child, PathBuf, String)> {
    let mut last = String::new();
    for _ in 0..5 {
        let client_port = free_port()?;
        let peer_port = free_port()?;
        if client_port == peer_port {
            continue;
        }
        let dir = std::env::temp_dir().join(format!(
            "moe-etcd-{}-{client_port}-{peer_port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(bin)
            .args(["--data-dir", &dir.display().to_string()])
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        if wait_for_port(client_port, &mut etcd, Duration::from_secs(30)) {
            return Ok((etcd, dir, client_url));
        }
        let _ = etcd.kill();
        let _ = etcd.wait();
        let _ = std::fs::remove_dir_all(&dir);
        last = format!("etcd did not start on ports {client_port}/{peer_port}");
    }
    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, last))
}

impl LocalCluster {
    pub fn start(spec: LocalClusterSpec) -> std::io::Result<Self> {
        let (etcd, etcd_dir, client_url) = start_etcd(&spec.etcd_bin)?;
        let mut cluster = LocalCluster {
            etcd,
            etcd_dir,
            etcd_url: client_url,
            nodes: Vec::new(),
            router: Command::new("true").spawn()?,
            router_addr: String::new(),
            spec,
        };
        for _ in 0..cluster.spec.nodes {
            cluster.add_node()?;
        }
        let mut router = Command::new(&cluster.spec.router_bin)
            .args(["--model", &cluster.spec.model.display().to_string()])
            .args([
                "--grpc-listen",
                "127.0.0.1:0",
                "--etcd",
                &cluster.etcd_url,
                "--cluster",
                &cluster.spec.cluster,
            ])
            .args(&cluster.spec.router_args)
            .stdout(Stdio::piped())
            .stderr(if cluster.spec.show_logs {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()?;
        let stdout = router
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("router has no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("moe-router listening on ")
            .ok_or_else(|| std::io::Error::other(format!("unexpected router output {line:?}")))?;
        cluster.router_addr = addr.to_string();
        cluster.router = router;
        Ok(cluster)
    }

    /// Starts one more expert node; returns its id.
    pub fn add_node(&mut self) -> std::io::Result<String> {
        let id = format!("node-{}", self.nodes.len());
        let child = Command::new(&self.spec.node_bin)
            .args(["--model", &self.spec.model.display().to_string()])
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
            .stdout(Stdio::null())
            .stderr(if self.spec.show_logs {
                Stdio::inherit()
            } else {
                Stdio::null()
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
        self.router.id()
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
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.router.kill();
        let _ = self.router.wait();
        for (_, child) in self.nodes.iter_mut() {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.etcd_dir);
    }
}
