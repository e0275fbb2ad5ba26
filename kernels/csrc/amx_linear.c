/* y = x @ W^T with AMX tiles, for bf16 weights: the skinny matmuls of decode and speculative
 * verification (up to 64 rows of x), and prefill chunks beyond that.
 *
 * The AVX-512 kernel in skinny_linear.c is bound by VDPBF16PS past two or three rows (measured
 * on a Sapphire Rapids VM: 0.8 G/s per core against 3.4 G/s for FMA), so a 5-token verify cost
 * almost two decodes. An AMX TDPBF16PS multiplies a 16 x 32 tile by a 32 x 16 one in ~11-17 ns
 * here (the host's noise), so these rows ride along with the weight stream for free.
 *
 * Roles are swapped so that weights need no repacking: the A tile is 16 rows of W straight from
 * the [n, k] weight (row stride 2k bytes), the B tile is x transposed into AMX's pair layout
 * (packed once per call, k x 16 x 2 bytes per group of 16 rows), and C[i][j] = y[j][n0 + i].
 *
 * Every output element is the same chain of TDPBF16PS over k in the same order, whichever path
 * and however many rows share the call, so a row's result does not depend on its neighbours: a
 * speculative verify (5 rows) has to reproduce plain decoding (1 row) bit for bit to give the
 * same greedy tokens. Measured on SmolLM2's LM head (49152 x 576): 3.6 ms at 8 rows against
 * 6.4 ms for the AVX-512 kernel; at 128-256 rows the matmuls of a layer run 1.0-1.5x torch's
 * GEMM, with blocks scheduled dynamically where torch splits statically (see kernels/linear.py).
 *
 * Needs k % 32 == 0; handles the first n & ~15 columns and returns how many it did (0 when AMX
 * is unavailable: not compiled in, or the kernel refuses the tile-data permission), leaving the
 * rest to the caller.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "tandem_cpu.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define SKINNY_MAX_ROWS 64 /* four groups of 16: four accumulator tiles */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* 1: AMX usable, -1: not, 0: not asked yet. Asking twice is harmless (the permission is per
 * process and idempotent), so a race between threads needs no lock. */
static int amx_state;

static int amx_ready(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_RELAXED);
    if (s == 0) {
        s = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, s, __ATOMIC_RELAXED);
    }
    return s > 0;
}

/* r[i][j] <- r[j][i] for 16 x 16 32-bit lanes: unpack 32-bit, then 64-bit, then 128-bit lanes
 * twice. Used both to pack x (bf16 pairs are 32 bits) and to turn C tiles into rows of y. */
static inline void transpose16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 4; ++i) {
            t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
            t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
        }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
    }
}

/* One B tile of x: xp[p][j][e] = x[16 g + j][32 kb + 2 p + e] for rows below m, else 0. */
static void pack_tile(const uint16_t *x, int64_t m, int64_t ldx, int64_t g, int64_t kb,
                      uint16_t *xp) {
    __m512 r[16];
    for (int j = 0; j < 16; ++j) {
        const int64_t row = 16 * g + j;
        r[j] = row < m ? _mm512_loadu_ps((const float *)(x + row * ldx + kb * 32))
                       : _mm512_setzero_ps();
    }
    transpose16x16(r);
    for (int p = 0; p < 16; ++p) _mm512_store_ps((float *)(xp + p * 32), r[p]);
}

/* f32_to_bf16 of common.h on 16 lanes, bit for bit: round to nearest even, NaN stays NaN. */
static inline __m256i bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i out = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    out = _mm512_mask_or_epi32(out, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(out);
}

/* bias[n0 .. n0 + 15] as fp32 (0 without a bias). */
static inline __m512 bias16(const uint16_t *bias, int64_t n0) {
    if (!bias) return _mm512_setzero_ps();
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(bias + n0))), 16));
}

/* C tile (16 weight rows x 16 rows of x) -> y[j][n0 .. n0 + 15] for j < rows, with bias. */
static inline void store_block(const float *c, int64_t rows, int64_t n0, const uint16_t *bias,
                               uint16_t *y, int64_t ldy) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + 16 * i);
    transpose16x16(r);
    const __m512 b = bias16(bias, n0);
    for (int64_t j = 0; j < rows; ++j)
        _mm256_storeu_si256((__m256i *)(y + j * ldy + n0),
                            bf16x16(bias ? _mm512_add_ps(r[j], b) : r[j]));
}

/* Two C tiles side by side (columns n0 .. n0 + 31 of the same 16 rows of x) -> y, one 64-byte
 * store per row. `stream`: non-temporal stores, for a y much larger than L2 (a prefill's): the
 * stores of a 2048-row matmul took 40% of its time when each line was read before being
 * written; streamed, they cost a quarter of that. The caller fences. */
static inline void store_pair(const float *c0, const float *c1, int64_t rows, int64_t n0,
                              const uint16_t *bias, uint16_t *y, int64_t ldy, int stream) {
    __m512 r0[16], r1[16];
    for (int i = 0; i < 16; ++i) {
        r0[i] = _mm512_load_ps(c0 + 16 * i);
        r1[i] = _mm512_load_ps(c1 + 16 * i);
    }
    transpose16x16(r0);
    transpose16x16(r1);
    const __m512 b0 = bias16(bias, n0), b1 = bias16(bias, n0 + 16);
    for (int64_t j = 0; j < rows; ++j) {
        const __m256i lo = bf16x16(bias ? _mm512_add_ps(r0[j], b0) : r0[j]);
        const __m256i hi = bf16x16(bias ? _mm512_add_ps(r1[j], b1) : r1[j]);
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        if (stream)
            _mm512_stream_si512((void *)(y + j * ldy + n0), v);
        else
            _mm512_storeu_si512((void *)(y + j * ldy + n0), v);
    }
}

static void config_tiles(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* Decode sizes (up to 64 rows): bound by the weight stream. Tiles 0-3 are the accumulators of
 * up to four groups of 16 rows, 4 a 16 x 32 slice of W (loaded once for all groups), 5 a
 * group's packed x for that slice. One weight block per step measured faster than several
 * sharing each x load: the weight stream, not the tile unit, is the limit here, and 16 rows
 * are as many streams as the prefetchers follow well. */
static void skinny_blocks(const uint16_t *xp, int64_t m, int64_t k, const uint16_t *w,
                          int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy) {
    const int64_t groups = (m + 15) / 16, blocks = n / 16, kbs = k / 32;
    const size_t stride = (size_t)k * sizeof(uint16_t);
    float c[256] __attribute__((aligned(64)));
    /* Dynamic chunks of 8 blocks: a thread preempted by another process (a router, a client on
     * the same cores) hands its remaining blocks to the other thread instead of stalling it at
     * the barrier. */
#pragma omp for schedule(dynamic, 8)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        const uint16_t *a = w + blk * 16 * k;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kbs; ++kb) {
            /* The same slice of the next block: one block (16 x 2k bytes) ahead. */
            for (int r = 0; r < 16; ++r)
                _mm_prefetch((const char *)(a + (16 + r) * k + kb * 32), _MM_HINT_T0);
            _tile_loadd(4, a + kb * 32, stride);
#define GROUP(G)                                                                               \
    if ((G) < groups) {                                                                        \
        _tile_loadd(5, xp + ((G) * kbs + kb) * 512, 64);                                       \
        _tile_dpbf16ps(G, 4, 5);                                                               \
    }
            GROUP(0) GROUP(1) GROUP(2) GROUP(3)
#undef GROUP
        }
#define STORE(G)                                                                               \
    if ((G) < groups) {                                                                        \
        _tile_stored(G, c, 64);                                                                \
        store_block(c, m - 16 * (G) < 16 ? m - 16 * (G) : 16, blk * 16, bias,                  \
                    y + 16 * (G) * ldy, ldy);                                                  \
    }
        STORE(0) STORE(1) STORE(2) STORE(3)
#undef STORE
    }
}

/* Prefill sizes (more than 64 rows): bound by the tile unit, so operands are reused from
 * cache. Work items are 32 columns of y (two weight blocks) by PANEL_GROUPS groups of 16 rows;
 * within one, each step multiplies two weight slices (tiles 4, 5) by two groups' packed x
 * (tiles 6, 7) into four accumulators (0-3): four tile loads per four TDPBF16PS, every operand
 * used twice. The x panel (up to 256 rows) stays in L2 while consecutive items walk the
 * columns. */
#define PANEL_GROUPS 16
#define PREFETCH_KB 2
#define STREAM_MIN_BYTES (8 << 20) /* y past this (4x a core's L2) is streamed out */

/* Into L1, PREFETCH_KB slices ahead: both weight slices and both packed x tiles. */
static inline void prefetch_step(const uint16_t *a0, const uint16_t *a1, const uint16_t *x0,
                                 const uint16_t *x1, int64_t k, int64_t kb) {
    for (int r = 0; r < 16; ++r) {
        _mm_prefetch((const char *)(a0 + r * k + kb * 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(a1 + r * k + kb * 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(x0 + kb * 512 + r * 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(x1 + kb * 512 + r * 32), _MM_HINT_T0);
    }
}
static void panel_blocks(const uint16_t *xp, int64_t m, int64_t k, const uint16_t *w,
                         int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy) {
    /* xp holds an even number of groups (the last may be all zeros). */
    const int64_t groups = ((m + 15) / 16 + 1) & ~(int64_t)1, blocks = n / 16, kbs = k / 32;
    const int64_t npanels = (blocks + 1) / 2, mpanels = (groups + PANEL_GROUPS - 1) / PANEL_GROUPS;
    const size_t stride = (size_t)k * sizeof(uint16_t);
    float c[256] __attribute__((aligned(64))), c2[256] __attribute__((aligned(64)));
    /* Streaming needs every row's 32-column pieces on 64-byte boundaries. */
    const int stream = (size_t)m * (size_t)n * sizeof(uint16_t) >= STREAM_MIN_BYTES &&
                       ((uintptr_t)y & 63) == 0 && (ldy * sizeof(uint16_t)) % 64 == 0;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t item = 0; item < mpanels * npanels; ++item) {
        const int64_t mp = item / npanels, np = item % npanels;
        const int64_t b0 = 2 * np;
        const int two = b0 + 1 < blocks;
        const uint16_t *a0 = w + b0 * 16 * k, *a1 = a0 + 16 * k;
        const int64_t g_end = (mp + 1) * PANEL_GROUPS < groups ? (mp + 1) * PANEL_GROUPS : groups;
        for (int64_t g = mp * PANEL_GROUPS; g < g_end; g += 2) {
            const uint16_t *x0 = xp + g * kbs * 512, *x1 = x0 + kbs * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            if (two) {
                for (int64_t kb = 0; kb < kbs; ++kb) {
                    prefetch_step(a0, a1, x0, x1, k, kb + PREFETCH_KB);
                    _tile_loadd(4, a0 + kb * 32, stride);
                    _tile_loadd(6, x0 + kb * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(7, x1 + kb * 512, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_loadd(5, a1 + kb * 32, stride);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            } else {
                for (int64_t kb = 0; kb < kbs; ++kb) {
                    _tile_loadd(4, a0 + kb * 32, stride);
                    _tile_loadd(6, x0 + kb * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(7, x1 + kb * 512, 64);
                    _tile_dpbf16ps(1, 4, 7);
                }
            }
            const int64_t r0 = 16 * g, r1 = r0 + 16;
            const int64_t rows0 = m - r0 < 16 ? m - r0 : 16, rows1 = m - r1 < 16 ? m - r1 : 16;
            if (two) {
                _tile_stored(0, c, 64);
                _tile_stored(2, c2, 64);
                store_pair(c, c2, rows0, b0 * 16, bias, y + r0 * ldy, ldy, stream);
                if (rows1 > 0) {
                    _tile_stored(1, c, 64);
                    _tile_stored(3, c2, 64);
                    store_pair(c, c2, rows1, b0 * 16, bias, y + r1 * ldy, ldy, stream);
                }
            } else {
                _tile_stored(0, c, 64);
                store_block(c, rows0, b0 * 16, bias, y + r0 * ldy, ldy);
                if (rows1 > 0) {
                    _tile_stored(1, c, 64);
                    store_block(c, rows1, b0 * 16, bias, y + r1 * ldy, ldy);
                }
            }
        }
    }
    /* Streamed stores are weakly ordered: make them visible before the barrier below. */
    if (stream) _mm_sfence();
#pragma omp barrier
}

int64_t amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *w,
                        int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy,
                        int num_threads) {
    if (m < 1 || k % 32 != 0 || n < 16 || !amx_ready()) return 0;
    const int skinny = m <= SKINNY_MAX_ROWS;
    const int64_t groups = skinny ? (m + 15) / 16 : ((m + 15) / 16 + 1) & ~(int64_t)1;
    const int64_t kbs = k / 32;
    uint16_t *xp = aligned_alloc(64, (size_t)(groups * 16 * k) * sizeof(uint16_t));
    if (xp == NULL) return 0;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 16)
        for (int64_t t = 0; t < groups * kbs; ++t)
            pack_tile(x, m, ldx, t / kbs, t % kbs, xp + t * 512);
        /* (the implicit barrier: every tile of x is packed before any is read) */
        config_tiles();
        if (skinny)
            skinny_blocks(xp, m, k, w, n, bias, y, ldy);
        else
            panel_blocks(xp, m, k, w, n, bias, y, ldy);
        _tile_release();
    }
    free(xp);
    return n / 16 * 16;
}

int amx_linear_available(void) { return amx_ready(); }

#else

int amx_linear_available(void) { return 0; }

int64_t amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *w,
                        int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy,
                        int num_threads) {
    (void)x, (void)m, (void)k, (void)ldx, (void)w, (void)n, (void)bias, (void)y, (void)ldy,
        (void)num_threads;
    return 0;
}

#endif
