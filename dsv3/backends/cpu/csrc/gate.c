/* The MoE gate's expert selection: scores, group-limited top-k, weights, in one call over all rows. */
#include "common.h"

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
