/* One Llama-family decoder layer for a decode step of a few sequences, in one call.
 *
 * At batch 1 the weights stream in a few milliseconds, but driving ~30 torch ops per layer from
 * Python costs about as much again. This chains the CPU kernels of this folder, with the same
 * rounding points as the torch path (every intermediate rounded to the model dtype where torch
 * would hold it in a bf16 tensor):
 *   h = rmsnorm(x [+ residual]);  q, k, v = qkv(h);  rotary(q, k);  cache[slots] = k, v
 *   a = paged_attention(q);  o = o_proj(a);  h2 = rmsnorm(o + residual)
 *   x_out = down(silu(gate(h2)) * up(h2))
 * Tensor parallelism needs an all-reduce after o_proj and down: callers use this only at tp 1.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"
#include "decode_layer.h"
#include "tandem_cpu.h"

size_t decode_layer_workspace_bytes(const TLayer *L, int64_t m, int64_t bf16) {
    const size_t e = bf16 ? 2 : 4;
    const int64_t qkv = (L->num_heads + 2 * L->num_kv_heads) * L->head_dim;
    const int64_t maxk = L->intermediate > L->hidden ? L->intermediate : L->hidden;
    const int64_t maxk2 = maxk > L->num_heads * L->head_dim ? maxk : L->num_heads * L->head_dim;
    return align64(m * L->hidden * e) * 2 + align64(m * qkv * e) +
           align64(m * L->num_heads * L->head_dim * e) + align64(m * L->hidden * e) +
           align64(m * 2 * L->intermediate * e) + align64(m * L->intermediate * e) +
           align64(m * maxk2 * 4);
}

void decode_linear(const TLinear *lin, const void *x, int64_t m, void *y, float *fwork, int bf16,
                   int nt) {
    switch (lin->kind) {
    case LIN_F32:
        skinny_linear_f32(x, m, lin->k, lin->k, lin->w, lin->n, lin->bias, y, lin->n, nt);
        break;
    case LIN_BF16:
        skinny_linear_bf16(x, m, lin->k, lin->k, lin->w, lin->n, lin->bias, y, lin->n, nt);
        break;
    case LIN_INT8:
        skinny_linear_int8(x, m, lin->k, lin->k, lin->w, lin->scales, lin->n, lin->bias, y,
                           lin->n, fwork, bf16, nt);
        break;
    case LIN_W4A8:
        w4a8_linear(x, m, lin->k, lin->k, lin->w, (int)lin->group, (const uint16_t *)lin->scales,
                    lin->n, lin->bias, y, lin->n, fwork, bf16, nt);
        break;
    default:
        skinny_linear_int4(x, m, lin->k, lin->k, lin->w, lin->scales, lin->group, lin->n,
                           lin->bias, y, lin->n, fwork, bf16, nt);
    }
}

void decode_rms(const void *x, const void *res, void *res_out, const void *w, void *out,
                int64_t m, int64_t hidden, float eps, int bf16, int nt) {
    if (bf16) rms_norm_bf16(x, res, res_out, w, out, m, hidden, eps, nt);
    else rms_norm_f32(x, res, res_out, w, out, m, hidden, eps, nt);
}

void decode_layer(const TLayer *L, const TStep *S, const void *x, const void *residual,
                  void *x_out, void *residual_out) {
    const int bf16 = (int)S->bf16, nt = (int)S->num_threads;
    const size_t e = bf16 ? 2 : 4;
    const int64_t m = S->m, H = L->hidden, D = L->head_dim, Hq = L->num_heads,
                  Hkv = L->num_kv_heads, I = L->intermediate, qkv_n = (Hq + 2 * Hkv) * D;
    char *p = (char *)S->work;
    void *h = p;                     p += align64(m * H * e);
    void *qkv = p;                   p += align64(m * qkv_n * e);
    void *attn = p;                  p += align64(m * Hq * D * e);
    void *o = p;                     p += align64(m * H * e);
    void *h2 = p;                    p += align64(m * H * e);
    void *gu = p;                    p += align64(m * 2 * I * e);
    void *act = p;                   p += align64(m * I * e);
    float *fwork = (float *)p;

    if (residual) {
        decode_rms(x, residual, residual_out, L->ln1, h, m, H, L->eps, bf16, nt);
    } else {
        memcpy(residual_out, x, (size_t)(m * H) * e);
        decode_rms(x, NULL, NULL, L->ln1, h, m, H, L->eps, bf16, nt);
    }
    decode_linear(&L->qkv, h, m, qkv, fwork, bf16, nt);
    char *q = (char *)qkv, *k = q + Hq * D * e, *v = k + Hkv * D * e;
    rotary_inplace(q, qkv_n, Hq, k, qkv_n, Hkv, D, S->positions, m, L->cos_sin, L->rot_dim, bf16,
                   nt);
    for (int64_t r = 0; r < m; ++r) {
        if (S->slots[r] < 0) continue;
        const size_t row = (size_t)(Hkv * D) * e, off = (size_t)S->slots[r] * row;
        memcpy((char *)L->k_cache + off, k + (size_t)(r * qkv_n) * e, row);
        memcpy((char *)L->v_cache + off, v + (size_t)(r * qkv_n) * e, row);
    }
    if (bf16)
        paged_decode_attention_bf16(q, qkv_n, L->k_cache, L->v_cache, S->tables, S->table_stride,
                                    S->seq_lens, S->rows, S->rows, m, attn, Hq * D, Hq, Hkv, D,
                                    L->block_size, L->window, L->scale, nt, S->holes);
    else
        paged_decode_attention_f32(q, qkv_n, L->k_cache, L->v_cache, S->tables, S->table_stride,
                                   S->seq_lens, S->rows, S->rows, m, attn, Hq * D, Hq, Hkv, D,
                                   L->block_size, L->window, L->scale, nt, S->holes);
    decode_linear(&L->o, attn, m, o, fwork, bf16, nt);
    decode_rms(o, residual_out, residual_out, L->ln2, h2, m, H, L->eps, bf16, nt);
    decode_linear(&L->gate_up, h2, m, gu, fwork, bf16, nt);
    silu_and_mul(gu, act, m, I, bf16, nt);
    decode_linear(&L->down, act, m, x_out, fwork, bf16, nt);
}

/* Lets the binding check that its structure layouts match this file's. */
int decode_layer_abi(void) { return (int)(1000 + sizeof(TLinear) * 10 + sizeof(TLayer) + sizeof(TStep)); }

/* A stage's layers in one call: the caller (Python) releases and retakes the GIL once per step
 * instead of once per layer, so a replica's other threads (its event loop, Ray's) cannot hold
 * the step up between layers. Outputs alternate between (tmp_x, tmp_residual) and
 * (x_out, residual_out) so that the last layer writes the latter. */
void decode_layers(const TLayer *layers, int64_t n, const TStep *S, const void *x,
                   const void *residual, void *x_out, void *residual_out, void *tmp_x,
                   void *tmp_residual) {
    const void *xi = x, *ri = residual;
    for (int64_t i = 0; i < n; ++i) {
        const int last_side = (n - 1 - i) % 2 == 0;
        void *xo = last_side ? x_out : tmp_x, *ro = last_side ? residual_out : tmp_residual;
        decode_layer(&layers[i], S, xi, ri, xo, ro);
        xi = xo;
        ri = ro;
    }
}
