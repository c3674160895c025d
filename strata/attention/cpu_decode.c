/* Paged decode attention for CPU: one query token per sequence, read straight from the
 * pool's pages (no gather), online softmax in float32, grouped-query heads.
 *
 * Layouts (one layer of the pool): k, v [pages, page_size, kv_heads, head_dim], each page
 * one dense block, page_stride elements from one page to the next (the pool is page-major:
 * a page holds every layer); q, out [batch, heads, head_dim];
 * page_table [batch, table_width] int64; seq_lens [batch] int64.
 * Work items are (sequence, split): a split is a range of pages, so a short batch with a
 * long context still keeps every thread busy; splits are merged by log-sum-exp.
 * Built and loaded by strata/attention/cpu_kernels.py; the oracle is reference.paged_decode.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADS 128
#define MAX_DIM 256
#define MAX_PAGE 64

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u); /* NaN */
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* exp for x <= 0 (softmax weights), vectorisable under omp simd: 2^n * p(r) with
 * x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative error ~2e-7); x < -87 gives 0. */
#pragma omp declare simd notinbranch
static inline float exp_neg(float x) {
    const float xc = x < -87.f ? -87.f : x;
    const float n = __builtin_roundf(xc * 1.44269504f);
    const float r = xc - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    union { uint32_t u; float f; } e;
    e.u = (uint32_t)((int32_t)n + 127) << 23;
    return x < -87.f ? 0.f : p * e.f;
}

/* One work item: every query head of one sequence over its pages [p0, p1). A page of one
 * layer is one contiguous block ([page_size, kv_heads, D]), read front to back while the
 * next page is prefetched. Leaves unnormalised acc [heads, D], running max m and sum l
 * [heads]. Per page: scores of every head for the page's tokens, one max and one vector exp
 * per head, then each V row is converted once and added to the g heads that read it.
 * DIM is a compile-time head_dim for the common sizes (full unrolling), else `d`. */
#define DEFINE_PARTIAL(NAME, T, LOAD, DIM)                                                    \
    static void NAME(const float *qf, const T *k, const T *v, const int64_t *pages,           \
                     int64_t p0, int64_t p1, int64_t len, int64_t pstride, int ps, int kvh,   \
                     int d, int g, float *acc, float *m, float *l) {                          \
        const int heads = kvh * g;                                                            \
        const int64_t page_elems = (int64_t)ps * kvh * DIM;                                   \
        float kf[MAX_DIM], vf[MAX_DIM], s[MAX_HEADS][MAX_PAGE];                               \
        for (int i = 0; i < heads; i++) { m[i] = -INFINITY; l[i] = 0.f; }                     \
        memset(acc, 0, sizeof(float) * heads * DIM);                                          \
        for (int64_t p = p0; p < p1; p++) {                                                   \
            const int n = (int)((len - p * ps) < ps ? (len - p * ps) : ps);                   \
            const T *kp = k + pages[p] * pstride, *vp = v + pages[p] * pstride;               \
            if (p + 1 < p1) {                                                                 \
                const char *nk = (const char *)(k + pages[p + 1] * pstride);                  \
                const char *nv = (const char *)(v + pages[p + 1] * pstride);                  \
                for (int64_t o = 0; o < page_elems * (int64_t)sizeof(T); o += 64) {           \
                    __builtin_prefetch(nk + o);                                               \
                    __builtin_prefetch(nv + o);                                               \
                }                                                                             \
            }                                                                                 \
            for (int t = 0; t < n; t++) {                                                     \
                for (int h = 0; h < kvh; h++) {                                               \
                    const T *kr = kp + ((int64_t)t * kvh + h) * DIM;                          \
                    _Pragma("omp simd") for (int j = 0; j < DIM; j++) kf[j] = LOAD(kr[j]);    \
                    for (int i = h * g; i < (h + 1) * g; i++) {                               \
                        const float *qi = qf + i * DIM;                                       \
                        float dot = 0.f;                                                      \
                        _Pragma("omp simd reduction(+ : dot)") for (int j = 0; j < DIM; j++)  \
                            dot += qi[j] * kf[j];                                             \
                        s[i][t] = dot;                                                        \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
            for (int i = 0; i < heads; i++) {                                                 \
                float *si = s[i], mx = m[i], sum = 0.f;                                       \
                _Pragma("omp simd reduction(max : mx)") for (int t = 0; t < n; t++)           \
                    mx = si[t] > mx ? si[t] : mx;                                             \
                _Pragma("omp simd reduction(+ : sum)") for (int t = 0; t < n; t++) {          \
                    si[t] = exp_neg(si[t] - mx);                                              \
                    sum += si[t];                                                             \
                }                                                                             \
                const float corr = exp_neg(m[i] - mx);                                        \
                float *ai = acc + i * DIM;                                                    \
                l[i] = l[i] * corr + sum;                                                     \
                _Pragma("omp simd") for (int j = 0; j < DIM; j++) ai[j] *= corr;              \
                m[i] = mx;                                                                    \
            }                                                                                 \
            for (int t = 0; t < n; t++) {                                                     \
                for (int h = 0; h < kvh; h++) {                                               \
                    const T *vr = vp + ((int64_t)t * kvh + h) * DIM;                          \
                    _Pragma("omp simd") for (int j = 0; j < DIM; j++) vf[j] = LOAD(vr[j]);    \
                    for (int i = h * g; i < (h + 1) * g; i++) {                               \
                        const float w = s[i][t];                                              \
                        float *ai = acc + i * DIM;                                            \
                        _Pragma("omp simd") for (int j = 0; j < DIM; j++) ai[j] += w * vf[j]; \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

#define LOAD_F32(x) (x)
#define LOAD_BF16(x) bf16_to_f32(x)
DEFINE_PARTIAL(partial_f32, float, LOAD_F32, d)
DEFINE_PARTIAL(partial_bf16, uint16_t, LOAD_BF16, d)
DEFINE_PARTIAL(partial_f32_64, float, LOAD_F32, 64)
DEFINE_PARTIAL(partial_bf16_64, uint16_t, LOAD_BF16, 64)
DEFINE_PARTIAL(partial_f32_128, float, LOAD_F32, 128)
DEFINE_PARTIAL(partial_bf16_128, uint16_t, LOAD_BF16, 128)

typedef void (*partial_fn)(const float *, const void *, const void *, const int64_t *, int64_t,
                           int64_t, int64_t, int64_t, int, int, int, int, float *, float *,
                           float *);

static partial_fn pick(int dtype, int d) {
    if (d == 64) return (partial_fn)(dtype ? (void *)partial_bf16_64 : (void *)partial_f32_64);
    if (d == 128) return (partial_fn)(dtype ? (void *)partial_bf16_128 : (void *)partial_f32_128);
    return (partial_fn)(dtype ? (void *)partial_bf16 : (void *)partial_f32);
}

/* dtype: 0 float32, 1 bfloat16 (q, k, v and out share it). Returns 0, or -1 on shapes this
 * kernel does not take (the caller then uses the torch reference). */
int paged_decode(int dtype, const void *q, const void *k, const void *v, void *out,
                 const int64_t *page_table, const int64_t *seq_lens, int batch, int table_width,
                 int heads, int kv_heads, int head_dim, int page_size, int64_t page_stride,
                 float scale, int splits) {
    const int g = heads / kv_heads, d = head_dim;
    if (heads > MAX_HEADS || d > MAX_DIM || page_size > MAX_PAGE || heads % kv_heads) return -1;
    if (splits < 1) splits = 1;
    const partial_fn partial = pick(dtype, d);
    const int64_t items = (int64_t)batch * splits;
    /* per item: acc [heads, d], m [heads], l [heads] */
    const int64_t stride = (int64_t)heads * d + 2 * heads;
    float *work = (float *)malloc(sizeof(float) * items * stride);
    if (!work) return -1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        const int b = (int)(it / splits), sp = (int)(it % splits);
        const int64_t len = seq_lens[b], npages = (len + page_size - 1) / page_size;
        const int64_t per = (npages + splits - 1) / splits;
        const int64_t p0 = sp * per, p1 = (p0 + per) < npages ? (p0 + per) : npages;
        float *acc = work + it * stride, *m = acc + (int64_t)heads * d, *l = m + heads;
        float *qf = (float *)malloc(sizeof(float) * heads * d);
        const int64_t qoff = (int64_t)b * heads * d;
        for (int j = 0; j < heads * d; j++)
            qf[j] = scale * (dtype ? bf16_to_f32(((const uint16_t *)q)[qoff + j])
                                   : ((const float *)q)[qoff + j]);
        if (p0 >= p1) {
            for (int i = 0; i < heads; i++) { m[i] = -INFINITY; l[i] = 0.f; }
            memset(acc, 0, sizeof(float) * heads * d);
        } else {
            partial(qf, k, v, page_table + (int64_t)b * table_width, p0, p1, len, page_stride,
                    page_size, kv_heads, d, g, acc, m, l);
        }
        free(qf);
    }
    /* merge the splits of every sequence and write out */
#pragma omp parallel for
    for (int64_t bh = 0; bh < (int64_t)batch * heads; bh++) {
        const int b = (int)(bh / heads), i = (int)(bh % heads);
        float mx = -INFINITY;
        for (int sp = 0; sp < splits; sp++) {
            const float mi = work[((int64_t)b * splits + sp) * stride + (int64_t)heads * d + i];
            mx = mi > mx ? mi : mx;
        }
        float o[MAX_DIM], total = 0.f;
        for (int j = 0; j < d; j++) o[j] = 0.f;
        for (int sp = 0; sp < splits; sp++) {
            const float *acc = work + ((int64_t)b * splits + sp) * stride;
            const float mi = acc[(int64_t)heads * d + i], li = acc[(int64_t)heads * d + heads + i];
            if (li == 0.f) continue;
            const float w = exp_neg(mi - mx);
            total += w * li;
            for (int j = 0; j < d; j++) o[j] += w * acc[i * d + j];
        }
        for (int j = 0; j < d; j++) {
            const float val = o[j] / total;
            if (dtype) ((uint16_t *)out)[bh * d + j] = f32_to_bf16(val);
            else ((float *)out)[bh * d + j] = val;
        }
    }
    free(work);
    return 0;
}
