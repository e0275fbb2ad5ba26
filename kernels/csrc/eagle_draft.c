/* One drafting call of an EAGLE head (worker/spec/eagle_fused.py), from token ids to its top
 * tokens:
 *   x = fc(embed[token] ++ feature)        the head's input rows
 *   o, r = decoder layer (decode_layer.c)  over the head's paged KV pool, rows stored first
 *   g = rmsnorm(o + r) * out_norm          the feature guesses (returned)
 *   top-`width` of log_softmax(g @ head^T) for the last `scored` rows (fp32 over the logits
 *   rounded to the model dtype, as torch's log_softmax(logits.float()) sees them)
 * The kernels are the ones the Python path chains (same rounding points), so the results are
 * those of that path up to the order of the fp32 sums in the softmax. Through Python a drafted
 * token cost ~1.2 ms on a 2-vCPU Xeon, of which the kernels took ~0.55 ms: about fifteen small
 * torch ops and ctypes calls around them, paid two to four times per speculative step.
 *
 * A call may hold rows of several sequences (a batch drafts in one call: the head's weights are
 * streamed once, not once per sequence). Row i belongs to sequence seq_of_row[i], whose head
 * cache pages are tables[seq_of_row[i] * table_stride ..]. Rows of a sequence's cache are
 * numbered densely: cache row c = cache_rows[i] lives in slot table[c / block_size] *
 * block_size + c % block_size and attends to rows 0 .. c of its own sequence (minus holes[i],
 * tree drafting), whatever its rotary position. All rows are stored before any attends, so a
 * sequence's rows in one call see each other. Each row's arithmetic does not depend on the
 * other rows of the call (decode_layer.c), so batching changes no result.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "decode_layer.h"
#include "tandem_cpu.h"

size_t eagle_draft_workspace_bytes(const TLayer *L, int64_t m, int64_t vocab, int64_t bf16) {
    const size_t e = bf16 ? 2 : 4;
    const int64_t H = L->hidden;
    return decode_layer_workspace_bytes(L, m, bf16) + align64(m * 2 * H * e) +
           4 * align64(m * H * e) + align64(m * vocab * e) + align64(m * 8) +
           align64(m * 4) * 2;
}

static inline float value(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The top `width` entries of one row of logits as log-probabilities, best first (ties: the
 * lower index). Vectorized where it can be: a scalar pass costs ~4096 expf per scored row, a
 * good part of a tree depth's call. */
#ifdef __AVX512F__
static inline __m512 load16(const void *p, int64_t j, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + j);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + j));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

static inline void insert_top(float v, int64_t j, int64_t width, int64_t *ids, float *logp) {
    if (ids[width - 1] >= 0 && v <= logp[width - 1]) return;
    int64_t w = width - 1;
    while (w > 0 && (ids[w - 1] < 0 || v > logp[w - 1])) {
        ids[w] = ids[w - 1];
        logp[w] = logp[w - 1];
        --w;
    }
    ids[w] = j;
    logp[w] = v;
}

static void top_logp(const void *logits, int64_t vocab, int bf16, int64_t width, int64_t *ids,
                     float *logp) {
    for (int64_t w = 0; w < width; ++w) {
        ids[w] = -1;
        logp[w] = -INFINITY;
    }
    int64_t j = 0;
    float mx = -INFINITY;
    double sum = 0.0;
#ifdef __AVX512F__
    const int64_t vec = vocab / 16 * 16;
    if (vec > 0) {
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int64_t c = 0; c < vec; c += 16) m = _mm512_max_ps(m, load16(logits, c, bf16));
        mx = _mm512_reduce_max_ps(m);
        for (int64_t c = vec; c < vocab; ++c) {
            const float v = value(logits, c, bf16);
            mx = v > mx ? v : mx;
        }
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < vec; c += 16) {
            const __m512 v = load16(logits, c, bf16);
            acc = _mm512_add_ps(acc, exp16(_mm512_sub_ps(v, vmx)));
            /* only lanes that could enter the top list go through the scalar insertion */
            __mmask16 k = ids[width - 1] < 0 ? (__mmask16)0xffff
                                             : _mm512_cmp_ps_mask(v, _mm512_set1_ps(logp[width - 1]),
                                                                  _CMP_GT_OQ);
            while (k) {
                const int t = __builtin_ctz(k);
                k &= (__mmask16)(k - 1);
                insert_top(value(logits, c + t, bf16), c + t, width, ids, logp);
            }
        }
        sum = _mm512_reduce_add_ps(acc);
        j = vec;
    }
#endif
    if (j == 0) {
        for (int64_t c = 0; c < vocab; ++c) {
            const float v = value(logits, c, bf16);
            mx = v > mx ? v : mx;
        }
    }
    for (int64_t c = j; c < vocab; ++c) {
        const float v = value(logits, c, bf16);
        sum += expf(v - mx);
        insert_top(v, c, width, ids, logp);
    }
    const float lse = mx + (float)log(sum);
    for (int64_t w = 0; w < width; ++w) logp[w] -= lse;
}

void eagle_draft(const TLayer *L, const TLinear *fc, const void *embed, const void *out_norm,
                 float out_eps, const TLinear *head, int64_t m, const int64_t *tokens,
                 const void *features, const int64_t *positions, const int32_t *tables,
                 int64_t table_stride, const int32_t *seq_of_row, const int64_t *cache_rows,
                 const uint64_t *holes, int64_t scored, const int64_t *scored_rows,
                 int64_t width, void *feat_out, int64_t *top_ids, float *top_logps, void *work,
                 int64_t bf16, int64_t num_threads) {
    const int b16 = (int)bf16, nt = (int)num_threads;
    const size_t e = bf16 ? 2 : 4;
    const int64_t H = L->hidden, B = L->block_size;
    char *p = (char *)work;
    void *layer_work = p;  p += decode_layer_workspace_bytes(L, m, bf16);
    char *in = p;          p += align64(m * 2 * H * e);
    void *x = p;           p += align64(m * H * e);
    void *o = p;           p += align64(m * H * e);
    void *r = p;           p += align64(m * H * e);
    char *sel = p;         p += align64(m * H * e);
    void *logits = p;      p += align64(m * head->n * e);
    int64_t *slots = (int64_t *)p;  p += align64(m * 8);
    int32_t *lens = (int32_t *)p;   p += align64(m * 4);
    int32_t *rows = (int32_t *)p;
    /* The layer reads row i's pages at row_tables + i * stride (decode_layer.c: one "sequence"
     * per row); a single sequence shares one table (stride 0). */
    int single = 1;
    for (int64_t i = 1; i < m; ++i) single &= seq_of_row[i] == seq_of_row[0];
    int32_t *row_tables = NULL;
    const int32_t *layer_tables = tables + (int64_t)seq_of_row[0] * table_stride;
    if (!single) {
        row_tables = (int32_t *)malloc((size_t)(m * table_stride) * sizeof(int32_t));
        if (!row_tables) return;
        for (int64_t i = 0; i < m; ++i)
            memcpy(row_tables + i * table_stride, tables + (int64_t)seq_of_row[i] * table_stride,
                   (size_t)table_stride * sizeof(int32_t));
        layer_tables = row_tables;
    }

    for (int64_t i = 0; i < m; ++i) {
        const int64_t c = cache_rows[i];
        const int32_t *table = tables + (int64_t)seq_of_row[i] * table_stride;
        slots[i] = (int64_t)table[c / B] * B + c % B;
        lens[i] = (int32_t)(c + 1);
        rows[i] = (int32_t)i;
        memcpy(in + (size_t)(i * 2 * H) * e, (const char *)embed + (size_t)(tokens[i] * H) * e,
               (size_t)H * e);
        memcpy(in + (size_t)(i * 2 * H + H) * e, (const char *)features + (size_t)(i * H) * e,
               (size_t)H * e);
    }
    const TStep S = {m,    positions, slots, layer_tables, single ? 0 : table_stride, lens, rows,
                     holes, layer_work, bf16, num_threads};
    decode_linear(fc, in, m, x, NULL, b16, nt);
    decode_layer(L, &S, x, NULL, o, r);
    decode_rms(o, r, x, out_norm, feat_out, m, H, out_eps, b16, nt);
    free(row_tables);
    if (scored <= 0) return;
    for (int64_t i = 0; i < scored; ++i)
        memcpy(sel + (size_t)(i * H) * e, (const char *)feat_out + (size_t)(scored_rows[i] * H) * e,
               (size_t)H * e);
    decode_linear(head, sel, scored, logits, NULL, b16, nt);
    for (int64_t i = 0; i < scored; ++i)
        top_logp((const char *)logits + (size_t)(i * head->n) * e, head->n, b16, width,
                 top_ids + i * width, top_logps + i * width);
}
