/*
 * ops_cuda.cu -- the CUDA backend: device, stream and cuBLAS handle, device memory, the model
 * upload, the ops table, and the small ops (embed, rmsnorm, silu_mul, add, get_rows).
 *
 * Everything runs in order on the backend's one stream; upload/download are cudaMemcpyAsync on
 * it (from pageable memory the driver stages the copy and the host buffer can be reused when the
 * call returns; the context's batch arrays and logits are page-locked (host_alloc) and the context
 * leaves them alone until a fence or sync says the copy is done) and sync waits for the stream;
 * fence / fence_wait are events on it. Matmul and the fused projections live in
 * matmul.cu, RoPE + KV store in rope_store.cu, attention in paged_attn.cu, the lazily mapped KV
 * pool in kv_pool.cu, CUDA-graph replay of decode steps and the op profile in step.cu.
 */
#include "cuda/common.cuh"
#include "cuda/gptq_dev.h"
#include "pick.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

TRACE_TU(ops_cuda)

// ---- errors ----

void cuda_report_error(const char *stmt, const char *func, const char *file, int line, const char *err) {
    coopt_log_error("CUDA error %s in %s (%s:%d): %s", err, func, file, line, stmt);
}

const char *cu_error_name(const struct cuda_backend *cb, CUresult r) {
    const char *s = NULL;
    if (!cb->drv.GetErrorName || cb->drv.GetErrorName(r, &s) != CUDA_SUCCESS || !s) return "CUDA_ERROR_UNKNOWN";
    return s;
}

// Fills cb->drv from the runtime's driver entry points. Returns false after a message.
static bool driver_load(struct cuda_backend *cb) {
    struct {
        const char *name;
        void      **fn;
    } syms[] = {
        {"cuGetErrorName", (void **)&cb->drv.GetErrorName},
        {"cuMemGetAllocationGranularity", (void **)&cb->drv.MemGetAllocationGranularity},
        {"cuMemAddressReserve", (void **)&cb->drv.MemAddressReserve},
        {"cuMemAddressFree", (void **)&cb->drv.MemAddressFree},
        {"cuMemCreate", (void **)&cb->drv.MemCreate},
        {"cuMemRelease", (void **)&cb->drv.MemRelease},
        {"cuMemMap", (void **)&cb->drv.MemMap},
        {"cuMemUnmap", (void **)&cb->drv.MemUnmap},
        {"cuMemSetAccess", (void **)&cb->drv.MemSetAccess},
    };
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
        cudaError_t e = cudaGetDriverEntryPointByVersion(syms[i].name, syms[i].fn, 12000, cudaEnableDefault, &q);
        if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !*syms[i].fn) {
            coopt_log_error("device 'cuda': driver entry point %s not found (%s)", syms[i].name,
                            e != cudaSuccess ? cudaGetErrorName(e) : "symbol not found");
            return false;
        }
    }
    return true;
}

static void *workspace_grow(struct cuda_backend *cb, void **buf, size_t *bytes, size_t n_bytes) {
    if (n_bytes <= *bytes) return *buf;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    CUDA_CHECK(cudaStreamIsCapturing(cb->stream, &cs));
    if (cs != cudaStreamCaptureStatusNone) {
        coopt_log_error("CUDA workspace: must grow to %zu bytes while a step is recorded", n_bytes);
        coopt_abort(__FILE__, __LINE__, "workspace growth during CUDA graph capture");
    }
    if (cb->op_error != COOPT_OK) return NULL; // the step already failed: enqueue nothing more
    // Grows geometrically so a slowly growing context does not reallocate every step.
    size_t want = n_bytes + n_bytes / 4;
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    CUDA_CHECK(cudaFree(*buf));
    *buf          = NULL;
    *bytes        = 0;
    cb->work_epoch++;
    cudaError_t e = cb->work_limit && want > cb->work_limit ? cudaErrorMemoryAllocation : cudaMalloc(buf, want);
    if (e != cudaSuccess) {
        *buf          = NULL;
        cb->op_error  = coopt_fail(COOPT_ERR_NOMEM, "device 'cuda': out of GPU memory for a %zu-byte workspace (%s)",
                                   want, cudaGetErrorName(e));
        return NULL;
    }
    *bytes = want;
    return *buf;
}

void *cuda_workspace(struct cuda_backend *cb, size_t n_bytes) { return workspace_grow(cb, &cb->work, &cb->work_bytes, n_bytes); }
void *cuda_workspace2(struct cuda_backend *cb, size_t n_bytes) {
    return workspace_grow(cb, &cb->work2, &cb->work2_bytes, n_bytes);
}
void *cuda_workspace_xstage(struct cuda_backend *cb, size_t n_bytes) {
    return workspace_grow(cb, &cb->xst, &cb->xst_bytes, n_bytes);
}
int32_t *cuda_attn_flags(struct cuda_backend *cb, size_t n) {
    const size_t had = cb->flags_bytes;
    int32_t     *f   = (int32_t *)workspace_grow(cb, &cb->flags, &cb->flags_bytes, n * sizeof(int32_t));
    if (f && cb->flags_bytes != had) CUDA_CHECK(cudaMemset(f, 0, cb->flags_bytes)); // (a new buffer: synchronous)
    return f;
}

// ---- memory ----

static enum coopt_status cuda_alloc(struct coopt_backend *be, size_t n_bytes, void **out) {
    *out          = NULL;
    cudaError_t e = cudaMalloc(out, n_bytes ? n_bytes : 256);
    if (e != cudaSuccess) {
        *out = NULL;
        (void)cudaGetLastError(); // clear the sticky-free error so later launches are not blamed
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        return coopt_fail(COOPT_ERR_NOMEM, "out of GPU memory: cannot allocate %.1f MiB (%.1f MiB free of %.1f MiB)",
                          n_bytes / 1048576.0, free_b / 1048576.0, total_b / 1048576.0);
    }
    return COOPT_OK;
}

static void cuda_free(struct coopt_backend *be, void *p) {
    if (p) CUDA_CHECK(cudaFree(p));
}

static void cuda_upload(struct coopt_backend *be, void *dst, const void *src, size_t n_bytes) {
    if (n_bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, n_bytes, cudaMemcpyHostToDevice, cuda_impl(be)->stream));
}

static void cuda_download(struct coopt_backend *be, void *dst, const void *src, size_t n_bytes) {
    if (n_bytes) CUDA_CHECK(cudaMemcpyAsync(dst, src, n_bytes, cudaMemcpyDeviceToHost, cuda_impl(be)->stream));
}

static void cuda_sync(struct coopt_backend *be) { CUDA_CHECK(cudaStreamSynchronize(cuda_impl(be)->stream)); }

static uint64_t cuda_fence(struct coopt_backend *be) {
    struct cuda_backend *cb = cuda_impl(be);
    const uint64_t       n  = ++cb->n_fence;
    CUDA_CHECK(cudaEventRecord(cb->fence_ev[n % CUDA_FENCES], cb->stream));
    return n;
}

static void cuda_fence_wait(struct coopt_backend *be, uint64_t n) {
    struct cuda_backend *cb = cuda_impl(be);
    COOPT_ASSERT(n <= cb->n_fence);
    if (n > 0) CUDA_CHECK(cudaEventSynchronize(cb->fence_ev[n % CUDA_FENCES]));
}

// ---- embed ----
//
// out[t][:] = dequant(table row tokens[t]).
// Grid: (n_tokens); Block: 256 threads striding over the n_in elements of the row.
template <int T>
__global__ void embed_kernel(float *__restrict__ out, const uint8_t *__restrict__ table, size_t row_bytes,
                             int64_t n_in, const int32_t *__restrict__ tokens) {
    TRACE_CTA(TRACE_EMBED);
    int32_t        t   = blockIdx.x;
    const uint8_t *row = table + (size_t)tokens[t] * row_bytes;
    float         *o   = out + (size_t)t * (size_t)n_in;
    for (int64_t i = threadIdx.x; i < n_in; i += blockDim.x) o[i] = load_elem<T>(row, i);
}

static void cuda_embed(struct coopt_backend *be, float *out, const struct coopt_weight *table, const int32_t *tokens,
                       int32_t n) {
    if (n <= 0) return;
    size_t rb = coopt_dtype_row_bytes(table->dtype, table->n_in);
    COOPT_ASSERT(rb > 0);
    cudaStream_t   st = cuda_impl(be)->stream;
    const uint8_t *d  = (const uint8_t *)table->data;
    switch (table->dtype) {
    case COOPT_DTYPE_F32: embed_kernel<COOPT_DTYPE_F32><<<n, 256, 0, st>>>(out, d, rb, table->n_in, tokens); break;
    case COOPT_DTYPE_F16: embed_kernel<COOPT_DTYPE_F16><<<n, 256, 0, st>>>(out, d, rb, table->n_in, tokens); break;
    case COOPT_DTYPE_BF16: embed_kernel<COOPT_DTYPE_BF16><<<n, 256, 0, st>>>(out, d, rb, table->n_in, tokens); break;
    case COOPT_DTYPE_Q8_0: embed_kernel<COOPT_DTYPE_Q8_0><<<n, 256, 0, st>>>(out, d, rb, table->n_in, tokens); break;
    case COOPT_DTYPE_Q4_0: embed_kernel<COOPT_DTYPE_Q4_0><<<n, 256, 0, st>>>(out, d, rb, table->n_in, tokens); break;
    default:
        coopt_log_error("cuda embed: unsupported table type %s", coopt_dtype_name(table->dtype));
        COOPT_ASSERT(!"unsupported embedding type");
    }
    CUDA_CHECK_LAUNCH();
}

// ---- rmsnorm ----
//
// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w. One block (256 threads) per row; the sum of
// squares is reduced in f32 (warp shuffles, then one value per warp in shared memory).
// out may alias x: each thread reads its elements before the barrier and writes them after.
__global__ void rmsnorm_kernel(float *out, const float *x, const float *__restrict__ w, int32_t dim, float eps) {
    __shared__ float part[32];
    TRACE_CTA(TRACE_RMSNORM);
    const float     *xr = x + (size_t)blockIdx.x * (size_t)dim;
    float           *o  = out + (size_t)blockIdx.x * (size_t)dim;
    float            ss = 0.0f;
#pragma unroll 4
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
        v       = warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    float inv = 1.0f / sqrtf(part[0] / (float)dim + eps);
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = (xr[i] * inv) * w[i];
}

static void cuda_rmsnorm(struct coopt_backend *be, float *out, const float *x, const float *w, int32_t n_rows,
                         int32_t dim, float eps) {
    if (n_rows <= 0) return;
    // 1024 threads: a decode row (one block) is a chain of dim / blockDim dependent loads per
    // thread (256 threads at dim 4096: ~11 us on an H100, 1024: a few)
    rmsnorm_kernel<<<n_rows, 1024, 0, cuda_impl(be)->stream>>>(out, x, w, dim, eps);
    CUDA_CHECK_LAUNCH();
}

// ---- element-wise ----
//
// Grid-stride loops, 256 threads per block. silu uses expf (not __expf) to stay within an ulp
// or two of the CPU reference.
__global__ void silu_mul_kernel(float *out, const float *gate, const float *up, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i]  = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void add_kernel(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

static void cuda_silu_mul(struct coopt_backend *be, float *out, const float *gate, const float *up, int64_t n) {
    if (n <= 0) return;
    silu_mul_kernel<<<cuda_grid_1d(n, 256), 256, 0, cuda_impl(be)->stream>>>(out, gate, up, n);
    CUDA_CHECK_LAUNCH();
}

static void cuda_add(struct coopt_backend *be, float *out, const float *a, const float *b, int64_t n) {
    if (n <= 0) return;
    add_kernel<<<cuda_grid_1d(n, 256), 256, 0, cuda_impl(be)->stream>>>(out, a, b, n);
    CUDA_CHECK_LAUNCH();
}

// ---- get_rows ----
//
// out[j][:] = x[rows[j]][:]. Grid: (n) blocks of 256 threads, one row each. When out aliases x
// (in-place gather with ascending rows, rows[j] >= j) rows must be copied in order: then one
// block walks the rows with a barrier between them.
__global__ void get_rows_kernel(float *out, const float *x, const int32_t *__restrict__ rows, int32_t dim) {
    int32_t j = blockIdx.x;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x)
        out[(size_t)j * dim + i] = x[(size_t)rows[j] * dim + i];
}

__global__ void get_rows_inplace_kernel(float *x, const int32_t *__restrict__ rows, int32_t n, int32_t dim) {
    for (int32_t j = 0; j < n; j++) {
        float v[4];
        // read the whole row before anyone writes it (dim may exceed the block)
        for (int32_t c = 0; c < dim; c += 4 * blockDim.x) {
            for (int u = 0; u < 4; u++) {
                int32_t i = c + u * blockDim.x + threadIdx.x;
                v[u]      = i < dim ? x[(size_t)rows[j] * dim + i] : 0.0f;
            }
            __syncthreads();
            for (int u = 0; u < 4; u++) {
                int32_t i = c + u * blockDim.x + threadIdx.x;
                if (i < dim) x[(size_t)j * dim + i] = v[u];
            }
            __syncthreads();
        }
    }
}

static void cuda_get_rows(struct coopt_backend *be, float *out, const float *x, const int32_t *rows, int32_t n,
                          int32_t dim) {
    if (n <= 0) return;
    cudaStream_t st = cuda_impl(be)->stream;
    if (out == x) {
        get_rows_inplace_kernel<<<1, 256, 0, st>>>(out, rows, n, dim);
    } else {
        get_rows_kernel<<<n, 256, 0, st>>>(out, x, rows, dim);
    }
    CUDA_CHECK_LAUNCH();
}

// ---- argmax ----
//
// out[r] = index of the largest x[r][i] (lowest index on ties; NaN and -inf never; 0 when nothing
// else), as cpu_argmax. Grid: (n_rows) blocks of ARGMAX_THREADS threads, one row each: every
// thread keeps its best of a strided scan (ARGMAX_UNROLL independent loads in flight: a pass of
// 32768 logits is one L2 round trip, four for Llama 3's 128256), then a warp shuffle and one
// shared-memory round reduce (value, index) pairs. A decode step's logits were just written by
// the LM head and are read from L2, against the tens of microseconds of a host round trip this
// replaces. A programmatic dependent launch with cuda_backend.pdl (it waits for the LM head).
#define ARGMAX_THREADS 1024
#define ARGMAX_UNROLL  32

__device__ __forceinline__ void argmax_take(float v, int32_t i, float *bv, int32_t *bi) {
    if (v > *bv || (v == *bv && i < *bi)) *bv = v, *bi = i;
}

__global__ void __launch_bounds__(ARGMAX_THREADS) argmax_kernel(int32_t *out, int32_t *out_host, const float *__restrict__ x, int32_t n) {
    __shared__ float   sv[ARGMAX_THREADS / 32];
    __shared__ int32_t si[ARGMAX_THREADS / 32];
    TRACE_CTA(TRACE_ARGMAX);
    pdl_wait();
    const float *row = x + (size_t)blockIdx.x * (size_t)n;
    float        bv  = -INFINITY;
    int32_t      bi  = INT32_MAX; // no candidate yet
    for (int32_t c = 0; c < n; c += ARGMAX_THREADS * ARGMAX_UNROLL) {
        float v[ARGMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) {
            int32_t i = c + u * ARGMAX_THREADS + (int32_t)threadIdx.x;
            v[u]      = i < n ? row[i] : -INFINITY;
        }
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; u++) // ascending indices: a tie keeps the first
            if (v[u] > bv) bv = v[u], bi = c + u * ARGMAX_THREADS + (int32_t)threadIdx.x;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        argmax_take(__shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o), &bv, &bi);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        bv = sv[lane], bi = si[lane];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            argmax_take(__shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o), &bv, &bi);
        if (lane == 0) {
            out[blockIdx.x] = bi == INT32_MAX ? 0 : bi;
            if (out_host) out_host[blockIdx.x] = bi == INT32_MAX ? 0 : bi; // over the bus (mapped, UVA)
        }
    }
}

static void cuda_argmax(struct coopt_backend *be, int32_t *out, int32_t *out_host, const float *x, int32_t n_rows,
                        int32_t n) {
    if (n_rows <= 0) return;
    struct cuda_backend *cb = cuda_impl(be);
    CUDA_CHECK(cuda_launch_pdl(cb->pdl, argmax_kernel, dim3((unsigned)n_rows), dim3(ARGMAX_THREADS), 0, cb->stream, out,
                               out_host, x, n));
    CUDA_CHECK_LAUNCH();
}

// ---- sample (pick.h) ----
//
// The token coopt_sampler_sample draws (cpu_sample's), for sampled generation chained on the
// device and for batches drawn where the logits are. Grid: (PICK_SEG-logit segments of a row,
// rows), blocks of PICK_THREADS; the blocks of a row whose state has top_k 0 return at once. Each block turns
// its segment into 64-bit keys in shared memory -- the float's order key in the high half (-0 as
// +0; NaN and -inf as 0: never candidates), ~id in the low half, so the keys are distinct and
// their order is the sampler's candidate order (logit descending, id ascending) -- finds its k-th
// largest key by a radix select (pick_threshold) and writes its (up to) k keys to the segment's
// slots of the row's scratch. The last block to finish (a counter in the scratch, which that block resets)
// selects the k largest of all the segments' keys the same way, sorts them by rank, reads each
// one's logit back from x (bit for bit, -0 included), and one thread runs pick_sorted with the
// state's random stream, writes the state back and stores the token (and, over the bus, the token
// and the state into out_host). A decode step's logits were just written by the LM head and come
// from L2; 32 segments of llama3's 128256.
#define PICK_THREADS 512

__device__ __forceinline__ uint64_t pick_key(float v, int32_t i) {
    uint32_t b = __float_as_uint(v);
    if (v != v || v == -INFINITY) return 0;
    if (b == 0x80000000u) b = 0;
    const uint32_t u = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (uint64_t)u << 32 | (uint64_t)(~(uint32_t)i);
}

// The largest T such that exactly min(k, z) of the nonzero keys of keys[0, m) are >= T (z: how
// many are nonzero; T = 1 when z <= k). Radix select over 8-bit digits from the top: a histogram
// of the digit among the keys that share the digits fixed so far, then the bin holding the k-th;
// it stops as soon as that bin holds exactly the ones still needed (after the logit's 32 bits at
// the latest unless logits tie). Every thread of the block calls it and gets the same T. Two
// histograms and two broadcast slots in turn, so a digit costs two barriers: hist[0] must be
// zero on entry (the caller clears it before a barrier); it is left nonzero.
__device__ uint64_t pick_threshold(const uint64_t *keys, int32_t m, int32_t k, uint32_t (*hist)[256],
                                   uint64_t (*bcast)[2]) {
    uint64_t prefix = 0; // the digits above `shift` fixed so far
    uint32_t need   = (uint32_t)k;
    for (int shift = 56, b = 0; shift >= 0; shift -= 8, b ^= 1) {
        // every lane of a warp runs the same iterations; lanes with the same digit add once (the
        // first digits of a row's logits take a handful of values: one atomic each would serialize)
        for (int32_t i0 = 0; i0 < m; i0 += PICK_THREADS) {
            const int32_t  i   = i0 + (int32_t)threadIdx.x;
            const uint64_t key = i < m ? keys[i] : 0;
            const uint32_t d   = key != 0 && (shift == 56 || (key >> (shift + 8)) == prefix)
                                     ? (uint32_t)(key >> shift) & 255u : 256u;
            const uint32_t peers = __match_any_sync(0xffffffffu, d);
            if (d != 256u && (threadIdx.x & 31) == (uint32_t)(__ffs(peers) - 1))
                atomicAdd(&hist[b][d], (uint32_t)__popc(peers));
        }
        __syncthreads();
        if (threadIdx.x < 32) { // lane l holds bins 255 - 8l - j, j = 0..7: descending order
            const int lane = (int)threadIdx.x;
            uint32_t  h[8], s = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) s += h[j] = hist[b][255 - 8 * lane - j];
            uint32_t incl = s;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += t;
            }
            const uint32_t total = __shfl_sync(0xffffffffu, incl, 31), excl = incl - s;
            if (total < need) { // (first digit only) fewer nonzero keys than k: all of them
                if (lane == 0) bcast[b][0] = 0, bcast[b][1] = 1; // "done" with nothing left: T = 1
            } else if (excl < need && need <= incl) {
                uint32_t above = excl;
                int      j     = 0;
                while (above + h[j] < need) above += h[j++];
                const uint32_t left = need - above;
                bcast[b][0]         = prefix << 8 | (uint64_t)(255 - 8 * lane - j);
                bcast[b][1]         = (uint64_t)left << 1 | (h[j] == left ? 1u : 0u);
            }
        } else {
            for (int i = (int)threadIdx.x - 32; i < 256; i += PICK_THREADS - 32) hist[b ^ 1][i] = 0; // the next digit's
        }
        __syncthreads();
        const uint64_t p = bcast[b][0], f = bcast[b][1];
        prefix = p, need = (uint32_t)(f >> 1); // (at least 1 unless all are taken)
        if (f & 1) return need == 0 ? 1 : prefix << shift;
    }
    return prefix;
}

// The min(k, z) largest nonzero keys of keys[0, m) into dst (any order; z: the nonzero ones);
// returns how many, the same in every thread. Its first barrier also orders the caller's stores
// of keys before the reads; hist, bcast and *cnt are its scratch.
__device__ int32_t pick_select(const uint64_t *keys, int32_t m, int32_t k, uint64_t *dst, uint32_t (*hist)[256],
                               uint64_t (*bcast)[2], int32_t *cnt) {
    if (threadIdx.x < 256) hist[0][threadIdx.x] = 0;
    if (threadIdx.x == 0) *cnt = 0;
    __syncthreads();
    const uint64_t t = pick_threshold(keys, m, k, hist, bcast);
    for (int32_t i = (int32_t)threadIdx.x; i < m; i += PICK_THREADS)
        if (keys[i] != 0 && keys[i] >= t) dst[atomicAdd(cnt, 1)] = keys[i];
    __syncthreads();
    return *cnt;
}

__global__ void __launch_bounds__(PICK_THREADS)
    pick_kernel(int32_t *out, uint8_t *out_host, const float *__restrict__ x, int32_t n, struct pick_state *states,
                uint8_t *scratch) {
    __shared__ uint64_t keys[PICK_SEG];
    __shared__ uint64_t fin[PICK_MAX_K], bcast[2][2];
    __shared__ uint32_t hist[2][256];
    __shared__ float    sl[PICK_MAX_K], wp[PICK_MAX_K], wt[PICK_MAX_K];
    __shared__ int32_t  sid[PICK_MAX_K];
    __shared__ int32_t  cnt;
    __shared__ bool     last;
    const int32_t      row     = (int32_t)blockIdx.y;
    struct pick_state *ps      = states + row;
    uint8_t           *blk     = scratch + (size_t)row * pick_scratch_bytes(n);
    uint32_t          *counter = (uint32_t *)blk;
    uint64_t          *cands   = (uint64_t *)(blk + PICK_CANDS_OFF);
    if (ps->p.top_k <= 0) return; // (the row's every block)
    const int32_t k = min(ps->p.top_k, PICK_MAX_K);
    x += (size_t)row * (size_t)n, out += row;
    if (out_host) out_host += (size_t)row * PICK_RESULT_BYTES;
    const int32_t      tid = (int32_t)threadIdx.x, seg0 = (int32_t)blockIdx.x * PICK_SEG, m = min(PICK_SEG, n - seg0);

    for (int32_t i = tid; i < m; i += PICK_THREADS) keys[i] = pick_key(x[seg0 + i], seg0 + i);
    uint64_t     *mine = cands + (size_t)blockIdx.x * PICK_MAX_K;
    const int32_t nm   = pick_select(keys, m, k, mine, hist, bcast, &cnt);
    for (int32_t i = nm + tid; i < k; i += PICK_THREADS) mine[i] = 0; // fewer than k: empty slots
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;

    // the last block: the k largest of every segment's, sorted, then the draw
    __threadfence();
    const int32_t m2 = (int32_t)gridDim.x * k; // <= PICK_SEG (coopt_sampler_pick_state)
    for (int32_t i = tid; i < m2; i += PICK_THREADS) keys[i] = __ldcg(cands + (size_t)(i / k) * PICK_MAX_K + i % k);
    const int32_t nf = pick_select(keys, m2, k, fin, hist, bcast, &cnt);
    if (tid < nf) { // distinct keys: the rank is the position; the logit bit for bit from x
        int32_t r = 0;
        for (int32_t j = 0; j < nf; j++) r += fin[j] > fin[tid];
        sid[r] = (int32_t)~(uint32_t)fin[tid];
        sl[r]  = x[sid[r]];
    }
    __syncthreads();
    struct pick_params pp = ps->p;
    if (tid < nf) pick_weights(sl, tid, &pp, wp, wt);
    __syncthreads();
    if (tid == 0) {
        uint64_t      rng[4] = {ps->rng[0], ps->rng[1], ps->rng[2], ps->rng[3]};
        const int32_t tok    = nf > 0 ? pick_sorted_w(sl, sid, wp, wt, nf, &pp, rng) : 0;
        for (int j = 0; j < 4; j++) ps->rng[j] = rng[j];
        out[0] = tok;
        if (out_host) { // over the bus (mapped, UVA)
            *(int32_t *)out_host = tok;
            for (int j = 0; j < 4; j++) ((uint64_t *)(out_host + 8))[j] = rng[j];
        }
        *counter = 0;
    }
}

static void cuda_sample(struct coopt_backend *be, int32_t *out, void *out_host, const float *x, int32_t n_rows,
                        int32_t n, struct pick_state *ps, uint8_t *scratch) {
    if (n <= 0 || n_rows <= 0) return;
    dim3 grid((unsigned)((n + PICK_SEG - 1) / PICK_SEG), (unsigned)n_rows);
    pick_kernel<<<grid, PICK_THREADS, 0, cuda_impl(be)->stream>>>(out, (uint8_t *)out_host, x, n, ps, scratch);
    CUDA_CHECK_LAUNCH();
}

// ---- model upload ----
//
// The device model is a struct coopt_model whose weight pointers are device copies; it lives
// in a struct cuda_model that also lists every device allocation for model_release. The host
// model keeps ownership of its files, tokenizer and allocations: the copy owns none of them.

struct cuda_model {
    struct coopt_model m; // first: model_release casts back
    void             **ptrs;
    int                n_ptrs, cap_ptrs;
    size_t             bytes;
    // GPTQ weights: the device form each Q4_GPTQ weight's `gptq` points to (gptq_dev.h)
    struct cuda_gptq_weight *gq;
    int                      n_gq, cap_gq;
};

static enum coopt_status model_copy(struct coopt_backend *be, struct cuda_model *cm, const void *src, size_t n,
                                    const void **dst) {
    *dst = NULL;
    if (!src || !n) return COOPT_OK;
    if (cm->n_ptrs == cm->cap_ptrs) {
        int    cap = cm->cap_ptrs ? cm->cap_ptrs * 2 : 64;
        void **p   = (void **)coopt_realloc(cm->ptrs, (size_t)cap * sizeof(void *));
        if (!p) return COOPT_ERR_NOMEM;
        cm->ptrs     = p;
        cm->cap_ptrs = cap;
    }
    void             *d  = NULL;
    enum coopt_status st = cuda_alloc(be, n, &d);
    if (st != COOPT_OK) return st;
    cm->ptrs[cm->n_ptrs++] = d;
    // Synchronous copy straight from the mmap (pageable): the driver stages it; the source may
    // fault in from disk here, which is the streaming we want (one tensor resident at a time).
    CUDA_TRY(cudaMemcpy(d, src, n, cudaMemcpyHostToDevice), COOPT_ERR_NOMEM);
    cm->bytes += n;
    *dst = d;
    return COOPT_OK;
}

static size_t weight_bytes(const struct coopt_weight *w) {
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ)
        return w->gptq ? cuda_gptq_dev_bytes((const struct coopt_gptq_weight *)w->gptq) : 0;
    return w->data ? coopt_dtype_row_bytes(w->dtype, w->n_in) * (size_t)w->n_out : 0;
}

static enum coopt_status weight_check(const struct coopt_weight *w, const char *name, int layer) {
    switch (w->dtype) {
    case COOPT_DTYPE_F32:
    case COOPT_DTYPE_F16:
    case COOPT_DTYPE_BF16:
    case COOPT_DTYPE_Q8_0:
    case COOPT_DTYPE_Q4_0: return COOPT_OK;
    case COOPT_DTYPE_Q4_GPTQ:
        if (w->gptq) return COOPT_OK;
        return coopt_fail(COOPT_ERR_FORMAT, "cuda: GPTQ weight %s (layer %d) has no repacked data", name, layer);
    default:
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "cuda: weight %s (layer %d) has type %s, not supported on the GPU yet",
                          name, layer, coopt_dtype_name(w->dtype));
    }
}

static enum coopt_status weight_upload(struct coopt_backend *be, struct cuda_model *cm, struct coopt_weight *w) {
    enum coopt_status st;
    const void       *d = NULL, *bias = NULL;
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) { // repacked for the kernels (gptq.cu)
        COOPT_ASSERT(cm->n_gq < cm->cap_gq);
        struct cuda_gptq_weight *g = &cm->gq[cm->n_gq];
        if ((st = cuda_gptq_upload(be, (const struct coopt_gptq_weight *)w->gptq, g))) return st;
        cm->n_gq++;
        cm->bytes += g->bytes;
        if ((st = model_copy(be, cm, w->bias, (size_t)w->n_out * sizeof(float), &bias))) return st;
        w->data = g->qw;
        w->gptq = g;
        w->bias = (const float *)bias;
        return COOPT_OK;
    }
    if ((st = model_copy(be, cm, w->data, weight_bytes(w), &d))) return st;
    if ((st = model_copy(be, cm, w->bias, (size_t)w->n_out * sizeof(float), &bias))) return st;
    w->data = d;
    w->bias = (const float *)bias;
    w->gptq = NULL;
    return COOPT_OK;
}

static void cuda_model_release(struct coopt_backend *be, struct coopt_model *dev) {
    if (!dev) return;
    struct cuda_model *cm = (struct cuda_model *)dev;
    for (int i = 0; i < cm->n_ptrs; i++) cudaFree(cm->ptrs[i]);
    for (int i = 0; i < cm->n_gq; i++) cuda_gptq_release(&cm->gq[i]);
    free(cm->gq);
    free(cm->ptrs);
    free(cm->m.layers);
    free(cm);
}

static enum coopt_status cuda_model_upload(struct coopt_backend *be, const struct coopt_model *host,
                                           struct coopt_model **out) {
    *out                                = NULL;
    const struct coopt_model_config *c  = &host->config;
    static const char               *nm[] = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"};
    enum coopt_status                st   = COOPT_OK;
    size_t                           total = weight_bytes(&host->tok_embd);
    int                              n_gq  = 0;
    // (the model loader takes head dims up to 512; rope_store and attention kernels go to 256)
    if (c->head_dim > 256)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "cuda: head dim %d is not supported (at most 256); use --device cpu",
                          c->head_dim);
    if ((st = weight_check(&host->tok_embd, "token_embd", -1))) return st;
    if (!host->config.tied_embeddings && (st = weight_check(&host->output, "output", -1))) return st;
    if (!host->config.tied_embeddings) total += weight_bytes(&host->output);
    n_gq += host->tok_embd.dtype == COOPT_DTYPE_Q4_GPTQ;
    n_gq += !host->config.tied_embeddings && host->output.dtype == COOPT_DTYPE_Q4_GPTQ;
    for (int32_t l = 0; l < c->n_layers; l++) {
        const struct coopt_layer *L    = &host->layers[l];
        const struct coopt_weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (int i = 0; i < 7; i++) {
            if ((st = weight_check(ws[i], nm[i], l))) return st;
            total += weight_bytes(ws[i]);
            n_gq += ws[i]->dtype == COOPT_DTYPE_Q4_GPTQ;
        }
    }
    size_t free_b = 0, total_b = 0;
    CUDA_TRY(cudaMemGetInfo(&free_b, &total_b), COOPT_ERR_NOMEM);
    if (total > free_b)
        return coopt_fail(COOPT_ERR_NOMEM, "model needs %.2f GiB of GPU memory for weights, %.2f GiB free", total / 1073741824.0,
                          free_b / 1073741824.0);

    struct cuda_model *cm = (struct cuda_model *)coopt_calloc(1, sizeof(*cm));
    if (!cm) return COOPT_ERR_NOMEM;
    cm->m = *host;
    // the copy owns none of the host's resources
    memset(cm->m.files, 0, sizeof(cm->m.files));
    cm->m.n_files   = 0;
    cm->m.allocs    = NULL;
    cm->m.n_allocs  = cm->m.cap_allocs = 0;
    cm->m.gptq      = NULL;
    cm->m.n_gptq    = cm->m.cap_gptq = 0;
    cm->m.layers    = (struct coopt_layer *)coopt_calloc((size_t)(c->n_layers > 0 ? c->n_layers : 1), sizeof(struct coopt_layer));
    cm->gq          = n_gq ? (struct cuda_gptq_weight *)coopt_calloc((size_t)n_gq, sizeof(*cm->gq)) : NULL;
    cm->cap_gq      = n_gq;
    if (!cm->m.layers || (n_gq && !cm->gq)) {
        free(cm->m.layers);
        free(cm->gq);
        free(cm);
        return COOPT_ERR_NOMEM;
    }
    int64_t     t0  = coopt_time_us();
    bool        tty = isatty(2);
    const void *d   = NULL;
    coopt_log_info("cuda: uploading %.2f GiB of weights to the GPU", total / 1073741824.0);
    if ((st = weight_upload(be, cm, &cm->m.tok_embd))) goto fail;
    if (host->config.tied_embeddings || host->output.data == host->tok_embd.data) {
        cm->m.output.data = cm->m.tok_embd.data;
        if (host->output.bias && (st = model_copy(be, cm, host->output.bias, (size_t)host->output.n_out * 4, &d))) goto fail;
        cm->m.output.bias = (const float *)d;
    } else if ((st = weight_upload(be, cm, &cm->m.output))) {
        goto fail;
    }
    if ((st = model_copy(be, cm, host->out_norm, (size_t)c->dim * sizeof(float), &d))) goto fail;
    cm->m.out_norm = (const float *)d;
    for (int32_t l = 0; l < c->n_layers; l++) {
        struct coopt_layer *L = &cm->m.layers[l];
        *L                    = host->layers[l];
        struct coopt_weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (int i = 0; i < 7; i++)
            if ((st = weight_upload(be, cm, ws[i]))) goto fail;
        if ((st = model_copy(be, cm, host->layers[l].attn_norm, (size_t)c->dim * sizeof(float), &d))) goto fail;
        L->attn_norm = (const float *)d;
        if ((st = model_copy(be, cm, host->layers[l].ffn_norm, (size_t)c->dim * sizeof(float), &d))) goto fail;
        L->ffn_norm = (const float *)d;
        if (tty)
            fprintf(stderr, "\rcoopt: cuda: layer %d/%d uploaded (%.2f GiB)", l + 1, c->n_layers,
                    cm->bytes / 1073741824.0);
    }
    if (tty && c->n_layers > 0) fprintf(stderr, "\n");
    {
        double s = (double)(coopt_time_us() - t0) / 1e6;
        coopt_log_info("cuda: %.2f GiB uploaded in %.2f s (%.2f GB/s)", cm->bytes / 1073741824.0, s,
                       s > 0 ? cm->bytes / s / 1e9 : 0.0);
    }
    *out = &cm->m;
    return COOPT_OK;
fail:
    if (tty) fprintf(stderr, "\n");
    cuda_model_release(be, &cm->m);
    return st;
}

// ---- backend lifecycle ----

static enum coopt_status cuda_take_error(struct coopt_backend *be) {
    struct cuda_backend *cb = cuda_impl(be);
    enum coopt_status    st = cb->op_error;
    cb->op_error            = COOPT_OK;
    return st;
}

extern "C" void cuda_set_workspace_limit(struct coopt_backend *be, size_t n_bytes) {
    cuda_impl(be)->work_limit = n_bytes;
}

static void cuda_destroy(struct coopt_backend *be) {
    if (!be) return;
    struct cuda_backend *cb = cuda_impl(be);
    if (cb) {
        if (cb->stream) cudaStreamSynchronize(cb->stream);
        cuda_step_free(cb);
        cuda_kv_pools_free_all(cb);
        if (cb->work) cudaFree(cb->work);
        if (cb->work2) cudaFree(cb->work2);
        if (cb->xst) cudaFree(cb->xst);
        if (cb->flags) cudaFree(cb->flags);
        if (cb->cublas_work) cudaFree(cb->cublas_work);
        if (cb->cublas) cublasDestroy(cb->cublas);
        for (int i = 0; i < CUDA_FENCES; i++)
            if (cb->fence_ev[i]) cudaEventDestroy(cb->fence_ev[i]);
        if (cb->stream) cudaStreamDestroy(cb->stream);
        free(cb);
    }
    free(be);
}

static const struct coopt_ops cuda_ops = {
    .name            = "cuda",
    .alloc           = cuda_alloc,
    .free            = cuda_free,
    .upload          = cuda_upload,
    .download        = cuda_download,
    .sync            = cuda_sync,
    .embed           = cuda_embed,
    .rmsnorm         = cuda_rmsnorm,
    .matmul          = cuda_matmul,
    .rope            = cuda_rope,
    .rope_store      = cuda_rope_store,
    .attention       = cuda_attention,
    .silu_mul        = cuda_silu_mul,
    .add             = cuda_add,
    .get_rows        = cuda_get_rows,
    .argmax          = cuda_argmax,
    .sample          = cuda_sample,
    .matmul_multi    = cuda_matmul_multi,
    .matmul_swiglu   = cuda_matmul_swiglu,
    .matmul_add      = cuda_matmul_add,
    .norm_matmul_multi  = cuda_norm_matmul_multi,
    .norm_matmul_swiglu = cuda_norm_matmul_swiglu,
    .matmul_add_then_norm        = cuda_matmul_add_then_norm,
    .norm_matmul_swiglu_then_add = cuda_norm_matmul_swiglu_then_add,
    .rope_store_attention = cuda_rope_store_attention,
    .rope_store_attention_then_matmul = cuda_rope_store_attention_then_matmul,
    .kv_pool_init    = cuda_kv_pool_init,
    .kv_pool_free    = cuda_kv_pool_free,
    .kv_pool_release = cuda_kv_pool_release,
    .kv_page_copy    = cuda_kv_page_copy,
    .kv_pool_commit  = cuda_kv_pool_commit,
    .step_begin      = cuda_step_begin,
    .step_end        = cuda_step_end,
    .host_alloc      = cuda_host_alloc,
    .host_free       = cuda_host_free,
    .fence           = cuda_fence,
    .fence_wait      = cuda_fence_wait,
    .model_upload    = cuda_model_upload,
    .model_release   = cuda_model_release,
    .take_error      = cuda_take_error,
    .destroy         = cuda_destroy,
};

extern "C" int coopt_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" int coopt_cuda_mem_info(size_t *free_bytes, size_t *total_bytes) {
    if (cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        *free_bytes = *total_bytes = 0;
        return -1;
    }
    return 0;
}

extern "C" enum coopt_status coopt_cuda_backend_init(int32_t n_threads, struct coopt_backend **out) {
    *out  = NULL;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        (void)cudaGetLastError();
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "device 'cuda': no CUDA device available (%s)",
                          e != cudaSuccess ? cudaGetErrorName(e) : "0 devices");
    }
    struct coopt_backend *be = (struct coopt_backend *)coopt_calloc(1, sizeof(*be));
    struct cuda_backend  *cb = (struct cuda_backend *)coopt_calloc(1, sizeof(*cb));
    if (!be || !cb) {
        free(be);
        free(cb);
        return COOPT_ERR_NOMEM;
    }
    be->ops       = &cuda_ops; // cuda_step_init points it at cb->ops
    be->n_threads = n_threads;
    be->attn_partition = 512; // the context overrides it from its parameters
    be->impl      = cb;
    cb->device    = 0;
    enum coopt_status st = COOPT_ERR_NOMEM;
    cudaDeviceProp    prop;
    if ((e = cudaSetDevice(0)) != cudaSuccess || (e = cudaGetDeviceProperties(&prop, 0)) != cudaSuccess ||
        (e = cudaFree(0)) != cudaSuccess) { // cudaFree(0) creates the primary context (driver API needs it)
        st = coopt_fail(COOPT_ERR_UNSUPPORTED, "device 'cuda': cannot initialize device 0 (%s)", cudaGetErrorName(e));
        goto fail;
    }
    cb->n_sm = prop.multiProcessorCount;
    cb->attn_tc_occ = 0.5f; // (paged_attn.cu: the split-K partition size)
    if (!driver_load(cb)) {
        st = COOPT_ERR_UNSUPPORTED;
        goto fail;
    }
    if (prop.major < 8) {
        st = coopt_fail(COOPT_ERR_UNSUPPORTED, "device 'cuda': %s has compute capability %d.%d, need 8.0 or newer",
                        prop.name, prop.major, prop.minor);
        goto fail;
    }
    if ((e = cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking)) != cudaSuccess) {
        st = coopt_fail(COOPT_ERR_NOMEM, "device 'cuda': cannot create a stream (%s)", cudaGetErrorName(e));
        goto fail;
    }
    for (int i = 0; i < CUDA_FENCES; i++)
        if ((e = cudaEventCreateWithFlags(&cb->fence_ev[i], cudaEventDisableTiming)) != cudaSuccess) {
            cb->fence_ev[i] = NULL;
            st = coopt_fail(COOPT_ERR_NOMEM, "device 'cuda': cannot create an event (%s)", cudaGetErrorName(e));
            goto fail;
        }
    if (cublasCreate(&cb->cublas) != CUBLAS_STATUS_SUCCESS) {
        cb->cublas = NULL;
        st         = coopt_fail(COOPT_ERR_NOMEM, "device 'cuda': cannot create the cuBLAS handle");
        goto fail;
    }
    // Default math: no TF32 for f32 GEMMs (the CPU reference is f32/double).
    CUBLAS_CHECK(cublasSetStream(cb->cublas, cb->stream));
    CUBLAS_CHECK(cublasSetMathMode(cb->cublas, CUBLAS_DEFAULT_MATH));
    // A fixed workspace (32 MiB, NVIDIA's advice for Hopper) so GEMMs recorded into a CUDA graph
    // never allocate; cuBLAS then also keeps its algorithm choice stable between eager and replay.
    if ((e = cudaMalloc(&cb->cublas_work, (size_t)32 << 20)) != cudaSuccess) {
        cb->cublas_work = NULL;
        st = coopt_fail(COOPT_ERR_NOMEM, "device 'cuda': cannot allocate the cuBLAS workspace (%s)", cudaGetErrorName(e));
        goto fail;
    }
    CUBLAS_CHECK(cublasSetWorkspace(cb->cublas, cb->cublas_work, (size_t)32 << 20));
    if ((st = cuda_step_init(be, &cuda_ops)) != COOPT_OK) goto fail;
    coopt_log_info("cuda: %s, %d SMs, %.1f GiB", prop.name, prop.multiProcessorCount,
                   prop.totalGlobalMem / 1073741824.0);
    *out = be;
    return COOPT_OK;
fail:
    cuda_destroy(be);
    return st;
}
