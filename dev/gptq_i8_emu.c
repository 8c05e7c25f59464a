/*
 * gptq_i8_emu.c -- a host emulation of the CUDA GPTQ entry points (src/cuda/gptq_dev.h, cuda.h) for
 * checking the int8 GEMV's layouts, and tests/test_cuda_gptq.c's own logic, without a GPU. The
 * upload (fragment repack, scale/zero words, group tables, permutation hash) and the int8 path
 * (gptq_quant_x_kernel, gptq_i8_gemv_kernel: lane by lane, the mma.m16n8k32 assembled from the
 * lanes' fragments as the PTX ISA defines them, the same f32 operations in the same order, the
 * split reduce) are transcriptions of src/cuda/gptq.cu -- keep them in step when the kernels
 * change; every other path returns the exact product. It checks the layout arithmetic and the
 * tests, not the hardware: the fragment mapping, PDL and the memory model still need a GPU.
 *
 *   make BUILD=build-cpu CUDA=0 build-cpu/libcoopt.a build-cpu/tests/test_main.c.o \
 *       build-cpu/tests/test_safetensors.c.o
 *   gcc -O2 -std=c11 -D_GNU_SOURCE -ffp-contract=off -march=native -DCOOPT_CUDA -Iinclude -Isrc \
 *       tests/test_cuda_gptq.c dev/gptq_i8_emu.c build-cpu/tests/test_main.c.o \
 *       build-cpu/tests/test_safetensors.c.o build-cpu/libcoopt.a -lcjson -lm -lpthread -o build-cpu/emu-test
 *   COOPT_GPTQ_GEMV=i8 ./build-cpu/emu-test cuda_gptq_matmul cuda_gptq_multi cuda_gptq_fixtures cuda_gptq_cpu_match
 *
 * (cuda_gptq_model needs the real backend; cuda_gptq_real_shapes is slow here: exact products of
 * up to 512 rows.) Before the first GPU run of the int8 GEMV this passed every case, and four
 * deliberate bugs (byte order, zero point column, token scale, split reduce) each failed it.
 */
#include "backend.h"
#include "cuda/cuda.h"
#include "cuda/gptq_dev.h"
#include "dtype.h"
#include "gptq.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- fake backend ----
static enum coopt_status f_alloc(struct coopt_backend *be, size_t n, void **out) {
    *out = malloc(n ? n : 1);
    return *out ? COOPT_OK : COOPT_ERR_NOMEM;
}
static void f_free(struct coopt_backend *be, void *p) { free(p); }
static void f_copy(struct coopt_backend *be, void *d, const void *s, size_t n) { memcpy(d, s, n); }
static void f_sync(struct coopt_backend *be) {}
static void f_destroy(struct coopt_backend *be) { free(be); }
static const struct coopt_ops f_ops = {.name = "cuda", .alloc = f_alloc, .free = f_free, .upload = f_copy,
                                       .download = f_copy, .sync = f_sync, .destroy = f_destroy};
int coopt_cuda_device_count(void) { return 1; }
enum coopt_status coopt_cuda_backend_init(int32_t n, struct coopt_backend **out) {
    struct coopt_backend *be = calloc(1, sizeof(*be));
    be->ops                  = &f_ops;
    *out                     = be;
    return COOPT_OK;
}
int coopt_cuda_mem_info(size_t *f, size_t *t) { return -1; }

// ---- upload (transcribed from gptq.cu) ----
struct emu_w {
    const struct coopt_gptq_weight *hw;
    uint32_t                       *qw;   // fragment layout
    uint32_t                       *sz;
    int32_t                        *kbg;
    uint32_t                       *kcg;
    int32_t                        *perm;
    int32_t                         cnt_dummy;
};

size_t cuda_gptq_dev_bytes(const struct coopt_gptq_weight *hw) { return 1 << 20; }

enum coopt_status cuda_gptq_upload(struct coopt_backend *be, const struct coopt_gptq_weight *hw,
                                   struct cuda_gptq_weight *dw) {
    memset(dw, 0, sizeof(*dw));
    int64_t       k_pad = (hw->k_pad + 63) / 64 * 64, n_kc = k_pad / 64, n_ot = hw->n_sub;
    struct emu_w *e     = calloc(1, sizeof(*e));
    e->hw               = hw;
    int64_t n_dw        = n_ot * n_kc * 128;
    e->qw               = calloc((size_t)n_dw, 4);
    int64_t k_src       = hw->k_pad;
    for (int64_t i = 0; i < n_dw; i++) {
        const int     j = (int)(i & 3), lane = (int)((i >> 2) & 31);
        const int64_t rest = i >> 7, kc = rest % n_kc, ot = rest / n_kc;
        const int     gid = lane >> 2, tq = lane & 3;
        const int64_t k0 = kc * 64 + 16 * j + 2 * tq;
        const uint32_t *s = hw->qw + ot * (k_src / 8) * 16;
        const uint32_t a0 = k0 < k_src ? s[(k0 >> 3) * 16 + gid] : 0u, b0 = k0 < k_src ? s[(k0 >> 3) * 16 + gid + 8] : 0u;
        const uint32_t a1 = k0 + 8 < k_src ? s[((k0 + 8) >> 3) * 16 + gid] : 0u;
        const uint32_t b1 = k0 + 8 < k_src ? s[((k0 + 8) >> 3) * 16 + gid + 8] : 0u;
        const int      sh = 4 * (int)(k0 & 7), sh1 = sh + 4;
        e->qw[i] = ((a0 >> sh) & 15u) | ((b0 >> sh) & 15u) << 4 | ((a1 >> sh) & 15u) << 8 | ((b1 >> sh) & 15u) << 12 |
                   ((a0 >> sh1) & 15u) << 16 | ((b0 >> sh1) & 15u) << 20 | ((a1 >> sh1) & 15u) << 24 |
                   ((b1 >> sh1) & 15u) << 28;
    }
    int64_t n_gs = n_ot * hw->n_groups * 16;
    e->sz        = calloc((size_t)n_gs, 4);
    for (int64_t i = 0; i < n_gs; i++) e->sz[i] = (uint32_t)hw->scale[i] | (uint32_t)hw->zero[i] << 16;
    int64_t nb_host = hw->k_pad / 32, nb = k_pad / 32;
    e->kbg          = calloc((size_t)nb, 4);
    e->kcg          = calloc((size_t)n_kc, 4);
    for (int32_t g = 0; g < hw->n_groups; g++)
        for (int64_t b = hw->grp_blk[g]; b < hw->grp_blk[g + 1]; b++) e->kbg[b] = g;
    for (int64_t b = nb_host; b < nb; b++) e->kbg[b] = nb_host > 0 ? e->kbg[nb_host - 1] : 0;
    for (int64_t c = 0; c < n_kc; c++) e->kcg[c] = (uint32_t)e->kbg[2 * c] | (uint32_t)e->kbg[2 * c + 1] << 16;
    uint64_t hash = 0;
    if (hw->perm) {
        e->perm = calloc((size_t)k_pad, 4);
        hash    = 1469598103934665603ull;
        for (int64_t k = 0; k < k_pad; k++) {
            e->perm[k] = k < hw->k_pad ? hw->perm[k] : -1;
            hash       = (hash ^ (uint32_t)e->perm[k]) * 1099511628211ull;
        }
        hash = (hash ^ (uint64_t)k_pad) * 1099511628211ull;
        hash |= 1;
    }
    dw->n_in = hw->n_in, dw->n_out = hw->n_out, dw->k_pad = k_pad, dw->n_ot = (int32_t)n_ot, dw->n_kc = (int32_t)n_kc;
    dw->n_groups = hw->n_groups, dw->direct = !hw->perm && k_pad == hw->n_in, dw->perm_hash = hash;
    dw->qw = e->qw, dw->sz = e->sz, dw->kb_grp = e->kbg, dw->kc_grp = e->kcg, dw->perm = e->perm;
    dw->cnt = calloc((size_t)n_ot, 4);
    dw->buf = e, dw->bytes = 1;
    return COOPT_OK;
}

void cuda_gptq_release(struct cuda_gptq_weight *dw) {
    if (!dw || !dw->buf) return;
    struct emu_w *e = dw->buf;
    for (int i = 0; i < dw->n_ot; i++)
        if (dw->cnt[i]) fprintf(stderr, "EMU: counter %d not reset\n", i), abort();
    free(e->qw), free(e->sz), free(e->kbg), free(e->kcg), free(e->perm), free(e), free(dw->cnt);
    memset(dw, 0, sizeof(*dw));
}

// ---- options ----
static int g_mode = CUDA_GPTQ_GEMV_MODE_DEFAULT;
void       cuda_gptq_set_gemv(enum cuda_gptq_gemv g) { g_mode = g; }
enum cuda_gptq_gemv cuda_gptq_get_gemv(void) {
    if (g_mode != CUDA_GPTQ_GEMV_MODE_DEFAULT) return g_mode;
    const char *e = getenv("COOPT_GPTQ_GEMV");
    if (e && strcmp(e, "i8") == 0) return CUDA_GPTQ_GEMV_MODE_I8;
    return CUDA_GPTQ_GEMV_MODE_F32;
}
void cuda_gptq_set_pdl(int on) {}

// ---- exact paths ----
static void exact(float *out, const float *x, const struct cuda_gptq_weight *w, const float *bias, int32_t n_rows) {
    struct emu_w *e  = w->buf;
    float        *wd = malloc((size_t)w->n_out * (size_t)w->n_in * 4);
    coopt_gptq_dequant_ref(e->hw, wd);
    for (int32_t r = 0; r < n_rows; r++)
        for (int64_t o = 0; o < w->n_out; o++) {
            double acc = 0;
            for (int64_t i = 0; i < w->n_in; i++) acc += (double)wd[o * w->n_in + i] * x[r * w->n_in + i];
            out[r * w->n_out + o] = (float)acc + (bias ? bias[o] : 0.0f);
        }
    free(wd);
}

// ---- int8 path (transcription) ----
static int64_t i8_pos(int64_t k) {
    const int m = (int)(k & 15), j = (int)((k >> 4) & 3);
    return (k >> 6) * 64 + ((m & 7) >> 1) * 16 + j * 4 + (m & 1) * 2 + (m >> 3);
}

static void emu_quant(int8_t *xq, int32_t *xs, const float *x, const int32_t *perm, int64_t n_in, int64_t k_pad,
                      int32_t nblk, int32_t n_rows, int32_t n_rows_pad) {
    for (int64_t wi = 0; wi < (int64_t)n_rows_pad * nblk; wi++) {
        const int32_t r = (int32_t)(wi / nblk), b = (int32_t)(wi % nblk);
        float         v[32], amax = 0;
        for (int lane = 0; lane < 32; lane++) {
            const int64_t k = (int64_t)b * 32 + lane;
            const int64_t s = perm ? (int64_t)perm[k] : (k < n_in ? k : -1);
            v[lane]         = r < n_rows && s >= 0 ? x[(int64_t)r * n_in + s] : 0.0f;
            amax            = fmaxf(amax, fabsf(v[lane]));
        }
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int         sum = 0;
        for (int lane = 0; lane < 32; lane++) {
            volatile float p = v[lane] * id;
            int            q = (int)nearbyintf(p);
            q                = q > 127 ? 127 : q < -127 ? -127 : q;
            sum += q;
            if (r < n_rows) xq[(int64_t)r * k_pad + i8_pos((int64_t)b * 32 + lane)] = (int8_t)q;
        }
        int32_t *dst = xs + (((int64_t)(r >> 3) * nblk + b) * 8 + (r & 7)) * 2;
        memcpy(&dst[0], &d, 4);
        dst[1] = sum;
    }
}

static float as_f(int32_t i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

#define MAGIC  0x4b400000
#define MAGICF 12582912.0f

struct i8a {
    const struct cuda_gptq_weight *w[4];
    const int8_t                  *xq[4];
    const int32_t                 *xs[4];
    const float                   *bias[4];
    float                         *out[4];
    int32_t                        ot_end[4];
    float                         *part;
    int32_t                        n, n_kc, n_rows, n_split, kc_per;
};

static int8_t byte_of(uint32_t v, int e) { return (int8_t)(uint8_t)(v >> (8 * e)); }

static void emu_gemv(const struct i8a *a, int NW, int32_t tiles) {
    for (int32_t bx = 0; bx < tiles; bx++) {
        for (int32_t z = 0; z < a->n_split; z++) {
            int jw = 0;
            for (int j = 1; j < 4; j++)
                if (j < a->n && bx >= a->ot_end[j - 1]) jw = j;
            const struct cuda_gptq_weight *w = a->w[jw];
            const int32_t ot = bx - (jw ? a->ot_end[jw - 1] : 0), n_kc = a->n_kc;
            const int32_t kb = z * a->kc_per < n_kc ? z * a->kc_per : n_kc;
            const int32_t ke = kb + a->kc_per < n_kc ? kb + a->kc_per : n_kc, per = (ke - kb + NW - 1) / NW;
            float         red[16][8][16];
            for (int warp = 0; warp < NW; warp++) {
                int32_t kc0 = kb + warp * per;
                if (kc0 > ke) kc0 = ke;
                int32_t kc1 = kc0 + per < ke ? kc0 + per : ke;
                float   y[32][4] = {{0}}, f[32][4] = {{0}}, sA[32] = {0}, sB[32] = {0};
                int     zA[32] = {0}, zB[32] = {0}, gcur[32];
                for (int l = 0; l < 32; l++) gcur[l] = -1;
                const uint32_t *szp = w->sz + (int64_t)ot * w->n_groups * 16;
                for (int32_t c = kc0; c < kc1; c++) {
                    uint32_t cur[32][4], xv[32][4], gp = w->kc_grp[c];
                    for (int l = 0; l < 32; l++) {
                        int gid = l >> 2, tq = l & 3;
                        for (int j = 0; j < 4; j++) cur[l][j] = ((const uint32_t *)w->qw)[(((int64_t)ot * n_kc + c) * 32 + l) * 4 + j];
                        bool xon = gid < a->n_rows;
                        const uint8_t *xp = (const uint8_t *)(a->xq[jw] + (int64_t)(xon ? gid : 0) * n_kc * 64) + tq * 16 + (int64_t)c * 64;
                        for (int j = 0; j < 4; j++) {
                            uint32_t v;
                            memcpy(&v, xp + 4 * j, 4);
                            xv[l][j] = xon ? v : 0;
                        }
                    }
                    for (int h = 0; h < 2; h++) {
                        const int g = h ? (int)(gp >> 16) : (int)(gp & 0xffffu);
                        int       acc[32][4];
                        float     d0[32], d1[32];
                        for (int l = 0; l < 32; l++) {
                            int gid = l >> 2, tq = l & 3;
                            if (g != gcur[l]) {
                                y[l][0] = fmaf(sA[l], f[l][0], y[l][0]), y[l][1] = fmaf(sA[l], f[l][1], y[l][1]);
                                y[l][2] = fmaf(sB[l], f[l][2], y[l][2]), y[l][3] = fmaf(sB[l], f[l][3], y[l][3]);
                                f[l][0] = f[l][1] = f[l][2] = f[l][3] = 0.0f;
                                uint32_t va = szp[g * 16 + gid], vb = szp[g * 16 + gid + 8];
                                sA[l] = coopt_f16_to_f32((uint16_t)(va & 0xffff)), zA[l] = (int)(va >> 16);
                                sB[l] = coopt_f16_to_f32((uint16_t)(vb & 0xffff)), zB[l] = (int)(vb >> 16);
                                gcur[l] = g;
                            }
                            const int32_t *ds = a->xs[jw] + ((int64_t)(2 * c + h) * 8 + 2 * tq) * 2; // d0 sx0 d1 sx1
                            acc[l][0] = MAGIC - zA[l] * ds[1], acc[l][1] = MAGIC - zA[l] * ds[3];
                            acc[l][2] = MAGIC - zB[l] * ds[1], acc[l][3] = MAGIC - zB[l] * ds[3];
                            d0[l] = as_f(ds[0]), d1[l] = as_f(ds[2]);
                        }
                        // mma m16n8k32: A[16][32], B[32][8] from the lanes' fragments
                        int8_t A[16][32], B[32][8];
                        for (int l = 0; l < 32; l++) {
                            int      gid = l >> 2, tq = l & 3;
                            uint32_t dw0 = h ? cur[l][2] : cur[l][0], dw1 = h ? cur[l][3] : cur[l][1];
                            uint32_t a0 = dw0 & 0x0f0f0f0fu, a1 = (dw0 >> 4) & 0x0f0f0f0fu, a2 = dw1 & 0x0f0f0f0fu,
                                     a3 = (dw1 >> 4) & 0x0f0f0f0fu;
                            uint32_t b0 = h ? xv[l][2] : xv[l][0], b1 = h ? xv[l][3] : xv[l][1];
                            for (int e = 0; e < 4; e++) {
                                A[gid][4 * tq + e]          = byte_of(a0, e);
                                A[gid + 8][4 * tq + e]      = byte_of(a1, e);
                                A[gid][16 + 4 * tq + e]     = byte_of(a2, e);
                                A[gid + 8][16 + 4 * tq + e] = byte_of(a3, e);
                                B[4 * tq + e][gid]          = byte_of(b0, e);
                                B[16 + 4 * tq + e][gid]     = byte_of(b1, e);
                            }
                        }
                        int D[16][8];
                        for (int m = 0; m < 16; m++)
                            for (int n = 0; n < 8; n++) {
                                int s = 0;
                                for (int k = 0; k < 32; k++) s += A[m][k] * B[k][n];
                                D[m][n] = s;
                            }
                        for (int l = 0; l < 32; l++) {
                            int gid = l >> 2, tq = l & 3;
                            acc[l][0] += D[gid][2 * tq], acc[l][1] += D[gid][2 * tq + 1];
                            acc[l][2] += D[gid + 8][2 * tq], acc[l][3] += D[gid + 8][2 * tq + 1];
                            f[l][0] = fmaf(as_f(acc[l][0]) - MAGICF, d0[l], f[l][0]);
                            f[l][1] = fmaf(as_f(acc[l][1]) - MAGICF, d1[l], f[l][1]);
                            f[l][2] = fmaf(as_f(acc[l][2]) - MAGICF, d0[l], f[l][2]);
                            f[l][3] = fmaf(as_f(acc[l][3]) - MAGICF, d1[l], f[l][3]);
                        }
                    }
                }
                for (int l = 0; l < 32; l++) {
                    int gid = l >> 2, tq = l & 3;
                    red[warp][2 * tq][gid]         = fmaf(sA[l], f[l][0], y[l][0]);
                    red[warp][2 * tq + 1][gid]     = fmaf(sA[l], f[l][1], y[l][1]);
                    red[warp][2 * tq][gid + 8]     = fmaf(sB[l], f[l][2], y[l][2]);
                    red[warp][2 * tq + 1][gid + 8] = fmaf(sB[l], f[l][3], y[l][3]);
                }
            }
            for (int t = 0; t < 128; t++) {
                int     r = t >> 4, col = t & 15;
                int32_t o = ot * 16 + col, n_out = (int32_t)w->n_out;
                float   s = 0.0f;
                for (int wi = 0; wi < NW; wi++) s += red[wi][r][col];
                if (a->n_split == 1) {
                    if (r < a->n_rows && o < n_out) a->out[jw][(int64_t)r * n_out + o] = s + (a->bias[jw] ? a->bias[jw][o] : 0.0f);
                } else if (t < a->n_rows * 16) {
                    a->part[((int64_t)bx * a->n_split + z) * 128 + t] = s;
                }
            }
        }
        if (a->n_split > 1) { // the last block: splits in order
            int jw = 0;
            for (int j = 1; j < 4; j++)
                if (j < a->n && bx >= a->ot_end[j - 1]) jw = j;
            const int32_t ot = bx - (jw ? a->ot_end[jw - 1] : 0), n_out = (int32_t)a->w[jw]->n_out;
            for (int t = 0; t < 128; t++) {
                int     r = t >> 4, col = t & 15;
                int32_t o = ot * 16 + col;
                if (r < a->n_rows && o < n_out) {
                    float v = 0.0f;
                    for (int32_t zz = 0; zz < a->n_split; zz++) v += a->part[((int64_t)bx * a->n_split + zz) * 128 + t];
                    a->out[jw][(int64_t)r * n_out + o] = v + (a->bias[jw] ? a->bias[jw][o] : 0.0f);
                }
            }
        }
    }
}

static void i8_config(int64_t tiles, int32_t n_kc, int param, int *nw, int *n_split) {
    int w = param & 0xff, s = param >> 8;
    if (w != 4 && w != 8 && w != 16) w = tiles < 132 ? 16 : 8;
    if (s <= 0) s = 1;
    if (s > n_kc) s = n_kc;
    if (s < 1) s = 1;
    const int32_t kc_per = (n_kc + s - 1) / s;
    *nw = w, *n_split = (n_kc + kc_per - 1) / kc_per;
}

void cuda_gptq_i8_auto_config(struct coopt_backend *be, int64_t tiles, int32_t n_kc, int *nw, int *n_split) {
    i8_config(tiles, n_kc, 0, nw, n_split);
}

static void i8_multi(int32_t n, float *const *outs, const float *x, const struct cuda_gptq_weight *const *ws,
                     const float *const *biases, int32_t n_rows, int param) {
    const int64_t k_pad = ws[0]->k_pad, n_in = ws[0]->n_in;
    const int32_t n_kc = ws[0]->n_kc, nblk = (int32_t)(k_pad / 32), n_rg = (n_rows + 7) / 8;
    uint64_t       hashes[4];
    const int32_t *perms[4];
    int            n_h = 0, slot[4];
    int64_t        tiles = 0;
    for (int32_t j = 0; j < n; j++) {
        if (!(ws[j]->n_in == n_in && ws[j]->k_pad == k_pad)) abort();
        tiles += ws[j]->n_ot;
        slot[j] = -1;
        for (int h = 0; h < n_h; h++)
            if (hashes[h] == ws[j]->perm_hash) slot[j] = h;
        if (slot[j] < 0) hashes[n_h] = ws[j]->perm_hash, perms[n_h] = ws[j]->perm, slot[j] = n_h++;
    }
    int nw, n_split;
    i8_config(tiles, n_kc, param, &nw, &n_split);
    int8_t  *xq[4];
    int32_t *xs[4];
    for (int h = 0; h < n_h; h++) {
        xq[h] = malloc((size_t)n_rows * (size_t)k_pad);
        memset(xq[h], 0x55, (size_t)n_rows * (size_t)k_pad); // garbage: every byte must be written
        xs[h] = malloc((size_t)n_rg * nblk * 8 * 8);
        memset(xs[h], 0x55, (size_t)n_rg * nblk * 8 * 8);
        emu_quant(xq[h], xs[h], x, perms[h], n_in, k_pad, nblk, n_rows, n_rg * 8);
    }
    float *part = malloc((size_t)tiles * n_split * 512);
    for (size_t i = 0; i < (size_t)tiles * n_split * 128; i++) part[i] = NAN;
    for (int32_t rg = 0; rg < n_rg; rg++) {
        struct i8a a;
        memset(&a, 0, sizeof(a));
        a.n = n, a.n_kc = n_kc, a.n_rows = n_rows - rg * 8 < 8 ? n_rows - rg * 8 : 8, a.n_split = n_split;
        a.kc_per = (n_kc + n_split - 1) / n_split, a.part = part;
        int32_t end = 0;
        for (int32_t j = 0; j < n; j++) {
            a.w[j]    = ws[j];
            a.xq[j]   = xq[slot[j]] + (int64_t)rg * 8 * k_pad;
            a.xs[j]   = xs[slot[j]] + (int64_t)rg * nblk * 8 * 2;
            a.bias[j] = biases ? biases[j] : NULL;
            a.out[j]  = outs[j] + (int64_t)rg * 8 * ws[j]->n_out;
            end += ws[j]->n_ot;
            a.ot_end[j] = end;
        }
        emu_gemv(&a, nw, end);
    }
    free(part);
    for (int h = 0; h < n_h; h++) free(xq[h]), free(xs[h]);
}

enum cuda_gptq_path cuda_gptq_auto_path(const struct cuda_gptq_weight *w, int32_t n_rows) {
    if (n_rows <= 8 && cuda_gptq_get_gemv() == CUDA_GPTQ_GEMV_MODE_I8) return CUDA_GPTQ_GEMV_I8;
    if (n_rows < 2) return CUDA_GPTQ_GEMV;
    if (n_rows < 160) return CUDA_GPTQ_MMA;
    return CUDA_GPTQ_CUBLAS;
}

void cuda_gptq_matmul_path(struct coopt_backend *be, float *out, const float *x, const struct cuda_gptq_weight *w,
                           const float *bias, int32_t n_rows, enum cuda_gptq_path path, int param) {
    if (path == CUDA_GPTQ_AUTO) path = cuda_gptq_auto_path(w, n_rows);
    if (path == CUDA_GPTQ_GEMV_I8) {
        float *outs[1] = {out};
        const struct cuda_gptq_weight *ws[1] = {w};
        const float *bs[1] = {bias};
        i8_multi(1, outs, x, ws, bs, n_rows, param);
    } else {
        exact(out, x, w, bias, n_rows);
    }
}
void cuda_gptq_matmul(struct coopt_backend *be, float *out, const float *x, const struct cuda_gptq_weight *w,
                      const float *bias, int32_t n_rows) {
    cuda_gptq_matmul_path(be, out, x, w, bias, n_rows, CUDA_GPTQ_AUTO, 0);
}
void cuda_gptq_matmul_multi(struct coopt_backend *be, int32_t n, float *const *outs, const float *x,
                            const struct cuda_gptq_weight *const *ws, const float *const *biases, int32_t n_rows) {
    if (n_rows <= 8 && cuda_gptq_get_gemv() == CUDA_GPTQ_GEMV_MODE_I8) {
        i8_multi(n, outs, x, ws, biases, n_rows, 0);
        return;
    }
    for (int32_t j = 0; j < n; j++) exact(outs[j], x, ws[j], biases ? biases[j] : NULL, n_rows);
}
double cuda_bench_graph(struct coopt_backend *be, void (*fn)(void *arg, int i), void *arg, int reps) { return -1; }
