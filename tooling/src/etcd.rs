//! A throwaway etcd server on loopback, the discovery store of a local cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports::{free_port, wait_for_port};

/// etcd's server certificate, and the CA its clients' certificates must come from
/// (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA that signed the clients' certificates (PEM).
    pub client_ca: PathBuf,
}

/// A throwaway etcd: its ports and data directory survive a stop, so it can be restarted
/// with its data (the etcd-outage tests). Dropping it stops it and removes its data.
pub struct LocalEtcd {
    /// The server; `None` while stopped.
    child: Option<Child>,
    /// Its data directory, kept across a restart.
    dir: PathBuf,
    /// Where clients connect (kept across a restart, so their URLs stay valid).
    client_port: u16,
    /// Its peer port (a one-member cluster, but etcd binds one).
    peer_port: u16,
    /// Server TLS, when clients must use it.
    tls: Option<EtcdServerTls>,
}

impl LocalEtcd {
    fn spawn(
        bin: &Path,
        dir: &Path,
        client_port: u16,
        peer_port: u16,
        tls: Option<&EtcdServerTls>,
    ) -> std::io::Result<Child> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command = Command::new(bin);
        if let Some(tls) = tls {
            command
                .args(["--cert-file", &tls.cert.display().to_string()])
                .args(["--key-file", &tls.key.display().to_string()])
                .args(["--trusted-ca-file", &tls.client_ca.display().to_string()])
                .arg("--client-cert-auth");
        }
        command
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
            .spawn()
    }

    /// Starts etcd on free ports. A port picked free can be taken by someone else before etcd
    /// binds it (tests start clusters in parallel), so a failed start is retried on new ports.
    pub fn start(bin: &Path) -> std::io::Result<Self> {
        Self::start_with(bin, None)
    }

    /// Like [`LocalEtcd::start`], over TLS when `tls` is given.
    pub fn start_with(bin: &Path, tls: Option<&EtcdServerTls>) -> std::io::Result<Self> {
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
            let mut etcd = Self::spawn(bin, &dir, client_port, peer_port, tls)?;
            // The port answering is not enough: another test's server may have taken it
            // between `free_port` and etcd's bind (etcd then exits, address in use).
            if wait_for_port(client_port, &mut etcd, Duration::from_secs(30))
                && is_etcd(client_port, &mut etcd, tls.is_some())
            {
                return Ok(Self {
                    child: Some(etcd),
                    dir,
                    client_port,
                    peer_port,
                    tls: tls.cloned(),
                });
            }
            let _ = etcd.kill();
            let _ = etcd.wait();
            let _ = std::fs::remove_dir_all(&dir);
            last = format!("etcd did not start on ports {client_port}/{peer_port}");
        }
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, last))
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on its own ports and data. While it was down, a client reconnecting
    /// to its port can hold that very port for a moment (a loopback connect whose ephemeral
    /// port is the one it dials connects to itself), and etcd then exits, address in use: a
    /// failed start is retried for a while.
    pub fn restart(&mut self, bin: &Path) -> std::io::Result<()> {
        self.stop();
        for _ in 0..10 {
            let mut etcd = Self::spawn(
                bin,
                &self.dir,
                self.client_port,
                self.peer_port,
                self.tls.as_ref(),
            )?;
            if wait_for_port(self.client_port, &mut etcd, Duration::from_secs(30))
                && is_etcd(self.client_port, &mut etcd, self.tls.is_some())
            {
                self.child = Some(etcd);
                return Ok(());
            }
            let _ = etcd.kill();
            let _ = etcd.wait();
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(std::io::Error::other("etcd did not restart"))
    }
}

/// Whether the server on `port` is this etcd: still running a moment after the port
/// answered, and (without TLS) answering etcd's `/health`.
fn is_etcd(port: u16, etcd: &mut Child, tls: bool) -> bool {
    use std::io::{Read, Write};
    std::thread::sleep(Duration::from_millis(300));
    if !matches!(etcd.try_wait(), Ok(None)) {
        return false;
    }
    if tls {
        return true;
    }
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut answer = String::new();
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.contains("\"health\"")
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
