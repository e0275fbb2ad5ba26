/* SiLU-and-multiply of the gated MLP: out = silu(gate) * up, rows of [gate | up] -> [I].
 * bf16 follows torch's two roundings (silu rounded to bf16, then the product). Torch spends
 * three ops and two full passes over [T, 2I] on this. */
#include <math.h>
#include <stdint.h>

#include "common.h"

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

void silu_and_mul(const void *gu, void *out, int64_t rows, int64_t inter, int bf16,
                  int num_threads) {
#pragma omp parallel for num_threads(rows >= 16 ? num_threads : 1) schedule(dynamic, 4)
    for (int64_t r = 0; r < rows; ++r) {
        int64_t i = 0;
#ifdef __AVX512F__
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= inter; i += 16) {
            __m512 g, u;
            if (bf16) {
                const uint16_t *row = (const uint16_t *)gu + r * 2 * inter;
                g = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + i))), 16));
                u = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256((const __m256i *)(row + inter + i))), 16));
            } else {
                const float *row = (const float *)gu + r * 2 * inter;
                g = _mm512_loadu_ps(row + i);
                u = _mm512_loadu_ps(row + inter + i);
            }
            const __m512 s = _mm512_div_ps(
                g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
#ifdef __AVX512BF16__
            if (bf16) {
                /* silu rounded to bf16 (torch's silu output), then the product rounded. */
                const __m256i sb = (__m256i)_mm512_cvtneps_pbh(s);
                const __m512 sr = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + r * inter + i),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sr, u)));
                continue;
            }
#endif
            float sv[16], uv[16];
            _mm512_storeu_ps(sv, s);
            _mm512_storeu_ps(uv, u);
            for (int j = 0; j < 16; ++j) {
                if (bf16) ((uint16_t *)out)[r * inter + i + j] = f32_to_bf16(round_bf16(sv[j]) * uv[j]);
                else ((float *)out)[r * inter + i + j] = sv[j] * uv[j];
            }
        }
#endif
        for (; i < inter; ++i) {
            if (bf16) {
                const uint16_t *row = (const uint16_t *)gu + r * 2 * inter;
                const float g = bf16_to_f32(row[i]), u = bf16_to_f32(row[inter + i]);
                ((uint16_t *)out)[r * inter + i] = f32_to_bf16(round_bf16(silu(g)) * u);
            } else {
                const float *row = (const float *)gu + r * 2 * inter;
                ((float *)out)[r * inter + i] = silu(row[i]) * row[inter + i];
            }
        }
    }
}

int activation_abi(void) { return 1; }
