//! Device memory as host memory: allocations at 256-byte boundaries whose rounded end touches
//! a page with no access, and a registry that says which bytes a copy may touch.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Bytes filled into a fresh allocation: every f32 and f64 read of them is a NaN.
const UNWRITTEN: u8 = 0xff;
const ALIGN: usize = 256;

struct Mapping {
    /// Start of the whole mapping (pages before the allocation, then the guard page).
    base: usize,
    /// Bytes mapped, the guard page included.
    mapped: usize,
    /// Bytes asked for.
    len: usize,
}

static ALLOCATIONS: Mutex<BTreeMap<usize, Mapping>> = Mutex::new(BTreeMap::new());

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(ALIGN)
}

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<usize, Mapping>> {
    ALLOCATIONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A new allocation of `len` bytes (at least one), or `None` when the host has no room.
pub fn allocate(len: usize) -> Option<usize> {
    let page = page();
    let rounded = len.max(1).div_ceil(ALIGN) * ALIGN;
    let body = rounded.div_ceil(page) * page;
    let mapped = body + page;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mapped,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as usize;
    let start = base + body - rounded;
    // SAFETY: the guard page and the allocation lie inside the mapping just made.
    unsafe {
        libc::mprotect((base + body) as *mut libc::c_void, page, libc::PROT_NONE);
        std::ptr::write_bytes(start as *mut u8, UNWRITTEN, rounded);
    }
    registry().insert(start, Mapping { base, mapped, len });
    Some(start)
}

/// Frees an allocation by its start; false when no allocation starts there.
pub fn free(start: usize) -> bool {
    let Some(mapping) = registry().remove(&start) else {
        return false;
    };
    // SAFETY: the mapping was made by `allocate` and nothing refers to it any more.
    unsafe { libc::munmap(mapping.base as *mut libc::c_void, mapping.mapped) };
    true
}

/// Whether `[address, address + len)` lies inside one allocation.
pub fn covers(address: usize, len: usize) -> bool {
    let allocations = registry();
    match allocations.range(..=address).next_back() {
        Some((&start, mapping)) => address
            .checked_add(len)
            .is_some_and(|end| end <= start + mapping.len),
        None => false,
    }
}

/// Bytes allocated now.
pub fn in_use() -> usize {
    registry().values().map(|m| m.len).sum()
}
