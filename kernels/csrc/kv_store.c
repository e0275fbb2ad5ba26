/* KV store: copy each new token's K and V rows (all KV heads) into its cache slot; slot -1 is
 * padding and skipped. The rows may be views into a fused QKV output (row strides given).
 * And moving rows between slots of many caches (move_rows). */
#include <stdint.h>
#include <stdlib.h>
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

/* Copy rows src[i] -> dst[i] (row indices, row_bytes each) in every one of num_caches caches:
 * the accepted branch of a verified token tree moving to the slots a chain would use, in all
 * layers' K and V caches at once (60 index ops from Python cost ~1 ms). All of a cache's rows
 * are read before any is written, since the lists may overlap. The binding checks the rows. */
int move_rows(void *const *caches, int64_t num_caches, const int64_t *src, const int64_t *dst,
              int64_t n, int64_t row_bytes) {
    char stack[16384];
    const size_t need = (size_t)(n * row_bytes);
    char *tmp = need <= sizeof(stack) ? stack : (char *)malloc(need);
    if (!tmp) return -1;
    for (int64_t c = 0; c < num_caches; ++c) {
        char *base = (char *)caches[c];
        for (int64_t i = 0; i < n; ++i)
            memcpy(tmp + i * row_bytes, base + src[i] * row_bytes, (size_t)row_bytes);
        for (int64_t i = 0; i < n; ++i)
            memcpy(base + dst[i] * row_bytes, tmp + i * row_bytes, (size_t)row_bytes);
    }
    if (tmp != stack) free(tmp);
    return 0;
}

int kv_store_abi(void) { return 2; }
