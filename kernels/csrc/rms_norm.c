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

#ifdef __AVX512F__
/* 16 values of a row as fp32, and back in the model dtype (returning what was stored). */
static inline __m512 load16(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
}

static inline __m512 store16(void *p, int64_t i, __m512 v, int bf16) {
    if (!bf16) {
        _mm512_storeu_ps((float *)p + i, v);
        return v;
    }
#ifdef __AVX512BF16__
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
#else
    /* Round to nearest even by hand (NaN is not expected in activations). */
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                          _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                           _mm512_set1_epi32(1)));
    const __m256i b = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16));
#endif
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), b);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
#endif

static void rms_rows(const void *x, const void *residual, void *residual_out, const void *weight,
                     void *out, int64_t rows, int64_t hidden, float eps, int num_threads,
                     int bf16) {
    const size_t e = bf16 ? 2 : 4;
#ifdef __AVX512F__
    if (hidden % 16 == 0) {
#pragma omp parallel for num_threads(rows >= 16 ? num_threads : 1) schedule(dynamic, 8)
        for (int64_t t = 0; t < rows; ++t) {
            const char *xr = (const char *)x + t * hidden * e;
            const char *rr = residual ? (const char *)residual + t * hidden * e : NULL;
            char *ro = residual ? (char *)residual_out + t * hidden * e : NULL;
            char *o = (char *)out + t * hidden * e;
            float r[MAX_HIDDEN];
            __m512 ss = _mm512_setzero_ps();
            for (int64_t i = 0; i < hidden; i += 16) {
                __m512 v = load16(xr, i, bf16);
                if (rr) v = store16(ro, i, _mm512_add_ps(v, load16(rr, i, bf16)), bf16);
                _mm512_storeu_ps(r + i, v);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
            const __m512 inv = _mm512_set1_ps(
                1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)hidden + eps));
            for (int64_t i = 0; i < hidden; i += 16) {
                __m512 n = _mm512_mul_ps(_mm512_loadu_ps(r + i), inv);
                /* bf16: the normalised value is rounded before the weight multiply, as in HF. */
                if (bf16) n = store16(o, i, n, 1);
                store16(o, i, _mm512_mul_ps(n, load16(weight, i, bf16)), bf16);
            }
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(rows >= 64 ? num_threads : 1) schedule(dynamic, 8)
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
