// Fused masked SGD step on the CPU: one call updates every tensor of a parameter group.
//
// All tensors are cut into fixed-size chunks and one OpenMP loop runs over the chunks of all
// tensors together, so the whole step is a single parallel region: no per-tensor dispatch, and
// one barrier per step instead of one per tensor (on a loaded 2-core machine torch's fused
// SGD, one parallel region per tensor, was seen 10-30x slower than its quiet time; ours not).
// The step is memory-bound (benchmarks/RESULTS.md has the bytes-per-element floor); masks are
// bit-packed (ong_kernels/_bitmask.py) so they add 1/8 byte per weight, not 1 byte.
//
// float32 on AVX-512 machines runs an intrinsics loop: 16 mask bits are one __mmask16, and a
// zero-masked load reads the gradient only where the weight is kept, so a NaN/Inf gradient at a
// pruned position is never even loaded. Elsewhere a scalar loop with the same selects runs.
#include "ong_sgd.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ong {
namespace {

// 16K elements = 64 KiB per float32 array per chunk: large enough to amortise scheduling, small
// enough that ResNet-18's 11M weights give ~700 chunks to balance over the cores. A multiple
// of 16 so every chunk starts on a mask byte (and an AVX-512 mask word) boundary.
constexpr std::int64_t kChunk = 1 << 14;

inline bool kept(const std::uint8_t* bits, std::int64_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

// Elements [begin, end) of one tensor; `bits` == nullptr for a dense tensor.
template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
void update_scalar(T* __restrict p, const T* __restrict grad, T* __restrict buf,
                   const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                   const SgdHyper& h) {
  const T lr = static_cast<T>(h.lr);
  const T wd = static_cast<T>(h.weight_decay);
  const T mom = static_cast<T>(h.momentum);
  const T damp = static_cast<T>(1.0 - h.dampening);
  const T sign = h.maximize ? T(-1) : T(1);
  for (std::int64_t i = begin; i < end; ++i) {
    const bool keep = bits == nullptr || kept(bits, i);
    // Select, never multiply: a NaN/Inf gradient at a pruned position must not reach p or buf.
    T g = keep ? sign * grad[i] : T(0);
    const T w = p[i];
    if (wd != T(0)) g = g + wd * w;
    if constexpr (kMomentum) {
      T b = kFirst ? g : mom * buf[i] + damp * g;
      b = keep ? b : T(0);
      buf[i] = b;
      g = kNesterov ? g + mom * b : b;
    }
    p[i] = keep ? w - lr * g : T(0);
  }
}

#if defined(__AVX512F__)
template <bool kMomentum, bool kNesterov, bool kFirst>
void update_avx512(float* __restrict p, const float* __restrict grad, float* __restrict buf,
                   const std::uint8_t* __restrict bits, std::int64_t begin, std::int64_t end,
                   const SgdHyper& h) {
  const __m512 lr = _mm512_set1_ps(static_cast<float>(h.lr));
  const __m512 wd = _mm512_set1_ps(static_cast<float>(h.weight_decay));
  const __m512 mom = _mm512_set1_ps(static_cast<float>(h.momentum));
  const __m512 damp = _mm512_set1_ps(static_cast<float>(1.0 - h.dampening));
  const __m512 sign = _mm512_set1_ps(h.maximize ? -1.0f : 1.0f);
  const bool use_wd = h.weight_decay != 0.0;
  std::int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    __mmask16 keep = 0xFFFF;
    if (bits != nullptr) std::memcpy(&keep, bits + (i >> 3), sizeof(keep));
    __m512 g = _mm512_mul_ps(sign, _mm512_maskz_loadu_ps(keep, grad + i));
    const __m512 w = _mm512_loadu_ps(p + i);
    if (use_wd) g = _mm512_fmadd_ps(wd, w, g);
    if constexpr (kMomentum) {
      __m512 b = kFirst ? g : _mm512_fmadd_ps(mom, _mm512_loadu_ps(buf + i), _mm512_mul_ps(damp, g));
      b = _mm512_maskz_mov_ps(keep, b);
      _mm512_storeu_ps(buf + i, b);
      g = kNesterov ? _mm512_fmadd_ps(mom, b, g) : b;
    }
    _mm512_storeu_ps(p + i, _mm512_maskz_mov_ps(keep, _mm512_fnmadd_ps(lr, g, w)));
  }
  update_scalar<float, kMomentum, kNesterov, kFirst>(p, grad, buf, bits, i, end, h);
}
#endif

template <typename T>
using SpanFn = void (*)(T*, const T*, T*, const std::uint8_t*, std::int64_t, std::int64_t,
                        const SgdHyper&);

template <typename T, bool kMomentum, bool kNesterov, bool kFirst>
SpanFn<T> span_fn() {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return update_avx512<kMomentum, kNesterov, kFirst>;
#endif
  return update_scalar<T, kMomentum, kNesterov, kFirst>;
}

template <typename T>
SpanFn<T> pick(const SgdHyper& h) {
  if (h.momentum == 0.0) return span_fn<T, false, false, false>();
  if (h.nesterov) return h.first_step ? span_fn<T, true, true, true>() : span_fn<T, true, true, false>();
  return h.first_step ? span_fn<T, true, false, true>() : span_fn<T, true, false, false>();
}

template <typename T>
void step_all(const std::vector<SgdTensor>& tensors, const SgdHyper& h, int num_threads) {
  struct Chunk {
    std::int32_t tensor;
    std::int64_t begin;
    std::int64_t end;
  };
  std::vector<Chunk> chunks;
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    for (std::int64_t b = 0; b < tensors[t].numel; b += kChunk) {
      chunks.push_back({static_cast<std::int32_t>(t), b, std::min(b + kChunk, tensors[t].numel)});
    }
  }
  const SpanFn<T> update = pick<T>(h);
  const auto n_chunks = static_cast<std::int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const SgdTensor& t = tensors[ch.tensor];
    update(reinterpret_cast<T*>(t.param), reinterpret_cast<const T*>(t.grad),
           reinterpret_cast<T*>(t.buf), reinterpret_cast<const std::uint8_t*>(t.mask), ch.begin,
           ch.end, h);
  }
}

}  // namespace

void masked_sgd_step_cpu(const std::vector<SgdTensor>& tensors, DType dtype, const SgdHyper& h,
                         int num_threads) {
  if (num_threads < 1) num_threads = 1;
  switch (dtype) {
    case DType::kFloat32:
      step_all<float>(tensors, h, num_threads);
      break;
    case DType::kFloat64:
      step_all<double>(tensors, h, num_threads);
      break;
    default:
      throw std::invalid_argument("masked_sgd_step_cpu: only float32 and float64 are supported");
  }
}

}  // namespace ong
