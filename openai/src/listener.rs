//! The HTTP ports' listener for axum: connections accepted with [`moe_cluster::listener`]'s
//! bounds (open connections, TLS handshakes in progress, handshake deadline), so a client that
//! stalls mid-handshake or floods the port costs a bounded number of tasks, never the accept
//! loop.

use std::net::SocketAddr;
use std::sync::Arc;

use moe_cluster::listener::{accept_bounded, Accepted, ConnectionLimits, ListenerStats};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::rustls;

pub struct BoundedListener {
    local: SocketAddr,
    ready: mpsc::Receiver<Accepted>,
    pub stats: Arc<ListenerStats>,
}

impl BoundedListener {
    /// Accepts on `listener`, over TLS when `tls` is given.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: ConnectionLimits,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (ready, stats) = accept_bounded(listener, tls, limits);
        Ok(Self {
            local,
            ready,
            stats,
        })
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = Accepted;
    type Addr = Option<SocketAddr>;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => {
                let peer = accepted.remote_addr();
                (accepted, peer)
            }
            // The accept loop only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Some(self.local))
    }
}
