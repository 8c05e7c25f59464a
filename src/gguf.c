/*
 * gguf.c -- GGUF v2/v3 reader (validating, zero-copy over an mmap), the GGUF llama loader and
 * tokenizer reader, and the streaming GGUF v3 writer.
 *
 * The parser trusts nothing: every length is checked against the bytes left before it is
 * used, counts are bounded by (bytes left / smallest possible element) before anything is
 * allocated or iterated, nested arrays are limited in depth, and all size arithmetic is done
 * with overflow checks. After coopt_gguf_parse() returns OK, every view it exposes lies inside
 * the buffer, so the getters and the loader do no further bounds checks on the encoding.
 */
#include "gguf.h"

#include "dtype.h"
#include "model.h"
#include "tokenizer.h"
#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GGUF_MAGIC 0x46554747u // "GGUF" read as little-endian u32
#define GGUF_MAX_NESTING 8     // arrays of arrays of ...: deeper is rejected (stack bound)

// ---- ggml type table ----

struct ggml_type_info {
    const char *name;
    uint32_t    block_len;   // values per block
    uint32_t    block_bytes; // 0 = not a type id
};

// ggml.c type_traits (block sizes); ids 4, 5, 31-33 and 36-38 were removed from ggml.
static const struct ggml_type_info g_ggml_types[] = {
    [0] = {"f32", 1, 4},         [1] = {"f16", 1, 2},        [2] = {"q4_0", 32, 18},
    [3] = {"q4_1", 32, 20},      [6] = {"q5_0", 32, 22},     [7] = {"q5_1", 32, 24},
    [8] = {"q8_0", 32, 34},      [9] = {"q8_1", 32, 36},     [10] = {"q2_K", 256, 84},
    [11] = {"q3_K", 256, 110},   [12] = {"q4_K", 256, 144},  [13] = {"q5_K", 256, 176},
    [14] = {"q6_K", 256, 210},   [15] = {"q8_K", 256, 292},  [16] = {"iq2_xxs", 256, 66},
    [17] = {"iq2_xs", 256, 74},  [18] = {"iq3_xxs", 256, 98}, [19] = {"iq1_s", 256, 50},
    [20] = {"iq4_nl", 32, 18},   [21] = {"iq3_s", 256, 110}, [22] = {"iq2_s", 256, 82},
    [23] = {"iq4_xs", 256, 136}, [24] = {"i8", 1, 1},        [25] = {"i16", 1, 2},
    [26] = {"i32", 1, 4},        [27] = {"i64", 1, 8},       [28] = {"f64", 1, 8},
    [29] = {"iq1_m", 256, 56},   [30] = {"bf16", 1, 2},      [34] = {"tq1_0", 256, 54},
    [35] = {"tq2_0", 256, 66},   [39] = {"mxfp4", 32, 17},
};

static const struct ggml_type_info *ggml_info(uint32_t t) {
    if (t >= COOPT_ARRAY_LEN(g_ggml_types) || g_ggml_types[t].block_bytes == 0) return NULL;
    return &g_ggml_types[t];
}

const char *coopt_ggml_type_name(uint32_t t) {
    const struct ggml_type_info *ti = ggml_info(t);
    return ti ? ti->name : "unknown";
}

bool coopt_ggml_to_dtype(uint32_t t, enum coopt_dtype *out) {
    switch (t) {
    case COOPT_GGML_F32: *out = COOPT_DTYPE_F32; return true;
    case COOPT_GGML_F16: *out = COOPT_DTYPE_F16; return true;
    case COOPT_GGML_BF16: *out = COOPT_DTYPE_BF16; return true;
    case COOPT_GGML_Q8_0: *out = COOPT_DTYPE_Q8_0; return true;
    case COOPT_GGML_Q4_0: *out = COOPT_DTYPE_Q4_0; return true;
    }
    return false;
}

bool coopt_dtype_to_ggml(enum coopt_dtype t, uint32_t *out) {
    switch (t) {
    case COOPT_DTYPE_F32: *out = COOPT_GGML_F32; return true;
    case COOPT_DTYPE_F16: *out = COOPT_GGML_F16; return true;
    case COOPT_DTYPE_BF16: *out = COOPT_GGML_BF16; return true;
    case COOPT_DTYPE_Q8_0: *out = COOPT_GGML_Q8_0; return true;
    case COOPT_DTYPE_Q4_0: *out = COOPT_GGML_Q4_0; return true;
    case COOPT_DTYPE_I32: *out = 26; return true;
    default: return false;
    }
}

size_t coopt_ggml_nbytes(uint32_t t, int n_dims, const int64_t *ne) {
    const struct ggml_type_info *ti = ggml_info(t);
    if (!ti || n_dims < 1 || n_dims > COOPT_GGUF_MAX_DIMS) return 0;
    if (ne[0] < 0 || ne[0] % ti->block_len != 0) return 0;
    size_t n;
    if (!coopt_mul_ok((size_t)(ne[0] / ti->block_len), ti->block_bytes, &n)) return 0;
    for (int i = 1; i < n_dims; i++) {
        if (ne[i] < 0 || !coopt_mul_ok(n, (size_t)ne[i], &n)) return 0;
    }
    return n;
}

enum coopt_status coopt_gguf_tensor_dtype(const struct coopt_gguf *g, const struct coopt_gguf_tensor *t,
                                          enum coopt_dtype *out) {
    if (coopt_ggml_to_dtype(t->ggml_type, out)) return COOPT_OK;
    return coopt_fail(COOPT_ERR_UNSUPPORTED,
                      "%s: tensor '%s' has type %s, which is not supported (supported: f32, f16, bf16, q8_0, q4_0)",
                      g->name, t->name, coopt_ggml_type_name(t->ggml_type));
}

// ---- metadata value types ----

static const char *const g_value_type_names[COOPT_GGUF_TYPE_COUNT] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
};
static const uint8_t g_value_size[COOPT_GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static const char *value_type_name(uint32_t t) {
    return t < COOPT_GGUF_TYPE_COUNT ? g_value_type_names[t] : "unknown";
}

// Smallest encoding of one value of type t (used to bound counts before iterating).
static size_t value_min_bytes(uint32_t t) {
    if (t == COOPT_GGUF_STRING) return 8;
    if (t == COOPT_GGUF_ARRAY) return 12;
    return g_value_size[t];
}

// ---- parser ----

struct rd {
    const uint8_t *b;
    size_t         size, pos;
    const char    *name;
};

static size_t rd_left(const struct rd *r) { return r->size - r->pos; }

static enum coopt_status rd_trunc(const struct rd *r, const char *what) {
    return coopt_fail(COOPT_ERR_FORMAT, "%s: truncated at offset %zu while reading %s (file size %zu)", r->name,
                      r->pos, what, r->size);
}

static bool rd_u32(struct rd *r, uint32_t *v) {
    if (rd_left(r) < 4) return false;
    memcpy(v, r->b + r->pos, 4);
    r->pos += 4;
    return true;
}

static bool rd_u64(struct rd *r, uint64_t *v) {
    if (rd_left(r) < 8) return false;
    memcpy(v, r->b + r->pos, 8);
    r->pos += 8;
    return true;
}

// Reads a string header; *s points at its bytes. False if it does not fit.
static bool rd_str(struct rd *r, const uint8_t **s, uint64_t *len) {
    size_t save = r->pos;
    if (!rd_u64(r, len) || *len > rd_left(r)) {
        r->pos = save;
        return false;
    }
    *s = r->b + r->pos;
    r->pos += (size_t)*len;
    return true;
}

// Validates one value of type `type` at the cursor and fills *v (if not NULL).
static enum coopt_status parse_value(struct rd *r, uint32_t type, int depth, const char *key,
                                     struct coopt_gguf_value *v) {
    size_t start = r->pos;
    struct coopt_gguf_value tmp = {0};
    tmp.type = (enum coopt_gguf_type)type;
    tmp.n    = 1;
    if (type >= COOPT_GGUF_TYPE_COUNT)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s': unknown value type %u", r->name, key, type);
    if (type == COOPT_GGUF_STRING) {
        const uint8_t *s;
        uint64_t       len;
        if (!rd_str(r, &s, &len))
            return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s': string at offset %zu runs past the end of the file",
                              r->name, key, start);
        tmp.n = len, tmp.data = s, tmp.n_bytes = (size_t)len;
    } else if (type == COOPT_GGUF_ARRAY) {
        uint32_t elem;
        uint64_t n;
        if (!rd_u32(r, &elem) || !rd_u64(r, &n)) return rd_trunc(r, "an array header");
        if (elem >= COOPT_GGUF_TYPE_COUNT)
            return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s': array of unknown value type %u", r->name, key, elem);
        if (elem == COOPT_GGUF_ARRAY && depth + 1 >= GGUF_MAX_NESTING)
            return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s': arrays nested deeper than %d", r->name, key,
                              GGUF_MAX_NESTING);
        if (n > rd_left(r) / value_min_bytes(elem))
            return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s': array of %llu %s elements does not fit in the file",
                              r->name, key, (unsigned long long)n, value_type_name(elem));
        tmp.elem_type = (enum coopt_gguf_type)elem;
        tmp.n         = n;
        tmp.data      = r->b + r->pos;
        if (elem == COOPT_GGUF_STRING || elem == COOPT_GGUF_ARRAY) {
            for (uint64_t i = 0; i < n; i++) {
                uint32_t et = elem;
                if (elem == COOPT_GGUF_ARRAY) {
                    // an element of an array of arrays is itself a typed array: elem type + count + data
                    enum coopt_status st = parse_value(r, COOPT_GGUF_ARRAY, depth + 1, key, NULL);
                    if (st != COOPT_OK) return st;
                    continue;
                }
                enum coopt_status st = parse_value(r, et, depth + 1, key, NULL);
                if (st != COOPT_OK) return st;
            }
        } else {
            r->pos += (size_t)n * g_value_size[elem]; // bounded above
        }
        tmp.n_bytes = (size_t)(r->b + r->pos - tmp.data);
    } else {
        if (rd_left(r) < g_value_size[type]) return rd_trunc(r, "a value");
        tmp.data    = r->b + r->pos;
        tmp.n_bytes = g_value_size[type];
        r->pos += g_value_size[type];
    }
    tmp.raw       = r->b + start;
    tmp.raw_bytes = r->pos - start;
    if (v) *v = tmp;
    return COOPT_OK;
}

static int cmp_kv_idx(const void *a, const void *b, void *ctx) {
    const struct coopt_gguf_kv *kv = ctx;
    return strcmp(kv[*(const int32_t *)a].key, kv[*(const int32_t *)b].key);
}
static int cmp_tensor_idx(const void *a, const void *b, void *ctx) {
    const struct coopt_gguf_tensor *t = ctx;
    return strcmp(t[*(const int32_t *)a].name, t[*(const int32_t *)b].name);
}

void coopt_gguf_close(struct coopt_gguf *g) {
    if (!g) return;
    free(g->kv);
    free(g->tensors);
    free(g->kv_sorted);
    free(g->tensor_sorted);
    free(g->names);
    free((void *)g->name);
    if (g->map_addr) {
        struct coopt_mmap mm = {g->map_addr, g->map_size};
        coopt_mmap_close(&mm);
    }
    free(g);
}

// Copies a name (len bytes at s) into the arena at *cursor; rejects embedded NUL bytes.
static const char *arena_put(char **cursor, const uint8_t *s, uint64_t len) {
    if (memchr(s, 0, (size_t)len)) return NULL;
    char *d = *cursor;
    memcpy(d, s, (size_t)len);
    d[len]  = '\0';
    *cursor = d + len + 1;
    return d;
}

enum coopt_status coopt_gguf_parse(const void *data, size_t size, const char *name, struct coopt_gguf **out) {
    *out = NULL;
    enum coopt_status st = COOPT_ERR_NOMEM;
    struct rd         r  = {data, size, 0, name ? name : "gguf"};
    struct coopt_gguf *g = coopt_calloc(1, sizeof(*g));
    if (!g) return COOPT_ERR_NOMEM;
    g->name = coopt_strdup(r.name);
    if (!g->name) goto fail;
    r.name  = g->name;
    g->base = data, g->size = size;
    g->alignment = COOPT_GGUF_DEFAULT_ALIGNMENT;

    // header
    uint32_t magic, version;
    uint64_t n_tensors, n_kv;
    st = COOPT_ERR_FORMAT;
    if (!rd_u32(&r, &magic)) {
        coopt_fail(st, "%s: file too short for a GGUF header (%zu bytes)", r.name, size);
        goto fail;
    }
    if (magic != GGUF_MAGIC) {
        coopt_fail(st, "%s: not a GGUF file (bad magic %02x %02x %02x %02x, expected \"GGUF\")", r.name,
                   r.b[0], r.b[1], r.b[2], r.b[3]);
        goto fail;
    }
    if (!rd_u32(&r, &version)) {
        rd_trunc(&r, "the version");
        goto fail;
    }
    if (version == 1) {
        st = coopt_fail(COOPT_ERR_UNSUPPORTED,
                        "%s: GGUF version 1 is not supported (32-bit counts); re-convert it with a current llama.cpp",
                        r.name);
        goto fail;
    }
    if (version != 2 && version != 3) {
        st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: GGUF version %u is not supported (supported: 2, 3)%s", r.name,
                        version, (version & 0xffff) == 0 ? "; the file looks big-endian" : "");
        goto fail;
    }
    g->version = version;
    if (!rd_u64(&r, &n_tensors) || !rd_u64(&r, &n_kv)) {
        rd_trunc(&r, "the tensor and key counts");
        goto fail;
    }
    // every key takes >= 13 bytes (len, type, 1-byte value); every tensor info >= 32 bytes
    if (n_kv > rd_left(&r) / 13 || n_tensors > rd_left(&r) / 32 || n_kv > INT32_MAX || n_tensors > INT32_MAX) {
        coopt_fail(st, "%s: header claims %llu keys and %llu tensors, more than the file can hold", r.name,
                   (unsigned long long)n_kv, (unsigned long long)n_tensors);
        goto fail;
    }
    g->n_kv      = (int64_t)n_kv;
    g->n_tensors = (int64_t)n_tensors;
    st           = COOPT_ERR_NOMEM;
    g->kv        = coopt_calloc((size_t)n_kv, sizeof(*g->kv));
    g->tensors   = coopt_calloc((size_t)n_tensors, sizeof(*g->tensors));
    uint64_t *name_lens = coopt_calloc((size_t)(n_kv + n_tensors), sizeof(uint64_t));
    const uint8_t **name_ptrs = coopt_calloc((size_t)(n_kv + n_tensors), sizeof(*name_ptrs));
    if (!g->kv || !g->tensors || !name_lens || !name_ptrs) goto fail_names;
    size_t arena_bytes = 0;
    char   keybuf[80]; // key name for messages while parsing, truncated
    st = COOPT_ERR_FORMAT;

    // key/values
    for (uint64_t i = 0; i < n_kv; i++) {
        const uint8_t *s;
        uint64_t       len;
        uint32_t       type;
        if (!rd_str(&r, &s, &len)) {
            coopt_fail(st, "%s: key %llu: name at offset %zu runs past the end of the file", r.name,
                       (unsigned long long)i, r.pos);
            goto fail_names;
        }
        snprintf(keybuf, sizeof(keybuf), "%.*s", (int)COOPT_MIN(len, 64), (const char *)s);
        if (!rd_u32(&r, &type)) {
            rd_trunc(&r, "a value type");
            goto fail_names;
        }
        if (type >= COOPT_GGUF_TYPE_COUNT) {
            coopt_fail(st, "%s: key '%s': unknown value type %u", r.name, keybuf, type);
            goto fail_names;
        }
        g->kv[i].val.type = (enum coopt_gguf_type)type;
        if ((st = parse_value(&r, type, 0, keybuf, &g->kv[i].val)) != COOPT_OK) goto fail_names;
        st           = COOPT_ERR_FORMAT;
        name_ptrs[i] = s, name_lens[i] = len;
        arena_bytes += (size_t)len + 1;
        if (len == 17 && memcmp(s, "general.alignment", 17) == 0) {
            const struct coopt_gguf_value *v = &g->kv[i].val;
            uint32_t                       a = 0;
            if (v->type == COOPT_GGUF_U32) memcpy(&a, v->data, 4);
            if (v->type != COOPT_GGUF_U32 || a == 0 || (a & (a - 1)) != 0 || a > (1u << 30)) {
                coopt_fail(st, "%s: key 'general.alignment' must be a u32 power of two, got %s %u", r.name,
                           value_type_name(v->type), a);
                goto fail_names;
            }
            g->alignment = a;
        }
    }

    // tensor infos
    for (uint64_t i = 0; i < n_tensors; i++) {
        struct coopt_gguf_tensor *t = &g->tensors[i];
        const uint8_t            *s;
        uint64_t                  len;
        uint32_t                  n_dims, type;
        if (!rd_str(&r, &s, &len)) {
            coopt_fail(st, "%s: tensor %llu: name at offset %zu runs past the end of the file", r.name,
                       (unsigned long long)i, r.pos);
            goto fail_names;
        }
        snprintf(keybuf, sizeof(keybuf), "%.*s", (int)COOPT_MIN(len, 64), (const char *)s);
        if (!rd_u32(&r, &n_dims)) {
            rd_trunc(&r, "a tensor's n_dims");
            goto fail_names;
        }
        if (n_dims < 1 || n_dims > COOPT_GGUF_MAX_DIMS) {
            coopt_fail(st, "%s: tensor '%s' has n_dims %u (expected 1..%d)", r.name, keybuf, n_dims,
                       COOPT_GGUF_MAX_DIMS);
            goto fail_names;
        }
        t->n_dims = (int)n_dims;
        for (int d = 0; d < COOPT_GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            uint64_t ne;
            if (!rd_u64(&r, &ne)) {
                rd_trunc(&r, "a tensor's dimensions");
                goto fail_names;
            }
            if (ne > (uint64_t)INT64_MAX) {
                coopt_fail(st, "%s: tensor '%s' dimension %u is %llu (negative as int64)", r.name, keybuf, d,
                           (unsigned long long)ne);
                goto fail_names;
            }
            t->ne[d] = (int64_t)ne;
        }
        if (!rd_u32(&r, &type) || !rd_u64(&r, &t->offset)) {
            rd_trunc(&r, "a tensor's type and offset");
            goto fail_names;
        }
        t->ggml_type                     = type;
        const struct ggml_type_info *ti = ggml_info(type);
        if (!ti) {
            st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: tensor '%s' has unknown ggml type %u", r.name, keybuf, type);
            goto fail_names;
        }
        if (t->ne[0] % ti->block_len != 0) {
            coopt_fail(st, "%s: tensor '%s' (%s) has row length %lld, not a multiple of the block size %u", r.name,
                       keybuf, ti->name, (long long)t->ne[0], ti->block_len);
            goto fail_names;
        }
        t->n_bytes = coopt_ggml_nbytes(type, t->n_dims, t->ne);
        bool empty = false;
        for (int d = 0; d < t->n_dims; d++) empty |= t->ne[d] == 0;
        if (t->n_bytes == 0 && !empty) {
            coopt_fail(st, "%s: tensor '%s' is too large (size overflows)", r.name, keybuf);
            goto fail_names;
        }
        if (t->offset % g->alignment != 0) {
            coopt_fail(st, "%s: tensor '%s' offset %llu is not a multiple of the alignment %u", r.name, keybuf,
                       (unsigned long long)t->offset, g->alignment);
            goto fail_names;
        }
        name_ptrs[n_kv + i] = s, name_lens[n_kv + i] = len;
        arena_bytes += (size_t)len + 1;
    }

    // data section
    size_t pad      = (g->alignment - r.pos % g->alignment) % g->alignment;
    g->data_offset  = r.pos + pad; // cannot overflow: pos <= size and alignment <= 2^30
    size_t data_len = g->data_offset <= size ? size - g->data_offset : 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        struct coopt_gguf_tensor *t = &g->tensors[i];
        snprintf(keybuf, sizeof(keybuf), "%.*s", (int)COOPT_MIN(name_lens[n_kv + i], 64),
                 (const char *)name_ptrs[n_kv + i]);
        if (t->offset > data_len || t->n_bytes > data_len - t->offset) {
            coopt_fail(st,
                       "%s: tensor '%s' data [%llu, +%zu) lies outside the data section (%zu bytes from offset %zu)",
                       r.name, keybuf, (unsigned long long)t->offset, t->n_bytes, data_len, g->data_offset);
            goto fail_names;
        }
        // (an empty tensor may sit at the very end: clamp so the pointer stays in the buffer)
        t->data = r.b + COOPT_MIN(g->data_offset + t->offset, size);
    }

    // names: one arena, NUL-terminated copies
    st       = COOPT_ERR_NOMEM;
    g->names = coopt_malloc(arena_bytes);
    if (!g->names) goto fail_names;
    st           = COOPT_ERR_FORMAT;
    char *cursor = g->names;
    for (uint64_t i = 0; i < n_kv + n_tensors; i++) {
        const char *p = arena_put(&cursor, name_ptrs[i], name_lens[i]);
        if (!p) {
            coopt_fail(st, "%s: %s %llu has a name containing a NUL byte", r.name, i < n_kv ? "key" : "tensor",
                       (unsigned long long)(i < n_kv ? i : i - n_kv));
            goto fail_names;
        }
        if (i < n_kv) g->kv[i].key = p;
        else g->tensors[i - n_kv].name = p;
    }
    free(name_lens);
    free(name_ptrs);
    name_lens = NULL;
    name_ptrs = NULL;

    // sorted indices for lookup; duplicates are adjacent
    st               = COOPT_ERR_NOMEM;
    g->kv_sorted     = coopt_calloc((size_t)n_kv, sizeof(int32_t));
    g->tensor_sorted = coopt_calloc((size_t)n_tensors, sizeof(int32_t));
    if (!g->kv_sorted || !g->tensor_sorted) goto fail;
    st = COOPT_ERR_FORMAT;
    for (int32_t i = 0; i < (int32_t)n_kv; i++) g->kv_sorted[i] = i;
    for (int32_t i = 0; i < (int32_t)n_tensors; i++) g->tensor_sorted[i] = i;
    qsort_r(g->kv_sorted, (size_t)n_kv, sizeof(int32_t), cmp_kv_idx, g->kv);
    qsort_r(g->tensor_sorted, (size_t)n_tensors, sizeof(int32_t), cmp_tensor_idx, g->tensors);
    for (int64_t i = 1; i < g->n_kv; i++) {
        if (strcmp(g->kv[g->kv_sorted[i]].key, g->kv[g->kv_sorted[i - 1]].key) == 0) {
            coopt_fail(st, "%s: duplicate key '%s'", r.name, g->kv[g->kv_sorted[i]].key);
            goto fail;
        }
    }
    for (int64_t i = 1; i < g->n_tensors; i++) {
        if (strcmp(g->tensors[g->tensor_sorted[i]].name, g->tensors[g->tensor_sorted[i - 1]].name) == 0) {
            coopt_fail(st, "%s: duplicate tensor name '%s'", r.name, g->tensors[g->tensor_sorted[i]].name);
            goto fail;
        }
    }
    *out = g;
    return COOPT_OK;

fail_names:
    free(name_lens);
    free(name_ptrs);
fail:
    coopt_gguf_close(g);
    return st;
}

enum coopt_status coopt_gguf_open(const char *path, struct coopt_gguf **out) {
    *out = NULL;
    struct coopt_mmap mm;
    enum coopt_status st = coopt_mmap_open(path, &mm);
    if (st != COOPT_OK) return st;
    st = coopt_gguf_parse(mm.addr, mm.size, path, out);
    if (st != COOPT_OK) {
        coopt_mmap_close(&mm);
        return st;
    }
    (*out)->map_addr = mm.addr;
    (*out)->map_size = mm.size;
    return COOPT_OK;
}

// ---- lookups and getters ----

const struct coopt_gguf_kv *coopt_gguf_find_key(const struct coopt_gguf *g, const char *key) {
    int64_t lo = 0, hi = g->n_kv - 1;
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int     c   = strcmp(key, g->kv[g->kv_sorted[mid]].key);
        if (c == 0) return &g->kv[g->kv_sorted[mid]];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

const struct coopt_gguf_tensor *coopt_gguf_find_tensor(const struct coopt_gguf *g, const char *name) {
    int64_t lo = 0, hi = g->n_tensors - 1;
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int     c   = strcmp(name, g->tensors[g->tensor_sorted[mid]].name);
        if (c == 0) return &g->tensors[g->tensor_sorted[mid]];
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

// Integer value as sign + magnitude. False if v is not an integer type (bool counts).
static bool value_int(const uint8_t *p, uint32_t type, bool *neg, uint64_t *mag) {
    int64_t s = 0;
    *neg      = false;
    switch (type) {
    case COOPT_GGUF_U8: *mag = p[0]; return true;
    case COOPT_GGUF_BOOL: *mag = p[0] != 0; return true;
    case COOPT_GGUF_I8: s = (int8_t)p[0]; break;
    case COOPT_GGUF_U16: { uint16_t u; memcpy(&u, p, 2); *mag = u; return true; }
    case COOPT_GGUF_I16: { int16_t i; memcpy(&i, p, 2); s = i; break; }
    case COOPT_GGUF_U32: { uint32_t u; memcpy(&u, p, 4); *mag = u; return true; }
    case COOPT_GGUF_I32: { int32_t i; memcpy(&i, p, 4); s = i; break; }
    case COOPT_GGUF_U64: memcpy(mag, p, 8); return true;
    case COOPT_GGUF_I64: memcpy(&s, p, 8); break;
    default: return false;
    }
    *neg = s < 0;
    *mag = s < 0 ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
    return true;
}

static const struct coopt_gguf_kv *lookup(const struct coopt_gguf *g, const char *key, bool required,
                                          enum coopt_status *st) {
    const struct coopt_gguf_kv *kv = coopt_gguf_find_key(g, key);
    *st                            = COOPT_OK;
    if (!kv && required) *st = coopt_fail(COOPT_ERR_FORMAT, "%s: required key '%s' is missing", g->name, key);
    return kv;
}

static enum coopt_status bad_type(const struct coopt_gguf *g, const char *key, uint32_t type, const char *want) {
    return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' has type %s, expected %s", g->name, key, value_type_name(type),
                      want);
}

// Integer getter core: value in [lo_neg .. hi] where lo_neg is the largest allowed negative magnitude.
static enum coopt_status get_int(const struct coopt_gguf *g, const char *key, bool required, uint64_t max_neg,
                                 uint64_t max_pos, bool *neg, uint64_t *mag, bool *found) {
    enum coopt_status           st;
    const struct coopt_gguf_kv *kv = lookup(g, key, required, &st);
    *found                         = kv != NULL;
    if (!kv) return st;
    if (!value_int(kv->val.data, kv->val.type, neg, mag)) return bad_type(g, key, kv->val.type, "an integer");
    if ((*neg && *mag > max_neg) || (!*neg && *mag > max_pos)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' value %s%llu is out of range", g->name, key,
                          *neg ? "-" : "", (unsigned long long)*mag);
    }
    return COOPT_OK;
}

enum coopt_status coopt_gguf_get_u32(const struct coopt_gguf *g, const char *key, bool required, uint32_t *out) {
    bool     neg, found;
    uint64_t mag;
    enum coopt_status st = get_int(g, key, required, 0, UINT32_MAX, &neg, &mag, &found);
    if (st == COOPT_OK && found) *out = (uint32_t)mag;
    return st;
}

enum coopt_status coopt_gguf_get_i32(const struct coopt_gguf *g, const char *key, bool required, int32_t *out) {
    bool     neg, found;
    uint64_t mag;
    enum coopt_status st = get_int(g, key, required, (uint64_t)INT32_MAX + 1, INT32_MAX, &neg, &mag, &found);
    if (st == COOPT_OK && found) *out = neg ? (int32_t)(-(int64_t)mag) : (int32_t)mag;
    return st;
}

enum coopt_status coopt_gguf_get_u64(const struct coopt_gguf *g, const char *key, bool required, uint64_t *out) {
    bool     neg, found;
    uint64_t mag;
    enum coopt_status st = get_int(g, key, required, 0, UINT64_MAX, &neg, &mag, &found);
    if (st == COOPT_OK && found) *out = mag;
    return st;
}

enum coopt_status coopt_gguf_get_f32(const struct coopt_gguf *g, const char *key, bool required, float *out) {
    enum coopt_status           st;
    const struct coopt_gguf_kv *kv = lookup(g, key, required, &st);
    if (!kv) return st;
    bool     neg;
    uint64_t mag;
    if (kv->val.type == COOPT_GGUF_F32) memcpy(out, kv->val.data, 4);
    else if (kv->val.type == COOPT_GGUF_F64) {
        double d;
        memcpy(&d, kv->val.data, 8);
        *out = (float)d;
    } else if (kv->val.type != COOPT_GGUF_BOOL && value_int(kv->val.data, kv->val.type, &neg, &mag)) {
        *out = neg ? -(float)mag : (float)mag;
    } else {
        return bad_type(g, key, kv->val.type, "a number");
    }
    return COOPT_OK;
}

enum coopt_status coopt_gguf_get_bool(const struct coopt_gguf *g, const char *key, bool required, bool *out) {
    enum coopt_status           st;
    const struct coopt_gguf_kv *kv = lookup(g, key, required, &st);
    if (!kv) return st;
    bool     neg;
    uint64_t mag;
    if (!value_int(kv->val.data, kv->val.type, &neg, &mag)) return bad_type(g, key, kv->val.type, "a bool");
    *out = mag != 0;
    return COOPT_OK;
}

enum coopt_status coopt_gguf_get_str(const struct coopt_gguf *g, const char *key, bool required, const char **s,
                                     size_t *len) {
    enum coopt_status           st;
    const struct coopt_gguf_kv *kv = lookup(g, key, required, &st);
    if (!kv) return st;
    if (kv->val.type != COOPT_GGUF_STRING) return bad_type(g, key, kv->val.type, "a string");
    *s   = (const char *)kv->val.data;
    *len = kv->val.n_bytes;
    return COOPT_OK;
}

enum coopt_status coopt_gguf_get_arr(const struct coopt_gguf *g, const char *key, bool required,
                                     struct coopt_gguf_value *out) {
    enum coopt_status           st;
    const struct coopt_gguf_kv *kv = lookup(g, key, required, &st);
    if (!kv) return st;
    if (kv->val.type != COOPT_GGUF_ARRAY) return bad_type(g, key, kv->val.type, "an array");
    *out = kv->val;
    return COOPT_OK;
}

enum coopt_status coopt_gguf_arr_strings(const struct coopt_gguf *g, const char *key,
                                         const struct coopt_gguf_value *arr, const char **ptrs, uint32_t *lens) {
    if (arr->type != COOPT_GGUF_ARRAY || arr->elem_type != COOPT_GGUF_STRING)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' is not an array of strings", g->name, key);
    const uint8_t *p = arr->data; // validated by the parser
    for (uint64_t i = 0; i < arr->n; i++) {
        uint64_t len;
        memcpy(&len, p, 8);
        if (len > UINT32_MAX)
            return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' element %llu is too long", g->name, key,
                              (unsigned long long)i);
        ptrs[i] = (const char *)p + 8;
        lens[i] = (uint32_t)len;
        p += 8 + len;
    }
    return COOPT_OK;
}

enum coopt_status coopt_gguf_arr_f32(const struct coopt_gguf *g, const char *key, const struct coopt_gguf_value *arr,
                                     float *out) {
    uint32_t et = arr->elem_type;
    if (arr->type != COOPT_GGUF_ARRAY || et == COOPT_GGUF_STRING || et == COOPT_GGUF_ARRAY || et == COOPT_GGUF_BOOL)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' is not an array of numbers", g->name, key);
    size_t es = g_value_size[et];
    for (uint64_t i = 0; i < arr->n; i++) {
        const uint8_t *p = arr->data + i * es;
        bool           neg;
        uint64_t       mag = 0;
        if (et == COOPT_GGUF_F32) memcpy(&out[i], p, 4);
        else if (et == COOPT_GGUF_F64) {
            double d;
            memcpy(&d, p, 8);
            out[i] = (float)d;
        } else {
            value_int(p, et, &neg, &mag);
            out[i] = neg ? -(float)mag : (float)mag;
        }
    }
    return COOPT_OK;
}

enum coopt_status coopt_gguf_arr_i32(const struct coopt_gguf *g, const char *key, const struct coopt_gguf_value *arr,
                                     int32_t *out) {
    uint32_t et = arr->elem_type;
    if (arr->type != COOPT_GGUF_ARRAY || et == COOPT_GGUF_STRING || et == COOPT_GGUF_ARRAY || et == COOPT_GGUF_F32 ||
        et == COOPT_GGUF_F64)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' is not an array of integers", g->name, key);
    size_t es = g_value_size[et];
    for (uint64_t i = 0; i < arr->n; i++) {
        bool     neg;
        uint64_t mag = 0;
        value_int(arr->data + i * es, et, &neg, &mag);
        if ((neg && mag > (uint64_t)INT32_MAX + 1) || (!neg && mag > INT32_MAX))
            return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' element %llu is out of int32 range", g->name, key,
                              (unsigned long long)i);
        out[i] = neg ? (int32_t)(-(int64_t)mag) : (int32_t)mag;
    }
    return COOPT_OK;
}

// ---- tokenizer from tokenizer.ggml.* ----

static bool str_is(const char *s, size_t len, const char *lit) {
    return len == strlen(lit) && memcmp(s, lit, len) == 0;
}

// Token id key: absent or 0xffffffff (llama.cpp's "none") -> -1; otherwise must be < n.
static enum coopt_status get_token_id(const struct coopt_gguf *g, const char *key, int32_t n, int32_t *out) {
    uint32_t          v  = UINT32_MAX;
    enum coopt_status st = coopt_gguf_get_u32(g, key, false, &v);
    if (st != COOPT_OK) return st;
    if (v == UINT32_MAX) {
        *out = -1;
        return COOPT_OK;
    }
    if (v >= (uint32_t)n)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' is %u, outside the vocabulary of %d tokens", g->name, key, v,
                          n);
    *out = (int32_t)v;
    return COOPT_OK;
}

enum coopt_status coopt_gguf_tokenizer_from(const struct coopt_gguf *g, struct coopt_tokenizer **out) {
    *out                       = NULL;
    struct coopt_vocab_desc d  = {0};
    const char            **tok_ptrs = NULL, **merge_ptrs = NULL;
    uint32_t               *tok_lens = NULL, *merge_lens = NULL;
    float                  *scores   = NULL;
    int32_t                *attrs    = NULL;
    const char             *model, *pre = NULL;
    size_t                  model_len, pre_len = 0;
    struct coopt_gguf_value arr;
    enum coopt_status       st = coopt_gguf_get_str(g, "tokenizer.ggml.model", true, &model, &model_len);
    if (st != COOPT_OK) return st;
    if (str_is(model, model_len, "llama")) d.type = COOPT_TOK_SPM;
    else if (str_is(model, model_len, "gpt2")) d.type = COOPT_TOK_BPE_BYTES;
    else
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: tokenizer model '%.*s' is not supported (supported: llama, gpt2)",
                          g->name, (int)COOPT_MIN(model_len, 64), model);

    if ((st = coopt_gguf_get_arr(g, "tokenizer.ggml.tokens", true, &arr)) != COOPT_OK) return st;
    if (arr.n == 0 || arr.n > INT32_MAX)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key 'tokenizer.ggml.tokens' has %llu entries", g->name,
                          (unsigned long long)arr.n);
    int32_t n  = (int32_t)arr.n;
    d.n_tokens = n;
    st         = COOPT_ERR_NOMEM;
    tok_ptrs   = coopt_calloc((size_t)n, sizeof(*tok_ptrs));
    tok_lens   = coopt_calloc((size_t)n, sizeof(*tok_lens));
    if (!tok_ptrs || !tok_lens) goto done;
    if ((st = coopt_gguf_arr_strings(g, "tokenizer.ggml.tokens", &arr, tok_ptrs, tok_lens)) != COOPT_OK) goto done;
    d.tokens     = tok_ptrs;
    d.token_lens = tok_lens;

    static const char *const per_token[2] = {"tokenizer.ggml.scores", "tokenizer.ggml.token_type"};
    for (int k = 0; k < 2; k++) {
        if ((st = coopt_gguf_get_arr(g, per_token[k], false, &arr)) != COOPT_OK) goto done;
        if (!coopt_gguf_find_key(g, per_token[k])) continue;
        if (arr.n != (uint64_t)n) {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' has %llu entries, expected %d (one per token)", g->name,
                            per_token[k], (unsigned long long)arr.n, n);
            goto done;
        }
        st = COOPT_ERR_NOMEM;
        if (k == 0) {
            if (!(scores = coopt_malloc((size_t)n * sizeof(float)))) goto done;
            if ((st = coopt_gguf_arr_f32(g, per_token[k], &arr, scores)) != COOPT_OK) goto done;
        } else {
            if (!(attrs = coopt_malloc((size_t)n * sizeof(int32_t)))) goto done;
            if ((st = coopt_gguf_arr_i32(g, per_token[k], &arr, attrs)) != COOPT_OK) goto done;
        }
    }
    d.scores      = scores;
    d.token_attrs = attrs;

    if (d.type == COOPT_TOK_BPE_BYTES) {
        if ((st = coopt_gguf_get_arr(g, "tokenizer.ggml.merges", true, &arr)) != COOPT_OK) goto done;
        if (arr.n > INT32_MAX) {
            st = coopt_fail(COOPT_ERR_FORMAT, "%s: too many merges", g->name);
            goto done;
        }
        st         = COOPT_ERR_NOMEM;
        merge_ptrs = coopt_calloc((size_t)arr.n, sizeof(*merge_ptrs));
        merge_lens = coopt_calloc((size_t)arr.n, sizeof(*merge_lens));
        if (!merge_ptrs || !merge_lens) goto done;
        if ((st = coopt_gguf_arr_strings(g, "tokenizer.ggml.merges", &arr, merge_ptrs, merge_lens)) != COOPT_OK)
            goto done;
        d.n_merges   = (int32_t)arr.n;
        d.merges     = merge_ptrs;
        d.merge_lens = merge_lens;
    }

    if ((st = coopt_gguf_get_str(g, "tokenizer.ggml.pre", false, &pre, &pre_len)) != COOPT_OK) goto done;
    d.pretok = COOPT_PRETOK_DEFAULT;
    if (pre) {
        if (str_is(pre, pre_len, "llama-bpe") || str_is(pre, pre_len, "llama3") || str_is(pre, pre_len, "smaug-bpe"))
            d.pretok = COOPT_PRETOK_LLAMA3;
        else if (str_is(pre, pre_len, "gpt2")) d.pretok = COOPT_PRETOK_GPT2;
        else if (!str_is(pre, pre_len, "default"))
            coopt_log_info("%s: pre-tokenizer '%.*s' not known, using the default", g->name,
                           (int)COOPT_MIN(pre_len, 64), pre);
    }

    int32_t eog[2] = {-1, -1};
    if ((st = get_token_id(g, "tokenizer.ggml.bos_token_id", n, &d.bos_id)) != COOPT_OK ||
        (st = get_token_id(g, "tokenizer.ggml.eos_token_id", n, &d.eos_id)) != COOPT_OK ||
        (st = get_token_id(g, "tokenizer.ggml.unknown_token_id", n, &d.unk_id)) != COOPT_OK ||
        (st = get_token_id(g, "tokenizer.ggml.padding_token_id", n, &d.pad_id)) != COOPT_OK ||
        (st = get_token_id(g, "tokenizer.ggml.eot_token_id", n, &eog[0])) != COOPT_OK ||
        (st = get_token_id(g, "tokenizer.ggml.eom_token_id", n, &eog[1])) != COOPT_OK)
        goto done;
    int32_t eog_ids[2];
    for (int k = 0; k < 2; k++)
        if (eog[k] >= 0) eog_ids[d.n_eog++] = eog[k];
    d.eog_ids = d.n_eog ? eog_ids : NULL;

    d.add_bos          = d.type == COOPT_TOK_SPM;
    d.add_eos          = false;
    d.add_space_prefix = d.type == COOPT_TOK_SPM;
    if ((st = coopt_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", false, &d.add_bos)) != COOPT_OK ||
        (st = coopt_gguf_get_bool(g, "tokenizer.ggml.add_eos_token", false, &d.add_eos)) != COOPT_OK ||
        (st = coopt_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", false, &d.add_space_prefix)) != COOPT_OK)
        goto done;

    st = coopt_tokenizer_init_vocab(&d, out);
done:
    free(tok_ptrs);
    free(tok_lens);
    free(merge_ptrs);
    free(merge_lens);
    free(scores);
    free(attrs);
    return st;
}

enum coopt_status coopt_gguf_load_tokenizer(const char *path, struct coopt_tokenizer **out) {
    *out = NULL;
    struct coopt_gguf *g;
    enum coopt_status  st = coopt_gguf_open(path, &g);
    if (st != COOPT_OK) return st;
    st = coopt_gguf_tokenizer_from(g, out);
    coopt_gguf_close(g);
    return st;
}

// ---- llama model loader ----

// A positive int32 config value from key `arch.<suffix>`.
static enum coopt_status get_cfg_i32(const struct coopt_gguf *g, const char *suffix, bool required, int32_t *out) {
    char key[128];
    snprintf(key, sizeof(key), "llama.%s", suffix);
    uint32_t          v  = (uint32_t)*out;
    bool              had = coopt_gguf_find_key(g, key) != NULL;
    enum coopt_status st = coopt_gguf_get_u32(g, key, required, &v);
    if (st != COOPT_OK) return st;
    if (had && (v == 0 || v > INT32_MAX))
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' is %u, expected a positive int32", g->name, key, v);
    *out = (int32_t)v;
    return COOPT_OK;
}

static enum coopt_status get_cfg_f32(const struct coopt_gguf *g, const char *suffix, bool required, float *out) {
    char key[128];
    snprintf(key, sizeof(key), "llama.%s", suffix);
    enum coopt_status st = coopt_gguf_get_f32(g, key, required, out);
    if (st == COOPT_OK && !(isfinite(*out) && *out > 0))
        return coopt_fail(COOPT_ERR_FORMAT, "%s: key '%s' is %g, expected a positive number", g->name, key,
                          (double)*out);
    return st;
}

static enum coopt_status find_typed(const struct coopt_gguf *g, const char *name, int want_dims,
                                    const struct coopt_gguf_tensor **t, enum coopt_dtype *dt) {
    *t = coopt_gguf_find_tensor(g, name);
    if (!*t) return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s' not found", g->name, name);
    for (int d = want_dims; d < COOPT_GGUF_MAX_DIMS; d++) {
        if ((*t)->ne[d] != 1)
            return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s' has %d dimensions, expected %d", g->name, name,
                              (*t)->n_dims, want_dims);
    }
    enum coopt_status st = coopt_gguf_tensor_dtype(g, *t, dt);
    if (st != COOPT_OK) return st;
    // compute kernels load f32 / f16 (block scales) directly: general.alignment 1 or 2 could break that
    size_t need = *dt == COOPT_DTYPE_F32 ? 4 : 2;
    if ((uintptr_t)(*t)->data % need != 0)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: tensor '%s' data is not %zu-byte aligned (general.alignment %u)",
                          g->name, name, need, g->alignment);
    return COOPT_OK;
}

static enum coopt_status bind_matrix(const struct coopt_gguf *g, const char *name, struct coopt_weight *w) {
    const struct coopt_gguf_tensor *t;
    enum coopt_dtype                dt = COOPT_DTYPE_F32;
    enum coopt_status               st = find_typed(g, name, 2, &t, &dt);
    if (st != COOPT_OK) return st;
    w->dtype = dt;
    w->n_in  = t->ne[0];
    w->n_out = t->ne[1];
    w->data  = t->data;
    return COOPT_OK;
}

static enum coopt_status bind_vector(struct coopt_model *m, const struct coopt_gguf *g, const char *name, int64_t n,
                                     const float **out) {
    const struct coopt_gguf_tensor *t;
    enum coopt_dtype                dt = COOPT_DTYPE_F32;
    enum coopt_status               st = find_typed(g, name, 1, &t, &dt);
    if (st != COOPT_OK) return st;
    if (t->ne[0] != n)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s' has %lld elements, expected %lld", g->name, name,
                          (long long)t->ne[0], (long long)n);
    return coopt_model_f32_vector(m, dt, t->data, n, out);
}

// llama.cpp stores LLaMA 3.1-style RoPE scaling as a tensor of per-frequency divisors
// (rope_freqs.weight, [head_dim/2] f32) instead of metadata. We accept it if it equals what
// the llama3 formula gives with factor = max(divisor), low/high freq factors 1 and 4 and the
// original context from metadata (default 8192), which is what every released LLaMA 3.x uses.
static enum coopt_status rope_freqs_llama3(const struct coopt_gguf *g, const struct coopt_gguf_tensor *t,
                                           struct coopt_model_config *c) {
    int64_t half = c->head_dim / 2;
    if (t->ggml_type != COOPT_GGML_F32 || t->n_dims != 1 || t->ne[0] != half)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: tensor 'rope_freqs.weight' (%s, %lld elements) is not f32 [%lld]",
                          g->name, coopt_ggml_type_name(t->ggml_type), (long long)t->ne[0], (long long)half);
    float factor = 1, f[1024];
    if (half > (int64_t)COOPT_ARRAY_LEN(f))
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: head size %d too large for rope_freqs.weight", g->name,
                          c->head_dim);
    memcpy(f, t->data, (size_t)half * sizeof(float)); // the file's alignment may be < 4
    for (int64_t i = 0; i < half; i++) factor = fmaxf(factor, f[i]);
    if (factor == 1) return COOPT_OK; // all ones: no scaling
    float lo = 1, hi = 4, orig = c->rope_orig_ctx > 0 ? (float)c->rope_orig_ctx : 8192;
    for (int64_t i = 0; i < half; i++) {
        double freq = pow(c->rope_theta, -2.0 * (double)i / (double)c->head_dim);
        double wl   = 2 * M_PI / freq, want;
        if (wl < orig / hi) want = 1;
        else if (wl > orig / lo) want = factor;
        else {
            double smooth = (orig / wl - lo) / (hi - lo);
            want          = 1 / ((1 - smooth) / factor + smooth);
        }
        if (!(fabs(f[i] - want) <= 1e-3 * want))
            return coopt_fail(COOPT_ERR_UNSUPPORTED,
                              "%s: tensor 'rope_freqs.weight' element %lld is %g, which the llama3 RoPE scaling "
                              "(factor %g, original context %g) does not produce (%g)",
                              g->name, (long long)i, (double)f[i], (double)factor, (double)orig, want);
    }
    c->rope_scaling          = COOPT_ROPE_SCALING_LLAMA3;
    c->rope_factor           = factor;
    c->rope_low_freq_factor  = lo;
    c->rope_high_freq_factor = hi;
    c->rope_orig_ctx         = (int32_t)orig;
    return COOPT_OK;
}

static enum coopt_status gguf_config(const struct coopt_gguf *g, struct coopt_model_config *c) {
    enum coopt_status st;
    memset(c, 0, sizeof(*c));
    c->rope_theta  = 10000;
    c->norm_eps    = 1e-5f;
    c->rope_layout = COOPT_ROPE_INTERLEAVED; // GGUF stores Q/K rows for pairwise RoPE
    c->rope_factor = 1;
    if ((st = get_cfg_i32(g, "embedding_length", true, &c->dim)) != COOPT_OK ||
        (st = get_cfg_i32(g, "block_count", true, &c->n_layers)) != COOPT_OK ||
        (st = get_cfg_i32(g, "feed_forward_length", true, &c->ffn_dim)) != COOPT_OK ||
        (st = get_cfg_i32(g, "attention.head_count", true, &c->n_heads)) != COOPT_OK ||
        (st = get_cfg_i32(g, "context_length", true, &c->n_ctx_train)) != COOPT_OK)
        return st;
    c->n_kv_heads = c->n_heads;
    if ((st = get_cfg_i32(g, "attention.head_count_kv", false, &c->n_kv_heads)) != COOPT_OK) return st;
    if (c->n_heads % c->n_kv_heads != 0)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: head_count %d is not a multiple of head_count_kv %d", g->name,
                          c->n_heads, c->n_kv_heads);
    c->head_dim = c->dim / c->n_heads;
    if ((st = get_cfg_i32(g, "attention.key_length", false, &c->head_dim)) != COOPT_OK) return st;
    int32_t v_len = c->head_dim;
    if ((st = get_cfg_i32(g, "attention.value_length", false, &v_len)) != COOPT_OK) return st;
    if (v_len != c->head_dim || (!coopt_gguf_find_key(g, "llama.attention.key_length") && c->dim % c->n_heads))
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: head size %d (value %d) with %d heads and dim %d is not supported",
                          g->name, c->head_dim, v_len, c->n_heads, c->dim);
    int32_t rope_dim = c->head_dim;
    if ((st = get_cfg_i32(g, "rope.dimension_count", false, &rope_dim)) != COOPT_OK) return st;
    if (rope_dim != c->head_dim || c->head_dim % 2)
        return coopt_fail(COOPT_ERR_UNSUPPORTED,
                          "%s: rope.dimension_count %d with head size %d (partial rotary) is not supported", g->name,
                          rope_dim, c->head_dim);
    if ((st = get_cfg_f32(g, "attention.layer_norm_rms_epsilon", true, &c->norm_eps)) != COOPT_OK ||
        (st = get_cfg_f32(g, "rope.freq_base", false, &c->rope_theta)) != COOPT_OK)
        return st;
    if ((st = get_cfg_i32(g, "attention.sliding_window", false, &c->sliding_window)) != COOPT_OK) return st;

    const char *stype = NULL;
    size_t      slen  = 0;
    if ((st = coopt_gguf_get_str(g, "llama.rope.scaling.type", false, &stype, &slen)) != COOPT_OK) return st;
    if ((st = get_cfg_i32(g, "rope.scaling.original_context_length", false, &c->rope_orig_ctx)) != COOPT_OK) return st;
    if (stype && str_is(stype, slen, "linear")) {
        c->rope_scaling = COOPT_ROPE_SCALING_LINEAR;
        if ((st = get_cfg_f32(g, "rope.scaling.factor", true, &c->rope_factor)) != COOPT_OK) return st;
    } else if (stype && !str_is(stype, slen, "none")) {
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: rope scaling type '%.*s' is not supported (supported: none, linear)",
                          g->name, (int)COOPT_MIN(slen, 64), stype);
    }
    // every layer has 9 tensors: a block_count beyond that is corrupt (and bounds the allocation)
    if (c->n_layers > g->n_tensors / 9)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: block_count %d but the file has only %lld tensors", g->name,
                          c->n_layers, (long long)g->n_tensors);
    return COOPT_OK;
}

enum coopt_status coopt_gguf_load_model(struct coopt_model *m, const char *path) {
    struct coopt_mmap *mm;
    struct coopt_gguf *g  = NULL;
    enum coopt_status  st = coopt_model_map_file(m, path, &mm);
    if (st != COOPT_OK) return st;
    if ((st = coopt_gguf_parse(mm->addr, mm->size, path, &g)) != COOPT_OK) return st;

    const char *arch;
    size_t      arch_len;
    if ((st = coopt_gguf_get_str(g, "general.architecture", true, &arch, &arch_len)) != COOPT_OK) goto done;
    if (!str_is(arch, arch_len, "llama")) {
        st = coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: architecture '%.*s' is not supported (supported: llama)", path,
                        (int)COOPT_MIN(arch_len, 64), arch);
        goto done;
    }
    struct coopt_model_config *c = &m->config;
    if ((st = gguf_config(g, c)) != COOPT_OK) goto done;

    // token embedding decides n_vocab; llama.vocab_size must agree if present
    if ((st = bind_matrix(g, "token_embd.weight", &m->tok_embd)) != COOPT_OK) goto done;
    if (m->tok_embd.n_out > INT32_MAX) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: tensor 'token_embd.weight' has too many rows", path);
        goto done;
    }
    c->n_vocab     = (int32_t)m->tok_embd.n_out;
    int32_t n_voc  = c->n_vocab;
    if ((st = get_cfg_i32(g, "vocab_size", false, &n_voc)) != COOPT_OK) goto done;
    if (n_voc != c->n_vocab) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: llama.vocab_size %d but token_embd.weight has %d rows", path, n_voc,
                        c->n_vocab);
        goto done;
    }
    if ((st = bind_vector(m, g, "output_norm.weight", c->dim, &m->out_norm)) != COOPT_OK) goto done;
    const struct coopt_gguf_tensor *out_t = coopt_gguf_find_tensor(g, "output.weight");
    if (out_t) {
        if ((st = bind_matrix(g, "output.weight", &m->output)) != COOPT_OK) goto done;
        // Some converters store a tied classifier twice (stories260K.gguf); share the bytes.
        // memcmp stops at the first difference, so an untied model costs a few bytes here.
        const struct coopt_gguf_tensor *emb_t = coopt_gguf_find_tensor(g, "token_embd.weight");
        if (out_t->ggml_type == emb_t->ggml_type && out_t->n_bytes == emb_t->n_bytes &&
            m->output.n_in == m->tok_embd.n_in && memcmp(out_t->data, emb_t->data, out_t->n_bytes) == 0) {
            m->output           = m->tok_embd;
            c->tied_embeddings  = true;
        }
    } else {
        m->output          = m->tok_embd;
        c->tied_embeddings = true;
    }

    const struct coopt_gguf_tensor *rf = coopt_gguf_find_tensor(g, "rope_freqs.weight");
    if (rf && (st = rope_freqs_llama3(g, rf, c)) != COOPT_OK) goto done;

    m->layers = coopt_calloc((size_t)c->n_layers, sizeof(*m->layers)); // freed by coopt_model_free
    if (!m->layers) {
        st = COOPT_ERR_NOMEM;
        goto done;
    }
    for (int32_t l = 0; l < c->n_layers; l++) {
        struct coopt_layer *L = &m->layers[l];
        char                name[96];
#define BLK(suffix) (snprintf(name, sizeof(name), "blk.%d." suffix ".weight", (int)l), name)
        if ((st = bind_vector(m, g, BLK("attn_norm"), c->dim, &L->attn_norm)) != COOPT_OK ||
            (st = bind_vector(m, g, BLK("ffn_norm"), c->dim, &L->ffn_norm)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("attn_q"), &L->wq)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("attn_k"), &L->wk)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("attn_v"), &L->wv)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("attn_output"), &L->wo)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("ffn_gate"), &L->w_gate)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("ffn_up"), &L->w_up)) != COOPT_OK ||
            (st = bind_matrix(g, BLK("ffn_down"), &L->w_down)) != COOPT_OK)
            goto done;
#undef BLK
    }

    if ((st = coopt_gguf_tokenizer_from(g, &m->tokenizer)) != COOPT_OK) goto done;
    if (coopt_tokenizer_n_vocab(m->tokenizer) > c->n_vocab) {
        st = coopt_fail(COOPT_ERR_FORMAT, "%s: the vocabulary has %d tokens but token_embd.weight only %d rows", path,
                        coopt_tokenizer_n_vocab(m->tokenizer), c->n_vocab);
        goto done;
    }
done:
    coopt_gguf_close(g);
    return st;
}

// ---- writer ----

struct wkv {
    char    *key;
    uint32_t type;
    uint8_t *val; // encoded value after the type tag
    size_t   n;
};

struct wtensor {
    char              *name;
    uint32_t           type;
    int                n_dims;
    int64_t            ne[COOPT_GGUF_MAX_DIMS];
    const void        *data;
    coopt_gguf_fill_fn fill;
    void              *user;
    size_t             n_bytes;
    uint64_t           offset; // in the data section, assigned by write
};

struct coopt_gguf_writer {
    struct wkv     *kv;
    int64_t         n_kv, cap_kv;
    struct wtensor *t;
    int64_t         n_t, cap_t;
    uint32_t        alignment;
};

struct coopt_gguf_sink {
    FILE       *f;
    const char *path;
    uint64_t    written, expected;
};

enum coopt_status coopt_gguf_sink_write(struct coopt_gguf_sink *s, const void *data, size_t n) {
    if (n > s->expected - s->written)
        return coopt_fail(COOPT_ERR_INVALID, "%s: tensor fill wrote more than its %llu bytes", s->path,
                          (unsigned long long)s->expected);
    if (n && fwrite(data, 1, n, s->f) != n)
        return coopt_fail(COOPT_ERR_IO, "%s: write failed: %s", s->path, strerror(errno));
    s->written += n;
    return COOPT_OK;
}

enum coopt_status coopt_gguf_writer_init(struct coopt_gguf_writer **out) {
    *out = coopt_calloc(1, sizeof(**out));
    if (!*out) return COOPT_ERR_NOMEM;
    (*out)->alignment = COOPT_GGUF_DEFAULT_ALIGNMENT;
    return COOPT_OK;
}

void coopt_gguf_writer_free(struct coopt_gguf_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val);
    }
    for (int64_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->kv);
    free(w->t);
    free(w);
}

static enum coopt_status grow(void **arr, int64_t *cap, int64_t need, size_t elem) {
    if (need <= *cap) return COOPT_OK;
    int64_t nc = *cap ? *cap * 2 : 16;
    void   *p  = coopt_realloc(*arr, (size_t)nc * elem);
    if (!p) return COOPT_ERR_NOMEM;
    *arr = p;
    *cap = nc;
    return COOPT_OK;
}

// Stores (a copy of) an encoded value under key, replacing an earlier one.
static enum coopt_status set_kv(struct coopt_gguf_writer *w, const char *key, uint32_t type, const void *val,
                                size_t n) {
    if (strcmp(key, "general.alignment") == 0) {
        uint32_t a = 0;
        if (type == COOPT_GGUF_U32) memcpy(&a, val, 4);
        if (type != COOPT_GGUF_U32 || a == 0 || (a & (a - 1)) != 0 || a > (1u << 30))
            return coopt_fail(COOPT_ERR_INVALID, "gguf writer: general.alignment must be a u32 power of two");
        w->alignment = a;
    }
    uint8_t *copy = coopt_malloc(n);
    if (!copy) return COOPT_ERR_NOMEM;
    if (n) memcpy(copy, val, n);
    for (int64_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, key) == 0) {
            free(w->kv[i].val);
            w->kv[i].type = type, w->kv[i].val = copy, w->kv[i].n = n;
            return COOPT_OK;
        }
    }
    char *k = coopt_strdup(key);
    if (!k || grow((void **)&w->kv, &w->cap_kv, w->n_kv + 1, sizeof(*w->kv)) != COOPT_OK) {
        free(k);
        free(copy);
        return COOPT_ERR_NOMEM;
    }
    w->kv[w->n_kv++] = (struct wkv){k, type, copy, n};
    return COOPT_OK;
}

enum coopt_status coopt_gguf_writer_set_alignment(struct coopt_gguf_writer *w, uint32_t a) {
    return set_kv(w, "general.alignment", COOPT_GGUF_U32, &a, 4);
}
enum coopt_status coopt_gguf_writer_set_u32(struct coopt_gguf_writer *w, const char *key, uint32_t v) {
    return set_kv(w, key, COOPT_GGUF_U32, &v, 4);
}
enum coopt_status coopt_gguf_writer_set_i32(struct coopt_gguf_writer *w, const char *key, int32_t v) {
    return set_kv(w, key, COOPT_GGUF_I32, &v, 4);
}
enum coopt_status coopt_gguf_writer_set_u64(struct coopt_gguf_writer *w, const char *key, uint64_t v) {
    return set_kv(w, key, COOPT_GGUF_U64, &v, 8);
}
enum coopt_status coopt_gguf_writer_set_f32(struct coopt_gguf_writer *w, const char *key, float v) {
    return set_kv(w, key, COOPT_GGUF_F32, &v, 4);
}
enum coopt_status coopt_gguf_writer_set_bool(struct coopt_gguf_writer *w, const char *key, bool v) {
    uint8_t b = v;
    return set_kv(w, key, COOPT_GGUF_BOOL, &b, 1);
}

enum coopt_status coopt_gguf_writer_set_str(struct coopt_gguf_writer *w, const char *key, const char *s) {
    uint64_t len = strlen(s);
    uint8_t *buf = coopt_malloc(8 + len);
    if (!buf) return COOPT_ERR_NOMEM;
    memcpy(buf, &len, 8);
    memcpy(buf + 8, s, len);
    enum coopt_status st = set_kv(w, key, COOPT_GGUF_STRING, buf, 8 + len);
    free(buf);
    return st;
}

enum coopt_status coopt_gguf_writer_set_arr(struct coopt_gguf_writer *w, const char *key, enum coopt_gguf_type elem,
                                            const void *data, uint64_t n) {
    if ((unsigned)elem >= COOPT_GGUF_TYPE_COUNT || elem == COOPT_GGUF_STRING || elem == COOPT_GGUF_ARRAY)
        return coopt_fail(COOPT_ERR_INVALID, "gguf writer: key '%s': set_arr needs a fixed-size element type", key);
    size_t bytes;
    if (!coopt_mul_ok((size_t)n, g_value_size[elem], &bytes) || bytes > SIZE_MAX - 12) return COOPT_ERR_NOMEM;
    uint8_t *buf = coopt_malloc(12 + bytes);
    if (!buf) return COOPT_ERR_NOMEM;
    uint32_t et = elem;
    memcpy(buf, &et, 4);
    memcpy(buf + 4, &n, 8);
    if (bytes) memcpy(buf + 12, data, bytes);
    enum coopt_status st = set_kv(w, key, COOPT_GGUF_ARRAY, buf, 12 + bytes);
    free(buf);
    return st;
}

enum coopt_status coopt_gguf_writer_set_arr_str(struct coopt_gguf_writer *w, const char *key,
                                                const char *const *strs, const uint32_t *lens, uint64_t n) {
    size_t bytes = 12;
    for (uint64_t i = 0; i < n; i++) bytes += 8 + (lens ? lens[i] : strlen(strs[i]));
    uint8_t *buf = coopt_malloc(bytes);
    if (!buf) return COOPT_ERR_NOMEM;
    uint32_t et = COOPT_GGUF_STRING;
    memcpy(buf, &et, 4);
    memcpy(buf + 4, &n, 8);
    uint8_t *p = buf + 12;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len = lens ? lens[i] : strlen(strs[i]);
        memcpy(p, &len, 8);
        memcpy(p + 8, strs[i], len);
        p += 8 + len;
    }
    enum coopt_status st = set_kv(w, key, COOPT_GGUF_ARRAY, buf, bytes);
    free(buf);
    return st;
}

enum coopt_status coopt_gguf_writer_copy_kv(struct coopt_gguf_writer *w, const struct coopt_gguf_kv *kv) {
    return set_kv(w, kv->key, kv->val.type, kv->val.raw, kv->val.raw_bytes);
}

enum coopt_status coopt_gguf_writer_add_tensor(struct coopt_gguf_writer *w, const char *name, uint32_t ggml_type,
                                               int n_dims, const int64_t *ne, const void *data,
                                               coopt_gguf_fill_fn fill, void *user) {
    if (n_dims < 1 || n_dims > COOPT_GGUF_MAX_DIMS || (!data && !fill))
        return coopt_fail(COOPT_ERR_INVALID, "gguf writer: tensor '%s': bad n_dims %d or no data", name, n_dims);
    size_t nb    = coopt_ggml_nbytes(ggml_type, n_dims, ne);
    bool   empty = false;
    for (int d = 0; d < n_dims; d++) empty |= ne[d] == 0;
    if (!ggml_info(ggml_type) || (nb == 0 && !empty))
        return coopt_fail(COOPT_ERR_INVALID, "gguf writer: tensor '%s': type %u / shape not representable", name,
                          ggml_type);
    for (int64_t i = 0; i < w->n_t; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return coopt_fail(COOPT_ERR_INVALID, "gguf writer: duplicate tensor '%s'", name);
    char *nm = coopt_strdup(name);
    if (!nm || grow((void **)&w->t, &w->cap_t, w->n_t + 1, sizeof(*w->t)) != COOPT_OK) {
        free(nm);
        return COOPT_ERR_NOMEM;
    }
    struct wtensor *t = &w->t[w->n_t++];
    *t                = (struct wtensor){.name = nm, .type = ggml_type, .n_dims = n_dims, .data = data,
                                         .fill = fill, .user = user, .n_bytes = nb};
    for (int d = 0; d < COOPT_GGUF_MAX_DIMS; d++) t->ne[d] = d < n_dims ? ne[d] : 1;
    return COOPT_OK;
}

static bool put(FILE *f, const void *p, size_t n) { return n == 0 || fwrite(p, 1, n, f) == n; }
static bool put_u32(FILE *f, uint32_t v) { return put(f, &v, 4); }
static bool put_u64(FILE *f, uint64_t v) { return put(f, &v, 8); }
static bool put_str(FILE *f, const char *s) { return put_u64(f, strlen(s)) && put(f, s, strlen(s)); }
static bool put_zeros(FILE *f, size_t n) {
    static const uint8_t z[64];
    for (; n > 0; n -= COOPT_MIN(n, sizeof(z)))
        if (!put(f, z, COOPT_MIN(n, sizeof(z)))) return false;
    return true;
}

enum coopt_status coopt_gguf_writer_write(struct coopt_gguf_writer *w, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) return coopt_fail(COOPT_ERR_IO, "%s: %s", path, strerror(errno));
    enum coopt_status st = COOPT_ERR_IO;
    uint64_t          a  = w->alignment, off = 0;
    for (int64_t i = 0; i < w->n_t; i++) {
        w->t[i].offset = off;
        off += (w->t[i].n_bytes + a - 1) / a * a;
    }
    bool ok = put_u32(f, GGUF_MAGIC) && put_u32(f, 3) && put_u64(f, (uint64_t)w->n_t) && put_u64(f, (uint64_t)w->n_kv);
    for (int64_t i = 0; ok && i < w->n_kv; i++)
        ok = put_str(f, w->kv[i].key) && put_u32(f, w->kv[i].type) && put(f, w->kv[i].val, w->kv[i].n);
    for (int64_t i = 0; ok && i < w->n_t; i++) {
        const struct wtensor *t = &w->t[i];
        ok = put_str(f, t->name) && put_u32(f, (uint32_t)t->n_dims);
        for (int d = 0; ok && d < t->n_dims; d++) ok = put_u64(f, (uint64_t)t->ne[d]);
        ok = ok && put_u32(f, t->type) && put_u64(f, t->offset);
    }
    long pos = ok ? ftell(f) : -1;
    ok       = ok && pos >= 0 && put_zeros(f, (size_t)((a - (uint64_t)pos % a) % a));
    for (int64_t i = 0; ok && i < w->n_t; i++) {
        const struct wtensor  *t    = &w->t[i];
        struct coopt_gguf_sink sink = {f, path, 0, t->n_bytes};
        if (t->data) {
            st = coopt_gguf_sink_write(&sink, t->data, t->n_bytes);
        } else if ((st = t->fill(t->user, &sink)) == COOPT_OK && sink.written != t->n_bytes) {
            st = coopt_fail(COOPT_ERR_INVALID, "%s: tensor '%s': fill wrote %llu of %zu bytes", path, t->name,
                            (unsigned long long)sink.written, t->n_bytes);
        }
        if (st != COOPT_OK) goto fail;
        st = COOPT_ERR_IO;
        if (i + 1 < w->n_t) ok = put_zeros(f, (size_t)((a - t->n_bytes % a) % a));
    }
    if (!ok) {
        coopt_fail(COOPT_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        goto fail;
    }
    if (fclose(f) != 0) {
        f = NULL;
        coopt_fail(COOPT_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        goto fail;
    }
    return COOPT_OK;
fail:
    if (f) fclose(f);
    remove(path);
    return st;
}
