/* The layer ops around attention for CPU, on bfloat16 rows: the residual add + RMSNorm, the
 * rotary embedding in place, a linear layer on one or two rows from oneDNN's packed weight,
 * and silu-and-mul; each rounds where torch's ops round (the oracle: the tests against
 * torch). Built with cpu_decode.c into one library (cpu_build.py). */
#include "cpu_common.h"

/* The residual add and RMSNorm between blocks, on bfloat16 rows [rows, dim]: x += delta
 * (rounded to bfloat16, as torch's add; delta may be NULL), then out = x * rsqrt(mean(x^2) +
 * eps) * w, computed in float32 and rounded once (as torch's rms_norm). The sum of squares
 * runs in 16 lanes folded in halves, the order of torch's vectorized reduction, so the result
 * is bit-equal to torch's rather than one ulp off in a few elements. */
#define NORM_LANES 16
int add_rms_norm(const uint16_t *delta, uint16_t *x, const uint16_t *w, uint16_t *out,
                 int64_t rows, int dim, float eps) {
#pragma omp parallel for if (rows >= 32) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * dim;
        uint16_t *o = out + r * dim;
        float lane[NORM_LANES] = {0.f};
        if (delta) {
            const uint16_t *dr = delta + r * dim;
            for (int j = 0; j < dim; j++) xr[j] = f32_to_bf16(bf16_to_f32(xr[j]) + bf16_to_f32(dr[j]));
        }
        for (int j0 = 0; j0 < dim; j0 += NORM_LANES) {
            const int n = dim - j0 < NORM_LANES ? dim - j0 : NORM_LANES;
            for (int l = 0; l < n; l++) {
                const float v = bf16_to_f32(xr[j0 + l]);
                lane[l] += v * v;
            }
        }
        for (int h = NORM_LANES / 2; h >= 1; h /= 2)
            for (int l = 0; l < h; l++) lane[l] += lane[l + h];
        const float inv = 1.f / sqrtf(lane[0] / (float)dim + eps);
        for (int j = 0; j < dim; j++) o[j] = f32_to_bf16(bf16_to_f32(xr[j]) * inv * bf16_to_f32(w[j]));
    }
    return 0;
}

/* Rotary embedding in place on bfloat16 heads x [rows, heads, dim] (rows row_stride apart,
 * heads dense), rotate-half layout: x * cos + rotate_half(x) * sin with cos, sin [rows, dim].
 * Each product and the sum are rounded to bfloat16, as torch's three ops round them. */
int rope_bf16(uint16_t *x, int64_t rows, int heads, int dim, int64_t row_stride,
              const uint16_t *cos, const uint16_t *sin) {
    const int half = dim / 2;
#pragma omp parallel for if (rows >= 32) schedule(static)
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

/* A linear layer on the one or two rows of a small decode batch, straight from oneDNN's
 * prepacked bfloat16 weight (layout AB16b32a2b: blocks of 32 outputs x 32 inputs, each
 * [16 input pairs][32 outputs][2]; Linear checks the layout against oneDNN at load): y [m, n]
 * = x [m, k] . W^T (+ bias), summed in float32 by AVX512-BF16 pair products, rounded once to
 * bfloat16. Each block of 32 outputs is two accumulators per row and the weight is read once,
 * front to back, with no horizontal sums: oneDNN's call costs ~15 us before any work, 120
 * times a step, and it streams these weights slower (measured). Returns -1 where it does not
 * apply (no AVX512-BF16, m outside 1..2, sizes not multiples of 32). From 3 rows on oneDNN
 * is faster (9.5 vs 12.3 ms for the embedded model's layers at 3 rows; 8.4 vs 10.4 at 1). */
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

/* The gated MLP's activation on bfloat16 rows: gate_up [rows, 2 * n] (gate, then up, as the
 * fused projection writes them) -> out [rows, n] = silu(gate) * up, rounded as torch's two
 * ops round: silu to bfloat16, then the product. */
int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t n) {
#pragma omp parallel for if (rows >= 16) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gate_up + r * 2 * n, *u = g + n;
        uint16_t *o = out + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            const float x = bf16_to_f32(g[j]);
            const float e = exp_neg(x < 0.f ? x : -x); /* exp(-|x|) <= 1 */
            const float sig = x < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
            const float s = bf16_to_f32(f32_to_bf16(x * sig));
            o[j] = f32_to_bf16(s * bf16_to_f32(u[j]));
        }
    }
    return 0;
}

