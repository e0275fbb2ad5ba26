/* RMSNorm with the residual add before it, one row per token, in Hugging Face's rounding order:
 *   r = x + residual                      (rounded to the model dtype; written to residual_out)
 *   n = r * rsqrt(mean(r^2) + eps)        (fp32, then rounded to the model dtype)
 *   out = n * weight                      (rounded to the model dtype)
 * Torch spends a dozen small ops per call on this; a decode step makes 61 of these calls.
 * residual may be NULL (first layer: r = x, nothing written). */
#include <math.h>
#include <stdint.h>

#include "common.h"

#define MAX_HIDDEN 16384 /* checked by the binding */

static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Stores v as the model dtype and returns the value stored. */
static inline float store(void *p, int64_t i, float v, int bf16) {
    if (!bf16) return ((float *)p)[i] = v;
    const uint16_t b = f32_to_bf16(v);
    ((uint16_t *)p)[i] = b;
    return bf16_to_f32(b);
}

static void rms_rows(const void *x, const void *residual, void *residual_out, const void *weight,
                     void *out, int64_t rows, int64_t hidden, float eps, int num_threads,
                     int bf16) {
    const size_t e = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(rows >= 64 ? num_threads : 1) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const char *xr = (const char *)x + t * hidden * e;
        const char *rr = residual ? (const char *)residual + t * hidden * e : NULL;
        char *ro = residual ? (char *)residual_out + t * hidden * e : NULL;
        float r[MAX_HIDDEN];
        float ss = 0.0f;
        for (int64_t i = 0; i < hidden; ++i) {
            float v = load(xr, i, bf16);
            if (rr) v = store(ro, i, v + load(rr, i, bf16), bf16);
            r[i] = v;
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
        char *o = (char *)out + t * hidden * e;
        for (int64_t i = 0; i < hidden; ++i) {
            /* bf16: the normalised value is rounded before the weight multiply, as in HF. */
            const float n = bf16 ? round_bf16(r[i] * inv) : r[i] * inv;
            store(o, i, n * load(weight, i, bf16), bf16);
        }
    }
}

void rms_norm_f32(const float *x, const float *residual, float *residual_out,
                  const float *weight, float *out, int64_t rows, int64_t hidden, float eps,
                  int num_threads) {
    rms_rows(x, residual, residual_out, weight, out, rows, hidden, eps, num_threads, 0);
}

void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, uint16_t *residual_out,
                   const uint16_t *weight, uint16_t *out, int64_t rows, int64_t hidden, float eps,
                   int num_threads) {
    rms_rows(x, residual, residual_out, weight, out, rows, hidden, eps, num_threads, 1);
}

int rms_norm_abi(void) { return 2; }
