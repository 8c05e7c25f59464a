/*
 * hf.c -- Hugging Face model directories: config.json, generation_config.json and safetensors
 * weights (one model.safetensors, or shards listed by model.safetensors.index.json).
 *
 * Every shard is mapped once through coopt_model_map_file (the model owns the mappings) and
 * parsed; weights become coopt_weight views into the mappings, norms and biases owned f32
 * copies. This file checks what only it knows (the tensor exists where the index says, has
 * 1 or 2 dimensions and a float dtype); shapes against the config are checked afterwards by
 * coopt_model_finish(). Linear layers are bound by prefix ("model.layers.3.mlp.up_proj") in
 * bind_linear(), the one place a GPTQ binder (qweight/qzeros/scales/g_idx) will plug in.
 */
#include "json_util.h"
#include "model.h"
#include "safetensors.h"
#include "gptq.h"
#include "tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- config.json ----

static bool arch_supported(const char *a) {
    return strcmp(a, "LlamaForCausalLM") == 0 || strcmp(a, "MistralForCausalLM") == 0 ||
           strcmp(a, "llama") == 0 || strcmp(a, "mistral") == 0;
}

static enum coopt_status parse_arch(const cJSON *root, const char *name,
                                    struct coopt_hf_config_extra *x) {
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const char  *arch  = NULL;
    bool         ok    = false;
    if (archs && !cJSON_IsNull(archs)) {
        if (!cJSON_IsArray(archs)) {
            return coopt_fail(COOPT_ERR_FORMAT,
                              "%s: field 'architectures' must be an array, got %s", name,
                              coopt_json_type_name(archs));
        }
        for (const cJSON *it = archs->child; it; it = it->next) {
            if (!cJSON_IsString(it)) {
                return coopt_fail(COOPT_ERR_FORMAT, "%s: 'architectures' must hold strings", name);
            }
            if (!arch) arch = it->valuestring;
            if (!ok && arch_supported(it->valuestring)) {
                ok   = true;
                arch = it->valuestring;
            }
        }
    }
    if (!arch) {
        enum coopt_status rc = coopt_json_str_opt(root, "model_type", name, &arch);
        if (rc != COOPT_OK) return rc;
        if (!arch) {
            return coopt_fail(COOPT_ERR_FORMAT,
                              "%s: neither 'architectures' nor 'model_type' is set", name);
        }
        ok = arch_supported(arch);
    }
    snprintf(x->arch, sizeof(x->arch), "%s", arch);
    if (!ok) {
        return coopt_fail(COOPT_ERR_UNSUPPORTED,
                          "%s: architecture '%.64s' is not supported (supported: LlamaForCausalLM, "
                          "MistralForCausalLM)",
                          name, arch);
    }
    return COOPT_OK;
}

static enum coopt_status parse_rope_scaling(const cJSON *root, const char *name,
                                            struct coopt_model_config *c) {
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    c->rope_scaling = COOPT_ROPE_SCALING_NONE;
    c->rope_factor  = 1.0f;
    if (!rs || cJSON_IsNull(rs)) return COOPT_OK;
    if (!cJSON_IsObject(rs)) {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: field 'rope_scaling' must be an object or null, got %s", name,
                          coopt_json_type_name(rs));
    }
    char rs_name[600];
    snprintf(rs_name, sizeof(rs_name), "%s: rope_scaling", name);
    const char       *type = NULL;
    enum coopt_status rc   = coopt_json_str_opt(rs, "rope_type", rs_name, &type);
    if (rc == COOPT_OK && !type) rc = coopt_json_str_opt(rs, "type", rs_name, &type);
    if (rc != COOPT_OK) return rc;
    if (!type)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: rope_scaling has no 'rope_type' or 'type'", name);
    double f;
    if (strcmp(type, "default") == 0) return COOPT_OK;
    if (strcmp(type, "linear") == 0) {
        if ((rc = coopt_json_num(rs, "factor", rs_name, 1e-6, 1e6, &f)) != COOPT_OK) return rc;
        c->rope_scaling = COOPT_ROPE_SCALING_LINEAR;
        c->rope_factor  = (float)f;
        return COOPT_OK;
    }
    if (strcmp(type, "llama3") == 0) {
        double  lo, hi;
        int64_t orig;
        if ((rc = coopt_json_num(rs, "factor", rs_name, 1e-6, 1e6, &f)) != COOPT_OK ||
            (rc = coopt_json_num(rs, "low_freq_factor", rs_name, 1e-6, 1e6, &lo)) != COOPT_OK ||
            (rc = coopt_json_num(rs, "high_freq_factor", rs_name, 1e-6, 1e6, &hi)) != COOPT_OK ||
            (rc = coopt_json_int(rs, "original_max_position_embeddings", rs_name, 1, INT32_MAX,
                                 &orig)) != COOPT_OK) {
            return rc;
        }
        if (!(hi > lo)) {
            return coopt_fail(COOPT_ERR_FORMAT,
                              "%s: rope_scaling high_freq_factor %g must exceed low_freq_factor %g",
                              name, hi, lo);
        }
        c->rope_scaling          = COOPT_ROPE_SCALING_LLAMA3;
        c->rope_factor           = (float)f;
        c->rope_low_freq_factor  = (float)lo;
        c->rope_high_freq_factor = (float)hi;
        c->rope_orig_ctx         = (int32_t)orig;
        return COOPT_OK;
    }
    return coopt_fail(COOPT_ERR_UNSUPPORTED,
                      "%s: rope_scaling type '%.32s' is not supported (supported: linear, llama3)",
                      name, type);
}

// bos_token_id / eos_token_id: an integer, or a list whose first entry we keep (Llama 3.1 eos).
static enum coopt_status parse_token_id(const cJSON *root, const char *key, const char *name,
                                        int32_t *out) {
    *out              = -1;
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item || cJSON_IsNull(item)) return COOPT_OK;
    if (cJSON_IsArray(item)) item = item->child;
    int64_t v;
    if (!item || !coopt_json_item_int(item, 0, INT32_MAX, &v)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: field '%s' must be a token id or a list of them",
                          name, key);
    }
    *out = (int32_t)v;
    return COOPT_OK;
}

enum coopt_status coopt_hf_parse_config(const char *json, size_t len, const char *name,
                                        struct coopt_model_config    *cfg,
                                        struct coopt_hf_config_extra *extra) {
    struct coopt_hf_config_extra  xx;
    struct coopt_hf_config_extra *x = extra ? extra : &xx;
    memset(cfg, 0, sizeof(*cfg));
    memset(x, 0, sizeof(*x));
    x->bos_id = x->eos_id = -1;

    cJSON            *root = NULL;
    enum coopt_status rc   = coopt_json_parse(json, len, name, &root);
    if (rc != COOPT_OK) return rc;
    if (!cJSON_IsObject(root)) {
        rc = coopt_fail(COOPT_ERR_FORMAT, "%s: expected a JSON object, got %s", name,
                        coopt_json_type_name(root));
        goto done;
    }
    if ((rc = parse_arch(root, name, x)) != COOPT_OK) goto done;

    const char *act = NULL;
    if ((rc = coopt_json_str_opt(root, "hidden_act", name, &act)) != COOPT_OK) goto done;
    if (act && strcmp(act, "silu") != 0) {
        rc = coopt_fail(COOPT_ERR_UNSUPPORTED,
                        "%s: hidden_act '%.32s' is not supported (supported: silu)", name, act);
        goto done;
    }

    int64_t dim, ffn, n_layers, n_heads, n_kv, head_dim, vocab, n_ctx, swa;
    if ((rc = coopt_json_int(root, "hidden_size", name, 1, 1 << 20, &dim)) != COOPT_OK ||
        (rc = coopt_json_int(root, "intermediate_size", name, 1, 1 << 22, &ffn)) != COOPT_OK ||
        (rc = coopt_json_int(root, "num_hidden_layers", name, 1, 1024, &n_layers)) != COOPT_OK ||
        (rc = coopt_json_int(root, "num_attention_heads", name, 1, 4096, &n_heads)) != COOPT_OK ||
        (rc = coopt_json_int_opt(root, "num_key_value_heads", name, 1, n_heads, n_heads, &n_kv)) !=
            COOPT_OK ||
        (rc = coopt_json_int(root, "vocab_size", name, 1, 1 << 24, &vocab)) != COOPT_OK ||
        (rc = coopt_json_int_opt(root, "max_position_embeddings", name, 1, INT32_MAX, 2048,
                                 &n_ctx)) != COOPT_OK ||
        (rc = coopt_json_int_opt(root, "sliding_window", name, 0, INT32_MAX, 0, &swa)) !=
            COOPT_OK) {
        goto done;
    }
    if (n_heads % n_kv != 0) {
        rc =
            coopt_fail(COOPT_ERR_FORMAT,
                       "%s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld",
                       name, (long long)n_heads, (long long)n_kv);
        goto done;
    }
    if (coopt_json_has(root, "head_dim")) {
        if ((rc = coopt_json_int(root, "head_dim", name, 1, 4096, &head_dim)) != COOPT_OK)
            goto done;
    } else {
        if (dim % n_heads != 0) {
            rc = coopt_fail(COOPT_ERR_FORMAT,
                            "%s: hidden_size %lld is not a multiple of num_attention_heads %lld "
                            "(and head_dim is not set)",
                            name, (long long)dim, (long long)n_heads);
            goto done;
        }
        head_dim = dim / n_heads;
    }
    if (head_dim % 2 != 0) {
        rc = coopt_fail(COOPT_ERR_FORMAT, "%s: head_dim %lld must be even for RoPE", name,
                        (long long)head_dim);
        goto done;
    }
    double eps, theta;
    if ((rc = coopt_json_num_opt(root, "rms_norm_eps", name, 0, 1, 1e-6, &eps)) != COOPT_OK ||
        (rc = coopt_json_num_opt(root, "rope_theta", name, 1e-3, 1e12, 10000.0, &theta)) !=
            COOPT_OK ||
        (rc = coopt_json_bool_opt(root, "tie_word_embeddings", name, false,
                                  &cfg->tied_embeddings)) != COOPT_OK ||
        (rc = parse_rope_scaling(root, name, cfg)) != COOPT_OK ||
        (rc = parse_token_id(root, "bos_token_id", name, &x->bos_id)) != COOPT_OK ||
        (rc = parse_token_id(root, "eos_token_id", name, &x->eos_id)) != COOPT_OK) {
        goto done;
    }
    x->tie_explicit = coopt_json_has(root, "tie_word_embeddings");

    const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (q && !cJSON_IsNull(q)) {
        x->quantized   = true;
        const char *qm = NULL;
        if (cJSON_IsObject(q) &&
            (rc = coopt_json_str_opt(q, "quant_method", name, &qm)) != COOPT_OK)
            goto done;
        snprintf(x->quant_method, sizeof(x->quant_method), "%s", qm ? qm : "");
        if (cJSON_IsObject(q) && (!qm || !strcmp(qm, "gptq")) &&
            (rc = coopt_hf_parse_gptq_config(q, name, x)) != COOPT_OK)
            goto done;
    }

    cfg->n_vocab        = (int32_t)vocab;
    cfg->dim            = (int32_t)dim;
    cfg->n_layers       = (int32_t)n_layers;
    cfg->n_heads        = (int32_t)n_heads;
    cfg->n_kv_heads     = (int32_t)n_kv;
    cfg->head_dim       = (int32_t)head_dim;
    cfg->ffn_dim        = (int32_t)ffn;
    cfg->n_ctx_train    = (int32_t)n_ctx;
    cfg->sliding_window = (int32_t)swa;
    cfg->norm_eps       = (float)eps;
    cfg->rope_theta     = (float)theta;
    cfg->rope_layout    = COOPT_ROPE_HALF;
done:
    cJSON_Delete(root);
    return rc;
}

// ---- generation_config.json ----

// Missing file: defaults stay (NAN / -1). do_sample false means greedy (gen_temp = 0), as HF.
static enum coopt_status load_generation_config(struct coopt_model *m, const char *dir) {
    char path[4096];
    if (!coopt_path_join(path, sizeof(path), dir, "generation_config.json")) {
        return coopt_fail(COOPT_ERR_IO, "%s: path too long", dir);
    }
    if (!coopt_path_exists(path)) return COOPT_OK;
    char             *text = NULL;
    size_t            len  = 0;
    cJSON            *root = NULL;
    enum coopt_status rc   = coopt_read_file(path, &text, &len);
    if (rc != COOPT_OK) return rc;
    if ((rc = coopt_json_parse(text, len, path, &root)) != COOPT_OK) goto done;
    if (!cJSON_IsObject(root)) {
        rc = coopt_fail(COOPT_ERR_FORMAT, "%s: expected a JSON object", path);
        goto done;
    }
    double  temp, top_p;
    int64_t top_k;
    bool    do_sample;
    if ((rc = coopt_json_num_opt(root, "temperature", path, 0, 1e6, NAN, &temp)) != COOPT_OK ||
        (rc = coopt_json_num_opt(root, "top_p", path, 0, 1, NAN, &top_p)) != COOPT_OK ||
        (rc = coopt_json_int_opt(root, "top_k", path, 0, INT32_MAX, -1, &top_k)) != COOPT_OK ||
        (rc = coopt_json_bool_opt(root, "do_sample", path, true, &do_sample)) != COOPT_OK) {
        goto done;
    }
    m->gen_temp  = coopt_json_has(root, "do_sample") && !do_sample ? 0.0f : (float)temp;
    m->gen_top_p = (float)top_p;
    m->gen_top_k = (int32_t)top_k;
done:
    cJSON_Delete(root);
    free(text);
    return rc;
}

// ---- weights ----

struct hf_shard {
    char                      file[256]; // name inside dir
    struct coopt_safetensors *st;
};

struct hf_loader {
    struct coopt_model *m;
    const char         *dir;
    cJSON              *index;      // parsed index.json, or NULL for a single file
    const cJSON        *weight_map; // name -> shard file (inside index)
    struct hf_shard     shards[COOPT_MAX_FILES];
    int                 n_shards;
    const struct coopt_hf_config_extra *q; // GPTQ parameters, NULL for float checkpoints
};

static void loader_free(struct hf_loader *L) {
    for (int i = 0; i < L->n_shards; i++)
        coopt_safetensors_free(L->shards[i].st);
    cJSON_Delete(L->index);
}

static enum coopt_status open_shard(struct hf_loader *L, const char *file, const char *named_by) {
    for (int i = 0; i < L->n_shards; i++) {
        if (strcmp(L->shards[i].file, file) == 0) return COOPT_OK;
    }
    // A shard name comes from a file we do not trust: it must name a file in dir.
    if (file[0] == '\0' || strchr(file, '/') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0 ||
        strlen(file) >= sizeof(L->shards[0].file)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: bad shard file name '%.64s'", L->dir, named_by,
                          file);
    }
    if (L->n_shards == COOPT_MAX_FILES) {
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s/%s: more than %d shards", L->dir, named_by,
                          COOPT_MAX_FILES);
    }
    char path[4096];
    if (!coopt_path_join(path, sizeof(path), L->dir, file))
        return coopt_fail(COOPT_ERR_IO, "%s: path too long", L->dir);
    if (!coopt_path_exists(path)) {
        if (named_by) {
            return coopt_fail(COOPT_ERR_IO, "%s: missing (the shard is named by %s/%s)", path,
                              L->dir, named_by);
        }
        return coopt_fail(COOPT_ERR_IO, "%s: missing", path);
    }
    struct coopt_mmap *map = NULL;
    enum coopt_status  rc  = coopt_model_map_file(L->m, path, &map);
    if (rc != COOPT_OK) return rc;
    struct hf_shard *s = &L->shards[L->n_shards];
    if ((rc = coopt_safetensors_parse(map->addr, map->size, path, &s->st)) != COOPT_OK) return rc;
    snprintf(s->file, sizeof(s->file), "%s", file);
    L->n_shards++;
    return COOPT_OK;
}

static enum coopt_status open_weights(struct hf_loader *L) {
    char path[4096];
    if (!coopt_path_join(path, sizeof(path), L->dir, COOPT_ST_INDEX_NAME)) {
        return coopt_fail(COOPT_ERR_IO, "%s: path too long", L->dir);
    }
    if (!coopt_path_exists(path)) {
        if (!coopt_path_join(path, sizeof(path), L->dir, COOPT_ST_SINGLE_NAME) ||
            !coopt_path_exists(path)) {
            return coopt_fail(COOPT_ERR_IO, "%s: no %s or %s", L->dir, COOPT_ST_SINGLE_NAME,
                              COOPT_ST_INDEX_NAME);
        }
        return open_shard(L, COOPT_ST_SINGLE_NAME, NULL);
    }
    char             *text = NULL;
    size_t            len  = 0;
    enum coopt_status rc   = coopt_read_file(path, &text, &len);
    if (rc != COOPT_OK) return rc;
    rc = coopt_json_parse(text, len, path, &L->index);
    free(text);
    if (rc != COOPT_OK) return rc;
    L->weight_map = cJSON_GetObjectItemCaseSensitive(L->index, "weight_map");
    if (!cJSON_IsObject(L->weight_map)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: 'weight_map' must be an object", path);
    }
    for (const cJSON *it = L->weight_map->child; it; it = it->next) {
        if (!cJSON_IsString(it)) {
            return coopt_fail(COOPT_ERR_FORMAT, "%s: weight_map entry '%s' must be a file name",
                              path, it->string);
        }
        if ((rc = open_shard(L, it->valuestring, COOPT_ST_INDEX_NAME)) != COOPT_OK) return rc;
    }
    if (L->n_shards == 0) return coopt_fail(COOPT_ERR_FORMAT, "%s: 'weight_map' is empty", path);
    return COOPT_OK;
}

// Finds a tensor where the index (or the single file) says it is. *shard receives the file
// name for messages. A missing tensor is an error if required, else *out = NULL.
static enum coopt_status find_tensor(const struct hf_loader *L, const char *name, bool required,
                                     const struct coopt_st_tensor **out, const char **shard) {
    *out                     = NULL;
    const struct hf_shard *s = &L->shards[0];
    if (L->weight_map) {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(L->weight_map, name);
        *shard         = COOPT_ST_INDEX_NAME;
        if (!f) {
            if (!required) return COOPT_OK;
            return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: tensor '%s' not found", L->dir,
                              COOPT_ST_INDEX_NAME, name);
        }
        s = NULL;
        for (int i = 0; i < L->n_shards && !s; i++) {
            if (strcmp(L->shards[i].file, f->valuestring) == 0) s = &L->shards[i];
        }
        COOPT_ASSERT(s); // every weight_map value was opened
        *shard = s->file;
        *out   = coopt_safetensors_find(s->st, name);
        if (!*out) {
            return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: tensor '%s' not found (%s places it there)",
                              L->dir, s->file, name, COOPT_ST_INDEX_NAME);
        }
        return COOPT_OK;
    }
    *shard = s->file;
    *out   = coopt_safetensors_find(s->st, name);
    if (!*out && required)
        return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: tensor '%s' not found", L->dir, s->file, name);
    return COOPT_OK;
}

static enum coopt_status check_float(const struct hf_loader *L, const char *shard,
                                     const struct coopt_st_tensor *t, int n_dims) {
    if (t->n_dims != n_dims) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: tensor '%s' has %d dimensions, expected %d",
                          L->dir, shard, t->name, t->n_dims, n_dims);
    }
    if (!t->supported || (t->dtype != COOPT_DTYPE_F32 && t->dtype != COOPT_DTYPE_F16 &&
                          t->dtype != COOPT_DTYPE_BF16)) {
        return coopt_fail(COOPT_ERR_UNSUPPORTED,
                          "%s/%s: tensor '%s' has unsupported dtype %s (expected F32, F16 or BF16)",
                          L->dir, shard, t->name, t->st_dtype);
    }
    return COOPT_OK;
}

// Data of t, suitably aligned for its element type: the mapping itself when it is (always, for
// files written by the Python library: it pads the header to 8 bytes), else an owned copy.
static const void *aligned_data(struct coopt_model *m, const struct coopt_st_tensor *t) {
    if ((uintptr_t)t->data % t->elem_size == 0) return t->data;
    void *p = coopt_model_alloc(m, t->n_bytes);
    if (p) memcpy(p, t->data, t->n_bytes);
    return p;
}

static enum coopt_status bind_matrix(struct hf_loader *L, const char *name, bool required,
                                     struct coopt_weight *w) {
    const struct coopt_st_tensor *t;
    const char                   *shard;
    enum coopt_status             rc = find_tensor(L, name, required, &t, &shard);
    if (rc != COOPT_OK || !t) return rc;
    if ((rc = check_float(L, shard, t, 2)) != COOPT_OK) return rc;
    memset(w, 0, sizeof(*w));
    w->dtype = t->dtype;
    w->n_out = t->shape[0];
    w->n_in  = t->shape[1];
    w->data  = aligned_data(L->m, t);
    return w->data ? COOPT_OK : COOPT_ERR_NOMEM;
}

// A 1-D float tensor of n elements as owned f32. Optional tensors leave *out NULL when absent.
static enum coopt_status bind_vector(struct hf_loader *L, const char *name, bool required,
                                     int64_t n, const float **out) {
    const struct coopt_st_tensor *t;
    const char                   *shard;
    *out                 = NULL;
    enum coopt_status rc = find_tensor(L, name, required, &t, &shard);
    if (rc != COOPT_OK || !t) return rc;
    if ((rc = check_float(L, shard, t, 1)) != COOPT_OK) return rc;
    if (t->shape[0] != n) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: tensor '%s' shape [%lld], expected [%lld]",
                          L->dir, shard, name, (long long)t->shape[0], (long long)n);
    }
    const void *data = aligned_data(L->m, t);
    if (!data) return COOPT_ERR_NOMEM;
    return coopt_model_f32_vector(L->m, t->dtype, data, n, out);
}

enum coopt_status coopt_hf_parse_gptq_config(const cJSON *q, const char *name, struct coopt_hf_config_extra *x) {
    int64_t           bits, gs;
    const char       *fmt = NULL;
    enum coopt_status rc;
    if ((rc = coopt_json_int_opt(q, "bits", name, 1, 16, 4, &bits)) != COOPT_OK ||
        (rc = coopt_json_int_opt(q, "group_size", name, -1, 1 << 20, 128, &gs)) != COOPT_OK ||
        (rc = coopt_json_bool_opt(q, "desc_act", name, false, &x->q_desc_act)) != COOPT_OK ||
        (rc = coopt_json_bool_opt(q, "sym", name, true, &x->q_sym)) != COOPT_OK ||
        (rc = coopt_json_str_opt(q, "checkpoint_format", name, &fmt)) != COOPT_OK)
        return rc;
    if (gs == 0 || gs < -1) return coopt_fail(COOPT_ERR_FORMAT, "%s: GPTQ group_size %lld is invalid", name, (long long)gs);
    if (fmt && strcmp(fmt, "gptq") && strcmp(fmt, "gptq_v2"))
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: GPTQ checkpoint_format '%s' is not supported (gptq, gptq_v2)",
                          name, fmt);
    x->q_bits       = (int32_t)bits;
    x->q_group_size = (int32_t)gs;
    x->q_zeros_v2   = fmt && !strcmp(fmt, "gptq_v2");
    x->quantized    = true;
    return COOPT_OK;
}

// Finds a GPTQ tensor `prefix.suffix` (required unless g_idx) and checks it is 2-D I32/F16 (or 1-D g_idx).
static enum coopt_status find_gptq_part(struct hf_loader *L, const char *prefix, const char *suffix, bool required,
                                        int n_dims, const struct coopt_st_tensor **out) {
    char        name[320];
    const char *shard;
    snprintf(name, sizeof(name), "%.256s.%s", prefix, suffix);
    enum coopt_status rc = find_tensor(L, name, required, out, &shard);
    if (rc != COOPT_OK || !*out) return rc;
    if (!(*out)->supported || (*out)->n_dims != n_dims)
        return coopt_fail(COOPT_ERR_FORMAT, "%s/%s: tensor '%s' has dtype %s and %d dims, expected a %d-D %s tensor",
                          L->dir, shard, name, (*out)->st_dtype, (*out)->n_dims, n_dims,
                          !strcmp(suffix, "scales") ? "F16" : "I32");
    return COOPT_OK;
}

// Binds a GPTQ linear layer: prefix.{qweight,qzeros,scales[,g_idx][,bias]} -> repacked Q4_GPTQ.
static enum coopt_status bind_gptq(struct hf_loader *L, const char *prefix, int64_t n_out, int64_t n_in,
                                   struct coopt_weight *w) {
    const struct coopt_st_tensor *qw, *qz, *sc, *gi;
    enum coopt_status             rc;
    if ((rc = find_gptq_part(L, prefix, "qweight", true, 2, &qw)) != COOPT_OK ||
        (rc = find_gptq_part(L, prefix, "qzeros", true, 2, &qz)) != COOPT_OK ||
        (rc = find_gptq_part(L, prefix, "scales", true, 2, &sc)) != COOPT_OK ||
        (rc = find_gptq_part(L, prefix, "g_idx", false, 1, &gi)) != COOPT_OK)
        return rc;
    const void *qwd = aligned_data(L->m, qw), *qzd = aligned_data(L->m, qz), *scd = aligned_data(L->m, sc);
    const void *gid = gi ? aligned_data(L->m, gi) : NULL;
    if (!qwd || !qzd || !scd || (gi && !gid)) return COOPT_ERR_NOMEM;
    struct coopt_gptq_src src = {
        .name = prefix, .n_in = n_in, .n_out = n_out, .bits = L->q->q_bits, .group_size = L->q->q_group_size,
        .zeros_v1 = !L->q->q_zeros_v2,
        .qweight = qwd, .qweight_shape = {qw->shape[0], qw->shape[1]}, .qweight_dtype = qw->dtype,
        .qzeros = qzd, .qzeros_shape = {qz->shape[0], qz->shape[1]}, .qzeros_dtype = qz->dtype,
        .scales = scd, .scales_shape = {sc->shape[0], sc->shape[1]}, .scales_dtype = sc->dtype,
        .g_idx = gid, .g_idx_len = gi ? gi->shape[0] : 0, .g_idx_dtype = gi ? gi->dtype : COOPT_DTYPE_I32,
    };
    struct coopt_gptq_weight *g;
    if ((rc = coopt_gptq_repack(&src, L->m->params.n_threads > 0 ? L->m->params.n_threads : coopt_n_cores(), &g)))
        return rc;
    if ((rc = coopt_model_own_gptq(L->m, g)) != COOPT_OK) return rc;
    const float *bias = NULL;
    char         name[320];
    snprintf(name, sizeof(name), "%.256s.bias", prefix);
    if ((rc = bind_vector(L, name, false, n_out, &bias)) != COOPT_OK) return rc;
    coopt_gptq_as_weight(g, bias, w);
    return COOPT_OK;
}

// Binds the linear layer `prefix` ("model.layers.0.self_attn.q_proj"): prefix.weight, plus
// prefix.bias when present. NOTE: the GPTQ binder goes here (prefix.qweight, .qzeros, .scales,
// .g_idx -> COOPT_DTYPE_Q4_GPTQ) when quantization_config says gptq.
static enum coopt_status bind_linear(struct hf_loader *L, const char *prefix, int64_t n_out, int64_t n_in,
                                     struct coopt_weight *w) {
    if (L->q) return bind_gptq(L, prefix, n_out, n_in, w);
    char name[300];
    snprintf(name, sizeof(name), "%.256s.weight", prefix);
    enum coopt_status rc = bind_matrix(L, name, true, w);
    if (rc != COOPT_OK) return rc;
    snprintf(name, sizeof(name), "%.256s.bias", prefix);
    return bind_vector(L, name, false, w->n_out, &w->bias);
}

static enum coopt_status bind_embeddings(struct hf_loader                   *L,
                                         const struct coopt_hf_config_extra *x) {
    struct coopt_model           *m = L->m;
    const struct coopt_st_tensor *te, *th;
    const char                   *shard;
    enum coopt_status             rc;
    if ((rc = find_tensor(L, "model.embed_tokens.weight", false, &te, &shard)) != COOPT_OK ||
        (rc = find_tensor(L, "lm_head.weight", false, &th, &shard)) != COOPT_OK) {
        return rc;
    }
    // Tied: HF uses the embedding for both; some exporters (story-lmrs) store only lm_head.
    // Without an explicit tie_word_embeddings, a lone embedding/lm_head also means tied.
    bool tied = m->config.tied_embeddings || (!x->tie_explicit && (!te || !th) && (te || th));
    if (tied) {
        const char *src = te ? "model.embed_tokens.weight" : "lm_head.weight";
        if ((rc = bind_matrix(L, src, true, &m->tok_embd)) != COOPT_OK) return rc;
        m->output                 = m->tok_embd;
        m->config.tied_embeddings = true;
        return COOPT_OK;
    }
    if ((rc = bind_matrix(L, "model.embed_tokens.weight", true, &m->tok_embd)) != COOPT_OK)
        return rc;
    if (!th) {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s/%s: tensor 'lm_head.weight' not found (tie_word_embeddings is false)",
                          L->dir, L->weight_map ? COOPT_ST_INDEX_NAME : L->shards[0].file);
    }
    return bind_matrix(L, "lm_head.weight", true, &m->output);
}

static enum coopt_status bind_weights(struct hf_loader *L, const struct coopt_hf_config_extra *x) {
    struct coopt_model *m   = L->m;
    const int64_t       dim = m->config.dim;
    enum coopt_status   rc;
    if ((rc = bind_embeddings(L, x)) != COOPT_OK) return rc;
    if ((rc = bind_vector(L, "model.norm.weight", true, dim, &m->out_norm)) != COOPT_OK) return rc;
    m->layers = coopt_calloc((size_t)m->config.n_layers, sizeof(struct coopt_layer)); // freed by coopt_model_free
    if (!m->layers) return COOPT_ERR_NOMEM;

    static const struct {
        const char *suffix;
        size_t      offset;
    } linears[] = {
        {"self_attn.q_proj", offsetof(struct coopt_layer, wq)},
        {"self_attn.k_proj", offsetof(struct coopt_layer, wk)},
        {"self_attn.v_proj", offsetof(struct coopt_layer, wv)},
        {"self_attn.o_proj", offsetof(struct coopt_layer, wo)},
        {"mlp.gate_proj", offsetof(struct coopt_layer, w_gate)},
        {"mlp.up_proj", offsetof(struct coopt_layer, w_up)},
        {"mlp.down_proj", offsetof(struct coopt_layer, w_down)},
    };
    char name[256];
    for (int l = 0; l < m->config.n_layers; l++) {
        struct coopt_layer *ly = &m->layers[l];
        snprintf(name, sizeof(name), "model.layers.%d.input_layernorm.weight", l);
        if ((rc = bind_vector(L, name, true, dim, &ly->attn_norm)) != COOPT_OK) return rc;
        snprintf(name, sizeof(name), "model.layers.%d.post_attention_layernorm.weight", l);
        if ((rc = bind_vector(L, name, true, dim, &ly->ffn_norm)) != COOPT_OK) return rc;
        const struct coopt_model_config *c = &m->config;
        int64_t q_dim = (int64_t)c->n_heads * c->head_dim, kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
        const int64_t shapes[][2] = {{q_dim, dim}, {kv_dim, dim}, {kv_dim, dim}, {dim, q_dim},
                                     {c->ffn_dim, dim}, {c->ffn_dim, dim}, {dim, c->ffn_dim}}; // [out, in]
        for (size_t i = 0; i < COOPT_ARRAY_LEN(linears); i++) {
            snprintf(name, sizeof(name), "model.layers.%d.%s", l, linears[i].suffix);
            struct coopt_weight *w = (struct coopt_weight *)((char *)ly + linears[i].offset);
            if ((rc = bind_linear(L, name, shapes[i][0], shapes[i][1], w)) != COOPT_OK) return rc;
        }
    }
    return COOPT_OK;
}

// ---- loader ----

enum coopt_status coopt_hf_load_model(struct coopt_model *m, const char *dir) {
    m->gen_temp  = NAN;
    m->gen_top_p = NAN;
    m->gen_top_k = -1;

    char path[4096];
    if (!coopt_path_join(path, sizeof(path), dir, "config.json"))
        return coopt_fail(COOPT_ERR_IO, "%s: path too long", dir);
    char             *text = NULL;
    size_t            len  = 0;
    enum coopt_status rc   = coopt_read_file(path, &text, &len);
    if (rc != COOPT_OK) return rc;
    struct coopt_hf_config_extra x;
    rc = coopt_hf_parse_config(text, len, path, &m->config, &x);
    free(text);
    if (rc != COOPT_OK) return rc;

    char qpath[4096];
    bool qfile = coopt_path_join(qpath, sizeof(qpath), dir, "quantize_config.json") &&
                 coopt_path_exists(qpath);
    if (x.quantized || qfile) {
        if (x.quant_method[0] && strcmp(x.quant_method, "gptq") != 0) {
            return coopt_fail(COOPT_ERR_UNSUPPORTED,
                              "%s: quantization method '%s' is not supported (supported: gptq)", path,
                              x.quant_method);
        }
        if (!x.quantized || qfile) {
            // quantize_config.json (AutoGPTQ) holds the parameters, or completes quantization_config
            char *qt = NULL;
            size_t ql = 0;
            if ((rc = coopt_read_file(qpath, &qt, &ql)) != COOPT_OK) return rc;
            cJSON *qj = cJSON_ParseWithLength(qt, ql);
            free(qt);
            if (!cJSON_IsObject(qj)) {
                cJSON_Delete(qj);
                return coopt_fail(COOPT_ERR_FORMAT, "%s: invalid JSON", qpath);
            }
            rc = coopt_hf_parse_gptq_config(qj, qpath, &x);
            cJSON_Delete(qj);
            if (rc != COOPT_OK) return rc;
        }
        if (x.q_bits != 4)
            return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: GPTQ with %d bits is not supported (4 bits only)", dir,
                              x.q_bits);
    }
    if ((rc = load_generation_config(m, dir)) != COOPT_OK) return rc;

    struct hf_loader L = {.m = m, .dir = dir, .q = (x.quantized || qfile) ? &x : NULL};
    if ((rc = open_weights(&L)) == COOPT_OK) rc = bind_weights(&L, &x);
    loader_free(&L);
    if (rc != COOPT_OK) return rc;

    return coopt_tokenizer_load(dir, &m->tokenizer);
}

// ---- config.json from a model (writers: convert, quantize) ----

// The shortest decimal that reads back as the same f32 (1e-05, not 9.99999974737875e-06).
static double f32_short_decimal(float f) {
    char buf[32];
    for (int p = 6; p <= 9; p++) {
        snprintf(buf, sizeof(buf), "%.*g", p, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    return strtod(buf, NULL);
}

cJSON *coopt_hf_config_from_model(const struct coopt_model *m) {
    const struct coopt_model_config *c    = &m->config;
    cJSON                           *root = cJSON_CreateObject();
    if (!root) return NULL;
    cJSON *arch = cJSON_AddArrayToObject(root, "architectures");
    if (arch) cJSON_AddItemToArray(arch, cJSON_CreateString("LlamaForCausalLM"));
    cJSON_AddStringToObject(root, "model_type", "llama");
    cJSON_AddStringToObject(root, "hidden_act", "silu");
    cJSON_AddNumberToObject(root, "hidden_size", c->dim);
    cJSON_AddNumberToObject(root, "intermediate_size", c->ffn_dim);
    cJSON_AddNumberToObject(root, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(root, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(root, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(root, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(root, "vocab_size", c->n_vocab);
    cJSON_AddNumberToObject(root, "max_position_embeddings", c->n_ctx_train);
    cJSON_AddNumberToObject(root, "rms_norm_eps", f32_short_decimal(c->norm_eps));
    cJSON_AddNumberToObject(root, "rope_theta", f32_short_decimal(c->rope_theta));
    cJSON_AddBoolToObject(root, "tie_word_embeddings", c->tied_embeddings);
    cJSON_AddBoolToObject(root, "attention_bias", m->layers && m->layers[0].wq.bias != NULL);
    cJSON_AddBoolToObject(root, "mlp_bias", false);
    int32_t bos = coopt_tokenizer_bos(m->tokenizer), eos = coopt_tokenizer_eos(m->tokenizer);
    if (bos >= 0) cJSON_AddNumberToObject(root, "bos_token_id", bos);
    if (eos >= 0) cJSON_AddNumberToObject(root, "eos_token_id", eos);
    if (c->sliding_window > 0) cJSON_AddNumberToObject(root, "sliding_window", c->sliding_window);
    if (c->rope_scaling != COOPT_ROPE_SCALING_NONE) {
        cJSON *rs = cJSON_AddObjectToObject(root, "rope_scaling");
        if (rs) {
            bool l3 = c->rope_scaling == COOPT_ROPE_SCALING_LLAMA3;
            cJSON_AddStringToObject(rs, "rope_type", l3 ? "llama3" : "linear");
            cJSON_AddNumberToObject(rs, "factor", f32_short_decimal(c->rope_factor));
            if (l3) {
                cJSON_AddNumberToObject(rs, "low_freq_factor", f32_short_decimal(c->rope_low_freq_factor));
                cJSON_AddNumberToObject(rs, "high_freq_factor", f32_short_decimal(c->rope_high_freq_factor));
                cJSON_AddNumberToObject(rs, "original_max_position_embeddings", c->rope_orig_ctx);
            }
        }
    }
    return root;
}
