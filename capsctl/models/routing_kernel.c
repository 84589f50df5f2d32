/* A routed capsule layer (predictions u_hat_j|i = W_ij u_i, then routing by agreement, Sabour
 * et al. 2017, Procedure 1) and its backward on the CPU, in fp32.
 *
 * Layout. The children i are cut into NV = I / VL tiles of VL (I is padded by the caller with
 * children whose u and W are zero: they predict zero and change nothing), and every big array
 * is stored tile by tile, the VL children of a tile innermost: u^T[b][v][p][l], W[v][k][p][l],
 * the predictions of one example T[v][k][l] and their gradient (k = j*D + d, i = v*VL + l).
 * All work is then vector code over the VL children of a tile, and every pass over an array
 * walks it front to back. Logits and couplings are plain [j][i].
 *
 * Work. The predictions are made for a block of EB examples at a time (each vector of W is
 * loaded once per block), then each example is routed on its own: its predictions (K*I floats,
 * 737 KB at the paper's sizes) stay in the core's L2 cache for all the passes. The backward
 * recomputes them the same way, walks the passes back, and forms dL/du and dL/dW a block at a
 * time. The batch is split between OpenMP threads (torch's own pool when built with -fopenmp),
 * each with its own dL/dW.
 *
 * Legend: B batch, I children, J parents, D parent dims, K = J*D, P child dims, R passes,
 * v a tile of VL children, l a child in its tile, EB examples per block, x an example in it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SQUASH_EPS 1e-8f
#define EB 8     /* examples per block */
#define MAX_R 64 /* routing passes the kernel takes (the caller checks) */
#define VL 16    /* children per tile: one vector (GNU C vectors: 1 AVX-512, 2 AVX2, 4 NEON) */

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vsplat(float x) { vf v = {0}; return v + x; }
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

static inline vf vmax(vf a, vf b) {  /* lane-wise max (a > b picks a) */
    vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}

/* exp for x <= 0, lane-wise: Cephes' expf (the softmax's, after subtracting the max) */
static inline vf vexp_nonpos(vf x) {
    x = vmax(x, vsplat(-87.0f));
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round(x / ln 2) */
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)e;
}

static inline float vsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}

/* v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), the same formula as capsules.squash */
static inline void squash(const float *s, float *v, int D) {
    float sq = 0.0f;
    for (int d = 0; d < D; d++) sq += s[d] * s[d];
    float f = sq / (1.0f + sq) / sqrtf(sq + SQUASH_EPS);
    for (int d = 0; d < D; d++) v[d] = s[d] * f;
}

/* g_s = d squash(s) / d s applied to g_v */
static inline void squash_grad(const float *s, const float *g_v, float *g_s, int D) {
    float sq = 0.0f, sg = 0.0f;
    for (int d = 0; d < D; d++) { sq += s[d] * s[d]; sg += s[d] * g_v[d]; }
    float rt = sqrtf(sq + SQUASH_EPS), one = 1.0f + sq;
    float f = sq / one / rt;
    float df = 1.0f / (one * one * rt) - sq / (2.0f * one * (sq + SQUASH_EPS) * rt);
    for (int d = 0; d < D; d++) g_s[d] = f * g_v[d] + 2.0f * df * sg * s[d];
}

/* T_x[v][k] = sum_p W[v][k][p] u_x[v][p] for the nb examples of a block (T: nb x I x K,
 * tiled); each vector of W is loaded once for the block */
static inline __attribute__((always_inline)) void
predict_block(const float *uT, const float *W, int I, int K, int P, int nb, float *T) {
    size_t KI = (size_t)K * I, PI = (size_t)P * I;
    for (int i = 0; i < I; i += VL) {
        const float *Wv = W + (size_t)i * K * P;
        for (int k = 0; k < K; k++) {
            const float *Wk = Wv + (size_t)k * P * VL;
            int x = 0;
            for (; x + 4 <= nb; x += 4) {
                const float *u = uT + x * PI + (size_t)i * P;
                vf a0 = vsplat(0.0f), a1 = a0, a2 = a0, a3 = a0;
                for (int p = 0; p < P; p++) {
                    vf w = vload(Wk + p * VL);
                    a0 += w * vload(u + p * VL);
                    a1 += w * vload(u + PI + p * VL);
                    a2 += w * vload(u + 2 * PI + p * VL);
                    a3 += w * vload(u + 3 * PI + p * VL);
                }
                float *t = T + x * KI + ((size_t)i * K + (size_t)k * VL);
                vstore(t, a0);
                vstore(t + KI, a1);
                vstore(t + 2 * KI, a2);
                vstore(t + 3 * KI, a3);
            }
            for (; x < nb; x++) {
                const float *u = uT + x * PI + (size_t)i * P;
                vf a = vsplat(0.0f);
                for (int p = 0; p < P; p++) a += vload(Wk + p * VL) * vload(u + p * VL);
                vstore(T + x * KI + ((size_t)i * K + (size_t)k * VL), a);
            }
        }
    }
}

/* Routing, one example: predictions T (tiled) -> v (J*D); couplings c_r (J x I) and pre-squash
 * sums s_r (J*D) of every pass at c + r*c_rs, s + r*s_rs. Each pass walks T once, a tile at a
 * time: agreement with the previous pass's v into the logits L (J x I), softmax over the
 * parents, weighted sums into acc (K vectors, reduced at the end of the pass). */
static inline __attribute__((always_inline)) void
route_one(const float *T, int I, int J, int D, int R, const float *bias, float *v, float *c,
          size_t c_rs, float *s, size_t s_rs, float *L, vf *acc) {
    int K = J * D;
    for (int r = 0; r < R; r++) {
        float *c_r = c + r * c_rs;
        for (int k = 0; k < K; k++) acc[k] = vsplat(0.0f);
        for (int i = 0; i < I; i += VL) {
            const float *Tv = T + (size_t)i * K;
            vf m = vsplat(0.0f), sum = m;
            if (r == 0) {  /* b = 0: c = 1/J */
                for (int j = 0; j < J; j++) vstore(c_r + (size_t)j * I + i, vsplat(1.0f / J));
                for (int j = 0; j < J; j++) vstore(L + (size_t)j * I + i, vsplat(0.0f));
            } else {       /* b += u_hat . v_{r-1}; c = softmax over j of b */
                for (int j = 0; j < J; j++) {
                    vf a = vload(L + (size_t)j * I + i);
                    for (int d = 0; d < D; d++) a += v[j * D + d] * vload(Tv + (j * D + d) * VL);
                    vstore(L + (size_t)j * I + i, a);
                    m = j == 0 ? a : vmax(a, m);
                }
                for (int j = 0; j < J; j++) {
                    vf e = vexp_nonpos(vload(L + (size_t)j * I + i) - m);
                    vstore(c_r + (size_t)j * I + i, e);
                    sum += e;
                }
                for (int j = 0; j < J; j++)
                    vstore(c_r + (size_t)j * I + i, vload(c_r + (size_t)j * I + i) / sum);
            }
            for (int j = 0; j < J; j++) {  /* s_j += c_ij u_hat_j|i */
                vf cj = vload(c_r + (size_t)j * I + i);
                for (int d = 0; d < D; d++) acc[j * D + d] += cj * vload(Tv + (j * D + d) * VL);
            }
        }
        float *s_r = s + r * s_rs;
        for (int k = 0; k < K; k++) s_r[k] = bias ? vsum(acc[k]) + bias[k] : vsum(acc[k]);
        for (int j = 0; j < J; j++) squash(s_r + j * D, v + j * D, D);
    }
}

/* Forward for examples e0..e1-1 of the batch: uT (B x P x I tiled), W (K x P x I tiled), bias
 * (K) or NULL. Writes v (B x J x D), c (R x B x J x I), s (R x B x J x D). */
static inline __attribute__((always_inline)) int
layer_forward(const float *uT, const float *W, int B, int I, int J, int D, int P, int R,
              const float *bias, int e0, int e1, float *v, float *c, float *s) {
    int K = J * D;
    size_t KI = (size_t)K * I, JI = (size_t)J * I, PI = (size_t)P * I;
    vf *vacc = aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)K);
    float *T = malloc(sizeof(float) * (EB * KI + JI));
    if (!T || !vacc) { free(T); free(vacc); return -1; }
    float *L = T + EB * KI;
    for (int b0 = e0; b0 < e1; b0 += EB) {
        int nb = e1 - b0 < EB ? e1 - b0 : EB;
        predict_block(uT + (size_t)b0 * PI, W, I, K, P, nb, T);
        for (int x = 0; x < nb; x++) {
            int b = b0 + x;
            route_one(T + x * KI, I, J, D, R, bias, v + (size_t)b * K, c + (size_t)b * JI,
                      (size_t)B * JI, s + (size_t)b * K, (size_t)B * K, L, vacc);
        }
    }
    free(T);
    free(vacc);
    return 0;
}

/* Routing backward, one example: from g_v (J*D), the predictions T and the forward's c_r, s_r,
 * fills G[r] (r = 1..R-1: dL/db summed over the passes >= r, J x I), gs[r] (dL/ds_r, J*D) and
 * vr[r] (v_r, J*D), from which dL/du_hat follows (``gradient_rows``). Each pass back walks T
 * once, a tile at a time: dL/dc = u_hat . g_s, the softmax's backward into dL/db, and the
 * weighted sums of u_hat by dL/db that give the previous pass's dL/dv. gc: J vectors, acc: K
 * vectors of scratch. */
static inline __attribute__((always_inline)) void
route_one_backward(const float *T, int I, int J, int D, int R, const float *c, size_t c_rs,
                   const float *s, size_t s_rs, const float *g_v, float *G, float *gs,
                   float *vr, float *gv, vf *gc, vf *acc) {
    int K = J * D;
    size_t JI = (size_t)J * I;
    for (int r = 0; r + 1 < R; r++)
        for (int j = 0; j < J; j++) squash(s + r * s_rs + j * D, vr + r * K + j * D, D);
    for (int j = 0; j < J; j++)
        squash_grad(s + (R - 1) * s_rs + j * D, g_v + j * D, gs + (R - 1) * K + j * D, D);
    for (int r = R - 1; r >= 1; r--) {
        const float *c_r = c + r * c_rs, *gs_r = gs + r * K;
        float *Grun = G + JI, *Gr = G + r * JI;  /* the running sum is kept in G[1] */
        for (int k = 0; k < K; k++) acc[k] = vsplat(0.0f);
        for (int i = 0; i < I; i += VL) {
            const float *Tv = T + (size_t)i * K;
            vf t = vsplat(0.0f);
            for (int j = 0; j < J; j++) {  /* dL/dc = u_hat . g_s */
                vf a = vsplat(0.0f);
                for (int d = 0; d < D; d++) a += gs_r[j * D + d] * vload(Tv + (j * D + d) * VL);
                gc[j] = a;
                t += vload(c_r + (size_t)j * I + i) * a;
            }
            for (int j = 0; j < J; j++) {  /* dL/db = c (dL/dc - sum_j c dL/dc) */
                vf g = vload(c_r + (size_t)j * I + i) * (gc[j] - t);
                if (r < R - 1) g += vload(Grun + (size_t)j * I + i);
                vstore(Grun + (size_t)j * I + i, g);
                if (r > 1) vstore(Gr + (size_t)j * I + i, g);
                for (int d = 0; d < D; d++) acc[j * D + d] += g * vload(Tv + (j * D + d) * VL);
            }
        }
        for (int k = 0; k < K; k++) gv[k] = vsum(acc[k]);  /* dL/dv of the previous pass */
        for (int j = 0; j < J; j++)
            squash_grad(s + (r - 1) * s_rs + j * D, gv + j * D, gs + (r - 1) * K + j * D, D);
    }
}

/* dL/du_hat of one example, tiled like the predictions: gT[v][j*D + d][l] =
 * sum_r c_r[j][i] gs_r[j][d] + sum_{r < R-1} G[r+1][j][i] v_r[j][d]  (i = v*VL + l) */
static inline __attribute__((always_inline)) void
gradient_rows(int I, int J, int D, int R, const float *c, size_t c_rs, const float *G,
              const float *gs, const float *vr, float *gT) {
    int K = J * D, n = 2 * R - 1;
    size_t JI = (size_t)J * I;
    for (int i = 0; i < I; i += VL) {
        float *gv = gT + (size_t)i * K;
        for (int j = 0; j < J; j++) {
            vf xv[2 * MAX_R];
            const float *y[2 * MAX_R];
            for (int r = 0; r < R; r++) {
                xv[r] = vload(c + r * c_rs + (size_t)j * I + i);
                y[r] = gs + r * K + j * D;
            }
            for (int r = 0; r + 1 < R; r++) {
                xv[R + r] = vload(G + (r + 1) * JI + (size_t)j * I + i);
                y[R + r] = vr + r * K + j * D;
            }
            for (int d = 0; d < D; d++) {
                vf a = xv[0] * y[0][d];
                for (int t = 1; t < n; t++) a += xv[t] * y[t][d];
                vstore(gv + (size_t)(j * D + d) * VL, a);
            }
        }
    }
}

/* Backward for examples e0..e1-1, a block of EB at a time: recomputes the block's predictions,
 * routes each example back from g_v (B x J x D) into dL/du_hat (gT, tiled like T), then writes
 * dL/du_x[v][p] = sum_k W[v][k][p] gT_x[v][k] into g_uT (B x P x I tiled) and ADDS
 * dL/dW[v][k][p] += sum_x gT_x[v][k] u_x[v][p] into g_W (K x P x I tiled, this thread's own).
 * dL/ds of every pass goes to g_s (R x B x J x D). */
static inline __attribute__((always_inline)) int
layer_backward(const float *uT, const float *W, int B, int I, int J, int D, int P, int R,
               int e0, int e1, const float *c, const float *s, const float *g_v, float *g_uT,
               float *g_W, float *g_s) {
    int K = J * D;
    size_t KI = (size_t)K * I, JI = (size_t)J * I, PI = (size_t)P * I;
    size_t per_example = (size_t)R * JI + 2 * (size_t)R * K;  /* G, gs, vr */
    size_t nz = (size_t)(K > P ? K : P) * VL;
    vf *vacc = aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)(K + J));
    float *T = malloc(sizeof(float) * (2 * EB * KI + per_example + K + nz));
    if (!T || !vacc) { free(T); free(vacc); return -1; }
    float *gT = T + EB * KI, *G = gT + EB * KI, *gs = G + (size_t)R * JI;
    float *vr = gs + (size_t)R * K, *gv = vr + (size_t)R * K, *zeros = gv + K;
    memset(zeros, 0, sizeof(float) * nz);
    for (int b0 = e0; b0 < e1; b0 += EB) {
        int nb = e1 - b0 < EB ? e1 - b0 : EB;
        const float *u0 = uT + (size_t)b0 * PI;
        predict_block(u0, W, I, K, P, nb, T);
        for (int x = 0; x < nb; x++) {
            int b = b0 + x;
            route_one_backward(T + x * KI, I, J, D, R, c + (size_t)b * JI, (size_t)B * JI,
                               s + (size_t)b * K, (size_t)B * K, g_v + (size_t)b * K, G, gs, vr,
                               gv, vacc + K, vacc);
            gradient_rows(I, J, D, R, c + (size_t)b * JI, (size_t)B * JI, G, gs, vr,
                          gT + x * KI);
            for (int r = 0; r < R; r++)
                memcpy(g_s + (size_t)r * B * K + (size_t)b * K, gs + r * K, sizeof(float) * K);
        }
        /* Tile by tile, EB examples at once (missing ones read zeros): dL/du, then dL/dW; the
         * tile's W, gT and dL/dW (K*P and K vectors) stay in L2 between the two. */
        for (int i = 0; i < I; i += VL) {
            const float *Wv = W + (size_t)i * K * P, *gx[EB], *ux[EB];
            float *gWv = g_W + (size_t)i * K * P;
            for (int x = 0; x < EB; x++) {
                gx[x] = x < nb ? gT + x * KI + (size_t)i * K : zeros;
                ux[x] = x < nb ? u0 + x * PI + (size_t)i * P : zeros;
            }
            for (int x0 = 0; x0 < EB; x0 += 4) {  /* dL/du: 4 examples x 4 p per walk */
                for (int p0 = 0; p0 < P; p0 += 4) {
                    int np = P - p0 < 4 ? P - p0 : 4;
                    vf a[4][4];
                    for (int x = 0; x < 4; x++)
                        for (int q = 0; q < 4; q++) a[x][q] = vsplat(0.0f);
                    for (int k = 0; k < K; k++) {
                        vf g[4];
                        for (int x = 0; x < 4; x++) g[x] = vload(gx[x0 + x] + (size_t)k * VL);
                        const float *w = Wv + ((size_t)k * P + p0) * VL;
                        for (int q = 0; q < np; q++) {
                            vf wq = vload(w + q * VL);
                            for (int x = 0; x < 4; x++) a[x][q] += wq * g[x];
                        }
                    }
                    for (int x = 0; x < 4 && x0 + x < nb; x++)
                        for (int q = 0; q < np; q++)
                            vstore(g_uT + (size_t)(b0 + x0 + x) * PI + (size_t)i * P +
                                   (size_t)(p0 + q) * VL, a[x][q]);
                }
            }
            for (int k = 0; k < K; k++) {
                vf g[EB];
                for (int x = 0; x < EB; x++) g[x] = vload(gx[x] + (size_t)k * VL);
                float *w = gWv + (size_t)k * P * VL;
                for (int p = 0; p < P; p++) {
                    vf a = vload(w + p * VL);
                    for (int x = 0; x < EB; x++) a += g[x] * vload(ux[x] + p * VL);
                    vstore(w + p * VL, a);
                }
            }
        }
    }
    free(T);
    free(vacc);
    return 0;
}

/* This thread's number t and its share e0..e1-1 of the B examples (contiguous, nearly equal),
 * inside a parallel region; the whole batch and t = 0 without OpenMP. */
static void my_share(int B, int *t, int *e0, int *e1) {
    int nth = 1;
    *t = 0;
#ifdef _OPENMP
    *t = omp_get_thread_num();
    nth = omp_get_num_threads();
#endif
    *e0 = (int)((long)B * *t / nth);
    *e1 = (int)((long)B * (*t + 1) / nth);
}

#ifdef _OPENMP
#define PARALLEL _Pragma("omp parallel num_threads(nthreads) reduction(| : err)")
#else
#define PARALLEL
#endif

/* The exported entry points. They run on ``nthreads`` OpenMP threads (the same runtime and
 * threads as torch's when the library is built with -fopenmp; one thread otherwise), each on its
 * own range of examples. D = 16 (the paper's class capsules) and P = 8 get code compiled for
 * those constants, any other sizes the general loops. Return 0, or -1 when out of memory. */
int capsctl_layer_forward(const float *uT, const float *W, int B, int I, int J, int D, int P,
                          int R, const float *bias, int nthreads, float *v, float *c,
                          float *s) {
    int err = 0;
    PARALLEL
    {
        int t, e0, e1;
        my_share(B, &t, &e0, &e1);
        if (D == 16 && P == 8)
            err |= layer_forward(uT, W, B, I, J, 16, 8, R, bias, e0, e1, v, c, s);
        else
            err |= layer_forward(uT, W, B, I, J, D, P, R, bias, e0, e1, v, c, s);
    }
    (void)nthreads;
    return err ? -1 : 0;
}

/* g_W: nthreads buffers of K*P*I, zeroed by the caller; thread t adds its examples' share into
 * buffer t (the caller sums them). */
int capsctl_layer_backward(const float *uT, const float *W, int B, int I, int J, int D, int P,
                           int R, int nthreads, const float *c, const float *s, const float *g_v,
                           float *g_uT, float *g_W, float *g_s) {
    int err = 0;
    PARALLEL
    {
        int t, e0, e1;
        my_share(B, &t, &e0, &e1);
        float *gW = g_W + (size_t)t * J * D * P * I;
        if (D == 16 && P == 8)
            err |= layer_backward(uT, W, B, I, J, 16, 8, R, e0, e1, c, s, g_v, g_uT, gW, g_s);
        else
            err |= layer_backward(uT, W, B, I, J, D, P, R, e0, e1, c, s, g_v, g_uT, gW, g_s);
    }
    (void)nthreads;
    return err ? -1 : 0;
}
