/* The absorbed MLA attention of a few queries per sequence over the latent cache (dsv3_mla_absorbed, at the end). */
#include "common.h"

/* The grouped kernel's (below) partial sums of the chunks held at once (32 MB): a big batch at a long context goes
 * in passes of a few queries (64 x 32K tokens x 128 heads would hold 540 MB). A variable: the tests run passes. */
int64_t dsv3_mla_part_floats = 8 << 20;
/* With AVX-512 or AVX2: projections (w_uk and w_uv, all heads) up to this many bytes stay in cache between queries,
 * so an item projects its own query's heads in place (the grouped kernel's phases cost the 280M model's 0.5 MB 5-18%
 * at 2-16 queries, measured); beyond, the queries share each head's (below). A variable: the tests take both ways. */
int64_t dsv3_mla_share_bytes = 1 << 20;

#if defined(DSV3_AVX512) || defined(DSV3_AVX2)
#define GROUPED 1
/* The heads of a sequence's query share its keys: with 128 heads (DeepSeek-V3) a kernel that takes one head at a time
 * reads every key 128 times over (from L3 at best) and does one FMA per key element loaded. Here a group of heads
 * takes a tile of keys together, as two small GEMMs: scores [heads, keys] = q_lat . kv (+ q_pe . pe), then
 * o [heads, C] += p [heads, keys] . kv, on register blocks of 4 heads x KB keys (scores) and 4 heads x VB vectors
 * of latent units (o), each key vector widened once for all 4 heads. Every (head, key) sum runs in the same order
 * whatever the group, so a head's result does not depend on its company. Measured on an AMD EPYC (Zen 5), 2
 * threads, V3's dims (128 heads, C = 512, R = 64), one query, AVX-512, against one head at a time with a two-pass
 * softmax: 1024 keys 3.4 -> 1.4 ms, 4096 keys 10.1 -> 3.5 ms, 32768 keys 128 -> 24 ms (there the keys no longer fit
 * in L3, and a group reads them from memory once, not twice per head); the AVX2 build 3.5 -> 2.2 and 13.2 -> 7.0 ms
 * at 1024 and 4096 keys. */
#define KEY_TILE 64      /* keys a group takes at once: 64 latent rows of C = 512 bf16 are 64 KB, in L2 */
#define GROUP_HEADS 64   /* at most; their o [64, C = 512] fp32 is 128 KB, in L2 */
#define KEY_CHUNK 1024   /* keys an item takes: a long context is split into chunks, merged after */

/* the blocks' shapes: 4 heads x KB keys (scores), 4 heads x VB vectors (values); AVX2's 16 registers hold less */
#if defined(DSV3_AVX512)
#define KB 4
#define VB 4
#else
#define KB 2
#define VB 2
#endif

/* acc[h * KB + j] += q[h] . k[j] over n elements (q fp32 rows, k bf16 rows), h < NH */
static inline __attribute__((always_inline)) void dots_keys(const float *q, int64_t qstride, const uint16_t *const *k,
                                                              int64_t n, vf *acc, const int NH) {
    for (int64_t c = 0; c < n; c += VL) {
        vf kv[KB];
        for (int j = 0; j < KB; j++) kv[j] = v_bf16(k[j] + c, n - c);
        for (int h = 0; h < NH; h++) {
            const vf qv = v_load(q + h * qstride + c, n - c);
            for (int j = 0; j < KB; j++) acc[h * KB + j] = v_fma(qv, kv[j], acc[h * KB + j]);
        }
    }
}

/* scores s[h * ld + t - t0] = scale * (ql[h] . kv[t] + qp[h] . pe[t]) for NH heads and keys t0 <= t < t1 */
static inline __attribute__((always_inline)) void scores_block(const float *ql, const float *qp, const uint16_t *kv,
                                                                 const uint16_t *pe, int64_t C, int64_t R, int64_t t0,
                                                                 int64_t t1, float scale, float *s, int64_t ld,
                                                                 const int NH) {
    for (int64_t t = t0; t < t1; t += KB) {
        const uint16_t *k[KB], *p[KB];
        for (int j = 0; j < KB; j++) { /* past the last key: the last again, its sums dropped */
            const int64_t tj = t + j < t1 ? t + j : t1 - 1;
            k[j] = kv + tj * C;
            p[j] = pe + tj * R;
        }
        vf acc[4 * KB];
        for (int i = 0; i < NH * KB; i++) acc[i] = v_set1(0.0f);
        dots_keys(ql, C, k, C, acc, NH);
        dots_keys(qp, R, p, R, acc, NH);
        for (int h = 0; h < NH; h++)
            for (int j = 0; j < KB && t + j < t1; j++) s[h * ld + t + j - t0] = v_sum(acc[h * KB + j]) * scale;
    }
}

/* o[h] += sum_t p[h * ld + t - t0] kv[t] for NH heads and keys t0 <= t < t1, VB vectors of latent units a pass */
static inline __attribute__((always_inline)) void values_block(const float *pr, int64_t ld, const uint16_t *kv,
                                                                 int64_t C, int64_t t0, int64_t t1, float *o,
                                                                 const int NH) {
    for (int64_t c = 0; c < C; c += VB * VL) {
        vf acc[4 * VB];
        for (int h = 0; h < NH; h++)
            for (int l = 0; l < VB; l++) acc[h * VB + l] = v_load(o + h * C + c + VL * l, C - c - VL * l);
        for (int64_t t = t0; t < t1; t++) {
            vf k[VB];
            for (int l = 0; l < VB; l++) k[l] = v_bf16(kv + t * C + c + VL * l, C - c - VL * l);
            for (int h = 0; h < NH; h++) {
                const vf pv = v_set1(pr[h * ld + t - t0]);
                for (int l = 0; l < VB; l++) acc[h * VB + l] = v_fma(pv, k[l], acc[h * VB + l]);
            }
        }
        for (int h = 0; h < NH; h++)
            for (int l = 0; l < VB; l++) v_store(o + h * C + c + VL * l, acc[h * VB + l], C - c - VL * l);
    }
}

/* A group of g heads of one query over keys t0 <= t < t1 (a chunk), with the softmax taken online, tile by tile
 * (scores then values while the tile is in L2): ql [g, C], qp [g, R] fp32 in; out o [g, C] = sum_t e^(s_t - m) kv[t]
 * and m [g] (the largest score), l [g] (sum_t e^(s_t - m)), unnormalized, for merging chunks. s [g, KEY_TILE]. */
static void group_attention(const float *ql, const float *qp, int g, const uint16_t *kv, const uint16_t *pe,
                            int64_t t0, int64_t t1, int64_t C, int64_t R, float scale, float *s, float *o, float *m,
                            float *l) {
    memset(o, 0, (size_t)(g * C) * sizeof(float));
    for (int h = 0; h < g; h++) m[h] = -INFINITY, l[h] = 0.0f;
    for (int64_t a = t0; a < t1; a += KEY_TILE) {
        const int64_t z = t1 - a < KEY_TILE ? t1 : a + KEY_TILE, n = z - a;
        for (int h = 0; h < g; h += 4) {
            const float *q = ql + h * C, *r = qp + h * R;
            float *sh = s + h * KEY_TILE;
            if (g - h >= 4) scores_block(q, r, kv, pe, C, R, a, z, scale, sh, KEY_TILE, 4);
            else if (g - h == 3) scores_block(q, r, kv, pe, C, R, a, z, scale, sh, KEY_TILE, 3);
            else if (g - h == 2) scores_block(q, r, kv, pe, C, R, a, z, scale, sh, KEY_TILE, 2);
            else scores_block(q, r, kv, pe, C, R, a, z, scale, sh, KEY_TILE, 1);
        }
        for (int h = 0; h < g; h++) { /* e^(s - m) with m the largest score so far; what came before rescaled */
            float *sh = s + h * KEY_TILE;
            for (int64_t t = n; t % VL; t++) sh[t] = -INFINITY; /* the last vector's lanes past the tile */
            vf mx = v_set1(-INFINITY), sum = v_set1(0.0f);
            for (int64_t t = 0; t < n; t += VL) mx = v_max(mx, v_load(sh + t, VL));
            const float top = v_top(mx), m1 = top > m[h] ? top : m[h];
            if (m1 > m[h] && l[h] > 0.0f) {
                const float alpha = expf(m[h] - m1);
                l[h] *= alpha;
                for (int64_t c = 0; c < C; c++) o[h * C + c] *= alpha;
            }
            m[h] = m1;
            for (int64_t t = 0; t < n; t += VL) {
                const vf e = v_exp(v_sub(v_load(sh + t, VL), v_set1(m1)));
                v_store(sh + t, e, VL);
                sum = v_add(sum, e);
            }
            l[h] += v_sum(sum);
        }
        for (int h = 0; h < g; h += 4) {
            const float *ph = s + h * KEY_TILE;
            float *oh = o + h * C;
            if (g - h >= 4) values_block(ph, KEY_TILE, kv, C, a, z, oh, 4);
            else if (g - h == 3) values_block(ph, KEY_TILE, kv, C, a, z, oh, 3);
            else if (g - h == 2) values_block(ph, KEY_TILE, kv, C, a, z, oh, 2);
            else values_block(ph, KEY_TILE, kv, C, a, z, oh, 1);
        }
    }
}
#endif

/* q_lat = q_nope @ w_uk[h] (fp32 [C]) for one head */
static void absorb(const uint16_t *qn, const void *w_uk, int w_bf16, int64_t h, int64_t N, int64_t C, float *ql) {
    for (int64_t c = 0; c < C; c++) ql[c] = 0.0f;
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
}

/* y = o @ w_uv[h], rounded to bf16 [V] */
static void project(const float *o, const void *w_uv, int w_bf16, int64_t h, int64_t C, int64_t V, uint16_t *y) {
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
        for (int64_t j = 0; j < len; j++) y[j0 + j] = to_bf16(out[j]);
    }
}

#if defined(GROUPED)
/* The latent queries of one head for queries q0 <= q < q1 (q = b * S + i): ql[q - q0] = q_nope[b, i, h] @ w_uk[h]
 * (fp32 [C], rows ldq apart) and qp[q - q0] = q_pe[b, i, h] (fp32 [R]). Each weight row is widened once and added
 * into every query's row: a verify step's or a batch's queries share one read of w_uk[h] (V3: 128 KB a head in
 * bf16, 16 MB a layer), where a query at a time read it once each. Every (query, c) sums over n in the same order
 * as absorb() above, so the result is the same bit for bit, whatever the company. wf: C + (q1 - q0) * N floats of
 * scratch. */
static void absorb_queries(const uint16_t *q_nope, int64_t qs, int64_t qss, int64_t hs, const uint16_t *q_pe,
                           int64_t ps, int64_t pss, int64_t phs, const void *w_uk, int w_bf16, int64_t h, int64_t S,
                           int64_t N, int64_t C, int64_t R, int64_t q0, int64_t q1, float *ql, float *qp, int64_t ldq,
                           int64_t ldp, float *wf) {
    for (int64_t q = q0; q < q1; q++) {
        const uint16_t *src = q_pe + q / S * ps + q % S * pss + h * phs;
        for (int64_t r = 0; r < R; r++) qp[(q - q0) * ldp + r] = bf16_scalar(src[r]);
    }
    if (q1 - q0 == 1) { /* one query: nothing to share, absorb() as it is */
        absorb(q_nope + q0 / S * qs + q0 % S * qss + h * hs, w_uk, w_bf16, h, N, C, ql);
        return;
    }
    float *qn = wf + C; /* the queries' q_nope[.., h] in fp32 [q1 - q0, N] */
    for (int64_t q = q0; q < q1; q++) {
        const uint16_t *src = q_nope + q / S * qs + q % S * qss + h * hs;
        for (int64_t n = 0; n < N; n++) qn[(q - q0) * N + n] = bf16_scalar(src[n]);
        for (int64_t c = 0; c < C; c++) ql[(q - q0) * ldq + c] = 0.0f;
    }
    for (int64_t n = 0; n < N; n++) { /* ql[q] += q[n] * w_uk[h, n, :] */
        const float *w = w_bf16 ? wf : (const float *)w_uk + (h * N + n) * C;
        if (w_bf16) {
            const uint16_t *wb = (const uint16_t *)w_uk + (h * N + n) * C;
            for (int64_t c = 0; c < C; c++) wf[c] = bf16_scalar(wb[c]);
        }
        for (int64_t q = q0; q < q1; q++) {
            const float qv = qn[(q - q0) * N + n];
            float *dst = ql + (q - q0) * ldq;
            for (int64_t c = 0; c < C; c++) dst[c] += qv * w[c];
        }
    }
}

/* y[q] = o[q - q0] @ w_uv[h] rounded to bf16 [V] (y rows ldy apart), for queries q0 <= q < q1 of one head (o rows
 * ldo apart): each row of w_uv[h] widened once for all of them, every sum in project()'s order. out: (q1 - q0 + 1)
 * * min(V, 512) floats of scratch. */
static void project_queries(const float *o, int64_t ldo, const void *w_uv, int w_bf16, int64_t h, int64_t C, int64_t V,
                            int64_t q0, int64_t q1, uint16_t *y, int64_t ldy, float *out) {
    const int64_t nq = q1 - q0;
    float *wf = out + nq * (V < 512 ? V : 512);
    if (nq == 1) { /* one query: nothing to share, project() as it is */
        project(o, w_uv, w_bf16, h, C, V, y + q0 * ldy);
        return;
    }
    for (int64_t j0 = 0; j0 < V; j0 += 512) { /* V is the value head dim (128 in V3); chunked for any */
        const int64_t len = V - j0 < 512 ? V - j0 : 512;
        for (int64_t i = 0; i < nq * len; i++) out[i] = 0.0f;
        for (int64_t c = 0; c < C; c++) { /* out[q] += o[q][c] * w_uv[h, c, :] */
            const float *w = w_bf16 ? wf : (const float *)w_uv + (h * C + c) * V + j0;
            if (w_bf16) {
                const uint16_t *wb = (const uint16_t *)w_uv + (h * C + c) * V + j0;
                for (int64_t j = 0; j < len; j++) wf[j] = bf16_scalar(wb[j]);
            }
            for (int64_t i = 0; i < nq; i++) {
                const float oc = o[i * ldo + c];
                float *dst = out + i * len;
                for (int64_t j = 0; j < len; j++) dst[j] += oc * w[j];
            }
        }
        for (int64_t i = 0; i < nq; i++)
            for (int64_t j = 0; j < len; j++) y[(q0 + i) * ldy + j0 + j] = to_bf16(out[i * len + j]);
    }
}
#endif

#if !defined(GROUPED)
/* one head over Tb keys (builds without AVX-512 or AVX2): o [C] fp32, normalized; s [Tb] scratch */
static void head_attention(const float *ql, const uint16_t *qp, const uint16_t *k0, const uint16_t *p0, int64_t Tb,
                           int64_t C, int64_t R, float scale, float *s, float *o) {
    float mx = -INFINITY, sum = 0.0f, qpf[256];
    for (int64_t r = 0; r < R && r < 256; r++) qpf[r] = bf16_scalar(qp[r]);
    for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
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
}
#endif

/* The absorbed MLA of S queries per sequence, projections included: for sequence b, query s and head h,
 * q_lat = q_nope[b, s, h] @ w_uk[h] (w_uk [H, N, C]), attention over the latent cache p = softmax(scale * (q_lat .
 * kv[b, t] + q_pe[b, s, h] . pe[b, t])) over t < T (or lens[b, s]) and o = sum_t p[t] kv[b, t], then y[b, s, h] =
 * o @ w_uv[h] (w_uv [H, C, V]), rounded to bf16 [B, S, H, V]. w_uk/w_uv are fp32 or bf16 (w_bf16). q_nope and
 * q_pe are bf16 with sequence strides qs/ps, query strides qss/pss and head strides hs/phs. rows (optional, [B]):
 * kv and pe are a whole slot cache and sequence b reads its slot rows[b] in place (the server's batches are any set
 * of slots; gathering them would copy every key of every row per layer).
 * With AVX-512 or AVX2 an item is a group of heads of one query over a chunk of its keys (KEY_CHUNK; the chunks of
 * a long context merged after): the group shares each key tile, and a key is read from memory once per group. The
 * chunks depend on the context only and each head's sums run in the same order whatever its group, so a row's
 * result does not depend on its batch. Where the projections outgrow the cache (dsv3_mla_share_bytes), those
 * through w_uk and w_uv go a head at a time over every query of a pass (absorb_queries, project_queries), before and
 * after the items: a verify step's or a batch's queries read each head's weights once, not once each (V3's dims,
 * weights from memory as 61 layers' 2 GB are, on a 2-core Xeon: 8 queries 1.3-1.5x, 2 queries 1.1-1.2x; one query
 * unchanged). The same sums either way. Other builds take one head over all its keys an item. */
void dsv3_mla_absorbed(const uint16_t *q_nope, int64_t qs, int64_t qss, int64_t hs, const uint16_t *q_pe, int64_t ps,
                       int64_t pss, int64_t phs, const void *w_uk, const void *w_uv, int w_bf16, const uint16_t *kv,
                       const uint16_t *pe, uint16_t *y, int64_t B, int64_t S, int64_t H, int64_t N, int64_t T, int64_t C,
                       int64_t R, int64_t V, int64_t kvs, int64_t pes, float scale, const int64_t *lens,
                       const int64_t *rows, int threads) {
    int64_t longest = lens ? 0 : T; /* the scratch a query needs: its keys' scores, at most the longest prefix */
    for (int64_t j = 0; lens && j < B * S; j++)
        if (lens[j] > longest) longest = lens[j];
#if defined(GROUPED)
    const int64_t Q = B * S, chunks = longest > KEY_CHUNK ? (longest + KEY_CHUNK - 1) / KEY_CHUNK : 1;
    int64_t G = GROUP_HEADS < H ? GROUP_HEADS : H; /* heads an item takes: fewer where items would leave threads idle */
    while (G > 4 && Q * ((H + G - 1) / G) * chunks < threads) G = (G + 1) / 2;
    const int64_t groups = (H + G - 1) / G, per_query = groups * chunks * G * (C + 2); /* floats of partial sums */
    const int64_t QS = dsv3_mla_part_floats / per_query > 1 ? dsv3_mla_part_floats / per_query : 1; /* a pass */
    const int64_t QP = QS < Q ? QS : Q, VC = V < 512 ? V : 512; /* queries a pass; value dims a projection chunk */
    float *ql = malloc((size_t)(QP * H * (C + R)) * sizeof(float)), *qp = ql + QP * H * C; /* the pass's queries */
    float *part = malloc((size_t)(QP * per_query) * sizeof(float)); /* per item: o [G, C], m, l [G] */
    float *ob = chunks > 1 ? malloc((size_t)(QP * H * C) * sizeof(float)) : NULL; /* merged o [nq, H, C] */
    const int64_t scratch = C + QP * N > (QP + 1) * VC ? C + QP * N : (QP + 1) * VC;
    /* the projections by head for all the pass's queries (phases around the items), or in the items themselves */
    const int phased = chunks > 1 || (Q > 1 && (H * N * C + H * C * V) * (w_bf16 ? 2 : 4) > dsv3_mla_share_bytes);
#pragma omp parallel num_threads(threads)
    {
        float *sc = malloc((size_t)(G * KEY_TILE + scratch) * sizeof(float)), *wf = sc + G * KEY_TILE;
        for (int64_t q0 = 0; q0 < Q; q0 += QS) { /* every thread takes every pass; the items of one are shared */
            const int64_t nq = Q - q0 < QS ? Q - q0 : QS;
            if (phased) {
#pragma omp for schedule(static)
                for (int64_t h = 0; h < H; h++) /* the latent queries, a head at a time: w_uk[h] read once a pass */
                    absorb_queries(q_nope, qs, qss, hs, q_pe, ps, pss, phs, w_uk, w_bf16, h, S, N, C, R, q0, q0 + nq,
                                   ql + h * C, qp + h * R, H * C, H * R, wf);
            }
#pragma omp for schedule(static)
            for (int64_t it = 0; it < nq * groups * chunks; it++) { /* item (query, group, chunk) */
                const int64_t q = q0 + it / (groups * chunks), h0 = it / chunks % groups * G, ch = it % chunks;
                const int64_t g = H - h0 < G ? H - h0 : G, Tb = lens ? lens[q] : T, b = q / S;
                const int64_t slot = rows ? rows[b] : b; /* a slot of the whole cache, read in place (not gathered) */
                const int64_t t0 = ch * KEY_CHUNK, t1 = chunks == 1 ? Tb : (t0 + KEY_CHUNK < Tb ? t0 + KEY_CHUNK : Tb);
                float *o = part + it * G * (C + 2), *m = o + G * C, *l = m + G;
                if (t0 >= t1) { /* a chunk past this query's keys: nothing */
                    for (int h = 0; h < g; h++) m[h] = -INFINITY, l[h] = 0.0f;
                    continue;
                }
                float *qlq = ql + ((q - q0) * H + h0) * C, *qpq = qp + ((q - q0) * H + h0) * R;
                if (!phased) /* this query's heads h0.. are the item's alone */
                    for (int64_t j = 0; j < g; j++)
                        absorb_queries(q_nope, qs, qss, hs, q_pe, ps, pss, phs, w_uk, w_bf16, h0 + j, S, N, C, R, q,
                                       q + 1, qlq + j * C, qpq + j * R, C, R, wf);
                group_attention(qlq, qpq, (int)g, kv + slot * kvs, pe + slot * pes, t0, t1, C, R, scale, sc, o, m, l);
                if (chunks == 1) /* the item is the query's heads h0.. whole: normalized where it lies */
                    for (int64_t j = 0; j < g; j++) {
                        for (int64_t c = 0; c < C; c++) o[j * C + c] /= l[j];
                        if (!phased)
                            project(o + j * C, w_uv, w_bf16, h0 + j, C, V, y + (q * H + h0 + j) * V);
                    }
            }
            if (!phased)
                continue;
            if (chunks > 1) {
#pragma omp for schedule(static)
                for (int64_t qh = 0; qh < nq * H; qh++) { /* the chunks merged and normalized */
                    const int64_t h = qh % H, it0 = (qh / H * groups + h / G) * chunks, j = h % G;
                    float top = -INFINITY, total = 0.0f, *o = ob + qh * C;
                    for (int64_t ch = 0; ch < chunks; ch++) {
                        const float mc = part[(it0 + ch) * G * (C + 2) + G * C + j];
                        top = mc > top ? mc : top;
                    }
                    for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
                    for (int64_t ch = 0; ch < chunks; ch++) {
                        const float *oc = part + (it0 + ch) * G * (C + 2), mc = oc[G * C + j], lc = oc[G * C + G + j];
                        if (lc == 0.0f) continue;
                        const float w = expf(mc - top);
                        total += lc * w;
                        for (int64_t c = 0; c < C; c++) o[c] += w * oc[j * C + c];
                    }
                    for (int64_t c = 0; c < C; c++) o[c] /= total;
                }
            }
#pragma omp for schedule(static)
            for (int64_t h = 0; h < H; h++) { /* to the value dims, a head at a time: w_uv[h] read once a pass */
                const float *o = chunks > 1 ? ob + h * C : part + h / G * G * (C + 2) + h % G * C;
                project_queries(o, chunks > 1 ? H * C : per_query, w_uv, w_bf16, h, C, V, q0, q0 + nq, y + h * V,
                                H * V, wf);
            }
        }
        free(sc);
    }
    free(ob);
    free(part);
    free(ql);
#else
#pragma omp parallel num_threads(threads)
    {
        float *ql = malloc((size_t)(2 * C + longest + 1) * sizeof(float)), *o = ql + C, *s = o + C;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H * S; bh++) { /* item (b, h, i): query i innermost */
            const int64_t b = bh / (H * S), h = bh / S % H, i = bh % S;
            const int64_t slot = rows ? rows[b] : b; /* a slot of the whole cache, read in place (no gathered copy) */
            const int64_t Tb = lens ? lens[b * S + i] : T; /* a query of a position step sees only its own prefix */
            absorb(q_nope + b * qs + i * qss + h * hs, w_uk, w_bf16, h, N, C, ql);
            head_attention(ql, q_pe + b * ps + i * pss + h * phs, kv + slot * kvs, pe + slot * pes, Tb, C, R, scale, s,
                           o);
            project(o, w_uv, w_bf16, h, C, V, y + ((b * S + i) * H + h) * V);
        }
        free(ql);
    }
#endif
}

/* y = e^x for n values x <= 0, as the attention's softmax takes them (v_exp with AVX-512 or AVX2, else expf): the
 * tests check its accuracy against float64 */
void dsv3_softmax_exp(const float *x, float *y, int64_t n) {
#if defined(GROUPED)
    for (int64_t i = 0; i < n; i += VL) v_store(y + i, v_exp(v_load(x + i, n - i)), n - i);
#else
    for (int64_t i = 0; i < n; i++) y[i] = expf(x[i]);
#endif
}
