/* bfloat16 variants of the fused blocks' kernels (fused_avx2.c), for torch.autocast(dtype=torch.bfloat16).

   Same kernels, same maths, same argument order as their float32 namesakes in fused_avx2.c (with a ``_bf16``
   suffix): the (rows, H) activations and gradients, and the node rows the first layers gather, are bfloat16 in
   memory; every arithmetic operation is float32, and so are the geometry columns and their weights, the heads'
   weights and gradients, and every accumulator (scatter-add targets, weight gradients, the per-node and per-row
   results of the backward kernels). Written with AVX-512F/BW/VL and AVX512-BF16 (built with their flags, called
   only where the CPU has them; native.py checks): 16 lanes per instruction, bf16 -> fp32 a 16-bit shift,
   fp32 -> bf16 one ``vcvtneps2bf16`` (round to nearest even like torch; NaN stays NaN; inputs below the float32
   normal range round to zero), ragged row ends through lane masks. Why AVX-512 here and not AVX2 as the float32
   kernels: the kernels are bound by vector instructions, and on this project's CPU (Zen 5, full-width 512-bit
   units) an AVX2 bfloat16 SiLU with its rounding in integer operations ran 2x *slower* than the float32 one
   (0.57 vs 0.29 ms per (16384, 64) chunk) and this one 1.5x faster (0.20 ms); asv_bench/PERF_NOTES.md §12.
*/
#include <immintrin.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))
#define PREFETCH_ROWS 12
#define EDGE_GEO_MAX 16

/* exp of 16 lanes, the Cephes expf scheme of fused_avx2.c (2^n through scalef); arguments clamped to [-87, 88] */
INLINE __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(fn, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, fn);
}
INLINE __m512 silu16(__m512 v) {
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}
/* d silu / dx = s (1 + x (1 - s)), s = sigmoid(x) */
INLINE __m512 dsilu16(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), v))));
  return _mm512_mul_ps(s, _mm512_fmadd_ps(v, _mm512_sub_ps(one, s), one));
}

/* lanes j .. j + 15 of a row of n: all of them, or the ragged end */
INLINE __mmask16 lanes(int64_t n, int64_t j) { return n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u); }
INLINE __m512 ldb(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
INLINE void stb(uint16_t* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v)); }
INLINE __m512 ldf(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
INLINE void stf(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
static inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t j = 0; j < bytes; j += 64) _mm_prefetch((const char*)row + j, _MM_HINT_T0);
}

/* out = silu(x) */
void silu_forward_bf16(const uint16_t* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n, i);
    stb(out + i, silu16(ldb(x + i, m)), m);
  }
}

/* out = g silu'(x) */
void silu_backward_bf16(const uint16_t* g, const uint16_t* x, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n, i);
    stb(out + i, _mm512_mul_ps(ldb(g + i, m), dsilu16(ldb(x + i, m))), m);
  }
}

/* pre1[k] = proj_recv[recv[k]] + proj_send[send[k]] + geo[k] @ w_geo_t,  a1[k] = silu(pre1[k]);  pre1 may be NULL.
   proj_recv, proj_send, pre1, a1 bfloat16 (rows of h); geo (e, g) and w_geo_t (g, h) float32. */
void edge_pre1_silu_bf16(const uint16_t* restrict proj_recv, const uint16_t* restrict proj_send,
                         const int64_t* restrict recv, const int64_t* restrict send, const float* restrict geo,
                         const float* restrict w_geo_t, int64_t e, int64_t h, int64_t g, uint16_t* restrict pre1,
                         uint16_t* restrict a1) {
  for (int64_t k = 0; k < e; ++k) {
    if (k + PREFETCH_ROWS < e) prefetch_row(proj_send + send[k + PREFETCH_ROWS] * h, h * 2);
    const uint16_t* pr = proj_recv + recv[k] * h;
    const uint16_t* ps = proj_send + send[k] * h;
    const float* gk = geo + k * g;
    for (int64_t j = 0; j < h; j += 16) {
      const __mmask16 m = lanes(h, j);
      __m512 v = _mm512_add_ps(ldb(pr + j, m), ldb(ps + j, m));
      for (int64_t c = 0; c < g; ++c) v = _mm512_fmadd_ps(_mm512_set1_ps(gk[c]), ldf(w_geo_t + c * h + j, m), v);
      if (pre1) stb(pre1 + k * h + j, v, m);
      stb(a1 + k * h + j, silu16(v), m);
    }
  }
}

/* out[k, j] = g[k] v[j] silu'(x[k, j]): a scalar head's backward. g (r) and v (h) float32; x, out bfloat16. */
void silu_backward_outer_bf16(const float* g, const float* v, const uint16_t* x, int64_t r, int64_t h, uint16_t* out) {
  for (int64_t k = 0; k < r; ++k) {
    const __m512 gk = _mm512_set1_ps(g[k]);
    for (int64_t j = 0; j < h; j += 16) {
      const __mmask16 m = lanes(h, j);
      stb(out + k * h + j, _mm512_mul_ps(_mm512_mul_ps(gk, ldf(v + j, m)), dsilu16(ldb(x + k * h + j, m))), m);
    }
  }
}

/* out[idx[k]] += alpha src[k], rows of h, in order; src bfloat16, out float32 (the caller's thread owns it). */
void index_add_rows_bf16(float* out, const int64_t* idx, const uint16_t* src, int64_t e, int64_t h, float alpha) {
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t k = 0; k < e; ++k) {
    if (k + PREFETCH_ROWS < e) prefetch_row(out + idx[k + PREFETCH_ROWS] * h, h * 4);
    float* o = out + idx[k] * h;
    for (int64_t j = 0; j < h; j += 16) {
      const __mmask16 m = lanes(h, j);
      stf(o + j, _mm512_fmadd_ps(a, ldb(src + k * h + j, m), ldf(o + j, m)), m);
    }
  }
}

/* The first edge layer's backward (fused_avx2.c:edge_pre1_backward): with g_pre1 = g_a1 silu'(pre1) (not stored),
   g_recv[recv[k]] += g_pre1[k], g_send[send[k]] += g_pre1[k], g_w_geo_t[c] += geo[k, c] g_pre1[k],
   g_geo[k, c] = g_pre1[k] . w_geo_t[c].  g_a1, pre1 bfloat16; everything else float32. */
void edge_pre1_backward_bf16(const uint16_t* restrict g_a1, const uint16_t* restrict pre1,
                             const int64_t* restrict recv, const int64_t* restrict send, const float* restrict geo,
                             const float* restrict w_geo_t, int64_t e, int64_t h, int64_t g, float* restrict g_recv,
                             float* restrict g_send, float* restrict g_w_geo_t, float* restrict g_geo) {
  if (g > EDGE_GEO_MAX) return;                       /* the caller checks; never write past dot[] */
  for (int64_t k = 0; k < e; ++k) {
    if (k + PREFETCH_ROWS < e) prefetch_row(g_send + send[k + PREFETCH_ROWS] * h, h * 4);
    const float* gk = geo + k * g;
    float* gr = g_recv + recv[k] * h;
    float* gs = g_send + send[k] * h;
    __m512 dot[EDGE_GEO_MAX];
    for (int64_t c = 0; c < g; ++c) dot[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < h; j += 16) {
      const __mmask16 m = lanes(h, j);
      __m512 v = _mm512_mul_ps(ldb(g_a1 + k * h + j, m), dsilu16(ldb(pre1 + k * h + j, m)));
      stf(gr + j, _mm512_add_ps(ldf(gr + j, m), v), m);
      stf(gs + j, _mm512_add_ps(ldf(gs + j, m), v), m);
      for (int64_t c = 0; c < g; ++c) {
        float* wg = g_w_geo_t + c * h + j;
        stf(wg, _mm512_fmadd_ps(_mm512_set1_ps(gk[c]), v, ldf(wg, m)), m);
        dot[c] = _mm512_fmadd_ps(v, ldf(w_geo_t + c * h + j, m), dot[c]);
      }
    }
    for (int64_t c = 0; c < g; ++c) g_geo[k * g + c] = _mm512_reduce_add_ps(dot[c]);
  }
}

/* pre1[i, c] = per_node[i] + per_channel[batch[i], c] + dist[i, c] w_dist, a1 = silu(pre1), rows i * C + c;
   per_node, per_channel, pre1, a1 bfloat16; dist, w_dist float32; pre1 may be NULL. */
void virtual_pre1_silu_bf16(const uint16_t* restrict per_node, const uint16_t* restrict per_channel,
                            const float* restrict dist, const float* restrict w_dist, const int64_t* restrict batch,
                            int64_t n, int64_t c, int64_t h, uint16_t* restrict pre1, uint16_t* restrict a1) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* pn = per_node + i * h;
    for (int64_t ch = 0; ch < c; ++ch) {
      const uint16_t* pc = per_channel + (batch[i] * c + ch) * h;
      const int64_t row = (i * c + ch) * h;
      const __m512 dv = _mm512_set1_ps(dist[i * c + ch]);
      for (int64_t j = 0; j < h; j += 16) {
        const __mmask16 m = lanes(h, j);
        __m512 v = _mm512_fmadd_ps(dv, ldf(w_dist + j, m), _mm512_add_ps(ldb(pn + j, m), ldb(pc + j, m)));
        if (pre1) stb(pre1 + row + j, v, m);
        stb(a1 + row + j, silu16(v), m);
      }
    }
  }
}

/* Its backward (fused_avx2.c:virtual_pre1_backward): with g = g_a1 silu'(pre1), g_node[i] = sum_c g[i, c]
   (written), g_channel[batch[i], c] += g[i, c], g_wdist += dist[i, c] g[i, c], g_dist[i, c] = g[i, c] . w_dist.
   g_a1, pre1 bfloat16; everything else float32. */
void virtual_pre1_backward_bf16(const uint16_t* restrict g_a1, const uint16_t* restrict pre1,
                                const float* restrict dist, const float* restrict w_dist,
                                const int64_t* restrict batch, int64_t n, int64_t c, int64_t h,
                                float* restrict g_node, float* restrict g_channel, float* restrict g_wdist,
                                float* restrict g_dist) {
  for (int64_t i = 0; i < n; ++i) {
    float* gn = g_node + i * h;
    for (int64_t j = 0; j < h; ++j) gn[j] = 0.0f;
    for (int64_t ch = 0; ch < c; ++ch) {
      float* gc = g_channel + (batch[i] * c + ch) * h;
      const int64_t row = (i * c + ch) * h;
      const __m512 dv = _mm512_set1_ps(dist[i * c + ch]);
      __m512 dot = _mm512_setzero_ps();
      for (int64_t j = 0; j < h; j += 16) {
        const __mmask16 m = lanes(h, j);
        __m512 v = _mm512_mul_ps(ldb(g_a1 + row + j, m), dsilu16(ldb(pre1 + row + j, m)));
        stf(gn + j, _mm512_add_ps(ldf(gn + j, m), v), m);
        stf(gc + j, _mm512_add_ps(ldf(gc + j, m), v), m);
        stf(g_wdist + j, _mm512_fmadd_ps(dv, v, ldf(g_wdist + j, m)), m);
        dot = _mm512_fmadd_ps(v, ldf(w_dist + j, m), dot);
      }
      g_dist[i * c + ch] = _mm512_reduce_add_ps(dot);
    }
  }
}
