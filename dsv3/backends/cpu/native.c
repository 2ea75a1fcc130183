/* CPU kernels for decode (fewer than 16 rows): bf16 linear, the SwiGLU experts of a few tokens,
 * RMSNorm, interleaved rope, the group-limited gate and the absorbed MLA of one query, each in one
 * call with fp32 accumulation and one rounding to bf16. Built at first use by native.py (cc -O3
 * -march=native -fopenmp) and called through ctypes; ops.py holds the plain-torch twins the tests
 * compare against.
 *
 * Why: at batch 1 a decode step reads every active weight once, so its speed is bytes over read
 * bandwidth, plus the cost of each op call. On CPUs without bf16 instructions torch's bf16 GEMV
 * reaches ~60% of the bandwidth (measured on AVX2: 18 of 30 GB/s); these loops widen bf16 to fp32
 * with one shift and keep four FMA chains in flight. The fused calls replace ~1200 small torch ops
 * per decode step of the 280M benchmark model.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DSV3_AVX2 1
#endif

static float bf16_scalar(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t to_bf16(float f) { /* round to nearest even, as torch's fp32 -> bf16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0; /* NaN stays NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#ifdef DSV3_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

/* sum_k w[k] * x[k], w bf16, x fp32 */
static float dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    int64_t k = 0;
    float s = 0.0f;
#ifdef DSV3_AVX2
    /* four independent chains: one would stall on the FMA latency */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(bf16x8(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(bf16x8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(bf16x8(w + k), _mm256_loadu_ps(x + k), a0);
    s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; k < n; k++) s += bf16_scalar(w[k]) * x[k];
    return s;
}

static void widen(const uint16_t *x, float *xf, int64_t n) {
    for (int64_t k = 0; k < n; k++) xf[k] = bf16_scalar(x[k]);
}

/* y [M, N] bf16 = x [M, K] @ W [N, K]^T, all bf16, fp32 accumulation and one rounding (as torch's
 * F.linear). Each weight row is read from memory once for all M rows of x. xf: scratch of M * K floats. */
void dsv3_linear_bf16(const uint16_t *x, const uint16_t *W, uint16_t *y, int64_t M, int64_t N, int64_t K, float *xf,
                      int threads) {
    widen(x, xf, M * K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) y[m * N + n] = to_bf16(dot_bf16(W + n * K, xf + m * K, K));
}

/* Routed SwiGLU experts of T tokens, k each: y [T, D] bf16, y[t] = sum_j alpha[t, j] * W2_e (silu(W1_e x[t]) * W3_e x[t])
 * over the ids[t, j] held here (first <= id < first + count; e = id - first), fp32 throughout. w1/w3 [E, I, D] and
 * w2 [E, D, I] bf16, stacked (a dense MLP is E = 1, k = 1). scratch: D (x) + D (sum) + I (hidden) floats. */
void dsv3_moe_bf16(const uint16_t *x, int64_t T, int64_t k, const int64_t *ids, const float *alpha, int64_t first,
                   int64_t count, const uint16_t *w1, const uint16_t *w3, const uint16_t *w2, int64_t D, int64_t I,
                   float *scratch, uint16_t *y, int threads) {
    /* expert by expert: the rows (token, slot) routed to one expert read its weights once, so a step of a few
     * tokens (a draft verification, a small batch) reads each expert it touches once, not once per token.
     * scratch: xf [T*D] | acc [T*D] | h [T*k*I] | rows [T*k] int64, aligned, in the float buffer's tail */
    float *xf = scratch, *acc = scratch + T * D, *h = scratch + 2 * T * D;
    float *tail = h + T * k * I;
    int64_t *rows = (int64_t *)(tail + (((uintptr_t)tail & 7) ? 1 : 0)); /* 8-byte aligned */
    for (int64_t t = 0; t < T; t++) widen(x + t * D, xf + t * D, D);
    for (int64_t i = 0; i < T * D; i++) acc[i] = 0.0f;
    for (int64_t r0 = 0; r0 < T * k; r0++) {
        int64_t e = ids[r0] - first;
        if (e < 0 || e >= count) continue; /* another rank's expert */
        int64_t n = 0, seen = 0;
        for (int64_t r = 0; r < r0; r++) seen |= ids[r] == ids[r0];
        if (seen) continue; /* done with an earlier row of the same expert */
        for (int64_t r = r0; r < T * k; r++)
            if (ids[r] == ids[r0]) rows[n++] = r;
        const uint16_t *a = w1 + e * I * D, *c = w3 + e * I * D, *d = w2 + e * D * I;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < I; i++)
                for (int64_t m = 0; m < n; m++) {
                    const float *xr = xf + (rows[m] / k) * D;
                    float g = dot_bf16(a + i * D, xr, D), u = dot_bf16(c + i * D, xr, D);
                    h[m * I + i] = g / (1.0f + expf(-g)) * u;
                }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < D; i++)
                for (int64_t m = 0; m < n; m++)
                    acc[(rows[m] / k) * D + i] += alpha[rows[m]] * dot_bf16(d + i * I, h + m * I, I);
        }
    }
    for (int64_t i = 0; i < T * D; i++) y[i] = to_bf16(acc[i]);
}

/* RMSNorm of rows of D: y = x * rsqrt(mean(x^2) + eps) * w, fp32 inside, one rounding to bf16 */
void dsv3_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t rows, int64_t D, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * D;
        float ss = 0.0f;
        for (int64_t k = 0; k < D; k++) {
            float v = bf16_scalar(xr[k]);
            ss += v * v;
        }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t k = 0; k < D; k++) y[r * D + k] = to_bf16(bf16_scalar(xr[k]) * inv * bf16_scalar(w[k]));
    }
}

/* Interleaved rotary embedding of bf16 vectors x[t, h, 0:D] (token stride ts, head stride hs, unit dim
 * stride) by cos/sin [t, D/2] fp32; y is contiguous [t, h, D] bf16. */
void dsv3_rope_bf16(const uint16_t *x, const float *cos_, const float *sin_, uint16_t *y, int64_t tokens,
                    int64_t heads, int64_t D, int64_t ts, int64_t hs) {
    int64_t P = D / 2;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *xv = x + t * ts + h * hs;
            uint16_t *yv = y + (t * heads + h) * D;
            for (int64_t i = 0; i < P; i++) {
                float a = bf16_scalar(xv[2 * i]), b = bf16_scalar(xv[2 * i + 1]);
                float c = cos_[t * P + i], s = sin_[t * P + i];
                yv[2 * i] = to_bf16(a * c - b * s);
                yv[2 * i + 1] = to_bf16(a * s + b * c);
            }
        }
}

/* index of the largest of v[0..n) not yet taken; ties go to the lowest index */
static int64_t argmax_free(const float *v, const unsigned char *taken, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* The aux-loss-free, group-limited gate for rows of x [T, D] fp32 against weight [E, D] fp32 (see
 * ops.py moe_gate, its twin). sigmoid: 1 = sigmoid, 0 = softmax; group_score: 2 = top-2 sum, 1 = max,
 * 0 = none. Scratch: 3 * E floats + E + n_group bytes. */
void dsv3_moe_gate(const float *x, const float *weight, const float *bias, int64_t T, int64_t D, int64_t E,
                   int64_t top_k, int64_t n_group, int64_t topk_group, int sigmoid, int group_score, int norm,
                   float route_scale, float *scratch, unsigned char *flags, float *out_w, int64_t *out_ids) {
    float *scores = scratch, *choice = scratch + E, *gs = scratch + 2 * E;
    unsigned char *taken = flags, *gkeep = flags + E;
    int64_t per = E / n_group;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * D;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t e = 0; e < E; e++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < D; k++) acc += xt[k] * weight[e * D + k];
            scores[e] = acc;
            if (acc > mx) mx = acc;
        }
        for (int64_t e = 0; e < E; e++) {
            if (sigmoid) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
            else sum += (scores[e] = expf(scores[e] - mx));
        }
        for (int64_t e = 0; e < E; e++) {
            if (!sigmoid) scores[e] /= sum;
            choice[e] = scores[e] + (bias ? bias[e] : 0.0f);
            taken[e] = 0;
        }
        if (n_group > 1 && group_score) {
            for (int64_t g = 0; g < n_group; g++) {
                const float *c = choice + g * per;
                float a = -INFINITY, b = -INFINITY; /* the two largest */
                for (int64_t i = 0; i < per; i++) {
                    if (c[i] > a) { b = a; a = c[i]; }
                    else if (c[i] > b) b = c[i];
                }
                gs[g] = group_score == 2 ? a + b : a;
                gkeep[g] = 0;
            }
            for (int64_t j = 0; j < topk_group; j++) {
                int64_t g = argmax_free(gs, gkeep, n_group);
                gkeep[g] = 1;
            }
            for (int64_t e = 0; e < E; e++) taken[e] = !gkeep[e / per]; /* dropped groups never win */
        }
        float total = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            int64_t e = argmax_free(choice, taken, E);
            taken[e] = 1;
            out_ids[t * top_k + j] = e;
            total += (out_w[t * top_k + j] = scores[e]);
        }
        for (int64_t j = 0; j < top_k; j++) {
            float w = out_w[t * top_k + j];
            if (norm && top_k > 1) w /= total + 1e-20f;
            out_w[t * top_k + j] = w * route_scale;
        }
    }
}

/* The absorbed MLA of one query per sequence, projections included: for sequence b and head h,
 * q_lat = q_nope[b, h] @ w_uk[h] (w_uk [H, N, C] fp32), attention over the latent cache p =
 * softmax(scale * (q_lat . kv[b, t] + q_pe[b, h] . pe[b, t])) over t < T and o = sum_t p[t] kv[b, t], then y[b, h] = o @ w_uv[h] (w_uv [H, C, V] fp32), rounded to bf16 [B, H, V].
 * q_nope and q_pe are bf16 with sequence strides qs/ps and head strides hs/phs. Scratch: B * H * (2 * C + T) floats. */
void dsv3_mla_absorbed(const uint16_t *q_nope, int64_t qs, int64_t hs, const uint16_t *q_pe, int64_t ps, int64_t phs,
                       const float *w_uk,
                       const float *w_uv, const uint16_t *kv, const uint16_t *pe, uint16_t *y, int64_t B, int64_t H,
                       int64_t N, int64_t T, int64_t C, int64_t R, int64_t V, int64_t kvs, int64_t pes, float scale,
                       const int64_t *lens, float *scratch, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H;
        const uint16_t *qn = q_nope + b * qs + h * hs, *qp = q_pe + b * ps + h * phs;
        const uint16_t *k0 = kv + b * kvs, *p0 = pe + b * pes;
        const int64_t Tb = lens ? lens[b] : T; /* a row of a position step sees only its own prefix */
        float *ql = scratch + bh * (2 * C + T), *o = ql + C, *s = o + C, mx = -INFINITY, sum = 0.0f, qpf[256];
        for (int64_t c = 0; c < C; c++) ql[c] = o[c] = 0.0f;
        for (int64_t n = 0; n < N; n++) {
            float q = bf16_scalar(qn[n]);
            const float *w = w_uk + (h * N + n) * C;
            for (int64_t c = 0; c < C; c++) ql[c] += q * w[c];
        }
        for (int64_t r = 0; r < R && r < 256; r++) qpf[r] = bf16_scalar(qp[r]);
        for (int64_t t = 0; t < Tb; t++) {
            float a = dot_bf16(k0 + t * C, ql, C), c = 0.0f;
            if (R <= 256) c = dot_bf16(p0 + t * R, qpf, R);
            else
                for (int64_t r = 0; r < R; r++) c += bf16_scalar(qp[r]) * bf16_scalar(p0[t * R + r]);
            s[t] = (a + c) * scale;
            if (s[t] > mx) mx = s[t];
        }
        for (int64_t t = 0; t < Tb; t++) sum += (s[t] = expf(s[t] - mx));
        for (int64_t t = 0; t < Tb; t++) {
            float p = s[t] / sum;
            const uint16_t *kt = k0 + t * C;
            for (int64_t c = 0; c < C; c++) o[c] += p * bf16_scalar(kt[c]);
        }
        float out[512];
        for (int64_t j0 = 0; j0 < V; j0 += 512) { /* V is the value head dim (128 in V3); chunked for any */
            int64_t len = V - j0 < 512 ? V - j0 : 512;
            for (int64_t j = 0; j < len; j++) out[j] = 0.0f;
            for (int64_t c = 0; c < C; c++) {
                const float *w = w_uv + (h * C + c) * V + j0;
                for (int64_t j = 0; j < len; j++) out[j] += o[c] * w[j];
            }
            for (int64_t j = 0; j < len; j++) y[bh * V + j0 + j] = to_bf16(out[j]);
        }
    }
}

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
