//! The NCCL [`Communicator`] (`--features cuda`): one rank per process, the all-to-all as one
//! group of `ncclSend`/`ncclRecv` on the process's stream.
//!
//! Communicators are created non-blocking (`ncclConfig_t.blocking = 0`), so neither joining
//! nor a collective can hang the caller: both are polled (`ncclCommGetAsyncError`, a CUDA
//! event) under [`super::run_bounded`]'s deadline, and a dead peer ends in `ncclCommAbort`.
//! cudarc's own `Comm` is not used because its `Drop` aborts with a panic on failure and
//! its constructor blocks.

use std::ffi::CStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use moe_model::cudarc::nccl::sys::{self, ncclResult_t};
use moe_model::experts::ExpertBackend;
use moe_model::routes::ExpertRoutes;

use super::communicator::{CommError, Communicator, Pending};
use super::row_encoding::RowEncoding;

/// `NCCL_CONFIG_MAGIC` from nccl.h.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default".
const UNDEF: i32 = i32::MIN;

/// Bytes of an `ncclUniqueId` (what the router publishes in etcd for an epoch).
pub const UNIQUE_ID_BYTES: usize = 128;

fn library_present() -> Result<(), CommError> {
    // SAFETY: only tries to open the shared libraries.
    let present =
        unsafe { moe_model::cudarc::driver::sys::is_culib_present() && sys::is_culib_present() };
    if present {
        Ok(())
    } else {
        Err(CommError::Failed(
            "libnccl or libcuda could not be loaded (put them on LD_LIBRARY_PATH)".into(),
        ))
    }
}

fn describe(result: ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static string for every result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(result)) };
    format!("{result:?}: {}", text.to_string_lossy())
}

/// `Ok` for success and for "in progress" (non-blocking communicators), else the error.
fn check(result: ncclResult_t, what: &str) -> Result<(), CommError> {
    match result {
        ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(()),
        other => Err(CommError::Failed(format!("{what}: {}", describe(other)))),
    }
}

/// An open `ncclGroupStart` on this thread, ended exactly once: by [`Group::end`], or by
/// `Drop` when an `ncclSend`/`ncclRecv` fails and `post` returns early. NCCL's group depth is
/// per thread, so a group left open would swallow every later NCCL call on the thread (the
/// abort that follows the error, the next epoch's communicator) into a group never launched.
/// NCCL ends a group that recorded an error by discarding its operations and returning the
/// error, so nothing of a failed group runs.
struct Group {
    open: bool,
}

impl Group {
    fn start() -> Result<Self, CommError> {
        // SAFETY: no arguments; pairs with the `ncclGroupEnd` of `end` or `drop`.
        check(unsafe { sys::ncclGroupStart() }, "ncclGroupStart")?;
        Ok(Self { open: true })
    }

    fn end(mut self) -> Result<(), CommError> {
        self.open = false;
        // SAFETY: ends the group this value started.
        check(unsafe { sys::ncclGroupEnd() }, "ncclGroupEnd")
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.open {
            // SAFETY: ends the group this value started (an error path: its result is the
            // error already being returned, or a new one worth a log line only).
            let result = unsafe { sys::ncclGroupEnd() };
            if let Err(e) = check(result, "ncclGroupEnd after a failed call") {
                tracing::warn!(error = %e, "ending an NCCL group on an error path");
            }
        }
    }
}

/// A fresh `ncclUniqueId` (made by the epoch's rank 0, the router).
pub fn new_unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CommError> {
    library_present()?;
    // SAFETY: ncclGetUniqueId writes the id it is given.
    let mut id = sys::ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    check(unsafe { sys::ncclGetUniqueId(&mut id) }, "ncclGetUniqueId")?;
    Ok(id.internal.map(|c| c as u8))
}

/// A device buffer NCCL sends from or receives into.
pub enum NcclBuffer {
    /// Bytes made on the host (headers, routes, the rows the router packs).
    Bytes(CudaSlice<u8>),
    /// `bytes` bytes in 4-byte words: every received buffer, and expert outputs, so that
    /// received rows go to the experts' GEMMs, and their outputs back to NCCL, as they are.
    Words { words: CudaSlice<f32>, bytes: usize },
}

impl NcclBuffer {
    pub fn bytes(&self) -> usize {
        match self {
            NcclBuffer::Bytes(b) => b.len(),
            NcclBuffer::Words { bytes, .. } => *bytes,
        }
    }

    /// f32 words filling the whole buffer: rows the experts can read where they lie.
    pub fn words(&self) -> Option<&CudaSlice<f32>> {
        match self {
            NcclBuffer::Words { words, bytes } if *bytes == words.len() * 4 => Some(words),
            _ => None,
        }
    }

    /// [`Communicator::run_in_place`] for any transport whose buffers these are: received
    /// rows to experts on the same GPU, their outputs back as a buffer to send. bf16 rows are
    /// two to a word of the buffer.
    pub fn run_in_place(
        &self,
        experts: &dyn ExpertBackend,
        layer: usize,
        encoding: RowEncoding,
        routes: &ExpertRoutes,
    ) -> Option<Result<(NcclBuffer, usize), String>> {
        let ran = match (encoding, self) {
            (RowEncoding::F32, _) => experts.run_experts_on_device(layer, self.words()?, routes)?,
            (RowEncoding::Bf16, NcclBuffer::Words { words, bytes }) if bytes.is_multiple_of(2) => {
                experts.run_bf16_rows_on_device(layer, words, bytes / 2, routes)?
            }
            (RowEncoding::Bf16, _) => return None,
        };
        Some(ran.map_err(|e| e.to_string()).map(|words| {
            let values = words.len();
            let bytes = values * 4;
            (NcclBuffer::Words { words, bytes }, values)
        }))
    }
}

/// What a posted group still owns until it completes.
struct InFlight {
    /// Recorded once NCCL has finished enqueueing the group (a non-blocking communicator may
    /// still be enqueueing when `ncclGroupEnd` returns `ncclInProgress`).
    done: Option<CudaEvent>,
    received: Vec<NcclBuffer>,
    /// Kept alive until NCCL has read them.
    _sent: Vec<NcclBuffer>,
}

pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    /// The router's GPU context, whose kernels gather rows for it and place outputs back.
    rows_on: Option<Arc<moe_model::gpu::GpuContext>>,
    rank: usize,
    size: usize,
    in_flight: Option<InFlight>,
    aborted: bool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent, which `&mut self` guarantees; the CUDA objects it holds are Send.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Joins the communicator `id` as `rank` of `size`, waiting at most `timeout` for the
    /// other ranks; on a timeout the half-made communicator is aborted.
    pub fn join(
        stream: Arc<CudaStream>,
        id: &[u8; UNIQUE_ID_BYTES],
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        if rank >= size {
            return Err(CommError::BadRank { rank, size });
        }
        library_present()?;
        let mut version = 0;
        // SAFETY: writes one int.
        check(
            unsafe { sys::ncclGetVersion(&mut version) },
            "ncclGetVersion",
        )?;
        let mut config = sys::ncclConfig_t {
            size: std::mem::size_of::<sys::ncclConfig_t>(),
            magic: CONFIG_MAGIC,
            version: version as u32,
            blocking: 0,
            cgaClusterSize: UNDEF,
            minCTAs: UNDEF,
            maxCTAs: UNDEF,
            netName: std::ptr::null(),
            splitShare: UNDEF,
            trafficClass: UNDEF,
            commName: std::ptr::null(),
            collnetEnable: UNDEF,
            CTAPolicy: UNDEF,
            shrinkShare: UNDEF,
            nvlsCTAs: UNDEF,
            nChannelsPerNetPeer: UNDEF,
            nvlinkCentricSched: UNDEF,
            graphUsageMode: UNDEF,
            maxP2pPeers: UNDEF,
            numRmaCtx: UNDEF,
        };
        let unique = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| CommError::Failed(format!("CUDA: {e}")))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; NCCL copies the config.
        let started = unsafe {
            sys::ncclCommInitRankConfig(&mut comm, size as i32, unique, rank as i32, &mut config)
        };
        check(started, "ncclCommInitRankConfig")?;
        let mut joined = Self {
            comm,
            stream,
            rows_on: None,
            rank,
            size,
            in_flight: None,
            aborted: false,
        };
        let deadline = Instant::now() + timeout;
        loop {
            match joined.async_state()? {
                ncclResult_t::ncclSuccess => return Ok(joined),
                _ if Instant::now() >= deadline => {
                    joined.abort();
                    return Err(CommError::Timeout(timeout));
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// `ncclSuccess`, `ncclInProgress`, or the communicator's asynchronous error as `Err`.
    fn async_state(&mut self) -> Result<ncclResult_t, CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        let mut state = ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live (not aborted); writes one result.
        check(
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) },
            "ncclCommGetAsyncError",
        )?;
        match state {
            ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => Ok(state),
            other => Err(CommError::Failed(describe(other))),
        }
    }

    /// A device buffer of `len` bytes for a send (callers fill it, e.g. with packed rows).
    pub fn alloc(&self, len: usize) -> Result<CudaSlice<u8>, CommError> {
        self.stream
            .alloc_zeros::<u8>(len.max(1))
            .map_err(|e| CommError::Failed(format!("CUDA: {e}")))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Lets the router's side gather a layer's rows and place its outputs on `gpu` (the
    /// context of this communicator's stream).
    pub fn with_row_plane(mut self, gpu: Arc<moe_model::gpu::GpuContext>) -> Self {
        self.rows_on = Some(gpu);
        self
    }

    /// The context of [`Self::with_row_plane`].
    pub fn rows_on(&self) -> Option<&Arc<moe_model::gpu::GpuContext>> {
        self.rows_on.as_ref()
    }
}

impl Communicator for NcclCommunicator {
    type Buffer = NcclBuffer;

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn post(&mut self, group: Pending<NcclBuffer>) -> Result<(), CommError> {
        if self.aborted {
            return Err(CommError::Aborted);
        }
        let cuda = Self::cuda;
        // The router joins on one thread and dispatches from another: NCCL enqueues on the
        // calling thread's current context, so make it this communicator's.
        self.stream.context().bind_to_thread().map_err(cuda)?;
        let mut received = Vec::with_capacity(group.recvs.len());
        for &(_, len) in &group.recvs {
            received.push(NcclBuffer::Words {
                words: self
                    .stream
                    .alloc_zeros::<f32>(len.div_ceil(4).max(1))
                    .map_err(cuda)?,
                bytes: len,
            });
        }
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        // Ended on every path, including an early return from a failed send or receive.
        let open = Group::start()?;
        // SAFETY: every buffer is a live device allocation of at least the length passed, and
        // they are kept in `in_flight` until the event recorded after the group completes.
        unsafe {
            for (peer, buffer) in &group.sends {
                let (ptr, _record) = match buffer {
                    NcclBuffer::Bytes(b) => b.device_ptr(&self.stream),
                    NcclBuffer::Words { words, .. } => words.device_ptr(&self.stream),
                };
                check(
                    sys::ncclSend(
                        ptr as *const _,
                        buffer.bytes(),
                        sys::ncclDataType_t::ncclUint8,
                        *peer as i32,
                        self.comm,
                        stream,
                    ),
                    "ncclSend",
                )?;
            }
            for ((peer, len), buffer) in group.recvs.iter().zip(received.iter_mut()) {
                let (ptr, _record) = match buffer {
                    NcclBuffer::Bytes(b) => b.device_ptr_mut(&self.stream),
                    NcclBuffer::Words { words, .. } => words.device_ptr_mut(&self.stream),
                };
                check(
                    sys::ncclRecv(
                        ptr as *mut _,
                        *len,
                        sys::ncclDataType_t::ncclUint8,
                        *peer as i32,
                        self.comm,
                        stream,
                    ),
                    "ncclRecv",
                )?;
            }
        }
        open.end()?;
        self.in_flight = Some(InFlight {
            done: None,
            received,
            _sent: group.sends.into_iter().map(|(_, b)| b).collect(),
        });
        Ok(())
    }

    fn poll(&mut self) -> Result<Option<Vec<NcclBuffer>>, CommError> {
        let state = self.async_state()?;
        let stream = Arc::clone(&self.stream);
        let Some(in_flight) = &mut self.in_flight else {
            return Ok(Some(Vec::new()));
        };
        let done = match &in_flight.done {
            Some(done) => done,
            // Still being enqueued: the event must come after NCCL's work on the stream.
            None if state == ncclResult_t::ncclInProgress => return Ok(None),
            None => in_flight
                .done
                .insert(stream.record_event(None).map_err(Self::cuda)?),
        };
        let complete = done.try_is_complete().map_err(Self::cuda)?;
        if !complete {
            return Ok(None);
        }
        Ok(self.in_flight.take().map(|f| f.received))
    }

    fn upload(&self, bytes: Vec<u8>) -> Result<NcclBuffer, CommError> {
        upload_bytes(&self.stream, &bytes)
    }

    fn download(&self, buffer: NcclBuffer) -> Result<Vec<u8>, CommError> {
        download_bytes(&self.stream, &buffer)
    }

    fn buffer_bytes(&self, buffer: &NcclBuffer) -> usize {
        buffer.bytes()
    }

    fn run_in_place(
        &self,
        experts: &dyn ExpertBackend,
        layer: usize,
        rows: &NcclBuffer,
        encoding: RowEncoding,
        routes: &ExpertRoutes,
    ) -> Option<Result<(NcclBuffer, usize), String>> {
        rows.run_in_place(experts, layer, encoding, routes)
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: `comm` is live; abort frees it without waiting for peers.
            let result = unsafe { sys::ncclCommAbort(self.comm) };
            if result != ncclResult_t::ncclSuccess {
                tracing::warn!(error = %describe(result), "ncclCommAbort");
            }
            // Buffers of an aborted group are freed with the stream's pending work dropped.
            self.in_flight = None;
        }
    }
}

impl NcclCommunicator {
    fn cuda(e: moe_model::cudarc::driver::DriverError) -> CommError {
        cuda_error(e)
    }
}

fn cuda_error(e: moe_model::cudarc::driver::DriverError) -> CommError {
    CommError::Failed(format!("CUDA: {e}"))
}

/// Host bytes copied into a device buffer on `stream` (an empty one still gets a byte: NCCL
/// and the allocator want a live pointer).
pub fn upload_bytes(stream: &Arc<CudaStream>, bytes: &[u8]) -> Result<NcclBuffer, CommError> {
    if bytes.is_empty() {
        return Ok(NcclBuffer::Bytes(
            stream.alloc_zeros::<u8>(1).map_err(cuda_error)?,
        ));
    }
    Ok(NcclBuffer::Bytes(
        stream.clone_htod(bytes).map_err(cuda_error)?,
    ))
}

/// The bytes a device buffer carries, copied to the host once `stream` has them.
pub fn download_bytes(stream: &Arc<CudaStream>, buffer: &NcclBuffer) -> Result<Vec<u8>, CommError> {
    let bytes = match buffer {
        NcclBuffer::Bytes(b) => stream.clone_dtoh(b),
        NcclBuffer::Words { words, bytes } => {
            // SAFETY: a view of the words' first `bytes` bytes (checked against the
            // allocation by `transmute`), read as bytes.
            let Some(view) = (unsafe { words.transmute::<u8>(*bytes) }) else {
                return Err(CommError::Failed(format!(
                    "{bytes} bytes do not fit {} words",
                    words.len()
                )));
            };
            stream.clone_dtoh(&view)
        }
    }
    .map_err(cuda_error)?;
    stream.synchronize().map_err(cuda_error)?;
    Ok(bytes)
}

impl Drop for NcclCommunicator {
    /// Abort, not finalize + destroy: on a non-blocking communicator those two must be polled
    /// to completion, and a retired epoch's peers may be gone; abort frees everything at once.
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::run_bounded;
    use moe_model::cudarc::driver::CudaContext;

    /// A one-rank communicator's all-to-all (send to and receive from itself) carries the
    /// bytes through NCCL and back. Needs a GPU and libnccl: run by `ops/gpu-check.sh`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libnccl (ops/gpu-check.sh runs it)"]
    fn one_rank_round_trip() {
        let ctx = CudaContext::new(0).expect("GPU 0");
        let stream = ctx.new_stream().expect("stream");
        let id = new_unique_id().expect("unique id");
        let mut comm =
            NcclCommunicator::join(Arc::clone(&stream), &id, 0, 1, Duration::from_secs(30))
                .expect("join");
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let send = comm.upload(payload.clone()).expect("upload");
        let received = run_bounded(
            &mut comm,
            Pending {
                sends: vec![(0, send)],
                recvs: vec![(0, payload.len())],
            },
            Duration::from_secs(30),
        )
        .expect("exchange");
        let back = comm
            .download(received.into_iter().next().expect("one buffer"))
            .expect("download");
        assert_eq!(back, payload);
        println!("nccl one-rank round trip: {} bytes ok", payload.len());
    }

    /// Rows received over NCCL go to the experts' GEMMs where they are, and the outputs match
    /// the same experts run from host rows. Needs a GPU and libnccl: run by `ops/gpu-check.sh`.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libnccl (ops/gpu-check.sh runs it)"]
    fn one_rank_rows_run_in_place() {
        use moe_model::checkpoint::Checkpoint;
        use moe_model::device::GpuDtype;
        use moe_model::experts::{ExpertDevice, ExpertSet};
        use moe_model::gpu::GpuContext;
        use moe_model::ModelConfig;

        let dir = std::env::var_os("MOE_FIXTURES_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
            })
            .join("qwen3-moe-tiny");
        let (ckpt, config) = (
            Checkpoint::open(&dir).expect("fixture"),
            ModelConfig::from_dir(&dir).expect("config"),
        );
        let gpu = GpuContext::open(0, GpuDtype::F32).expect("GPU 0");
        let hidden = config.hidden_size;
        let layer = config.moe_layer_indices().next().expect("a MoE layer");
        let experts = ExpertSet::load_on(
            &ckpt,
            &config,
            (0..config.moe.num_experts).map(|e| (layer, e)),
            &ExpertDevice::Gpu(Arc::clone(&gpu)),
        )
        .expect("experts");
        let stream = gpu.stream().context().new_stream().expect("stream");
        let id = new_unique_id().expect("unique id");
        let mut comm =
            NcclCommunicator::join(stream, &id, 0, 1, Duration::from_secs(30)).expect("join");

        let n = 5;
        let rows: Vec<f32> = (0..n * hidden)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut routes = ExpertRoutes::with_capacity(n, 2 * n);
        for r in 0..n as u32 {
            let e = config.moe.num_experts as u32;
            routes.push_row(&mut [(r % e, 0.75), ((r + 1) % e, 0.25)]);
        }
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        let send = comm.upload(bytes.clone()).expect("upload");
        let received = run_bounded(
            &mut comm,
            Pending {
                sends: vec![(0, send)],
                recvs: vec![(0, bytes.len())],
            },
            Duration::from_secs(30),
        )
        .expect("exchange");
        let received = received.into_iter().next().expect("one buffer");
        let (outputs, values) = comm
            .run_in_place(&experts, layer, &received, RowEncoding::F32, &routes)
            .expect("rows in device words and experts on this GPU run in place")
            .expect("experts");
        assert_eq!(values, routes.pairs() * hidden);
        let device: Vec<f32> = comm
            .download(outputs)
            .expect("download")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let host = experts
            .run_experts(layer, &rows, &routes)
            .expect("host rows");
        let worst = moe_model::compare::max_abs_diff(&device, &host);
        assert!(worst <= 1e-5, "in place differs from host rows by {worst}");
        println!("nccl rows in place: {values} values, max difference from host rows {worst:e}");
    }
}
