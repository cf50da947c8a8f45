// The portable kernel variant: plain C++ for CPUs without AVX2 (and any non-x86 CPU). Same formats,
// same integer dot products and the same activation rounding as the SIMD variants, one value at a
// time; the compiler vectorizes what it can for the baseline instruction set. Correct first: this
// is what serves when nothing faster can, and the tests hold it against the reference forward.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "seedling_cpu.h"

namespace seedling::generic {
namespace {

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

void quantize(const float* x, int64_t rows, int64_t cols, int64_t ldx, QuantizedRows& out) {
  reserve_rows(out, rows, cols);
  const int64_t blocks = out.blocks;
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const float* p = x + r * ldx + b * QK;
        float m = 0.0f;
        for (int64_t i = 0; i < QK; ++i) m = std::max(m, std::fabs(p[i]));
        const float inv = m > 0.0f ? 127.0f / m : 0.0f;
        int sum = 0;
        for (int64_t i = 0; i < QK; ++i) {
          const int v = static_cast<int>(std::nearbyint(p[i] * inv));  // nearest even, as cvtps2dq
          out.q[r * cols + b * QK + i] = static_cast<int8_t>(v);
          sum += v;
        }
        out.d[r * blocks + b] = m / 127.0f;
        out.s[r * blocks + b] = m / 127.0f * static_cast<float>(sum);
      }
  });
}

// The code of row r, input i (< 32) of one packed block (layout: seedling_cpu.h).
inline int q4_code(const uint8_t* block, int64_t r, int64_t i) {
  const int64_t chunk = i / 4, pair = chunk / 2;
  const uint8_t byte = block[pair * 32 + r * 4 + i % 4];
  return chunk % 2 == 0 ? byte & 0x0F : byte >> 4;
}

inline int q8_code(const uint8_t* block, int64_t r, int64_t i) {
  return static_cast<int8_t>(block[(i / 4) * 32 + r * 4 + i % 4]);
}

void dot_group(const QuantizedWeight& w, int64_t group, const QuantizedRows& x, int64_t row, float* out) {
  const int64_t nb = w.k / QK;
  const int8_t* xq = x.q.data() + row * x.cols;
  for (int64_t r = 0; r < ROWS; ++r) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* block = w.q + (group * nb + b) * w.group_bytes();
      int sum = 0;
      for (int64_t i = 0; i < QK; ++i)
        sum += (w.q4 ? q4_code(block, r, i) : q8_code(block, r, i)) * xq[b * QK + i];
      const int64_t at = (group * nb + b) * ROWS + r;
      acc += static_cast<float>(sum) * (half_to_float(w.d[at]) * x.d[row * nb + b]);
      if (w.q4) acc += half_to_float(w.m[at]) * x.s[row * nb + b];
    }
    out[r] = acc;
  }
}

void matmul(const QuantizedRows& x, const QuantizedWeight& w, float* out, int64_t ldo) {
  at::parallel_for(0, w.n / ROWS, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t j = 0; j < x.rows; ++j) dot_group(w, g, x, j, out + j * ldo + g * ROWS);
  });
}

void silu_mul(const float* gate_up, int64_t rows, int64_t f, float* out) {
  at::parallel_for(0, rows, 32, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = gate_up + r * 2 * f;
      for (int64_t i = 0; i < f; ++i) out[r * f + i] = g[i] / (1.0f + std::exp(-g[i])) * g[f + i];
    }
  });
}

// softmax(q . keys * scale) . values over one query head's n keys
template <typename T>
void attend_head(const float* q, const T* keys, const T* values, int64_t n, int64_t hd, float scale, float* scores,
                 float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    float dot = 0.0f;
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * scale * to_float(keys[j * hd + i]);
    scores[j] = dot;
    mx = std::max(mx, dot);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += (scores[j] = std::exp(scores[j] - mx));
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < hd; ++i) out[i] += scores[j] * to_float(values[j * hd + i]);
  for (int64_t i = 0; i < hd; ++i) out[i] /= sum;
}

template <typename T>
void attend(const AttentionBatch& a, const LayerCache<T>& cache) {
  const LayerShape& s = a.shape;
  const int64_t group = s.n_heads / s.n_kv_heads, hd = s.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t longest = 0;
  for (int64_t t = 0; t < a.n_tokens; ++t) longest = std::max(longest, a.positions[t] + 1);
  at::parallel_for(0, a.n_tokens * s.n_kv_heads, attention_grain(longest, group, hd), [&](int64_t i0, int64_t i1) {
    std::unique_ptr<float[]> scores(new float[longest]);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / s.n_kv_heads, g = item % s.n_kv_heads;
      const T* keys = cache.key(a.slots[t], g, 0, s);
      const T* values = cache.value(a.slots[t], g, 0, s);
      for (int64_t h = g * group; h < (g + 1) * group; ++h)
        attend_head(a.qkv + t * s.qkv_width() + h * hd, keys, values, a.positions[t] + 1, hd, scale, scores.get(),
                    a.out + (t * s.n_heads + h) * hd);
    }
  });
}

void attend_f32(const AttentionBatch& a, const LayerCache<float>& cache) { attend<float>(a, cache); }
void attend_f16(const AttentionBatch& a, const LayerCache<c10::Half>& cache) { attend<c10::Half>(a, cache); }

}  // namespace
}  // namespace seedling::generic

namespace seedling {

const Kernels& generic_kernels() {
  static const Kernels table{"generic", generic::quantize, generic::matmul, generic::silu_mul, generic::attend_f32,
                             generic::attend_f16};
  return table;
}

}  // namespace seedling
