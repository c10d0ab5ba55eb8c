// The kernels of model/src/gpu/kernels.cu, compiled for the host, and a launcher that runs a
// grid as CUDA would: every block, each of its threads a fiber with its own stack,
// the threads of a block taking turns between barriers in thread order. `__syncthreads` ends
// a thread's turn; a block whose threads do not all reach the same barrier count is reported
// (on a device that hangs or corrupts shared memory). A block's threads never run at once, so
// a race shows only as a stale read (the turn order below makes those likely). A load or store
// through a pointer its type's alignment does not divide (a `uint4` read of bytes 8 apart, a
// 32-bit read of a bf16 at an odd index) faults on the device; here the compiler's alignment
// check (build.rs) reports it, and the launch fails as the device's would.
#include <sys/mman.h>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "prelude.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

#include "kernels.cu"
#include "test_kernels.cu"

namespace {

// The first misaligned access of the launch in progress on this OS thread (a launch runs on
// one), kept for its report.
struct MisalignedAccess {
    bool seen = false;
    const char* file = nullptr;
    unsigned int line = 0;
    const char* type = nullptr;
    std::uintptr_t address = 0;
    unsigned int alignment = 0;
    uint3 block{}, thread{};
};
thread_local MisalignedAccess misaligned;

// Launches run on this OS thread so far (the order of a grid's blocks alternates with them).
thread_local unsigned long long launches_here = 0;

// What GCC's and Clang's `-fsanitize=alignment` pass the handler below (the sanitizer
// runtime's TypeMismatchData, SourceLocation and TypeDescriptor): no sanitizer runtime is
// linked, this library handles its own checks.
struct SourceLocation {
    const char* file;
    std::uint32_t line;
    std::uint32_t column;
};
struct TypeDescriptor {
    std::uint16_t kind;
    std::uint16_t info;
    char name[1];
};
struct TypeMismatch {
    SourceLocation location;
    const TypeDescriptor* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};

}  // namespace

// Called by the compiler's check before an access whose address is not a multiple of its
// type's alignment (build.rs: `-fsanitize=alignment`, recoverable): noted for the launch, the
// access then goes ahead (harmless on the host).
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(
    TypeMismatch* data, std::uintptr_t pointer) {
    if (misaligned.seen || data == nullptr) return;
    misaligned.seen = true;
    misaligned.file = data->location.file;
    misaligned.line = data->location.line;
    misaligned.type = data->type != nullptr ? data->type->name : "?";
    misaligned.address = pointer;
    misaligned.alignment = 1u << data->log_alignment;
    misaligned.block = blockIdx;
    misaligned.thread = threadIdx;
}

namespace {

enum class FiberState { Runnable, AtBarrier, Done };

// Switches stacks: saves the callee-saved registers on the current stack, stores its pointer
// in *save, and resumes the stack at `load` (saved the same way, or prepared by start_fiber).
// No system call, unlike swapcontext (which saves the signal mask at every switch).
extern "C" void emu_switch(void** save, void* load);
#if defined(__x86_64__)
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#else
#error "the CUDA emulator's stack switch is written for x86-64"
#endif

struct Fiber {
    void* sp = nullptr;
    void* stack = nullptr;
    FiberState state = FiberState::Runnable;
    unsigned int barriers = 0;
};

constexpr std::size_t STACK_BYTES = 256 * 1024;

// Fibers with their stacks, per OS thread, kept from launch to launch.
struct FiberPool {
    std::vector<Fiber> fibers;
    ~FiberPool() {
        for (Fiber& f : fibers) munmap(f.stack, STACK_BYTES);
    }
    bool ensure(unsigned int n) {
        while (fibers.size() < n) {
            void* stack = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (stack == MAP_FAILED) return false;
            Fiber f;
            f.stack = stack;
            fibers.push_back(f);
        }
        return true;
    }
};

thread_local FiberPool pool;

struct Block {
    void* scheduler = nullptr;
    Fiber* fibers = nullptr;
    Fiber* current = nullptr;
    void (*invoke)(void**) = nullptr;
    void** params = nullptr;
    // Threads run as plain calls (their first thread reached no barrier), and whether one of
    // them reached a barrier all the same.
    bool direct = false;
    bool stray_barrier = false;
};

thread_local Block* block = nullptr;

[[noreturn]] void fiber_main() {
    block->invoke(block->params);
    Fiber* me = block->current;
    me->state = FiberState::Done;
    emu_switch(&me->sp, block->scheduler);
    __builtin_unreachable();
}

template <typename F, F* f>
struct Trampoline;

// A kernel called with its parameters as cuLaunchKernel passes them: an array of pointers,
// one per parameter, each to a value of the parameter's type.
template <typename... A, void (*f)(A...)>
struct Trampoline<void(A...), f> {
    static void run(void** params) { run_with(params, std::index_sequence_for<A...>{}); }
    template <std::size_t... I>
    static void run_with(void** params, std::index_sequence<I...>) {
        f(*static_cast<typename std::decay<A>::type*>(params[I])...);
    }
    // The size of each parameter's value (what a graph capture copies from `params`).
    static int sizes(std::size_t* out, int max) {
        const std::size_t each[] = {sizeof(typename std::decay<A>::type)..., 0};
        const int n = (int)sizeof...(A);
        for (int i = 0; i < n && i < max; ++i) out[i] = each[i];
        return n;
    }
};

struct KernelEntry {
    const char* name;
    void (*invoke)(void**);
    int (*param_sizes)(std::size_t*, int);
};

#define KERNEL(name) \
    {#name, &Trampoline<decltype(name), &name>::run, &Trampoline<decltype(name), &name>::sizes},
const KernelEntry KERNELS[] = {
#include "kernel_table.inc"
};
#undef KERNEL

}  // namespace

void emu_syncthreads() {
    if (block->direct) {
        block->stray_barrier = true;
        return;
    }
    Fiber* me = block->current;
    me->state = FiberState::AtBarrier;
    me->barriers += 1;
    emu_switch(&me->sp, block->scheduler);
}

extern "C" {

// The kernel of that name, or null.
const void* emu_find_kernel(const char* name) {
    for (const KernelEntry& k : KERNELS) {
        if (std::strcmp(k.name, name) == 0) return &k;
    }
    return nullptr;
}

const char* emu_kernel_name(const void* kernel) {
    return static_cast<const KernelEntry*>(kernel)->name;
}

// The kernel's parameter count, and the first `max` parameters' sizes in `out`.
int emu_kernel_param_sizes(const void* kernel, std::size_t* out, int max) {
    return static_cast<const KernelEntry*>(kernel)->param_sizes(out, max);
}

}  // extern "C"

namespace {

// Aims a fiber at fiber_main: a stack as emu_switch leaves it, whose `ret` enters fiber_main
// with the stack aligned as after a call.
void start_fiber(Fiber& f) {
    auto top = reinterpret_cast<std::uintptr_t>(static_cast<char*>(f.stack) + STACK_BYTES);
    auto* sp = reinterpret_cast<std::uintptr_t*>(top & ~std::uintptr_t{15});
    *--sp = 0;  // fiber_main's return address: it never returns
    *--sp = reinterpret_cast<std::uintptr_t>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp, rbx, r12-r15
    f.sp = sp;
    f.state = FiberState::Runnable;
    f.barriers = 0;
}

void resume(Block& b, Fiber& f, unsigned int t) {
    const dim3 d = blockDim;
    threadIdx = uint3{t % d.x, (t / d.x) % d.y, t / (d.x * d.y)};
    b.current = &f;
    emu_switch(&b.scheduler, f.sp);
}

// One block. Its first thread (in turn order) runs as a fiber; if it finishes without meeting
// a barrier, the others run as plain calls (most kernels: no switch at all), and one that
// meets a barrier after all diverged. Otherwise every thread is a fiber, taking turns between
// barriers: in ascending order, then descending after the next barrier, the first order
// alternating from block to block, so that a thread reading what another writes without a
// barrier between them reads the old value in some block, in either direction. False when
// the threads reached different barriers.
bool run_block(Block& b, unsigned int threads, bool descending) {
    const unsigned int first = descending ? threads - 1 : 0;
    start_fiber(b.fibers[first]);
    resume(b, b.fibers[first], first);
    if (b.fibers[first].state == FiberState::Done) {
        b.direct = true;
        b.stray_barrier = false;
        const dim3 d = blockDim;
        for (unsigned int i = 1; i < threads; ++i) {
            const unsigned int t = descending ? threads - 1 - i : i;
            threadIdx = uint3{t % d.x, (t / d.x) % d.y, t / (d.x * d.y)};
            b.invoke(b.params);
        }
        b.direct = false;
        return !b.stray_barrier;
    }
    for (unsigned int t = 0; t < threads; ++t)
        if (t != first) start_fiber(b.fibers[t]);
    unsigned int done = 0;
    while (done < threads) {
        for (unsigned int i = 0; i < threads; ++i) {
            const unsigned int t = descending ? threads - 1 - i : i;
            Fiber& f = b.fibers[t];
            if (f.state != FiberState::Runnable) continue;
            resume(b, f, t);
            if (f.state == FiberState::Done) done += 1;
        }
        // Every thread is at a barrier or finished: release the barrier. Threads that
        // finished while others wait at one diverged.
        unsigned int waiting = 0, count = 0;
        bool uneven = false;
        for (unsigned int t = 0; t < threads; ++t) {
            Fiber& f = b.fibers[t];
            if (f.state == FiberState::AtBarrier) {
                if (waiting > 0 && f.barriers != count) uneven = true;
                count = f.barriers;
                waiting += 1;
                f.state = FiberState::Runnable;
            }
        }
        descending = !descending;
        if (waiting > 0 && (done > 0 || uneven)) return false;
    }
    return true;
}

}  // namespace

extern "C" {

// Runs the grid to completion. 0 on success; 1 when a block's threads passed different numbers
// of barriers; 2 when a fiber's stack could not be made; 3 when a thread accessed memory at an
// address its type's alignment does not divide (the device stops there with a misaligned-
// address error; here the grid runs to its end and the first such access is reported).
int emu_launch(const void* kernel, unsigned int gx, unsigned int gy, unsigned int gz,
               unsigned int bx, unsigned int by, unsigned int bz, void** params) {
    const KernelEntry* entry = static_cast<const KernelEntry*>(kernel);
    const unsigned int threads = bx * by * bz;
    if (!pool.ensure(threads)) return 2;
    Block b;
    b.invoke = entry->invoke;
    b.params = params;
    b.fibers = pool.fibers.data();
    Block* outer = block;
    block = &b;
    gridDim = dim3{gx, gy, gz};
    blockDim = dim3{bx, by, bz};
    int status = 0;
    misaligned = MisalignedAccess{};
    // A GPU runs a grid's blocks in no set order (many at once): every other launch on this
    // OS thread walks them backwards, so that a kernel reading what another block of its
    // grid writes, with nothing between them, sees it written in one launch and not in the
    // next.
    const bool backwards = (launches_here++ & 1u) != 0;
    const unsigned long long blocks = (unsigned long long)gx * gy * gz;
    for (unsigned long long i = 0; i < blocks && status == 0; ++i) {
        const unsigned long long n = backwards ? blocks - 1 - i : i;
        const unsigned int x = (unsigned int)(n % gx), y = (unsigned int)(n / gx % gy),
                           z = (unsigned int)(n / ((unsigned long long)gx * gy));
        blockIdx = uint3{x, y, z};
        if (!run_block(b, threads, ((x + y + z) & 1u) != 0)) {
            std::fprintf(stderr,
                         "cuda emulator: kernel %s, block (%u, %u, %u): threads reached "
                         "different barriers\n",
                         entry->name, x, y, z);
            status = 1;
        }
    }
    block = outer;
    if (status == 0 && misaligned.seen) {
        const MisalignedAccess& m = misaligned;
        std::fprintf(stderr,
                     "cuda emulator: kernel %s, block (%u, %u, %u), thread (%u, %u, %u): "
                     "misaligned address 0x%llx for %s (needs %u bytes) at %s:%u\n",
                     entry->name, m.block.x, m.block.y, m.block.z, m.thread.x, m.thread.y,
                     m.thread.z, (unsigned long long)m.address, m.type, m.alignment,
                     m.file != nullptr ? m.file : "?", m.line);
        status = 3;
    }
    misaligned = MisalignedAccess{};
    return status;
}

}  // extern "C"
