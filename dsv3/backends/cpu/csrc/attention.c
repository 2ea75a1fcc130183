/* The absorbed MLA attention of a few queries per sequence over the latent cache. */
#include "common.h"

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
