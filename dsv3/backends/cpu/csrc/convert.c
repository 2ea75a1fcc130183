/* FP8 weights widened in bulk: dequantization for `dsv3 convert` and load, bf16 copies for prefill GEMMs. */
#include "common.h"

/* FP8 block-scaled weight -> bf16 (out_bf16) or fp32: y = round(lut[w] * scale[block]), the fp32 product
 * rounded once, exactly as core/fp8.py's dequantize. lut holds the 256 byte values as floats (e4m3fn or
 * fnuz: the caller fills it from torch, so this file knows no format). A table lookup per byte instead of
 * torch's generic fp8 -> fp32 cast: ~4x the rate per core, which is what `dsv3 convert dequant` and the
 * cpu backend's load spend their time on. */
void dsv3_dequant_fp8(const uint8_t *w, const float *lut, const float *scale, int64_t N, int64_t K, int64_t block,
                      int out_bf16, void *out, int threads) {
    const int64_t kb = (K + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * K;
        const float *s = scale + (n / block) * kb;
        for (int64_t k0 = 0; k0 < K; k0 += block) { /* one scale per block: the inner loop vectorizes */
            const int64_t len = K - k0 < block ? K - k0 : block;
            const float sc = s[k0 / block];
            if (out_bf16) {
                uint16_t *y = (uint16_t *)out + n * K + k0;
                for (int64_t k = 0; k < len; k++) {
                    float f = lut[row[k0 + k]] * sc;
                    uint32_t u;
                    memcpy(&u, &f, 4);
                    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* nearest even, as to_bf16 */
                    y[k] = (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)r;
                }
            } else {
                float *y = (float *)out + n * K + k0;
                for (int64_t k = 0; k < len; k++) y[k] = lut[row[k0 + k]] * sc;
            }
        }
    }
}

/* FP8 weight [N, K] -> bf16 for a prefill GEMM: the value rounded once (as dsv3_dequant_fp8, without its NaN
 * handling: this backend refuses NaN bytes at load), widened in vector registers rather than by a table */
void dsv3_fp8_to_bf16(const uint8_t *w, const float *scale, float fmt, int64_t N, int64_t K, uint16_t *out,
                      int threads) {
    const int64_t kb = (K + QB - 1) / QB;
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc((size_t)K * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            widen_fp8(w + n * K, scale + (n / QB) * kb, fmt, K, row);
            uint16_t *y = out + n * K;
            for (int64_t k = 0; k < K; k++) { /* nearest even; branch-free so it vectorizes */
                uint32_t u;
                memcpy(&u, row + k, 4);
                y[k] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            }
        }
        free(row);
    }
}

/* how many of n bytes equal a or b (an FP8 format's NaN codes: e4m3fn has two, e4m3fnuz one, passed twice) */
int64_t dsv3_count_bytes(const uint8_t *w, int64_t n, int a, int b, int threads) {
    int64_t c = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : c)
    for (int64_t i = 0; i < n; i++) c += (w[i] == (uint8_t)a) | (w[i] == (uint8_t)b);
    return c;
}
