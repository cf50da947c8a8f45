// The types shared by Seedling's native CPU ops (seedling_cpu.cpp) and the kernel variants they
// dispatch to at load time (kernels_x86.cpp: AVX2+FMA and AVX-512 VNNI; kernels_generic.cpp: plain
// C++ for every other CPU). Each variant fills one `Kernels` table; seedling_cpu.cpp picks the
// best table this CPU can run (CPUID), or the one SEEDLING_CPU_ISA names.
//
// Formats (llama.cpp's blocks of 32 weights; the packing is model/quantize.py's pack_q4_1 / pack_q8_0):
//   Q4_1  fp16 scale d, fp16 minimum m, 32 x 4-bit q;  w = d * q + m
//   Q8_0  fp16 scale d, 32 x int8 q (|q| <= 127);       w = d * q
// Weights are stored in groups of 8 output rows, interleaved so that one 256-bit register holds 4
// consecutive inputs of each of the 8 rows (one row per 32-bit lane). Per (row group, block):
//   Q4_1x8: 128 bytes: chunk pairs (2L, 2L+1) for L < 4 as 32 bytes, low nibble = chunk 2L;
//           byte 4r + i of chunk c is row r's input 4c + i;   d, m: 8 fp16 (one per row)
//   Q8_0x8: 256 bytes: chunk c (c < 8) as 32 bytes laid out as above;   d: 8 fp16
// Activations are int8 blocks of 32 with one fp32 scale d (and d * sum(q), for Q4_1's minimum).
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace seedling {

constexpr int64_t QK = 32;   // values per quantization block
constexpr int64_t ROWS = 8;  // output rows per interleaved weight group

// Activation rows quantized to int8 blocks; the buffers are reused across a forward's layers.
struct QuantizedRows {
  int64_t rows = 0, cols = 0, blocks = 0;
  std::vector<int8_t> q;  // (rows, cols)
  std::vector<float> d;   // (rows, blocks)
  std::vector<float> s;   // (rows, blocks): d * sum(q) of the block
};

// A packed Q4_1x8 or Q8_0x8 weight (views into tensors the caller keeps alive).
struct QuantizedWeight {
  const uint8_t* q;
  const uint16_t* d;  // (N/8, blocks, 8) fp16
  const uint16_t* m;  // (N/8, blocks, 8) fp16, Q4_1 only
  int64_t n, k;
  bool q4;

  int64_t group_bytes() const { return q4 ? 128 : 256; }
};

struct LayerShape {
  int64_t dim, n_heads, n_kv_heads, head_dim, ffn;
  int64_t qkv_width() const { return (n_heads + 2 * n_kv_heads) * head_dim; }
};

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

// The packed tokens of one attention call: token t attends over its cache row slots[t], positions
// [0, positions[t]]; qkv is (tokens, qkv_width) with rotary applied, out is (tokens, n_heads * head_dim).
struct AttentionBatch {
  const float* qkv;
  int64_t n_tokens;
  const int64_t* slots;
  const int64_t* positions;
  LayerShape shape;
  float* out;
};

// Work items (token, kv head) per thread in attention: at least ~64K multiply-adds each, so a short
// decode runs on the calling thread instead of paying a thread fork/join (and, on a busy machine,
// a wait for the second thread to be scheduled) for microseconds of work.
inline int64_t attention_grain(int64_t longest, int64_t group, int64_t head_dim) {
  const int64_t work = std::max<int64_t>(1, longest * group * head_dim);
  return std::max<int64_t>(1, (int64_t{1} << 16) / work);
}

// One instruction-set variant of the hot loops. Every variant computes the same integer dot products;
// only the fp32 summation order differs (tests hold each against the reference forward).
struct Kernels {
  const char* name;
  // x (rows, cols) with leading dimension ldx -> out (cols % 32 == 0)
  void (*quantize)(const float* x, int64_t rows, int64_t cols, int64_t ldx, QuantizedRows& out);
  // out (M, N) row-major with leading dimension ldo = x @ W^T
  void (*matmul)(const QuantizedRows& x, const QuantizedWeight& w, float* out, int64_t ldo);
  // silu(gate) * up for rows of [gate | up] (width 2F) -> (rows, F)
  void (*silu_mul)(const float* gate_up, int64_t rows, int64_t f, float* out);
  void (*attend_f32)(const AttentionBatch& batch, const LayerCache<float>& cache);
  void (*attend_f16)(const AttentionBatch& batch, const LayerCache<c10::Half>& cache);
};

const Kernels& generic_kernels();
#if defined(__x86_64__)
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();
#endif

// Resizes `out` for rows x cols (the kernels only fill it).
inline void reserve_rows(QuantizedRows& out, int64_t rows, int64_t cols) {
  out.rows = rows, out.cols = cols, out.blocks = cols / QK;
  out.q.resize(rows * cols), out.d.resize(rows * out.blocks), out.s.resize(rows * out.blocks);
}

}  // namespace seedling
