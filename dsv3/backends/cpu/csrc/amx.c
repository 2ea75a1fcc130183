/* Prefill's grouped expert GEMMs on AMX tiles, and the weighted combination of expert rows. */
#include "common.h"
#include "dot.h"

/* out [T, D] bf16 = sum_j w[t, j] * ys[pos[t, j]] over a token's k expert rows (pos -1: another rank's expert), in
 * fp32, one rounding: the weighted sum of expert outputs computed row by row elsewhere (dsv3_grouped_amx) */
void dsv3_combine_rows(const uint16_t *ys, const int64_t *pos, const float *w, int64_t T, int64_t k, int64_t D,
                       uint16_t *out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float *acc = malloc((size_t)D * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
            for (int64_t j = 0; j < k; j++) {
                const int64_t p = pos[t * k + j];
                if (p < 0) continue;
                const float a = w[t * k + j];
                const uint16_t *y = ys + p * D;
                for (int64_t d = 0; d < D; d++) acc[d] += a * bf16_scalar(y[d]);
            }
            for (int64_t d = 0; d < D; d++) out[t * D + d] = to_bf16(acc[d]);
        }
        free(acc);
    }
}

/* ---- prefill: grouped expert GEMMs on AMX tiles ---------------------------------------------------------------
 * Rows sorted by local expert (expert e's rows are starts[e] .. starts[e+1]) times each expert's weights W [E, N, K]
 * (bf16 or FP8 with block scales), fp32 accumulation: a prompt's routed experts in two calls (gate and up with
 * their SwiGLU, then down). AMX tiles: A = 16 rows of activations as they lie (K contiguous), B = 16 weight rows
 * widened to bf16 and laid out in K pairs ("VNNI": row r of a B tile holds (W[n][2r], W[n][2r+1]) for n = 0..15),
 * made strip by strip as the work goes, never for the whole weight; each strip serves all of its expert's rows.
 * Returns 0, or -1 where this build or the OS gives no AMX or the shapes do not fit (the caller then runs torch). */
#if defined(DSV3_AMX)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_allowed(void) { /* Linux hands out AMX state only on request, once per process */
    static int allowed = -1;
    if (allowed < 0) allowed = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return allowed;
}

static void amx_config(void) { /* every tile 16 rows of 64 bytes: C 16x16 fp32, A 16x32 bf16, B 16 K-pairs x 16 */
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* r[i][j] <- r[j][i] for 16 vectors of 16 32-bit lanes (pairs, 128-bit quarters, then halves) */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* K slice k (32 columns) of weight rows n0 .. n0+15 of m as an A tile: wa[n][32] bf16 (the FP8 bytes widened,
 * times their block's scale, rounded to bf16 once: the reference's dequantized weight). Row-major like the weight
 * itself, so no transpose: the weights are the A operand and the activations, transposed once per call, the B
 * operand. */
static void amx_weight_slice(const Mat *m, int64_t n0, int64_t k, uint16_t *wa) {
    const int64_t K = m->K, kb = (K + QB - 1) / QB;
    const __m512 sc = _mm512_set1_ps(m->s[(n0 / QB) * kb + k / QB] * m->fmt); /* 16 rows: one 128-row block */
    for (int64_t n = 0; n < 16; n++) {
        __m512 lo, hi;
        fp8x32((const uint8_t *)m->w + (n0 + n) * K + k, &lo, &hi);
        _mm512_storeu_si512((void *)(wa + n * 32), (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, sc), _mm512_mul_ps(lo, sc)));
    }
}

/* 16 rows (row(i), i < n; zeros past n) of K bf16 as B tiles: xt[ks][r][i] = the pair (2r, 2r + 1) of K slice ks of
 * row i (a uint32) */
static void amx_act_rows(const uint16_t *a, const int64_t *idx, int64_t first, int64_t n, int64_t K, uint32_t *xt) {
    __m512i v[16];
    for (int64_t k = 0; k < K; k += 32) {
        for (int64_t i = 0; i < 16; i++)
            v[i] = i < n ? _mm512_loadu_si512((const void *)(a + (idx ? idx[first + i] : first + i) * K + k))
                         : _mm512_setzero_si512();
        transpose16(v);
        for (int r = 0; r < 16; r++) _mm512_storeu_si512((void *)(xt + (k / 32) * 256 + r * 16), v[r]);
    }
}

static inline __m256i bf16x16_of(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); } /* round to nearest even */

static inline __m512 round_bf16x16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16_of(v)), 16));
}

/* a C tile [16 weight rows][16 token rows] fp32, transposed: token row i's 16 values rounded to bf16 at o + i * ld */
static void amx_store_t(const float *c, uint16_t *o, int64_t ld, int64_t live) {
    __m512i v[16];
    for (int n = 0; n < 16; n++) v[n] = _mm512_loadu_si512((const void *)(c + n * 16));
    transpose16(v);
    for (int64_t i = 0; i < live; i++) _mm256_storeu_si256((__m256i *)(o + i * ld), bf16x16_of((__m512)v[i]));
}

/* G = 1: out [R, N] = a . W0^T per expert. G = 2: out [R, N] = silu(a . W0^T) * (a . W1^T), gate and up with the
 * roundings of separate bf16 linears and torch's bf16 silu and product (each result rounded to bf16). With idx
 * (int64 [R]), row r of a is row idx[r] of a [T, K]; without, row r of a [R, K]. The weights are the A operand (16
 * weight rows per tile, read as they are stored: bf16 in place, FP8 widened) and the activations the B operand,
 * transposed into pairs once per call and padded to 32 rows per expert; C tiles come out [weight row][token row] and
 * are transposed in the epilogue. (The other way round, every 16 x 32 weight slice needed a transpose: most of the
 * kernel's time at DeepSeek's 64-row experts.) Work: 16 rows of W0 and W1 (G = 2), or 32 rows of W0 (G = 1), of one
 * expert per item; tiles: C 0-3 (two weight strips x two 16-row chunks), A 4-5, B 6-7. */
int dsv3_grouped_amx(const uint16_t *a, const int64_t *idx, const int64_t *starts, int64_t E, int64_t G,
                     const void *w0, const float *s0, const void *w1, const float *s1, float fmt, int64_t K, int64_t N,
                     uint16_t *out, int threads) {
    if (!amx_allowed() || K % 32 || N % (G == 2 ? 16 : 32) || G < 1 || G > 2) return -1;
    const int64_t width = G == 2 ? 16 : 32, items = N / width, KS = K / 32;
    int64_t *chunk0 = malloc((size_t)(E + 1) * sizeof(int64_t)); /* expert e's first 16-row chunk; 2 per 32 rows */
    chunk0[0] = 0;
    for (int64_t e = 0; e < E; e++) chunk0[e + 1] = chunk0[e] + 2 * ((starts[e + 1] - starts[e] + 31) / 32);
    const int64_t chunks = chunk0[E];
    uint32_t *xt = malloc((size_t)((chunks ? chunks : 1) * KS * 256) * sizeof(uint32_t));
    /* items split into one contiguous run per thread, of about equal work (a strip's widening plus its 32-row
     * passes): each thread then streams its weights in order, and the next item's are known, so they are fetched
     * during this one's products (measured: gate/up -20%, down -35% against items handed out one at a time) */
    int64_t *work = malloc((size_t)(E * items + 1) * sizeof(int64_t));
    work[0] = 0;
    for (int64_t q = 0; q < E * items; q++) {
        const int64_t rows = starts[q / items + 1] - starts[q / items];
        work[q + 1] = work[q] + (rows ? 1 + (rows + 31) / 32 : 0);
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 4)
        for (int64_t c = 0; c < chunks; c++) { /* the activations as B tiles, once */
            int64_t e = 0;
            while (chunk0[e + 1] <= c) e++;
            const int64_t row = starts[e] + (c - chunk0[e]) * 16, left = starts[e + 1] - row;
            amx_act_rows(a, idx, row, left < 0 ? 0 : left < 16 ? left : 16, K, xt + c * KS * 256);
        }
        amx_config();
        uint16_t *wa = malloc((size_t)(2 * K * 16) * sizeof(uint16_t)); /* two FP8 weight strips, widened */
        float *c = malloc(4 * 256 * sizeof(float));
#pragma omp for schedule(static, 1)
        for (int64_t t = 0; t < threads; t++) { /* run t: the items whose work starts in [t, t + 1) / threads of it */
            int64_t q = 0, end = 0;
            while (q < E * items && work[q] * threads < work[E * items] * t) q++;
            end = q;
            while (end < E * items && work[end] * threads < work[E * items] * (t + 1)) end++;
            for (; q < end; q++) {
                const int64_t e = q / items, n0 = (q % items) * width, rows = starts[e + 1] - starts[e];
                if (rows == 0) continue;
                const Mat m0 = expert(w0, s0, e, N, K, fmt), m1 = G == 2 ? expert(w1, s1, e, N, K, fmt) : m0;
                const int64_t n1 = G == 2 ? n0 : n0 + 16; /* the second strip: W1's rows n0.., or W0's next 16 */
                const uint8_t *pf0 = NULL, *pf1 = NULL; /* the next item's FP8 strips, fetched towards L2 meanwhile */
                if (s0 != NULL && q + 1 < end) {
                    const int64_t e2 = (q + 1) / items, m2 = ((q + 1) % items) * width;
                    pf0 = (const uint8_t *)w0 + (e2 * N + m2) * K;
                    pf1 = G == 2 ? (const uint8_t *)w1 + (e2 * N + m2) * K : pf0 + 16 * K;
                }
                const int64_t lines = 16 * K / 64, per = (lines + KS - 1) / KS;
                const uint16_t *a0, *a1; /* A tiles of slice ks at a0 + ks * step, rows `stride` bytes apart */
                int64_t step, stride;
                if (m0.s == NULL) { /* bf16: the weight's own rows */
                    a0 = (const uint16_t *)m0.w + n0 * K;
                    a1 = (const uint16_t *)m1.w + n1 * K;
                    step = 32, stride = K * 2;
                } else { /* widened slice by slice during the first 32 rows' products (the loads overlap the tiles' work) */
                    a0 = wa, a1 = wa + K * 16, step = 512, stride = 64;
                }
                for (int64_t t0 = 0; t0 < rows; t0 += 32) { /* C 0/1: strip 0 x chunks 0/1, C 2/3: strip 1 x chunks 0/1 */
                    const uint32_t *b = xt + (chunk0[e] + t0 / 16) * KS * 256;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t ks = 0; ks < KS; ks++) {
                        if (pf0 != NULL && t0 == 0)
                            for (int64_t l = ks * per; l < (ks + 1) * per && l < lines; l++) {
                                _mm_prefetch((const char *)pf0 + l * 64, _MM_HINT_T1);
                                _mm_prefetch((const char *)pf1 + l * 64, _MM_HINT_T1);
                            }
                        if (m0.s != NULL && t0 == 0) {
                            amx_weight_slice(&m0, n0, ks * 32, wa + ks * 512);
                            amx_weight_slice(&m1, n1, ks * 32, wa + K * 16 + ks * 512);
                        }
                        _tile_loadd(4, a0 + ks * step, stride);
                        _tile_loadd(5, a1 + ks * step, stride);
                        _tile_loadd(6, b + ks * 256, 64);
                        _tile_loadd(7, b + (KS + ks) * 256, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, c, 64);
                    _tile_stored(1, c + 256, 64);
                    _tile_stored(2, c + 512, 64);
                    _tile_stored(3, c + 768, 64);
                    for (int j = 0; j < 2 && t0 + 16 * j < rows; j++) { /* chunk j: C [weight row n][token row i] */
                        float *c0 = c + j * 256, *c1 = c + 512 + j * 256;
                        const int64_t live = rows - t0 - 16 * j < 16 ? rows - t0 - 16 * j : 16;
                        uint16_t *o = out + (starts[e] + t0 + 16 * j) * N;
                        if (G == 1) {
                            amx_store_t(c0, o + n0, N, live);
                            amx_store_t(c1, o + n1, N, live);
                        } else {
                            for (int n = 0; n < 16; n++) { /* elementwise, so in the transposed layout */
                                const __m512 g = round_bf16x16(_mm512_loadu_ps(c0 + n * 16));
                                const __m512 u = round_bf16x16(_mm512_loadu_ps(c1 + n * 16));
                                const __m512 e = v_exp(_mm512_sub_ps(_mm512_setzero_ps(), g));
                                const __m512 act = round_bf16x16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
                                _mm512_storeu_ps(c0 + n * 16, _mm512_mul_ps(act, u));
                            }
                            amx_store_t(c0, o + n0, N, live);
                        }
                    }
                }
            }
        }
        free(wa);
        free(c);
        _tile_release();
    }
    free(work);
    free(xt);
    free(chunk0);
    return 0;
}

/* ---- decode: linears of a few rows on AMX tiles ------------------------------------------------------------------
 * dsv3_linear's arithmetic (dot.h: FP8 bytes widened exactly to bf16, unscaled; exact products; fp32 sums per
 * 128-wide block, times the block's scale; one rounding) with the products on tiles. Why: on an AMX Xeon the
 * AVX512-BF16 pair dot product issues about one per 3 cycles, so dot_rows_bf16 costs ~1.4x per weight at 2 rows
 * and ~2x at 4 what it costs at 1, where a tile product costs the same for 1-16 rows: what is left is the widening,
 * done once per weight either way. Measured on a 2-core AMX Xeon, one thread, FP8, a strip loop alone, G weights/s,
 * dot / tiles: 128 x 1024 (in L2) 1 row 15.9 / 16.5, 2 rows 9.2 / 18.2, 4 rows 7.6 / 19.0, 8 rows 3.6 / 18.4;
 * 2048 x 7168 (in L3) 17.7 / 15.4 at 1 row, 12.9 / 15.5 at 2, 7.9 / 15.4 at 4. Inside a decode step tiles gain less
 * (ops.py, AMX_DECODE_ROWS: from 5 rows).
 * Tiles: the weights are the A operand (16 weight rows x 32 K: a strip's K block widened into scratch, two blocks
 * alternating so a block's tile loads never wait on the stores just made; bf16 weights of a whole strip are read in
 * place), the activations the B operand ([K / 32][16 pairs][M], made once per call), C [16 weight rows][M] per K
 * block (two alternating), scaled into fp32 registers. Each C element sums its block in the hardware's own order,
 * which no other row changes: a row's result does not depend on how many share the call. -1 (nothing written)
 * where this build or the OS gives no AMX, K is not a multiple of 32, or M is outside 1..16. */
static void amx_config_rows(int64_t M) { /* C 0-1 [16][M] fp32, A 4-5 [16][32] bf16, B 6-7 [16 pairs][M] */
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (t < 2 || t >= 4) ? 16 : 0;
        c.colsb[t] = t < 2 || t >= 6 ? (uint16_t)(4 * M) : t >= 4 ? 64 : 0;
    }
    _tile_loadconfig(&c);
}

/* block [k0, k0 + len) of weight rows n0 .. n0 + 15 (clamped to the last row: a partial strip's extra rows are
 * computed and dropped) as len / 32 A tiles at wa [slice][16][32] */
static void amx_widen_block(const Mat *m, int64_t N, int64_t n0, int64_t k0, int64_t len, uint16_t *wa) {
    const int FP8 = m->s != NULL;
    if (FP8 && len == QB && n0 + 16 <= N) { /* a whole block of a whole strip: no masks, no clamps */
        const uint8_t *w8 = (const uint8_t *)m->w + n0 * m->K + k0;
        for (int64_t n = 0; n < 16; n++, w8 += m->K) {
            PREFETCH(w8 + 4 * QB);
            PREFETCH(w8 + 4 * QB + 64);
            __m512bh a, b, c, d;
            weights_bf16x64(w8, NULL, 0, ~0ULL, &a, &b, 1, 1);
            weights_bf16x64(w8, NULL, 64, ~0ULL, &c, &d, 1, 1);
            _mm512_storeu_si512((void *)(wa + n * 32), (__m512i)a);
            _mm512_storeu_si512((void *)(wa + 512 + n * 32), (__m512i)b);
            _mm512_storeu_si512((void *)(wa + 1024 + n * 32), (__m512i)c);
            _mm512_storeu_si512((void *)(wa + 1536 + n * 32), (__m512i)d);
        }
        return;
    }
    for (int64_t n = 0; n < 16; n++) {
        const int64_t row = n0 + n < N ? n0 + n : N - 1;
        const uint8_t *w8 = FP8 ? (const uint8_t *)m->w + row * m->K : NULL;
        const uint16_t *w16 = FP8 ? NULL : (const uint16_t *)m->w + row * m->K;
        if (FP8) PREFETCH(w8 + k0 + 4 * QB), PREFETCH(w8 + k0 + 4 * QB + 64);
        for (int64_t k = 0; k < len; k += 64) {
            const __mmask64 live = len - k >= 64 ? ~0ULL : (1ULL << (len - k)) - 1;
            __m512bh a, b;
            if (FP8) weights_bf16x64(w8, NULL, k0 + k, live, &a, &b, 1, 1);
            else weights_bf16x64(NULL, w16, k0 + k, live, &a, &b, 0, 1);
            _mm512_storeu_si512((void *)(wa + (k / 32) * 512 + n * 32), (__m512i)a);
            if (len - k > 32) _mm512_storeu_si512((void *)(wa + (k / 32 + 1) * 512 + n * 32), (__m512i)b);
        }
    }
}

/* C tile C (0 or 1) += a block's A tiles (at a, `step` apart, rows `stride` bytes apart) times its B tiles; the
 * slices alternate between A 4 / B 6 and A 5 / B 7 (tile numbers are constants in the instructions) */
#define AMX_BLOCK(C, a, step, stride, bt, M, slices)                                                                \
    do {                                                                                                            \
        _tile_zero(C);                                                                                              \
        for (int64_t sl = 0; sl < (slices); sl++) {                                                                 \
            if (sl & 1) {                                                                                           \
                _tile_loadd(5, (a) + sl * (step), (stride));                                                        \
                _tile_loadd(7, (bt) + sl * 16 * (M), 4 * (M));                                                      \
                _tile_dpbf16ps(C, 5, 7);                                                                            \
            } else {                                                                                                \
                _tile_loadd(4, (a) + sl * (step), (stride));                                                        \
                _tile_loadd(6, (bt) + sl * 16 * (M), 4 * (M));                                                      \
                _tile_dpbf16ps(C, 4, 6);                                                                            \
            }                                                                                                       \
        }                                                                                                           \
    } while (0)

/* rows [M, K] bf16 as B tiles: [K / 32][16 pairs][M], pair (2r, 2r + 1) of K slice ks of row i at [ks][r][i] */
static uint32_t *amx_pairs(const uint16_t *x, int64_t M, int64_t K) {
    uint32_t *xt = malloc((size_t)(K / 2 * M + 1) * sizeof(uint32_t));
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k += 2)
            xt[(k / 32) * 16 * M + (k % 32 / 2) * M + i] = (uint32_t)x[i * K + k] | (uint32_t)x[i * K + k + 1] << 16;
    return xt;
}

/* weight rows n0 .. n0 + 15 of m (N rows) times the M rows of xt: acc [16][16] fp32, acc[n * 16 + i] = row n0 + n .
 * row i, FP8 block scales and fmt applied (rows past N: garbage, never read). wa: 2 x 4 A tiles of scratch, c: 2 C
 * tiles'. Tiles configured by amx_config_rows(M). */
static void amx_strip(const Mat *m, int64_t N, int64_t n0, const uint32_t *xt, int64_t M, uint16_t *wa, float *c,
                      float *acc) {
    const int64_t K = m->K, KB = (K + QB - 1) / QB;
    const float *srow = m->s != NULL ? m->s + (n0 / QB) * KB : NULL;
    const int in_place = m->s == NULL && n0 + 16 <= N; /* bf16 rows of a whole strip: tiles read them as they lie */
    const __mmask16 live = (__mmask16)((1u << M) - 1);
    __m512 sum[16];
    for (int n = 0; n < 16; n++) sum[n] = _mm512_setzero_ps();
    if (!in_place) amx_widen_block(m, N, n0, 0, K < QB ? K : QB, wa);
    for (int64_t b = 0; b <= KB; b++) {
        const int64_t k0 = b * QB, len = K - k0 < QB ? K - k0 : QB;
        if (!in_place && b + 1 < KB) /* the next block while this one's tiles work */
            amx_widen_block(m, N, n0, k0 + QB, K - k0 - QB < QB ? K - k0 - QB : QB, wa + ((b + 1) & 1) * 2048);
        if (b > 0) { /* the previous block's C, stored a block ago */
            const __m512 sc = _mm512_set1_ps(srow != NULL ? srow[b - 1] : 1.0f);
            const float *cc = c + ((b - 1) & 1) * 256;
            for (int n = 0; n < 16; n++) sum[n] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, cc + n * 16), sc, sum[n]);
        }
        if (b == KB) break;
        const uint16_t *a = in_place ? (const uint16_t *)m->w + n0 * K + k0 : wa + (b & 1) * 2048;
        const int64_t step = in_place ? 32 : 512, stride = in_place ? 2 * K : 64;
        const uint32_t *bt = xt + (k0 / 32) * 16 * M;
        if (b & 1) {
            AMX_BLOCK(1, a, step, stride, bt, M, len / 32);
            _tile_stored(1, c + 256, 64);
        } else {
            AMX_BLOCK(0, a, step, stride, bt, M, len / 32);
            _tile_stored(0, c, 64);
        }
    }
    const __m512 unit = _mm512_set1_ps(m->s != NULL ? m->fmt : 1.0f);
    for (int n = 0; n < 16; n++) _mm512_storeu_ps(acc + n * 16, _mm512_mul_ps(sum[n], unit));
}

int dsv3_linear_amx(const uint16_t *x, int64_t M, int64_t K, const void *w, const float *s, float fmt, int64_t N,
                    const uint16_t *residual, uint16_t *y, int threads) {
    if (!amx_allowed() || K % 32 || M < 1 || M > 16) return -1;
    const Mat m = {w, s, K, fmt};
    uint32_t *xt = amx_pairs(x, M, K);
#pragma omp parallel num_threads(threads)
    {
        amx_config_rows(M);
        uint16_t *wa = malloc(2 * 4 * 512 * sizeof(uint16_t));
        float *c = malloc(2 * 16 * 16 * sizeof(float)), acc[16 * 16];
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 16) {
            amx_strip(&m, N, n0, xt, M, wa, c, acc);
            for (int64_t i = 0; i < M; i++)
                for (int64_t n = 0; n < 16 && n0 + n < N; n++)
                    y[i * N + n0 + n] =
                        to_bf16(acc[n * 16 + i] + (residual ? bf16_scalar(residual[i * N + n0 + n]) : 0.0f));
        }
        free(wa);
        free(c);
        _tile_release();
    }
    free(xt);
    return 0;
}

/* A dense SwiGLU MLP of a few rows on AMX tiles with dsv3_moe's arithmetic for one expert: y [M, D] bf16 = (residual
 * +) W2 (silu(W1 x) * W3 x), gate and up in fp32, their product rounded to bf16, the down projection's fp32 sum plus
 * the residual rounded once. w1/w3 [I, D], w2 [D, I]. -1 (nothing written) as dsv3_linear_amx, or D or I not a
 * multiple of 32. */
int dsv3_mlp_amx(const uint16_t *x, int64_t M, const void *w1, const float *s1, const void *w3, const float *s3,
                 const void *w2, const float *s2, float fmt, int64_t D, int64_t I, const uint16_t *residual,
                 uint16_t *y, int threads) {
    if (!amx_allowed() || D % 32 || I % 32 || M < 1 || M > 16) return -1;
    const Mat m1 = {w1, s1, D, fmt}, m3 = {w3, s3, D, fmt}, m2 = {w2, s2, I, fmt};
    uint32_t *xt = amx_pairs(x, M, D), *ht = NULL;
    uint16_t *h = malloc((size_t)(M * I) * sizeof(uint16_t));
#pragma omp parallel num_threads(threads)
    {
        amx_config_rows(M);
        uint16_t *wa = malloc(2 * 4 * 512 * sizeof(uint16_t));
        float *c = malloc(2 * 16 * 16 * sizeof(float)), g[16 * 16], u[16 * 16];
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < I; n0 += 16) { /* gate and up of 16 hidden units, then their SwiGLU */
            amx_strip(&m1, I, n0, xt, M, wa, c, g);
            amx_strip(&m3, I, n0, xt, M, wa, c, u);
            for (int64_t i = 0; i < M; i++)
                for (int64_t n = 0; n < 16 && n0 + n < I; n++) {
                    const float gv = g[n * 16 + i];
                    h[i * I + n0 + n] = to_bf16(gv / (1.0f + expf(-gv)) * u[n * 16 + i]);
                }
        }
#pragma omp single
        ht = amx_pairs(h, M, I);
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < D; n0 += 16) {
            amx_strip(&m2, D, n0, ht, M, wa, c, g);
            for (int64_t i = 0; i < M; i++)
                for (int64_t n = 0; n < 16 && n0 + n < D; n++)
                    y[i * D + n0 + n] =
                        to_bf16(g[n * 16 + i] + (residual ? bf16_scalar(residual[i * D + n0 + n]) : 0.0f));
        }
        free(wa);
        free(c);
        _tile_release();
    }
    free(xt);
    free(ht);
    free(h);
    return 0;
}
#else
int dsv3_grouped_amx(const uint16_t *a, const int64_t *idx, const int64_t *starts, int64_t E, int64_t G,
                     const void *w0, const float *s0, const void *w1, const float *s1, float fmt, int64_t K, int64_t N,
                     uint16_t *out, int threads) {
    (void)a, (void)idx, (void)starts, (void)E, (void)G, (void)w0, (void)s0, (void)w1, (void)s1, (void)fmt, (void)K;
    (void)N, (void)out, (void)threads;
    return -1;
}
int dsv3_linear_amx(const uint16_t *x, int64_t M, int64_t K, const void *w, const float *s, float fmt, int64_t N,
                    const uint16_t *residual, uint16_t *y, int threads) {
    (void)x, (void)M, (void)K, (void)w, (void)s, (void)fmt, (void)N, (void)residual, (void)y, (void)threads;
    return -1;
}
int dsv3_mlp_amx(const uint16_t *x, int64_t M, const void *w1, const float *s1, const void *w3, const float *s3,
                 const void *w2, const float *s2, float fmt, int64_t D, int64_t I, const uint16_t *residual,
                 uint16_t *y, int threads) {
    (void)x, (void)M, (void)w1, (void)s1, (void)w3, (void)s3, (void)w2, (void)s2, (void)fmt, (void)D, (void)I;
    (void)residual, (void)y, (void)threads;
    return -1;
}
#endif

/* Routed experts on AMX tiles in one call: the routes held here (first <= id < first + E) sorted by expert, token order
 * kept within each (a counting sort), gate and up with SwiGLU as one grouped GEMM, down as a second, then the weighted
 * combine: the roundings of the reference (each expert's output in bf16, their weighted sum in fp32). No count comes
 * back to the host between the steps, so a recorded decode step can hold it. y [T, D] bf16; -1 (nothing written)
 * where dsv3_grouped_amx cannot run. */
int dsv3_moe_amx(const uint16_t *x, int64_t T, int64_t k, const int64_t *ids, const float *alpha, int64_t first,
                 int64_t E, const void *w1, const float *s1, const void *w3, const float *s3, const void *w2,
                 const float *s2, float fmt, int64_t D, int64_t I, uint16_t *y, int threads) {
    const int64_t n = T * k;
    int64_t *starts = calloc((size_t)(E + 2), sizeof(int64_t)), *next = malloc((size_t)(E + 1) * sizeof(int64_t));
    int64_t *tok = malloc((size_t)(n + 1) * sizeof(int64_t)), *pos = malloc((size_t)(n + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < n; r++) {
        const int64_t e = ids[r] - first;
        if (e >= 0 && e < E) starts[e + 1]++;
    }
    for (int64_t e = 0; e < E; e++) starts[e + 1] += starts[e];
    memcpy(next, starts, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t r = 0; r < n; r++) { /* route r's place among its expert's rows, or -1: another rank's expert */
        const int64_t e = ids[r] - first;
        pos[r] = e >= 0 && e < E ? next[e]++ : -1;
        if (pos[r] >= 0) tok[pos[r]] = r / k;
    }
    const int64_t R = starts[E];
    uint16_t *h = malloc((size_t)(R * I + 1) * sizeof(uint16_t)), *ys = malloc((size_t)(R * D + 1) * sizeof(uint16_t));
    int rc = dsv3_grouped_amx(x, tok, starts, E, 2, w1, s1, w3, s3, fmt, D, I, h, threads);
    if (rc == 0) rc = dsv3_grouped_amx(h, NULL, starts, E, 1, w2, s2, NULL, NULL, fmt, I, D, ys, threads);
    if (rc == 0) dsv3_combine_rows(ys, pos, alpha, T, k, D, y, threads);
    free(h);
    free(ys);
    free(tok);
    free(pos);
    free(next);
    free(starts);
    return rc;
}
