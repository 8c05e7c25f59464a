/*
 * fuzz_config_json.c -- libFuzzer target: coopt_hf_parse_config (the loader's config.json
 * parser) on arbitrary text. A successful parse must give a configuration the rest of the
 * engine can size buffers from: positive sizes, heads divisible by KV heads, even head_dim.
 * Run with -close_fd_mask=2 to hide the (expected) error messages.
 */
#include "safetensors.h"

#include <stdint.h>
#include <stdio.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct coopt_model_config    cfg;
    struct coopt_hf_config_extra x;
    if (coopt_hf_parse_config((const char *)data, size, "fuzz/config.json", &cfg, &x) != COOPT_OK)
        return 0;
    if (cfg.dim <= 0 || cfg.n_layers <= 0 || cfg.n_heads <= 0 || cfg.n_kv_heads <= 0 ||
        cfg.ffn_dim <= 0 || cfg.n_vocab <= 0 || cfg.head_dim <= 0 || cfg.head_dim % 2 ||
        cfg.n_heads % cfg.n_kv_heads || cfg.n_ctx_train <= 0 || cfg.sliding_window < 0 ||
        !(cfg.rope_theta > 0) || !(cfg.norm_eps >= 0)) {
        __builtin_trap();
    }
    return 0;
}
