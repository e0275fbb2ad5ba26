/* Paged decode attention in bf16 for rows that share a sequence's pages: the rows of one
 * sequence in a step (a speculative verify, a token tree, a short prefill chunk) read each K/V
 * row once for all of them.
 *
 * paged_decode_attention.c walks keys once per row with an online softmax. There each verify
 * row cost about what the step's single decode row did (at a 150-token context, 16 rows took
 * 100 us a layer against 16 us for one), so a wide token tree cost more in attention than it
 * won. Here a task takes a few rows of one sequence and one KV head:
 *   1. scores: each 16-key chunk of K is transposed once (32-bit pairs of the head dim x 16
 *      keys) and every query head of every row takes 16 scores at once with bf16 dot products,
 *      no horizontal sums;
 *   2. softmax with the exact maximum over the row's visible keys (two passes, no rescaling);
 *   3. values: out += p * v and l += p key by key, in key order, every V row widened once per
 *      few query heads.
 *
 * Exactness. A row's result depends only on its query and the keys it sees, in order: a
 * score is the same in whichever lane its key falls, and a key the row does not see (past its
 * length, or a hole of its token tree) gets p = 0 exactly, and fma(0, v, acc) = acc. So a row
 * computes the same bits alone or with others, and a tree token the same as the chain of its
 * ancestors, as paged_decode_attention.c guarantees by walking only visible keys; the fused
 * decode layer's speculative verifies reproduce plain decoding through either. The two files
 * differ in rounding, so a model runs all its decodes through one of them: this one for bf16
 * with head dims of 32, 64 or 128 and no sliding window, on CPUs with AVX512-BF16.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "tandem_cpu.h"

#ifdef TANDEM_GROUPED_ATTENTION
#include <immintrin.h>

#define GA_MAX_D 128
#define GA_MAX_ROWS 16      /* rows of one sequence in a task */
#define GA_MAX_QV 64        /* query vectors of a task: rows x query heads per KV head */
#define GA_STACK_FLOATS 8192

/* In-place transpose of 16 rows of 16 32-bit elements: row c of the result is column c. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3 */
    for (int i = 0; i < 4; ++i) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
        const __m512i v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
        const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
        const __m512i w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
        r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
        r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
    }
}

/* Bit t set: key t0 + t is seen by a row of length len with these holes (paged_decode_attention.c
 * defines holes: bit j hides the key j places before the row's own). */
static inline __mmask16 visible16(int64_t t0, int64_t len, uint64_t holes) {
    if (t0 >= len) return 0;
    const int64_t n = len - t0 < 16 ? len - t0 : 16;
    uint32_t m = (n == 16) ? 0xffffu : ((1u << n) - 1u);
    if (holes && t0 + 16 > len - 64) {
        for (int64_t t = 0; t < n; ++t) {
            const int64_t back = len - 1 - (t0 + t);
            if (back < 64 && ((holes >> back) & 1u)) m &= ~(1u << t);
        }
    }
    return (__mmask16)m;
}

/* out = sum_t p_t v_t / sum_t p_t for query vectors j0 .. j0 + QB of a task, key by key in
 * order (QB and NV are constants where inlined, so that the QB x NV sums stay in registers). */
static inline __attribute__((always_inline)) void pv_block(
        const int64_t QB, const int64_t NV, const float *S, int64_t span, int64_t j0, int64_t G,
        const int32_t *lens, const int32_t *rows, int64_t h, const uint16_t *v_cache,
        const int64_t *offs, uint16_t *out, int64_t out_row_stride) {
    int64_t end = 0;  /* keys past every row of this block have p = 0 */
    for (int64_t j = j0; j < j0 + QB; ++j) end = lens[j / G] > end ? lens[j / G] : end;
    __m512 acc[6][GA_MAX_D / 16];
    float l[6];
    for (int64_t j = 0; j < QB; ++j) {
        l[j] = 0.0f;
        for (int64_t v = 0; v < NV; ++v) acc[j][v] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < end; ++t) {
        __m512 vv[GA_MAX_D / 16];
        const uint16_t *vr = v_cache + offs[t];
#pragma GCC unroll 16
        for (int64_t v = 0; v < NV; ++v)
            vv[v] = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vr + 16 * v))), 16));
#pragma GCC unroll 8
        for (int64_t j = 0; j < QB; ++j) {
            const float p = S[(j0 + j) * span + t];
            const __m512 pv = _mm512_set1_ps(p);
            l[j] += p;
#pragma GCC unroll 16
            for (int64_t v = 0; v < NV; ++v) acc[j][v] = _mm512_fmadd_ps(pv, vv[v], acc[j][v]);
        }
    }
    const int64_t d = NV * 16;
    for (int64_t j = 0; j < QB; ++j) {
        const int64_t r = (j0 + j) / G, g = (j0 + j) % G;
        const __m512 inv = _mm512_set1_ps(l[j] > 0.0f ? 1.0f / l[j] : 0.0f);
        uint16_t *o = out + rows[r] * out_row_stride + (h * G + g) * d;
        for (int64_t v = 0; v < NV; ++v) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[j][v], inv));
            for (int i = 0; i < 16; ++i) o[16 * v + i] = f32_to_bf16(tmp[i]);
        }
    }
}

/* Rows rows[0 .. R) of one sequence (pages `table`, each row its own length and holes) against
 * KV head h. NV: head dim / 16, a constant where inlined. */
static inline __attribute__((always_inline)) void attend_rows(
        const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache,
        const uint16_t *v_cache, const int32_t *table, const int32_t *lens,
        const uint64_t *holes, const int32_t *rows, int64_t R, int64_t h, uint16_t *out,
        int64_t out_row_stride, int64_t G, int64_t num_kv_heads, const int64_t NV,
        int64_t block_size, float scale) {
    const int64_t d = NV * 16, pairs = NV * 8, row_elems = num_kv_heads * d;
    const int bshift = __builtin_ctzll((unsigned long long)block_size);
    const int64_t nq = R * G;
    int64_t max_len = 0;
    for (int64_t r = 0; r < R; ++r) max_len = lens[r] > max_len ? lens[r] : max_len;
    const int64_t span = (max_len + 15) & ~(int64_t)15;
    /* scores, then probabilities: [nq][span]; V row offsets: [span] */
    float stack_buf[GA_STACK_FLOATS];
    const size_t need = (size_t)nq * span + 2 * (size_t)span;
    float *buf = need <= GA_STACK_FLOATS ? stack_buf : (float *)malloc(need * sizeof(float));
    if (!buf) return;
    float *S = buf;
    int64_t *offs = (int64_t *)(buf + (size_t)nq * span);
    uint32_t qd[GA_MAX_QV][GA_MAX_D / 2];  /* the query heads as bf16 pairs */
    for (int64_t r = 0; r < R; ++r)
        for (int64_t g = 0; g < G; ++g)
            memcpy(qd[r * G + g], q + rows[r] * q_row_stride + (h * G + g) * d,
                   (size_t)d * sizeof(uint16_t));

    /* 1. scores, 16 keys at a time */
    uint32_t kt[GA_MAX_D / 2][16] __attribute__((aligned(64)));
    for (int64_t t0 = 0; t0 < max_len; t0 += 16) {
        const int64_t n = max_len - t0 < 16 ? max_len - t0 : 16;
        for (int64_t t = 0; t < n; ++t) {
            const int64_t p = t0 + t;
            const int64_t slot = ((int64_t)table[p >> bshift] << bshift) + (p & (block_size - 1));
            offs[p] = slot * row_elems + h * d;
        }
        for (int64_t v = t0 + 16; v < t0 + 32 && v < max_len; ++v) {  /* the next chunk */
            const int64_t slot = ((int64_t)table[v >> bshift] << bshift) + (v & (block_size - 1));
            const char *kp = (const char *)(k_cache + slot * row_elems + h * d);
            const char *vp = (const char *)(v_cache + slot * row_elems + h * d);
            for (int64_t b = 0; b < d * 2; b += 64) {
                _mm_prefetch(kp + b, _MM_HINT_T0);
                _mm_prefetch(vp + b, _MM_HINT_T0);
            }
        }
        for (int64_t blk = 0; blk < NV / 2; ++blk) {
            __m512i kr[16];
            for (int64_t t = 0; t < 16; ++t)
                kr[t] = t < n ? _mm512_loadu_si512((const void *)(k_cache + offs[t0 + t] + 32 * blk))
                              : _mm512_setzero_si512();
            transpose16(kr);
            for (int i = 0; i < 16; ++i) _mm512_store_si512((void *)kt[16 * blk + i], kr[i]);
        }
        /* four query vectors at a time share each load of K; each vector's sums are the same
         * two chains (even and odd pairs) whatever its neighbours */
        int64_t j = 0;
        for (; j + 4 <= nq; j += 4) {
            __m512 a[4][2];
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) a[u][0] = a[u][1] = _mm512_setzero_ps();
            for (int64_t i = 0; i < pairs; i += 2) {
                const __m512bh k0 = (__m512bh)_mm512_load_si512((const void *)kt[i]);
                const __m512bh k1 = (__m512bh)_mm512_load_si512((const void *)kt[i + 1]);
#pragma GCC unroll 4
                for (int u = 0; u < 4; ++u) {
                    a[u][0] = _mm512_dpbf16_ps(a[u][0], (__m512bh)_mm512_set1_epi32((int)qd[j + u][i]), k0);
                    a[u][1] = _mm512_dpbf16_ps(a[u][1], (__m512bh)_mm512_set1_epi32((int)qd[j + u][i + 1]), k1);
                }
            }
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u)
                _mm512_storeu_ps(S + (j + u) * span + t0, _mm512_mul_ps(
                    _mm512_add_ps(a[u][0], a[u][1]), _mm512_set1_ps(scale)));
        }
        for (; j < nq; ++j) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            for (int64_t i = 0; i < pairs; i += 2) {
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)qd[j][i]),
                                      (__m512bh)_mm512_load_si512((const void *)kt[i]));
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32((int)qd[j][i + 1]),
                                      (__m512bh)_mm512_load_si512((const void *)kt[i + 1]));
            }
            _mm512_storeu_ps(S + j * span + t0,
                             _mm512_mul_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale)));
        }
    }

    /* 2. softmax numerators; keys a row does not see get exactly 0 */
    __mmask16 vis[span / 16 + 1];  /* + 1: no zero-length array */
    for (int64_t r = 0; r < R; ++r) {
        const uint64_t hl = holes ? holes[r] : 0;
        const int64_t len = lens[r];
        for (int64_t c = 0; c < span / 16; ++c) vis[c] = visible16(16 * c, len, hl);
        for (int64_t g = 0; g < G; ++g) {
            float *s = S + (r * G + g) * span;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t c = 0; 16 * c < len; ++c)
                mx = _mm512_mask_max_ps(mx, vis[c], mx, _mm512_loadu_ps(s + 16 * c));
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            for (int64_t c = 0; c < span / 16; ++c)
                _mm512_storeu_ps(s + 16 * c, _mm512_maskz_mov_ps(
                    vis[c], exp16(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * c), m))));
        }
    }

    /* 3. values, key by key in order, a few query vectors at a time */
    const int64_t QB = NV <= 4 ? 6 : NV <= 8 ? 3 : 1;
    for (int64_t j0 = 0; j0 < nq; j0 += QB) {
        const int64_t nb = nq - j0 < QB ? nq - j0 : QB;
        switch (nb) {
        case 1: pv_block(1, NV, S, span, j0, G, lens, rows, h, v_cache, offs, out, out_row_stride); break;
        case 2: pv_block(2, NV, S, span, j0, G, lens, rows, h, v_cache, offs, out, out_row_stride); break;
        case 3: pv_block(3, NV, S, span, j0, G, lens, rows, h, v_cache, offs, out, out_row_stride); break;
        case 4: pv_block(4, NV, S, span, j0, G, lens, rows, h, v_cache, offs, out, out_row_stride); break;
        case 5: pv_block(5, NV, S, span, j0, G, lens, rows, h, v_cache, offs, out, out_row_stride); break;
        default: pv_block(6, NV, S, span, j0, G, lens, rows, h, v_cache, offs, out, out_row_stride); break;
        }
    }
    if (buf != stack_buf) free(buf);
}

#define GA_CASE(NVV)                                                                            \
    case NVV:                                                                                   \
        attend_rows(q, q_row_stride, k_cache, v_cache, table, lens, holes, rows, R, h, out,     \
                    out_row_stride, G, num_kv_heads, NVV, block_size, scale);                   \
        break;

static void attend_rows_dispatch(const uint16_t *q, int64_t q_row_stride,
                                 const uint16_t *k_cache, const uint16_t *v_cache,
                                 const int32_t *table, const int32_t *lens,
                                 const uint64_t *holes, const int32_t *rows, int64_t R,
                                 int64_t h, uint16_t *out, int64_t out_row_stride, int64_t G,
                                 int64_t num_kv_heads, int64_t d, int64_t block_size,
                                 float scale) {
    switch (d / 16) {
        GA_CASE(2) GA_CASE(4) GA_CASE(8)
    default:
        break;
    }
}

/* A group: consecutive rows whose pages agree over every key each of them reads. */
typedef struct {
    int64_t first, count, table_row;
} Group;

int grouped_decode_attention_bf16(const void *q, int64_t q_row_stride, const void *k_cache,
                                  const void *v_cache, const int32_t *tables,
                                  int64_t table_stride, const int32_t *seq_lens,
                                  const int32_t *q_rows, const int32_t *seq_ids,
                                  int64_t num_rows, void *out, int64_t out_row_stride,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t block_size, int64_t window, float scale,
                                  int num_threads, const uint64_t *holes) {
    if (window > 0 || (head_dim != 32 && head_dim != 64 && head_dim != 128) || num_rows <= 0 ||
        num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > GA_MAX_QV)
        return 0;
    const int64_t G = num_heads / num_kv_heads;
    const int64_t max_rows = GA_MAX_QV / G < GA_MAX_ROWS ? GA_MAX_QV / G : GA_MAX_ROWS;
    Group stack_groups[64];
    Group *groups = num_rows <= 64 ? stack_groups : (Group *)malloc(num_rows * sizeof(Group));
    int32_t stack_lens[64];
    int32_t *lens = num_rows <= 64 ? stack_lens : (int32_t *)malloc(num_rows * sizeof(int32_t));
    if (!groups || !lens) return 0;
    int64_t ng = 0;
    for (int64_t i = 0; i < num_rows; ++i) {
        lens[i] = seq_lens[seq_ids[i]];
        if (ng > 0) {
            Group *gp = &groups[ng - 1];
            const int32_t *ref = tables + (int64_t)seq_ids[gp->table_row] * table_stride;
            const int32_t *mine = tables + (int64_t)seq_ids[i] * table_stride;
            const int64_t need_ref = (lens[gp->table_row] + block_size - 1) / block_size;
            const int64_t need = (lens[i] + block_size - 1) / block_size;
            const int64_t common = need < need_ref ? need : need_ref;
            if (gp->count < max_rows &&
                (mine == ref || memcmp(mine, ref, (size_t)common * sizeof(int32_t)) == 0)) {
                ++gp->count;
                if (lens[i] > lens[gp->table_row]) gp->table_row = i;
                continue;
            }
        }
        groups[ng].first = i;
        groups[ng].count = 1;
        groups[ng].table_row = i;
        ++ng;
    }
    /* Split a few large groups so that every thread has work: rows of one group in separate
     * tasks compute what they would together. */
    const int64_t want = 2 * (int64_t)num_threads;
    if (ng * num_kv_heads < want) {
        int64_t total = 0;
        for (int64_t g = 0; g < ng; ++g) total += groups[g].count;
        const int64_t per = (total * num_kv_heads + want - 1) / want;  /* rows per task */
        int64_t n2 = 0;
        Group stack_split[64];
        Group *split = num_rows <= 64 ? stack_split : (Group *)malloc(num_rows * sizeof(Group));
        for (int64_t g = 0; split && g < ng; ++g) {
            const int64_t parts = (groups[g].count + per - 1) / per;
            const int64_t size = (groups[g].count + parts - 1) / parts;
            for (int64_t s = 0; s < groups[g].count; s += size) {
                split[n2].first = groups[g].first + s;
                split[n2].count = groups[g].count - s < size ? groups[g].count - s : size;
                split[n2].table_row = groups[g].table_row;
                ++n2;
            }
        }
        if (split) {  /* n2 <= num_rows: every part has a row */
            memcpy(groups, split, (size_t)n2 * sizeof(Group));
            ng = n2;
            if (split != stack_split) free(split);
        }
    }
    /* With many groups a task takes all KV heads of its rows: a token's heads share cache
     * lines, so after the first head the rest come from L2. */
    const int64_t heads_per_task = ng >= num_threads ? num_kv_heads : 1;
    const int64_t tasks = ng * (num_kv_heads / heads_per_task);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
        const Group *gp = &groups[task * heads_per_task / num_kv_heads];
        const int64_t h0 = task * heads_per_task % num_kv_heads;
        const int32_t *table = tables + (int64_t)seq_ids[gp->table_row] * table_stride;
        for (int64_t h = h0; h < h0 + heads_per_task; ++h)
            attend_rows_dispatch((const uint16_t *)q, q_row_stride, (const uint16_t *)k_cache,
                                 (const uint16_t *)v_cache, table, lens + gp->first,
                                 holes ? holes + gp->first : NULL, q_rows + gp->first, gp->count, h,
                                 (uint16_t *)out, out_row_stride, G, num_kv_heads, head_dim,
                                 block_size, scale);
    }
    if (groups != stack_groups) free(groups);
    if (lens != stack_lens) free(lens);
    return 1;
}

#endif
