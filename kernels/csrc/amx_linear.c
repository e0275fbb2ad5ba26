/* y = x @ W^T for up to 64 rows of x with AMX tiles: the skinny matmul of decode and
 * speculative verification, for bf16 weights.
 *
 * The AVX-512 kernel in skinny_linear.c is bound by VDPBF16PS past two or three rows (measured
 * on a Sapphire Rapids VM: 0.8 G/s per core against 3.4 G/s for FMA), so a 5-token verify cost
 * almost two decodes. An AMX TDPBF16PS multiplies a 16 x 32 tile by a 32 x 16 one in ~28 cycles
 * here, so these rows ride along with the weight stream for free.
 *
 * Roles are swapped so that weights need no repacking: the A tile is 16 rows of W straight from
 * the [n, k] weight (row stride 2k bytes), the B tile is x transposed into AMX's pair layout
 * (packed once per call, k x 16 x 2 bytes per group of 16 rows), and C[i][j] = y[j][n0 + i].
 * Each weight slice is loaded once for up to four groups (four accumulator tiles).
 *
 * Measured on SmolLM2's LM head (49152 x 576): 3.6 ms at 8 rows against 6.4 ms for the AVX-512
 * kernel. At one row both are bound by the weight stream (a model's matmuls: 15.5-21.6 ms here
 * against 15.8-20.0 ms, host noise included). AMX takes every row count, one row included,
 * because a row's result must not depend on how many rows share the call: a speculative verify
 * (5 rows) has to reproduce plain decoding (1 row) bit for bit to give the same greedy tokens.
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
#define AMX_MAX_ROWS 64 /* four groups of 16: four accumulator tiles */

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

/* xp[g][kb][p][j][e] = x[16 g + j][32 kb + 2 p + e] for 16 g + j < m, else 0: per group of 16
 * rows, B tiles of 16 pair-rows x 16 columns, one per 32-wide slice of k. */
static void pack_x(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, int64_t groups,
                   uint16_t *xp) {
    const int64_t kbs = k / 32;
    memset(xp, 0, (size_t)(groups * 16 * k) * sizeof(uint16_t));
    for (int64_t r = 0; r < m; ++r) {
        const int64_t g = r / 16, j = r % 16;
        for (int64_t kb = 0; kb < kbs; ++kb)
            for (int64_t p = 0; p < 16; ++p) {
                const uint16_t *src = x + r * ldx + kb * 32 + 2 * p;
                uint16_t *dst = xp + (g * kbs + kb) * 512 + p * 32 + j * 2;
                dst[0] = src[0];
                dst[1] = src[1];
            }
    }
}

/* C tile (16 weight rows x 16 columns of x) -> y[j][n0 + i] for j < m, with bias. */
static inline void store_block(const float *c, int64_t m, int64_t n0, const uint16_t *bias,
                               uint16_t *y, int64_t ldy) {
    for (int64_t j = 0; j < m; ++j)
        for (int64_t i = 0; i < 16; ++i) {
            float v = c[i * 16 + j];
            if (bias) v += bf16_to_f32(bias[n0 + i]);
            y[j * ldy + n0 + i] = f32_to_bf16(v);
        }
}

int64_t amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *w,
                        int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy,
                        int num_threads) {
    if (m < 1 || m > AMX_MAX_ROWS || k % 32 != 0 || n < 16 || !amx_ready()) return 0;
    const int64_t groups = (m + 15) / 16, blocks = n / 16, kbs = k / 32;
    uint16_t *xp = aligned_alloc(64, (size_t)(groups * 16 * k) * sizeof(uint16_t));
    if (xp == NULL) return 0;
    pack_x(x, m, k, ldx, groups, xp);
    const size_t stride = (size_t)k * sizeof(uint16_t);
#pragma omp parallel num_threads(num_threads)
    {
        TileConfig cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int t = 0; t < 6; ++t) {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        _tile_loadconfig(&cfg);
        float c[256] __attribute__((aligned(64)));
        /* Tiles: 0-3 the accumulators of up to four groups of 16 rows, 4 a 16 x 32 slice of W
         * (loaded once for all groups), 5 a group's packed x for that slice. One weight block
         * per step measured faster than several sharing each x load: the weight stream, not
         * the tile unit, is the limit, and 16 rows are as many streams as the prefetchers
         * follow well. */
        /* Dynamic chunks of 8 blocks: a thread preempted by another process (a router, a
         * client on the same cores) hands its remaining blocks to the other thread instead of
         * stalling it at the barrier. */
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
        _tile_release();
    }
    free(xp);
    return blocks * 16;
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
