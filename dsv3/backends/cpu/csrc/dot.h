/* Dot products of weight rows against activation rows: the core of every linear and expert (dot_many), on fp32
 * FMAs or AVX512-BF16 pair dot products, with FP8 weights widened in registers. */
#ifndef DSV3_DOT_H
#define DSV3_DOT_H
#include "common.h"

/* A weight matrix [rows, K]: bf16 (s == NULL) or FP8 bytes with block scales s [ceil(rows/128), ceil(K/128)] */
typedef struct {
    const void *w;
    const float *s;
    int64_t K;
    float fmt;
} Mat;

/* expert e of a stack [E, rows, K] (+ scales [E, ceil(rows/128), ceil(K/128)]) */
SHARED static Mat expert(const void *w, const float *s, int64_t e, int64_t rows, int64_t K, float fmt) {
    Mat m = {NULL, NULL, K, fmt};
    if (s == NULL) {
        m.w = (const uint16_t *)w + e * rows * K;
    } else {
        m.w = (const uint8_t *)w + e * rows * K;
        m.s = s + e * ((rows + QB - 1) / QB) * ((K + QB - 1) / QB);
    }
    return m;
}

/* Row r of m against MR (1..4) rows of fp32 activations at once: out[i] = row . xs[i]. Each weight vector is
 * loaded and widened once and multiplied into every row's accumulator, so a step of a few tokens (a draft
 * verification, a small batch) reads and converts each weight once; the FP8 block scale multiplies each 128-wide
 * partial sum. FP8 and MR are constants where this is inlined (see dot_rows). */
static inline __attribute__((always_inline)) void dot_rows_k(const Mat *m, int64_t r, const float *const *xs,
                                                             const int FP8, const int MR, float *out) {
    const int64_t K = m->K, kb = (K + QB - 1) / QB;
    const uint8_t *w8 = (const uint8_t *)m->w + r * K;
    const uint16_t *w16 = (const uint16_t *)m->w + r * K;
    const float *s = FP8 ? m->s + (r / QB) * kb : NULL;
    float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(DSV3_AVX512)
    __m512 tot[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#elif defined(DSV3_AVX2)
    __m256 tot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#endif
    for (int64_t k0 = 0; k0 < K; k0 += QB) {
        const int64_t len = K - k0 < QB ? K - k0 : QB;
        const float sc = FP8 ? s[k0 / QB] : 1.0f;
        int64_t k = 0;
        if (FP8) {
            PREFETCH(w8 + k0 + PF_AHEAD);
            PREFETCH(w8 + k0 + PF_AHEAD + 64);
        } else {
            for (int l = 0; l < 4; l++) PREFETCH(w16 + k0 + PF_AHEAD + 32 * l);
        }
#if defined(DSV3_AVX512)
        /* two accumulators per row: with one, a row's FMAs wait on each other's latency */
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        __m512 b[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; k + 32 <= len; k += 32) {
            __m512 w0, w1;
            if (FP8) {
                fp8x32(w8 + k0 + k, &w0, &w1);
            } else {
                w0 = bf16x16(w16 + k0 + k);
                w1 = bf16x16(w16 + k0 + k + 16);
            }
            for (int i = 0; i < MR; i++) {
                a[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[i] + k0 + k), a[i]);
                b[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xs[i] + k0 + k + 16), b[i]);
            }
        }
        for (; k + 16 <= len; k += 16) {
            const __m512 wv = FP8 ? fp8x16(w8 + k0 + k) : bf16x16(w16 + k0 + k);
            for (int i = 0; i < MR; i++) a[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[i] + k0 + k), a[i]);
        }
        for (int i = 0; i < MR; i++) tot[i] = _mm512_fmadd_ps(_mm512_add_ps(a[i], b[i]), _mm512_set1_ps(sc), tot[i]);
#elif defined(DSV3_AVX2)
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        __m256 b[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; k + 16 <= len; k += 16) {
            __m256 lo, hi;
            if (FP8) {
                const __m256i h = fp8_halves(w8 + k0 + k);
                lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
            } else {
                lo = bf16x8(w16 + k0 + k);
                hi = bf16x8(w16 + k0 + k + 8);
            }
            for (int i = 0; i < MR; i++) { /* two accumulators per row, as above */
                a[i] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs[i] + k0 + k), a[i]);
                b[i] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs[i] + k0 + k + 8), b[i]);
            }
        }
        for (int i = 0; i < MR; i++) tot[i] = _mm256_fmadd_ps(_mm256_add_ps(a[i], b[i]), _mm256_set1_ps(sc), tot[i]);
#endif
        for (; k < len; k++) {
            const float wv = (FP8 ? fp8_half(w8[k0 + k]) : bf16_scalar(w16[k0 + k])) * sc;
            for (int i = 0; i < MR; i++) tail[i] += wv * xs[i][k0 + k];
        }
    }
    for (int i = 0; i < MR; i++) {
#if defined(DSV3_AVX512)
        tail[i] += _mm512_reduce_add_ps(tot[i]);
#elif defined(DSV3_AVX2)
        tail[i] += hsum(tot[i]);
#endif
        out[i] = FP8 ? tail[i] * m->fmt : tail[i];
    }
}

/* dot_rows_k with its constants resolved: one specialized loop per (weight kind, number of rows) */
static __attribute__((unused)) void dot_rows(const Mat *m, int64_t r, const float *const *xs, int mr, float *out) {
    if (m->s != NULL) {
        if (mr == 1) dot_rows_k(m, r, xs, 1, 1, out);
        else if (mr == 2) dot_rows_k(m, r, xs, 1, 2, out);
        else if (mr == 3) dot_rows_k(m, r, xs, 1, 3, out);
        else dot_rows_k(m, r, xs, 1, 4, out);
    } else {
        if (mr == 1) dot_rows_k(m, r, xs, 0, 1, out);
        else if (mr == 2) dot_rows_k(m, r, xs, 0, 2, out);
        else if (mr == 3) dot_rows_k(m, r, xs, 0, 3, out);
        else dot_rows_k(m, r, xs, 0, 4, out);
    }
}

#if defined(DSV3_BF16DOT)
/* Row r of m against MR (1..8) bf16 rows xb[i] at once, on AVX512-BF16 pair dot products: 32 products of a row an
 * instruction where the fp32 path above does 16 with twice the loads, and each weight vector widened once for 8
 * rows, not 4. Several rows make a GEMV compute-bound (a weight vector in registers serves them all), so this is
 * where the instruction pays (1.2-2x a dense MLP of 2-8 rows, up to 5x a linear of 16); one row is bound by its
 * bytes either way, and takes this path too so that each row's sums do not depend on its company.
 * Exact as far as the fp32 path: an FP8 weight (widened through fp16 as above: |v| in [2^-17, 1.75]) and a bf16
 * weight are bf16 values, a product of two bf16 is exact in fp32, and the sums are fp32. The instruction treats
 * bf16 subnormals (|v| < 2^-126) as zero: none among FP8 weights, and negligible in activations. K tails go
 * through masked loads (zeros contribute nothing), so there is no scalar loop. */
static inline __mmask32 lanes32(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : n <= 0 ? 0u : (1u << n) - 1u; }

/* 32 FP8 bytes as bf16 pairs (through fp16 and fp32, exactly: see the top of this file) */
static inline __m512bh fp8_bf16x32(__m256i bytes) {
    __m512i h = _mm512_cvtepi8_epi16(bytes);
    h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16((short)0xBFFF));
    return _mm512_cvtne2ps_pbh(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)),
                               _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
}

/* 32 weights of a row (FP8 bytes or bf16) from k on as bf16 pairs; the lanes past `live` zero */
static inline __m512bh weights_bf16(const uint8_t *w8, const uint16_t *w16, int64_t k, __mmask32 live,
                                    const int FP8) {
    if (live == 0xFFFFFFFFu)
        return FP8 ? fp8_bf16x32(_mm256_loadu_si256((const __m256i *)(w8 + k))) : (__m512bh)_mm512_loadu_si512(w16 + k);
    return FP8 ? fp8_bf16x32(_mm256_maskz_loadu_epi8(live, w8 + k)) : (__m512bh)_mm512_maskz_loadu_epi16(live, w16 + k);
}

#if defined(DSV3_FP8_TABLE)
/* With AVX512-VBMI, 64 FP8 bytes become 64 bf16 by table lookup: a byte's low 7 bits index a 128-entry table of
 * the bf16 bits (split into low and high bytes: one byte shuffle each) and its sign goes to the high byte as is.
 * 6 instructions per 64 weights where the conversion above takes ~14, which is most of the work when a weight
 * vector serves few rows. Measured on an AMD EPYC (Zen 5), 2 threads, FP8 linears 2048-18432 x 2048-7168 read
 * from memory: 1.13-1.22x at 1 row, 1.07-1.18x at 2, 1.0-1.25x at 4. From 5 rows the dot products are the work
 * and the four table registers crowd the accumulators (8 rows at K = 7168: 0.8-0.9x; at K <= 2048 it gains
 * 5-20% in a linear alone, nothing measurable in a decode step), so there the conversion above stays.
 * The tables are the exact values above (fp8_half), so the two paths agree bit for bit. */
#define LUT_ROWS 4
static uint8_t FP8_BF16_LO[128], FP8_BF16_HI[128];

__attribute__((constructor)) static void fp8_bf16_tables(void) {
    for (int b = 0; b < 128; b++) {
        const uint16_t h = to_bf16(fp8_half((uint8_t)b));
        FP8_BF16_LO[b] = (uint8_t)(h & 0xFF);
        FP8_BF16_HI[b] = (uint8_t)(h >> 8);
    }
}

/* 64 FP8 bytes -> w0 (weights 0..31) and w1 (32..63) as bf16 pairs. The byte shuffles and the interleave of low
 * and high bytes work within 128-bit lanes, so the 8-byte groups are first placed where the interleave brings them
 * back into memory order: lane j of w0 takes bytes 8j.. and lane j of w1 bytes 32 + 8j.. */
static inline void fp8_bf16x64(__m512i bytes, __m512bh *w0, __m512bh *w1) {
    const __m512i z = _mm512_permutexvar_epi64(_mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0), bytes);
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(FP8_BF16_LO), z,
                                                _mm512_loadu_si512(FP8_BF16_LO + 64));
    __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(FP8_BF16_HI), z, _mm512_loadu_si512(FP8_BF16_HI + 64));
    hi = _mm512_ternarylogic_epi32(hi, z, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (z & 0x80): the sign */
    *w0 = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
    *w1 = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}
#endif

/* 64 weights of a row (FP8 bytes or bf16) from k on as two vectors of bf16 pairs; the lanes past `live` zero */
static inline void weights_bf16x64(const uint8_t *w8, const uint16_t *w16, int64_t k, __mmask64 live, __m512bh *w0,
                                   __m512bh *w1, const int FP8, const int MR) {
    const __mmask32 lo = (__mmask32)live, hi = (__mmask32)(live >> 32);
    (void)MR;
#if defined(DSV3_FP8_TABLE)
    if (FP8 && MR <= LUT_ROWS) {
        fp8_bf16x64(live == ~0ULL ? _mm512_loadu_si512(w8 + k) : _mm512_maskz_loadu_epi8(live, w8 + k), w0, w1);
        return;
    }
#endif
    *w0 = weights_bf16(w8, w16, k, lo, FP8);
    *w1 = weights_bf16(w8, w16, k + 32, hi, FP8);
}

static inline __attribute__((always_inline)) void dot_rows_bf16_k(const Mat *m, int64_t r,
                                                                  const uint16_t *const *xb, const int FP8,
                                                                  const int MR, float *out) {
    const int64_t K = m->K, kb = (K + QB - 1) / QB;
    const uint8_t *w8 = (const uint8_t *)m->w + r * K;
    const uint16_t *w16 = (const uint16_t *)m->w + r * K;
    const float *s = FP8 ? m->s + (r / QB) * kb : NULL;
    __m512 tot[8], a[8], b[8]; /* two accumulators per row: with one, a row's products wait on each other */
    for (int i = 0; i < MR; i++) tot[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += QB) {
        const int64_t len = K - k0 < QB ? K - k0 : QB;
        if (FP8) {
            PREFETCH(w8 + k0 + PF_AHEAD);
            PREFETCH(w8 + k0 + PF_AHEAD + 64);
        } else {
            for (int l = 0; l < 4; l++) PREFETCH(w16 + k0 + PF_AHEAD + 32 * l);
        }
        for (int i = 0; i < MR; i++) a[i] = b[i] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= len; k += 64) { /* whole steps: plain loads */
            __m512bh w0, w1;
            weights_bf16x64(w8, w16, k0 + k, ~0ULL, &w0, &w1, FP8, MR);
            for (int i = 0; i < MR; i++) {
                a[i] = _mm512_dpbf16_ps(a[i], w0, (__m512bh)_mm512_loadu_si512(xb[i] + k0 + k));
                b[i] = _mm512_dpbf16_ps(b[i], w1, (__m512bh)_mm512_loadu_si512(xb[i] + k0 + k + 32));
            }
        }
        if (k < len) { /* the block's tail (K not a multiple of 64): masked loads, the lanes past K zero */
            const __mmask32 lo = lanes32(len - k), hi = lanes32(len - k - 32);
            __m512bh w0, w1;
            weights_bf16x64(w8, w16, k0 + k, (__mmask64)lo | (__mmask64)hi << 32, &w0, &w1, FP8, MR);
            for (int i = 0; i < MR; i++) {
                a[i] = _mm512_dpbf16_ps(a[i], w0, (__m512bh)_mm512_maskz_loadu_epi16(lo, xb[i] + k0 + k));
                b[i] = _mm512_dpbf16_ps(b[i], w1, (__m512bh)_mm512_maskz_loadu_epi16(hi, xb[i] + k0 + k + 32));
            }
        }
        const __m512 sc = _mm512_set1_ps(FP8 ? s[k0 / QB] : 1.0f);
        for (int i = 0; i < MR; i++) tot[i] = _mm512_fmadd_ps(_mm512_add_ps(a[i], b[i]), sc, tot[i]);
    }
    for (int i = 0; i < MR; i++) out[i] = _mm512_reduce_add_ps(tot[i]) * (FP8 ? m->fmt : 1.0f);
}

static void dot_rows_bf16(const Mat *m, int64_t r, const uint16_t *const *xb, int mr, float *out) {
#define DSV3_ROWS_CASE(n)                                                                                           \
    case n:                                                                                                         \
        if (m->s != NULL) dot_rows_bf16_k(m, r, xb, 1, n, out);                                                     \
        else dot_rows_bf16_k(m, r, xb, 0, n, out);                                                                  \
        break;
    switch (mr) {
        DSV3_ROWS_CASE(1) DSV3_ROWS_CASE(2) DSV3_ROWS_CASE(3) DSV3_ROWS_CASE(4)
        DSV3_ROWS_CASE(5) DSV3_ROWS_CASE(6) DSV3_ROWS_CASE(7) default : DSV3_ROWS_CASE(8)
    }
#undef DSV3_ROWS_CASE
}
#endif

/* out[j] = row r of m . row j for j < n. With AVX512-BF16 (BF16_ROWS) the bf16 rows brows, eight a pass on
 * dot_rows_bf16, a lone row too: a row's result must not depend on how many rows share its weights (a batch gives
 * each prompt its tokens alone, a replayed step the eager one's, padding rows or not). Else the fp32 rows, four a
 * pass on dot_rows, a lone row too (for the same reason: dot_bf16 sums in another order). Callers pass the kind
 * the build reads (the other may be NULL). */
SHARED static void dot_many(const Mat *m, int64_t r, const float *const *rows, const uint16_t *const *brows, int64_t n,
                     float *out) {
#if BF16_ROWS
    (void)rows;
    for (int64_t j = 0; j < n; j += 8) dot_rows_bf16(m, r, brows + j, n - j < 8 ? (int)(n - j) : 8, out + j);
#else
    (void)brows;
    for (int64_t j = 0; j < n; j += 4) dot_rows(m, r, rows + j, n - j < 4 ? (int)(n - j) : 4, out + j);
#endif
}

#endif
