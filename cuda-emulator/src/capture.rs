//! Stream capture and CUDA graphs, as the driver defines them for what the emulator runs:
//! between `cuStreamBeginCapture` and `cuStreamEndCapture`, kernel launches, device-to-device
//! copies, memsets and cuBLAS GEMMs queued on the stream are recorded instead of run (a
//! launch's parameter values copied as it is queued, as the driver copies them), and a
//! launched graph runs them again in order, reading its buffers as they are then. What a GPU
//! refuses in a capture invalidates it here too, with the GPU's error: synchronising or
//! querying the capturing stream, copies to or from pageable host memory (and, since the
//! emulator cannot tell pinned memory from pageable, every host copy: stricter than a GPU).
//! Events may be recorded and waited on within the capturing stream. Stream-ordered
//! allocations inside a capture are the graph's memory nodes: made when captured, at an
//! address every launch reuses, and held by the graph until it is destroyed; a free inside the
//! capture of memory the capture allocated is its free node. Stricter than a GPU: every such
//! allocation must be freed inside the capture (one that escapes it would block the graph's
//! next launch on a GPU until freed outside; here it invalidates the capture), and a free
//! inside a capture of memory allocated outside it is refused. Not emulated (refused the same
//! way, so a capture that needs them fails instead of running wrongly): other streams joining
//! the capture through its events, host functions, NCCL and grouped GEMMs in a capture, and a
//! graph launched into a capture.

use std::ffi::{c_uint, c_void};
use std::sync::Mutex;

use crate::host_gemm::Gemm;
use crate::status::*;

pub const CUDA_ERROR_ILLEGAL_STATE: CUresult = 401;
pub const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
pub const CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: CUresult = 901;
/// A dependency on work outside the capture (a wait on an event recorded before it).
pub const CUDA_ERROR_STREAM_CAPTURE_ISOLATION: CUresult = 905;

/// One recorded operation.
#[derive(Clone)]
pub(crate) enum Op {
    Launch {
        function: usize,
        grid: [c_uint; 3],
        block: [c_uint; 3],
        shared_bytes: c_uint,
        /// Each parameter's value, 8-byte aligned.
        params: Vec<Vec<u64>>,
    },
    CopyDeviceToDevice {
        dst: u64,
        src: u64,
        bytes: usize,
    },
    Set8 {
        dst: u64,
        value: u8,
        count: usize,
    },
    Set32 {
        dst: u64,
        value: c_uint,
        count: usize,
    },
    Gemms {
        gemms: Vec<Gemm>,
        alpha: f32,
        beta: f32,
    },
}

// SAFETY: the raw pointers inside are device addresses (host memory the emulator owns), used
// only by whoever runs the graph, as on a GPU.
unsafe impl Send for Op {}

enum Capture {
    Active {
        ops: Vec<Op>,
        memory: CapturedMemory,
    },
    /// Its allocations are released when the capture ends.
    Invalidated(CapturedMemory),
}

/// The allocations a capture made (its graph's memory nodes), and which of them it freed.
#[derive(Default)]
struct CapturedMemory {
    allocations: Vec<usize>,
    freed: Vec<usize>,
}

impl CapturedMemory {
    fn release(self) {
        for address in self.allocations {
            crate::memory::free(address);
        }
    }
}

/// A graph's memory: released when the graph and every instance of it are destroyed.
pub(crate) struct GraphMemory(Vec<usize>);

impl Drop for GraphMemory {
    fn drop(&mut self) {
        for &address in &self.0 {
            crate::memory::free(address);
        }
    }
}

/// Streams now capturing, by address.
static CAPTURES: Mutex<Vec<(usize, Capture)>> = Mutex::new(Vec::new());

fn captures() -> std::sync::MutexGuard<'static, Vec<(usize, Capture)>> {
    CAPTURES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where `stream` is capturing: records `op` (`Some(CUDA_SUCCESS)`), or answers the error the
/// capture already failed with; `None` when it is not capturing (run the work now).
pub(crate) fn record(stream: *mut c_void, op: impl FnOnce() -> Op) -> Option<CUresult> {
    let mut all = captures();
    let (_, capture) = all.iter_mut().find(|(s, _)| *s == stream as usize)?;
    Some(match capture {
        Capture::Active { ops, .. } => {
            ops.push(op());
            CUDA_SUCCESS
        }
        Capture::Invalidated(_) => CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
    })
}

/// An allocation of `bytes` on `stream`: where it is capturing, the graph's own memory, made
/// now (`Some` with the address, or the capture's error); `None` when it is not capturing.
pub(crate) fn allocate(stream: *mut c_void, bytes: usize) -> Option<Result<usize, CUresult>> {
    let mut all = captures();
    let (_, capture) = all.iter_mut().find(|(s, _)| *s == stream as usize)?;
    Some(match capture {
        Capture::Active { memory, .. } => match crate::memory::allocate(bytes) {
            Some(address) => {
                memory.allocations.push(address);
                Ok(address)
            }
            None => Err(CUDA_ERROR_OUT_OF_MEMORY),
        },
        Capture::Invalidated(_) => Err(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
    })
}

/// A free of `address` on `stream`: where it is capturing, the free node of an allocation the
/// capture made (the memory stays the graph's), refused for any other memory; `None` when it
/// is not capturing.
pub(crate) fn free(stream: *mut c_void, address: usize) -> Option<CUresult> {
    let mut all = captures();
    let (_, capture) = all.iter_mut().find(|(s, _)| *s == stream as usize)?;
    let Capture::Active { memory, .. } = capture else {
        return Some(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    };
    if memory.allocations.contains(&address) && !memory.freed.contains(&address) {
        memory.freed.push(address);
        return Some(CUDA_SUCCESS);
    }
    drop(all);
    refuse(stream, "a free of memory the capture did not allocate")
}

/// Where `stream` is capturing, work a capture cannot hold: the capture is invalidated and
/// the call fails as on a GPU; `None` when it is not capturing.
pub(crate) fn refuse(stream: *mut c_void, what: &str) -> Option<CUresult> {
    let mut all = captures();
    let (_, capture) = all.iter_mut().find(|(s, _)| *s == stream as usize)?;
    let memory = match std::mem::replace(capture, Capture::Invalidated(Default::default())) {
        Capture::Active { memory, .. } => {
            eprintln!("cuda emulator: {what} in a stream capture: the capture is invalidated");
            memory
        }
        Capture::Invalidated(memory) => memory,
    };
    *capture = Capture::Invalidated(memory);
    Some(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
}

/// Events recorded inside an active capture, with the capturing stream. Recording one is
/// legal (cudarc records an event after each launch to order its streams), and so is waiting
/// on one in the same capture; another stream waiting on it would join the capture on a GPU,
/// which is not emulated: that wait is refused and the capture invalidated.
static CAPTURED_EVENTS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

/// An event record on `stream`: `Some` when the stream is capturing (nothing runs; the
/// event is marked as captured), `None` otherwise.
pub(crate) fn record_event(stream: *mut c_void, event: *mut c_void) -> Option<CUresult> {
    let all = captures();
    let (_, capture) = all.iter().find(|(s, _)| *s == stream as usize)?;
    if matches!(capture, Capture::Invalidated(_)) {
        return Some(CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
    }
    let mut events = CAPTURED_EVENTS.lock().unwrap_or_else(|e| e.into_inner());
    events.retain(|(e, _)| *e != event as usize);
    events.push((event as usize, stream as usize));
    Some(CUDA_SUCCESS)
}

/// A wait of `stream` on `event`: refused (and the capture invalidated) when the event was
/// recorded in another stream's capture, or when a capturing stream waits on an event
/// recorded outside its capture (`recorded_outside`: a GPU allows only the stream's own
/// order to cross the capture's boundary, and fails such a wait with
/// `CUDA_ERROR_STREAM_CAPTURE_ISOLATION`); `None` when it may go ahead.
pub(crate) fn wait_event(
    stream: *mut c_void,
    event: *mut c_void,
    recorded_outside: bool,
) -> Option<CUresult> {
    let origin = {
        let events = CAPTURED_EVENTS.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .find(|(e, _)| *e == event as usize)
            .map(|(_, s)| *s)
    };
    match origin {
        Some(origin) if origin != stream as usize => refuse(
            origin as *mut c_void,
            "another stream waiting on a captured event",
        ),
        Some(_) => None,
        None if recorded_outside => {
            refuse(stream, "a wait on an event recorded outside the capture")
                .map(|_| CUDA_ERROR_STREAM_CAPTURE_ISOLATION)
        }
        None => None,
    }
}

/// Forgets a destroyed stream's capture (and releases what it allocated).
pub(crate) fn forget(stream: *mut c_void) {
    let mut all = captures();
    if let Some(at) = all.iter().position(|(s, _)| *s == stream as usize) {
        match all.remove(at).1 {
            Capture::Active { memory, .. } | Capture::Invalidated(memory) => memory.release(),
        }
    }
    drop(all);
    CAPTURED_EVENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(_, s)| *s != stream as usize);
}

/// A captured graph, and an instantiated one: the same recorded operations, and the memory
/// they share.
pub(crate) struct Graph {
    pub(crate) ops: Vec<Op>,
    pub(crate) memory: std::sync::Arc<GraphMemory>,
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2(stream: *mut c_void, _mode: c_uint) -> CUresult {
    if stream.is_null() {
        // The legacy default stream cannot be captured.
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    let mut all = captures();
    if all.iter().any(|(s, _)| *s == stream as usize) {
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    all.push((
        stream as usize,
        Capture::Active {
            ops: Vec::new(),
            memory: CapturedMemory::default(),
        },
    ));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(
    stream: *mut c_void,
    graph: *mut *mut c_void,
) -> CUresult {
    if graph.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let mut all = captures();
    let Some(at) = all.iter().position(|(s, _)| *s == stream as usize) else {
        return CUDA_ERROR_ILLEGAL_STATE;
    };
    let (_, capture) = all.remove(at);
    CAPTURED_EVENTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(_, s)| *s != stream as usize);
    match capture {
        Capture::Active { ops, memory } => {
            if memory.allocations.len() != memory.freed.len() {
                eprintln!(
                    "cuda emulator: an allocation made in a stream capture and not freed in it: \
                     the capture is invalidated"
                );
                memory.release();
                *graph = std::ptr::null_mut();
                return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
            }
            let memory = std::sync::Arc::new(GraphMemory(memory.allocations));
            *graph = Box::into_raw(Box::new(Graph { ops, memory })).cast();
            CUDA_SUCCESS
        }
        Capture::Invalidated(memory) => {
            memory.release();
            *graph = std::ptr::null_mut();
            CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(stream: *mut c_void, status: *mut c_uint) -> CUresult {
    if status.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *status = match captures().iter().find(|(s, _)| *s == stream as usize) {
        None => 0,
        Some((_, Capture::Active { .. })) => 1,
        Some((_, Capture::Invalidated(_))) => 2,
    };
    CUDA_SUCCESS
}
