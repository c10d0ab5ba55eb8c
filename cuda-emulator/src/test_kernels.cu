// Kernels with the faults the emulator is meant to show, for its own tests (lib.rs). They are
// compiled into the library but no PTX declares them, so cuModuleGetFunction never hands them
// out: only the tests reach them, through emu_find_kernel.

// Threads in [from, to) wait at a barrier the others never reach.
extern "C" __global__ void emu_test_divergent_barrier(int from, int to, int* out) {
    if ((int)threadIdx.x >= from && (int)threadIdx.x < to) {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Each thread writes its slot of shared memory, then reads its neighbour's; with `barrier` 0
// there is no __syncthreads between the write and the read (a race).
extern "C" __global__ void emu_test_neighbour(int barrier, int* out) {
    __shared__ int slot[256];
    slot[threadIdx.x] = (int)(blockIdx.x * 1000 + threadIdx.x);
    if (barrier) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = slot[(threadIdx.x + 1) % blockDim.x];
}

// out[0] = a * b + c as written (NVRTC fuses it into one multiply-add by default), out[1] the
// same through __fmul_rn (never fused), out[2] an explicit __fmaf_rn.
extern "C" __global__ void emu_test_contraction(float a, float b, float c, float* out) {
    out[0] = a * b + c;
    out[1] = __fmul_rn(a, b) + c;
    out[2] = __fmaf_rn(a, b, c);
}

// Warp-wide calls: out[3 * t] = the lanes of t's warp holding its value (__match_any_sync),
// out[3 * t + 1] = the value of lane - 3 (its own below lane 3; __shfl_up_sync), out[3 * t + 2]
// = the popcount of the first.
extern "C" __global__ void emu_test_warp_calls(const unsigned int* values, unsigned int* out) {
    const unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned int same = __match_any_sync(0xffffffffu, values[t]);
    const unsigned int up = __shfl_up_sync(0xffffffffu, values[t], 3);
    __syncwarp();
    out[3 * t] = same;
    out[3 * t + 1] = up;
    out[3 * t + 2] = (unsigned int)__popc(same);
}

// out[t] = the sum of the four words of a uint4 read `offset` bytes into `bytes`, plus the
// 32-bit word `word_offset` bytes in: misaligned (a fault on the device) unless 16 and 4
// divide them.
extern "C" __global__ void emu_test_vector_load(const unsigned char* bytes, int offset,
                                                int word_offset, unsigned int* out) {
    const uint4 v = *(const uint4*)(bytes + offset);
    const unsigned int word = *(const unsigned int*)(bytes + word_offset);
    out[threadIdx.x] = v.x + v.y + v.z + v.w + word;
}

// Each block's thread 0 writes one more than what the block before it (cyclically) holds: a
// read of another block's write with nothing between them, so the result depends on the
// order the blocks run in.
extern "C" __global__ void emu_test_previous_block(int* out) {
    if (threadIdx.x == 0) out[blockIdx.x] = out[(blockIdx.x + gridDim.x - 1) % gridDim.x] + 1;
}
