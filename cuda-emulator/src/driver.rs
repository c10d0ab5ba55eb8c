//! The driver API's entry points cudarc and the GPU path call, each doing its work at once.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Mutex;
use std::time::Instant;

use crate::memory;
use crate::status::*;

pub type CUdevice = c_int;
pub type CUdeviceptr = u64;

/// What `cuDeviceGetName` answers, so that reports say where they ran.
pub const DEVICE_NAME: &str = "CUDA emulator on the CPU (moe-cuda-emulator)";
/// The architecture reported: NVRTC compiles for it, as for an H100/H200.
const COMPUTE_CAPABILITY: (c_int, c_int) = (9, 0);

extern "C" {
    fn emu_find_kernel(name: *const c_char) -> *const c_void;
    fn emu_kernel_name(kernel: *const c_void) -> *const c_char;
    fn emu_kernel_param_sizes(kernel: *const c_void, sizes: *mut usize, max: c_int) -> c_int;
    fn emu_launch(
        kernel: *const c_void,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        params: *mut *mut c_void,
    ) -> c_int;
}

/// Writes a query's answer where the caller asked, as the driver does (a null place is an
/// invalid value).
unsafe fn answer<T>(out: *mut T, value: T) -> CUresult {
    match out.as_mut() {
        Some(place) => {
            *place = value;
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_INVALID_VALUE,
    }
}

/// Frees a handle made by [`handle`] for a `T`.
pub(crate) unsafe fn release<T>(handle: *mut c_void) -> CUresult {
    if handle.is_null() {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    drop(Box::from_raw(handle.cast::<T>()));
    CUDA_SUCCESS
}

/// Work is done when queued: a handle's queries and waits only check that it is one.
pub(crate) fn known(handle: *mut c_void) -> CUresult {
    if handle.is_null() {
        CUDA_ERROR_INVALID_HANDLE
    } else {
        CUDA_SUCCESS
    }
}

/// A non-null handle the caller treats as opaque.
fn handle<T>(value: T) -> *mut c_void {
    Box::into_raw(Box::new(value)).cast()
}

/// The one context (the primary context of device 0).
static CONTEXT: u64 = 0xC0_47E7;

fn context() -> *mut c_void {
    std::ptr::addr_of!(CONTEXT) as *mut c_void
}

fn report(what: &str) {
    eprintln!("cuda emulator: {what}");
}

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(version: *mut c_int) -> CUresult {
    answer(version, 13000)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    answer(count, 1)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    if device.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ordinal != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *device = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(
    name: *mut c_char,
    len: c_int,
    device: CUdevice,
) -> CUresult {
    if device != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    let Ok(len) = usize::try_from(len) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if name.is_null() || len == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let bytes = DEVICE_NAME.as_bytes();
    let n = bytes.len().min(len - 1);
    std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
    *name.add(n) = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: c_uint,
    device: CUdevice,
) -> CUresult {
    if device != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    answer(
        value,
        match attribute {
            1 => 1024,      // max threads per block
            2 | 3 => 1024,  // max block dim x, y
            4 => 64,        // max block dim z
            5 => i32::MAX,  // max grid dim x
            6 | 7 => 65535, // max grid dim y, z
            8 => 48 * 1024, // shared memory per block
            10 => 32,       // warp size
            16 => 132,      // multiprocessors
            41 => 1,        // unified addressing
            75 => COMPUTE_CAPABILITY.0,
            76 => COMPUTE_CAPABILITY.1,
            // Memory pools: cudarc then allocates and frees in stream order (cuMemAllocAsync),
            // as on a GPU, and a capture may allocate (its graph's memory nodes).
            115 => 1,
            _ => 0,
        },
    )
}

fn host_memory() -> usize {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    usize::try_from(pages).unwrap_or(0) * usize::try_from(size).unwrap_or(0)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) -> CUresult {
    if device != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    answer(bytes, host_memory())
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    if free.is_null() || total.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let all = host_memory();
    *total = all;
    *free = all.saturating_sub(memory::in_use());
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], device: CUdevice) -> CUresult {
    if device != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    answer(uuid, *b"moe-cuda-emulatr")
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], device: CUdevice) -> CUresult {
    cuDeviceGetUuid(uuid, device)
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(
    ctx: *mut *mut c_void,
    device: CUdevice,
) -> CUresult {
    if device != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    answer(ctx, context())
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(device: CUdevice) -> CUresult {
    if device != 0 {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(_ctx: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> CUresult {
    answer(ctx, context())
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    answer(device, 0)
}

#[no_mangle]
pub extern "C" fn cuCtxPushCurrent_v2(_ctx: *mut c_void) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(ctx: *mut *mut c_void) -> CUresult {
    if !ctx.is_null() {
        *ctx = context();
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    if !least.is_null() {
        *least = 0;
    }
    if !greatest.is_null() {
        *greatest = -5;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut *mut c_void, _flags: c_uint) -> CUresult {
    answer(stream, handle(0u8))
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    stream: *mut *mut c_void,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    cuStreamCreate(stream, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: *mut c_void) -> CUresult {
    crate::capture::forget(stream);
    release::<u8>(stream)
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(stream: *mut c_void) -> CUresult {
    crate::capture::refuse(stream, "a synchronisation of the capturing stream")
        .unwrap_or(CUDA_SUCCESS)
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(stream: *mut c_void) -> CUresult {
    crate::capture::refuse(stream, "a query of the capturing stream").unwrap_or(CUDA_SUCCESS)
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(
    stream: *mut c_void,
    event: *mut c_void,
    _flags: c_uint,
) -> CUresult {
    // SAFETY: an event handle made by cuEventCreate, or null.
    let recorded = unsafe { event.cast::<Event>().as_ref() }.is_some_and(|e| {
        e.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    });
    crate::capture::wait_event(stream, event, recorded).unwrap_or(CUDA_SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    stream: *mut c_void,
    function: Option<unsafe extern "C" fn(*mut c_void)>,
    data: *mut c_void,
) -> CUresult {
    if let Some(refused) = crate::capture::refuse(stream, "a host function") {
        return refused;
    }
    match function {
        Some(f) => {
            f(data);
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_INVALID_VALUE,
    }
}

/// An event: when it was last recorded (work is done when queued, so it completes then).
struct Event {
    recorded: Mutex<Option<Instant>>,
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(event: *mut *mut c_void, _flags: c_uint) -> CUresult {
    answer(
        event,
        handle(Event {
            recorded: Mutex::new(None),
        }),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(event: *mut c_void, stream: *mut c_void) -> CUresult {
    if let Some(captured) = crate::capture::record_event(stream, event) {
        return captured;
    }
    let Some(event) = event.cast::<Event>().as_ref() else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    *event.recorded.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(
    event: *mut c_void,
    stream: *mut c_void,
    _flags: c_uint,
) -> CUresult {
    cuEventRecord(event, stream)
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(event: *mut c_void) -> CUresult {
    known(event)
}

#[no_mangle]
pub extern "C" fn cuEventQuery(event: *mut c_void) -> CUresult {
    known(event)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(event: *mut c_void) -> CUresult {
    release::<Event>(event)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> CUresult {
    let (Some(start), Some(end)) = (start.cast::<Event>().as_ref(), end.cast::<Event>().as_ref())
    else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if ms.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let at = |e: &Event| *e.recorded.lock().unwrap_or_else(|e| e.into_inner());
    match (at(start), at(end)) {
        (Some(a), Some(b)) => {
            *ms = b.saturating_duration_since(a).as_secs_f32() * 1e3;
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_NOT_READY,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: *mut c_void,
    end: *mut c_void,
) -> CUresult {
    cuEventElapsedTime(ms, start, end)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut CUdeviceptr, bytes: usize) -> CUresult {
    if ptr.is_null() || bytes == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match memory::allocate(bytes) {
        Some(address) => {
            *ptr = address as CUdeviceptr;
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_OUT_OF_MEMORY,
    }
}

/// The device's default memory pool: one handle, as there is one emulated device. Its
/// attributes are accepted and ignored (memory goes back to the host when freed).
static DEFAULT_POOL: u8 = 0;

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(
    pool: *mut *mut c_void,
    _device: CUdevice,
) -> CUresult {
    if pool.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pool = (&DEFAULT_POOL as *const u8).cast_mut().cast();
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuMemPoolSetAttribute(
    pool: *mut c_void,
    _attribute: c_uint,
    value: *mut c_void,
) -> CUresult {
    if pool != (&DEFAULT_POOL as *const u8).cast_mut().cast() || value.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    ptr: *mut CUdeviceptr,
    bytes: usize,
    stream: *mut c_void,
) -> CUresult {
    if ptr.is_null() || bytes == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match crate::capture::allocate(stream, bytes) {
        Some(Ok(address)) => {
            *ptr = address as CUdeviceptr;
            CUDA_SUCCESS
        }
        Some(Err(status)) => status,
        None => cuMemAlloc_v2(ptr, bytes),
    }
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    if ptr == 0 || memory::free(ptr as usize) {
        CUDA_SUCCESS
    } else {
        report(&format!("free of {ptr:#x}, which no allocation starts at"));
        CUDA_ERROR_INVALID_VALUE
    }
}

#[no_mangle]
pub extern "C" fn cuMemFreeAsync(ptr: CUdeviceptr, stream: *mut c_void) -> CUresult {
    if let Some(status) = crate::capture::free(stream, ptr as usize) {
        return status;
    }
    cuMemFree_v2(ptr)
}

/// Host memory "pinned" for copies: plain host memory here.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    ptr: *mut *mut c_void,
    bytes: usize,
    _flags: c_uint,
) -> CUresult {
    if ptr.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let p = libc::malloc(bytes.max(1));
    if p.is_null() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *ptr = p;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(ptr: *mut *mut c_void, bytes: usize) -> CUresult {
    cuMemHostAlloc(ptr, bytes, 0)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(ptr: *mut c_void) -> CUresult {
    libc::free(ptr);
    CUDA_SUCCESS
}

/// A copy's device side must lie inside one allocation, as the device's MMU would insist.
fn device_range(address: CUdeviceptr, len: usize, what: &str) -> Result<(), CUresult> {
    if len == 0 || memory::covers(address as usize, len) {
        Ok(())
    } else {
        report(&format!(
            "{what}: {len} bytes at {address:#x} are not inside one allocation"
        ));
        Err(CUDA_ERROR_INVALID_VALUE)
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
) -> CUresult {
    if let Err(e) = device_range(dst, len, "copy to the device") {
        return e;
    }
    if len > 0 {
        std::ptr::copy(src.cast::<u8>(), dst as *mut u8, len);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    stream: *mut c_void,
) -> CUresult {
    if let Some(refused) = crate::capture::refuse(stream, "a copy from host memory") {
        return refused;
    }
    cuMemcpyHtoD_v2(dst, src, len)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
) -> CUresult {
    if let Err(e) = device_range(src, len, "copy from the device") {
        return e;
    }
    if len > 0 {
        std::ptr::copy(src as *const u8, dst.cast::<u8>(), len);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    stream: *mut c_void,
) -> CUresult {
    if let Some(refused) = crate::capture::refuse(stream, "a copy to host memory") {
        return refused;
    }
    cuMemcpyDtoH_v2(dst, src, len)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
) -> CUresult {
    if let Err(e) = device_range(src, len, "device copy, source") {
        return e;
    }
    if let Err(e) = device_range(dst, len, "device copy, destination") {
        return e;
    }
    if len > 0 {
        std::ptr::copy(src as *const u8, dst as *mut u8, len);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
    stream: *mut c_void,
) -> CUresult {
    if let Err(e) = device_range(src, len, "device copy, source")
        .and_then(|()| device_range(dst, len, "device copy, destination"))
    {
        return e;
    }
    let op = || crate::capture::Op::CopyDeviceToDevice {
        dst,
        src,
        bytes: len,
    };
    if let Some(recorded) = crate::capture::record(stream, op) {
        return recorded;
    }
    cuMemcpyDtoD_v2(dst, src, len)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dst: CUdeviceptr,
    _dst_ctx: *mut c_void,
    src: CUdeviceptr,
    _src_ctx: *mut c_void,
    len: usize,
    stream: *mut c_void,
) -> CUresult {
    if let Some(refused) = crate::capture::refuse(stream, "a peer copy") {
        return refused;
    }
    cuMemcpyDtoD_v2(dst, src, len)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, value: u8, len: usize) -> CUresult {
    if let Err(e) = device_range(dst, len, "memset") {
        return e;
    }
    if len > 0 {
        std::ptr::write_bytes(dst as *mut u8, value, len);
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: u8,
    len: usize,
    stream: *mut c_void,
) -> CUresult {
    if let Err(e) = device_range(dst, len, "memset") {
        return e;
    }
    let op = || crate::capture::Op::Set8 {
        dst,
        value,
        count: len,
    };
    if let Some(recorded) = crate::capture::record(stream, op) {
        return recorded;
    }
    cuMemsetD8_v2(dst, value, len)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, value: c_uint, count: usize) -> CUresult {
    let Some(len) = count.checked_mul(4) else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if let Err(e) = device_range(dst, len, "memset") {
        return e;
    }
    let words = std::slice::from_raw_parts_mut(dst as *mut c_uint, count);
    words.fill(value);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    value: c_uint,
    count: usize,
    stream: *mut c_void,
) -> CUresult {
    let in_range = count
        .checked_mul(4)
        .map(|len| device_range(dst, len, "memset"));
    match in_range {
        None => return CUDA_ERROR_INVALID_VALUE,
        Some(Err(e)) => return e,
        Some(Ok(())) => {}
    }
    let op = || crate::capture::Op::Set32 { dst, value, count };
    if let Some(recorded) = crate::capture::record(stream, op) {
        return recorded;
    }
    cuMemsetD32_v2(dst, value, count)
}

/// A loaded module: the entry points its PTX declares.
struct Module {
    entries: Vec<crate::ptx::Entry>,
}

/// Static shared memory of each function handed out (by its kernel's address), for the
/// launch's limit on static plus dynamic shared memory.
static STATIC_SHARED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());

fn static_shared_of(function: *const c_void) -> usize {
    let known = STATIC_SHARED.lock().unwrap_or_else(|e| e.into_inner());
    known
        .iter()
        .find(|(f, _)| *f == function as usize)
        .map_or(0, |(_, bytes)| *bytes)
}

/// Loads PTX text: it must be PTX (as NVRTC wrote it), and names the entry points a function
/// may then be looked up by.
#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(
    module: *mut *mut c_void,
    image: *const c_void,
) -> CUresult {
    if module.is_null() || image.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Ok(text) = CStr::from_ptr(image.cast::<c_char>()).to_str() else {
        return CUDA_ERROR_INVALID_IMAGE;
    };
    if !text.contains(".version") || !text.contains(".target") {
        return CUDA_ERROR_INVALID_IMAGE;
    }
    let entries = crate::ptx::entries(text);
    // ptxas refuses such a module when the driver compiles it for the GPU.
    if let Some(e) = entries
        .iter()
        .find(|e| e.shared_bytes > crate::ptx::MAX_STATIC_SHARED_BYTES)
    {
        report(&format!(
            "ptxas error: entry function '{}' uses too much shared data ({:#x} bytes, {:#x} max)",
            e.name,
            e.shared_bytes,
            crate::ptx::MAX_STATIC_SHARED_BYTES
        ));
        return CUDA_ERROR_INVALID_PTX;
    }
    if reporting() {
        for e in entries.iter().filter(|e| e.shared_bytes > 0) {
            eprintln!(
                "cuda emulator: {} uses {} bytes of static shared memory",
                e.name, e.shared_bytes
            );
        }
    }
    *module = handle(Module { entries });
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: *mut c_void) -> CUresult {
    release::<Module>(module)
}

/// A function of the module: one its PTX declares and this library holds compiled for the
/// host (the same kernels.cu), so a PTX from other source is refused rather than run wrongly.
#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    function: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> CUresult {
    let Some(module) = module.cast::<Module>().as_ref() else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if function.is_null() || name.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Ok(wanted) = CStr::from_ptr(name).to_str() else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    let Some(entry) = module.entries.iter().find(|e| e.name == wanted) else {
        return CUDA_ERROR_NOT_FOUND;
    };
    let kernel = emu_find_kernel(name);
    if kernel.is_null() {
        report(&format!(
            "the PTX declares {wanted}, which this build's kernels.cu lacks"
        ));
        return CUDA_ERROR_NOT_FOUND;
    }
    let mut known = STATIC_SHARED.lock().unwrap_or_else(|e| e.into_inner());
    known.retain(|(f, _)| *f != kernel as usize);
    known.push((kernel as usize, entry.shared_bytes));
    *function = kernel as *mut c_void;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(
    value: *mut c_int,
    attribute: c_uint,
    function: *mut c_void,
) -> CUresult {
    if value.is_null() || function.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    /// CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: the static shared memory its PTX declares.
    const SHARED_SIZE_BYTES: c_uint = 1;
    *value = match attribute {
        SHARED_SIZE_BYTES => c_int::try_from(static_shared_of(function)).unwrap_or(c_int::MAX),
        _ => 0,
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub extern "C" fn cuFuncSetAttribute(
    function: *mut c_void,
    _attribute: c_uint,
    _value: c_int,
) -> CUresult {
    known(function)
}

/// Runs the grid now. The launch limits are the device's; a block whose threads reach
/// different barriers fails the launch.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    function: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared_bytes: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let (grid, block) = ([gx, gy, gz], [bx, by, bz]);
    if let Err(e) = check_launch(function, grid, block, shared_bytes, params, extra) {
        return e;
    }
    let op = || crate::capture::Op::Launch {
        function: function as usize,
        grid,
        block,
        shared_bytes,
        params: copy_params(function, params),
    };
    if let Some(recorded) = crate::capture::record(stream, op) {
        return recorded;
    }
    run_launch(function, grid, block, params)
}

/// A launch a graph recorded, run now.
///
/// # Safety
/// As [`cuLaunchKernel`]'s.
pub(crate) unsafe fn launch_now(
    function: *mut c_void,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared_bytes: c_uint,
    params: *mut *mut c_void,
) -> CUresult {
    if let Err(e) = check_launch(
        function,
        grid,
        block,
        shared_bytes,
        params,
        std::ptr::null_mut(),
    ) {
        return e;
    }
    run_launch(function, grid, block, params)
}

/// The device's launch limits, and the kernel's shared memory within the block's.
fn check_launch(
    function: *mut c_void,
    [gx, gy, gz]: [c_uint; 3],
    [bx, by, bz]: [c_uint; 3],
    shared_bytes: c_uint,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> Result<(), CUresult> {
    if function.is_null() {
        return Err(CUDA_ERROR_INVALID_HANDLE);
    }
    let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
    let grid_ok =
        gx >= 1 && gx <= i32::MAX as u32 && (1..=65535).contains(&gy) && (1..=65535).contains(&gz);
    let block_ok =
        (1..=1024).contains(&threads) && bx <= 1024 && by <= 1024 && (1..=64).contains(&bz);
    let static_shared = static_shared_of(function);
    let shared_ok = static_shared + shared_bytes as usize <= crate::ptx::MAX_STATIC_SHARED_BYTES;
    if !grid_ok || !block_ok || !shared_ok || !extra.is_null() || params.is_null() {
        report(&format!(
            "launch refused: grid ({gx}, {gy}, {gz}), block ({bx}, {by}, {bz}), {shared_bytes} bytes of dynamic shared memory beside {static_shared} static"
        ));
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    Ok(())
}

/// Runs a checked launch's grid to completion.
unsafe fn run_launch(
    function: *mut c_void,
    [gx, gy, gz]: [c_uint; 3],
    [bx, by, bz]: [c_uint; 3],
    params: *mut *mut c_void,
) -> CUresult {
    count_launch(function);
    match emu_launch(function, gx, gy, gz, bx, by, bz, params) {
        0 => CUDA_SUCCESS,
        2 => CUDA_ERROR_OUT_OF_MEMORY,
        3 => CUDA_ERROR_MISALIGNED_ADDRESS,
        _ => CUDA_ERROR_LAUNCH_FAILED,
    }
}

/// The values of a launch's parameters, copied as the driver copies them when a launch is
/// queued (each 8-byte aligned).
unsafe fn copy_params(function: *mut c_void, params: *mut *mut c_void) -> Vec<Vec<u64>> {
    let mut sizes = [0usize; 64];
    let count = emu_kernel_param_sizes(function, sizes.as_mut_ptr(), sizes.len() as c_int);
    let count = usize::try_from(count).unwrap_or(0).min(sizes.len());
    (0..count)
        .map(|i| {
            let mut value = vec![0u64; sizes[i].div_ceil(8)];
            std::ptr::copy_nonoverlapping(
                (*params.add(i)).cast::<u8>(),
                value.as_mut_ptr().cast::<u8>(),
                sizes[i],
            );
            value
        })
        .collect()
}

/// Launches per kernel and calls per cuBLAS entry point, kept when `MOE_CUDA_EMULATOR_REPORT`
/// is set and printed to stderr at exit: which kernels and library calls a run exercised.
static LAUNCHES: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

extern "C" fn print_launches() {
    let launches = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
    for (name, count) in launches.iter() {
        eprintln!("cuda emulator: {count} launches of {name}");
    }
}

unsafe fn count_launch(function: *const c_void) {
    if reporting() {
        count(&CStr::from_ptr(emu_kernel_name(function)).to_string_lossy());
    }
}

/// Counts one call of `name` (a kernel or a library entry point) for the report.
pub(crate) fn count_call(name: &str) {
    if reporting() {
        count(name);
    }
}

fn reporting() -> bool {
    static REPORT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REPORT.get_or_init(|| {
        let on = std::env::var_os("MOE_CUDA_EMULATOR_REPORT").is_some();
        if on {
            // SAFETY: registers a function with no preconditions, run at exit.
            unsafe { libc::atexit(print_launches) };
        }
        on
    })
}

fn count(name: &str) {
    let mut launches = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
    match launches.iter_mut().find(|(n, _)| n == name) {
        Some((_, count)) => *count += 1,
        None => launches.push((name.to_owned(), 1)),
    }
}

fn error_text(code: CUresult) -> (&'static CStr, &'static CStr) {
    match code {
        CUDA_SUCCESS => (c"CUDA_SUCCESS", c"no error"),
        CUDA_ERROR_INVALID_VALUE => (c"CUDA_ERROR_INVALID_VALUE", c"invalid argument"),
        CUDA_ERROR_OUT_OF_MEMORY => (c"CUDA_ERROR_OUT_OF_MEMORY", c"out of memory"),
        CUDA_ERROR_INVALID_DEVICE => (c"CUDA_ERROR_INVALID_DEVICE", c"invalid device ordinal"),
        CUDA_ERROR_INVALID_IMAGE => (
            c"CUDA_ERROR_INVALID_IMAGE",
            c"device kernel image is invalid",
        ),
        CUDA_ERROR_INVALID_HANDLE => (c"CUDA_ERROR_INVALID_HANDLE", c"invalid resource handle"),
        CUDA_ERROR_NOT_FOUND => (c"CUDA_ERROR_NOT_FOUND", c"named symbol not found"),
        CUDA_ERROR_NOT_READY => (c"CUDA_ERROR_NOT_READY", c"device not ready"),
        CUDA_ERROR_LAUNCH_FAILED => (c"CUDA_ERROR_LAUNCH_FAILED", c"unspecified launch failure"),
        CUDA_ERROR_NOT_SUPPORTED => (c"CUDA_ERROR_NOT_SUPPORTED", c"operation not supported"),
        _ => (c"CUDA_ERROR_UNKNOWN", c"unknown error"),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, text: *mut *const c_char) -> CUresult {
    answer(text, error_text(code).0.as_ptr())
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, text: *mut *const c_char) -> CUresult {
    answer(text, error_text(code).1.as_ptr())
}
