/* y = x @ W^T for int4 weights and int8 activations (W4A8): integer dot products (AVX512-VNNI).
 *
 * The int4 kernel of skinny_linear.c turns every weight into a bf16 value before a dot product,
 * about ten instructions per 32 weights, and is compute bound at a third of the bandwidth. Here
 * x is quantized per group of 32 (symmetric int8, a scale per group and row) once per call, and
 * `vpdpbusd` multiplies 64 unsigned 4-bit codes by 64 int8 activations per instruction, as
 * llama.cpp's Q4 x Q8 dot products do. A group's integer sum is scaled once:
 *     sum_f x_f W_f = scale * sx * sum_f xq_f q_f + min * sum_f x_f,   W = q * scale + min.
 * The result differs from the int4 kernel's by the rounding of x to int8 (~0.4% per value):
 * meant for drafts, whose tokens the target verifies anyway, and for users who ask for it.
 *
 * Layout (kernels/cpu_w4a8.py packs it): rows in blocks of 16 (n padded with zero rows), per
 * block and group of 32 input features 256 bytes, four chunks of 64: byte 4 * j + i of chunk c
 * holds row j's code for feature 8c + i in its low nibble and for feature 8c + 4 + i in its
 * high one, so each 32-bit lane of a vector is one row's four consecutive features, as vpdpbusd
 * wants them. With bits = 8 (an LM head: int4 costs it too much) the codes are whole bytes,
 * 512 per block and group, byte 4 * j + i of chunk c (eight of them) being feature 4c + i. sm: per block and group, 16 scales then 16 mins in fp16 (one cache line; fp32
 * made them a third of the bytes streamed, and fp16's 11-bit mantissa moves a weight by
 * < 0.05% of its group's range, a hundredth of the int4 rounding).
 */
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "tandem_cpu.h"

#define W4A8_MR 8       /* activation rows per pass over a block */
#define W4A8_CHUNK 4    /* blocks per scheduling chunk */

int w4a8_support(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

size_t w4a8_workspace_bytes(int64_t m, int64_t k) {
    return (size_t)(2 * m * k) + (size_t)(m * (k / 32)) * 2 * sizeof(float) + 64;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)

/* Row r of x -> two int8 planes per group: x ~= s * (q1 + q2 / 254), s = max|x| / 127, q1 the
 * rounded x / s and q2 the rounded remainder in steps of s / 254, so the activations keep
 * ~15 bits (error <= max|x| / 64516) at the price of a second dot product per group. One plane
 * (plain int8) cost SmolLM2 0.9% perplexity and dropped the self-draft's agreement with the
 * target from 97% to 84%. Per group also its scale and float sum. */
static void quantize_rows(const void *x, int64_t m, int64_t k, int64_t ldx, int x_bf16,
                          int8_t *xq, float *sx, float *sumx) {
    const int64_t ng = k / 32;
    for (int64_t r = 0; r < m; ++r)
        for (int64_t g = 0; g < ng; ++g) {
            float v[32], amax = 0.0f, sum = 0.0f;
            for (int i = 0; i < 32; ++i) {
                const int64_t e = r * ldx + g * 32 + i;
                v[i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[e]) : ((const float *)x)[e];
                const float a = v[i] < 0 ? -v[i] : v[i];
                amax = a > amax ? a : amax;
                sum += v[i];
            }
            const float s = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
            int8_t *q1 = xq + (r * ng + g) * 64, *q2 = q1 + 32;
            for (int i = 0; i < 32; ++i) {
                const float a = v[i] * inv;
                const int hi = a < 0 ? (int)(a - 0.5f) : (int)(a + 0.5f);
                const float b = (a - (float)hi) * 254.0f;
                const int lo = b < 0 ? (int)(b - 0.5f) : (int)(b + 0.5f);
                q1[i] = (int8_t)hi;
                q2[i] = (int8_t)(lo > 127 ? 127 : lo < -127 ? -127 : lo);
            }
            sx[r * ng + g] = s;
            sumx[r * ng + g] = sum;
        }
}

static inline __attribute__((always_inline)) void block_rows(
    const uint8_t *w, const uint16_t *sm, int64_t ng, int64_t k, const int8_t *xq, const float *sx,
    const float *sumx, int64_t r0, const int mr, const int bits, __m512 *out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[W4A8_MR];
    for (int r = 0; r < mr; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        const uint8_t *wg = w + g * 64 * bits;
        for (int c = 0; c < bits; ++c)
            _mm_prefetch((const char *)wg + 4096 + 64 * c, _MM_HINT_T0);
        __m512i wv[8];  /* wv[c] pairs with activation bytes 4c .. 4c + 3 of the group */
        if (bits == 8) {
            for (int c = 0; c < 8; ++c) wv[c] = _mm512_loadu_si512((const void *)(wg + 64 * c));
        } else {
            for (int c = 0; c < 4; ++c) {
                const __m512i v = _mm512_loadu_si512((const void *)(wg + 64 * c));
                wv[2 * c] = _mm512_and_si512(v, low);
                wv[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
        }
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sm + g * 32)));
        const __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sm + g * 32 + 16)));
        for (int r = 0; r < mr; ++r) {
            const int32_t *xd = (const int32_t *)(xq + ((r0 + r) * ng + g) * 64);
            /* four independent chains: one chain of 16 dot products waits on its latency */
            __m512i d1a = _mm512_setzero_si512(), d1b = d1a, d2a = d1a, d2b = d1a;
            for (int c = 0; c < 8; c += 2) {
                d1a = _mm512_dpbusd_epi32(d1a, wv[c], _mm512_set1_epi32(xd[c]));
                d1b = _mm512_dpbusd_epi32(d1b, wv[c + 1], _mm512_set1_epi32(xd[c + 1]));
                d2a = _mm512_dpbusd_epi32(d2a, wv[c], _mm512_set1_epi32(xd[8 + c]));
                d2b = _mm512_dpbusd_epi32(d2b, wv[c + 1], _mm512_set1_epi32(xd[9 + c]));
            }
            /* 254 * (q1 . w) + (q2 . w): at most 32 * 255 * 127 * 255, inside int32 */
            const __m512i d1 = _mm512_add_epi32(d1a, d1b);
            const __m512i dot = _mm512_add_epi32(
                _mm512_sub_epi32(_mm512_slli_epi32(d1, 8), _mm512_slli_epi32(d1, 1)),
                _mm512_add_epi32(d2a, d2b));
            const int64_t gi = (r0 + r) * ng + g;
            acc[r] = _mm512_fmadd_ps(mins, _mm512_set1_ps(sumx[gi]), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                     _mm512_mul_ps(scale, _mm512_set1_ps(sx[gi] / 254.0f)),
                                     acc[r]);
        }
    }
    for (int r = 0; r < mr; ++r) out[r] = acc[r];
}

static void store16(void *y, int64_t ldy, int64_t row, int64_t col, int64_t n, __m512 v,
                    const void *bias, int y_bf16) {
    const __mmask16 mask = n - col >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - col)) - 1);
    if (y_bf16) {
        if (bias)
            v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16(mask, (const uint16_t *)bias + col)), 16)));
        _mm256_mask_storeu_epi16((uint16_t *)y + row * ldy + col, mask,
                                 (__m256i)_mm512_cvtneps_pbh(v));
    } else {
        if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, (const float *)bias + col));
        _mm512_mask_storeu_ps((float *)y + row * ldy + col, mask, v);
    }
}

void w4a8_linear(const void *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w, int bits,
                 const uint16_t *sm, int64_t n, const void *bias, void *y, int64_t ldy,
                 void *work, int bf16, int num_threads) {
    const int64_t ng = k / 32, nb = (n + 15) / 16;
    int8_t *xq = (int8_t *)work;
    float *sx = (float *)((char *)work + ((2 * m * k + 63) & ~(int64_t)63)), *sumx = sx + m * ng;
    quantize_rows(x, m, k, ldx, bf16, xq, sx, sumx);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, W4A8_CHUNK)
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t *wb = w + b * ng * 64 * bits;
        const uint16_t *smb = sm + b * ng * 32;
        for (int64_t r0 = 0; r0 < m; r0 += W4A8_MR) {
            __m512 out[W4A8_MR];
            const int mr = m - r0 < W4A8_MR ? (int)(m - r0) : W4A8_MR;
            switch (mr) {
#define W4A8_CASE(MR)                                                                     \
    case MR:                                                                              \
        if (bits == 8) block_rows(wb, smb, ng, k, xq, sx, sumx, r0, MR, 8, out);          \
        else block_rows(wb, smb, ng, k, xq, sx, sumx, r0, MR, 4, out);                    \
        break;
            W4A8_CASE(1) W4A8_CASE(2) W4A8_CASE(3) W4A8_CASE(4)
            W4A8_CASE(5) W4A8_CASE(6) W4A8_CASE(7) W4A8_CASE(8)
#undef W4A8_CASE
            }
            for (int r = 0; r < mr; ++r) store16(y, ldy, r0 + r, b * 16, n, out[r], bias, bf16);
        }
    }
}

/* The layout back to a dense [n, k] weight (fp32, or bf16 rounded to nearest even), for steps
 * too big for the dot-product kernel: they are compute bound and go to torch's GEMM. */
void w4a8_dequantize(const uint8_t *w, int bits, const uint16_t *sm, int64_t n, int64_t k,
                     void *out, int out_bf16, int num_threads) {
    const int64_t ng = k / 32, nb = (n + 15) / 16;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, W4A8_CHUNK)
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t g = 0; g < ng; ++g) {
            const uint8_t *wg = w + (b * ng + g) * 64 * bits;
            const uint16_t *sh = sm + (b * ng + g) * 32;
            float s[32];
            for (int i = 0; i < 32; ++i) s[i] = _cvtsh_ss(sh[i]);
            for (int64_t j = 0; j < 16 && b * 16 + j < n; ++j) {
                const int64_t row = b * 16 + j;
                if (bits == 8) {
                    for (int f = 0; f < 32; ++f) {
                        const float v = (float)wg[64 * (f / 4) + 4 * j + f % 4] * s[j] + s[16 + j];
                        const int64_t e = row * k + g * 32 + f;
                        if (out_bf16) ((uint16_t *)out)[e] = f32_to_bf16(v);
                        else ((float *)out)[e] = v;
                    }
                    continue;
                }
                for (int c = 0; c < 4; ++c)
                    for (int i = 0; i < 4; ++i) {
                        const uint8_t byte = wg[64 * c + 4 * j + i];
                        const float lo = (float)(byte & 15) * s[j] + s[16 + j];
                        const float hi = (float)(byte >> 4) * s[j] + s[16 + j];
                        const int64_t e = row * k + g * 32 + 8 * c + i;
                        if (out_bf16) {
                            ((uint16_t *)out)[e] = f32_to_bf16(lo);
                            ((uint16_t *)out)[e + 4] = f32_to_bf16(hi);
                        } else {
                            ((float *)out)[e] = lo;
                            ((float *)out)[e + 4] = hi;
                        }
                    }
            }
        }
}

#else

void w4a8_linear(const void *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w, int bits,
                 const uint16_t *sm, int64_t n, const void *bias, void *y, int64_t ldy,
                 void *work, int bf16, int num_threads) {
    (void)x; (void)m; (void)k; (void)ldx; (void)w; (void)bits; (void)sm; (void)n; (void)bias; (void)y;
    (void)ldy; (void)work; (void)bf16; (void)num_threads;
}

void w4a8_dequantize(const uint8_t *w, int bits, const uint16_t *sm, int64_t n, int64_t k,
                     void *out, int out_bf16, int num_threads) {
    (void)w; (void)bits; (void)sm; (void)n; (void)k; (void)out; (void)out_bf16; (void)num_threads;
}

#endif
