/* What strata's CPU kernels share (cpu_decode.c: attention; cpu_ops.c: the other layer
 * ops): sizes, and the element helpers every kernel inlines. */
#ifndef STRATA_CPU_COMMON_H
#define STRATA_CPU_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADS 128
#define MAX_DIM 256
#define MAX_PAGE 64

/* The element helpers are always inlined and stay outside cpu_decode.c's optimize region:
 * GCC does not inline a function of such a region into one outside it, and an out-of-line
 * call per element made the norm, rope and silu kernels 5-10x slower than torch's ops
 * (measured). */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* cpu_gemm.c: linear layers on AVX2 + FMA (-1 below that level), by weight layout */
enum { W_PAIR_BF16 = 0, W_INT4 = 1, W_INT8 = 2 };
int linear_avx2(int dtype, const void *x, const void *w, int wkind, const void *bias, void *y,
                int64_t m, int64_t n, int64_t k);

ALWAYS_INLINE float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

ALWAYS_INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even */
    union { uint32_t u; float f; } c;
    c.f = f;
    const uint32_t nan = (c.u >> 16) | 0x40u, rounded = (c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16;
    return (uint16_t)((c.u & 0x7fffffffu) > 0x7f800000u ? nan : rounded); /* a select: vectorises */
}

/* exp for x <= 0 (softmax weights), vectorisable under omp simd: 2^n * p(r) with
 * x = n ln2 + r, |r| <= ln2 / 2, p of degree 6 (relative error ~2e-7); x < EXP_MIN gives 0.
 * exp_neg16 is the same on 16 lanes. */
#define EXP_MIN -87.f
#define EXP_LOG2E 1.44269504f
#define EXP_LN2_HI 0.693145752f /* ln 2 in two parts: n * ln2 stays exact for |n| <= 126 */
#define EXP_LN2_LO 1.42860677e-6f
#pragma omp declare simd notinbranch
ALWAYS_INLINE float exp_neg(float x) {
    const float xc = x < EXP_MIN ? EXP_MIN : x;
    const float n = __builtin_rintf(xc * EXP_LOG2E); /* to nearest even: vectorises */
    const float r = xc - n * EXP_LN2_HI - n * EXP_LN2_LO;
    float p = 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    union { uint32_t u; float f; } e;
    e.u = (uint32_t)((int32_t)n + 127) << 23;
    return x < EXP_MIN ? 0.f : p * e.f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* 8 bfloat16 values as float32 lanes */
ALWAYS_INLINE __m256 load_bf16x8(const uint16_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* 8 bfloat16 values held in a register, as float32 lanes */
ALWAYS_INLINE __m256 load_bf16x8_of(__m128i raw) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* 8 float32 lanes to bfloat16, rounded to nearest even (NaN stays NaN), as f32_to_bf16 */
ALWAYS_INLINE __m128i round_bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    /* 32-bit lanes (< 2^16) to 16-bit: packus works per 128-bit half, the permute joins them */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

/* exp_neg on 8 lanes (the same polynomial; 2^n built in the exponent bits) */
ALWAYS_INLINE __m256 exp_neg8(__m256 x) {
    const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(EXP_MIN));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_LT_OQ);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
/* 16 bfloat16 values as float32 lanes */
ALWAYS_INLINE __m512 widen_bf16x16(__m256i raw) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
ALWAYS_INLINE __m512 load_bf16x16(const uint16_t *p) {
    return widen_bf16x16(_mm256_loadu_si256((const __m256i *)p));
}

/* 16 float32 lanes to bfloat16, rounded to nearest even (NaN stays NaN), as f32_to_bf16 */
ALWAYS_INLINE __m256i round_bf16x16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}

/* exp_neg on 16 lanes (the same polynomial; 2^n by scalef, exact for the normal range) */
ALWAYS_INLINE __m512 exp_neg16(__m512 x) {
    const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_MIN), _CMP_LT_OQ);
    return _mm512_maskz_mov_ps((__mmask16)~under, _mm512_scalef_ps(p, n));
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static inline int amx_allowed(void) { /* Linux asks each process for the AMX state once */
    static int state; /* 0: not asked yet, 1: granted, -1: refused (once per source file) */
    if (!state) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? -1 : 1;
    return state == 1;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
#endif

#endif
