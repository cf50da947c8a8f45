// Seedling's native CPU ops, loaded by model/native.py as `torch.ops.seedling`.
//
// Why native code: a decode step of a 135M model is ~30 layers x ~15 small ops. In eager PyTorch each
// op costs microseconds of dispatch and a trip through memory, and at one sequence that overhead is
// larger than the matmuls themselves (bench/README.md has the profile). This file runs a whole
// forward over a packed batch in one call, with the weights in llama.cpp's block formats (Q4_1
// projections, a Q8_0 head; seedling_cpu.h has the layout). Activations are quantized on the fly to
// int8 blocks of 32, so every dot product is integer multiply-adds with one fp32 multiply-add per
// block. Each output depends only on its own token (its own activation scales, its own attention),
// so the results are bit-identical however the engine batches and chunks the tokens.
//
// The hot loops come in variants (seedling_cpu.h `Kernels`): AVX-512 VNNI, AVX2 + FMA, and plain
// C++. One library holds them all; each op runs the best variant CPUID allows, or the one its `isa`
// argument names (model/native.py passes SEEDLING_CPU_ISA through; the tests run every variant the
// CPU has against the reference forward).
//
// Ops (schemas at the bottom):
//   seedling::linear(x, q, d, m, isa)  -> x @ W^T for one quantized weight (used by model/quantize.py)
//   seedling::forward(..., isa)        -> logits of a Llama-family decoder over a packed batch of tokens,
//                                         writing their K/V into the engine's KVCache tensors
//   seedling::hidden(..., isa)         -> the same layers' residual stream (no final norm, no head):
//                                         a shallow stack's features for classification heads
//   seedling::cpu_isas()               -> the variants this CPU can run, best first

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "seedling_cpu.h"

namespace seedling {
namespace {

// names each phase for the torch profiler (bench/profile_step.py); a flag check when it is off
#define SEEDLING_PHASE(name) RECORD_FUNCTION("seedling::" name, std::vector<c10::IValue>())

// ---------------------------------------------------------------------------------------------
// dispatch

bool cpu_supports(const Kernels& k) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (&k == &avx512_kernels())
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (&k == &avx2_kernels())
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return &k == &generic_kernels();
}

// every variant compiled in, best first
std::vector<const Kernels*> all_kernels() {
#if defined(__x86_64__)
  return {&avx512_kernels(), &avx2_kernels(), &generic_kernels()};
#else
  return {&generic_kernels()};
#endif
}

std::vector<std::string> cpu_isas_op() {
  std::vector<std::string> names;
  for (const Kernels* k : all_kernels())
    if (cpu_supports(*k)) names.emplace_back(k->name);
  return names;
}

// the variant `isa` names ("" = the best this CPU runs); an unknown or unsupported name is an error,
// never a silent fallback, so SEEDLING_CPU_ISA=avx512 on an AVX2 machine fails loudly
const Kernels& kernels_for(c10::string_view isa) {
  for (const Kernels* k : all_kernels()) {
    if (isa.empty() && cpu_supports(*k)) return *k;
    if (isa == k->name) {
      TORCH_CHECK(cpu_supports(*k), "this CPU cannot run the ", k->name, " kernels (it runs: ",
                  c10::Join(", ", cpu_isas_op()), ")");
      return *k;
    }
  }
  TORCH_CHECK(false, "unknown kernel variant '", std::string(isa), "' (this CPU runs: ",
              c10::Join(", ", cpu_isas_op()), ")");
}

// ---------------------------------------------------------------------------------------------
// the parts of a layer that are not hot enough for variants

void quantize_rows(const Kernels& kern, QuantizedRows& out, const float* x, int64_t rows, int64_t cols, int64_t ldx) {
  SEEDLING_PHASE("quantize_activations");
  kern.quantize(x, rows, cols, ldx, out);
}

void matmul(const Kernels& kern, const QuantizedRows& x, const QuantizedWeight& w, float* out, int64_t ldo) {
  SEEDLING_PHASE("matmul");
  TORCH_CHECK(x.cols == w.k, "activation width ", x.cols, " != weight in_features ", w.k);
  kern.matmul(x, w, out, ldo);
}

QuantizedWeight weight_view(const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
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

// Write the packed tokens' new K/V into their cache rows (fp16 rounds to nearest even), then attend.
template <typename T>
void attention(const Kernels& kern, const AttentionBatch& a, const LayerCache<T>& cache) {
  const LayerShape& s = a.shape;
  for (int64_t t = 0; t < a.n_tokens; ++t)
    for (int64_t g = 0; g < s.n_kv_heads; ++g) {
      const float* k = a.qkv + t * s.qkv_width() + (s.n_heads + g) * s.head_dim;
      const float* v = k + s.n_kv_heads * s.head_dim;
      T* k_dst = cache.key(a.slots[t], g, a.positions[t], s);
      T* v_dst = cache.value(a.slots[t], g, a.positions[t], s);
      for (int64_t i = 0; i < s.head_dim; ++i) k_dst[i] = static_cast<T>(k[i]), v_dst[i] = static_cast<T>(v[i]);
    }
  SEEDLING_PHASE("attention");
  if constexpr (std::is_same_v<T, float>) kern.attend_f32(a, cache);
  else kern.attend_f16(a, cache);
}

// ---------------------------------------------------------------------------------------------
// ops

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m,
                     c10::string_view isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "seedling::linear takes float32 CPU input");
  const Kernels& kern = kernels_for(isa);
  const QuantizedWeight w = weight_view(q, d, m);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  QuantizedRows xq;
  quantize_rows(kern, xq, x2.data_ptr<float>(), x2.size(0), x2.size(1), x2.size(1));
  at::Tensor out = at::empty({x2.size(0), w.n}, x.options());
  matmul(kern, xq, w, out.data_ptr<float>(), w.n);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.n;
  return out.view(shape);
}

constexpr int64_t kTensorsPerLayer = 14;  // the order is model/quantize.py NativeForward.weights

// The buffers one forward reuses across its layers, sized for its packed tokens.
struct Scratch {
  std::vector<float> h, qkv, attn, proj, gate_up, act, cos, sin;
  QuantizedRows xq;
  Scratch(int64_t n_tokens, const LayerShape& s)
      : h(n_tokens * s.dim), qkv(n_tokens * s.qkv_width()), attn(n_tokens * s.n_heads * s.head_dim),
        proj(n_tokens * s.dim), gate_up(n_tokens * 2 * s.ffn), act(n_tokens * s.ffn),
        cos(n_tokens * s.head_dim / 2), sin(n_tokens * s.head_dim / 2) {}
};

// rotary tables for every packed token: angle = position * inv_freq (fp32, as the PyTorch model)
void rotary_tables(const int64_t* positions, int64_t n_tokens, const float* inv_freq, int64_t half, Scratch& w) {
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(positions[t]) * inv_freq[i];
      w.cos[t * half + i] = std::cos(angle), w.sin[t * half + i] = std::sin(angle);
    }
}

struct ForwardArgs {
  const Kernels& kern;
  at::TensorList weights;
  const at::Tensor& k_cache;
  const at::Tensor& v_cache;
  const int64_t* slots;
  const int64_t* positions;
  int64_t n_tokens;
  LayerShape shape;
  float eps;

  QuantizedWeight weight(int64_t i) const { return weight_view(weights[i], weights[i + 1], weights[i + 2]); }
};

// One decoder layer over the packed residual stream x (n_tokens, dim), in place.
void decoder_layer(const ForwardArgs& f, int64_t l, float* x, Scratch& w) {
  const LayerShape& s = f.shape;
  const int64_t base = l * kTensorsPerLayer, n = f.n_tokens, width = s.n_heads * s.head_dim;
  auto add_into_residual = [&](const float* y) {
#pragma omp simd
    for (int64_t i = 0; i < n * s.dim; ++i) x[i] += y[i];
  };
  // attention
  rms_norm(x, n, s.dim, f.weights[base].data_ptr<float>(), f.eps, w.h.data());
  quantize_rows(f.kern, w.xq, w.h.data(), n, s.dim, s.dim);
  matmul(f.kern, w.xq, f.weight(base + 1), w.qkv.data(), s.qkv_width());
  apply_rotary(w.qkv.data(), n, s, w.cos.data(), w.sin.data());
  const AttentionBatch batch{w.qkv.data(), n, f.slots, f.positions, s, w.attn.data()};
  const int64_t max_len = f.k_cache.size(3);
  if (f.k_cache.scalar_type() == at::kHalf)
    attention(f.kern, batch,
              LayerCache<c10::Half>{f.k_cache[l].data_ptr<at::Half>(), f.v_cache[l].data_ptr<at::Half>(), max_len});
  else
    attention(f.kern, batch, LayerCache<float>{f.k_cache[l].data_ptr<float>(), f.v_cache[l].data_ptr<float>(), max_len});
  quantize_rows(f.kern, w.xq, w.attn.data(), n, width, width);
  matmul(f.kern, w.xq, f.weight(base + 4), w.proj.data(), s.dim);
  add_into_residual(w.proj.data());
  // MLP
  rms_norm(x, n, s.dim, f.weights[base + 7].data_ptr<float>(), f.eps, w.h.data());
  quantize_rows(f.kern, w.xq, w.h.data(), n, s.dim, s.dim);
  matmul(f.kern, w.xq, f.weight(base + 8), w.gate_up.data(), 2 * s.ffn);
  {
    SEEDLING_PHASE("silu_mul");
    f.kern.silu_mul(w.gate_up.data(), n, s.ffn, w.act.data());
  }
  quantize_rows(f.kern, w.xq, w.act.data(), n, s.ffn, s.ffn);
  matmul(f.kern, w.xq, f.weight(base + 11), w.proj.data(), s.dim);
  add_into_residual(w.proj.data());
}

// final norm and output head, only for the rows that need logits
at::Tensor output_head(const ForwardArgs& f, const float* x, const at::Tensor& rows_t, Scratch& w) {
  const int64_t base = f.weights.size() - 4, dim = f.shape.dim, n_rows = rows_t.numel();
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  std::vector<float> picked(n_rows * dim);
  for (int64_t r = 0; r < n_rows; ++r) {
    TORCH_CHECK(rows[r] >= 0 && rows[r] < f.n_tokens, "logits row ", rows[r], " out of range");
    rms_norm(x + rows[r] * dim, 1, dim, f.weights[base].data_ptr<float>(), f.eps, picked.data() + r * dim);
  }
  const QuantizedWeight head = f.weight(base + 1);
  at::Tensor logits = at::empty({n_rows, head.n}, at::kFloat);
  quantize_rows(f.kern, w.xq, picked.data(), n_rows, dim, dim);
  matmul(f.kern, w.xq, head, logits.data_ptr<float>(), head.n);
  return logits;
}

// What forward and hidden share: check the arguments, run every layer over the packed tokens, then
// hand the residual stream (n_tokens, dim) to `finish`. `tail` is how many weight tensors follow the
// layers (forward: the final norm and the head, 4; hidden: none).
template <typename Finish>
at::Tensor run_stack(const at::Tensor& x_in, const at::Tensor& slots_t, const at::Tensor& positions_t,
                     at::TensorList weights, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& inv_freq_t, int64_t n_heads, int64_t n_kv_heads, double eps,
                     c10::string_view isa, int64_t tail, Finish finish) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x must be (tokens, dim) float32");
  TORCH_CHECK((k_cache.scalar_type() == at::kHalf || k_cache.scalar_type() == at::kFloat) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes(),
              "K/V caches must be contiguous float32 or float16 (layers, slots, kv_heads, max_len, head_dim)");
  const int64_t n_layers = k_cache.size(0), n_tokens = x_in.size(0);
  TORCH_CHECK(n_layers >= 1, "at least one layer");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n_layers * kTensorsPerLayer + tail, "expected ",
              n_layers * kTensorsPerLayer + tail, " weight tensors, got ", weights.size());
  const at::Tensor slots_c = slots_t.to(at::kLong).contiguous(), pos_c = positions_t.to(at::kLong).contiguous();
  TORCH_CHECK(slots_c.numel() == n_tokens && pos_c.numel() == n_tokens, "one slot and position per token");
  const int64_t* slots = slots_c.data_ptr<int64_t>();
  const int64_t* positions = pos_c.data_ptr<int64_t>();
  for (int64_t t = 0; t < n_tokens; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < k_cache.size(1) && positions[t] >= 0 && positions[t] < k_cache.size(3),
                "token ", t, " has slot ", slots[t], " position ", positions[t], " outside the cache");
  const LayerShape s{x_in.size(1), n_heads, n_kv_heads, k_cache.size(4),
                     weights[8].size(0) * ROWS / 2};  // gate_up has 2 * ffn rows, in groups of 8
  TORCH_CHECK(k_cache.size(2) == n_kv_heads && n_heads % n_kv_heads == 0, "bad head shape");
  TORCH_CHECK(s.head_dim == 16 || s.head_dim == 32 || s.head_dim == 64 || s.head_dim == 128, "head_dim ",
              s.head_dim, " is not supported (16, 32, 64 or 128)");

  const ForwardArgs f{kernels_for(isa), weights, k_cache, v_cache, slots, positions, n_tokens, s,
                      static_cast<float>(eps)};
  Scratch w(n_tokens, s);
  rotary_tables(positions, n_tokens, inv_freq_t.contiguous().data_ptr<float>(), s.head_dim / 2, w);
  at::Tensor x_t = x_in.contiguous().clone();  // the residual stream
  for (int64_t l = 0; l < n_layers; ++l) decoder_layer(f, l, x_t.data_ptr<float>(), w);
  return finish(f, x_t, w);
}

at::Tensor forward_op(const at::Tensor& x_in, const at::Tensor& slots_t, const at::Tensor& positions_t,
                      const at::Tensor& logits_rows_t, at::TensorList weights, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& inv_freq_t, int64_t n_heads, int64_t n_kv_heads,
                      double eps, c10::string_view isa) {
  return run_stack(x_in, slots_t, positions_t, weights, k_cache, v_cache, inv_freq_t, n_heads, n_kv_heads, eps,
                   isa, 4, [&](const ForwardArgs& f, const at::Tensor& x, Scratch& w) {
                     return output_head(f, x.data_ptr<float>(), logits_rows_t.to(at::kLong).contiguous(), w);
                   });
}

// The residual stream after the layers (no final norm, no head): features for classification heads
// (model/features.py), computed by exactly the kernels a q4 forward runs.
at::Tensor hidden_op(const at::Tensor& x_in, const at::Tensor& slots_t, const at::Tensor& positions_t,
                     at::TensorList weights, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& inv_freq_t, int64_t n_heads, int64_t n_kv_heads, double eps,
                     c10::string_view isa) {
  return run_stack(x_in, slots_t, positions_t, weights, k_cache, v_cache, inv_freq_t, n_heads, n_kv_heads, eps,
                   isa, 0, [](const ForwardArgs&, const at::Tensor& x, Scratch&) { return x; });
}

}  // namespace
}  // namespace seedling

TORCH_LIBRARY(seedling, lib) {
  lib.def("linear(Tensor x, Tensor q, Tensor d, Tensor m, str isa=\"\") -> Tensor");
  lib.def(
      "forward(Tensor x, Tensor slots, Tensor positions, Tensor logits_rows, Tensor[] weights, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor inv_freq, int n_heads, int n_kv_heads, float eps, str isa=\"\") -> Tensor");
  lib.def(
      "hidden(Tensor x, Tensor slots, Tensor positions, Tensor[] weights, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor inv_freq, int n_heads, int n_kv_heads, float eps, str isa=\"\") -> Tensor");
  lib.def("cpu_isas() -> str[]", &seedling::cpu_isas_op);  // no tensor arguments: one kernel for every key
}

TORCH_LIBRARY_IMPL(seedling, CPU, lib) {
  lib.impl("linear", seedling::linear_op);
  lib.impl("forward", seedling::forward_op);
  lib.impl("hidden", seedling::hidden_op);
}
