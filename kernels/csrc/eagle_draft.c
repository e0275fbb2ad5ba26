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
 * Rows of the sequence's head cache are numbered densely: row first_row + i lives in slot
 * table[(first_row + i) / block_size] * block_size + (first_row + i) % block_size and attends
 * to rows 0 .. itself (minus holes[i], tree drafting), whatever its rotary position.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "decode_layer.h"
#include "tandem_cpu.h"

size_t eagle_draft_workspace_bytes(const TLayer *L, int64_t m, int64_t vocab, int64_t bf16) {
    const size_t e = bf16 ? 2 : 4;
    const int64_t H = L->hidden;
    return decode_layer_workspace_bytes(L, m, bf16) + align64(m * 2 * H * e) +
           3 * align64(m * H * e) + align64(m * vocab * e) + align64(m * 8) +
           align64(m * 4) * 2;
}

static inline float value(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* The top `width` entries of one row of logits as log-probabilities, best first (ties: the
 * lower index). */
static void top_logp(const void *logits, int64_t vocab, int bf16, int64_t width, int64_t *ids,
                     float *logp) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < vocab; ++j) {
        const float v = value(logits, j, bf16);
        mx = v > mx ? v : mx;
    }
    double sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) sum += expf(value(logits, j, bf16) - mx);
    const float lse = mx + (float)log(sum);
    for (int64_t w = 0; w < width; ++w) {
        ids[w] = -1;
        logp[w] = -INFINITY;
    }
    for (int64_t j = 0; j < vocab; ++j) {
        const float v = value(logits, j, bf16);
        if (ids[width - 1] >= 0 && v <= logp[width - 1]) continue;
        int64_t w = width - 1;
        while (w > 0 && (ids[w - 1] < 0 || v > logp[w - 1])) {
            ids[w] = ids[w - 1];
            logp[w] = logp[w - 1];
            --w;
        }
        ids[w] = j;
        logp[w] = v;
    }
    for (int64_t w = 0; w < width; ++w) logp[w] -= lse;
}

void eagle_draft(const TLayer *L, const TLinear *fc, const void *embed, const void *out_norm,
                 float out_eps, const TLinear *head, int64_t m, const int64_t *tokens,
                 const void *features, const int64_t *positions, const int32_t *table,
                 int64_t first_row, const uint64_t *holes, int64_t scored, int64_t width,
                 void *feat_out, int64_t *top_ids, float *top_logps, void *work, int64_t bf16,
                 int64_t num_threads) {
    const int b16 = (int)bf16, nt = (int)num_threads;
    const size_t e = bf16 ? 2 : 4;
    const int64_t H = L->hidden, B = L->block_size;
    char *p = (char *)work;
    void *layer_work = p;  p += decode_layer_workspace_bytes(L, m, bf16);
    char *in = p;          p += align64(m * 2 * H * e);
    void *x = p;           p += align64(m * H * e);
    void *o = p;           p += align64(m * H * e);
    void *r = p;           p += align64(m * H * e);
    void *logits = p;      p += align64(m * head->n * e);
    int64_t *slots = (int64_t *)p;  p += align64(m * 8);
    int32_t *lens = (int32_t *)p;   p += align64(m * 4);
    int32_t *rows = (int32_t *)p;

    for (int64_t i = 0; i < m; ++i) {
        const int64_t row = first_row + i;
        slots[i] = (int64_t)table[row / B] * B + row % B;
        lens[i] = (int32_t)(row + 1);
        rows[i] = (int32_t)i;
        memcpy(in + (size_t)(i * 2 * H) * e, (const char *)embed + (size_t)(tokens[i] * H) * e,
               (size_t)H * e);
        memcpy(in + (size_t)(i * 2 * H + H) * e, (const char *)features + (size_t)(i * H) * e,
               (size_t)H * e);
    }
    /* Every row reads the same block table: stride 0. */
    const TStep S = {m, positions, slots, table, 0, lens, rows, holes, layer_work, bf16, num_threads};
    decode_linear(fc, in, m, x, NULL, b16, nt);
    decode_layer(L, &S, x, NULL, o, r);
    decode_rms(o, r, x, out_norm, feat_out, m, H, out_eps, b16, nt);
    if (scored <= 0) return;
    const int64_t first = m - scored;
    decode_linear(head, (const char *)feat_out + (size_t)(first * H) * e, scored, logits, NULL,
                  b16, nt);
    for (int64_t i = 0; i < scored; ++i)
        top_logp((const char *)logits + (size_t)(i * head->n) * e, head->n, b16, width,
                 top_ids + i * width, top_logps + i * width);
}
