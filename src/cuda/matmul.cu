/*
 * matmul.cu -- out[r][o] = sum_i x[r][i] * W[o][i] (+ bias[o]) for W in F32, F16, BF16, Q8_0, Q4_0
 * (GGML block layout, used in place), x and out f32 row-major.
 *
 * Two paths:
 *   - gemv_kernel (every type; all of Q8_0/Q4_0): a warp per output feature. The warp streams its
 *     weight row once per group of NR activation rows (NR in 1, 2, 4, 8), keeping NR f32
 *     accumulators per lane, then reduces them with shuffles. F32/F16/BF16 rows are read with
 *     16-byte loads when the row length allows it (n_in % (16 / elem) == 0, so every row starts
 *     16-byte aligned); Q8_0/Q4_0 blocks (34 / 18 bytes, only 2-byte aligned) are read a block
 *     per lane with 2-byte loads, consecutive lanes on consecutive blocks, so a warp covers a
 *     contiguous 1 KiB span; when rows are a multiple of 16 bytes long (n_in % 256 == 0, every
 *     real model) the warp first copies its 32 blocks into shared memory with 16-byte loads.
 *     Decode (n_rows <= 2) takes this path.
 *   - cuBLAS (F16/BF16 for n_rows > 2, F32 for n_rows > 8): F32 through cublasSgemm (no TF32);
 *     F16/BF16 convert x into the weight's type in the backend workspace, then cublasGemmEx with
 *     f32 accumulation and f32 output. The rounding of x to 16 bits is the only extra error
 *     (2^-11 relative for F16, 2^-8 for BF16, per element).
 *   Quantized prefill loops the GEMV over row groups: correct, not yet fast (TODO(cuda): a
 *   tensor-core GEMM or dequantize-to-F16 + cuBLAS for large n_rows).
 *
 * Measured on an H100 (W [32768][4096], 1 row): F16/BF16 2.86 TB/s, F32 2.94 TB/s of weights;
 * Q8_0 0.86 TB/s, Q4_0 0.49 TB/s, with or without the shared-memory staging. The quantized
 * kernels are bound by re-reading x from L1 (128 bytes of f32 x per 34/18-byte block: x traffic
 * is 4x/8x the weights'); TODO(cuda): stage x in shared memory per block or quantize it to int8
 * (dp4a), and give each lane several blocks in flight.
 *
 * Grid: (ceil(n_out / 4)); Block: 128 threads = 4 warps, warp w computes output feature
 * blockIdx.x * 4 + w for every row of x.
 */
#include "cuda/common.cuh"
#include "cuda/gptq_dev.h"

#define GEMV_WARPS 4

// Adds the 8 products of 8 f32 weights with x[r][e .. e+8) into acc.
__device__ __forceinline__ float dot8(const float *w8, const float *__restrict__ xr) {
    float4 a = *(const float4 *)xr, b = *(const float4 *)(xr + 4);
    return w8[0] * a.x + w8[1] * a.y + w8[2] * a.z + w8[3] * a.w + w8[4] * b.x + w8[5] * b.y + w8[6] * b.z +
           w8[7] * b.w;
}

template <int T, int NR, bool VEC>
__global__ void __launch_bounds__(GEMV_WARPS * WARP_SIZE)
    gemv_kernel(float *__restrict__ out, const float *__restrict__ x, const uint8_t *__restrict__ W, size_t row_bytes,
                const float *__restrict__ bias, int64_t n_in, int64_t n_out, int32_t n_rows) {
    // staging for the quantized 16-byte path: 32 Q8_0 blocks per warp
    __shared__ __align__(16) uint8_t stage[(T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0) && VEC ? GEMV_WARPS : 1]
                                          [(T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0) && VEC ? 32 * 34 : 16];
    const int     lane = threadIdx.x & 31;
    const int64_t o    = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= n_out) return;
    const uint8_t *wr = W + (size_t)o * row_bytes;
    for (int32_t r0 = 0; r0 < n_rows; r0 += NR) {
        const float *xr[NR];
#pragma unroll
        for (int j = 0; j < NR; j++) xr[j] = x + (size_t)min(r0 + j, n_rows - 1) * (size_t)n_in;
        float acc[NR];
#pragma unroll
        for (int j = 0; j < NR; j++) acc[j] = 0.0f;

        if constexpr (VEC && (T == COOPT_DTYPE_Q8_0 || T == COOPT_DTYPE_Q4_0)) {
            // Rows of 16-byte multiple length: the warp copies 32 blocks (1088 / 576 bytes, a
            // multiple of 16) into shared memory with 16-byte loads, then lane i reads block i.
            constexpr int BS = T == COOPT_DTYPE_Q8_0 ? 34 : 18;
            uint8_t      *sb = stage[threadIdx.x >> 5];
            const int64_t nb = n_in / COOPT_QK;
            for (int64_t b0 = 0; b0 < nb; b0 += WARP_SIZE) {
                const int      nblk = (int)min((int64_t)WARP_SIZE, nb - b0); // a multiple of 8
                const uint8_t *src  = wr + b0 * BS;
                __syncwarp();
                for (int off = lane * 16; off < nblk * BS; off += WARP_SIZE * 16)
                    *(uint4 *)(sb + off) = *(const uint4 *)(src + off);
                __syncwarp();
                if (lane < nblk) {
                    const uint16_t *b = (const uint16_t *)(sb + lane * BS);
                    float           d = f16_bits_to_f32(b[0]);
                    float           w[COOPT_QK];
                    if constexpr (T == COOPT_DTYPE_Q8_0) {
#pragma unroll
                        for (int k = 0; k < 16; k++) {
                            uint16_t u   = b[1 + k];
                            w[2 * k]     = (float)(int8_t)(u & 0xff);
                            w[2 * k + 1] = (float)(int8_t)(u >> 8);
                        }
                    } else {
#pragma unroll
                        for (int k = 0; k < 8; k++) {
                            uint16_t u        = b[1 + k];
                            w[2 * k]          = (float)((int)(u & 0x0f) - 8);
                            w[2 * k + 16]     = (float)((int)((u >> 4) & 0x0f) - 8);
                            w[2 * k + 1]      = (float)((int)((u >> 8) & 0x0f) - 8);
                            w[2 * k + 1 + 16] = (float)((int)(u >> 12) - 8);
                        }
                    }
#pragma unroll
                    for (int j = 0; j < NR; j++) {
                        const float *xs = xr[j] + (b0 + lane) * COOPT_QK;
                        float        s  = 0.0f;
#pragma unroll
                        for (int k = 0; k < 4; k++) s += dot8(w + 8 * k, xs + 8 * k);
                        acc[j] += d * s;
                    }
                }
            }
        } else if constexpr (T == COOPT_DTYPE_Q8_0) {
            const int64_t nb = n_in / COOPT_QK;
            for (int64_t blk = lane; blk < nb; blk += WARP_SIZE) {
                const uint16_t *b = (const uint16_t *)(wr + blk * 34);
                float           d = f16_bits_to_f32(b[0]);
                float           w[COOPT_QK];
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    uint16_t u   = b[1 + k];
                    w[2 * k]     = (float)(int8_t)(u & 0xff);
                    w[2 * k + 1] = (float)(int8_t)(u >> 8);
                }
#pragma unroll
                for (int j = 0; j < NR; j++) {
                    const float *xs = xr[j] + blk * COOPT_QK;
                    float        s  = 0.0f;
#pragma unroll
                    for (int k = 0; k < 4; k++) s += dot8(w + 8 * k, xs + 8 * k);
                    acc[j] += d * s;
                }
            }
        } else if constexpr (T == COOPT_DTYPE_Q4_0) {
            const int64_t nb = n_in / COOPT_QK;
            for (int64_t blk = lane; blk < nb; blk += WARP_SIZE) {
                const uint16_t *b = (const uint16_t *)(wr + blk * 18);
                float           d = f16_bits_to_f32(b[0]);
                float           w[COOPT_QK];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    uint16_t u        = b[1 + k];
                    w[2 * k]          = (float)((int)(u & 0x0f) - 8);
                    w[2 * k + 16]     = (float)((int)((u >> 4) & 0x0f) - 8);
                    w[2 * k + 1]      = (float)((int)((u >> 8) & 0x0f) - 8);
                    w[2 * k + 1 + 16] = (float)((int)(u >> 12) - 8);
                }
#pragma unroll
                for (int j = 0; j < NR; j++) {
                    const float *xs = xr[j] + blk * COOPT_QK;
                    float        s  = 0.0f;
#pragma unroll
                    for (int k = 0; k < 4; k++) s += dot8(w + 8 * k, xs + 8 * k);
                    acc[j] += d * s;
                }
            }
        } else if constexpr (VEC && T == COOPT_DTYPE_F32) {
            for (int64_t e = (int64_t)lane * 4; e < n_in; e += WARP_SIZE * 4) {
                float4 w = *(const float4 *)(wr + e * 4);
#pragma unroll
                for (int j = 0; j < NR; j++) {
                    float4 a = *(const float4 *)(xr[j] + e);
                    acc[j] += w.x * a.x + w.y * a.y + w.z * a.z + w.w * a.w;
                }
            }
        } else if constexpr (VEC) { // F16 / BF16: 8 elements per 16-byte load
            for (int64_t e = (int64_t)lane * 8; e < n_in; e += WARP_SIZE * 8) {
                uint4    u = *(const uint4 *)(wr + e * 2);
                uint32_t p[4] = {u.x, u.y, u.z, u.w};
                float    w[8];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    if constexpr (T == COOPT_DTYPE_F16) {
                        w[2 * k]     = f16_bits_to_f32((uint16_t)(p[k] & 0xffff));
                        w[2 * k + 1] = f16_bits_to_f32((uint16_t)(p[k] >> 16));
                    } else {
                        w[2 * k]     = __uint_as_float(p[k] << 16);
                        w[2 * k + 1] = __uint_as_float(p[k] & 0xffff0000u);
                    }
                }
#pragma unroll
                for (int j = 0; j < NR; j++) acc[j] += dot8(w, xr[j] + e);
            }
        } else { // any row length: one element per lane per step
            for (int64_t i = lane; i < n_in; i += WARP_SIZE) {
                float w = load_elem<T>(wr, i);
#pragma unroll
                for (int j = 0; j < NR; j++) acc[j] += w * xr[j][i];
            }
        }

#pragma unroll
        for (int j = 0; j < NR; j++) {
            float s = warp_sum(acc[j]);
            if (lane == 0 && r0 + j < n_rows) out[(size_t)(r0 + j) * (size_t)n_out + o] = s + (bias ? bias[o] : 0.0f);
        }
    }
}

template <int T, bool VEC>
static void gemv_launch(cudaStream_t st, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows) {
    size_t   rb   = coopt_dtype_row_bytes(w->dtype, w->n_in);
    unsigned grid = (unsigned)((w->n_out + GEMV_WARPS - 1) / GEMV_WARPS);
    auto    *W    = (const uint8_t *)w->data;
    if (n_rows == 1)
        gemv_kernel<T, 1, VEC><<<grid, GEMV_WARPS * 32, 0, st>>>(out, x, W, rb, w->bias, w->n_in, w->n_out, n_rows);
    else if (n_rows == 2)
        gemv_kernel<T, 2, VEC><<<grid, GEMV_WARPS * 32, 0, st>>>(out, x, W, rb, w->bias, w->n_in, w->n_out, n_rows);
    else if (n_rows <= 4)
        gemv_kernel<T, 4, VEC><<<grid, GEMV_WARPS * 32, 0, st>>>(out, x, W, rb, w->bias, w->n_in, w->n_out, n_rows);
    else
        gemv_kernel<T, 8, VEC><<<grid, GEMV_WARPS * 32, 0, st>>>(out, x, W, rb, w->bias, w->n_in, w->n_out, n_rows);
    CUDA_CHECK_LAUNCH();
}

// ---- cuBLAS path ----

// x (f32) -> 16-bit copy of type T in the workspace. Grid-stride, 256 threads.
template <int T> __global__ void convert_x_kernel(uint16_t *__restrict__ dst, const float *__restrict__ src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        if constexpr (T == COOPT_DTYPE_F16)
            dst[i] = __half_as_ushort(__float2half_rn(src[i]));
        else
            dst[i] = __bfloat16_as_ushort(__float2bfloat16_rn(src[i]));
    }
}

// out[r][o] += bias[o]. Grid-stride over n_rows * n_out.
__global__ void add_bias_kernel(float *out, const float *__restrict__ bias, int64_t n_out, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] += bias[i % n_out];
}

static void gemm_cublas(struct cuda_backend *cb, float *out, const float *x, const struct coopt_weight *w,
                        int32_t n_rows) {
    const float one = 1.0f, zero = 0.0f;
    int         m = (int)w->n_out, n = n_rows, k = (int)w->n_in;
    // Column-major view: out^T [n_out x n_rows] = W [n_out x n_in] (row-major = col-major W^T,
    // hence OP_T) * x^T [n_in x n_rows] (row-major x = col-major x^T, OP_N).
    if (w->dtype == COOPT_DTYPE_F32) {
        CUBLAS_CHECK(cublasSgemm(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, (const float *)w->data, k, x, k,
                                 &zero, out, m));
    } else {
        int64_t   nx = (int64_t)n_rows * w->n_in;
        uint16_t *xh = (uint16_t *)cuda_workspace(cb, (size_t)nx * sizeof(uint16_t));
        if (w->dtype == COOPT_DTYPE_F16)
            convert_x_kernel<COOPT_DTYPE_F16><<<cuda_grid_1d(nx, 256), 256, 0, cb->stream>>>(xh, x, nx);
        else
            convert_x_kernel<COOPT_DTYPE_BF16><<<cuda_grid_1d(nx, 256), 256, 0, cb->stream>>>(xh, x, nx);
        CUDA_CHECK_LAUNCH();
        cudaDataType t = w->dtype == COOPT_DTYPE_F16 ? CUDA_R_16F : CUDA_R_16BF;
        CUBLAS_CHECK(cublasGemmEx(cb->cublas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &one, w->data, t, k, xh, t, k, &zero,
                                  out, CUDA_R_32F, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (w->bias) {
        int64_t nt = (int64_t)n_rows * w->n_out;
        add_bias_kernel<<<cuda_grid_1d(nt, 256), 256, 0, cb->stream>>>(out, w->bias, w->n_out, nt);
        CUDA_CHECK_LAUNCH();
    }
}

// Rows above which F16/BF16 and F32 go through cuBLAS instead of the GEMV (measured on an H100,
// W [32768][4096]: the GEMV streams F16 at ~2.9 TB/s for 1-2 rows but falls to ~0.9 TB/s at 8,
// where cuBLAS is close to weight bandwidth; the f32 GEMV stays ahead of Sgemm up to 8 rows).
#define GEMM_MIN_ROWS_16 2
#define GEMM_MIN_ROWS_32 8

void cuda_matmul(struct coopt_backend *be, float *out, const float *x, const struct coopt_weight *w, int32_t n_rows) {
    if (n_rows <= 0 || w->n_out <= 0) return;
    if (w->dtype == COOPT_DTYPE_Q4_GPTQ) { // gptq.cu; w->gptq is the device form (gptq_dev.h)
        cuda_gptq_matmul(be, out, x, (const struct cuda_gptq_weight *)w->gptq, w->bias, n_rows);
        return;
    }
    struct cuda_backend *cb = cuda_impl(be);
    cudaStream_t         st = cb->stream;
    bool half  = w->dtype == COOPT_DTYPE_F16 || w->dtype == COOPT_DTYPE_BF16;
    bool dense = half || w->dtype == COOPT_DTYPE_F32;
    if (dense && n_rows > (half ? GEMM_MIN_ROWS_16 : GEMM_MIN_ROWS_32) && w->n_in <= INT32_MAX && w->n_out <= INT32_MAX) {
        gemm_cublas(cb, out, x, w, n_rows);
        return;
    }
    switch (w->dtype) {
    case COOPT_DTYPE_F32:
        if (w->n_in % 4 == 0) gemv_launch<COOPT_DTYPE_F32, true>(st, out, x, w, n_rows);
        else gemv_launch<COOPT_DTYPE_F32, false>(st, out, x, w, n_rows);
        break;
    case COOPT_DTYPE_F16:
        if (w->n_in % 8 == 0) gemv_launch<COOPT_DTYPE_F16, true>(st, out, x, w, n_rows);
        else gemv_launch<COOPT_DTYPE_F16, false>(st, out, x, w, n_rows);
        break;
    case COOPT_DTYPE_BF16:
        if (w->n_in % 8 == 0) gemv_launch<COOPT_DTYPE_BF16, true>(st, out, x, w, n_rows);
        else gemv_launch<COOPT_DTYPE_BF16, false>(st, out, x, w, n_rows);
        break;
    case COOPT_DTYPE_Q8_0:
        COOPT_ASSERT(w->n_in % COOPT_QK == 0);
        if (w->n_in % 256 == 0) gemv_launch<COOPT_DTYPE_Q8_0, true>(st, out, x, w, n_rows); // rows of 16n bytes
        else gemv_launch<COOPT_DTYPE_Q8_0, false>(st, out, x, w, n_rows);
        break;
    case COOPT_DTYPE_Q4_0:
        COOPT_ASSERT(w->n_in % COOPT_QK == 0);
        if (w->n_in % 256 == 0) gemv_launch<COOPT_DTYPE_Q4_0, true>(st, out, x, w, n_rows);
        else gemv_launch<COOPT_DTYPE_Q4_0, false>(st, out, x, w, n_rows);
        break;
    default:
        coopt_log_error("cuda matmul: weight type %s is not supported", coopt_dtype_name(w->dtype));
        COOPT_ASSERT(!"unsupported matmul weight type");
    }
}
