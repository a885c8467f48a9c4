// One-shot all-reduce over CUDA IPC buffers (NVLink peer-to-peer, no multicast).
//
// Every rank writes its input into its slot of every rank's IPC data buffer (NVLink writes
// are posted: no round trip), the same block of every rank meets at a flag barrier, then
// each rank sums the slots of its own buffer (local reads) in float32 in rank order, so
// every rank gets the same bits, and writes the sum back into its input. Compiled at
// runtime by NVRTC (custom_all_reduce.py); no CUDA headers.
//
// Buffers, per rank (allocated once, registered with every peer):
//   data:    2 halves x world slots x `slot_bytes`; call number e uses half e % 2, and rank
//            p writes slot p. A rank writes a half again two calls later, once every peer
//            has finished reading it (finish_call): no barrier is needed at the end of a call.
//   signals: flags[MAX_BLOCKS][MAX_RANKS] u64; flags[b][p] = the call number rank p's
//            block b last reached. Call numbers only grow (u64: no wrap-around).
//   epochs:  local u64s, the number of the last call (see finish_call). They live in device
//            memory so that a CUDA graph replays with fresh call numbers.
// Block b handles the same 16-byte packs on every rank, and waits only on the same block
// of its peers; the grid never exceeds MAX_BLOCKS (fewer than the SMs), so every block is
// resident and no wait can deadlock.

#define MAX_RANKS 8
#define MAX_BLOCKS 36

typedef unsigned long long u64;
typedef unsigned short u16;

__device__ __forceinline__ void store_release(u64* p, u64 v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u64 load_acquire(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// 16 bytes a peer wrote, read at L2 (never a stale L1 line from an earlier call).
__device__ __forceinline__ uint4 load_slot(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
}

struct Bf16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(T h) { return __uint_as_float(((unsigned)h) << 16); }
    static __device__ __forceinline__ T store(float f) {
        T h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(T h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ T store(float f) {
        T h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(T x) { return x; }
    static __device__ __forceinline__ T store(float f) { return f; }
};

// Block b of this rank meets block b of every peer at call number `epoch`.
__device__ __forceinline__ void block_barrier(const u64* sigs, int rank, int world, u64 epoch) {
    __threadfence_system();  // this thread's writes to our data buffer, visible to peers first
    __syncthreads();
    if (threadIdx.x < world) {
        u64* to_peer = (u64*)sigs[threadIdx.x] + blockIdx.x * MAX_RANKS + rank;
        store_release(to_peer, epoch);
        const u64* from_peer = (const u64*)sigs[rank] + blockIdx.x * MAX_RANKS + threadIdx.x;
        while (load_acquire(from_peer) < epoch) {
        }
    }
    __syncthreads();
}

// Slot s of this call's half: [slot_bytes] holding rank s's input.
__device__ __forceinline__ char* slot(u64 buf, u64 epoch, int s, int world, long long slot_bytes) {
    return (char*)buf + ((long long)(epoch & 1) * world + s) * slot_bytes;
}

// Every entry of `epochs` holds the number of the last call, whatever its grid: block b of a
// call sets entries b, b + grid, ... (no block of this call reads those but its own), so the
// next call's blocks all read the same number. One number per call keeps the halves safe when
// calls of different grids follow each other: a rank inside call e has finished call e - 1,
// whose block 0 met every peer's block 0, so every peer has finished call e - 2 (the last one
// that used this half).
__device__ __forceinline__ void finish_call(u64* epochs, u64 epoch) {
    __syncthreads();
    if (threadIdx.x == 0)
        for (int j = blockIdx.x; j < MAX_BLOCKS; j += gridDim.x) epochs[j] = epoch;
}

template <typename Op>
__device__ __forceinline__ void sum_pack(uint4* out, const char* half, long long slot_bytes, long long i, int world) {
    const int n = 16 / sizeof(typename Op::T);
    float acc[16 / sizeof(typename Op::T)];
    uint4 v = load_slot((const uint4*)half + i);
    const typename Op::T* e = (const typename Op::T*)&v;
#pragma unroll
    for (int k = 0; k < n; ++k) acc[k] = Op::load(e[k]);
    for (int r = 1; r < world; ++r) {
        v = load_slot((const uint4*)(half + r * slot_bytes) + i);
#pragma unroll
        for (int k = 0; k < n; ++k) acc[k] += Op::load(e[k]);
    }
    typename Op::T* o = (typename Op::T*)&v;
#pragma unroll
    for (int k = 0; k < n; ++k) o[k] = Op::store(acc[k]);
    out[i] = v;
}

template <typename Op>
__device__ __forceinline__ void sum_element(typename Op::T* out, const char* half, long long slot_bytes, long long j,
                                            int world) {
    float acc = 0.0f;
    for (int r = 0; r < world; ++r) acc += Op::load(((const volatile typename Op::T*)(half + r * slot_bytes))[j]);
    out[j] = Op::store(acc);
}

// x: [nbytes] in place. bufs / sigs: [world] device pointers (ours at [rank]).
// The 16-byte packs are spread over the grid; the last < 16 bytes go to block 0.
template <typename Op>
__device__ void one_shot(void* x, long long nbytes, const u64* bufs, const u64* sigs, u64* epochs, int rank, int world,
                         long long slot_bytes) {
    typedef typename Op::T T;
    const u64 epoch = epochs[blockIdx.x] + 1;
    const long long packs = nbytes / 16, first_tail = packs * 16 / sizeof(T), count = nbytes / sizeof(T);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += stride) {
        const uint4 v = ((const uint4*)x)[i];
        for (int r = 0; r < world; ++r) ((uint4*)slot(bufs[r], epoch, rank, world, slot_bytes))[i] = v;
    }
    if (blockIdx.x == 0)
        for (long long j = first_tail + threadIdx.x; j < count; j += blockDim.x)
            for (int r = 0; r < world; ++r) ((T*)slot(bufs[r], epoch, rank, world, slot_bytes))[j] = ((const T*)x)[j];
    block_barrier(sigs, rank, world, epoch);
    const char* half = slot(bufs[rank], epoch, 0, world, slot_bytes);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < packs; i += stride)
        sum_pack<Op>((uint4*)x, half, slot_bytes, i, world);
    if (blockIdx.x == 0)
        for (long long j = first_tail + threadIdx.x; j < count; j += blockDim.x)
            sum_element<Op>((T*)x, half, slot_bytes, j, world);
    finish_call(epochs, epoch);
}

// The sum of one row's 16-byte pack p over the slots, rounded to T as an all-reduce returns it.
template <typename Op>
__device__ __forceinline__ void sum_slots(float* acc, const char* half, long long slot_bytes, long long i, int world) {
    const int n = 16 / sizeof(typename Op::T);
    for (int k = 0; k < n; ++k) acc[k] = 0.0f;
    for (int r = 0; r < world; ++r) {
        uint4 v = load_slot((const uint4*)(half + r * slot_bytes) + i);
        const typename Op::T* e = (const typename Op::T*)&v;
#pragma unroll
        for (int k = 0; k < n; ++k) acc[k] += Op::load(e[k]);
    }
#pragma unroll
    for (int k = 0; k < n; ++k) acc[k] = Op::load(Op::store(acc[k]));
}

// Sum of `v` over the block (every thread gets it). `scratch`: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
    __syncthreads();  // scratch is free again (the previous row's sum was read)
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// All-reduce + residual add + RMSNorm in one kernel (TensorRT-LLM's fused AllReduce+RMSNorm):
//   x [rows, cols]: this rank's partial sums in; sum + residual out (the new residual stream,
//            rounded to T as unfused), so the inputs a caller still holds are never written;
//   residual [rows, cols]: read only; out [rows, cols]: RMSNorm(sum + residual) * weight;
//   weight [cols]. Rows are spread over the blocks: block b pushes and sums the same rows on
//   every rank, so the per-block barrier is enough.
template <typename Op>
__device__ void one_shot_add_rms_norm(void* x, const void* residual, void* out, const void* weight, long long rows,
                                      long long cols,
                                      float eps, const u64* bufs, const u64* sigs, u64* epochs, int rank, int world,
                                      long long slot_bytes) {
    typedef typename Op::T T;
    const int n = 16 / sizeof(T);
    __shared__ float scratch[32];
    const u64 epoch = epochs[blockIdx.x] + 1;
    const long long row_packs = cols / n;
    for (long long row = blockIdx.x; row < rows; row += gridDim.x)
        for (long long p = threadIdx.x; p < row_packs; p += blockDim.x) {
            const long long i = row * row_packs + p;
            const uint4 v = ((const uint4*)x)[i];
            for (int r = 0; r < world; ++r) ((uint4*)slot(bufs[r], epoch, rank, world, slot_bytes))[i] = v;
        }
    block_barrier(sigs, rank, world, epoch);
    const char* half = slot(bufs[rank], epoch, 0, world, slot_bytes);
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        float squares = 0.0f;
        for (long long p = threadIdx.x; p < row_packs; p += blockDim.x) {
            const long long i = row * row_packs + p;
            float acc[16 / sizeof(T)];
            sum_slots<Op>(acc, half, slot_bytes, i, world);
            uint4 v = ((const uint4*)residual)[i];
            T* e = (T*)&v;
#pragma unroll
            for (int k = 0; k < n; ++k) {
                e[k] = Op::store(acc[k] + Op::load(e[k]));
                const float r = Op::load(e[k]);
                squares += r * r;
            }
            ((uint4*)x)[i] = v;  // x was read before the barrier (pushed), so it is free now
        }
        const float rstd = 1.0f / sqrtf(block_sum(squares, scratch) / (float)cols + eps);
        for (long long p = threadIdx.x; p < row_packs; p += blockDim.x) {
            const long long i = row * row_packs + p;
            uint4 v = ((const uint4*)x)[i];
            const uint4 w = ((const uint4*)weight)[p];
            T* e = (T*)&v;
            const T* we = (const T*)&w;
#pragma unroll
            for (int k = 0; k < n; ++k) e[k] = Op::store(Op::load(we[k]) * Op::load(Op::store(Op::load(e[k]) * rstd)));
            ((uint4*)out)[i] = v;
        }
    }
    finish_call(epochs, epoch);
}

#define ONE_SHOT(name, Op)                                                                                     \
    extern "C" __global__ void __launch_bounds__(512) name(void* x, long long nbytes, const u64* bufs,         \
                                                           const u64* sigs, u64* epochs, int rank, int world,  \
                                                           long long slot_bytes) {                             \
        one_shot<Op>(x, nbytes, bufs, sigs, epochs, rank, world, slot_bytes);                                  \
    }

ONE_SHOT(one_shot_all_reduce_bf16, Bf16)
ONE_SHOT(one_shot_all_reduce_f16, F16)
ONE_SHOT(one_shot_all_reduce_f32, F32)

#define ONE_SHOT_ADD_RMS_NORM(name, Op)                                                                        \
    extern "C" __global__ void __launch_bounds__(512)                                                         \
        name(void* x, const void* residual, void* out, const void* weight, long long rows, long long cols,   \
             float eps,                                                                                       \
             const u64* bufs, const u64* sigs, u64* epochs, int rank, int world, long long slot_bytes) {      \
        one_shot_add_rms_norm<Op>(x, residual, out, weight, rows, cols, eps, bufs, sigs, epochs, rank, world, \
                                  slot_bytes);                                                               \
    }

ONE_SHOT_ADD_RMS_NORM(one_shot_add_rms_norm_bf16, Bf16)
ONE_SHOT_ADD_RMS_NORM(one_shot_add_rms_norm_f16, F16)
ONE_SHOT_ADD_RMS_NORM(one_shot_add_rms_norm_f32, F32)
