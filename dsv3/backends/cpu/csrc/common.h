/* CPU kernels for decode (fewer than 16 rows) and the FP8 weights the cpu backend keeps: linear layers,
 * the SwiGLU experts of a few tokens, RMSNorm, interleaved rope, the group-limited gate and the absorbed
 * MLA of one query, each in one call with fp32 accumulation and one rounding to bf16. Weights are bf16 or
 * block-scaled FP8 (e4m3fn/fnuz bytes with one fp32 scale per 128x128 block), widened in registers. Built
 * at first use by native.py into one library, once per instruction set (see ISA below), and called through
 * ctypes; ops.py holds the plain-torch twins the tests compare against.
 *
 * Files: this header (what every file shares: the ISA macros, bf16/FP8 scalars, fp32 dot products and
 * widening, fp32 vectors of the build's width and e^x), dot.h (a weight row against several activation rows:
 * what linears and experts are made of), linear.c (linears, SwiGLU experts, the build's ISA queries),
 * norm_rope.c, gate.c, attention.c, convert.c (FP8 widened in bulk) and amx.c (prefill's grouped expert GEMMs on
 * AMX tiles).
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
 * caller derives it from torch's own cast, so these files know no format); with AVX512-VBMI, a table of the same
 * values widens 64 bytes to bf16 at once (fp8_bf16x64). NaN bytes are refused at load
 * (ops.py keeps such a weight dequantized), so the widening never meets one.
 */
#ifndef DSV3_COMMON_H
#define DSV3_COMMON_H
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
#if defined(__AVX512VBMI__)
#define DSV3_FP8_TABLE 1 /* FP8 weights of 1-4 rows widen to bf16 by byte-shuffle table (dot.h fp8_bf16x64) */
#endif
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
/* a helper of these headers that some files do not call (no unused-function warning there) */
#define SHARED __attribute__((unused))

SHARED static float bf16_scalar(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

SHARED static uint16_t to_bf16(float f) { /* round to nearest even, as torch's fp32 -> bf16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0; /* NaN stays NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* an FP8 byte's value in units of fmt: its bits placed in an fp16 as described above, decoded */
SHARED static float fp8_half(uint8_t b) {
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

#if defined(DSV3_AVX512) || defined(DSV3_AVX2)
/* fp32 vectors of the build's width (16 lanes with AVX-512, 8 with AVX2), for code written once for both
 * (attention.c's blocks, e^x). Loads and stores take a count of lanes: the rest read as zero and are not written
 * (none when <= 0). */
#if defined(DSV3_AVX512)
#define VL 16
typedef __m512 vf;
static inline __mmask16 lanes16(int64_t n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1u); }
static inline vf v_load(const float *p, int64_t n) { /* (whole vectors unmasked: ~8% faster at V3's dims) */
    return __builtin_expect(n >= 16, 1) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes16(n), p);
}
static inline void v_store(float *p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, lanes16(n), v); }
static inline vf v_bf16(const uint16_t *p, int64_t n) {
    if (__builtin_expect(n >= 16, 1)) return bf16x16(p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes16(n), p)), 16));
}
static inline vf v_set1(float x) { return _mm512_set1_ps(x); }
static inline vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf v_min(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf v_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } /* c - a b */
static inline float v_sum(vf v) { return _mm512_reduce_add_ps(v); }
static inline float v_top(vf v) { return _mm512_reduce_max_ps(v); }
static inline vf v_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); } /* p 2^n */
static inline vf v_zero_below(vf e, vf x, float lo) { /* e, 0 where x < lo */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_GE_OQ), e);
}
#else /* AVX2 */
#define VL 8
typedef __m256 vf;
static inline __m256i lanes8(int64_t n) {
    const int k = n <= 0 ? 0 : n >= 8 ? 8 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
/* (the tails are rare: every dimension of the real models is a multiple of 8) */
static inline vf v_load(const float *p, int64_t n) {
    return __builtin_expect(n >= 8, 1) ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes8(n));
}
static inline void v_store(float *p, vf v, int64_t n) {
    if (__builtin_expect(n >= 8, 1)) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, lanes8(n), v);
}
static inline vf v_bf16(const uint16_t *p, int64_t n) { /* no 16-bit masked load in AVX2: a tail is copied */
    if (__builtin_expect(n >= 8, 1)) return bf16x8(p);
    uint16_t tail[8] = {0};
    for (int64_t i = 0; i < n; i++) tail[i] = p[i];
    return bf16x8(tail);
}
static inline vf v_set1(float x) { return _mm256_set1_ps(x); }
static inline vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf v_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf v_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf v_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline float v_sum(vf v) { return hsum(v); }
static inline float v_top(vf v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
static inline vf v_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf p, vf n) { /* n in [-126, 127]: the exponent bits */
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                   _mm256_set1_epi32(127)), 23)));
}
static inline vf v_zero_below(vf e, vf x, float lo) {
    return _mm256_and_ps(e, _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_GE_OQ));
}
#endif

/* e^x, VL at once, to ~2 ulp (Cephes' expf: x = n ln 2 + r with |r| <= ln 2 / 2, e^r as 1 + r + r^2 P(r) with a
 * degree-5 P, times 2^n). Above 88.38 clamped (finite); below -87 (e^-87 ~ 1.6e-38) exactly 0: the -inf padding a
 * tile of attention scores adds nothing to the softmax sums, and SiLU's e^-x of a large x is 0. */
static inline vf v_exp(vf x) {
    const vf xc = v_max(v_min(x, v_set1(88.3762626647949f)), v_set1(-87.0f));
    const vf n = v_round(v_mul(xc, v_set1(1.44269504088896341f)));
    vf r = v_fnma(n, v_set1(0.693359375f), xc);
    r = v_fnma(n, v_set1(-2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_zero_below(v_pow2(p, n), x, -87.0f);
}
#endif

/* sum_k a[k] * b[k] with a fp32 or bf16 (a_bf16, a constant where it is inlined), b fp32: four FMA chains (one
 * would stall on the FMA latency); bf16 rows stream from memory, so they are prefetched ahead (a line a 32) */
static inline __attribute__((always_inline)) float dot_any(const void *a, int a_bf16, const float *b, int64_t n) {
    const float *af = (const float *)a;
    const uint16_t *ah = (const uint16_t *)a;
    int64_t k = 0;
    float s = 0.0f;
#if defined(DSV3_AVX512) || defined(DSV3_AVX2)
#define LOAD_A(i) (a_bf16 ? v_bf16(ah + (i), VL) : v_load(af + (i), VL))
    vf a0 = v_set1(0.0f), a1 = v_set1(0.0f), a2 = v_set1(0.0f), a3 = v_set1(0.0f);
    for (; k + 4 * VL <= n; k += 4 * VL) {
        for (int l = 0; a_bf16 && l < 4 * VL; l += 32) PREFETCH(ah + k + PF_AHEAD + l);
        a0 = v_fma(LOAD_A(k), v_load(b + k, VL), a0);
        a1 = v_fma(LOAD_A(k + VL), v_load(b + k + VL, VL), a1);
        a2 = v_fma(LOAD_A(k + 2 * VL), v_load(b + k + 2 * VL, VL), a2);
        a3 = v_fma(LOAD_A(k + 3 * VL), v_load(b + k + 3 * VL, VL), a3);
    }
    for (; k + VL <= n; k += VL) a0 = v_fma(LOAD_A(k), v_load(b + k, VL), a0);
    s = v_sum(v_add(v_add(a0, a1), v_add(a2, a3)));
#undef LOAD_A
#endif
    for (; k < n; k++) s += (a_bf16 ? bf16_scalar(ah[k]) : af[k]) * b[k];
    return s;
}

SHARED static float dot_f32(const float *a, const float *b, int64_t n) { return dot_any(a, 0, b, n); }

SHARED static float dot_bf16(const uint16_t *w, const float *x, int64_t n) { return dot_any(w, 1, x, n); }

/* out[k] = the weight's value (fp32) for one FP8 row: fp8_half(w[k]) * fmt * s[k / 128] */
SHARED static void widen_fp8(const uint8_t *w, const float *s, float fmt, int64_t K, float *out) {
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

SHARED static void widen(const uint16_t *x, float *xf, int64_t n) {
    for (int64_t k = 0; k < n; k++) xf[k] = bf16_scalar(x[k]);
}

#endif
