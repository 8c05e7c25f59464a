/*
 * common.cuh -- what every CUDA file of the backend shares: the C headers (included as C), the
 * CUDA_CHECK macros, the backend's private state, warp/block reductions and the element
 * conversions (f16, bf16, FP8 E4M3/E5M2, Q8_0/Q4_0 blocks) that match dtype.c bit for bit.
 *
 * Errors. Ops return void (backend.h): a CUDA error inside an op is a bug or a dead device, so
 * CUDA_CHECK prints the statement, function, file:line and cudaGetErrorName, then aborts.
 * Functions that return a status (alloc, model_upload, kv pool) use CUDA_TRY, which logs the
 * same line and returns the given status instead.
 */
#ifndef COOPT_CUDA_COMMON_CUH
#define COOPT_CUDA_COMMON_CUH

// util.h and dtype.h are C11; these two keywords have C++ spellings.
#define _Noreturn      [[noreturn]]
#define _Static_assert static_assert
extern "C" {
#include "backend.h"
#include "dtype.h"
#include "kv_cache.h"
#include "util.h"
}
#undef _Noreturn
#undef _Static_assert

#include "cuda/cuda.h"

#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <stdint.h>

#define WARP_SIZE 32

// ---- error checks ----

void cuda_report_error(const char *stmt, const char *func, const char *file, int line, const char *err);

#define CUDA_CHECK(stmt)                                                                           \
    do {                                                                                           \
        cudaError_t err_ = (stmt);                                                                 \
        if (err_ != cudaSuccess) {                                                                 \
            cuda_report_error(#stmt, __func__, __FILE__, __LINE__, cudaGetErrorName(err_));        \
            coopt_abort(__FILE__, __LINE__, "CUDA error");                                         \
        }                                                                                          \
    } while (0)

// After every <<<>>>: catches bad launch configurations at the launch, not several calls later.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#define CUDA_TRY(stmt, status)                                                                     \
    do {                                                                                           \
        cudaError_t err_ = (stmt);                                                                 \
        if (err_ != cudaSuccess) {                                                                 \
            cuda_report_error(#stmt, __func__, __FILE__, __LINE__, cudaGetErrorName(err_));        \
            return (status);                                                                       \
        }                                                                                          \
    } while (0)

struct cuda_backend;
const char *cu_error_name(const struct cuda_backend *cb, CUresult r);

// Driver API calls go through the entry points in cb->drv (see struct cuda_driver).
#define CU_CHECK(cb, stmt)                                                                         \
    do {                                                                                           \
        CUresult r_ = (stmt);                                                                      \
        if (r_ != CUDA_SUCCESS) {                                                                  \
            cuda_report_error(#stmt, __func__, __FILE__, __LINE__, cu_error_name((cb), r_));       \
            coopt_abort(__FILE__, __LINE__, "CUDA driver error");                                  \
        }                                                                                          \
    } while (0)

#define CUBLAS_CHECK(stmt)                                                                         \
    do {                                                                                           \
        cublasStatus_t s_ = (stmt);                                                                \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                         \
            cuda_report_error(#stmt, __func__, __FILE__, __LINE__, cublasGetStatusName(s_));       \
            coopt_abort(__FILE__, __LINE__, "cuBLAS error");                                       \
        }                                                                                          \
    } while (0)

// ---- backend state ----

struct cuda_kv_pool; // kv_pool.cu
struct cuda_step;    // step.cu

// The driver API functions of the lazily mapped KV pool, fetched through the runtime
// (cudaGetDriverEntryPointByVersion) so the binary does not link libcuda.so: a build with CUDA
// then still starts on machines without a GPU driver, where the GPU tests skip.
struct cuda_driver {
    decltype(&::cuGetErrorName)                 GetErrorName;
    decltype(&::cuMemGetAllocationGranularity)  MemGetAllocationGranularity;
    decltype(&::cuMemAddressReserve)            MemAddressReserve;
    decltype(&::cuMemAddressFree)               MemAddressFree;
    decltype(&::cuMemCreate)                    MemCreate;
    decltype(&::cuMemRelease)                   MemRelease;
    decltype(&::cuMemMap)                       MemMap;
    decltype(&::cuMemUnmap)                     MemUnmap;
    decltype(&::cuMemSetAccess)                 MemSetAccess;
};

#define CUDA_FENCES 4

struct cuda_backend {
    int            device;
    int            n_sm;
    int            cc_major;   // compute capability (major) of the device (step.cu)
    int            attn_route; // attention routing (cuda_attn_set_route): 0 auto, 1 tensor cores wherever compiled, 2 never
    int            attn_store_cta; // fused decode attention, K/V stores in CTAs of their own: 0 by type and depth, 1 always, -1 never
    bool           attn_unfused_fp8;  // rope_store_attention runs two kernels for FP8 caches (cuda_attn_set_fuse_fp8)
    bool           attn_store_nowait; // store CTAs over one partition: the merge kernel, not the partition's CTA waiting
    bool           attn_cluster;      // and the partition's CTA waits in a cluster with them (sm_90+, attn_args.kv_cluster)
    bool           attn_no_pre;       // fused decode: every CTA waits for the kernel before first (attn_args.pre off)
    int            attn_tc_decode; // decode kernel on tensor cores (cuda_attn_tc_decode): 0 auto, 1 every group, -1 never
    float          attn_tc_occ;    // tensor-core decode: partitions are halved until CTAs >= this many per SM
    cudaStream_t   stream;
    cublasHandle_t cublas;
    // One growable device workspace shared by ops (x converted to f16/bf16 for cuBLAS, split-K
    // attention partials). Ops run in stream order, so one op's use never overlaps another's.
    void                *work;
    size_t               work_bytes;
    void                *work2; // second workspace, for an op's result while another op uses `work`
    size_t               work2_bytes;
    // Decode GEMV inputs staged by the GEMV before (matmul.cu: backend.h's *_then_* ops): two
    // slots in one buffer, and the record of the last staged output, which the next GEMV op
    // consumes or drops.
    void                *xst;
    size_t               xst_bytes; // the buffer's, both slots
    void                *flags;     // cuda_attn_flags
    size_t               flags_bytes;
    int                  xst_slot;  // the record's slot
    bool                 xst_valid;
    const float         *xst_x, *xst_norm; // what it holds: x (times norm, NULL = none)
    int64_t              xst_n;
    uint64_t             work_epoch;  // bumped when work/work2 move: recorded steps hold their addresses
    size_t               work_limit;  // tests (cuda_set_workspace_limit): growth past it fails; 0 = none
    enum coopt_status    op_error;    // the first failure since take_error (ops return void)
    void                *cublas_work; // fixed cuBLAS workspace (graph capture must not allocate)
    struct cuda_kv_pool *pools; // linked list of live KV pools
    struct cuda_driver   drv;
    bool                 pdl;  // GEMVs launch with programmatic dependent launch (sm_90+, step.cu)
    bool                 attn_trigger; // the attention's merge kernel triggers the next launch (attn_args)
    bool                 attn_merge_pdl; // the merge kernel launches programmatically dependent on the decode kernel
    bool                 attn_pdl;     // rope_store and the decode attention launch programmatically dependent
    int                  gemv_rows_per_task; // 0 = auto (matmul.cu), 1 or 2 forced (COOPT_CUDA_GEMV_ROWS)
    struct cuda_step    *step; // recorded decode steps (CUDA graphs) and op profiling, step.cu
    // backend.h's fences: marker n is event fence_ev[n % CUDA_FENCES] (a later marker reuses it,
    // and waiting on a later point of the one stream is still correct)
    cudaEvent_t          fence_ev[CUDA_FENCES];
    uint64_t             n_fence;
    struct coopt_ops     ops;  // this backend's table: cuda_ops, possibly wrapped (step.cu)
};

static inline struct cuda_backend *cuda_impl(struct coopt_backend *be) { return (struct cuda_backend *)be->impl; }

// Returns a workspace of at least n_bytes (grows it; the old contents are lost), or NULL when the
// device is out of memory (or an op of this step already failed): the failure is logged and kept
// in cb->op_error for take_error (backend.h), and the op enqueues nothing more.
// The buffers move only between steps: growing one while a step is being recorded is a bug
// (recording starts only after a step of the same geometry ran op by op) and aborts.
void *cuda_workspace(struct cuda_backend *cb, size_t n_bytes);
void *cuda_workspace2(struct cuda_backend *cb, size_t n_bytes);
void *cuda_workspace_xstage(struct cuda_backend *cb, size_t n_bytes); // cb->xst (its contents are lost when it grows)
// n counters, zero whenever no kernel runs (those that count reset them): the decode attention's
// store-CTA waits (attn_args.kv_wait); zeroed when it grows.
int32_t *cuda_attn_flags(struct cuda_backend *cb, size_t n);
// An op other than a GPTQ GEMV staging its output x (n values, one row) for the GEMV that reads x
// next (matmul.cu keeps the record, see there): the slot to write (NULL: none), then, once the
// op's launches are enqueued, the record.
void *cuda_xstage_out_begin(struct cuda_backend *cb, int64_t n);
void  cuda_xstage_out_end(struct cuda_backend *cb, const float *x, int64_t n);

// n rounded up to a multiple of 256 (sub-buffers of one allocation keep cudaMalloc's alignment).
static inline size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

// Grid size for a grid-stride loop over n elements with `threads` per block.
static inline unsigned cuda_grid_1d(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b > 65535 * 8) b = 65535 * 8;
    return (unsigned)(b > 0 ? b : 1);
}

// ---- reductions ----

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- timeline trace (trace builds only: -DCOOPT_TRACE, see step.cu and dev/trace.py) ----
//
// Each traced kernel opens a trace_cta at its start; at its end (the destructor, also on an early
// return) thread 0 appends one record: %globaltimer at the start, when thread 0 returned from
// pdl_wait (0: it did not call it), at the end, the kernel's kind (TRACE_* below, | an argument
// << 16) and the SM. The buffer (count first) is bound per translation unit (cuda_trace_bind_*).
#ifdef COOPT_TRACE
enum { TRACE_HGEMV = 1, TRACE_ATTN = 2, TRACE_MERGE = 3, TRACE_ROPE_STORE = 4, TRACE_ARGMAX = 5, TRACE_EMBED = 6,
       TRACE_RMSNORM = 7, TRACE_GEMV = 8 };
#define TRACE_CAP (1 << 20)
static __device__ unsigned long long *d_trace; // [0]: records written; then TRACE_CAP records of 4 words
__device__ __forceinline__ unsigned long long trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// No shared memory: 16 bytes more static shared memory moved the tensor-core GEMV's dynamic part off
// a 128-byte boundary and made the gate/up GEMV 22 % slower (docs/BENCHMARKS.md; that part is aligned
// now, but a trace should leave the kernels' layout alone), so the wait's time stays in thread 0's
// registers, as its offset from the start (+1; 0 = none).
struct trace_cta {
    unsigned long long t0;
    unsigned           kind, waited = 0;
    __device__ explicit trace_cta(unsigned k) : t0(trace_now()), kind(k) {}
    __device__ void on_wait() {
        if (threadIdx.x == 0 && threadIdx.y == 0) waited = (unsigned)(trace_now() - t0) + 1u;
    }
    __device__ ~trace_cta() {
        if (threadIdx.x != 0 || threadIdx.y != 0 || !d_trace) return;
        const unsigned long long i = atomicAdd(d_trace, 1ull);
        if (i >= TRACE_CAP) return;
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        unsigned long long *r = d_trace + 1 + 4 * i;
        r[0] = t0, r[1] = waited ? t0 + waited - 1u : 0ull, r[2] = trace_now();
        r[3] = (unsigned long long)kind | (unsigned long long)sm << 32;
    }
};
// pdl_wait (below) calls trace_cta_.on_wait(): the kernel's own, else (kernels without TRACE_CTA)
// this one, which records nothing.
struct trace_none {
    __device__ void on_wait() const {}
};
static __device__ trace_none trace_cta_;
#define TRACE_CTA(kind) trace_cta trace_cta_((unsigned)(kind))
#define TRACE_TU(name)                                                                             \
    extern "C" void cuda_trace_bind_##name(void *p) { CUDA_CHECK(cudaMemcpyToSymbol(d_trace, &p, sizeof(p))); }
#else
#define TRACE_CTA(kind) ((void)0)
#define TRACE_TU(name)
#endif

// ---- programmatic dependent launch (sm_90+) ----
//
// A kernel launched with programmatic stream serialization may start while the previous kernel
// of the stream finishes. pdl_wait: wait for that kernel's completion (and its memory) before
// touching what it writes; pdl_launch_dependents: let the next kernel launch now (it waits
// itself). Both are no-ops for launches without the attribute, and compiled out for older
// targets (where no launcher asks for it).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
#ifdef COOPT_TRACE
#define pdl_wait() (pdl_wait(), trace_cta_.on_wait())
#endif
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Launches kern<<<grid, block, smem, st>>>(args...), as a programmatic dependent launch when
// `pdl` (it may start while the previous kernel of the stream finishes: see pdl_wait), in
// thread-block clusters of cluster_z CTAs along z when cluster_z > 1 (sm_90+; grid.z a multiple).
template <typename... P, typename... A>
static cudaError_t cuda_launch_ex(bool pdl, unsigned cluster_z, void (*kern)(P...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t st, A... args) {
    cudaLaunchConfig_t  cfg   = {};
    cudaLaunchAttribute at[2] = {};
    cfg.gridDim               = grid;
    cfg.blockDim              = block;
    cfg.dynamicSmemBytes      = smem;
    cfg.stream                = st;
    unsigned n                = 0;
    if (pdl) {
        at[n].id                                         = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    if (cluster_z > 1) {
        at[n].id               = cudaLaunchAttributeClusterDimension;
        at[n].val.clusterDim.x = 1, at[n].val.clusterDim.y = 1, at[n].val.clusterDim.z = cluster_z;
        n++;
    }
    cfg.attrs    = at;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kern, args...);
}
template <typename... P, typename... A>
static cudaError_t cuda_launch_pdl(bool pdl, void (*kern)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                                   A... args) {
    return cuda_launch_ex(pdl, 1, kern, grid, block, smem, st, args...);
}
__device__ __forceinline__ void prefetch_l2(const void *p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Opts kern in to `smem` bytes of dynamic shared memory and the largest shared-memory carveout on
// the current device, once per device (`done`: the caller's table for this kernel; a function
// attribute is per device). Allowed while a stream is being captured into a CUDA graph.
template <typename... P> static void cuda_smem_opt_in(void (*kern)(P...), size_t smem, bool (&done)[64]) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    if (dev >= 0 && dev < 64 && done[dev]) return;
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    if (dev >= 0 && dev < 64) done[dev] = true;
}

// Load with acquire semantics at GPU scope (a flag another CTA sets after a fence).
__device__ __forceinline__ int32_t ld_acquire_gpu(const int32_t *p) {
    int32_t v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// ---- cp.async (sm_80+) ----

// Copies 16 bytes global -> shared; with pred false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool pred) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 16 : 0) : "memory");
}
// Copies 4 bytes global -> shared (zero-fills when pred is false).
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem, bool pred) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(pred ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Copies 16 bytes global -> shared, bypassing L1.
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

// ---- tensor cores (sm_80+) ----

// c += A B, mma.m16n8k16: A 16x16 f16 (row), B 16x8 f16 (col), f32 accumulators; fragments in
// the PTX ISA's layout. volatile: issued where it is written.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// The same, not volatile: the compiler may schedule it like any arithmetic (the GPTQ decode GEMV,
// whose x-fragment and group-word loads it then hoists).
__device__ __forceinline__ void mma_16816_nv(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += A B for an A whose rows 8-15 are zero (a1 = a3 = 0): only the accumulators of rows 0-7 (c0,
// c1) are kept; rows 8-15 go to scratch. The decode attention's query heads (at most 8) are A's rows.
// Not volatile: the compiler interleaves independent accumulator chains.
__device__ __forceinline__ void mma_16816_top(float (&c)[2], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
    [[maybe_unused]] float d2, d3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %5}, {%7, %8}, "
                 "{%0, %1, %9, %9};"
                 : "+f"(c[0]), "+f"(c[1]), "=f"(d2), "=f"(d3)
                 : "r"(a0), "r"(0u), "r"(a2), "r"(b0), "r"(b1), "f"(0.0f));
}

// ---- element conversions (match dtype.c) ----

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

__device__ __forceinline__ float fp8_e4m3_to_f32(uint8_t x) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)x, __NV_E4M3);
    return __half2float(__half(h));
}
__device__ __forceinline__ float fp8_e5m2_to_f32(uint8_t x) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)x, __NV_E5M2);
    return __half2float(__half(h));
}
// Round to nearest even, saturating to the largest finite value (as coopt_f32_to_fp8_*).
__device__ __forceinline__ uint8_t f32_to_fp8_e4m3(float f) {
    return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ uint8_t f32_to_fp8_e5m2(float f) {
    return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E5M2);
}

// Element i of a row of type T (T = COOPT_DTYPE_*), for every weight and KV type.
template <int T> __device__ __forceinline__ float load_elem(const uint8_t *row, int64_t i) {
    if constexpr (T == COOPT_DTYPE_F32) {
        return ((const float *)row)[i];
    } else if constexpr (T == COOPT_DTYPE_F16) {
        return f16_bits_to_f32(((const uint16_t *)row)[i]);
    } else if constexpr (T == COOPT_DTYPE_BF16) {
        return bf16_bits_to_f32(((const uint16_t *)row)[i]);
    } else if constexpr (T == COOPT_DTYPE_FP8_E4M3) {
        return fp8_e4m3_to_f32(row[i]);
    } else if constexpr (T == COOPT_DTYPE_FP8_E5M2) {
        return fp8_e5m2_to_f32(row[i]);
    } else if constexpr (T == COOPT_DTYPE_Q8_0) {
        const uint8_t *b = row + (i / COOPT_QK) * 34;
        float          d = f16_bits_to_f32((uint16_t)(b[0] | (b[1] << 8)));
        return d * (float)(int8_t)b[2 + i % COOPT_QK];
    } else {
        static_assert(T == COOPT_DTYPE_Q4_0, "load_elem: unsupported type");
        const uint8_t *b = row + (i / COOPT_QK) * 18;
        float          d = f16_bits_to_f32((uint16_t)(b[0] | (b[1] << 8)));
        int            j = (int)(i % COOPT_QK);
        int            q = j < 16 ? (b[2 + j] & 0x0f) : (b[2 + j - 16] >> 4);
        return d * (float)(q - 8);
    }
}

// ---- launchers implemented in the other .cu files ----

// matmul.cu
void cuda_matmul(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows);
void cuda_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                       const struct coopt_weight *const *ws, int32_t n_rows);
void cuda_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const struct coopt_weight *wg,
                        const struct coopt_weight *wu, int32_t n_rows);
void cuda_matmul_add(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows);
void cuda_matmul_add_then_norm(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w,
                               int32_t n_rows, const float *next_norm);
void cuda_norm_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x, const float *norm,
                            float eps, const struct coopt_weight *const *ws, int32_t n_rows);
void cuda_norm_matmul_swiglu(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                             float eps, const struct coopt_weight *wg, const struct coopt_weight *wu, int32_t n_rows);
void cuda_norm_matmul_swiglu_then_add(struct coopt_backend *be, float *out, float *tmp, const float *x, const float *norm,
                                      float eps, const struct coopt_weight *wg, const struct coopt_weight *wu,
                                      int32_t n_rows);
// step.cu: fills cb->ops from the base table (environment: COOPT_CUDA_GRAPHS=0 no step replay,
// COOPT_CUDA_FUSED=0 no fused ops, COOPT_CUDA_PROFILE=1 per-op GPU time table on stderr at exit).
enum coopt_status cuda_step_init(struct coopt_backend *be, const struct coopt_ops *base);
void cuda_step_free(struct cuda_backend *cb);
bool cuda_step_begin(struct coopt_backend *be, const struct coopt_kv_cache *kv, const struct coopt_batch *b);
bool cuda_step_end(struct coopt_backend *be);
enum coopt_status cuda_host_alloc(struct coopt_backend *be, size_t n_bytes, void **out);
void cuda_host_free(struct coopt_backend *be, void *p);
// rope_store.cu
void cuda_rope(struct coopt_backend *be, float *q, int32_t n_heads, const int32_t *pos, int32_t n,
               const struct coopt_rope *rope);
void cuda_rope_store(struct coopt_backend *be, float *q, const float *k, const float *v, int32_t n_heads,
                     struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                     const struct coopt_rope *rope);
// paged_attn.cu
int64_t cuda_attn_bound(const struct coopt_kv_cache *kv, const struct coopt_batch *b); // bucketed bound of a step
void cuda_attention(struct coopt_backend *be, float *out, const float *q, int32_t n_heads,
                    const struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b, float scale);
void cuda_rope_store_attention(struct coopt_backend *be, float *out, float *q, const float *k, const float *v,
                               int32_t n_heads, struct coopt_kv_cache *kv, int32_t layer, const struct coopt_batch *b,
                               const struct coopt_rope *rope, float scale);
void cuda_rope_store_attention_then_matmul(struct coopt_backend *be, float *out, float *q, const float *k,
                                           const float *v, int32_t n_heads, struct coopt_kv_cache *kv, int32_t layer,
                                           const struct coopt_batch *b, const struct coopt_rope *rope, float scale);
// kv_pool.cu
enum coopt_status cuda_kv_pool_init(struct coopt_backend *be, size_t n_bytes, void **out);
void cuda_kv_pool_free(struct coopt_backend *be, void *pool, size_t n_bytes);
void cuda_kv_pool_release(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes);
enum coopt_status cuda_kv_pool_commit(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes);
void cuda_kv_page_copy(struct coopt_backend *be, void *pool, size_t page_bytes, int32_t dst, int32_t src);
// Maps every page that this step may write (called by rope_store before its launch). false: out
// of device memory (kept in cb->op_error): the caller enqueues nothing.
bool cuda_kv_pool_prepare(struct coopt_backend *be, struct coopt_kv_cache *kv);
void cuda_kv_pools_free_all(struct cuda_backend *cb);

#endif // COOPT_CUDA_COMMON_CUH
