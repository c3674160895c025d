/* Linear layers for AVX2 + FMA (x86-64-v3): y [m, n] = x [m, k] . W^T (+ bias), float32 or
 * bfloat16 rows in and out, float32 products and sums, W in one of two layouts (both blocks
 * of 16 outputs, two inputs a pair):
 * - PAIR_BF16 (linear.pack_pairs): bfloat16 [n / 16][k / 2][16][2], a pair's 32 values one
 *   64-byte line;
 * - INT8 (linear.pack_int8, Q8_0's code): per block and group of 32, [16 pairs][16 outputs]
 *   [2] int8 codes, then 16 float16 scales: w = code * scale;
 * - INT4 (linear.pack_int4, Q4_1's affine code): per block of 16 outputs and group of 32
 *   inputs, 8 chunks of 32 bytes (byte 2j + e of chunk c: output j's codes of inputs 2c + e,
 *   low nibble, and 16 + 2c + e, high nibble), then 16 float16 scales and 16 float16 minima:
 *   w = code * scale + min, as GGUF's Q4_1 blocks (exactly: the product is exact in float32,
 *   so the FMA rounds once, as float(d) * q + float(m) does).
 * Per block and tile of 32 inputs, the weights become float32 [16 pairs][16 outputs x 2] in
 * an L1 buffer, then every row (3 a pass, accumulators in registers) adds its x pairs times
 * them; each output's two lanes are summed at the end. Rows go in chunks of LIN_ROWS so the
 * accumulators of a chunk stay in L1; a chunk converts the weights once for all its rows.
 * Returns -1 where it does not apply (no AVX2, n % 16, k % 32). */
#include "cpu_common.h"

#define LIN_ROWS 48 /* rows whose accumulators share one conversion of the weights */
#define LIN_PASS 3  /* rows a pass: 12 accumulators + a broadcast in 16 registers */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* the lanes (j, e) of part q (outputs 4q .. 4q + 3, each twice) of 16 float16 values */
static inline void pair_lanes(const uint8_t *f16, __m256 *out) {
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)f16));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(f16 + 16)));
    for (int q = 0; q < 4; q++) {
        const __m256i at = _mm256_add_epi32(_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                                            _mm256_set1_epi32(4 * (q % 2)));
        out[q] = _mm256_permutevar8x32_ps(q < 2 ? lo : hi, at);
    }
}

/* bfloat16 pairs of one tile: 16 pairs x 32 values -> float32 */
static inline void tile_bf16(const uint16_t *src, float *wbuf) {
    for (int i = 0; i < 64; i++) {
        const __m128i h = _mm_loadu_si128((const __m128i *)(src + 8 * i));
        _mm256_store_ps(wbuf + 8 * i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
}

/* one int4 group (8 chunks, then scales and minima) -> float32 pairs: pair c from the low
 * nibbles of chunk c (inputs 2c, 2c + 1), pair 8 + c from the high (16 + 2c, 17 + 2c) */
static inline void tile_int4(const uint8_t *grp, float *wbuf) {
    __m256 s[4], mn[4]; /* lanes (j, e) of part q: outputs 4q .. 4q + 3, each twice */
    pair_lanes(grp + 256, s);
    pair_lanes(grp + 288, mn);
    const __m256i low = _mm256_set1_epi32(15);
    for (int c = 0; c < 8; c++)
        for (int q = 0; q < 4; q++) {
            const __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 32 * c + 8 * q)));
            const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(t, low));
            const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(t, 4));
            _mm256_store_ps(wbuf + 32 * c + 8 * q, _mm256_fmadd_ps(lo, s[q], mn[q]));
            _mm256_store_ps(wbuf + 32 * (8 + c) + 8 * q, _mm256_fmadd_ps(hi, s[q], mn[q]));
        }
}

/* one int8 group ([16 pairs][16 outputs x 2] codes, then 16 float16 scales) -> float32 */
static inline void tile_int8(const uint8_t *grp, float *wbuf) {
    __m256 s[4];
    pair_lanes(grp + 512, s);
    for (int p = 0; p < 16; p++)
        for (int q = 0; q < 4; q++) {
            const __m256i t = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 32 * p + 8 * q)));
            _mm256_store_ps(wbuf + 32 * p + 8 * q, _mm256_mul_ps(_mm256_cvtepi32_ps(t), s[q]));
        }
}

/* acc [rows][32] += x rows (float32, k apart, from input k0) times a tile's 16 pairs */
ALWAYS_INLINE void tile_rows(const float *x, int64_t k, int64_t k0, const float *wbuf,
                             float *acc, const int rows) {
    __m256 a[LIN_PASS][4];
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) a[r][q] = _mm256_load_ps(acc + 32 * r + 8 * q);
    for (int p = 0; p < 16; p++) {
        const float *w = wbuf + 32 * p;
        for (int r = 0; r < rows; r++) {
            double pair;
            memcpy(&pair, x + r * k + k0 + 2 * p, sizeof pair);
            const __m256 xb = _mm256_castpd_ps(_mm256_set1_pd(pair));
            for (int q = 0; q < 4; q++) a[r][q] = _mm256_fmadd_ps(_mm256_load_ps(w + 8 * q), xb, a[r][q]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) _mm256_store_ps(acc + 32 * r + 8 * q, a[r][q]);
}

/* 32 lanes (j, e) of a row -> its 16 outputs (lane pairs summed), plus bias, stored */
static inline void finish_row(const float *acc, const void *bias, void *y, int ydtype,
                              int64_t n, int64_t o) {
    for (int h = 0; h < 2; h++) {
        const __m256 s = _mm256_hadd_ps(_mm256_load_ps(acc + 16 * h), _mm256_load_ps(acc + 16 * h + 8));
        __m256 v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(s), 0xD8));
        const int64_t at = o + 8 * h;
        if (bias) v = _mm256_add_ps(v, ydtype ? load_bf16x8((const uint16_t *)bias + at)
                                              : _mm256_loadu_ps((const float *)bias + at));
        if (ydtype) _mm_storeu_si128((__m128i *)((uint16_t *)y + at), round_bf16x8(v));
        else _mm256_storeu_ps((float *)y + at, v);
    }
    (void)n;
}

ALWAYS_INLINE __m256 pair_of(const float *x) { /* x[0], x[1] in every lane pair */
    double pair;
    memcpy(&pair, x, sizeof pair);
    return _mm256_castpd_ps(_mm256_set1_pd(pair));
}

/* One or two rows over all of k, each weight converted in registers and used at once (no
 * buffer: its stores were a third of the time of a batch-1 product); acc [rows][32]. */
ALWAYS_INLINE void direct_rows(const float *x, int64_t k, const void *w, int wkind, int64_t nb,
                               float *acc, const int rows) {
    const int64_t tiles = k / 32;
    __m256 a[2][4];
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) a[r][q] = _mm256_setzero_ps();
    for (int64_t t = 0; t < tiles; t++) {
        const float *xt = x + 32 * t;
        if (wkind == W_INT4) {
            const uint8_t *grp = (const uint8_t *)w + (nb * tiles + t) * 320;
            for (int o = 0; o < 320; o += 64) __builtin_prefetch(grp + 4 * 320 + o);
            __m256 s[4], mn[4];
            pair_lanes(grp + 256, s);
            pair_lanes(grp + 288, mn);
            for (int c = 0; c < 8; c++) {
                __m256 xl[2], xh[2];
                for (int r = 0; r < rows; r++) xl[r] = pair_of(xt + r * k + 2 * c), xh[r] = pair_of(xt + r * k + 16 + 2 * c);
                for (int q = 0; q < 4; q++) {
                    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 32 * c + 8 * q)));
                    const __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), s[q], mn[q]);
                    const __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s[q], mn[q]);
                    for (int r = 0; r < rows; r++) {
                        a[r][q] = _mm256_fmadd_ps(wl, xl[r], a[r][q]);
                        a[r][q] = _mm256_fmadd_ps(wh, xh[r], a[r][q]);
                    }
                }
            }
        } else if (wkind == W_INT8) {
            const uint8_t *grp = (const uint8_t *)w + (nb * tiles + t) * 544;
            for (int o = 0; o < 544; o += 64) __builtin_prefetch(grp + 4 * 544 + o);
            __m256 s[4];
            pair_lanes(grp + 512, s);
            for (int p = 0; p < 16; p++) {
                __m256 xb[2];
                for (int r = 0; r < rows; r++) xb[r] = pair_of(xt + r * k + 2 * p);
                for (int q = 0; q < 4; q++) {
                    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 32 * p + 8 * q)));
                    const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(v), s[q]);
                    for (int r = 0; r < rows; r++) a[r][q] = _mm256_fmadd_ps(wv, xb[r], a[r][q]);
                }
            }
        } else {
            const uint16_t *src = (const uint16_t *)w + (nb * (k / 2) + 16 * t) * 32;
            for (int o = 0; o < 1024; o += 64) __builtin_prefetch((const char *)src + 4096 + o);
            for (int p = 0; p < 16; p++) {
                __m256 xb[2];
                for (int r = 0; r < rows; r++) xb[r] = pair_of(xt + r * k + 2 * p);
                for (int q = 0; q < 4; q++) {
                    const __m256 wv = load_bf16x8(src + 32 * p + 8 * q);
                    for (int r = 0; r < rows; r++) a[r][q] = _mm256_fmadd_ps(wv, xb[r], a[r][q]);
                }
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) _mm256_store_ps(acc + 32 * r + 8 * q, a[r][q]);
}

/* One row of int4 weights: each group's codes times x summed first, then scaled, and the
 * minima times the group's sum of x (xsum / 2 in both lanes of a pair): 7 operations per 16
 * weights against direct_rows' 9 (batch-1 decode is bound by them, not by memory). */
static void int4_row(const float *x, const float *xsum, int64_t k, const uint8_t *w, int64_t nb,
                     float *acc) {
    const int64_t tiles = k / 32;
    __m256 a[4];
    for (int q = 0; q < 4; q++) a[q] = _mm256_setzero_ps();
    for (int64_t t = 0; t < tiles; t++) {
        const float *xt = x + 32 * t;
        const uint8_t *grp = w + (nb * tiles + t) * 320;
        for (int o = 0; o < 320; o += 64) __builtin_prefetch(grp + 4 * 320 + o);
        __m256 g[4];
        for (int q = 0; q < 4; q++) g[q] = _mm256_setzero_ps();
        for (int c = 0; c < 8; c++) {
            const __m256 xl = pair_of(xt + 2 * c), xh = pair_of(xt + 16 + 2 * c);
            for (int q = 0; q < 4; q++) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(grp + 32 * c + 8 * q)));
                g[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), xl, g[q]);
                g[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xh, g[q]);
            }
        }
        __m256 s[4], mn[4];
        pair_lanes(grp + 256, s);
        pair_lanes(grp + 288, mn);
        const __m256 half = _mm256_set1_ps(0.5f * xsum[t]);
        for (int q = 0; q < 4; q++) a[q] = _mm256_fmadd_ps(mn[q], half, _mm256_fmadd_ps(g[q], s[q], a[q]));
    }
    for (int q = 0; q < 4; q++) _mm256_store_ps(acc + 8 * q, a[q]);
}

/* bfloat16 rows as int16 per group of 32: xq = x * 2^(14 - E), E the exponent of the
 * group's largest |x|, so every value within 2^7 of it (8 significant bits) is exact and the
 * rest round at 2^(E - 14); xs = 2^(E - 14); xsum the group's sum of x (float32). NOTE: a
 * group whose largest |x| is under 2^-113 (no scale in float32) counts as zeros. */
static void int16_groups(const float *x, int64_t k, int16_t *xq, float *xs, float *xsum) {
    for (int64_t g = 0; g < k / 32; g++) {
        const float *xg = x + 32 * g;
        __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (int i = 0; i < 4; i++) {
            const __m256 v = _mm256_loadu_ps(xg + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, abs));
            sum = _mm256_add_ps(sum, v);
        }
        float lanes[8], sums[8];
        _mm256_storeu_ps(lanes, mx);
        _mm256_storeu_ps(sums, sum);
        float top = 0.f, total = 0.f;
        for (int i = 0; i < 8; i++) top = lanes[i] > top ? lanes[i] : top, total += sums[i];
        xsum[g] = total;
        uint32_t bits;
        memcpy(&bits, &top, sizeof bits);
        const int e = (int)(bits >> 23) - 127; /* top in [2^e, 2^(e + 1)) */
        if (e < -113) {
            memset(xq + 32 * g, 0, sizeof(int16_t) * 32);
            xs[g] = 0.f;
            continue;
        }
        const uint32_t up_bits = (uint32_t)(127 + 14 - e) << 23, down_bits = (uint32_t)(127 - 14 + e) << 23;
        float up, down;
        memcpy(&up, &up_bits, sizeof up);
        memcpy(&down, &down_bits, sizeof down);
        xs[g] = down;
        const __m256 u = _mm256_set1_ps(up);
        for (int i = 0; i < 4; i += 2) {
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + 8 * i), u));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + 8 * i + 8), u));
            const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(xq + 32 * g + 8 * i), p);
        }
    }
}

/* Up to I16_PASS bfloat16 rows of a group of int4 or int8 weights as integer dot products:
 * each group's codes times its int16 x (int16_groups) summed exactly in int32 (vpmaddwd on
 * the (output, pair) lanes of the packing: one 32-bit lane an output), then acc [rows][16]
 * += that * scale * xs (+ minimum * xsum for int4). vpmaddwd and vpaddd share the vector
 * pipes where FMAs take two: about twice the float path's products a cycle, and a third of
 * its operations per weight at one row. */
#define I16_PASS 4
ALWAYS_INLINE void group_rows_i16(const int16_t *xq, const float *xs, const float *xsum,
                                  int64_t k, int64_t tiles, const uint8_t *grp, int wkind,
                                  int64_t t, float *acc, const int rows) {
    __m256i g[I16_PASS][2];
    for (int r = 0; r < rows; r++) g[r][0] = g[r][1] = _mm256_setzero_si256();
    if (wkind == W_INT4) {
        const __m256i low = _mm256_set1_epi16(15);
        for (int c = 0; c < 8; c++) {
            __m256i xl[I16_PASS], xh[I16_PASS];
            for (int r = 0; r < rows; r++) {
                int32_t pl, ph;
                memcpy(&pl, xq + r * k + 32 * t + 2 * c, sizeof pl);
                memcpy(&ph, xq + r * k + 32 * t + 16 + 2 * c, sizeof ph);
                xl[r] = _mm256_set1_epi32(pl), xh[r] = _mm256_set1_epi32(ph);
            }
            for (int h = 0; h < 2; h++) { /* outputs 8h .. 8h + 7 */
                const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(grp + 32 * c + 16 * h)));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_srli_epi16(v, 4);
                for (int r = 0; r < rows; r++) {
                    g[r][h] = _mm256_add_epi32(g[r][h], _mm256_madd_epi16(lo, xl[r]));
                    g[r][h] = _mm256_add_epi32(g[r][h], _mm256_madd_epi16(hi, xh[r]));
                }
            }
        }
    } else { /* int8: pair p's 32 bytes, outputs 0-7 then 8-15 */
        for (int p = 0; p < 16; p++) {
            __m256i xb[I16_PASS];
            for (int r = 0; r < rows; r++) {
                int32_t pr;
                memcpy(&pr, xq + r * k + 32 * t + 2 * p, sizeof pr);
                xb[r] = _mm256_set1_epi32(pr);
            }
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(grp + 32 * p + 16 * h)));
                for (int r = 0; r < rows; r++) g[r][h] = _mm256_add_epi32(g[r][h], _mm256_madd_epi16(v, xb[r]));
            }
        }
    }
    const int64_t at = wkind == W_INT4 ? 256 : 512; /* the group's float16 scales */
    for (int h = 0; h < 2; h++) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + at + 16 * h)));
        const __m256 mn = wkind == W_INT4 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 288 + 16 * h)))
                                          : _mm256_setzero_ps();
        for (int r = 0; r < rows; r++) {
            float *ar = acc + 16 * r + 8 * h;
            __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(g[r][h]),
                                       _mm256_mul_ps(s, _mm256_set1_ps(xs[r * tiles + t])), _mm256_load_ps(ar));
            if (wkind == W_INT4) a = _mm256_fmadd_ps(mn, _mm256_set1_ps(xsum[r * tiles + t]), a);
            _mm256_store_ps(ar, a);
        }
    }
}

/* Rows [0, m) (at most LIN_ROWS) of block nb on the integer path: acc [m][16] */
static void block_rows_i16(const int16_t *xq, const float *xs, const float *xsum, int64_t m,
                           int64_t k, const uint8_t *w, int wkind, int64_t nb, float *acc) {
    const int64_t tiles = k / 32, size = wkind == W_INT4 ? 320 : 544;
    memset(acc, 0, sizeof(float) * 16 * m);
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *grp = w + (nb * tiles + t) * size;
        for (int64_t o = 0; o < size; o += 64) __builtin_prefetch(grp + 4 * size + o);
        int64_t r = 0;
        for (; r + I16_PASS <= m; r += I16_PASS)
            group_rows_i16(xq + r * k, xs + r * tiles, xsum + r * tiles, k, tiles, grp, wkind, t, acc + 16 * r, I16_PASS);
        switch (m - r) {
        case 3: group_rows_i16(xq + r * k, xs + r * tiles, xsum + r * tiles, k, tiles, grp, wkind, t, acc + 16 * r, 3); break;
        case 2: group_rows_i16(xq + r * k, xs + r * tiles, xsum + r * tiles, k, tiles, grp, wkind, t, acc + 16 * r, 2); break;
        case 1: group_rows_i16(xq + r * k, xs + r * tiles, xsum + r * tiles, k, tiles, grp, wkind, t, acc + 16 * r, 1); break;
        default: break;
        }
    }
}

/* 16 outputs of a row in order, plus bias, stored */
static inline void finish_plain(const float *acc, const void *bias, void *y, int ydtype, int64_t o) {
    for (int h = 0; h < 2; h++) {
        __m256 v = _mm256_load_ps(acc + 8 * h);
        const int64_t at = o + 8 * h;
        if (bias) v = _mm256_add_ps(v, ydtype ? load_bf16x8((const uint16_t *)bias + at)
                                              : _mm256_loadu_ps((const float *)bias + at));
        if (ydtype) _mm_storeu_si128((__m128i *)((uint16_t *)y + at), round_bf16x8(v));
        else _mm256_storeu_ps((float *)y + at, v);
    }
}

/* x16: bfloat16 rows of int4 weights as int16 groups (int16_groups), else NULL */
typedef struct {
    const int16_t *xq;
    const float *xs, *xsum;
} int16_rows;

static void linear_block(const float *x, const int16_rows *x16, const void *w, int wkind,
                         const void *bias, void *y, int ydtype, int64_t m, int64_t n, int64_t k,
                         int64_t nb, float *wbuf, float *acc) {
    const int64_t tiles = k / 32;
    if (x16) {
        for (int64_t r0 = 0; r0 < m; r0 += LIN_ROWS) {
            const int64_t rows = m - r0 < LIN_ROWS ? m - r0 : LIN_ROWS;
            block_rows_i16(x16->xq + r0 * k, x16->xs + r0 * tiles, x16->xsum + r0 * tiles, rows,
                           k, (const uint8_t *)w, wkind, nb, acc);
            for (int64_t r = 0; r < rows; r++)
                finish_plain(acc + 16 * r, bias, (uint16_t *)y + (r0 + r) * n, ydtype, nb * 16);
        }
        return;
    }
    if (m <= 2) { /* a decode step's few rows: no buffer */
        if (m == 1 && wkind == W_INT4) int4_row(x, x + k, k, (const uint8_t *)w, nb, acc);
        else if (m == 1) direct_rows(x, k, w, wkind, nb, acc, 1);
        else direct_rows(x, k, w, wkind, nb, acc, 2);
        for (int64_t r = 0; r < m; r++) {
            void *yr = ydtype ? (void *)((uint16_t *)y + r * n) : (void *)((float *)y + r * n);
            finish_row(acc + 32 * r, bias, yr, ydtype, n, nb * 16);
        }
        return;
    }
    for (int64_t r0 = 0; r0 < m; r0 += LIN_ROWS) {
        const int64_t rows = m - r0 < LIN_ROWS ? m - r0 : LIN_ROWS;
        memset(acc, 0, sizeof(float) * 32 * rows);
        for (int64_t t = 0; t < tiles; t++) {
            if (wkind == W_INT4 || wkind == W_INT8) {
                const int64_t size = wkind == W_INT4 ? 320 : 544; /* bytes a group */
                const uint8_t *grp = (const uint8_t *)w + (nb * tiles + t) * size;
                for (int64_t o = 0; o < size; o += 64) __builtin_prefetch(grp + 4 * size + o);
                if (wkind == W_INT4) tile_int4(grp, wbuf);
                else tile_int8(grp, wbuf);
            } else {
                tile_bf16((const uint16_t *)w + (nb * (k / 2) + 16 * t) * 32, wbuf);
            }
            const float *xr = x + r0 * k;
            int64_t r = 0;
            for (; r + LIN_PASS <= rows; r += LIN_PASS)
                tile_rows(xr + r * k, k, 32 * t, wbuf, acc + 32 * r, LIN_PASS);
            if (rows - r == 2) tile_rows(xr + r * k, k, 32 * t, wbuf, acc + 32 * r, 2);
            else if (rows - r == 1) tile_rows(xr + r * k, k, 32 * t, wbuf, acc + 32 * r, 1);
        }
        for (int64_t r = 0; r < rows; r++) {
            void *yr = ydtype ? (void *)((uint16_t *)y + (r0 + r) * n) : (void *)((float *)y + (r0 + r) * n);
            finish_row(acc + 32 * r, bias, yr, ydtype, n, nb * 16);
        }
    }
}
#endif

/* dtype: 0 float32, 1 bfloat16 (x, y and bias alike); wkind: W_PAIR_BF16, W_INT4, W_INT8 */
#define LIN_STACK 8192 /* floats of converted x kept on the stack (a decode batch's rows) */
int linear_avx2(int dtype, const void *x, const void *w, int wkind, const void *bias, void *y,
                int64_t m, int64_t n, int64_t k) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (m < 1 || n % 16 || k % 32) return -1;
    /* x as float32 (converted once), then for one row of int4 each group's sum of x; for one
     * or two bfloat16 rows of int4, their int16 groups */
    const int integer = dtype == 1 && wkind != W_PAIR_BF16;
    const int64_t need = m * k + (m == 1 ? k / 32 : 0) + (integer ? m * k / 2 + 2 * m * k / 32 : 0);
    float stack[LIN_STACK] __attribute__((aligned(64)));
    float *conv = need <= LIN_STACK ? stack : aligned_alloc(64, sizeof(float) * ((need + 15) / 16 * 16));
    if (!conv) return -2;
    const float *xf = (const float *)x;
    if (dtype) {
#pragma omp parallel for if (m * k >= 65536) schedule(static)
        for (int64_t i = 0; i < m * k / 8; i++)
            _mm256_storeu_ps(conv + 8 * i, load_bf16x8((const uint16_t *)x + 8 * i));
        xf = conv;
    } else if (m == 1) {
        memcpy(conv, x, sizeof(float) * k);
        xf = conv;
    }
    if (m == 1 && !integer) /* int4_row's group sums (the integer path makes its own) */
        for (int64_t g = 0; g < k / 32; g++) {
            __m256 s = _mm256_loadu_ps(xf + 32 * g);
            for (int i = 1; i < 4; i++) s = _mm256_add_ps(s, _mm256_loadu_ps(xf + 32 * g + 8 * i));
            const __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
            conv[k + g] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
        }
    int16_rows x16 = {NULL, NULL, NULL};
    if (integer) {
        float *xs = conv + m * k + (m == 1 ? k / 32 : 0), *xsum = xs + m * k / 32;
        int16_t *xq = (int16_t *)(xsum + m * k / 32);
        for (int64_t r = 0; r < m; r++)
            int16_groups(xf + r * k, k, xq + r * k, xs + r * k / 32, xsum + r * k / 32);
        x16 = (int16_rows){xq, xs, xsum};
    }
#pragma omp parallel
    {
        float wbuf[16 * 32] __attribute__((aligned(64)));
        float acc[32 * LIN_ROWS] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t nb = 0; nb < n / 16; nb++)
            linear_block(xf, integer ? &x16 : NULL, w, wkind, bias, y, dtype, m, n, k, nb, wbuf, acc);
    }
    if (conv != stack) free(conv);
    return 0;
#else
    (void)dtype, (void)x, (void)w, (void)wkind, (void)bias, (void)y, (void)m, (void)n, (void)k;
    return -1;
#endif
}

/* A mixture of experts' layer in one call (Qwen3-MoE on the AVX2 kernels): for each expert
 * e with counts[e] routed rows (the next counts[e] of rows / weights, the pairs sorted by
 * expert), its rows of x gathered, times w_up[e] (gate rows then up rows, linear_avx2's
 * layout wkind), silu(gate) * up (rounded to x's dtype as torch rounds it), times w_down[e],
 * each row times its routing weight and added into out [tokens, hidden] (float32, zeroed
 * by the caller; the experts' sums rounded once, by the caller). dtype: 0 float32, 1
 * bfloat16. Returns 0, or the failing product's code. */
int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t n);
int moe_avx2(int dtype, const void *x, int64_t hidden, int64_t inter, const int64_t *rows,
             const float *weights, const int64_t *counts, int experts, const void *const *w_up,
             const void *const *w_down, int wkind, float *out) {
    const int64_t es = dtype ? 2 : 4;
    int64_t most = 0;
    for (int e = 0; e < experts; e++) most = counts[e] > most ? counts[e] : most;
    if (most == 0) return 0;
    char *xb = malloc(most * hidden * es), *gu = malloc(most * 2 * inter * es);
    char *h = malloc(most * inter * es), *y = malloc(most * hidden * es);
    int rc = xb && gu && h && y ? 0 : -2;
    int64_t start = 0;
    for (int e = 0; e < experts && rc == 0; start += counts[e], e++) {
        const int64_t n = counts[e];
        if (n == 0) continue;
        for (int64_t r = 0; r < n; r++)
            memcpy(xb + r * hidden * es, (const char *)x + rows[start + r] * hidden * es, hidden * es);
        rc = linear_avx2(dtype, xb, w_up[e], wkind, NULL, gu, n, 2 * inter, hidden);
        if (rc) break;
        if (dtype) {
            silu_mul_bf16((const uint16_t *)gu, (uint16_t *)h, n, inter);
        } else {
            const float *g = (const float *)gu;
            float *hf = (float *)h;
            for (int64_t r = 0; r < n; r++)
                for (int64_t c = 0; c < inter; c++) {
                    const float a = g[r * 2 * inter + c], u = g[r * 2 * inter + inter + c];
                    hf[r * inter + c] = a / (1.f + expf(-a)) * u;
                }
        }
        rc = linear_avx2(dtype, h, w_down[e], wkind, NULL, y, n, hidden, inter);
        for (int64_t r = 0; r < n && rc == 0; r++) {
            float *o = out + rows[start + r] * hidden;
            const float w = weights[start + r];
            if (dtype)
                for (int64_t c = 0; c < hidden; c++) o[c] += w * bf16_to_f32(((const uint16_t *)y)[r * hidden + c]);
            else
                for (int64_t c = 0; c < hidden; c++) o[c] += w * ((const float *)y)[r * hidden + c];
        }
    }
    free(xb);
    free(gu);
    free(h);
    free(y);
    return rc;
}
