/*
 * test_rope.c -- RoPE frequencies against values computed with transformers' formulas
 * (LlamaRotaryEmbedding default, "linear" and "llama3" rope_scaling, _compute_llama3_parameters)
 * in numpy float32 (the script is in the comment of each table).
 */
#include "forward.h"
#include "test.h"

#include <math.h>

TEST(rope_inv_freq_llama3_and_linear) {
    struct coopt_model_config c = {.head_dim = 128, .rope_theta = 500000.0f, .rope_scaling = COOPT_ROPE_SCALING_LLAMA3,
                                   .rope_factor = 8.0f, .rope_low_freq_factor = 1.0f, .rope_high_freq_factor = 4.0f,
                                   .rope_orig_ctx = 8192};
    float inv[64];
    coopt_rope_init(&c, inv);
    // numpy: inv = 1/(base**(arange(0,d,2)/d)) in f32, then the llama3 wavelength bands:
    // index 0 and 20 high frequency (kept), 30..34 smoothed, 35+ divided by the factor.
    static const struct {
        int   i;
        float want;
    } l3[] = {{0, 1.0f},
              {20, 0.016560440883040428f},
              {30, 0.0013718936825171113f},
              {32, 0.0005248460220173001f},
              {34, 0.0001785077911335975f},
              {35, 9.556212899042293e-05f},
              {40, 3.428102354519069e-05f},
              {63, 3.068925877869333e-07f}};
    for (size_t k = 0; k < sizeof(l3) / sizeof(l3[0]); k++)
        CHECKF(t, fabsf(inv[l3[k].i] - l3[k].want) <= 2e-6f * l3[k].want, "llama3 inv_freq[%d] = %.9g, want %.9g",
               l3[k].i, inv[l3[k].i], l3[k].want);
    c.rope_scaling = COOPT_ROPE_SCALING_LINEAR;
    c.rope_factor  = 4.0f;
    coopt_rope_init(&c, inv);
    CHECKF(t, fabsf(inv[0] - 0.25f) <= 1e-7f, "linear inv_freq[0] = %g", inv[0]);
    CHECKF(t, fabsf(inv[31] - 0.00043401168659329414f) <= 2e-6f * 0.000434f, "linear inv_freq[31] = %.9g", inv[31]);
    CHECKF(t, fabsf(inv[63] - 6.137851755738666e-07f) <= 2e-6f * 6.14e-7f, "linear inv_freq[63] = %.9g", inv[63]);
}
