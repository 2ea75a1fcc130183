/* CPU kernels for decode (fewer than 16 rows) and the FP8 weights the cpu backend keeps: linear layers,
 * the SwiGLU experts of a few tokens, RMSNorm, interleaved rope, the group-limited gate and the absorbed
 * MLA of one query, each in one call with fp32 accumulation and one rounding to bf16. Weights are bf16 or
 * block-scaled FP8 (e4m3fn/fnuz bytes with one fp32 scale per 128x128 block), widened in registers. Built
 * at first use by native.py, once per instruction set (see ISA below), and called through ctypes; ops.py
 * holds the plain-torch twins the tests compare against.
 *
 * Why: at batch 1 a decode step reads every active weight once, so its speed is bytes over read bandwidth,
 * plus the cost of each op call. Measured on a 2-core AVX-512/AMX Xeon: a GEMV over weights that are not in
 * cache reads ~16-19 GB/s whichever vector width does the arithmetic (AVX2, AVX-512, or AVX512-BF16's dot
 * products), so what matters is reading each byte once, as few bytes as possible (FP8 weights stay FP8:
 * half the bytes of bf16) and few calls per step.
 *
 * ISA: compiled with -mavx512f -mavx512bw -mavx512vl (DSV3_AVX512), with -mavx2 -mfma -mf16c (DSV3_AVX2),
 * or with neither (plain C, any CPU); native.py picks the widest this CPU runs and tests run every one the
 * CPU can, so the AVX2 path is tested on AVX-512 machines too. With AVX512-BF16 on top (DSV3_BF16DOT: the
 * "avx512bf16" build for AMD Zen 4/5, and the "amx" one) linears and experts multiply on its pair dot
 * products: a weight vector serving several rows (a batch, a draft verification) makes them compute-bound.
 * The AVX-512 build with AMX and AVX512-BF16 on top (DSV3_AMX) adds the grouped expert GEMMs of a prompt
 * (dsv3_grouped_amx): there the weights of an expert serve dozens of rows, so the products, not the bytes,
 * are the cost, and AMX tiles do them.
 *
 * FP8 widening: a byte s.eeee.mmm moved into an fp16 as s.0eeee.mmm0000000 is the byte's value divided by
 * 2^8 (e4m3fn, exponent bias 7 vs fp16's 15) or 2^7 (e4m3fnuz, bias 8), subnormals included; the hardware
 * fp16 -> fp32 conversion (F16C / AVX-512F) then widens 8 or 16 at once. `fmt` is that power of two (the
 * caller derives it from torch's own cast, so this file knows no format); with AVX512-VBMI, a table of the same
 * values widens 64 bytes to bf16 at once (fp8_bf16x64). NaN bytes are refused at load
 * (ops.py keeps such a weight dequantized), so the widening never meets one.
 */
#define _GNU_SOURCE /* syscall(), for the AMX permission (dsv3_grouped_amx) */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DSV3_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSV3_AVX2 1
#endif
#if defined(DSV3_AVX512) && defined(__AVX512BF16__)
#define DSV3_BF16DOT 1 /* linears and experts on AVX512-BF16 pair dot products (dot_rows_bf16) */
#define BF16_ROWS 1    /* dot_many reads the activations as bf16 rows, never fp32 copies */
#else
#define BF16_ROWS 0
#endif
#if defined(DSV3_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define DSV3_AMX 1 /* prefill's routed experts on AMX tiles: dsv3_grouped_amx */
#endif

#define QB 128 /* FP8 scale block, both dims */
/* Weight rows are streamed from memory once per step. The hardware prefetcher alone keeps too few lines in
 * flight for the FP8 loops (more arithmetic per byte): a GEMV over FP8 weights not in cache read 6 GB/s
 * without, 12 GB/s with a prefetch this far ahead (the next rows: a thread's rows are contiguous). */
#define PF_AHEAD 2048
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

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

/* 1 where FP8 weights widen to bf16 by table (AVX512-VBMI: fp8_bf16x64) */
int dsv3_fp8_table(void) {
#if defined(__AVX512VBMI__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

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

/* an FP8 byte's value in units of fmt: its bits placed in an fp16 as described above, decoded */
static float fp8_half(uint8_t b) {
    int e = (b >> 3) & 0xF, m = b & 7;
    float v = e ? ldexpf((float)(8 + m), e - 18) : ldexpf((float)m, -17);
    return (b & 0x80) ? -v : v;
}

#if defined(DSV3_AVX512)
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 fp8x16(const uint8_t *p) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); /* sign copied into bits 8..15 */
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF));
    return _mm512_cvtph_ps(h);
}
/* 32 bytes at once: one sign extension, shift and mask for both halves (~11% more GEMV rate in cache than two
 * fp8x16, measured at 1 row) */
static inline void fp8x32(const uint8_t *p, __m512 *lo, __m512 *hi) {
    __m512i h = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
    h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16((short)0xBFFF));
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
#elif defined(DSV3_AVX2)
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256i fp8_halves(const uint8_t *p) { /* 16 bytes -> 16 fp16 */
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBFFF));
}
#endif

/* sum_k a[k] * b[k] with a fp32 or bf16 (a_bf16, a constant where it is inlined), b fp32: four FMA chains (one
 * would stall on the FMA latency); bf16 rows stream from memory, so they are prefetched ahead */
static inline __attribute__((always_inline)) float dot_any(const void *a, int a_bf16, const float *b, int64_t n) {
    const float *af = (const float *)a;
    const uint16_t *ah = (const uint16_t *)a;
    int64_t k = 0;
    float s = 0.0f;
#if defined(DSV3_AVX512)
#define LOAD_A(i) (a_bf16 ? bf16x16(ah + (i)) : _mm512_loadu_ps(af + (i)))
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; k + 64 <= n; k += 64) {
        if (a_bf16) {
            PREFETCH(ah + k + PF_AHEAD);
            PREFETCH(ah + k + PF_AHEAD + 32);
        }
        a0 = _mm512_fmadd_ps(LOAD_A(k), _mm512_loadu_ps(b + k), a0);
        a1 = _mm512_fmadd_ps(LOAD_A(k + 16), _mm512_loadu_ps(b + k + 16), a1);
        a2 = _mm512_fmadd_ps(LOAD_A(k + 32), _mm512_loadu_ps(b + k + 32), a2);
        a3 = _mm512_fmadd_ps(LOAD_A(k + 48), _mm512_loadu_ps(b + k + 48), a3);
    }
    for (; k + 16 <= n; k += 16) a0 = _mm512_fmadd_ps(LOAD_A(k), _mm512_loadu_ps(b + k), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#undef LOAD_A
#elif defined(DSV3_AVX2)
#define LOAD_A(i) (a_bf16 ? bf16x8(ah + (i)) : _mm256_loadu_ps(af + (i)))
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        if (a_bf16) PREFETCH(ah + k + PF_AHEAD);
        a0 = _mm256_fmadd_ps(LOAD_A(k), _mm256_loadu_ps(b + k), a0);
        a1 = _mm256_fmadd_ps(LOAD_A(k + 8), _mm256_loadu_ps(b + k + 8), a1);
        a2 = _mm256_fmadd_ps(LOAD_A(k + 16), _mm256_loadu_ps(b + k + 16), a2);
        a3 = _mm256_fmadd_ps(LOAD_A(k + 24), _mm256_loadu_ps(b + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(LOAD_A(k), _mm256_loadu_ps(b + k), a0);
    s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#undef LOAD_A
#endif
    for (; k < n; k++) s += (a_bf16 ? bf16_scalar(ah[k]) : af[k]) * b[k];
    return s;
}

static float dot_f32(const float *a, const float *b, int64_t n) { return dot_any(a, 0, b, n); }

static float dot_bf16(const uint16_t *w, const float *x, int64_t n) { return dot_any(w, 1, x, n); }

/* sum_k fp8_half(w[k]) * s[k / 128] * x[k]: one FP8 weight row against fp32 x, in units of fmt. The block's
 * sum is scaled once, in a vector register. */
static float dot_fp8(const uint8_t *w, const float *x, const float *s, int64_t K) {
    float tail = 0.0f;
#if defined(DSV3_AVX512)
    __m512 tot = _mm512_setzero_ps();
#elif defined(DSV3_AVX2)
    __m256 tot = _mm256_setzero_ps();
#endif
    for (int64_t k0 = 0; k0 < K; k0 += QB) {
        const int64_t len = K - k0 < QB ? K - k0 : QB;
        const uint8_t *wb = w + k0;
        const float *xb = x + k0;
        int64_t k = 0;
        PREFETCH(wb + PF_AHEAD);
        PREFETCH(wb + PF_AHEAD + 64);
#if defined(DSV3_AVX512)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; k + 32 <= len; k += 32) {
            __m512 w0, w1;
            fp8x32(wb + k, &w0, &w1);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + k), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + k + 16), a1);
        }
        for (; k + 16 <= len; k += 16) a0 = _mm512_fmadd_ps(fp8x16(wb + k), _mm512_loadu_ps(xb + k), a0);
        tot = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s[k0 / QB]), tot);
#elif defined(DSV3_AVX2)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; k + 16 <= len; k += 16) {
            __m256i h = fp8_halves(wb + k);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_loadu_ps(xb + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), _mm256_loadu_ps(xb + k + 8), a1);
        }
        tot = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s[k0 / QB]), tot);
#endif
        float t = 0.0f;
        for (; k < len; k++) t += fp8_half(wb[k]) * xb[k];
        tail += t * s[k0 / QB];
    }
#if defined(DSV3_AVX512)
    return _mm512_reduce_add_ps(tot) + tail;
#elif defined(DSV3_AVX2)
    return hsum(tot) + tail;
#else
    return tail;
#endif
}

/* out[k] = the weight's value (fp32) for one FP8 row: fp8_half(w[k]) * fmt * s[k / 128] */
static void widen_fp8(const uint8_t *w, const float *s, float fmt, int64_t K, float *out) {
    for (int64_t k0 = 0; k0 < K; k0 += QB) {
        const int64_t len = K - k0 < QB ? K - k0 : QB;
        const float sc = s[k0 / QB] * fmt;
        int64_t k = 0;
        PREFETCH(w + k0 + PF_AHEAD);
        PREFETCH(w + k0 + PF_AHEAD + 64);
#if defined(DSV3_AVX512)
        for (; k + 16 <= len; k += 16)
            _mm512_storeu_ps(out + k0 + k, _mm512_mul_ps(fp8x16(w + k0 + k), _mm512_set1_ps(sc)));
#elif defined(DSV3_AVX2)
        for (; k + 16 <= len; k += 16) {
            __m256i h = fp8_halves(w + k0 + k);
            _mm256_storeu_ps(out + k0 + k, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_set1_ps(sc)));
            _mm256_storeu_ps(out + k0 + k + 8,
                             _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), _mm256_set1_ps(sc)));
        }
#endif
        for (; k < len; k++) out[k0 + k] = fp8_half(w[k0 + k]) * sc;
    }
}

static void widen(const uint16_t *x, float *xf, int64_t n) {
    for (int64_t k = 0; k < n; k++) xf[k] = bf16_scalar(x[k]);
}

/* A weight matrix [rows, K]: bf16 (s == NULL) or FP8 bytes with block scales s [ceil(rows/128), ceil(K/128)] */
typedef struct {
    const void *w;
    const float *s;
    int64_t K;
    float fmt;
} Mat;

/* expert e of a stack [E, rows, K] (+ scales [E, ceil(rows/128), ceil(K/128)]) */
static Mat expert(const void *w, const float *s, int64_t e, int64_t rows, int64_t K, float fmt) {
    Mat m = {NULL, NULL, K, fmt};
    if (s == NULL) {
        m.w = (const uint16_t *)w + e * rows * K;
    } else {
        m.w = (const uint8_t *)w + e * rows * K;
        m.s = s + e * ((rows + QB - 1) / QB) * ((K + QB - 1) / QB);
    }
    return m;
}

/* row r of m against fp32 x (unused where BF16_ROWS) */
static __attribute__((unused)) float row_dot(const Mat *m, int64_t r, const float *x) {
    if (m->s == NULL) return dot_bf16((const uint16_t *)m->w + r * m->K, x, m->K);
    const int64_t kb = (m->K + QB - 1) / QB;
    return m->fmt * dot_fp8((const uint8_t *)m->w + r * m->K, x, m->s + (r / QB) * kb, m->K);
}

/* Row r of m against MR (1..4) rows of fp32 activations at once: out[i] = row . xs[i]. Each weight vector is
 * loaded and widened once and multiplied into every row's accumulator, so a step of a few tokens (a draft
 * verification, a small batch) reads and converts each weight once; the FP8 block scale multiplies each 128-wide
 * partial sum, as in dot_fp8. FP8 and MR are constants where this is inlined (see dot_rows). */
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

#if defined(__AVX512VBMI__)
/* With AVX512-VBMI, 64 FP8 bytes become 64 bf16 by table lookup: a byte's low 7 bits index a 128-entry table of
 * the bf16 bits (split into low and high bytes: one byte shuffle each) and its sign goes to the high byte as is.
 * 6 instructions per 64 weights where the conversion above takes ~14, which is most of the work when a weight
 * vector serves few rows. Measured on a Zen 4, 2 threads, FP8 linears 2048-18432 x 2048-7168 read from memory:
 * 1.13-1.22x at 1 row, 1.07-1.18x at 2, 1.0-1.25x at 4. From 5 rows the dot products are the work and the four
 * table registers crowd the accumulators (8 rows: 0.8x at K = 7168), so there the conversion above stays.
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
#if defined(__AVX512VBMI__)
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
 * each prompt its tokens alone, a replayed step the eager one's, padding rows or not). Else the fp32 rows: one on
 * dot_fp8/dot_bf16, four a pass on dot_rows, which sum in the same order. Callers pass the kind the build reads
 * (the other may be NULL). */
static void dot_many(const Mat *m, int64_t r, const float *const *rows, const uint16_t *const *brows, int64_t n,
                     float *out) {
#if BF16_ROWS
    (void)rows;
    for (int64_t j = 0; j < n; j += 8) dot_rows_bf16(m, r, brows + j, n - j < 8 ? (int)(n - j) : 8, out + j);
#else
    (void)brows;
    if (n == 1) {
        out[0] = row_dot(m, r, rows[0]);
        return;
    }
    for (int64_t j = 0; j < n; j += 4) dot_rows(m, r, rows + j, n - j < 4 ? (int)(n - j) : 4, out + j);
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

/* index of the largest of v[0..n) not yet taken; ties go to the lowest index */
static int64_t argmax_free(const float *v, const unsigned char *taken, int64_t n) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
    return best;
}

/* The aux-loss-free, group-limited gate for rows of x [T, D] (bf16 or fp32) against weight [E, D] fp32 (see
 * the reference's moe_gate, its twin); weight NULL: x is already the logits, fp32 [T, E] (a prompt's, from
 * torch's GEMM). sigmoid: 1 = sigmoid, 0 = softmax; group_score: 2 = top-2 sum, 1 = max, 0 = none. Rows in
 * parallel: the selection, not the product, is what a prompt's gate costs as a chain of torch ops. */
void dsv3_moe_gate(const void *x, int x_bf16, const float *weight, const float *bias, int64_t T, int64_t D,
                   int64_t E, int64_t top_k, int64_t n_group, int64_t topk_group, int sigmoid, int group_score, int norm,
                   float route_scale, float *out_w, int64_t *out_ids, int threads) {
#pragma omp parallel num_threads(T > 1 ? threads : 1)
    {
        float *scratch = malloc((size_t)(3 * E + D) * sizeof(float)), *xw = scratch + 3 * E;
        unsigned char *flags = malloc((size_t)(E + n_group));
        float *scores = scratch, *choice = scratch + E, *gs = scratch + 2 * E;
        unsigned char *taken = flags, *gkeep = flags + E;
        int64_t per = E / n_group;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const float *xt = xw; /* x is bf16 (widened here) or fp32 */
            if (weight == NULL) xt = (const float *)x + t * E;
            else if (x_bf16) widen((const uint16_t *)x + t * D, xw, D);
            else xt = (const float *)x + t * D;
            float mx = -INFINITY, sum = 0.0f;
            for (int64_t e = 0; e < E; e++) {
                float acc = weight == NULL ? xt[e] : dot_f32(xt, weight + e * D, D);
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
        free(scratch);
        free(flags);
    }
}

/* The absorbed MLA of S queries per sequence, projections included: for sequence b, query s and head h,
 * q_lat = q_nope[b, s, h] @ w_uk[h] (w_uk [H, N, C]), attention over the latent cache p = softmax(scale * (q_lat .
 * kv[b, t] + q_pe[b, s, h] . pe[b, t])) over t < T (or lens[b, s]) and o = sum_t p[t] kv[b, t], then y[b, s, h] =
 * o @ w_uv[h] (w_uv [H, C, V]), rounded to bf16 [B, S, H, V]. w_uk/w_uv are fp32 or bf16 (w_bf16). q_nope and
 * q_pe are bf16 with sequence strides qs/ps, query strides qss/pss and head strides hs/phs. The S queries of a
 * head are neighbouring items (a verification of drafts reads that head's projections once, warm for the rest).
 * rows (optional, [B]): kv and pe are a whole slot cache and sequence b reads its slot rows[b] in place (the
 * server's batches are any set of slots; gathering them would copy every key of every row per layer). */
void dsv3_mla_absorbed(const uint16_t *q_nope, int64_t qs, int64_t qss, int64_t hs, const uint16_t *q_pe, int64_t ps,
                       int64_t pss, int64_t phs, const void *w_uk, const void *w_uv, int w_bf16, const uint16_t *kv,
                       const uint16_t *pe, uint16_t *y, int64_t B, int64_t S, int64_t H, int64_t N, int64_t T, int64_t C,
                       int64_t R, int64_t V, int64_t kvs, int64_t pes, float scale, const int64_t *lens,
                       const int64_t *rows, int threads) {
    int64_t longest = lens ? 0 : T; /* the scratch a query needs: its keys' scores, at most the longest prefix */
    for (int64_t j = 0; lens && j < B * S; j++)
        if (lens[j] > longest) longest = lens[j];
#pragma omp parallel num_threads(threads)
    {
        float *ql = malloc((size_t)(2 * C + longest + 1) * sizeof(float)), *o = ql + C, *s = o + C;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H * S; bh++) { /* item (b, h, i): query i innermost */
            const int64_t b = bh / (H * S), h = bh / S % H, i = bh % S;
            const uint16_t *qn = q_nope + b * qs + i * qss + h * hs, *qp = q_pe + b * ps + i * pss + h * phs;
            const int64_t slot = rows ? rows[b] : b; /* a slot of the whole cache, read in place (no gathered copy) */
            const uint16_t *k0 = kv + slot * kvs, *p0 = pe + slot * pes;
            const int64_t Tb = lens ? lens[b * S + i] : T; /* a query of a position step sees only its own prefix */
            float mx = -INFINITY, sum = 0.0f, qpf[256];
            for (int64_t c = 0; c < C; c++) ql[c] = o[c] = 0.0f;
            for (int64_t n = 0; n < N; n++) { /* ql += q[n] * w_uk[h, n, :] */
                const float q = bf16_scalar(qn[n]);
                if (w_bf16) {
                    const uint16_t *w = (const uint16_t *)w_uk + (h * N + n) * C;
                    for (int64_t c = 0; c < C; c++) ql[c] += q * bf16_scalar(w[c]);
                } else {
                    const float *w = (const float *)w_uk + (h * N + n) * C;
                    for (int64_t c = 0; c < C; c++) ql[c] += q * w[c];
                }
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
                for (int64_t c = 0; c < C; c++) { /* out += o[c] * w_uv[h, c, :] */
                    if (w_bf16) {
                        const uint16_t *w = (const uint16_t *)w_uv + (h * C + c) * V + j0;
                        for (int64_t j = 0; j < len; j++) out[j] += o[c] * bf16_scalar(w[j]);
                    } else {
                        const float *w = (const float *)w_uv + (h * C + c) * V + j0;
                        for (int64_t j = 0; j < len; j++) out[j] += o[c] * w[j];
                    }
                }
                for (int64_t j = 0; j < len; j++) y[((b * S + i) * H + h) * V + j0 + j] = to_bf16(out[j]);
            }
        }
        free(ql);
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

/* e^x in fp32, relative error ~2e-7 (Cephes' expf: n = round(x log2 e), x - n ln 2 in two parts, a degree-6
 * polynomial, times 2^n); inputs clamped to the range where e^x is finite */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447505531f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
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
    static int allowed = -1; /* Linux hands out AMX state only on request, once per process */
    if (allowed < 0) allowed = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    if (!allowed || K % 32 || N % (G == 2 ? 16 : 32) || G < 1 || G > 2) return -1;
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
                                const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
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
#else
int dsv3_grouped_amx(const uint16_t *a, const int64_t *idx, const int64_t *starts, int64_t E, int64_t G,
                     const void *w0, const float *s0, const void *w1, const float *s1, float fmt, int64_t K, int64_t N,
                     uint16_t *out, int threads) {
    (void)a, (void)idx, (void)starts, (void)E, (void)G, (void)w0, (void)s0, (void)w1, (void)s1, (void)fmt, (void)K;
    (void)N, (void)out, (void)threads;
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
