/* The fused decoder layer's structures (decode_layer.c), shared with the kernels that run a
 * layer as part of a bigger call (eagle_draft.c). The Python binding mirrors them with ctypes
 * (kernels/cpu_decode_layer.py) and checks their sizes through decode_layer_abi(). */
#ifndef TANDEM_DECODE_LAYER_H
#define TANDEM_DECODE_LAYER_H

#include <stddef.h>
#include <stdint.h>

enum { LIN_F32 = 0, LIN_BF16 = 1, LIN_INT8 = 2, LIN_INT4 = 3, LIN_W4A8 = 4 };

typedef struct {
    int64_t kind, group, n, k;
    const void *w;        /* [n, k]; int4: packed [n, k / 2]; w4a8: w4a8_linear.c's layout */
    const float *scales;  /* int8: [n]; int4: [n, k / group, 2] (scale, min); w4a8: its own */
                          /* (w4a8: `group` holds the code width, 4 or 8; groups are 32) */
    const void *bias;     /* [n] in the model dtype, or NULL */
} TLinear;

typedef struct {
    TLinear qkv, o, gate_up, down;
    const void *ln1, *ln2;
    void *k_cache, *v_cache;  /* [num_blocks, block_size, Hkv, D] */
    const float *cos_sin;     /* [max_pos, rot_dim] */
    int64_t hidden, intermediate, num_heads, num_kv_heads, head_dim, block_size, window,
        rot_dim;
    float eps, scale;
} TLayer;

typedef struct {
    int64_t m;  /* sequences, one query token each */
    const int64_t *positions, *slots;  /* [m] */
    const int32_t *tables;             /* [m, table_stride] */
    int64_t table_stride;
    const int32_t *seq_lens, *rows;    /* [m]; rows = 0 .. m-1 */
    const uint64_t *holes;             /* [m] keys hidden per row (tree attention), or NULL */
    void *work;                        /* decode_layer_workspace_bytes() */
    int64_t bf16, num_threads;
} TStep;

static inline size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

size_t decode_layer_workspace_bytes(const TLayer *L, int64_t m, int64_t bf16);
void decode_layer(const TLayer *L, const TStep *S, const void *x, const void *residual,
                  void *x_out, void *residual_out);
/* y = x @ W^T (+ bias) for m rows in the layer's layout; fwork: m * max(k) floats (quantized). */
void decode_linear(const TLinear *lin, const void *x, int64_t m, void *y, float *fwork, int bf16,
                   int nt);
/* out = rmsnorm(x [+ residual]) * w, residual_out = x + residual (see rms_norm.c). */
void decode_rms(const void *x, const void *res, void *res_out, const void *w, void *out,
                int64_t m, int64_t hidden, float eps, int bf16, int nt);

#endif
