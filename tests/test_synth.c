/*
 * test_synth.c -- `coopt synth`: the architecture table, tinyllama-1.1b --layers 2 written as
 * f16, bf16 and GPTQ (group 128, act-order off/on, sharded) into temporary directories, checked
 * tensor by tensor in the safetensors files, loaded with coopt_model_load and run for a few greedy
 * decode steps (finite logits with a sane spread; matmul inputs neither explode nor vanish), and
 * the error paths (unknown arch, bad dtype / group size, unwritable output, missing tokenizer).
 */
#include "context.h"
#include "convert.h"
#include "dtype.h"
#include "forward.h"
#include "model.h"
#include "safetensors.h"
#include "synth.h"
#include "test.h"
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// helpers defined in test_safetensors.c
bool        st_test_mkdtemp(char *buf, size_t cap);
void        st_test_rmtree(const char *dir);
void        st_test_capture_begin(void);
const char *st_test_capture_end(void);
bool        st_test_write_file(const char *dir, const char *name, const void *data, size_t n);

static const char *tokenizer_path(void) { return test_model_path("llama2-tokenizer/tokenizer.model"); }

static bool have_tokenizer(void) {
    FILE *f = fopen(tokenizer_path(), "rb");
    if (f) fclose(f);
    return f != NULL;
}

static struct coopt_synth_params tiny_params(const char *dir, enum coopt_dtype dt) {
    struct coopt_synth_params p = coopt_synth_default_params();
    p.arch                      = "tinyllama-1.1b";
    p.dtype                     = dt;
    p.n_layers                  = 2;
    p.seed                      = 7;
    p.out_dir                   = dir;
    p.tokenizer                 = tokenizer_path();
    return p;
}

static enum coopt_status synth_quiet(const struct coopt_synth_params *p, struct coopt_synth_result *r,
                                     const char **msg) {
    st_test_capture_begin();
    enum coopt_status rc = coopt_synth_write(p, r);
    const char       *m  = st_test_capture_end();
    if (msg) *msg = m;
    return rc;
}

// ---- architecture table ----

TEST(synth_arch_table) {
    const struct coopt_synth_arch *a = coopt_synth_arch_find("llama2-70b");
    CHECK(t, a && a->dim == 8192 && a->ffn_dim == 28672 && a->n_layers == 80 && a->n_heads == 64 &&
                 a->n_kv_heads == 8 && a->n_vocab == 32000);
    a = coopt_synth_arch_find("llama3-8b");
    CHECK(t, a && a->n_kv_heads == 8 && a->n_vocab == 128256 && a->n_ctx == 8192 && a->rope_theta == 500000.0);
    a = coopt_synth_arch_find("llama2-13b");
    CHECK(t, a && a->dim == 5120 && a->ffn_dim == 13824 && a->n_layers == 40 && a->n_kv_heads == 40);
    CHECK(t, !coopt_synth_arch_find("llama4") && !coopt_synth_arch_find(NULL));
    // parameter counts of the real checkpoints (HF model cards: 6.74B, 13.0B, 69.0B, 8.03B, 1.10B)
    static const struct {
        const char *name;
        double      b;
    } ref[] = {{"llama2-7b", 6.738}, {"llama2-13b", 13.016}, {"llama2-70b", 68.977}, {"llama3-8b", 8.030},
               {"tinyllama-1.1b", 1.100}};
    CHECK(t, coopt_synth_arch_count() == (int)COOPT_ARRAY_LEN(ref));
    for (size_t i = 0; i < COOPT_ARRAY_LEN(ref); i++) {
        struct coopt_synth_params p = coopt_synth_default_params();
        struct coopt_synth_result r;
        p.arch    = ref[i].name;
        p.out_dir = "unused";
        p.dtype   = COOPT_DTYPE_F16;
        CHECK(t, coopt_synth_plan(&p, &r) == COOPT_OK);
        CHECKF(t, fabs((double)r.n_params / 1e9 - ref[i].b) < 0.002, "%s: %.4fB params", ref[i].name,
               (double)r.n_params / 1e9);
        CHECK(t, r.tensor_bytes == 2 * r.n_params);
        // shards of at most 5e9 bytes, packed greedily in state_dict order (70B f16: 138 GB)
        uint64_t min_shards = (r.tensor_bytes + 4999999999ull) / 5000000000ull;
        CHECKF(t, (uint64_t)r.n_shards >= min_shards && (uint64_t)r.n_shards <= min_shards + 2, "%s: %d shards",
               ref[i].name, r.n_shards);
        if (!strcmp(ref[i].name, "llama2-70b")) CHECK(t, r.n_shards > 20);
    }
    // GPTQ sizes: 7B g128 ~3.9 GB (TheBloke's Llama-2-7B-GPTQ main: 3.90 GB), one file
    struct coopt_synth_params p = coopt_synth_default_params();
    struct coopt_synth_result r;
    p.arch    = "llama2-7b";
    p.out_dir = "unused";
    CHECK(t, coopt_synth_plan(&p, &r) == COOPT_OK);
    CHECKF(t, r.n_shards == 1 && fabs((double)r.tensor_bytes / 1e9 - 3.89) < 0.02, "%d shards %.3f GB",
           r.n_shards, (double)r.tensor_bytes / 1e9);
    CHECK(t, r.n_tensors == 3 + 32 * (7 * 4 + 2));
    CHECK(t, !strcmp(r.model_name, "synth-llama2-7b-gptq4-g128"));
    p.n_layers  = 4;
    p.act_order = true;
    p.group_size = -1;
    CHECK(t, coopt_synth_plan(&p, &r) == COOPT_OK && !strcmp(r.model_name, "synth-llama2-7b-4L-gptq4-gall-act"));
}

// ---- helpers for the written models ----

// Expected dtype/shape of every tensor of tinyllama-1.1b with n_layers layers.
struct exp_tensor {
    char             name[128];
    enum coopt_dtype dtype;
    int              n_dims;
    int64_t          shape[2];
};

static int expected_tensors(struct exp_tensor *e, int n_layers, enum coopt_dtype dt, int group_size) {
    const int64_t    dim = 2048, ffn = 5632, kv = 256, vocab = 32000;
    enum coopt_dtype fdt = dt == COOPT_DTYPE_Q4_GPTQ ? COOPT_DTYPE_F16 : dt;
    int              n   = 0;
#define E(nm, d, nd, s0, s1) (snprintf(e[n].name, sizeof(e[n].name), "%s", nm), e[n].dtype = (d), \
                              e[n].n_dims = (nd), e[n].shape[0] = (s0), e[n].shape[1] = (s1), n++)
    E("model.embed_tokens.weight", fdt, 2, vocab, dim);
    E("model.norm.weight", fdt, 1, dim, 0);
    E("lm_head.weight", fdt, 2, vocab, dim);
    static const char *lin[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
    const int64_t      io[][2] = {{dim, dim}, {kv, dim}, {kv, dim}, {dim, dim}, {ffn, dim}, {ffn, dim}, {dim, ffn}};
    char               nm[112];
    for (int l = 0; l < n_layers; l++) {
        snprintf(nm, sizeof(nm), "model.layers.%d.input_layernorm.weight", l);
        E(nm, fdt, 1, dim, 0);
        snprintf(nm, sizeof(nm), "model.layers.%d.post_attention_layernorm.weight", l);
        E(nm, fdt, 1, dim, 0);
        for (int i = 0; i < 7; i++) {
            int64_t o = io[i][0], in = io[i][1];
            if (dt != COOPT_DTYPE_Q4_GPTQ) {
                snprintf(nm, sizeof(nm), "model.layers.%d.%s.weight", l, lin[i]);
                E(nm, fdt, 2, o, in);
                continue;
            }
            int64_t g = group_size > 0 ? (in + group_size - 1) / group_size : 1;
            snprintf(nm, sizeof(nm), "model.layers.%d.%s.qweight", l, lin[i]);
            E(nm, COOPT_DTYPE_I32, 2, in / 8, o);
            snprintf(nm, sizeof(nm), "model.layers.%d.%s.qzeros", l, lin[i]);
            E(nm, COOPT_DTYPE_I32, 2, g, o / 8);
            snprintf(nm, sizeof(nm), "model.layers.%d.%s.scales", l, lin[i]);
            E(nm, COOPT_DTYPE_F16, 2, g, o);
            snprintf(nm, sizeof(nm), "model.layers.%d.%s.g_idx", l, lin[i]);
            E(nm, COOPT_DTYPE_I32, 1, in, 0);
        }
    }
#undef E
    return n;
}

// Checks names/dtypes/shapes of model.safetensors against the expected list (exactly).
static bool check_file_tensors(struct test_ctx *t, const struct coopt_safetensors *st, enum coopt_dtype dt,
                               int group_size) {
    static struct exp_tensor e[3 + 2 * 30];
    int                      n = expected_tensors(e, 2, dt, group_size);
    if (st->n_tensors != n) {
        test_fail(t, __FILE__, __LINE__, "%d tensors in the file, expected %d", st->n_tensors, n);
        return false;
    }
    for (int i = 0; i < n; i++) {
        const struct coopt_st_tensor *x = coopt_safetensors_find(st, e[i].name);
        bool ok = x && x->supported && x->dtype == e[i].dtype && x->n_dims == e[i].n_dims && x->shape[0] == e[i].shape[0] &&
                  (e[i].n_dims == 1 || x->shape[1] == e[i].shape[1]);
        if (!ok) {
            test_fail(t, __FILE__, __LINE__, "tensor '%s' missing or wrong dtype/shape", e[i].name);
            return false;
        }
    }
    if (!coopt_safetensors_meta(st, "format") || strcmp(coopt_safetensors_meta(st, "format"), "pt") != 0) {
        test_fail(t, __FILE__, __LINE__, "__metadata__ format != pt");
        return false;
    }
    return true;
}

static double f16ish(const struct coopt_st_tensor *x, int64_t i) {
    const uint16_t *u = x->data;
    uint16_t        v;
    memcpy(&v, u + i, 2);
    return x->dtype == COOPT_DTYPE_BF16 ? coopt_bf16_to_f32(v) : coopt_f16_to_f32(v);
}

// mean and std of the first n elements of an f16/bf16 tensor
static void stats16(const struct coopt_st_tensor *x, int64_t n, double *mean, double *std) {
    double s = 0, ss = 0;
    for (int64_t i = 0; i < n; i++) {
        double v = f16ish(x, i);
        s += v;
        ss += v * v;
    }
    *mean = s / (double)n;
    *std  = sqrt(ss / (double)n - *mean * *mean);
}

struct act_stats {
    double sumsq[2][4];
    double n[2][4];
    bool   finite;
};

static void hook_fn(void *ud, int32_t layer, int32_t which, const float *x, int32_t n_rows, int32_t n_in) {
    struct act_stats *s = ud;
    if (layer >= 2) return;
    for (int64_t i = 0; i < (int64_t)n_rows * n_in; i++) {
        if (!isfinite(x[i])) s->finite = false;
        s->sumsq[layer][which] += (double)x[i] * x[i];
    }
    s->n[layer][which] += (double)n_rows * n_in;
}

// Loads dir, checks the config, runs a 5-token prompt and 3 greedy steps. Fills first_logits
// [32000] with the logits after the prompt.
static void run_model(struct test_ctx *t, const char *dir, enum coopt_dtype want, float *first_logits) {
    struct coopt_model *m = NULL;
    st_test_capture_begin();
    enum coopt_status rc = coopt_model_load(dir, NULL, &m);
    const char       *msg = st_test_capture_end();
    CHECKF(t, rc == COOPT_OK, "load %s: %s %s", dir, coopt_status_str(rc), msg);
    const struct coopt_model_info *in = coopt_model_get_info(m);
    bool cfg_ok = in->dim == 2048 && in->n_layers == 2 && in->n_heads == 32 && in->n_kv_heads == 4 && in->head_dim == 64 &&
                  in->ffn_dim == 5632 && in->n_vocab == 32000 && in->n_ctx_train == 2048 && in->weight_dtype == want &&
                  m->config.rope_theta == 10000.0f && fabsf(m->config.norm_eps - 1e-5f) < 1e-9f &&
                  !m->config.tied_embeddings && coopt_tokenizer_n_vocab(coopt_model_tokenizer(m)) == 32000;
    if (!cfg_ok) coopt_model_free(m);
    CHECKF(t, cfg_ok, "config: %s", in->desc);

    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx                   = 64;
    cp.n_seq_max               = 1;
    cp.n_threads               = 2;
    struct coopt_ctx *c        = NULL;
    struct act_stats  st       = {.finite = true};
    struct coopt_forward_hook hook = {.fn = hook_fn, .ud = &st};
    int32_t           seq = 0;
    bool              ok = coopt_ctx_init(m, &cp, &c) == COOPT_OK && coopt_ctx_set_hook(c, &hook) == COOPT_OK &&
              coopt_seq_new(c, &seq) == COOPT_OK;
    int32_t toks[5] = {1, 9038, 2501, 263, 931}; // "<s> Once upon a time"
    int32_t seqs[5] = {seq, seq, seq, seq, seq};
    double  lstd[4] = {0};
    bool    finite  = true;
    for (int step = 0; ok && step < 4; step++) {
        struct coopt_batch_input b = {.n_tokens = step ? 1 : 5, .tokens = toks, .seq_ids = seqs};
        ok                         = coopt_ctx_decode(c, &b) == COOPT_OK;
        const float *lg            = ok ? coopt_ctx_logits(c, b.n_tokens - 1) : NULL;
        if (!lg) {
            ok = false;
            break;
        }
        double s = 0, ss = 0;
        int    best = 0;
        for (int i = 0; i < 32000; i++) {
            if (!isfinite(lg[i])) finite = false;
            s += lg[i];
            ss += (double)lg[i] * lg[i];
            if (lg[i] > lg[best]) best = i;
        }
        lstd[step] = sqrt(ss / 32000 - (s / 32000) * (s / 32000));
        if (step == 0 && first_logits) memcpy(first_logits, lg, 32000 * sizeof(float));
        toks[0] = best; // greedy
    }
    coopt_ctx_free(c);
    coopt_model_free(m);
    CHECK(t, ok);
    CHECK(t, finite && st.finite);
    for (int s = 0; s < 4; s++) CHECKF(t, lstd[s] > 0.3 && lstd[s] < 10, "logits std %.3g at step %d", lstd[s], s);
    // matmul inputs: normed (RMS 1), attention output (RMS ~ |v| ~ 1), silu(gate)*up (~0.5):
    // none may explode or vanish
    for (int l = 0; l < 2; l++) {
        for (int w = 0; w < 4; w++) {
            double rms = sqrt(st.sumsq[l][w] / st.n[l][w]);
            CHECKF(t, rms > 0.05 && rms < 5, "layer %d matmul input %d RMS %.3g", l, w, rms);
        }
    }
}

static bool same_bytes(const struct coopt_safetensors *a, const struct coopt_safetensors *b, const char *name) {
    const struct coopt_st_tensor *x = coopt_safetensors_find(a, name), *y = coopt_safetensors_find(b, name);
    return x && y && x->n_bytes == y->n_bytes && memcmp(x->data, y->data, x->n_bytes) == 0;
}

// ---- written models ----

TEST(synth_tinyllama_f16) {
    if (!have_tokenizer()) SKIP(t, "llama2-tokenizer/tokenizer.model not available");
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    strcat(dir, "/out"); // created by synth
    struct coopt_synth_params p = tiny_params(dir, COOPT_DTYPE_F16);
    struct coopt_synth_result r;
    const char               *msg;
    enum coopt_status         rc = synth_quiet(&p, &r, &msg);
    CHECKF(t, rc == COOPT_OK, "%s", msg);
    CHECK(t, r.n_shards == 1 && r.n_layers == 2 && r.n_tensors == 3 + 2 * 9 &&
                 !strcmp(r.model_name, "synth-tinyllama-1.1b-2L-f16"));
    static const char *files[] = {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                                  "special_tokens_map.json", "README.md", "model.safetensors"};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(files); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        CHECKF(t, coopt_path_exists(path), "%s missing", files[i]);
    }
    snprintf(path, sizeof(path), "%s/quantize_config.json", dir);
    CHECK(t, !coopt_path_exists(path));
    // config.json through the loader's own parser, plus the honest layer count
    char  *text = NULL;
    size_t len  = 0;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    CHECK(t, coopt_read_file(path, &text, &len) == COOPT_OK);
    struct coopt_model_config    cfg;
    struct coopt_hf_config_extra x;
    rc      = coopt_hf_parse_config(text, len, path, &cfg, &x);
    bool ok = rc == COOPT_OK && !strcmp(x.arch, "LlamaForCausalLM") && !x.quantized && cfg.n_layers == 2 &&
              x.bos_id == 1 && x.eos_id == 2 && strstr(text, "\"torch_dtype\": \"float16\"") &&
              strstr(text, "\"layers_of_arch\": 22") && strstr(text, "\"rope_scaling\": null") &&
              strstr(text, "\"_name_or_path\": \"synth-tinyllama-1.1b-2L-f16\"");
    free(text);
    CHECK(t, ok);

    struct coopt_safetensors *st = NULL;
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK(t, coopt_safetensors_open(path, &st) == COOPT_OK);
    ok = check_file_tensors(t, st, COOPT_DTYPE_F16, 128);
    double mean, std;
    if (ok) {
        // statistics: embedding N(0,1), q N(0, 1/2048), down N(0, 1/5632) / sqrt(2*2), lm_head N(0, 1/2048)
        static const struct {
            const char *name;
            double      std;
        } want[] = {{"model.embed_tokens.weight", 1.0},
                    {"model.layers.0.self_attn.q_proj.weight", 0.0221},
                    {"model.layers.1.self_attn.o_proj.weight", 0.0221 / 2},
                    {"model.layers.1.mlp.down_proj.weight", 0.01332 / 2},
                    {"lm_head.weight", 0.0221}};
        for (size_t i = 0; ok && i < COOPT_ARRAY_LEN(want); i++) {
            stats16(coopt_safetensors_find(st, want[i].name), 1 << 20, &mean, &std);
            ok = fabs(std / want[i].std - 1) < 0.02 && fabs(mean) < 0.01 * want[i].std;
            if (!ok) test_fail(t, __FILE__, __LINE__, "%s: mean %.3g std %.4g, want std %.4g", want[i].name, mean, std, want[i].std);
        }
        const struct coopt_st_tensor *nw = coopt_safetensors_find(st, "model.layers.1.input_layernorm.weight");
        for (int64_t i = 0; ok && i < 2048; i++) ok = f16ish(nw, i) == 1.0;
        if (!ok && !t->failed) test_fail(t, __FILE__, __LINE__, "norm weights are not 1");
    }
    coopt_safetensors_free(st);
    if (ok) run_model(t, dir, COOPT_DTYPE_F16, NULL);
    *strrchr(dir, '/') = '\0';
    st_test_rmtree(dir);
}

TEST(synth_tinyllama_gptq) {
    if (!have_tokenizer()) SKIP(t, "llama2-tokenizer/tokenizer.model not available");
    char dir[512], dir2[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    CHECK(t, st_test_mkdtemp(dir2, sizeof(dir2)));
    static float logits[2][32000];
    for (int act = 0; act < 2; act++) {
        struct coopt_synth_params p = tiny_params(dir, COOPT_DTYPE_Q4_GPTQ);
        p.act_order                 = act;
        struct coopt_synth_result r;
        const char               *msg;
        enum coopt_status         rc = synth_quiet(&p, &r, &msg);
        CHECKF(t, rc == COOPT_OK, "%s", msg);
        CHECK(t, r.n_shards == 1 && r.n_tensors == 3 + 2 * 30);

        char  *text = NULL;
        size_t len  = 0;
        snprintf(path, sizeof(path), "%s/config.json", dir);
        CHECK(t, coopt_read_file(path, &text, &len) == COOPT_OK);
        struct coopt_model_config    cfg;
        struct coopt_hf_config_extra x;
        rc      = coopt_hf_parse_config(text, len, path, &cfg, &x);
        bool ok = rc == COOPT_OK && x.quantized && !strcmp(x.quant_method, "gptq") && x.q_bits == 4 &&
                  x.q_group_size == 128 && x.q_desc_act == (act == 1) && x.q_sym && !x.q_zeros_v2 &&
                  strstr(text, "\"torch_dtype\": \"float16\"");
        free(text);
        CHECK(t, ok);
        snprintf(path, sizeof(path), "%s/quantize_config.json", dir);
        CHECK(t, coopt_path_exists(path));

        struct coopt_safetensors *st = NULL;
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        CHECK(t, coopt_safetensors_open(path, &st) == COOPT_OK);
        ok = check_file_tensors(t, st, COOPT_DTYPE_Q4_GPTQ, 128);
        if (ok) {
            // zeros: every nibble 7 (zero point 8, v1 stores zero - 1)
            const struct coopt_st_tensor *z = coopt_safetensors_find(st, "model.layers.1.mlp.down_proj.qzeros");
            for (int64_t i = 0; ok && i < z->n_elems; i++) {
                int32_t v;
                memcpy(&v, (const int32_t *)z->data + i, 4);
                ok = (uint32_t)v == 0x77777777u;
            }
            if (!ok) test_fail(t, __FILE__, __LINE__, "qzeros not all 0x77777777");
        }
        if (ok) {
            // codes: within [1, 15], roughly symmetric around 8 with std ~2.5
            const struct coopt_st_tensor *q = coopt_safetensors_find(st, "model.layers.0.mlp.up_proj.qweight");
            double                        s = 0, ss = 0;
            int64_t                       n = 0, bad = 0;
            for (int64_t i = 0; i < 1 << 18; i++) {
                uint32_t v;
                memcpy(&v, (const uint32_t *)q->data + i, 4);
                for (int k = 0; k < 8; k++, n++) {
                    int c = (int)(v >> (4 * k) & 15) - 8;
                    bad += c < -7;
                    s += c;
                    ss += c * c;
                }
            }
            double mean = s / (double)n, sd = sqrt(ss / (double)n - mean * mean);
            ok = bad == 0 && fabs(mean) < 0.02 && sd > 2.2 && sd < 2.9;
            if (!ok) test_fail(t, __FILE__, __LINE__, "codes: mean %.3f std %.3f, %lld zeros", mean, sd, (long long)bad);
        }
        if (ok) {
            // g_idx: 128 rows per group; i / 128 without act-order, a shuffled map with it;
            // q, k and v share their input and so their g_idx; o does not
            const struct coopt_st_tensor *gq = coopt_safetensors_find(st, "model.layers.0.self_attn.q_proj.g_idx"),
                                         *gk = coopt_safetensors_find(st, "model.layers.0.self_attn.k_proj.g_idx"),
                                         *go = coopt_safetensors_find(st, "model.layers.0.self_attn.o_proj.g_idx");
            int32_t count[16] = {0};
            int64_t ident = 0;
            for (int64_t i = 0; i < 2048; i++) {
                int32_t g;
                memcpy(&g, (const int32_t *)gq->data + i, 4);
                if (g < 0 || g >= 16) {
                    ok = false;
                    break;
                }
                count[g]++;
                ident += g == i / 128;
            }
            for (int g = 0; ok && g < 16; g++) ok = count[g] == 128;
            ok = ok && (act ? ident < 512 : ident == 2048) &&
                 memcmp(gq->data, gk->data, gq->n_bytes) == 0 &&
                 (act ? memcmp(gq->data, go->data, gq->n_bytes) != 0 : true);
            if (!ok) test_fail(t, __FILE__, __LINE__, "g_idx wrong (act-order %d)", act);
        }
        coopt_safetensors_free(st);
        if (!ok) break;
        run_model(t, dir, COOPT_DTYPE_Q4_GPTQ, logits[act]);
        if (t->failed) break;
    }
    // the same codes and scales under a different g_idx give different logits
    if (!t->failed) {
        double d = 0;
        for (int i = 0; i < 32000; i++) d = fmax(d, fabs(logits[0][i] - logits[1][i]));
        CHECKF(t, d > 1e-3, "act-order did not change the logits (max diff %.3g)", d);
    }

    // sharded into the same directory: the single file goes, shards + index come, and every
    // tensor is byte-identical to a single-file run (data depends on seed and name only)
    if (!t->failed) {
        struct coopt_synth_params p = tiny_params(dir, COOPT_DTYPE_Q4_GPTQ);
        p.max_shard_bytes           = 100000000; // 100 MB: embed | layers | lm_head
        struct coopt_synth_result r;
        const char               *msg;
        enum coopt_status         rc = synth_quiet(&p, &r, &msg);
        CHECKF(t, rc == COOPT_OK, "%s", msg);
        CHECKF(t, r.n_shards == 3, "%d shards", r.n_shards);
        snprintf(path, sizeof(path), "%s/model.safetensors", dir);
        CHECK(t, !coopt_path_exists(path));
        snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
        char  *text = NULL;
        size_t len  = 0;
        CHECK(t, coopt_read_file(path, &text, &len) == COOPT_OK);
        char want[128];
        snprintf(want, sizeof(want), "\"total_size\": %llu", (unsigned long long)r.tensor_bytes);
        bool ok = strstr(text, want) && strstr(text, "\"lm_head.weight\": \"model-00003-of-00003.safetensors\"") &&
                  strstr(text, "\"model.embed_tokens.weight\": \"model-00001-of-00003.safetensors\"");
        free(text);
        CHECK(t, ok);
        p.out_dir         = dir2;
        p.max_shard_bytes = 0;
        rc                = synth_quiet(&p, &r, &msg);
        CHECKF(t, rc == COOPT_OK, "%s", msg);
        struct coopt_safetensors *a = NULL, *b = NULL;
        snprintf(path, sizeof(path), "%s/model-00002-of-00003.safetensors", dir);
        ok = coopt_safetensors_open(path, &a) == COOPT_OK;
        snprintf(path, sizeof(path), "%s/model.safetensors", dir2);
        ok = ok && coopt_safetensors_open(path, &b) == COOPT_OK;
        ok = ok && same_bytes(a, b, "model.layers.1.mlp.down_proj.qweight") &&
             same_bytes(a, b, "model.layers.0.self_attn.q_proj.scales") &&
             same_bytes(a, b, "model.layers.1.self_attn.v_proj.g_idx");
        coopt_safetensors_free(a);
        coopt_safetensors_free(b);
        CHECK(t, ok);
        run_model(t, dir, COOPT_DTYPE_Q4_GPTQ, logits[1]);
        if (!t->failed) {
            double d = 0;
            for (int i = 0; i < 32000; i++) d = fmax(d, fabs(logits[0][i] - logits[1][i]));
            CHECKF(t, d == 0, "sharded model gives other logits (max diff %.3g)", d);
        }
    }
    st_test_rmtree(dir);
    st_test_rmtree(dir2);
}

TEST(synth_tinyllama_bf16) {
    if (!have_tokenizer()) SKIP(t, "llama2-tokenizer/tokenizer.model not available");
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    struct coopt_synth_params p = tiny_params(dir, COOPT_DTYPE_BF16);
    p.n_layers                  = 1;
    // leftovers of an earlier GPTQ, sharded run into the same directory must go
    CHECK(t, st_test_write_file(dir, "quantize_config.json", "{\"bits\": 4}", 11));
    CHECK(t, st_test_write_file(dir, "model-00001-of-00002.safetensors", "x", 1));
    CHECK(t, st_test_write_file(dir, "model.safetensors.index.json", "{}", 2));
    CHECK(t, st_test_write_file(dir, "notes.txt", "keep", 4));
    const char *msg;
    CHECKF(t, synth_quiet(&p, NULL, &msg) == COOPT_OK, "%s", msg);
    static const char *gone[] = {"quantize_config.json", "model-00001-of-00002.safetensors",
                                 "model.safetensors.index.json"};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(gone); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, gone[i]);
        CHECKF(t, !coopt_path_exists(path), "stale %s left", gone[i]);
    }
    snprintf(path, sizeof(path), "%s/notes.txt", dir);
    CHECK(t, coopt_path_exists(path));
    struct coopt_safetensors *st = NULL;
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK(t, coopt_safetensors_open(path, &st) == COOPT_OK);
    const struct coopt_st_tensor *e = coopt_safetensors_find(st, "model.embed_tokens.weight"),
                                 *n = coopt_safetensors_find(st, "model.norm.weight");
    double mean = 0, std = 0;
    if (e && e->dtype == COOPT_DTYPE_BF16) stats16(e, 1 << 20, &mean, &std);
    bool ok = e && e->dtype == COOPT_DTYPE_BF16 && fabs(std - 1) < 0.02 && n && f16ish(n, 5) == 1.0;
    coopt_safetensors_free(st);
    struct coopt_model *m = NULL;
    st_test_capture_begin();
    enum coopt_status rc = ok ? coopt_model_load(dir, NULL, &m) : COOPT_ERR_FORMAT;
    msg                  = st_test_capture_end();
    ok = ok && rc == COOPT_OK && coopt_model_get_info(m)->weight_dtype == COOPT_DTYPE_BF16 && m->config.n_layers == 1;
    coopt_model_free(m);
    st_test_rmtree(dir);
    CHECKF(t, ok, "bf16 model: std %.3g, %s", std, msg);
}

// ---- errors ----

TEST(synth_errors) {
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    snprintf(path, sizeof(path), "%s/out", dir);
    struct coopt_synth_params p = tiny_params(path, COOPT_DTYPE_Q4_GPTQ);
    const char               *msg;

    p.arch = "llama5-1t";
    CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_INVALID);
    CHECKF(t, strstr(msg, "unknown architecture 'llama5-1t'") && strstr(msg, "llama2-7b") &&
                  strstr(msg, "llama3-8b") && strstr(msg, "llama2-70b") && strstr(msg, "tinyllama-1.1b"),
           "%s", msg);
    p.arch  = "tinyllama-1.1b";
    p.dtype = COOPT_DTYPE_Q8_0;
    CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_INVALID);
    CHECKF(t, strstr(msg, "dtype 'q8_0' is not supported (supported: gptq4, f16, bf16)"), "%s", msg);
    p.dtype      = COOPT_DTYPE_Q4_GPTQ;
    p.group_size = 100;
    CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_INVALID);
    CHECKF(t, strstr(msg, "group size 100"), "%s", msg);
    p.group_size = 128;
    p.n_layers   = -3;
    CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_INVALID);
    p.n_layers = 1;
    p.n_vocab  = -5;
    CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_INVALID);
    CHECKF(t, strstr(msg, "vocabulary size -5 out of range"), "%s", msg);
    p.n_vocab = 0;
    CHECK(t, !coopt_path_exists(path)); // nothing written by the failures above

    // missing tokenizer: fails before anything is written
    p.tokenizer = "/nonexistent/tokenizer.model";
    CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_IO);
    CHECKF(t, strstr(msg, "/nonexistent/tokenizer.model"), "%s", msg);
    CHECK(t, !coopt_path_exists(path));

    // output not writable: its parent is a regular file (fails even as root)
    if (have_tokenizer()) {
        p.tokenizer = tokenizer_path();
        CHECK(t, st_test_write_file(dir, "file", "x", 1));
        char bad[1100];
        snprintf(bad, sizeof(bad), "%s/file/out", dir);
        p.out_dir = bad;
        CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_IO);
        CHECKF(t, strstr(msg, "/file/out: cannot create directory"), "%s", msg);
        snprintf(bad, sizeof(bad), "%s/file", dir); // exists, not a directory
        CHECK(t, synth_quiet(&p, NULL, &msg) == COOPT_ERR_IO);
        CHECKF(t, strstr(msg, "exists and is not a directory"), "%s", msg);
    }
    st_test_rmtree(dir);
}

// A checkpoint whose vocab_size exceeds its tokenizer (padded vocabularies, llama3-8b's 128256
// rows with the Llama 2 tokenizer) converts to a GGUF with one token per embedding row: the
// extra rows are "[PAD<id>]" pieces of type UNUSED (llama.cpp refuses a shorter token list), and
// encoding is unchanged.
TEST(synth_padded_vocab_to_gguf) {
    if (!have_tokenizer()) SKIP(t, "llama2-tokenizer/tokenizer.model not available");
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    size_t base = strlen(dir);
    strcat(dir, "/out");
    struct coopt_synth_params p = tiny_params(dir, COOPT_DTYPE_F16);
    p.n_layers                  = 1;
    p.n_vocab                   = 32003;
    struct coopt_synth_result r;
    const char               *msg;
    CHECKF(t, synth_quiet(&p, &r, &msg) == COOPT_OK, "%s", msg);
    snprintf(path, sizeof(path), "%.*s/m.gguf", (int)base, dir);
    struct coopt_convert_params cp = coopt_convert_default_params();
    coopt_log_set_quiet(1);
    enum coopt_status st = coopt_convert(dir, path, &cp);
    coopt_log_set_quiet(0);
    CHECK(t, st == COOPT_OK);
    struct coopt_model_params mp = coopt_model_default_params();
    struct coopt_model       *m  = NULL;
    CHECK(t, coopt_model_load(path, &mp, &m) == COOPT_OK);
    const struct coopt_tokenizer *tok = coopt_model_tokenizer(m);
    size_t                        len = 0;
    const char                   *pc  = coopt_tokenizer_piece(tok, 32002, &len);
    int32_t                      *ids = NULL;
    size_t                        n   = 0;
    bool ok = m->config.n_vocab == 32003 && coopt_tokenizer_n_vocab(tok) == 32003 && pc && len == 10 &&
              !memcmp(pc, "[PAD32002]", 10) &&
              coopt_tokenize(tok, "Once upon a time", 16, COOPT_TOKENIZE_ADD_BOS, &ids, &n) == COOPT_OK && n == 5 &&
              ids[0] == 1 && ids[1] == 9038 && ids[2] == 2501 && ids[3] == 263 && ids[4] == 931;
    free(ids);
    coopt_model_free(m);
    dir[base] = '\0';
    st_test_rmtree(dir);
    CHECK(t, ok);
}
