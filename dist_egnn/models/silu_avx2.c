/* SiLU and its derivative for float32 on AVX2 + FMA CPUs: one pass, 8 lanes, a polynomial exp.

   ATen's SiLU spends ~1.3 ns per element in its exp on this project's CPU, and the fused edge blocks
   (fused.py) run nine SiLU passes per edge and layer: a third of a training step. The exp here is the
   Cephes expf scheme (n = round(x log2 e), r = x - n ln 2 in two parts, degree-6 polynomial, 2^n from the
   exponent bits), within a few float32 ulp of expf. Built and loaded at first use by native.py; NaN in gives
   NaN out (x itself is a factor of both results).
*/
#include <immintrin.h>
#include <stdint.h>
#include <math.h>

/* exp of 8 lanes; arguments clamped to [-87, 88] (no overflow to inf, no denormals) */
static inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(fn, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvtps_epi32(fn);
  __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(p, scale);
}

/* out = x * sigmoid(x) */
void silu_forward(const float* x, float* out, int64_t n) {
  int64_t i = 0; const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), v));
    _mm256_storeu_ps(out + i, _mm256_div_ps(v, _mm256_add_ps(one, e)));
  }
  for (; i < n; ++i) out[i] = x[i] / (1.0f + expf(-x[i]));
}
/* out = g * d silu / dx = g * s * (1 + x (1 - s)), s = sigmoid(x) */
void silu_backward(const float* g, const float* x, float* out, int64_t n) {
  int64_t i = 0; const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
    __m256 d = _mm256_mul_ps(s, _mm256_fmadd_ps(v, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(g + i), d));
  }
  for (; i < n; ++i) { float s = 1.0f / (1.0f + expf(-x[i])); out[i] = g[i] * s * (1.0f + x[i] * (1.0f - s)); }
}
