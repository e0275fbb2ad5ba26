/* KV store: copy each new token's K and V rows (all KV heads) into its cache slot; slot -1 is
 * padding and skipped. The rows may be views into a fused QKV output (row strides given). */
#include <stdint.h>
#include <string.h>

void store_kv(const void *key, int64_t key_stride, const void *value, int64_t value_stride,
              void *k_cache, void *v_cache, const int64_t *slots, int64_t tokens,
              int64_t row_bytes, int num_threads) {
    /* Strides in bytes. */
#pragma omp parallel for num_threads(tokens >= 256 ? num_threads : 1) schedule(dynamic, 32)
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t s = slots[t];
        if (s < 0) continue;
        memcpy((char *)k_cache + s * row_bytes, (const char *)key + t * key_stride, row_bytes);
        memcpy((char *)v_cache + s * row_bytes, (const char *)value + t * value_stride,
               row_bytes);
    }
}

int kv_store_abi(void) { return 1; }
