//! Accepting connections with bounds, for every server a cluster process runs (a node's data
//! plane, a router's gRPC and HTTP ports).
//!
//! Connections past `max_connections` are closed at once instead of queueing without end; TLS
//! handshakes run in their own tasks, at most `max_handshakes` at a time, each within
//! `handshake_timeout`, so a client that stalls mid-handshake (or floods the port with
//! half-open connections) costs a bounded number of tasks and never the accept loop. tonic's
//! own TLS has no such bounds, so servers here terminate TLS themselves.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{rustls, server::TlsStream, TlsAcceptor};

/// Bounds on a server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at most; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// TLS handshakes in progress at most; a connection arriving past it is closed.
    pub max_handshakes: usize,
    /// Longest a client may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The public ports' bounds on the command line, shared by routers and gateways.
#[derive(clap::Args, Debug, Clone)]
pub struct PublicPortArgs {
    /// Client connections open at once at most, per public port (gRPC, HTTP, metrics); more
    /// are closed as soon as they are accepted.
    #[arg(long, env = "MOE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// TLS handshakes in progress at once at most, per public port; each must finish within
    /// 10 s.
    #[arg(long, env = "MOE_MAX_TLS_HANDSHAKES", default_value_t = 64)]
    pub max_tls_handshakes: usize,
    /// Concurrent gRPC streams per client connection.
    #[arg(long, env = "MOE_MAX_STREAMS_PER_CONNECTION", default_value_t = 256)]
    pub max_streams_per_connection: u32,
}

impl PublicPortArgs {
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            max_handshakes: self.max_tls_handshakes,
            ..Default::default()
        }
    }
}

/// What a listener refused, for metrics and tests.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections closed because `max_connections` were open.
    pub refused_connections: AtomicU64,
    /// Connections closed because `max_handshakes` were in progress.
    pub refused_handshakes: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub failed_handshakes: AtomicU64,
    /// Connections open now.
    pub open_connections: AtomicU64,
}

/// One accepted connection, plaintext or TLS; it holds its slot until dropped.
pub struct Accepted {
    io: AcceptedIo,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    _slot: ConnectionSlot,
}

enum AcceptedIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection's place under `max_connections`.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ListenerStats>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Accepted {
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.io, AcceptedIo::Tls(_))
    }
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("remote", &self.remote)
            .field("tls", &self.is_tls())
            .finish()
    }
}

/// Accepts on `listener` until the returned receiver is dropped: connections (TLS ones once
/// their handshake completes, when `tls` is given) come out of the receiver.
pub fn accept_bounded(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnectionLimits,
) -> (mpsc::Receiver<Accepted>, Arc<ListenerStats>) {
    let stats = Arc::new(ListenerStats::default());
    // A short queue: a server that stops taking connections stops the accepting too.
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(
        listener,
        tls.map(TlsAcceptor::from),
        limits,
        tx,
        Arc::clone(&stats),
    ));
    (rx, stats)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    ready: mpsc::Sender<Accepted>,
    stats: Arc<ListenerStats>,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ready.closed() => return,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            stats.refused_connections.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, limit = limits.max_connections, "connection refused: too many open");
            continue;
        };
        stats.open_connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot {
            _permit: permit,
            stats: Arc::clone(&stats),
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let Some(acceptor) = tls.clone() else {
            let accepted = Accepted {
                io: AcceptedIo::Plain(tcp),
                local,
                remote: Some(remote),
                _slot: slot,
            };
            if ready.send(accepted).await.is_err() {
                return;
            }
            continue;
        };
        let Ok(handshake) = Arc::clone(&handshakes).try_acquire_owned() else {
            stats.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, limit = limits.max_handshakes, "connection refused: too many TLS handshakes in progress");
            continue;
        };
        let ready = ready.clone();
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let done = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await;
            drop(handshake);
            let stream = match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    stats.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let _ = ready
                .send(Accepted {
                    io: AcceptedIo::Tls(Box::new(stream)),
                    local,
                    remote: Some(remote),
                    _slot: slot,
                })
                .await;
        });
    }
}

/// The accepted connections as the stream tonic's `serve_with_incoming` takes.
pub fn incoming(
    connections: mpsc::Receiver<Accepted>,
) -> impl tokio_stream::Stream<Item = Result<Accepted, io::Error>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(connections).map(Ok)
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: self.remote,
        }
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            AcceptedIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            AcceptedIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            AcceptedIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            AcceptedIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            AcceptedIo::Plain(s) => Pin::new(s).poll_flush(cx),
            AcceptedIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            AcceptedIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            AcceptedIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            AcceptedIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            AcceptedIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            AcceptedIo::Plain(s) => s.is_write_vectored(),
            AcceptedIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Past `max_connections`, new connections are closed at once; a slot frees when its
    /// connection is dropped.
    #[tokio::test]
    async fn connections_past_the_limit_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 2,
            ..Default::default()
        };
        let (mut accepted, stats) = accept_bounded(listener, None, limits);
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = accepted.recv().await.unwrap();
        let _second = accepted.recv().await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte))
            .await
            .expect("the refused connection is closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(stats.refused_connections.load(Ordering::Relaxed), 1);
        assert_eq!(stats.open_connections.load(Ordering::Relaxed), 2);
        drop(first);
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        let mut served = tokio::time::timeout(Duration::from_secs(5), accepted.recv())
            .await
            .unwrap()
            .unwrap();
        fourth.write_all(b"x").await.unwrap();
        served.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
    }

    /// A client that never finishes its TLS handshake is dropped after the timeout, and
    /// handshakes past the cap are refused, while the accept loop keeps going.
    #[tokio::test]
    async fn stalled_handshakes_are_bounded() {
        let dir = std::env::temp_dir().join(format!("moe-listener-{}", std::process::id()));
        let tls = test_server_config(&dir);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnectionLimits {
            max_connections: 16,
            max_handshakes: 2,
            handshake_timeout: Duration::from_millis(300),
        };
        let (_accepted, stats) = accept_bounded(listener, Some(tls), limits);
        // Three silent clients: two hold the handshake slots, the third is refused.
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stats.refused_handshakes.load(Ordering::Relaxed) < 1
            || stats.failed_handshakes.load(Ordering::Relaxed) < 2
        {
            assert!(std::time::Instant::now() < deadline, "{stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn test_server_config(dir: &std::path::Path) -> Arc<rustls::ServerConfig> {
        std::fs::create_dir_all(dir).unwrap();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/tls/make-test-certs.sh");
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let identity =
            crate::tls::PemIdentity::load(&dir.join("public.pem"), &dir.join("public.key"))
                .unwrap();
        crate::tls::server_config(&identity, None, &[b"h2"]).unwrap()
    }
}
