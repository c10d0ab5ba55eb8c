//! NCCL's point-to-point API within one process: ranks that join with the same unique id meet
//! in a registry, a group's sends are copied into per-(from, to) queues when the group ends,
//! and its receives wait for theirs there. Enough for the one-rank round trip and for ranks
//! that are threads of one process; NCCL between processes is not emulated.

use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::memory;

pub type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_INVALID_ARGUMENT: NcclResult = 4;
const NCCL_INVALID_USAGE: NcclResult = 5;
const NCCL_REMOTE_ERROR: NcclResult = 6;

/// A receive waits this long for its send before the communicator reports a remote error (a
/// real NCCL would wait forever; the callers' own bounds are shorter).
const RECEIVE_LIMIT: Duration = Duration::from_secs(120);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NcclUniqueId {
    pub internal: [c_char; 128],
}

/// What each rank sent each other rank, by `(from, to)`, oldest first.
type Queues = HashMap<(usize, usize), VecDeque<Vec<u8>>>;

/// The ranks of one unique id, and what their groups sent each other.
struct Clique {
    size: usize,
    queues: Mutex<Queues>,
    sent: Condvar,
}

struct Comm {
    clique: Arc<Clique>,
    rank: usize,
    error: Mutex<NcclResult>,
}

static CLIQUES: Mutex<Vec<([c_char; 128], Arc<Clique>)>> = Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

enum Op {
    Send {
        bytes: Vec<u8>,
        peer: usize,
    },
    Recv {
        into: usize,
        len: usize,
        peer: usize,
    },
}

thread_local! {
    /// Nesting depth of ncclGroupStart, and the operations queued in the group.
    static GROUP: std::cell::RefCell<(usize, Vec<(*const Comm, Op)>)> =
        const { std::cell::RefCell::new((0, Vec::new())) };
}

fn element_bytes(datatype: c_int) -> Option<usize> {
    match datatype {
        0 | 1 => Some(1),     // int8, uint8
        2 | 3 | 7 => Some(4), // int32, uint32, float32
        4 | 5 | 8 => Some(8), // int64, uint64, float64
        6 | 9 => Some(2),     // float16, bfloat16
        _ => None,
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> NcclResult {
    match version.as_mut() {
        Some(v) => {
            *v = 22_800;
            NCCL_SUCCESS
        }
        None => NCCL_INVALID_ARGUMENT,
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclGetUniqueId(id: *mut NcclUniqueId) -> NcclResult {
    let Some(id) = id.as_mut() else {
        return NCCL_INVALID_ARGUMENT;
    };
    let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut internal = [0 as c_char; 128];
    for (slot, byte) in internal.iter_mut().zip(
        n.to_le_bytes()
            .iter()
            .chain(&std::process::id().to_le_bytes()),
    ) {
        *slot = *byte as c_char;
    }
    id.internal = internal;
    NCCL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommInitRankConfig(
    comm: *mut *mut c_void,
    nranks: c_int,
    id: NcclUniqueId,
    rank: c_int,
    _config: *mut c_void,
) -> NcclResult {
    let (Ok(size), Ok(rank)) = (usize::try_from(nranks), usize::try_from(rank)) else {
        return NCCL_INVALID_ARGUMENT;
    };
    if comm.is_null() || size == 0 || rank >= size {
        return NCCL_INVALID_ARGUMENT;
    }
    let clique = {
        let mut cliques = CLIQUES.lock().unwrap_or_else(|e| e.into_inner());
        match cliques.iter().find(|(key, _)| *key == id.internal) {
            Some((_, c)) if c.size == size => Arc::clone(c),
            Some(_) => return NCCL_INVALID_USAGE,
            None => {
                let c = Arc::new(Clique {
                    size,
                    queues: Mutex::new(HashMap::new()),
                    sent: Condvar::new(),
                });
                cliques.push((id.internal, Arc::clone(&c)));
                c
            }
        }
    };
    *comm = Box::into_raw(Box::new(Comm {
        clique,
        rank,
        error: Mutex::new(NCCL_SUCCESS),
    }))
    .cast();
    NCCL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommGetAsyncError(
    comm: *mut c_void,
    error: *mut NcclResult,
) -> NcclResult {
    match (comm.cast::<Comm>().as_ref(), error.as_mut()) {
        (Some(comm), Some(error)) => {
            *error = *comm.error.lock().unwrap_or_else(|e| e.into_inner());
            NCCL_SUCCESS
        }
        _ => NCCL_INVALID_ARGUMENT,
    }
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommAbort(comm: *mut c_void) -> NcclResult {
    if comm.is_null() {
        return NCCL_INVALID_ARGUMENT;
    }
    drop(Box::from_raw(comm.cast::<Comm>()));
    NCCL_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn ncclCommDestroy(comm: *mut c_void) -> NcclResult {
    ncclCommAbort(comm)
}

#[no_mangle]
pub extern "C" fn ncclGroupStart() -> NcclResult {
    GROUP.with(|g| g.borrow_mut().0 += 1);
    NCCL_SUCCESS
}

/// Ends the group: its sends are queued for their peers, then each receive takes the oldest
/// send from its peer, waiting for it if need be.
#[no_mangle]
pub unsafe extern "C" fn ncclGroupEnd() -> NcclResult {
    let ops = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.0 == 0 {
            return None;
        }
        g.0 -= 1;
        Some(if g.0 == 0 {
            std::mem::take(&mut g.1)
        } else {
            Vec::new()
        })
    });
    let Some(ops) = ops else {
        return NCCL_INVALID_USAGE;
    };
    let mut receives = Vec::new();
    for (comm, op) in ops {
        let comm = &*comm;
        match op {
            Op::Send { bytes, peer } => {
                let mut queues = comm.clique.queues.lock().unwrap_or_else(|e| e.into_inner());
                queues
                    .entry((comm.rank, peer))
                    .or_default()
                    .push_back(bytes);
                comm.clique.sent.notify_all();
            }
            recv @ Op::Recv { .. } => receives.push((comm, recv)),
        }
    }
    for (comm, op) in receives {
        let Op::Recv { into, len, peer } = op else {
            continue;
        };
        let clique = &comm.clique;
        let queues = clique.queues.lock().unwrap_or_else(|e| e.into_inner());
        let (mut queues, waited) = clique
            .sent
            .wait_timeout_while(queues, RECEIVE_LIMIT, |q| {
                q.get(&(peer, comm.rank)).is_none_or(VecDeque::is_empty)
            })
            .unwrap_or_else(|e| e.into_inner());
        let Some(bytes) = queues
            .get_mut(&(peer, comm.rank))
            .and_then(VecDeque::pop_front)
        else {
            debug_assert!(waited.timed_out());
            *comm.error.lock().unwrap_or_else(|e| e.into_inner()) = NCCL_REMOTE_ERROR;
            return NCCL_REMOTE_ERROR;
        };
        if bytes.len() != len {
            eprintln!(
                "cuda emulator: NCCL rank {} sent {} bytes, rank {} receives {len}",
                peer,
                bytes.len(),
                comm.rank
            );
            *comm.error.lock().unwrap_or_else(|e| e.into_inner()) = NCCL_INVALID_USAGE;
            return NCCL_INVALID_USAGE;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), into as *mut u8, len);
    }
    NCCL_SUCCESS
}

/// A send or receive of `count` elements: checked, then queued in the group (or run alone).
unsafe fn enqueue(
    buffer: usize,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: *mut c_void,
    send: bool,
) -> NcclResult {
    let Some(comm) = comm.cast::<Comm>().as_ref() else {
        return NCCL_INVALID_ARGUMENT;
    };
    let (Some(width), Ok(peer)) = (element_bytes(datatype), usize::try_from(peer)) else {
        return NCCL_INVALID_ARGUMENT;
    };
    let Some(len) = count.checked_mul(width) else {
        return NCCL_INVALID_ARGUMENT;
    };
    if peer >= comm.clique.size || (len > 0 && !memory::covers(buffer, len)) {
        return NCCL_INVALID_ARGUMENT;
    }
    let op = if send {
        let bytes = std::slice::from_raw_parts(buffer as *const u8, len).to_vec();
        Op::Send { bytes, peer }
    } else {
        Op::Recv {
            into: buffer,
            len,
            peer,
        }
    };
    ncclGroupStart();
    GROUP.with(|g| g.borrow_mut().1.push((comm as *const Comm, op)));
    ncclGroupEnd()
}

#[no_mangle]
pub unsafe extern "C" fn ncclSend(
    buffer: *const c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: *mut c_void,
    stream: *mut c_void,
) -> NcclResult {
    if crate::capture::refuse(stream, "an NCCL send").is_some() {
        return NCCL_INVALID_USAGE;
    }
    enqueue(buffer as usize, count, datatype, peer, comm, true)
}

#[no_mangle]
pub unsafe extern "C" fn ncclRecv(
    buffer: *mut c_void,
    count: usize,
    datatype: c_int,
    peer: c_int,
    comm: *mut c_void,
    stream: *mut c_void,
) -> NcclResult {
    if crate::capture::refuse(stream, "an NCCL receive").is_some() {
        return NCCL_INVALID_USAGE;
    }
    enqueue(buffer as usize, count, datatype, peer, comm, false)
}

#[no_mangle]
pub extern "C" fn ncclGetErrorString(result: NcclResult) -> *const c_char {
    match result {
        NCCL_SUCCESS => c"no error".as_ptr(),
        NCCL_INVALID_ARGUMENT => c"invalid argument".as_ptr(),
        NCCL_INVALID_USAGE => c"invalid usage".as_ptr(),
        NCCL_REMOTE_ERROR => c"remote process exited or there was a network error".as_ptr(),
        _ => c"unknown result".as_ptr(),
    }
}
