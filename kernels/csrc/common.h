/* What every CPU kernel shares: bf16 <-> fp32 conversion with torch's rounding. */
#ifndef TANDEM_COMMON_H
#define TANDEM_COMMON_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does; NaN stays a (quiet) NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The value a bf16 tensor would hold: where torch rounds an intermediate, so do we. */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#endif
