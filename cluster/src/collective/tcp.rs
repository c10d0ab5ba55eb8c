//! The TCP [`Communicator`]: the collective data plane for CPU clusters, and the stand-in that
//! lets the per-epoch communicator lifecycle run end to end (processes, etcd, crashes) on
//! machines without GPUs. Same protocol as NCCL, over plain sockets.
//!
//! A star: rank 0 (the router) listens, every other rank connects to it once and says which
//! rank it is and the epoch's nonce (published in etcd with the address), so a stray or stale
//! connection is refused. Each peer connection has a reader thread, which always drains the
//! socket into an inbox, so a send (written directly by the posting thread, one buffered write
//! per frame, flushed once per group) only waits for the peer's kernel buffer, never for the
//! peer to post; the write timeout bounds a peer that stops reading. A frame is a
//! little-endian u64 length and the bytes. A peer that dies closes its socket: the waiting
//! side sees it at once instead of at its deadline.
//!
//! No TLS: a cluster configured with mutual TLS keeps the gRPC data plane.

use std::collections::VecDeque;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::communicator::{CommError, Communicator, Pending};

/// Bytes of the per-epoch secret a joining rank must present.
pub const NONCE_BYTES: usize = 16;
const MAGIC: &[u8; 8] = b"MOECOLL1";
const HELLO_BYTES: usize = 8 + NONCE_BYTES + 4 + 4;
/// Largest frame accepted: guards the allocation against a corrupt or hostile length.
pub const MAX_FRAME_BYTES: u64 = 1 << 31;

/// What a joining rank needs: where rank 0 listens and the epoch's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRendezvous {
    pub address: String,
    pub nonce: [u8; NONCE_BYTES],
}

/// Frames received and not yet taken, per peer rank, and the first failure seen.
struct Inbox {
    frames: Vec<VecDeque<Vec<u8>>>,
    failure: Option<String>,
}

struct Shared {
    inbox: Mutex<Inbox>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // A reader thread cannot panic while holding the lock; recover the data if one did.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, failure: String) {
        let mut inbox = self.lock();
        inbox.failure.get_or_insert(failure);
        drop(inbox);
        self.arrived.notify_all();
    }
}

struct Peer {
    socket: TcpStream,
    writer: BufWriter<TcpStream>,
}

pub struct TcpCommunicator {
    rank: usize,
    size: usize,
    /// Indexed by rank: rank 0 has every other rank, the others only rank 0.
    peers: Vec<Option<Peer>>,
    shared: Arc<Shared>,
    posted: Option<Vec<(usize, usize)>>,
    aborted: bool,
}

/// Rank 0's listening socket for one epoch, until every rank has joined.
pub struct TcpRoot {
    listener: TcpListener,
    rendezvous: TcpRendezvous,
    size: usize,
}

fn io_failure(what: &str, e: std::io::Error) -> CommError {
    CommError::Failed(format!("{what}: {e}"))
}

impl TcpRoot {
    /// Listens on `bind` (port 0 picks one) for the `size - 1` other ranks. `advertise_host`
    /// replaces the bound IP in the published address (for a wildcard bind).
    pub fn bind(bind: &str, advertise_host: Option<&str>, size: usize) -> Result<Self, CommError> {
        let listener = TcpListener::bind(bind).map_err(|e| io_failure(bind, e))?;
        let local = listener.local_addr().map_err(|e| io_failure(bind, e))?;
        let address = match advertise_host {
            Some(host) => format!("{host}:{}", local.port()),
            None => local.to_string(),
        };
        let mut nonce = [0u8; NONCE_BYTES];
        fill_random(&mut nonce);
        Ok(Self {
            listener,
            rendezvous: TcpRendezvous { address, nonce },
            size,
        })
    }

    pub fn rendezvous(&self) -> &TcpRendezvous {
        &self.rendezvous
    }

    /// Accepts until every rank has joined or `timeout` passes. Connections with the wrong
    /// nonce, a bad rank or a duplicate rank are closed and do not count.
    pub fn accept_all(self, timeout: Duration) -> Result<TcpCommunicator, CommError> {
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| io_failure("listener", e))?;
        let mut joined: Vec<Option<TcpStream>> = (0..self.size).map(|_| None).collect();
        let mut missing = self.size.saturating_sub(1);
        while missing > 0 {
            let now = Instant::now();
            if now >= deadline {
                let absent: Vec<usize> = (1..self.size).filter(|&r| joined[r].is_none()).collect();
                return Err(CommError::Failed(format!(
                    "ranks {absent:?} did not join within {timeout:?}"
                )));
            }
            let socket = match self.listener.accept() {
                Ok((socket, _)) => socket,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(io_failure("accept", e)),
            };
            match self.handshake(socket, deadline - now, &joined) {
                Ok((rank, socket)) => {
                    joined[rank] = Some(socket);
                    missing -= 1;
                }
                Err(e) => tracing::warn!(error = %e, "refused a collective connection"),
            }
        }
        TcpCommunicator::start(0, self.size, joined, timeout)
    }

    fn handshake(
        &self,
        mut socket: TcpStream,
        left: Duration,
        joined: &[Option<TcpStream>],
    ) -> Result<(usize, TcpStream), CommError> {
        let io = |e| io_failure("handshake", e);
        socket.set_nonblocking(false).map_err(io)?;
        // A connection that never says hello holds up the others for at most this long.
        socket
            .set_read_timeout(Some(
                left.clamp(Duration::from_millis(10), Duration::from_secs(2)),
            ))
            .map_err(io)?;
        let mut hello = [0u8; HELLO_BYTES];
        socket.read_exact(&mut hello).map_err(io)?;
        let (magic, rest) = hello.split_at(8);
        let (nonce, rest) = rest.split_at(NONCE_BYTES);
        let rank = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let size = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        if magic != MAGIC || nonce != self.rendezvous.nonce {
            return Err(CommError::Failed(
                "not this epoch's communicator (magic or nonce)".into(),
            ));
        }
        if size != self.size || rank == 0 || rank >= self.size {
            return Err(CommError::BadRank { rank, size });
        }
        if joined[rank].is_some() {
            return Err(CommError::Failed(format!("rank {rank} joined twice")));
        }
        socket.write_all(MAGIC).map_err(io)?;
        socket.set_read_timeout(None).map_err(io)?;
        Ok((rank, socket))
    }
}

impl TcpCommunicator {
    /// Joins rank 0 at `rendezvous` as `rank` of `size`, waiting at most `timeout`.
    pub fn connect(
        rendezvous: &TcpRendezvous,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        if rank == 0 || rank >= size {
            return Err(CommError::BadRank { rank, size });
        }
        let io = |e| io_failure(&rendezvous.address, e);
        let address: SocketAddr = rendezvous
            .address
            .to_socket_addrs()
            .map_err(io)?
            .next()
            .ok_or_else(|| {
                CommError::Failed(format!("{} resolves to nothing", rendezvous.address))
            })?;
        let mut socket = TcpStream::connect_timeout(&address, timeout).map_err(io)?;
        socket.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut hello = Vec::with_capacity(HELLO_BYTES);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&rendezvous.nonce);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(size as u32).to_le_bytes());
        socket.write_all(&hello).map_err(io)?;
        let mut ack = [0u8; 8];
        socket.read_exact(&mut ack).map_err(io)?;
        if &ack != MAGIC {
            return Err(CommError::Failed(
                "rank 0 answered with a bad handshake".into(),
            ));
        }
        socket.set_read_timeout(None).map_err(io)?;
        let mut sockets: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        sockets[0] = Some(socket);
        Self::start(rank, size, sockets, timeout)
    }

    /// Starts a reader thread per connected peer; a write blocked longer than `write_timeout`
    /// (a peer that stopped reading) fails.
    fn start(
        rank: usize,
        size: usize,
        sockets: Vec<Option<TcpStream>>,
        write_timeout: Duration,
    ) -> Result<Self, CommError> {
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox {
                frames: (0..size).map(|_| VecDeque::new()).collect(),
                failure: None,
            }),
            arrived: Condvar::new(),
        });
        let mut peers = Vec::with_capacity(size);
        for (peer, socket) in sockets.into_iter().enumerate() {
            let Some(socket) = socket else {
                peers.push(None);
                continue;
            };
            let io = |e| io_failure("socket", e);
            socket.set_nodelay(true).map_err(io)?;
            socket
                .set_write_timeout(Some(write_timeout.max(Duration::from_millis(1))))
                .map_err(io)?;
            let reader = socket.try_clone().map_err(io)?;
            let writer = BufWriter::with_capacity(1 << 16, socket.try_clone().map_err(io)?);
            let into = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("coll-read-{peer}"))
                .spawn(move || read_frames(reader, peer, &into))
                .map_err(io)?;
            peers.push(Some(Peer { socket, writer }));
        }
        Ok(Self {
            rank,
            size,
            peers,
            shared,
            posted: None,
            aborted: false,
        })
    }

    /// The posted receives, taken from `inbox` if every one has arrived.
    fn take_ready(&mut self, inbox: &mut Inbox) -> Result<Option<Vec<Vec<u8>>>, CommError> {
        let Some(recvs) = &self.posted else {
            return Ok(Some(Vec::new()));
        };
        let mut wanted = vec![0usize; self.size];
        for &(peer, _) in recvs {
            wanted[peer] += 1;
        }
        let ready = wanted
            .iter()
            .zip(&inbox.frames)
            .all(|(&n, queue)| queue.len() >= n);
        if !ready {
            return match &inbox.failure {
                Some(f) => Err(CommError::Failed(f.clone())),
                None => Ok(None),
            };
        }
        let mut out = Vec::with_capacity(recvs.len());
        for &(peer, len) in recvs {
            let frame = inbox.frames[peer].pop_front().unwrap_or_default();
            if frame.len() != len {
                return Err(CommError::Failed(format!(
                    "rank {peer} sent {} bytes, {len} expected",
                    frame.len()
                )));
            }
            out.push(frame);
        }
        self.posted = None;
        Ok(Some(out))
    }
}

fn read_frames(socket: TcpStream, peer: usize, shared: &Shared) {
    let mut socket = BufReader::with_capacity(1 << 16, socket);
    loop {
        let mut len = [0u8; 8];
        if let Err(e) = socket.read_exact(&mut len) {
            shared.fail(format!("rank {peer} closed the connection ({e})"));
            return;
        }
        let len = u64::from_le_bytes(len);
        if len > MAX_FRAME_BYTES {
            shared.fail(format!("rank {peer} sent a frame of {len} bytes"));
            let _ = socket.get_ref().shutdown(Shutdown::Both);
            return;
        }
        let mut frame = vec![0u8; len as usize];
        if let Err(e) = socket.read_exact(&mut frame) {
            shared.fail(format!("rank {peer} closed the connection mid-frame ({e})"));
            return;
        }
        shared.lock().frames[peer].push_back(frame);
        shared.arrived.notify_all();
    }
}

impl Communicator for TcpCommunicator {
    type Buffer = Vec<u8>;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn post(&mut self, group: Pending<Vec<u8>>) -> Result<(), CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        if let Some(f) = &self.shared.lock().failure {
            return Err(CommError::Failed(f.clone()));
        }
        for &(peer, _) in &group.recvs {
            if peer != self.rank && self.peers.get(peer).is_none_or(Option::is_none) {
                return Err(CommError::Failed(format!(
                    "rank {} has no link to rank {peer} (star: only rank 0 talks to all)",
                    self.rank
                )));
            }
        }
        let mut written = vec![false; self.size];
        for (peer, frame) in group.sends {
            if peer == self.rank {
                self.shared.lock().frames[peer].push_back(frame);
                self.shared.arrived.notify_all();
                continue;
            }
            let rank = self.rank;
            let link = self
                .peers
                .get_mut(peer)
                .and_then(Option::as_mut)
                .ok_or_else(|| {
                    CommError::Failed(format!("rank {rank} has no link to rank {peer}"))
                })?;
            let len = (frame.len() as u64).to_le_bytes();
            link.writer
                .write_all(&len)
                .and_then(|()| link.writer.write_all(&frame))
                .map_err(|e| CommError::Failed(format!("sending to rank {peer}: {e}")))?;
            written[peer] = true;
        }
        for (peer, link) in self.peers.iter_mut().enumerate() {
            if let (true, Some(link)) = (written[peer], link) {
                link.writer
                    .flush()
                    .map_err(|e| CommError::Failed(format!("sending to rank {peer}: {e}")))?;
            }
        }
        self.posted = Some(group.recvs);
        Ok(())
    }

    fn poll(&mut self) -> Result<Option<Vec<Vec<u8>>>, CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        let shared = Arc::clone(&self.shared);
        let mut inbox = shared.lock();
        self.take_ready(&mut inbox)
    }

    fn wait(&mut self, at_most: Duration) -> Result<Option<Vec<Vec<u8>>>, CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        let deadline = Instant::now() + at_most;
        let shared = Arc::clone(&self.shared);
        let mut inbox = shared.lock();
        loop {
            if let Some(done) = self.take_ready(&mut inbox)? {
                return Ok(Some(done));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            inbox = shared
                .arrived
                .wait_timeout(inbox, left)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn abort(&mut self) {
        if self.aborted {
            return;
        }
        self.aborted = true;
        self.posted = None;
        // Closing the sockets ends both threads of every link and tells the peers at once.
        for peer in self.peers.drain(..).flatten() {
            let _ = peer.socket.shutdown(Shutdown::Both);
        }
    }

    fn upload(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        Ok(bytes)
    }

    fn download(&self, buffer: Vec<u8>) -> Result<Vec<u8>, CommError> {
        Ok(buffer)
    }
}

impl Drop for TcpCommunicator {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Unpredictable bytes for the nonce, from the OS.
fn fill_random(out: &mut [u8]) {
    use std::hash::{BuildHasher, Hasher};
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(out).is_ok() {
            return;
        }
    }
    // Without /dev/urandom: std's randomly keyed hasher (enough to tell epochs apart; the
    // nonce is not a credential, the TCP collective has no TLS anyway).
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::communicator::run_bounded;
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Rank 0 and `size - 1` ranks joined over loopback.
    fn star(size: usize) -> (TcpCommunicator, Vec<TcpCommunicator>) {
        let root = TcpRoot::bind("127.0.0.1:0", None, size).unwrap();
        let rendezvous = root.rendezvous().clone();
        let joiners: Vec<_> = (1..size)
            .map(|rank| {
                let r = rendezvous.clone();
                std::thread::spawn(move || TcpCommunicator::connect(&r, rank, size, SECOND))
            })
            .collect();
        let zero = root.accept_all(SECOND).unwrap();
        let others = joiners
            .into_iter()
            .map(|j| j.join().unwrap().unwrap())
            .collect();
        (zero, others)
    }

    #[test]
    fn all_to_all_over_loopback() {
        let (mut zero, mut others) = star(3);
        run_bounded(
            &mut zero,
            Pending {
                sends: vec![(1, vec![1; 5]), (2, vec![2; 70_000]), (0, vec![0; 3])],
                recvs: vec![(0, 3)],
            },
            SECOND,
        )
        .unwrap();
        for (i, node) in others.iter_mut().enumerate() {
            let len = if i == 0 { 5 } else { 70_000 };
            let got = run_bounded(
                node,
                Pending {
                    sends: vec![(0, vec![9; i + 1])],
                    recvs: vec![(0, len)],
                },
                SECOND,
            )
            .unwrap();
            assert_eq!(got, vec![vec![i as u8 + 1; len]]);
        }
        let back = run_bounded(
            &mut zero,
            Pending {
                sends: vec![],
                recvs: vec![(2, 2), (1, 1)],
            },
            SECOND,
        )
        .unwrap();
        assert_eq!(back, vec![vec![9; 2], vec![9; 1]]);
    }

    #[test]
    fn a_closed_peer_fails_the_wait_at_once() {
        let (mut zero, mut others) = star(3);
        others.pop(); // rank 2 dies: its sockets close
        let started = Instant::now();
        let err = run_bounded(
            &mut zero,
            Pending {
                sends: vec![],
                recvs: vec![(2, 8)],
            },
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(
            matches!(err, CommError::Failed(ref m) if m.contains("rank 2")),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        // The abort closed rank 1's link too, so it does not wait for a dead router.
        let err = run_bounded(
            &mut others[0],
            Pending {
                sends: vec![],
                recvs: vec![(0, 8)],
            },
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(matches!(err, CommError::Failed(_)), "{err}");
    }

    #[test]
    fn a_silent_peer_costs_one_timeout() {
        let (mut zero, _others) = star(2);
        let err = run_bounded(
            &mut zero,
            Pending {
                sends: vec![],
                recvs: vec![(1, 4)],
            },
            Duration::from_millis(50),
        )
        .unwrap_err();
        assert_eq!(err, CommError::Timeout(Duration::from_millis(50)));
    }

    #[test]
    fn a_wrong_nonce_or_rank_does_not_join() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 2).unwrap();
        let mut stale = root.rendezvous().clone();
        stale.nonce[0] ^= 1;
        let good = root.rendezvous().clone();
        let intruder = std::thread::spawn(move || {
            let wrong_nonce = TcpCommunicator::connect(&stale, 1, 2, SECOND);
            let late = std::thread::spawn(move || TcpCommunicator::connect(&good, 1, 2, SECOND));
            (wrong_nonce, late.join().unwrap())
        });
        let zero = root.accept_all(Duration::from_secs(2)).unwrap();
        let (wrong, right) = intruder.join().unwrap();
        assert!(wrong.is_err(), "a stale nonce is refused");
        assert!(right.is_ok());
        assert_eq!(zero.size(), 2);
        assert!(matches!(
            TcpCommunicator::connect(
                &TcpRendezvous {
                    address: "127.0.0.1:1".into(),
                    nonce: [0; 16]
                },
                2,
                2,
                SECOND
            ),
            Err(CommError::BadRank { rank: 2, size: 2 })
        ));
    }

    #[test]
    fn ranks_that_never_join_time_out() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 3).unwrap();
        let err = root.accept_all(Duration::from_millis(50)).err().unwrap();
        assert!(err.to_string().contains("[1, 2]"), "{err}");
    }

    #[test]
    fn only_rank_zero_talks_to_everyone() {
        let (_zero, mut others) = star(3);
        let err = others[0]
            .post(Pending {
                sends: vec![(2, vec![1])],
                recvs: vec![],
            })
            .unwrap_err();
        assert!(err.to_string().contains("no link"), "{err}");
    }
}
