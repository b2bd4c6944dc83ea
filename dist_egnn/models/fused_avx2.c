/* AVX2 + FMA kernels of the fused message blocks (fused.py), float32, 8 lanes, called through ctypes by native.py.

   ATen's SiLU spends ~1.3 ns per element in its exp on this project's CPU, and the fused blocks run nine
   SiLU passes per edge and layer; the first layer of the edge network is five passes (two gathers, a K = 3
   matrix product, an add, a SiLU) over (edges, H). Here: a polynomial exp (the Cephes expf scheme:
   n = round(x log2 e), r = x - n ln 2 in two parts, degree-6 polynomial, 2^n from the exponent bits; within a
   few float32 ulp of expf), SiLU and its derivative in one pass each, and the first layer in one pass.
   NaN in gives NaN out (x itself is a factor of every result).
   Row scatter-adds too: ATen's index_add_ costs ~1 ns per element here through its generic iterator, a plain
   row loop a quarter of that. The backward of both first layers (edge and real-virtual) is one pass each:
   SiLU derivative, scatter-adds and the thin products with the geometry columns, which MKL ran as slowly as
   a full (rows, H) x (H, H) product. In order below: exp, SiLU, SiLU', edge first layer, head backward, row
   scatter-add, edge first-layer backward, real-virtual first layer and its backward.
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

/* Rows gathered or scattered at random (senders) miss every cache level but the last: request row k + PREFETCH_ROWS
   while computing row k, so the misses overlap instead of waiting one after another (the first layer's kernel
   ran 1.3-2.5x faster with it on a (16384, 64) chunk of a 20K-node graph). */
#define PREFETCH_ROWS 12
static inline void prefetch_row(const float* row, int64_t h) {
  for (int64_t j = 0; j < h; j += 16) _mm_prefetch((const char*)(row + j), _MM_HINT_T0);
}

static inline float silu1(float v) { return v / (1.0f + expf(-v)); }
static inline float dsilu1(float v) { float s = 1.0f / (1.0f + expf(-v)); return s * (1.0f + v * (1.0f - s)); }
static inline __m256 silu8(__m256 v) {
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}
/* d silu / dx = s (1 + x (1 - s)), s = sigmoid(x) */
static inline __m256 dsilu8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), v))));
  return _mm256_mul_ps(s, _mm256_fmadd_ps(v, _mm256_sub_ps(one, s), one));
}

/* out = silu(x) = x sigmoid(x) */
void silu_forward(const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, silu8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) out[i] = silu1(x[i]);
}

/* out = g silu'(x) */
void silu_backward(const float* g, const float* x, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(g + i), dsilu8(_mm256_loadu_ps(x + i))));
  for (; i < n; ++i) out[i] = g[i] * dsilu1(x[i]);
}

/* The first layer of the edge network for a chunk of e edges, in one pass instead of five:
   pre1[k] = proj_recv[recv[k]] + proj_send[send[k]] + geo[k] @ w_geo_t   (h wide; geo is (e, g), w_geo_t (g, h))
   a1[k]   = silu(pre1[k]).  Rows of proj_recv / proj_send are h floats, contiguous. pre1 may be NULL: the
   forward pass needs only a1, and skipping the store saves one (e, h) write per chunk. */
void edge_pre1_silu(const float* restrict proj_recv, const float* restrict proj_send, const int64_t* restrict recv,
                    const int64_t* restrict send, const float* restrict geo, const float* restrict w_geo_t,
                    int64_t e, int64_t h, int64_t g, float* restrict pre1, float* restrict a1) {
  for (int64_t k = 0; k < e; ++k) {
    if (k + PREFETCH_ROWS < e) prefetch_row(proj_send + send[k + PREFETCH_ROWS] * h, h);
    const float* pr = proj_recv + recv[k] * h;
    const float* ps = proj_send + send[k] * h;
    const float* gk = geo + k * g;
    float* out = pre1 ? pre1 + k * h : NULL;
    float* act = a1 + k * h;
    int64_t j = 0;
    for (; j + 8 <= h; j += 8) {
      __m256 v = _mm256_add_ps(_mm256_loadu_ps(pr + j), _mm256_loadu_ps(ps + j));
      for (int64_t c = 0; c < g; ++c)
        v = _mm256_fmadd_ps(_mm256_set1_ps(gk[c]), _mm256_loadu_ps(w_geo_t + c * h + j), v);
      if (pre1) _mm256_storeu_ps(out + j, v);
      _mm256_storeu_ps(act + j, silu8(v));
    }
    for (; j < h; ++j) {
      float v = pr[j] + ps[j];
      for (int64_t c = 0; c < g; ++c) v += gk[c] * w_geo_t[c * h + j];
      if (pre1) out[j] = v;
      act[j] = silu1(v);
    }
  }
}

/* The backward of a scalar head s = silu(x) @ v for r rows of h: out[k, j] = g[k] v[j] silu'(x[k, j]),
   without materialising the outer product g v first. */
void silu_backward_outer(const float* g, const float* v, const float* x, int64_t r, int64_t h, float* out) {
  for (int64_t k = 0; k < r; ++k) {
    const float* xk = x + k * h;
    float* ok = out + k * h;
    const __m256 gk = _mm256_set1_ps(g[k]);
    int64_t j = 0;
    for (; j + 8 <= h; j += 8)
      _mm256_storeu_ps(ok + j, _mm256_mul_ps(_mm256_mul_ps(gk, _mm256_loadu_ps(v + j)), dsilu8(_mm256_loadu_ps(xk + j))));
    for (; j < h; ++j) ok[j] = g[k] * v[j] * dsilu1(xk[j]);
  }
}

/* out[idx[k]] += alpha src[k] for e rows of h floats (torch's index_add_ along dim 0). Rows are added in order,
   so the sums are the ones a sequential index_add_ computes; the caller owns out (no other thread writes it). */
void index_add_rows(float* out, const int64_t* idx, const float* src, int64_t e, int64_t h, float alpha) {
  const __m256 a = _mm256_set1_ps(alpha);
  for (int64_t k = 0; k < e; ++k) {
    if (k + PREFETCH_ROWS < e) prefetch_row(out + idx[k + PREFETCH_ROWS] * h, h);
    float* o = out + idx[k] * h;
    const float* s = src + k * h;
    int64_t j = 0;
    for (; j + 8 <= h; j += 8)
      _mm256_storeu_ps(o + j, _mm256_fmadd_ps(a, _mm256_loadu_ps(s + j), _mm256_loadu_ps(o + j)));
    for (; j < h; ++j) o[j] += alpha * s[j];
  }
}

/* The first edge layer's backward for a chunk of e edges, in one pass over (e, h) instead of five (a SiLU
   derivative, two scatter-adds and two thin matrix products with K = e or N = g, which MKL runs about as slowly
   as a full (e, h) x (h, h) product):
     g_pre1[k]       = g_a1[k] * silu'(pre1[k])                                 (not stored)
     g_recv[recv[k]] += g_pre1[k],  g_send[send[k]] += g_pre1[k]                 (rows of h)
     g_w_geo_t[c]    += geo[k, c] g_pre1[k]                                      ((g, h): w_geo's gradient, transposed)
     g_geo[k, c]      = g_pre1[k] . w_geo_t[c]                                   ((e, g))
   g <= EDGE_GEO_MAX; g_recv, g_send and g_w_geo_t belong to the caller's thread. */
#define EDGE_GEO_MAX 16
void edge_pre1_backward(const float* restrict g_a1, const float* restrict pre1, const int64_t* restrict recv,
                        const int64_t* restrict send, const float* restrict geo, const float* restrict w_geo_t,
                        int64_t e, int64_t h, int64_t g, float* restrict g_recv, float* restrict g_send,
                        float* restrict g_w_geo_t, float* restrict g_geo) {
  if (g > EDGE_GEO_MAX) return;                       /* the caller checks; never write past dot[] */
  for (int64_t k = 0; k < e; ++k) {
    if (k + PREFETCH_ROWS < e) prefetch_row(g_send + send[k + PREFETCH_ROWS] * h, h);
    const float* ga = g_a1 + k * h;
    const float* xk = pre1 + k * h;
    const float* gk = geo + k * g;
    float* gr = g_recv + recv[k] * h;
    float* gs = g_send + send[k] * h;
    __m256 dot[EDGE_GEO_MAX];
    float tail[EDGE_GEO_MAX];
    for (int64_t c = 0; c < g; ++c) { dot[c] = _mm256_setzero_ps(); tail[c] = 0.0f; }
    int64_t j = 0;
    for (; j + 8 <= h; j += 8) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(ga + j), dsilu8(_mm256_loadu_ps(xk + j)));
      _mm256_storeu_ps(gr + j, _mm256_add_ps(_mm256_loadu_ps(gr + j), v));
      _mm256_storeu_ps(gs + j, _mm256_add_ps(_mm256_loadu_ps(gs + j), v));
      for (int64_t c = 0; c < g; ++c) {
        float* wg = g_w_geo_t + c * h + j;
        _mm256_storeu_ps(wg, _mm256_fmadd_ps(_mm256_set1_ps(gk[c]), v, _mm256_loadu_ps(wg)));
        dot[c] = _mm256_fmadd_ps(v, _mm256_loadu_ps(w_geo_t + c * h + j), dot[c]);
      }
    }
    for (; j < h; ++j) {
      float v = ga[j] * dsilu1(xk[j]);
      gr[j] += v;
      gs[j] += v;
      for (int64_t c = 0; c < g; ++c) {
        g_w_geo_t[c * h + j] += gk[c] * v;
        tail[c] += v * w_geo_t[c * h + j];
      }
    }
    for (int64_t c = 0; c < g; ++c) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(dot[c]), _mm256_extractf128_ps(dot[c], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      g_geo[k * g + c] = _mm_cvtss_f32(s) + tail[c];
    }
  }
}

/* The first layer of the real-virtual network for n real nodes x C virtual nodes (rows i * C + c of h floats):
     pre1[i, c] = per_node[i] + per_channel[batch[i], c] + dist[i, c] w_dist,   a1 = silu(pre1)
   per_node (n, h), per_channel (B, C, h), dist (n, C), w_dist (h,). pre1 may be NULL (forward needs only a1). */
void virtual_pre1_silu(const float* restrict per_node, const float* restrict per_channel, const float* restrict dist,
                       const float* restrict w_dist, const int64_t* restrict batch, int64_t n, int64_t c, int64_t h,
                       float* restrict pre1, float* restrict a1) {
  for (int64_t i = 0; i < n; ++i) {
    const float* pn = per_node + i * h;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* pc = per_channel + (batch[i] * c + ch) * h;
      const int64_t row = (i * c + ch) * h;
      const float d = dist[i * c + ch];
      const __m256 dv = _mm256_set1_ps(d);
      int64_t j = 0;
      for (; j + 8 <= h; j += 8) {
        __m256 v = _mm256_fmadd_ps(dv, _mm256_loadu_ps(w_dist + j),
                                   _mm256_add_ps(_mm256_loadu_ps(pn + j), _mm256_loadu_ps(pc + j)));
        if (pre1) _mm256_storeu_ps(pre1 + row + j, v);
        _mm256_storeu_ps(a1 + row + j, silu8(v));
      }
      for (; j < h; ++j) {
        float v = pn[j] + pc[j] + d * w_dist[j];
        if (pre1) pre1[row + j] = v;
        a1[row + j] = silu1(v);
      }
    }
  }
}

/* Its backward, given g_a1 (the gradient of a1), in one pass: with g = g_a1 silu'(pre1) (not stored),
     g_node[i] = sum_c g[i, c]           (written)      g_channel[batch[i], c] += g[i, c]   (accumulated)
     g_dist[i, c] = g[i, c] . w_dist     (written)      g_wdist += dist[i, c] g[i, c]        (accumulated)
   g_channel and g_wdist belong to the caller's thread; g_node and g_dist are this chunk's rows. */
void virtual_pre1_backward(const float* restrict g_a1, const float* restrict pre1, const float* restrict dist,
                           const float* restrict w_dist, const int64_t* restrict batch, int64_t n, int64_t c,
                           int64_t h, float* restrict g_node, float* restrict g_channel, float* restrict g_wdist,
                           float* restrict g_dist) {
  for (int64_t i = 0; i < n; ++i) {
    float* gn = g_node + i * h;
    for (int64_t j = 0; j < h; ++j) gn[j] = 0.0f;
    for (int64_t ch = 0; ch < c; ++ch) {
      float* gc = g_channel + (batch[i] * c + ch) * h;
      const int64_t row = (i * c + ch) * h;
      const float d = dist[i * c + ch];
      const __m256 dv = _mm256_set1_ps(d);
      __m256 dot = _mm256_setzero_ps();
      float tail = 0.0f;
      int64_t j = 0;
      for (; j + 8 <= h; j += 8) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(g_a1 + row + j), dsilu8(_mm256_loadu_ps(pre1 + row + j)));
        _mm256_storeu_ps(gn + j, _mm256_add_ps(_mm256_loadu_ps(gn + j), v));
        _mm256_storeu_ps(gc + j, _mm256_add_ps(_mm256_loadu_ps(gc + j), v));
        _mm256_storeu_ps(g_wdist + j, _mm256_fmadd_ps(dv, v, _mm256_loadu_ps(g_wdist + j)));
        dot = _mm256_fmadd_ps(v, _mm256_loadu_ps(w_dist + j), dot);
      }
      for (; j < h; ++j) {
        float v = g_a1[row + j] * dsilu1(pre1[row + j]);
        gn[j] += v;
        gc[j] += v;
        g_wdist[j] += d * v;
        tail += v * w_dist[j];
      }
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(dot), _mm256_extractf128_ps(dot, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      g_dist[i * c + ch] = _mm_cvtss_f32(s) + tail;
    }
  }
}
