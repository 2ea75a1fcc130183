/* Linears and SwiGLU experts of a few rows (decode, draft verification): each weight row read once for all rows. */
#include "common.h"
#include "dot.h"

const char *dsv3_isa(void) {
#if defined(DSV3_AMX)
    return "amx";
#elif defined(DSV3_BF16DOT)
    return "avx512bf16";
#elif defined(DSV3_AVX512)
    return "avx512";
#elif defined(DSV3_AVX2)
    return "avx2";
#else
    return "generic";
#endif
}

/* 1 where FP8 weights widen to bf16 by table (DSV3_FP8_TABLE) */
int dsv3_fp8_table(void) {
#if defined(DSV3_FP8_TABLE)
    return 1;
#else
    return 0;
#endif
}

/* y [M, N] bf16 = x [M, K] @ W [N, K]^T (+ residual [M, N] bf16, added before the one rounding); W bf16 (s NULL)
 * or FP8 (s its block scales). Each weight row is read from memory once for all M rows of x. */
void dsv3_linear(const uint16_t *x, int64_t M, int64_t K, const void *w, const float *s, float fmt, int64_t N,
                 const uint16_t *residual, uint16_t *y, int threads) {
    const Mat m = {w, s, K, fmt};
    float *xf = BF16_ROWS ? NULL : malloc((size_t)(M * K) * sizeof(float)); /* fp32 rows, where read */
    const float **rows = malloc((size_t)M * sizeof(float *));
    const uint16_t **brows = malloc((size_t)M * sizeof(uint16_t *));
    if (xf != NULL) widen(x, xf, M * K);
    for (int64_t i = 0; i < M; i++) {
        rows[i] = xf != NULL ? xf + i * K : NULL;
        brows[i] = x + i * K;
    }
#pragma omp parallel num_threads(threads)
    {
        float *v = malloc((size_t)M * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            dot_many(&m, n, rows, brows, M, v);
            for (int64_t i = 0; i < M; i++)
                y[i * N + n] = to_bf16(v[i] + (residual ? bf16_scalar(residual[i * N + n]) : 0.0f));
        }
        free(v);
    }
    free(brows);
    free(rows);
    free(xf);
}

/* Routed SwiGLU experts of T tokens, k each: y [T, D] bf16 = (residual +) sum_j alpha[t, j] * W2_e (silu(W1_e x[t]) *
 * W3_e x[t]) over the ids[t, j] held here (first <= id < first + count; e = id - first), fp32 throughout. w1/w3
 * [E, I, D] and w2 [E, D, I], bf16 or FP8 (s1/s3/s2 their block scales), stacked (a dense MLP is E = 1, every id 0).
 * Expert-major: the rows routed to one expert read its weights once, so a step of a few tokens (a draft
 * verification, a small batch) reads each expert it touches once, in one parallel region for all of them. */
void dsv3_moe(const uint16_t *x, int64_t T, int64_t k, const int64_t *ids, const float *alpha, int64_t first,
              int64_t count, const void *w1, const float *s1, const void *w3, const float *s3, const void *w2,
              const float *s2, float fmt, int64_t D, int64_t I, const uint16_t *residual, uint16_t *y, int threads) {
    float *scratch = malloc((size_t)(2 * T * D + T * k * I + 1) * sizeof(float));
    int64_t *slots = malloc((size_t)(3 * T * k + 1) * sizeof(int64_t));
    float *xf = scratch, *acc = scratch + T * D, *h = scratch + 2 * T * D;
    int64_t *order = slots, *uexp = slots + T * k, *ustart = slots + 2 * T * k; /* rows grouped by expert */
    int64_t nu = 0, p = 0;
    if (!BF16_ROWS) widen(x, xf, T * D);
    for (int64_t i = 0; i < T * D; i++) acc[i] = residual ? bf16_scalar(residual[i]) : 0.0f;
    for (int64_t r0 = 0; r0 < T * k; r0++) {
        int64_t e = ids[r0] - first, seen = 0;
        if (e < 0 || e >= count) continue; /* another rank's expert */
        for (int64_t r = 0; r < r0; r++) seen |= ids[r] == ids[r0];
        if (seen) continue;
        uexp[nu] = e;
        ustart[nu++] = p;
        for (int64_t r = r0; r < T * k; r++)
            if (ids[r] == ids[r0]) order[p++] = r;
    }
    ustart[nu] = p;
    const float **xrow = malloc((size_t)(2 * p + 1) * sizeof(float *)), **hrow = xrow + p;
    const uint16_t **xbrow = malloc((size_t)(2 * p + 1) * sizeof(uint16_t *)), **hbrow = xbrow + p;
    /* with bf16 rows the down projection dots h rounded to bf16 (the rounding a bf16 model makes there anyway) */
    uint16_t *hb = BF16_ROWS ? malloc((size_t)(p * I + 1) * sizeof(uint16_t)) : NULL;
    for (int64_t j = 0; j < p; j++) { /* the rows of each expert's run, in both kinds dot_many takes */
        xrow[j] = xf + (order[j] / k) * D;
        xbrow[j] = x + (order[j] / k) * D;
        hrow[j] = h + j * I;
        hbrow[j] = hb != NULL ? hb + j * I : NULL;
    }
#pragma omp parallel num_threads(threads)
    {
        float *g = malloc((size_t)(2 * T * k + 2) * sizeof(float)), *v = g + T * k + 1;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < nu * I; q++) { /* gate and up: every (expert, hidden unit) */
            const int64_t u = q / I, i = q % I, n = ustart[u + 1] - ustart[u];
            const Mat a = expert(w1, s1, uexp[u], I, D, fmt), c = expert(w3, s3, uexp[u], I, D, fmt);
            dot_many(&a, i, xrow + ustart[u], xbrow + ustart[u], n, g);
            dot_many(&c, i, xrow + ustart[u], xbrow + ustart[u], n, v);
            for (int64_t j = 0; j < n; j++) {
                const float hv = g[j] / (1.0f + expf(-g[j])) * v[j];
                if (hb != NULL) hb[(ustart[u] + j) * I + i] = to_bf16(hv);
                else h[(ustart[u] + j) * I + i] = hv;
            }
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) /* down, accumulated per output unit: no two threads share one */
            for (int64_t u = 0; u < nu; u++) {
                const int64_t n = ustart[u + 1] - ustart[u];
                const Mat b = expert(w2, s2, uexp[u], D, I, fmt);
                dot_many(&b, d, hrow + ustart[u], hbrow + ustart[u], n, g);
                for (int64_t j = 0; j < n; j++) acc[(order[ustart[u] + j] / k) * D + d] += alpha[order[ustart[u] + j]] * g[j];
            }
        free(g);
    }
    free(xrow);
    free(xbrow);
    free(hb);
    for (int64_t i = 0; i < T * D; i++) y[i] = to_bf16(acc[i]);
    free(scratch);
    free(slots);
}
