// Seedling's native CPU kernels (x86-64 with AVX2 + FMA + F16C), loaded by model/native.py.
//
// Why native code: a decode step of a 135M model is ~30 layers x ~15 small ops. In eager PyTorch each
// op costs microseconds of dispatch and a trip through memory, and at one sequence that overhead is
// larger than the matmuls themselves (bench/README.md has the profile). This file runs a whole
// forward over a packed batch in one call, with the weights in llama.cpp's block formats:
//
//   Q4_1  blocks of 32 weights: fp16 scale d, fp16 minimum m, 32 x 4-bit q;  w = d * q + m
//   Q8_0  blocks of 32 weights: fp16 scale d, 32 x int8 q (|q| <= 127);       w = d * q
//
// (stored 8 output rows at a time, see QuantizedWeight). Activations are quantized on the fly to
// int8 in blocks of 32 (one fp32 scale per block, and the scaled block sum for Q4_1's minimum term),
// so every dot product is integer multiply-adds (AVX2 vpmaddubsw) with one fp32 multiply-add per block.
// Each output depends only on its own token (its own activation scales, its own attention), so the
// results are bit-identical however the engine batches and chunks the tokens.
//
// Ops (schemas at the bottom):
//   seedling::linear(x, q, d, m)  -> x @ W^T for one quantized weight (used by model/quantize.py)
//   seedling::forward(...)        -> logits of a Llama-family decoder over a packed batch of tokens,
//                                    writing their K/V into the engine's KVCache tensors

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;  // values per quantization block

// ---------------------------------------------------------------------------------------------
// small AVX2 helpers

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

// exp(x) to ~1e-7 relative error (Cephes' polynomial after range reduction to [-ln2/2, ln2/2])
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// names each phase for the torch profiler (bench/profile_step.py); a flag check when it is off
#define SEEDLING_PHASE(name) RECORD_FUNCTION("seedling::" name, std::vector<c10::IValue>())

// ---------------------------------------------------------------------------------------------
// activations: fp32 rows -> int8 blocks of 32 with one scale (and scale * sum of q) per block

struct QuantizedRows {
  int64_t rows = 0, cols = 0, blocks = 0;
  std::vector<int8_t> q;  // (rows, cols)
  std::vector<float> d;   // (rows, blocks)
  std::vector<float> s;   // (rows, blocks): d * sum(q) of the block

  void quantize(const float* x, int64_t n_rows, int64_t n_cols, int64_t ldx) {
    SEEDLING_PHASE("quantize_activations");
    rows = n_rows, cols = n_cols, blocks = n_cols / QK;
    q.resize(rows * cols), d.resize(rows * blocks), s.resize(rows * blocks);
    at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
      const __m256 sign = _mm256_set1_ps(-0.0f);
      const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t b = 0; b < blocks; ++b) {
          const float* p = x + r * ldx + b * QK;
          __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
          __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
          __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
          const float m = hmax(amax);
          const float scale = m / 127.0f;
          const __m256 inv = _mm256_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);
          __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));  // round to nearest even
          __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
          __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
          __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
          const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
          // pack 4 x 8 int32 -> 32 int8; the packs interleave 128-bit lanes, the permute restores order
          __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
          packed = _mm256_permutevar8x32_epi32(packed, perm);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q.data() + r * cols + b * QK), packed);
          d[r * blocks + b] = scale;
          s[r * blocks + b] = scale * static_cast<float>(sum);
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// quantized weights and the matmul

// Weights are stored in groups of 8 output rows, interleaved so that one 256-bit register holds 4
// consecutive inputs of each of the 8 rows (one row per 32-bit lane). A dot product then needs no
// horizontal sums: 4 activation bytes are broadcast to all lanes, vpmaddubsw + vpmaddwd give the 8
// rows' partial sums side by side, and each block's result for 8 rows is one fp32 multiply-add.
// Layout per (row group, block of 32 inputs), see model/quantize.py (pack_q4_1 / pack_q8_0):
//   Q4_1x8: 128 bytes: chunk pairs (2L, 2L+1) for L < 4 as 32 bytes, low nibble = chunk 2L;
//           byte 4r + i of chunk c is row r's input 4c + i;   d, m: 8 fp16 (one per row)
//   Q8_0x8: 256 bytes: chunk c (c < 8) as 32 bytes laid out as above;   d: 8 fp16
constexpr int64_t ROWS = 8;

struct QuantizedWeight {
  const uint8_t* q;
  const uint16_t* d;  // (N/8, blocks, 8) fp16
  const uint16_t* m;  // (N/8, blocks, 8) fp16, Q4_1 only
  int64_t n, k;
  bool q4;

  int64_t group_bytes() const { return q4 ? 128 : 256; }

  static QuantizedWeight from(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
    TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && d.is_contiguous(), "quantized weight must be contiguous 2-D");
    TORCH_CHECK(d.scalar_type() == at::kHalf, "block scales must be float16");
    const bool q4 = q.scalar_type() == at::kByte;
    TORCH_CHECK(q4 || q.scalar_type() == at::kChar, "weight must be uint8 (Q4_1x8) or int8 (Q8_0x8)");
    const int64_t blocks = q.size(1) / (q4 ? 128 : 256);
    TORCH_CHECK(q.size(1) % (q4 ? 128 : 256) == 0 && d.numel() == q.size(0) * blocks * ROWS, "bad block scales");
    if (q4) TORCH_CHECK(m.scalar_type() == at::kHalf && m.is_contiguous() && m.numel() == d.numel(), "Q4_1 needs block minimums");
    return {static_cast<const uint8_t*>(q.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
            q4 ? reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) : nullptr, q.size(0) * ROWS, blocks * QK, q4};
  }
};

inline __m256i broadcast4(const int8_t* p) {  // 4 activation bytes into every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// out[j * ldo + r] = dot(weight row 8 * group + r, activation row x0 + j) for r < 8, j < MT. Each
// weight block is loaded (and unpacked) once for the MT activation rows.
template <int MT, bool Q4>
inline void dot_group(const QuantizedWeight& w, int64_t group, const QuantizedRows& x, int64_t x0, float* out,
                      int64_t ldo) {
  const int64_t nb = w.k / QK, cols = x.cols;
  const int8_t* __restrict xq = x.q.data() + x0 * cols;
  const float* __restrict xd = x.d.data() + x0 * nb;
  const float* __restrict xs = x.s.data() + x0 * nb;
  const uint8_t* __restrict wq = w.q + group * nb * w.group_bytes();
  const uint16_t* __restrict wd = w.d + group * nb * ROWS;
  const uint16_t* __restrict wm = Q4 ? w.m + group * nb * ROWS : nullptr;
  const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MT];
  for (int j = 0; j < MT; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + b * ROWS)));
    __m256 mw = _mm256_setzero_ps();
    __m256i wv[8];
    if constexpr (Q4) {
      mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wm + b * ROWS)));
      for (int l = 0; l < 4; ++l) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * 128 + l * 32));
        wv[2 * l] = _mm256_and_si256(raw, low4);
        wv[2 * l + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
    } else {
      for (int c = 0; c < 8; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + b * 256 + c * 32));
    }
#pragma GCC unroll 4
    for (int j = 0; j < MT; ++j) {
      const int8_t* xb = xq + j * cols + b * QK;
      __m256i sum;
      if constexpr (Q4) {  // 8 x (2 x 15 x 127) = 30480 still fits the int16 lanes
        __m256i s16 = _mm256_maddubs_epi16(wv[0], broadcast4(xb));
        for (int c = 1; c < 8; ++c) s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(wv[c], broadcast4(xb + 4 * c)));
        sum = _mm256_madd_epi16(s16, ones);
      } else {  // |w| times x with w's sign: 2 x 127 x 127 fits int16 once, so widen every chunk
        sum = _mm256_setzero_si256();
        for (int c = 0; c < 8; ++c) {
          const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[c], wv[c]),
                                                    _mm256_sign_epi8(broadcast4(xb + 4 * c), wv[c]));
          sum = _mm256_add_epi32(sum, _mm256_madd_epi16(prod, ones));
        }
      }
      acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, _mm256_broadcast_ss(xd + j * nb + b)), acc[j]);
      if constexpr (Q4) acc[j] = _mm256_fmadd_ps(mw, _mm256_broadcast_ss(xs + j * nb + b), acc[j]);
    }
  }
  for (int j = 0; j < MT; ++j) _mm256_storeu_ps(out + j * ldo, acc[j]);
}

// Activation rows [m0, m1) times weight row groups [g0, g1). Kept out of line: inlined into the
// tiling loop below, the Q8_0 path spilled registers and ran ~25 % slower.
template <bool Q4>
__attribute__((noinline)) void matmul_tile(const QuantizedRows& x, const QuantizedWeight& w, int64_t g0, int64_t g1,
                                           int64_t m0, int64_t m1, float* out, int64_t ldo) {
  for (int64_t g = g0; g < g1; ++g) {
    float* o = out + g * ROWS;
    int64_t j = m0;
    for (; j + 4 <= m1; j += 4) dot_group<4, Q4>(w, g, x, j, o + j * ldo, ldo);
    switch (m1 - j) {
      case 3: dot_group<3, Q4>(w, g, x, j, o + j * ldo, ldo); break;
      case 2: dot_group<2, Q4>(w, g, x, j, o + j * ldo, ldo); break;
      case 1: dot_group<1, Q4>(w, g, x, j, o + j * ldo, ldo); break;
      default: break;
    }
  }
}

// Each thread takes a range of row groups. Activations go 64 rows at a time (at most ~100 KB of int8:
// they stay in L2) across all of the thread's groups, so a long prefill re-reads weights from cache
// instead of streaming every activation row past every weight group.
template <bool Q4>
void matmul_impl(const QuantizedRows& x, const QuantizedWeight& w, float* out, int64_t ldo) {
  constexpr int64_t kRowTile = 64;
  at::parallel_for(0, w.n / ROWS, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < x.rows; m0 += kRowTile)
      matmul_tile<Q4>(x, w, g0, g1, m0, std::min(x.rows, m0 + kRowTile), out, ldo);
  });
}

// out (M, N) row-major with leading dimension ldo = x @ W^T
void matmul(const QuantizedRows& x, const QuantizedWeight& w, float* out, int64_t ldo) {
  SEEDLING_PHASE("matmul");
  TORCH_CHECK(x.cols == w.k, "activation width ", x.cols, " != weight in_features ", w.k);
  if (w.q4) matmul_impl<true>(x, w, out, ldo);
  else matmul_impl<false>(x, w, out, ldo);
}

// ---------------------------------------------------------------------------------------------
// the rest of a decoder layer

void rms_norm(const float* x, int64_t rows, int64_t dim, const float* weight, float eps, float* out) {
  SEEDLING_PHASE("rms_norm");
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    float* o = out + r * dim;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * weight[i];
  }
}

// silu(gate) * up for rows of [gate | up] (width 2F) -> (rows, F)
void silu_mul(const float* gate_up, int64_t rows, int64_t f, float* out) {
  SEEDLING_PHASE("silu_mul");
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gate_up + r * 2 * f;
      const float* u = g + f;
      float* o = out + r * f;
      int64_t i = 0;
      for (; i + 8 <= f; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
      }
      for (; i < f; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
  });
}

struct LayerShape {
  int64_t dim, n_heads, n_kv_heads, head_dim, ffn;
  int64_t qkv_width() const { return (n_heads + 2 * n_kv_heads) * head_dim; }
};

// Rotate the q and k heads of every packed token in place (HF's rotate_half convention).
void apply_rotary(float* qkv, int64_t n_tokens, const LayerShape& s, const float* cos, const float* sin) {
  SEEDLING_PHASE("rotary");
  const int64_t half = s.head_dim / 2;
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* c = cos + t * half;
    const float* sn = sin + t * half;
    for (int64_t h = 0; h < s.n_heads + s.n_kv_heads; ++h) {
      float* v = qkv + t * s.qkv_width() + h * s.head_dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * sn[i];
        v[i + half] = b * c[i] + a * sn[i];
      }
    }
  }
}

// K/V cache views for one layer: (slots, kv_heads, max_len, head_dim), fp32 or fp16 (half the bytes
// to read per key; attention still computes in fp32)
template <typename T>
struct LayerCache {
  T* k;
  T* v;
  int64_t max_len;
  T* key(int64_t slot, int64_t g, int64_t pos, const LayerShape& s) const {
    return k + ((slot * s.n_kv_heads + g) * max_len + pos) * s.head_dim;
  }
  T* value(int64_t slot, int64_t g, int64_t pos, const LayerShape& s) const {
    return v + ((slot * s.n_kv_heads + g) * max_len + pos) * s.head_dim;
  }
};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// 8 dot-product accumulators -> one register holding their 8 sums (in order)
inline __m256 reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// softmax(q . keys[0..n) * scale) . values[0..n) for one query head, head_dim = 8 * HD8.
// The arithmetic order depends only on n, never on what else is in the batch.
template <int HD8, typename T>
void attend_head(const float* q, const T* keys, const T* values, int64_t n, float scale, float* scores,
                 float* out) {
  constexpr int64_t hd = 8 * HD8;
  __m256 qv[HD8];
  for (int i = 0; i < HD8; ++i) qv[i] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * i), _mm256_set1_ps(scale));
  int64_t j = 0;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) {  // 8 keys at a time, one horizontal reduction for all 8
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) {
      const T* key = keys + (j + k) * hd;
      __m256 a = _mm256_mul_ps(qv[0], load8(key));
      for (int i = 1; i < HD8; ++i) a = _mm256_fmadd_ps(qv[i], load8(key + 8 * i), a);
      acc[k] = a;
    }
    const __m256 sc = reduce8(acc);
    _mm256_storeu_ps(scores + j, sc);
    vmax = _mm256_max_ps(vmax, sc);
  }
  float mx = hmax(vmax);
  for (; j < n; ++j) {
    const T* key = keys + j * hd;
    __m256 a = _mm256_mul_ps(qv[0], load8(key));
    for (int i = 1; i < HD8; ++i) a = _mm256_fmadd_ps(qv[i], load8(key + 8 * i), a);
    scores[j] = hsum(a);
    mx = std::max(mx, scores[j]);
  }
  __m256 vsum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + j), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(scores + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; j < n; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
  __m256 o[HD8];
  for (int i = 0; i < HD8; ++i) o[i] = _mm256_setzero_ps();
  for (j = 0; j < n; ++j) {
    const __m256 p = _mm256_set1_ps(scores[j]);
    const T* value = values + j * hd;
    for (int i = 0; i < HD8; ++i) o[i] = _mm256_fmadd_ps(p, load8(value + 8 * i), o[i]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (int i = 0; i < HD8; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(o[i], inv));
}

// Causal attention of every packed token over its own sequence's cache row, positions [0, pos].
// Work items are (token, kv head); tokens are visited short-long-short-long (a prefill's costs grow
// with position), so the contiguous ranges parallel_for hands each thread cost about the same.
template <typename T>
void attend(const float* qkv, int64_t n_tokens, const int64_t* slots, const int64_t* positions,
            const LayerCache<T>& cache, const LayerShape& s, float* out) {
  SEEDLING_PHASE("attention");
  const int64_t group = s.n_heads / s.n_kv_heads, hd = s.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, n_tokens * s.n_kv_heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t k = item / s.n_kv_heads, g = item % s.n_kv_heads;
      const int64_t t = (k % 2 == 0) ? k / 2 : n_tokens - 1 - k / 2;
      const int64_t n_keys = positions[t] + 1;
      scores.resize(n_keys);
      const T* keys = cache.key(slots[t], g, 0, s);
      const T* values = cache.value(slots[t], g, 0, s);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const float* q = qkv + t * s.qkv_width() + h * hd;
        float* o = out + (t * s.n_heads + h) * hd;
        switch (hd) {
          case 16: attend_head<2, T>(q, keys, values, n_keys, scale, scores.data(), o); break;
          case 32: attend_head<4, T>(q, keys, values, n_keys, scale, scores.data(), o); break;
          case 64: attend_head<8, T>(q, keys, values, n_keys, scale, scores.data(), o); break;
          case 128: attend_head<16, T>(q, keys, values, n_keys, scale, scores.data(), o); break;
          default: break;  // checked by forward_op
        }
      }
    }
  });
}

// Write the packed tokens' new K/V into their cache rows, then attend.
template <typename T>
void attention(const float* qkv, int64_t n_tokens, const int64_t* slots, const int64_t* positions,
               const LayerCache<T>& cache, const LayerShape& s, float* out) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t g = 0; g < s.n_kv_heads; ++g) {
      const float* k = qkv + t * s.qkv_width() + (s.n_heads + g) * s.head_dim;
      const float* v = k + s.n_kv_heads * s.head_dim;
      T* k_dst = cache.key(slots[t], g, positions[t], s);
      T* v_dst = cache.value(slots[t], g, positions[t], s);
      for (int64_t i = 0; i < s.head_dim; i += 8) store8(k_dst + i, load8(k + i)), store8(v_dst + i, load8(v + i));
    }
  attend(qkv, n_tokens, slots, positions, cache, s, out);
}

// ---------------------------------------------------------------------------------------------
// ops

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "seedling::linear takes float32 CPU input");
  const QuantizedWeight w = QuantizedWeight::from(q, d, m);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  QuantizedRows xq;
  xq.quantize(x2.data_ptr<float>(), x2.size(0), x2.size(1), x2.size(1));
  at::Tensor out = at::empty({x2.size(0), w.n}, x.options());
  matmul(xq, w, out.data_ptr<float>(), w.n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.n;
  return out.view(shape);
}

constexpr int64_t kTensorsPerLayer = 14;  // the order is model/quantize.py NativeForward.weights

at::Tensor forward_op(const at::Tensor& x_in, const at::Tensor& slots_t, const at::Tensor& positions_t,
                      const at::Tensor& logits_rows_t, at::TensorList weights, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& inv_freq_t, int64_t n_heads, int64_t n_kv_heads,
                      double eps_d) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be (tokens, dim) float32");
  const bool half_cache = k_cache.scalar_type() == at::kHalf;
  TORCH_CHECK((half_cache || k_cache.scalar_type() == at::kFloat) && v_cache.scalar_type() == k_cache.scalar_type() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 5 &&
                  k_cache.sizes() == v_cache.sizes(),
              "K/V caches must be contiguous float32 or float16 (layers, slots, kv_heads, max_len, head_dim)");
  const int64_t n_layers = k_cache.size(0), n_tokens = x_in.size(0), dim = x_in.size(1);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n_layers * kTensorsPerLayer + 4, "expected ",
              n_layers * kTensorsPerLayer + 4, " weight tensors, got ", weights.size());
  const at::Tensor slots_c = slots_t.to(at::kLong).contiguous(), pos_c = positions_t.to(at::kLong).contiguous();
  const at::Tensor rows_c = logits_rows_t.to(at::kLong).contiguous();
  TORCH_CHECK(slots_c.numel() == n_tokens && pos_c.numel() == n_tokens, "one slot and position per token");
  const int64_t* slots = slots_c.data_ptr<int64_t>();
  const int64_t* positions = pos_c.data_ptr<int64_t>();
  const int64_t max_len = k_cache.size(3), n_slots = k_cache.size(1);
  for (int64_t t = 0; t < n_tokens; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < n_slots && positions[t] >= 0 && positions[t] < max_len,
                "token ", t, " has slot ", slots[t], " position ", positions[t], " outside the cache");

  const LayerShape s{dim, n_heads, n_kv_heads, k_cache.size(4),
                     weights[8].size(0) * ROWS / 2};  // gate_up has 2 * ffn rows, in groups of 8
  TORCH_CHECK(k_cache.size(2) == n_kv_heads && n_heads % n_kv_heads == 0, "bad head shape");
  TORCH_CHECK(s.head_dim == 16 || s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128, "head_dim ",
              s.head_dim, " is not supported (16, 32, 64 or 128)");
  const float eps = static_cast<float>(eps_d);

  // rotary tables for every packed token: angle = position * inv_freq (fp32, as the PyTorch model)
  const int64_t half = s.head_dim / 2;
  const float* inv_freq = inv_freq_t.data_ptr<float>();
  std::vector<float> cos(n_tokens * half), sin(n_tokens * half);
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[t]) * inv_freq[i];
      cos[t * half + i] = std::cos(angle), sin[t * half + i] = std::sin(angle);
    }

  at::Tensor x_t = x_in.contiguous().clone();  // the residual stream
  float* x = x_t.data_ptr<float>();
  std::vector<float> h(n_tokens * dim), qkv(n_tokens * s.qkv_width()), attn(n_tokens * n_heads * s.head_dim),
      proj(n_tokens * dim), gate_up(n_tokens * 2 * s.ffn), act(n_tokens * s.ffn);
  QuantizedRows xq;
  auto weight = [&](int64_t i) { return QuantizedWeight::from(weights[i], weights[i + 1], weights[i + 2]); };
  auto add_into_residual = [&](const float* y) {
#pragma omp simd
    for (int64_t i = 0; i < n_tokens * dim; ++i) x[i] += y[i];
  };

  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t base = l * kTensorsPerLayer;
    // attention
    rms_norm(x, n_tokens, dim, weights[base].data_ptr<float>(), eps, h.data());
    xq.quantize(h.data(), n_tokens, dim, dim);
    matmul(xq, weight(base + 1), qkv.data(), s.qkv_width());
    apply_rotary(qkv.data(), n_tokens, s, cos.data(), sin.data());
    if (half_cache)
      attention(qkv.data(), n_tokens, slots, positions,
                LayerCache<at::Half>{k_cache[l].data_ptr<at::Half>(), v_cache[l].data_ptr<at::Half>(), max_len}, s,
                attn.data());
    else
      attention(qkv.data(), n_tokens, slots, positions,
                LayerCache<float>{k_cache[l].data_ptr<float>(), v_cache[l].data_ptr<float>(), max_len}, s, attn.data());
    xq.quantize(attn.data(), n_tokens, n_heads * s.head_dim, n_heads * s.head_dim);
    matmul(xq, weight(base + 4), proj.data(), dim);
    add_into_residual(proj.data());
    // MLP
    rms_norm(x, n_tokens, dim, weights[base + 7].data_ptr<float>(), eps, h.data());
    xq.quantize(h.data(), n_tokens, dim, dim);
    matmul(xq, weight(base + 8), gate_up.data(), 2 * s.ffn);
    silu_mul(gate_up.data(), n_tokens, s.ffn, act.data());
    xq.quantize(act.data(), n_tokens, s.ffn, s.ffn);
    matmul(xq, weight(base + 11), proj.data(), dim);
    add_into_residual(proj.data());
  }

  // final norm and output head, only for the rows that need logits
  const int64_t base = n_layers * kTensorsPerLayer;
  const int64_t n_rows = rows_c.numel();
  const int64_t* rows = rows_c.data_ptr<int64_t>();
  std::vector<float> picked(n_rows * dim);
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(rows[r] >= 0 && rows[r] < n_tokens, "logits row ", rows[r], " out of range");
    rms_norm(x + rows[r] * dim, 1, dim, weights[base].data_ptr<float>(), eps, picked.data() + r * dim);
  }
  const QuantizedWeight head = weight(base + 1);
  at::Tensor logits = at::empty({n_rows, head.n}, x_in.options());
  xq.quantize(picked.data(), n_rows, dim, dim);
  matmul(xq, head, logits.data_ptr<float>(), head.n);
  return logits;
}

}  // namespace

TORCH_LIBRARY(seedling, lib) {
  lib.def("linear(Tensor x, Tensor q, Tensor d, Tensor m) -> Tensor");
  lib.def(
      "forward(Tensor x, Tensor slots, Tensor positions, Tensor logits_rows, Tensor[] weights, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor inv_freq, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(seedling, CPU, lib) {
  lib.impl("linear", linear_op);
  lib.impl("forward", forward_op);
}
