/* Rotary embedding (neox layout: rotate halves of the first rot_dim features), in place on q and
 * k, from an fp32 cos/sin cache [max_pos, rot_dim] (cos | sin). bf16 follows Hugging Face's
 * rounding: cos and sin are rounded to bf16 first, each product is rounded, then the sum. */
#include <stdint.h>

#include "common.h"
#include <string.h>

/* x: [T, heads, D] with row stride ld (elements), head stride D. */
static void rotate_f32(float *x, int64_t heads, int64_t d, const float *cs,
                       int64_t half) {
    for (int64_t h = 0; h < heads; ++h) {
        float *v = x + h * d;
        for (int64_t i = 0; i < half; ++i) {
            const float c = cs[i], s = cs[half + i], x1 = v[i], x2 = v[half + i];
            v[i] = x1 * c - x2 * s;
            v[half + i] = x2 * c + x1 * s;
        }
    }
}

static void rotate_bf16(uint16_t *x, int64_t heads, int64_t d, const float *cs, int64_t half) {
    for (int64_t h = 0; h < heads; ++h) {
        uint16_t *v = x + h * d;
        for (int64_t i = 0; i < half; ++i) {
            const float c = round_bf16(cs[i]), s = round_bf16(cs[half + i]);
            const float x1 = bf16_to_f32(v[i]), x2 = bf16_to_f32(v[half + i]);
            v[i] = f32_to_bf16(round_bf16(x1 * c) - round_bf16(x2 * s));
            v[half + i] = f32_to_bf16(round_bf16(x2 * c) + round_bf16(x1 * s));
        }
    }
}

void rotary_inplace(void *q, int64_t q_ld, int64_t q_heads, void *k, int64_t k_ld,
                    int64_t k_heads, int64_t d, const int64_t *positions, int64_t tokens,
                    const float *cache, int64_t rot_dim, int bf16, int num_threads) {
    const int64_t half = rot_dim / 2;
#pragma omp parallel for num_threads(tokens >= 64 ? num_threads : 1) schedule(dynamic, 8)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *cs = cache + positions[t] * rot_dim;
        if (bf16) {
            rotate_bf16((uint16_t *)q + t * q_ld, q_heads, d, cs, half);
            rotate_bf16((uint16_t *)k + t * k_ld, k_heads, d, cs, half);
        } else {
            rotate_f32((float *)q + t * q_ld, q_heads, d, cs, half);
            rotate_f32((float *)k + t * k_ld, k_heads, d, cs, half);
        }
    }
}

int rotary_abi(void) { return 1; }
