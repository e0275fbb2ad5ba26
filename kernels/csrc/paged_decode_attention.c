/* Paged decode attention for CPUs: one query token per sequence against its paged K/V.
 *
 * The torch reference gathers every sequence's blocks into a padded copy and then runs SDPA over
 * it, so it moves each KV byte three times and pads to the longest context. This kernel reads the
 * pages in place, once: one task per (sequence, KV head) loads each K/V row, widens it to fp32
 * and uses it for all query heads of its GQA group, with an online (flash) softmax in fp32.
 *
 * Layouts (row-major, innermost dimension contiguous):
 *   q        [rows, Hq, D]  (row stride given) row q_rows[i] belongs to sequence seq_ids[i]
 *   k/v      [num_blocks, block_size, Hkv, D]
 *   tables   [num_seqs, table_stride] int32 block ids
 *   seq_lens [num_seqs] int32 context length, the query token included
 *   out      [rows, Hq, D]  (row stride given), same rows as q
 * window > 0 limits each query to its last `window` keys (Mistral's sliding window).
 * holes (optional, one per row i, NULL: none) hides keys from a row for tree attention
 * (speculative verification of a token tree): bit j set hides key len - 1 - j, the key j places
 * before the row's own; keys further back than 64 are always visible. A row's own key (bit 0)
 * and the first key of its context must stay visible.
 * Limits checked by the Python binding: Hq / Hkv <= MAX_GROUP, D <= MAX_HEAD_DIM,
 * block_size <= MAX_BLOCK.
 */
#include <math.h>
#include <stdint.h>

#include "common.h"
#include "tandem_cpu.h"
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 256

/* Widen one row of D elements (bf16 or fp32) to fp32. */
static inline void load_row(float *dst, const void *src, int64_t d, int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
        int64_t i = 0;
#ifdef __AVX512F__
        const int64_t dv = d & ~(int64_t)15;
        for (; i < dv; i += 16) {
            __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        }
#endif
        for (; i < d; ++i) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)d * sizeof(float));
    }
}

static inline float dot(const float *a, const float *b, int64_t d) {
    int64_t i = 0;
    float r = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= d; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    r = _mm512_reduce_add_ps(acc);
#endif
    for (; i < d; ++i) r += a[i] * b[i];
    return r;
}

/* y = y * c + p * x */
static inline void scale_add(float *y, float c, float p, const float *x, int64_t d) {
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512 vc = _mm512_set1_ps(c), vp = _mm512_set1_ps(p);
    for (; i + 16 <= d; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(vp, _mm512_loadu_ps(x + i),
                                                _mm512_mul_ps(vc, _mm512_loadu_ps(y + i))));
#endif
    for (; i < d; ++i) y[i] = y[i] * c + p * x[i];
}

/* Whether key p is hidden from a row of length len with these holes. */
static inline int hidden_key(uint64_t holes, int64_t len, int64_t p) {
    const int64_t back = len - 1 - p;
    return back < 64 && ((holes >> back) & 1u);
}

static inline void attend(const void *q, int64_t q_row_stride, const void *k_cache,
                          const void *v_cache, const int32_t *table, int64_t len, int64_t row,
                          int64_t h, void *out, int64_t out_row_stride, int64_t group,
                          int64_t num_kv_heads, int64_t d, int64_t block_size, int64_t window,
                          float scale, int bf16, uint64_t holes) {
    const size_t esize = bf16 ? 2 : 4;
    float qf[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM];
    float kv[MAX_BLOCK * MAX_HEAD_DIM], s[MAX_GROUP * MAX_BLOCK], m[MAX_GROUP], l[MAX_GROUP];
    for (int64_t g = 0; g < group; ++g) {
        const char *qh = (const char *)q + (row * q_row_stride + (h * group + g) * d) * esize;
        load_row(qf + g * d, qh, d, bf16);
        for (int64_t i = 0; i < d; ++i) {
            qf[g * d + i] *= scale;
            acc[g * d + i] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const int64_t start = (window > 0 && len > window) ? len - window : 0;
    for (int64_t b = start / block_size; b * block_size < len; ++b) {
        const int64_t t0 = b * block_size > start ? b * block_size : start;
        const int64_t t1 = (b + 1) * block_size < len ? (b + 1) * block_size : len;
        const int64_t n = t1 - t0;
        const int64_t base = ((int64_t)table[b] * block_size + (t0 - b * block_size))
                             * num_kv_heads + h;
        const char *kb = (const char *)k_cache + base * d * esize;
        const char *vb = (const char *)v_cache + base * d * esize;
        const int64_t row_bytes = num_kv_heads * d * (int64_t)esize;
        for (int64_t t = 0; t < n; ++t) load_row(kv + t * d, kb + t * row_bytes, d, bf16);
        for (int64_t g = 0; g < group; ++g)
            for (int64_t t = 0; t < n; ++t)
                s[g * MAX_BLOCK + t] = holes && hidden_key(holes, len, t0 + t)
                                           ? -INFINITY : dot(qf + g * d, kv + t * d, d);
        for (int64_t t = 0; t < n; ++t) load_row(kv + t * d, vb + t * row_bytes, d, bf16);
        for (int64_t g = 0; g < group; ++g) {
            float *sg = s + g * MAX_BLOCK, *ag = acc + g * d;
            float mx = m[g];
            for (int64_t t = 0; t < n; ++t) mx = sg[t] > mx ? sg[t] : mx;
            float sum = l[g] * expf(m[g] - mx);
            scale_add(ag, expf(m[g] - mx), 0.0f, ag, d);
            for (int64_t t = 0; t < n; ++t) {
                const float p = expf(sg[t] - mx);
                sum += p;
                scale_add(ag, 1.0f, p, kv + t * d, d);
            }
            m[g] = mx;
            l[g] = sum;
        }
    }
    for (int64_t g = 0; g < group; ++g) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        const int64_t o = row * out_row_stride + (h * group + g) * d;
        for (int64_t i = 0; i < d; ++i) {
            const float x = acc[g * d + i] * inv;
            if (bf16) ((uint16_t *)out)[o + i] = f32_to_bf16(x);
            else ((float *)out)[o + i] = x;
        }
    }
}


#ifdef __AVX512F__

/* The same attention as attend() for head dims that are a multiple of 16, 16 keys at a time:
 * scores of a 16-key chunk land in one vector, so the softmax update is vectorized too. Always
 * inlined with the group size and the head dim (in vectors) as constants where the dispatch
 * below knows them, so that the G x NV accumulators stay in registers. */
static inline __attribute__((always_inline)) void attend16(
        const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,
        const int32_t *table, int64_t len, int64_t row, int64_t h, void *out,
        int64_t out_row_stride, const int64_t G, int64_t num_kv_heads, const int64_t NV,
        int64_t block_size, int64_t window, float scale, const int bf16, uint64_t holes) {
    const size_t esize = bf16 ? 2 : 4;
    const int64_t d = NV * 16, row_elems = num_kv_heads * d;
    const int bshift = __builtin_ctzll((unsigned long long)block_size);
    __m512 qv[MAX_GROUP][MAX_HEAD_DIM / 16], acc[MAX_GROUP][MAX_HEAD_DIM / 16];
    float kf[16 * MAX_HEAD_DIM], pbuf[MAX_GROUP * 16], m[MAX_GROUP], l[MAX_GROUP];
    int64_t offs[16];
#ifdef __AVX512BF16__
    /* bf16 with an even number of 16-float vectors per head: scores straight from the cached
     * bf16 keys with bf16 dot products (exact products, fp32 sums), no widening of K; the scale
     * is applied to the summed scores. */
    const int dp = bf16 && NV % 2 == 0;
    __m512i qb[MAX_GROUP][MAX_HEAD_DIM / 32];
#else
    const int dp = 0;
#endif
    for (int64_t g = 0; g < G; ++g) {
        float tmp[MAX_HEAD_DIM];
        const char *qh = (const char *)q + (row * q_row_stride + (h * G + g) * d) * esize;
        load_row(tmp, qh, d, bf16);
        for (int64_t v = 0; v < NV; ++v) {
            qv[g][v] = _mm512_mul_ps(_mm512_loadu_ps(tmp + 16 * v), _mm512_set1_ps(scale));
            acc[g][v] = _mm512_setzero_ps();
        }
#ifdef __AVX512BF16__
        if (dp)
            for (int64_t u = 0; u < NV / 2; ++u)
                qb[g][u] = _mm512_loadu_si512((const void *)((const uint16_t *)qh + 32 * u));
#endif
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    /* With holes (a token tree) the loop walks the visible keys only, in order, 16 at a time
     * from the first: a tree token's keys then form the same chunks, summed in the same order,
     * as those of the chain of its ancestors, so its result is bit for bit what decoding that
     * chain computes. Key v of the walk is at position v below `base`, tail[v - base] above. */
    int64_t tail[64], base = len, visible = len;
    if (holes) {
        base = len > 64 ? len - 64 : 0;
        visible = base;
        for (int64_t p = base; p < len; ++p)
            if (!hidden_key(holes, len, p)) tail[visible++ - base] = p;
    }
#define KEY_POS(v) ((v) < base ? (v) : tail[(v) - base])
    const int64_t start = (window > 0 && visible > window) ? visible - window : 0;
    for (int64_t p0 = start; p0 < visible; p0 += 16) {
        const int64_t n = visible - p0 < 16 ? visible - p0 : 16;
        const __mmask16 valid = (__mmask16)((1u << n) - 1u);
        for (int64_t t = 0; t < n; ++t) {
            const int64_t p = KEY_POS(p0 + t);
            /* block_size is a power of two (checked by the binding): no divisions here. */
            const int64_t slot = ((int64_t)table[p >> bshift] << bshift) + (p & (block_size - 1));
            offs[t] = (slot * row_elems + h * d) * (int64_t)esize;
            if (!dp) load_row(kf + t * d, (const char *)k_cache + offs[t], d, bf16);
        }
        /* The next chunk's K and V rows of this head: pages are scattered, so the hardware
         * prefetchers lose the stream at every block boundary (30 layers at batch 64, ~450
         * context: 108-120 ms without, 67-79 ms with; whole rows from the first head only, or
         * two chunks ahead, measured slower). */
        for (int64_t v = p0 + 16; v < p0 + 32 && v < visible; ++v) {
            const int64_t p = KEY_POS(v);
            const int64_t slot = ((int64_t)table[p >> bshift] << bshift) + (p & (block_size - 1));
            const int64_t off = (slot * row_elems + h * d) * (int64_t)esize;
            for (int64_t b = 0; b < d * (int64_t)esize; b += 64) {
                _mm_prefetch((const char *)k_cache + off + b, _MM_HINT_T0);
                _mm_prefetch((const char *)v_cache + off + b, _MM_HINT_T0);
            }
        }
        for (int64_t g = 0; g < G; ++g) {
            __m512 dots[16];
            for (int64_t t = 0; t < 16; ++t) {
                __m512 a = _mm512_setzero_ps();
                if (t < n) {
#ifdef __AVX512BF16__
                    if (dp) {
                        const uint16_t *kr = (const uint16_t *)((const char *)k_cache + offs[t]);
                        for (int64_t u = 0; u < NV / 2; ++u)
                            a = _mm512_dpbf16_ps(a, (__m512bh)qb[g][u],
                                                 (__m512bh)_mm512_loadu_si512(
                                                     (const void *)(kr + 32 * u)));
                    } else
#endif
                        for (int64_t v = 0; v < NV; ++v)
                            a = _mm512_fmadd_ps(qv[g][v], _mm512_loadu_ps(kf + t * d + 16 * v),
                                                a);
                }
                dots[t] = a;
            }
            __m512 sums = sum16x16(dots);
            if (dp) sums = _mm512_mul_ps(sums, _mm512_set1_ps(scale));
            const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, sums);
            const float mx = fmaxf(m[g], _mm512_reduce_max_ps(s));
            const __m512 pr = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(mx))));
            _mm512_storeu_ps(pbuf + 16 * g, pr);
            const float corr = expf(m[g] - mx);
            l[g] = l[g] * corr + _mm512_reduce_add_ps(pr);
            m[g] = mx;
            const __m512 c = _mm512_set1_ps(corr);
            for (int64_t v = 0; v < NV; ++v) acc[g][v] = _mm512_mul_ps(c, acc[g][v]);
        }
        for (int64_t t = 0; t < n; ++t) {
            __m512 vv[MAX_HEAD_DIM / 16];
            const char *vr = (const char *)v_cache + offs[t];
            for (int64_t v = 0; v < NV; ++v) {
                if (bf16) {
                    const __m512i w = _mm512_cvtepu16_epi32(
                        _mm256_loadu_si256((const __m256i *)((const uint16_t *)vr + 16 * v)));
                    vv[v] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
                } else {
                    vv[v] = _mm512_loadu_ps((const float *)vr + 16 * v);
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                const __m512 pt = _mm512_set1_ps(pbuf[16 * g + t]);
                for (int64_t v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(pt, vv[v], acc[g][v]);
            }
        }
    }
#undef KEY_POS
    for (int64_t g = 0; g < G; ++g) {
        const __m512 inv = _mm512_set1_ps(l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
        const int64_t o = row * out_row_stride + (h * G + g) * d;
        for (int64_t v = 0; v < NV; ++v) {
            float tmp[16];
            _mm512_storeu_ps(tmp, _mm512_mul_ps(acc[g][v], inv));
            for (int i = 0; i < 16; ++i) {
                if (bf16) ((uint16_t *)out)[o + 16 * v + i] = f32_to_bf16(tmp[i]);
                else ((float *)out)[o + 16 * v + i] = tmp[i];
            }
        }
    }
}

/* Constant (group, head dim) pairs of common models: SmolLM2 (3, 64), Llama 3 8B (4, 128),
 * Llama 2 7B / Mistral (1 or 4, 128), Qwen2 (7, 128 / 6, 64), TinyLlama (8, 64). */
#define SPECIALIZE(GV, NVV)                                                                    \
    if (group == GV && nv == NVV) {                                                           \
        if (bf16) attend16(q, q_row_stride, k_cache, v_cache, table, len, row, h, out,          \
                           out_row_stride, GV, num_kv_heads, NVV, block_size, window, scale, 1, \
                           holes);                                                            \
        else attend16(q, q_row_stride, k_cache, v_cache, table, len, row, h, out,               \
                      out_row_stride, GV, num_kv_heads, NVV, block_size, window, scale, 0,      \
                      holes);                                                                 \
        return;                                                                               \
    }

static void attend16_dispatch(const void *q, int64_t q_row_stride, const void *k_cache,
                              const void *v_cache, const int32_t *table, int64_t len,
                              int64_t row, int64_t h, void *out, int64_t out_row_stride,
                              int64_t group, int64_t num_kv_heads, int64_t d,
                              int64_t block_size, int64_t window, float scale, int bf16,
                              uint64_t holes) {
    const int64_t nv = d / 16;
    SPECIALIZE(1, 4) SPECIALIZE(2, 4) SPECIALIZE(3, 4) SPECIALIZE(4, 4) SPECIALIZE(6, 4)
    SPECIALIZE(8, 4) SPECIALIZE(1, 8) SPECIALIZE(2, 8) SPECIALIZE(4, 8) SPECIALIZE(7, 8)
    SPECIALIZE(8, 8)
    attend16(q, q_row_stride, k_cache, v_cache, table, len, row, h, out, out_row_stride, group,
             num_kv_heads, nv, block_size, window, scale, bf16, holes);
}
#define ATTEND(D) ((D) % 16 == 0 ? attend16_dispatch : attend)
#else
#define ATTEND(D) attend
#endif

static void run(const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,
                const int32_t *tables, int64_t table_stride, const int32_t *seq_lens,
                const int32_t *q_rows, const int32_t *seq_ids, int64_t num_rows, void *out,
                int64_t out_row_stride, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                int64_t block_size, int64_t window, float scale, int num_threads, int bf16,
                const uint64_t *holes) {
#ifdef TANDEM_GROUPED_ATTENTION
    /* bf16 goes to grouped_attention.c where it serves the shape (no sliding window, head dim
     * 32, 64 or 128): the rows of a sequence share their K/V reads there. */
    if (bf16 && grouped_decode_attention_bf16(q, q_row_stride, k_cache, v_cache, tables,
                                              table_stride, seq_lens, q_rows, seq_ids, num_rows,
                                              out, out_row_stride, num_heads, num_kv_heads,
                                              head_dim, block_size, window, scale, num_threads,
                                              holes))
        return;
#endif
    const int64_t group = num_heads / num_kv_heads;
    /* A task walks the KV heads of one sequence in turn: a token's heads share cache lines, so
     * after the first head the rest come from L2. With fewer sequences than threads, one task
     * per (sequence, head) keeps every thread busy instead. */
    const int64_t heads_per_task = num_rows >= num_threads ? num_kv_heads : 1;
    const int64_t tasks = num_rows * (num_kv_heads / heads_per_task);
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t i = task * heads_per_task / num_kv_heads;
        const int64_t h0 = task * heads_per_task % num_kv_heads;
        const int64_t seq = seq_ids[i];
        const int32_t *table = tables + seq * table_stride;
        const uint64_t hl = holes ? holes[i] : 0;
        for (int64_t h = h0; h < h0 + heads_per_task; ++h) {
            /* Constant head dims let the compiler unroll the row loops. */
            switch (head_dim) {
            case 64:
                ATTEND(64)(q, q_row_stride, k_cache, v_cache, table, seq_lens[seq], q_rows[i], h,
                           out, out_row_stride, group, num_kv_heads, 64, block_size, window,
                           scale, bf16, hl);
                break;
            case 128:
                ATTEND(128)(q, q_row_stride, k_cache, v_cache, table, seq_lens[seq], q_rows[i], h,
                            out, out_row_stride, group, num_kv_heads, 128, block_size, window,
                            scale, bf16, hl);
                break;
            default:
                ATTEND(head_dim)(q, q_row_stride, k_cache, v_cache, table, seq_lens[seq],
                                 q_rows[i], h, out, out_row_stride, group, num_kv_heads,
                                 head_dim, block_size, window, scale, bf16, hl);
            }
        }
    }
}

#define ENTRY(NAME, BF16)                                                                       \
    void NAME(const void *q, int64_t q_row_stride, const void *k_cache, const void *v_cache,   \
              const int32_t *tables, int64_t table_stride, const int32_t *seq_lens,            \
              const int32_t *q_rows, const int32_t *seq_ids, int64_t num_rows, void *out,      \
              int64_t out_row_stride, int64_t num_heads, int64_t num_kv_heads,                 \
              int64_t head_dim, int64_t block_size, int64_t window, float scale,               \
              int num_threads, const uint64_t *holes) {                                        \
        run(q, q_row_stride, k_cache, v_cache, tables, table_stride, seq_lens, q_rows,         \
            seq_ids, num_rows, out, out_row_stride, num_heads, num_kv_heads, head_dim,         \
            block_size, window, scale, num_threads, BF16, holes);                              \
    }

ENTRY(paged_decode_attention_f32, 0)
ENTRY(paged_decode_attention_bf16, 1)

/* Lets the binding check that it matches the library it loaded. */
int paged_decode_attention_abi(void) { return 4; }
