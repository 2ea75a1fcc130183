/* RMSNorm, interleaved rope, and MLA's latent-cache writes of a position step. */
#include "common.h"

/* one row of RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w, fp32 inside (xf: D floats), one rounding to bf16 */
static void rms_row(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t D, float eps, float *xf) {
    widen(x, xf, D);
    const float inv = 1.0f / sqrtf(dot_f32(xf, xf, D) / (float)D + eps);
    for (int64_t k = 0; k < D; k++) y[k] = to_bf16(xf[k] * inv * bf16_scalar(w[k]));
}

/* RMSNorm of rows of D (row r at x + r * xs: a view of a wider projection is read in place), rows in parallel (a
 * prefill normalizes thousands: torch's bf16 rms_norm runs ~8 ops over each); y contiguous */
void dsv3_rms_norm_bf16(const uint16_t *x, int64_t xs, const uint16_t *w, uint16_t *y, int64_t rows, int64_t D,
                        float eps, int threads) {
#pragma omp parallel num_threads(rows >= 8 ? threads : 1)
    {
        float *xf = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) rms_row(x + r * xs, w, y + r * D, D, eps, xf);
        free(xf);
    }
}

/* interleaved rotation of one bf16 vector of D = 2P by cos/sin [P] */
static void rope_vec(const uint16_t *x, const float *c, const float *s, uint16_t *y, int64_t P) {
    for (int64_t i = 0; i < P; i++) {
        float a = bf16_scalar(x[2 * i]), b = bf16_scalar(x[2 * i + 1]);
        y[2 * i] = to_bf16(a * c[i] - b * s[i]);
        y[2 * i + 1] = to_bf16(a * s[i] + b * c[i]);
    }
}

/* A position step's MLA prologue (ops.py mla_latent, the interface's composition of it): token (b, s) goes to
 * cache row rows[b] at position pos[b, s]: kv_cache[row, pos] = rms_norm(kv[b, s]) (weight w), pe_cache[row, pos]
 * = rope(k_pe[b, s]), and q_out [B, S, H, R] = rope(q_pe). kv and k_pe rows are views of one projection (token
 * stride kvs); q_pe has token stride qs and head stride qhs; caches [slots, T, C] / [slots, T, R] contiguous;
 * cos/sin [B, S, R/2]. One call instead of ~6 torch ops per layer. */
void dsv3_mla_latent(const uint16_t *q_pe, int64_t qs, int64_t qhs, const uint16_t *kv, const uint16_t *k_pe,
                     int64_t kvs, const uint16_t *w, float eps, const float *cos_, const float *sin_, uint16_t *kv_cache,
                     uint16_t *pe_cache, int64_t T, const int64_t *rows, const int64_t *pos, int64_t B, int64_t S,
                     int64_t H, int64_t C, int64_t R, uint16_t *q_out) {
    const int64_t P = R / 2;
    float *xf = malloc((size_t)C * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t s = 0; s < S; s++) {
            const int64_t t = b * S + s, row = rows[b], p = pos[t];
            const float *c = cos_ + t * P, *sn = sin_ + t * P;
            rms_row(kv + t * kvs, w, kv_cache + (row * T + p) * C, C, eps, xf);
            rope_vec(k_pe + t * kvs, c, sn, pe_cache + (row * T + p) * R, P);
            for (int64_t h = 0; h < H; h++) rope_vec(q_pe + t * qs + h * qhs, c, sn, q_out + (t * H + h) * R, P);
        }
    free(xf);
}

/* Interleaved rotary embedding of bf16 vectors x[t, h, 0:D] (token stride ts, head stride hs, unit dim
 * stride) by cos/sin [t, D/2] fp32; y is contiguous [t, h, D] bf16. Tokens in parallel from 64 (a prefill). */
void dsv3_rope_bf16(const uint16_t *x, const float *cos_, const float *sin_, uint16_t *y, int64_t tokens,
                    int64_t heads, int64_t D, int64_t ts, int64_t hs, int threads) {
    const int64_t P = D / 2;
#pragma omp parallel for num_threads(tokens >= 64 ? threads : 1) schedule(static)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) rope_vec(x + t * ts + h * hs, cos_ + t * P, sin_ + t * P, y + (t * heads + h) * D, P);
}
