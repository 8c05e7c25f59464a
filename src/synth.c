/*
 * synth.c -- random-weight Hugging Face checkpoints of named LLaMA architectures (see synth.h).
 *
 * The plan (tensor list in Hugging Face state_dict order, shard of each tensor) is computed
 * first and is small (~1000 entries for 70B GPTQ). Tensor data never exists in memory as a
 * whole: the safetensors writer calls fill_tensor() for chunks of at most 4 MiB, which computes
 * them from a counter-based random stream:
 *
 *   word w (8 bytes) of a tensor = f(splitmix64(stream + (w + 1) * golden))
 *
 * Gaussian values come from a 65536-entry table of normal quantiles (one table lookup per
 * value, 16 random bits each; tails to +-4.3 std), converted once per tensor to f16/bf16 with
 * the tensor's std folded in, so producing a value costs a quarter of a splitmix call plus one
 * lookup. GPTQ codes come from a 65536-entry table that maps 16 random bits to a byte of two
 * 4-bit codes (256-level quantiles of a discretized normal each).
 */
#include "synth.h"

#include "dtype.h"
#include "safetensors.h"
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// ---- architectures ----

static const struct coopt_synth_arch ARCHS[] = {
    // name             real checkpoint                      dim   ffn    L  H   KV vocab  ctx  eps   theta   bos     eos     dtype
    {"llama2-7b", "meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, 4096, 1e-5, 1e4, 1, 2, "float16"},
    {"llama2-13b", "meta-llama/Llama-2-13b-hf", 5120, 13824, 40, 40, 40, 32000, 4096, 1e-5, 1e4, 1, 2, "float16"},
    {"llama2-70b", "meta-llama/Llama-2-70b-hf", 8192, 28672, 80, 64, 8, 32000, 4096, 1e-5, 1e4, 1, 2, "float16"},
    {"llama3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, 8192, 1e-5, 5e5, 128000, 128001,
     "bfloat16"},
    {"tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", 2048, 5632, 22, 32, 4, 32000, 2048, 1e-5, 1e4, 1, 2,
     "bfloat16"},
};

const struct coopt_synth_arch *coopt_synth_arch_find(const char *name) {
    for (size_t i = 0; name && i < COOPT_ARRAY_LEN(ARCHS); i++) {
        if (strcmp(ARCHS[i].name, name) == 0) return &ARCHS[i];
    }
    return NULL;
}

int coopt_synth_arch_count(void) { return (int)COOPT_ARRAY_LEN(ARCHS); }

const struct coopt_synth_arch *coopt_synth_arch_at(int i) {
    return i >= 0 && i < (int)COOPT_ARRAY_LEN(ARCHS) ? &ARCHS[i] : NULL;
}

const char *coopt_synth_arch_names(void) {
    return "llama2-7b, llama2-13b, llama2-70b, llama3-8b, tinyllama-1.1b";
}

struct coopt_synth_params coopt_synth_default_params(void) {
    return (struct coopt_synth_params){
        .dtype = COOPT_DTYPE_Q4_GPTQ, .group_size = 128, .seed = 1, .max_shard_bytes = 0};
}

// ---- random numbers ----

#define GOLDEN 0x9e3779b97f4a7c15ull

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Word w of the stream s.
static inline uint64_t rnd(uint64_t s, uint64_t w) { return mix64(s + (w + 1) * GOLDEN); }

static uint64_t hash_str(uint64_t seed, const char *s) {
    uint64_t h = 0xcbf29ce484222325ull ^ mix64(seed);
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return mix64(h);
}

// Standard normal quantile (P. J. Acklam's rational approximation, relative error < 1.2e-9).
static double norm_quantile(double p) {
    static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                               1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
    static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                               6.680131188771972e+01,  -1.328068155288572e+01};
    static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                               -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
    static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                               3.754408661907416e+00};
    const double lo = 0.02425;
    if (p < lo) {
        double q = sqrt(-2 * log(p));
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
               ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
    }
    if (p > 1 - lo) return -norm_quantile(1 - p);
    double q = p - 0.5, r = q * q;
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
           (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

// ---- the plan ----

#define CODE_STD 2.5 // std of (code - 8) before rounding; GPTQ's sym grid gives ~2.5-2.8

enum tkind {
    T_NORMAL,  // f16/bf16 N(0, std^2)
    T_ONES,    // f16/bf16 1.0
    T_QWEIGHT, // int32 [in/8][out], random 4-bit codes
    T_QZEROS,  // int32 [groups][out/8], every nibble 7 (zero 8, v1 "zero - 1")
    T_SCALES,  // f16 [groups][out], std-matching scale * U(0.875, 1.125)
    T_GIDX,    // int32 [in]
};

struct synth_tensor {
    char             name[128];
    enum tkind       kind;
    enum coopt_dtype dtype; // F16, BF16 or I32
    int              n_dims;
    int64_t          shape[2];
    uint64_t         bytes;
    double           std;       // T_NORMAL: value std; T_SCALES: mean scale
    int64_t          n_in;      // T_GIDX
    int32_t          group_size; // T_GIDX: -1 = one group
    bool             act_order; // T_GIDX
    uint64_t         stream;    // random stream of the data (T_GIDX: of the permutation)
    int              shard;
};

struct synth_run; // below

struct fill_ctx {
    struct synth_run *run;
    int               idx;
};

struct synth_run {
    const struct coopt_synth_params *p;
    const struct coopt_synth_arch   *arch;     // &arch_own: the table entry with p's overrides
    struct coopt_synth_arch          arch_own;
    int32_t                          n_layers;
    struct synth_tensor             *t; // [n_t]
    int                              n_t, cap_t;
    int                              n_shards;
    uint64_t                         total_bytes;
    uint64_t                         n_params;
    char                             model_name[128];
    // generation state
    float                           *zq;        // [65536] normal quantiles
    uint8_t                         *codes;     // [65536] two 4-bit codes per 16 random bits
    double                           code_rms;  // rms of (code - 8)
    uint16_t                        *lut;       // [65536] f16/bf16 values of the current tensor
    int                              lut_for;   // tensor index lut holds (-1 none)
    int32_t                         *gidx;      // [gidx_cap] g_idx of the current tensor
    int64_t                          gidx_cap;
    int                              gidx_for;
    struct fill_ctx                 *fills;     // [n_t]
    // progress
    uint64_t                         bytes_done;
    int64_t                          t_start, t_last;
    int                              cur;
    bool                             tty;
};

static enum coopt_status add_tensor(struct synth_run *r, const struct synth_tensor *src) {
    if (r->n_t == r->cap_t) {
        int   cap = r->cap_t ? 2 * r->cap_t : 256;
        void *q   = coopt_realloc(r->t, (size_t)cap * sizeof(*r->t));
        if (!q) return COOPT_ERR_NOMEM;
        r->t     = q;
        r->cap_t = cap;
    }
    struct synth_tensor *t = &r->t[r->n_t++];
    *t                     = *src;
    uint64_t n             = t->dtype == COOPT_DTYPE_I32 ? 4 : 2;
    for (int d = 0; d < t->n_dims; d++)
        n *= (uint64_t)t->shape[d];
    t->bytes = n;
    t->stream = hash_str(r->p->seed, t->name);
    return COOPT_OK;
}

static enum coopt_status add_vec(struct synth_run *r, const char *name, enum tkind kind, enum coopt_dtype dt,
                                 int64_t n, double std) {
    struct synth_tensor t = {.kind = kind, .dtype = dt, .n_dims = 1, .shape = {n, 0}, .std = std};
    snprintf(t.name, sizeof(t.name), "%s", name);
    return add_tensor(r, &t);
}

static enum coopt_status add_mat(struct synth_run *r, const char *name, enum tkind kind, enum coopt_dtype dt,
                                 int64_t rows, int64_t cols, double std) {
    struct synth_tensor t = {.kind = kind, .dtype = dt, .n_dims = 2, .shape = {rows, cols}, .std = std};
    snprintf(t.name, sizeof(t.name), "%s", name);
    return add_tensor(r, &t);
}

// One linear layer W [n_out][n_in] with weight std `std`. `gidx_key` names its input (q, k and v
// read the same activations, so a real act-order checkpoint gives them the same g_idx; so do
// gate and up): tensors with the same key get the same permutation.
static enum coopt_status add_linear(struct synth_run *r, const char *prefix, int64_t n_out, int64_t n_in,
                                    double std, const char *gidx_key) {
    const struct coopt_synth_params *p = r->p;
    char                             name[128];
    enum coopt_status                rc;
    r->n_params += (uint64_t)n_out * (uint64_t)n_in;
    if (p->dtype != COOPT_DTYPE_Q4_GPTQ) {
        snprintf(name, sizeof(name), "%s.weight", prefix);
        return add_mat(r, name, T_NORMAL, p->dtype, n_out, n_in, std);
    }
    int64_t gs     = p->group_size > 0 ? p->group_size : n_in;
    int64_t groups = (n_in + gs - 1) / gs;
    // E[W^2] = E[s^2] E[(q-8)^2]; the multiplier U(0.875, 1.125) has E[m^2] = 1 + 0.25^2/12
    double scale = std / (r->code_rms * sqrt(1.0 + 0.0625 / 12.0));
    snprintf(name, sizeof(name), "%s.qweight", prefix);
    if ((rc = add_mat(r, name, T_QWEIGHT, COOPT_DTYPE_I32, n_in / 8, n_out, 0)) != COOPT_OK) return rc;
    snprintf(name, sizeof(name), "%s.qzeros", prefix);
    if ((rc = add_mat(r, name, T_QZEROS, COOPT_DTYPE_I32, groups, n_out / 8, 0)) != COOPT_OK) return rc;
    snprintf(name, sizeof(name), "%s.scales", prefix);
    if ((rc = add_mat(r, name, T_SCALES, COOPT_DTYPE_F16, groups, n_out, scale)) != COOPT_OK) return rc;
    snprintf(name, sizeof(name), "%s.g_idx", prefix);
    if ((rc = add_vec(r, name, T_GIDX, COOPT_DTYPE_I32, n_in, 0)) != COOPT_OK) return rc;
    struct synth_tensor *t = &r->t[r->n_t - 1];
    t->n_in                = n_in;
    t->group_size          = p->group_size;
    t->act_order           = p->act_order;
    t->stream              = hash_str(p->seed, gidx_key);
    return COOPT_OK;
}

static enum coopt_status check_params(const struct coopt_synth_params *p, const struct coopt_synth_arch **arch) {
    *arch = coopt_synth_arch_find(p->arch);
    if (!*arch) {
        return coopt_fail(COOPT_ERR_INVALID, "synth: unknown architecture '%s' (known: %s)",
                          p->arch ? p->arch : "(none)", coopt_synth_arch_names());
    }
    if (p->dtype != COOPT_DTYPE_F16 && p->dtype != COOPT_DTYPE_BF16 && p->dtype != COOPT_DTYPE_Q4_GPTQ) {
        return coopt_fail(COOPT_ERR_INVALID, "synth: dtype '%s' is not supported (supported: gptq4, f16, bf16)",
                          (unsigned)p->dtype < COOPT_DTYPE_COUNT ? coopt_dtype_name(p->dtype) : "?");
    }
    if (p->dtype == COOPT_DTYPE_Q4_GPTQ &&
        !(p->group_size == -1 || (p->group_size > 0 && p->group_size % 8 == 0 && p->group_size <= (1 << 20)))) {
        return coopt_fail(COOPT_ERR_INVALID, "synth: group size %d must be -1 or a positive multiple of 8",
                          (int)p->group_size);
    }
    if (p->n_vocab < 0 || p->n_vocab > (1 << 24)) {
        return coopt_fail(COOPT_ERR_INVALID, "synth: vocabulary size %d out of range [1, %d]", (int)p->n_vocab, 1 << 24);
    }
    if (p->n_layers < 0 || p->n_layers > 1024) {
        return coopt_fail(COOPT_ERR_INVALID, "synth: layer count %d out of range [1, 1024]", (int)p->n_layers);
    }
    if (!p->out_dir || !*p->out_dir) return coopt_fail(COOPT_ERR_INVALID, "synth: no output directory");
    return COOPT_OK;
}

static void run_free(struct synth_run *r) {
    free(r->t);
    free(r->zq);
    free(r->codes);
    free(r->lut);
    free(r->gidx);
    free(r->fills);
}

static enum coopt_status build_tables(struct synth_run *r) {
    r->zq    = coopt_malloc(65536 * sizeof(float));
    r->codes = coopt_malloc(65536);
    r->lut   = coopt_malloc(65536 * sizeof(uint16_t));
    if (!r->zq || !r->codes || !r->lut) return COOPT_ERR_NOMEM;
    r->lut_for = r->gidx_for = -1;
    for (int i = 0; i < 65536; i++)
        r->zq[i] = (float)norm_quantile((i + 0.5) / 65536.0);
    // codes: 256-level quantiles of round(8 + CODE_STD z) clamped to [1, 15] (symmetric: mean 8)
    uint8_t c256[256];
    double  ss = 0;
    for (int i = 0; i < 256; i++) {
        double v = nearbyint(CODE_STD * norm_quantile((i + 0.5) / 256.0));
        v        = v < -7 ? -7 : v > 7 ? 7 : v;
        c256[i]  = (uint8_t)(8 + v);
        ss += v * v;
    }
    r->code_rms = sqrt(ss / 256);
    for (int i = 0; i < 65536; i++)
        r->codes[i] = (uint8_t)(c256[i & 255] | c256[i >> 8] << 4);
    return COOPT_OK;
}

// Builds the tensor list and the shard plan into r.
static enum coopt_status plan(struct synth_run *r, const struct coopt_synth_params *p) {
    enum coopt_status rc;
    memset(r, 0, sizeof(*r));
    r->p = p;
    if ((rc = check_params(p, &r->arch)) != COOPT_OK) return rc;
    if ((rc = build_tables(r)) != COOPT_OK) return rc;
    r->arch_own = *r->arch;
    if (p->n_vocab > 0) r->arch_own.n_vocab = p->n_vocab;
    r->arch                          = &r->arch_own;
    const struct coopt_synth_arch *a = r->arch;
    r->n_layers                      = p->n_layers > 0 ? p->n_layers : a->n_layers;
    bool             q               = p->dtype == COOPT_DTYPE_Q4_GPTQ;
    enum coopt_dtype fdt             = q ? COOPT_DTYPE_F16 : p->dtype; // unquantized tensors
    int64_t          dim = a->dim, ffn = a->ffn_dim, hd = a->dim / a->n_heads;
    int64_t          q_dim = hd * a->n_heads, kv_dim = hd * a->n_kv_heads;
    double           res   = 1.0 / sqrt(2.0 * r->n_layers); // residual branch scale

    int  n = snprintf(r->model_name, sizeof(r->model_name), "synth-%s", a->name);
    if (r->n_layers != a->n_layers)
        n += snprintf(r->model_name + n, sizeof(r->model_name) - (size_t)n, "-%dL", (int)r->n_layers);
    n += snprintf(r->model_name + n, sizeof(r->model_name) - (size_t)n, "-%s", coopt_dtype_name(p->dtype));
    if (q) {
        if (p->group_size > 0)
            n += snprintf(r->model_name + n, sizeof(r->model_name) - (size_t)n, "-g%d", (int)p->group_size);
        else
            n += snprintf(r->model_name + n, sizeof(r->model_name) - (size_t)n, "-gall");
        if (p->act_order) snprintf(r->model_name + n, sizeof(r->model_name) - (size_t)n, "-act");
    }

    // Hugging Face state_dict order
    if ((rc = add_mat(r, "model.embed_tokens.weight", T_NORMAL, fdt, a->n_vocab, dim, 1.0)) != COOPT_OK) return rc;
    r->n_params += (uint64_t)a->n_vocab * (uint64_t)dim;
    char pre[96], key[64];
    for (int32_t l = 0; l < r->n_layers; l++) {
        static const struct {
            const char *name, *key;
        } lin[] = {{"self_attn.q_proj", "attn_in"}, {"self_attn.k_proj", "attn_in"},
                   {"self_attn.v_proj", "attn_in"}, {"self_attn.o_proj", "o_in"},
                   {"mlp.gate_proj", "mlp_in"},     {"mlp.up_proj", "mlp_in"},
                   {"mlp.down_proj", "down_in"}};
        const int64_t shp[][2] = {{q_dim, dim}, {kv_dim, dim}, {kv_dim, dim}, {dim, q_dim},
                                  {ffn, dim},   {ffn, dim},    {dim, ffn}}; // [out, in]
        for (int i = 0; i < 7; i++) {
            snprintf(pre, sizeof(pre), "model.layers.%d.%s", (int)l, lin[i].name);
            snprintf(key, sizeof(key), "g_idx.%d.%s", (int)l, lin[i].key);
            double std = 1.0 / sqrt((double)shp[i][1]) * (i == 3 || i == 6 ? res : 1.0);
            if ((rc = add_linear(r, pre, shp[i][0], shp[i][1], std, key)) != COOPT_OK) return rc;
        }
        snprintf(pre, sizeof(pre), "model.layers.%d.input_layernorm.weight", (int)l);
        if ((rc = add_vec(r, pre, T_ONES, fdt, dim, 0)) != COOPT_OK) return rc;
        snprintf(pre, sizeof(pre), "model.layers.%d.post_attention_layernorm.weight", (int)l);
        if ((rc = add_vec(r, pre, T_ONES, fdt, dim, 0)) != COOPT_OK) return rc;
        r->n_params += 2 * (uint64_t)dim;
    }
    if ((rc = add_vec(r, "model.norm.weight", T_ONES, fdt, dim, 0)) != COOPT_OK) return rc;
    if ((rc = add_mat(r, "lm_head.weight", T_NORMAL, fdt, a->n_vocab, dim, 1.0 / sqrt((double)dim))) != COOPT_OK)
        return rc;
    r->n_params += (uint64_t)dim + (uint64_t)a->n_vocab * (uint64_t)dim;

    // shards: greedy in order, as transformers' shard_checkpoint does
    uint64_t limit = p->max_shard_bytes ? p->max_shard_bytes : 5000000000ull, cur = 0;
    int      shard = 0;
    for (int i = 0; i < r->n_t; i++) {
        if (cur > 0 && cur + r->t[i].bytes > limit) {
            shard++;
            cur = 0;
        }
        r->t[i].shard = shard;
        cur += r->t[i].bytes;
        r->total_bytes += r->t[i].bytes;
    }
    r->n_shards = shard + 1;
    return COOPT_OK;
}

static void fill_result(const struct synth_run *r, struct coopt_synth_result *out) {
    memset(out, 0, sizeof(*out));
    snprintf(out->model_name, sizeof(out->model_name), "%s", r->model_name);
    out->n_layers     = r->n_layers;
    out->n_tensors    = r->n_t;
    out->n_shards     = r->n_shards;
    out->n_params     = r->n_params;
    out->tensor_bytes = r->total_bytes;
}

enum coopt_status coopt_synth_plan(const struct coopt_synth_params *p, struct coopt_synth_result *out) {
    struct synth_run  r;
    enum coopt_status rc = plan(&r, p);
    if (rc == COOPT_OK && out) fill_result(&r, out);
    run_free(&r);
    return rc;
}

// ---- tensor data ----

static void progress(struct synth_run *r, bool final) {
    if (!r->p->progress) return;
    int64_t now = coopt_time_us();
    if (!final && now - r->t_last < (r->tty ? 250000 : 5000000)) return;
    r->t_last   = now;
    double secs = (double)(now - r->t_start) * 1e-6;
    double mbs  = secs > 0 ? (double)r->bytes_done / secs / 1e6 : 0;
    fprintf(stderr, "%ssynth: tensor %d/%d  %.2f/%.2f GB  %.0f MB/s%s", r->tty ? "\r" : "", r->cur + 1, r->n_t,
            (double)r->bytes_done / 1e9, (double)r->total_bytes / 1e9, mbs, r->tty && !final ? "   " : "\n");
    fflush(stderr);
}

static void prepare_lut(struct synth_run *r, int idx) {
    const struct synth_tensor *t = &r->t[idx];
    bool                       bf = t->dtype == COOPT_DTYPE_BF16;
    for (int i = 0; i < 65536; i++) {
        float v = t->kind == T_SCALES ? (float)(t->std * (0.875 + 0.25 * (i + 0.5) / 65536.0))
                                      : (float)(t->std * r->zq[i]);
        r->lut[i] = bf ? coopt_f32_to_bf16(v) : coopt_f32_to_f16(v);
    }
    r->lut_for = idx;
}

static enum coopt_status prepare_gidx(struct synth_run *r, int idx) {
    const struct synth_tensor *t = &r->t[idx];
    if (t->n_in > r->gidx_cap) {
        int32_t *g = coopt_realloc(r->gidx, (size_t)t->n_in * 2 * sizeof(int32_t));
        if (!g) return COOPT_ERR_NOMEM;
        r->gidx     = g;
        r->gidx_cap = t->n_in;
    }
    int64_t  n = t->n_in, gs = t->group_size > 0 ? t->group_size : n;
    int32_t *g = r->gidx, *perm = r->gidx + n; // perm: scratch after g
    for (int64_t i = 0; i < n; i++)
        perm[i] = (int32_t)i;
    if (t->act_order) {
        // perm[k] = input row at act-order position k (Fisher-Yates); its group is k / gs,
        // as GPTQ with desc_act assigns groups in the order of the Hessian diagonal
        for (int64_t k = n - 1; k > 0; k--) {
            int64_t j = (int64_t)(rnd(t->stream, (uint64_t)k) % (uint64_t)(k + 1));
            int32_t x = perm[k];
            perm[k]   = perm[j];
            perm[j]   = x;
        }
    }
    for (int64_t k = 0; k < n; k++)
        g[perm[k]] = (int32_t)(k / gs);
    r->gidx_for = idx;
    return COOPT_OK;
}

static inline uint64_t lut4(const uint16_t *lut, uint64_t x) {
    return (uint64_t)lut[x & 0xffff] | (uint64_t)lut[(x >> 16) & 0xffff] << 16 |
           (uint64_t)lut[(x >> 32) & 0xffff] << 32 | (uint64_t)lut[x >> 48] << 48;
}

static inline uint64_t codes8(const uint8_t *codes, uint64_t x) {
    return (uint64_t)codes[x & 0xffff] | (uint64_t)codes[(x >> 16) & 0xffff] << 8 |
           (uint64_t)codes[(x >> 32) & 0xffff] << 16 | (uint64_t)codes[x >> 48] << 24;
}

// Word w (bytes 8w..8w+7, little endian) of tensor t.
static inline uint64_t tensor_word(const struct synth_run *r, const struct synth_tensor *t, uint64_t w) {
    switch (t->kind) {
    case T_NORMAL:
    case T_SCALES: return lut4(r->lut, rnd(t->stream, w));
    case T_ONES: {
        uint64_t one = t->dtype == COOPT_DTYPE_BF16 ? 0x3f80 : 0x3c00;
        return one * 0x0001000100010001ull;
    }
    case T_QWEIGHT:
        return codes8(r->codes, rnd(t->stream, 2 * w)) | codes8(r->codes, rnd(t->stream, 2 * w + 1)) << 32;
    case T_QZEROS: return 0x7777777777777777ull;
    case T_GIDX: return (uint64_t)(uint32_t)r->gidx[2 * w] | (uint64_t)(uint32_t)r->gidx[2 * w + 1] << 32;
    }
    return 0;
}

// Bulk loop for whole words, one specialization per kind (the switch stays out of the loop).
#define WORD_LOOP(expr)                                                                            \
    for (uint64_t i = 0; i < nw; i++) {                                                            \
        uint64_t w = w0 + i, v = (expr);                                                           \
        memcpy(dst + 8 * i, &v, 8);                                                                \
    }

static void fill_words(const struct synth_run *r, const struct synth_tensor *t, uint8_t *dst, uint64_t w0,
                       uint64_t nw) {
    const uint16_t *lut = r->lut;
    const uint8_t  *cd  = r->codes;
    uint64_t        s   = t->stream;
    switch (t->kind) {
    case T_NORMAL:
    case T_SCALES: WORD_LOOP(lut4(lut, rnd(s, w))); break;
    case T_QWEIGHT: WORD_LOOP(codes8(cd, rnd(s, 2 * w)) | codes8(cd, rnd(s, 2 * w + 1)) << 32); break;
    default: WORD_LOOP(tensor_word(r, t, w)); break;
    }
}

static enum coopt_status fill_tensor(void *user, void *buf, size_t offset, size_t n) {
    struct fill_ctx           *fc = user;
    struct synth_run          *r  = fc->run;
    const struct synth_tensor *t  = &r->t[fc->idx];
    if ((t->kind == T_NORMAL || t->kind == T_SCALES) && r->lut_for != fc->idx) prepare_lut(r, fc->idx);
    if (t->kind == T_GIDX && r->gidx_for != fc->idx) {
        enum coopt_status rc = prepare_gidx(r, fc->idx);
        if (rc != COOPT_OK) return rc;
    }
    uint8_t *out = buf;
    size_t   pos = offset, end = offset + n;
    // head and tail: partial words (never happens with 4 MiB chunks of 8-byte-multiple tensors)
    while (pos < end && (pos % 8 != 0 || end - pos < 8)) {
        uint64_t v = tensor_word(r, t, pos / 8);
        size_t   k = COOPT_MIN(8 - pos % 8, end - pos);
        memcpy(out + (pos - offset), (uint8_t *)&v + pos % 8, k);
        pos += k;
    }
    uint64_t nw = (end - pos) / 8;
    fill_words(r, t, out + (pos - offset), pos / 8, nw);
    pos += nw * 8;
    if (pos < end) {
        uint64_t v = tensor_word(r, t, pos / 8);
        memcpy(out + (pos - offset), &v, end - pos);
    }
    r->cur = fc->idx;
    r->bytes_done += n;
    progress(r, false);
    return COOPT_OK;
}

// ---- files ----

static enum coopt_status write_text(const char *dir, const char *name, const char *text) {
    char path[4096];
    if (!coopt_path_join(path, sizeof(path), dir, name)) return coopt_fail(COOPT_ERR_IO, "%s: path too long", dir);
    FILE *f = fopen(path, "wb");
    if (!f) return coopt_fail(COOPT_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    size_t len = strlen(text);
    bool   ok  = fwrite(text, 1, len, f) == len;
    if (fclose(f) != 0) ok = false;
    if (!ok) return coopt_fail(COOPT_ERR_IO, "%s: write failed: %s", path, strerror(errno));
    return COOPT_OK;
}

// Python's repr of a float as json.dumps writes it: 10000.0, 1e-05, 0.02.
static void py_float(char *out, size_t cap, double v) {
    if (v == floor(v) && fabs(v) < 1e16)
        snprintf(out, cap, "%.1f", v);
    else
        snprintf(out, cap, "%g", v); // the values we write have <= 6 significant digits
}

// A growable string buffer for the JSON files.
struct sbuf {
    char  *s;
    size_t len, cap;
    bool   oom;
};

__attribute__((format(printf, 2, 3))) static void sb_printf(struct sbuf *b, const char *fmt, ...) {
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = COOPT_MAX(b->cap * 2, b->len + (size_t)n + 4096);
        char  *p   = realloc(b->s, cap);
        if (!p) {
            b->oom = true;
            return;
        }
        b->s   = p;
        b->cap = cap;
    }
}

static void gptq_json(struct sbuf *b, const struct coopt_synth_params *p, const char *ind) {
    sb_printf(b,
              "{\n%s  \"bits\": 4,\n%s  \"checkpoint_format\": \"gptq\",\n%s  \"damp_percent\": 0.01,\n"
              "%s  \"desc_act\": %s,\n%s  \"group_size\": %d,\n%s  \"model_file_base_name\": \"model\",\n"
              "%s  \"model_name_or_path\": null,\n%s  \"quant_method\": \"gptq\",\n%s  \"static_groups\": false,\n"
              "%s  \"sym\": true,\n%s  \"true_sequential\": true\n%s}",
              ind, ind, ind, ind, p->act_order ? "true" : "false", ind, (int)p->group_size, ind, ind, ind, ind, ind,
              ind, ind);
}

static enum coopt_status write_configs(const struct synth_run *r) {
    const struct coopt_synth_params *p = r->p;
    const struct coopt_synth_arch   *a = r->arch;
    bool                             q = p->dtype == COOPT_DTYPE_Q4_GPTQ;
    char                             eps[32], theta[32];
    py_float(eps, sizeof(eps), a->rms_eps);
    py_float(theta, sizeof(theta), a->rope_theta);
    const char *tdt = p->dtype == COOPT_DTYPE_BF16 ? "bfloat16" : "float16";

    struct sbuf b = {0};
    // keys sorted, 2-space indent: what transformers' save_pretrained writes
    sb_printf(&b,
              "{\n  \"_name_or_path\": \"%s\",\n  \"architectures\": [\n    \"LlamaForCausalLM\"\n  ],\n"
              "  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n  \"bos_token_id\": %d,\n",
              r->model_name, (int)a->bos_id);
    sb_printf(&b,
              "  \"coopt_synth\": {\n    \"arch\": \"%s\",\n    \"layers_of_arch\": %d,\n    \"mirrors\": \"%s\",\n"
              "    \"note\": \"random weights written by coopt synth; shapes and format only\",\n"
              "    \"seed\": %llu,\n    \"tokenizer\": \"%s\"\n  },\n",
              a->name, (int)a->n_layers, a->hf_repo, (unsigned long long)p->seed,
              p->tokenizer ? "tokenizer.model given to coopt synth" : "Llama 2 tokenizer.model (32000 tokens)");
    sb_printf(&b,
              "  \"eos_token_id\": %d,\n  \"hidden_act\": \"silu\",\n  \"hidden_size\": %d,\n"
              "  \"initializer_range\": 0.02,\n  \"intermediate_size\": %d,\n  \"max_position_embeddings\": %d,\n"
              "  \"mlp_bias\": false,\n  \"model_type\": \"llama\",\n  \"num_attention_heads\": %d,\n"
              "  \"num_hidden_layers\": %d,\n  \"num_key_value_heads\": %d,\n  \"pretraining_tp\": 1,\n",
              (int)a->eos_id, (int)a->dim, (int)a->ffn_dim, (int)a->n_ctx, (int)a->n_heads, (int)r->n_layers,
              (int)a->n_kv_heads);
    if (q) {
        sb_printf(&b, "  \"quantization_config\": ");
        gptq_json(&b, p, "  ");
        sb_printf(&b, ",\n");
    }
    sb_printf(&b,
              "  \"rms_norm_eps\": %s,\n  \"rope_scaling\": null,\n  \"rope_theta\": %s,\n"
              "  \"tie_word_embeddings\": false,\n  \"torch_dtype\": \"%s\",\n"
              "  \"transformers_version\": \"4.41.2\",\n  \"use_cache\": true,\n  \"vocab_size\": %d\n}\n",
              eps, theta, tdt, (int)a->n_vocab);
    if (b.oom) {
        free(b.s);
        return coopt_fail(COOPT_ERR_NOMEM, "synth: out of memory");
    }
    enum coopt_status rc = write_text(p->out_dir, "config.json", b.s);
    if (rc == COOPT_OK && q) {
        b.len = 0;
        gptq_json(&b, p, "");
        sb_printf(&b, "\n");
        rc = b.oom ? COOPT_ERR_NOMEM : write_text(p->out_dir, "quantize_config.json", b.s);
    }
    if (rc == COOPT_OK) {
        b.len = 0;
        sb_printf(&b,
                  "{\n  \"_from_model_config\": true,\n  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n"
                  "  \"transformers_version\": \"4.41.2\"\n}\n",
                  (int)a->bos_id, (int)a->eos_id);
        rc = b.oom ? COOPT_ERR_NOMEM : write_text(p->out_dir, "generation_config.json", b.s);
    }
    if (rc == COOPT_OK) {
        b.len = 0;
        sb_printf(&b,
                  "{\n  \"add_bos_token\": true,\n  \"add_eos_token\": false,\n  \"bos_token\": \"<s>\",\n"
                  "  \"clean_up_tokenization_spaces\": false,\n  \"eos_token\": \"</s>\",\n  \"legacy\": false,\n"
                  "  \"model_max_length\": %d,\n  \"pad_token\": null,\n  \"sp_model_kwargs\": {},\n"
                  "  \"tokenizer_class\": \"LlamaTokenizer\",\n  \"unk_token\": \"<unk>\"\n}\n",
                  (int)a->n_ctx);
        rc = b.oom ? COOPT_ERR_NOMEM : write_text(p->out_dir, "tokenizer_config.json", b.s);
    }
    if (rc == COOPT_OK) {
        rc = write_text(p->out_dir, "special_tokens_map.json",
                        "{\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n  \"unk_token\": \"<unk>\"\n}\n");
    }
    if (rc == COOPT_OK) {
        b.len = 0;
        sb_printf(&b,
                  "# %s\n\n"
                  "Random weights in the exact shapes and on-disk format of `%s` (%s), written by\n"
                  "`coopt synth` for speed measurements. The weights carry no knowledge: never use this\n"
                  "model for accuracy numbers.\n\n"
                  "- layers: %d%s\n- dtype: %s%s\n- seed: %llu\n"
                  "- tokenizer: %s%s\n",
                  r->model_name, a->name, a->hf_repo, (int)r->n_layers,
                  r->n_layers != a->n_layers ? " (overridden; the real model has more)" : "",
                  coopt_dtype_name(p->dtype), q ? " (GPTQ v1 format, symmetric, zero point 8)" : "",
                  (unsigned long long)p->seed,
                  p->tokenizer ? "the `tokenizer.model` given to coopt synth"
                               : "the Llama 2 SentencePiece `tokenizer.model` (32000 tokens)",
                  !p->tokenizer && a->n_vocab != 32000
                      ? ". vocab_size and bos/eos_token_id are the real model's, so the embedding has more\n"
                        "  rows than the tokenizer has ids and the tokenizer's own BOS/EOS are 1/2 (no real\n"
                        "  tokenizer of this model is available here)"
                      : "");
        rc = b.oom ? COOPT_ERR_NOMEM : write_text(p->out_dir, "README.md", b.s);
    }
    free(b.s);
    return rc;
}

static enum coopt_status copy_file(const char *src, const char *dir, const char *name) {
    char  *data = NULL;
    size_t len  = 0;
    char   path[4096];
    if (!coopt_path_join(path, sizeof(path), dir, name)) return coopt_fail(COOPT_ERR_IO, "%s: path too long", dir);
    enum coopt_status rc = coopt_read_file(src, &data, &len);
    if (rc != COOPT_OK) return rc;
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(data);
        return coopt_fail(COOPT_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    }
    bool ok = fwrite(data, 1, len, f) == len;
    if (fclose(f) != 0) ok = false;
    free(data);
    return ok ? COOPT_OK : coopt_fail(COOPT_ERR_IO, "%s: write failed: %s", path, strerror(errno));
}

static void shard_name(char *out, size_t cap, int shard, int n_shards) {
    if (n_shards == 1)
        snprintf(out, cap, "%s", COOPT_ST_SINGLE_NAME);
    else
        snprintf(out, cap, "model-%05d-of-%05d.safetensors", shard + 1, n_shards);
}

// Removes model.safetensors, model.safetensors.index.json, model-*-of-*.safetensors (and their
// .tmp) and quantize_config.json left by an earlier run, so the directory never mixes two models
// (a stale quantize_config.json would make loaders read an f16 model as GPTQ).
static enum coopt_status remove_stale(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return coopt_fail(COOPT_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    struct dirent    *e;
    enum coopt_status rc = COOPT_OK;
    while ((e = readdir(d)) != NULL) {
        const char *n     = e->d_name;
        bool        stale = !strcmp(n, COOPT_ST_SINGLE_NAME) || !strcmp(n, COOPT_ST_INDEX_NAME) ||
                     !strcmp(n, COOPT_ST_SINGLE_NAME ".tmp") || !strcmp(n, "quantize_config.json");
        unsigned a, b;
        char     tail[32] = "";
        if (!stale && sscanf(n, "model-%5u-of-%5u.safetensor%31s", &a, &b, tail) == 3)
            stale = !strcmp(tail, "s") || !strcmp(tail, "s.tmp");
        if (!stale) continue;
        char path[4096];
        if (coopt_path_join(path, sizeof(path), dir, n) && remove(path) != 0) {
            rc = coopt_fail(COOPT_ERR_IO, "%s: cannot remove the earlier run's file: %s", path, strerror(errno));
            break;
        }
    }
    closedir(d);
    return rc;
}

static enum coopt_status write_index(const struct synth_run *r) {
    struct sbuf b = {0};
    char        file[64];
    sb_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %llu\n  },\n  \"weight_map\": {\n",
              (unsigned long long)r->total_bytes);
    for (int i = 0; i < r->n_t; i++) {
        shard_name(file, sizeof(file), r->t[i].shard, r->n_shards);
        sb_printf(&b, "    \"%s\": \"%s\"%s\n", r->t[i].name, file, i + 1 < r->n_t ? "," : "");
    }
    sb_printf(&b, "  }\n}\n");
    enum coopt_status rc = b.oom ? coopt_fail(COOPT_ERR_NOMEM, "synth: out of memory")
                                 : write_text(r->p->out_dir, COOPT_ST_INDEX_NAME, b.s);
    free(b.s);
    return rc;
}

static enum coopt_status make_dir(const char *dir) {
    if (mkdir(dir, 0755) == 0) return COOPT_OK;
    if (errno == EEXIST && coopt_path_is_dir(dir)) return COOPT_OK;
    if (errno == EEXIST) return coopt_fail(COOPT_ERR_IO, "%s: exists and is not a directory", dir);
    return coopt_fail(COOPT_ERR_IO, "%s: cannot create directory: %s", dir, strerror(errno));
}

enum coopt_status coopt_synth_write(const struct coopt_synth_params *p, struct coopt_synth_result *res) {
    int64_t           t0 = coopt_time_us();
    struct synth_run  r;
    enum coopt_status rc = plan(&r, p);
    if (rc != COOPT_OK) goto done;

    // tokenizer first: a missing file should fail before gigabytes are written
    char        tokpath[4096];
    const char *tok = p->tokenizer;
    if (!tok) {
        const char *models = getenv("COOPT_MODELS");
        snprintf(tokpath, sizeof(tokpath), "%s/llama2-tokenizer/tokenizer.model",
                 models && *models ? models : "../shared/models");
        tok = tokpath;
    }
    if (access(tok, R_OK) != 0) {
        rc = coopt_fail(COOPT_ERR_IO, "synth: tokenizer %s: %s (set COOPT_MODELS or pass the tokenizer path)", tok,
                        strerror(errno));
        goto done;
    }
    if ((rc = make_dir(p->out_dir)) != COOPT_OK || (rc = remove_stale(p->out_dir)) != COOPT_OK ||
        (rc = write_configs(&r)) != COOPT_OK || (rc = copy_file(tok, p->out_dir, "tokenizer.model")) != COOPT_OK)
        goto done;

    if (!(r.fills = coopt_calloc((size_t)r.n_t, sizeof(*r.fills)))) {
        rc = COOPT_ERR_NOMEM;
        goto done;
    }
    r.t_start = r.t_last = coopt_time_us();
    r.tty                = isatty(2);
    char file[64], path[4096];
    for (int s = 0, i = 0; s < r.n_shards; s++) {
        struct coopt_st_writer *w = NULL;
        if ((rc = coopt_st_writer_init(&w)) != COOPT_OK) goto done;
        rc = coopt_st_writer_meta(w, "format", "pt");
        for (; rc == COOPT_OK && i < r.n_t && r.t[i].shard == s; i++) {
            const struct synth_tensor *t = &r.t[i];
            r.fills[i]                   = (struct fill_ctx){.run = &r, .idx = i};
            rc = coopt_st_writer_add_fn(w, t->name, t->dtype, t->n_dims, t->shape, fill_tensor, &r.fills[i]);
        }
        shard_name(file, sizeof(file), s, r.n_shards);
        if (rc == COOPT_OK && !coopt_path_join(path, sizeof(path), p->out_dir, file))
            rc = coopt_fail(COOPT_ERR_IO, "%s: path too long", p->out_dir);
        if (rc == COOPT_OK) rc = coopt_st_writer_write(w, path);
        coopt_st_writer_free(w);
        if (rc != COOPT_OK) goto done;
    }
    if (r.n_shards > 1 && (rc = write_index(&r)) != COOPT_OK) goto done;
    progress(&r, true);

done:
    if (rc == COOPT_OK && res) {
        fill_result(&r, res);
        res->seconds = (double)(coopt_time_us() - t0) * 1e-6;
    }
    if (rc != COOPT_OK && res) memset(res, 0, sizeof(*res));
    run_free(&r);
    return rc;
}
