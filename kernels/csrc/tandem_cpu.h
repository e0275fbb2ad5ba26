/* The exported CPU kernels, for the fused decode layer that chains them. */
#ifndef TANDEM_CPU_H
#define TANDEM_CPU_H

#include <stddef.h>
#include <stdint.h>

int skinny_linear_support(void);
void skinny_linear_f32(const float *x, int64_t m, int64_t k, int64_t ldx, const float *w,
                       int64_t n, const float *bias, float *y, int64_t ldy, int num_threads);
void skinny_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *w,
                        int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy,
                        int num_threads);
int amx_linear_available(void);
int64_t amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t ldx, const uint16_t *w,
                        int64_t n, const uint16_t *bias, uint16_t *y, int64_t ldy,
                        int num_threads);
void skinny_linear_int8(const void *x, int64_t m, int64_t k, int64_t ldx, const int8_t *w,
                        const float *scales, int64_t n, const void *bias, void *y, int64_t ldy,
                        float *work, int x_bf16, int num_threads);
void skinny_linear_int4(const void *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w,
                        const float *sm, int64_t group, int64_t n, const void *bias, void *y,
                        int64_t ldy, float *work, int x_bf16, int num_threads);
/* 4- or 8-bit weights x int8 activations (w4a8_linear.c); work: w4a8_workspace_bytes(m, k). */
int w4a8_support(void);
size_t w4a8_workspace_bytes(int64_t m, int64_t k);
void w4a8_linear(const void *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *w, int bits,
                 const uint16_t *sm, int64_t n, const void *bias, void *y, int64_t ldy,
                 void *work, int bf16, int num_threads);
void w4a8_dequantize(const uint8_t *w, int bits, const uint16_t *sm, int64_t n, int64_t k,
                     void *out, int out_bf16, int num_threads);
void rms_norm_f32(const float *x, const float *residual, float *residual_out,
                  const float *weight, float *out, int64_t rows, int64_t hidden, float eps,
                  int num_threads);
void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, uint16_t *residual_out,
                   const uint16_t *weight, uint16_t *out, int64_t rows, int64_t hidden, float eps,
                   int num_threads);
void rotary_inplace(void *q, int64_t q_ld, int64_t q_heads, void *k, int64_t k_ld,
                    int64_t k_heads, int64_t d, const int64_t *positions, int64_t tokens,
                    const float *cache, int64_t rot_dim, int bf16, int num_threads);
void paged_decode_attention_f32(const void *q, int64_t q_row_stride, const void *k_cache,
                                const void *v_cache, const int32_t *tables, int64_t table_stride,
                                const int32_t *seq_lens, const int32_t *q_rows,
                                const int32_t *seq_ids, int64_t num_rows, void *out,
                                int64_t out_row_stride, int64_t num_heads, int64_t num_kv_heads,
                                int64_t head_dim, int64_t block_size, int64_t window,
                                float scale, int num_threads, const uint64_t *holes);
void paged_decode_attention_bf16(const void *q, int64_t q_row_stride, const void *k_cache,
                                 const void *v_cache, const int32_t *tables,
                                 int64_t table_stride, const int32_t *seq_lens,
                                 const int32_t *q_rows, const int32_t *seq_ids,
                                 int64_t num_rows, void *out, int64_t out_row_stride,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 int64_t block_size, int64_t window, float scale,
                                 int num_threads, const uint64_t *holes);
#if defined(__AVX512F__) && defined(__AVX512BF16__)
/* grouped_attention.c: 1 when it handled the call, 0 for shapes it does not serve (the caller
 * falls back to the row-by-row kernel). */
#define TANDEM_GROUPED_ATTENTION 1
int grouped_decode_attention_bf16(const void *q, int64_t q_row_stride, const void *k_cache,
                                  const void *v_cache, const int32_t *tables,
                                  int64_t table_stride, const int32_t *seq_lens,
                                  const int32_t *q_rows, const int32_t *seq_ids,
                                  int64_t num_rows, void *out, int64_t out_row_stride,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t block_size, int64_t window, float scale,
                                  int num_threads, const uint64_t *holes);
#endif
void silu_and_mul(const void *gu, void *out, int64_t rows, int64_t inter, int bf16,
                  int num_threads);

#endif
