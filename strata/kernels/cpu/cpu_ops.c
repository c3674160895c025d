/* The layer ops around attention for CPU, on bfloat16 rows: the residual add + RMSNorm, the
 * rotary embedding in place, linear layers on a decode batch's rows (oneDNN's packed bf16
 * weight, or strata's int4 packing), and silu-and-mul; each rounds where torch's ops round
 * (the oracle: the tests against torch). Built with cpu_decode.c into one library
 * (cpu_build.py). */
#define _GNU_SOURCE /* syscall() */
#include "cpu_common.h"

/* The residual add and RMSNorm between blocks, on bfloat16 rows [rows, dim]: x += delta
 * (rounded to bfloat16, as torch's add; delta may be NULL), then out = x * rsqrt(mean(x^2) +
 * eps) * w, computed in float32 and rounded once (as torch's rms_norm). The sum of squares
 * runs in 16 lanes folded in halves, the order of torch's vectorized reduction, so the result
 * is bit-equal to torch's rather than one ulp off in a few elements. */
#define NORM_LANES 16
int add_rms_norm(const uint16_t *delta, uint16_t *x, const uint16_t *w, uint16_t *out,
                 int64_t rows, int dim, float eps) {
#pragma omp parallel for if (rows >= 16) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * dim;
        uint16_t *o = out + r * dim;
        float lane[NORM_LANES] = {0.f};
        int j0 = 0;
#if defined(__AVX512F__)
        /* the same operations, 16 lanes at a time (lane l of the sum is element j0 + l's) */
        __m512 sq = _mm512_setzero_ps();
        for (; j0 + NORM_LANES <= dim; j0 += NORM_LANES) {
            __m512 v = load_bf16x16(xr + j0);
            if (delta) {
                const __m256i h = round_bf16x16(_mm512_add_ps(v, load_bf16x16(delta + r * dim + j0)));
                _mm256_storeu_si256((__m256i *)(xr + j0), h);
                v = widen_bf16x16(h);
            }
            sq = _mm512_add_ps(sq, _mm512_mul_ps(v, v));
        }
        _mm512_storeu_ps(lane, sq);
#elif defined(__AVX2__) && defined(__FMA__)
        /* the same 16 lanes as two vectors of 8 (lane l of the second: element j0 + 8 + l) */
        __m256 sq0 = _mm256_setzero_ps(), sq1 = _mm256_setzero_ps();
        for (; j0 + NORM_LANES <= dim; j0 += NORM_LANES) {
            __m256 v0 = load_bf16x8(xr + j0), v1 = load_bf16x8(xr + j0 + 8);
            if (delta) {
                const __m128i h0 = round_bf16x8(_mm256_add_ps(v0, load_bf16x8(delta + r * dim + j0)));
                const __m128i h1 = round_bf16x8(_mm256_add_ps(v1, load_bf16x8(delta + r * dim + j0 + 8)));
                _mm_storeu_si128((__m128i *)(xr + j0), h0);
                _mm_storeu_si128((__m128i *)(xr + j0 + 8), h1);
                v0 = load_bf16x8(xr + j0), v1 = load_bf16x8(xr + j0 + 8);
            }
            sq0 = _mm256_add_ps(sq0, _mm256_mul_ps(v0, v0));
            sq1 = _mm256_add_ps(sq1, _mm256_mul_ps(v1, v1));
        }
        _mm256_storeu_ps(lane, sq0);
        _mm256_storeu_ps(lane + 8, sq1);
#endif
        if (delta) {
            const uint16_t *dr = delta + r * dim;
            for (int j = j0; j < dim; j++) xr[j] = f32_to_bf16(bf16_to_f32(xr[j]) + bf16_to_f32(dr[j]));
        }
        for (; j0 < dim; j0 += NORM_LANES) {
            const int n = dim - j0 < NORM_LANES ? dim - j0 : NORM_LANES;
            for (int l = 0; l < n; l++) {
                const float v = bf16_to_f32(xr[j0 + l]);
                lane[l] += v * v;
            }
        }
        for (int h = NORM_LANES / 2; h >= 1; h /= 2)
            for (int l = 0; l < h; l++) lane[l] += lane[l + h];
        const float inv = 1.f / sqrtf(lane[0] / (float)dim + eps);
        int j = 0;
#if defined(__AVX512F__)
        const __m512 iv = _mm512_set1_ps(inv);
        for (; j + 16 <= dim; j += 16)
            _mm256_storeu_si256((__m256i *)(o + j), round_bf16x16(_mm512_mul_ps(
                _mm512_mul_ps(load_bf16x16(xr + j), iv), load_bf16x16(w + j))));
#elif defined(__AVX2__) && defined(__FMA__)
        const __m256 iv = _mm256_set1_ps(inv);
        for (; j + 8 <= dim; j += 8)
            _mm_storeu_si128((__m128i *)(o + j), round_bf16x8(_mm256_mul_ps(
                _mm256_mul_ps(load_bf16x8(xr + j), iv), load_bf16x8(w + j))));
#endif
        for (; j < dim; j++) o[j] = f32_to_bf16(bf16_to_f32(xr[j]) * inv * bf16_to_f32(w[j]));
    }
    return 0;
}

/* Rotary embedding in place on bfloat16 heads x [rows, heads, dim] (rows row_stride apart,
 * heads dense), rotate-half layout: x * cos + rotate_half(x) * sin with cos, sin [rows, dim].
 * Each product and the sum are rounded to bfloat16, as torch's three ops round them. */
int rope_bf16(uint16_t *x, int64_t rows, int heads, int dim, int64_t row_stride,
              const uint16_t *cos, const uint16_t *sin) {
    const int half = dim / 2;
#pragma omp parallel for if (rows >= 16) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * dim, *s = sin + r * dim;
        for (int h = 0; h < heads; h++) {
            uint16_t *v = x + r * row_stride + (int64_t)h * dim;
            float lo[MAX_DIM / 2], hi[MAX_DIM / 2];
            for (int j = 0; j < half; j++) {
                lo[j] = bf16_to_f32(v[j]);
                hi[j] = bf16_to_f32(v[j + half]);
            }
            for (int j = 0; j < half; j++) {
                const float a = bf16_to_f32(f32_to_bf16(lo[j] * bf16_to_f32(c[j])));
                const float b = bf16_to_f32(f32_to_bf16(-hi[j] * bf16_to_f32(s[j])));
                v[j] = f32_to_bf16(a + b);
                const float a2 = bf16_to_f32(f32_to_bf16(hi[j] * bf16_to_f32(c[j + half])));
                const float b2 = bf16_to_f32(f32_to_bf16(lo[j] * bf16_to_f32(s[j + half])));
                v[j + half] = f32_to_bf16(a2 + b2);
            }
        }
    }
    return 0;
}

/* Linear layers on the rows of a decode batch, straight from oneDNN's prepacked bfloat16
 * weight (layout AB16b32a2b: blocks of 32 outputs x 32 inputs, each [16 input pairs][32
 * outputs][2]; Linear checks the layout against oneDNN at load): y [m, n] = x [m, k] . W^T
 * (+ bias), products exact, sums in float32, rounded once to bfloat16. oneDNN's own call
 * costs ~15 us before any work, 120 times a step, and streamed these weights from memory at
 * ~19 GB/s in a batch-8 decode step (measured). linear_packed_bf16 takes AMX where the CPU
 * has it, else AVX512-BF16 for one or two rows, else returns -1 (the caller keeps oneDNN).
 *
 * gemv_packed_bf16, AVX512-BF16: each block of 32 outputs is two accumulators per row and
 * the weight is read once, front to back, with no horizontal sums. Returns -1 for m outside
 * 1..2: from 3 rows on oneDNN was faster (9.5 vs 12.3 ms for the embedded model's layers at
 * 3 rows; 8.4 vs 10.4 at 1). */
#if defined(__AVX512BF16__)
ALWAYS_INLINE void gemv_block(const uint16_t *x, const uint16_t *blk, const uint16_t *bias,
                              uint16_t *y, int64_t n, int64_t k, int64_t nb, const int m) {
    __m512 acc[2][2];
    for (int r = 0; r < 2; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < k / 32; kb++) {
        const uint16_t *b = blk + kb * 1024;
        __builtin_prefetch(b + 4096);
        __builtin_prefetch(b + 4096 + 512);
        for (int kp = 0; kp < 16; kp++) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(b + kp * 64);
            const __m512bh w1 = (__m512bh)_mm512_loadu_si512(b + kp * 64 + 32);
            for (int r = 0; r < m; r++) {
                int32_t pair;
                memcpy(&pair, x + r * k + kb * 32 + 2 * kp, sizeof pair);
                const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xr);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xr);
            }
        }
    }
    for (int r = 0; r < m; r++)
        for (int h = 0; h < 2; h++) {
            __m512 v = acc[r][h];
            const int64_t o = nb * 32 + 16 * h;
            if (bias) v = _mm512_add_ps(v, load_bf16x16(bias + o));
            _mm256_storeu_si256((__m256i *)(y + r * n + o), (__m256i)_mm512_cvtneps_pbh(v));
        }
}
#endif

int gemv_packed_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                     int64_t m, int64_t n, int64_t k) {
#if defined(__AVX512BF16__)
    if (m < 1 || m > 2 || n % 32 || k % 32) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n / 32; nb++) {
        const uint16_t *blk = w + nb * (k / 32) * 1024;
        if (m == 1) /* a constant row count: the accumulators stay in registers */
            gemv_block(x, blk, bias, y, n, k, nb, 1);
        else
            gemv_block(x, blk, bias, y, n, k, nb, 2);
    }
    return 0;
#else
    (void)x, (void)w, (void)bias, (void)y, (void)m, (void)n, (void)k;
    return -1;
#endif
}

/* amx_linear_bf16, AMX: each 32 x 32 block of the packed weight is two B tiles as it lies
 * (16 input pairs x 16 outputs x 2, rows 128 bytes apart), so nothing is repacked; x goes in
 * A tiles of 16 rows (the last block of rows in tiles of its own height), and each block of
 * 32 outputs sums over k in two C tiles, in oneDNN's order up to 16 rows at least (bit-equal
 * there, test; past 32 rows oneDNN splits differently). At 1-64 rows it is 1.1-2.5x faster than oneDNN and, at 1-2 rows, than
 * gemv_packed_bf16 (the embedded model's shapes); from ~128 rows oneDNN, which blocks for
 * the caches, is faster. Returns -1 where it does not apply (no AMX, the kernel refused it,
 * sizes not multiples of 32). */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

/* This thread's tiles for rows of x: 0, 1: C; 2: A; 3, 4: B; and 5, 6, 7: C, C, A of the
 * last `rem` rows, where m is not a multiple of 16. */
static void amx_configure(int rem) {
    struct tile_config cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.rows[t] = t < 5 ? 16 : rem, cfg.colsb[t] = rem || t < 5 ? 64 : 0;
    _tile_loadconfig(&cfg);
}

/* One 16-row block (tiles C0 C1 A = 0 1 2) or the last, shorter one (5 6 7) of x times a
 * block of 32 outputs, summed over k, stored as float32 rows of 32 to c. */
#define AMX_BLOCK(C0, C1, A)                                                                     \
    do {                                                                                         \
        _tile_zero(C0);                                                                          \
        _tile_zero(C1);                                                                          \
        for (int64_t kb = 0; kb < k / 32; kb++) {                                                \
            const uint16_t *b = blk + kb * 1024;                                                 \
            _tile_loadd(A, xr + kb * 32, k * 2);                                                 \
            _tile_loadd(3, b, 128);                                                              \
            _tile_loadd(4, b + 32, 128);                                                         \
            _tile_dpbf16ps(C0, A, 3);                                                            \
            _tile_dpbf16ps(C1, A, 4);                                                            \
        }                                                                                        \
        _tile_stored(C0, &c[0][0], 128);                                                         \
        _tile_stored(C1, &c[0][16], 128);                                                        \
    } while (0)

/* Every row of x [m, k] times block nb of 32 outputs (blk: its packed weight, k / 32 blocks
 * of 1024), plus bias, into y [m, n], on the tiles amx_configure set. */
static void amx_rows(const uint16_t *x, const uint16_t *blk, const uint16_t *bias, uint16_t *y,
                     int64_t m, int64_t n, int64_t k, int64_t nb) {
    float c[16][32];
    for (int64_t r0 = 0; r0 < m; r0 += 16) {
        const uint16_t *xr = x + r0 * k;
        const int rows = m - r0 < 16 ? (int)(m - r0) : 16;
        if (rows == 16)
            AMX_BLOCK(0, 1, 2);
        else
            AMX_BLOCK(5, 6, 7);
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < 2; h++) {
                __m512 v = _mm512_loadu_ps(&c[r][16 * h]);
                const int64_t o = nb * 32 + 16 * h;
                if (bias) v = _mm512_add_ps(v, load_bf16x16(bias + o));
                _mm256_storeu_si256((__m256i *)(y + (r0 + r) * n + o), (__m256i)_mm512_cvtneps_pbh(v));
            }
    }
}
#endif

int amx_linear_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                    int64_t m, int64_t n, int64_t k) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (m < 1 || n % 32 || k % 32 || !amx_allowed()) return -1;
#pragma omp parallel
    {
        amx_configure((int)(m % 16));
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n / 32; nb++) amx_rows(x, w + nb * (k / 32) * 1024, bias, y, m, n, k, nb);
        _tile_release();
    }
    return 0;
#else
    (void)x, (void)w, (void)bias, (void)y, (void)m, (void)n, (void)k;
    return -1;
#endif
}

/* callers keep m to a decode batch's rows (cpu_kernels.PACKED_ROWS): oneDNN is faster past */
int linear_packed_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
                       int64_t m, int64_t n, int64_t k) {
    if (amx_linear_bf16(x, w, bias, y, m, n, k) == 0) return 0;
    return gemv_packed_bf16(x, w, bias, y, m, n, k);
}

/* Weight-only int4 linear layers on bfloat16 rows: y [m, n] = x [m, k] . W^T (+ bias), W as
 * strata packs it (linear.pack_int4): per block of 16 outputs and group of `group` inputs,
 * group / 4 chunks of 32 bytes, then the group's 16 scales and 16 minima in float16. Byte
 * 2j + e of chunk c holds output j's codes of inputs 2c + e (low nibble) and group / 2 + 2c
 * + e (high nibble): zero-extended to 16-bit words, a nibble OR 0x4300 is the bfloat16 of
 * 128 + code, so one chunk is two AVX512-BF16 pair operands, [16 outputs][2 inputs], after
 * three integer ops (a table look-up per operand, vpermw, was 10% slower: one port does
 * every shuffle). With S = sum((128 + code) x), exact products summed in float32, each group
 * adds scale * S + (min - 128 scale) * sum(x): the affine dequantization w = code * scale +
 * min of GGUF's Q4_1 (and of quantize_int4). Three ways, by rows (the embedded model's shapes, 2 cores):
 * - int4_rows (1 row, or any where there is no AMX): AVX512-BF16 pair products, INT4_ROWS
 *   rows a pass over one block, whose weights stay in L1. ATen's int4 product, on its own
 *   packing, was 10-20% slower at 1-2 rows, as fast from 3; each row costs about the first.
 * - int4_tiles (2..INT4_TILE_ROWS rows, group 32): the same operands stored as AMX B tiles,
 *   one group's sums for every row per tile product, then the scales; the same sums, a
 *   row costing ~5% of the first: 2-4x int4_rows at 4-16 rows.
 * - int4_unpacked (more rows: a prefill): each block of 32 outputs unpacked to bfloat16,
 *   (code - 8) * scale + zero rounded once more, in a buffer in L2, then linear_packed's
 *   AMX product: 10x ATen's int4 product at 256 rows.
 * Each returns -1 where it does not apply (no AVX512-BF16 or AMX, n % 16 (32 unpacked),
 * group % 4 (32), k % group). */
#define INT4_ROWS 4       /* rows per pass of int4_block */
#define INT4_TILE_ROWS 16 /* the most rows of int4_tiles */
#define INT4_SPAN 8       /* groups per pass of int4_tiles: 8 B and C tiles, 16 KB, in L1 */
/* NOTE: the weights are prefetched this many groups ahead (5 KB at group 32): without it the
 * 1-row kernel waited on memory, 5.7 vs 3.9 ms per token (embedded model, 2-16 ahead alike) */
#define INT4_PREFETCH 16
#if defined(__AVX512BF16__)
/* chunk c's (128 + code) bfloat16 words: the pairs of inputs 2c (low nibbles) and group / 2
 * + 2c (high) of 16 outputs */
ALWAYS_INLINE void int4_operands(const uint8_t *chunk, __m512i *lo, __m512i *hi) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)chunk));
    const __m512i exponent = _mm512_set1_epi16(0x4300);
    *lo = _mm512_ternarylogic_epi32(w, _mm512_set1_epi16(0xF), exponent, 0xEA); /* a & b | c */
    *hi = _mm512_or_si512(_mm512_srli_epi16(w, 4), exponent);
}

/* the group's scales of 16 outputs, and their minima less 128 scales: what S and sum(x)
 * are multiplied by (float16, as Q4_1 keeps them) */
ALWAYS_INLINE void int4_scales(const uint8_t *group_end, __m512 *s, __m512 *zs) {
    *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)group_end));
    *zs = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), *s,
                           _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(group_end + 32))));
}

/* sum(x) of each row's groups, [m][k / group] (malloc'd; NULL when out of memory): 16 lanes
 * at a time, then one reduction per group. NOTE: a scalar loop here ran on one thread while
 * the other waited, ~0.5 ms of a batch-16 decode step (17 us a layer). */
static float *int4_group_sums(const uint16_t *x, int64_t m, int64_t k, int64_t group) {
    const int64_t groups = k / group;
    float *xsum = malloc(sizeof(float) * m * groups);
    if (!xsum) return NULL;
#pragma omp parallel for if (m * k >= 8192) schedule(static)
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xg = x + r * k + g * group;
            __m512 acc = _mm512_setzero_ps();
            int64_t i = 0;
            for (; i + 16 <= group; i += 16) acc = _mm512_add_ps(acc, load_bf16x16(xg + i));
            float s = _mm512_reduce_add_ps(acc);
            for (; i < group; i++) s += bf16_to_f32(xg[i]);
            xsum[r * groups + g] = s;
        }
    return xsum;
}

ALWAYS_INLINE void int4_store(const __m512 *tot, const uint16_t *bias, uint16_t *y, int64_t n,
                              int64_t nb, int64_t m) {
    for (int64_t r = 0; r < m; r++) {
        __m512 v = tot[r];
        if (bias) v = _mm512_add_ps(v, load_bf16x16(bias + nb * 16));
        _mm256_storeu_si256((__m256i *)(y + r * n + nb * 16), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

ALWAYS_INLINE void int4_block(const uint16_t *x, const float *xsum, const uint8_t *blk,
                              const uint16_t *bias, uint16_t *y, int64_t n, int64_t k,
                              int64_t group, int64_t nb, const int m) {
    const int64_t groups = k / group, chunks = group / 4, stride = group * 8 + 64;
    __m512 tot[INT4_ROWS];
    for (int r = 0; r < m; r++) tot[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = blk + g * stride;
        const uint16_t *xg = x + g * group;
        for (int64_t i = 0; i < stride; i += 64) __builtin_prefetch(b + INT4_PREFETCH * stride + i);
        __m512 lo[INT4_ROWS], hi[INT4_ROWS];
        for (int r = 0; r < m; r++) lo[r] = hi[r] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) {
            __m512i wl, wh;
            int4_operands(b + 32 * c, &wl, &wh);
            for (int r = 0; r < m; r++) {
                int32_t pl, ph;
                memcpy(&pl, xg + r * k + 2 * c, sizeof pl);
                memcpy(&ph, xg + r * k + group / 2 + 2 * c, sizeof ph);
                lo[r] = _mm512_dpbf16_ps(lo[r], (__m512bh)wl, (__m512bh)_mm512_set1_epi32(pl));
                hi[r] = _mm512_dpbf16_ps(hi[r], (__m512bh)wh, (__m512bh)_mm512_set1_epi32(ph));
            }
        }
        __m512 s, zs;
        int4_scales(b + chunks * 32, &s, &zs);
        for (int r = 0; r < m; r++) {
            tot[r] = _mm512_fmadd_ps(_mm512_add_ps(lo[r], hi[r]), s, tot[r]);
            tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * groups + g]), zs, tot[r]);
        }
    }
    int4_store(tot, bias, y, n, nb, m);
}

static int int4_rows(const uint16_t *x, const uint8_t *w, const uint16_t *bias, uint16_t *y,
                     int64_t m, int64_t n, int64_t k, int64_t group) {
    if (m < 1 || n % 16 || group % 4 || group < 4 || k % group) return -1;
    const int64_t groups = k / group, block = groups * (group * 8 + 64);
    float *xsum = int4_group_sums(x, m, k, group);
    if (!xsum) return -2;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < n / 16; nb++) {
        const uint8_t *blk = w + nb * block;
        for (int64_t r0 = 0; r0 < m; r0 += INT4_ROWS) {
            const uint16_t *xr = x + r0 * k;
            const float *sr = xsum + r0 * groups;
            uint16_t *yr = y + r0 * n;
            switch (m - r0 < INT4_ROWS ? m - r0 : INT4_ROWS) { /* constant row counts: registers */
            case 1: int4_block(xr, sr, blk, bias, yr, n, k, group, nb, 1); break;
            case 2: int4_block(xr, sr, blk, bias, yr, n, k, group, nb, 2); break;
            case 3: int4_block(xr, sr, blk, bias, yr, n, k, group, nb, 3); break;
            default: int4_block(xr, sr, blk, bias, yr, n, k, group, nb, 4); break;
            }
        }
    }
    free(xsum);
    return 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* One block of 16 outputs, group 32, INT4_SPAN groups a pass: their operands stored as B
 * tiles [16 pairs][16 outputs][2] (bt), each times the group's A tile of x [m rows][32]
 * into a C tile [m][16] (ct; tiles 0-2 and 5-3 in turn), then the scales. */
static void int4_tiles_block(const uint16_t *x, const float *xsum, const uint8_t *blk,
                             const uint16_t *bias, uint16_t *y, int64_t m, int64_t n,
                             int64_t k, int64_t nb, uint16_t *bt, float *ct) {
    const int64_t groups = k / 32, stride = 32 * 8 + 64;
    __m512 tot[INT4_TILE_ROWS];
    for (int r = 0; r < m; r++) tot[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += INT4_SPAN) {
        const int span = groups - g0 < INT4_SPAN ? (int)(groups - g0) : INT4_SPAN;
        for (int i = 0; i < span; i++) {
            for (int64_t o = 0; o < stride; o += 64)
                __builtin_prefetch(blk + (g0 + i + INT4_PREFETCH) * stride + o);
            for (int c = 0; c < 8; c++) {
                __m512i lo, hi;
                int4_operands(blk + (g0 + i) * stride + 32 * c, &lo, &hi);
                _mm512_store_si512(bt + i * 512 + c * 32, lo);
                _mm512_store_si512(bt + i * 512 + (c + 8) * 32, hi);
            }
        }
        int i = 0;
        for (; i + 1 < span; i += 2) { /* two tile sets: one product's loads overlap another's */
            _tile_loadd(3, bt + i * 512, 64);
            _tile_loadd(2, x + (g0 + i) * 32, k * 2);
            _tile_zero(0);
            _tile_loadd(4, bt + (i + 1) * 512, 64);
            _tile_loadd(5, x + (g0 + i + 1) * 32, k * 2);
            _tile_zero(1);
            _tile_dpbf16ps(0, 2, 3);
            _tile_dpbf16ps(1, 5, 4);
            _tile_stored(0, ct + i * 256, 64);
            _tile_stored(1, ct + (i + 1) * 256, 64);
        }
        if (i < span) {
            _tile_loadd(3, bt + i * 512, 64);
            _tile_loadd(2, x + (g0 + i) * 32, k * 2);
            _tile_zero(0);
            _tile_dpbf16ps(0, 2, 3);
            _tile_stored(0, ct + i * 256, 64);
        }
        for (int i = 0; i < span; i++) {
            __m512 s, zs;
            int4_scales(blk + (g0 + i) * stride + 256, &s, &zs);
            for (int r = 0; r < m; r++) {
                tot[r] = _mm512_fmadd_ps(_mm512_load_ps(ct + i * 256 + 16 * r), s, tot[r]);
                tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * groups + g0 + i]), zs, tot[r]);
            }
        }
    }
    int4_store(tot, bias, y, n, nb, m);
}

static int int4_tiles(const uint16_t *x, const uint8_t *w, const uint16_t *bias, uint16_t *y,
                      int64_t m, int64_t n, int64_t k, int64_t group) {
    if (m < 1 || m > INT4_TILE_ROWS || n % 16 || group != 32 || k % group || !amx_allowed())
        return -1;
    const int64_t block = (k / group) * (group * 8 + 64);
    float *xsum = int4_group_sums(x, m, k, group);
    if (!xsum) return -2;
#pragma omp parallel
    {
        struct tile_config cfg = {.palette = 1}; /* 0, 1: C; 2, 5: A; 3, 4: B */
        cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = cfg.rows[5] = (uint8_t)m;
        cfg.rows[3] = cfg.rows[4] = 16;
        for (int t = 0; t < 6; t++) cfg.colsb[t] = 64;
        _tile_loadconfig(&cfg);
        uint16_t bt[INT4_SPAN * 512] __attribute__((aligned(64)));
        float ct[INT4_SPAN * 256] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n / 16; nb++)
            int4_tiles_block(x, xsum, w + nb * block, bias, y, m, n, k, nb, bt, ct);
        _tile_release();
    }
    free(xsum);
    return 0;
}

/* Block nb of 32 outputs (two blocks of 16) as bfloat16, code * scale + min rounded once, in the packed layout amx_rows reads: [k / 32][16 pairs][32 outputs][2]. */
static void int4_unpack_block(const uint8_t *w, uint16_t *out, int64_t nb, int64_t k,
                              int64_t group) {
    const int64_t groups = k / group, chunks = group / 4, stride = group * 8 + 64;
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    /* words e0 o0 e1 o1 ...: two 16-lane bfloat16 halves back into pairs */
    static const int16_t zip[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i zip_idx = _mm512_loadu_si512(zip);
    for (int half = 0; half < 2; half++)
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *b = w + ((2 * nb + half) * groups + g) * stride;
            __m512 s, zs;
            int4_scales(b + chunks * 32, &s, &zs);
            for (int64_t c = 0; c < chunks; c++) {
                __m512i v[2];
                int4_operands(b + 32 * c, &v[0], &v[1]);
                for (int h = 0; h < 2; h++) { /* the pairs of inputs 2c and group / 2 + 2c */
                    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v[h], 16));
                    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v[h], high));
                    const __m256i e = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(even, s, zs));
                    const __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(odd, s, zs));
                    const __m512i pairs = _mm512_permutex2var_epi16(
                        _mm512_castsi256_si512(e), zip_idx, _mm512_castsi256_si512(o));
                    const int64_t pair = g * group / 2 + h * group / 4 + c; /* of all k / 2 */
                    _mm512_storeu_si512(out + (pair / 16) * 1024 + (pair % 16) * 64 + half * 32, pairs);
                }
            }
        }
}

static int int4_unpacked(const uint16_t *x, const uint8_t *w, const uint16_t *bias, uint16_t *y,
                         int64_t m, int64_t n, int64_t k, int64_t group) {
    if (m < 1 || n % 32 || group % 32 || k % group || !amx_allowed()) return -1;
    int failed = 0;
#pragma omp parallel
    {
        uint16_t *plain = aligned_alloc(64, sizeof *plain * k * 32);
        if (!plain) failed = 1;
#pragma omp barrier
        if (!failed) {
            amx_configure((int)(m % 16));
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < n / 32; nb++) {
                int4_unpack_block(w, plain, nb, k, group);
                amx_rows(x, plain, bias, y, m, n, k, nb);
            }
            _tile_release();
        }
        free(plain);
    }
    return failed ? -2 : 0;
}

#endif /* AMX */
#endif /* AVX512-BF16 */

/* AVX512-BF16 and AMX as above; below them the AVX2 kernel (cpu_gemm.c, group 32) */
int int4_linear_bf16(const uint16_t *x, const uint8_t *w, const uint16_t *bias, uint16_t *y,
                     int64_t m, int64_t n, int64_t k, int64_t group) {
#if defined(__AVX512BF16__)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (m > 1 && m <= INT4_TILE_ROWS && int4_tiles(x, w, bias, y, m, n, k, group) == 0) return 0;
    if (m > INT4_TILE_ROWS && int4_unpacked(x, w, bias, y, m, n, k, group) == 0) return 0;
#endif
    return int4_rows(x, w, bias, y, m, n, k, group);
#else
    if (group != 32) return -1;
    return linear_avx2(1, x, w, W_INT4, bias, y, m, n, k);
#endif
}

/* The gated MLP's activation on bfloat16 rows: gate_up [rows, 2 * n] (gate, then up, as the
 * fused projection writes them) -> out [rows, n] = silu(gate) * up, rounded as torch's two
 * ops round: silu to bfloat16, then the product. */
int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t n) {
/* NOTE: by element count, not rows: a decode batch's few rows ran on one thread (the other
 * waiting) */
#pragma omp parallel for if (rows * n >= 8192) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * 2 * n, *u = g + n;
        uint16_t *o = out + r * n;
        int64_t j0 = 0;
#if defined(__AVX512F__)
        /* 16 lanes: e / (1 + e) from a reciprocal estimate, a Newton step and a correcting
         * step on the quotient (the residual by FMA) instead of a division (16 cycles a
         * vector here): the division's float32 result but in rare ties of its rounding */
        for (; j0 + 16 <= n; j0 += 16) {
            const __m512 x = load_bf16x16(g + j0);
            const __m512 nx = _mm512_min_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), x)); /* -|x| */
            const __m512 e = exp_neg16(nx);
            const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), e);
            __m512 inv = _mm512_rcp14_ps(d);
            inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, _mm512_set1_ps(2.f)));
            const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
            const __m512 a = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), neg, e);
            const __m512 q0 = _mm512_mul_ps(a, inv); /* a / d, then one correcting step */
            const __m512 sig = _mm512_fmadd_ps(_mm512_fnmadd_ps(d, q0, a), inv, q0);
            const __m512 sf = widen_bf16x16(round_bf16x16(_mm512_mul_ps(x, sig)));
            _mm256_storeu_si256((__m256i *)(o + j0), round_bf16x16(_mm512_mul_ps(sf, load_bf16x16(u + j0))));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        /* 8 lanes, the scalar code's operations (one division) */
        for (; j0 + 8 <= n; j0 += 8) {
            const __m256 x = load_bf16x8(g + j0);
            const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
            const __m256 e = exp_neg8(_mm256_min_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), x)));
            const __m256 a = _mm256_blendv_ps(_mm256_set1_ps(1.f), e, neg);
            const __m256 sig = _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            const __m256 sf = load_bf16x8_of(round_bf16x8(_mm256_mul_ps(x, sig)));
            _mm_storeu_si128((__m128i *)(o + j0), round_bf16x8(_mm256_mul_ps(sf, load_bf16x8(u + j0))));
        }
#endif
        for (int64_t j = j0; j < n; j++) {
            const float x = bf16_to_f32(g[j]);
            const float e = exp_neg(x < 0.f ? x : -x); /* exp(-|x|) <= 1 */
            const float sig = (x < 0.f ? e : 1.f) / (1.f + e); /* one division */
            const float s = bf16_to_f32(f32_to_bf16(x * sig));
            o[j] = f32_to_bf16(s * bf16_to_f32(u[j]));
        }
    }
    return 0;
}
