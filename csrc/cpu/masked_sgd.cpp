// Fused masked SGD step on the CPU: one call updates every tensor of a parameter group.
//
// All tensors are cut into fixed-size chunks and one OpenMP loop runs over the chunks of all
// tensors together, so a group of many small tensors and a group of few large ones both keep
// every core busy, and the whole step is a single parallel region (no per-tensor dispatch).
// The inner loops are branch-free selects over contiguous arrays so GCC vectorises them; the
// step is memory-bound (see benchmarks/RESULTS.md for the bytes-per-element floor).
#include "ong_sgd.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace ong {
namespace {

// 16K float32 elements = 64 KiB per array per chunk: large enough to amortise OpenMP scheduling,
// small enough that ResNet-18's 11M weights give ~700 chunks to balance over the cores.
constexpr std::int64_t kChunk = 1 << 14;

template <typename T, bool kMasked, bool kMomentum, bool kNesterov, bool kFirst>
void update_span(T* __restrict p, const T* __restrict grad, T* __restrict buf,
                 const std::uint8_t* __restrict mask, std::int64_t n, const SgdHyper& h) {
  const T lr = static_cast<T>(h.lr);
  const T wd = static_cast<T>(h.weight_decay);
  const T mom = static_cast<T>(h.momentum);
  const T damp = static_cast<T>(1.0 - h.dampening);
  const T sign = h.maximize ? T(-1) : T(1);
  for (std::int64_t i = 0; i < n; ++i) {
    const bool keep = kMasked ? mask[i] != 0 : true;
    // Select, never multiply: a NaN/Inf gradient at a pruned position must not reach p or buf.
    T g = keep ? sign * grad[i] : T(0);
    const T w = p[i];
    if (wd != T(0)) g = g + wd * w;  // loop-invariant; GCC unswitches it (-O3)
    if constexpr (kMomentum) {
      T b = kFirst ? g : mom * buf[i] + damp * g;
      if constexpr (kMasked) b = keep ? b : T(0);
      buf[i] = b;
      g = kNesterov ? g + mom * b : b;
    }
    const T updated = w - lr * g;
    p[i] = kMasked ? (keep ? updated : T(0)) : updated;
  }
}

template <typename T>
using SpanFn = void (*)(T*, const T*, T*, const std::uint8_t*, std::int64_t, const SgdHyper&);

template <typename T, bool kMasked>
SpanFn<T> pick_momentum(const SgdHyper& h) {
  if (h.momentum == 0.0) return update_span<T, kMasked, false, false, false>;
  if (h.nesterov) {
    return h.first_step ? update_span<T, kMasked, true, true, true>
                        : update_span<T, kMasked, true, true, false>;
  }
  return h.first_step ? update_span<T, kMasked, true, false, true>
                      : update_span<T, kMasked, true, false, false>;
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
  const SpanFn<T> masked = pick_momentum<T, true>(h);
  const SpanFn<T> dense = pick_momentum<T, false>(h);
  const auto n_chunks = static_cast<std::int64_t>(chunks.size());
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[c];
    const SgdTensor& t = tensors[ch.tensor];
    T* p = reinterpret_cast<T*>(t.param) + ch.begin;
    const T* g = reinterpret_cast<const T*>(t.grad) + ch.begin;
    T* buf = t.buf ? reinterpret_cast<T*>(t.buf) + ch.begin : nullptr;
    const std::int64_t n = ch.end - ch.begin;
    if (t.mask) {
      masked(p, g, buf, reinterpret_cast<const std::uint8_t*>(t.mask) + ch.begin, n, h);
    } else {
      dense(p, g, buf, nullptr, n, h);
    }
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
