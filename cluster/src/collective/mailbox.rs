//! Ranks in one process: each send is moved into the receiver's mailbox, nothing is copied.
//! With host bytes ([`HostBytes`]) it is the in-memory fake the protocol's tests run on (a rank
//! can be made to die); with device buffers (`DeviceBuffers`, `--features cuda`) it is the
//! in-process device transport: a router and an expert set on one GPU hand rows and outputs
//! over by pointer, so the device-resident data plane runs end to end where NCCL cannot (NCCL
//! refuses two ranks on one GPU). Ordering on the device is cudarc's: a kernel that reads a
//! received buffer waits for the event of the write that filled it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;

use super::communicator::{CommError, Communicator, Pending};
use super::row_encoding::RowEncoding;

/// What a mailbox's buffers are, and how host bytes become one and back.
pub trait Carrier: Send + Sync + 'static {
    type Buffer: Send + 'static;
    fn bytes(&self, buffer: &Self::Buffer) -> usize;
    fn upload(&self, bytes: Vec<u8>) -> Result<Self::Buffer, CommError>;
    fn download(&self, buffer: Self::Buffer) -> Result<Vec<u8>, CommError>;
    /// See [`Communicator::run_in_place`].
    fn run_in_place(
        &self,
        _experts: &dyn ExpertBackend,
        _layer: usize,
        _rows: &Self::Buffer,
        _encoding: RowEncoding,
        _routes: &ExpertRoutes,
    ) -> Option<Result<(Self::Buffer, usize), String>> {
        None
    }
}

/// Host bytes: the in-memory fake.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostBytes;

impl Carrier for HostBytes {
    type Buffer = Vec<u8>;

    fn bytes(&self, buffer: &Vec<u8>) -> usize {
        buffer.len()
    }

    fn upload(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        Ok(bytes)
    }

    fn download(&self, buffer: Vec<u8>) -> Result<Vec<u8>, CommError> {
        Ok(buffer)
    }
}

/// `(from, to)` queues, and a signal for every send (a waiting rank wakes at once instead of
/// polling: a layer is three groups, each one wait).
struct Mailboxes<B> {
    queues: Mutex<HashMap<(usize, usize), VecDeque<B>>>,
    sent: Condvar,
}

pub struct MailboxComm<C: Carrier> {
    carrier: C,
    rank: usize,
    size: usize,
    boxes: Arc<Mailboxes<C::Buffer>>,
    dead: Arc<Mutex<Vec<bool>>>,
    posted: Option<Vec<(usize, usize)>>,
    pub aborted: bool,
}

/// The in-memory fake of the protocol's tests.
pub type FakeComm = MailboxComm<HostBytes>;

/// `size` ranks sharing mailboxes, each with its own `carrier`; the second value kills ranks
/// (`dead[r] = true`: its mailbox is never delivered to again).
pub fn group<C: Carrier + Clone>(
    size: usize,
    carrier: C,
) -> (Vec<MailboxComm<C>>, Arc<Mutex<Vec<bool>>>) {
    let boxes = Arc::new(Mailboxes {
        queues: Mutex::new(HashMap::new()),
        sent: Condvar::new(),
    });
    let dead = Arc::new(Mutex::new(vec![false; size]));
    let comms = (0..size)
        .map(|rank| MailboxComm {
            carrier: carrier.clone(),
            rank,
            size,
            boxes: Arc::clone(&boxes),
            dead: Arc::clone(&dead),
            posted: None,
            aborted: false,
        })
        .collect();
    (comms, dead)
}

impl<C: Carrier> MailboxComm<C> {
    /// Whether every receive of the posted group has a buffer waiting.
    fn ready(
        boxes: &HashMap<(usize, usize), VecDeque<C::Buffer>>,
        recvs: &[(usize, usize)],
        rank: usize,
    ) -> bool {
        recvs
            .iter()
            .all(|(peer, _)| boxes.get(&(*peer, rank)).is_some_and(|q| !q.is_empty()))
    }
}

/// [`group`] over host bytes.
pub fn host_group(size: usize) -> (Vec<FakeComm>, Arc<Mutex<Vec<bool>>>) {
    group(size, HostBytes)
}

impl<C: Carrier> Communicator for MailboxComm<C> {
    type Buffer = C::Buffer;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn post(&mut self, group: Pending<C::Buffer>) -> Result<(), CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        let dead = self.dead.lock().map(|d| d.clone()).unwrap_or_default();
        let mut boxes = self
            .boxes
            .queues
            .lock()
            .map_err(|_| CommError::Failed("poisoned".into()))?;
        for (peer, buffer) in group.sends {
            // A dead peer's mailbox is never read; the send is lost, as on a real link.
            if !dead.get(peer).copied().unwrap_or(true) {
                boxes
                    .entry((self.rank, peer))
                    .or_default()
                    .push_back(buffer);
            }
        }
        drop(boxes);
        self.boxes.sent.notify_all();
        self.posted = Some(group.recvs);
        Ok(())
    }

    fn poll(&mut self) -> Result<Option<Vec<C::Buffer>>, CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        let Some(recvs) = &self.posted else {
            return Ok(Some(Vec::new()));
        };
        let mut boxes = self
            .boxes
            .queues
            .lock()
            .map_err(|_| CommError::Failed("poisoned".into()))?;
        if !Self::ready(&boxes, recvs, self.rank) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(recvs.len());
        for (peer, len) in recvs {
            let Some(buffer) = boxes
                .get_mut(&(*peer, self.rank))
                .and_then(|q| q.pop_front())
            else {
                return Err(CommError::Failed(format!("nothing from rank {peer}")));
            };
            let got = self.carrier.bytes(&buffer);
            if got != *len {
                return Err(CommError::Failed(format!(
                    "rank {peer} sent {got} bytes, {len} expected"
                )));
            }
            out.push(buffer);
        }
        self.posted = None;
        Ok(Some(out))
    }

    /// Sleeps until a send arrives (or `at_most`). On a thread of the math pool it first runs
    /// the pool's pending work and sleeps at most 50 us at a time: the ranks are threads of
    /// this process, and their expert math may be queued on this very pool (with one math
    /// thread, a rank would otherwise wait for itself).
    fn wait(&mut self, at_most: Duration) -> Result<Option<Vec<C::Buffer>>, CommError> {
        if let Some(done) = self.poll()? {
            return Ok(Some(done));
        }
        let nap = match rayon::yield_now() {
            Some(rayon::Yield::Executed) => return self.poll(),
            Some(rayon::Yield::Idle) => at_most.min(Duration::from_micros(50)),
            None => at_most,
        };
        if let Some(recvs) = &self.posted {
            let boxes = self
                .boxes
                .queues
                .lock()
                .map_err(|_| CommError::Failed("poisoned".into()))?;
            if !Self::ready(&boxes, recvs, self.rank) {
                let _ = self.boxes.sent.wait_timeout(boxes, nap);
            }
        }
        self.poll()
    }

    fn abort(&mut self) {
        self.aborted = true;
        self.posted = None;
    }

    fn upload(&self, bytes: Vec<u8>) -> Result<C::Buffer, CommError> {
        self.carrier.upload(bytes)
    }

    fn download(&self, buffer: C::Buffer) -> Result<Vec<u8>, CommError> {
        self.carrier.download(buffer)
    }

    fn buffer_bytes(&self, buffer: &C::Buffer) -> usize {
        self.carrier.bytes(buffer)
    }

    fn run_in_place(
        &self,
        experts: &dyn ExpertBackend,
        layer: usize,
        rows: &C::Buffer,
        encoding: RowEncoding,
        routes: &ExpertRoutes,
    ) -> Option<Result<(C::Buffer, usize), String>> {
        self.carrier
            .run_in_place(experts, layer, rows, encoding, routes)
    }
}

/// Device buffers handed over by pointer between ranks on one GPU.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct DeviceBuffers {
    pub stream: Arc<moe_model::cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl Carrier for DeviceBuffers {
    type Buffer = super::nccl::NcclBuffer;

    fn bytes(&self, buffer: &Self::Buffer) -> usize {
        buffer.bytes()
    }

    fn upload(&self, bytes: Vec<u8>) -> Result<Self::Buffer, CommError> {
        super::nccl::upload_bytes(&self.stream, &bytes)
    }

    fn download(&self, buffer: Self::Buffer) -> Result<Vec<u8>, CommError> {
        super::nccl::download_bytes(&self.stream, &buffer)
    }

    fn run_in_place(
        &self,
        experts: &dyn ExpertBackend,
        layer: usize,
        rows: &Self::Buffer,
        encoding: RowEncoding,
        routes: &ExpertRoutes,
    ) -> Option<Result<(Self::Buffer, usize), String>> {
        rows.run_in_place(experts, layer, encoding, routes)
    }
}
