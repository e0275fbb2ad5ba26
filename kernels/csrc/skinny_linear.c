/* y = x @ W^T (+ bias) for few rows of x: the decode-time matmul, bound by streaming W.
 *
 * Torch's CPU GEMM streams bf16 weights at a third of memory bandwidth when x has one row (no
 * AMX here), and its int4 path wants its own packing. These kernels stream each weight row once,
 * keep all rows of x in L1 and accumulate in fp32: bf16 weights with AVX512-BF16 dot products,
 * int8 weights (per-output-channel scale) and int4 weights (Tandem's packing: byte j of a row
 * holds k = 2j low and k = 2j + 1 high; per group a scale and an offset `mins` = -scale * zero)
 * by widening to fp32 in registers.
 *
 * Shapes: x [M, K] (row stride ldx), W [N, K], y [M, N] (row stride ldy).
 */
#include <stdint.h>

#include "common.h"
#include "tandem_cpu.h"
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif


/* Bit 0: bf16 weights accelerated, bit 1: int8, bit 2: int4 (fp32 comes with int8). 0: use
 * torch. */
int skinny_linear_support(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 7;
#elif defined(__AVX512F__)
    return 6;
#else
    return 0;
#endif
}

#ifdef __AVX512F__
static inline void store_row(void *y, int64_t ldy, int64_t m, int64_t n, float v, const void *bias,
                             int bf16) {
    if (bf16) {
        if (bias) v += bf16_to_f32(((const uint16_t *)bias)[n]);
        ((uint16_t *)y)[m * ldy + n] = f32_to_bf16(v);
    } else {
        if (bias) v += ((const float *)bias)[n];
        ((float *)y)[m * ldy + n] = v;
    }
}

/* x as fp32 rows, for the int8/int4 kernels (widened once per call, not once per weight row). */
static void widen(float *dst, const void *x, int64_t m, int64_t k, int64_t ldx, int bf16) {
    for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < k; ++i)
            dst[r * k + i] = bf16 ? bf16_to_f32(((const uint16_t *)x)[r * ldx + i])
                                  : ((const float *)x)[r * ldx + i];
}
#endif

/* Each task owns TILE_N output columns (weight rows) and runs every row block of x against them,
 * so a weight tile is read from memory once and then from L1. The tile functions take the block
 * height as a compile-time constant (always inlined from a switch) so that the TILE_N x MR
 * accumulators live in registers. Columns past n repeat the last row and are not stored. */
#define TILE_N 4
/* Software prefetch distance along the weight stream: tiles are contiguous runs of rows, so
 * this reaches into the tiles this thread streams next (hardware prefetch alone got ~60% of
 * the bandwidth at batch 1). */
#define PREFETCH_BYTES 16384
#define PREFETCH(P) _mm_prefetch((const char *)(P) + PREFETCH_BYTES, _MM_HINT_T0)
#define MR_MAX 4
#define INLINE static inline __attribute__((always_inline))

#define FOR_BLOCKS(CALL)                                                                      \
    for (int64_t m0 = 0; m0 < m; m0 += MR_MAX) {                                              \
        switch (m - m0 < MR_MAX ? m - m0 : MR_MAX) {                                          \
        case 1: CALL(1); break;                                                               \
        case 2: CALL(2); break;                                                               \
        case 3: CALL(3); break;                                                               \
        default: CALL(4);                                                                     \
        }                                                                                     \
    }

#ifdef __AVX512F__
#define ZERO_ACC(ACC, MR)                                                                      \
    for (int j_ = 0; j_ < TILE_N; ++j_)                                                        \
        for (int r_ = 0; r_ < (MR); ++r_) (ACC)[j_][r_] = _mm512_setzero_ps()

/* A tile's epilogue: the TILE_N x MR accumulators summed at once by one transposed add tree
 * (a horizontal sum per accumulator cost about half as much as the dot products at k = 576),
 * times the column's scale (int8; NULL: none), plus the bias, stored in the output dtype;
 * columns past n are not stored. */
_Static_assert(TILE_N * MR_MAX == 16, "STORE_TILE sums exactly 16 accumulators");
#define STORE_TILE(ACC, MR, Y, LDY, M0, N0, N, SCALES, BIAS, BF16)                             \
    do {                                                                                       \
        __m512 v_[16];                                                                         \
        float s_[16];                                                                          \
        for (int j_ = 0; j_ < TILE_N; ++j_)                                                    \
            for (int r_ = 0; r_ < MR_MAX; ++r_)                                                \
                v_[j_ * MR_MAX + r_] = r_ < (MR) ? (ACC)[j_][r_] : _mm512_setzero_ps();        \
        _mm512_storeu_ps(s_, sum16x16(v_));                                                    \
        for (int j_ = 0; j_ < TILE_N; ++j_)                                                    \
            if ((N0) + j_ < (N))                                                               \
                for (int r_ = 0; r_ < (MR); ++r_)                                              \
                    store_row((Y), (LDY), (M0) + r_, (N0) + j_,                                \
                              s_[j_ * MR_MAX + r_] * ((SCALES) ? (SCALES)[(N0) + j_] : 1.0f),  \
                              (BIAS), (BF16));                                                 \
    } while (0)

/* Weight row j of the tile at n0; rows past n repeat the last one (computed, never stored). */
#define TILE_ROW(W, N0, J, N, STRIDE) ((W) + ((N0) + (J) < (N) ? (N0) + (J) : (N) - 1) * (STRIDE))

/* Row pointers of an int4 tile (codes and per-group scale/min pairs); rows past n repeat n-1. */
static inline void int4_rows(const uint8_t *w, const float *sm, int64_t half, int64_t ngroups,
                             int64_t n0, int64_t n, const uint8_t **wr, const float **smr) {
    for (int j = 0; j < TILE_N; ++j) {
        wr[j] = TILE_ROW(w, n0, j, n, half);
        smr[j] = TILE_ROW(sm, n0, j, n, ngroups * 2);
    }
}

#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
INLINE void bf16_tile(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t k, int64_t n0,
                      int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m0,
                      const int mr) {
    const uint16_t *wr[TILE_N];
    for (int j = 0; j < TILE_N; ++j) wr[j] = TILE_ROW(w, n0, j, n, k);
    __m512 acc[TILE_N][MR_MAX];
    ZERO_ACC(acc, mr);
    for (int64_t kk = 0; kk < k; kk += 32) {
        const __mmask32 mask = kk + 32 <= k ? (__mmask32)0xffffffffu
                                            : (__mmask32)((1ull << (k - kk)) - 1ull);
        __m512i wv[TILE_N];
        for (int j = 0; j < TILE_N; ++j) {
            PREFETCH(wr[j] + kk);
            wv[j] = _mm512_maskz_loadu_epi16(mask, wr[j] + kk);
        }
        for (int r = 0; r < mr; ++r) {
            const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + (m0 + r) * ldx + kk);
            for (int j = 0; j < TILE_N; ++j)
                acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    STORE_TILE(acc, mr, y, ldy, m0, n0, n, (const float *)NULL, bias, 1);
}

void skinny_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *w,
                        int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy,
                        int num_threads) {
    /* AMX takes whole 16-column blocks where it can; this kernel does the rest. */
    const int64_t done = amx_linear_bf16(x, m, k, ldx, w, n, bias, y, ldy, num_threads);
    if (done == n) return;
    w += done * k;
    y += done;
    if (bias) bias += done;
    n -= done;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += TILE_N) {
#define BF16_TILE(MR) bf16_tile(x, ldx, w, k, n0, n, bias, y, ldy, m0, MR)
        FOR_BLOCKS(BF16_TILE)
    }
}
#endif

#ifdef __AVX512F__
INLINE void int8_tile(const float *xf, const int8_t *w, const float *scales, int64_t k,
                      int64_t n0, int64_t n, const void *bias, void *y, int64_t ldy, int64_t m0,
                      int x_bf16, const int mr) {
    const int8_t *wr[TILE_N];
    for (int j = 0; j < TILE_N; ++j) wr[j] = TILE_ROW(w, n0, j, n, k);
    __m512 acc[TILE_N][MR_MAX];
    ZERO_ACC(acc, mr);
    for (int64_t kk = 0; kk < k; kk += 16) {
        const __mmask16 mask = kk + 16 <= k ? (__mmask16)0xffff
                                            : (__mmask16)((1u << (k - kk)) - 1u);
        __m512 wv[TILE_N];
        if ((kk & 63) == 0)  /* one cache line of int8 weights per four steps */
            for (int j = 0; j < TILE_N; ++j) PREFETCH(wr[j] + kk);
        for (int j = 0; j < TILE_N; ++j)
            wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, wr[j] + kk)));
        for (int r = 0; r < mr; ++r) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, xf + (m0 + r) * k + kk);
            for (int j = 0; j < TILE_N; ++j) acc[j][r] = _mm512_fmadd_ps(xv, wv[j], acc[j][r]);
        }
    }
    STORE_TILE(acc, mr, y, ldy, m0, n0, n, scales, bias, x_bf16);
}

INLINE void f32_tile(const float *x, int64_t ldx, const float *w, int64_t k, int64_t n0,
                     int64_t n, const float *bias, float *y, int64_t ldy, int64_t m0,
                     const int mr) {
    const float *wr[TILE_N];
    for (int j = 0; j < TILE_N; ++j) wr[j] = TILE_ROW(w, n0, j, n, k);
    __m512 acc[TILE_N][MR_MAX];
    ZERO_ACC(acc, mr);
    for (int64_t kk = 0; kk < k; kk += 16) {
        const __mmask16 mask = kk + 16 <= k ? (__mmask16)0xffff
                                            : (__mmask16)((1u << (k - kk)) - 1u);
        __m512 wv[TILE_N];
        for (int j = 0; j < TILE_N; ++j) {
            PREFETCH(wr[j] + kk);
            wv[j] = _mm512_maskz_loadu_ps(mask, wr[j] + kk);
        }
        for (int r = 0; r < mr; ++r) {
            const __m512 xv = _mm512_maskz_loadu_ps(mask, x + (m0 + r) * ldx + kk);
            for (int j = 0; j < TILE_N; ++j) acc[j][r] = _mm512_fmadd_ps(xv, wv[j], acc[j][r]);
        }
    }
    STORE_TILE(acc, mr, y, ldy, m0, n0, n, (const float *)NULL, bias, 0);
}

/* fp32 weights: for the fused decode layer of fp32 models (torch's own fp32 GEMV is fine). */
void skinny_linear_f32(const float *x, int64_t m, int64_t k, int64_t ldx, const float *w,
                       int64_t n, const float *bias, float *y, int64_t ldy, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += TILE_N) {
#define F32_TILE(MR) f32_tile(x, ldx, w, k, n0, n, bias, y, ldy, m0, MR)
        FOR_BLOCKS(F32_TILE)
    }
}

/* work: [m, k] fp32 scratch from the caller (x widened once, shared by all threads). */
void skinny_linear_int8(const void *x, int64_t m, int64_t k, int64_t ldx, const int8_t *w,
                        const float *scales, int64_t n, const void *bias, void *y, int64_t ldy,
                        float *work, int x_bf16, int num_threads) {
    widen(work, x, m, k, ldx, x_bf16);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += TILE_N) {
#define INT8_TILE(MR) int8_tile(work, w, scales, k, n0, n, bias, y, ldy, m0, x_bf16, MR)
        FOR_BLOCKS(INT8_TILE)
    }
}

/* Rows of work are x with even and odd columns apart ([x_even | x_odd], k/2 each), so one
 * byte's two nibbles meet their own columns. Weights are dequantized in registers per group:
 * W = q * scale + min. */
INLINE void int4_tile(const float *xf, const uint8_t *w, const float *sm, int64_t group,
                      int64_t k, int64_t n0, int64_t n, const void *bias, void *y, int64_t ldy,
                      int64_t m0, int x_bf16, const int mr) {
    const int64_t half = k / 2, ngroups = k / group;
    const __m512i low = _mm512_set1_epi32(15);
    const uint8_t *wr[TILE_N];
    const float *smr[TILE_N];
    int4_rows(w, sm, half, ngroups, n0, n, wr, smr);
    __m512 acc[TILE_N][MR_MAX];
    ZERO_ACC(acc, mr);
    for (int64_t g = 0; g < ngroups; ++g) {
        __m512 sc[TILE_N], mn[TILE_N];
        for (int j = 0; j < TILE_N; ++j) {
            sc[j] = _mm512_set1_ps(smr[j][2 * g]);
            mn[j] = _mm512_set1_ps(smr[j][2 * g + 1]);
        }
        for (int64_t b = g * group / 2; b < (g + 1) * group / 2; b += 16) {
            __m512 lo[TILE_N], hi[TILE_N];
            for (int j = 0; j < TILE_N; ++j) {
                if ((b & 63) == 0) PREFETCH(wr[j] + b);
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr[j] + b)));
                lo[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), sc[j], mn[j]);
                hi[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), sc[j], mn[j]);
            }
            for (int r = 0; r < mr; ++r) {
                const float *xr = xf + (m0 + r) * k;
                const __m512 xe = _mm512_loadu_ps(xr + b), xo = _mm512_loadu_ps(xr + half + b);
                for (int j = 0; j < TILE_N; ++j)
                    acc[j][r] = _mm512_fmadd_ps(hi[j], xo, _mm512_fmadd_ps(lo[j], xe, acc[j][r]));
            }
        }
    }
    STORE_TILE(acc, mr, y, ldy, m0, n0, n, (const float *)NULL, bias, x_bf16);
}

#ifdef __AVX512BF16__
/* int4 against bf16 activations: each group's 16 possible weights q * scale + min are rounded
 * to bf16 once into a table (as the torch path rounds the dequantized weight to x's dtype), a
 * permute maps 32 codes to their bf16 weights, and bf16 dot products consume them: fewer
 * instructions per weight than widening to fp32, and x is read as is. */
INLINE void int4_bf16_tile(const uint16_t *x, int64_t ldx, const uint8_t *w, const float *sm,
                           int64_t group, int64_t k, int64_t n0, int64_t n, const void *bias,
                           void *y, int64_t ldy, int64_t m0, const int mr) {
    const int64_t half = k / 2, ngroups = k / group;
    const __m512i low = _mm512_set1_epi32(0xF), high = _mm512_set1_epi32(0xF0000);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const uint8_t *wr[TILE_N];
    const float *smr[TILE_N];
    int4_rows(w, sm, half, ngroups, n0, n, wr, smr);
    __m512 acc[TILE_N][MR_MAX];
    ZERO_ACC(acc, mr);
    for (int64_t g = 0; g < ngroups; ++g) {
        __m512i lut[TILE_N];
        for (int j = 0; j < TILE_N; ++j) {
            const __m512 vals = _mm512_fmadd_ps(iota, _mm512_set1_ps(smr[j][2 * g]),
                                                _mm512_set1_ps(smr[j][2 * g + 1]));
            lut[j] = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(vals));
        }
        for (int64_t b = g * group / 2; b < (g + 1) * group / 2; b += 16) {
            __m512i wv[TILE_N];
            for (int j = 0; j < TILE_N; ++j) {
                if ((b & 63) == 0) PREFETCH(wr[j] + b);
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr[j] + b)));
                const __m512i codes = _mm512_or_si512(
                    _mm512_and_si512(v, low), _mm512_and_si512(_mm512_slli_epi32(v, 12), high));
                wv[j] = _mm512_permutexvar_epi16(codes, lut[j]);
            }
            for (int r = 0; r < mr; ++r) {
                const __m512i xv = _mm512_loadu_si512((const void *)(x + (m0 + r) * ldx + 2 * b));
                for (int j = 0; j < TILE_N; ++j)
                    acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)xv, (__m512bh)wv[j]);
            }
        }
    }
    STORE_TILE(acc, mr, y, ldy, m0, n0, n, (const float *)NULL, bias, 1);
}
#endif

/* int4, group size a multiple of 32, k a multiple of the group size.
 * sm: [n, k / group, 2] fp32 (scale, min) with W[n, k] = q * scale + min.
 * work: [m, k] fp32 scratch from the caller. */
void skinny_linear_int4(const void *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                        const float *sm, int64_t group, int64_t n, const void *bias, void *y,
                        int64_t ldy, float *work, int x_bf16, int num_threads) {
#ifdef __AVX512BF16__
    if (x_bf16) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t n0 = 0; n0 < n; n0 += TILE_N) {
#define INT4B_TILE(MR) int4_bf16_tile(x, ldx, w, sm, group, k, n0, n, bias, y, ldy, m0, MR)
            FOR_BLOCKS(INT4B_TILE)
        }
        return;
    }
#endif
    const int64_t half = k / 2;
    for (int64_t r = 0; r < m; ++r)
        for (int64_t i = 0; i < half; ++i) {
            const int64_t e = r * ldx + 2 * i;
            work[r * k + i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[e]) : ((const float *)x)[e];
            work[r * k + half + i] = x_bf16 ? bf16_to_f32(((const uint16_t *)x)[e + 1])
                                            : ((const float *)x)[e + 1];
        }
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += TILE_N) {
#define INT4_TILE(MR) int4_tile(work, w, sm, group, k, n0, n, bias, y, ldy, m0, x_bf16, MR)
        FOR_BLOCKS(INT4_TILE)
    }
}
#endif

#ifdef __AVX512F__
/* Whole-matrix dequantization for batches too big for the skinny kernels: prefill and large
 * decode batches are compute bound, so they widen the weights once per call and hand them to
 * torch's blocked GEMM. out: [n, k] fp32, or bf16 (rounded to nearest even) when out_bf16.
 * Rows are written 16 values at a time; k is a multiple of 16 (checked by the binding). */
static inline void put16(void *out, int64_t off, __m512 v, int out_bf16) {
#ifdef __AVX512BF16__
    if (out_bf16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + off), (__m256i)_mm512_cvtneps_pbh(v));
        return;
    }
#endif
    if (out_bf16) {
        float tmp[16];
        _mm512_storeu_ps(tmp, v);
        for (int i = 0; i < 16; ++i) ((uint16_t *)out)[off + i] = f32_to_bf16(tmp[i]);
    } else {
        _mm512_storeu_ps((float *)out + off, v);
    }
}

void dequantize_int8(const int8_t *w, const float *scales, int64_t n, int64_t k, void *out,
                     int out_bf16, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const __m512 sc = _mm512_set1_ps(scales[r]);
        for (int64_t i = 0; i < k; i += 16) {
            const __m512 q = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + r * k + i))));
            put16(out, r * k + i, _mm512_mul_ps(q, sc), out_bf16);
        }
    }
}

void dequantize_int4(const uint8_t *w, const float *sm, int64_t group, int64_t n, int64_t k,
                     void *out, int out_bf16, int num_threads) {
    const int64_t ngroups = k / group;
    /* A byte holds columns 2j (low nibble) and 2j + 1 (high): interleave back to column order. */
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7,
                                            23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14,
                                             30, 15, 31);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const uint8_t *wr = w + r * (k / 2);
        for (int64_t g = 0; g < ngroups; ++g) {
            const __m512 sc = _mm512_set1_ps(sm[(r * ngroups + g) * 2]);
            const __m512 mn = _mm512_set1_ps(sm[(r * ngroups + g) * 2 + 1]);
            for (int64_t i = g * group; i < (g + 1) * group; i += 32) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr + i / 2)));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                put16(out, r * k + i, _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, first, hi), sc, mn),
                      out_bf16);
                put16(out, r * k + i + 16,
                      _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, second, hi), sc, mn), out_bf16);
            }
        }
    }
}
#endif

/* Lets the binding check that it matches the library it loaded. */
int skinny_linear_abi(void) { return 2; }
