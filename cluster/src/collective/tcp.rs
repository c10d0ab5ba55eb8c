//! The TCP [`Communicator`]: the collective data plane for CPU clusters, and the stand-in that
//! lets the per-epoch communicator lifecycle run end to end (processes, etcd, crashes) on
//! machines without GPUs. Same protocol as NCCL, over plain sockets.
//!
//! A star: rank 0 (the router) listens, every other rank connects to it once and says which
//! rank it is and the epoch's nonce (published in etcd with the address), so a stray or stale
//! connection is refused. With a cluster token both sides also prove they hold it: rank 0
//! greets each connection with a fresh challenge, the member's hello carries an HMAC over the
//! nonce, its rank, that challenge and one of its own, and rank 0 answers with an HMAC over
//! the member's. So neither a rogue member nor a rogue rank 0 that copied the etcd record gets
//! in, and a hello copied off the wire opens no other connection. Handshakes run in parallel
//! under one deadline, so silent connections cannot hold up the real members.
//!
//! Each peer connection has a reader thread, which drains the socket into a bounded inbox
//! (frames and bytes per peer): when it is full the reader stops reading and TCP flow control
//! slows the peer down. A send (written directly by the posting thread, one buffered write per
//! frame, flushed once per group) only waits for the peer's kernel buffer; the write timeout
//! bounds a peer that stops reading. A frame is a little-endian u64 length, checked against
//! the communicator's bound before anything is allocated for it, and the bytes. A peer that
//! dies closes its socket: the waiting side sees it at once instead of at its deadline.
//!
//! No TLS: the token authenticates the ends, it does not encrypt; a cluster configured with
//! mutual TLS keeps the gRPC data plane.

use std::collections::{HashMap, VecDeque};
use std::io::{BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::communicator::{CommError, Communicator, Pending};
use crate::auth::{self, ClusterToken, PROOF_BYTES};

/// Bytes of the per-epoch secret a joining rank must present.
pub const NONCE_BYTES: usize = 16;
/// Bytes of each side's fresh challenge: rank 0's greeting carries one the member's proof must
/// cover (so a hello copied off the wire opens no other join), the member's hello one rank 0's
/// proof must cover.
pub const CHALLENGE_BYTES: usize = 32;
/// Version 3 (the layer header names the row encoding); since version 2 rank 0 greets with a
/// challenge and the hello carries the token mode, the member's challenge and its proof.
const MAGIC: &[u8; 8] = b"MOECOLL3";
/// Hellos of older builds, refused by name.
const OLDER_MAGICS: [&[u8; 8]; 2] = [b"MOECOLL1", b"MOECOLL2"];
/// magic, rank 0's challenge.
const GREETING_BYTES: usize = 8 + CHALLENGE_BYTES;
/// magic, nonce, rank, size, token mode, challenge, proof.
const HELLO_BYTES: usize = 8 + NONCE_BYTES + 4 + 4 + 1 + CHALLENGE_BYTES + PROOF_BYTES;
/// magic, token mode, proof.
const ACK_BYTES: usize = 8 + 1 + PROOF_BYTES;
const NO_TOKEN: u8 = 0;
const WITH_TOKEN: u8 = 1;
const MEMBER_PROOF: &[u8] = b"moe-collective-member";
const ROOT_PROOF: &[u8] = b"moe-collective-root";
/// Handshakes rank 0 runs at once; connections beyond are closed on arrival.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// A payload buffer grows by at most this much (or by what already arrived, if more) at a
/// time, so its memory follows the bytes received, not the length announced.
const READ_CHUNK: usize = 1 << 20;

/// What a joining rank needs: where rank 0 listens and the epoch's nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRendezvous {
    pub address: String,
    pub nonce: [u8; NONCE_BYTES],
}

/// What one communicator accepts from each peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    /// Largest frame a peer may announce; more cuts the peer off before any of it is read.
    pub max_frame_bytes: u64,
    /// Frames and bytes queued per peer before its reader stops reading. A reader may always
    /// queue one frame, and as many as the posted group still waits for, so that a group
    /// larger than these bounds cannot deadlock.
    pub max_queued_frames: usize,
    pub max_queued_bytes: u64,
}

impl TcpLimits {
    /// A layer has about 3 frames outstanding per peer, but an idle node is sent a header per
    /// layer without answering, so it may fall a few layers behind.
    pub const QUEUED_FRAMES: usize = 64;

    /// Frames of at most `max_frame_bytes`, and room for two of them queued (a node's rows
    /// and routes).
    pub fn for_frames(max_frame_bytes: u64) -> Self {
        Self {
            max_frame_bytes,
            max_queued_frames: Self::QUEUED_FRAMES,
            max_queued_bytes: max_frame_bytes.saturating_mul(2),
        }
    }
}

/// Per-communicator settings, the same kind on both ends.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    pub limits: TcpLimits,
    /// Both ends prove this token to each other; `None` checks the nonce only (a cluster on
    /// loopback without a token). Both ends must agree.
    pub token: Option<ClusterToken>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    #[error("announced a frame of {len} bytes, over the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("closed the connection ({0})")]
    Closed(std::io::Error),
    #[error("closed the connection mid-frame ({0})")]
    Truncated(std::io::Error),
}

/// A frame's length prefix, checked against `max`. Reads exactly the 8 prefix bytes, so a
/// refused frame's payload is never touched.
pub fn read_frame_len(reader: &mut impl Read, max: u64) -> Result<usize, FrameReadError> {
    let mut prefix = [0u8; 8];
    reader
        .read_exact(&mut prefix)
        .map_err(FrameReadError::Closed)?;
    let len = u64::from_le_bytes(prefix);
    if len > max {
        return Err(FrameReadError::TooLarge { len, max });
    }
    usize::try_from(len).map_err(|_| FrameReadError::TooLarge {
        len,
        max: usize::MAX as u64,
    })
}

/// `len` payload bytes, in a buffer that grows as they arrive: a peer that announces a large
/// frame and sends little costs little.
pub fn read_frame_payload(reader: &mut impl Read, len: usize) -> Result<Vec<u8>, FrameReadError> {
    let mut frame = Vec::new();
    fill_payload(reader, len, &mut frame)?;
    Ok(frame)
}

/// One whole frame of at most `max` bytes.
pub fn read_frame(reader: &mut impl Read, max: u64) -> Result<Vec<u8>, FrameReadError> {
    let len = read_frame_len(reader, max)?;
    read_frame_payload(reader, len)
}

/// Appends payload until `frame` holds `len` bytes. The capacity stays within
/// `max(READ_CHUNK, 2 * bytes received)` and never above `len`.
fn fill_payload(
    reader: &mut impl Read,
    len: usize,
    frame: &mut Vec<u8>,
) -> Result<(), FrameReadError> {
    while frame.len() < len {
        let start = frame.len();
        let step = (len - start).min(READ_CHUNK.max(start));
        frame.reserve_exact(step);
        frame.resize(start + step, 0);
        if let Err(e) = reader.read_exact(&mut frame[start..]) {
            frame.truncate(start);
            return Err(FrameReadError::Truncated(e));
        }
    }
    Ok(())
}

/// Frames received and not yet taken, per peer rank, and the first failure seen.
struct Inbox {
    frames: Vec<VecDeque<Vec<u8>>>,
    /// Bytes in `frames`, per peer.
    bytes: Vec<u64>,
    /// Frames the posted group needs from each peer (zero when nothing is posted).
    wanted: Vec<usize>,
    failure: Option<CommError>,
    /// Set by abort: readers waiting for room stop.
    closed: bool,
}

struct Shared {
    inbox: Mutex<Inbox>,
    /// A frame arrived or the communicator failed.
    arrived: Condvar,
    /// Frames were taken (or the communicator closed): a full inbox may have room.
    room: Condvar,
    limits: TcpLimits,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        // A reader thread cannot panic while holding the lock; recover the data if one did.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, failure: CommError) {
        let mut inbox = self.lock();
        inbox.failure.get_or_insert(failure);
        drop(inbox);
        self.arrived.notify_all();
    }

    fn push(&self, peer: usize, frame: Vec<u8>) {
        let mut inbox = self.lock();
        inbox.bytes[peer] = inbox.bytes[peer].saturating_add(frame.len() as u64);
        inbox.frames[peer].push_back(frame);
        drop(inbox);
        self.arrived.notify_all();
    }

    /// Waits until `peer`'s queue has room for a frame of `len` bytes; false once closed.
    fn wait_for_room(&self, peer: usize, len: usize) -> bool {
        let mut inbox = self.lock();
        loop {
            if inbox.closed {
                return false;
            }
            let queued = inbox.frames[peer].len();
            let fits = queued < self.limits.max_queued_frames
                && inbox.bytes[peer].saturating_add(len as u64) <= self.limits.max_queued_bytes;
            if fits || queued == 0 || queued < inbox.wanted[peer] {
                return true;
            }
            inbox = self.room.wait(inbox).unwrap_or_else(|p| p.into_inner());
        }
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
    settings: TcpSettings,
}

fn io_failure(what: &str, e: std::io::Error) -> CommError {
    CommError::Failed(format!("{what}: {e}"))
}

/// Rank 0's first bytes on a connection: the magic and this join's challenge.
fn encode_greeting(challenge: &[u8; CHALLENGE_BYTES]) -> [u8; GREETING_BYTES] {
    let mut greeting = [0u8; GREETING_BYTES];
    greeting[..8].copy_from_slice(MAGIC);
    greeting[8..].copy_from_slice(challenge);
    greeting
}

/// A member's hello: it proves the token (when there is one) over the nonce, its rank, the
/// size, its challenge and rank 0's.
fn encode_hello(
    nonce: &[u8; NONCE_BYTES],
    rank: usize,
    size: usize,
    token: Option<&ClusterToken>,
    challenge: &[u8; CHALLENGE_BYTES],
    root_challenge: &[u8; CHALLENGE_BYTES],
) -> [u8; HELLO_BYTES] {
    let (rank, size) = ((rank as u32).to_le_bytes(), (size as u32).to_le_bytes());
    let mut hello = [0u8; HELLO_BYTES];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        hello[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(MAGIC);
    put(nonce);
    put(&rank);
    put(&size);
    match token {
        Some(token) => {
            put(&[WITH_TOKEN]);
            put(challenge);
            put(&token.prove(&[MEMBER_PROOF, nonce, &rank, &size, challenge, root_challenge]));
        }
        None => {
            put(&[NO_TOKEN]);
            put(challenge);
        }
    }
    hello
}

/// Rank 0's answer: its token mode and, with a token, its proof over the member's challenge.
fn encode_ack(
    token: Option<&ClusterToken>,
    proof_of: Option<(&[u8; NONCE_BYTES], u32, &[u8])>,
) -> [u8; ACK_BYTES] {
    let mut ack = [0u8; ACK_BYTES];
    ack[..8].copy_from_slice(MAGIC);
    if let Some(token) = token {
        ack[8] = WITH_TOKEN;
        if let Some((nonce, rank, challenge)) = proof_of {
            let proof = token.prove(&[ROOT_PROOF, nonce, &rank.to_le_bytes(), challenge]);
            ack[9..].copy_from_slice(&proof);
        }
    }
    ack
}

/// What rank 0 checks each hello against.
struct Expected {
    nonce: [u8; NONCE_BYTES],
    size: usize,
    token: Option<ClusterToken>,
}

/// One connection's handshake on rank 0, on its own thread: the rank it joined as, or why it
/// was refused. A rank is claimed in `claimed` before the answer goes out, so a duplicate is
/// refused before it learns anything.
fn handshake(
    mut socket: TcpStream,
    deadline: Instant,
    expected: &Expected,
    claimed: &Mutex<Vec<bool>>,
) -> Result<(usize, TcpStream), CommError> {
    let io = |e| io_failure("handshake", e);
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    socket.set_nonblocking(false).map_err(io)?;
    socket.set_read_timeout(Some(left)).map_err(io)?;
    socket.set_write_timeout(Some(left)).map_err(io)?;
    let root_challenge = auth::random_bytes::<CHALLENGE_BYTES>();
    socket
        .write_all(&encode_greeting(&root_challenge))
        .map_err(io)?;
    let mut hello = [0u8; HELLO_BYTES];
    socket.read_exact(&mut hello).map_err(io)?;
    let (magic, rest) = hello.split_at(8);
    let (nonce, rest) = rest.split_at(NONCE_BYTES);
    let (rank_bytes, rest) = rest.split_at(4);
    let (size_bytes, rest) = rest.split_at(4);
    let (mode, rest) = rest.split_at(1);
    let (challenge, proof) = rest.split_at(CHALLENGE_BYTES);
    if let Some(old) = OLDER_MAGICS.iter().find(|m| magic == m.as_slice()) {
        return Err(CommError::Failed(format!(
            "a hello of an older build ({}): upgrade every member",
            String::from_utf8_lossy(old.as_slice())
        )));
    }
    if magic != MAGIC || !auth::constant_time_eq(nonce, &expected.nonce) {
        return Err(CommError::Failed(
            "not this epoch's communicator (magic or nonce)".into(),
        ));
    }
    let rank = u32::from_le_bytes([rank_bytes[0], rank_bytes[1], rank_bytes[2], rank_bytes[3]]);
    let size = u32::from_le_bytes([size_bytes[0], size_bytes[1], size_bytes[2], size_bytes[3]]);
    let (rank, size) = (rank as usize, size as usize);
    if size != expected.size || rank == 0 || rank >= expected.size {
        return Err(CommError::BadRank { rank, size });
    }
    match (&expected.token, mode[0]) {
        (Some(token), WITH_TOKEN) => {
            let context: [&[u8]; 6] = [
                MEMBER_PROOF,
                nonce,
                rank_bytes,
                size_bytes,
                challenge,
                &root_challenge,
            ];
            if !token.verify(&context, proof) {
                // Closed without an answer: the member learns nothing about why.
                return Err(CommError::Failed(format!(
                    "rank {rank} did not prove the cluster token"
                )));
            }
        }
        (None, NO_TOKEN) => {}
        (token, NO_TOKEN | WITH_TOKEN) => {
            // Whether a token is in use is no secret: say so, so the member can report it.
            let _ = socket.write_all(&encode_ack(token.as_ref(), None));
            let why = if token.is_some() {
                "has no cluster token, this router requires one"
            } else {
                "presents a cluster token, this router has none"
            };
            return Err(CommError::Failed(format!("rank {rank} {why}")));
        }
        (_, other) => {
            return Err(CommError::Failed(format!(
                "rank {rank} sent an unknown token mode {other}"
            )))
        }
    }
    {
        let mut claimed = claimed.lock().unwrap_or_else(|p| p.into_inner());
        if claimed[rank] {
            return Err(CommError::Failed(format!("rank {rank} joined twice")));
        }
        claimed[rank] = true;
    }
    let ack = encode_ack(
        expected.token.as_ref(),
        Some((&expected.nonce, rank as u32, challenge)),
    );
    if let Err(e) = socket
        .write_all(&ack)
        .and_then(|()| socket.set_read_timeout(None))
    {
        claimed.lock().unwrap_or_else(|p| p.into_inner())[rank] = false;
        return Err(io(e));
    }
    Ok((rank, socket))
}

impl TcpRoot {
    /// Listens on `bind` (port 0 picks one) for the `size - 1` other ranks. `advertise_host`
    /// replaces the bound IP in the published address (for a wildcard bind).
    pub fn bind(
        bind: &str,
        advertise_host: Option<&str>,
        size: usize,
        settings: TcpSettings,
    ) -> Result<Self, CommError> {
        let listener = TcpListener::bind(bind).map_err(|e| io_failure(bind, e))?;
        let local = listener.local_addr().map_err(|e| io_failure(bind, e))?;
        let address = match advertise_host {
            Some(host) => format!("{host}:{}", local.port()),
            None => local.to_string(),
        };
        Ok(Self {
            listener,
            rendezvous: TcpRendezvous {
                address,
                nonce: auth::random_bytes::<NONCE_BYTES>(),
            },
            size,
            settings,
        })
    }

    pub fn rendezvous(&self) -> &TcpRendezvous {
        &self.rendezvous
    }

    /// Accepts until every rank has joined or `timeout` passes. Each connection's handshake
    /// runs on its own thread under that one deadline (at most [`MAX_PENDING_HANDSHAKES`] at
    /// once), so silent connections cannot delay the real members. Connections with the wrong
    /// nonce or token, a bad rank or a duplicate rank are closed and do not count; those still
    /// handshaking when the last rank joins are cut off.
    pub fn accept_all(self, timeout: Duration) -> Result<TcpCommunicator, CommError> {
        let (size, limits) = (self.size, self.settings.limits);
        let joined = self.accept_sockets(timeout)?;
        TcpCommunicator::start(0, size, joined, timeout, limits)
    }

    /// [`TcpRoot::accept_all`] up to the handshakes: each member's socket (indexed by rank,
    /// rank 0 empty), for a caller that speaks the frame layer itself. Tests use it to play a
    /// broken or hostile rank 0 towards a running node.
    pub fn accept_sockets(self, timeout: Duration) -> Result<Vec<Option<TcpStream>>, CommError> {
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| io_failure("listener", e))?;
        let expected = Arc::new(Expected {
            nonce: self.rendezvous.nonce,
            size: self.size,
            token: self.settings.token.clone(),
        });
        let claimed = Arc::new(Mutex::new(vec![false; self.size]));
        type Outcome = (u64, Result<(usize, TcpStream), CommError>);
        let (done_tx, done_rx) = mpsc::channel::<Outcome>();
        // A clone of each socket still handshaking, to cut it off when no longer needed.
        let mut pending: HashMap<u64, TcpStream> = HashMap::new();
        let mut next_id = 0u64;
        let mut joined: Vec<Option<TcpStream>> = (0..self.size).map(|_| None).collect();
        let mut missing = self.size.saturating_sub(1);
        let outcome = loop {
            if missing == 0 {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let absent: Vec<usize> = (1..self.size).filter(|&r| joined[r].is_none()).collect();
                break Err(CommError::Failed(format!(
                    "ranks {absent:?} did not join within {timeout:?}"
                )));
            }
            let accepted = match self.listener.accept() {
                Ok((socket, from)) => {
                    if pending.len() >= MAX_PENDING_HANDSHAKES {
                        tracing::warn!(%from, "too many collective handshakes at once: closed one");
                    } else if let Ok(clone) = socket.try_clone() {
                        let (id, tx) = (next_id, done_tx.clone());
                        let (expected, claimed) = (Arc::clone(&expected), Arc::clone(&claimed));
                        let spawned = std::thread::Builder::new()
                            .name("coll-handshake".into())
                            .spawn(move || {
                                let _ =
                                    tx.send((id, handshake(socket, deadline, &expected, &claimed)));
                            });
                        match spawned {
                            Ok(_) => {
                                pending.insert(id, clone);
                                next_id += 1;
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot start a handshake thread"),
                        }
                    }
                    true
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(e) => break Err(io_failure("accept", e)),
            };
            // Wait for a handshake to finish only when there was nothing to accept.
            let first = if accepted {
                done_rx.try_recv().ok()
            } else {
                let left = deadline.saturating_duration_since(now);
                done_rx
                    .recv_timeout(left.min(Duration::from_millis(1)))
                    .ok()
            };
            for (id, result) in first
                .into_iter()
                .chain(std::iter::from_fn(|| done_rx.try_recv().ok()))
            {
                pending.remove(&id);
                match result {
                    Ok((rank, socket)) => {
                        joined[rank] = Some(socket);
                        missing -= 1;
                    }
                    Err(e) => tracing::warn!(error = %e, "refused a collective connection"),
                }
            }
        };
        for socket in pending.into_values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        outcome?;
        Ok(joined)
    }
}

impl TcpCommunicator {
    /// Joins rank 0 at `rendezvous` as `rank` of `size`, waiting at most `timeout`. With a
    /// token, rank 0 must prove it over this join's fresh challenge before it counts.
    pub fn connect(
        rendezvous: &TcpRendezvous,
        rank: usize,
        size: usize,
        timeout: Duration,
        settings: &TcpSettings,
    ) -> Result<Self, CommError> {
        if rank == 0 || rank >= size {
            return Err(CommError::BadRank { rank, size });
        }
        let at = &rendezvous.address;
        let io = |e| io_failure(at, e);
        let address: SocketAddr = at
            .to_socket_addrs()
            .map_err(io)?
            .next()
            .ok_or_else(|| CommError::Failed(format!("{at} resolves to nothing")))?;
        let mut socket = TcpStream::connect_timeout(&address, timeout).map_err(io)?;
        socket.set_read_timeout(Some(timeout)).map_err(io)?;
        socket.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut greeting = [0u8; GREETING_BYTES];
        socket.read_exact(&mut greeting).map_err(|e| {
            CommError::Failed(format!(
                "rank 0 at {at} sent no greeting ({e}): an older build (MOECOLL1) or not a \
                 collective"
            ))
        })?;
        if let Some(old) = OLDER_MAGICS.iter().find(|m| &greeting[..8] == m.as_slice()) {
            return Err(CommError::Failed(format!(
                "rank 0 at {at} is an older build ({}): upgrade every member",
                String::from_utf8_lossy(old.as_slice())
            )));
        }
        if &greeting[..8] != MAGIC {
            return Err(CommError::Failed(format!(
                "rank 0 at {at} greeted with a bad handshake"
            )));
        }
        let mut root_challenge = [0u8; CHALLENGE_BYTES];
        root_challenge.copy_from_slice(&greeting[8..]);
        let challenge = auth::random_bytes::<CHALLENGE_BYTES>();
        let token = settings.token.as_ref();
        let hello = encode_hello(
            &rendezvous.nonce,
            rank,
            size,
            token,
            &challenge,
            &root_challenge,
        );
        socket.write_all(&hello).map_err(io)?;
        let mut ack = [0u8; ACK_BYTES];
        socket.read_exact(&mut ack).map_err(|e| {
            CommError::Failed(format!(
                "rank 0 at {at} refused rank {rank} ({e}): a stale nonce, a rank already taken \
                 or a cluster token that does not match"
            ))
        })?;
        let (magic, rest) = ack.split_at(8);
        let (mode, proof) = rest.split_at(1);
        if magic != MAGIC {
            return Err(CommError::Failed(format!(
                "rank 0 at {at} answered with a bad handshake"
            )));
        }
        match (token, mode[0]) {
            (Some(token), WITH_TOKEN) => {
                let rank = (rank as u32).to_le_bytes();
                let context: [&[u8]; 4] = [ROOT_PROOF, &rendezvous.nonce, &rank, &challenge];
                if !token.verify(&context, proof) {
                    return Err(CommError::Failed(format!(
                        "rank 0 at {at} did not prove the cluster token: refused it"
                    )));
                }
            }
            (None, NO_TOKEN) => {}
            (Some(_), NO_TOKEN) => {
                return Err(CommError::Failed(format!(
                    "rank 0 at {at} has no cluster token and this node has one: give both the \
                     same --cluster-token-file"
                )))
            }
            (None, WITH_TOKEN) => {
                return Err(CommError::Failed(format!(
                    "rank 0 at {at} requires a cluster token and this node has none \
                     (--cluster-token-file)"
                )))
            }
            (_, other) => {
                return Err(CommError::Failed(format!(
                    "rank 0 at {at} answered with an unknown token mode {other}"
                )))
            }
        }
        socket.set_read_timeout(None).map_err(io)?;
        let mut sockets: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        sockets[0] = Some(socket);
        Self::start(rank, size, sockets, timeout, settings.limits)
    }

    /// Starts a reader thread per connected peer; a write blocked longer than `write_timeout`
    /// (a peer that stopped reading) fails.
    fn start(
        rank: usize,
        size: usize,
        sockets: Vec<Option<TcpStream>>,
        write_timeout: Duration,
        limits: TcpLimits,
    ) -> Result<Self, CommError> {
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox {
                frames: (0..size).map(|_| VecDeque::new()).collect(),
                bytes: vec![0; size],
                wanted: vec![0; size],
                failure: None,
                closed: false,
            }),
            arrived: Condvar::new(),
            room: Condvar::new(),
            limits,
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

    /// Frames received from all peers and not yet taken (each peer's queue is bounded by
    /// [`TcpLimits`]).
    pub fn queued_frames(&self) -> usize {
        self.shared.lock().frames.iter().map(VecDeque::len).sum()
    }

    /// The posted receives, taken from `inbox` if every one has arrived.
    fn take_ready(&mut self, inbox: &mut Inbox) -> Result<Option<Vec<Vec<u8>>>, CommError> {
        let Some(recvs) = &self.posted else {
            return Ok(Some(Vec::new()));
        };
        let ready = inbox
            .wanted
            .iter()
            .zip(&inbox.frames)
            .all(|(&n, queue)| queue.len() >= n);
        if !ready {
            return match &inbox.failure {
                Some(f) => Err(f.clone()),
                None => Ok(None),
            };
        }
        let mut out = Vec::with_capacity(recvs.len());
        for &(peer, len) in recvs {
            let frame = inbox.frames[peer].pop_front().unwrap_or_default();
            inbox.bytes[peer] = inbox.bytes[peer].saturating_sub(frame.len() as u64);
            if frame.len() != len {
                return Err(CommError::Failed(format!(
                    "rank {peer} sent {} bytes, {len} expected",
                    frame.len()
                )));
            }
            out.push(frame);
        }
        inbox.wanted.iter_mut().for_each(|n| *n = 0);
        self.shared.room.notify_all();
        self.posted = None;
        Ok(Some(out))
    }
}

/// A peer's reader: frames into the inbox, waiting for room before reading each payload.
fn read_frames(mut socket: TcpStream, peer: usize, shared: &Shared) {
    loop {
        let len = match read_frame_len(&mut socket, shared.limits.max_frame_bytes) {
            Ok(len) => len,
            Err(FrameReadError::TooLarge { len, max }) => {
                // Cut off before any of the payload is read or allocated.
                let _ = socket.shutdown(Shutdown::Both);
                shared.fail(CommError::FrameTooLarge {
                    rank: peer,
                    len,
                    max,
                });
                return;
            }
            Err(e) => {
                shared.fail(CommError::Failed(format!("rank {peer} {e}")));
                return;
            }
        };
        if !shared.wait_for_room(peer, len) {
            return;
        }
        match read_frame_payload(&mut socket, len) {
            Ok(frame) => shared.push(peer, frame),
            Err(e) => {
                shared.fail(CommError::Failed(format!("rank {peer} {e}")));
                return;
            }
        }
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
            return Err(f.clone());
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
                // Unbounded: the posting thread must never wait for room it alone can make.
                self.shared.push(peer, frame);
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
        let mut inbox = self.shared.lock();
        inbox.wanted.iter_mut().for_each(|n| *n = 0);
        for &(peer, _) in &group.recvs {
            inbox.wanted[peer] += 1;
        }
        drop(inbox);
        // A reader held back by the bounds may queue what this group waits for.
        self.shared.room.notify_all();
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
        self.shared.lock().closed = true;
        // Wakes a reader waiting for room; closing the sockets ends the others and tells the
        // peers at once.
        self.shared.room.notify_all();
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

    fn buffer_bytes(&self, buffer: &Vec<u8>) -> usize {
        buffer.len()
    }
}

impl Drop for TcpCommunicator {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::super::communicator::run_bounded;
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn open(limits: TcpLimits, token: Option<&ClusterToken>) -> TcpSettings {
        TcpSettings {
            limits,
            token: token.cloned(),
        }
    }

    fn plain() -> TcpSettings {
        open(TcpLimits::for_frames(1 << 20), None)
    }

    fn token(secret: &str) -> ClusterToken {
        ClusterToken::from_secret(secret.as_bytes())
    }

    /// Rank 0 and `size - 1` ranks joined over loopback.
    fn star_with(size: usize, settings: TcpSettings) -> (TcpCommunicator, Vec<TcpCommunicator>) {
        let root = TcpRoot::bind("127.0.0.1:0", None, size, settings.clone()).unwrap();
        let rendezvous = root.rendezvous().clone();
        let joiners: Vec<_> = (1..size)
            .map(|rank| {
                let (r, s) = (rendezvous.clone(), settings.clone());
                std::thread::spawn(move || TcpCommunicator::connect(&r, rank, size, SECOND, &s))
            })
            .collect();
        let zero = root.accept_all(SECOND).unwrap();
        let others = joiners
            .into_iter()
            .map(|j| j.join().unwrap().unwrap())
            .collect();
        (zero, others)
    }

    fn star(size: usize) -> (TcpCommunicator, Vec<TcpCommunicator>) {
        star_with(size, plain())
    }

    /// A hostile peer: completes the handshake by hand, then writes whatever it likes.
    /// Reads rank 0's greeting; returns its challenge.
    fn greeted(socket: &mut TcpStream) -> [u8; CHALLENGE_BYTES] {
        let mut greeting = [0u8; GREETING_BYTES];
        socket.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], MAGIC);
        greeting[8..].try_into().unwrap()
    }

    fn raw_member(at: &TcpRendezvous, rank: usize, size: usize) -> TcpStream {
        let mut socket = TcpStream::connect(&at.address).unwrap();
        let root_challenge = greeted(&mut socket);
        let hello = encode_hello(
            &at.nonce,
            rank,
            size,
            None,
            &[7; CHALLENGE_BYTES],
            &root_challenge,
        );
        socket.write_all(&hello).unwrap();
        let mut ack = [0u8; ACK_BYTES];
        socket.read_exact(&mut ack).unwrap();
        assert_eq!(&ack[..8], MAGIC);
        socket
    }

    /// Rank 0 of two with a raw peer as rank 1.
    fn hostile_pair(limits: TcpLimits) -> (TcpCommunicator, TcpStream) {
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, open(limits, None)).unwrap();
        let at = root.rendezvous().clone();
        let accepting = std::thread::spawn(move || root.accept_all(Duration::from_secs(5)));
        let peer = raw_member(&at, 1, 2);
        (accepting.join().unwrap().unwrap(), peer)
    }

    fn recv(from: usize, len: usize) -> Pending<Vec<u8>> {
        Pending {
            sends: vec![],
            recvs: vec![(from, len)],
        }
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
        let err = run_bounded(&mut zero, recv(2, 8), Duration::from_secs(30)).unwrap_err();
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
        let err = run_bounded(&mut others[0], recv(0, 8), Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, CommError::Failed(_)), "{err}");
    }

    #[test]
    fn a_silent_peer_costs_one_timeout() {
        let (mut zero, _others) = star(2);
        let err = run_bounded(&mut zero, recv(1, 4), Duration::from_millis(50)).unwrap_err();
        assert_eq!(err, CommError::Timeout(Duration::from_millis(50)));
    }

    /// Builds of another layer protocol never share a communicator: rank 0 answers nothing to
    /// an older member's hello (so it never joins), and a member refuses an older rank 0's
    /// greeting, naming the older build.
    #[test]
    fn older_builds_are_refused_at_the_handshake() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, plain()).unwrap();
        let at = root.rendezvous().clone();
        let accepting = std::thread::spawn(move || root.accept_all(Duration::from_millis(500)));
        let mut old = TcpStream::connect(&at.address).unwrap();
        let root_challenge = greeted(&mut old);
        let mut hello = encode_hello(
            &at.nonce,
            1,
            2,
            None,
            &[7; CHALLENGE_BYTES],
            &root_challenge,
        );
        hello[..8].copy_from_slice(b"MOECOLL2");
        old.write_all(&hello).unwrap();
        let mut ack = [0u8; ACK_BYTES];
        assert!(
            old.read_exact(&mut ack).is_err(),
            "no answer to an older build"
        );
        assert!(accepting.join().unwrap().is_err(), "rank 1 never joined");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let old_root = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut greeting = [0u8; GREETING_BYTES];
            greeting[..8].copy_from_slice(b"MOECOLL2");
            socket.write_all(&greeting).unwrap();
            socket
        });
        let older = TcpRendezvous {
            address,
            nonce: at.nonce,
        };
        let err = TcpCommunicator::connect(&older, 1, 2, Duration::from_secs(2), &plain())
            .err()
            .expect("an older rank 0 is refused");
        assert!(err.to_string().contains("older build (MOECOLL2)"), "{err}");
        drop(old_root.join());
    }

    #[test]
    fn a_wrong_nonce_or_rank_does_not_join() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, plain()).unwrap();
        let mut stale = root.rendezvous().clone();
        stale.nonce[0] ^= 1;
        let good = root.rendezvous().clone();
        let intruder = std::thread::spawn(move || {
            let wrong_nonce = TcpCommunicator::connect(&stale, 1, 2, SECOND, &plain());
            let late =
                std::thread::spawn(move || TcpCommunicator::connect(&good, 1, 2, SECOND, &plain()));
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
                SECOND,
                &plain(),
            ),
            Err(CommError::BadRank { rank: 2, size: 2 })
        ));
    }

    #[test]
    fn a_duplicate_rank_is_refused() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 3, plain()).unwrap();
        let at = root.rendezvous().clone();
        let accepting = std::thread::spawn(move || root.accept_all(Duration::from_secs(5)));
        let first = TcpCommunicator::connect(&at, 1, 3, SECOND, &plain()).unwrap();
        let again = TcpCommunicator::connect(&at, 1, 3, SECOND, &plain());
        assert!(again.is_err(), "rank 1 twice");
        let other = TcpCommunicator::connect(&at, 2, 3, SECOND, &plain()).unwrap();
        let zero = accepting.join().unwrap().unwrap();
        assert_eq!(zero.size(), 3);
        drop((first, other));
    }

    #[test]
    fn ranks_that_never_join_time_out() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 3, plain()).unwrap();
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

    /// Hands out `bytes`, failing the test if more than `budget` of them are asked for.
    struct Budget<'a> {
        bytes: &'a [u8],
        budget: usize,
        taken: usize,
    }

    impl Read for Budget<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.bytes.len());
            self.taken += n;
            assert!(self.taken <= self.budget, "read past the length prefix");
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_its_payload() {
        let max = 1 << 16;
        for len in [1u64 << 31, max + 1, u64::MAX] {
            let mut stream = len.to_le_bytes().to_vec();
            stream.extend([0xab; 4096]);
            let mut reader = Budget {
                bytes: &stream,
                budget: 8,
                taken: 0,
            };
            let err = read_frame(&mut reader, max).unwrap_err();
            assert!(
                matches!(err, FrameReadError::TooLarge { len: l, max: m } if l == len && m == max),
                "{err}"
            );
            assert_eq!(reader.taken, 8);
        }
        // At the bound, it is read.
        let mut stream = max.to_le_bytes().to_vec();
        stream.extend(vec![3u8; max as usize]);
        assert_eq!(
            read_frame(&mut stream.as_slice(), max).unwrap().len(),
            max as usize
        );
    }

    #[test]
    fn a_payload_buffer_grows_with_what_arrives() {
        // 200 MB announced, 10 bytes sent: at most one chunk was allocated.
        let mut frame = Vec::new();
        let err = fill_payload(&mut [1u8; 10].as_slice(), 200 << 20, &mut frame).unwrap_err();
        assert!(matches!(err, FrameReadError::Truncated(_)), "{err}");
        assert!(frame.capacity() <= READ_CHUNK, "{}", frame.capacity());
        // Arriving in small pieces, a frame of a few chunks is whole and never over-allocated.
        let len = 3 * READ_CHUNK + 17;
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut trickle = std::io::BufReader::with_capacity(1000, data.as_slice());
        let got = read_frame_payload(&mut trickle, len).unwrap();
        assert_eq!(got, data);
        assert!(got.capacity() <= len + 64, "{}", got.capacity());
    }

    #[test]
    fn an_oversized_frame_fails_the_communicator_and_cuts_the_peer_off() {
        let max = 1 << 16;
        for announced in [1u64 << 31, max + 1] {
            let (mut zero, mut peer) = hostile_pair(TcpLimits::for_frames(max));
            peer.write_all(&announced.to_le_bytes()).unwrap();
            let _ = peer.write_all(&[0xab; 1024]);
            // The failure surfaces at the post if the reader got there first, else at a wait.
            let deadline = Instant::now() + Duration::from_secs(5);
            let err = match zero.post(recv(1, 16)) {
                Err(e) => e,
                Ok(()) => loop {
                    match zero.wait(Duration::from_millis(10)) {
                        Err(e) => break e,
                        Ok(got) => assert!(got.is_none() && Instant::now() < deadline),
                    }
                },
            };
            let want = CommError::FrameTooLarge {
                rank: 1,
                len: announced,
                max,
            };
            assert_eq!(err, want);
            let text = err.to_string();
            assert!(
                text.contains("rank 1") && text.contains(&announced.to_string()),
                "{text}"
            );
            // Cut off by the reader itself (no abort yet): the peer sees its connection end.
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut byte = [0u8; 1];
            match peer.read(&mut byte) {
                Ok(0) => {}
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
                Ok(_) => panic!("the peer was answered, not cut off"),
            }
            // And the failure sticks.
            assert_eq!(zero.post(recv(1, 16)), Err(want));
        }
    }

    fn queued_bytes(comm: &TcpCommunicator) -> u64 {
        comm.shared.lock().bytes.iter().sum()
    }

    #[test]
    fn a_flooding_peer_is_held_back_not_queued() {
        const FRAME: usize = 16 << 10;
        let bounded_by_frames = TcpLimits {
            max_frame_bytes: 64 << 10,
            max_queued_frames: 16,
            max_queued_bytes: 1 << 20,
        };
        let bounded_by_bytes = TcpLimits {
            max_queued_frames: 64,
            max_queued_bytes: 64 << 10,
            ..bounded_by_frames
        };
        for limits in [bounded_by_frames, bounded_by_bytes] {
            let (mut zero, mut peer) = hostile_pair(limits);
            peer.set_write_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let flooder = std::thread::spawn(move || {
                let mut frame = (FRAME as u64).to_le_bytes().to_vec();
                frame.extend(vec![5u8; FRAME]);
                for sent in 0..20_000 {
                    if peer.write_all(&frame).is_err() {
                        return (sent, peer);
                    }
                }
                (20_000, peer)
            });
            let mut most = (0, 0);
            while !flooder.is_finished() {
                most.0 = most.0.max(zero.queued_frames());
                most.1 = most.1.max(queued_bytes(&zero));
                std::thread::sleep(Duration::from_millis(1));
            }
            let (sent, peer) = flooder.join().unwrap();
            assert!(sent < 20_000, "{sent} frames went out without backpressure");
            assert!(most.0 <= limits.max_queued_frames, "{most:?} {limits:?}");
            assert!(most.1 <= limits.max_queued_bytes, "{most:?} {limits:?}");
            assert!(zero.queued_frames() >= 1);
            // Taking frames lets the reader go on.
            let got = run_bounded(
                &mut zero,
                Pending {
                    sends: vec![],
                    recvs: vec![(1, FRAME); 3],
                },
                Duration::from_secs(5),
            )
            .unwrap();
            assert_eq!(got, vec![vec![5u8; FRAME]; 3]);
            // An abort wakes the reader waiting for room, and it ends.
            let shared = Arc::downgrade(&zero.shared);
            drop(zero);
            let deadline = Instant::now() + Duration::from_secs(5);
            while shared.upgrade().is_some() {
                assert!(
                    Instant::now() < deadline,
                    "a reader outlived its communicator"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(peer);
        }
    }

    #[test]
    fn a_group_larger_than_the_queue_bound_still_completes() {
        let limits = TcpLimits {
            max_frame_bytes: 64 << 10,
            max_queued_frames: 1,
            max_queued_bytes: 64 << 10,
        };
        let (mut zero, mut others) = star_with(2, open(limits, None));
        let frames = vec![
            (1, vec![1u8; 48 << 10]),
            (1, vec![2u8; 48 << 10]),
            (1, vec![3]),
        ];
        let want: Vec<Vec<u8>> = frames.iter().map(|(_, f)| f.clone()).collect();
        run_bounded(
            &mut zero,
            Pending {
                sends: frames,
                recvs: vec![],
            },
            SECOND,
        )
        .unwrap();
        let got = run_bounded(
            &mut others[0],
            Pending {
                sends: vec![],
                recvs: want.iter().map(|f| (0, f.len())).collect(),
            },
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn silent_connections_do_not_delay_the_members() {
        let secret = token("a cluster token of enough bytes");
        let settings = open(TcpLimits::for_frames(1 << 20), Some(&secret));
        let size = 4;
        let root = TcpRoot::bind("127.0.0.1:0", None, size, settings.clone()).unwrap();
        let at = root.rendezvous().clone();
        // Queued ahead of the members: ten that say nothing, one that stops mid-hello.
        let mut silent: Vec<TcpStream> = (0..10)
            .map(|_| TcpStream::connect(&at.address).unwrap())
            .collect();
        let mut half = TcpStream::connect(&at.address).unwrap();
        // (The greeting is not read: rank 0 is not accepting yet, and a half hello needs none.)
        half.write_all(&encode_hello(&at.nonce, 1, size, Some(&secret), &[1; 32], &[0; 32])[..20])
            .unwrap();
        silent.push(half);
        let started = Instant::now();
        let members: Vec<_> = (1..size)
            .map(|rank| {
                let (at, settings) = (at.clone(), settings.clone());
                std::thread::spawn(move || {
                    TcpCommunicator::connect(&at, rank, size, Duration::from_secs(20), &settings)
                })
            })
            .collect();
        let zero = root.accept_all(Duration::from_secs(20)).unwrap();
        let took = started.elapsed();
        for member in members {
            member.join().unwrap().unwrap();
        }
        // One at a time with 2 s each, the silent ones alone took 22 s.
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(zero.size(), size);
        // And they were cut off once the members were in, with nothing past the greeting.
        for mut socket in silent {
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = Vec::new();
            match socket.read_to_end(&mut got) {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
            }
            assert!(
                got.len() <= GREETING_BYTES,
                "a silent connection got an answer"
            );
        }
    }

    #[test]
    fn connections_beyond_the_handshake_cap_are_closed_at_once() {
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, plain()).unwrap();
        let at = root.rendezvous().clone();
        let silent: Vec<TcpStream> = (0..MAX_PENDING_HANDSHAKES)
            .map(|_| TcpStream::connect(&at.address).unwrap())
            .collect();
        let mut extra = TcpStream::connect(&at.address).unwrap();
        let accepting = std::thread::spawn(move || root.accept_all(Duration::from_secs(10)));
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let started = Instant::now();
        let mut byte = [0u8; 1];
        assert!(matches!(extra.read(&mut byte), Ok(0) | Err(_)));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // Silent handshakes end when the deadline ends them; closing them frees the slots.
        drop(silent);
        let member = TcpCommunicator::connect(&at, 1, 2, Duration::from_secs(5), &plain());
        assert!(member.is_ok(), "{:?}", member.err());
        assert!(accepting.join().unwrap().is_ok());
    }

    /// What a member with `member` gets from a rank 0 with `root`, and whether rank 0 formed.
    fn join_with(
        root: Option<&ClusterToken>,
        member: Option<&ClusterToken>,
    ) -> (Result<TcpCommunicator, CommError>, bool) {
        let limits = TcpLimits::for_frames(1 << 20);
        let zero = TcpRoot::bind("127.0.0.1:0", None, 2, open(limits, root)).unwrap();
        let at = zero.rendezvous().clone();
        let accepting = std::thread::spawn(move || zero.accept_all(Duration::from_millis(700)));
        let joined = TcpCommunicator::connect(&at, 1, 2, SECOND, &open(limits, member));
        (joined, accepting.join().unwrap().is_ok())
    }

    #[test]
    fn members_and_rank_zero_must_share_the_cluster_token() {
        let (a, b) = (
            token("token a, sixteen bytes+"),
            token("token b, sixteen bytes+"),
        );
        let (joined, formed) = join_with(Some(&a), Some(&b));
        let err = joined.err().unwrap().to_string();
        assert!(err.contains("refused rank 1"), "{err}");
        assert!(!formed);
        let (joined, formed) = join_with(Some(&a), None);
        let err = joined.err().unwrap().to_string();
        assert!(err.contains("requires a cluster token"), "{err}");
        assert!(!formed);
        let (joined, formed) = join_with(None, Some(&a));
        let err = joined.err().unwrap().to_string();
        assert!(err.contains("has no cluster token"), "{err}");
        assert!(!formed);
        let (joined, formed) = join_with(Some(&a), Some(&a));
        assert!(joined.is_ok() && formed);
    }

    #[test]
    fn a_forged_hello_does_not_take_the_rank() {
        let secret = token("the real token, long enough");
        let settings = open(TcpLimits::for_frames(1 << 20), Some(&secret));
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, settings.clone()).unwrap();
        let at = root.rendezvous().clone();
        let accepting = std::thread::spawn(move || root.accept_all(Duration::from_secs(5)));
        // Right nonce (copied from etcd), proof under another token.
        let forger = token("not the token, long enough");
        let mut rogue = TcpStream::connect(&at.address).unwrap();
        let root_challenge = greeted(&mut rogue);
        rogue
            .write_all(&encode_hello(
                &at.nonce,
                1,
                2,
                Some(&forger),
                &[9; 32],
                &root_challenge,
            ))
            .unwrap();
        rogue
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut ack = [0u8; ACK_BYTES];
        assert!(
            rogue.read_exact(&mut ack).is_err(),
            "refused without an answer"
        );
        let member = TcpCommunicator::connect(&at, 1, 2, SECOND, &settings);
        assert!(member.is_ok(), "{:?}", member.err());
        assert!(accepting.join().unwrap().is_ok());
    }

    /// A hello made for one connection's greeting (as one copied off the wire would be) does
    /// not open another: rank 0's challenge differs, so the proof does not cover it.
    #[test]
    fn a_replayed_hello_does_not_take_the_rank() {
        let secret = token("the real token, long enough");
        let settings = open(TcpLimits::for_frames(1 << 20), Some(&secret));
        let root = TcpRoot::bind("127.0.0.1:0", None, 2, settings.clone()).unwrap();
        let at = root.rendezvous().clone();
        let accepting = std::thread::spawn(move || root.accept_all(Duration::from_secs(5)));
        let mut seen = TcpStream::connect(&at.address).unwrap();
        let first = greeted(&mut seen);
        let copied = encode_hello(&at.nonce, 1, 2, Some(&secret), &[5; 32], &first);
        let mut replay = TcpStream::connect(&at.address).unwrap();
        let second = greeted(&mut replay);
        assert_ne!(first, second, "each connection gets its own challenge");
        replay.write_all(&copied).unwrap();
        replay
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut ack = [0u8; ACK_BYTES];
        assert!(
            replay.read_exact(&mut ack).is_err(),
            "refused without an answer"
        );
        drop(seen);
        let member = TcpCommunicator::connect(&at, 1, 2, SECOND, &settings);
        assert!(member.is_ok(), "{:?}", member.err());
        assert!(accepting.join().unwrap().is_ok());
    }

    #[test]
    fn a_rogue_rank_zero_without_the_token_is_refused() {
        let secret = token("the real token, long enough");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = TcpRendezvous {
            address: listener.local_addr().unwrap().to_string(),
            nonce: [4; NONCE_BYTES],
        };
        // It copied the record, so it knows the nonce; it answers with a proof it made up,
        // then with the member's own proof echoed back.
        let rogue = std::thread::spawn(move || {
            for echo in [false, true] {
                let (mut socket, _) = listener.accept().unwrap();
                socket
                    .write_all(&encode_greeting(&[3; CHALLENGE_BYTES]))
                    .unwrap();
                let mut hello = [0u8; HELLO_BYTES];
                socket.read_exact(&mut hello).unwrap();
                let mut ack = encode_ack(None, None);
                ack[8] = WITH_TOKEN;
                if echo {
                    ack[9..].copy_from_slice(&hello[HELLO_BYTES - PROOF_BYTES..]);
                } else {
                    ack[9..].copy_from_slice(&[0x5a; PROOF_BYTES]);
                }
                socket.write_all(&ack).unwrap();
            }
        });
        let settings = open(TcpLimits::for_frames(1 << 20), Some(&secret));
        for _ in 0..2 {
            let err = TcpCommunicator::connect(&at, 1, 2, SECOND, &settings)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("did not prove the cluster token"), "{err}");
        }
        rogue.join().unwrap();
    }

    /// With the token on both ends, one real MoE layer goes to a node and back, under frame
    /// bounds computed on each side from the same batch bound.
    #[test]
    fn a_layer_round_trips_between_token_holders() {
        use std::path::Path;

        use moe_model::checkpoint::Checkpoint;
        use moe_model::experts::{ExpertBackend, ExpertSet};
        use moe_model::routes::ExpertRoutes;
        use moe_model::ModelConfig;

        use super::super::exchange::{dispatch_layer, serve_layer, NodeShare, Served};
        use super::super::plan::FrameBounds;

        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen3-moe-tiny");
        let (ckpt, config) = (
            Checkpoint::open(&dir).unwrap(),
            ModelConfig::from_dir(&dir).unwrap(),
        );
        let (hidden, top_k) = (config.hidden_size, config.moe.top_k);
        let layer = config.moe_layer_indices().next().unwrap();
        let experts = config.moe.num_experts;
        let set = ExpertSet::load(&ckpt, &config, (0..experts).map(|e| (layer, e))).unwrap();
        let max_rows = 3;
        let bounds = FrameBounds::new(max_rows, hidden, top_k);
        let secret = token("a shared cluster token, 32 bytes");
        let root_settings = open(TcpLimits::for_frames(bounds.to_router), Some(&secret));
        let node_settings = open(TcpLimits::for_frames(bounds.to_node), Some(&secret));

        let root = TcpRoot::bind("127.0.0.1:0", None, 2, root_settings).unwrap();
        let at = root.rendezvous().clone();
        let node = std::thread::spawn(move || {
            let mut comm =
                TcpCommunicator::connect(&at, 1, 2, Duration::from_secs(5), &node_settings)
                    .unwrap();
            serve_layer(
                &mut comm,
                &set,
                &crate::dispatch_rules::DispatchRules::new(hidden, max_rows, top_k, [layer]),
                || true,
                |_| tracing::Span::none(),
                Duration::from_secs(5),
            )
        });
        let mut zero = root.accept_all(Duration::from_secs(5)).unwrap();
        let x: Vec<f32> = (0..max_rows * hidden)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut routes = ExpertRoutes::with_capacity(max_rows, max_rows * top_k);
        for r in 0..max_rows {
            let mut pairs: Vec<(u32, f32)> = (0..top_k)
                .map(|k| (((r + k) % experts) as u32, 1.0 / top_k as f32))
                .collect();
            routes.push_row(&mut pairs);
        }
        let alone = ExpertSet::load(&ckpt, &config, (0..experts).map(|e| (layer, e))).unwrap();
        let want = alone.run_experts(layer, &x, &routes).unwrap();
        let share = NodeShare { rows: x, routes };
        let answers = dispatch_layer(
            &mut zero,
            layer as u32,
            &[share],
            &[],
            hidden,
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        assert_eq!(answers[0].outputs, want);
        assert!(matches!(
            node.join().unwrap(),
            Ok(Served::Ran { rows: 3, .. })
        ));
    }
}
