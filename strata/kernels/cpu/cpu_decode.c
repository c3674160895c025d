/* Paged decode attention for CPU: one query token per sequence, read straight from the
 * pool's pages (no gather), online softmax in float32, grouped-query heads.
 *
 * Layouts (one layer of the pool): k, v [pages, page_size, kv_heads, head_dim], each page
 * one dense block, page_stride elements from one page to the next (the pool is page-major:
 * a page holds every layer); q, out [batch, heads, head_dim];
 * page_table [batch, table_width] int64; seq_lens [batch] int64.
 * Work items are (sequence, split): a split is a range of pages, so a short batch with a
 * long context still keeps every thread busy; splits are merged by log-sum-exp.
 * Built and loaded by strata/kernels/cpu/attention.py; the oracle is reference.paged_decode.
 */
#define _GNU_SOURCE /* syscall(), for AMX */
#include "cpu_common.h"
#include <omp.h>

/* The decode inner loops (and the helpers they inline) may reassociate float sums: GCC then
 * vectorises the page loops fully (2.2x faster at 630 tokens of context, measured). The
 * sums are over one token's head_dim or one page's tokens, where `omp simd` reductions
 * reassociate anyway; the rest of this file (norms that must round as torch does) keeps
 * strict IEEE order. */
#pragma GCC push_options
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math", "fp-contract=fast")


/* One work item: every query head of one sequence over its pages [p0, p1). A page of one
 * layer is one contiguous block ([page_size, kv_heads, D]), read front to back while the
 * next page is prefetched. Leaves unnormalised acc [heads, D], running max m and sum l
 * [heads]. Per page: scores of every head for the page's tokens, one max and one vector exp
 * per head, then each V row is converted once and added to the g heads that read it.
 * DIM is a compile-time head_dim for the common sizes (full unrolling), else `d`. */
#define DEFINE_PARTIAL(NAME, T, LOAD, DIM)                                                    \
    static void NAME(const float *qf, const T *k, const T *v, const int64_t *pages,           \
                     int64_t p0, int64_t p1, int64_t len, int64_t pstride, int ps, int kvh,   \
                     int64_t row, int d, int g, float *acc, float *m, float *l, float cap,    \
                     int64_t lo) {                                                            \
        const int heads = kvh * g;                                                            \
        float kf[MAX_DIM], vf[MAX_DIM], s[MAX_HEADS][MAX_PAGE];                               \
        for (int i = 0; i < heads; i++) { m[i] = -INFINITY; l[i] = 0.f; }                     \
        memset(acc, 0, sizeof(float) * heads * DIM);                                          \
        for (int64_t p = p0; p < p1; p++) {                                                   \
            const int n = (int)((len - p * ps) < ps ? (len - p * ps) : ps);                   \
            const T *kp = k + pages[p] * pstride, *vp = v + pages[p] * pstride;               \
            /* the next page (or this one again on the last): each token's K and V rows of  \
             * these heads are prefetched as the same token of this page is read, so the    \
             * loads spread over the compute rather than stalling in a burst */             \
            const int64_t next = p + 1 < p1 ? pages[p + 1] : pages[p];                        \
            const char *nk = (const char *)(k + next * pstride);                              \
            const char *nv = (const char *)(v + next * pstride);                              \
            const int64_t span = (int64_t)kvh * DIM * sizeof(T), rbytes = row * sizeof(T);   \
            for (int t = 0; t < n; t++) {                                                     \
                for (int64_t o = 0; o < span; o += 64) __builtin_prefetch(nk + t * rbytes + o); \
                for (int h = 0; h < kvh; h++) {                                               \
                    const T *kr = kp + (int64_t)t * row + (int64_t)h * DIM;                    \
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
            if (cap > 0.f || p * ps < lo) /* Gemma 2's soft cap; a sliding window's start */  \
                for (int i = 0; i < heads; i++)                                               \
                    for (int t = 0; t < n; t++)                                               \
                        s[i][t] = p * ps + t < lo ? -INFINITY                                 \
                                  : cap > 0.f     ? cap * tanhf(s[i][t] / cap)                \
                                                  : s[i][t];                                  \
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
                for (int64_t o = 0; o < span; o += 64) __builtin_prefetch(nv + t * rbytes + o); \
                for (int h = 0; h < kvh; h++) {                                               \
                    const T *vr = vp + (int64_t)t * row + (int64_t)h * DIM;                    \
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
#pragma GCC pop_options

#if defined(__AVX512F__)
/* bfloat16 pages with AVX-512 (page_size <= 16, head_dim 64 or 128): the same work item as
 * DEFINE_PARTIAL, arranged so no dot product ends in its own horizontal sum and no
 * accumulator round-trips through memory per token. Per page and block of up to HB query
 * heads of one KV head: each K row is converted once and multiplied into HB x 16-lane
 * partial sums; one transposing reduction (sum16) turns a head's 16 partial vectors into its
 * 16 scores; then each V row is converted once and accumulated into the block's output rows,
 * held in registers over the page. HB * D / 16 vectors of q and of acc stay in registers.
 * The next page is prefetched a token row at a time as this page's rows are scored, each KV
 * head's scoring taking its share of the row, into L2: a burst of every line at the page's
 * start stalled on the fill buffers (4-6% slower, measured); the whole row at the first
 * head's scoring, into L1, was 7-10% slower than this at 16 x 170 tokens (3.74 against
 * 3.32-3.40 ms of attention a step); two pages ahead, or into L3 only, no better. */
/* a[t] holds token t's 16 partial sums; returns the vector whose lane t is a[t]'s total */
static inline __m512 sum16(const __m512 *a) {
    __m512 x[8], y[4], z[2];
    for (int t = 0; t < 8; t++)
        x[t] = _mm512_add_ps(_mm512_shuffle_f32x4(a[t], a[t + 8], 0x44),
                             _mm512_shuffle_f32x4(a[t], a[t + 8], 0xEE));
    for (int t = 0; t < 4; t++)
        y[t] = _mm512_add_ps(_mm512_shuffle_f32x4(x[t], x[t + 4], 0x88),
                             _mm512_shuffle_f32x4(x[t], x[t + 4], 0xDD));
    for (int t = 0; t < 2; t++)
        z[t] = _mm512_add_ps(_mm512_shuffle_ps(y[t], y[t + 2], 0x44),
                             _mm512_shuffle_ps(y[t], y[t + 2], 0xEE));
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88),
                                   _mm512_shuffle_ps(z[0], z[1], 0xDD));
    /* lane L of r holds token order[L]'s total */
    const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(order, r);
}

#define DEFINE_PARTIAL512(NAME, D, HB)                                                        \
    static void NAME(const float *qf, const uint16_t *k, const uint16_t *v,                   \
                     const int64_t *pages, int64_t p0, int64_t p1, int64_t len,              \
                     int64_t pstride, int ps, int kvh, int64_t row, int d, int g, float *acc, \
                     float *m, float *l, float cap, int64_t lo) {                             \
        enum { C = (D) / 16 };                                                                \
        (void)d, (void)cap, (void)lo; /* picked only without a cap or a window */             \
        const int heads = kvh * g;                                                            \
        for (int i = 0; i < heads; i++) { m[i] = -INFINITY; l[i] = 0.f; }                     \
        memset(acc, 0, sizeof(float) * heads * (D));                                          \
        const int64_t span = (int64_t)kvh * (D) * 2, rbytes = row * 2;                        \
        for (int64_t p = p0; p < p1; p++) {                                                   \
            const int n = (int)((len - p * ps) < ps ? (len - p * ps) : ps);                   \
            const uint16_t *kp = k + pages[p] * pstride, *vp = v + pages[p] * pstride;        \
            const int64_t next = p + 1 < p1 ? pages[p + 1] : pages[p];                        \
            const char *nk = (const char *)(k + next * pstride);                              \
            const char *nv = (const char *)(v + next * pstride);                              \
            const __mmask16 valid = (__mmask16)((1u << n) - 1u);                              \
            for (int h = 0; h < kvh; h++) {                                                   \
                /* head h's share of the next page's token rows, to prefetch */               \
                const int64_t o0 = (span * h / kvh) & ~63, o1 = span * (h + 1) / kvh;         \
                for (int i0 = h * g; i0 < (h + 1) * g; i0 += (HB)) {                          \
                    const int hb = (h + 1) * g - i0 < (HB) ? (h + 1) * g - i0 : (HB);         \
                    __m512 qv[HB][C], part[HB][16], av[HB][C];                                \
                    float w[HB][16];                                                          \
                    for (int b = 0; b < (HB); b++)                                            \
                        for (int c = 0; c < C; c++)                                           \
                            qv[b][c] = b < hb ? _mm512_loadu_ps(qf + (i0 + b) * (D) + 16 * c) \
                                              : _mm512_setzero_ps();                          \
                    for (int t = 0; t < 16; t++) {                                            \
                        if (t >= n) {                                                         \
                            for (int b = 0; b < (HB); b++) part[b][t] = _mm512_setzero_ps();  \
                            continue;                                                         \
                        }                                                                     \
                        if (i0 == h * g) { /* the next page's token t, head h's share */    \
                            for (int64_t o = o0; o < o1; o += 64) {                           \
                                __builtin_prefetch(nk + t * rbytes + o, 0, 2);                \
                                __builtin_prefetch(nv + t * rbytes + o, 0, 2);                \
                            }                                                                 \
                        }                                                                     \
                        const uint16_t *kr = kp + (int64_t)t * row + (int64_t)h * (D);        \
                        __m512 kf[C];                                                         \
                        for (int c = 0; c < C; c++) kf[c] = load_bf16x16(kr + 16 * c);       \
                        for (int b = 0; b < (HB); b++) {                                      \
                            __m512 dot = _mm512_mul_ps(qv[b][0], kf[0]);                      \
                            for (int c = 1; c < C; c++)                                       \
                                dot = _mm512_fmadd_ps(qv[b][c], kf[c], dot);                  \
                            part[b][t] = dot;                                                 \
                        }                                                                     \
                    }                                                                         \
                    for (int b = 0; b < hb; b++) {                                            \
                        const int i = i0 + b;                                                 \
                        const __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY),       \
                                                             valid, sum16(part[b]));          \
                        const float mx_page = _mm512_reduce_max_ps(sc);                       \
                        const float mx = mx_page > m[i] ? mx_page : m[i];                     \
                        const __m512 e = exp_neg16(_mm512_sub_ps(sc, _mm512_set1_ps(mx)));    \
                        const float corr = exp_neg(m[i] - mx);                                \
                        l[i] = l[i] * corr + _mm512_reduce_add_ps(e);                         \
                        m[i] = mx;                                                            \
                        _mm512_storeu_ps(w[b], e);                                            \
                        const __m512 cv = _mm512_set1_ps(corr);                               \
                        for (int c = 0; c < C; c++)                                           \
                            av[b][c] = _mm512_mul_ps(cv, _mm512_loadu_ps(acc + i * (D) + 16 * c)); \
                    }                                                                         \
                    for (int b = hb; b < (HB); b++)                                           \
                        for (int c = 0; c < C; c++) av[b][c] = _mm512_setzero_ps();           \
                    for (int t = 0; t < n; t++) {                                             \
                        const uint16_t *vr = vp + (int64_t)t * row + (int64_t)h * (D);        \
                        __m512 vf[C];                                                         \
                        for (int c = 0; c < C; c++) vf[c] = load_bf16x16(vr + 16 * c);       \
                        for (int b = 0; b < (HB); b++) {                                      \
                            const __m512 wt = _mm512_set1_ps(b < hb ? w[b][t] : 0.f);         \
                            for (int c = 0; c < C; c++)                                       \
                                av[b][c] = _mm512_fmadd_ps(wt, vf[c], av[b][c]);              \
                        }                                                                     \
                    }                                                                         \
                    for (int b = 0; b < hb; b++)                                              \
                        for (int c = 0; c < C; c++)                                           \
                            _mm512_storeu_ps(acc + (i0 + b) * (D) + 16 * c, av[b][c]);        \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

DEFINE_PARTIAL512(partial_bf16_64_avx512, 64, 3)
DEFINE_PARTIAL512(partial_bf16_128_avx512, 128, 2)
#define HAVE_PARTIAL512 1
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
/* Attention of many query rows over the same pages, as matrix products on AMX tiles.
 * bfloat16, head_dim 64, pages of 16 tokens. Two uses:
 * - shared-prefix decode (cascade attention): the pages every sequence of a decode batch
 *   starts with (a shared system prompt: the radix cache gives them the same page ids) are
 *   read once for all the sequences' queries of a KV head, rather than once per sequence;
 * - prefill (paged_prefill): a sequence's new tokens over its cached prefix and themselves,
 *   causal.
 * One item: KV head h over pages [c0, c1), for its m query rows (row j: query head
 * h * g + j % g of query token j / g, tokens qrow elements apart), padded to whole blocks
 * of 16: leaves o [rows, 64] (unnormalised), mx and l [rows], as a split of paged_decode
 * does. first >= 0 makes it causal: token j / g sits at position first + j / g and sees
 * the keys at positions (page index * 16 + offset) up to its own, so a last page need not
 * be full (what lies past the item's last position is never read as a value). first < 0:
 * every row sees every key of the pages. Up to 4 pages (64 tokens) at a time: S = Q K^T on
 * tiles (q unscaled, exact in bf16; the scale applied in float32), the online softmax per
 * query row, then P V with P rounded to bfloat16 (as flash attention does on GPUs).
 * All 8 tiles are 16 rows of 64 bytes: 0, 1 B (K^T, then V); 2, 3 A (Q, then P); 4-7 C
 * (S of 16 tokens each, then P V of 16 dims each). */
#define SHARED_DIM 64
#define SHARED_CHUNK 4 /* pages */

/* dst[r][t] = src[t][r] for 16 x 16 32-bit values, src rows `stride` values apart: 32- and
 * 64-bit unpacks gather 4 x 4 blocks in each 128-bit lane, two lane shuffles place them */
static inline void transpose16_u32(const uint32_t *src, int64_t stride, uint32_t *dst) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * stride);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* r[i + c]: column 4L + c of rows i..i+3, lane L */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        t[c] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0x88);
        t[c + 4] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0xDD);
        t[c + 8] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0x88);
        t[c + 12] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0xDD);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
        r[c + 4] = _mm512_shuffle_i32x4(t[c + 4], t[c + 12], 0x88);
        r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xDD);
        r[c + 12] = _mm512_shuffle_i32x4(t[c + 4], t[c + 12], 0xDD);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + i * 16, r[i]);
}

/* 16-bit lanes of a and b interleaved: a[0] b[0] a[1] b[1] .. a[15] b[15] (and from 16) */
static const uint16_t INTERLEAVE_LO[32] __attribute__((aligned(64))) = {
    0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

static void amx_attend(const uint16_t *q, int64_t qrow, const uint16_t *k, const uint16_t *v,
                       const int64_t *pages, int64_t c0, int64_t c1, int64_t pstride,
                       int64_t row, int g, int h, int m, int64_t first, float scale, float *o,
                       float *mx, float *l, uint16_t *qb) {
    enum { T = SHARED_CHUNK * 16 };
    const int rows = (m + 15) / 16 * 16;
    const int64_t last = first + (m - 1) / g; /* causal: the item's last position */
    if (first >= 0 && c1 > last / 16 + 1) c1 = last / 16 + 1;
    for (int j = 0; j < rows; j++) { /* qb [rows, 64]: the item's queries, zeros past m */
        uint16_t *dst = qb + (int64_t)j * SHARED_DIM;
        if (j < m)
            memcpy(dst, q + (int64_t)(j / g) * qrow + ((int64_t)h * g + j % g) * SHARED_DIM,
                   sizeof(uint16_t) * SHARED_DIM);
        else
            memset(dst, 0, sizeof(uint16_t) * SHARED_DIM);
        mx[j] = -INFINITY;
        l[j] = 0.f;
    }
    memset(o, 0, sizeof(float) * rows * SHARED_DIM);
    /* K^T of each 16 tokens: [token group][dims / 32][pair][token]; V of each 32 tokens:
     * [half][dims / 16][token pair][dim, token] */
    uint32_t kt[SHARED_CHUNK][2][16][16] __attribute__((aligned(64)));
    uint32_t vv[2][4][16][16] __attribute__((aligned(64)));
    float sc[16][T] __attribute__((aligned(64))), pv[16][SHARED_DIM] __attribute__((aligned(64)));
    uint16_t p[16][T] __attribute__((aligned(64)));
    float corr[16] __attribute__((aligned(64)));
    const __m512 scale16 = _mm512_set1_ps(scale);
    const __m512i lo = _mm512_load_si512(INTERLEAVE_LO);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    struct tile_config cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = 16, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    for (int64_t pg0 = c0; pg0 < c1; pg0 += SHARED_CHUNK) {
        const int np = (int)(c1 - pg0 < SHARED_CHUNK ? c1 - pg0 : SHARED_CHUNK);
        for (int c = 0; c < np; c++) {
            const uint16_t *kp = k + pages[pg0 + c] * pstride + (int64_t)h * SHARED_DIM;
            const uint16_t *vp = v + pages[pg0 + c] * pstride + (int64_t)h * SHARED_DIM;
            transpose16_u32((const uint32_t *)kp, row / 2, &kt[c][0][0][0]);
            transpose16_u32((const uint32_t *)kp + 16, row / 2, &kt[c][1][0][0]);
            /* tokens of this page a causal item may read (the rest weigh 0 and read as 0) */
            const int64_t seen = first < 0 ? 16 : last - (pg0 + c) * 16 + 1;
            for (int r = 0; r < 8; r++) { /* tokens 2r, 2r + 1 of this page, interleaved */
                const uint16_t *a = vp + (2 * r) * row, *b = a + row;
                const __mmask32 ma = 2 * r < seen ? ~0u : 0u, mb = 2 * r + 1 < seen ? ~0u : 0u;
                const __m512i a0 = _mm512_maskz_loadu_epi16(ma, a);
                const __m512i a1 = _mm512_maskz_loadu_epi16(ma, a + 32);
                const __m512i b0 = _mm512_maskz_loadu_epi16(mb, b);
                const __m512i b1 = _mm512_maskz_loadu_epi16(mb, b + 32);
                uint32_t(*dst)[16][16] = vv[c / 2];
                const int pr = (c % 2) * 8 + r;
                _mm512_store_si512(dst[0][pr], _mm512_permutex2var_epi16(a0, lo, b0));
                _mm512_store_si512(dst[1][pr], _mm512_permutex2var_epi16(a0, hi, b0));
                _mm512_store_si512(dst[2][pr], _mm512_permutex2var_epi16(a1, lo, b1));
                _mm512_store_si512(dst[3][pr], _mm512_permutex2var_epi16(a1, hi, b1));
            }
        }
        if (np % 2) /* an odd last page: its half's other 16 tokens weigh 0 and are 0 */
            for (int db = 0; db < 4; db++) memset(vv[np / 2][db][8], 0, sizeof(uint32_t) * 128);
        for (int r0 = 0; r0 < rows; r0 += 16) {
            /* causal: the block's last row sees no key of these pages (a later block may) */
            const int jl = r0 + 15 < m - 1 ? r0 + 15 : m - 1;
            if (first >= 0 && first + jl / g < pg0 * 16) continue;
            _tile_loadd(2, qb + (int64_t)r0 * SHARED_DIM, SHARED_DIM * 2);
            _tile_loadd(3, qb + (int64_t)r0 * SHARED_DIM + 32, SHARED_DIM * 2);
#define S_BLOCK(C, G)                                                                         \
            if ((G) < np) {                                                                   \
                _tile_zero(C);                                                                \
                _tile_loadd(0, kt[G][0], 64);                                                 \
                _tile_loadd(1, kt[G][1], 64);                                                 \
                _tile_dpbf16ps(C, 2, 0);                                                      \
                _tile_dpbf16ps(C, 3, 1);                                                      \
                _tile_stored(C, &sc[0][16 * (G)], T * 4);                                     \
            }
            S_BLOCK(4, 0) S_BLOCK(5, 1) S_BLOCK(6, 2) S_BLOCK(7, 3)
#undef S_BLOCK
            /* per row: the chunk's max score, its weights e = exp(s - m) (P, in bf16) and
             * their sum; then the 16 rows' running max and sum in one pass of 16 lanes */
            float mnew[16] __attribute__((aligned(64))), rsum[16] __attribute__((aligned(64)));
            memcpy(mnew, mx + r0, sizeof mnew); /* padding rows: unchanged */
            memset(rsum, 0, sizeof rsum);
            for (int i = 0; i < 16 && r0 + i < m; i++) {
                const int j = r0 + i;
                __m512 s[SHARED_CHUNK]; /* unscaled: the scale is folded into exp's argument */
                __m512 top = _mm512_set1_ps(-INFINITY);
                /* causal: keys this row sees in the chunk (all where first < 0) */
                const int64_t sees = first < 0 ? T : first + j / g - pg0 * 16 + 1;
                for (int c = 0; c < np; c++) {
                    s[c] = _mm512_load_ps(&sc[i][16 * c]);
                    if (sees < 16 * (c + 1)) {
                        const int n = sees <= 16 * c ? 0 : (int)(sees - 16 * c);
                        s[c] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY),
                                                  (__mmask16)((1u << n) - 1), s[c]);
                    }
                    top = _mm512_max_ps(top, s[c]);
                }
                const float t = _mm512_reduce_max_ps(top) * scale;
                const float mj = t > mx[j] ? t : mx[j];
                const __m512 mv = _mm512_set1_ps(mj);
                __m512 sum = _mm512_setzero_ps();
                for (int c = 0; c < SHARED_CHUNK; c++) {
                    const __m512 e = c < np ? exp_neg16(_mm512_fmsub_ps(s[c], scale16, mv))
                                            : _mm512_setzero_ps();
                    sum = _mm512_add_ps(sum, e);
                    _mm256_store_si256((__m256i *)&p[i][16 * c], (__m256i)_mm512_cvtneps_pbh(e));
                }
                mnew[i] = mj;
                rsum[i] = _mm512_reduce_add_ps(sum);
            }
            {
                const __m512 mold = _mm512_loadu_ps(mx + r0), mn = _mm512_load_ps(mnew);
                const __m512 cv = exp_neg16(_mm512_sub_ps(mold, mn));
                _mm512_store_ps(corr, cv);
                _mm512_storeu_ps(l + r0, _mm512_fmadd_ps(_mm512_loadu_ps(l + r0), cv,
                                                         _mm512_load_ps(rsum)));
                _mm512_storeu_ps(mx + r0, mn);
            }
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            for (int half = 0; half < (np + 1) / 2; half++) {
                _tile_loadd(2, &p[0][32 * half], T * 2);
#define PV_BLOCK(C, DB)                                                                       \
                _tile_loadd(0, vv[half][DB], 64);                                             \
                _tile_dpbf16ps(C, 2, 0);
                PV_BLOCK(4, 0) PV_BLOCK(5, 1) PV_BLOCK(6, 2) PV_BLOCK(7, 3)
#undef PV_BLOCK
            }
            _tile_stored(4, &pv[0][0], SHARED_DIM * 4);
            _tile_stored(5, &pv[0][16], SHARED_DIM * 4);
            _tile_stored(6, &pv[0][32], SHARED_DIM * 4);
            _tile_stored(7, &pv[0][48], SHARED_DIM * 4);
            for (int i = 0; i < 16 && r0 + i < m; i++) {
                float *oi = o + (int64_t)(r0 + i) * SHARED_DIM;
                const __m512 cv = _mm512_set1_ps(corr[i]);
                for (int c = 0; c < 4; c++)
                    _mm512_storeu_ps(oi + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(oi + 16 * c), cv,
                                                                  _mm512_load_ps(&pv[i][16 * c])));
            }
        }
    }
    _tile_release();
}
#define HAVE_SHARED_AMX 1
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* amx_attend's item on 8-lane float32 FMAs, for CPUs without AMX: bfloat16 or float32
 * pages of 16 tokens, head_dim a multiple of 8 up to ATTEND_DIM. Per chunk of ATTEND_PAGES
 * pages: K^T and V of KV head h widened to float32 once (8 x 8 transposes); then per block
 * of ATTEND_ROWS query rows, S = Q K^T a page at a time (each row's 16 scores in two
 * registers: no horizontal sums), the online softmax per row over the chunk, and P V with
 * P in float32 and the row's output in registers. Keys a causal row may not read score
 * -inf and V rows past the item's last position are zeros (a reused page's tail may hold
 * NaN). Against torch's SDPA on one layer (bf16, 9 heads over 3, EPYC AVX2, 2 threads):
 * 200 new tokens over 2000 cached 11.8 against 14.4 ms, 430 fresh 2.8 against 5.8 ms; a
 * chunk of one page took 15.0 and 4.4 ms (the output's rescale per page).
 * qf: ATTEND_DIM floats per query row of scratch. */
#define ATTEND_DIM 128
#define ATTEND_ROWS 4
#define ATTEND_PAGES 4 /* pages of 16 keys a softmax step takes */

/* r[i] = column i of the 8 x 8 block whose rows are r[0..7] */
static inline void transpose8(__m256 *r) {
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* 8 elements of a bfloat16 (dtype 1) or float32 (0) row as float32 lanes */
ALWAYS_INLINE __m256 load8(int dtype, const void *p, int64_t at) {
    return dtype ? load_bf16x8((const uint16_t *)p + at) : _mm256_loadu_ps((const float *)p + at);
}

ALWAYS_INLINE float hmax8(__m256 x) {
    __m128 y = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    y = _mm_max_ps(y, _mm_movehl_ps(y, y));
    return _mm_cvtss_f32(_mm_max_ss(y, _mm_movehdup_ps(y)));
}

ALWAYS_INLINE float hsum8(__m256 x) {
    __m128 y = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    y = _mm_add_ps(y, _mm_movehl_ps(y, y));
    return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
}

/* The item, for head_dim D: inlined into avx2_attend with D a constant for the common sizes,
 * so every loop over D unrolls and the accumulators stay in registers */
/* cap * tanh(s / cap) on 8 lanes: tanh(|x|) = (1 - e) / (1 + e), e = exp(-2 |x|) */
ALWAYS_INLINE __m256 soft_cap8(__m256 s, float cap) {
    const __m256 c = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.f), neg = _mm256_set1_ps(-0.f);
    const __m256 x = _mm256_div_ps(s, c);
    const __m256 e = exp_neg8(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(neg, x)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_mul_ps(c, _mm256_or_ps(t, _mm256_and_ps(x, neg)));
}

ALWAYS_INLINE void attend_d(int dtype, const void *q, int64_t qrow, const void *k,
                            const void *v, const int64_t *pages, int64_t c0, int64_t c1,
                            int64_t pstride, int64_t row, const int D, int g, int h, int m,
                            int64_t first, float scale, float *o, float *mx, float *l,
                            float *qf, float cap, int64_t window) {
    const int C = D / 8, rows = (m + ATTEND_ROWS - 1) / ATTEND_ROWS * ATTEND_ROWS;
    const int64_t last = first + (m - 1) / g; /* causal: the item's last position */
    if (first >= 0 && c1 > last / 16 + 1) c1 = last / 16 + 1;
    for (int j = 0; j < rows; j++) { /* qf [rows, D]: the item's queries, scaled; zeros past m */
        const int64_t at = (int64_t)(j / g) * qrow + ((int64_t)h * g + j % g) * D;
        for (int c = 0; c < C; c++)
            _mm256_storeu_ps(qf + (int64_t)j * D + 8 * c,
                             j < m ? _mm256_mul_ps(_mm256_set1_ps(scale), load8(dtype, q, at + 8 * c))
                                   : _mm256_setzero_ps());
        mx[j] = -INFINITY;
        l[j] = 0.f;
    }
    memset(o, 0, sizeof(float) * m * D);
    enum { T = ATTEND_PAGES * 16 }; /* keys of a chunk */
    float kt[ATTEND_PAGES][ATTEND_DIM][16] __attribute__((aligned(32)));
    float vf[T][ATTEND_DIM] __attribute__((aligned(32)));
    float sc[ATTEND_ROWS][T] __attribute__((aligned(32)));
    const int64_t esize = dtype ? 2 : 4;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    for (int64_t pg0 = c0; pg0 < c1; pg0 += ATTEND_PAGES) {
        const int np = (int)(c1 - pg0 < ATTEND_PAGES ? c1 - pg0 : ATTEND_PAGES);
        for (int c = 0; c < np; c++) {
            const char *kp = (const char *)k + (pages[pg0 + c] * pstride + (int64_t)h * D) * esize;
            const char *vp = (const char *)v + (pages[pg0 + c] * pstride + (int64_t)h * D) * esize;
            /* keys of this page any row may read */
            const int64_t seen = first < 0 ? 16 : last - (pg0 + c) * 16 + 1;
            for (int t0 = 0; t0 < 16; t0 += 8)
                for (int cc = 0; cc < C; cc++) {
                    __m256 r[8];
                    for (int t = 0; t < 8; t++)
                        r[t] = load8(dtype, kp + (t0 + t) * row * esize, 8 * cc);
                    transpose8(r);
                    for (int i = 0; i < 8; i++) _mm256_store_ps(&kt[c][8 * cc + i][t0], r[i]);
                }
            for (int t = 0; t < 16; t++)
                for (int cc = 0; cc < C; cc++)
                    _mm256_store_ps(&vf[16 * c + t][8 * cc],
                                    t < seen ? load8(dtype, vp + t * row * esize, 8 * cc)
                                             : _mm256_setzero_ps());
        }
        for (int r0 = 0; r0 < m; r0 += ATTEND_ROWS) {
            const int rb = m - r0 < ATTEND_ROWS ? m - r0 : ATTEND_ROWS;
            /* causal: the block's last row sees no key of this chunk (a later block may) */
            if (first >= 0 && first + (r0 + rb - 1) / g < pg0 * 16) continue;
            const float *qr = qf + (int64_t)r0 * D;
            for (int c = 0; c < np; c++) { /* S of the block's rows, a page at a time */
                __m256 s[ATTEND_ROWS][2];
                for (int r = 0; r < ATTEND_ROWS; r++) s[r][0] = s[r][1] = _mm256_setzero_ps();
                for (int j = 0; j < D; j++) {
                    const __m256 k0 = _mm256_load_ps(&kt[c][j][0]), k1 = _mm256_load_ps(&kt[c][j][8]);
                    for (int r = 0; r < ATTEND_ROWS; r++) {
                        const __m256 qv = _mm256_broadcast_ss(qr + r * D + j);
                        s[r][0] = _mm256_fmadd_ps(qv, k0, s[r][0]);
                        s[r][1] = _mm256_fmadd_ps(qv, k1, s[r][1]);
                    }
                }
                for (int r = 0; r < ATTEND_ROWS; r++) {
                    _mm256_store_ps(&sc[r][16 * c], s[r][0]);
                    _mm256_store_ps(&sc[r][16 * c + 8], s[r][1]);
                }
            }
            for (int r = 0; r < rb; r++) {
                const int j = r0 + r;
                /* keys of the chunk this row sees: [lo, n) (a sliding window: from lo) */
                int64_t sees = first < 0 ? T : first + j / g - pg0 * 16 + 1;
                if (sees <= 0) continue;
                const int n = sees < 16 * np ? (int)sees : 16 * np;
                int lo = 0;
                if (window > 0 && first >= 0) {
                    const int64_t from = first + j / g - window + 1 - pg0 * 16;
                    if (from >= n) continue; /* the whole chunk is behind this row's window */
                    lo = from > 0 ? (int)from : 0;
                }
                __m256 top = ninf;
                for (int c8 = 0; c8 < T / 8; c8++) { /* scores outside [lo, n): -inf */
                    const __m256i at = _mm256_add_epi32(lane, _mm256_set1_epi32(8 * c8));
                    const __m256 keep = _mm256_castsi256_ps(_mm256_andnot_si256(
                        _mm256_cmpgt_epi32(_mm256_set1_epi32(lo), at),
                        _mm256_cmpgt_epi32(_mm256_set1_epi32(n), at)));
                    __m256 x = _mm256_load_ps(&sc[r][8 * c8]);
                    if (cap > 0.f) x = soft_cap8(x, cap);
                    x = _mm256_blendv_ps(ninf, x, keep);
                    _mm256_store_ps(&sc[r][8 * c8], x);
                    top = _mm256_max_ps(top, x);
                }
                const float t = hmax8(top), mj = t > mx[j] ? t : mx[j];
                __m256 sum = _mm256_setzero_ps();
                for (int c8 = 0; c8 < (n + 7) / 8; c8++) { /* P in place of S */
                    const __m256 e = exp_neg8(_mm256_sub_ps(_mm256_load_ps(&sc[r][8 * c8]),
                                                            _mm256_set1_ps(mj)));
                    _mm256_store_ps(&sc[r][8 * c8], e);
                    sum = _mm256_add_ps(sum, e);
                }
                const float corr = exp_neg(mx[j] - mj);
                l[j] = l[j] * corr + hsum8(sum);
                mx[j] = mj;
                float *oj = o + (int64_t)j * D;
                for (int half = 0; half < C; half += 8) { /* 8 registers of o at a time */
                    __m256 acc[8];
                    for (int cc = 0; cc < 8 && half + cc < C; cc++)
                        acc[cc] = _mm256_mul_ps(_mm256_set1_ps(corr), _mm256_loadu_ps(oj + 8 * (half + cc)));
                    for (int tk = lo; tk < n; tk++) {
                        const __m256 w = _mm256_broadcast_ss(&sc[r][tk]);
                        for (int cc = 0; cc < 8 && half + cc < C; cc++)
                            acc[cc] = _mm256_fmadd_ps(w, _mm256_load_ps(&vf[tk][8 * (half + cc)]), acc[cc]);
                    }
                    for (int cc = 0; cc < 8 && half + cc < C; cc++)
                        _mm256_storeu_ps(oj + 8 * (half + cc), acc[cc]);
                }
            }
        }
    }
}

static void avx2_attend(int dtype, const void *q, int64_t qrow, const void *k, const void *v,
                        const int64_t *pages, int64_t c0, int64_t c1, int64_t pstride,
                        int64_t row, int d, int g, int h, int m, int64_t first, float scale,
                        float *o, float *mx, float *l, float *qf, float cap, int64_t window) {
    if (d == 64)
        attend_d(dtype, q, qrow, k, v, pages, c0, c1, pstride, row, 64, g, h, m, first, scale,
                 o, mx, l, qf, cap, window);
    else if (d == 128)
        attend_d(dtype, q, qrow, k, v, pages, c0, c1, pstride, row, 128, g, h, m, first, scale,
                 o, mx, l, qf, cap, window);
    else
        attend_d(dtype, q, qrow, k, v, pages, c0, c1, pstride, row, d, g, h, m, first, scale,
                 o, mx, l, qf, cap, window);
}
#define HAVE_ATTEND_AVX2 1
#endif

/* Which kernel attends many query rows over the same pages (shared-prefix decode, paged
 * prefill): 2 amx_attend, 1 avx2_attend, 0 none (the caller falls back). plain: no soft cap
 * and no window (amx_attend takes neither) */
static int attend_kind(int dtype, int d, int page_size, int plain) {
    if (page_size != 16) return 0;
#ifdef HAVE_SHARED_AMX
    if (plain && dtype == 1 && d == SHARED_DIM && amx_allowed()) return 2;
#endif
    (void)plain;
#ifdef HAVE_ATTEND_AVX2
    if (d % 8 == 0 && d <= ATTEND_DIM) return 1;
#endif
    (void)dtype, (void)d;
    return 0;
}

/* Floats of scratch one attend item of `rows` query rows needs: o [rows, d], mx, l [rows],
 * then its queries (bfloat16 for amx_attend, float32 for avx2_attend) */
static int64_t attend_scratch(int rows, int d) { return (int64_t)rows * (2 * d + 2); }

/* One attend item (see amx_attend for the arguments); o, mx, l as attend_scratch lays out */
static void attend(int kind, int dtype, const void *q, int64_t qrow, const void *k,
                   const void *v, const int64_t *pages, int64_t c0, int64_t c1, int64_t pstride,
                   int64_t row, int d, int g, int h, int m, int64_t first, float scale,
                   float *o, int rows, float cap, int64_t window) {
    float *mx = o + (int64_t)rows * d, *l = mx + rows, *qs = l + rows;
#ifdef HAVE_SHARED_AMX
    if (kind == 2) {
        amx_attend((const uint16_t *)q, qrow, (const uint16_t *)k, (const uint16_t *)v, pages,
                   c0, c1, pstride, row, g, h, m, first, scale, o, mx, l, (uint16_t *)qs);
        return;
    }
#endif
#ifdef HAVE_ATTEND_AVX2
    avx2_attend(dtype, q, qrow, k, v, pages, c0, c1, pstride, row, d, g, h, m, first, scale, o,
                mx, l, qs, cap, window);
#else /* no kernel at this level: attend_kind said 0, so this is never called */
    (void)kind, (void)dtype, (void)q, (void)qrow, (void)k, (void)v, (void)pages, (void)c0;
    (void)c1, (void)pstride, (void)row, (void)d, (void)g, (void)h, (void)m, (void)first;
    (void)scale, (void)o, (void)mx, (void)l, (void)qs, (void)cap, (void)window;
#endif
}

/* 1 where paged_decode reads shared pages once for the batch (bfloat16 pages of 16 tokens,
 * head_dim 64), else 0 */
int shared_decode_available(void) { return attend_kind(1, 64, 16, 1) != 0; }

typedef void (*partial_fn)(const float *, const void *, const void *, const int64_t *, int64_t,
                           int64_t, int64_t, int64_t, int, int, int64_t, int, int, float *,
                           float *, float *, float, int64_t);

/* plain: no soft cap and no window (the AVX-512 kernels take neither) */
static partial_fn pick(int dtype, int d, int page_size, int plain) {
#ifdef HAVE_PARTIAL512
    if (plain && dtype && page_size <= 16 && d == 64)
        return (partial_fn)(void *)partial_bf16_64_avx512;
    if (plain && dtype && page_size <= 16 && d == 128)
        return (partial_fn)(void *)partial_bf16_128_avx512;
#else
    (void)page_size, (void)plain;
#endif
    if (d == 64) return (partial_fn)(dtype ? (void *)partial_bf16_64 : (void *)partial_f32_64);
    if (d == 128) return (partial_fn)(dtype ? (void *)partial_bf16_128 : (void *)partial_f32_128);
    return (partial_fn)(dtype ? (void *)partial_bf16 : (void *)partial_f32);
}

/* dtype: 0 float32, 1 bfloat16 (q, k, v and out share it). q's token rows are qrow elements
 * apart (heads * head_dim where q is dense). Returns 0, or -1 on shapes this kernel does not
 * take (the caller then uses the torch reference).
 * groups: 1 for dense decode (page_table [batch, 1, width], seq_lens [batch, 1]: every head
 * reads the same pages), kv_heads for sparse decode (page_table [batch, kv_heads, width] and
 * seq_lens [batch, kv_heads]: each KV head's group of query heads reads its own selected
 * pages, and its "length" is that of the selected pages laid end to end).
 * cap: the scaled logits' tanh soft cap (Gemma 2; 0 none); window: a sliding window of that
 * many tokens, the newest one included (0 none): the pages wholly before it are not read,
 * and the keys before it in its first page are masked (dense decode only, groups 1). */
int paged_decode_capped(int dtype, const void *q, const void *k, const void *v, void *out,
                        const int64_t *page_table, const int64_t *seq_lens, int batch,
                        int table_width, int heads, int kv_heads, int head_dim, int page_size,
                        int64_t page_stride, float scale, int splits, int groups, int shared,
                        int64_t qrow, float cap, int64_t window) {
    const int g = heads / kv_heads, d = head_dim;
    if (heads > MAX_HEADS || d > MAX_DIM || page_size > MAX_PAGE || heads % kv_heads) return -1;
    if (groups < 1 || kv_heads % groups || (window > 0 && groups != 1)) return -1;
    if (splits < 1) splits = 1;
    const int plain = !(cap > 0.f) && window <= 0;
    if (!plain) shared = 0; /* the shared pages' kernel takes neither */
    const partial_fn partial = pick(dtype, d, page_size, plain);
    const int gkv = kv_heads / groups, gheads = gkv * g; /* KV and query heads of one group */
    const int64_t row = (int64_t)kv_heads * d, esize = dtype ? 2 : 4;
    const int64_t items = (int64_t)batch * groups * splits;
    /* per item: acc [gheads, d], m [gheads], l [gheads] */
    const int64_t stride = (int64_t)gheads * d + 2 * gheads;
    /* shared: pages every sequence starts with (page_table's first `shared` columns agree),
     * read once for all of them per KV head (attend), in `chunks` parts per head */
    const int kind = attend_kind(dtype, d, page_size, 1);
    if (shared < 0 || !(kind && groups == 1 && batch * g <= MAX_HEADS * 8)) shared = 0;
    const int chunks = shared == 0 ? 0 : shared < 8 ? 1 : 2;
    const int mrows = (batch * g + 15) / 16 * 16;
    const int64_t sitems = (int64_t)kv_heads * chunks, sstride = attend_scratch(mrows, d);
    float *work = (float *)malloc(sizeof(float) * (items * stride + sitems * sstride));
    if (!work) return -1;
    float *swork = work + items * stride;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t it2 = 0; it2 < sitems + items; it2++) {
        if (it2 < sitems) { /* the shared pages: KV head h, part c */
            const int h = (int)(it2 / chunks), c = (int)(it2 % chunks);
            const int64_t per = (shared + chunks - 1) / chunks;
            const int64_t c0 = c * per, c1 = c0 + per < shared ? c0 + per : shared;
            attend(kind, dtype, q, qrow, k, v, page_table, c0, c1, page_stride, row, d, g, h,
                   batch * g, -1, scale, swork + it2 * sstride, mrows, 0.f, 0);
            continue;
        }
        const int64_t it = it2 - sitems;
        const int64_t seq = it / splits; /* (sequence, group) */
        const int b = (int)(seq / groups), grp = (int)(seq % groups), sp = (int)(it % splits);
        const int64_t len = seq_lens[seq], npages = (len + page_size - 1) / page_size;
        const int64_t lo = window > 0 && len > window ? len - window : 0; /* first key seen */
        const int64_t first = shared > lo / page_size ? shared : lo / page_size;
        const int64_t per = (npages - first + splits - 1) / splits;
        const int64_t p0 = first + sp * per, p1 = (p0 + per) < npages ? (p0 + per) : npages;
        float *acc = work + it * stride, *m = acc + (int64_t)gheads * d, *l = m + gheads;
        float qf[MAX_HEADS * MAX_DIM];
        const int64_t qoff = (int64_t)b * qrow + (int64_t)grp * gheads * d;
        for (int j = 0; j < gheads * d; j++)
            qf[j] = scale * (dtype ? bf16_to_f32(((const uint16_t *)q)[qoff + j])
                                   : ((const float *)q)[qoff + j]);
        if (p0 >= p1) {
            for (int i = 0; i < gheads; i++) { m[i] = -INFINITY; l[i] = 0.f; }
            memset(acc, 0, sizeof(float) * gheads * d);
        } else {
            const int64_t hoff = (int64_t)grp * gkv * d * esize; /* bytes to the group's head */
            partial(qf, (const char *)k + hoff, (const char *)v + hoff,
                    page_table + seq * table_width, p0, p1, len, page_stride, page_size, gkv,
                    row, d, g, acc, m, l, cap, lo);
        }
    }
    /* merge the splits of every (sequence, head) and write out */
#pragma omp parallel for
    for (int64_t bh = 0; bh < (int64_t)batch * heads; bh++) {
        const int b = (int)(bh / heads), i = (int)(bh % heads);
        const int64_t first = ((int64_t)b * groups + i / gheads) * splits; /* its first item */
        const int64_t mo = (int64_t)gheads * d + i % gheads, lo = mo + gheads;
        /* the shared parts of its KV head: row sj of each */
        const float *sh = swork + (int64_t)(i / g) * chunks * sstride;
        const int64_t sj = (int64_t)b * g + i % g, smo = (int64_t)mrows * d + sj;
        float mx = -INFINITY;
        for (int sp = 0; sp < splits; sp++) {
            const float mi = work[(first + sp) * stride + mo];
            mx = mi > mx ? mi : mx;
        }
        for (int c = 0; c < chunks; c++) {
            const float mi = sh[c * sstride + smo];
            mx = mi > mx ? mi : mx;
        }
        float o[MAX_DIM], total = 0.f;
        for (int j = 0; j < d; j++) o[j] = 0.f;
        for (int sp = 0; sp < splits; sp++) {
            const float *acc = work + (first + sp) * stride;
            const float mi = acc[mo], li = acc[lo];
            if (li == 0.f) continue;
            const float w = exp_neg(mi - mx);
            total += w * li;
            for (int j = 0; j < d; j++) o[j] += w * acc[(i % gheads) * d + j];
        }
        for (int c = 0; c < chunks; c++) {
            const float *part = sh + c * sstride;
            const float mi = part[smo], li = part[smo + mrows];
            if (li == 0.f) continue;
            const float w = exp_neg(mi - mx);
            total += w * li;
            for (int j = 0; j < d; j++) o[j] += w * part[sj * d + j];
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

int paged_decode(int dtype, const void *q, const void *k, const void *v, void *out,
                 const int64_t *page_table, const int64_t *seq_lens, int batch, int table_width,
                 int heads, int kv_heads, int head_dim, int page_size, int64_t page_stride,
                 float scale, int splits, int groups, int shared, int64_t qrow) {
    return paged_decode_capped(dtype, q, k, v, out, page_table, seq_lens, batch, table_width,
                               heads, kv_heads, head_dim, page_size, page_stride, scale, splits,
                               groups, shared, qrow, 0.f, 0);
}

/* Prefill attention read from the pages in place: each prefilling sequence's new tokens
 * over its cached prefix and themselves (their K and V already written), causal, by attend
 * (AMX tiles, else AVX2). dtype 0 float32, 1 bfloat16 (q, pages and out). q, out [tokens,
 * heads, head_dim], q's token rows qrow elements apart, out's dense; sequence i: qlens[i]
 * new tokens from row starts[i] of q and out, at positions prefix[i].., its pages in row i
 * of table [n, width]. Items are (sequence, KV head, block of tokens), blocks small enough
 * that every thread gets work. Returns -1 where no attend kernel applies (attend_kind). */
#define PREFILL_ROWS 128 /* the most query rows of an item */
int paged_prefill_capped(int dtype, const void *q, int64_t qrow, const void *k, const void *v,
                         void *out, const int64_t *starts, const int64_t *qlens,
                         const int64_t *prefix, const int64_t *table, int n, int width,
                         int heads, int kv_heads, int head_dim, int page_size,
                         int64_t page_stride, float scale, float cap, int64_t window) {
    const int plain = !(cap > 0.f) && window <= 0;
    const int kind = attend_kind(dtype, head_dim, page_size, plain), d = head_dim;
    if (!kind || heads % kv_heads) return -1;
    const int g = heads / kv_heads, threads = omp_get_max_threads();
    const int64_t row = (int64_t)kv_heads * d;
    int64_t tokens = 0;
    for (int i = 0; i < n; i++) tokens += qlens[i];
    if (tokens == 0) return 0;
    /* tokens per item: at most PREFILL_ROWS rows, and at least 4 items per thread */
    int64_t tb = (tokens * kv_heads + 4 * threads - 1) / (4 * threads);
    if (tb > PREFILL_ROWS / g) tb = PREFILL_ROWS / g;
    if (tb < 1) tb = 1;
    int64_t items = 0;
    for (int i = 0; i < n; i++) items += (qlens[i] + tb - 1) / tb * kv_heads;
    const int mrows = (int)((tb * g + 15) / 16 * 16);
    const int64_t wstride = attend_scratch(mrows, d);
    float *work = (float *)malloc(sizeof(float) * wstride * threads);
    if (!work) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *o = work + omp_get_thread_num() * wstride;
        const float *l = o + (int64_t)mrows * d + mrows;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            /* the item's sequence, KV head and token block (later blocks first: they see
             * the most keys) */
            int i = 0;
            int64_t rest = it;
            while (rest >= (qlens[i] + tb - 1) / tb * kv_heads)
                rest -= (qlens[i++] + tb - 1) / tb * kv_heads;
            const int64_t blocks = (qlens[i] + tb - 1) / tb;
            const int h = (int)(rest % kv_heads);
            const int64_t t0 = (blocks - 1 - rest / kv_heads) * tb;
            const int64_t t1 = t0 + tb < qlens[i] ? t0 + tb : qlens[i];
            const int m = (int)((t1 - t0) * g);
            const int64_t kv_len = prefix[i] + t1;
            const void *qi = (const char *)q + (starts[i] + t0) * qrow * (dtype ? 2 : 4);
            /* a window: the pages behind the block's first row's window are not read */
            const int64_t lo = window > 0 ? prefix[i] + t0 - window + 1 : 0;
            attend(kind, dtype, qi, qrow, k, v, table + (int64_t)i * width,
                   lo > 0 ? lo / 16 : 0, (kv_len + 15) / 16, page_stride, row, d, g, h, m,
                   prefix[i] + t0, scale, o, mrows, cap, window);
            for (int j = 0; j < m; j++) {
                const int64_t at = ((starts[i] + t0 + j / g) * heads + (int64_t)h * g + j % g) * d;
                const float inv = 1.f / l[j], *oj = o + (int64_t)j * d;
                if (dtype)
                    for (int c = 0; c < d; c++) ((uint16_t *)out)[at + c] = f32_to_bf16(oj[c] * inv);
                else
                    for (int c = 0; c < d; c++) ((float *)out)[at + c] = oj[c] * inv;
            }
        }
    }
    free(work);
    return 0;
}

int paged_prefill(int dtype, const void *q, int64_t qrow, const void *k, const void *v,
                  void *out, const int64_t *starts, const int64_t *qlens, const int64_t *prefix,
                  const int64_t *table, int n, int width, int heads, int kv_heads, int head_dim,
                  int page_size, int64_t page_stride, float scale) {
    return paged_prefill_capped(dtype, q, qrow, k, v, out, starts, qlens, prefix, table, n,
                                width, heads, kv_heads, head_dim, page_size, page_stride, scale,
                                0.f, 0);
}

/* Store new tokens' K and V in their pages and keep each page's key summary: row page_size
 * of a page's K block holds the channel-wise min of the keys written to it so far, of its V
 * block their max (a token at offset 0 starts the page's summary afresh). k, v [tokens,
 * kv_heads, d]; pages, offsets [tokens]; kp, vp: one layer's K and V of page 0, pages
 * page_stride elements apart. Tokens of a page come in order; heads run in parallel. */
#define DEFINE_WRITE(NAME, T, LT, GT)                                                          \
    static void NAME(const T *k, const T *v, T *kp, T *vp, const int64_t *pages,              \
                     const int64_t *offsets, int64_t tokens, int kvh, int d, int ps,          \
                     int64_t pstride, int64_t srow) {                                         \
        const int64_t row = (int64_t)kvh * d;                                                 \
        _Pragma("omp parallel for") for (int h = 0; h < kvh; h++) {                          \
            for (int64_t t = 0; t < tokens; t++) {                                            \
                const T *kt = k + t * srow + (int64_t)h * d, *vt = v + t * srow + (int64_t)h * d; \
                const int64_t base = pages[t] * pstride + (int64_t)h * d;                     \
                T *kd = kp + base + offsets[t] * row, *vd = vp + base + offsets[t] * row;     \
                T *lo = kp + base + (int64_t)ps * row, *hi = vp + base + (int64_t)ps * row;   \
                memcpy(kd, kt, sizeof(T) * d);                                                \
                memcpy(vd, vt, sizeof(T) * d);                                                \
                if (offsets[t] == 0) {                                                        \
                    memcpy(lo, kt, sizeof(T) * d);                                            \
                    memcpy(hi, kt, sizeof(T) * d);                                            \
                } else {                                                                      \
                    for (int j = 0; j < d; j++) {                                             \
                        if (LT(kt[j], lo[j])) lo[j] = kt[j];                                  \
                        if (GT(kt[j], hi[j])) hi[j] = kt[j];                                  \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

#define LT_F32(a, b) ((a) < (b))
#define GT_F32(a, b) ((a) > (b))
#define LT_BF16(a, b) (bf16_to_f32(a) < bf16_to_f32(b))
#define GT_BF16(a, b) (bf16_to_f32(a) > bf16_to_f32(b))
DEFINE_WRITE(write_f32, float, LT_F32, GT_F32)
DEFINE_WRITE(write_bf16, uint16_t, LT_BF16, GT_BF16)

int write_kv(int dtype, const void *k, const void *v, void *kp, void *vp, const int64_t *pages,
             const int64_t *offsets, int64_t tokens, int kv_heads, int head_dim, int page_size,
             int64_t page_stride, int64_t kv_row) {
    if (dtype) write_bf16(k, v, kp, vp, pages, offsets, tokens, kv_heads, head_dim, page_size,
                          page_stride, kv_row);
    else write_f32(k, v, kp, vp, pages, offsets, tokens, kv_heads, head_dim, page_size,
                   page_stride, kv_row);
    return 0;
}

/* Page selection for sparse decode, one (sequence, KV head) per work item; the oracle is
 * reference.select_pages, whose docstring defines the rule. kmin, kmax: one layer's summary
 * rows of page 0 (pages page_stride elements apart); page_table [batch, width]; seq_lens,
 * active [batch] (an inactive sequence keeps every page). Writes out_table [batch, kv_heads,
 * width] (kept pages, in order), out_lens [batch, kv_heads] (the kept pages' token count)
 * and kept [batch, kv_heads]; touched [batch, width] (may be NULL): set to 1 at each page
 * index some KV head kept (never cleared here, so it collects a whole forward's layers).
 *
 * Two levels: segs (may be NULL) gives each sequence's radix segments, runs of its pages
 * with one summary (min of mins, max of maxes). Forced pages are scored first; a segment
 * whose bound, against the forced pages' best, is under min_score for every query head of
 * the group cannot hold a page that would be kept, so its pages are not scored at all. */
typedef struct { float score; int64_t page; } cand;
/* nats: far above the rounding of a bound (a float sum of head_dim terms), far below any
 * threshold's resolution */
#define SPARE_MARGIN 1e-3f

/* Radix segments of a batch (the seg_* arguments; seg_ends NULL for none): ends [batch,
 * width] (page index where each segment ends; the first starts at 0), counts [batch];
 * summaries [batch, width, stride] with one layer's min rows at offset layer_off and its
 * max rows kv_heads * head_dim further. */
typedef struct {
    const int64_t *ends, *counts;
    const void *sums;
    int64_t width, stride, layer_off;
} segments;
#define PREFETCH_PAGES 4


static int by_score(const void *a, const void *b) { /* best first, then the earlier page */
    const cand *x = (const cand *)a, *y = (const cand *)b;
    if (x->score != y->score) return x->score < y->score ? 1 : -1;
    return x->page < y->page ? -1 : (x->page > y->page);
}

/* Quickselect: afterwards c[0..k) are the k best candidates (by_score), in no order. */
static void best_first(cand *c, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (k > 0 && lo < hi) {
        const cand pivot = c[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (by_score(&c[i], &pivot) < 0) i++;
            while (by_score(&c[j], &pivot) > 0) j--;
            if (i <= j) {
                const cand t = c[i];
                c[i++] = c[j];
                c[j--] = t;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* Quest bound of one summary (min row at off, max row max_off further) for the g query
 * heads in qf [g, d]: ub[i] = sum_j max(q_ij * min_j, q_ij * max_j). */
static inline void bound(int dtype, const void *sum, int64_t off, int64_t max_off, int d,
                         int g, const float *qf, float *ub) {
    float lo[MAX_DIM], hi[MAX_DIM];
    if (dtype) {
        for (int j = 0; j < d; j++) {
            lo[j] = bf16_to_f32(((const uint16_t *)sum)[off + j]);
            hi[j] = bf16_to_f32(((const uint16_t *)sum)[off + max_off + j]);
        }
    } else {
        memcpy(lo, (const float *)sum + off, sizeof(float) * d);
        memcpy(hi, (const float *)sum + off + max_off, sizeof(float) * d);
    }
    for (int i = 0; i < g; i++) {
        const float *qi = qf + i * d;
        float s = 0.f;
        _Pragma("omp simd reduction(+ : s)") for (int j = 0; j < d; j++) {
            const float a = qi[j] * lo[j], e = qi[j] * hi[j];
            s += a > e ? a : e;
        }
        ub[i] = s;
    }
}

/* u[p, :] = the bound of page p (index into pages, which has n entries), best = running max;
 * ahead: prefetch the summaries of a later page (they are one row per page, far apart). */
static inline void score_page(int dtype, const void *kmin, const void *kmax,
                              const int64_t *pages, int64_t n, int64_t p, int64_t page_stride,
                              int h, int d, int g, const float *qf, float *u, float *best,
                              int ahead) {
    const int64_t esize = dtype ? 2 : 4;
    if (ahead && p + PREFETCH_PAGES < n) {
        const int64_t at = (pages[p + PREFETCH_PAGES] * page_stride + h * d) * esize;
        for (int64_t o = 0; o < d * esize; o += 64) {
            __builtin_prefetch((const char *)kmin + at + o);
            __builtin_prefetch((const char *)kmax + at + o);
        }
    }
    /* kmax is the same row of the page's V half: a fixed distance from kmin's row */
    const int64_t off = pages[p] * page_stride + (int64_t)h * d;
    const int64_t max_off = ((const char *)kmax - (const char *)kmin) / esize;
    bound(dtype, kmin, off, max_off, d, g, qf, u + p * g);
    for (int i = 0; i < g; i++) best[i] = u[p * g + i] > best[i] ? u[p * g + i] : best[i];
}

int select_pages(int dtype, const void *q, const void *kmin, const void *kmax,
                 const int64_t *page_table, const int64_t *seq_lens, const uint8_t *active,
                 int batch, int table_width, int heads, int kv_heads, int head_dim,
                 int page_size, int64_t page_stride, float scale, float min_score,
                 int64_t budget, double budget_fraction, int sink, int window,
                 const int64_t *seg_ends, const int64_t *seg_counts, const void *seg_sums,
                 int64_t seg_width, int64_t seg_stride, int64_t seg_layer_off,
                 int64_t *out_table, int64_t *out_lens, int64_t *kept, uint8_t *touched) {
    const int g = heads / kv_heads, d = head_dim;
    const segments seg_view = {seg_ends, seg_counts, seg_sums, seg_width, seg_stride,
                               seg_layer_off};
    const segments *segs = seg_ends ? &seg_view : NULL;
    if (heads > MAX_HEADS || d > MAX_DIM || heads % kv_heads) return -1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t it = 0; it < (int64_t)batch * kv_heads; it++) {
        const int b = (int)(it / kv_heads), h = (int)(it % kv_heads);
        const int64_t len = seq_lens[b], n = (len + page_size - 1) / page_size;
        const int64_t *pages = page_table + (int64_t)b * table_width;
        int64_t *dst = out_table + it * table_width, count = 0;
        const int64_t cap = budget_fraction > 0 ? (int64_t)ceil(budget_fraction * n) : budget;
        uint8_t *mark = touched ? touched + (int64_t)b * table_width : NULL;
        if (!active[b] || n <= sink + window) {
            for (int64_t p = 0; p < n; p++) dst[p] = pages[p];
            if (mark)
                for (int64_t p = 0; p < n; p++) __atomic_store_n(&mark[p], 1, __ATOMIC_RELAXED);
            out_lens[it] = len, kept[it] = n;
            continue;
        }
        float qf[MAX_HEADS * MAX_DIM], best[MAX_HEADS];
        const int64_t qoff = ((int64_t)b * heads + (int64_t)h * g) * d; /* the group's heads */
        for (int j = 0; j < g * d; j++)
            qf[j] = dtype ? bf16_to_f32(((const uint16_t *)q)[qoff + j])
                          : ((const float *)q)[qoff + j];
        float *u = (float *)malloc(sizeof(float) * n * g);
        cand *c = (cand *)malloc(sizeof(cand) * n);
        for (int i = 0; i < g; i++) best[i] = -INFINITY;
        const int64_t lo_w = n - window, hi_w = sink; /* pages [sink, n - window) may skip */
        for (int64_t p = 0; p < n; p++)
            if (p < hi_w || p >= lo_w) score_page(dtype, kmin, kmax, pages, n, p, page_stride,
                                                  h, d, g, qf, u, best, 0);
        float best_forced[MAX_HEADS];
        memcpy(best_forced, best, sizeof(float) * g);
        const int64_t nseg = segs ? segs->counts[b] : 0;
        int64_t p = hi_w;
        for (int64_t s = 0; s <= nseg && p < lo_w; s++) {
            int64_t end = s < nseg ? segs->ends[b * segs->width + s] : lo_w;
            end = end < lo_w ? end : lo_w;
            if (end <= p) continue;
            int spare = 0;
            if (s < nseg && end - p > 1) { /* score the segment as a whole first */
                const int64_t off = (b * segs->width + s) * segs->stride + segs->layer_off
                                    + (int64_t)h * d;
                float ub[MAX_HEADS];
                bound(dtype, segs->sums, off, (int64_t)kv_heads * d, d, g, qf, ub);
                spare = 1; /* SPARE_MARGIN: the sums here and per page may round apart */
                for (int i = 0; i < g; i++)
                    if (!(scale * (ub[i] - best_forced[i]) < min_score - SPARE_MARGIN)) spare = 0;
            }
            for (; p < end; p++) {
                if (spare)
                    for (int i = 0; i < g; i++) u[p * g + i] = -INFINITY;
                else
                    score_page(dtype, kmin, kmax, pages, end, p, page_stride, h, d, g, qf, u,
                               best, 1);
            }
        }
        /* keep[p]: 1 kept, 0 skipped; candidates (neither forced nor under min_score) wait
         * in c for the budget, if one caps them */
        uint8_t *keep = (uint8_t *)calloc(n, 1);
        int64_t forced = 0, ncand = 0;
        for (int64_t p = 0; p < n; p++) {
            float sc = -INFINITY;
            for (int i = 0; i < g; i++) {
                const float x = scale * (u[p * g + i] - best[i]);
                sc = x > sc ? x : sc;
            }
            if (p < sink || p >= n - window) {
                keep[p] = 1, forced++;
            } else if (sc >= min_score) {
                c[ncand].score = sc, c[ncand].page = p, ncand++;
            }
        }
        const int64_t room = cap > 0 ? (cap > forced ? cap - forced : 0) : ncand;
        if (ncand > room) best_first(c, ncand, room);
        for (int64_t j = 0; j < ncand && j < room; j++) keep[c[j].page] = 1;
        for (int64_t p = 0; p < n; p++)
            if (keep[p]) {
                dst[count++] = pages[p];
                if (mark) __atomic_store_n(&mark[p], 1, __ATOMIC_RELAXED); /* heads race */
            }
        free(keep);
        out_lens[it] = (count - 1) * page_size + (len - (n - 1) * page_size);
        kept[it] = count;
        free(u);
        free(c);
    }
    return 0;
}

/* Sparse decode of one layer in one call: select_pages, then paged_decode over each KV
 * head's kept pages (groups = kv_heads). kept [batch, kv_heads] receives the kept counts,
 * touched (or NULL) the kept page indices, as select_pages writes them. */
int sparse_decode(int dtype, const void *q, const void *k, const void *v, void *out,
                  const void *kmin, const void *kmax, const int64_t *page_table,
                  const int64_t *seq_lens, const uint8_t *active, int batch, int table_width,
                  int heads, int kv_heads, int head_dim, int page_size, int64_t page_stride,
                  float scale, float min_score, int64_t budget, double budget_fraction, int sink,
                  int window, const int64_t *seg_ends, const int64_t *seg_counts,
                  const void *seg_sums, int64_t seg_width, int64_t seg_stride,
                  int64_t seg_layer_off, int splits, int64_t *kept, uint8_t *touched) {
    const int64_t n = (int64_t)batch * kv_heads;
    int64_t *table = (int64_t *)calloc(n * table_width, sizeof(int64_t));
    int64_t *lens = (int64_t *)malloc(sizeof(int64_t) * n);
    int rc = -1;
    if (table && lens)
        rc = select_pages(dtype, q, kmin, kmax, page_table, seq_lens, active, batch, table_width,
                          heads, kv_heads, head_dim, page_size, page_stride, scale, min_score,
                          budget, budget_fraction, sink, window, seg_ends, seg_counts,
                          seg_sums, seg_width, seg_stride, seg_layer_off, table, lens, kept,
                          touched);
    if (rc == 0)
        rc = paged_decode(dtype, q, k, v, out, table, lens, batch, table_width, heads, kv_heads,
                          head_dim, page_size, page_stride, scale, splits, kv_heads, 0,
                          (int64_t)heads * head_dim);
    free(table);
    free(lens);
    return rc;
}

/* One layer of a decode-only batch in one call: write_kv of the new tokens, then dense
 * paged_decode (what the backend would otherwise call one after the other). q, k and v may
 * be views of the fused projection's rows: their token rows qrow and kv_row elements apart. */
int write_decode(int dtype, const void *k, const void *v, void *kp, void *vp,
                 const int64_t *pages, const int64_t *offsets, int64_t tokens, const void *q,
                 void *out, const int64_t *page_table, const int64_t *seq_lens, int batch,
                 int table_width, int heads, int kv_heads, int head_dim, int page_size,
                 int64_t page_stride, float scale, int splits, int shared, int64_t qrow,
                 int64_t kv_row) {
    write_kv(dtype, k, v, kp, vp, pages, offsets, tokens, kv_heads, head_dim, page_size,
             page_stride, kv_row);
    return paged_decode(dtype, q, kp, vp, out, page_table, seq_lens, batch, table_width, heads,
                        kv_heads, head_dim, page_size, page_stride, scale, splits, 1, shared,
                        qrow);
}
