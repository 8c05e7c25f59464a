/*
 * json_util.c -- typed cJSON getters with messages that name the file and key (json_util.h).
 */
#include "json_util.h"

#include "util.h"

#include <math.h>
#include <string.h>

enum coopt_status coopt_json_parse(const char *text, size_t len, const char *file, cJSON **out) {
    *out             = NULL;
    const char *end  = NULL;
    cJSON      *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) {
        // cJSON leaves `end` unset on failure; its global error pointer is the best we have.
        const char *err = cJSON_GetErrorPtr();
        size_t      off = (err && err >= text && err <= text + len) ? (size_t)(err - text) : 0;
        return coopt_fail(COOPT_ERR_FORMAT, "%s: invalid JSON near byte %zu", file, off);
    }
    for (const char *p = end; p && p < text + len; p++) {
        if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\0') continue;
        cJSON_Delete(root);
        return coopt_fail(COOPT_ERR_FORMAT, "%s: unexpected data after the JSON value at byte %zu",
                          file, (size_t)(p - text));
    }
    *out = root;
    return COOPT_OK;
}

bool coopt_json_has(const cJSON *obj, const char *key) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, key);
    return it && !cJSON_IsNull(it);
}

const char *coopt_json_type_name(const cJSON *item) {
    if (!item) return "nothing";
    if (cJSON_IsNull(item)) return "null";
    if (cJSON_IsBool(item)) return "boolean";
    if (cJSON_IsNumber(item)) return "number";
    if (cJSON_IsString(item)) return "string";
    if (cJSON_IsArray(item)) return "array";
    if (cJSON_IsObject(item)) return "object";
    return "invalid";
}

bool coopt_json_item_int(const cJSON *item, int64_t lo, int64_t hi, int64_t *out) {
    if (!cJSON_IsNumber(item)) return false;
    double v = item->valuedouble;
    // Compare as doubles before converting: the conversion of an out-of-range double is UB.
    if (!isfinite(v) || v != floor(v) || v < (double)lo || v > (double)hi) return false;
    if (v < -9007199254740992.0 || v > 9007199254740992.0) return false; // beyond 2^53: inexact
    *out = (int64_t)v;
    return true;
}

static enum coopt_status get_int(const cJSON *obj, const char *key, const char *file, int64_t lo,
                                 int64_t hi, bool required, int64_t def, int64_t *out) {
    *out              = def;
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item || cJSON_IsNull(item)) {
        if (required) return coopt_fail(COOPT_ERR_FORMAT, "%s: missing field '%s'", file, key);
        return COOPT_OK;
    }
    if (!cJSON_IsNumber(item)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: field '%s' must be an integer, got %s", file, key,
                          coopt_json_type_name(item));
    }
    if (!coopt_json_item_int(item, lo, hi, out)) {
        *out = def;
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: field '%s' = %g, expected an integer in [%lld, %lld]", file, key,
                          item->valuedouble, (long long)lo, (long long)hi);
    }
    return COOPT_OK;
}

enum coopt_status coopt_json_int(const cJSON *obj, const char *key, const char *file, int64_t lo,
                                 int64_t hi, int64_t *out) {
    return get_int(obj, key, file, lo, hi, true, 0, out);
}

enum coopt_status coopt_json_int_opt(const cJSON *obj, const char *key, const char *file,
                                     int64_t lo, int64_t hi, int64_t def, int64_t *out) {
    return get_int(obj, key, file, lo, hi, false, def, out);
}

static enum coopt_status get_num(const cJSON *obj, const char *key, const char *file, double lo,
                                 double hi, bool required, double def, double *out) {
    *out              = def;
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item || cJSON_IsNull(item)) {
        if (required) return coopt_fail(COOPT_ERR_FORMAT, "%s: missing field '%s'", file, key);
        return COOPT_OK;
    }
    if (!cJSON_IsNumber(item)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: field '%s' must be a number, got %s", file, key,
                          coopt_json_type_name(item));
    }
    double v = item->valuedouble;
    if (!isfinite(v) || v < lo || v > hi) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: field '%s' = %g, expected a number in [%g, %g]",
                          file, key, v, lo, hi);
    }
    *out = v;
    return COOPT_OK;
}

enum coopt_status coopt_json_num_opt(const cJSON *obj, const char *key, const char *file, double lo,
                                     double hi, double def, double *out) {
    return get_num(obj, key, file, lo, hi, false, def, out);
}

enum coopt_status coopt_json_num(const cJSON *obj, const char *key, const char *file, double lo,
                                 double hi, double *out) {
    return get_num(obj, key, file, lo, hi, true, 0, out);
}

enum coopt_status coopt_json_bool_opt(const cJSON *obj, const char *key, const char *file, bool def,
                                      bool *out) {
    *out              = def;
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item || cJSON_IsNull(item)) return COOPT_OK;
    if (!cJSON_IsBool(item)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: field '%s' must be true or false, got %s", file,
                          key, coopt_json_type_name(item));
    }
    *out = cJSON_IsTrue(item);
    return COOPT_OK;
}

enum coopt_status coopt_json_str_opt(const cJSON *obj, const char *key, const char *file,
                                     const char **out) {
    *out              = NULL;
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!item || cJSON_IsNull(item)) return COOPT_OK;
    if (!cJSON_IsString(item)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: field '%s' must be a string, got %s", file, key,
                          coopt_json_type_name(item));
    }
    *out = item->valuestring;
    return COOPT_OK;
}
